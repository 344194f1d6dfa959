"""Base-parameter files: jlora.base.save / load / read / describe."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open

import jlora
from files_util import D, VOCAB, assert_params_equal, flat_params, make_params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A small scanned LM's parameters, saved as an orbax base and a safetensors base."""
  tmp = tmp_path_factory.mktemp("base")
  params = make_params()
  return dict(params=params, base=jlora.base.save(tmp / "base", params),
              base_st=jlora.base.save(tmp / "base.safetensors", params))


# -- bases on disk -------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "base_st"])
def test_save_params_round_trip_keeps_dtypes(setup, name):
  params = setup["params"]
  back = jlora.base.load(setup[name], like=params)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  assert_params_equal(flat_params(setup[name]), params)
  assert back["params"]["lm_head"]["kernel"].dtype == jnp.bfloat16
  if name == "base_st":  # the safetensors keys are the '/'-joined paths
    with safe_open(setup[name], "numpy") as f:
      keys = set(f.keys())
    assert "params/layers/query/kernel" in keys and "params/lm_head/kernel" in keys
  else:  # params/ is a standard orbax PyTree checkpoint of the nested dicts
    plain = ocp.StandardCheckpointer().restore(setup[name] / "params")
    np.testing.assert_array_equal(plain["params"]["layers"]["up"]["kernel"],
                                  params["params"]["layers"]["up"]["kernel"])


def test_load_params_like_mismatch_and_overwrite(setup, tmp_path):
  like = jax.tree.map(lambda x: x, setup["params"])
  like["params"]["lm_head"]["kernel"] = jnp.zeros((D, VOCAB), jnp.float32)
  with pytest.raises(jlora.LoraError, match="params/lm_head/kernel"):
    jlora.base.load(setup["base_st"], like=like)
  with pytest.raises(jlora.LoraError, match="already exists"):
    jlora.base.save(setup["base"], setup["params"])
  p = jlora.base.save(tmp_path / "b", {"w": jnp.ones(3)})
  jlora.base.save(p, {"w": jnp.zeros(2)}, overwrite=True)
  np.testing.assert_array_equal(jlora.base.load(p)["w"], np.zeros(2))
  assert sorted(os.listdir(tmp_path)) == ["b"]  # no staging directories left


