"""LoraSpec and Layout: path selection, per-target overrides, scale, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


def _params():
  z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
  return {
      "layers": {
          "0": {"query": {"kernel": z(8, 8), "bias": z(8)},
                "value": {"kernel": z(8, 8), "bias": z(8)},
                "xquery": {"kernel": z(8, 8)},
                "mlp": {"kernel": z(8, 16)}},
          "1": {"query": {"kernel": z(8, 8), "bias": z(8)},
                "value": {"kernel": z(8, 8), "bias": z(8)},
                "xquery": {"kernel": z(8, 8)},
                "mlp": {"kernel": z(8, 16)}},
      },
      "head": {"kernel": z(16, 12)},
  }


def _adapted(spec, params=None):
  """Sorted paths that lora_transform gives LoRA factors to."""
  params = _params() if params is None else params
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  leaves = jax.tree_util.tree_leaves_with_path(
      trainable, is_leaf=lambda x: isinstance(x, jlora.LoraParam))
  return sorted(jlora.path_str(kp) for kp, leaf in leaves if isinstance(leaf, jlora.LoraParam))


def _lora_params(spec, params=None):
  params = _params() if params is None else params
  _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  leaves = jax.tree_util.tree_leaves_with_path(
      trainable, is_leaf=lambda x: isinstance(x, jlora.LoraParam))
  return {jlora.path_str(kp): leaf for kp, leaf in leaves if isinstance(leaf, jlora.LoraParam)}


# -- targets -----------------------------------------------------------------------


def test_regex_targets_match_the_whole_path():
  assert _adapted(jlora.LoraSpec(targets=r"layers/\d+/(query|value)/kernel")) == [
      "layers/0/query/kernel", "layers/0/value/kernel",
      "layers/1/query/kernel", "layers/1/value/kernel"]
  # fullmatch: 'query/kernel' is not a search, so a regex without the prefix matches nothing.
  with pytest.raises(jlora.LoraSpecError, match="match no parameter"):
    _adapted(jlora.LoraSpec(targets=r"query/kernel"))
  # '.*query' also takes 'xquery'; the regex is the user's to write.
  assert _adapted(jlora.LoraSpec(targets=r".*query/kernel")) == [
      "layers/0/query/kernel", "layers/0/xquery/kernel",
      "layers/1/query/kernel", "layers/1/xquery/kernel"]


def test_list_targets_are_slash_aligned_suffixes():
  assert _adapted(jlora.LoraSpec(targets=["query/kernel"])) == [
      "layers/0/query/kernel", "layers/1/query/kernel"]     # not xquery
  assert _adapted(jlora.LoraSpec(targets=["head/kernel", "1/mlp/kernel"])) == [
      "head/kernel", "layers/1/mlp/kernel"]
  # A full path is its own suffix.
  assert _adapted(jlora.LoraSpec(targets=["layers/0/value/kernel"])) == ["layers/0/value/kernel"]
  assert _adapted(jlora.LoraSpec(targets=("head/kernel",))) == ["head/kernel"]


def test_callable_targets_see_path_and_leaf():
  seen = []

  def pick(path, leaf):
    seen.append(path)
    return leaf.ndim == 2 and leaf.shape[1] == 16

  assert _adapted(jlora.LoraSpec(targets=pick)) == ["layers/0/mlp/kernel", "layers/1/mlp/kernel"]
  assert "layers/0/query/bias" in seen and "head/kernel" in seen


def test_exclude_in_every_form():
  base = r".*/(query|value)/kernel"
  assert _adapted(jlora.LoraSpec(targets=base, exclude=r"layers/0/.*")) == [
      "layers/1/query/kernel", "layers/1/value/kernel"]
  assert _adapted(jlora.LoraSpec(targets=base, exclude=["value/kernel"])) == [
      "layers/0/query/kernel", "layers/1/query/kernel"]
  got = _adapted(jlora.LoraSpec(targets=base, exclude=lambda p, leaf: p.startswith("layers/1")))
  assert got == ["layers/0/query/kernel", "layers/0/value/kernel"]
  assert not jlora.LoraSpec(targets=base, exclude=["query/kernel"]).is_target(
      "layers/0/query/kernel", None)
  assert jlora.LoraSpec(targets=base, exclude=["query/kernel"]).is_target(
      "layers/0/value/kernel", None)


# -- rank / alpha patterns and scale --------------------------------------------


def test_rank_and_alpha_pattern_override_per_target():
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*(query|value|mlp)/kernel",
                        rank_pattern={r"value/kernel": 2, r"layers/1/mlp/kernel": 6},
                        alpha_pattern={r"mlp/kernel": 3.0})
  lps = _lora_params(spec)
  rank = {p: lp.a.shape[-1] for p, lp in lps.items()}
  assert rank["layers/0/query/kernel"] == 4
  assert rank["layers/0/value/kernel"] == rank["layers/1/value/kernel"] == 2
  assert rank["layers/0/mlp/kernel"] == 4 and rank["layers/1/mlp/kernel"] == 6
  assert all(lp.b.shape[0] == rank[p] for p, lp in lps.items())
  assert lps["layers/0/query/kernel"].scale == pytest.approx(8 / 4)
  assert lps["layers/0/value/kernel"].scale == pytest.approx(8 / 2)   # alpha 8, r 2
  assert lps["layers/0/mlp/kernel"].scale == pytest.approx(3 / 4)     # alpha 3, r 4
  assert lps["layers/1/mlp/kernel"].scale == pytest.approx(3 / 6)     # both overridden


def test_pattern_first_match_wins():
  spec = jlora.LoraSpec(rank=4, rank_pattern={r"layers/0/.*": 2, r".*kernel": 3},
                        alpha_pattern={r".*kernel": 5.0, r"layers/0/.*": 7.0})
  assert spec.rank_for("layers/0/query/kernel") == 2
  assert spec.rank_for("layers/1/query/kernel") == 3
  assert spec.rank_for("layers/1/query/bias") == 4
  assert spec.alpha_for("layers/0/query/kernel") == 5.0
  assert spec.alpha_for("layers/0/query/bias") == 7.0
  assert spec.alpha_for("head/bias") == 16.0
  # Keys are regexes anchored at a '/' boundary: 'query/kernel' does not take 'xquery/kernel'.
  spec = jlora.LoraSpec(rank=4, rank_pattern={"query/kernel": 1})
  assert spec.rank_for("layers/0/query/kernel") == 1
  assert spec.rank_for("layers/0/xquery/kernel") == 4


@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 8.0), (16, 16.0), (64, 32.0)])
def test_scale_plain_and_rslora(rank, alpha):
  assert jlora.LoraSpec(rank=rank, alpha=alpha).scale_for("w") == pytest.approx(alpha / rank)
  assert jlora.LoraSpec(rank=rank, alpha=alpha, use_rslora=True).scale_for("w") == pytest.approx(
      alpha / math.sqrt(rank))


def test_rslora_scale_reaches_the_lora_param_with_rank_pattern():
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*(query|mlp)/kernel", use_rslora=True,
                        rank_pattern={"mlp/kernel": 8})
  lps = _lora_params(spec)
  assert lps["layers/0/query/kernel"].scale == pytest.approx(8 / 2)            # 8/sqrt(4)
  assert lps["layers/0/mlp/kernel"].scale == pytest.approx(8 / math.sqrt(8))


# -- validation --------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 2.0, 8.5, "8", True, None])
def test_bad_rank(rank):
  with pytest.raises(jlora.LoraSpecError, match="rank must be an integer >= 1"):
    jlora.LoraSpec(rank=rank)


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0, float("nan"), float("inf"), "16", True])
def test_bad_alpha(alpha):
  with pytest.raises(jlora.LoraSpecError, match="alpha must be a finite number > 0"):
    jlora.LoraSpec(alpha=alpha)


def test_bad_pattern_values_name_the_key():
  with pytest.raises(jlora.LoraSpecError, match=r"rank_pattern\['.*value.*'\]"):
    jlora.LoraSpec(rank_pattern={".*value": 0})
  with pytest.raises(jlora.LoraSpecError, match=r"rank_pattern\['.*value.*'\]"):
    jlora.LoraSpec(rank_pattern={".*value": 2.5})
  with pytest.raises(jlora.LoraSpecError, match=r"alpha_pattern\['.*value.*'\]"):
    jlora.LoraSpec(alpha_pattern={".*value": -2.0})
  with pytest.raises(jlora.LoraSpecError, match=r"layouts\['w'\]"):
    jlora.LoraSpec(layouts={"w": ((0,), (1,))})


@pytest.mark.parametrize("init", ["kaiming", "Gaussian", "", "pissa_niter_", "loftq_iter_0", "LoftQ"])
def test_bad_init(init):
  with pytest.raises(jlora.LoraSpecError, match="init must be one of"):
    jlora.LoraSpec(init=init)


def test_good_inits_and_dropout():
  for init in ("default", "gaussian"):
    assert jlora.LoraSpec(init=init).init == init
  for rate in (0.0, 0.1, 0.999):
    assert jlora.LoraSpec(dropout=rate).dropout == rate
  # The rate travels with each adapter, as static metadata.
  lps = _lora_params(jlora.LoraSpec(targets=["query/kernel"], dropout=0.25))
  assert [lp.dropout for lp in lps.values()] == [0.25, 0.25]


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.1", True, None])
def test_bad_dropout(rate):
  with pytest.raises(jlora.LoraSpecError, match=r"dropout must be a number in \[0, 1\)"):
    jlora.LoraSpec(dropout=rate)


def test_numpy_scalars_are_numbers():
  spec = jlora.LoraSpec(rank=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.1),
                        rank_pattern={"value/kernel": np.int32(2)},
                        alpha_pattern={"value/kernel": np.float16(3.0)})
  assert (spec.rank, spec.alpha, spec.dropout) == (4, 8.0, pytest.approx(0.1))
  assert type(spec.rank) is int and type(spec.alpha) is float and type(spec.dropout) is float
  assert spec.rank_for("layers/0/value/kernel") == 2
  assert spec.scale_for("layers/0/value/kernel") == 1.5
  assert spec == jlora.LoraSpec(rank=4, alpha=8.0, dropout=float(np.float64(0.1)),
                                rank_pattern={"value/kernel": 2},
                                alpha_pattern={"value/kernel": 3.0})


def test_a_generator_selector_is_kept_not_used_up():
  spec = jlora.LoraSpec(targets=(n for n in ["query/kernel", "value/kernel"]),
                        exclude=(n for n in ["layers/1/value/kernel"]))
  assert spec.targets == ("query/kernel", "value/kernel")
  expected = ["layers/0/query/kernel", "layers/0/value/kernel", "layers/1/query/kernel"]
  assert _adapted(spec) == expected
  assert _adapted(spec) == expected          # and again


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_key_that_matches_no_target_is_an_error(field):
  value = {"rank_pattern": 2, "alpha_pattern": 4.0}[field]
  spec = jlora.LoraSpec(targets=["query/kernel"], **{field: {"valeu/kernel": value}})
  with pytest.raises(jlora.LoraSpecError,
                     match=rf"{field}\['valeu/kernel'\] matches no adapted parameter.*"
                           r"layers/0/query/kernel"):
    _adapted(spec)


def test_bad_dtype():
  with pytest.raises(jlora.LoraSpecError, match="floating dtype"):
    jlora.LoraSpec(dtype=jnp.int32)


@pytest.mark.parametrize("field", ["targets", "exclude", "extra_trainable"])
def test_invalid_regex_fails_at_construction(field):
  with pytest.raises(jlora.LoraSpecError, match=f"{field}: invalid regex"):
    jlora.LoraSpec(**{field: r".*(query"})


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "layouts"])
def test_invalid_pattern_regex_fails_at_construction(field):
  value = {"rank_pattern": 2, "alpha_pattern": 2.0,
           "layouts": jlora.Layout((0,), (1,))}[field]
  with pytest.raises(jlora.LoraSpecError, match=rf"{field}.*invalid regex"):
    jlora.LoraSpec(**{field: {r"query[": value}})


def test_bad_selector_type():
  with pytest.raises(jlora.LoraSpecError, match="targets: expected a regex"):
    jlora.LoraSpec(targets=["query", 3])


# -- Layout --------------------------------------------------------------------------


def test_layout_shapes_and_fans():
  lay = jlora.Layout(in_axes=(2, 1), out_axes=(3,), stack_axes=(0,))
  shape = (5, 4, 3, 7)
  assert lay.ndim == 4
  assert lay.fan_in(shape) == 12 and lay.fan_out(shape) == 7
  assert lay.a_shape(shape, 2) == (5, 3, 4, 2)      # stack, in axes in A's order, r
  assert lay.b_shape(shape, 2) == (5, 2, 7)
  assert jlora.Layout.default(2) == jlora.Layout((0,), (1,))
  assert jlora.Layout.default(3) is None
  assert jlora.Layout([0], [1]).in_axes == (0,)      # normalised to tuples


def test_layout_validation():
  with pytest.raises(jlora.LoraSpecError, match="at least one input and one output axis"):
    jlora.Layout(in_axes=(), out_axes=(0,))
  with pytest.raises(jlora.LoraSpecError, match="at least one input and one output axis"):
    jlora.Layout(in_axes=(0,), out_axes=())
  lay = jlora.Layout((0,), (1,))
  lay.check((3, 4), "w")
  with pytest.raises(jlora.LoraSpecError, match="'w'.*does not partition the 3 axes"):
    lay.check((3, 4, 5), "w")
  with pytest.raises(jlora.LoraSpecError, match="'w'"):
    jlora.Layout((0,), (0,)).check((3, 4), "w")
