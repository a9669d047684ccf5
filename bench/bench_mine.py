"""Mining throughput on the production path: ``raymine.mine.mine_batch`` on joined Arrow batches.

Times exactly what the mine stage's ``map_batches`` calls: a joined Arrow batch (``query_id``, ``query``
and each teacher's ``positive_ids/positive_scores/excluded_ids/candidate_ids/candidate_scores`` with
string ids) in, the mined Arrow batch (negatives, reasons, report columns) out. 1 and 2 teachers,
intra-sample (no-dedup, dedup) and cross-sample, ``top1_sampled``. Prints queries/s per core from this
process's CPU time (robust when other jobs share the cores) and from wall time, for the current code
and, side by side, the ``mine_batch`` of an earlier commit (loaded from git, default: the last commit
before the vectorised version) on the same batches.

    .venv/bin/python bench/bench_mine.py                        # 100k queries, k=100, batches of 1024
    .venv/bin/python bench/bench_mine.py --queries 200000 --batch 4096 --before-queries 4000
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from raymine import columns as C
from raymine import mine as M
from raymine.config import MineConfig

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "1fa81e3"  # last commit with the per-row mine_batch


def make_table(rng: np.random.Generator, nq: int, k: int, teachers: list[str], corpus: int = 5_000_000,
               in_search: bool = False) -> pa.Table:
    """A joined batch like the stage builds: k string candidate ids per query and teacher (scores descending,
    uniform in [-0.2, 0.95)), 1..5 positives (each among the first 20 candidates with probability 1/2), one
    excluded id (the 26th candidate) for a third of the queries; the second teacher shares ~half of the
    first's candidates in another order. Positive scores in [0.5, 0.95) (PercPos drops part of each list).

    ``in_search``: what an exact search that applied the ceiling itself returns — candidates below every
    ceiling (scores in [-0.2, 0.8), positives in [0.9, 0.95)) and no positive among them."""
    qids = [f"q{i}" for i in range(nq)]
    cols: dict[str, pa.Array] = {C.QUERY_ID: pa.array(qids), C.QUERY: pa.array([f"text {q}" for q in qids])}
    base = rng.integers(0, corpus, size=(nq, k))
    for ti, t in enumerate(teachers):
        ids = base.copy()
        if ti:
            ids[:, 1::2] = rng.integers(0, corpus, size=(nq, len(range(1, k, 2))))
            ids = ids[:, rng.permutation(k)]
        top = 0.8 if in_search else 0.95
        scores = -np.sort(-rng.uniform(-0.2, top, size=(nq, k)).astype(np.float32), axis=1)  # [nq, k]
        npos = rng.integers(1, 6, size=nq)
        pos, pos_sc, exc = [], [], []
        for i in range(nq):
            p = [f"d{x}" for x in rng.integers(0, corpus, size=npos[i])]
            for j in range(npos[i]):
                if not in_search and rng.random() < 0.5:
                    p[j] = f"d{ids[i, rng.integers(0, 20)]}"
            pos.append(p)
            pos_sc.append(rng.uniform(0.9 if in_search else 0.5, 0.95, size=npos[i]).astype(np.float32))
            exc.append([f"d{ids[i, 25]}"] if i % 3 == 0 else [])
        flat = pa.array([f"d{x}" for x in ids.ravel()])
        off = pa.array(np.arange(0, nq * k + 1, k, dtype=np.int32))
        cols[f"{C.POSITIVE_IDS}@{t}"] = pa.array(pos, pa.list_(pa.string()))
        cols[f"{C.POSITIVE_SCORES}@{t}"] = pa.array(pos_sc, pa.list_(pa.float32()))
        cols[f"{C.EXCLUDED_IDS}@{t}"] = pa.array(exc, pa.list_(pa.string()))
        cols[f"{C.CANDIDATE_IDS}@{t}"] = pa.ListArray.from_arrays(off, flat)
        cols[f"{C.CANDIDATE_SCORES}@{t}"] = pa.ListArray.from_arrays(off, pa.array(scores.ravel()))
        cols[f"{C.ABOVE_CEILING}@{t}"] = pa.array(rng.integers(0, 50, size=nq))
    return pa.table(cols)


def load_before(rev: str):
    """``raymine.mine`` as of ``rev`` (with that revision's filters/sampling/ensemble), or None."""
    tmp = Path(tempfile.mkdtemp(prefix="raymine_before_"))
    pkg = tmp / "raymine_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    try:
        for mod in ("filters", "sampling", "ensemble", "mine"):
            src = subprocess.run(["git", "show", f"{rev}:raymine/{mod}.py"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout
            for dep in ("filters", "sampling", "ensemble"):
                src = src.replace(f"from raymine import {dep} as", f"from raymine_before import {dep} as")
            (pkg / f"{mod}.py").write_text(src)
        sys.path.insert(0, str(tmp))
        spec = importlib.util.find_spec("raymine_before.mine")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except Exception as e:  # an old revision that no longer imports against today's modules
        print(f"(before: {rev} not loadable: {e})")
        return None


def timed(fn, tables, cfg, teachers, ensemble) -> tuple[float, float, int]:
    fn(tables[0].slice(0, 64), cfg, teachers, ensemble)  # warm-up
    t, c = time.perf_counter(), time.process_time()
    nq = 0
    for b in tables:
        fn(b, cfg, teachers, ensemble)
        nq += b.num_rows
    return nq / (time.process_time() - c), nq / (time.perf_counter() - t), nq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch", type=int, default=MineConfig().batch_size, help="rows per mine_batch call")
    ap.add_argument("--before", default=BEFORE, help="git revision timed side by side ('' to skip)")
    ap.add_argument("--before-queries", type=int, default=3000, help="queries timed on the before version")
    ap.add_argument("--in-search-ceiling", action="store_true",
                    help="candidates as an exact search with the ceiling applied returns them (no method drops)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    whole = make_table(rng, args.queries, args.k, ["A", "B"], in_search=args.in_search_ceiling)
    tables = [whole.slice(s, args.batch) for s in range(0, args.queries, args.batch)]
    few = [whole.slice(s, args.batch) for s in range(0, min(args.queries, args.before_queries), args.batch)]
    before = load_before(args.before) if args.before else None
    base = dataclasses.replace(MineConfig(), method="percpos", perc=0.95, num_negatives=4, sampling="top1_sampled",
                               sample_top_k=10)
    print(f"queries={args.queries} k={args.k} batch={args.batch} string ids, percpos 0.95, top1_sampled(k=10), "
          f"4 negatives, {'in-search ceiling' if args.in_search_ceiling else 'ceiling applied here'}; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("q/s (cpu) = queries per second of this process's CPU time (one core); wall = elapsed")
    print(f"{'teachers':<9}{'ensemble':<24}{'now q/s cpu':>13}{'now q/s wall':>14}"
          f"{'before cpu':>12}{'before wall':>13}{'speed-up':>10}")
    worst = np.inf
    for teachers in (["A"], ["A", "B"]):
        for ens in ("intra_sample_no_dedup", "intra_sample_dedup", "cross_sample"):
            if len(teachers) == 1 and ens != "intra_sample_no_dedup":
                continue
            cfg = dataclasses.replace(base, ensemble=ens)
            now_c, now_w, _ = timed(M.mine_batch, tables, cfg, teachers, True)
            worst = min(worst, now_c)
            line = f"{'+'.join(teachers):<9}{ens:<24}{now_c:>13,.0f}{now_w:>14,.0f}"
            if before is not None:
                b_c, b_w, _ = timed(before.mine_batch, few, cfg, teachers, True)
                line += f"{b_c:>12,.0f}{b_w:>13,.0f}{now_c / b_c:>9.1f}x"
            print(line)
    cfg = dataclasses.replace(base, ensemble="intra_sample_no_dedup")
    now_c, now_w, _ = timed(M.mine_batch, tables, cfg, ["A", "B"], False)
    print(f"{'A,B':<9}{'per teacher (no ens.)':<24}{now_c:>13,.0f}{now_w:>14,.0f}")
    print(f"slowest ensembled case: {worst:,.0f} q/s per core (goal 1,000,000: {'met' if worst >= 1e6 else 'NOT met'})")


if __name__ == "__main__":
    main()
