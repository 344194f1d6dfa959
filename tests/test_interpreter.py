"""The LoRA transform computes what the merged model computes, gradients included.

Every test compares ``jlora.lora(fn)(frozen, trainable, ...)`` with the same
function applied to ``jlora.merge(frozen, trainable)``, and the gradients of
a loss of the former w.r.t. ``trainable`` with ``jax.grad`` of the merged
form ``loss(fn(jlora.merge(frozen, t), x))``. B is perturbed away from its
zero initialisation first, so a wrong low-rank path cannot pass.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jlora
from models import LinenLM, LinenMLP, LMConfig, NNXLM, batched_einsum

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
# Tests of one lazy rule run its code the same way eager and under jit; they
# run under jit alone to keep the file fast (eager dispatch compiles each op).
JIT_ONLY = pytest.mark.parametrize("jit", [True], ids=["jit"])

_F32_FWD_ATOL = 1e-5
_F32_GRAD_RTOL = 1e-4


# -- helpers -----------------------------------------------------------------------


def _is_lp(x):
  return isinstance(x, jlora.LoraParam)


def normal(shape, scale=1.0, seed=0):
  """Test data from NumPy (eager jax.random compiles for every new shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def perturb(trainable, seed, scale=0.3):
  """A copy of ``trainable`` with every B (and every extra leaf) made non-zero."""
  leaves, treedef = jax.tree_util.tree_flatten(trainable, is_leaf=_is_lp)
  out = []
  for i, leaf in enumerate(leaves):
    if _is_lp(leaf):
      b = normal(leaf.b.shape, scale, seed=seed * 1000 + i)
      out.append(dataclasses.replace(leaf, b=b.astype(leaf.b.dtype)))
    else:
      out.append((leaf + normal(leaf.shape, 0.1, seed=seed * 1000 + i)).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def maybe_jit(f, jit):
  return jax.jit(f) if jit else f


def loss_of(y):
  """A non-linear scalar loss of any output pytree."""
  total = 0.0
  for leaf in jax.tree_util.tree_leaves(y):
    leaf = jnp.asarray(leaf, jnp.float32)
    total = total + jnp.mean(jnp.square(leaf - 0.1)) + jnp.mean(jnp.sin(3.0 * leaf))
  return total


def max_abs_diff(x, y):
  return float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))


def assert_close_forward(got, want, atol=_F32_FWD_ATOL):
  got_l, want_l = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  assert len(got_l) == len(want_l)
  for g, w in zip(got_l, want_l):
    assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
    err = max_abs_diff(g, w)
    assert err <= atol, f"max abs diff {err:.3g} > {atol:.3g}"


def assert_close_grads(got, want, rtol=_F32_GRAD_RTOL):
  """Leafwise: max |got - want| <= rtol * max |want| (plus a tiny floor)."""
  got_p, got_def = jax.tree_util.tree_flatten_with_path(got)
  want_p, want_def = jax.tree_util.tree_flatten_with_path(want)
  assert got_def == want_def, (got_def, want_def)
  assert got_p, "no gradient leaves to compare"
  for (path, g), (_, w) in zip(got_p, want_p):
    scale = float(jnp.max(jnp.abs(w)))
    err = max_abs_diff(g, w)
    assert err <= rtol * scale + 1e-7, (
        f"{jax.tree_util.keystr(path)}: max abs diff {err:.3g}, max |grad| {scale:.3g}")


def assert_grads_nonzero(grads):
  for leaf in jax.tree_util.tree_leaves(grads):
    assert float(jnp.max(jnp.abs(leaf))) > 0.0


def _value_and_grad(f):
  """(loss, output), d loss / d t of ``loss_of(f(t, *args))``: one trace for both."""
  def loss_and_out(t, *args):
    y = f(t, *args)
    return loss_of(y), y
  return jax.value_and_grad(loss_and_out, has_aux=True)


def merged_reference(fn, frozen, trainable, args, grads=True):
  """(output, d loss / d trainable) of ``fn(jlora.merge(frozen, t), *args)``, under jit."""
  merged_fn = lambda t, *a: fn(jlora.merge(frozen, t), *a)
  if not grads:
    return jax.jit(merged_fn)(trainable, *args), None
  (_, want), g = jax.jit(_value_and_grad(merged_fn))(trainable, *args)
  return want, g


