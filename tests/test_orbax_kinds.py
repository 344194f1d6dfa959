"""Orbax adapters and training checkpoints for every adapter kind.

DoRA adapters and banks save and restore bit for bit, with their static
metadata and the shardings derived from W0; a kind this jlora does not know
is refused before any array is read; an adapter made by PiSSA/OLoRA is tied
to the residual base it was trained against.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora.adapters import adapter as adapter_kinds
from jlora.orbax import arrays
from jlora.cli import main as cli_main
from orbax_util import assert_trees_equal

LAYOUTS = {"v": jlora.Layout((1,), (2,), (0,))}       # a stacked (layers, in, out) weight


def _params():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)}


def _noisy(tree, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape),
                                            x.dtype), tree)


def _adapter(params, spec, seed):
  """``lora_transform``'s trainable tree with random arrays drawn by NumPy (no
  XLA compilation for the init)."""
  _, t = jlora.lora_transform(jax.eval_shape(lambda: params), spec)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), t)


def _sharded_base(params):
  """The base as abstract leaves carrying NamedShardings (one device, two named axes)."""
  mesh = jax.make_mesh((1, 1), ("layers", "model"))
  specs = {"w": P(None, "model"), "v": P("layers", None, "model")}
  return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, specs[k]))
          for k, x in params.items()}


def test_dora_and_banks_round_trip_exactly_on_w0s_shardings(tmp_path, capsys):
  params = _params()
  spec = jlora.LoraSpec(rank=2, targets=["w", "v"], use_dora=True, layouts=LAYOUTS)
  frozen, t = params, _adapter(params, spec, 0)
  jlora.orbax.save(tmp_path / "dora", t, spec, base=frozen)
  loaded, loaded_spec = jlora.orbax.load(tmp_path / "dora", base=frozen)
  assert_trees_equal(loaded, t)
  assert loaded_spec == spec and isinstance(loaded["v"], jlora.DoraParam)
  meta = jlora.orbax.metadata(tmp_path / "dora")
  entry = next(e for e in meta["entries"] if e["path"] == "v")
  assert entry["kind"] == "dora" and set(entry["arrays"]) == {"a", "b", "magnitude"}
  assert all(len(info["sha256"]) == 64 for info in entry["arrays"].values())
  # Shardings follow W0: the magnitude its stack and output axes.
  on_mesh, _ = jlora.orbax.load(tmp_path / "dora", base=_sharded_base(params))
  v = on_mesh["v"]
  assert (v.a.sharding.spec, v.b.sharding.spec, v.magnitude.sharding.spec) == (
      P("layers", None, None), P("layers", None, "model"), P("layers", "model"))
  np.testing.assert_array_equal(v.magnitude, t["v"].magnitude)

  # A bank: a leading adapter axis, each adapter's pair sharded as a LoraParam's.
  t1 = _adapter(params, jlora.LoraSpec(rank=2, targets=["w"]), 1)
  t2 = _adapter(params, jlora.LoraSpec(rank=3, alpha=8, targets=["w", "v"], layouts=LAYOUTS), 2)
  bank = jlora.stack_adapters({"math": t1, "code": t2})
  with pytest.raises(jlora.LoraSpecError, match="a bank of adapters.*spec=None"):
    jlora.orbax.save(tmp_path / "x", bank, spec, base=params)
  jlora.orbax.save(tmp_path / "bank", bank, base=params)
  assert_trees_equal(jlora.orbax.load(tmp_path / "bank", base=params)[0], bank)
  w = jlora.orbax.load(tmp_path / "bank", base=_sharded_base(params))[0]["w"]
  assert (w.a.sharding.spec, w.b.sharding.spec) == (P(None, None, None), P(None, None, "model"))
  info = jlora.orbax.describe(tmp_path / "bank")
  assert [(a["name"], a["targets"], a["ranks"]) for a in info["adapters"]] == [
      ("math", 1, [2]), ("code", 2, [3])]
  assert cli_main(["inspect", str(tmp_path / "bank")]) == 0
  out = capsys.readouterr().out
  assert "adapters (2, a bank):" in out and "'math'  1 weights  rank 2" in out
  assert "'code'  2 weights  rank 3  scale 2.66667" in out


def test_a_manager_checkpoints_dora_and_banks(tmp_path):
  params = _params()
  spec = jlora.LoraSpec(rank=2, targets=["w", "v"], use_dora=True, layouts=LAYOUTS)
  t1 = _adapter(params, jlora.LoraSpec(rank=2, targets=["w"]), 1)
  bank = jlora.stack_adapters({"a": t1, "b": _noisy(t1, 2)})
  for name, trainable, s in (("dora", _adapter(params, spec, 0), spec), ("bank", bank, None)):
    tx = jlora.optimizer(optax.adam(1e-2), trainable)
    opt_state = _noisy(tx.init(trainable), 3)            # moments that are not zeros
    with jlora.orbax.CheckpointManager(tmp_path / name, base=params, spec=s,
                                       async_save=False) as mngr:
      mngr.save(1, trainable, opt_state)
      got = mngr.restore(opt_state=jax.eval_shape(lambda: opt_state))
    assert_trees_equal(got.trainable, trainable)
    assert_trees_equal(got.opt_state, opt_state)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Vera(jlora.Adapter):
  """An adapter kind of a future jlora."""
  d: Any
  layout: jlora.Layout = dataclasses.field(metadata=dict(static=True))
  kind: ClassVar[str] = "vera_test"

  def factor_shapes(self, weight_shape):
    return (tuple(weight_shape[i] for i in self.layout.out_axes),)

  def array_shapes(self):
    return (tuple(self.d.shape),)

  @classmethod
  def array_axes(cls, layout):
    return {"d": layout.out_axes}


def test_a_kind_this_jlora_does_not_know_is_refused_before_any_array(tmp_path, monkeypatch):
  params = _params()
  adapter_kinds.register_kind(_Vera)
  try:
    t = {"w": _Vera(d=jnp.arange(6.0), layout=jlora.Layout((0,), (1,))), "v": None}
    jlora.orbax.save(tmp_path / "a", t, base=params)
    loaded, _ = jlora.orbax.load(tmp_path / "a", base=params)
    assert_trees_equal(loaded, t)                 # registered: stored and read generically
  finally:
    adapter_kinds._KINDS.pop("vera_test")
  monkeypatch.setattr(arrays, "restore_arrays", lambda *a, **k: pytest.fail("arrays read"))
  for read in (lambda: jlora.orbax.load(tmp_path / "a", base=params),
               lambda: jlora.orbax.describe(tmp_path / "a")):
    with pytest.raises(jlora.LoraCheckpointError,
                       match=r"'w' holds a 'vera_test' adapter, a kind this jlora does not know "
                             r"\(it reads bank, dora, lora\); it was written by jlora"):
      read()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_of_a_residual_base_never_loads_onto_another(tmp_path, init):
  params = _params()
  spec = jlora.LoraSpec(rank=2, targets=["w", "v"], init=init, layouts=LAYOUTS)
  residual, initial = jlora.lora_transform(params, spec, key=jax.random.key(0))
  trained = _noisy(initial)
  assert trained["w"].residual == init
  with pytest.raises(jlora.LoraCheckpointError, match=f"made with init='{init}'.*pass that "
                                                      "frozen tree"):
    jlora.orbax.save(tmp_path / "x", trained, spec, base=jax.eval_shape(lambda: residual))
  with pytest.raises(jlora.LoraSpecError, match="the spec has init='default' but the factors "
                                                f"were made with init='{init}'"):
    jlora.orbax.save(tmp_path / "x", trained, dataclasses.replace(spec, init="default"),
                     base=residual)
  jlora.orbax.save(tmp_path / "a", trained, spec, base=residual)
  loaded, _ = jlora.orbax.load(tmp_path / "a", base=residual)
  assert_trees_equal(loaded, trained)
  with pytest.raises(jlora.LoraCheckpointError,
                     match=f"'v' was made with init='{init}', so it is relative to the residual "
                           r"W0.*perhaps the original weights"):
    jlora.orbax.load(tmp_path / "a", base=params)
  opt_state = optax.sgd(0.1).init(trained)
  with jlora.orbax.CheckpointManager(tmp_path / "m", base=residual, spec=spec,
                                     async_save=False) as mngr:
    mngr.save(1, trained, opt_state)
  with jlora.orbax.CheckpointManager(tmp_path / "m", base=params, spec=spec) as mngr:
    with pytest.raises(jlora.LoraCheckpointError, match="relative to the residual W0"):
      mngr.restore(opt_state=opt_state)
  with pytest.raises(jlora.LoraTreeError, match="relative to the residual weights.*"
                                                "relative_to_original"):
    jlora.stack_adapters({"a": trained})
  # Made relative to the original weights, it saves for and loads onto them.
  plain = jlora.relative_to_original(trained, initial)
  assert plain["w"].rank == 4 and plain["w"].residual is None
  jlora.orbax.save(tmp_path / "plain", plain, base=params)
  back, _ = jlora.orbax.load(tmp_path / "plain", base=params)
  for k in params:
    np.testing.assert_allclose(jlora.merge(params, back)[k], jlora.merge(residual, trained)[k],
                               atol=1e-5)


def test_a_loftq_adapter_keeps_to_its_quantized_base(tmp_path):
  w = {"w": jax.random.normal(jax.random.key(0), (128, 64))}
  spec = jlora.LoraSpec(rank=4, targets=["w"], init="loftq")
  q, t = jlora.lora_transform(w, spec, key=jax.random.key(1))
  jlora.orbax.save(tmp_path / "a", t, spec, base=q)          # the NF4 base's arrays hashed
  assert_trees_equal(jlora.orbax.load(tmp_path / "a", base=q)[0], t)
  other, _ = jlora.lora_transform({"w": w["w"] * 1.01}, spec, key=jax.random.key(1))
  with pytest.raises(jlora.LoraCheckpointError, match="made with init='loftq'"):
    jlora.orbax.load(tmp_path / "a", base=other)
  with pytest.raises(jlora.LoraPeftError, match="NF4 quantization of a residual.*no exact "
                                                "adapter"):
    jlora.peft.save(tmp_path / "p", t, jlora.peft.Rules(), initial=t)
