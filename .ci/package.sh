#!/usr/bin/env bash
# Packaging check: build jlora's sdist and wheel, install each into a fresh
# virtualenv, and smoke-test it from outside the repository.
#
#   bash .ci/package.sh                          # with .venv/bin/python
#   PYTHON=/path/to/python bash .ci/package.sh
#
# One line per check; exits non-zero on the first failure. Temporary files go
# to a directory under $TMPDIR, removed at exit.
#
# Fast on a 2-core machine: 18 s of CPU in all; 45 s wall measured on the
# shared 2-core machine at load average 9 (72 s at load 12):
# - One build, without isolation (`python -m build --no-isolation`): the build
#   dependencies (setuptools, build) come from $PYTHON's environment, the
#   `test` extra. With no --sdist/--wheel flag, build makes the sdist and then
#   the wheel *from the unpacked sdist*, so the wheel also proves that the
#   sdist holds what a build needs.
# - The fresh virtualenvs have no pip and install nothing from an index: a
#   `.pth` file puts $PYTHON's site-packages (jax, optax, orbax, ...) after
#   their own, and $PYTHON's pip installs jlora itself into them with
#   --no-deps (`pip --python`). jlora therefore comes from the wheel or the
#   sdist alone, which the smoke test asserts (jlora.__file__ lies in the
#   fresh venv, not in the repository nor in $PYTHON's environment, whose
#   own jlora, an editable install, is not activated: a .pth file in a
#   directory named by another .pth file is not run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
PYTHON="${PYTHON:-.venv/bin/python}"
case $PYTHON in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
export JAX_PLATFORMS=cpu PIP_DISABLE_PIP_VERSION_CHECK=1

START=$SECONDS
ok() { echo "ok   $*"; }
fail() { echo "FAIL $*"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/jlora-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' jlora/_version.py)
[ -n "$VERSION" ] || fail "no __version__ in jlora/_version.py"
"$PYTHON" -c "import build, setuptools" 2>/dev/null \
  || fail "$PYTHON lacks the build dependencies: pip install 'build>=1.2' setuptools (the test extra)"

# -- build --------------------------------------------------------------------
# A copy of the tracked and new (not ignored) files, so that the build reads no
# stale build/ or *.egg-info/ of a working tree and writes nothing into it.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | xargs -0 cp --parents -t "$WORK/src" || fail "copying the source files (git ls-files)"
"$PYTHON" -m build --no-isolation --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; fail "python -m build"; }
SDIST="$WORK/dist/jlora-$VERSION.tar.gz"
WHEEL="$WORK/dist/jlora-$VERSION-py3-none-any.whl"
[ -f "$SDIST" ] && [ -f "$WHEEL" ] || fail "build made $(ls "$WORK/dist"), not jlora-$VERSION's sdist and wheel"
ok "built $(basename "$SDIST") and, from it, $(basename "$WHEEL") ($((SECONDS - START)) s)"

# What the archives hold: the sdist what a build needs (setuptools adds the
# test files too, which nothing needs), the wheel the package with its marker
# and console script, and no tests.
"$PYTHON" - "$SDIST" "$WHEEL" "$VERSION" <<'EOF' || fail "archive contents"
import sys, tarfile, zipfile
sdist, wheel, version = sys.argv[1:]
root = f"jlora-{version}/"
with tarfile.open(sdist) as t:
  names = {n[len(root):] for n in t.getnames() if n.startswith(root)}
need = {"pyproject.toml", "README.md", "jlora/__init__.py", "jlora/_version.py",
        "jlora/py.typed", "jlora/peft/__init__.py", "jlora/orbax/__init__.py"}
assert need <= names, f"the sdist lacks {sorted(need - names)}"
print(f"ok   sdist holds pyproject.toml, README.md, jlora/ with _version.py and py.typed "
      f"({sum(n.endswith('.py') for n in names)} .py files)")
with zipfile.ZipFile(wheel) as z:
  names = set(z.namelist())
  entry_points = z.read(f"jlora-{version}.dist-info/entry_points.txt").decode()
need = {"jlora/py.typed", "jlora/_version.py", "jlora/cli/__init__.py", "jlora/adapters/__init__.py"}
assert need <= names, f"the wheel lacks {sorted(need - names)}"
assert not any(n.startswith("tests/") for n in names), "the wheel holds tests/"
assert "jlora = jlora.cli:console" in entry_points, entry_points
print("ok   wheel holds jlora/py.typed and the jlora console script")
EOF

# -- install each into a fresh venv and smoke-test it -------------------------
cat >"$WORK/smoke.py" <<'EOF'
"""Run by the fresh venv's python, from outside the repository."""
import importlib.metadata as md
import pathlib
import sys

what, version, repo = sys.argv[1:]
import jax
import jax.numpy as jnp
import numpy as np

import jlora

here = pathlib.Path(jlora.__file__).resolve()
prefix = pathlib.Path(sys.prefix).resolve()
assert here.is_relative_to(prefix) and not here.is_relative_to(repo), here
print(f"ok   {what}: jlora imported from the fresh venv ({here.parent})")
assert jlora.__version__ == version == md.version("jlora"), (
    jlora.__version__, version, md.version("jlora"))
print(f"ok   {what}: jlora.__version__ == metadata version == {version}")
assert here.with_name("py.typed").is_file()
assert any(str(f) == "jlora/py.typed" for f in md.files("jlora"))
print(f"ok   {what}: jlora/py.typed installed")

rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)}
spec = jlora.LoraSpec(rank=2, alpha=4, targets=["w"])
frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
trainable = jax.tree.map(lambda t: t + 0.1, trainable)   # B off zero
x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
fn = lambda p, x: jnp.tanh(x @ p["w"])
got = jlora.lora(fn)(frozen, trainable, x)
want = fn(jlora.merge(frozen, trainable), x)
assert float(jnp.max(jnp.abs(want - fn(params, x)))) > 1e-3   # the adapter acts
np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
print(f"ok   {what}: lora_transform + lora forward == forward with merged weights")
EOF

SITE=$("$PYTHON" -c "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])" | sort -u)
mkdir "$WORK/cwd"   # the smoke tests run here, away from the repository
for kind in wheel sdist; do
  artifact=$WHEEL; [ "$kind" = sdist ] && artifact=$SDIST
  venv="$WORK/venv-$kind"
  "$PYTHON" -m venv --without-pip "$venv" || fail "$kind: python -m venv"
  vsite=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$SITE" >"$vsite/_jlora_ci_deps.pth"
  # --no-build-isolation: the sdist is built with the setuptools the .pth reaches.
  "$PYTHON" -m pip --python "$venv/bin/python" install --quiet --no-deps --no-index \
    --no-build-isolation "$artifact" >"$WORK/pip-$kind.log" 2>&1 \
    || { tail -30 "$WORK/pip-$kind.log"; fail "$kind: pip install"; }
  ok "$kind: installed into a fresh venv ($((SECONDS - START)) s)"
  (cd "$WORK/cwd" && "$venv/bin/python" "$WORK/smoke.py" "$kind" "$VERSION" "$REPO") \
    || fail "$kind: smoke test"
  out=$(cd "$WORK/cwd" && "$venv/bin/jlora" --version) || fail "$kind: jlora --version"
  [ "$out" = "jlora $VERSION" ] || fail "$kind: jlora --version printed '$out'"
  ok "$kind: the jlora console script prints '$out'"
done
ok "package check passed in $((SECONDS - START)) s"
