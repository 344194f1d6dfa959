"""Helpers shared by the orbax tests: random trees, comparisons, worker processes."""

import glob
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from models import LinenLM, LMConfig

WORKER = pathlib.Path(__file__).with_name("orbax_worker.py")
TINY_LM = LMConfig(vocab=64, d_model=32, heads=4, layers=2, mlp=64, seq=16)
LM_TARGETS = r"params/layers/(query|value|out|down)/kernel|params/lm_head/kernel"


def is_lp(x):
  return isinstance(x, jlora.LoraParam)




def np_fill(tree, seed=0, scale=0.1):
  """Random arrays with the shapes and dtypes of ``tree``'s leaves (abstract or not)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray((scale * rng.standard_normal(x.shape)).astype(x.dtype)), tree)


def perturb(tree, seed=0):
  """Every trainable leaf moved off its value (B nonzero)."""
  noise = np_fill(tree, seed)
  return jax.tree.map(lambda x, n: jnp.asarray(np.asarray(x) + np.asarray(n)), tree, noise)


def assert_trees_equal(got, want):
  """Same treedef (LoraParam's scale/layout/dropout included) and bitwise-equal leaves."""
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    assert np.array_equal(np.asarray(g), np.asarray(w))


def dir_bytes(path):
  """Bytes of the files under ``path``, which a writer may be changing: a file
  listed and then removed (orbax's lock files, a rename) counts as 0."""
  total = 0
  for f in glob.glob(f"{path}/**", recursive=True):
    try:
      if os.path.isfile(f):
        total += os.path.getsize(f)
    except FileNotFoundError:
      pass
  return total


def worker_cmd(*args):
  return [sys.executable, str(WORKER), *map(str, args)]


def worker_env(**extra):
  return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


def run_worker(*args, **env):
  proc = subprocess.run(worker_cmd(*args), env=worker_env(**env), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  return proc.stdout



def make_lm():
  """A scanned Linen LM (stacked DenseGeneral kernels) with a trained-looking adapter:
  (model, tokens, params, spec, frozen, trainable)."""
  model = LinenLM(TINY_LM)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, TINY_LM.vocab, (2, 12)), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  params = np_fill(abstract)
  layouts = jlora.infer_layouts(model.apply, params, tokens)
  spec = jlora.LoraSpec(rank=4, alpha=8, targets=LM_TARGETS, rank_pattern={"down/kernel": 2},
                        alpha_pattern={"lm_head/kernel": 3.0}, use_rslora=True, init="gaussian",
                        dropout=0.1, dtype=jnp.bfloat16, extra_trainable=r"params/lm_head/bias")
  # lora_transform on the abstract tree gives the LoRA metadata; the values come from NumPy.
  _, trainable = jlora.lora_transform(abstract, spec, layouts=layouts)
  trainable = np_fill(trainable, seed=2)
  return model, tokens, params, spec, jlora.frozen_like(params, trainable), trainable


class Worker:
  """A worker process the test kills; its output is read by a thread so that
  waiting on it never blocks past the timeout."""

  def __init__(self, tmp_path, *args):
    self.log = tmp_path / f"{args[0]}.log"
    with open(self.log, "w") as log:
      self.proc = subprocess.Popen(worker_cmd(*args), env=worker_env(), stdout=subprocess.PIPE,
                                   stderr=log, text=True)
    self.lines = []
    threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

  def wait_for(self, predicate, what, timeout=120):
    start = time.time()
    while not predicate():
      if self.proc.poll() is not None or time.time() - start > timeout:
        self.kill()
        pytest.fail(f"worker {'exited' if self.proc.returncode else 'timed out'} before "
                    f"{what}: {self.lines} {self.log.read_text()[-3000:]}")
      time.sleep(0.002)

  def printed(self, prefix, times=1):
    return sum(line.startswith(prefix) for line in self.lines) >= times

  def kill(self):
    if self.proc.poll() is None:
      os.kill(self.proc.pid, signal.SIGKILL)
    self.proc.wait()
