"""Banks of adapters: each example of a mixed batch runs as if alone with its
own adapter, forward and gradients; ids and banks change without
recompiling; optax state is per adapter."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from hlo import dot_result_shapes, weight_shaped_dots
from models import LinenLM, LMConfig, NNXLM, tanh_mlp_fn, tanh_mlp_params
from reference import JIT, NoMaterialize, max_abs_diff, maybe_jit, normal, perturb

CFG = LMConfig(vocab=64, d_model=32, heads=4, layers=2, mlp=64, seq=16)
# Three adapters with different ranks, scales and targets; together they
# cover every kind of projection, and each leaves some weights alone.
SPECS = {
    "math": dict(rank=2, alpha=4, targets=r".*(query|value)/kernel"),
    "code": dict(rank=4, alpha=4, targets=r".*(query|key|up)/kernel"),
    "chat": dict(rank=3, alpha=9, targets=r".*(out|down|head)/kernel"),
}
IDS = [0, 2, -1, 1, 0]          # one example per adapter, two of "math", one base-only


@dataclasses.dataclass(eq=False)   # hashable by identity, for the caches below
class Setup:
  fn: object
  params: object
  frozen: object
  adapters: dict
  bank: object
  tokens: jax.Array


def _setup(fn, params, tokens, layouts, prefix=""):
  adapters = {}
  for i, (name, kw) in enumerate(SPECS.items()):
    spec = jlora.LoraSpec(**{**kw, "targets": prefix + kw["targets"]})
    frozen, t = jlora.lora_transform(params, spec, key=jax.random.key(i), layouts=layouts)
    adapters[name] = perturb(t, i + 1)
  return Setup(fn, params, frozen, adapters, jlora.stack_adapters(adapters), tokens)


@functools.lru_cache
def linen():
  model = LinenLM(CFG)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab, (5, 12)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  return _setup(model.apply, params, tokens, jlora.infer_layouts(model.apply, params, tokens))


@functools.lru_cache
def mlp():
  """A plain-JAX model, small enough to run eagerly."""
  params, x = tanh_mlp_params()
  return _setup(tanh_mlp_fn, params, x, None)


@functools.lru_cache
def nnx_lm():
  graphdef, state = nnx.split(NNXLM(dataclasses.replace(CFG, layers=1), rngs=nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
  tokens = linen().tokens
  return _setup(fn, state, tokens, jlora.infer_layouts(fn, state, tokens))


def _loss(y):
  return jnp.sum(jnp.sin(y.astype(jnp.float32)))


@functools.lru_cache
def _per_example_reference(s: Setup, ids: tuple[int, ...]):
  """Each example alone through the merged model of its own adapter: outputs,
  and the gradient of the summed loss w.r.t. each adapter."""
  names = list(SPECS)

  def total(adapters):
    outs = []
    for e, i in enumerate(ids):
      params = s.params if i < 0 else jlora.merge(s.frozen, adapters[names[i]])
      outs.append(s.fn(params, s.tokens[e:e + 1]))
    y = jnp.concatenate(outs)
    return _loss(y), y

  (_, y), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(s.adapters)
  return y, grads


def _check(s: Setup, ids, *, jit, bank_dot="auto"):
  want_y, want_g = _per_example_reference(s, tuple(ids))
  apply = jlora.lora(s.fn, bank_dot=bank_dot)
  run = lambda bank: apply(s.frozen, bank, s.tokens, lora_adapter_ids=jnp.asarray(ids))  # noqa
  with NoMaterialize():
    y = maybe_jit(run, jit)(s.bank)
    g = maybe_jit(jax.grad(lambda b: _loss(run(b))), jit)(s.bank)
  assert max_abs_diff(y, want_y) <= 2e-5
  for name in SPECS:
    got, want = jlora.select_adapter(g, name), want_g[name]
    for gl, wl in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                      strict=True):
      assert max_abs_diff(gl, wl) <= 1e-4 * float(jnp.max(jnp.abs(wl))) + 1e-7, name
  return y, g


@JIT
@pytest.mark.parametrize("bank_dot", ["gather", "masked", "segment"])
def test_mixed_batch_equals_each_example_alone(jit, bank_dot):
  # Eager dispatch compiles every op: the small plain-JAX model runs eagerly,
  # the Linen LM (nn.scan, remat, DenseGeneral) under jit.
  s = linen() if jit else mlp()
  y, _ = _check(s, IDS, jit=jit, bank_dot=bank_dot)
  # The adapters matter: the rows differ from the base model's.
  base = s.fn(s.params, s.tokens)
  assert max_abs_diff(y[0], base[0]) > 1e-2 and max_abs_diff(y[2], base[2]) < 1e-5


def test_mixed_batch_equals_each_example_alone_nnx():
  _check(nnx_lm(), IDS, jit=True)


def test_an_adapter_without_examples_gets_no_gradient():
  s = linen()
  _, g = _check(s, [0, 0, -1, 2, 0], jit=True)        # no example uses "code"
  code = jlora.select_adapter(g, "code")
  assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree_util.tree_leaves(code))


def test_a_scalar_id_runs_the_whole_batch_with_one_adapter():
  s = linen()
  apply = jax.jit(jlora.lora(s.fn))
  for i, name in enumerate(SPECS):
    y = apply(s.frozen, s.bank, s.tokens, lora_adapter_ids=i)
    want = s.fn(jlora.merge(s.frozen, s.adapters[name]), s.tokens)
    assert max_abs_diff(y, want) <= 2e-5
  y = apply(s.frozen, s.bank, s.tokens, lora_adapter_ids=-1)
  assert max_abs_diff(y, s.fn(s.params, s.tokens)) <= 2e-5


def test_new_ids_and_a_swapped_bank_do_not_recompile():
  s = linen()
  traces = []

  def step(bank, tokens, ids):
    traces.append(1)
    return jlora.lora(s.fn)(s.frozen, bank, tokens, lora_adapter_ids=ids)

  step = jax.jit(step)
  other = jax.tree_util.tree_map(lambda x: x * 0.5, s.bank)     # same shapes and scales
  for bank, ids in ((s.bank, IDS), (s.bank, [2, 2, 1, -1, 0]), (other, IDS), (s.bank, 1)):
    step(bank, s.tokens, jnp.asarray(ids, jnp.int32).reshape(-1) if ids != 1 else
         jnp.full((5,), 1, jnp.int32))
  assert len(traces) == 1


def test_bank_shapes_padding_and_select_adapter():
  s = linen()
  q = s.bank["params"]["layers"]["query"]["kernel"]
  assert q.names == ("math", "code", "chat") and q.ranks == (2, 4, 0)
  assert q.a.shape == (3, 2, 32, 4)                      # (adapters, layers, d, max rank)
  assert q.scales == (2.0, 1.0, 0.0)
  np.testing.assert_array_equal(q.a[0, ..., 2:], 0.0)    # "math" padded from rank 2
  np.testing.assert_array_equal(q.a[2], 0.0)             # "chat" leaves query alone
  for name, t in s.adapters.items():
    back = jlora.select_adapter(s.bank, name)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(t)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(t)):
      np.testing.assert_array_equal(x, y)


def test_merge_one_adapter_of_a_bank_and_swap():
  s = linen()
  merged = jlora.merge(s.frozen, s.bank, adapter="code")
  want = jlora.merge(s.frozen, s.adapters["code"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, want)
  # Swap "code" for "chat" in the merged model.
  swapped = jlora.merge(jlora.unmerge(merged, s.bank, adapter="code"), s.bank, adapter="chat")
  y = s.fn(swapped, s.tokens)
  assert max_abs_diff(y, s.fn(jlora.merge(s.frozen, s.adapters["chat"]), s.tokens)) <= 2e-5
  with pytest.raises(jlora.LoraTreeError, match="holds a bank of adapters; name the one"):
    jlora.merge(s.frozen, s.bank)
  with pytest.raises(jlora.LoraTreeError, match="no adapter named 'nope'"):
    jlora.merge(s.frozen, s.bank, adapter="nope")


def test_mixed_batch_train_step_has_no_weight_shaped_dot():
  s = linen()
  apply = jlora.lora(s.fn)
  ids = jnp.asarray(IDS)
  grad = jax.jit(jax.grad(lambda b: _loss(apply(s.frozen, b, s.tokens, lora_adapter_ids=ids))))
  hlo = grad.lower(s.bank).compile().as_text()
  assert len(dot_result_shapes(hlo)) >= 6
  for t in s.adapters.values():
    assert weight_shaped_dots(hlo, s.frozen, t) == []


def test_bad_ids_and_missing_ids_are_named():
  s = linen()
  apply = jlora.lora(s.fn)
  with pytest.raises(jlora.LoraTreeError, match=r"'params/.*' holds a bank.*lora_adapter_ids"):
    apply(s.frozen, s.bank, s.tokens)
  with pytest.raises(jlora.LoraTreeError, match=r"holds 3, but the bank has 3 adapters"):
    apply(s.frozen, s.bank, s.tokens, lora_adapter_ids=jnp.asarray([0, 1, 3, 0, 0]))
  with pytest.raises(jlora.LoraLayoutError, match=r"4 entries, one per example"):
    apply(s.frozen, s.bank, s.tokens, lora_adapter_ids=jnp.asarray([0, 1, 2, 0]))
  with pytest.raises(jlora.LoraTreeError, match="holds no bank"):
    apply(s.frozen, s.adapters["math"], s.tokens, lora_adapter_ids=jnp.asarray(IDS))
  # Under jit an id out of range cannot raise; its rows turn NaN, never another adapter.
  y = jax.jit(apply)(s.frozen, s.bank, s.tokens,
                     lora_adapter_ids=jnp.asarray([0, 7, 0, 0, 0]))
  assert bool(jnp.isnan(y[1]).all()) and not bool(jnp.isnan(y[0]).any())


def test_a_bank_on_an_expert_einsum_is_refused_by_name():
  params = {"experts": normal((3, 8, 6), 0.3)}
  layouts = {"experts": jlora.Layout((1,), (2,), (0,))}
  adapters = {}
  for i in range(2):
    _, t = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["experts"],
                                                       layouts=layouts), key=jax.random.key(i))
    adapters[str(i)] = t
  bank = jlora.stack_adapters(adapters)
  fn = lambda p, x: jnp.einsum("ebd,edf->ebf", x, p["experts"])  # noqa: E731
  with pytest.raises(jlora.LoraLayoutError, match="'experts'.*batch axes"):
    jlora.lora(fn)(params, bank, normal((3, 4, 8)), lora_adapter_ids=jnp.asarray([0, 1, 0]))


def test_stack_adapters_refuses_what_a_bank_cannot_hold():
  params = {"w": normal((8, 6)), "bias": normal((6,))}
  _, t1 = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["w"],
                                                      extra_trainable=["bias"]),
                               key=jax.random.key(0))
  _, t2 = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["w"]),
                               key=jax.random.key(1))
  with pytest.raises(jlora.LoraTreeError, match="'bias' is trained in full by adapter 'a'"):
    jlora.stack_adapters({"a": t1, "b": t2})
  _, t3 = jlora.lora_transform({"w": params["w"]}, jlora.LoraSpec(rank=2, targets=["w"]),
                               key=jax.random.key(1))
  with pytest.raises(jlora.LoraTreeError, match="not for the same parameters"):
    jlora.stack_adapters({"b": t2, "c": t3})
  _, t4 = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["w"], dropout=0.1),
                               key=jax.random.key(1))
  with pytest.raises(jlora.LoraTreeError, match="'w': adapters 'b' and 'd' differ in dropout"):
    jlora.stack_adapters({"b": t2, "d": t4})


def test_stack_adapters_of_bases_of_another_width_is_refused_by_path():
  # A's shapes agree; only B's output width tells the bases apart.
  _, narrow = jlora.lora_transform({"w": normal((8, 4))}, jlora.LoraSpec(rank=2, targets=["w"]),
                                   key=jax.random.key(0))
  _, wide = jlora.lora_transform({"w": normal((8, 6))}, jlora.LoraSpec(rank=3, targets=["w"]),
                                 key=jax.random.key(1))
  with pytest.raises(jlora.LoraTreeError, match=(
      r"^'w': adapters 'a' and 'b' were made for weights of different shapes \(\(8, 4\) and "
      r"\(8, 6\): A \(8, 2\), B \(2, 4\) and A \(8, 3\), B \(3, 6\)\); a bank stacks")):
    jlora.stack_adapters({"a": narrow, "b": wide})
  # A pair whose own factors disagree (B of another rank) is named too.
  lp = narrow["w"]
  bad = {"w": dataclasses.replace(lp, b=jnp.zeros((3, 4)))}
  with pytest.raises(jlora.LoraTreeError,
                     match=r"'w': the factors of adapter 'c' do not fit together"):
    jlora.stack_adapters({"a": narrow, "c": bad})


# -- training several adapters in one step ------------------------------------------------


def _train(s: Setup, steps):
  """AdamW on the bank, batches mixing adapters; and each adapter trained alone
  on its own examples of the same batches."""
  apply = jlora.lora(s.fn)
  tx = jlora.optimizer(optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)), s.bank)

  @jax.jit
  def bank_step(bank, state, ids):
    grads = jax.grad(lambda b: _loss(apply(s.frozen, b, s.tokens, lora_adapter_ids=ids)))(bank)
    updates, state = tx.update(grads, state, bank, lora_adapter_ids=ids)
    return optax.apply_updates(bank, updates), state

  bank, state = s.bank, tx.init(s.bank)
  for ids in steps:
    bank, state = bank_step(bank, state, jnp.asarray(ids))
  tx1 = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2))

  @jax.jit
  def alone_step(t, state, mask):
    # The adapter's own examples: the others are masked out of the loss.
    masked = lambda y: y * mask.reshape((-1,) + (1,) * (y.ndim - 1))  # noqa: E731
    loss = lambda t: _loss(masked(s.fn(jlora.merge(s.frozen, t), s.tokens)))  # noqa: E731
    updates, state = tx1.update(jax.grad(loss)(t), state, t)
    return optax.apply_updates(t, updates), state

  alone = {}
  for k, (name, t) in enumerate(s.adapters.items()):
    state1 = tx1.init(t)
    for ids in steps:
      mask = jnp.asarray([float(i == k) for i in ids])
      if float(mask.sum()) == 0:
        continue                   # no example for this adapter: it takes no step
      t, state1 = alone_step(t, state1, mask)
    alone[name] = t
  return bank, state, alone


def test_training_a_bank_equals_training_each_adapter_alone():
  s = mlp()
  steps = [IDS, [1, 1, 0, -1, 1], [2, 0, 0, 2, 2]]   # "chat" sits out step 2, "code" step 3
  bank, state, alone = _train(s, steps)
  for name, t in alone.items():
    got = jlora.select_adapter(bank, name)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(t), strict=True):
      assert max_abs_diff(x, y) <= 1e-5, name
  # The state is per adapter: Adam's step count counts each adapter's own steps.
  counts = [leaf for leaf in jax.tree_util.tree_leaves(state) if leaf.dtype == jnp.int32]
  assert counts and all(c.tolist() == [3, 2, 2] for c in counts)   # math, code, chat


def test_each_adapter_of_a_bank_saves_and_loads_alone(tmp_path):
  s = mlp()
  for name in SPECS:
    jlora.orbax.save(tmp_path / name, jlora.select_adapter(s.bank, name), base=s.frozen)
  loaded = {name: jlora.orbax.load(tmp_path / name, base=s.frozen)[0] for name in SPECS}
  again = jlora.stack_adapters(loaded)
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(s.bank)
  for x, y in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(s.bank)):
    np.testing.assert_array_equal(x, y)
