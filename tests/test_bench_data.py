"""The committed HotpotQA bench data (bench/data/hotpotqa_bench) is what its PROVENANCE says: BEIR layout, two
judged passages per query, every judged passage in the corpus, no query in two splits."""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "data" / "hotpotqa_bench"


def _jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _qrels(path: Path) -> list[tuple[str, str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    return [tuple(line.split("\t")) for line in lines[1:]]


def test_hotpotqa_bench_is_consistent_with_its_provenance():
    corpus = _jsonl(BENCH / "corpus.jsonl.gz")
    queries = {q["_id"]: q["text"] for q in _jsonl(BENCH / "queries.jsonl.gz")}
    doc_ids = [d["_id"] for d in corpus]
    assert len(set(doc_ids)) == len(doc_ids) and all(d["text"].strip() for d in corpus)
    assert len({d["title"] for d in corpus}) == len(corpus)  # one passage per Wikipedia title
    provenance = (BENCH / "PROVENANCE.txt").read_text()
    assert f"corpus: {len(corpus):,} passages" in provenance
    seen: set[str] = set()
    for split in ("train", "dev", "test"):
        rows = _qrels(BENCH / "qrels" / f"{split}.tsv.gz")
        per_query = Counter(q for q, _, _ in rows)
        assert set(per_query.values()) == {2}, split  # two supporting paragraphs per question
        assert {d for _, d, _ in rows} <= set(doc_ids) and {s for _, _, s in rows} == {"1"}
        assert set(per_query) <= set(queries) and not set(per_query) & seen, split
        seen |= set(per_query)
        n = int(re.search(rf"{split}\s*: ([\d,]+) queries", provenance).group(1).replace(",", ""))
        assert len(per_query) == n, split
    assert seen == set(queries)
