"""jlora.optimizer: optax state only for the trainable leaves, checked trees,
and LoRA training that lowers a loss."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from models import LinenMLP

KEY = jax.random.key(0)


@functools.lru_cache(maxsize=None)
def setup(extra=None):
  # in 16, hidden 32, out 8, rank 4: no W0 or bias shape equals an A or B shape.
  model = LinenMLP(hidden=32, out=8)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 16)), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(1), x)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray((0.3 * rng.standard_normal(s.shape)).astype(s.dtype)), abstract)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=["kernel"], extra_trainable=extra)
  frozen, trainable = jlora.lora_transform(params, spec, key=KEY)
  return model, params, x, frozen, trainable


def _size(tree):
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _float_state_leaves(state):
  return [x for x in jax.tree_util.tree_leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.mark.parametrize("extra", [None, ("bias",)], ids=["lora", "lora+bias"])
def test_adam_state_is_twice_the_trainable_size(extra):
  _, params, _, frozen, trainable = setup(extra)
  tx = jlora.optimizer(optax.adam(1e-3), trainable)
  state = tx.init(trainable)
  n_trainable = _size(trainable)
  lora_n = 4 * (16 + 32) + 4 * (32 + 32) + 4 * (32 + 8)
  assert n_trainable == lora_n + (0 if extra is None else 32 + 32 + 8)
  floats = _float_state_leaves(state)
  assert sum(x.size for x in floats) == 2 * n_trainable          # mu and nu, nothing else
  frozen_shapes = {x.shape for x in jax.tree_util.tree_leaves(frozen)}
  if extra is None:
    frozen_shapes |= {x.shape for x in jax.tree_util.tree_leaves(params) if x.ndim == 2}
  assert not frozen_shapes & {x.shape for x in floats}, "optimizer state for a frozen weight"
  assert max(x.size for x in floats) < 16 * 32                  # never a W0-sized buffer


@pytest.mark.parametrize("what", ["frozen", "params"])
def test_init_rejects_frozen_or_full_params(what):
  _, params, _, frozen, trainable = setup()
  tx = jlora.optimizer(optax.adam(1e-3), trainable)
  tree = frozen if what == "frozen" else params
  with pytest.raises(jlora.LoraTreeError, match=r"init's argument.*'params/fc1/bias' "
                     r"\(shape \(32,\)\) is not trainable"):
    tx.init(tree)


def test_init_rejects_a_trainable_tree_with_other_shapes():
  _, _, _, _, trainable = setup()
  tx = jlora.optimizer(optax.adam(1e-3), trainable)
  other_model = LinenMLP(hidden=24, out=8)
  other = jax.eval_shape(other_model.init, KEY, jnp.zeros((1, 16)))
  _, t_other = jlora.lora_transform(other, jlora.LoraSpec(rank=4, alpha=8, targets=["kernel"]))
  t_other = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t_other)
  with pytest.raises(jlora.LoraTreeError, match=r"init's argument has shape \(4, 24\) at "
                     r"'params/fc1/kernel/b' where the trainable tree has \(4, 32\)"):
    tx.init(t_other)
  state = tx.init(trainable)
  with pytest.raises(jlora.LoraTreeError, match=r"the updates has shape \(4, 24\) at "
                     r"'params/fc1/kernel/b'"):
    jax.jit(tx.update)(t_other, state)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_update_rejects_gradients_of_another_tree(use_jit):
  model, params, x, frozen, trainable = setup()
  tx = jlora.optimizer(optax.adam(1e-3), trainable)
  state = tx.init(trainable)
  full_grads = jax.tree_util.tree_map(jnp.ones_like, params)     # d loss / d params
  update = jax.jit(tx.update) if use_jit else tx.update
  with pytest.raises(jlora.LoraTreeError, match=r"the updates.*'params/fc1/bias'"):
    update(full_grads, state, trainable)
  with pytest.raises(jlora.LoraTreeError, match="the updates"):
    update(frozen, state)
  # Gradients of the trainable tree are accepted.
  grads = jax.tree_util.tree_map(jnp.ones_like, trainable)
  updates, _ = update(grads, state, trainable)
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(trainable)


def _train(model, frozen, trainable, x, y, tx, steps, use_jit):
  apply = jlora.lora(model.apply)

  def loss_fn(t):
    return jnp.mean((apply(frozen, t, x) - y) ** 2)

  def step(t, state):
    loss, grads = jax.value_and_grad(loss_fn)(t)
    updates, state = tx.update(grads, state, t)
    return optax.apply_updates(t, updates), state, loss

  if use_jit:
    step = jax.jit(step)
  state = tx.init(trainable)
  losses = []
  for _ in range(steps):
    trainable, state, loss = step(trainable, state)
    losses.append(float(loss))
  return trainable, state, losses + [float(loss_fn(trainable))]


_ADAM = lambda: optax.adam(2e-2)  # noqa: E731
_CLIP_ADAMW = lambda: optax.chain(optax.clip_by_global_norm(1.0),  # noqa: E731
                                  optax.adamw(2e-2, weight_decay=1e-2))


@pytest.mark.parametrize("use_jit,make_tx", [(False, _ADAM), (True, _ADAM), (True, _CLIP_ADAMW)],
                         ids=["adam-eager", "adam-jit", "clip+adamw-jit"])
def test_a_few_lora_steps_reduce_the_loss(use_jit, make_tx):
  model, params, x, frozen, trainable = setup(("bias",))
  y = jnp.asarray(np.random.default_rng(1).standard_normal((32, 8)), jnp.float32)
  tx = jlora.optimizer(make_tx(), trainable)
  trained, _, losses = _train(model, frozen, trainable, x, y, tx, steps=8, use_jit=use_jit)
  assert losses[-1] < 0.8 * losses[0], losses
  assert all(np.isfinite(losses))
  # Only A, B and the biases moved; W0 is what it was.
  lp0, lp1 = trainable["params"]["fc2"]["kernel"], trained["params"]["fc2"]["kernel"]
  assert float(jnp.abs(lp1.b).max()) > 0 and not np.allclose(lp0.a, lp1.a)
  assert not np.allclose(trainable["params"]["fc2"]["bias"], trained["params"]["fc2"]["bias"])
  assert lp1.scale == lp0.scale and lp1.layout == lp0.layout
  np.testing.assert_array_equal(frozen["params"]["fc2"]["kernel"],
                                params["params"]["fc2"]["kernel"])
  # The trained adapters merge into a model that computes the same loss.
  merged = jlora.merge(frozen, trained)
  merged_loss = float(jnp.mean((model.apply(merged, x) - y) ** 2))
  np.testing.assert_allclose(merged_loss, losses[-1], rtol=1e-4)


def test_jit_and_eager_training_agree():
  model, _, x, frozen, trainable = setup(("bias",))
  y = jnp.asarray(np.random.default_rng(2).standard_normal((32, 8)), jnp.float32)
  tx = jlora.optimizer(optax.adam(1e-2), trainable)
  t_eager, _, l_eager = _train(model, frozen, trainable, x, y, tx, steps=3, use_jit=False)
  t_jit, _, l_jit = _train(model, frozen, trainable, x, y, tx, steps=3, use_jit=True)
  np.testing.assert_allclose(l_eager, l_jit, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         t_eager, t_jit)


# -- LoRA+ and LoRA-FA ----------------------------------------------------------------------


def _pair_problem(seed=0):
  """An adapted (10, 6) weight, B non-zero, and a loss as a function of the
  trainable tree and of the dense weight."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(0.3 * rng.standard_normal((10, 6)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((7, 10)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((7, 6)), jnp.float32)
  spec = jlora.LoraSpec(rank=3, alpha=6, targets=["w"])
  frozen, t = jlora.lora_transform({"w": w}, spec, key=jax.random.key(seed))
  t = jax.tree.map(lambda a: a + 0.1 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), t)
  loss_w = lambda w: jnp.mean((jnp.tanh(x @ w) - y) ** 2)  # noqa: E731
  return frozen, t, (lambda t: loss_w(jlora.merge(frozen, t)["w"])), loss_w