def check_against_merged(fn, frozen, trainable, args, *, jit, want=None,
                         fwd_atol=_F32_FWD_ATOL, grad_rtol=_F32_GRAD_RTOL, grads=True):
  """Forward and d loss / d trainable of lora(fn) equal those of the merged form.

  Args:
    want: the merged reference if already computed (it does not depend on
      ``jit``, so model tests compute it once).
  """
  if want is None:
    want = merged_reference(fn, frozen, trainable, args, grads)
  apply = jlora.lora(fn)
  return check_lora_fn(lambda t, *a: apply(frozen, t, *a), trainable, args, want, jit=jit,
                       fwd_atol=fwd_atol, grad_rtol=grad_rtol, grads=grads)


def check_lora_fn(lora_fn, trainable, args, want, *, jit, fwd_atol=_F32_FWD_ATOL,
                  grad_rtol=_F32_GRAD_RTOL, grads=True):
  """``lora_fn(t, *args)`` against ``want = (output, grads)`` of the merged form.

  The forward is checked twice: alone, and as computed under
  ``jax.value_and_grad`` (whose loss value is checked too).
  """
  want_y, want_g = want
  got = maybe_jit(lora_fn, jit)(trainable, *args)
  assert_close_forward(got, want_y, fwd_atol)
  if not grads:
    return got
  (loss, got_ad), got_g = maybe_jit(_value_and_grad(lora_fn), jit)(trainable, *args)
  assert_close_forward(got_ad, want_y, fwd_atol)
  want_loss = float(loss_of(want_y))
  assert abs(float(loss) - want_loss) <= max(fwd_atol, 1e-5) * max(1.0, abs(want_loss))
  assert_grads_nonzero(want_g)
  assert_close_grads(got_g, want_g, grad_rtol)
  return got


def assert_merge_matters(fn, frozen, trainable, args, params):
  """The perturbed adapters change the output, so a test against merge can fail."""
  base = jax.jit(fn)(params, *args)
  merged = jax.jit(fn)(jlora.merge(frozen, trainable), *args)
  assert max_abs_diff(base, merged) > 1e-2


class _NoMaterialize:
  """Turns every LoraMaterializeWarning into an error inside the block."""

  def __enter__(self):
    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.simplefilter("error", jlora.LoraMaterializeWarning)

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


def adapt(params, spec, *, layouts=None, key=0):
  """lora_transform, then a non-zero B."""
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(key), layouts=layouts)
  return frozen, perturb(trainable, key + 100)


# -- models ------------------------------------------------------------------------
#
# Model set-up (init, lora_transform, the merged reference) is shared by the
# eager and the jit variant of a test through module-scoped fixtures: the
# machine is small and eager dispatch compiles every op once.


TINY_LM = LMConfig(vocab=64, d_model=32, heads=4, layers=2, mlp=64, seq=16)
LM_TARGETS = r"params/layers/(query|key|value|out|up|down)/kernel|params/lm_head/kernel"
NNX_TARGETS = r"blocks/\d+/(query|key|value|out|up|down)/kernel|head/kernel"


def _tokens(cfg, batch=2, seq=12, key=1):
  return jnp.asarray(np.random.default_rng(key).integers(0, cfg.vocab, (batch, seq)), jnp.int32)


@dataclasses.dataclass
class Case:
  """A model adapted with perturbed factors, its merged reference and its base output."""
  fn: Any
  params: Any
  frozen: Any
  trainable: Any
  args: tuple
  want: Any       # (output, d loss / d trainable) of the merged form
  base: Any       # the output of fn(params): the model without adapters
  merged_vg: Any  # jitted (t, frozen, *args) -> ((loss, output), d loss / d t), merged form

  @classmethod
  def make(cls, fn, params, spec, args, *, layouts=None):
    frozen, t0 = jlora.lora_transform(params, spec, key=jax.random.key(0), layouts=layouts)
    trainable = perturb(t0, 100)
    # One compilation serves the reference and the base output (B = 0 in t0).
    merged_vg = jax.jit(_value_and_grad(lambda t, f, *a: fn(jlora.merge(f, t), *a)))
    (_, want_y), want_g = merged_vg(trainable, frozen, *args)
    (_, base_y), _ = merged_vg(t0, frozen, *args)
    assert max_abs_diff(base_y, want_y) > 1e-2, "the adapters must change the output"
    return cls(fn, params, frozen, trainable, args, (want_y, want_g), base_y, merged_vg)

  def check(self, jit, **kw):
    with _NoMaterialize():
      return check_against_merged(self.fn, self.frozen, self.trainable, self.args, jit=jit,
                                  want=self.want, **kw)


