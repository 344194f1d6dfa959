"""merge / unmerge / frozen_like against NumPy references of W0 + s B A."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.core import FrozenDict

import jlora

IS_LP = lambda x: isinstance(x, jlora.LoraParam)  # noqa: E731
KEY = jax.random.key(0)

# name: (shape, layout, reference of the update from A, B as an einsum)
CASES = {
    "dense": ((16, 24), jlora.Layout((0,), (1,)), "ir,ro->io"),
    "qkv": ((16, 2, 8), jlora.Layout((0,), (1, 2)), "dr,rhk->dhk"),
    "out": ((2, 8, 16), jlora.Layout((0, 1), (2,)), "hkr,rd->hkd"),
    "stack": ((3, 16, 24), jlora.Layout((1,), (2,), (0,)), "lir,lro->lio"),
    "torch": ((24, 16), jlora.Layout((1,), (0,)), "ir,ro->oi"),          # stored (out, in)
    "middle": ((2, 16, 8), jlora.Layout((1,), (0, 2)), "dr,rhk->hdk"),    # in axis in the middle
    "perm_in": ((8, 24, 2), jlora.Layout((2, 0), (1,)), "hkr,ro->koh"),   # A's axes reordered
}


def _fill(abstract_tree, seed, scale=0.5):
  """Concrete arrays for an abstract tree (LoraParam a/b included), from NumPy."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray((scale * rng.standard_normal(x.shape)).astype(x.dtype)), abstract_tree)


def make(dtype=jnp.float32, factor_dtype=jnp.float32, extra=None, seed=0, names=tuple(CASES)):
  """params, frozen and a trained-looking trainable (B != 0), without RNG compiles."""
  params = {n: {"w": None, "bias": None} for n in names}
  layouts = {}
  for n in names:
    shape, layout, _ = CASES[n]
    params[n] = {"w": jax.ShapeDtypeStruct(shape, dtype), "bias": jax.ShapeDtypeStruct((5,), dtype)}
    layouts[f"{n}/w"] = layout
  spec = jlora.LoraSpec(rank=4, alpha=6, targets=["w"], extra_trainable=extra, dtype=factor_dtype)
  params = _fill(params, seed)
  _, t_abstract = jlora.lora_transform(jax.eval_shape(lambda: params), spec, layouts=layouts)
  frozen = jlora.frozen_like(params, t_abstract)
  trainable = _fill(t_abstract, seed + 1)
  return params, frozen, trainable


def reference(params, trainable):
  """W0 + s * update in float64, per CASES' einsum."""
  out = {}
  for n, leaves in params.items():
    lp = trainable[n]["w"]
    a, b = np.asarray(lp.a, np.float64), np.asarray(lp.b, np.float64)
    delta = lp.scale * np.einsum(CASES[n][2], a, b)
    out[n] = np.asarray(leaves["w"], np.float64) + delta
  return out


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_merge_matches_numpy_reference(use_jit):
  params, frozen, trainable = make()
  merge = jax.jit(jlora.merge) if use_jit else jlora.merge
  merged = merge(frozen, trainable)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
  ref = reference(params, trainable)
  for n in CASES:
    assert merged[n]["w"].shape == CASES[n][0] and merged[n]["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(merged[n]["w"]), ref[n], rtol=1e-5, atol=1e-5,
                               err_msg=n)
    # The update is not negligible, so a wrong layout could not pass.
    assert np.abs(ref[n] - np.asarray(params[n]["w"])).max() > 0.5
    assert merged[n]["bias"] is params[n]["bias"] or use_jit
    np.testing.assert_array_equal(merged[n]["bias"], params[n]["bias"])


