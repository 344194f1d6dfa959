"""A bank's adapters are isolated (issue 17): one adapter holding NaN, Inf or
a huge value changes nothing for the rows and the gradients of the others,
with every way of computing a mixed batch, eager and jitted, forward and
one optimizer step. And ids are applied per example, never per token, and
validated alike by ``apply`` and ``jlora.optimizer``."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import jlora
from jlora.interpret import bank_term
from models import tanh_mlp_fn, tanh_mlp_params
from reference import JIT, maybe_jit, normal, perturb

STRATEGIES = ["gather", "segment", "masked", "auto", "grouped"]   # grouped: ragged_dot forced
POISONS = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}
# The broken adapter is adapter 0 (where -1 ids once looked, clipped). Row 1
# runs it; row 2 the base model. Without the broken adapter, the same
# examples run the same healthy adapters (row 1: the base).
IDS, CLEAN_IDS = [1, 0, -1, 2, 1], [0, -1, -1, 1, 0]
HEALTHY_ROWS = [0, 2, 3, 4]


_fn = tanh_mlp_fn


@functools.lru_cache
def _setup():
  params, x = tanh_mlp_params()
  specs = {"good0": dict(rank=2, alpha=4, targets=r".*(query|up)/kernel"),
           # Rank 2 pads no weight further than the healthy ones do, so the
           # bank without it has the same shapes (only the values may differ).
           "bad": dict(rank=2, alpha=3, targets=r".*/kernel"),
           "good1": dict(rank=4, alpha=4, targets=r".*(up|head)/kernel")}
  adapters = {}
  for i, (name, kw) in enumerate(specs.items()):
    frozen, t = jlora.lora_transform(params, jlora.LoraSpec(**kw), key=jax.random.key(i))
    adapters[name] = perturb(t, i + 1)
  return frozen, adapters, x


def _poisoned(t, value, only=None):
  """The adapter with one entry of every A and every B (of weight ``only``)
  set to ``value``."""
  def one(path, leaf):
    if not isinstance(leaf, jlora.LoraParam) or (only and only not in jax.tree_util.keystr(path)):
      return leaf
    corner = lambda x: x.at[(0,) * x.ndim].set(value)  # noqa: E731
    return dataclasses.replace(leaf, a=corner(leaf.a), b=corner(leaf.b))
  return jax.tree_util.tree_map_with_path(one, t,
                                          is_leaf=lambda x: isinstance(x, jlora.LoraParam))


def _banks(poison, only=None):
  frozen, adapters, x = _setup()
  full = jlora.stack_adapters({"bad": _poisoned(adapters["bad"], POISONS[poison], only),
                               "good0": adapters["good0"], "good1": adapters["good1"]})
  clean = jlora.stack_adapters({"good0": adapters["good0"], "good1": adapters["good1"]})
  return frozen, x, full, clean


@pytest.fixture
def strategy(request, monkeypatch):
  how = request.param
  if how == "grouped":    # the ragged_dot form accelerators run, on this CPU
    monkeypatch.setattr(bank_term, "_runs_grouped", _always_grouped)
    return "segment"
  return how


def _always_grouped(platform):
  return True


# One training step per strategy, way of grouping and bank structure, shared by
# the tests (a poison is a value, not a structure): each is traced and, under
# jit, compiled once, instead of once per poison.
_STEPS: dict = {}


def _step_fn(bank_dot, frozen, bank, jit=False):
  key = (bank_dot, bank_term._runs_grouped, jax.tree_util.tree_structure(bank), id(frozen),
         jit)
  if key not in _STEPS:
    step, tx = _new_step_fn(bank_dot, frozen, bank)
    _STEPS[key] = (maybe_jit(step, jit), tx)
  return _STEPS[key]


def _new_step_fn(bank_dot, frozen, bank):
  apply = jlora.lora(_fn, bank_dot=bank_dot)
  tx = jlora.optimizer(optax.adam(1e-2), bank)

  def step(bank, state, x, ids):
    y = apply(frozen, bank, x, lora_adapter_ids=ids)
    grads = jax.grad(lambda b: jnp.sum(jnp.sin(apply(frozen, b, x, lora_adapter_ids=ids))))(
        bank)
    updates, state = tx.update(grads, state, bank, lora_adapter_ids=ids)
    return y, optax.apply_updates(bank, updates)

  return step, tx


def _assert_bits_equal(x, y, what):
  x, y = np.asarray(x), np.asarray(y)
  assert x.shape == y.shape and x.tobytes() == y.tobytes(), (
      f"{what}: differs by {np.nanmax(np.abs(x - y))}, NaN {np.isnan(x).sum()}")


@JIT
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_a_broken_adapter_changes_nothing_for_the_others(strategy, poison, jit, only=None):
  frozen, x, full, clean = _banks(poison, only)
  outs = {}
  for name, bank, ids in (("full", full, IDS), ("clean", clean, CLEAN_IDS)):
    step, tx = _step_fn(strategy, frozen, bank, jit)
    outs[name] = step(bank, tx.init(bank), x, jnp.asarray(ids))
  (y_full, new_full), (y_clean, new_clean) = outs["full"], outs["clean"]
  assert bool(jnp.isfinite(y_clean).all())
  for row in HEALTHY_ROWS:     # other adapters' rows and the base model's row
    _assert_bits_equal(y_full[row], y_clean[row], f"row {row}")
  for name in ("good0", "good1"):   # one Adam step, from the same gradients
    got = jax.tree_util.tree_leaves(jlora.select_adapter(new_full, name))
    want = jax.tree_util.tree_leaves(jlora.select_adapter(new_clean, name))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
      _assert_bits_equal(g, w, f"{name} factor {i}")


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_an_adapter_broken_at_the_last_weight_only(strategy):
  # Its rows run finite values through the first weights, and carry NaN
  # cotangents back through them: selected out of the other adapters' too.
  test_a_broken_adapter_changes_nothing_for_the_others(strategy, "nan", True, only="head")


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_a_broken_adapter_no_example_uses_takes_no_step(strategy):
  frozen, x, full, clean = _banks("nan")
  unused, clean_ids = [1, 2, -1, 2, 1], [0, 1, -1, 1, 0]
  step, tx = _step_fn(strategy, frozen, full, jit=True)
  y, new = step(full, tx.init(full), x, jnp.asarray(unused))
  step_c, tx_c = _step_fn(strategy, frozen, clean, jit=True)
  y_c, new_c = step_c(clean, tx_c.init(clean), x, jnp.asarray(clean_ids))
  _assert_bits_equal(y, y_c, "outputs")
  for name in ("good0", "good1"):
    for g, w in zip(jax.tree_util.tree_leaves(jlora.select_adapter(new, name)),
                    jax.tree_util.tree_leaves(jlora.select_adapter(new_c, name)), strict=True):
      _assert_bits_equal(g, w, name)
  # The broken adapter's own factors are left as they were.
  for g, w in zip(jax.tree_util.tree_leaves(jlora.select_adapter(new, "bad")),
                  jax.tree_util.tree_leaves(jlora.select_adapter(full, "bad")), strict=True):
    _assert_bits_equal(g, w, "bad")


@pytest.mark.parametrize("strategy", ["gather", "masked"], indirect=True)
def test_a_scalar_id_and_base_rows_ignore_a_broken_adapter_0(strategy):
  # -1 rows and a scalar -1 once read adapter 0 (clipped) and multiplied it by 0.
  frozen, adapters, x = _setup()
  bank = jlora.stack_adapters({"bad": _poisoned(adapters["bad"], float("nan")),
                               "good1": adapters["good1"]})
  apply = jax.jit(jlora.lora(_fn, bank_dot=strategy))
  base = _fn(jlora.merge(frozen, jlora.select_adapter(bank, "good1")), x)
  y = apply(frozen, bank, x, lora_adapter_ids=jnp.asarray([-1, 1, -1, 1, 1]))
  assert bool(jnp.isfinite(y).all()) and float(jnp.max(jnp.abs(y[1] - base[1]))) < 1e-5
  y = apply(frozen, bank, x, lora_adapter_ids=jnp.asarray(-1))
  assert bool(jnp.isfinite(y).all())
  g = jax.jit(jax.grad(lambda b: jnp.sum(apply(frozen, b, x, lora_adapter_ids=-1))))(bank)
  assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree_util.tree_leaves(g))


def _primitives(jaxpr, skip_fallbacks: bool) -> set[str]:
  """The primitives a jaxpr runs, nested ones included; with ``skip_fallbacks``,
  not those of a cond's first branch (``lax.cond``'s false branch)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for name, param in eqn.params.items():
      subs = param if isinstance(param, (tuple, list)) else (param,)
      if skip_fallbacks and eqn.primitive.name == "cond" and name == "branches":
        subs = subs[1:]
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names |= _primitives(inner, skip_fallbacks)
  return names