@pytest.fixture(scope="module")
def mlp_case():
  model = LinenMLP(hidden=32, out=8)
  x = normal((6, 16), seed=1)
  params = jax.jit(model.init)(jax.random.key(0), x)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*kernel", extra_trainable=r".*fc1/bias")
  return Case.make(model.apply, params, spec, (x,))


@pytest.fixture(scope="module")
def linen_lm_case():
  model = LinenLM(TINY_LM)
  tokens = _tokens(TINY_LM)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=LM_TARGETS)
  return Case.make(model.apply, params, spec, (tokens,), layouts=layouts)


@pytest.fixture(scope="module")
def nnx_lm_case():
  # One block: NNX unrolls its blocks, and each costs compile time; every
  # kind of layer is in the block.
  cfg = dataclasses.replace(TINY_LM, layers=1)
  graphdef, state = nnx.split(NNXLM(cfg, rngs=nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  tokens = _tokens(cfg)
  layouts = jlora.infer_layouts(fn, state, tokens)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=NNX_TARGETS)
  return Case.make(fn, state, spec, (tokens,), layouts=layouts)


@JIT
def test_linen_mlp(jit, mlp_case):
  assert mlp_case.frozen["params"]["fc1"]["bias"] is None
  assert mlp_case.trainable["params"]["fc1"]["bias"] is not None   # extra trainable leaf
  mlp_case.check(jit)


@JIT
def test_linen_lm_scan_remat_densegeneral(jit, linen_lm_case):
  layers = linen_lm_case.trainable["params"]["layers"]
  assert layers["query"]["kernel"].a.shape == (2, 32, 4)             # per-layer stack axis
  assert layers["query"]["kernel"].b.shape == (2, 4, 4, 8)           # (heads, head_dim) out
  assert layers["out"]["kernel"].a.shape == (2, 4, 8, 4)             # (heads, head_dim) in
  linen_lm_case.check(jit)


@JIT
def test_nnx_lm_linear_lineargeneral_einsum(jit, nnx_lm_case):
  kernel = nnx_lm_case.trainable["blocks"][0]["value"]["kernel"]      # the nnx.Einsum kernel
  assert _is_lp(kernel.get_value())
  nnx_lm_case.check(jit)


@JIT
def test_plain_einsum_with_expert_batch_axis(jit):
  params = {"experts": normal((3, 8, 12), 0.3, seed=0), "proj": normal((12, 5), 0.3, seed=1)}
  x = normal((3, 4, 8), seed=2)
  layouts = jlora.infer_layouts(batched_einsum, params, x)
  assert layouts["experts"] == jlora.Layout((1,), (2,), (0,))
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=["experts", "proj"])
  case = Case.make(batched_einsum, params, spec, (x,), layouts=layouts)
  assert case.trainable["experts"].a.shape == (3, 8, 2)
  assert case.trainable["experts"].b.shape == (3, 2, 12)
  case.check(jit)


def _rel_err(got, want):
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


@pytest.fixture(scope="module")
def bf16_lm_case(linen_lm_case):
  """LinenLM computing in bf16; the layer weights stored in bf16, lm_head in f32.

  So both kinds of bf16 use are covered: a bf16 W0, and an f32 W0 that the
  model casts to bf16 at its use. Returns the case and the float32 truth:
  the float32 model merged from the same W0 and factors (the f32 case's
  compiled reference, reused).
  """
  f32_case = linen_lm_case
  model = LinenLM(dataclasses.replace(TINY_LM, dtype=jnp.bfloat16))
  params = dict(f32_case.params["params"])
  params["layers"] = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params["layers"])
  params = {"params": params}
  layouts = jlora.infer_layouts(model.apply, params, *f32_case.args)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=LM_TARGETS)
  case = Case.make(model.apply, params, spec, f32_case.args, layouts=layouts)
  frozen32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), case.frozen)
  (_, truth), g_truth = f32_case.merged_vg(case.trainable, frozen32, *f32_case.args)
  return case, (truth, g_truth)


