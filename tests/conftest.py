"""Session settings for the test suite: compile fast, and compile each program once.

Most of the suite's time is XLA:CPU compiling small programs, not running them.
Two settings, made here before any test imports JAX, and inherited through the
environment by pytest-xdist workers and by the subprocesses tests start (the
failure-injection zygotes, the multi-process workers, the benchmark scripts):

* ``--xla_backend_optimization_level=0 --xla_cpu_use_xnnpack=false
  --xla_cpu_use_fusion_emitters=false``: XLA still runs its HLO passes
  (fusion, layout, the dot rewrites that the HLO tests read), but LLVM
  compiles the kernels without optimising them, dots are not handed to
  XNNPACK (whose fusions take long to compile), and fusions are emitted
  straight to LLVM IR rather than through XLA's MLIR emitters. The tests'
  models are tiny, so the slower kernels cost far less than the compiling did
  (a sample of small programs compiled in about a third of the CPU time). The benchmark
  scripts' quick runs in tests/test_benchmarks.py and the documentation's
  code blocks (tests/test_readme.py) inherit these flags; the example (run by
  .ci/run) keeps XLA's defaults, as a user has them.
* JAX's persistent compilation cache in a directory of this run only: a
  program that several tests, workers or subprocesses compile is compiled once.
  It starts empty and is removed at the end, so no run sees another's results.

A variable set by the caller wins: ``JLORA_TEST_XLA_DEFAULTS=1`` keeps XLA's own
optimisation level (to check a failure does not depend on it), and an exported
``JAX_COMPILATION_CACHE_DIR`` is used and left in place.

With ``--dist loadfile`` (as ``.ci/run`` runs the suite), the files that
compare with PyTorch, PEFT, transformers or bitsandbytes (``TORCH_FILES``) go
to one worker as one unit, so the other workers never import those libraries
(about 8 s of CPU each). Every worker collects every file, so those files
import them at first use (``tests/lazy.py``).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_OWN_CACHE_ENV = "JLORA_TEST_OWN_CACHE"


def _configure_environment() -> None:
  if os.environ.get("JLORA_TEST_XLA_DEFAULTS") != "1":
    flags = os.environ.get("XLA_FLAGS", "")
    for flag, value in (("xla_backend_optimization_level", "0"),
                        ("xla_cpu_use_xnnpack", "false"),
                        ("xla_cpu_use_fusion_emitters", "false")):
      if flag not in flags:
        flags = f"{flags} --{flag}={value}"
    os.environ["XLA_FLAGS"] = flags.strip()
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # The controller (or a run without xdist) makes the directory; workers,
    # started after this, inherit the variable and share it.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jlora-test-jax-cache-")
    os.environ[_OWN_CACHE_ENV] = os.environ["JAX_COMPILATION_CACHE_DIR"]
  # Cache every program, however quick its compile: the small ones are most of them.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_configure_environment()


# The test files that import PyTorch (directly, or through PEFT, transformers
# or bitsandbytes); a new one belongs here, and imports them with tests/lazy.py.
TORCH_FILES = frozenset({
    "test_bnb.py", "test_gpt2_flax.py", "test_hf.py", "test_hf_tunix.py", "test_inits.py",
    "test_optim.py", "test_peft_bank.py", "test_peft_fused.py", "test_peft_gemma.py",
    "test_peft_hf.py", "test_peft_kinds.py", "test_peft_torch.py", "test_peft_tunix.py",
    "test_quant.py",
})


@pytest.hookimpl(tryfirst=True, optionalhook=True)   # optional: runs without pytest-xdist
def pytest_xdist_make_scheduler(config, log):
  """``--dist loadfile``, with ``TORCH_FILES`` as one unit of work."""
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling

  class TorchFilesTogether(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
      path = nodeid.split("::", 1)[0]
      return "PyTorch's files" if os.path.basename(path) in TORCH_FILES else path

  return TorchFilesTogether(config, log)


def pytest_unconfigure(config):
  own = os.environ.get(_OWN_CACHE_ENV)
  # Only the process that made the directory removes it (not an xdist worker).
  if own and not os.environ.get("PYTEST_XDIST_WORKER"):
    shutil.rmtree(own, ignore_errors=True)
