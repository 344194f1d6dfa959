"""Helpers shared by the command-line and base-file tests."""

import jax
import jax.numpy as jnp
import numpy as np

import jlora

L, D, H, HD, MLP, VOCAB = 2, 8, 2, 4, 12, 16
LAYOUTS = {
    "params/layers/query/kernel": jlora.Layout((1,), (2, 3), (0,)),
    "params/layers/out/kernel": jlora.Layout((1, 2), (3,), (0,)),
    "params/layers/up/kernel": jlora.Layout((1,), (2,), (0,)),
}


def is_lp(x):
  return isinstance(x, jlora.LoraParam)


def fill(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray((0.1 * rng.standard_normal(s[0])).astype(s[1])),
                      shapes, is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[1], type))


def make_params():
  """A small scanned LM's parameters: stacked multi-axis kernels, a bf16 head."""
  f32 = np.float32
  return fill({"params": {
      "embed": {"embedding": ((VOCAB, D), f32)},
      "layers": {
          "query": {"kernel": ((L, D, H, HD), f32), "bias": ((L, H, HD), f32)},
          "out": {"kernel": ((L, H, HD, D), f32)},
          "up": {"kernel": ((L, D, MLP), f32)},
          "LayerNorm_0": {"scale": ((L, D), f32), "bias": ((L, D), f32)}},
      "lm_head": {"kernel": ((D, VOCAB), jnp.bfloat16)}}}, seed=0)


def assert_params_equal(got, want):
  """Same paths, shapes, dtypes and bits (flat '/'-joined paths)."""
  want = {jlora.path_str(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(want)}
  assert set(got) == set(want)
  for p, w in want.items():
    g = got[p]
    assert g.shape == w.shape and g.dtype == w.dtype, p
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=p)


def flat_params(path):
  return {jlora.path_str(kp): x for kp, x in
          jax.tree_util.tree_leaves_with_path(jlora.base.load(path))}