def test_bf16_base_stays_bf16_and_is_accumulated_in_float32():
  params, frozen, trainable = make(dtype=jnp.bfloat16)
  merged = jlora.merge(frozen, trainable)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(merged))
  ref = reference(params, trainable)
  for n in CASES:
    got = np.asarray(merged[n]["w"]).astype(np.float64)
    want = ref[n].astype(ml_dtypes.bfloat16).astype(np.float64)   # one rounding, at the end
    # Rounding W0 + s B A once from f32 agrees with rounding the exact value almost
    # everywhere; rounding the update to bf16 before adding would not.
    assert np.mean(got == want) > 0.995, n
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=0, err_msg=n)
  # The check above can fail: the double-rounded sum disagrees in many places.
  n = "dense"
  lp = trainable[n]["w"]
  delta16 = (lp.scale * np.einsum(CASES[n][2], np.asarray(lp.a, np.float64),
                                  np.asarray(lp.b, np.float64))).astype(ml_dtypes.bfloat16)
  double = (np.asarray(params[n]["w"]) + delta16).astype(np.float64)
  assert np.mean(double == ref[n].astype(ml_dtypes.bfloat16).astype(np.float64)) < 0.99


def test_bf16_factors_merge_into_f32_base():
  params, frozen, trainable = make(factor_dtype=jnp.bfloat16, names=("dense", "stack"))
  assert trainable["dense"]["w"].a.dtype == jnp.bfloat16
  merged = jlora.merge(frozen, trainable)
  ref = reference(params, trainable)
  for n in ("dense", "stack"):
    assert merged[n]["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(merged[n]["w"]), ref[n], rtol=1e-5, atol=1e-5)


def test_merge_is_abstract_friendly():
  params, frozen, trainable = make(dtype=jnp.bfloat16, names=("qkv", "stack"))
  out = jax.eval_shape(jlora.merge, frozen, trainable)
  assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), out) == jax.tree_util.tree_map(
      lambda x: (x.shape, x.dtype), params)


def test_extra_trainable_leaves_are_put_back():
  params, frozen, trainable = make(extra=["bias"], names=("dense", "qkv"))
  assert frozen["dense"]["bias"] is None and trainable["dense"]["bias"] is not None
  trained = jax.tree_util.tree_map(lambda x: x, trainable)
  trained["dense"]["bias"] = trainable["dense"]["bias"] + 3.0
  merged = jlora.merge(frozen, trained)
  np.testing.assert_array_equal(merged["dense"]["bias"], trainable["dense"]["bias"] + 3.0)
  np.testing.assert_array_equal(merged["qkv"]["bias"], trainable["qkv"]["bias"])
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)


def test_frozendict_in_frozendict_out():
  params, _, trainable = make(names=("dense",))
  params = FrozenDict(params)
  trainable = FrozenDict(trainable)
  frozen = jlora.frozen_like(params, trainable)
  merged = jlora.merge(frozen, trainable)
  assert isinstance(merged, FrozenDict)
  np.testing.assert_allclose(np.asarray(merged["dense"]["w"]),
                             reference(params, trainable)["dense"],
                             rtol=1e-5, atol=1e-5)


# -- check_finite -----------------------------------------------------------------------


def test_check_finite_names_the_first_non_finite_parameter():
  params, frozen, trainable = make(names=("dense", "qkv", "stack"))
  jlora.merge(frozen, trainable, check_finite=True)            # all finite: no error
  bad = jax.tree_util.tree_map(lambda x: x, trainable)
  lp = bad["stack"]["w"]
  bad["stack"]["w"] = jlora.LoraParam(lp.a, lp.b.at[1, 2, 3].set(jnp.nan), lp.scale, lp.layout)
  with pytest.raises(jlora.LoraError, match="'stack/w' has non-finite values"):
    jlora.merge(frozen, bad, check_finite=True)
  # Without the check NaN passes through, in the right slice only.
  merged = jlora.merge(frozen, bad)
  assert np.isnan(np.asarray(merged["stack"]["w"][1])).any()
  assert not np.isnan(np.asarray(merged["stack"]["w"][0])).any()
  # Two bad parameters: the first in tree order is named; a frozen leaf counts too.
  frozen_bad = jax.tree_util.tree_map(lambda x: x, frozen)
  frozen_bad["dense"]["bias"] = frozen["dense"]["bias"].at[0].set(jnp.inf)
  with pytest.raises(jlora.LoraError, match="'dense/bias'"):
    jlora.merge(frozen_bad, bad, check_finite=True)