@pytest.mark.parametrize("use_jit", [False, True])
def test_lora_plus_gives_b_its_own_learning_rate(use_jit):
  frozen, t, loss, _ = _pair_problem()
  grads = jax.grad(loss)(t)
  plus = optax.chain(optax.adamw(1e-2, weight_decay=0.1), jlora.lora_plus(16.0))
  plain_a = optax.adamw(1e-2, weight_decay=0.1)
  plain_b = optax.adamw(16.0 * 1e-2, weight_decay=0.1)     # B's rate, as PEFT's param group
  step = lambda tx: (jax.jit(tx.update) if use_jit else tx.update)(  # noqa: E731
      grads, tx.init(t), t)[0]["w"]
  got, want_a, want_b = step(plus), step(plain_a), step(plain_b)
  np.testing.assert_allclose(got.a, want_a.a, rtol=1e-6)
  np.testing.assert_allclose(got.b, want_b.b, rtol=1e-5)
  with pytest.raises(jlora.LoraSpecError, match="lr_ratio must be > 0"):
    jlora.lora_plus(0.0)


@pytest.mark.parametrize("use_jit", [False, True])
def test_lora_fa_projects_b_onto_the_best_fit_of_the_full_gradient(use_jit):
  """With A fixed, s * A @ g_B' is the least-squares fit of the full gradient
  G of W by updates of B: A^T (s A g_B' - G) = 0. A's gradient is zeroed."""
  frozen, t, loss, loss_w = _pair_problem(1)
  grads = jax.grad(loss)(t)
  full = jax.grad(loss_w)(jlora.merge(frozen, t)["w"])
  tx = jlora.lora_fa()
  proj = (jax.jit(tx.update) if use_jit else tx.update)(grads, tx.init(t), t)[0]["w"]
  np.testing.assert_array_equal(proj.a, 0.0)
  lp = t["w"]
  size = float(jnp.max(jnp.abs(lp.a.T @ full)))
  residual = lp.a.T @ (lp.scale * lp.a @ proj.b - full)
  assert float(jnp.max(jnp.abs(residual))) < 1e-4 * size
  # The plain LoRA gradient of B is not that fit: the projection does something.
  plain = lp.a.T @ (lp.scale * lp.a @ grads["w"].b - full)
  assert float(jnp.max(jnp.abs(plain))) > 1e-2 * size


