"""lora_transform: splitting params into frozen and trainable, factor shapes,
initialisation, dtypes, keys, extra trainable leaves, and the errors of bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

import jlora
from models import LinenLM, LinenMLP, LMConfig, NNXLM, batched_einsum

IS_LP = lambda x: isinstance(x, jlora.LoraParam)  # noqa: E731
KEY = jax.random.key(0)


def lora_leaves(tree):
  """{path: LoraParam} of a trainable tree."""
  pairs = jax.tree_util.tree_leaves_with_path(tree, is_leaf=IS_LP)
  return {jlora.path_str(kp): x for kp, x in pairs if IS_LP(x)}


def path_leaves(tree):
  """{path: leaf} keeping None leaves and LoraParams whole."""
  pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or IS_LP(x))[0]
  return {jlora.path_str(kp): x for kp, x in pairs}


def random_like(abstract, seed=0):
  """Concrete params for an abstract tree, N(0, 0.5^2) from NumPy: no XLA compile."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray((0.5 * rng.standard_normal(x.shape)).astype(x.dtype)), abstract)


@functools.lru_cache(maxsize=None)
def mlp(features=16):
  model = LinenMLP(hidden=32, out=8)
  x = jax.random.normal(jax.random.key(1), (4, features))
  return model, random_like(jax.eval_shape(model.init, KEY, x), 2), x


@functools.lru_cache(maxsize=None)
def linen_lm():
  cfg = LMConfig()
  model = LinenLM(cfg)
  toks = jax.random.randint(jax.random.key(3), (2, cfg.seq), 0, cfg.vocab)
  params = random_like(jax.eval_shape(model.init, KEY, toks), 4)
  return model, params, toks, jlora.infer_layouts(model.apply, params, toks)


@functools.lru_cache(maxsize=None)
def linen_lm_fns():
  """Jitted base and LoRA forwards, made once so that tests share their compilations."""
  model = linen_lm()[0]
  return jax.jit(model.apply), jax.jit(jlora.lora(model.apply))


@functools.lru_cache(maxsize=None)
def nnx_lm():
  cfg = LMConfig(layers=1)
  build = lambda: NNXLM(cfg, nnx.Rngs(0))  # noqa: E731
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  state = random_like(abstract, 5)
  toks = jnp.arange(16).reshape(2, 8) % cfg.vocab
  return graphdef, state, toks


# -- the containers -----------------------------------------------------------------


def test_dict_split():
  model, params, x = mlp()
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=r".*/(fc1|head)/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=KEY)
  assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(params)
  f, t = path_leaves(frozen), path_leaves(trainable)
  assert set(f) == set(t) == set(path_leaves(params))
  for path, w in path_leaves(params).items():
    assert f[path] is w                        # frozen keeps every base leaf, W0 included
    if path in ("params/fc1/kernel", "params/head/kernel"):
      assert IS_LP(t[path])
      assert t[path].scale == 2.0 and t[path].layout == jlora.Layout((0,), (1,))
    else:
      assert t[path] is None
  assert t["params/fc1/kernel"].a.shape == (16, 4) and t["params/fc1/kernel"].b.shape == (4, 32)
  assert t["params/head/kernel"].a.shape == (32, 4) and t["params/head/kernel"].b.shape == (4, 8)


def test_frozendict_split_keeps_the_type():
  _, params, _ = mlp()
  params = FrozenDict(params)
  spec = jlora.LoraSpec(rank=4, targets=["kernel"])
  frozen, trainable = jlora.lora_transform(params, spec, key=KEY)
  assert isinstance(frozen, FrozenDict) and isinstance(trainable, FrozenDict)
  assert isinstance(trainable["params"], FrozenDict)
  assert sorted(lora_leaves(trainable)) == [
      "params/fc1/kernel", "params/fc2/kernel", "params/head/kernel"]
  assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(params)


