"""Tensor-parallel sharding on 8 simulated CPU devices.

XLA reads --xla_force_host_platform_device_count only when JAX starts, so the
sharded run happens in a fresh interpreter (this file run as a script) and the
tests assert on the JSON it prints.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

MESH_SHAPE = (2, 4)          # ('data', 'model')
D, H, K, F, R, STACK = 16, 4, 8, 32, 4, 2

# path: (shape, W0's PartitionSpec, layout (in, out, stack))
WEIGHTS = {
    "attn/qkv/kernel": ((D, H, K), (None, "model", None), ((0,), (1, 2), ())),
    "attn/out/kernel": ((H, K, D), ("model", None, None), ((0, 1), (2,), ())),
    "mlp/up/kernel": ((D, F), (None, "model"), ((0,), (1,), ())),
    "mlp/down/kernel": ((F, D), ("model", None), ((0,), (1,), ())),
    "stack/kernel": ((STACK, D, D), (None, "data", "model"), ((1,), (2,), (0,))),
}
# What A and B must be sharded as: A follows W0's input axes, B its output axes,
# stack axes lead in both, the rank axis is replicated.
EXPECTED = {
    "attn/qkv/kernel": ((None, None), (None, "model", None)),
    "attn/out/kernel": (("model", None, None), (None, None)),
    "mlp/up/kernel": ((None, None), (None, "model")),
    "mlp/down/kernel": (("model", None), (None, None)),
    "stack/kernel": ((None, "data", None), (None, None, "model")),
}


# -- the part that runs with 8 devices --------------------------------------------------


def _worker() -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import jlora

  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.asarray(jax.devices()).reshape(MESH_SHAPE), ("data", "model"))
  rng = np.random.default_rng(0)

  def nest(flat):
    tree = {}
    for path, leaf in flat.items():
      node = tree
      *parents, last = path.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[last] = leaf
    return tree

  def flat(tree, is_leaf=None):
    pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {jlora.path_str(kp): x for kp, x in pairs}

  params_np = {p: (0.3 * rng.standard_normal(s)).astype(np.float32)
               for p, (s, _, _) in WEIGHTS.items()}
  params_np["mlp/up/bias"] = (0.1 * rng.standard_normal(F)).astype(np.float32)
  pspecs = {p: P(*spec) for p, (_, spec, _) in WEIGHTS.items()}
  pspecs["mlp/up/bias"] = P("model")
  x_np = rng.standard_normal((8, D)).astype(np.float32)
  y_np = rng.standard_normal((8, D)).astype(np.float32)

  def fn(p, x):
    q = jnp.einsum("bd,dhk->bhk", x, p["attn"]["qkv"]["kernel"])
    h = x + jnp.einsum("bhk,hkd->bd", jnp.tanh(q), p["attn"]["out"]["kernel"])
    u = jax.nn.gelu(h @ p["mlp"]["up"]["kernel"] + p["mlp"]["up"]["bias"])
    h = h + u @ p["mlp"]["down"]["kernel"]
    for i in range(STACK):
      h = h + jnp.tanh(h @ p["stack"]["kernel"][i])
    return h

  layouts = {p: jlora.Layout(*lay) for p, (_, _, lay) in WEIGHTS.items()}
  spec = jlora.LoraSpec(rank=R, alpha=2 * R, targets=list(WEIGHTS))
  b_np = {p: (0.1 * rng.standard_normal(layouts[p].b_shape(s, R))).astype(np.float32)
          for p, (s, _, _) in WEIGHTS.items()}
  apply = jlora.lora(fn)

  def setup(put_param, put_data):
    params = nest({p: put_param(v, pspecs[p]) for p, v in params_np.items()})
    frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0), layouts=layouts)
    # A trained-looking B, placed where lora_transform put the zeros.
    lps = flat(trainable, is_leaf=lambda z: z is None or isinstance(z, jlora.LoraParam))
    new = {}
    for p, lp in lps.items():
      if isinstance(lp, jlora.LoraParam):
        lp = jlora.LoraParam(lp.a, jax.device_put(b_np[p], lp.b.sharding), lp.scale, lp.layout)
      new[p] = lp
    return frozen, nest(new), put_data(x_np), put_data(y_np)

  def run(frozen, trainable, x, y, steps=3):
    tx = jlora.optimizer(optax.adam(1e-2), trainable)
    # Left alone, XLA may pick other shardings for the step's outputs; a training
    # loop pins the train state to its input shardings (frozen is passed through).
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, trainable)
    pin = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        jax.lax.with_sharding_constraint, tree, shardings)

    @jax.jit
    def step(frozen, trainable, opt_state, x, y):
      def loss_fn(t):
        return jnp.mean((apply(frozen, t, x) - y) ** 2)

      loss, grads = jax.value_and_grad(loss_fn)(trainable)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      adam = opt_state[0]
      opt_state = (adam._replace(mu=pin(adam.mu), nu=pin(adam.nu)),) + tuple(opt_state[1:])
      return frozen, pin(optax.apply_updates(trainable, updates)), opt_state, loss

    opt_state = tx.init(trainable)
    losses = []
    for _ in range(steps):
      frozen, trainable, opt_state, loss = step(frozen, trainable, opt_state, x, y)
      losses.append(float(loss))
    return frozen, trainable, opt_state, losses

  def spec_of(arr):
    s = tuple(arr.sharding.spec)
    s = s + (None,) * (arr.ndim - len(s))
    return [None if e is None else str(e) for e in s]

  out = {"device_count": jax.device_count()}

  # Sharded.
  put_sharded = lambda v, s: jax.device_put(v, NamedSharding(mesh, s))  # noqa: E731
  f0, t0, x, y = setup(put_sharded, lambda v: put_sharded(v, P("data", None)))
  lps0 = flat(t0, is_leaf=lambda z: isinstance(z, jlora.LoraParam))
  out["factor_specs"] = {p: [spec_of(lps0[p].a), spec_of(lps0[p].b)] for p in WEIGHTS}
  out["w0_specs"] = {p: spec_of(v) for p, v in flat(f0).items()}
  f1, t1, opt1, losses = run(f0, t0, x, y)
  out["losses_sharded"] = losses
  out["frozen_specs_after"] = {p: spec_of(v) for p, v in flat(f1).items()}
  out["frozen_unchanged"] = all(
      bool(np.array_equal(np.asarray(a), np.asarray(b)))
      for a, b in zip(jax.tree_util.tree_leaves(f0), jax.tree_util.tree_leaves(f1)))
  lps1 = flat(t1, is_leaf=lambda z: isinstance(z, jlora.LoraParam))
  out["factor_specs_after"] = {p: [spec_of(lps1[p].a), spec_of(lps1[p].b)] for p in WEIGHTS}
  mu = jlora.optimizer(optax.adam(1e-2), t0).init(t0)[0].mu
  mu_lps = flat(mu, is_leaf=lambda z: isinstance(z, jlora.LoraParam))
  out["mu_specs"] = {p: [spec_of(mu_lps[p].a), spec_of(mu_lps[p].b)] for p in WEIGHTS}

  # Abstract, sharded: the plan carries the same shardings.
  abstract = nest({p: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                            sharding=NamedSharding(mesh, pspecs[p]))
                   for p, v in params_np.items()})
  _, ta = jlora.lora_transform(abstract, spec, layouts=layouts)
  la = flat(ta, is_leaf=lambda z: isinstance(z, jlora.LoraParam))
  out["abstract_factor_specs"] = {p: [spec_of(la[p].a), spec_of(la[p].b)] for p in WEIGHTS}

  # One device.
  dev0 = jax.devices()[0]
  put_one = lambda v, s=None: jax.device_put(v, dev0)  # noqa: E731
  g0, u0, x1, y1 = setup(put_one, put_one)
  lps_u0 = flat(u0, is_leaf=lambda z: isinstance(z, jlora.LoraParam))
  out["same_initial_a"] = all(
      bool(np.array_equal(np.asarray(lps0[p].a), np.asarray(lps_u0[p].a))) for p in WEIGHTS)
  _, u1, _, losses1 = run(g0, u0, x1, y1)
  out["losses_single"] = losses1
  lps_u1 = flat(u1, is_leaf=lambda z: isinstance(z, jlora.LoraParam))
  out["max_abs_diff"] = max(
      float(np.max(np.abs(np.asarray(getattr(lps1[p], n)) - np.asarray(getattr(lps_u1[p], n)))))
      for p in WEIGHTS for n in ("a", "b"))
  out["max_abs_update"] = min(
      float(np.max(np.abs(np.asarray(getattr(lps1[p], n)) - np.asarray(getattr(lps0[p], n)))))
      for p in WEIGHTS for n in ("a", "b"))
  return out


# -- the tests, in the ordinary pytest process ---------------------------------------------


@pytest.fixture(scope="module")
def result():
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
  here = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=here,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _norm(spec):
  return tuple(None if e is None else e for e in spec)


def test_eight_devices(result):
  assert result["device_count"] == 8


def test_factors_follow_w0_sharding(result):
  for path, (want_a, want_b) in EXPECTED.items():
    got_a, got_b = result["factor_specs"][path]
    assert _norm(got_a) == want_a, (path, got_a)
    assert _norm(got_b) == want_b, (path, got_b)
    assert _norm(result["w0_specs"][path]) == WEIGHTS[path][1]


def test_abstract_factors_carry_the_same_shardings(result):
  for path, (want_a, want_b) in EXPECTED.items():
    got_a, got_b = result["abstract_factor_specs"][path]
    assert (_norm(got_a), _norm(got_b)) == (want_a, want_b), path


def test_train_step_keeps_shardings(result):
  assert result["frozen_specs_after"] == result["w0_specs"]
  assert result["frozen_unchanged"]
  assert result["factor_specs_after"] == result["factor_specs"]
  # optax's initial state for A and B lives where A and B live.
  assert result["mu_specs"] == result["factor_specs"]


def test_sharded_step_matches_one_device(result):
  assert result["same_initial_a"]
  np.testing.assert_allclose(result["losses_sharded"], result["losses_single"], rtol=1e-5)
  assert result["losses_sharded"][-1] < result["losses_sharded"][0]
  # Every factor moved, and moved the same way on the mesh and on one device.
  assert result["max_abs_update"] > 1e-3
  assert result["max_abs_diff"] < 1e-5


if __name__ == "__main__":
  print("RESULT " + json.dumps(_worker()))