def test_check_finite_under_jit_says_it_needs_concrete_arrays():
  params, frozen, trainable = make(names=("dense",))
  with pytest.raises(jlora.LoraError, match="'dense/.*' is traced.*merge outside it"):
    jax.jit(lambda f, t: jlora.merge(f, t, check_finite=True))(frozen, trainable)


# -- unmerge / frozen_like -----------------------------------------------------------------


def test_unmerge_inverts_merge():
  params, frozen, trainable = make()
  merged = jlora.merge(frozen, trainable)
  back = jlora.unmerge(merged, trainable)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(frozen)
  for n in CASES:
    np.testing.assert_allclose(np.asarray(back[n]["w"]), np.asarray(params[n]["w"]),
                               rtol=1e-5, atol=2e-6, err_msg=n)


def test_unmerge_with_extra_trainable_needs_frozen_like():
  params, frozen, trainable = make(extra=["bias"], names=("dense", "torch"))
  merged = jlora.merge(frozen, trainable)
  with pytest.raises(jlora.LoraTreeError, match=r"'dense/bias' is trained in full.*"
                                                 r"jlora\.frozen_like\(merged, trainable\)"):
    jlora.unmerge(merged, trainable)
  back = jlora.unmerge(jlora.frozen_like(merged, trainable), trainable)
  # A frozen part again: None at the extra leaves, so it pairs with trainable once more.
  assert back["dense"]["bias"] is None and back["torch"]["bias"] is None
  again = jlora.merge(back, trainable)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6),
                         again, merged)
  for n in ("dense", "torch"):
    np.testing.assert_allclose(np.asarray(back[n]["w"]), np.asarray(params[n]["w"]),
                               rtol=1e-5, atol=2e-6)


def test_frozen_like_equals_the_transform_frozen_part():
  params = {"a": {"w": jnp.ones((8, 6)), "bias": jnp.ones(6)}, "b": {"w": jnp.ones((6, 4))}}
  spec = jlora.LoraSpec(rank=2, targets=["a/w"], extra_trainable=["bias", "b/w"])
  frozen, trainable = jlora.lora_transform(jax.eval_shape(lambda: params), spec)
  like = jlora.frozen_like(params, trainable)
  assert jax.tree_util.tree_structure(like) == jax.tree_util.tree_structure(frozen)
  assert like["a"]["w"] is params["a"]["w"]
  assert like["a"]["bias"] is None and like["b"]["w"] is None


# -- mismatched trees -----------------------------------------------------------------------


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_merge_rejects_trees_that_do_not_belong_together(use_jit):
  merge = jax.jit(jlora.merge) if use_jit else jlora.merge
  params, frozen, trainable = make(names=("dense", "stack"))
  # Different transforms: one with extra trainable leaves.
  _, _, t_extra = make(extra=["bias"], names=("dense", "stack"))
  with pytest.raises(jlora.LoraTreeError, match="'dense/bias' is a leaf of both"):
    merge(frozen, t_extra)
  # Different structures.
  _, _, t_small = make(names=("dense",))
  with pytest.raises(jlora.LoraTreeError, match=r"different structures.*only in frozen: "
                     r"\['stack/bias', 'stack/w'\]"):
    merge(frozen, t_small)
  # Wrong factor shapes: the same names, another base.
  other = {"dense": {"w": jnp.zeros((16, 12)), "bias": jnp.zeros(5)},
           "stack": params["stack"]}
  _, t_other = jlora.lora_transform(jax.eval_shape(lambda: other),
                                    jlora.LoraSpec(rank=4, alpha=6, targets=["w"]),
                                    layouts={"stack/w": CASES["stack"][1]})
  t_other = _fill(t_other, 3)
  with pytest.raises(jlora.LoraTreeError, match=r"'dense/w': factors A\(16, 4\) and B\(4, 12\) "
                     r"do not fit W0\(16, 24\)"):
    merge(frozen, t_other)
  # The full params as trainable.
  with pytest.raises(jlora.LoraTreeError, match="is a leaf of both"):
    merge(frozen, params)


