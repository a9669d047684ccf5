"""Build data/fiqa_bench: a seeded FiQA-2018 (BEIR "fiqa") subset in BEIR layout.

Input: a folder holding the BEIR files, extracted first (outside the project) from a
public snapshot, e.g. with ``git --git-dir=DIR show COMMIT:fiqa/corpus.jsonl > /tmp/fiqa_src/corpus.jsonl``:

    SRC/corpus.jsonl  SRC/queries.jsonl  SRC/qrels/{train,dev,test}.tsv

Output (every file gzip'd with mtime=0 and no stored name, so a rerun with the same seed is
byte-identical):

    OUT/corpus.jsonl.gz  OUT/queries.jsonl.gz  OUT/qrels/{train,dev,test}.tsv.gz  OUT/PROVENANCE.txt

Sizing (defaults): 1,000 train queries drawn uniformly from the queries of the train qrels,
200 dev queries likewise, every test query; the corpus keeps every document judged for a kept
query, plus a seeded random fill of other documents up to 10,000 in all; queries.jsonl keeps
only the kept queries. Lines are copied verbatim from the source and keep its order.

    python scripts/make_fiqa_bench.py /tmp/fiqa_src --seed 13 \\
        --source-repo OWNER/NAME --source-commit SHA --licence "..."
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "dev", "test")
QRELS_HEADER = "query-id\tcorpus-id\tscore"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_not_lfs(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        sys.exit(f"{path} is a Git LFS pointer, not the data")


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    """(_id, verbatim line without newline) for each non-empty line, in file order."""
    check_not_lfs(path)
    rows = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            _id = str(json.loads(line)["_id"])
            if _id in seen:
                sys.exit(f"{path}: duplicate _id {_id!r}")
            seen.add(_id)
            rows.append((_id, line))
    return rows


def read_qrels(path: Path) -> list[tuple[str, str, str]]:
    check_not_lfs(path)
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\r\n") for ln in f if ln.strip()]
    if lines[0].split("\t") != QRELS_HEADER.split("\t"):
        sys.exit(f"{path}: unexpected header {lines[0]!r}")
    rows = []
    for n, ln in enumerate(lines[1:], start=2):
        parts = ln.split("\t")
        if len(parts) != 3:
            sys.exit(f"{path}:{n}: expected 3 tab-separated fields, got {ln!r}")
        rows.append((parts[0], parts[1], parts[2]))
    return rows


def id_key(x: str) -> tuple[int, int | str]:
    """Numeric ids first in numeric order, then any others as strings (a stable total order)."""
    return (0, int(x)) if x.isdigit() else (1, x)


def write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write("".join(line + "\n" for line in lines).encode("utf-8"))
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "src", type=Path, help="folder with corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "fiqa_bench")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--n-train", type=int, default=1000, help="train queries to keep")
    ap.add_argument("--n-dev", type=int, default=200, help="dev queries to keep")
    ap.add_argument("--n-test", type=int, default=-1, help="test queries to keep (-1: all)")
    ap.add_argument("--n-docs", type=int, default=10_000, help="corpus size after the random fill")
    ap.add_argument("--source-repo", default="(not given)", help="github owner/name the inputs came from")
    ap.add_argument("--source-commit", default="(not given)")
    ap.add_argument(
        "--source-paths", default="fiqa/corpus.jsonl, fiqa/queries.jsonl, fiqa/qrels/{train,dev,test}.tsv"
    )
    ap.add_argument("--licence", default="(not given)", help="licence statement copied into PROVENANCE.txt")
    args = ap.parse_args(argv)
    command = "python scripts/make_fiqa_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    src: Path = args.src
    rng = np.random.default_rng(args.seed)
    corpus = read_jsonl(src / "corpus.jsonl")
    queries = read_jsonl(src / "queries.jsonl")
    corpus_ids = {d for d, _ in corpus}
    query_ids = {q for q, _ in queries}

    wanted = {"train": args.n_train, "dev": args.n_dev, "test": args.n_test}
    out_qrels: dict[str, list[tuple[str, str, str]]] = {}
    stats: dict[str, dict[str, int]] = {}
    kept_queries: set[str] = set()
    judged: set[str] = set()
    for split in SPLITS:  # fixed order: the RNG stream depends on it
        rows = read_qrels(src / "qrels" / f"{split}.tsv")
        by_q: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for r in rows:
            by_q[r[0]].append(r)
        pool = sorted(by_q, key=id_key)
        n = len(pool) if wanted[split] < 0 else wanted[split]
        if n > len(pool):
            sys.exit(f"{split}: asked for {n} queries, the qrels have {len(pool)}")
        idx = np.sort(rng.choice(len(pool), size=n, replace=False)) if n < len(pool) else np.arange(n)
        chosen = {pool[i] for i in idx.tolist()}
        if chosen & kept_queries:
            sys.exit(f"{split}: query ids shared with an earlier split: {sorted(chosen & kept_queries)[:5]}")
        missing_q = chosen - query_ids
        if missing_q:
            sys.exit(f"{split}: {len(missing_q)} kept queries absent from queries.jsonl")
        out_qrels[split] = [r for r in rows if r[0] in chosen]  # source order
        docs = {d for _, d, _ in out_qrels[split]}
        missing_d = docs - corpus_ids
        if missing_d:
            sys.exit(f"{split}: {len(missing_d)} judged docs absent from corpus.jsonl")
        pos = defaultdict(int)
        for q, _, s in out_qrels[split]:
            if float(s) > 0:
                pos[q] += 1
        stats[split] = {
            "pool": len(pool),
            "queries": len(chosen),
            "pairs": len(out_qrels[split]),
            "multi_pos": sum(1 for q in chosen if pos[q] >= 2),
            "docs": len(docs),
        }
        kept_queries |= chosen
        judged |= docs

    if args.n_docs < len(judged):
        sys.exit(f"--n-docs {args.n_docs} is below the {len(judged)} judged docs")
    others = [d for d, _ in corpus if d not in judged]  # source order
    n_fill = min(args.n_docs - len(judged), len(others))
    fill_idx = rng.choice(len(others), size=n_fill, replace=False) if n_fill else np.empty(0, dtype=int)
    keep_docs = judged | {others[i] for i in fill_idx.tolist()}

    out: Path = args.out
    write_gz(out / "corpus.jsonl.gz", [line for d, line in corpus if d in keep_docs])
    write_gz(out / "queries.jsonl.gz", [line for q, line in queries if q in kept_queries])
    for split in SPLITS:
        write_gz(out / "qrels" / f"{split}.tsv.gz", [QRELS_HEADER] + ["\t".join(r) for r in out_qrels[split]])

    files = ["corpus.jsonl.gz", "queries.jsonl.gz"] + [f"qrels/{s}.tsv.gz" for s in SPLITS]
    inputs = ["corpus.jsonl", "queries.jsonl"] + [f"qrels/{s}.tsv" for s in SPLITS]
    lines = [
        'FiQA-2018 (BEIR "fiqa") benchmark subset, BEIR layout, made by scripts/make_fiqa_bench.py',
        f"Source: github.com/{args.source_repo} @ {args.source_commit}",
        f"  paths: {args.source_paths}",
        f"  full source: corpus {len(corpus):,} docs, queries {len(queries):,}; "
        + ", ".join(f"{s} qrels {stats[s]['pool']:,} queries" for s in SPLITS),
        "  sha256 of the inputs:",
        *[f"    {p}  {sha256(src / p)}" for p in inputs],
        f"Licence: {args.licence}",
        f"Command (from the project root; SRC extracted with git show): {command}",
        f"Sampling: numpy default_rng({args.seed}); per split, in order train, dev, test, queries drawn "
        "uniformly without replacement from the qrels' query ids (sorted numerically); then the corpus "
        "fill drawn uniformly from the non-judged docs. Lines copied verbatim, source order kept.",
        "Counts:",
        *[
            f"  {s:5s}: {stats[s]['queries']:,} queries, {stats[s]['pairs']:,} qrels pairs, "
            f"{stats[s]['multi_pos']:,} queries with >= 2 positives, {stats[s]['docs']:,} judged docs"
            for s in SPLITS
        ],
        f"  corpus: {len(keep_docs):,} docs = {len(judged):,} judged + {n_fill:,} random fill; "
        f"queries.jsonl: {len(kept_queries):,}",
        "Output files (bytes, sha256):",
        *[f"  {p}  {(out / p).stat().st_size:,}  {sha256(out / p)}" for p in files],
    ]
    (out / "PROVENANCE.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
