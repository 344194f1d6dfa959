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
