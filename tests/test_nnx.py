"""``jlora.nnx``: the adapted NNX module against the merged model, and NNX's
tools (Optimizer, DiffState, jit, split/merge, orbax) on it.

The reference is the functional API's: ``fn(jlora.merge(frozen, t), x)``
with ``fn`` the original module merged from its state (tests/reference.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
import jlora.nnx
from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import is_adapter
import reference as ref

D, N, H = 8, 2, 4
TARGETS = r"(q|o)/kernel|mlp/kernel"


class Calls(nnx.Variable):
  """A counter the forward updates (as a KV cache would be)."""


class Tiny(nnx.Module):
  """Attention-shaped einsum kernels (Tunix's q_proj/o_proj) and a Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.config = {"d": D}
    self.q = nnx.Einsum("btd,dnh->btnh", (D, N, H), rngs=rngs)
    self.o = nnx.Einsum("btnh,nhd->btd", (N, H, D), rngs=rngs)
    self.mlp = nnx.Linear(D, D, rngs=rngs)
    self.calls = Calls(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] = self.calls[...] + 1
    return self.mlp(jax.nn.gelu(self.o(jnp.tanh(self.q(x))))) + x

  def heads(self, x):
    return self.q(x)


def _x(seed=1):
  return ref.normal((2, 3, D), seed=seed)


def _perturbed(m: jlora.nnx.LoraModule, seed=7) -> jlora.nnx.LoraModule:
  """B made non-zero (and every factor moved), so a wrong low-rank path fails."""
  lora = nnx.state(m, nnx.LoRAParam)
  lora = jax.tree.map(lambda v: v + ref.normal(v.shape, 0.3, seed=seed + v.size), lora)
  nnx.update(m, lora)
  return m


@pytest.fixture(scope="module")
def adapted():
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=TARGETS)
  return _perturbed(jlora.nnx.lora(Tiny(nnx.Rngs(0)), spec, rngs=nnx.Rngs(1),
                                   example_args=(_x(),)))


def _by_path(m):
  """Path -> {"a", "b", ...} of the LoRAParam state (a gradient or the values)."""
  state = nnx.state(m, nnx.LoRAParam) if isinstance(m, nnx.Module) else m
  flat = nnx.to_flat_state(state)
  out = {}
  for keys, var in flat:
    *path, field = keys[1:]
    out.setdefault("/".join(map(str, path)), {})[field] = var.get_value()
  return out


def _reference(m, x, grads=True):
  """(output, d loss / d factors by path) of the merged model."""
  graphdef, frozen, trainable = m.split_lora()
  fn = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
  want_y, want_g = ref.merged_reference(fn, frozen, trainable, (x,), grads=grads)
  if not grads:
    return want_y, None
  pairs, _ = flatten_with_paths(want_g, is_leaf=is_adapter)
  return want_y, {p: {f.name: getattr(g, f.name) for f in dataclasses.fields(g)
                      if not f.metadata.get("static")} for p, g in pairs if g is not None}


def _loss_and_grads(m, x, jit):
  def loss(m, x):
    y = m(x)
    return ref.loss_of(y), y
  vg = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)
  (loss, y), grads = (nnx.jit(vg) if jit else vg)(m, x)
  return loss, y, _by_path(grads)


@ref.JIT
def test_forward_and_grads_equal_merged(adapted, jit):
  x = _x()
  want_y, want_g = _reference(adapted, x)
  got = (nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x)))(adapted, x)
  ref.assert_close_forward(got, want_y)
  loss, y, got_g = _loss_and_grads(adapted, x, jit)
  ref.assert_close_forward(y, want_y)
  assert abs(float(loss) - float(ref.loss_of(want_y))) < 1e-5
  ref.assert_grads_nonzero(want_g)
  ref.assert_close_grads(got_g, want_g)
  # The merged model is the reference, and the adapter moves it.
  merged = jlora.nnx.merge(adapted)
  assert type(merged) is Tiny
  ref.assert_close_forward(merged(x), want_y)
  graphdef, frozen, _ = adapted.split_lora()
  assert ref.max_abs_diff(nnx.merge(graphdef, frozen)(x), want_y) > 1e-2


def test_einsum_layouts_are_inferred(adapted):
  shapes = jax.tree.map(jnp.shape, _by_path(adapted))
  assert shapes["q/kernel"] == {"a": (D, 2), "b": (2, N, H)}   # in: d; out: n, h
  assert shapes["o/kernel"] == {"a": (N, H, 2), "b": (2, D)}   # in: n, h; out: d
  assert shapes["mlp/kernel"] == {"a": (D, 2), "b": (2, D)}


