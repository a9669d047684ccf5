"""Seconds per MiniLM training step (forward + backward + AdamW, InfoNCE, pure torch, no Ray) for the settings
that decide the CPU demo's training time: hard negatives per row, passage length, threads, queries per step,
one concatenated forward vs queries and passages as two passes, fp32 vs bf16 autocast. SciFact texts.

    .venv/bin/python bench/bench_step_cost.py --threads 1 --batch 16 --negatives 4 --passage-len 128 --mode pair
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from raymine.config import TrainConfig  # noqa: E402
from raymine.loss import info_nce  # noqa: E402
from raymine.model import BiEncoder, pad_and_concat  # noqa: E402


def _texts(name: str, n: int) -> list[str]:
    with gzip.open(ROOT / "data" / "scifact" / f"{name}.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n), strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=4)
    ap.add_argument("--passage-len", type=int, default=128)
    ap.add_argument("--mode", choices=("pair", "concat"), default="pair")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, h = args.batch, args.negatives
    docs, queries = _texts("corpus", b * (1 + h) * args.steps), _texts("queries", b * args.steps)
    m = BiEncoder.from_config(TrainConfig(model="sentence-transformers/all-MiniLM-L6-v2", dtype=args.dtype,
                                          query_max_length=64, passage_max_length=args.passage_len))
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    times = []
    for s in range(args.steps):
        q_txt, p_txt = queries[s * b:(s + 1) * b], docs[s * b * (1 + h):(s + 1) * b * (1 + h)]
        t = time.perf_counter()
        q, p = m.tokenize(q_txt, "query"), m.tokenize(p_txt, "passage")
        if args.mode == "concat":
            e = m(**pad_and_concat([q, p], m.tokenizer.pad_token_id, m.left_padded))
            qe, pe = e[:b], e[b:]  # [B, d], [B*(1+H), d]
        else:
            qe, pe = m(**q, **{f"p_{k}": v for k, v in p.items()})
        loss = info_nce(qe, pe[:b], pe[b:].reshape(b, h, -1) if h else None)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    print(f"threads {args.threads} batch {b} negatives {h} passage_len {args.passage_len} {args.mode} {args.dtype}: "
          f"s/step after the first {[round(x, 2) for x in times[1:]]}")


if __name__ == "__main__":
    main()
