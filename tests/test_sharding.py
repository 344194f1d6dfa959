"""Sharding on 8 simulated CPU devices: tensor parallel, FSDP, and jlora.shardings.

XLA reads --xla_force_host_platform_device_count only when JAX starts, so the
sharded run happens in a fresh interpreter (this file run as a script) and the
tests assert on the JSON it prints.
"""

import dataclasses
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
  out["train_shardings"] = _train_shardings_worker()
  return out


# Scanned MLP stack for the all-gather comparison: sizes chosen so that no
# activation (tokens 16*12 = 192) or factor (rank 4) is shaped like a weight.
L, DM, FF, OUT, BATCH, SEQ = 3, 64, 160, 24, 16, 12
MESHES = {
    # FSDP: every weight sharded over the data axis, the batch too.
    "fsdp": ((8,), ("data",), {"up": (None, "data", None), "down": (None, "data", None),
                               "head": ("data", None)}, ("data",)),
    # Tensor parallel (Megatron): up by columns, down by rows, data on the other axis.
    "tp": ((2, 4), ("data", "model"), {"up": (None, None, "model"),
                                       "down": (None, "model", None), "head": (None, None)},
           ("data",)),
}


def _train_shardings_worker() -> dict:
  """jlora.shardings pins a LoRA step's state; its HLO gathers no frozen weight
  more often than the base model's own forward and backward do. All from
  abstract shapes: nothing is allocated, the steps are only compiled."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import jlora
  from hlo import weight_gathers

  def fn(p, x):
    def layer(h, w):
      return h + jax.nn.gelu(h @ w["up"]) @ w["down"], None
    h, _ = jax.lax.scan(layer, x, p["layers"])
    return h @ p["head"]

  shapes = {"layers": {"up": (L, DM, FF), "down": (L, FF, DM)}, "head": (DM, OUT)}
  results = {}
  for name, (mesh_shape, axes, wspecs, data_spec) in MESHES.items():
    mesh = Mesh(np.asarray(jax.devices()).reshape(mesh_shape), axes)
    ns = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    sds = lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=ns(*spec))  # noqa: E731
    params = {"layers": {k: sds(v, wspecs[k]) for k, v in shapes["layers"].items()},
              "head": sds(shapes["head"], wspecs["head"])}
    x, y = sds((BATCH, SEQ, DM), data_spec), sds((BATCH, SEQ, OUT), data_spec)
    layouts = jlora.infer_layouts(fn, params, x)
    spec = jlora.LoraSpec(rank=4, alpha=8, targets=r"layers/(up|down)")
    frozen, trainable = jlora.lora_transform(params, spec, layouts=layouts)
    tx = jlora.optimizer(optax.adam(1e-2), trainable)
    sh = jlora.shardings(trainable, tx, base=frozen)
    opt_state = jax.eval_shape(tx.init, trainable)
    f_sh = jax.tree_util.tree_map(lambda a: a.sharding, frozen)
    apply = jlora.lora(fn)

    def lora_step(t, s, f, x, y):
      loss, g = jax.value_and_grad(lambda t: jnp.mean((apply(f, t, x) - y) ** 2))(t)
      u, s = tx.update(g, s, t)
      return optax.apply_updates(t, u), s, loss

    step = jax.jit(lora_step, in_shardings=(sh.trainable, sh.opt_state, f_sh, x.sharding,
                                            y.sharding),
                   out_shardings=(sh.trainable, sh.opt_state, ns())
                   ).lower(trainable, opt_state, frozen, x, y).compile()
    ins, outs = step.input_shardings[0], step.output_shardings
    specs = lambda tree: [str(s.spec) for s in jax.tree_util.tree_leaves(tree)]  # noqa: E731

    # The base model alone, its forward and backward (to the input): the
    # weight gathers it needs whatever the fine-tuning method.
    def base_fwd_bwd(p, x, y):
      return jax.grad(lambda x: jnp.mean((fn(p, x) - y) ** 2))(x)

    base_hlo = jax.jit(base_fwd_bwd).lower(params, x, y).compile().as_text()
    lp = trainable["layers"]
    results[name] = {
        "in_specs": specs(ins[:2]), "out_specs": specs(outs[:2]),
        "wanted_specs": specs((sh.trainable, sh.opt_state)),
        "a_spec_up": str(sh.trainable["layers"]["up"].a.spec),
        "b_spec_up": str(sh.trainable["layers"]["up"].b.spec),
        "transform_specs_up": [str(lp["up"].a.sharding.spec), str(lp["up"].b.sharding.spec)],
        "count_spec": str(sh.opt_state[0].count.spec),
        "mu_equals_trainable": sh.opt_state[0].mu == sh.trainable,
        "gathers": {k: weight_gathers(h, frozen)
                    for k, h in (("lora", step.as_text()), ("base", base_hlo))},
    }

  # A bank of adapters (abstract too): the optimizer state is per adapter (vmapped).
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  w = jax.ShapeDtypeStruct((DM, OUT), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
  f, t1 = jlora.lora_transform({"w": w}, jlora.LoraSpec(rank=2, targets=["w"]))
  _, t2 = jlora.lora_transform({"w": w}, jlora.LoraSpec(rank=3, targets=["w"]))
  bank = jax.eval_shape(lambda a, b: jlora.stack_adapters({"one": a, "two": b}), t1, t2)
  tx = jlora.optimizer(optax.adam(1e-2), bank)
  sh = jlora.shardings(bank, tx, base=f)
  apply = jlora.lora(lambda p, x: x @ p["w"])

  def bank_step(b, s, f, x, ids):
    loss, g = jax.value_and_grad(lambda b: jnp.sum(apply(f, b, x, lora_adapter_ids=ids) ** 2))(b)
    u, s = tx.update(g, s, b, lora_adapter_ids=ids)
    return optax.apply_updates(b, u), s, loss

  x = jax.ShapeDtypeStruct((8, DM), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
  ids = jax.ShapeDtypeStruct((8,), jnp.int32)
  step = jax.jit(bank_step, in_shardings=(sh.trainable, sh.opt_state, None, None, None),
                 out_shardings=(sh.trainable, sh.opt_state, NamedSharding(mesh, P()))
                 ).lower(bank, jax.eval_shape(tx.init, bank), f, x, ids).compile()
  b_out, s_out, _ = step.output_shardings
  results["bank"] = {
      "a": str(b_out["w"].a.spec), "b": str(b_out["w"].b.spec),
      "mu_a": str(s_out[0].mu["w"].a.spec), "count": str(s_out[0].count.spec),
      "count_shape": list(jax.eval_shape(tx.init, bank)[0].count.shape),
  }
  return results


# -- the tests, in the ordinary pytest process ---------------------------------------------


@pytest.fixture(scope="module")
def result():
  # LLVM's lowest optimisation level: the HLO (and its collectives) is the same,
  # the compiles take half the time, and nothing here is timed.
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
           " --xla_backend_optimization_level=0")
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


@pytest.mark.parametrize("mesh", list(MESHES))
def test_shardings_pin_the_train_state(result, mesh):
  r = result["train_shardings"][mesh]
  # A follows W0's input axis and B its output axis, as lora_transform placed them.
  assert [r["a_spec_up"], r["b_spec_up"]] == r["transform_specs_up"]
  assert r["count_spec"] == "P()"
  assert r["mu_equals_trainable"]
  # The compiled step takes and returns every leaf of the state where jlora.shardings says.
  assert r["in_specs"] == r["wanted_specs"] and r["out_specs"] == r["wanted_specs"]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_lora_step_gathers_no_frozen_weight_beyond_the_base_model(result, mesh):
  g = result["train_shardings"][mesh]["gathers"]
  for path, n in g["lora"].items():
    assert n <= g["base"][path], (path, g)
  if mesh == "fsdp":
    # Control: FSDP's base model gathers every weight, so the reader sees them.
    assert all(n >= 1 for n in g["base"].values()), g
  else:
    # Tensor parallel: the base model gathers no weight, nor does the LoRA step.
    assert sum(g["lora"].values()) == 0 and sum(g["base"].values()) == 0, g


def test_bank_optimizer_state_is_sharded_per_adapter(result):
  r = result["train_shardings"]["bank"]
  # W0 (64, 24) sharded on its input axis: A (n, 64, r) gets it, the adapter axis is replicated.
  assert r["a"] == "P(None, 'data', None)" and r["mu_a"] == r["a"]
  assert r["b"] == "P(None, None, None)"
  assert r["count"] == "P()" and r["count_shape"] == [2]


def test_all_gather_reader():
  from hlo import all_gather_shapes
  text = """
  %all-gather = f32[64,160]{1,0} all-gather(%fusion.5), channel_id=1, dimensions={0}
  %ags = (f32[8,160]{1,0}, f32[64,160]{1,0}) all-gather-start(%p), dimensions={0}
  ROOT %all-gather.2 = bf16[3,4]{1,0} all-gather(%x), dimensions={1}
  %ynn_fusion.1 = f32[24,160]{1,0} fusion(%bitcast, %all-gather), kind=kCustom
  """
  assert all_gather_shapes(text) == [(64, 160), (64, 160), (3, 4)]


# -- jlora.shardings in this process (a mesh of one device) --------------------------------


def _one_device_setup():
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import jlora
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
  params = {"w": put(jnp.ones((8, 4)), "data", None), "bias": put(jnp.zeros(4), "data"),
            "norm": jnp.ones(4)}
  spec = jlora.LoraSpec(rank=2, targets=["w"], extra_trainable=["bias", "norm"])
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  return mesh, params, frozen, trainable


def test_shardings_of_extra_leaves_and_wrapped_optimizers():
  import jax
  import optax

  import jlora
  mesh, params, frozen, trainable = _one_device_setup()
  tx = jlora.optimizer(optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0),
                                                    optax.adamw(1e-3)), 2), trainable)
  sh = jlora.shardings(trainable, tx, base=params)
  assert str(sh.trainable["w"].a.spec) == "P('data', None)"
  assert str(sh.trainable["w"].b.spec) == "P(None, None)"
  assert str(sh.trainable["bias"].spec) == "P('data',)"    # the base leaf's sharding
  assert str(sh.trainable["norm"].spec) == "P()"           # none anywhere: replicated
  state = jax.eval_shape(tx.init, trainable)
  assert jax.tree_util.tree_structure(sh.opt_state) == jax.tree_util.tree_structure(state)
  assert sh.opt_state.acc_grads == sh.trainable                 # MultiSteps mirrors the params
  adam = sh.opt_state.inner_opt_state[1][0]
  assert adam.mu == sh.trainable and adam.nu == sh.trainable
  assert str(adam.count.spec) == "P()" and str(sh.opt_state.mini_step.spec) == "P()"
  # Without base, the factors' own shardings (lora_transform derived them).
  assert jlora.shardings(trainable).trainable["w"] == sh.trainable["w"]
  assert jlora.shardings(trainable).opt_state is None


def test_shardings_of_dora_and_masked_optimizers():
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import jlora
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("model",))
  w = jax.device_put(jnp.ones((3, 8, 4)), NamedSharding(mesh, P(None, None, "model")))
  spec = jlora.LoraSpec(rank=2, targets=["w"], use_dora=True,
                        layouts={"w": jlora.Layout((1,), (2,), (0,))})
  frozen, trainable = jlora.lora_transform({"w": w}, spec, key=jax.random.key(0))
  # Adam on the B factors only (a masked transformation), plus LoRA+.
  mask = jax.tree_util.tree_map(lambda _: False, trainable)
  mask = {"w": dataclasses.replace(mask["w"], b=True)}
  tx = jlora.optimizer(optax.chain(optax.masked(optax.adam(1e-3), mask), jlora.lora_plus(4.0)),
                       trainable)
  sh = jlora.shardings(trainable, tx, base=frozen)
  got = sh.trainable["w"]
  assert str(got.a.spec) == "P(None, None, None)" and str(got.b.spec) == "P(None, None, 'model')"
  assert str(got.magnitude.spec) == "P(None, 'model')"     # W0's stack and output axes
  inner = sh.opt_state[0].inner_state[0]
  assert inner.mu["w"].b == got.b and str(inner.count.spec) == "P()"


def test_shardings_errors():
  import jax
  import jax.numpy as jnp

  import jlora
  _, params, frozen, trainable = _one_device_setup()
  with pytest.raises(jlora.LoraTreeError, match="different structures"):
    jlora.shardings(trainable, base={"w": frozen["w"]})
  plain = {"w": jnp.ones((8, 4))}
  _, t = jlora.lora_transform(plain, jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
  with pytest.raises(jlora.LoraTreeError, match="no leaf of trainable or base is placed on a mesh"):
    jlora.shardings(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t))


if __name__ == "__main__":
  print("RESULT " + json.dumps(_worker()))
