"""Scale curve of search + mine on synthetic precomputed vectors: wall time and peak memory per corpus size.

Writes one synthetic corpus of ``max(sizes)`` unit vectors as embedding Parquet files of
``--file-rows`` rows (the embed stage's layout); corpus size N uses the first N/file-rows files
(hard links, no copies). ``--queries`` queries, each a noisy copy of one positive among the first
``file-rows`` docs (present at every size). Each size runs in a fresh subprocess (its own driver and
local Ray, so peak RSS figures do not carry over): exact sharded search with the PercPos ceiling
inside the scan, then the mine stage (PercPos 0.95, 4 negatives, top).

Memory: driver peak RSS (``ru_maxrss``), each shard actor's peak RSS (its own ``ru_maxrss``), and
the largest RSS of any other Ray worker process plus the peak total over all Ray processes,
sampled every 0.2 s with psutil. Prints a Markdown table, writes ``scale.json`` and ``scale.png``.

    .venv/bin/python bench/bench_scale.py --sizes 100000,200000,400000 --queries 500
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_corpus(work: Path, n: int, dim: int, file_rows: int, n_queries: int, seed: int) -> None:
    """``work/files/part-*.parquet`` (doc_id, embedding) + ``work/query_emb`` + ``work/train_queries.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymine import columns as C
    from raymine.embed import embeddings_to_arrow

    files = work / "files"
    files.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = None
    for part, lo in enumerate(range(0, n, file_rows)):
        hi = min(n, lo + file_rows)
        x = rng.standard_normal((hi - lo, dim), dtype=np.float32)  # [rows, d]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if first is None:
            first = x[: min(len(x), 4 * n_queries)].copy()
        ids = pa.array([f"d{i:09d}" for i in range(lo, hi)], pa.string())
        pq.write_table(pa.table({C.DOC_ID: ids, C.EMBEDDING: embeddings_to_arrow(x)}),
                       files / f"part-{part:05d}.parquet", row_group_size=16_384)
    pos = rng.choice(len(first), size=n_queries, replace=False)
    q = first[pos] + 1.0 * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)  # [nq, d], cosine to the positive ≈ 0.7
    qids = [f"q{i:06d}" for i in range(n_queries)]
    (work / "query_emb").mkdir(exist_ok=True)
    pq.write_table(pa.table({C.QUERY_ID: pa.array(qids, pa.string()), C.EMBEDDING: embeddings_to_arrow(q)}),
                   work / "query_emb" / "part-00000.parquet")
    pq.write_table(pa.table({
        C.QUERY_ID: pa.array(qids, pa.string()),
        C.TEXT: pa.array([f"query {i}" for i in range(n_queries)], pa.string()),
        C.POSITIVE_IDS: pa.array([[f"d{int(p):09d}"] for p in pos], pa.list_(pa.string())),
        C.EXCLUDED_IDS: pa.array([[] for _ in pos], pa.list_(pa.string())),
    }), work / "train_queries.parquet")


