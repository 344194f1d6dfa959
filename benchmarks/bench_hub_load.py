"""Host memory while ``jlora.hf.load`` reads a ~1B-parameter checkpoint.

Writes a Llama-3.2-1B-shaped checkpoint (vocabulary 128256, width 2048, 16
layers, MLP 8192, 32 query and 8 key-value heads of 64, tied embedding: 1.24
billion parameters) with random bfloat16 weights, sharded as
``save_pretrained`` shards it, into a temporary folder that is deleted
afterwards. Then, for each mode (dense, and quantized to NF4 while loading,
double quantization), a fresh Python process loads it into an abstract
google-tunix Llama 3 and reports:

* its peak resident memory during the load (``VmHWM`` after the peak was reset
  through ``/proc/self/clear_refs``) minus its resident memory just before;
* the bound: 1.25 x the bytes of the loaded tree + the largest single tensor.

Run in the Tunix environment (docs/development.md):

    PYTHONPATH=$PWD /tmp/nnx_tunix_venv/bin/python benchmarks/bench_hub_load.py

Needs about 2.5 GB of disk and 4 GB of memory; takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

VOCAB, D, FF, LAYERS, HEADS, KV, HEAD = 128256, 2048, 8192, 16, 32, 8, 64
SHARD_BYTES = 500 * 2**20


def shapes() -> dict[str, tuple[int, ...]]:
  """PyTorch key -> shape, in the order save_pretrained writes them."""
  out = {"model.embed_tokens.weight": (VOCAB, D)}
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    out.update({p + "input_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (HEADS * HEAD, D),
                p + "self_attn.k_proj.weight": (KV * HEAD, D),
                p + "self_attn.v_proj.weight": (KV * HEAD, D),
                p + "self_attn.o_proj.weight": (D, HEADS * HEAD),
                p + "post_attention_layernorm.weight": (D,),
                p + "mlp.gate_proj.weight": (FF, D),
                p + "mlp.up_proj.weight": (FF, D),
                p + "mlp.down_proj.weight": (D, FF)})
  out["model.norm.weight"] = (D,)
  return out


def write_checkpoint(path: str) -> None:
  import torch
  from safetensors.torch import save_file
  g = torch.Generator().manual_seed(0)
  shard, size, n, weight_map = {}, 0, 0, {}

  def flush():
    nonlocal shard, size, n
    n += 1
    name = f"model-{n:05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
    shard, size = {}, 0

  for key, shape in shapes().items():
    shard[key] = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    size += shard[key].numel() * 2
    if size >= SHARD_BYTES:
      flush()
  if shard:
    flush()
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
               "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": LAYERS,
               "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD,
               "vocab_size": VOCAB, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}, f)


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(field)


def child(path: str, mode: str) -> None:
  """One load in this (fresh) process; prints a JSON line."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tunix.models.llama3 import model as llama

  import jlora
  import jlora.hf

  cfg = llama.ModelConfig(num_layers=LAYERS, vocab_size=VOCAB, embed_dim=D, hidden_dim=FF,
                          num_heads=HEADS, head_dim=HEAD, num_kv_heads=KV, rope_theta=500_000,
                          norm_eps=1e-5, weight_tying=True)
  abstract = nnx.eval_shape(lambda: llama.Llama3(cfg, rngs=nnx.Rngs(0)))
  jnp.zeros(8).block_until_ready()   # the backend started before the baseline
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")   # resets VmHWM to the current RSS
    reset = True
  except OSError:
    reset = False
  before = _status("VmRSS")
  t0 = time.perf_counter()
  model = jlora.hf.load(path, abstract, quantize=True if mode == "nf4" else None)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - t0
  peak = _status("VmHWM")
  tree = sum(int(x.nbytes) for x in leaves)
  n_nf4 = sum(isinstance(x, jlora.NF4Array) for x in jax.tree.leaves(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, jlora.NF4Array)))
  print(json.dumps({"mode": mode, "rss_before": before, "peak": peak, "tree_bytes": tree,
                    "seconds": seconds, "hwm_reset": reset, "nf4_leaves": n_nf4}))


def main() -> None:
  if len(sys.argv) == 4 and sys.argv[1] == "--child":
    return child(sys.argv[2], sys.argv[3])
  largest = max(2 * __import__("math").prod(s) for s in shapes().values())
  n_params = sum(__import__("math").prod(s) for s in shapes().values())
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}")
  tmp = tempfile.mkdtemp(prefix="jlora-hub-load-")
  try:
    t0 = time.perf_counter()
    write_checkpoint(tmp)
    print(f"checkpoint: {n_params / 1e9:.3f}B parameters, bf16, "
          f"{len([f for f in os.listdir(tmp) if f.endswith('.safetensors')])} shards, "
          f"written in {time.perf_counter() - t0:.0f} s; largest tensor {largest / 2**20:.0f} MiB")
    for mode in ("dense", "nf4"):
      out = subprocess.run([sys.executable, __file__, "--child", tmp, mode], check=True,
                           capture_output=True, text=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      used = r["peak"] - r["rss_before"]
      bound = 1.25 * r["tree_bytes"] + largest
      mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
      print(f"{mode:>5}: tree {mib(r['tree_bytes'])}, peak RSS - RSS before {mib(used)} "
            f"(= {used / r['tree_bytes']:.2f} x tree), bound 1.25 x tree + largest "
            f"{mib(bound)}: {'holds' if used <= bound else 'EXCEEDED'}; "
            f"{r['seconds']:.0f} s; NF4 leaves {r['nf4_leaves']}"
            + ("" if r["hwm_reset"] else " (VmHWM not reset: includes start-up)"))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
