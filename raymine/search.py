"""Search stage: corpus embeddings split into S shard actors, each holding a FAISS index; queries fan
out to every shard and the partial top-k lists merge (``raymine.topk.merge_topk``) into the global
top-k, equal to one brute-force search over the whole corpus for ``Flat``.

- The driver lists Parquet metadata only; every shard actor reads its own rows (files / row groups).
- Global id of a document = its row in the corpus read in file-name order (shard offset + local row);
  each shard maps its local rows back to the user's string doc ids.
- Ceiling-aware search (positive-aware mining): exact indexes mask ``score >= ceiling`` inside the
  shard scan (torch matmul + top-k), so no depth is guessed. Indexes that cannot mask (IVF/PQ) are
  re-queried deeper (k doubling up to ``max_depth``) for the queries still short; the rest is counted.
- The ceiling's removals are counted, not hidden: per query, how many corpus documents scored
  ``>= ceiling`` (``ShardedIndex.last_above_ceiling``, column ``ABOVE_CEILING``; exact for exact
  indexes and BM25, a lower bound for IVF/PQ: only the results seen while re-querying are counted).
- Shards keep their raw vectors (needed for exact positive scores and for recall of IVF/PQ against
  exact search); for ``Flat`` that is the index's own storage, no copy.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymine import storage
from raymine.columns import (
    ABOVE_CEILING,
    CANDIDATE_IDS,
    CANDIDATE_SCORES,
    CEILING,
    DOC_ID,
    EMBEDDING,
    EXCLUDED_IDS,
    POSITIVE_IDS,
    POSITIVE_SCORES,
    QUERY_ID,
    TEACHER,
    TEXT,
)
from raymine.config import SearchConfig, TeacherConfig, to_dict
from raymine.topk import MISSING_ID, merge_topk_positions, torch_search

log = logging.getLogger(__name__)

STAGE = "search"
PART = "part-{:05d}.parquet"
GPU_MAX_K = 2048  # faiss-gpu selection limit (GPU_MAX_SELECTION_K)

SEARCH_SCHEMA = pa.schema(
    [
        (QUERY_ID, pa.string()),
        (POSITIVE_IDS, pa.list_(pa.string())),
        (POSITIVE_SCORES, pa.list_(pa.float32())),
        (EXCLUDED_IDS, pa.list_(pa.string())),
        (CANDIDATE_IDS, pa.list_(pa.string())),
        (CANDIDATE_SCORES, pa.list_(pa.float32())),
        (CEILING, pa.float32()),
        (TEACHER, pa.string()),
        (ABOVE_CEILING, pa.int64()),
    ]
)


# ------------------------------------------------------------------------------------------------
# Parquet layout (driver side: metadata only)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` of one row group of one Parquet file (path inside the URI's filesystem)."""

    path: str
    row_group: int
    lo: int
    hi: int


def list_parquet(uri: str) -> list[str]:
    """Parquet files under ``uri`` (a file or a folder), in name order; ``_``/``.`` files skipped."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        return [path]
    files = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File
        and f.path.endswith(".parquet")
        and not any(p.startswith(("_", ".")) for p in os.path.relpath(f.path, path).split(os.sep))
    ]
    if not files:
        raise FileNotFoundError(f"{uri}: no .parquet files")
    return sorted(files)


def embedding_layout(uri: str, id_column: str = DOC_ID) -> tuple[int, list[tuple[str, int, int]]]:
    """(dim, [(path, row_group, num_rows)...]) of an embedding table, from Parquet metadata only."""
    fs, _ = storage.resolve(uri)
    dim = None
    groups = []
    for path in list_parquet(uri):
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            for col in (id_column, EMBEDDING):
                if col not in schema.names:
                    raise ValueError(f"{path}: column {col!r} missing (has {schema.names})")
            t = schema.field(EMBEDDING).type
            if not pa.types.is_fixed_size_list(t) or t.value_type not in (pa.float32(), pa.float16()):
                raise ValueError(f"{path}: {EMBEDDING} must be fixed_size_list<float32|float16>[dim], got {t}")
            if dim is not None and t.list_size != dim:
                raise ValueError(f"{path}: embedding dim {t.list_size} differs from earlier files ({dim})")
            dim = t.list_size
            for g in range(pf.metadata.num_row_groups):
                groups.append((path, g, pf.metadata.row_group(g).num_rows))
    assert dim is not None
    return dim, groups


def plan_shards(groups: Sequence[tuple[str, int, int]], shard_rows: Sequence[int]) -> list[list[Piece]]:
    """Cut the corpus (row groups in order) into consecutive shards of ``shard_rows[i]`` rows."""
    total = sum(n for _, _, n in groups)
    if sum(shard_rows) != total or any(n < 0 for n in shard_rows):
        raise ValueError(f"shard sizes {list(shard_rows)} must be >= 0 and sum to the corpus size {total}")
    plans: list[list[Piece]] = [[] for _ in shard_rows]
    bounds = np.concatenate([[0], np.cumsum(shard_rows)])  # [S + 1] global row bounds
    start = 0
    for path, g, n in groups:
        for s in range(len(shard_rows)):
            lo, hi = max(start, bounds[s]), min(start + n, bounds[s + 1])
            if lo < hi:
                plans[s].append(Piece(path, g, int(lo - start), int(hi - start)))
        start += n
    return plans


def balanced_sizes(total: int, num_shards: int) -> list[int]:
    """Shard sizes differing by at most one row."""
    return [total * (i + 1) // num_shards - total * i // num_shards for i in range(num_shards)]


def _embeddings(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """fixed_size_list column → float32 [n, dim] (no Python objects)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32, copy=False)