def test_order_without_stored_order_is_jax_order():
  """A safetensors base from another tool has no leaf order; JAX's is rebuilt."""
  tree = {"params": {"layers_10": {"kernel": 0}, "layers_2": {"kernel": 0}, "a": 0},
          "blocks": {i: {"w": 0} for i in range(12)}}
  paths = [jlora.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert jlora.base.canonical_order(sorted(paths)) == paths


# -- quantized bases ------------------------------------------------------------

LAYOUTS = {"params/layers/query/kernel": jlora.Layout((1,), (2, 3), (0,)),
           "params/layers/out/kernel": jlora.Layout((1, 2), (3,), (0,)),
           "params/layers/up/kernel": jlora.Layout((1,), (2,), (0,))}


def _is_nf4(x):
  return isinstance(x, jlora.NF4Array)


def _quantized_params():
  """Stacked multi-axis NF4 kernels, a bf16 NF4 head, one without double
  quantization and another block size, beside dense leaves."""
  params = make_params()
  q = jlora.quantize(params, r"params/layers/(query|out)/kernel|params/lm_head/kernel",
                     layouts=LAYOUTS)
  q["params"]["layers"]["up"]["kernel"] = jlora.quantize(
      {"k": params["params"]["layers"]["up"]["kernel"]}, ["k"], block_size=32,
      double_quant=False, layouts={"k": LAYOUTS["params/layers/up/kernel"]})["k"]
  return q


def _assert_same(got, want):
  """The same tree, NF4Arrays equal in every array (dtype and bytes) and static field."""
  g_leaves, g_def = jax.tree_util.tree_flatten(got, is_leaf=_is_nf4)
  w_leaves, w_def = jax.tree_util.tree_flatten(want, is_leaf=_is_nf4)
  assert g_def == w_def
  for g, w in zip(g_leaves, w_leaves):
    assert type(g) is type(w)
    if _is_nf4(w):
      assert (g.shape, g.dtype, g.layout, g.block_size) == (w.shape, w.dtype, w.layout,
                                                            w.block_size)
      assert jax.tree.structure(g) == jax.tree.structure(w)
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      assert g.dtype == w.dtype
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("name", ["q.safetensors", "q"])
def test_a_quantized_base_round_trips_exactly(tmp_path, name):
  q = _quantized_params()
  path = jlora.base.save(tmp_path / name, q)
  _assert_same(jlora.base.load(path, like=q), q)
  # Without `like`: nested dicts, the same NF4Arrays.
  flat = dict(jlora.base.read(path))
  assert _is_nf4(flat["params/layers/query/kernel"]) and not _is_nf4(flat["params/embed/embedding"])
  # `like` may hold the dense weights the NF4Arrays stand for (abstract will do).
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_params())
  _assert_same(jlora.base.load(path, like=abstract), q)
  # ... but not an NF4Array of another format.
  other = dict(q, params=dict(q["params"], lm_head={"kernel": jlora.quantize(
      {"k": make_params()["params"]["lm_head"]["kernel"]}, ["k"], block_size=128)["k"]}))
  with pytest.raises(jlora.LoraFileError, match="'params/lm_head/kernel' is NF4 .*block size 64"):
    jlora.base.load(path, like=other)
  info = jlora.base.describe(path)
  nf4 = [x for x in jax.tree.leaves(q, is_leaf=_is_nf4) if _is_nf4(x)]
  assert info["quantized"] == {"tensors": 4, "elements": sum(x.size for x in nf4),
                               "bytes": sum(x.nbytes for x in nf4),
                               "bits_per_param": 8 * sum(x.nbytes for x in nf4)
                               / sum(x.size for x in nf4)}
  if name.endswith(".safetensors"):   # the arrays under <path>.nf4.<array>
    with safe_open(path, "numpy") as f:
      keys = set(f.keys())
    assert {"params/layers/query/kernel.nf4.codes", "params/layers/up/kernel.nf4.absmax",
            "params/lm_head/kernel.nf4.offset"} <= keys
    assert "params/layers/up/kernel.nf4.offset" not in keys          # no double quantization
  else:                               # params/ is still a standard orbax PyTree checkpoint
    plain = ocp.StandardCheckpointer().restore(path / "params")
    np.testing.assert_array_equal(plain["params"]["layers"]["query"]["kernel"]["codes"],
                                  q["params"]["layers"]["query"]["kernel"].codes)


def test_quantized_base_refusals(tmp_path):
  q = _quantized_params()
  abstract = dict(q, params=dict(q["params"], lm_head={"kernel": jax.eval_shape(
      lambda: q["params"]["lm_head"]["kernel"])}))
  with pytest.raises(jlora.LoraFileError, match="'params/lm_head/kernel': expected an array, got "
                                                "an abstract NF4Array"):
    jlora.base.save(tmp_path / "a.safetensors", abstract)
  clash = {"w": jlora.quantize({"k": jnp.ones((64, 64))}, ["k"])["k"], "w.nf4.codes": jnp.ones(2)}
  with pytest.raises(jlora.LoraFileError, match="'w.nf4.codes' names both a parameter and an "
                                                "array of the NF4 weight 'w'"):
    jlora.base.save(tmp_path / "c.safetensors", clash)
  # The metadata of a quantized weight is checked against its arrays.
  from safetensors.numpy import load_file, save_file
  import json
  path = jlora.base.save(tmp_path / "q.safetensors", q)
  with safe_open(path, "numpy") as f:
    meta = f.metadata()
  tensors = load_file(path)
  quant = json.loads(meta["jlora.quantized"])
  quant["params/lm_head/kernel"]["dtype"] = "float32"        # would change what it dequantizes to
  save_file(tensors, tmp_path / "bad.safetensors",
            metadata=dict(meta, **{"jlora.quantized": json.dumps(quant)}))
  with pytest.raises(jlora.LoraFileError, match="is damaged: its quantized weights' metadata"):
    jlora.base.read(tmp_path / "bad.safetensors")