# Under jit only: laziness is decided while tracing, the same eager or under
# jit, and eager bf16 dispatch compiles every op anew (the f32 models cover
# eager execution).
@JIT_ONLY
def test_bf16_lm_stays_lazy(jit, bf16_lm_case):
  case, (truth, g_truth) = bf16_lm_case
  (tokens,) = case.args
  merged = jlora.merge(case.frozen, case.trainable)
  assert merged["params"]["layers"]["query"]["kernel"].dtype == jnp.bfloat16
  assert merged["params"]["lm_head"]["kernel"].dtype == jnp.float32
  lora_fn = lambda t: jlora.lora(case.fn)(case.frozen, t, tokens)
  with _NoMaterialize():   # the bf16 casts of each W stay lazy: no dense W0 + s B A
    got = maybe_jit(lora_fn, jit)(case.trainable)
    _, g_got = maybe_jit(_value_and_grad(lora_fn), jit)(case.trainable)
  want, g_want = case.want
  assert got.dtype == want.dtype
  # bf16 rounds x W0 + s (x A) B and x (W0 + s B A) differently, so LoRA is
  # held to the merged bf16 model's own distance from the float32 truth; the
  # adapters move the output much further than that, so ignoring them fails.
  effect = _rel_err(case.base, truth)
  merged_err, lora_err = _rel_err(want, truth), _rel_err(got, truth)
  assert effect > 0.2 and merged_err < 0.1 * effect, (effect, merged_err)
  assert lora_err <= 2 * merged_err + 1e-3, (lora_err, merged_err)
  assert _rel_err(got, want) <= 3 * merged_err + 1e-3
  for (path, g), w, t in zip(jax.tree_util.tree_leaves_with_path(g_got),
                             jax.tree_util.tree_leaves(g_want), jax.tree_util.tree_leaves(g_truth)):
    lora_err, merged_err = _rel_err(g, t), _rel_err(w, t)
    assert lora_err <= 2 * merged_err + 0.01, (jax.tree_util.keystr(path), lora_err, merged_err)


@JIT
def test_vmap_composes_with_the_transform(jit, mlp_case):
  case = mlp_case
  xs = case.args[0].reshape(2, 3, -1)
  vfn = lambda p, xs: jax.vmap(case.fn, in_axes=(None, 0))(p, xs)
  want = merged_reference(vfn, case.frozen, case.trainable, (xs,))
  with _NoMaterialize():
    # The transform of a vmapped function ...
    check_against_merged(vfn, case.frozen, case.trainable, (xs,), jit=jit, want=want)
    # ... and vmap of the transformed function.
    vapply = jax.vmap(jlora.lora(case.fn), in_axes=(None, None, 0))
    check_lora_fn(lambda t, xs: vapply(case.frozen, t, xs), case.trainable, (xs,), want, jit=jit)


@JIT
def test_vmap_over_adapters(jit, mlp_case):
  """One adapter per example (vmap over trainable) equals one merged model per example."""
  case = mlp_case
  xs = case.args[0].reshape(2, 3, -1)
  adapters = [case.trainable, perturb(case.trainable, 42)]
  stacked = jax.tree_util.tree_map(lambda *ls: jnp.stack(ls), *adapters)
  with _NoMaterialize():
    got = maybe_jit(jax.vmap(jlora.lora(case.fn), in_axes=(None, 0, 0)), jit)(
        case.frozen, stacked, xs)
  merged_fn = jax.jit(lambda t, x: case.fn(jlora.merge(case.frozen, t), x))
  want = jnp.stack([merged_fn(t, x) for t, x in zip(adapters, xs)])
  assert max_abs_diff(want[0], merged_fn(adapters[1], xs[0])) > 1e-2   # the adapters differ
  assert_close_forward(got, want)


@JIT
def test_value_and_grad(jit, mlp_case):
  case = mlp_case
  apply = jlora.lora(case.fn)
  vg = maybe_jit(jax.value_and_grad(lambda t: loss_of(apply(case.frozen, t, *case.args))), jit)
  loss, grads = vg(case.trainable)
  want_y, want_g = case.want
  np.testing.assert_allclose(loss, loss_of(want_y), rtol=1e-6)
  assert_close_grads(grads, want_g)


# -- lazy structural ops ----------------------------------------------------------------


def _weights(*shapes, key=0):
  return [normal(s, 0.3, seed=key * 100 + i) for i, s in enumerate(shapes)]