def test_a_forward_scans_no_factors_unless_an_output_is_not_finite():
  # Decoding's cost (issue 17's bench): without a gradient, "masked" runs its
  # two plain matmuls and checks their output; the isolating form, which
  # checks every adapter's factors, is only the fallback of a lax.cond.
  frozen, adapters, x = _setup()
  bank = jlora.stack_adapters({"good0": adapters["good0"], "good1": adapters["good1"]})
  apply = jlora.lora(_fn, bank_dot="masked")
  ids = jnp.asarray([0, 1, -1, 1, 0])
  jaxpr = jax.make_jaxpr(lambda b: apply(frozen, b, x, lora_adapter_ids=ids))(bank).jaxpr
  assert "cond" in _primitives(jaxpr, True)
  assert "is_finite" not in _primitives(jaxpr, True)
  assert "is_finite" in _primitives(jaxpr, False)
  # Under jit, an id out of range still makes its own row NaN, and only it.
  y = jax.jit(apply)(frozen, bank, x, lora_adapter_ids=jnp.asarray([0, 1, 2, 1, 0]))
  assert bool(jnp.isnan(y[2]).all()) and bool(jnp.isfinite(jnp.delete(y, 2, axis=0)).all())


@JIT
@pytest.mark.parametrize("poison", POISONS)
def test_a_long_batch_checks_the_factors_and_stays_isolated(poison, jit, monkeypatch):
  # Without a gradient, "masked" checks the factors instead of the output when
  # they are smaller (many rows): the plain form must then be exact as well.
  checked = []
  monkeypatch.setattr(bank_term, "_checks_output",
                      lambda out, fac: checked.append(out <= fac) or out <= fac)
  frozen, adapters, x = _setup()
  full = _banks(poison)[2]
  # The same adapters with "bad" healthy: the same shapes, so the same sums
  # (at this many rows XLA:CPU's dot sums in an order that depends on the
  # number of adapters' columns, so a bank without "bad" may differ by an ulp).
  clean = jlora.stack_adapters(
      {"bad": adapters["bad"], "good0": adapters["good0"], "good1": adapters["good1"]})
  reps = 64
  xl = jnp.tile(x, (reps,) + (1,) * (x.ndim - 1))
  ids = jnp.tile(jnp.asarray(IDS), reps)
  apply = maybe_jit(jlora.lora(_fn, bank_dot="masked"), jit)
  y_full = apply(frozen, full, xl, lora_adapter_ids=ids)
  y_clean = apply(frozen, clean, xl, lora_adapter_ids=ids)
  assert checked and not any(checked), checked     # the factors were checked, at every weight
  healthy = [i for i in range(len(IDS) * reps) if i % len(IDS) in HEALTHY_ROWS]
  assert bool(jnp.isfinite(y_clean).all())
  _assert_bits_equal(y_full[jnp.asarray(healthy)], y_clean[jnp.asarray(healthy)],
                     "healthy rows")
  if poison != "huge":      # the broken adapter's own rows are NaN
    assert bool(jnp.isnan(y_full[1::len(IDS)]).any(axis=-1).all())