def test_nnx_state_split_and_round_trip():
  graphdef, state, toks = nnx_lm()
  fn = lambda s, t: nnx.merge(graphdef, s)(t)  # noqa: E731
  layouts = jlora.infer_layouts(fn, state, toks)
  spec = jlora.LoraSpec(rank=2, targets=r".*/(query|value|out|up)/kernel")
  frozen, trainable = jlora.lora_transform(state, spec, key=KEY, layouts=layouts)
  assert type(frozen) is type(state) and type(trainable) is type(state)
  lps = lora_leaves(trainable)
  assert sorted(lps) == ["blocks/0/out/kernel", "blocks/0/query/kernel",
                         "blocks/0/up/kernel", "blocks/0/value/kernel"]
  assert lps["blocks/0/query/kernel"].a.shape == (32, 2)          # LinearGeneral (d, h, k)
  assert lps["blocks/0/query/kernel"].b.shape == (2, 4, 8)
  assert lps["blocks/0/value/kernel"].b.shape == (2, 4, 8)        # Einsum "dhk"
  assert lps["blocks/0/out/kernel"].a.shape == (4, 8, 2)          # (h, k, d)
  assert lps["blocks/0/out/kernel"].b.shape == (2, 32)
  # The merged State drops back into the graph, and the model starts at the base.
  merged = jlora.merge(frozen, trainable)
  assert type(merged) is type(state)
  base = jax.jit(fn)(state, toks)
  np.testing.assert_allclose(jax.jit(fn)(merged, toks), base, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jlora.lora(fn))(frozen, trainable, toks), base,
                             rtol=1e-6, atol=1e-6)


def test_abstract_params_give_abstract_factors():
  model, _, toks, _ = linen_lm()
  abstract = jax.eval_shape(model.init, KEY, toks)
  layouts = jlora.infer_layouts(model.apply, abstract, toks)
  spec = jlora.LoraSpec(rank=4, targets=r".*/(query|out|up|lm_head)/kernel")
  frozen, trainable = jlora.lora_transform(abstract, spec, layouts=layouts)   # no key needed
  lps = lora_leaves(trainable)
  for lp in lps.values():
    assert isinstance(lp.a, jax.ShapeDtypeStruct) and isinstance(lp.b, jax.ShapeDtypeStruct)
    assert lp.a.dtype == lp.b.dtype == jnp.float32
  assert lps["params/layers/query/kernel"].a.shape == (2, 32, 4)
  assert lps["params/layers/query/kernel"].b.shape == (2, 4, 4, 8)
  assert lps["params/layers/out/kernel"].a.shape == (2, 4, 8, 4)
  assert lps["params/layers/out/kernel"].b.shape == (2, 4, 32)
  assert lps["params/lm_head/kernel"].a.shape == (32, 4)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(frozen))
  # Same shapes as a concrete transform.
  _, params, _, _ = linen_lm()
  _, concrete = jlora.lora_transform(params, spec, key=KEY, layouts=layouts)
  assert jax.tree_util.tree_map(jnp.shape, concrete) == jax.tree_util.tree_map(jnp.shape, trainable)


def test_transform_is_pure():
  _, params, _ = mlp()
  snapshot = jax.tree_util.tree_map(np.array, params)
  structure = jax.tree_util.tree_structure(params)
  ids = [id(x) for x in jax.tree_util.tree_leaves(params)]
  spec = jlora.LoraSpec(rank=4, targets=["kernel"], extra_trainable=r".*bias")
  frozen, trainable = jlora.lora_transform(params, spec, key=KEY)
  assert jax.tree_util.tree_structure(params) == structure
  assert [id(x) for x in jax.tree_util.tree_leaves(params)] == ids
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, snapshot)
  assert frozen is not params and frozen["params"] is not params["params"]
  # Calling twice gives the same result.
  frozen2, trainable2 = jlora.lora_transform(params, spec, key=KEY)
  jax.tree_util.tree_map(np.testing.assert_array_equal, trainable, trainable2)


# -- factor shapes and layouts -----------------------------------------------------


