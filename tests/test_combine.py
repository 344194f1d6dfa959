"""combine: exact weighted sums ("cat", "linear") and the SVD truncation,
against dense references of sum_k w_k s_k B_k A_k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from reference import normal, perturb

STACKED = jlora.Layout((1,), (2,), (0,))
PARAMS = {"w": normal((3, 8, 6), 0.3), "v": normal((6, 5), 0.3)}
WEIGHTS = [0.7, -1.3, 0.4]


def _adapters():
  specs = [dict(rank=2, alpha=4, targets=["w", "v"]), dict(rank=3, alpha=3, targets=["w"]),
           dict(rank=1, alpha=8, targets=["v"], use_rslora=True)]
  out = []
  for i, kw in enumerate(specs):
    spec = jlora.LoraSpec(**kw, layouts={"w": STACKED})
    _, t = jlora.lora_transform(PARAMS, spec, key=jax.random.key(i))
    out.append(perturb(t, i + 1))
  return out


def _dense_sum(adapters, path):
  total = 0.0
  for w, t in zip(WEIGHTS, adapters):
    if t[path] is not None:
      total = total + w * t[path].delta()
  return total


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_exact_methods_equal_the_weighted_sum_of_deltas(method):
  adapters = _adapters()
  combined = jlora.combine(adapters, WEIGHTS, method=method)
  for path, rank in (("w", 5), ("v", 3)):          # the ranks add up
    lp = combined.trainable[path]
    assert lp.rank == rank and combined.errors[path] == 0.0
    np.testing.assert_allclose(lp.delta(), _dense_sum(adapters, path), rtol=1e-5, atol=1e-6)
  # And the combined adapter runs: the transform equals the merged weights.
  fn = lambda p, x: jnp.einsum("ebd,edf->ebf", x, p["w"]) @ p["v"]  # noqa: E731
  x = normal((3, 2, 8), seed=9)
  got = jlora.lora(fn)(PARAMS, combined.trainable, x)
  want = fn({"w": PARAMS["w"] + _dense_sum(adapters, "w"),
             "v": PARAMS["v"] + _dense_sum(adapters, "v")}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_summing_the_factors_is_not_the_weighted_sum():
  """What "linear" avoids: PEFT's linear sums the A's and the B's, so the
  product holds the cross terms B_j A_k as well."""
  lp1, lp2 = _adapters()[0]["w"], _adapters()[1]["w"]
  a2, b2 = lp2.a[..., :2], lp2.b[:, :2]                # equal ranks, as PEFT requires
  summed_a = lp1.a * lp1.scale ** 0.5 + a2 * lp2.scale ** 0.5
  summed_b = lp1.b * lp1.scale ** 0.5 + b2 * lp2.scale ** 0.5
  naive = jnp.einsum("sir,sro->sio", summed_a, summed_b)
  exact = lp1.delta() + lp2.scale * jnp.einsum("sir,sro->sio", a2, b2)
  assert float(jnp.abs(naive - exact).max()) > 1e-2


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_svd_truncates_to_the_rank_and_reports_its_error(rank):
  adapters = _adapters()
  combined = jlora.combine(adapters, WEIGHTS, method="svd", rank=rank)
  for path in ("w", "v"):
    lp, exact = combined.trainable[path], np.asarray(_dense_sum(adapters, path), np.float64)
    assert lp.rank == rank and lp.scale == 1.0
    error = np.linalg.norm(np.asarray(lp.delta(), np.float64) - exact) / np.linalg.norm(exact)
    assert combined.errors[path] == pytest.approx(error, rel=1e-4, abs=1e-6)
    # The best rank-r approximation: the error of each slice's SVD tail.
    s = np.linalg.svd(exact.reshape((-1,) + exact.shape[-2:]), compute_uv=False)
    tail = np.sqrt((s[:, rank:] ** 2).sum() / (s ** 2).sum())
    assert error == pytest.approx(tail, rel=1e-4, abs=1e-6)
  assert combined.errors["w"] < 1e-5 or rank < 5     # rank 5 holds the whole sum of w


def test_bad_inputs_are_named():
  adapters = _adapters()
  with pytest.raises(jlora.LoraSpecError, match="method must be one of"):
    jlora.combine(adapters, method="ties")
  with pytest.raises(jlora.LoraSpecError, match="needs rank"):
    jlora.combine(adapters, method="svd")
  with pytest.raises(jlora.LoraSpecError, match="2 weights for 3 adapters"):
    jlora.combine(adapters, [1.0, 2.0])
  with pytest.raises(jlora.LoraSpecError, match="'v': rank 6 exceeds"):
    jlora.combine(adapters, method="svd", rank=6)
  _, other = jlora.lora_transform({"w": PARAMS["w"]}, jlora.LoraSpec(
      rank=2, targets=["w"], layouts={"w": STACKED}), key=jax.random.key(0))
  with pytest.raises(jlora.LoraTreeError, match="not for the same parameters"):
    jlora.combine([adapters[0], other])


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_adapters_of_bases_of_another_width_are_refused_by_path(method):
  # A's shapes agree; only B's output width tells the bases apart.
  _, narrow = jlora.lora_transform({"v": normal((6, 5))}, jlora.LoraSpec(rank=2, targets=["v"]),
                                   key=jax.random.key(0))
  _, wide = jlora.lora_transform({"v": normal((6, 7))}, jlora.LoraSpec(rank=2, targets=["v"]),
                                 key=jax.random.key(1))
  rank = 2 if method == "svd" else None
  with pytest.raises(jlora.LoraTreeError, match=(
      r"^combine: 'v': adapters 'x' and 'y' were made for weights of different shapes "
      r"\(\(6, 5\) and \(6, 7\): A \(6, 2\), B \(2, 5\) and A \(6, 2\), B \(2, 7\)\)")):
    jlora.combine({"x": narrow, "y": wide}, method=method, rank=rank)
  with pytest.raises(jlora.LoraTreeError, match=r"^combine: 'v': adapters 0 and 1 were made"):
    jlora.combine([narrow, wide], method=method, rank=rank)


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "heavy", None])
def test_weights_that_are_not_finite_numbers_are_refused(method, bad):
  adapters = _adapters()
  rank = 2 if method == "svd" else None
  what = "must be finite" if isinstance(bad, float) else "must be a number"
  with pytest.raises(jlora.LoraSpecError, match=f"^combine: the weight of adapter 1 {what}"):
    jlora.combine(adapters, [0.5, bad, 1.0], method=method, rank=rank)
  named = dict(zip("abc", adapters))
  with pytest.raises(jlora.LoraSpecError, match=f"the weight of adapter 'c' {what}"):
    jlora.combine(named, [0.5, 1.0, np.float32(bad) if isinstance(bad, float) else bad],
                  method=method, rank=rank)
