"""Filter + sampling throughput of the mining math (queries/s on one core, k candidates per query).

Measures the vectorised path the mining stage runs per batch (drop positives, drop excluded, the
method's filter, sampling) for every method and sampling mode, side by side with a plain per-query
Python loop of the same rules. This times the array kernels only (integer ids, no Arrow): the mine
stage's real per-batch cost, Arrow in -> Arrow out with string ids, is timed by ``bench/bench_mine.py``.

    .venv/bin/python bench/bench_filters.py                 # 200k queries, batches of 4096, k=100
    .venv/bin/python bench/bench_filters.py --queries 1000000 --k 100 --batch 8192
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: numpy here is single-threaded anyway
import argparse
import dataclasses
import time

import numpy as np
import pyarrow as pa

from raymine import filters as F
from raymine import sampling as S
from raymine.config import MineConfig


def make_batch(rng: np.random.Generator, nq: int, k: int, max_pos: int):
    """Candidate codes/scores [nq, k] (descending), 1..max_pos positives among the top 20, one excluded id."""
    scores = -np.sort(-rng.uniform(-0.2, 0.95, size=(nq, k)).astype(np.float32), axis=1)  # [nq, k]
    cand = rng.integers(0, 10_000_000, size=(nq, k), dtype=np.int64)
    npos = rng.integers(1, max_pos + 1, size=nq)
    pid = np.full((nq, max_pos), -1, np.int64)
    pval = np.arange(max_pos)[None, :] < npos[:, None]
    at = rng.integers(0, 20, size=(nq, max_pos))
    pid[pval] = cand[np.arange(nq)[:, None].repeat(max_pos, 1)[pval], at[pval]]
    pos_scores = rng.uniform(0.5, 0.95, size=(nq, max_pos)).astype(np.float32)
    anchor = np.where(pval, pos_scores, np.inf).min(axis=1)
    eid = cand[:, 25:26].copy()
    evalid = np.ones((nq, 1), bool)
    qids = pa.array([f"q{i}" for i in range(nq)], pa.string())  # the stage passes Arrow ids too
    return cand, scores, pid, pval, eid, evalid, anchor, qids


def vectorised(cfg, batches):
    total = 0
    for cand, scores, pid, pval, eid, evalid, anchor, qids in batches:
        valid = np.ones(cand.shape, bool)
        keep, _ = F.apply_filters(cfg, cand, scores, valid, pid, pval, eid, evalid, anchor)
        chosen = S.sample(cfg, scores, keep, qids)
        S.gather(chosen, cfg.num_negatives)
        total += len(cand)
    return total


def python_loop(cfg, batches, limit):
    """Per-query reference loop (top sampling): what a straightforward implementation does."""
    done = 0
    for cand, scores, pid, pval, eid, _evalid, anchor, _qids in batches:
        ceil = F.ceiling_from_anchor(cfg, anchor)
        for i in range(len(cand)):
            banned = set(pid[i][pval[i]].tolist()) | set(eid[i].tolist())
            out = []
            for _j, (c, s) in enumerate(zip(cand[i].tolist(), scores[i].tolist(), strict=False)):
                if c in banned or not s < ceil[i]:
                    continue
                out.append(c)
                if len(out) == cfg.num_negatives:
                    break
            done += 1
            if done >= limit:
                return done
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--max-positives", type=int, default=5)
    ap.add_argument("--loop-queries", type=int, default=20_000, help="queries timed in the Python loop")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, min(args.batch, args.queries - s), args.k, args.max_positives)
               for s in range(0, args.queries, args.batch)]
    base = MineConfig()
    print(f"queries={args.queries} k={args.k} batch={args.batch} positives=1..{args.max_positives} (one core)")
    print("wall = elapsed time; cpu = this process's CPU time (robust when other jobs share the cores)")
    print(f"{'method':<16}{'sampling':<14}{'q/s (wall)':>14}{'q/s (cpu)':>14}{'cpu µs/query':>14}")
    rates = {}
    for method in ("naive", "shifted", "abs", "marginpos", "percpos"):
        for sampling in ("top", "sampled", "top1_sampled"):
            cfg = dataclasses.replace(base, method=method, sampling=sampling)
            vectorised(cfg, batches[:1])  # warm-up
            t, c = time.perf_counter(), time.process_time()
            n = vectorised(cfg, batches)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            rates[(method, sampling)] = n / dc
            print(f"{method:<16}{sampling:<14}{n / dt:>14,.0f}{n / dc:>14,.0f}{1e6 * dc / n:>14.2f}")
    cfg = dataclasses.replace(base, method="percpos", sampling="top")
    c = time.process_time()
    n = python_loop(cfg, batches, args.loop_queries)
    loop_rate = n / (time.process_time() - c)
    print(f"\nper-query Python loop, percpos/top: {loop_rate:,.0f} queries/s (cpu)")
    print(f"vectorised / loop (percpos/top): {rates[('percpos', 'top')] / loop_rate:.1f}x")
    worst = min(rates.values())
    print(f"slowest mode {min(rates, key=rates.get)}: {worst:,.0f} q/s (cpu); goal 1,000,000 q/s per core: "
          f"{'met' if worst >= 1e6 else 'NOT met'}")


if __name__ == "__main__":
    main()