def _is_exact(factory: str) -> bool:
    return factory.replace(" ", "").upper() == "FLAT"


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_mb() -> float:
    """Current resident memory (MiB; Linux /proc, NaN elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


# ------------------------------------------------------------------------------------------------
# Shard actor body (plain class; wrapped with ray.remote in ShardedIndex)
# ------------------------------------------------------------------------------------------------
class Shard:
    """One shard: reads its pieces, builds a FAISS index, answers searches with shard-local rows."""

    def __init__(self, uri: str, pieces: list[Piece], dim: int, cfg: dict[str, Any], threads: int) -> None:
        import faiss
        import torch

        from raymine.config import SearchConfig

        self.cfg = SearchConfig(**cfg)
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        t0 = time.time()
        fs, _ = storage.resolve(uri)
        n = sum(p.hi - p.lo for p in pieces)
        self.dim = dim
        self.exact = _is_exact(self.cfg.index_factory)
        ids: list[pa.Array] = []
        index = faiss.index_factory(dim, self.cfg.index_factory, faiss.METRIC_INNER_PRODUCT)
        if self.exact and n:
            # size the Flat storage once and fill it in place: no growth-by-doubling copies at build
            index.codes.resize(n * dim * 4)
            index.ntotal = n
            vectors = faiss.rev_swig_ptr(index.get_xb(), n * dim).reshape(n, dim)  # [n, d] view
        else:
            vectors = np.empty((n, dim), np.float32)  # [n, d]
        row = 0
        for p in pieces:
            with fs.open_input_file(p.path) as f:
                pf = pq.ParquetFile(f)
                # columns read separately: kept id arrays must not pin the row group's embedding buffers
                id_col = pf.read_row_group(p.row_group, columns=[DOC_ID]).column(DOC_ID)
                emb_col = pf.read_row_group(p.row_group, columns=[EMBEDDING]).column(EMBEDDING)
            emb = _embeddings(emb_col.slice(p.lo, p.hi - p.lo), dim)  # [rows, d]
            bad = ~np.isfinite(emb).all(axis=1)
            if bad.any():
                raise ValueError(f"{p.path} row group {p.row_group}: {int(bad.sum())} embeddings with NaN/inf")
            id_col = id_col.slice(p.lo, p.hi - p.lo)
            if id_col.null_count:
                raise ValueError(f"{p.path} row group {p.row_group}: null {DOC_ID}")
            ids.append(id_col.combine_chunks().cast(pa.string()))
            vectors[row : row + len(emb)] = emb  # Flat: the index storage itself, the only copy
            row += len(emb)
            del emb, emb_col
        self.doc_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())  # compact, not Python strs
        del ids
        pa.default_memory_pool().release_unused()  # give the read buffers back to the OS
        self.vectors = vectors
        if not self.exact:
            if n and not index.is_trained:
                rng = np.random.default_rng(0)
                sample = self.vectors[np.sort(rng.choice(n, min(n, self.cfg.train_sample), replace=False))]
                index.train(sample)
            if n:
                index.add(self.vectors)
            if "IVF" in self.cfg.index_factory.upper():
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", self.cfg.nprobe)
        self.index = index
        self._row: dict[str, int] | None = None
        # device: faiss-gpu when present and asked for; else torch on CUDA for exact search
        self.gpu_index = None
        self.torch_device = "cpu"
        if self.cfg.num_gpus_per_shard > 0 and n:
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and self.cfg.backend != "torch":
                self._gpu_res = faiss.StandardGpuResources()
                self.gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            if torch.cuda.is_available():
                self.torch_device = "cuda"
        self._tvec = None
        self.num_docs = n
        self.build_s = time.time() - t0

    # -- helpers ---------------------------------------------------------------------------------
    def _torch_vectors(self):
        import torch

        if self._tvec is None:
            self._tvec = torch.from_numpy(self.vectors).to(self.torch_device)
        return self._tvec

    def _use_torch(self) -> bool:
        return self.exact and (self.cfg.backend == "torch" or (
            self.cfg.backend == "auto" and self.torch_device == "cuda" and self.gpu_index is None))

    def _faiss_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # faiss-gpu selects at most GPU_MAX_K: deeper searches use the CPU copy of the index
        index = self.gpu_index if self.gpu_index is not None and k <= GPU_MAX_K else self.index
        d, i = index.search(q, k)
        d = d.astype(np.float32)
        d[i < 0] = -np.inf
        return d, i.astype(np.int64)

    # -- actor methods ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"num_docs": self.num_docs, "dim": self.dim, "build_s": round(self.build_s, 3),
                "peak_rss_mb": round(_peak_rss_mb(), 1), "pid": os.getpid(),
                "gpu": self.gpu_index is not None or self.torch_device == "cuda"}

    def search(self, q: np.ndarray, k: int, ceilings: np.ndarray | None, exact: bool = False):
        """Shard top-k: ``(scores [nq,k'], local rows [nq,k'], doc ids object [nq,k'], above [nq])``,
        k' = min(k, n); ``above``: shard rows scoring ``>= ceilings[q]`` (0 without a ceiling).

        Exact masked scan when a ceiling is given (only allowed for exact indexes) or ``exact``."""
        nq = q.shape[0]
        kk = min(k, self.num_docs)
        if ceilings is not None and not self.exact and not exact:
            raise ValueError(f"index {self.cfg.index_factory!r} cannot apply a ceiling; search deeper instead")
        above = np.zeros(nq, np.int64)
        if kk == 0 and (ceilings is None or self.num_docs == 0):
            return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64), np.empty((nq, 0), object), above
        gpu_k_over = self.exact and self.gpu_index is not None and kk > GPU_MAX_K and self.torch_device == "cuda"
        if ceilings is not None or exact or self._use_torch() or gpu_k_over:  # exact masked/brute-force scan
            s, i, above = torch_search(self._torch_vectors(), q, kk, ceilings, return_above=True)
        else:
            s, i = self._faiss_search(q, kk)
        names = self.doc_ids.take(pa.array(np.maximum(i, 0).reshape(-1))).to_numpy(zero_copy_only=False)
        names = np.where(i >= 0, names.reshape(i.shape), "").astype(object)  # [nq, k']
        return s, i, names, above

    def lookup(self, q: np.ndarray, qidx: np.ndarray, doc_ids: list[str]) -> np.ndarray:
        """Inner product of ``q[qidx[j]]`` with doc ``doc_ids[j]``; NaN for ids not in this shard. [m]"""
        if self._row is None:
            self._row = {d: r for r, d in enumerate(self.doc_ids.to_pylist())}
            if len(self._row) != len(self.doc_ids):
                raise ValueError(f"shard has {len(self.doc_ids) - len(self._row)} duplicate doc ids")
        rows = np.fromiter((self._row.get(d, -1) for d in doc_ids), np.int64, len(doc_ids))  # [m]
        out = np.full(len(doc_ids), np.nan, np.float32)
        hit = rows >= 0
        if hit.any():
            out[hit] = np.einsum("ij,ij->i", q[qidx[hit]], self.vectors[rows[hit]])
        return out

    def set_nprobe(self, nprobe: int) -> None:
        import faiss

        for ix in (self.index, self.gpu_index):
            if ix is not None and "IVF" in self.cfg.index_factory.upper():
                faiss.ParameterSpace().set_index_parameter(ix, "nprobe", nprobe)

    def memory_mb(self) -> dict[str, float]:
        return {"rss": round(_rss_mb(), 1), "peak_rss": round(_peak_rss_mb(), 1)}


# ------------------------------------------------------------------------------------------------
# Driver-side handle
# ------------------------------------------------------------------------------------------------
class ShardedIndex:
    """S shard actors over one corpus embedding table; search merges their top-k exactly.

    Use :meth:`from_parquet`; call :meth:`close` (or use as a context manager) to free the actors.
    """

    def __init__(self, actors: list, offsets: np.ndarray, sizes: list[int], dim: int, cfg: SearchConfig,
                 uri: str, infos: list[dict[str, Any]]) -> None:
        self.actors = actors
        self.offsets = offsets  # [S] global id of each shard's first row
        self.sizes = sizes
        self.dim = dim
        self.cfg = cfg
        self.uri = uri
        self.infos = infos
        self.exact = _is_exact(cfg.index_factory)
        self.last_stats: dict[str, Any] = {}
        # per query of the last search: corpus docs scoring >= its ceiling (removed inside the search);
        # exact for Flat, a lower bound for IVF/PQ (only results seen while re-querying deeper)
        self.last_above_ceiling: np.ndarray = np.zeros(0, np.int64)

    @classmethod
    def from_parquet(cls, uri: str, cfg: SearchConfig, shard_rows: Sequence[int] | None = None) -> ShardedIndex:
        """Start ``cfg.num_shards`` actors, each reading its consecutive share of the rows under ``uri``.

        ``shard_rows`` overrides the balanced split (explicit rows per shard, e.g. uneven placements)."""
        import ray

        if cfg.backend == "torch" and not _is_exact(cfg.index_factory):
            raise ValueError(f"search.backend='torch' is exact search only; index_factory must be 'Flat', "
                             f"got {cfg.index_factory!r}")
        dim, groups = embedding_layout(uri)
        total = sum(n for _, _, n in groups)
        sizes = list(shard_rows) if shard_rows is not None else balanced_sizes(total, cfg.num_shards)
        plans = plan_shards(groups, sizes)
        threads = cfg.threads_per_shard or max(1, (os.cpu_count() or 1) // len(sizes))
        # a shard that dies (node lost, OOM kill) restarts and rebuilds the same rows from Parquet in
        # __init__; calls in flight are retried, so a search never returns a partial merge
        remote = ray.remote(Shard).options(num_cpus=cfg.num_cpus_per_shard, num_gpus=cfg.num_gpus_per_shard,
                                           max_restarts=-1, max_task_retries=-1)
        cfg_d = to_dict(cfg)
        t0 = time.time()
        actors = [remote.remote(uri, plan, dim, cfg_d, threads) for plan in plans]
        infos = ray.get([a.info.remote() for a in actors])
        log.info("search: %d shards %s of %d docs (dim %d, %s) ready in %.1f s", len(actors), sizes, total,
                 dim, cfg.index_factory, time.time() - t0)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return cls(actors, offsets, sizes, dim, cfg, uri, infos)

    @property
    def num_docs(self) -> int:
        return int(sum(self.sizes))

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def memory_mb(self) -> list[dict[str, float]]:
        """Current and peak resident memory of each shard actor (MiB)."""
        import ray

        return ray.get([a.memory_mb.remote() for a in self.actors])

    def set_nprobe(self, nprobe: int) -> None:
        """Change the IVF cells probed per query on every shard (tuning recall vs speed)."""
        import ray

        ray.get([a.set_nprobe.remote(nprobe) for a in self.actors])

    # -- search ----------------------------------------------------------------------------------
    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [nq, {self.dim}], got {q.shape}")
        return q

    def _fanout(self, q: np.ndarray, k: int, ceilings: np.ndarray | None, exact: bool = False):
        """All shards' top-k merged: (scores [nq,k], global ids [nq,k], doc ids object [nq,k]); sets
        ``last_above_ceiling`` to the shards' summed above-ceiling counts [nq]."""
        import ray

        qref = ray.put(q)
        parts = ray.get([a.search.remote(qref, k, ceilings, exact) for a in self.actors])
        scores = [p[0] for p in parts]
        gids = [np.where(p[1] >= 0, p[1] + off, MISSING_ID) for p, off in zip(parts, self.offsets, strict=True)]
        s, g, pos = merge_topk_positions(scores, gids, k)
        names = np.concatenate([p[2] for p in parts], axis=1) if parts else np.empty((q.shape[0], 0), object)
        out = np.full(g.shape, "", object)
        hit = pos >= 0
        out[hit] = np.take_along_axis(names, np.maximum(pos, 0), axis=1)[hit]
        self.last_above_ceiling = (np.sum([p[3] for p in parts], axis=0).astype(np.int64) if parts
                                   else np.zeros(q.shape[0], np.int64))
        return s, g, out

    def search(self, queries: np.ndarray, k: int, ceilings: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Global top-k of ``queries [nq, d]`` below ``ceilings [nq]`` (+inf = none).

        Returns ``(scores float32 [nq,k], doc ids object [nq,k])`` ("" / -inf where missing).
        ``self.last_stats`` holds ``short`` (queries that got fewer than k results although the corpus
        may hold more: only for indexes that cannot apply a ceiling) and the deepest k used;
        ``self.last_above_ceiling [nq] int64`` how many corpus docs scored ``>= ceilings[q]`` (removed by
        the ceiling; 0 without one) — exact for ``Flat``, a lower bound for IVF/PQ (results seen while
        re-querying deeper)."""
        s, _, names = self.search_ids(queries, k, ceilings)
        return s, names

    def search_exact(self, queries: np.ndarray, k: int, ceilings: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Exact (brute-force, sharded) search whatever the index type; reference for recall."""
        q = self._check_queries(queries)
        s, _, names = self._fanout(q, k, _norm_ceilings(ceilings, q.shape[0]), exact=True)
        return s, names

    def search_ids(self, queries: np.ndarray, k: int, ceilings: np.ndarray | None = None):
        """Like :meth:`search`, also returning global int ids: (scores, ids int64, doc ids object)."""
        q = self._check_queries(queries)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        c = _norm_ceilings(ceilings, q.shape[0])
        if c is None or self.exact:
            self.last_stats = {"short": 0, "deepest_k": k}
            return self._fanout(q, k, c)
        return self._search_deeper(q, k, c)

    def _search_deeper(self, q: np.ndarray, k: int, c: np.ndarray):
        """Ceiling for indexes that cannot mask: search k' = k, 2k, ... (≤ max_depth), keep hits below
        the ceiling, re-query only the queries still short."""
        nq = q.shape[0]
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_g = np.full((nq, k), MISSING_ID, np.int64)
        out_n = np.full((nq, k), "", object)
        todo = np.arange(nq)
        above = np.zeros(nq, np.int64)  # results >= ceiling seen: a lower bound on the corpus count
        kk = k
        cap = max(k, min(self.cfg.max_depth, self.num_docs))
        used = kk
        while todo.size:
            used = kk
            s, g, names = self._fanout(q[todo], kk, None)
            allowed = (g >= 0) & (s < c[todo, None])  # [n_todo, kk]
            above[todo] = np.maximum(above[todo], ((g >= 0) & ~allowed).sum(axis=1))
            order = np.argsort(~allowed, axis=1, kind="stable")[:, :k]  # allowed first, rank order kept
            keep = np.take_along_axis(allowed, order, axis=1)
            sel_s = np.where(keep, np.take_along_axis(s, order, axis=1), -np.inf)
            sel_g = np.where(keep, np.take_along_axis(g, order, axis=1), MISSING_ID)
            sel_n = np.where(keep, np.take_along_axis(names, order, axis=1), "")
            pad = k - order.shape[1]
            if pad > 0:
                sel_s = np.pad(sel_s, ((0, 0), (0, pad)), constant_values=-np.inf)
                sel_g = np.pad(sel_g, ((0, 0), (0, pad)), constant_values=MISSING_ID)
                sel_n = np.pad(sel_n, ((0, 0), (0, pad)), constant_values="")
            out_s[todo], out_g[todo], out_n[todo] = sel_s, sel_g, sel_n
            exhausted = (g < 0).any(axis=1)  # the index returned fewer than kk: nothing deeper exists
            short = (allowed.sum(axis=1) < k) & ~exhausted
            todo = todo[short]
            if kk >= cap:
                break
            kk = min(2 * kk, cap)
        self.last_stats = {"short": int(todo.size), "deepest_k": used}
        self.last_above_ceiling = above
        if todo.size:
            log.warning("search: %d of %d queries have fewer than %d results below their ceiling at depth %d "
                        "(max_depth); approximate index cannot mask", todo.size, nq, k, used)
        return out_s, out_g, out_n

    def lookup_scores(self, queries: np.ndarray, doc_ids: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Exact inner product of query i with each doc in ``doc_ids[i]`` → one float32 array per query;
        NaN for an id held by no shard (the caller counts and reports it)."""
        import ray

        q = self._check_queries(queries)
        if len(doc_ids) != q.shape[0]:
            raise ValueError(f"{len(doc_ids)} doc-id lists for {q.shape[0]} queries")
        lens = np.fromiter((len(d) for d in doc_ids), np.int64, len(doc_ids))
        flat = [str(d) for ds in doc_ids for d in ds]
        qidx = np.repeat(np.arange(q.shape[0]), lens)  # [m]
        qref = ray.put(q)
        parts = ray.get([a.lookup.remote(qref, qidx, flat) for a in self.actors])
        found = np.sum([~np.isnan(p) for p in parts], axis=0) if parts else np.zeros(len(flat))
        if (found > 1).any():
            dup = sorted({flat[j] for j in np.flatnonzero(found > 1)})[:5]
            raise ValueError(f"doc ids held by several shards (duplicate ids in the corpus): {dup}")
        merged = np.full(len(flat), np.nan, np.float32)
        for p in parts:
            merged = np.where(np.isnan(p), merged, p)
        return np.split(merged, np.cumsum(lens)[:-1]) if len(lens) else []


def _norm_ceilings(ceilings: np.ndarray | None, nq: int) -> np.ndarray | None:
    if ceilings is None:
        return None
    c = np.asarray(ceilings, np.float32).reshape(-1)
    if c.shape[0] != nq:
        raise ValueError(f"{c.shape[0]} ceilings for {nq} queries")
    if np.isnan(c).any():
        raise ValueError("ceilings contain NaN; use +inf for 'no ceiling'")
    return None if np.isposinf(c).all() else c


# ------------------------------------------------------------------------------------------------
# Recall of an approximate index against exact search
# ------------------------------------------------------------------------------------------------
def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (ids object/int [nq,k]; "" / -1 = missing)."""
    hits, total = 0, 0
    for a, e in zip(approx_ids, exact_ids, strict=True):
        ev = {x for x in e if x != "" and x != MISSING_ID}
        hits += len(ev & set(a))
        total += len(ev)
    return hits / total if total else 1.0


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------
def _iter_query_embeddings(uri: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(query ids, embeddings float32 [b, d]) batches streamed from the query embedding Parquet."""
    fs, _ = storage.resolve(uri)
    dim, _ = embedding_layout(uri, QUERY_ID)
    for path in list_parquet(uri):
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=[QUERY_ID, EMBEDDING]):
                yield rb.column(QUERY_ID).to_pylist(), _embeddings(rb.column(EMBEDDING), dim)


class _Positives:
    """query id → (positive ids, excluded ids) from the positives table (ids only, no vectors)."""

    def __init__(self, table: pa.Table) -> None:
        for col in (QUERY_ID, POSITIVE_IDS):
            if col not in table.column_names:
                raise ValueError(f"positives table lacks column {col!r} (has {table.column_names})")
        qids = table.column(QUERY_ID).to_pylist()
        self.row = {q: i for i, q in enumerate(qids)}
        if len(self.row) != len(qids):
            raise ValueError(f"positives table has {len(qids) - len(self.row)} duplicate query ids")
        self.pos = table.column(POSITIVE_IDS).to_pylist()
        self.exc = (table.column(EXCLUDED_IDS).to_pylist() if EXCLUDED_IDS in table.column_names
                    else [[] for _ in qids])
        self.exc = [e or [] for e in self.exc]
        self.pos = [p or [] for p in self.pos]


def _search_batches(
    batches: Iterator[tuple[list[str], Any]],
    positives: _Positives,
    score_fn: Callable[[Any, list[list[str]]], list[np.ndarray]],
    search_fn: Callable[[Any, int, np.ndarray | None], tuple[np.ndarray, np.ndarray, np.ndarray]],
    depth_fn: Callable[[int], int],
    ceiling_fn: Callable[[list[np.ndarray]], np.ndarray] | None,
    cfg: SearchConfig,
    out_uri: str,
    teacher: str,
    counts: dict[str, Any],
) -> list[int]:
    """Shared per-batch loop of the dense and BM25 stages; writes one part file per batch.

    ``search_fn(payload, k, ceilings)`` → (scores [nq,k], doc ids [nq,k], above [nq]): ``above`` =
    corpus docs scoring ``>= ceiling`` (positives included), written as ``ABOVE_CEILING``."""
    depths_all: list[int] = []
    seen: set[str] = set()
    part = 0
    for qids, payload in batches:
        sel = [j for j, q in enumerate(qids) if q in positives.row and q not in seen]
        dup = sum(1 for q in qids if q in seen)
        counts["duplicate_query_embeddings"] += dup
        counts["queries_without_positives"] += len(qids) - len(sel) - dup
        if not sel:
            continue
        qids = [qids[j] for j in sel]
        payload = payload[sel] if isinstance(payload, np.ndarray) else [payload[j] for j in sel]
        seen.update(qids)
        rows = [positives.row[q] for q in qids]
        pos = [positives.pos[r] for r in rows]
        exc = [positives.exc[r] for r in rows]
        pos_scores = score_fn(payload, pos)
        missing = np.fromiter((int(np.isnan(s).sum()) for s in pos_scores), np.int64, len(qids))
        counts["positives_not_found"] += int(missing.sum())
        counts["queries_with_positive_not_found"] += int((missing > 0).sum())
        if ceiling_fn is not None:
            ceil = np.asarray(ceiling_fn([s[~np.isnan(s)] for s in pos_scores]), np.float32).reshape(-1)
            if ceil.shape[0] != len(qids):
                raise ValueError(f"ceiling_fn returned {ceil.shape[0]} ceilings for {len(qids)} queries")
        else:
            ceil = np.full(len(qids), np.inf, np.float32)
        counts["ceiling_nan"] += int(np.isnan(ceil).sum())
        depths = [int(depth_fn(len(p) + len(e))) for p, e in zip(pos, exc, strict=True)]
        if cfg.depth > 0:
            depths = [cfg.depth] * len(qids)
        k = max(depths)
        use = cfg.use_ceiling and ceiling_fn is not None
        scores, ids, above = search_fn(payload, k, np.where(np.isnan(ceil), np.inf, ceil) if use else None)
        above = np.zeros(len(qids), np.int64) if not use else np.asarray(above, np.int64).reshape(-1)
        counts["above_ceiling"] += int(above.sum())
        cand_ids, cand_scores = [], []
        for j, d in enumerate(depths):
            keep = ids[j, :d] != ""
            cand_ids.append(ids[j, :d][keep])
            cand_scores.append(scores[j, :d][keep])
            counts["queries_short"] += int(keep.sum() < d)
        counts["candidates"] += int(sum(len(c) for c in cand_ids))
        table = pa.table(
            {
                QUERY_ID: pa.array(qids, pa.string()),
                POSITIVE_IDS: pa.array(pos, pa.list_(pa.string())),
                POSITIVE_SCORES: _list_array([np.asarray(s, np.float32) for s in pos_scores], pa.float32()),
                EXCLUDED_IDS: pa.array(exc, pa.list_(pa.string())),
                CANDIDATE_IDS: _list_array(cand_ids, pa.string()),
                CANDIDATE_SCORES: _list_array(cand_scores, pa.float32()),
                CEILING: pa.array(ceil, pa.float32()),
                TEACHER: pa.array([teacher] * len(qids), pa.string()),
                ABOVE_CEILING: pa.array(above, pa.int64()),
            },
            schema=SEARCH_SCHEMA,
        )
        storage.makedirs(out_uri)
        fs, path = storage.resolve(storage.join(out_uri, PART.format(part)))
        pq.write_table(table, path, filesystem=fs)
        part += 1
        counts["queries"] += len(qids)
        depths_all.extend(depths)
    counts["queries_without_embedding"] = len(positives.row) - len(seen)
    counts["parts"] = part
    return depths_all


def _list_array(values: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """Variable-length lists from per-row numpy arrays without per-element Python objects."""
    lens = np.fromiter((len(v) for v in values), np.int32, len(values))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)  # [n + 1]
    flat = np.concatenate(values) if values else np.empty(0)
    if pa.types.is_string(value_type):
        flat_arr = pa.array(flat.astype(object) if flat.size else [], pa.string())
    else:
        flat_arr = pa.array(flat.astype(np.float32) if flat.size else np.empty(0, np.float32), value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat_arr)


def _new_counts() -> dict[str, Any]:
    return {k: 0 for k in ("queries", "queries_without_positives", "positives_not_found",
                           "queries_with_positive_not_found", "ceiling_nan", "duplicate_query_embeddings", "queries_short", "candidates",
                           "short_below_ceiling_at_max_depth", "above_ceiling")}


def _depth_summary(depths: list[int]) -> dict[str, Any]:
    if not depths:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(min(depths)), "max": int(max(depths)), "mean": round(float(np.mean(depths)), 2)}


def search_stage(
    query_emb_uri: str,
    positives: pa.Table,
    index: ShardedIndex,
    depth_fn: Callable[[int], int],
    ceiling_fn: Callable[[list[np.ndarray]], np.ndarray] | None,
    cfg: SearchConfig,
    out_uri: str,
    teacher: str,
    key_extra: Any = None,
) -> dict[str, Any]:
    """Candidates of every query for one dense teacher → Parquet under ``out_uri`` + manifest.

    Per batch of ``cfg.query_batch_size`` query embeddings: exact positive scores
    (``index.lookup_scores``), ceilings = ``ceiling_fn(positive scores without the missing ones)``,
    candidates = ``index.search(k = max depth of the batch, ceilings)``, each row cut to
    ``depth_fn(#positives + #excluded)``. Positives and excluded ids stay in the candidates (mining
    removes and counts them). ``ceiling_fn`` gets each query's positive scores with the positives
    missing from the corpus (NaN, counted) left out; a NaN ceiling is written as NaN (the mine stage
    drops such queries) and that query is searched without a ceiling. ``ABOVE_CEILING``: corpus docs
    scoring ``>= ceiling`` (the ceiling's removals, positives included; exact for ``Flat``, a lower
    bound for IVF/PQ; 0 without a ceiling), summed in ``counts["above_ceiling"]``. ``key_extra``: whatever else decides the output (mining config, upstream
    stage keys), since the callables cannot be hashed. Skipped when a manifest with the same key exists.
    """
    key = storage.stage_key(STAGE, teacher, to_dict(cfg), query_emb_uri, index.uri, index.num_docs,
                            index.cfg.index_factory, key_extra)
    done, run = storage.begin(out_uri, f"{STAGE}:{teacher}", key, config=to_dict(cfg))
    if run is None:
        return done
    run.counts = _new_counts()
    shorts = []
    sample: list[np.ndarray] = []

    def search_fn(q: np.ndarray, k: int, ceil: np.ndarray | None):
        if not index.exact and len(sample) * cfg.query_batch_size < cfg.recall_sample:
            sample.append(q[: cfg.recall_sample])
        s, ids = index.search(q, k, ceil)
        shorts.append(index.last_stats.get("short", 0))
        return s, ids, index.last_above_ceiling

    depths = _search_batches(
        _iter_query_embeddings(query_emb_uri, cfg.query_batch_size), _Positives(positives),
        index.lookup_scores, search_fn, depth_fn, ceiling_fn, cfg, out_uri, teacher, run.counts,
    )
    run.counts["short_below_ceiling_at_max_depth"] = int(sum(shorts))
    recall = None
    if not index.exact and sample and depths:
        q = np.concatenate(sample)[: cfg.recall_sample]  # [n_sample, d]
        recall = {}
        for k in sorted({10, min(max(depths), index.num_docs)}):
            approx = index.search(q, k)[1]
            exact = index.search_exact(q, k)[1]
            recall[f"recall@{k}"] = round(recall_at_k(approx, exact), 4)
        log.info("search[%s]: %s on %d queries (%s)", teacher, recall, len(q), cfg.index_factory)
    return run.finish(teacher=teacher, depth=_depth_summary(depths), recall=recall,
                      index={"factory": cfg.index_factory, "shards": index.sizes, "dim": index.dim,
                             "num_docs": index.num_docs})


def bm25_search_stage(
    queries: pa.Table,
    corpus: pa.Table,
    positives: pa.Table,
    teacher_cfg: TeacherConfig,
    depth_fn: Callable[[int], int],
    ceiling_fn: Callable[[list[np.ndarray]], np.ndarray] | None,
    cfg: SearchConfig,
    out_uri: str,
    teacher: str = "bm25",
    key_extra: Any = None,
) -> dict[str, Any]:
    """The search stage for the BM25 teacher: same output table and manifest as :func:`search_stage`.

    ``queries`` (QUERY_ID, TEXT), ``corpus`` (DOC_ID, TEXT). BM25 search is exact, so the ceiling is
    applied inside the search. Positive ids absent from the corpus score NaN and are counted."""
    from raymine.bm25 import BM25Teacher

    key = storage.stage_key(STAGE, teacher, to_dict(cfg), to_dict(teacher_cfg), corpus.num_rows,
                            queries.num_rows, key_extra)
    done, run = storage.begin(out_uri, f"{STAGE}:{teacher}", key, config=to_dict(cfg))
    if run is None:
        return done
    run.counts = _new_counts()
    doc_ids = corpus.column(DOC_ID).to_pylist()
    bm25 = BM25Teacher(teacher_cfg)
    bm25.index(doc_ids, corpus.column(TEXT).to_pylist())
    known = set(doc_ids)

    def score_fn(texts: list[str], pos: list[list[str]]) -> list[np.ndarray]:
        present = [[d for d in p if d in known] for p in pos]
        scored = bm25.score(texts, present)
        out = []
        for p, s in zip(pos, scored, strict=True):
            full = np.full(len(p), np.nan, np.float32)
            full[[j for j, d in enumerate(p) if d in known]] = s
            out.append(full)
        return out

    def search_fn(texts: list[str], k: int, ceil: np.ndarray | None):
        ids, scores, above = bm25.search(texts, k, ceil, return_above=True)
        return scores, ids, above

    qids = queries.column(QUERY_ID).to_pylist()
    texts = queries.column(TEXT).to_pylist()
    bs = cfg.query_batch_size
    batches = ((qids[i : i + bs], texts[i : i + bs]) for i in range(0, len(qids), bs))
    depths = _search_batches(batches, _Positives(positives), score_fn, search_fn, depth_fn, ceiling_fn,
                             cfg, out_uri, teacher, run.counts)
    return run.finish(teacher=teacher, depth=_depth_summary(depths), recall=None,
                      index={"factory": "bm25", "num_docs": len(doc_ids)})


__all__ = [
    "SEARCH_SCHEMA", "Piece", "Shard", "ShardedIndex", "balanced_sizes", "bm25_search_stage",
    "embedding_layout", "list_parquet", "plan_shards", "recall_at_k", "search_stage",
]