def test_factor_shapes_for_scan_stacked_dense_general():
  _, params, _, layouts = linen_lm()
  spec = jlora.LoraSpec(rank=4, targets=["kernel"], exclude=["key/kernel"])
  _, trainable = jlora.lora_transform(params, spec, key=KEY, layouts=layouts)
  shapes = {p: (lp.a.shape, lp.b.shape, lp.layout) for p, lp in lora_leaves(trainable).items()}
  assert shapes == {
      "params/layers/query/kernel": ((2, 32, 4), (2, 4, 4, 8), jlora.Layout((1,), (2, 3), (0,))),
      "params/layers/value/kernel": ((2, 32, 4), (2, 4, 4, 8), jlora.Layout((1,), (2, 3), (0,))),
      "params/layers/out/kernel": ((2, 4, 8, 4), (2, 4, 32), jlora.Layout((1, 2), (3,), (0,))),
      "params/layers/up/kernel": ((2, 32, 4), (2, 4, 64), jlora.Layout((1,), (2,), (0,))),
      "params/layers/down/kernel": ((2, 64, 4), (2, 4, 32), jlora.Layout((1,), (2,), (0,))),
      "params/lm_head/kernel": ((32, 4), (4, 64), jlora.Layout((0,), (1,))),
  }


def test_factor_shapes_for_dense_general_without_stack():
  params = {"q": jnp.zeros((16, 2, 8)), "o": jnp.zeros((2, 8, 16))}
  layouts = {"q": jlora.Layout((0,), (1, 2)), "o": jlora.Layout((0, 1), (2,))}
  _, t = jlora.lora_transform(params, jlora.LoraSpec(rank=4, targets=["q", "o"]), key=KEY,
                              layouts=layouts)
  assert (t["q"].a.shape, t["q"].b.shape) == ((16, 4), (4, 2, 8))
  assert (t["o"].a.shape, t["o"].b.shape) == ((2, 8, 4), (4, 16))


def test_layout_override_in_spec():
  # An (out, in) kernel as Hugging Face / PyTorch store it: x @ W.T.
  params = {"proj": {"weight": jnp.zeros((24, 16))}, "experts": jnp.zeros((3, 16, 8))}
  spec = jlora.LoraSpec(rank=4, targets=["weight", "experts"],
                        layouts={r"proj/weight": jlora.Layout((1,), (0,)),
                                 r"experts": jlora.Layout((1,), (2,), (0,))})
  _, t = jlora.lora_transform(params, spec, key=KEY)
  assert (t["proj"]["weight"].a.shape, t["proj"]["weight"].b.shape) == ((16, 4), (4, 24))
  assert (t["experts"].a.shape, t["experts"].b.shape) == ((3, 16, 4), (3, 4, 8))
  # The spec override wins over layouts passed to lora_transform.
  _, t2 = jlora.lora_transform(params, spec, key=KEY,
                               layouts={"proj/weight": jlora.Layout((0,), (1,))})
  assert t2["proj"]["weight"].layout == jlora.Layout((1,), (0,))
  # An override that does not fit the weight names the path.
  bad = jlora.LoraSpec(rank=2, targets=["experts"], layouts={"experts": jlora.Layout((0,), (1,))})
  with pytest.raises(jlora.LoraSpecError, match="'experts'.*does not partition the 3 axes"):
    jlora.lora_transform(params, bad, key=KEY)


def test_inferred_layouts_for_batched_einsum():
  params = {"experts": jnp.ones((3, 8, 6)), "proj": jnp.ones((6, 5))}
  x = jnp.ones((3, 2, 8))
  layouts = jlora.infer_layouts(batched_einsum, params, x)
  _, t = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["experts", "proj"]),
                              key=KEY, layouts=layouts)
  assert (t["experts"].a.shape, t["experts"].b.shape) == ((3, 8, 2), (3, 2, 6))
  assert (t["proj"].a.shape, t["proj"].b.shape) == ((6, 2), (2, 5))


# -- initialisation --------------------------------------------------------------------


@pytest.mark.parametrize("shape,layout,fan_in", [
    ((1024, 96), jlora.Layout((0,), (1,)), 1024),
    ((8, 128, 96), jlora.Layout((0, 1), (2,)), 1024),           # (heads, head_dim, d)
    ((3, 512, 96), jlora.Layout((1,), (2,), (0,)), 512),          # scan-stacked
])
def test_default_init_is_kaiming_uniform(shape, layout, fan_in):
  rank = 64
  spec = jlora.LoraSpec(rank=rank, targets=["w"], layouts={"w": layout})
  _, t = jlora.lora_transform({"w": jnp.zeros(shape)}, spec, key=KEY)
  a = np.asarray(t["w"].a, np.float64)
  bound = 1 / math.sqrt(fan_in)
  assert a.size >= 65536
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.99 * bound             # the bound is fan_in's, not smaller
  assert abs(a.mean()) < 0.02 * bound
  np.testing.assert_allclose(a.var(), bound ** 2 / 3, rtol=0.03)
  np.testing.assert_array_equal(np.asarray(t["w"].b), 0)
  if layout.stack_axes:                              # every slice has its own draw
    assert not np.allclose(a[0], a[1])


