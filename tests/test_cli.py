"""The jlora command line: inspect, merge, convert, and its errors.

Merged weights are checked against jlora.merge of the same trees, converted
adapters against the factors they came from, and every error path for one
line on stderr and a non-zero status. Most runs call jlora.cli.main in
process; one runs the installed console script.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import jlora
from files_util import (D, H, HD, L, LAYOUTS, MLP, VOCAB, assert_params_equal, flat_params,
                        is_lp, make_params)
from jlora import cli

SCANNED = ["--rules", "scanned"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Base and adapter files: orbax and safetensors bases, jlora and PEFT adapters."""
  tmp = tmp_path_factory.mktemp("cli")
  params = make_params()
  spec = jlora.LoraSpec(rank=3, alpha=6, use_rslora=True,
                        targets=r"params/layers/(query|out|up)/kernel|params/lm_head/kernel",
                        rank_pattern={"lm_head/kernel": 2},
                        extra_trainable=r"params/layers/LayerNorm_0/.*", layouts=LAYOUTS)
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  # Trained: every B (and every extra) moved off its initial value.
  rng = np.random.default_rng(1)
  trainable = jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)),
      trainable)
  files = dict(
      base=jlora.base.save(tmp / "base", params),
      base_st=jlora.base.save(tmp / "base.safetensors", params),
      adapter=jlora.orbax.save(tmp / "adapter", trainable, spec, base=frozen),
      peft=tmp / "peft")
  jlora.peft.save(files["peft"], trainable, jlora.peft.Rules.scanned(), spec=spec)
  return dict(params=params, spec=spec, frozen=frozen, trainable=trainable, tmp=tmp, **files)