@JIT_ONLY
def test_transpose_stays_lazy(jit):
  (w,) = _weights((8, 8))
  x = normal((4, 8), seed=1)
  # W.T as the left operand: (out, in) contracted over its axis 1.
  fn = lambda p, x: (p["w"].T @ x.T).T
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]))
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT_ONLY
def test_reshape_densegeneral_kernel_stays_lazy(jit):
  w_in, w_out = _weights((8, 2, 4), (2, 4, 8))
  x = normal((4, 8), seed=1)

  def fn(p, x):
    h = jnp.tanh(x @ p["w_in"].reshape(8, 8))         # (d, h, k) -> (d, h*k)
    return h @ p["w_out"].reshape(8, 8)               # (h, k, d) -> (h*k, d)

  layouts = jlora.infer_layouts(fn, {"w_in": w_in, "w_out": w_out}, x)
  assert layouts == {"w_in": jlora.Layout((0,), (1, 2)), "w_out": jlora.Layout((0, 1), (2,))}
  frozen, trainable = adapt({"w_in": w_in, "w_out": w_out},
                            jlora.LoraSpec(rank=2, alpha=4, targets=["w_in", "w_out"]),
                            layouts=layouts)
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT_ONLY
def test_convert_element_type_stays_lazy(jit):
  (w,) = _weights((8, 8))
  x = normal((4, 8), seed=1)
  fn = lambda p, x: x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]))
  with _NoMaterialize():
    y = maybe_jit(jlora.lora(fn), jit)(frozen, trainable, x)
  assert y.dtype == jnp.bfloat16
  want = fn(jlora.merge(frozen, trainable), x)
  exact = x @ jlora.merge(frozen, trainable)["w"]
  assert max_abs_diff(y, want) <= 0.05 * float(jnp.max(jnp.abs(exact)))
  # The f32 -> f32 round trip through bf16 and back keeps the f32 answer close.
  fn32 = lambda p, x: x @ p["w"].astype(jnp.bfloat16).astype(jnp.float32)
  with _NoMaterialize():
    check_against_merged(fn32, frozen, trainable, (x,), jit=jit, fwd_atol=0.05, grad_rtol=0.05)


@JIT_ONLY
@pytest.mark.parametrize("how", ["slice", "split"])
def test_fused_qkv_slice_stays_lazy(jit, how):
  """A fused (d, 3 * heads, head_dim) qkv kernel cut into q, k, v along an out axis."""
  (w,) = _weights((8, 6, 4))
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
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


# -- higher-order primitives ---------------------------------------------------------


def _square_problem(d=8, n=4, rank=2):
  (w,) = _weights((d, d))
  x = normal((n, d), seed=1)
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=rank, alpha=4, targets=["w"]))
  return frozen, trainable, x


@JIT
def test_nested_jit(jit):
  frozen, trainable, x = _square_problem()
  inner = jax.jit(lambda w, x: jnp.tanh(x @ w))
  fn = lambda p, x: inner(p["w"], jax.jit(lambda x: inner(p["w"], x))(x))
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT
def test_checkpoint_with_policy(jit):
  frozen, trainable, x = _square_problem()
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  block = jax.checkpoint(lambda w, x: jnp.sin(jnp.tanh(x @ w) @ w), policy=policy)
  fn = lambda p, x: block(p["w"], x)
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT
@pytest.mark.parametrize("fn", [
    # nn.scan style: the layer axis is scanned over.
    lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), jnp.sum(h)), x, p["w"]),
    # ``w[i]`` in a loop: dynamic_slice + squeeze of the stack axis stay lazy.
    lambda p, x: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x),
], ids=["scan", "traced_layer_index"])
def test_stacked_weights(jit, fn):
  (w,) = _weights((3, 8, 8))
  x = normal((4, 8), seed=1)
  layouts = jlora.infer_layouts(fn, {"w": w}, x)
  assert layouts["w"] == jlora.Layout((1,), (2,), (0,))
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=2, alpha=4, targets=["w"]),
                            layouts=layouts)
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


@JIT
@pytest.mark.parametrize("pred", [True, False])
def test_cond(jit, pred):
  frozen, trainable, x = _square_problem()
  fn = lambda p, x, pred: lax.cond(pred, lambda x: jnp.tanh(x @ p["w"]),
                                   lambda x: 2.0 * jnp.sin(x @ p["w"]), x)
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x, jnp.asarray(pred)), jit=jit)


