# The two commands of the README:   make demo   |   make test
PY := .venv/bin/python

.PHONY: setup demo test test-slow lint bench lock

setup:
	bash scripts/setup.sh

# Set up, then mine + train + evaluate on the embedded default (local Ray, CPU, SciFact, MiniLM + BM25).
demo: setup
	$(PY) jobs/mine_and_train.py

# Set up, then run the test suite (slow and GPU tests excluded; see test-slow).
test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check raymine jobs tests bench

# After a tested upgrade of .venv: rewrite the CPU lock (exact versions, raymine itself left out) and the
# GPU image's lock derived from it (faiss-cpu swapped for faiss-gpu-cu12; torch comes from the CUDA index).
lock:
	bash requirements/make_locks.sh