def test_a_multi_axis_kernel_without_layout_is_refused():
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=TARGETS)
  with pytest.raises(jlora.LoraLayoutError) as err:
    jlora.nnx.lora(Tiny(nnx.Rngs(0)), spec, rngs=nnx.Rngs(1))
  msg = str(err.value)
  assert "\n" not in msg and "'o/kernel'" in msg and "example_args" in msg
  with pytest.raises(jlora.LoraSpecError, match="key= or rngs="):
    jlora.nnx.lora(Tiny(nnx.Rngs(0)), spec, key=jax.random.key(0), rngs=nnx.Rngs(1),
                   example_args=(_x(),))
  linear = jlora.nnx.lora(nnx.Linear(4, 4, rngs=nnx.Rngs(0)),
                          jlora.LoraSpec(rank=2, targets=["kernel"]), key=jax.random.key(0))
  assert linear.lora_paths == ("kernel",) and linear.adapters()["kernel"].a.shape == (4, 2)
  original = nnx.Linear(4, 4, rngs=nnx.Rngs(0))   # left as it is: its own variables
  copy = jlora.nnx.lora(original, jlora.LoraSpec(rank=2, targets=["kernel"]), rngs=nnx.Rngs(0))
  assert copy.base_model.kernel is not original.kernel
  with pytest.raises(jlora.LoraSpecError, match="nnx.Module"):
    jlora.nnx.lora({"w": jnp.zeros((2, 2))}, spec)


def test_variables_attributes_and_methods(adapted):
  m = adapted
  # Factors are LoRAParam (a subclass of Param), frozen weights Param.
  lora = nnx.state(m, nnx.LoRAParam)
  params = nnx.state(m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  assert {v.__class__ for _, v in nnx.to_flat_state(lora)} == {nnx.LoRAParam}
  assert all(k[0] == "base_model" for k, _ in nnx.to_flat_state(params))
  assert len(nnx.to_flat_state(params)) == 4   # three kernels, the Linear's bias
  # The original's attributes and methods; a method runs on the adapted weights.
  assert m.config == {"d": D} and isinstance(m.q, nnx.Einsum)
  x = _x()
  graphdef, frozen, trainable = m.split_lora()
  want = nnx.merge(graphdef, jlora.merge(frozen, trainable)).heads(x)
  ref.assert_close_forward(m.heads(x), want)
  # The forward's update of a non-Param variable is written back, eager and jitted.
  before = int(m.calls[...])
  m(x)
  nnx.jit(lambda m, x: m(x))(m, x)
  assert int(m.calls[...]) == before + 2


class Decoder(nnx.Module):
  """A call with the named parameters frameworks look for (Tunix's sampler
  reads ``decode_only_last_token`` from ``inspect.signature(m.__call__)``)."""

  def __init__(self, rngs: nnx.Rngs):
    self.proj = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, tokens: jax.Array, cache: dict | None = None, *,
               decode_only_last_token: bool = False) -> jax.Array:
    y = self.proj(tokens)
    return y[:, -1:] if decode_only_last_token else y

  def init_cache(self, batch: int, size: int = 4) -> dict:
    return {"k": jnp.zeros((batch, size, D))}


def test_signature_is_the_wrapped_modules(adapted):
  import inspect
  P = inspect.Parameter
  lora_kw = [P("lora_dropout_key", P.KEYWORD_ONLY, default=None),
             P("lora_adapter_ids", P.KEYWORD_ONLY, default=None)]
  m = jlora.nnx.lora(Decoder(nnx.Rngs(0)), jlora.LoraSpec(rank=2, targets=["proj/kernel"]),
                     rngs=nnx.Rngs(1))
  base = inspect.signature(m.base_model.__call__)
  want = base.replace(parameters=[*base.parameters.values(), *lora_kw])
  assert inspect.signature(m) == want
  assert inspect.signature(m.__call__) == want
  assert [(p.name, p.kind) for p in want.parameters.values()] == [
      ("tokens", P.POSITIONAL_OR_KEYWORD), ("cache", P.POSITIONAL_OR_KEYWORD),
      ("decode_only_last_token", P.KEYWORD_ONLY), ("lora_dropout_key", P.KEYWORD_ONLY),
      ("lora_adapter_ids", P.KEYWORD_ONLY)]
  assert want.return_annotation == "jax.Array"
  # Per instance: another class's module reports its own call.
  assert list(inspect.signature(adapted).parameters) == ["x", *(p.name for p in lora_kw)]
  # The original's other methods too; and the keywords reach the original.
  assert list(inspect.signature(m.init_cache).parameters) == [
      "batch", "size", *(p.name for p in lora_kw)]
  x = _x()
  assert m(x, decode_only_last_token=True).shape == (2, 1, D)
  assert m.__call__(x, None).shape == (2, 3, D)
  # Read on the class, it is any NNX module class's (its metaclass's call).
  assert inspect.signature(jlora.nnx.LoraModule) == inspect.signature(nnx.Linear)