def test_gaussian_init():
  rank = 16
  spec = jlora.LoraSpec(rank=rank, targets=["w"], init="gaussian")
  _, t = jlora.lora_transform({"w": jnp.zeros((4096, 64))}, spec, key=KEY)
  a = np.asarray(t["w"].a, np.float64)
  np.testing.assert_allclose(a.std(), 1 / rank, rtol=0.03)
  assert abs(a.mean()) < 0.02 / rank
  # Gaussian, not uniform: the tails reach past sqrt(3) sigma.
  assert np.abs(a).max() > 3 / rank
  np.testing.assert_array_equal(np.asarray(t["w"].b), 0)


def test_adapted_model_starts_equal_to_base():
  model, params, toks, layouts = linen_lm()
  spec = jlora.LoraSpec(rank=4, alpha=32, targets=["kernel"])
  frozen, trainable = jlora.lora_transform(params, spec, key=KEY, layouts=layouts)
  for lp in lora_leaves(trainable).values():
    np.testing.assert_array_equal(np.asarray(lp.b), 0)
    assert float(jnp.abs(lp.a).max()) > 0
  base_apply, lora_apply = linen_lm_fns()
  np.testing.assert_allclose(lora_apply(frozen, trainable, toks), base_apply(params, toks),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_adapted_mlp_starts_equal_to_base(use_jit, init):
  model, params, x = mlp()
  spec = jlora.LoraSpec(rank=4, alpha=32, targets=["kernel"], init=init)
  frozen, trainable = jlora.lora_transform(params, spec, key=KEY)
  for lp in lora_leaves(trainable).values():
    np.testing.assert_array_equal(np.asarray(lp.b), 0)
  apply = jax.jit(jlora.lora(model.apply)) if use_jit else jlora.lora(model.apply)
  np.testing.assert_allclose(apply(frozen, trainable, x), model.apply(params, x),
                             rtol=1e-6, atol=1e-6)


# -- dtypes ---------------------------------------------------------------------------


def test_factor_dtype_defaults_to_float32_for_a_bf16_base():
  _, params, _ = mlp()
  params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  frozen, t = jlora.lora_transform(params16, jlora.LoraSpec(rank=4, targets=["kernel"]), key=KEY)
  for lp in lora_leaves(t).values():
    assert lp.a.dtype == lp.b.dtype == jnp.float32
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(frozen))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_spec_dtype_is_honoured(dtype):
  _, params, _ = mlp()
  for init in ("default", "gaussian"):
    spec = jlora.LoraSpec(rank=4, targets=["kernel"], dtype=dtype, init=init)
    _, t = jlora.lora_transform(params, spec, key=KEY)
    for lp in lora_leaves(t).values():
      assert lp.a.dtype == lp.b.dtype == jnp.dtype(dtype)
    abstract = jax.eval_shape(lambda: params)
    _, ta = jlora.lora_transform(abstract, spec)
    for lp in lora_leaves(ta).values():
      assert lp.a.dtype == lp.b.dtype == jnp.dtype(dtype)


# -- keys -----------------------------------------------------------------------------