@JIT
def test_fori_loop_weight_as_body_constant(jit):
  frozen, trainable, x = _square_problem()
  fn = lambda p, x: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), x)
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


def _while_fn(p, x, n):
  body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"]))
  return lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]


@JIT
def test_while_loop_weight_as_body_constant(jit):
  frozen, trainable, x = _square_problem()
  # Reverse mode does not go through lax.while_loop, so forward only.
  with _NoMaterialize():
    check_against_merged(_while_fn, frozen, trainable, (x, jnp.asarray(3)), jit=jit, grads=False)


@JIT_ONLY
def test_jvp_through_while_loop(jit):
  """Forward mode is the only AD that goes through a while_loop."""
  frozen, trainable, x = _square_problem()
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
  frozen, trainable, x = _square_problem()
  fn = lambda p, x: custom(p["w"], jnp.sin(x))
  with _NoMaterialize():   # the primal stays low-rank
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


@JIT
def test_embedding_gather_materializes_once_with_a_warning(jit):
  (emb,) = _weights((20, 8))
  tokens = jnp.array([[1, 5, 19], [0, 5, 7]])
  params = {"embed": {"embedding": emb}}
  fn = lambda p, t: p["embed"]["embedding"][t]
  frozen, trainable = adapt(params, jlora.LoraSpec(rank=2, alpha=4, targets=["embedding"]))
  apply = maybe_jit(jlora.lora(fn), jit)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = apply(frozen, trainable, tokens)
  ours = [w for w in caught if issubclass(w.category, jlora.LoraMaterializeWarning)]
  assert len(ours) == 1, [str(w.message) for w in caught]
  message = str(ours[0].message)
  assert "embed/embedding" in message and "gather" in message, message
  assert_close_forward(got, fn(jlora.merge(frozen, trainable), tokens))
  assert_merge_matters(fn, frozen, trainable, (tokens,), params)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.LoraMaterializeWarning)
    check_against_merged(fn, frozen, trainable, (tokens,), jit=jit)


@JIT_ONLY
def test_tied_embedding(jit):
  """One (vocab, d) matrix used by a gather and, transposed, as the output head."""
  (emb,) = _weights((20, 8))
  tokens = jnp.array([[1, 5, 19], [0, 5, 7]])
  fn = lambda p, t: jnp.tanh(p["embed"][t]) @ p["embed"].T
  layouts = jlora.infer_layouts(fn, {"embed": emb}, tokens)
  assert layouts["embed"] == jlora.Layout((1,), (0,))        # as the head uses it
  frozen, trainable = adapt({"embed": emb}, jlora.LoraSpec(rank=2, alpha=4, targets=["embed"]),
                            layouts=layouts)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    check_against_merged(fn, frozen, trainable, (tokens,), jit=jit)
  # The gather materialises (forward and gradient traces); the head dot does not.
  messages = {str(w.message) for w in caught if issubclass(w.category, jlora.LoraMaterializeWarning)}
  assert messages and all("'gather'" in m for m in messages), messages


@JIT_ONLY
def test_out_in_kernel_needs_inferred_layout(jit):
  (w,) = _weights((6, 8))                               # stored (out, in)
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
  with _NoMaterialize():
    check_against_merged(fn, frozen, trainable, (x,), jit=jit)


def _dropout_problem():
  (w,) = _weights((8, 8))
  x = normal((4, 8), seed=1)
  fn = lambda p, x: x @ p["w"]
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=["w"], dropout=0.5)
  frozen, trainable0 = jlora.lora_transform({"w": w}, spec, key=jax.random.key(0))
  return fn, {"w": w}, frozen, trainable0, x