def test_lora_fa_matches_peft_lorafa_optimizer(monkeypatch):
  """Three steps of PEFT's LoraFAOptimizer and of
  chain(lora_fa, adam, freeze_a) from the same weights and data (PEFT's
  projection in float32: on a CPU with bf16 it would run under bf16 autocast)."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from peft.optimizers import create_lorafa_optimizer, lorafa
  monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  base = torch.nn.Sequential(torch.nn.Linear(10, 6, bias=False))
  model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
  layer = model.base_model.model[0]
  with torch.no_grad():
    layer.lora_B["default"].weight.copy_(torch.from_numpy(
        0.1 * rng.standard_normal((6, 3)).astype(np.float32)))
  x = rng.standard_normal((7, 10)).astype(np.float32)
  y = rng.standard_normal((7, 6)).astype(np.float32)
  w0 = layer.base_layer.weight.detach().numpy().T.copy()                 # (in, out)
  a0 = layer.lora_A["default"].weight.detach().numpy().T.copy()           # (in, r)
  b0 = layer.lora_B["default"].weight.detach().numpy().T.copy()           # (r, out)
  opt = create_lorafa_optimizer(model, r=3, lora_alpha=6, lr=1e-2)
  for _ in range(3):
    out = model(torch.from_numpy(x))
    torch.mean((torch.tanh(out) - torch.from_numpy(y)) ** 2).backward()
    opt.step()
    opt.zero_grad()
  peft_a = layer.lora_A["default"].weight.detach().numpy().T
  peft_b = layer.lora_B["default"].weight.detach().numpy().T

  lay = jlora.Layout((0,), (1,))
  t = {"w": jlora.LoraParam(jnp.asarray(a0), jnp.asarray(b0), 2.0, lay)}
  frozen = {"w": jnp.asarray(w0)}
  loss = lambda t: jnp.mean((jnp.tanh(x @ jlora.merge(frozen, t)["w"]) - y) ** 2)  # noqa: E731
  tx = optax.chain(jlora.lora_fa(), optax.adam(1e-2, eps=1e-6), jlora.freeze_a())
  state = tx.init(t)
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(t), state, t)
    t = optax.apply_updates(t, updates)
  np.testing.assert_array_equal(t["w"].a, a0)
  np.testing.assert_allclose(peft_a, a0)
  np.testing.assert_allclose(t["w"].b, peft_b, rtol=2e-3, atol=2e-5)
  assert np.max(np.abs(peft_b - b0)) > 1e-3          # B moved