def test_keys_are_deterministic_and_per_path():
  _, params, _ = mlp()
  one = jlora.LoraSpec(rank=4, targets=["fc2/kernel"])
  two = jlora.LoraSpec(rank=4, targets=["fc1/kernel", "fc2/kernel", "head/kernel"])
  _, t1 = jlora.lora_transform(params, one, key=jax.random.key(7))
  _, t1b = jlora.lora_transform(params, one, key=jax.random.key(7))
  _, t2 = jlora.lora_transform(params, two, key=jax.random.key(7))
  _, t3 = jlora.lora_transform(params, one, key=jax.random.key(8))
  a = lambda t, name: np.asarray(t["params"][name]["kernel"].a)  # noqa: E731
  np.testing.assert_array_equal(a(t1, "fc2"), a(t1b, "fc2"))
  np.testing.assert_array_equal(a(t1, "fc2"), a(t2, "fc2"))     # another target changes nothing
  assert not np.allclose(a(t1, "fc2"), a(t3, "fc2"))              # the key matters
  # Two weights of the same shape do not share a draw.
  params2 = {"x": {"w": jnp.zeros((16, 16))}, "y": {"w": jnp.zeros((16, 16))}}
  _, t = jlora.lora_transform(params2, jlora.LoraSpec(rank=4, targets=["w"]), key=KEY)
  assert not np.allclose(t["x"]["w"].a, t["y"]["w"].a)


# -- extra trainable leaves --------------------------------------------------------


def test_extra_trainable_leaves_move_to_trainable():
  _, params, _ = mlp()
  spec = jlora.LoraSpec(rank=4, targets=["fc1/kernel"], extra_trainable=r".*/(bias)|.*head/kernel")
  frozen, trainable = jlora.lora_transform(params, spec, key=KEY)
  f, t, p = path_leaves(frozen), path_leaves(trainable), path_leaves(params)
  extras = ["params/fc1/bias", "params/fc2/bias", "params/head/bias", "params/head/kernel"]
  for path in extras:
    assert f[path] is None and t[path] is p[path]
  assert f["params/fc2/kernel"] is p["params/fc2/kernel"] and t["params/fc2/kernel"] is None
  assert f["params/fc1/kernel"] is p["params/fc1/kernel"] and IS_LP(t["params/fc1/kernel"])


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_extra_trainable_leaves_are_trained_in_full(use_jit):
  model, params, x = mlp()
  y = jax.random.normal(jax.random.key(5), (4, 8))
  spec = jlora.LoraSpec(rank=4, targets=["kernel"], extra_trainable=["bias"])
  frozen, trainable = jlora.lora_transform(params, spec, key=KEY)
  apply = jlora.lora(model.apply)

  def lora_loss(t):
    return jnp.mean((apply(frozen, t, x) - y) ** 2)

  def base_loss(p):
    return jnp.mean((model.apply(p, x) - y) ** 2)

  grad = jax.jit(jax.grad(lora_loss)) if use_jit else jax.grad(lora_loss)
  g = grad(trainable)
  ref = jax.jit(jax.grad(base_loss))(params)   # B = 0: the bias gradients are the base model's
  for name in ("fc1", "fc2", "head"):
    gb = g["params"][name]["bias"]
    assert gb.shape == params["params"][name]["bias"].shape
    assert float(jnp.abs(gb).max()) > 0
    np.testing.assert_allclose(gb, ref["params"][name]["bias"], rtol=1e-5, atol=1e-6)
  # The adapters' B gets a gradient too (A's is zero while B = 0).
  assert float(jnp.abs(g["params"]["fc1"]["kernel"].b).max()) > 0


# -- errors of bad input --------------------------------------------------------------


def test_targets_matching_nothing_lists_nearest_paths():
  _, params, _, _ = linen_lm()
  with pytest.raises(jlora.LoraSpecError, match="match no parameter") as e:
    jlora.lora_transform(params, jlora.LoraSpec(targets=r".*/qurey/kernel"), key=KEY)
  assert "params/layers/query/kernel" in str(e.value)
  with pytest.raises(jlora.LoraSpecError, match="match no parameter") as e:
    jlora.lora_transform(params, jlora.LoraSpec(targets=["lm_haed/kernel"]), key=KEY)
  assert "params/lm_head/kernel" in str(e.value)
  # Everything excluded is also "nothing".
  with pytest.raises(jlora.LoraSpecError, match="match no parameter"):
    jlora.lora_transform(params, jlora.LoraSpec(targets=["lm_head/kernel"], exclude=r".*"),
                         key=KEY)