@JIT
def test_lora_dropout(jit):
  fn, params, frozen, trainable0, x = _dropout_problem()
  trainable = perturb(trainable0, 5)
  apply = maybe_jit(jlora.lora(fn), jit)
  merged = fn(jlora.merge(frozen, trainable), x)
  # No key: dropout is off and the result is the merged model's.
  assert_close_forward(apply(frozen, trainable, x), merged)
  k1, k2 = jax.random.key(11), jax.random.key(12)
  y1 = apply(frozen, trainable, x, lora_dropout_key=k1)
  assert max_abs_diff(y1, merged) > 1e-2
  np.testing.assert_array_equal(y1, apply(frozen, trainable, x, lora_dropout_key=k1))
  assert max_abs_diff(y1, apply(frozen, trainable, x, lora_dropout_key=k2)) > 1e-2
  # With B = 0 the dropped-out low-rank path adds nothing: the output is the
  # base x W0 exactly (bit for bit as without dropout; a separately compiled
  # x @ W0 may round differently).
  y0 = apply(frozen, trainable0, x, lora_dropout_key=k1)
  np.testing.assert_array_equal(y0, apply(frozen, trainable0, x))
  np.testing.assert_allclose(y0, fn(params, x), rtol=0, atol=1e-6)
  # Changing W0 under the same key moves the output by exactly x dW0: dropout
  # touches only the input of the low-rank path, never the base path.
  delta = normal(params["w"].shape, 0.3, seed=9)
  frozen2 = {"w": frozen["w"] + delta}
  y2 = apply(frozen2, trainable, x, lora_dropout_key=k1)
  assert_close_forward(y2 - y1, x @ delta)


@JIT
def test_lora_dropout_gradient_uses_the_forward_mask(jit):
  fn, params, frozen, trainable0, x = _dropout_problem()
  trainable = perturb(trainable0, 5)
  key = jax.random.key(11)
  apply = jlora.lora(fn)
  lora_fn = lambda t, key: apply(frozen, t, x, lora_dropout_key=key)
  y = maybe_jit(lora_fn, jit)(trainable, key)
  grad = maybe_jit(jax.grad(lambda t, key: jnp.sum(lora_fn(t, key))), jit)
  db, db_no_dropout = grad(trainable, key)["w"].b, grad(trainable, None)["w"].b
  # y - x W0 = s (x_drop A) B, and d sum(y) / dB has every column equal to
  # s colsum(x_drop A); so colsum(y - x W0) = dB[:, 0] @ B for the same mask.
  lp = trainable["w"]
  np.testing.assert_allclose(jnp.sum(y - x @ params["w"], axis=0), db[:, 0] @ lp.b,
                             rtol=1e-4, atol=1e-5)
  assert max_abs_diff(db, db_no_dropout) > 1e-2


@JIT_ONLY
def test_lora_dropout_in_scan_and_remat_has_consistent_gradients(jit):
  """Under a fixed key, jax.grad is the derivative of the (masked) forward,
  also through scan and a rematerialised body, where the mask is drawn again
  in the backward pass."""
  (w,) = _weights((3, 8, 8))
  x = normal((4, 8), seed=1)
  body = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None))
  fn = lambda p, x: lax.scan(body, x, p["w"])[0]
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=["w"], dropout=0.5,
                        layouts={"w": jlora.Layout((1,), (2,), (0,))})
  frozen, trainable = adapt({"w": w}, spec)
  key = jax.random.key(3)
  loss = maybe_jit(lambda t: loss_of(jlora.lora(fn)(frozen, t, x, lora_dropout_key=key)), jit)
  assert float(loss(trainable)) != pytest.approx(
      float(loss_of(fn(jlora.merge(frozen, trainable), x))), rel=1e-3)   # dropout is on
  grads = maybe_jit(jax.grad(loss), jit)(trainable)
  direction = jax.tree_util.tree_map(lambda l: normal(l.shape, seed=7), trainable)
  eps = 1e-3   # central differences; the loss is smooth at this scale
  step = lambda sign: jax.tree_util.tree_map(lambda t, d: t + sign * eps * d, trainable, direction)
  numeric = (float(loss(step(1.0))) - float(loss(step(-1.0)))) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                        jax.tree_util.tree_leaves(direction)))
  assert analytic == pytest.approx(numeric, rel=1e-3, abs=1e-4)


@JIT
def test_hessian_matches_merged(jit):
  """Second-order AD (forward over reverse) goes through the transform."""
  frozen, trainable, x = _square_problem()
  apply = jlora.lora(lambda p, x: jnp.tanh(x @ p["w"]).sum())
  b_of = lambda t: t["w"].b
  with_b = lambda t, b: {**t, "w": dataclasses.replace(t["w"], b=b)}
  got = maybe_jit(jax.hessian(lambda b: apply(frozen, with_b(trainable, b), x)), jit)(
      b_of(trainable))
  want = jax.hessian(lambda b: jnp.tanh(x @ jlora.merge(frozen, with_b(trainable, b))["w"]).sum())(
      b_of(trainable))
  assert_close_forward(got, want)
