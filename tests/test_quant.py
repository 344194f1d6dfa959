"""jlora.quantize / jlora.dequantize / NF4Array: the bytes bitsandbytes 0.50 writes.

Every weight is quantized by jlora and by bitsandbytes (``quantize_4bit``,
``quant_type="nf4"``, on the CPU) from the same values: the packed 4-bit
codes, the absmax values and the nested statistics are compared byte for
byte, and jlora's dequantization is compared with bitsandbytes'
``dequantize_4bit`` of jlora's own arrays. The one value that may differ is
the double-quantization offset (the mean of the absmax values), which
PyTorch sums in a CPU-dependent order: it is held to one unit in the last
place, and the nested codes are shown equal given bitsandbytes' offset.
"""

from __future__ import annotations

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jlora
import jlora.quant.nf4
from jlora.quant import nf4
from reference import bnb_dequantize, bnb_quantize


@pytest.fixture(autouse=True, scope="module")
def _needs_bitsandbytes():
  # Imported by the tests that compare with it (reference.bnb_*), not here:
  # collecting this file then costs no PyTorch import (see tests/lazy.py).
  pytest.importorskip("bitsandbytes")


# (out, in) of the PyTorch weight: multiples of the block size, sizes that are
# not (a short last block), an odd element count (a padded last byte), and
# enough blocks for several nested blocks of 256 (and a short last one).
SHAPES = [(64, 64), (7, 100), (1, 33), (300, 257)]