# -- ids per example, never per token -----------------------------------------------------


def test_ids_inside_a_map_over_examples_are_refused_by_name():
  frozen, adapters, _ = _setup()
  bank = jlora.stack_adapters({"good0": adapters["good0"], "good1": adapters["good1"]})
  x = normal((3, 3, 12), seed=5)     # 3 examples of 3 tokens: a map sees (3, 12)
  per_example = lambda p, x: jax.lax.map(lambda xe: _fn(p, xe), x)  # noqa: E731
  apply = jlora.lora(per_example)
  with pytest.raises(jlora.LoraLayoutError,
                     match=r"'query/kernel': cannot tell that the leading axis .*3 examples"):
    apply(frozen, bank, x, lora_adapter_ids=jnp.asarray([0, 1, 0]))
  with pytest.raises(jlora.LoraLayoutError, match=r"'query/kernel': cannot tell"):
    jax.jit(apply)(frozen, bank, x, lora_adapter_ids=jnp.asarray([0, 1, 0]))
  # The same model on the examples' axis, and a scalar id inside the map, run.
  y = apply(frozen, bank, x, lora_adapter_ids=1)
  want = _fn(jlora.merge(frozen, jlora.select_adapter(bank, "good1")), x)
  assert float(jnp.max(jnp.abs(y - want))) < 1e-5
  y = jlora.lora(_fn)(frozen, bank, x, lora_adapter_ids=jnp.asarray([0, 1, 0]))
  assert float(jnp.max(jnp.abs(y[1] - want[1]))) < 1e-5


