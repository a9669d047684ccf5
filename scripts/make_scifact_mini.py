"""Build tests/data/scifact_mini: a small, deterministic SciFact subset in BEIR layout for fast end-to-end tests.

40 train + 20 test queries with all their positives, plus other documents up to 400 in all.
    python scripts/make_scifact_mini.py
"""
from __future__ import annotations

import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "data" / "scifact"
DST = ROOT / "tests" / "data" / "scifact_mini"


def read_jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_qrels(path: Path) -> list[tuple[str, str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [tuple(r) for r in rows[1:]]


def main(n_train: int = 40, n_test: int = 20, n_docs: int = 400, seed: int = 0) -> None:
    rng = random.Random(seed)
    corpus = read_jsonl(SRC / "corpus.jsonl.gz")
    queries = {q["_id"]: q for q in read_jsonl(SRC / "queries.jsonl.gz")}
    keep_docs: set[str] = set()
    out_qrels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        qrels = read_qrels(SRC / "qrels" / f"{split}.tsv.gz")
        by_q = defaultdict(list)
        for q, d, s in qrels:
            by_q[q].append((q, d, s))
        chosen = sorted(rng.sample(sorted(by_q), n))
        out_qrels[split] = [r for q in chosen for r in by_q[q]]
        keep_docs |= {d for _, d, _ in out_qrels[split]}
    others = [d["_id"] for d in corpus if d["_id"] not in keep_docs]
    keep_docs |= set(rng.sample(others, n_docs - len(keep_docs)))
    (DST / "qrels").mkdir(parents=True, exist_ok=True)
    with open(DST / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in corpus:
            if d["_id"] in keep_docs:
                f.write(json.dumps(d) + "\n")
    qids = {q for rows in out_qrels.values() for q, _, _ in rows}
    with open(DST / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid in sorted(qids, key=int):
            f.write(json.dumps(queries[qid]) + "\n")
    for split, rows in out_qrels.items():
        with open(DST / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines("\t".join(r) + "\n" for r in rows)
    (DST / "PROVENANCE.txt").write_text(
        "A deterministic subset of data/scifact (see its PROVENANCE.txt; CC BY 4.0 / ODC-By 1.0),\n"
        "made by scripts/make_scifact_mini.py for fast end-to-end tests.\n")


if __name__ == "__main__":
    main()