def _weights(shape, kind, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)
  # heavy-tailed: Student's t with 2 degrees of freedom, plus a few large outliers
  w = rng.standard_t(2, shape).astype(np.float32)
  flat = w.reshape(-1)
  flat[rng.integers(0, flat.size, max(1, flat.size // 500))] *= 40.0
  return w


def _ulps(a, b):
  return abs(int(np.float32(a).view(np.int32)) - int(np.float32(b).view(np.int32)))


def _ours(w_out_in, **kw):
  """jlora's NF4Array of the Flax kernel (the transpose of the PyTorch weight)."""
  return jlora.quantize({"kernel": jnp.asarray(w_out_in.T)}, **kw)["kernel"]


def _nested_given_offset(flat, offset):
  _, absmax = jax.jit(nf4._quantize_nf4, static_argnums=1)(flat, 64)
  return nf4._quantize_dynamic(np.asarray(absmax) - offset)


def test_code_tables_are_those_of_bitsandbytes():
  import bitsandbytes.functional as bnb_f
  np.testing.assert_array_equal(nf4.NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu").numpy())
  np.testing.assert_array_equal(nf4.DYNAMIC_CODE, bnb_f.create_dynamic_map().numpy())


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bytes_equal_bitsandbytes(shape, kind):
  w = _weights(shape, kind, seed=sum(shape))
  want = bnb_quantize(w)
  q = _ours(w)
  np.testing.assert_array_equal(np.asarray(q.codes), want["codes"])
  assert _ulps(q.offset, want["offset"]) <= 1, (float(q.offset), float(want["offset"]))
  # Given bitsandbytes' offset, the nested codes and scales are its own, byte for byte.
  codes8, nested = _nested_given_offset(jnp.asarray(w).reshape(-1), want["offset"])
  np.testing.assert_array_equal(np.asarray(codes8), want["absmax"])
  np.testing.assert_array_equal(np.asarray(nested), want["nested_absmax"])
  if _ulps(q.offset, want["offset"]) == 0:
    np.testing.assert_array_equal(np.asarray(q.absmax), want["absmax"])
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), want["nested_absmax"])
  # Without double quantization there is no offset: every byte is equal.
  want1 = bnb_quantize(w, double_quant=False)
  q1 = _ours(w, double_quant=False)
  np.testing.assert_array_equal(np.asarray(q1.codes), want1["codes"])
  np.testing.assert_array_equal(np.asarray(q1.absmax), want1["absmax"])
  assert q1.nested_absmax is None and q1.offset is None


@pytest.mark.parametrize("shape,dtype", [((7, 100), "bfloat16"), ((300, 257), "float32")],
                         ids=["7x100-bf16", "300x257-f32"])
def test_dequantize_equals_bitsandbytes_dequantize_4bit(shape, dtype):
  w = _weights(shape, "heavy", seed=3)
  if dtype == "bfloat16":
    w = w.astype(ml_dtypes.bfloat16)
  q = _ours(w)
  assert q.dtype == np.dtype(dtype)
  want = bnb_dequantize(q.codes, q.absmax, q.nested_absmax, q.offset, shape, dtype)
  got = q.dequantize()
  assert got.dtype == np.dtype(dtype) and got.shape == shape[::-1]
  np.testing.assert_array_equal(np.asarray(got, np.float32).T, want)
  q1 = _ours(w, double_quant=False)
  want1 = bnb_dequantize(q1.codes, q1.absmax, None, None, shape, dtype)
  np.testing.assert_array_equal(np.asarray(q1.dequantize(), np.float32).T, want1)
  # The bf16 codes are bitsandbytes' codes of the same bf16 values.
  np.testing.assert_array_equal(np.asarray(q.codes), bnb_quantize(w)["codes"])


def test_block_sizes():
  w = _weights((9, 200), "normal", seed=5)
  for block in (32, 128, 4096):
    want = bnb_quantize(w, block_size=block, double_quant=False)
    q = _ours(w, block_size=block, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.codes), want["codes"])
    np.testing.assert_array_equal(np.asarray(q.absmax), want["absmax"])
  with pytest.raises(jlora.LoraSpecError, match="block_size"):
    _ours(w, block_size=48)


def test_a_scan_stack_is_quantized_per_layer():
  # An nn.scan kernel (layers, in, out): each layer is its own PyTorch Linear.
  w = _weights((3, 40, 24), "heavy", seed=7)        # (L, in, out)
  lay = jlora.Layout((1,), (2,), (0,))
  q = jlora.quantize({"kernel": jnp.asarray(w)}, layouts={"kernel": lay})["kernel"]
  assert q.codes.shape == (3, 40 * 24 // 2) and q.absmax.shape == (3, 15)
  assert q.nested_absmax.shape == (3, 1) and q.offset.shape == (3,)
  for layer in range(3):
    want = bnb_quantize(w[layer].T)
    np.testing.assert_array_equal(np.asarray(q.codes[layer]), want["codes"])
    assert _ulps(q.offset[layer], want["offset"]) <= 1
  back = np.asarray(q.dequantize())
  for layer in range(3):
    one = jlora.quantize({"kernel": jnp.asarray(w[layer])})["kernel"]
    np.testing.assert_array_equal(back[layer], np.asarray(one.dequantize()))


def test_a_multi_axis_kernel_is_quantized_as_its_torch_linear():
  # DenseGeneral (d, heads, head_dim): the Linear weight is (heads * head_dim, d).
  w = _weights((48, 4, 8), "normal", seed=8)
  q = jlora.quantize({"kernel": jnp.asarray(w)},
                     layouts={"kernel": jlora.Layout((0,), (1, 2))})["kernel"]
  want = bnb_quantize(w.reshape(48, 32).T)
  np.testing.assert_array_equal(np.asarray(q.codes), want["codes"])
  np.testing.assert_array_equal(
      np.asarray(q.dequantize()).reshape(48, 32),
      np.asarray(_ours(w.reshape(48, 32).T).dequantize()))
  # An (in, out) weight stored (out, in): layout (1,), (0,) quantizes it as it is.
  wt = _weights((24, 40), "normal", seed=9)              # (out, in)
  q2 = jlora.quantize({"kernel": jnp.asarray(wt)},
                      layouts={"kernel": jlora.Layout((1,), (0,))})["kernel"]
  np.testing.assert_array_equal(np.asarray(q2.codes), bnb_quantize(wt)["codes"])


def test_abstract_params_plan_without_allocating():
  params = {"layer": {"kernel": jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16),
                      "bias": jax.ShapeDtypeStruct((11008,), jnp.bfloat16)}}
  q = jlora.quantize(params)["layer"]["kernel"]
  assert isinstance(q, jlora.NF4Array)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(q))
  n = 4096 * 11008
  assert q.codes.shape == (n // 2,) and q.absmax.shape == (n // 64,)
  assert q.absmax.dtype == jnp.uint8 and q.nested_absmax.shape == (n // 64 // 256,)
  assert q.nbytes == nf4.quantized_nbytes((4096, 11008), jlora.Layout((0,), (1,)))
  assert q.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-6)
  # The concrete quantization has the same structure and shapes.
  small = {"kernel": jnp.ones((128, 96), jnp.float32)}
  concrete = jlora.quantize(small)
  abstract = jlora.quantize(jax.eval_shape(lambda: small))
  assert (jax.tree_util.tree_structure(concrete) == jax.tree_util.tree_structure(abstract))
  for c, a in zip(jax.tree_util.tree_leaves(concrete), jax.tree_util.tree_leaves(abstract)):
    assert (c.shape, c.dtype) == (a.shape, a.dtype)


def test_targets_select_like_lora_spec():
  params = {"embed": {"embedding": jnp.ones((50, 64))},
            "attn": {"query": {"kernel": jnp.ones((64, 64))}, "norm": {"scale": jnp.ones(64)}},
            "mlp": {"kernel": jnp.ones((64, 128)), "bias": jnp.ones(128)},
            "step": jnp.zeros((), jnp.int32)}
  kinds = lambda tree: {p: type(x).__name__ for p, x in  # noqa: E731
                        jlora._paths.flatten_with_paths(tree)[0]}
  default = kinds(jlora.quantize(params))
  assert default["attn/query/kernel"] == default["mlp/kernel"] == "NF4Array"
  assert default["embed/embedding"] == default["attn/norm/scale"] == "ArrayImpl"
  assert default["mlp/bias"] == default["step"] == "ArrayImpl"
  assert kinds(jlora.quantize(params, ["query/kernel"]))["mlp/kernel"] == "ArrayImpl"
  assert kinds(jlora.quantize(params, r"mlp/k.*"))["mlp/kernel"] == "NF4Array"
  with pytest.raises(jlora.LoraLayoutError, match="'mlp/bias'.*1-D"):
    jlora.quantize(params, r"mlp/.*")
  assert kinds(jlora.quantize(params, lambda p, x: p.startswith("embed")))[
      "embed/embedding"] == "NF4Array"
  # Quantizing twice keeps what is quantized.
  again = jlora.quantize(jlora.quantize(params))
  assert kinds(again) == default
  with pytest.raises(jlora.LoraSpecError, match="match no parameter"):
    jlora.quantize(params, ["nothing"])
  with pytest.raises(jlora.LoraSpecError, match="'step'.*not a floating-point"):
    jlora.quantize(params, ["step"])


def test_a_weight_of_unknown_layout_is_refused_by_path():
  params = {"proj": {"kernel": jnp.ones((64, 4, 16))}}
  with pytest.raises(jlora.LoraLayoutError, match="'proj/kernel'.*3-D"):
    jlora.quantize(params)
  q = jlora.quantize(params, layouts={"proj/kernel": jlora.Layout((0,), (1, 2))})
  assert q["proj"]["kernel"].layout == jlora.Layout((0,), (1, 2))


def test_dequantize_tree_and_dtypes():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)},
            "b": {"bias": jnp.ones(3)}}
  q = jlora.quantize(params)
  back = jlora.dequantize(q)
  assert back["a"]["kernel"].dtype == jnp.bfloat16 and back["b"]["bias"] is params["b"]["bias"]
  assert jlora.dequantize(q, jnp.float32)["a"]["kernel"].dtype == jnp.float32
  err = jnp.abs(back["a"]["kernel"].astype(jnp.float32) - params["a"]["kernel"].astype(jnp.float32))
  assert float(jnp.max(err)) < 0.16 * float(jnp.max(jnp.abs(params["a"]["kernel"].astype(
      jnp.float32))))
  # quantize and dequantize also run under jit (an NF4Array is a pytree).
  qj = jax.jit(jlora.quantize)(params)
  np.testing.assert_array_equal(np.asarray(qj["a"]["kernel"].codes), np.asarray(q["a"]["kernel"].codes))
  np.testing.assert_array_equal(np.asarray(jax.jit(jlora.dequantize)(q)["a"]["kernel"]),
                                np.asarray(back["a"]["kernel"]))


