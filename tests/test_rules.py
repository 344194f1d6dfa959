"""The interpreter's rules, one primitive at a time, against the merged model.

Lazy rules must not form the merged weight (a ``LoraMaterializeWarning``
is turned into an error where a rule claims laziness), and must compute
what ``fn(jlora.merge(frozen, trainable), ...)`` computes, forward and
gradients.
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx
from jax import lax

import jlora
from hlo import lora_step_hlo, weight_shaped_dots
from reference import (JIT, JIT_ONLY, NoMaterialize, adapt, assert_close_forward,
                       assert_close_grads, assert_merge_matters, check_against_merged,
                       max_abs_diff, maybe_jit, normal, square_problem, weights)

# -- lazy structural ops ----------------------------------------------------------------


@JIT_ONLY
def test_transpose_stays_lazy(jit):
  (w,) = weights((8, 8))
  x = normal((4, 8), seed=1)
  # W.T as the left operand: (out, in) contracted over its axis 1.
  fn = lambda p, x: (p["w"].T @ x.T).T
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]))
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT_ONLY
def test_reshape_densegeneral_kernel_stays_lazy(jit):
  w_in, w_out = weights((8, 2, 4), (2, 4, 8))
  x = normal((4, 8), seed=1)

  def fn(p, x):
    h = jnp.tanh(x @ p["w_in"].reshape(8, 8))         # (d, h, k) -> (d, h*k)
    return h @ p["w_out"].reshape(8, 8)               # (h, k, d) -> (h*k, d)

  layouts = jlora.infer_layouts(fn, {"w_in": w_in, "w_out": w_out}, x)
  assert layouts == {"w_in": jlora.Layout((0,), (1, 2)), "w_out": jlora.Layout((0, 1), (2,))}
  frozen, trainable = adapt({"w_in": w_in, "w_out": w_out},
                            jlora.LoraSpec(rank=2, alpha=4, targets=["w_in", "w_out"]),
                            layouts=layouts)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT_ONLY
def test_convert_element_type_stays_lazy(jit):
  (w,) = weights((8, 8))
  x = normal((4, 8), seed=1)
  fn = lambda p, x: x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]))
  with NoMaterialize():
    y = maybe_jit(jlora.lora(fn), jit)(frozen, trainable, x)
  assert y.dtype == jnp.bfloat16
  want = fn(jlora.merge(frozen, trainable), x)
  exact = x @ jlora.merge(frozen, trainable)["w"]
  assert max_abs_diff(y, want) <= 0.05 * float(jnp.max(jnp.abs(exact)))
  # The f32 -> f32 round trip through bf16 and back keeps the f32 answer close.
  fn32 = lambda p, x: x @ p["w"].astype(jnp.bfloat16).astype(jnp.float32)
  with NoMaterialize():
    check_against_merged(fn32, frozen, trainable, (x,), jit=jit, fwd_atol=0.05, grad_rtol=0.05)


@JIT_ONLY
@pytest.mark.parametrize("how", ["slice", "split"])
def test_fused_qkv_slice_stays_lazy(jit, how):
  """A fused (d, 3 * heads, head_dim) qkv kernel cut into q, k, v along an out axis."""
  (w,) = weights((8, 6, 4))
  x = normal((4, 8), seed=1)

  def fn(p, x):
    if how == "slice":
      q, k, v = p["qkv"][:, :2], p["qkv"][:, 2:4], p["qkv"][:, 4:]
    else:
      q, k, v = jnp.split(p["qkv"], 3, axis=1)
    proj = lambda w: jnp.einsum("bd,dhk->bhk", x, w)
    return jnp.tanh(proj(q)) * proj(k) + proj(v)

  layouts = jlora.infer_layouts(fn, {"qkv": w}, x)
  assert layouts == {"qkv": jlora.Layout((0,), (1, 2))}
  frozen, trainable = adapt({"qkv": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["qkv"]),
                            layouts=layouts)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


# -- higher-order primitives ---------------------------------------------------------


@JIT
def test_nested_jit(jit):
  frozen, trainable, x = square_problem()
  inner = jax.jit(lambda w, x: jnp.tanh(x @ w))
  fn = lambda p, x: inner(p["w"], jax.jit(lambda x: inner(p["w"], x))(x))
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT
def test_checkpoint_with_policy(jit):
  frozen, trainable, x = square_problem()
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  block = jax.checkpoint(lambda w, x: jnp.sin(jnp.tanh(x @ w) @ w), policy=policy)
  fn = lambda p, x: block(p["w"], x)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT
@pytest.mark.parametrize("fn", [
    # nn.scan style: the layer axis is scanned over.
    lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), jnp.sum(h)), x, p["w"]),
    # ``w[i]`` in a loop: dynamic_slice + squeeze of the stack axis stay lazy.
    lambda p, x: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x),
], ids=["scan", "traced_layer_index"])
def test_stackedweights(jit, fn):
  (w,) = weights((3, 8, 8))
  x = normal((4, 8), seed=1)
  layouts = jlora.infer_layouts(fn, {"w": w}, x)
  assert layouts["w"] == jlora.Layout((1,), (2,), (0,))
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]),
                            layouts=layouts)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT
@pytest.mark.parametrize("pred", [True, False])
def test_cond(jit, pred):
  frozen, trainable, x = square_problem()
  fn = lambda p, x, pred: lax.cond(pred, lambda x: jnp.tanh(x @ p["w"]),
                                   lambda x: 2.0 * jnp.sin(x @ p["w"]), x)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x, jnp.asarray(pred)), jit=jit)


@JIT
def test_fori_loop_weight_as_body_constant(jit):
  frozen, trainable, x = square_problem()
  fn = lambda p, x: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), x)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


def _while_fn(p, x, n):
  body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"]))
  return lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]


@JIT
def test_while_loop_weight_as_body_constant(jit):
  frozen, trainable, x = square_problem()
  # Reverse mode does not go through lax.while_loop, so forward only.
  with NoMaterialize():
    check_against_merged(_while_fn, frozen, trainable, (x, jnp.asarray(3)), jit=jit, grads=False)


@JIT_ONLY
def test_jvp_through_while_loop(jit):
  """Forward mode is the only AD that goes through a while_loop."""
  frozen, trainable, x = square_problem()
  n = jnp.asarray(3)
  tangent = jax.tree_util.tree_map(lambda l: normal(l.shape, seed=3), trainable)
  apply = jlora.lora(_while_fn)
  got = maybe_jit(lambda t, dt: jax.jvp(lambda t: apply(frozen, t, x, n), (t,), (dt,)), jit)(
      trainable, tangent)
  want = jax.jvp(lambda t: _while_fn(jlora.merge(frozen, t), x, n), (trainable,), (tangent,))
  assert_close_forward(got[0], want[0])
  assert_close_forward(got[1], want[1])


def _tanh_matmul(w, x):
  return jnp.tanh(x @ w)


@jax.custom_jvp
def _doubled_jvp(w, x):
  return _tanh_matmul(w, x)


@_doubled_jvp.defjvp
def _doubled_jvp_rule(primals, tangents):
  y, dy = jax.jvp(_tanh_matmul, primals, tangents)
  return y, 2.0 * dy


@jax.custom_vjp
def _doubled_vjp(w, x):
  return _tanh_matmul(w, x)


def _doubled_vjp_fwd(w, x):
  y, vjp = jax.vjp(_tanh_matmul, w, x)
  return y, vjp


def _doubled_vjp_bwd(vjp, g):
  dw, dx = vjp(g)
  return 2.0 * dw, 2.0 * dx


_doubled_vjp.defvjp(_doubled_vjp_fwd, _doubled_vjp_bwd)


@JIT
@pytest.mark.parametrize("custom", [_doubled_jvp, _doubled_vjp], ids=["custom_jvp", "custom_vjp"])
def test_custom_derivative_rule_is_honoured(jit, custom):
  frozen, trainable, x = square_problem()
  fn = lambda p, x: custom(p["w"], jnp.sin(x))
  with NoMaterialize():   # the primal stays low-rank
    maybe_jit(jlora.lora(fn), jit)(frozen, trainable, x)
  # The function's own derivative rule needs the dense weight, and says so.
  with pytest.warns(jlora.LoraMaterializeWarning, match="custom derivative rule"):
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)
  # The rule doubles the true gradient, and the LoRA gradient shows it.
  plain = lambda p, x: _tanh_matmul(p["w"], jnp.sin(x))
  grad = lambda f: jax.grad(lambda t: jnp.sum(jlora.lora(f)(frozen, t, x)))(trainable)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.LoraMaterializeWarning)
    g_custom, g_plain = grad(fn), grad(plain)
  assert_close_grads(g_custom, jax.tree_util.tree_map(lambda g: 2.0 * g, g_plain))


# -- materialisation, layouts, dropout -------------------------------------------------


_EMBEDDING_USES = {
    # nn.Embed's lookup (jnp.take), indexing, and a lookup of the transposed table.
    "take": lambda p, t: jnp.take(p["embed"]["embedding"], t, axis=0),
    "index": lambda p, t: p["embed"]["embedding"][t],
    "transposed": lambda p, t: p["embed"]["embedding"].T[:, t],
    # One (vocab, d) table as the lookup and, transposed, as the output head.
    "tied": lambda p, t: jnp.tanh(p["embed"]["embedding"][t]) @ p["embed"]["embedding"].T,
}


@JIT
@pytest.mark.parametrize("use", list(_EMBEDDING_USES))
def test_embedding_lookup_stays_low_rank(jit, use):
  """Rows of A (or columns of B) times the other factor, as PEFT's embedding
  LoRA: no dense V x D delta, forward or backward."""
  (emb,) = weights((20, 8))
  tokens = jnp.array([[1, 5, 19], [0, 5, 7]])     # 6 tokens: no activation is (20, 8)
  params = {"embed": {"embedding": emb}}
  fn = _EMBEDDING_USES[use]
  layouts = jlora.infer_layouts(fn, params, tokens)
  if use == "tied":
    assert layouts["embed/embedding"] == jlora.Layout((1,), (0,))     # as the head uses it
  frozen, trainable = adapt(params, jlora.LoraSpec(rank=2, alpha=4, targets=["embedding"]),
                            layouts=layouts)
  assert_merge_matters(fn, frozen, trainable, (tokens,), params)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (tokens,), jit=jit)
    if jit:
      hlo = lora_step_hlo(fn, frozen, trainable, (tokens,))
      assert weight_shaped_dots(hlo, frozen, trainable) == []


def test_a_lookup_contracts_one_axis_in_its_backward():
  """A lookup's low-rank product is one (M, r) @ (r, D) matmul over the
  flattened tokens. With the token axes kept, dB contracts two axes, and
  XLA:CPU then makes a transposed (D, M) copy of the whole cotangent for it:
  1.2 s of a 3.2 s step on the benchmark LM (benchmarks/RESULTS.md)."""
  (emb,) = weights((20, 8))
  tokens = jnp.array([[1, 5, 19], [0, 5, 7]])
  params = {"embed": {"embedding": emb}}
  frozen, trainable = adapt(params, jlora.LoraSpec(rank=2, alpha=4, targets=["embedding"]))
  apply = jlora.lora(_EMBEDDING_USES["take"])
  loss = lambda t: jnp.sum(apply(frozen, t, tokens) ** 2)  # noqa: E731
  text = str(jax.make_jaxpr(jax.grad(loss))(trainable))
  contracted = [len(re.findall(r"\d+", lhs))
                for lhs in re.findall(r"dimension_numbers=\(\(\[([\d, ]*)\]", text)]
  assert len(contracted) >= 3 and max(contracted) == 1, contracted   # forward, dA rows, dB


def test_a_gather_that_is_not_a_lookup_still_materializes_with_a_warning():
  (w,) = weights((20, 8))
  fn = lambda p, i: p["w"][i, 2:5]       # a partial slice of each row  # noqa: E731
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]))
  with pytest.warns(jlora.LoraMaterializeWarning, match="'w' is used by 'gather'"):
    got = jlora.lora(fn)(frozen, trainable, jnp.array([3, 7]))
  assert_close_forward(got, fn(jlora.merge(frozen, trainable), jnp.array([3, 7])))


@JIT_ONLY
def test_out_in_kernel_needs_inferred_layout(jit):
  (w,) = weights((6, 8))                               # stored (out, in)
  x = normal((4, 8), seed=1)
  params = {"params": {"proj": {"kernel": w}}}
  fn = lambda p, x: lax.dot_general(x, p["params"]["proj"]["kernel"], (((1,), (1,)), ((), ())))
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=["kernel"])
  frozen, trainable = adapt(params, spec)               # default (in, out) layout: wrong here
  with pytest.raises(jlora.LoraLayoutError, match="params/proj/kernel"):
    maybe_jit(jlora.lora(fn), jit)(frozen, trainable, x)
  layouts = jlora.infer_layouts(fn, params, x)
  assert layouts["params/proj/kernel"] == jlora.Layout((1,), (0,))
  frozen, trainable = adapt(params, spec, layouts=layouts)
  assert trainable["params"]["proj"]["kernel"].a.shape == (8, 2)
  assert_merge_matters(fn, frozen, trainable, (x,), params)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)




# -- values that leave a call stay low-rank ------------------------------------------


@jax.jit
def _transposed(w):
  """A user's jitted helper that returns a weight (here its transpose)."""
  return w.T