def test_extra_trainable_weights_are_lora_params():
  """A weight trained in full is an nnx.LoRAParam of base_model: NNX's tools
  (and Tunix's trainer) train it with the factors; its gradient is the merged
  model's, and merge gives it back as an nnx.Param."""
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=TARGETS, extra_trainable=["mlp/bias"])
  m = _perturbed(jlora.nnx.lora(Tiny(nnx.Rngs(0)), spec, rngs=nnx.Rngs(1),
                                example_args=(_x(),)))
  assert m.extra_paths == ("mlp/bias",)
  assert isinstance(m.base_model.mlp.bias, nnx.LoRAParam)
  lora = nnx.state(m, nnx.LoRAParam)
  assert lora["base_model"]["mlp"]["bias"].shape == (D,)
  frozen = nnx.state(m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  assert len(nnx.to_flat_state(frozen)) == 3   # the three kernels
  # Its gradient is the merged model's (plain NNX, no interpreter), with the bias moved.
  m.base_model.mlp.bias[...] = ref.normal((D,), 0.3, seed=3)
  x = _x()
  merged = jlora.nnx.merge(m)
  assert type(merged.mlp.bias) is nnx.Param and not nnx.state(merged, nnx.LoRAParam)
  ref.assert_close_forward(m(x), merged(x))
  loss = lambda model: ref.loss_of(model(x))  # noqa: E731
  got = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
  want = nnx.grad(loss)(merged)
  got_b, want_b = got["base_model"]["mlp"]["bias"][...], want["mlp"]["bias"][...]
  assert float(jnp.max(jnp.abs(want_b))) > 1e-3
  np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
  # The functional form has it in trainable, as lora_transform does.
  _, frozen_tree, trainable = m.split_lora()
  assert frozen_tree["mlp"]["bias"].get_value() is None
  np.testing.assert_array_equal(trainable["mlp"]["bias"].get_value(), m.base_model.mlp.bias[...])
  # An optimizer on LoRAParam trains it; the frozen kernels stay.
  opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.LoRAParam)
  bias, kernel = np.asarray(m.base_model.mlp.bias[...]), np.asarray(m.base_model.mlp.kernel[...])
  opt.update(m, got)
  assert np.any(np.asarray(m.base_model.mlp.bias[...]) != bias)
  np.testing.assert_array_equal(m.base_model.mlp.kernel[...], kernel)
  # Refused: a variable that is not a weight, and a bank of such modules.
  with pytest.raises(jlora.LoraSpecError) as err:
    jlora.nnx.lora(Tiny(nnx.Rngs(0)), dataclasses.replace(spec, extra_trainable=["calls"]),
                   rngs=nnx.Rngs(1), example_args=(_x(),))
  assert "\n" not in str(err.value) and "'calls'" in str(err.value)
  assert "nnx.Param" in str(err.value)
  with pytest.raises(jlora.LoraSpecError, match="'mlp/bias' of 'a' is trained in full"):
    jlora.nnx.stack({"a": m})


def test_optimizer_trains_the_factors_alone():
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=TARGETS)
  m = jlora.nnx.lora(Tiny(nnx.Rngs(0)), spec, rngs=nnx.Rngs(1), example_args=(_x(),))
  opt = nnx.Optimizer(m, optax.adam(3e-2), wrt=nnx.LoRAParam)
  x, target = _x(), ref.normal((2, 3, D), seed=3)

  @nnx.jit
  def step(m, opt, x, target):
    loss = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
    opt.update(m, grads)
    return value

  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  frozen_before = jax.tree.map(np.asarray, nnx.state(m, frozen))
  lora_before = jax.tree.map(np.asarray, nnx.state(m, nnx.LoRAParam))
  losses = [float(step(m, opt, x, target)) for _ in range(4)]
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, nnx.state(m, frozen)))
  moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), lora_before,
                       nnx.state(m, nnx.LoRAParam))
  assert all(jax.tree.leaves(moved))


