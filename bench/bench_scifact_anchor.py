"""Sanity anchor: base all-MiniLM-L6-v2 on SciFact test through raymine's mteb evaluation must reproduce
the published MTEB score (64.51 nDCG@10) within ±0.5 — if not, the evaluation is wrong, not the model.

    .venv/bin/python bench/bench_scifact_anchor.py                      # full test split (300 queries, 5,183 docs)
    .venv/bin/python bench/bench_scifact_anchor.py --max-length 256 512 # show the max-length effect side by side
    .venv/bin/python bench/bench_scifact_anchor.py --max-queries 50     # quick (seeded subset, not comparable)

The published run used sentence-transformers, whose all-MiniLM-L6-v2 truncates at 256 tokens
(sentence_bert_config.json), no prompts, mean pooling, documents as ``title + " " + text``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raymine.config import EvaluateConfig, TeacherConfig  # noqa: E402
from raymine.evaluate import evaluate_models  # noqa: E402

PUBLISHED_NDCG10 = 64.51
TOLERANCE = 0.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "scifact"), help="SciFact BEIR folder")
    ap.add_argument("--max-length", type=int, nargs="+", default=[256], help="token limits to compare")
    ap.add_argument("--max-queries", type=int, default=0, help="seeded query subset (0 = all 300)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="", help="report folder (default: a temp folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    models = {
        f"minilm_len{n}": TeacherConfig(model="sentence-transformers/all-MiniLM-L6-v2", pooling="mean",
                                        query_max_length=n, passage_max_length=n, batch_size=args.batch_size)
        for n in args.max_length
    }
    cfg = EvaluateConfig(tasks=("local",), split="test", batch_size=args.batch_size, max_queries=args.max_queries)
    out = args.out or tempfile.mkdtemp(prefix="scifact_anchor_")
    t0 = time.perf_counter()
    results = evaluate_models(models, cfg, args.data, out)
    wall = time.perf_counter() - t0
    scores = results["scifact"]
    ok = True
    print(f"SciFact test, {'all' if not args.max_queries else args.max_queries} queries; published all-MiniLM-L6-v2 "
          f"nDCG@10 = {PUBLISHED_NDCG10:.2f}")
    for label, s in scores.items():
        ndcg = s["ndcg_at_10"] * 100
        delta = ndcg - PUBLISHED_NDCG10
        verdict = "OK" if abs(delta) <= TOLERANCE else "MISS"
        if label == "minilm_len256" and verdict == "MISS":
            ok = False
        print(f"  {label:16s} nDCG@10 {ndcg:6.2f}  Δ {delta:+.2f}  recall@100 {s['recall_at_100'] * 100:6.2f}  "
              f"MRR@10 {s['mrr_at_10'] * 100:6.2f}  [{verdict}]")
    print(f"wall {wall:.1f} s; report in {out}")
    return 0 if ok or args.max_queries else 1


if __name__ == "__main__":
    sys.exit(main())
