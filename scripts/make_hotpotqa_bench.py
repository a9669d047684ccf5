"""Build bench/data/hotpotqa_bench: a HotpotQA (distractor setting) retrieval benchmark in BEIR layout, with two
judged passages per query — the bench for training where labels are incomplete (one of the two is hidden).

FiQA-2018's corpus is not in any snapshot reachable from the build machine (see docs/benchmarks.md); HotpotQA is
the public dataset used instead: every question has exactly two gold ("supporting") Wikipedia paragraphs, and each
example carries eight distractor paragraphs retrieved for it by bigram tf-idf — hard, on-topic passages, which
are the corpus fill. Inputs (extracted first, outside the project, with ``git show COMMIT:PATH``):

    SRC/rpt_train.jsonl, SRC/rpt_dev.jsonl, SRC/rpt_test.jsonl   megagonlabs/RPT @ 693b411c, data/hotpotqa/*.jsonl
        (1,100 examples sampled by that repo from HotpotQA's official dev split, Hugging Face layout)
    SRC/flowcompile_hotpotqa_validate.jsonl   UMass-Embodied-AGI/FlowCompile @ 545c3ca5, data/hotpotqa_validate.jsonl
        (200 examples of HotpotQA's official train split, original layout)
    SRC/hipporag_hotpotqa_train.json          OSU-NLP-Group/HippoRAG @ 3d95d255, data/hotpotqa_train.json
        (100 examples of HotpotQA's official train split, original layout)

Splits (by question; no question in two splits): test = RPT's test file (500); dev (validation) = a seeded
half of RPT's dev file (150); train = everything else (the other 150 of RPT's dev file, RPT's train file, the 300
official-train examples). Corpus = every context paragraph of every kept example (title → one passage; the
first text of a title is kept, later differing texts are counted). qrels: the two supporting titles, score 1.

    python scripts/make_hotpotqa_bench.py /work/shared/hotpotqa_src --seed 13
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fiqa_bench import QRELS_HEADER, SPLITS, check_not_lfs, sha256, write_gz  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {
    "rpt_train.jsonl": "megagonlabs/RPT @ 693b411ceb7ee346fd5e050d903ffa857d23504a: data/hotpotqa/train.jsonl",
    "rpt_dev.jsonl": "megagonlabs/RPT @ 693b411ceb7ee346fd5e050d903ffa857d23504a: data/hotpotqa/dev.jsonl",
    "rpt_test.jsonl": "megagonlabs/RPT @ 693b411ceb7ee346fd5e050d903ffa857d23504a: data/hotpotqa/test.jsonl",
    "flowcompile_hotpotqa_validate.jsonl":
        "UMass-Embodied-AGI/FlowCompile @ 545c3ca540d6f017eadd0a9d3fd664b4f1d2b5ed: data/hotpotqa_validate.jsonl",
    "hipporag_hotpotqa_train.json":
        "OSU-NLP-Group/HippoRAG @ 3d95d255a8db0c1699b853cfb4fbe5056708162d: data/hotpotqa_train.json",
}


def normalise(ex: dict) -> dict:
    """One example as {id, question, gold: [title, title], context: [(title, text)]}, from either layout."""
    if "id" in ex:  # Hugging Face layout
        ctx = list(zip(ex["context"]["title"], ex["context"]["sentences"], strict=True))
        gold = ex["supporting_facts"]["title"]
        qid = ex["id"]
    else:  # the original HotpotQA layout
        ctx = [(t, s) for t, s in ex["context"]]
        gold = [t for t, _ in ex["supporting_facts"]]
        qid = ex["_id"]
    return {"id": qid, "question": ex["question"].strip(), "gold": sorted(set(gold)),
            "context": [(t, "".join(s).strip()) for t, s in ctx]}


def read(path: Path) -> list[dict]:
    check_not_lfs(path)
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return [normalise(r) for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="folder with the five input files (see the module docstring)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "data" / "hotpotqa_bench")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--n-dev", type=int, default=150, help="validation questions drawn from RPT's dev file")
    args = ap.parse_args(argv)
    command = "python scripts/make_hotpotqa_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    src: Path = args.src
    data = {name: read(src / name) for name in INPUTS}

    rng = np.random.default_rng(args.seed)
    rpt_dev = data["rpt_dev.jsonl"]
    dev_idx = set(np.sort(rng.choice(len(rpt_dev), size=args.n_dev, replace=False)).tolist())
    splits = {
        "test": data["rpt_test.jsonl"],
        "dev": [e for i, e in enumerate(rpt_dev) if i in dev_idx],
        "train": ([e for i, e in enumerate(rpt_dev) if i not in dev_idx] + data["rpt_train.jsonl"]
                  + data["flowcompile_hotpotqa_validate.jsonl"] + data["hipporag_hotpotqa_train.json"]),
    }
    seen: set[str] = set()
    dropped = {"duplicate": 0, "gold_not_in_context": 0, "not_two_gold": 0}
    kept: dict[str, list[dict]] = {}
    for split in ("test", "dev", "train"):  # test first: a question in two sources stays in test
        kept[split] = []
        for e in splits[split]:
            titles = {t for t, _ in e["context"]}
            if e["id"] in seen:
                dropped["duplicate"] += 1
            elif len(e["gold"]) != 2:
                dropped["not_two_gold"] += 1
            elif not set(e["gold"]) <= titles:
                dropped["gold_not_in_context"] += 1
            else:
                seen.add(e["id"])
                kept[split].append(e)

    # corpus: titles in first-seen order over test, dev, train; ids by sorted title (stable across seeds)
    text_of: dict[str, str] = {}
    conflicts = 0
    for split in ("test", "dev", "train"):
        for e in kept[split]:
            for t, x in e["context"]:
                if t not in text_of:
                    text_of[t] = x
                elif text_of[t] != x:
                    conflicts += 1
    doc_id = {t: f"h{i:05d}" for i, t in enumerate(sorted(text_of))}
    corpus = [json.dumps({"_id": doc_id[t], "title": t, "text": text_of[t]}, ensure_ascii=False)
              for t in sorted(text_of)]
    queries = [json.dumps({"_id": e["id"], "text": e["question"]}, ensure_ascii=False)
               for s in SPLITS for e in kept[s]]
    out: Path = args.out
    write_gz(out / "corpus.jsonl.gz", corpus)
    write_gz(out / "queries.jsonl.gz", queries)
    for s in SPLITS:
        write_gz(out / "qrels" / f"{s}.tsv.gz",
                 [QRELS_HEADER] + [f"{e['id']}\t{doc_id[t]}\t1" for e in kept[s] for t in e["gold"]])
    lines = [
        "HotpotQA (distractor setting) retrieval benchmark, BEIR layout, made by scripts/make_hotpotqa_bench.py",
        "Sources (each file extracted with git show COMMIT:PATH from a public snapshot):",
        *[f"  {name}  <- github.com/{where}\n    sha256 {sha256(src / name)}" for name, where in INPUTS.items()],
        "Licence: HotpotQA is CC BY-SA 4.0 (Yang et al., EMNLP 2018, hotpotqa.github.io); its paragraphs are from "
        "English Wikipedia (CC BY-SA). This derived subset is shared under CC BY-SA 4.0. Source repos: RPT BSD-3-Clause, "
        "FlowCompile MIT, HippoRAG MIT.",
        f"Command (from the project root): {command}",
        f"Splits: test = RPT test file; dev = {args.n_dev} of RPT's dev file drawn by numpy default_rng({args.seed}); "
        "train = the rest of RPT's dev file + RPT's train file (both sampled by RPT from HotpotQA's official dev "
        "split) + FlowCompile's and HippoRAG's files (HotpotQA's official train split).",
        "Corpus: every context paragraph (2 gold + 8 tf-idf distractors per question) of every kept question; "
        "text = the paragraph's sentences joined; id = h + rank of its title in sorted order.",
        "Counts:",
        *[f"  {s:5s}: {len(kept[s]):,} queries, {2 * len(kept[s]):,} qrels pairs (2 per query)" for s in SPLITS],
        f"  corpus: {len(corpus):,} passages; titles seen with a second, different text: {conflicts}",
        f"  examples dropped: {dropped}",
    ]
    (out / "PROVENANCE.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-6:]))


if __name__ == "__main__":
    main()
