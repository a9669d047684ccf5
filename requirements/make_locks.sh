#!/usr/bin/env bash
# Rewrite requirements/cpu.lock from the tested .venv (pip freeze minus raymine itself) and derive
# requirements/gpu.lock (the GPU image's lock) from it. Run after a tested upgrade: `make lock`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
body=$("$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i '^raymine[= @]' | grep -v '^#' \
       | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/')
{
  cat <<'HDR'
# The exact versions CI tested (Python 3.11, Linux x86_64, CPU): `.venv/bin/pip freeze` minus raymine itself,
# with the extras `cpu` (faiss-cpu) and `dev`. scripts/setup.sh installs torch first, then this file, then
# raymine with --no-deps, and runs `pip check`. Regenerate after a tested upgrade: `make lock`.
# torch==2.13.0 is the +cpu build here (the wheel in the local find-links); on PyPI's default index the
# same pin resolves to the CUDA build — see README "Install (CPU / GPU)".
HDR
  echo "$body"
} > requirements/cpu.lock
{
  cat <<'HDR'
# NOT TESTED HERE — the GPU image's lock (cluster/Dockerfile), derived from requirements/cpu.lock by
# requirements/make_locks.sh: the same pins (CI tested them on the CPU), faiss-cpu swapped for
# faiss-gpu-cu12 (extra `gpu`; needs the CUDA 12 runtime and cuBLAS of the image). torch==2.13.0 is
# installed before this file from the PyTorch CUDA index (Dockerfile ARG TORCH_INDEX_URL), so its
# nvidia-* dependencies come from that index and are not pinned here. No GPU and no image build were
# available where this lock was written: build the image and run its import check before relying on it.
HDR
  echo "$body" | sed -E 's/^faiss-cpu==.*$/faiss-gpu-cu12==1.14.1.post1/'
} > requirements/gpu.lock
echo "wrote requirements/cpu.lock ($(grep -vc '^#' requirements/cpu.lock) pins) and requirements/gpu.lock"