def test_time_major_inputs_are_refused_even_when_the_sizes_agree():
  frozen, adapters, _ = _setup()
  bank = jlora.stack_adapters({"good0": adapters["good0"], "good1": adapters["good1"]})
  x = normal((3, 3, 12), seed=5)     # (examples, tokens, features)
  swapped = lambda p, x: jnp.swapaxes(_fn(p, jnp.swapaxes(x, 0, 1)), 0, 1)  # noqa: E731
  with pytest.raises(jlora.LoraLayoutError, match=r"cannot tell that the leading axis"):
    jlora.lora(swapped)(frozen, bank, x, lora_adapter_ids=jnp.asarray([0, 1, 0]))


# -- ids validated alike, and a checked mode under jit ------------------------------------


def test_the_optimizer_validates_ids_as_apply_does():
  frozen, adapters, x = _setup()
  bank = jlora.stack_adapters({"good0": adapters["good0"], "good1": adapters["good1"]})
  tx = jlora.optimizer(optax.adam(1e-2), bank)
  state = tx.init(bank)
  grads = jax.tree_util.tree_map(jnp.ones_like, bank)
  apply = jlora.lora(_fn)
  for ids, match in (([0, 5, 0, 0, 0], r"holds 5, but the bank has 2 adapters"),
                     ([0, -2, 0, 0, 0], r"holds -2, but the bank has 2 adapters"),
                     ([[0, 1]], r"int scalar or an int array"),
                     ([0.0, 1.0, 0.0, 0.0, 0.0], r"int scalar or an int array")):
    for call in (lambda ids: tx.update(grads, state, bank, lora_adapter_ids=ids),
                 lambda ids: apply(frozen, bank, x, lora_adapter_ids=ids)):
      with pytest.raises(jlora.LoraTreeError, match=match):
        call(jnp.asarray(ids) if not isinstance(ids[0], float) else np.asarray(ids))


def test_check_ids_reports_an_id_out_of_range_under_jit():
  frozen, adapters, x = _setup()
  bank = jlora.stack_adapters({"good0": adapters["good0"], "good1": adapters["good1"]})
  run = jax.jit(checkify.checkify(
      lambda ids: jlora.lora(_fn, check_ids=True)(frozen, bank, x, lora_adapter_ids=ids)))
  err, y = run(jnp.asarray([0, 1, -1, 1, 0]))
  err.throw()                                             # in range: no error
  err, y = run(jnp.asarray([0, 1, 7, 1, 0]))
  with pytest.raises(checkify.JaxRuntimeError, match=r"holds 7, but the bank has 2 adapters"):
    err.throw()
  err, _ = run(jnp.asarray(-3))
  with pytest.raises(checkify.JaxRuntimeError, match=r"holds -3"):
    err.throw()
  # Unchecked, an id out of range gives NaN rows (a scalar: the whole batch).
  y = jax.jit(jlora.lora(_fn))(frozen, bank, x, lora_adapter_ids=jnp.asarray(2))
  assert bool(jnp.isnan(y).all())
