"""Sharded exact search vs one IndexFlatIP, measured side by side in one run, and shard memory growth.

    python bench/bench_search.py                       # 200k x 384 corpus, 5k queries, S=4, k=100
    python bench/bench_search.py --docs 50000 --queries 1000   # quick

Prints:
1. wall time of sharded Flat search (S actors through Ray, merge included) vs one in-process
   ``faiss.IndexFlatIP`` over the same corpus, same query batches (ratio; goal overhead <= 10%), with
   the time spent in the merge itself;
2. peak RSS of each shard actor and the driver's RSS as the corpus grows ``--growth``x at fixed S
   (shard memory should grow with the corpus, driver memory should not).
Synthetic L2-normalised vectors are written to Parquet in chunks (the driver never holds the corpus,
except for the single-index baseline, which is built last).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fmt(xs, digits: int = 2) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in xs)


def write_corpus(folder: str, n: int, dim: int, seed: int, rows_per_file: int = 25_000) -> None:
    from raymine.columns import DOC_ID, EMBEDDING

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for f, lo in enumerate(range(0, n, rows_per_file)):
        m = min(rows_per_file, n - lo)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t = pa.table({DOC_ID: pa.array([f"d{i:09d}" for i in range(lo, lo + m)]),  # id order = row order
                      EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)})
        pq.write_table(t, os.path.join(folder, f"part-{f:05d}.parquet"), row_group_size=8192)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200_000, help="corpus size for the timing (and the largest RSS point)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024, help="queries per batch (as the search stage sends them)")
    ap.add_argument("--growth", type=int, default=4, help="RSS measured at docs/growth and docs")
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (min taken), alternating sides")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import faiss
    import ray

    from raymine.columns import EMBEDDING
    from raymine.config import SearchConfig
    from raymine.index import MISSING_ID, ShardedIndex, list_parquet
    from raymine.raycluster import init_ray
    from raymine.topk import merge_topk_positions

    work = args.workdir or tempfile.mkdtemp(prefix="bench_search_")
    small_n = args.docs // args.growth
    t0 = time.time()
    write_corpus(os.path.join(work, "small"), small_n, args.dim, seed=1)
    write_corpus(os.path.join(work, "big"), args.docs, args.dim, seed=2)
    print(f"wrote {small_n} + {args.docs} x {args.dim} vectors in {time.time() - t0:.1f} s under {work}")
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    batches = [queries[i : i + args.batch] for i in range(0, len(queries), args.batch)]

    init_ray()
    cfg = SearchConfig(num_shards=args.shards, query_batch_size=args.batch)
    driver_base = rss_mb()

    # -- 2. memory as the corpus grows ----------------------------------------------------------
    mem = {}
    for name, n in (("small", small_n), ("big", args.docs)):
        index = ShardedIndex.from_parquet(os.path.join(work, name), cfg)
        index.search(batches[0][:8], args.k)  # touch the search path once
        mem[n] = (index.memory_mb(), rss_mb())
        if name == "small":
            index.close()
    big = index

    # -- 1. timing: sharded (through Ray, merge included) vs one IndexFlatIP ---------------------
    def sharded_once() -> tuple[float, float]:
        t_merge = 0.0
        t = time.perf_counter()
        for b in batches:
            qref = ray.put(b)
            parts = ray.get([a.search.remote(qref, args.k, None, False) for a in big.actors])
            tm = time.perf_counter()
            gids = [np.where(p[1] >= 0, p[1] + off, MISSING_ID) for p, off in zip(parts, big.offsets, strict=True)]
            _, _, pos = merge_topk_positions([p[0] for p in parts], gids, args.k)
            names = np.concatenate([p[2] for p in parts], axis=1)
            np.take_along_axis(names, np.maximum(pos, 0), axis=1)
            t_merge += time.perf_counter() - tm
        return time.perf_counter() - t, t_merge

    def sharded_api_once() -> float:
        t = time.perf_counter()
        for b in batches:
            big.search(b, args.k)
        return time.perf_counter() - t

    vecs = []
    for path in list_parquet(os.path.join(work, "big")):
        col = pq.read_table(path, columns=[EMBEDDING]).column(EMBEDDING).combine_chunks()
        vecs.append(col.flatten().to_numpy().reshape(len(col), args.dim))
    single = faiss.IndexFlatIP(args.dim)
    for v in vecs:
        single.add(v)
    del vecs

    def single_once() -> float:
        t = time.perf_counter()
        for b in batches:
            single.search(b, args.k)
        return time.perf_counter() - t

    # correctness spot check: same ids on the first batch (random data, no ties)
    _, si = single.search(batches[0][:64], args.k)
    _, gi, _ = big.search_ids(batches[0][:64], args.k)
    same = float((si == gi).mean())

    t_single, t_shard, t_api, t_merge = [], [], [], []
    for _ in range(args.repeats):
        t_single.append(single_once())
        w, m = sharded_once()
        t_shard.append(w)
        t_merge.append(m)
        t_api.append(sharded_api_once())
    faiss.omp_set_num_threads(1)  # same total threads as the shards get per actor: one
    t_single1 = single_once()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    ts, tsh, tm, ta = min(t_single), min(t_shard), min(t_merge), min(t_api)
    print(f"\n== exact search: {args.docs} docs x {args.dim}, {args.queries} queries, k={args.k}, "
          f"batches of {args.batch}, {os.cpu_count()} cores ==")
    print(f"single IndexFlatIP ({os.cpu_count()} threads, in-process):    {ts:8.2f} s")
    print(f"single IndexFlatIP (1 thread, in-process, 1 run):    {t_single1:8.2f} s")
    print(f"sharded S={args.shards} via Ray (fan-out + merge):           {tsh:8.2f} s  ratio {tsh / ts:.3f}")
    print(f"  ShardedIndex.search (public API, same work):     {ta:8.2f} s  ratio {ta / ts:.3f}")
    print(f"  of which merge_topk + id gather in the driver:   {tm:8.2f} s  = {100 * tm / tsh:.1f}% of sharded")
    print(f"ids equal to the single index on a 64-query check: {100 * same:.1f}%")
    print(f"load average during the run (other users of the machine): {os.getloadavg()[0]:.1f}")
    print(f"all runs (s): single [{fmt(t_single)}], sharded [{fmt(t_shard)}], api [{fmt(t_api)}]")

    print(f"\n== memory at fixed S={args.shards} as the corpus grows {args.growth}x ==")
    print(f"driver RSS before any index: {driver_base:.0f} MiB")
    for n, (shards, drv) in mem.items():
        raw = n * args.dim * 4 / 2**20
        print(f"{n:>9} docs ({raw:7.1f} MiB raw): shard peak RSS MiB [{fmt([m['peak_rss'] for m in shards], 0)}], "
              f"current [{fmt([m['rss'] for m in shards], 0)}]; driver RSS {drv:.0f} MiB")
    (s0, d0), (s1, d1) = mem[small_n], mem[args.docs]
    raw_share = (args.docs - small_n) * args.dim * 4 / 2**20 / args.shards
    for key in ("peak_rss", "rss"):
        a, b = np.mean([m[key] for m in s0]), np.mean([m[key] for m in s1])
        print(f"growth {args.growth}x corpus -> mean shard {key} x{b / a:.2f} (+{b - a:.0f} MiB/shard; "
              f"raw vectors per shard +{raw_share:.0f} MiB)")
    print(f"driver RSS change small -> big corpus: {d1 - d0:+.0f} MiB")
    big.close()


if __name__ == "__main__":
    main()