def test_an_all_zero_block_stores_the_code_of_zero():
  w = np.zeros((2, 64), np.float32)
  w[1] = np.linspace(-1, 1, 64)
  np.testing.assert_array_equal(np.asarray(_ours(w).codes), bnb_quantize(w)["codes"])
  np.testing.assert_array_equal(np.asarray(_ours(w).dequantize()).T[0], 0.0)


def test_docstring_examples():
  result = doctest.testmod(jlora.quant.nf4,
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0 and result.attempted > 0


def test_a_block_size_that_is_not_an_int_is_refused():
  params = {"kernel": jnp.ones((128, 64))}
  for bad in (64.0, True, "64", None):
    with pytest.raises(jlora.LoraSpecError, match=r"block_size must be an int, one of \(32,"):
      jlora.quantize(params, block_size=bad)
  assert jlora.quantize(params, block_size=np.int64(128))["kernel"].block_size == 128


# -- an NF4Array is checked where it is built -----------------------------------------


def _stacked():
  w = jnp.asarray(_weights((3, 40, 24), "heavy", seed=11))
  return jlora.quantize({"k": w}, ["k"], layouts={"k": jlora.Layout((1,), (2,), (0,))})["k"]


@pytest.mark.parametrize("edit, match", [
    # codes truncated to half
    (lambda q: dict(codes=q.codes[:q.codes.shape[0] // 2]),
     r"codes is shape \(2048,\) dtype uint8, expected shape \(4096,\) dtype uint8"),
    # double-quantization codes read as plain float32 absmax
    (lambda q: dict(nested_absmax=None, offset=None),
     r"absmax is shape \(128,\) dtype uint8, expected shape \(128,\) dtype float32"),
    # a block size that disagrees with the arrays
    (lambda q: dict(block_size=128), r"absmax is shape \(128,\).*expected shape \(64,\)"),
    (lambda q: dict(block_size=48), r"block_size must be an int, one of"),
    (lambda q: dict(block_size=64.0), r"block_size must be an int, one of"),
    # float32 absmax of the right count under double quantization
    (lambda q: dict(absmax=q.absmax.astype(jnp.float32)),
     r"absmax is shape \(128,\) dtype float32, expected shape \(128,\) dtype uint8"),
    (lambda q: dict(offset=None), "has nested_absmax but not offset"),
    (lambda q: dict(nested_absmax=None), "has offset but not nested_absmax"),
    (lambda q: dict(codes=q.codes.astype(jnp.int32)), "codes is .*dtype int32"),
    (lambda q: dict(nested_absmax=q.nested_absmax[:0]), r"nested_absmax is shape \(0,\)"),
    (lambda q: dict(shape=(128, 32)), r"codes is shape \(4096,\).*expected shape \(2048,\)"),
    (lambda q: dict(shape=(128, "64")), "shape must be a tuple of non-negative ints"),
    (lambda q: dict(dtype=jnp.int8), "dtype must be the floating-point dtype"),
    (lambda q: dict(layout=jlora.Layout((0,), (1,), (2,))),
     r"layout Layout\(.*\) does not partition"),
])
def test_an_inconsistent_nf4array_is_refused(edit, match):
  q = jlora.quantize({"kernel": jnp.asarray(_weights((128, 64), "normal"))})["kernel"]
  assert q.shape == (128, 64) and q.double_quant
  changes = edit(q)
  with pytest.raises(jlora.LoraSpecError, match=r"NF4Array of shape \(128, .*: " + match):
    dataclasses.replace(q, **changes)
  fields = {name: getattr(q, name) for name in
            ("codes", "absmax", "nested_absmax", "offset", "shape", "dtype", "layout",
             "block_size")}
  with pytest.raises(jlora.LoraSpecError, match=match):
    jlora.NF4Array(**{**fields, **changes})
  # So none reaches dequantize (or the interpreter), where a wrong length was a
  # raw reshape error and a truncated array silently read zeros.


def test_a_stack_of_the_wrong_length_is_refused():
  q = _stacked()
  with pytest.raises(jlora.LoraSpecError,
                     match=r"NF4Array of shape \(3, 40, 24\): codes is shape \(2, 480\)"):
    dataclasses.replace(q, codes=q.codes[:2])
  with pytest.raises(jlora.LoraSpecError, match=r"offset is shape \(\)"):
    dataclasses.replace(q, offset=q.offset[0])


def test_an_nf4array_is_still_a_pytree_under_transformations():
  q = _stacked()
  dense = np.asarray(q.dequantize())
  # (jitted, the absmax is dequantized by XLA, which may fuse its multiply-add)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda q: q.dequantize())(q)), dense, rtol=1e-6)
  abstract = jax.eval_shape(lambda q: q, q)
  assert isinstance(abstract, jlora.NF4Array) and abstract.codes.shape == (3, 480)
  # Trees of other things (vmap's axis specs, shardings, sentinels) rebuild it too.
  for value in (object(), None, 0, "x"):
    jax.tree_util.tree_map(lambda _: value, q)
  mesh = jax.make_mesh((1,), ("data",))
  s = jlora.sharding.nf4_shardings(q, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  assert s.codes.spec == jax.sharding.PartitionSpec("data", None)
  # vmap and scan over the stack axis see one slice's arrays under the stack's metadata.
  per_layer = jax.vmap(lambda q: q.codes.astype(jnp.int32).sum())(q)
  np.testing.assert_array_equal(per_layer, np.asarray(q.codes, np.int64).sum(-1))
  assert jax.vmap(lambda q: q)(q).codes.shape == (3, 480)
  assert jax.vmap(lambda q, x: x * 2, in_axes=(None, 0))(q, jnp.ones(2)).shape == (2,)
  total, _ = jax.lax.scan(lambda c, q: (c + q.absmax.astype(jnp.int32).sum(), None), 0, q)
  assert int(total) == int(np.asarray(q.absmax, np.int64).sum())
  # Gradients: the codes' cotangents are float0.
  plain = jlora.quantize({"k": jnp.ones((64, 64))}, ["k"], double_quant=False)["k"]
  g = jax.grad(lambda q: q.dequantize().sum(), allow_int=True)(plain)
  assert g.absmax.shape == plain.absmax.shape and g.codes.dtype == jax.dtypes.float0
  # And it still runs under jlora.lora, jitted (its leaves are tracers there).
  frozen, trainable = jlora.lora_transform(
      {"k": q}, jlora.LoraSpec(rank=2, targets=["k"]), key=jax.random.key(0),
      layouts={"k": q.layout})
  x = jnp.ones((3, 5, 40))
  fn = lambda p, x: jnp.einsum("lbi,lio->lbo", x, p["k"])  # noqa: E731
  got = jax.jit(jlora.lora(fn))(frozen, trainable, x)
  np.testing.assert_allclose(got, fn({"k": jnp.asarray(dense)}, x), rtol=1e-5, atol=1e-4)