def run(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def assert_one_line_error(rc, out, err, *fragments):
  assert rc != 0
  assert out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("jlora: error: "), err
  assert "Traceback" not in err
  for frag in fragments:
    assert frag in lines[0], lines[0]


# -- inspect --------------------------------------------------------------------


def test_inspect_jlora_adapter(setup, capsys):
  trainable = setup["trainable"]
  rc, out, err = run(capsys, "inspect", setup["adapter"], "--json")
  assert rc == 0, err
  info = json.loads(out)
  assert info["format"] == "jlora"
  spec = info["spec"]
  assert (spec["rank"], spec["alpha"], spec["use_rslora"]) == (3, 6, True)
  assert spec["targets"] == setup["spec"].targets
  assert spec["rank_pattern"] == {"lm_head/kernel": 2}
  by_path = {t["path"]: t for t in info["targets"]}
  flat_t = {jlora.path_str(kp): x for kp, x in
            jax.tree_util.tree_flatten_with_path(trainable, is_leaf=is_lp)[0]}
  lora = {p: x for p, x in flat_t.items() if is_lp(x)}
  assert set(by_path) == set(lora)
  for p, lp in lora.items():
    t = by_path[p]
    assert t["rank"] == lp.rank and t["scale"] == lp.scale
    assert t["a_shape"] == list(lp.a.shape) and t["b_shape"] == list(lp.b.shape)
    assert tuple(t["layout"]["in_axes"]) == lp.layout.in_axes
  assert by_path["params/lm_head/kernel"]["rank"] == 2
  assert by_path["params/lm_head/kernel"]["dtype"] == "bfloat16"
  assert by_path["params/layers/out/kernel"]["shape"] == [L, H, HD, D]
  leaves = jax.tree.leaves(trainable)
  assert info["trainable_params"] == sum(x.size for x in leaves)
  assert info["bytes"] == sum(x.size * x.dtype.itemsize for x in leaves)
  assert {e["path"] for e in info["extra_trainable"]} == {
      "params/layers/LayerNorm_0/scale", "params/layers/LayerNorm_0/bias"}
  meta = jlora.orbax.metadata(setup["adapter"])
  assert info["base"]["sha256"] == meta["base"]["sha256"]
  params = jax.tree.leaves(setup["params"])
  assert info["base"]["params"] == len(params)  # the fingerprint's and the extras
  assert info["base"]["elements"] == sum(x.size for x in params)

  rc, text, _ = run(capsys, "inspect", setup["adapter"])
  assert rc == 0
  assert "jlora orbax adapter" in text and meta["base"]["sha256"] in text
  assert "params/layers/out/kernel" in text and f"{info['trainable_params']:,} parameters" in text


def test_inspect_peft_folder(setup, capsys):
  rc, out, err = run(capsys, "inspect", setup["peft"], "--json")
  assert rc == 0, err
  info = json.loads(out)
  assert info["format"] == "peft" and info["base"] is None and info["checksums"] == "ok"
  assert (info["spec"]["rank"], info["spec"]["alpha"], info["spec"]["use_rslora"]) == (3, 6, True)
  tensors = load_file(setup["peft"] / "adapter_model.safetensors")
  assert info["trainable_params"] == sum(t.size for t in tensors.values())
  assert info["bytes"] == sum(t.nbytes for t in tensors.values())
  by_module = {t["module"]: t for t in info["targets"]}
  assert len(by_module) == 3 * L + 1   # query/out/up per layer, lm_head
  q = by_module["model.layers.1.query"]
  assert (q["rank"], q["in"], q["out"]) == (3, D, H * HD)
  assert q["scale"] == pytest.approx(6 / np.sqrt(3))
  head = by_module["lm_head"]
  assert (head["rank"], head["in"], head["out"]) == (2, D, VOCAB)
  assert {t["key"] for t in info["modules_to_save"]} == {
      f"base_model.model.model.layers.{i}.LayerNorm_0.{n}" for i in range(L)
      for n in ("weight", "bias")}
  rc, text, _ = run(capsys, "inspect", setup["peft"])
  assert rc == 0 and "PEFT LoRA adapter folder" in text and "model.layers.0.out" in text


def test_inspect_base(setup, capsys):
  rc, out, _ = run(capsys, "inspect", setup["base_st"], "--json")
  assert rc == 0
  info = json.loads(out)
  assert info["format"] == "params"
  assert info["params"] == len(jax.tree.leaves(setup["params"]))
  assert info["dtypes"] == {"float32": info["params"] - 1, "bfloat16": 1}


# -- merge ----------------------------------------------------------------------


def _reference_merge(setup):
  return jlora.merge(setup["frozen"], setup["trainable"])


@pytest.mark.parametrize("base,out", [("base", "merged.safetensors"), ("base_st", "merged"),
                                      ("plain", "merged")])
def test_merge_jlora_adapter(setup, capsys, tmp_path, base, out):
  if base == "plain":  # a plain orbax PyTree checkpoint, written without jlora
    path = tmp_path / "plain"
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, setup["params"])
  else:
    path = setup[base]
  rc, stdout, err = run(capsys, "merge", "--base", path, "--adapter", setup["adapter"],
                        "--out", tmp_path / out)
  assert rc == 0, err
  assert "wrote" in stdout and err == ""
  merged = flat_params(tmp_path / out)
  assert_params_equal(merged, _reference_merge(setup))
  assert merged["params/lm_head/kernel"].dtype == jnp.bfloat16
  # The adapter changed the adapted weights and the extra ones, nothing else.
  params = {jlora.path_str(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(setup["params"])}
  changed = {p for p in params if not np.array_equal(np.asarray(merged[p], np.float32),
                                                     np.asarray(params[p], np.float32))}
  assert changed == {"params/layers/query/kernel", "params/layers/out/kernel",
                     "params/layers/up/kernel", "params/lm_head/kernel",
                     "params/layers/LayerNorm_0/scale", "params/layers/LayerNorm_0/bias"}
  if out.endswith(".safetensors"):  # flat '/'-joined keys, readable by any tool
    with safe_open(tmp_path / out, "numpy") as f:
      assert set(f.keys()) == set(params)


def test_merge_peft_folder_matches_merge(setup, capsys, tmp_path):
  out = tmp_path / "m.safetensors"
  rc, _, err = run(capsys, "merge", "--base", setup["base_st"], "--adapter", setup["peft"],
                   "--out", out, *SCANNED, "--quiet")
  assert rc == 0, err
  merged = flat_params(out)
  ref = {jlora.path_str(kp): x
         for kp, x in jax.tree_util.tree_leaves_with_path(_reference_merge(setup))}
  for p, w in ref.items():
    assert merged[p].dtype == w.dtype, p
    # PEFT's (out, in) flattening is a reshape, so the factors come back exactly.
    np.testing.assert_array_equal(np.asarray(merged[p], np.float32),
                                  np.asarray(w, np.float32), err_msg=p)
  # The orbax output is the same again.
  rc, _, _ = run(capsys, "merge", "--base", setup["base"], "--adapter", setup["peft"],
                 "--out", tmp_path / "m2", "--format", "orbax", *SCANNED)
  assert rc == 0
  assert_params_equal(flat_params(tmp_path / "m2"), jlora.base.load(out))


def test_merge_peft_layout_from_flag_when_shapes_are_ambiguous(setup, capsys, tmp_path):
  # A base whose out kernel (L, 8, 1, 8) splits two ways into 8 inputs.
  params = jax.tree.map(lambda x: x, setup["params"])
  w0 = np.asarray(params["params"]["layers"]["out"]["kernel"]).reshape(L, H * HD, 1, D)
  params["params"]["layers"]["out"]["kernel"] = jnp.asarray(w0)
  base = jlora.base.save(tmp_path / "b.safetensors", params)
  argv = ["merge", "--base", base, "--adapter", setup["peft"], *SCANNED]
  assert_one_line_error(*run(capsys, *argv, "--out", tmp_path / "m1.safetensors"),
                        "params/layers/out/kernel", "--layout")
  rc, _, err = run(capsys, *argv, "--out", tmp_path / "m2.safetensors",
                   "--layout", "params/layers/out/kernel=1:2,3:0")
  assert rc == 0, err
  got = flat_params(tmp_path / "m2.safetensors")["params/layers/out/kernel"]
  # Reference: PyTorch's delta s * B @ A (out, in), per layer, in the weight's axis order.
  sd = load_file(setup["peft"] / "adapter_model.safetensors")
  for i in range(L):
    key = f"base_model.model.model.layers.{i}.out"
    delta = 6 / np.sqrt(3) * (sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"])
    np.testing.assert_allclose(np.asarray(got[i]), w0[i] + delta.T.reshape(H * HD, 1, D),
                               rtol=1e-6, atol=1e-6)


# -- convert --------------------------------------------------------------------


def test_convert_round_trip_orbax_peft_orbax(setup, capsys, tmp_path):
  peft_dir, back = tmp_path / "peft", tmp_path / "back"
  rc, out, err = run(capsys, "convert", setup["adapter"], peft_dir, "--to", "peft", *SCANNED,
                     "--base-model-name", "my/model")
  assert rc == 0, err
  # The same folder save_peft writes from the trees in memory.
  want, got = (load_file(d / "adapter_model.safetensors") for d in (setup["peft"], peft_dir))
  assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  config = json.loads((peft_dir / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == "my/model" and config["use_rslora"] is True

  rc, out, err = run(capsys, "convert", peft_dir, back, "--to", "orbax", "--base",
                     setup["base"], *SCANNED)
  assert rc == 0, err
  # Loads in Python onto the nested-dict tree: the fingerprint kept the tree's order.
  loaded, spec = jlora.orbax.load(back, base=setup["frozen"])
  orig = setup["trainable"]
  assert jax.tree_util.tree_structure(loaded, is_leaf=is_lp) == \
      jax.tree_util.tree_structure(orig, is_leaf=is_lp)
  for (p, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(loaded, is_leaf=is_lp),
                            jax.tree_util.tree_leaves_with_path(orig, is_leaf=is_lp)):
    if is_lp(w):
      assert (g.layout, g.scale, g.rank) == (w.layout, w.scale, w.rank), p
      for name in ("a", "b"):
        np.testing.assert_array_equal(getattr(g, name), getattr(w, name))
        assert getattr(g, name).dtype == getattr(w, name).dtype
    else:
      np.testing.assert_array_equal(g, w)
  assert spec.rank_for("params/lm_head/kernel") == 2 and spec.use_rslora


def test_convert_peft_with_base_checks_fingerprint(setup, capsys, tmp_path):
  rc, _, err = run(capsys, "convert", setup["adapter"], tmp_path / "p", "--to", "peft",
                   "--base", setup["base_st"], *SCANNED)
  assert rc == 0, err


# -- quantize -------------------------------------------------------------------

STACK_LAYOUTS = ["--layout", "params/layers/query/kernel=1:2,3:0",
                 "--layout", "params/layers/out/kernel=1,2:3:0",
                 "--layout", "params/layers/(up)/kernel=1:2:0"]


def _assert_same_quantized(got, want):
  """Same paths, the same NF4Arrays (bytes and static fields) and dense arrays."""
  want = dict(jax.tree_util.tree_leaves_with_path(
      want, is_leaf=lambda x: isinstance(x, jlora.NF4Array)))
  want = {jlora.path_str(kp): x for kp, x in want.items()}
  assert set(got) == set(want)
  for p, w in want.items():
    g = got[p]
    assert type(g) is type(w), p
    if isinstance(w, jlora.NF4Array):
      assert (g.shape, g.dtype, g.layout, g.block_size) == (w.shape, w.dtype, w.layout,
                                                            w.block_size), p
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
    else:
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _flat_quantized(path):
  return dict(jlora.base.read(path))


@pytest.mark.parametrize("base,out", [("base", "q.safetensors"), ("base_st", "q")])
def test_quantize_a_base_as_jlora_quantize_does(setup, capsys, tmp_path, base, out):
  rc, text, err = run(capsys, "quantize", setup[base], tmp_path / out, *STACK_LAYOUTS)
  assert rc == 0, err
  want = jlora.quantize(setup["params"], layouts=LAYOUTS)    # every kernel, the bf16 head too
  _assert_same_quantized(_flat_quantized(tmp_path / out), want)
  assert "4 of 8 parameters quantized to NF4 (block size 64, double quantization)" in text
  # inspect: which are quantized, their bytes and bits per parameter
  rc, out_json, err = run(capsys, "inspect", tmp_path / out, "--json")
  assert rc == 0, err
  info = json.loads(out_json)
  q = [x for x in jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, jlora.NF4Array))
       if isinstance(x, jlora.NF4Array)]
  assert info["quantized"]["tensors"] == 4 and info["dense"]["tensors"] == 4
  assert info["quantized"]["bytes"] == sum(x.nbytes for x in q)
  assert info["quantized"]["elements"] == sum(x.size for x in q)
  row = next(t for t in info["tensors"] if t["path"] == "params/lm_head/kernel")
  assert row["dtype"] == "bfloat16" and row["shape"] == [D, VOCAB]
  assert row["quant"] == {"type": "nf4", "block_size": 64, "double_quant": True,
                          "bytes": _at_q(want, "params/lm_head/kernel").nbytes,
                          "bits_per_param": 8 * _at_q(want, "params/lm_head/kernel").nbytes
                          / (D * VOCAB)}
  rc, text, _ = run(capsys, "inspect", tmp_path / out)
  assert rc == 0 and "quantized: 4 tensors (NF4)" in text and "bits per parameter" in text
  assert "nf4, block 64, double quant" in text


def _at_q(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def test_quantize_targets_block_size_and_no_double_quant(setup, capsys, tmp_path):
  rc, text, err = run(capsys, "quantize", setup["base_st"], tmp_path / "q.safetensors",
                      "--targets", "params/lm_head/kernel", "--block-size", "128",
                      "--no-double-quant")
  assert rc == 0, err
  want = jlora.quantize(setup["params"], "params/lm_head/kernel", block_size=128,
                        double_quant=False)
  _assert_same_quantized(_flat_quantized(tmp_path / "q.safetensors"), want)
  assert "1 of 8 parameters quantized to NF4 (block size 128)" in text
  # Quantizing a quantized base again: the NF4 weights stay as they are.
  rc, text, err = run(capsys, "quantize", tmp_path / "q.safetensors", tmp_path / "q2",
                      *STACK_LAYOUTS)
  assert rc == 0, err
  got = _flat_quantized(tmp_path / "q2")
  assert got["params/lm_head/kernel"].block_size == 128 and "3 of 8" in text


def test_merge_onto_a_quantized_base_is_jlora_merge(setup, capsys, tmp_path):
  """An adapter made for the dense base fits its quantized version (the same
  paths, shapes and dtypes); the merge is dense, as jlora.merge makes it."""
  rc, _, err = run(capsys, "quantize", setup["base"], tmp_path / "q", *STACK_LAYOUTS)
  assert rc == 0, err
  rc, _, err = run(capsys, "merge", "--base", tmp_path / "q", "--adapter", setup["adapter"],
                   "--out", tmp_path / "m.safetensors", "--quiet")
  assert rc == 0, err
  qparams = jlora.quantize(setup["params"], layouts=LAYOUTS)
  want = jlora.merge(jlora.frozen_like(qparams, setup["trainable"]), setup["trainable"])
  assert_params_equal(flat_params(tmp_path / "m.safetensors"), want)


# -- errors ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(setup):
  """Files that are not what a command wants."""
  tmp = setup["tmp"] / "bad"
  tmp.mkdir()
  (tmp / "empty").mkdir()
  (tmp / "notes.txt").write_text("hello")
  other = jax.tree.map(lambda x: x, setup["params"])
  other["params"]["layers"]["up"]["kernel"] = jnp.zeros((L, D, MLP + 1))
  other_base = jlora.base.save(tmp / "other.safetensors", other)
  fewer = jax.tree.map(lambda x: x, setup["params"])
  del fewer["params"]["embed"]
  fewer_base = jlora.base.save(tmp / "fewer.safetensors", fewer)
  garbled = tmp / "garbled"
  shutil.copytree(setup["adapter"], garbled)
  for f in (garbled / "adapter_meta").rglob("*"):
    if f.is_file():
      f.write_text("{not json")
  user = tmp / "user"                                  # someone's project
  (user / "src").mkdir(parents=True)
  (user / "src" / "train.py").write_text("print('mine')")
  truncated = tmp / "truncated"
  shutil.copytree(setup["adapter"], truncated)
  for f in sorted((truncated / "adapter").rglob("*")):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  changed = tmp / "changed_peft"                       # a config edited under its tensors
  shutil.copytree(setup["peft"], changed)
  config = json.loads((changed / "adapter_config.json").read_text())
  (changed / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 99}))
  small_q = jlora.quantize({"fc": {"kernel": jnp.ones((64, 64))}})
  bnb_file = jlora.bnb.save(tmp / "bnb.safetensors", small_q, jlora.peft.Rules.generic())
  return dict(tmp=tmp, other=other_base, fewer=fewer_base, garbled=garbled, user=user,
              truncated=truncated, changed=changed, bnb=bnb_file,
              quantized=jlora.base.save(tmp / "quantized.safetensors", small_q))


ERRORS = {
    "missing path": (lambda s, b: ["inspect", b["tmp"] / "nope"], ["does not exist"]),
    "empty folder": (lambda s, b: ["inspect", b["tmp"] / "empty"], ["is not an adapter"]),
    "text file": (lambda s, b: ["inspect", b["tmp"] / "notes.txt"], ["not an adapter"]),
    "garbled adapter": (lambda s, b: ["inspect", b["garbled"]], ["corrupted"]),
    "missing base": (lambda s, b: ["merge", "--base", b["tmp"] / "nope.safetensors",
                                   "--adapter", s["adapter"], "--out", b["tmp"] / "o1"],
                     ["does not exist"]),
    "adapter is a base": (lambda s, b: ["merge", "--base", s["base"], "--adapter", s["base"],
                                        "--out", b["tmp"] / "o2"], ["not an adapter"]),
    "base is an adapter": (lambda s, b: ["merge", "--base", s["adapter"], "--adapter",
                                         s["adapter"], "--out", b["tmp"] / "o3"],
                           ["it is an adapter"]),
    "mismatched base": (lambda s, b: ["merge", "--base", b["other"], "--adapter", s["adapter"],
                                      "--out", b["tmp"] / "o4"],
                        ["params/layers/up/kernel", "another base"]),
    "base lacks a param": (lambda s, b: ["merge", "--base", b["fewer"], "--adapter",
                                         s["adapter"], "--out", b["tmp"] / "o5"],
                           ["params/embed/embedding"]),
    "mismatched base (PEFT)": (lambda s, b: ["merge", "--base", b["other"], "--adapter",
                                             s["peft"], "--out", b["tmp"] / "o6", *SCANNED],
                               ["params/layers/up/kernel"]),
    "PEFT with wrong rules": (lambda s, b: ["merge", "--base", s["base"], "--adapter",
                                            s["peft"], "--out", b["tmp"] / "o7"],
                              ["model.layers", "--rules generic"]),
    "out exists": (lambda s, b: ["merge", "--base", s["base"], "--adapter", s["adapter"],
                                 "--out", s["base_st"]], ["already exists", "--overwrite"]),
    "mismatched base (convert)": (lambda s, b: ["convert", s["adapter"], b["tmp"] / "c1",
                                                "--to", "peft", "--base", b["other"],
                                                *SCANNED], ["another base"]),
    "convert without base": (lambda s, b: ["convert", s["peft"], b["tmp"] / "c2", "--to",
                                           "orbax", *SCANNED], ["needs --base"]),
    "convert to same format": (lambda s, b: ["convert", s["peft"], b["tmp"] / "c3", "--to",
                                             "peft"], ["already a PEFT folder"]),
    "no command": (lambda s, b: [], ["COMMAND"]),
    "unknown command": (lambda s, b: ["bogus"], ["invalid choice"]),
    "missing --out": (lambda s, b: ["merge", "--base", s["base"], "--adapter", s["adapter"]],
                      ["--out"]),
    "bad --rules": (lambda s, b: ["convert", s["adapter"], b["tmp"] / "c4", "--to", "peft",
                                  "--rules", "t5"], ["--rules", "invalid choice"]),
    "bad --to": (lambda s, b: ["convert", s["adapter"], b["tmp"] / "c5", "--to", "onnx"],
                 ["--to"]),
    "bad --layout": (lambda s, b: ["merge", "--base", s["base"], "--adapter", s["peft"],
                                   "--out", b["tmp"] / "o8", "--layout", "x=1;2"],
                     ["--layout expects"]),
    "--stack without scanned": (lambda s, b: ["convert", s["adapter"], b["tmp"] / "c6", "--to",
                                              "peft", "--stack", "params/h"],
                                ["--stack goes with --rules scanned"]),
    "bad --format for out": (lambda s, b: ["merge", "--base", s["base"], "--adapter",
                                           s["adapter"], "--out", b["tmp"] / "o9",
                                           "--format", "safetensors"], [".safetensors"]),
    # --overwrite never replaces an input, nor what jlora did not write (issue 10 item 1).
    "--out is the adapter": (lambda s, b: ["merge", "--base", s["base"], "--adapter",
                                           s["adapter"], "--out", s["adapter"], "--overwrite"],
                             ["is the input --adapter", "never replaces an input"]),
    "--out is the base": (lambda s, b: ["merge", "--base", s["base_st"], "--adapter",
                                        s["adapter"], "--out", s["base_st"], "--overwrite"],
                          ["is the input --base"]),
    "--out holds the inputs": (lambda s, b: ["merge", "--base", s["base"], "--adapter",
                                             s["adapter"], "--out", s["tmp"], "--overwrite"],
                               ["contains the input --base"]),
    "--out inside an input": (lambda s, b: ["merge", "--base", s["base"], "--adapter",
                                            s["adapter"], "--out",
                                            s["adapter"] / "merged.safetensors"],
                              ["lies inside the input --adapter"]),
    "--out is a user's folder": (lambda s, b: ["merge", "--base", s["base"], "--adapter",
                                               s["adapter"], "--out", b["user"], "--overwrite"],
                                 ["is not a base written by jlora", "refusing to replace it"]),
    "convert onto its source": (lambda s, b: ["convert", s["adapter"], s["adapter"], "--to",
                                              "peft", "--overwrite"], ["is the input SRC"]),
    "convert onto a user's folder": (lambda s, b: ["convert", s["adapter"], b["user"], "--to",
                                                   "peft", "--overwrite", *SCANNED],
                                     ["is not a PEFT folder written by jlora"]),
    "inspect a corrupted adapter": (lambda s, b: ["inspect", b["truncated"]],
                                    ["is corrupted", "truncated"]),
    "inspect a changed PEFT folder": (lambda s, b: ["inspect", b["changed"]],
                                      ["was changed after jlora wrote this folder"]),
    "quantize: targets match nothing": (lambda s, b: ["quantize", s["base_st"], b["tmp"] / "q1",
                                                      "--targets", "nothing"],
                                        ["match no parameter"]),
    "quantize: a stack without --layout": (lambda s, b: ["quantize", s["base_st"],
                                                         b["tmp"] / "q2"],
                                           ["'params/layers/out/kernel' (2, 2, 4, 8)",
                                            "--layout 'params/layers/out/kernel=IN:OUT"]),
    "quantize: bad --block-size": (lambda s, b: ["quantize", s["base_st"], b["tmp"] / "q3",
                                                 "--block-size", "48", *STACK_LAYOUTS],
                                   ["block_size must be an int, one of"]),
    "quantize: --layout matches nothing": (lambda s, b: ["quantize", s["base_st"],
                                                         b["tmp"] / "q4", "--layout",
                                                         "params/x=0:1"],
                                           ["--layout 'params/x' matches no parameter"]),
    "quantize: bad --targets": (lambda s, b: ["quantize", s["base_st"], b["tmp"] / "q5",
                                              "--targets", "("], ["not a valid regex"]),
    "quantize onto its input": (lambda s, b: ["quantize", s["base_st"], s["base_st"],
                                              "--overwrite"], ["is the input BASE"]),
    "quantize a bnb checkpoint": (lambda s, b: ["quantize", b["bnb"], b["tmp"] / "q6"],
                                  ["bitsandbytes 4-bit checkpoint", "jlora.bnb.load"]),
    "quantize: nothing new": (lambda s, b: ["quantize", b["quantized"], b["tmp"] / "q7"],
                              ["nothing to quantize", "--targets"]),
    "merge onto a bnb checkpoint": (lambda s, b: ["merge", "--base", b["bnb"], "--adapter",
                                                  s["adapter"], "--out", b["tmp"] / "o10"],
                                    ["bitsandbytes 4-bit checkpoint", "jlora.bnb.load"]),
    "a bnb checkpoint as adapter": (lambda s, b: ["merge", "--base", s["base"], "--adapter",
                                                  b["bnb"], "--out", b["tmp"] / "o11"],
                                    ["is a bitsandbytes 4-bit checkpoint", "not an adapter"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line(setup, bad, capsys, case):
  make_argv, fragments = ERRORS[case]
  rc, out, err = run(capsys, *make_argv(setup, bad))
  assert_one_line_error(rc, out, err, *fragments)
  assert (bad["user"] / "src" / "train.py").read_text() == "print('mine')"
  assert jlora.orbax.metadata(setup["adapter"])["format"] == "jlora.adapter"


def test_inspect_of_a_corrupted_adapter_prints_one_line(setup, bad):
  """No orbax log records nor asyncio tracebacks, in a fresh process either."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "jlora", "inspect", str(bad["truncated"])],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 1 and proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jlora: error: checkpoint "), proc.stderr
  assert "is corrupted" in lines[0]


def test_unexpected_errors_show_a_traceback_only_with_debug(setup, capsys, monkeypatch):
  def boom(args):
    raise RuntimeError("a bug")
  monkeypatch.setattr(jlora.orbax, "describe", boom)
  rc, out, err = run(capsys, "inspect", setup["adapter"])
  assert_one_line_error(rc, out, err, "unexpected RuntimeError: a bug", "--debug")
  with pytest.raises(RuntimeError, match="a bug"):
    cli.main(["inspect", str(setup["adapter"]), "--debug"])
  with pytest.raises(jlora.LoraError, match="does not exist"):
    cli.main(["--debug", "inspect", "/no/such/adapter"])


def test_help_and_version(capsys):
  rc, out, _ = run(capsys, "merge", "--help")
  assert rc == 0 and "--adapter" in out and "--rules" in out
  rc, out, _ = run(capsys, "--version")
  assert rc == 0 and jlora.__version__ in out


# -- the installed entry point -----------------------------------------------------


def _console_script():
  script = pathlib.Path(sys.executable).with_name("jlora")
  if not script.exists():  # an editable install made before the script was declared
    subprocess.run([sys.executable, "-m", "pip", "install", "-e",
                    str(pathlib.Path(__file__).parents[1]), "--no-deps", "-q"], check=True)
  return script


def test_console_script(setup, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([str(_console_script()), "inspect", str(setup["adapter"]), "--json"],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["spec"]["rank"] == 3
  proc = subprocess.run([sys.executable, "-m", "jlora", "inspect", str(tmp_path / "nope")],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 1 and proc.stdout == ""
  assert proc.stderr.strip().splitlines() == [f"jlora: error: '{tmp_path / 'nope'}' does not exist"]


# -- Ctrl-C -------------------------------------------------------------------------

# `python -m jlora` with one change: a real SIGINT that lands in a garbage
# collector callback (as it can in JAX's), where Python drops the
# KeyboardInterrupt with "Exception ignored" and runs on.
_IN_GC_CALLBACK = """
import gc, os, signal, sys
from jlora import cli
from jlora.cli import merge
merge_trees = merge._merge_trees
def interrupted_in_gc(*args):
  def callback(phase, info):
    gc.callbacks.remove(callback)
    os.kill(os.getpid(), signal.SIGINT)   # the handler runs here, inside the callback
    sum(range(10))
  gc.callbacks.append(callback)
  gc.collect()
  return merge_trees(*args)
merge._merge_trees = interrupted_in_gc
sys.exit(cli.main(sys.argv[1:]))
"""

# An interrupt that lands in a constructor (as in orbax's event loop, seen in
# CI) leaves half-built objects whose __del__ fails: one freed as the interrupt
# unwinds, one only when the interpreter finalizes.
_IN_A_CONSTRUCTOR = """
import os, signal
from jlora import cli
from jlora.cli import merge
merge_trees = merge._merge_trees
kept = []
class HalfBuilt:
  def __init__(self):
    unwound = HalfBuilt.__new__(HalfBuilt)
    kept.append(self)
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(10))
    self.ready = True
  def __del__(self):
    self.ready
def interrupted_in_a_constructor(*args):
  HalfBuilt()
  return merge_trees(*args)
merge._merge_trees = interrupted_in_a_constructor
cli.console()
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
  """A base and an adapter that take `jlora merge` seconds (48 kernels, 24 MiB)."""
  tmp = tmp_path_factory.mktemp("big")
  rng = np.random.default_rng(0)
  params = {f"l{i}": {"kernel": rng.standard_normal((512, 256), np.float32)} for i in range(48)}
  spec = jlora.LoraSpec(rank=4, targets=r"l\d+/kernel")
  _, trainable = jlora.lora_transform(jax.eval_shape(lambda: params), spec)
  trainable = jax.tree.map(lambda x: np.asarray(0.1 * rng.standard_normal(x.shape), x.dtype),
                           trainable)
  return (jlora.base.save(tmp / "base.safetensors", params),
          jlora.orbax.save(tmp / "adapter", trainable, spec, base=params))


def _merge_process(big, out, *python_args):
  import signal
  base, adapter = big
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(pathlib.Path(jlora.__file__).parents[1]), *os.environ.get("PYTHONPATH", "").split(
          os.pathsep)])}
  return subprocess.Popen(
      [sys.executable, *python_args, "merge", "--base", str(base), "--adapter", str(adapter),
       "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _assert_interrupted(proc, out):
  stdout, stderr = proc.communicate(timeout=300)
  assert (proc.returncode, stdout, stderr) == (130, "", "jlora: error: interrupted\n")
  assert sorted(p.name for p in out.parent.iterdir()) == []    # nothing left behind


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_ctrl_c_mid_write_exits_130_with_one_line_and_leaves_nothing(big, tmp_path, fmt):
  import signal
  import time
  out = tmp_path / "out" / ("merged.safetensors" if fmt == "safetensors" else "merged")
  out.parent.mkdir()
  proc = _merge_process(big, out, "-m", "jlora")
  deadline = time.monotonic() + 240
  while not any(out.parent.iterdir()):     # the merged model is being staged
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.001)
  proc.send_signal(signal.SIGINT)
  _assert_interrupted(proc, out)


def test_ctrl_c_caught_by_a_gc_callback_still_interrupts(big, tmp_path):
  out = tmp_path / "out" / "merged.safetensors"
  out.parent.mkdir()
  _assert_interrupted(_merge_process(big, out, "-c", _IN_GC_CALLBACK), out)


def test_ctrl_c_in_a_constructor_prints_no_traceback_of_half_built_objects(big, tmp_path):
  out = tmp_path / "out" / "merged.safetensors"
  out.parent.mkdir()
  _assert_interrupted(_merge_process(big, out, "-c", _IN_A_CONSTRUCTOR), out)