def test_split_merge_and_orbax_round_trip(adapted, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  x = _x()
  want = adapted(x)
  graphdef, lora, rest = nnx.split(adapted, nnx.LoRAParam, ...)
  again = nnx.merge(graphdef, lora, rest)
  assert type(again) is jlora.nnx.LoraModule
  ref.assert_close_forward(again(x), want, atol=0.0)
  # The LoRA state alone through orbax's NNX checkpointing, onto a fresh module.
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "lora", nnx.state(adapted, nnx.LoRAParam))
  fresh = jlora.nnx.lora(Tiny(nnx.Rngs(0)), jlora.LoraSpec(rank=2, alpha=4, targets=TARGETS),
                         rngs=nnx.Rngs(5), example_args=(x,))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh, nnx.LoRAParam))
  with ocp.StandardCheckpointer() as ckpt:
    nnx.update(fresh, ckpt.restore(tmp_path / "lora", abstract))
  ref.assert_close_forward(fresh(x), want, atol=0.0)


def _functional_grads(m, x):
  """d loss / d factors by path through the functional API (jlora.lora)."""
  graphdef, frozen, trainable = m.split_lora()
  apply = jlora.lora(lambda state, x: nnx.merge(graphdef, state)(x))
  g = jax.grad(lambda t: ref.loss_of(apply(frozen, t, x)))(trainable)
  pairs, _ = flatten_with_paths(g, is_leaf=is_adapter)
  return {p: {f.name: getattr(a, f.name) for f in dataclasses.fields(a)
              if not f.metadata.get("static")} for p, a in pairs if a is not None}


def test_nf4_base_and_dora():
  x = _x()
  base = jlora.nnx.quantize(Tiny(nnx.Rngs(0)), r".*kernel", example_args=(x,))
  assert isinstance(base.q.kernel.get_value(), jlora.NF4Array)
  for use_dora in (False, True):
    spec = jlora.LoraSpec(rank=2, alpha=4, targets=TARGETS, use_dora=use_dora)
    m = _perturbed(jlora.nnx.lora(base, spec, rngs=nnx.Rngs(1), example_args=(x,)))
    kinds = {type(a) for a in m.adapters().values()}
    assert kinds == {jlora.DoraParam if use_dora else jlora.LoraParam}
    want_y, want_g = _reference(m, x, grads=not use_dora)   # the merged model dequantizes W0
    _, y, got_g = _loss_and_grads(m, x, jit=True)
    ref.assert_close_forward(y, want_y)
    # DoRA's gradient holds the column norm constant (as PEFT's does), so its
    # reference is the functional API's, not the merged weight's.
    ref.assert_close_grads(got_g, _functional_grads(m, x) if use_dora else want_g)


def test_bank_takes_adapter_ids():
  base = Tiny(nnx.Rngs(0))
  x = _x()
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=TARGETS)
  ms = {n: _perturbed(jlora.nnx.lora(base, spec, rngs=nnx.Rngs(i), example_args=(x,)), i)
        for i, n in enumerate(["a", "b"])}
  bank = jlora.nnx.stack(ms)
  got = nnx.jit(lambda m, x, ids: m(x, lora_adapter_ids=ids))(bank, x, jnp.array([1, -1]))
  ref.assert_close_forward(got[0], ms["b"](x)[0])
  ref.assert_close_forward(got[1], base(x)[1])


class Awkward(nnx.Module):
  """Submodules named like nnx.Dict's methods, or private."""

  def __init__(self, rngs: nnx.Rngs):
    self.items = nnx.Linear(4, 4, rngs=rngs)
    self._proj = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return self._proj(jnp.tanh(self.items(x)))


def test_paths_named_like_dict_methods():
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=["kernel"])
  m = _perturbed(jlora.nnx.lora(Awkward(nnx.Rngs(0)), spec, rngs=nnx.Rngs(1)))
  assert set(m.lora_paths) == {"items/kernel", "_proj/kernel"}
  assert set(_by_path(m)) == {"items_/kernel", "_proj_/kernel"}
  x = ref.normal((3, 4), seed=2)
  ref.assert_close_forward(m(x), jlora.nnx.merge(m)(x))
  assert ref.max_abs_diff(m(x), m.base_model(x)) > 1e-2