def test_rank_larger_than_the_weight():
  _, params, _ = mlp()
  spec = jlora.LoraSpec(rank=9, targets=["kernel"])          # head is (32, 8)
  for tree, key in ((params, KEY), (jax.eval_shape(lambda: params), None)):
    with pytest.raises(jlora.LoraSpecError, match=r"'params/head/kernel': rank 9 exceeds "
                       r"min\(fan_in=32, fan_out=8\)"):
      jlora.lora_transform(tree, jlora.LoraSpec(rank=9, targets=["head/kernel"]), key=key)
    with pytest.raises(jlora.LoraSpecError, match=r"'params/head/kernel': rank 9"):
      jlora.lora_transform(jax.eval_shape(lambda: params), spec)
  # rank == min is fine.
  jlora.lora_transform(jax.eval_shape(lambda: params), jlora.LoraSpec(rank=8, targets=["kernel"]))
  # For a stacked weight the stack axis is not part of fan_in.
  _, lm, _, layouts = linen_lm()
  with pytest.raises(jlora.LoraSpecError, match="'params/layers/up/kernel': rank 33"):
    jlora.lora_transform(lm, jlora.LoraSpec(rank=33, targets=["up/kernel"]), key=KEY,
                         layouts=layouts)
  # Also caught by rank_pattern and on abstract params.
  spec = jlora.LoraSpec(rank=2, targets=["kernel"], rank_pattern={"head/kernel": 16})
  with pytest.raises(jlora.LoraSpecError, match="'params/head/kernel': rank 16"):
    jlora.lora_transform(jax.eval_shape(lambda: params), spec)


def test_non_float_target():
  params = {"emb": {"kernel": jnp.zeros((8, 8))}, "ids": {"kernel": jnp.zeros((8, 8), jnp.int32)}}
  with pytest.raises(jlora.LoraSpecError, match="'ids/kernel' matches targets but is not a "
                     "floating-point array.*int32"):
    jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["kernel"]), key=KEY)
  with pytest.raises(jlora.LoraSpecError, match="'step'.*not a floating-point array"):
    jlora.lora_transform({"step": 3, "w": jnp.zeros((4, 4))},
                         jlora.LoraSpec(rank=2, targets=r".*"), key=KEY)


def test_high_rank_weight_without_layout_suggests_infer_layouts():
  _, params, _, _ = linen_lm()
  with pytest.raises(jlora.LoraLayoutError,
                     match=r"'params/layers/query/kernel'.*4-D weight.*infer_layouts") as e:
    jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["query/kernel"]), key=KEY)
  assert "(2, 32, 4, 8)" in str(e.value)
  # 1-D weights (a norm scale) have no layout either.
  with pytest.raises(jlora.LoraLayoutError, match="'s'.*1-D weight"):
    jlora.lora_transform({"s": jnp.ones(8)}, jlora.LoraSpec(rank=1, targets=["s"]), key=KEY)


def test_path_in_both_targets_and_extra_trainable():
  _, params, _ = mlp()
  spec = jlora.LoraSpec(rank=2, targets=["kernel"], extra_trainable=r".*head/.*")
  with pytest.raises(jlora.LoraSpecError,
                     match="'params/head/kernel' matches both targets and extra_trainable"):
    jlora.lora_transform(params, spec, key=KEY)


def test_concrete_params_need_a_key():
  _, params, _ = mlp()
  with pytest.raises(jlora.LoraSpecError,
                     match=r"needs key=jax.random.key.*A of 'params/fc1/kernel'"):
    jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["kernel"]))


# -- frozen/trainable mismatches reach the user as LoraTreeError ---------------------