# -- merge agrees with the LoRA forward of a real model ------------------------------------


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    q = nn.DenseGeneral((2, 4), name="proj_in")(x)                            # (d, h, k)
    x = x + nn.DenseGeneral(8, axis=(-2, -1), name="proj_out")(jnp.tanh(q))  # (h, k, d)
    return x + nn.Dense(8, name="mlp")(jnp.tanh(x)), None


class _ScanModel(nn.Module):
  """Layers stacked by nn.scan (and rematerialised), as LinenLM, minus attention."""

  @nn.compact
  def __call__(self, x):
    block = nn.scan(nn.remat(_Block), variable_axes={"params": 0}, split_rngs={"params": True},
                    length=3)
    x, _ = block(name="layers")(x, None)
    return nn.Dense(5, name="head")(x)


def test_merged_model_equals_lora_forward_for_scan_stacked_model():
  model = _ScanModel()
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8)), jnp.float32)
  params = _fill(jax.eval_shape(model.init, KEY, x), 11, scale=0.3)
  layouts = jlora.infer_layouts(model.apply, params, x)
  assert layouts["params/layers/proj_in/kernel"] == jlora.Layout((1,), (2, 3), (0,))
  assert layouts["params/layers/proj_out/kernel"] == jlora.Layout((1, 2), (3,), (0,))
  spec = jlora.LoraSpec(rank=2, alpha=4, targets=["kernel"])
  _, t_abstract = jlora.lora_transform(jax.eval_shape(lambda: params), spec, layouts=layouts)
  trainable = _fill(t_abstract, 12, scale=0.3)
  frozen = jlora.frozen_like(params, trainable)
  merged = jlora.merge(frozen, trainable)
  apply = jax.jit(model.apply)
  y_merged = apply(merged, x)
  y_lora = jax.jit(jlora.lora(model.apply))(frozen, trainable, x)
  np.testing.assert_allclose(y_lora, y_merged, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(y_merged - apply(params, x)).max()) > 1e-2   # the update matters


# -- a quantized (NF4) base ------------------------------------------------------------------


def make_nf4(dtype=jnp.float32, names=("dense", "qkv", "stack", "torch")):
  """``make``, with every w quantized to NF4 (adapted) and an extra NF4 weight ``u``
  without an adapter."""
  params, _, trainable = make(dtype=dtype, names=names)
  params["u"] = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((64, 8)), dtype)}
  layouts = {f"{n}/w": CASES[n][1] for n in names}
  quantized = jlora.quantize(params, ["w"], layouts=layouts)
  trainable = dict(trainable, u={"w": None})
  return quantized, jlora.frozen_like(quantized, trainable), trainable


def test_merge_onto_nf4_gives_a_dense_base_from_dequantize_plus_delta_in_f32():
  quantized, frozen, trainable = make_nf4()
  merged = jlora.merge(frozen, trainable)
  assert not any(isinstance(x, jlora.NF4Array) for x in jax.tree_util.tree_leaves(
      merged, is_leaf=lambda x: isinstance(x, jlora.NF4Array)))
  for n in ("dense", "qkv", "stack", "torch"):
    q, lp = quantized[n]["w"], trainable[n]["w"]
    want = np.asarray(q.dequantize(jnp.float32)) + np.asarray(lp.delta(jnp.float32))
    assert merged[n]["w"].dtype == jnp.float32 and merged[n]["w"].shape == q.shape
    np.testing.assert_allclose(np.asarray(merged[n]["w"]), want, rtol=1e-6, atol=1e-6)
    assert merged[n]["bias"] is quantized[n]["bias"]
  np.testing.assert_array_equal(merged["u"]["w"], quantized["u"]["w"].dequantize())
  # In the dtype the user names: the merged and the dequantized weights; others keep theirs.
  bf16 = jlora.merge(frozen, trainable, dtype=jnp.bfloat16)
  assert bf16["dense"]["w"].dtype == bf16["u"]["w"].dtype == jnp.bfloat16
  assert bf16["dense"]["bias"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(bf16["dense"]["w"]),
                                np.asarray(merged["dense"]["w"].astype(jnp.bfloat16)))
  with pytest.raises(jlora.LoraError, match="dtype"):
    jlora.merge(frozen, trainable, dtype=jnp.int8)


