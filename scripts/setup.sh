#!/usr/bin/env bash
# Create .venv in the project root and install raymine with its dev tools.
# torch is pinned first (constraints.txt) so CPU machines take the CPU wheel, not a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.raymine-installed
want=$(cat pyproject.toml constraints.txt | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done"