class RssSampler(threading.Thread):
    """Peak RSS of this process's descendants (the local Ray's processes) sampled every ``period`` s."""

    def __init__(self, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process(os.getpid())
        self.period = period
        self.stop = threading.Event()
        self.peak_total = 0.0
        self.peak_by_pid: dict[int, tuple[str, float]] = {}

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0.0
            for p in self.me.children(recursive=True):
                try:
                    rss = p.memory_info().rss / 2**20
                    name = " ".join(p.cmdline())[:80]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                if rss > self.peak_by_pid.get(p.pid, ("", 0.0))[1]:
                    self.peak_by_pid[p.pid] = (name, rss)
            self.peak_total = max(self.peak_total, total)
            self.stop.wait(self.period)


def one_size(work: Path, size: int, file_rows: int, num_shards: int) -> dict:
    """Search + mine at one corpus size (in this process: a fresh driver)."""
    import resource

    import pyarrow.parquet as pq

    from raymine.config import MineConfig, SearchConfig
    from raymine.filters import required_depth, score_ceiling
    from raymine.index import ShardedIndex
    from raymine.mine import mine_stage
    from raymine.raycluster import init_ray
    from raymine.search import search_stage

    corpus = work / f"corpus_{size}"
    if corpus.exists():
        shutil.rmtree(corpus)
    corpus.mkdir()
    for i in range(-(-size // file_rows)):
        os.link(work / "files" / f"part-{i:05d}.parquet", corpus / f"part-{i:05d}.parquet")
    init_ray()
    sampler = RssSampler()
    sampler.start()
    mcfg = MineConfig(method="percpos", perc=0.95, num_negatives=4, sampling="top", join_partitions=2)
    scfg = SearchConfig(num_shards=num_shards, query_batch_size=256)
    out = work / f"out_{size}"
    shutil.rmtree(out, ignore_errors=True)
    positives = pq.read_table(work / "train_queries.parquet")
    t0 = time.perf_counter()
    index = ShardedIndex.from_parquet(str(corpus), scfg)
    t_build = time.perf_counter() - t0
    shard_pids = {i["pid"] for i in index.infos}
    try:
        sm = search_stage(str(work / "query_emb"), positives, index,
                          lambda n: required_depth(mcfg, n) + scfg.depth_slack, lambda p: score_ceiling(mcfg, p),
                          scfg, str(out / "search"), "synthetic")
        import ray

        shard_rss = [i["peak_rss_mb"] for i in ray.get([a.info.remote() for a in index.actors])]
    finally:
        index.close()
    t_search = time.perf_counter() - t0
    t1 = time.perf_counter()
    mm = mine_stage({"synthetic": str(out / "search")}, str(work / "train_queries.parquet"), mcfg, str(out / "mine"))
    t_mine = time.perf_counter() - t1
    sampler.stop.set()
    sampler.join()
    others = [rss for pid, (name, rss) in sampler.peak_by_pid.items() if pid not in shard_pids and "ray::" in name]
    tot = mm["counts"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(corpus, ignore_errors=True)
    return {
        "docs": size, "queries": int(sm["counts"]["queries"]), "shards": num_shards,
        "build_s": round(t_build, 2), "search_s": round(t_search, 2), "mine_s": round(t_mine, 2),
        "total_s": round(t_search + t_mine, 2),
        "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "shard_peak_mb": round(max(shard_rss), 1),
        "other_worker_peak_mb": round(max(others), 1) if others else 0.0,
        "all_ray_processes_peak_mb": round(sampler.peak_total, 1),
        "delivered": tot.get("delivered"), "requested": tot.get("requested"),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["docs"] / 1e6 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("search_s", "search (index build + scan)"), ("mine_s", "mine"), ("total_s", "search + mine")):
        a.plot(x, [r[key] for r in rows], "o-", label=label)
    a.set_xlabel("corpus size (M docs)")
    a.set_ylabel("wall s")
    a.legend(fontsize=8)
    a.set_title(f"time, {rows[0]['queries']} queries, {rows[0]['shards']} shards", fontsize=9)
    for key, label in (("driver_peak_mb", "driver peak RSS"), ("shard_peak_mb", "largest shard actor"),
                       ("other_worker_peak_mb", "largest other Ray worker"),
                       ("all_ray_processes_peak_mb", "all Ray processes (sum)")):
        b.plot(x, [r[key] for r in rows], "o-", label=label)
    b.set_xlabel("corpus size (M docs)")
    b.set_ylabel("MiB")
    b.legend(fontsize=8)
    b.set_title("peak memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,200000,400000", help="comma-separated corpus sizes")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--file-rows", type=int, default=50_000)
    ap.add_argument("--num-shards", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--work", default="", help="scratch folder (default: a temp folder, removed at the end)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_one", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if args._one:
        print("RESULT " + json.dumps(one_size(Path(args.work), args._one, args.file_rows, args.num_shards)), flush=True)
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if any(s % args.file_rows for s in sizes):
        raise SystemExit(f"sizes must be multiples of --file-rows ({args.file_rows})")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    t0 = time.perf_counter()
    write_corpus(work, max(sizes), args.dim, args.file_rows, args.queries, args.seed)
    print(f"wrote {max(sizes)} x {args.dim} vectors in {time.perf_counter() - t0:.1f} s under {work}", flush=True)
    rows = []
    for s in sizes:
        cmd = [sys.executable, __file__, "--_one", str(s), "--work", str(work), "--file-rows", str(args.file_rows),
               "--num-shards", str(args.num_shards)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(p.stdout[-2000:], p.stderr[-4000:])
            raise SystemExit(f"size {s} failed")
        rows.append(json.loads(line[0][7:]))
        r = rows[-1]
        print(f"  {s:>9,d} docs: search {r['search_s']} s, mine {r['mine_s']} s, driver {r['driver_peak_mb']} MiB, "
              f"shard {r['shard_peak_mb']} MiB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "scale.png")
    cols = ["docs", "build_s", "search_s", "mine_s", "total_s", "driver_peak_mb", "shard_peak_mb",
            "other_worker_peak_mb", "all_ray_processes_peak_mb", "delivered", "requested"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |")
    base = rows[0]
    for r in rows[1:]:
        f = r["docs"] / base["docs"]
        print(f"{r['docs']:,} vs {base['docs']:,} docs (x{f:g}): search time x{r['search_s'] / base['search_s']:.2f}, "
              f"driver peak x{r['driver_peak_mb'] / base['driver_peak_mb']:.2f}, "
              f"shard peak x{r['shard_peak_mb'] / base['shard_peak_mb']:.2f}")
    print(f"table: {out / 'scale.json'}  plot: {out / 'scale.png'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