def _mlp_pair(spec, hidden=32, key=KEY):
  model = LinenMLP(hidden=hidden, out=8)
  params = random_like(jax.eval_shape(model.init, KEY, jnp.zeros((1, 16))), 2)
  return model, params, *jlora.lora_transform(params, spec, key=key)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_lora_rejects_mismatched_trees(use_jit):
  spec = jlora.LoraSpec(rank=4, targets=["kernel"])
  model, params, frozen, trainable = _mlp_pair(spec)
  x = jnp.ones((2, 16))
  apply = jlora.lora(model.apply)
  if use_jit:
    apply = jax.jit(apply)
  # Wrong factor shapes: a model of another width with the same names.
  _, _, _, other = _mlp_pair(spec, hidden=24)
  with pytest.raises(jlora.LoraTreeError, match=r"'params/fc1/kernel': factors A\(16, 4\) and "
                     r"B\(4, 24\) do not fit W0\(16, 32\); expected A\(16, 4\) and B\(4, 32\)"):
    apply(frozen, other, x)
  # A different structure.
  small = jlora.lora_transform({"params": {"fc1": params["params"]["fc1"]}}, spec, key=KEY)[1]
  with pytest.raises(jlora.LoraTreeError, match="different structures.*only in frozen: "
                     r"\['params/fc2/bias'"):
    apply(frozen, small, x)
  # Trainable from a transform with extra_trainable, frozen from one without.
  spec_x = jlora.LoraSpec(rank=4, targets=["kernel"], extra_trainable=["bias"])
  _, _, _, t_extra = _mlp_pair(spec_x)
  with pytest.raises(jlora.LoraTreeError, match="'params/fc1/bias' is a leaf of both"):
    apply(frozen, t_extra, x)
  # The full params in place of trainable.
  with pytest.raises(jlora.LoraTreeError, match="'params/fc1/bias' is a leaf of both"):
    apply(frozen, params, x)
  # Arguments swapped.
  with pytest.raises(jlora.LoraTreeError, match="different structures"):
    apply(trainable, frozen, x)
  # Factors where frozen has no W0.
  f_extra, _ = jlora.lora_transform(params, jlora.LoraSpec(rank=4, targets=["fc2/kernel"],
                                                            extra_trainable=["fc1/kernel"]),
                                    key=KEY)
  with pytest.raises(jlora.LoraTreeError, match="'params/fc1/kernel' has LoRA factors in "
                     "trainable but no W0 in frozen"):
    apply(f_extra, trainable, x)
  # The right pair still works.
  np.testing.assert_allclose(apply(frozen, trainable, x), model.apply(params, x), atol=1e-5)


def test_mismatched_rank_between_a_and_b():
  spec = jlora.LoraSpec(rank=4, targets=["fc1/kernel"])
  model, params, frozen, trainable = _mlp_pair(spec)
  lp = trainable["params"]["fc1"]["kernel"]
  bad = jax.tree_util.tree_map(lambda x: x, trainable)
  bad["params"]["fc1"]["kernel"] = jlora.LoraParam(lp.a, lp.b[:2], lp.scale, lp.layout)
  with pytest.raises(jlora.LoraTreeError, match=r"'params/fc1/kernel'.*expected A\(16, 4\) "
                     r"and B\(4, 32\)"):
    jlora.lora(model.apply)(frozen, bad, jnp.ones((1, 16)))


def test_a_parameter_leaf_that_is_not_an_array_is_refused_by_path():
  params = {"fc": {"kernel": jnp.ones((4, 3)), "name": "fc"}, "tags": np.array(["a", "b"])}
  fn = lambda p, x: x @ p["fc"]["kernel"]  # noqa: E731
  frozen, trainable = jlora.lora_transform(params, jlora.LoraSpec(rank=2, targets=["kernel"]),
                                           key=KEY)
  x = jnp.ones((2, 4))
  with pytest.raises(jlora.LoraTreeError,
                     match=r"^'fc/name': a parameter leaf must be a numeric array or number, "
                           r"got str 'fc'"):
    jlora.lora(fn)(frozen, trainable, x)
  with pytest.raises(jlora.LoraTreeError, match=r"^'fc/name': .* got str 'fc'"):
    jlora.infer_layouts(fn, params, x)
  del frozen["fc"]["name"], trainable["fc"]["name"], params["fc"]["name"]
  with pytest.raises(jlora.LoraTreeError, match=r"^'tags': .* got ndarray of dtype <U1"):
    jlora.lora(fn)(frozen, trainable, x)
  # Numbers, NumPy scalars and arrays are fine, as JAX traces them.
  del frozen["tags"], trainable["tags"], params["tags"]
  frozen["step"], trainable["step"] = 3, None
  frozen["scale"], trainable["scale"] = np.float32(2.0), None
  frozen["half"], trainable["half"] = jnp.ones(2, jnp.bfloat16), None   # a dtype of kind "V"
  np.testing.assert_allclose(jlora.lora(fn)(frozen, trainable, x), x @ params["fc"]["kernel"])
