#!/usr/bin/env bash
# Create a venv (default .venv in the project root) with the exact versions CI tested:
#   1. torch==2.13.0 first (constraints.txt), so the CPU wheel is taken where one is offered;
#      TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU build on a stock Linux machine,
#      where PyPI's torch==2.13.0 is the multi-GB CUDA build;
#   2. requirements/cpu.lock (every other dependency pinned: the core, the `cpu` extra = faiss-cpu, `dev`);
#   3. raymine itself, editable, with --no-deps (the lock already holds its dependencies);
#   4. pip check.
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv), TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=requirements/cpu.lock
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.raymine-installed
want=$(cat pyproject.toml constraints.txt "$LOCK" scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" install --quiet -c constraints.txt --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
else
  "${pip[@]}" install --quiet -c constraints.txt "torch==2.13.0"
fi
"${pip[@]}" install --quiet -c constraints.txt -r "$LOCK"
"${pip[@]}" install --quiet --no-deps -e .
"${pip[@]}" check
echo "$want" > "$stamp"
echo "setup: done ($VENV)"
