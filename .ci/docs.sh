#!/usr/bin/env bash
# Builds the documentation site strictly (a broken link, anchor or reference,
# or a page missing from the nav, fails), into a temporary folder that is
# removed afterwards. Needs the `docs` extra: pip install -e ".[docs]".
#
#   bash .ci/docs.sh                          # with .venv/bin/python
#   PYTHON=/path/to/python bash .ci/docs.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
# mkdocs-material prints a banner about MkDocs 2.0, which this site does not use.
export NO_MKDOCS_2_WARNING=1
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
"$PYTHON" -m mkdocs build --strict -d "$out"
echo "== docs built in $(( $(date +%s) - start )) s"
