"""Mixed-adapter batches: a bank of adapters against one adapter, side by side.

One process, one model (the decoder-only LM of models.py: d_model 512, 4
layers, LoRA on q, k, v, o, up, down, 2048 tokens a batch). For 4 and for 16
adapters (ranks 8 to 16, each example its own adapter, the batch split over
all of them), each of the bank's three ways to compute a mixed batch
(``gather``, ``segment``, ``masked``) is timed against the same batch through
one adapter of rank 16: the forward and the AdamW train step. Rounds
alternate between all variants, so drift in machine load hits all alike;
medians are reported. A decode-shaped forward (one token per example)
shows where each way wins when examples are short.

``--peft`` also times PEFT's own mixed-batch inference
(``model(x, adapter_names=[...])``, which loops over sub-batches) against
its single-adapter forward on the same model, in PyTorch (run after the JAX
rounds, in the same process, with as many threads as cores).

``--against REV`` times another git revision's jlora (imported under another
package name) beside this tree's in the same process and the same
interleaved rounds, variant by variant: drift in machine load between two
processes moved the one-adapter baseline by up to 23%, which hid changes of
a few percent.

    python benchmarks/bench_bank.py [--quick] [--rounds 10] [--peft] [--json out.json]
    python benchmarks/bench_bank.py --against ca3b76a [--rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import harness  # noqa: E402
import jlora  # noqa: E402
import models  # noqa: E402

TARGETS = r".*/(q|k|v|o|up|down)/kernel"
STRATEGIES = ("gather", "segment", "masked")


def _xent(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _adapters(params, n, key=0, lib=jlora):
  """n trainable trees, ranks cycling through 8..16, B made non-zero."""
  out = {}
  for k in range(n):
    rank = (8, 12, 16, 10)[k % 4]
    spec = lib.LoraSpec(rank=rank, alpha=2.0 * rank, targets=TARGETS)
    frozen, t = lib.lora_transform(params, spec, key=jax.random.key(key + k))
    out[f"adapter{k}"] = jax.tree_util.tree_map(lambda x: x + 1e-3, t)
  return frozen, out


def _mixed_batch(model, frozen, single, trees, tokens, targets, ids, variants, label,
                 with_steps=True, lib=jlora, strategies=STRATEGIES):
  """Adds the variants of one mixed batch (bound to this batch's arrays), made
  with ``lib`` (this tree's jlora, or another revision's with --against)."""
  bank = lib.stack_adapters(trees)
  extra = {"lora_adapter_ids": ids}

  def fwd(apply, t, **kw):
    return apply(frozen, t, tokens, **kw)

  def step(apply, tx, t, state, **kw):
    loss, g = jax.value_and_grad(lambda t: _xent(apply(frozen, t, tokens, **kw), targets))(t)
    updates, state = tx.update(g, state, t, **kw)
    return optax.apply_updates(t, updates), state, loss

  apply1 = lib.lora(model.apply)
  tx1 = lib.optimizer(optax.adamw(1e-4), single)
  txb = lib.optimizer(optax.adamw(1e-4), bank)
  variants[(label, "single", "forward")] = (jax.jit(lambda t: fwd(apply1, t)), (single,))
  if with_steps:
    variants[(label, "single", "step")] = (
        jax.jit(lambda t, s: step(apply1, tx1, t, s)), (single, tx1.init(single)))
  for how in strategies:
    applyb = lib.lora(model.apply, bank_dot=how)
    f = jax.jit(lambda t, applyb=applyb: fwd(applyb, t, **extra))
    # Correctness first: an example equals its own adapter's merged model.
    got = f(bank)
    for e in (0, tokens.shape[0] - 1):
      merged = lib.merge(frozen, bank, adapter=f"adapter{int(ids[e])}")
      err = float(jnp.max(jnp.abs(got[e:e + 1] - model.apply(merged, tokens[e:e + 1]))))
      assert err < 1e-3, (label, how, e, err)
    variants[(label, how, "forward")] = (f, (bank,))
    if with_steps:
      variants[(label, how, "step")] = (
          jax.jit(lambda t, s, applyb=applyb: step(applyb, txb, t, s, **extra)),
          (bank, txb.init(bank)))


def _batches(cfg: models.ModelConfig, n_adapters: tuple[int, ...], decode: bool) -> list:
  """(label, adapters, tokens, targets, ids) of each mixed batch: the training
  batches split over n adapters, then (``decode``) one token per example, 64
  examples over 16 adapters (no targets: forward only)."""
  out = []
  for n in n_adapters:
    batch = max(cfg.batch, n)
    seq = cfg.batch * cfg.seq_len // batch
    data = models.make_batches(dataclasses.replace(cfg, batch=batch, seq_len=seq), 1)
    tokens, targets = (jnp.asarray(a[0]) for a in data)
    out.append((n, n, tokens, targets, jnp.arange(batch, dtype=jnp.int32) % n))
  if decode:
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab, (64, 1)), jnp.int32)
    out.append(("decode", 16, tokens, None, jnp.arange(64, dtype=jnp.int32) % 16))
  return out


def run(cfg: models.ModelConfig, n_adapters: tuple[int, ...], rounds: int,
        decode: bool = True) -> dict:
  model = models.LinenLM(cfg)
  params = jax.tree.map(jnp.asarray, {"params": models.to_linen(models.init_params(cfg))})
  spec = jlora.LoraSpec(rank=16, alpha=32, targets=TARGETS)
  frozen, single = jlora.lora_transform(params, spec, key=jax.random.key(0))
  single = jax.tree_util.tree_map(lambda x: x + 1e-3, single)
  results, variants = {}, {}
  for label, n, tokens, targets, ids in _batches(cfg, n_adapters, decode):
    _mixed_batch(model, frozen, single, _adapters(params, n)[1], tokens, targets, ids,
                 variants, label, with_steps=targets is not None)
    batch, seq = tokens.shape
    results[label] = {"batch": batch, "seq": seq, "auto": jlora.interpret.bank_term.choose(
        "auto", examples=batch, rows=batch * seq, adapters=n, rank=16,
        platform=jax.default_backend())}

  med = harness.interleaved({k: functools.partial(f, *args) for k, (f, args) in variants.items()},
                            rounds, block=jax.block_until_ready)
  table = []
  for n in list(n_adapters) + (["decode"] if decode else []):
    for what in ("forward", "step"):
      base = med.get((n, "single", what))
      if base is None:
        continue
      row = {"adapters": n, "what": what, "single_ms": base * 1e3,
             "auto": results[n]["auto"], **{k: results[n][k] for k in ("batch", "seq")}}
      for how in STRATEGIES:
        row[f"{how}_ms"] = med[(n, how, what)] * 1e3
        row[f"{how}_ratio"] = med[(n, how, what)] / base
      table.append(row)
  return {"machine": harness.machine(), "machine_info": harness.machine_info(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "rounds": rounds, "rows": table}


def load_revision(rev: str):
  """jlora as of git revision ``rev``, as a package named ``jlora_at_<rev>``
  (every ``jlora`` in its sources renamed), importable beside this tree's."""
  name = "jlora_at_" + re.sub(r"\W", "_", rev)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  archive = subprocess.run(["git", "-C", repo, "archive", rev, "jlora"], check=True,
                           capture_output=True).stdout
  root = tempfile.mkdtemp(prefix="jlora-revision-")
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    tar.extractall(root, filter="data")
  os.rename(os.path.join(root, "jlora"), os.path.join(root, name))
  for folder, _, files in os.walk(os.path.join(root, name)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        with open(path, encoding="utf-8") as src:
          text = re.sub(r"\bjlora\b", name, src.read())
        with open(path, "w", encoding="utf-8") as dst:
          dst.write(text)
  sys.path.insert(0, root)
  return importlib.import_module(name)


def run_against(cfg: models.ModelConfig, rev: str, n_adapters: tuple[int, ...], rounds: int,
                decode: bool = True, strategies=("gather", "masked")) -> dict:
  """This tree's banks against revision ``rev``'s, in one process and rounds."""
  libs = {"this": jlora, rev: load_revision(rev)}
  model = models.LinenLM(cfg)
  params = jax.tree.map(jnp.asarray, {"params": models.to_linen(models.init_params(cfg))})
  batches = _batches(cfg, n_adapters, decode)
  variants = {}
  for tag, lib in libs.items():
    spec = lib.LoraSpec(rank=16, alpha=32, targets=TARGETS)
    frozen, single = lib.lora_transform(params, spec, key=jax.random.key(0))
    single = jax.tree_util.tree_map(lambda x: x + 1e-3, single)
    for label, n, tokens, targets, ids in batches:
      _mixed_batch(model, frozen, single, _adapters(params, n, lib=lib)[1], tokens, targets,
                   ids, variants, (label, tag), with_steps=targets is not None, lib=lib,
                   strategies=strategies)
  med = harness.interleaved({k: functools.partial(f, *args) for k, (f, args) in variants.items()},
                            rounds, block=jax.block_until_ready)
  rows = []
  for n, *_ in batches:
    for what in ("forward", "step"):
      if ((n, "this"), "single", what) not in med:
        continue
      for how in ("single",) + tuple(strategies):
        this, then = med[((n, "this"), how, what)], med[((n, rev), how, what)]
        rows.append({"adapters": n, "what": what, "how": how, "this_ms": this * 1e3,
                     "rev_ms": then * 1e3, "this_over_rev": this / then,
                     "ratio_this": this / med[((n, "this"), "single", what)],
                     "ratio_rev": then / med[((n, rev), "single", what)]})
  return {"machine": harness.machine(), "machine_info": harness.machine_info(),
          "jax": jax.__version__, "backend": jax.default_backend(), "rounds": rounds,
          "against": rev, "rows": rows}


def run_peft(cfg: models.ModelConfig, n: int, rounds: int) -> dict:
  """PEFT's mixed-batch inference (adapter_names=) against its single adapter."""
  import peft
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  base = models.TorchLM(cfg)
  models.load_torch(base, models.init_params(cfg))
  model = None
  for k in range(n):
    rank = (8, 12, 16, 10)[k % 4]
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(models.PROJ_NAMES),
                             init_lora_weights=False)
    if model is None:
      model = peft.get_peft_model(base, config, adapter_name=f"adapter{k}")
    else:
      model.add_adapter(f"adapter{k}", config)
  model.eval()
  batch = max(cfg.batch, n)
  seq = cfg.batch * cfg.seq_len // batch
  x = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab, (batch, seq)))
  names = [f"adapter{i % n}" for i in range(batch)]
  model.set_adapter("adapter2")
  with torch.no_grad():
    med = harness.interleaved({"single": lambda: model(x),
                               "mixed": lambda: model(x, adapter_names=names)}, rounds)
  return {"adapters": n, "batch": batch, "seq": seq, "single_ms": med["single"] * 1e3,
          "mixed_ms": med["mixed"] * 1e3, "ratio": med["mixed"] / med["single"],
          "torch": torch.__version__, "peft": peft.__version__}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="tiny sizes, 4 adapters, no decode shape: a smoke test")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--peft", action="store_true", help="also time PEFT's mixed batches")
  ap.add_argument("--json", default=None)
  ap.add_argument("--against", metavar="REV", default=None,
                  help="time git revision REV's banks beside this tree's, in one process")
  args = ap.parse_args(argv)
  cfg = models.ModelConfig.quick() if args.quick else models.ModelConfig()
  rounds = min(args.rounds, 2) if args.quick else args.rounds   # --quick caps --rounds at 2
  if args.against:
    res = run_against(cfg, args.against, (4,) if args.quick else (4, 16), rounds,
                      decode=not args.quick)
    print(f"jlora banks, this tree against {args.against}, on {res['machine']}, jax "
          f"{res['jax']} ({res['backend']}), median of {rounds} interleaved rounds; "
          f"ratio = bank / one adapter of the same tree")
    print(f"{'adapters':>9}{'what':>9}{'how':>8}{args.against:>12}{'this':>10}{'this/rev':>10}"
          f"{'ratio rev':>11}{'ratio this':>11}")
    for row in res["rows"]:
      print(f"{row['adapters']!s:>9}{row['what']:>9}{row['how']:>8}{row['rev_ms']:>10.1f}ms"
            f"{row['this_ms']:>8.1f}ms{row['this_over_rev']:>10.3f}{row['ratio_rev']:>11.3f}"
            f"{row['ratio_this']:>11.3f}")
    harness.write_json(args.json, res)
    return res
  res = run(cfg, (4,) if args.quick else (4, 16), rounds, decode=not args.quick)
  print(f"jlora banks on {res['machine']}, jax {res['jax']} ({res['backend']}), "
        f"median of {rounds} interleaved rounds; ratio = bank / one adapter")
  head = f"{'adapters':>9}{'what':>9}{'batch':>7}{'one':>9}"
  head += "".join(f"{h:>17}" for h in STRATEGIES) + f"{'auto':>9}"
  print(head)
  for row in res["rows"]:
    line = (f"{row['adapters']!s:>9}{row['what']:>9}{row['batch']:>4}x{row['seq']:<3}"
            f"{row['single_ms']:>7.1f}ms")
    line += "".join(f"{row[f'{h}_ms']:>9.1f}ms {row[f'{h}_ratio']:>5.2f}" for h in STRATEGIES)
    print(line + f"{row['auto']:>9}")
  if args.peft:
    res["peft"] = [run_peft(cfg, n, rounds) for n in (4, 16)]
    for row in res["peft"]:
      print(f"PEFT {row['peft']} mixed batch over {row['adapters']} adapters "
            f"({row['batch']}x{row['seq']}): {row['mixed_ms']:.1f} ms against one adapter "
            f"{row['single_ms']:.1f} ms: ratio {row['ratio']:.2f}")
  harness.write_json(args.json, res)
  return res


if __name__ == "__main__":
  main()
