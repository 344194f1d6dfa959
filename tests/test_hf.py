"""``jlora.hf`` without Tunix: the tensor-by-tensor reader, a ``Mapping`` of
Tunix's format (reshapes, a stacked slice, skipped keys), NF4 while loading and
from a bitsandbytes file against bitsandbytes itself, and bad input.

The checkpoints are written here as transformers writes them (sharded
safetensors with ``model.safetensors.index.json``; the 4-bit entries from
bitsandbytes' ``QuantState.as_dict(packed=True)``); tests/test_hf_tunix.py
loads real ``save_pretrained`` folders into Tunix's models.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.hf
from jlora.hf.tensors import Checkpoint
from lazy import lazy

torch = lazy("torch")
safetensors_torch = lazy("safetensors.torch")
bnb_functional = lazy("bitsandbytes.functional")


@pytest.fixture(autouse=True, scope="module")
def _needs_torch_and_bitsandbytes():
  for name in ("torch", "safetensors.torch", "bitsandbytes.functional"):
    pytest.importorskip(name)


D, N, H, K, FF, V = 64, 2, 32, 1, 128, 16
# A Tunix-format table: q (out, in) -> (D, N, H); k and v -> slices 0, 1 of kv (2, K, D, H)
# after Tunix's reshape and a transpose; an MLP kernel; a skipped lm_head.
MAPPING = jlora.hf.Mapping(
    {r"model\.embed\.weight": ("embed", None),
     r"model\.layers\.([0-9]+)\.q\.weight": (r"layers.\1.q.w", ((1, 0), (D, N, H))),
     r"model\.layers\.([0-9]+)\.(k|v)\.weight": (r"tmp.layers.\1.\2", ((1, 0), (D, K, H))),
     r"model\.layers\.([0-9]+)\.up\.weight": (r"layers.\1.up.kernel", ((1, 0), None)),
     r"model\.norm\.weight": ("norm", None),
     r"lm_head\.weight": ("unused.lm_head", None)},
    stacks={r"tmp\.layers\.([0-9]+)\.k": (r"layers.\1.kv.w", "0", (1, 0, 2)),
            r"tmp\.layers\.([0-9]+)\.v": (r"layers.\1.kv.w", "1", (1, 0, 2))},
    model_types=("tiny",), architectures=("TinyForCausalLM",), name="tiny")
LINEAR = {"q": (N * H, D), "k": (K * H, D), "v": (K * H, D), "up": (FF, D)}


def torch_weights(dtype=None, seed=0):
  dtype = torch.float32 if dtype is None else dtype
  g = torch.Generator().manual_seed(seed)
  w = {"model.embed.weight": torch.randn(V, D, generator=g),
       "model.norm.weight": torch.randn(D, generator=g),
       "lm_head.weight": torch.randn(V, D, generator=g)}
  for i in range(2):
    for name, shape in LINEAR.items():
      w[f"model.layers.{i}.{name}.weight"] = torch.randn(*shape, generator=g)
  return {k: v.to(dtype) for k, v in w.items()}


def like(dtype=jnp.float32):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  layer = {"q": {"w": s(D, N, H)}, "kv": {"w": s(2, K, D, H)}, "up": {"kernel": s(D, FF)}}
  return {"embed": s(V, D), "norm": s(D), "layers": {"0": layer, "1": dict(layer)}}


def write(path, tensors, shards=3, config=None):
  """A sharded checkpoint as save_pretrained writes it."""
  path.mkdir()
  keys = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: tensors[k].contiguous() for k in keys[s::shards]}
    safetensors_torch.save_file(part, str(path / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in part})
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  config = config or {"model_type": "tiny", "architectures": ["TinyForCausalLM"]}
  (path / "config.json").write_text(json.dumps(config))
  return path


def reference(w):
  """The tree the mapping makes, by NumPy from the PyTorch tensors."""
  f = lambda k: w[k].float().numpy()  # noqa: E731
  kv = lambda i, s: f(f"model.layers.{i}.{s}.weight").T.reshape(D, K, H).transpose(1, 0, 2)  # noqa: E731
  layer = lambda i: {  # noqa: E731
      "q": {"w": f(f"model.layers.{i}.q.weight").T.reshape(D, N, H)},
      "kv": {"w": np.stack([kv(i, "k"), kv(i, "v")])},
      "up": {"kernel": f(f"model.layers.{i}.up.weight").T}}
  return {"embed": f("model.embed.weight"), "norm": f("model.norm.weight"),
          "layers": {"0": layer(0), "1": layer(1)}}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dense_sharded_checkpoint_in_each_dtype(dtype, tmp_path):
  w = torch_weights(getattr(torch, dtype))
  got = jlora.hf.load(write(tmp_path / "ckpt", w), like(), mapping=MAPPING)
  assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(dtype)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b),
               got, reference(w))
  cast = jlora.hf.load(tmp_path / "ckpt", like(), mapping=MAPPING, dtype=jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.float32)}


def test_reader_reads_one_tensor_into_memory_of_its_own(tmp_path):
  w = torch_weights(torch.bfloat16)
  ck = Checkpoint(write(tmp_path / "ckpt", w))
  assert sorted(ck.keys()) == sorted(w) and len(set(ck.file_of.values())) == 3
  x = ck.get("model.embed.weight")
  assert x.flags.owndata or x.base.flags.owndata   # a buffer, not a view of a mapped file
  assert not isinstance(x.base, np.memmap) and ck.info("model.embed.weight") == ((V, D), "BF16")
  np.testing.assert_array_equal(x.astype(np.float32), w["model.embed.weight"].float().numpy())


def _linear(i, name, w):
  return w[f"model.layers.{i}.{name}.weight"]


def _slices(tree):
  """(layer, name, the NF4Array or slice arrays) of every linear weight."""
  for i in ("0", "1"):
    layer = tree["layers"][i]
    yield int(i), "q", layer["q"]["w"], None
    yield int(i), "k", layer["kv"]["w"], 0
    yield int(i), "v", layer["kv"]["w"], 1
    yield int(i), "up", layer["up"]["kernel"], None


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_on_load_gives_bitsandbytes_codes(double_quant, tmp_path):
  w = torch_weights(torch.bfloat16)
  got = jlora.hf.load(write(tmp_path / "ckpt", w), like(), mapping=MAPPING, quantize=True,
                      double_quant=double_quant)
  assert not isinstance(got["embed"], jlora.NF4Array)
  for i, name, q, index in _slices(got):
    assert isinstance(q, jlora.NF4Array) and q.dtype == jnp.bfloat16, name
    sl = (lambda x: x) if index is None else (lambda x: x[index])  # noqa: E731
    codes, state = bnb_functional.quantize_4bit(_linear(i, name, w), blocksize=64,
                                                quant_type="nf4",
                                                compress_statistics=double_quant)
    np.testing.assert_array_equal(np.asarray(sl(q.codes)), codes.numpy().reshape(-1))
    if not double_quant:
      np.testing.assert_array_equal(np.asarray(sl(q.absmax)), state.absmax.numpy())
  # Dequantized, each weight is within half an NF4 step of the dense one.
  dense = reference(w)
  back = jlora.dequantize(got, jnp.float32)
  err = max(float(np.max(np.abs(np.asarray(a) - b) / np.max(np.abs(b))))
            for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(dense)))
  assert 0 < err < 0.2


def test_bnb_4bit_checkpoint_loads_as_its_arrays(tmp_path):
  w = torch_weights(torch.float32)
  tensors, states = {}, {}
  for k, v in w.items():
    if ".layers." not in k:
      tensors[k] = v
      continue
    codes, state = bnb_functional.quantize_4bit(v, blocksize=64, quant_type="nf4",
                                                compress_statistics=True)
    tensors[k] = codes
    states[k] = (codes, state)
    for part, x in state.as_dict(packed=True).items():
      tensors[f"{k}.{part}"] = x
  got = jlora.hf.load(write(tmp_path / "bnb", tensors), like(), mapping=MAPPING)
  for i, name, q, index in _slices(got):
    codes, state = states[f"model.layers.{i}.{name}.weight"]
    sl = (lambda x: x) if index is None else (lambda x: x[index])  # noqa: E731
    np.testing.assert_array_equal(np.asarray(sl(q.codes)), codes.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(sl(q.absmax)), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(sl(q.nested_absmax)), state.state2.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(sl(q.offset)), state.offset.numpy())
  # Dequantized by jlora, each weight is bitsandbytes' own dequantization.
  for i, name, q, index in _slices(jlora.dequantize(got)):
    codes, state = states[f"model.layers.{i}.{name}.weight"]
    theirs = bnb_functional.dequantize_4bit(codes, state).numpy()
    t = MAPPING.resolve(f"model.layers.{i}.{name}.weight", "x")
    from jlora.hf.mapping import apply
    np.testing.assert_array_equal(np.asarray(q if index is None else q[index]), apply(theirs, t))


# -- bad input: one line, naming the file and what was wrong ---------------------------


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value)


def test_no_mapping_for_the_model(tmp_path):
  d = write(tmp_path / "ckpt", torch_weights())
  with pytest.raises(jlora.LoraError, match=rf"'{d}': jlora.hf has no mapping for a model of "
                     r"type dict") as e:
    jlora.hf.load(d, like())
  _one_line(e)


def test_checkpoint_for_another_architecture(tmp_path):
  d = write(tmp_path / "ckpt", torch_weights(), config={"model_type": "gpt2",
                                                        "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(jlora.LoraFileError, match=rf"'{d}/config.json': model_type 'gpt2' is "
                     r"not one the tiny mapping reads \(tiny\)") as e:
    jlora.hf.load(d, like(), mapping=MAPPING)
  _one_line(e)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
  w = torch_weights()
  w["model.layers.1.up.weight"] = torch.zeros(FF, 2 * D)
  d = write(tmp_path / "ckpt", w)
  with pytest.raises(jlora.LoraFileError, match=r"'model.layers.1.up.weight' \(128, 128\) makes "
                     r"'layers/1/up/kernel' \(128, 128\), but the model's is \(64, 128\)") as e:
    jlora.hf.load(d, like(), mapping=MAPPING)
  _one_line(e)


def test_missing_shard(tmp_path):
  d = write(tmp_path / "ckpt", torch_weights())
  os.remove(d / "model-00002-of-00003.safetensors")
  with pytest.raises(jlora.LoraFileError, match=r"lists shard '.*model-00002-of-00003"
                     r"\.safetensors', which is missing") as e:
    jlora.hf.load(d, like(), mapping=MAPPING)
  _one_line(e)


@pytest.mark.parametrize("dtype,kind", [("float8_e4m3fn", "F8_E4M3"), ("int32", "I32")])
def test_dtype_it_cannot_read(dtype, kind, tmp_path):
  w = torch_weights()
  w["model.norm.weight"] = w["model.norm.weight"].to(getattr(torch, dtype))
  d = write(tmp_path / "ckpt", w)
  with pytest.raises(jlora.LoraFileError, match=rf"'model.norm.weight' is {kind}; jlora reads "
                     r"parameters in BF16, F16, F32") as e:
    jlora.hf.load(d, like(), mapping=MAPPING)
  _one_line(e)


def test_unmapped_entry_and_missing_parameter(tmp_path):
  w = torch_weights()
  w["model.layers.0.extra.weight"] = torch.zeros(3)
  d = write(tmp_path / "extra", w)
  with pytest.raises(jlora.LoraFileError, match=r"'model.layers.0.extra.weight' matches no "
                     r"rule of the tiny mapping"):
    jlora.hf.load(d, like(), mapping=MAPPING)
  w = torch_weights()
  del w["model.layers.1.v.weight"]
  d = write(tmp_path / "missing", w)
  with pytest.raises(jlora.LoraFileError, match=r"has no entry for 'layers/1/kv/w\[1\]'"):
    jlora.hf.load(d, like(), mapping=MAPPING)


def test_pickled_weights_are_not_read(tmp_path):
  d = tmp_path / "ckpt"
  d.mkdir()
  (d / "pytorch_model.bin").write_bytes(b"not to be unpickled")
  (d / "config.json").write_text(json.dumps({"model_type": "tiny"}))
  with pytest.raises(jlora.LoraFileError, match=r"jlora does not read pickled weights"):
    jlora.hf.load(d, like(), mapping=MAPPING)


def test_quantize_must_select_linear_weights(tmp_path):
  d = write(tmp_path / "ckpt", torch_weights())
  with pytest.raises(jlora.LoraSpecError, match=r"'norm' matches quantize, but "
                     r"'model.norm.weight' \(64,\) is not the weight of a linear layer"):
    jlora.hf.load(d, like(), mapping=MAPPING, quantize=r"norm")
  with pytest.raises(jlora.LoraSpecError, match=r"quantize 'nothing' matches no weight"):
    jlora.hf.load(d, like(), mapping=MAPPING, quantize=r"nothing")


def test_nnx_module_and_state_come_back_loaded_and_the_given_ones_unchanged(tmp_path):
  nnx = pytest.importorskip("flax.nnx")
  w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
  d = tmp_path / "ckpt"
  d.mkdir()
  safetensors_torch.save_file({"fc.weight": w, "fc.bias": torch.ones(64)},
                              str(d / "model.safetensors"))
  mapping = jlora.hf.Mapping({r"fc\.weight": ("kernel", ((1, 0), None)),
                              r"fc\.bias": ("bias", None)})
  lin = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
  state = nnx.state(lin, nnx.Param)
  loaded = jlora.hf.load(d, lin, mapping=mapping)
  assert type(loaded) is nnx.Linear
  np.testing.assert_array_equal(np.asarray(loaded.kernel[...]), w.numpy().T)
  q = jlora.hf.load(d, state, mapping=mapping, quantize=True)
  assert isinstance(q, nnx.State) and isinstance(q["kernel"].get_value(), jlora.NF4Array)
  assert float(lin.bias[...].sum()) == 0 and float(state["bias"][...].sum()) == 0
