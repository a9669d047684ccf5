"""Padded tokens of the embed stage's batches for different corpus orders (no model run: token lengths on file).

The embed stage cuts the corpus table into consecutive pieces of ``--piece`` rows and sorts each piece by token
length before batching (``--batch`` rows per forward pass); a batch costs its longest text times its rows. This
prints the padded tokens over the real tokens for the corpus in: its file order, doc-id order (ingest's order
before it sorted by length), passage length in characters (ingest's order now: ``ingest.sort_by_length``), and
an exact token-length sort (the floor, which needs the teacher's tokenizer over the whole corpus).

    .venv/bin/python bench/bench_padding.py
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def padded(lengths: np.ndarray, piece: int, batch: int) -> int:
    """Tokens the forward passes pay for: per piece, length-sorted batches, each batch its longest × its rows."""
    total = 0
    for s in range(0, len(lengths), piece):
        w = np.sort(lengths[s: s + piece])[::-1]
        for b in range(0, len(w), batch):
            total += int(w[b: b + batch].max()) * len(w[b: b + batch])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT / "data" / "scifact" / "corpus.jsonl.gz"))
    ap.add_argument("--lengths", default=str(ROOT / "bench" / "data" / "scifact_passage_token_lengths.json"))
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--piece", type=int, default=256, help="rows per embed piece (embed.rows_per_block)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    tokens = np.minimum(np.asarray(json.load(open(args.lengths))["lengths"]), args.max_length)
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    if len(docs) != len(tokens):
        raise SystemExit(f"{len(docs)} passages but {len(tokens)} token lengths")
    ids = [str(d["_id"]) for d in docs]
    chars = np.array([len((d.get("title") or "") + " " + d["text"]) for d in docs])  # ingest's passage_text
    real = int(tokens.sum())
    orders = {
        "file order": np.arange(len(docs)),
        "doc id (string) order": np.array(sorted(range(len(docs)), key=lambda i: ids[i])),
        "passage characters, longest first (ingest now)": np.lexsort((np.array(ids), -chars)),
        "exact token length (floor)": np.argsort(-tokens, kind="stable"),
    }
    print(f"{len(docs)} passages, {real:,} tokens (cap {args.max_length}); pieces of {args.piece}, batches of {args.batch}")
    for name, order in orders.items():
        p = padded(tokens[order], args.piece, args.batch)
        print(f"  {name:<48} padded tokens +{p / real - 1:.2%}")


if __name__ == "__main__":
    main()