class _NNXJitBlock(nnx.Module):
  """An ``nnx.jit`` block: the jit returns the module state beside its output."""

  def __init__(self, rngs):
    self.fc = nnx.Linear(10, 6, rngs=rngs)

  def __call__(self, x):
    return nnx.jit(lambda block, x: jnp.tanh(block.fc(x)))(self, x)


class _NNXRematBlock(_NNXJitBlock):
  def __call__(self, x):
    return nnx.remat(lambda block, x: jnp.tanh(block.fc(x)))(self, x)


class _NNXScanModel(nnx.Module):
  """Layers stacked with nnx.vmap and run by nnx.scan over nnx.remat: the
  scan hands back the layer state as its per-iteration output."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return nnx.Linear(10, 10, rngs=rngs)
    self.layers = create(rngs)
    self.head = nnx.Linear(10, 6, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def forward(x, layer):
      return jnp.tanh(layer(x))
    return self.head(forward(x, self.layers))


def _nnx_fn(cls):
  graphdef, state = nnx.split(cls(nnx.Rngs(0)))
  return (lambda s, x: nnx.merge(graphdef, s)(x)), state


_RETURNED = ["dynamic_index_in_dim", "jit_helper", "nnx_jit", "nnx_remat", "nnx_scan_remat",
             "remat_returns_weight"]


@functools.lru_cache
def _returned_weight_case(name):
  w_out_in, = weights((6, 10))
  stack, = weights((3, 10, 6), key=1)
  x = normal((4, 10), seed=2)   # 4 rows: no activation is shaped like a weight
  cases = {
      # x @ helper(w): the (out, in) weight comes back transposed from a jit.
      "jit_helper": (lambda p, x: jnp.tanh(x @ _transposed(p["w"])), {"w": w_out_in}, (x,)),
      # lax.dynamic_index_in_dim is a jit on current JAX; the layer index is traced.
      "dynamic_index_in_dim": (
          lambda p, x, i: jnp.tanh(x @ lax.dynamic_index_in_dim(p["w"], i, keepdims=False)),
          {"w": stack}, (x, jnp.asarray(1))),
      "remat_returns_weight": (
          lambda p, x: jnp.tanh(x @ jax.checkpoint(lambda w: w.T)(p["w"])), {"w": w_out_in},
          (x,)),
  }
  for nnx_name, cls in (("nnx_jit", _NNXJitBlock), ("nnx_remat", _NNXRematBlock),
                        ("nnx_scan_remat", _NNXScanModel)):
    cases[nnx_name] = lambda cls=cls: _nnx_fn(cls) + ((x,),)
  case = cases[name]
  return case() if callable(case) else case


@JIT
@pytest.mark.parametrize("name", _RETURNED)
def test_weight_returned_by_a_call_stays_low_rank(jit, name):
  fn, params, args = _returned_weight_case(name)
  layouts = jlora.infer_layouts(fn, params, *args)
  assert layouts, "no weight was found to adapt"
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=lambda path, leaf: path in layouts)
  frozen, trainable = adapt(params, spec, layouts=layouts)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, args, jit=jit)
    if jit:
      hlo = lora_step_hlo(fn, frozen, trainable, args)
      assert weight_shaped_dots(hlo, frozen, trainable) == []


@JIT
def test_cond_returning_a_weight(jit):
  frozen, trainable, x = square_problem()
  # Both branches hand back a view of the same structure: it stays low-rank.
  pick = lambda p, x, pred: x @ lax.cond(pred, lambda w: w, lambda w: w.T.T, p["w"])
  with NoMaterialize():
    check_against_merged(pick, frozen, trainable, (x, jnp.asarray(True)), jit=jit)
  # One branch forms a new dense weight: the other's value is formed too.
  scaled = lambda p, x, pred: x @ lax.cond(pred, lambda w: w, lambda w: 2.0 * w, p["w"])
  with pytest.warns(jlora.LoraMaterializeWarning, match="lax.cond branch"), \
      warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*'mul', which has no low-rank rule")
    check_against_merged(scaled, frozen, trainable, (x, jnp.asarray(False)), jit=jit)


# -- casts and precision ------------------------------------------------------------


@JIT_ONLY
@pytest.mark.parametrize("narrow", [
    lambda w: w.astype(jnp.bfloat16).astype(jnp.float32),
    lambda w: w.astype(jnp.float8_e4m3fn).astype(jnp.float32),
    lambda w: lax.reduce_precision(w, exponent_bits=4, mantissa_bits=3),
], ids=["bf16_round_trip", "fp8_fake_quant", "reduce_precision"])
def test_narrowing_the_weight_rounds_w0(jit, narrow):
  """With B = 0 the adapted model is the base model, rounding included."""
  (w,) = weights((8, 8))
  x = normal((4, 8), seed=1)
  fn = lambda p, x: x @ narrow(p["w"])
  frozen, trainable = jlora.lora_transform({"w": w}, jlora.LoraSpec(rank=2, targets=["w"]),
                                           key=jax.random.key(0))
  with NoMaterialize():
    got = maybe_jit(jlora.lora(fn), jit)(frozen, trainable, x)
  want = fn({"w": w}, x)
  assert max_abs_diff(want, x @ w) > 1e-3        # the rounding matters at this scale
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # With B != 0 only the rounding of the small delta s B A differs.
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]))
  with NoMaterialize():
    got = maybe_jit(jlora.lora(fn), jit)(frozen, trainable, x)
  merged = fn(jlora.merge(frozen, trainable), x)
  assert max_abs_diff(got, merged) <= 0.1 * max_abs_diff(merged, want)


def _dot_ops(lowered_text: str) -> list[str]:
  return [line for line in lowered_text.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.parametrize("batched", [False, True], ids=["flat", "batched"])
def test_precision_and_preferred_element_type_reach_every_dot(batched):
  """The model's precision and accumulation type hold for the base dot and
  both low-rank dots (TPUs and GPUs run DEFAULT in bf16 or TF32)."""
  if batched:
    (w,) = weights((3, 8, 6))
    x = normal((3, 4, 8), seed=1).astype(jnp.bfloat16)
    fn = lambda p, x: jnp.einsum("ebd,edf->ebf", x, p["w"].astype(jnp.bfloat16),
                                 precision=lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32)
    layouts = {"w": jlora.Layout((1,), (2,), (0,))}
  else:
    (w,) = weights((8, 6))
    x = normal((4, 8), seed=1).astype(jnp.bfloat16)
    fn = lambda p, x: lax.dot(x, p["w"].astype(jnp.bfloat16), precision=lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)
    layouts = None
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, targets=["w"]), layouts=layouts)
  text = jax.jit(jlora.lora(fn)).lower(frozen, trainable, x).as_text()
  dots = _dot_ops(text)
  assert len(dots) == 3, dots
  for line in dots:
    assert "precision = [HIGHEST, HIGHEST]" in line, line
    assert line.rstrip().endswith("f32>"), line       # accumulated in float32
  control = jax.jit(fn).lower({"w": w}, x).as_text()
  assert all("HIGHEST" in line for line in _dot_ops(control))


# -- source information ----------------------------------------------------------------


def _scope_locations(lowered_text: str) -> set[str]:
  """The name-stack locations (``jit(fn)/scope/op``) of a lowered program."""
  return {name for name in re.findall(r'loc\("([^"]*)"', lowered_text) if "/" in name}


def test_named_scopes_reach_the_lowered_program():
  def fn(p, x):
    with jax.named_scope("attention_block"):
      h = jnp.tanh(x @ p["w"])
    with jax.named_scope("mlp_block"):
      return lax.scan(lambda c, _: (jnp.tanh(c @ p["v"]), None), h, length=2)[0]

  (w, v) = weights((8, 8), (8, 8))
  x = normal((2, 8))
  frozen, trainable = adapt({"w": w, "v": v}, jlora.LoraSpec(rank=2, targets=["w", "v"]))
  text = jax.jit(jlora.lora(fn)).lower(frozen, trainable, x).as_text(debug_info=True)
  plain = jax.jit(fn).lower(jlora.merge(frozen, trainable), x).as_text(debug_info=True)
  assert "jit(fn)/attention_block/dot_general" in _scope_locations(plain)
  assert _scope_locations(plain) <= _scope_locations(text), (
      sorted(_scope_locations(plain) - _scope_locations(text)))
  # The base dot and both low-rank dots carry the equation's scope.
  locs = dict(re.findall(r"^(#loc\d+) = loc\((.*)\)$", text, re.MULTILINE))
  dots = [locs[m] for m in re.findall(r"stablehlo\.dot_general.*loc\((#loc\d+)\)", text)]
  assert sum("attention_block/dot_general" in d for d in dots) == 3, dots


# -- convolutions and ragged dots --------------------------------------------------------


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), name="c1")(x))
    x = nn.Conv(5, (3, 3), strides=2, padding="VALID", kernel_dilation=2, name="c2")(x)
    x = nn.Conv(3, (2,), name="c3")(x.reshape(x.shape[0], -1, x.shape[-1]))   # a 1-D one
    return x.mean(1)


@JIT
def test_convolutions_stay_low_rank(jit):
  """A as a convolution into r channels, B as a 1x1 one (PEFT's Conv LoRA):
  neither the dense delta nor a kernel gradient is formed."""
  model = _CNN()
  x = normal((2, 11, 11, 4), seed=3)
  params = jax.jit(model.init)(jax.random.key(0), x)
  layouts = jlora.infer_layouts(model.apply, params, x)
  assert layouts["params/c1/kernel"] == jlora.Layout((0, 1, 2), (3,))      # window, in -> out
  assert layouts["params/c3/kernel"] == jlora.Layout((0, 1), (2,))
  frozen, trainable = adapt(params, jlora.LoraSpec(rank=2, alpha=4, targets=r".*kernel"),
                            layouts=layouts)
  assert trainable["params"]["c1"]["kernel"].a.shape == (3, 3, 4, 2)     # a conv kernel into r
  assert_merge_matters(model.apply, frozen, trainable, (x,), params)
  with NoMaterialize():
    check_against_merged(model.apply, frozen, trainable, (x,), jit=jit)
    if jit:
      hlo = lora_step_hlo(model.apply, frozen, trainable, (x,))
      assert weight_shaped_dots(hlo, frozen, trainable) == []


@JIT
def test_ragged_dot_experts_stay_low_rank(jit):
  """One pair per expert, through the same ragged dot (how JAX MoE layers group
  tokens by expert)."""
  fn = lambda p, x, sizes: jnp.tanh(lax.ragged_dot(x, p["experts"], sizes)) @ p["out"]  # noqa
  params = {"experts": normal((3, 8, 10), 0.3), "out": normal((10, 4), 0.3, seed=1)}
  x, sizes = normal((6, 8), seed=2), jnp.array([2, 3, 1], jnp.int32)
  layouts = jlora.infer_layouts(fn, params, x, sizes)
  assert layouts["experts"] == jlora.Layout((1,), (2,), (0,))
  frozen, trainable = adapt(params, jlora.LoraSpec(rank=2, alpha=4, targets=["experts"]),
                            layouts=layouts)
  assert_merge_matters(fn, frozen, trainable, (x, sizes), params)
  with NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x, sizes), jit=jit)
    if jit:
      hlo = lora_step_hlo(fn, frozen, trainable, (x, sizes))
      assert weight_shaped_dots(hlo, frozen, trainable) == []


# -- shard_map ------------------------------------------------------------------------------

_SHARD_MAP_SCRIPT = r'''
import json, os, re, sys, warnings
# Appended: the suite's fast-compile flags (tests/conftest.py) stay in force.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
import jlora
from hlo import dot_result_shapes
warnings.simplefilter("error", jlora.LoraMaterializeWarning)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("d", "m"))

def fn(p, x):   # a tensor-parallel MLP written by hand
  def local(w1, w2, x):
    return jax.lax.psum(jnp.tanh(x @ w1) @ w2, "m")
  return jax.shard_map(local, mesh=mesh, in_specs=(P(None, "m"), P("m", None), P("d", None)),
                       out_specs=P("d", None))(p["w1"], p["w2"], x)

rng = np.random.default_rng(0)
params = {"w1": jnp.asarray(0.3 * rng.standard_normal((8, 12)), jnp.float32),
          "w2": jnp.asarray(0.3 * rng.standard_normal((12, 8)), jnp.float32)}
x = jnp.asarray(rng.standard_normal((10, 8)), jnp.float32)
frozen, t = jlora.lora_transform(params, jlora.LoraSpec(rank=2, alpha=4, targets=["w1", "w2"]),
                                 key=jax.random.key(0))
t = jax.tree.map(lambda a: a + 0.2 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), t)
loss = lambda y: jnp.sum(jnp.sin(y))
got = jax.jit(jlora.lora(fn))(frozen, t, x)
want = fn(jlora.merge(frozen, t), x)
grad = jax.jit(jax.grad(lambda t: loss(jlora.lora(fn)(frozen, t, x))))
g, gw = grad(t), jax.jit(jax.grad(lambda t: loss(fn(jlora.merge(frozen, t), x))))(t)
hlo = grad.lower(t).compile().as_text()
print(json.dumps({
    "fwd": float(jnp.abs(got - want).max()),
    "effect": float(jnp.abs(want - fn(params, x)).max()),
    "grad": max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gw))),
    "layouts": {k: repr(v) for k, v in jlora.infer_layouts(fn, params, x).items()},
    "dots": [list(s) for s in dot_result_shapes(hlo)],
}))
'''


def test_shard_map_slices_the_factors_like_w0():
  """A weight passed into a shard_map body stays low-rank: each shard gets W0's
  slice and the factors sliced along the weight axes they hold (4 devices)."""
  import json
  import os
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(jlora.__file__)), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT, os.path.dirname(__file__)],
                        capture_output=True, text=True, timeout=300, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  res = json.loads(done.stdout.strip().splitlines()[-1])
  assert res["effect"] > 1e-2 and res["fwd"] < 1e-5 and res["grad"] < 1e-4, res
  assert res["layouts"]["w1"] == "Layout(in_axes=(0,), out_axes=(1,), stack_axes=())"
  # No dot forms a shard of W0 + s B A or of dW0: (8, 6) and (6, 8) per shard.
  local = {(8, 6), (6, 8), (8, 12), (12, 8)}
  assert res["dots"] and not [s for s in res["dots"] if tuple(s) in local], res["dots"]