def test_merge_onto_nf4_is_abstract_friendly_and_jits():
  quantized, frozen, trainable = make_nf4(dtype=jnp.bfloat16, names=("qkv",))
  out = jax.eval_shape(jlora.merge, frozen, trainable)
  assert (out["qkv"]["w"].shape, out["qkv"]["w"].dtype) == ((16, 2, 8), jnp.bfloat16)
  got = jax.jit(jlora.merge)(frozen, trainable)
  np.testing.assert_allclose(np.asarray(got["qkv"]["w"], np.float32),
                             np.asarray(jlora.merge(frozen, trainable)["qkv"]["w"], np.float32),
                             rtol=1e-2)


def test_requantize_is_explicit_and_reports_the_error_it_adds():
  quantized, frozen, trainable = make_nf4()
  dense = jlora.merge(frozen, trainable)
  merged, report = jlora.merge(frozen, trainable, requantize=True)
  assert set(report.per_path) == {"dense/w", "qkv/w", "stack/w", "torch/w"}
  changes = []
  for n in ("dense", "qkv", "stack", "torch"):
    q = merged[n]["w"]
    assert isinstance(q, jlora.NF4Array)
    assert (q.layout, q.block_size, q.double_quant) == (quantized[n]["w"].layout, 64, True)
    change = np.abs(np.asarray(q.dequantize(jnp.float32)) - np.asarray(dense[n]["w"]))
    mx, mean, size = report.per_path[f"{n}/w"]
    assert mx == pytest.approx(change.max(), rel=1e-6) and mean == pytest.approx(change.mean(),
                                                                                rel=1e-5)
    assert size == change.size and mx > 0
    changes.append(change.reshape(-1))
  allc = np.concatenate(changes)
  assert report.max_abs == pytest.approx(allc.max(), rel=1e-6)
  assert report.mean_abs == pytest.approx(allc.mean(), rel=1e-5)
  assert merged["u"]["w"] is frozen["u"]["w"]      # no adapter: kept as it is
  text = str(report)
  assert text.startswith("requantized 4 weights to NF4: max |change|") and "stack/w" in text


def test_requantize_under_jit_reports_the_same_change():
  # The report is a pytree: under jit it carries the changes out as arrays
  # (it used to come back empty, printing "requantized 0 weights").
  quantized, frozen, trainable = make_nf4()
  merged, report = jlora.merge(frozen, trainable, requantize=True)
  jmerged, jreport = jax.jit(functools.partial(jlora.merge, requantize=True))(frozen, trainable)
  assert set(jreport.per_path) == set(report.per_path) and len(report.per_path) == 4
  for path, (mx, mean, size) in report.per_path.items():
    jmx, jmean, jsize = jreport.per_path[path]
    assert float(jmx) == pytest.approx(mx, rel=1e-5) and float(jmean) == pytest.approx(mean,
                                                                                      rel=1e-5)
    assert jsize == size
  assert jreport.max_abs == pytest.approx(report.max_abs, rel=1e-5)
  assert str(jreport).startswith("requantized 4 weights to NF4")
  np.testing.assert_array_equal(np.asarray(jmerged["qkv"]["w"].codes),
                                np.asarray(merged["qkv"]["w"].codes))


def test_unmerge_refuses_a_quantized_base():
  _, frozen, trainable = make_nf4(names=("dense",))
  with pytest.raises(jlora.LoraError, match="'dense/w' is quantized"):
    jlora.unmerge(frozen, trainable)
