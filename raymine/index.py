"""Sharded FAISS index on Ray actors: S shard actors over the corpus embeddings, each holding a FAISS
index; a query batch fans out to every shard and the partial top-k lists merge
(``raymine.topk.merge_topk_by_id``) into the global top-k, equal to one brute-force search over the whole
corpus for ``Flat`` with ties broken by doc id (so no result depends on file layout or sharding).

- The driver lists Parquet metadata only; every shard actor reads its own rows (files / row groups).
- Each shard keeps its rows sorted by doc id; the global int id of a document = shard offset + its
  rank by id within the shard (shards are consecutive slices of the rows in file-name order).
- Ceiling-aware search (positive-aware mining): exact indexes mask ``score >= ceiling`` inside the
  shard scan (torch matmul + top-k), so no depth is guessed. Indexes that cannot mask (IVF/PQ) are
  re-queried deeper (k doubling up to ``max_depth``) for the queries still short; the rest is counted.
- IVF/PQ scores are never approximate where they matter: shards re-score their candidates exactly
  before ranking (so the ceiling test and the returned scores are exact); a query whose probed cells
  ran out ("exhausted") is re-queried with nprobe doubled up to ``max_nprobe``, and counted.
- The ceiling's removals are counted, not hidden: per query, how many corpus documents scored
  ``>= ceiling`` (``above``; exact for exact indexes and BM25, a lower bound for IVF/PQ: only the
  results seen while re-querying are counted).
- Shards keep their raw vectors (exact positive scores, re-scoring, recall against exact search); for
  ``Flat`` that is the index's own storage, no copy. ``keep_vectors=False`` keeps only an approximate
  index's codes in RAM and re-reads the rows it needs from Parquet (see :class:`Shard`).
- The client (:class:`ShardedIndex`) pickles as actor handles + metadata and its ``search_batch`` is
  stateless, so Ray Data tasks can share one index.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raymine import storage
from raymine._deps import import_faiss
from raymine.columns import DOC_ID, EMBEDDING
from raymine.config import SearchConfig, to_dict
from raymine.parts import Piece, list_parquet  # noqa: F401 (re-exported: the index's Parquet layout)
from raymine.topk import MISSING_ID, merge_topk, merge_topk_by_id, streamed_search, torch_search

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss-gpu selection limit (GPU_MAX_SELECTION_K)

# ------------------------------------------------------------------------------------------------
# Parquet layout (driver side: metadata only)
# ------------------------------------------------------------------------------------------------
def embedding_layout(uri: str, id_column: str = DOC_ID) -> tuple[int, list[tuple[str, int, int]]]:
    """(dim, [(path, row_group, num_rows)...]) of an embedding table, from Parquet metadata only (one listing
    here; the footers read by Ray tasks past a few files: ``storage.map_files``)."""
    files = list_parquet(uri)
    dim = None
    groups = []
    for path, (rows, d, err) in zip(files, storage.map_files(uri, files, partial(_embedding_footer, id_column=id_column)),
                                     strict=True):
        if err:
            raise ValueError(f"{path}: {err}")
        if dim is not None and d != dim:
            raise ValueError(f"{path}: embedding dim {d} differs from earlier files ({dim})")
        dim = d
        groups.extend((path, g, n) for g, n in enumerate(rows))
    assert dim is not None
    return dim, groups


def _embedding_footer(fs: Any, path: str, id_column: str) -> tuple[list[int], int, str | None]:
    """(rows per row group, dim, error or None) of one embedding file, from its footer."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        for col in (id_column, EMBEDDING):
            if col not in schema.names:
                return [], 0, f"column {col!r} missing (has {schema.names})"
        t = schema.field(EMBEDDING).type
        if not pa.types.is_fixed_size_list(t) or t.value_type not in (pa.float32(), pa.float16()):
            return [], 0, f"{EMBEDDING} must be fixed_size_list<float32|float16>[dim], got {t}"
        return [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)], t.list_size, None


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
    return _stored_embeddings(col, dim).astype(np.float32, copy=False)


def _stored_embeddings(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """fixed_size_list column → [n, dim] in its stored dtype (float16 stays float16: no float32 copy)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), dim)


ID_BYTES = 64  # per shard row beside its vector: the id string, the sort permutation, Arrow overhead


def stored_value_bytes(uri: str) -> int:
    """Bytes per stored vector element (2 for float16, 4 for float32), from the first file's schema only (one
    footer read, whatever the number of parts; a table mixing both is sized by its first file)."""
    fs, _ = storage.resolve(uri)
    with fs.open_input_file(list_parquet(uri)[0]) as f:
        t = pq.ParquetFile(f).schema_arrow.field(EMBEDDING).type
    return 2 if t.value_type == pa.float16() else 4


def shard_actor_options(cfg: SearchConfig, rows: int, dim: int, value_bytes: int) -> dict[str, Any]:
    """Ray options of one shard actor: spread over the nodes (``SPREAD``: shards of one index land on different
    nodes when they can, so their memory and GPUs add up), with a ``memory`` request sized from the shard —
    its vectors in the stored dtype, its ids, and ``cfg.shard_memory_overhead_mb`` for the process — so Ray
    places a shard only where it fits. A shard that dies (node lost, OOM kill) restarts and rebuilds the same
    rows from Parquet in ``__init__``; calls in flight are retried, so a search never returns a partial merge."""
    memory = rows * dim * value_bytes + rows * ID_BYTES + (cfg.shard_memory_overhead_mb << 20)
    return {"num_cpus": cfg.num_cpus_per_shard, "num_gpus": cfg.num_gpus_per_shard, "max_restarts": -1,
            "max_task_retries": -1, "scheduling_strategy": "SPREAD", "memory": int(memory)}


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32, copy=False)


ADD_CHUNK_ROWS = 1 << 16  # float16 vectors handed to FAISS (float32 only) this many rows at a time


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
    """One shard: reads its pieces, builds a FAISS index, answers searches with shard-local rows.

    Approximate indexes (IVF/PQ) never hand out approximate scores: a search fetches
    ``k * refine_factor`` candidates from the index and re-scores every one exactly (inner product with
    the stored vector) before they are ranked, compared with a ceiling or returned. Where the exact
    vectors come from is the memory trade-off (``SearchConfig.keep_vectors``):

    - ``True`` (default): raw float32 vectors in RAM beside the codes, ``4·d`` bytes/doc on top of the
      index — what FAISS's ``IndexRefineFlat`` (",RFlat") would keep, but also usable for exact positive
      scores and exact scans (recall); re-scoring is a gather + dot product.
    - ``False``: only the index stays in RAM (IVF-PQm: ``m`` code bytes + 8 id bytes per doc); re-scoring,
      positive scores and exact scans re-read the row groups holding the needed rows from Parquet (I/O per
      call grows with the row groups the candidates touch). The build streams the pieces twice (training
      sample, then ``add``), so the raw vectors are never all in memory.

    A query whose probed IVF cells held fewer than the requested candidates is flagged ``exhausted``
    (the client re-queries it with a larger nprobe)."""

    def __init__(self, uri: str, pieces: list[Piece], dim: int, cfg: dict[str, Any], threads: int) -> None:
        faiss = import_faiss()
        import torch

        from raymine.config import SearchConfig

        self.cfg = SearchConfig(**cfg)
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        t0 = time.time()
        self.uri = uri
        self.pieces = list(pieces)
        self._starts = np.concatenate([[0], np.cumsum([p.hi - p.lo for p in pieces])]).astype(np.int64)  # [P+1]
        n = int(self._starts[-1])
        self.dim = dim
        self.exact = _is_exact(self.cfg.index_factory)
        index = faiss.index_factory(dim, self.cfg.index_factory, faiss.METRIC_INNER_PRODUCT)
        # rows are kept in doc-id order (ties at equal scores then break by id, not by file layout)
        ids: list[pa.Array] = []
        value_types = set()
        for j, p in enumerate(self.pieces):  # pass 1: ids only
            id_col, value_type = self._read_ids(j)
            value_types.add(value_type)
            if id_col.null_count:
                raise ValueError(f"{p.path} row group {p.row_group}: null {DOC_ID}")
            ids.append(id_col.combine_chunks().cast(pa.string()))
        file_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())  # [n] in file order
        del ids
        perm = pc.sort_indices(file_ids).to_numpy().astype(np.int64)  # [n] sorted row -> file row
        inv = np.empty(n, np.int64)
        inv[perm] = np.arange(n)  # [n] file row -> sorted row
        self.doc_ids = file_ids.take(pa.array(perm))  # compact, not Python strs
        del file_ids
        vectors: np.ndarray | None
        # vectors stay in their stored dtype: float16 parts are held as float16 (half the RAM, no float32 copy)
        self.storage_dtype = np.dtype(np.float16 if value_types == {pa.float16()} else np.float32)
        self._faiss_flat = self.exact and self.storage_dtype == np.float32  # FAISS Flat holds float32 only
        if self._faiss_flat and n:
            # size the Flat storage once and fill it in place: no growth-by-doubling copies at build
            index.codes.resize(n * dim * 4)
            index.ntotal = n
            vectors = faiss.rev_swig_ptr(index.get_xb(), n * dim).reshape(n, dim)  # [n, d] view
        elif self.exact or self.cfg.keep_vectors:
            vectors = np.empty((n, dim), self.storage_dtype)  # [n, d]
        else:
            vectors = None  # codes only
        if vectors is None and _nlist(index) == 0:
            raise ValueError(f"keep_vectors=False needs an IVF index (rows are added with ids), got "
                             f"{self.cfg.index_factory!r}")
        train_rows = None  # [t] sorted rows sampled for IVF/PQ training (independent of the file layout)
        if not self.exact and n and not index.is_trained:
            rng = np.random.default_rng(0)
            train_rows = np.sort(rng.choice(n, min(n, self.cfg.train_sample), replace=False))
        sample = None
        if vectors is None and train_rows is not None:
            sample = np.empty((len(train_rows), dim), np.float32)  # [t, d]
            train_file_rows = perm[train_rows]  # [t]
        for j, p in enumerate(self.pieces):  # pass 2: vectors
            emb = self._read_piece(j, stored=True)  # [rows, d] stored dtype
            bad = ~np.isfinite(emb).all(axis=1)
            if bad.any():
                raise ValueError(f"{p.path} row group {p.row_group}: {int(bad.sum())} embeddings with NaN/inf")
            lo = self._starts[j]
            if vectors is not None:
                vectors[inv[lo : lo + len(emb)]] = emb  # Flat: the index storage itself, the only copy
            elif sample is not None:
                sel = (train_file_rows >= lo) & (train_file_rows < lo + len(emb))
                sample[sel] = emb[train_file_rows[sel] - lo]
            del emb
        self.vectors = vectors
        # codes only: map sorted rows <-> file rows to re-read vectors (16 bytes/doc)
        self._perm, self._inv = (perm, inv) if vectors is None else (None, None)
        del perm, inv
        if not self.exact and n:
            if train_rows is not None:
                index.train(_f32(vectors[train_rows]) if vectors is not None else sample)
                del sample
            if vectors is not None:  # FAISS takes float32: float16 vectors go in upcast a chunk at a time
                for lo in range(0, n, ADD_CHUNK_ROWS):
                    index.add(_f32(vectors[lo : lo + ADD_CHUNK_ROWS]))
            else:  # pass 3: add piece by piece under the sorted rows as ids, never all vectors resident
                for j in range(len(self.pieces)):
                    emb = self._read_piece(j)
                    lo = self._starts[j]
                    index.add_with_ids(emb, self._inv[lo : lo + len(emb)])
        pa.default_memory_pool().release_unused()  # give the read buffers back to the OS
        self.index = index
        self.nlist = _nlist(index)
        self.nprobe = self.cfg.nprobe  # default for calls that name none (set_nprobe changes it)
        self._nprobe_set: int | None = None
        self._row: dict[str, int] | None = None
        # device: faiss-gpu when present and asked for; else torch on CUDA for exact search
        self.gpu_index = None
        self.torch_device = "cpu"
        # a streamed shard (a device budget, a low-precision GEMM) or float16 vectors search with torch only
        faiss_gpu_ok = (self._faiss_flat or not self.exact) and not self.cfg.shard_block_bytes and (
            self.cfg.score_dtype == "storage")
        if self.cfg.num_gpus_per_shard > 0 and n:
            if (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and self.cfg.backend != "torch"
                    and faiss_gpu_ok):
                self._gpu_res = faiss.StandardGpuResources()
                self.gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            if torch.cuda.is_available():
                self.torch_device = "cuda"
        self._tvec = None
        self.num_docs = n
        self.build_s = time.time() - t0

    # -- helpers ---------------------------------------------------------------------------------
    def _read_ids(self, j: int) -> tuple[pa.ChunkedArray, pa.DataType]:
        """Doc ids of piece ``j`` (file order), and the value type of its file's embeddings."""
        p = self.pieces[j]
        fs, _ = storage.resolve(self.uri)
        with fs.open_input_file(p.path) as f:
            pf = pq.ParquetFile(f)
            ids = pf.read_row_group(p.row_group, columns=[DOC_ID]).column(DOC_ID).slice(p.lo, p.hi - p.lo)
            return ids, pf.schema_arrow.field(EMBEDDING).type.value_type

    def _read_piece(self, j: int, stored: bool = False) -> np.ndarray:
        """Embeddings of piece ``j`` (file order) → float32 [rows, d] (``stored``: in the file's dtype)."""
        p = self.pieces[j]
        fs, _ = storage.resolve(self.uri)
        with fs.open_input_file(p.path) as f:
            emb_col = pq.ParquetFile(f).read_row_group(p.row_group, columns=[EMBEDDING]).column(EMBEDDING)
        read = _stored_embeddings if stored else _embeddings
        return read(emb_col.slice(p.lo, p.hi - p.lo), self.dim)

    def _vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """Exact vectors of shard rows ``[m]`` → float32 [m, d] (the stored values, upcast): from RAM, or
        re-read from Parquet."""
        if self.vectors is not None:
            return _f32(self.vectors[rows])
        out = np.empty((len(rows), self.dim), np.float32)  # [m, d]
        file_rows = self._perm[rows]  # [m]
        piece = np.searchsorted(self._starts, file_rows, side="right") - 1  # [m]
        for j in np.unique(piece):
            sel = piece == j
            out[sel] = self._read_piece(int(j))[file_rows[sel] - self._starts[j]]
        return out

    def _torch_vectors(self):
        """The whole shard on the device, in its stored dtype (no float32 copy); only without a block budget."""
        import torch

        if self._tvec is None:
            self._tvec = torch.from_numpy(self.vectors).to(self.torch_device)
        return self._tvec

    def _use_torch(self) -> bool:
        return self.exact and (self.cfg.backend == "torch" or not self._faiss_flat or (
            self.cfg.backend == "auto" and self.torch_device == "cuda" and self.gpu_index is None))

    def _set_nprobe(self, nprobe: int) -> None:
        faiss = import_faiss()

        if self.nlist and nprobe != self._nprobe_set:
            for ix in (self.index, self.gpu_index):
                if ix is not None:
                    faiss.ParameterSpace().set_index_parameter(ix, "nprobe", int(nprobe))
            self._nprobe_set = nprobe

    def _faiss_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # faiss-gpu selects at most GPU_MAX_K: deeper searches use the CPU copy of the index
        index = self.gpu_index if self.gpu_index is not None and k <= GPU_MAX_K else self.index
        d, i = index.search(q, k)
        d = d.astype(np.float32)
        d[i < 0] = -np.inf
        return d, i.astype(np.int64)

    def _exact_scan(self, q: np.ndarray, kk: int, ceilings: np.ndarray | None):
        """Brute-force masked top-kk over the shard: (scores [nq,kk], rows [nq,kk], above [nq]).

        Vectors in RAM: :func:`raymine.topk.streamed_search`, exact against the stored dtype — the shard
        resident on the device, or (``shard_block_bytes``) streamed through it in blocks of that many bytes;
        scored in ``score_dtype`` with a float32 re-score near the k-th score and the ceiling."""
        if self.vectors is not None:
            import torch

            budget = self.cfg.shard_block_bytes
            resident = self.torch_device == "cuda" and not budget
            rows = max(1, budget // (self.dim * self.vectors.itemsize)) if budget else None
            sd = None if self.cfg.score_dtype == "storage" else getattr(torch, self.cfg.score_dtype)
            return streamed_search(self._torch_vectors() if resident else self.vectors, q, kk, ceilings,
                                   block_rows=rows, device=self.torch_device, score_dtype=sd, return_above=True)
        parts_s, parts_i = [], []
        above = np.zeros(q.shape[0], np.int64)
        for j in range(len(self.pieces)):  # codes-only: stream the shard's rows from Parquet
            emb = np.array(self._read_piece(j))  # writable copy for torch  [rows, d]
            s, i, a = torch_search(emb, q, kk, ceilings, return_above=True)
            parts_s.append(s)
            parts_i.append(np.where(i >= 0, self._inv[np.maximum(i, 0) + self._starts[j]], MISSING_ID))
            above += a
        s, i = merge_topk(parts_s, parts_i, kk)
        return s, i, above

    def _refined_search(self, q: np.ndarray, kk: int, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate index: ``kk * refine_factor`` candidates, re-scored exactly, best kk kept.
        Returns (exact scores [nq,kk], rows [nq,kk], exhausted [nq] bool)."""
        fetch = min(self.num_docs, max(kk, kk * self.cfg.refine_factor))
        self._set_nprobe(nprobe)
        _, i = self._faiss_search(q, fetch)  # [nq, fetch]; approximate scores dropped
        valid = i >= 0
        exhausted = valid.sum(axis=1) < fetch  # the probed cells held fewer docs than asked for
        s = np.full(i.shape, -np.inf, np.float32)
        if valid.any():
            qi, _ = np.nonzero(valid)
            s[valid] = np.einsum("ij,ij->i", q[qi], self._vectors_of(i[valid]))  # exact inner products
        order = np.lexsort((np.where(valid, i, np.iinfo(np.int64).max), -s), axis=1)[:, :kk]  # ties: lower row
        s = np.take_along_axis(s, order, axis=1)
        i = np.where(np.isneginf(s), MISSING_ID, np.take_along_axis(i, order, axis=1))
        return s, i, exhausted

    # -- actor methods ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"num_docs": self.num_docs, "dim": self.dim, "build_s": round(self.build_s, 3),
                "peak_rss_mb": round(_peak_rss_mb(), 1), "pid": os.getpid(), "nlist": self.nlist,
                "vectors_in_ram": self.vectors is not None, "storage_dtype": self.storage_dtype.name,
                "vector_bytes": 0 if self.vectors is None else int(self.vectors.nbytes),
                "gpu": self.gpu_index is not None or self.torch_device == "cuda"}

    def search(self, q: np.ndarray, k: int, ceilings: np.ndarray | None, exact: bool = False,
               nprobe: int | None = None):
        """Shard top-k: ``(scores [nq,k'], local rows [nq,k'], doc ids object [nq,k'], above [nq],
        exhausted [nq] bool)``, k' = min(k, n); ``above``: shard rows scoring ``>= ceilings[q]`` (0 without
        a ceiling); scores are exact for every index (approximate ones are re-scored).

        Exact masked scan when a ceiling is given (only allowed for exact indexes) or ``exact``."""
        nq = q.shape[0]
        kk = min(k, self.num_docs)
        if ceilings is not None and not self.exact and not exact:
            raise ValueError(f"index {self.cfg.index_factory!r} cannot apply a ceiling; search deeper instead")
        above = np.zeros(nq, np.int64)
        exhausted = np.zeros(nq, bool)
        if kk <= 0 and (ceilings is None or self.num_docs == 0):
            return (np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64), np.empty((nq, 0), object), above,
                    exhausted)
        gpu_k_over = self.exact and self.gpu_index is not None and kk > GPU_MAX_K and self.torch_device == "cuda"
        if ceilings is not None or exact or self._use_torch() or gpu_k_over:  # exact masked/brute-force scan
            s, i, above = self._exact_scan(q, kk, ceilings)
        elif self.exact:
            s, i = self._faiss_search(q, kk)
        else:
            s, i, exhausted = self._refined_search(q, kk, self.nprobe if nprobe is None else nprobe)
        names = self.doc_ids.take(pa.array(np.maximum(i, 0).reshape(-1))).to_numpy(zero_copy_only=False)
        names = np.where(i >= 0, names.reshape(i.shape), "").astype(object)  # [nq, k']
        return s, i, names, above, exhausted

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
            out[hit] = np.einsum("ij,ij->i", q[qidx[hit]], self._vectors_of(rows[hit]))
        return out

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = int(nprobe)
        self._set_nprobe(self.nprobe)

    def memory_mb(self) -> dict[str, float]:
        return {"rss": round(_rss_mb(), 1), "peak_rss": round(_peak_rss_mb(), 1)}


def _nlist(index: Any) -> int:
    """IVF cells of a FAISS index (0 when it has no IVF level)."""
    faiss = import_faiss()

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        return 0


# ------------------------------------------------------------------------------------------------
# Driver-side handle
# ------------------------------------------------------------------------------------------------
class ShardActors:
    """What every sharded index client shares: its shard actors (``self.actors``), their sizes
    (``self.sizes``), and freeing them (``close`` / context manager)."""

    actors: list
    sizes: list[int]

    @property
    def num_docs(self) -> int:
        return int(sum(self.sizes))

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


class ShardedIndex(ShardActors):
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
        self.nprobe = cfg.nprobe  # IVF cells probed per call (set_nprobe changes it)
        self.nlist = max((int(i.get("nlist", 0)) for i in infos), default=0)
        self.last_stats: dict[str, Any] = {}
        self.last_search_stats: dict[str, Any] = {}
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
        value_bytes = stored_value_bytes(uri)
        remote = ray.remote(Shard)
        cfg_d = to_dict(cfg)
        t0 = time.time()
        actors = [remote.options(**shard_actor_options(cfg, n, dim, value_bytes)).remote(uri, plan, dim, cfg_d, threads)
                  for plan, n in zip(plans, sizes, strict=True)]
        infos = ray.get([a.info.remote() for a in actors])
        log.info("search: %d shards %s of %d docs (dim %d, %s) ready in %.1f s", len(actors), sizes, total,
                 dim, cfg.index_factory, time.time() - t0)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return cls(actors, offsets, sizes, dim, cfg, uri, infos)

    def memory_mb(self) -> list[dict[str, float]]:
        """Current and peak resident memory of each shard actor (MiB)."""
        import ray

        return ray.get([a.memory_mb.remote() for a in self.actors])

    def set_nprobe(self, nprobe: int) -> None:
        """Change the IVF cells probed per query on every shard (tuning recall vs speed)."""
        import ray

        self.nprobe = int(nprobe)
        ray.get([a.set_nprobe.remote(nprobe) for a in self.actors])

    # -- search ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickled into Ray tasks as actor handles + metadata; the per-call ``last_*`` results stay behind.
        The process that built the index closes it; a task holding a copy only searches."""
        state = self.__dict__.copy()
        state["last_stats"] = {}
        state["last_above_ceiling"] = np.zeros(0, np.int64)
        return state

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [nq, {self.dim}], got {q.shape}")
        return q

    def _fanout(self, q: np.ndarray, k: int, ceilings: np.ndarray | None, exact: bool = False,
                nprobe: int | None = None):
        """All shards' top-k merged: (scores [nq,k], global ids [nq,k], doc ids object [nq,k], above [nq]
        summed over shards, exhausted [nq] (any shard's probed cells ran out)). No state is kept."""
        import ray

        nq = q.shape[0]
        if not self.actors:
            raise RuntimeError("the index is closed")
        qref = ray.put(q)
        parts = ray.get([a.search.remote(qref, k, ceilings, exact, nprobe) for a in self.actors])
        gids = [np.where(p[1] >= 0, p[1] + off, MISSING_ID) for p, off in zip(parts, self.offsets, strict=True)]
        # ties by doc id: shards rank tied rows by id (rows sorted by id), the merge across shards too
        s, out, pos = merge_topk_by_id([p[0] for p in parts], [p[2] for p in parts], k, return_positions=True)
        g = np.where(pos >= 0, np.take_along_axis(np.concatenate(gids, axis=1), np.maximum(pos, 0), axis=1),
                     MISSING_ID)  # [nq, k] global int ids
        above = np.sum([p[3] for p in parts], axis=0).astype(np.int64).reshape(nq)
        exhausted = np.any([p[4] for p in parts], axis=0).reshape(nq)
        return s, g, out, above, exhausted

    def search_batch(self, payload: np.ndarray, k: int, ceilings: np.ndarray | None = None,
                     return_stats: bool = False):
        """Global top-k of query embeddings ``payload [nq, d]`` below ``ceilings [nq]`` (+inf = none).

        Returns ``(scores float32 [nq,k], doc ids object [nq,k] ("" / -inf missing), above int64 [nq],
        short int)``, plus a stats dict with ``return_stats``. Stateless (safe to call from many Ray
        tasks on one pickled handle). ``above``: corpus docs scoring ``>= ceiling`` (exact for ``Flat``; a
        lower bound for IVF/PQ: those seen while re-querying). ``short``: queries left with fewer than k
        results although the corpus may hold more (approximate indexes at ``max_depth``/``max_nprobe``).
        Stats: ``short``, ``deepest_k``, ``exhausted`` (queries whose probed cells ran out at least once),
        ``requeried_nprobe`` (of those, re-queried with a larger nprobe), ``max_nprobe`` (largest used)."""
        q = self._check_queries(payload)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        s, _, names, above, stats = self._search(q, k, _norm_ceilings(ceilings, q.shape[0]))
        return (s, names, above, stats["short"], stats) if return_stats else (s, names, above, stats["short"])

    def _search(self, q: np.ndarray, k: int, c: np.ndarray | None):
        """(scores, global ids, doc ids, above, stats) — the stateless core of every search method."""
        if self.exact:
            s, g, names, above, _ = self._fanout(q, k, c)
            return s, g, names, above, {"short": 0, "deepest_k": k, "exhausted": 0, "requeried_nprobe": 0,
                                        "max_nprobe": 0}
        return self._search_approx(q, k, c)

    def search(self, queries: np.ndarray, k: int, ceilings: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Global top-k of ``queries [nq, d]`` below ``ceilings [nq]`` (+inf = none).

        Returns ``(scores float32 [nq,k], doc ids object [nq,k])`` ("" / -inf where missing).
        ``self.last_stats`` holds ``short`` (queries that got fewer than k results although the corpus
        may hold more: only for indexes that cannot apply a ceiling) and the deepest k used;
        ``self.last_above_ceiling [nq] int64`` how many corpus docs scored ``>= ceilings[q]`` (removed by
        the ceiling; 0 without one) — exact for ``Flat``, a lower bound for IVF/PQ (results seen while
        re-querying deeper). Kept for existing callers; :meth:`search_batch` is the stateless form."""
        s, _, names = self.search_ids(queries, k, ceilings)
        return s, names

    def search_exact(self, queries: np.ndarray, k: int, ceilings: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Exact (brute-force, sharded) search whatever the index type; reference for recall."""
        q = self._check_queries(queries)
        s, _, names, _, _ = self._fanout(q, k, _norm_ceilings(ceilings, q.shape[0]), exact=True)
        return s, names

    def search_ids(self, queries: np.ndarray, k: int, ceilings: np.ndarray | None = None):
        """Like :meth:`search`, also returning global int ids: (scores, ids int64, doc ids object).
        Sets ``last_stats`` (short, deepest_k), ``last_search_stats`` (all stats) and ``last_above_ceiling``."""
        q = self._check_queries(queries)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        s, g, names, above, stats = self._search(q, k, _norm_ceilings(ceilings, q.shape[0]))
        self.last_stats = {"short": stats["short"], "deepest_k": stats["deepest_k"]}
        self.last_search_stats = stats
        self.last_above_ceiling = above
        return s, g, names

    def _search_approx(self, q: np.ndarray, k: int, c: np.ndarray | None):
        """Indexes that cannot mask (IVF/PQ; candidates come back exactly re-scored by the shards).

        Per query: fetch depth k' (= k first), keep the hits below the ceiling; a query still short
        is re-queried — with nprobe doubled (≤ ``max_nprobe``, ≤ nlist) when a shard's probed cells ran
        out (``exhausted``), else with k' doubled (≤ ``max_depth``). Queries grouped by (k', nprobe)."""
        nq = q.shape[0]
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_g = np.full((nq, k), MISSING_ID, np.int64)
        out_n = np.full((nq, k), "", object)
        above = np.zeros(nq, np.int64)  # results >= ceiling seen: a lower bound on the corpus count
        depth = np.full(nq, k, np.int64)  # [nq] k' per query
        nprobe = np.full(nq, self.nprobe, np.int64)  # [nq]
        cap = max(k, min(self.cfg.max_depth, self.num_docs))
        probe_cap = max(self.nprobe, min(self.cfg.max_nprobe, self.nlist or self.nprobe))
        exhausted_ever = np.zeros(nq, bool)
        raised = np.zeros(nq, bool)
        short = np.zeros(nq, bool)
        deepest = k
        todo = np.arange(nq)
        while todo.size:
            nxt = []
            for kk, npb in sorted({(int(a), int(b)) for a, b in zip(depth[todo], nprobe[todo], strict=True)}):
                grp = todo[(depth[todo] == kk) & (nprobe[todo] == npb)]
                deepest = max(deepest, kk)
                s, g, names, _, exh = self._fanout(q[grp], kk, None, nprobe=npb)
                cg = np.inf if c is None else c[grp, None]
                allowed = (g >= 0) & (s < cg)  # [n_grp, kk], exact scores vs the exact ceiling
                above[grp] = np.maximum(above[grp], ((g >= 0) & ~allowed).sum(axis=1))
                order = np.argsort(~allowed, axis=1, kind="stable")[:, :k]  # allowed first, rank order kept
                keep = np.take_along_axis(allowed, order, axis=1)
                pad = ((0, 0), (0, k - order.shape[1]))
                out_s[grp] = np.pad(np.where(keep, np.take_along_axis(s, order, axis=1), -np.inf), pad,
                                    constant_values=-np.inf)
                out_g[grp] = np.pad(np.where(keep, np.take_along_axis(g, order, axis=1), MISSING_ID), pad,
                                    constant_values=MISSING_ID)
                out_n[grp] = np.pad(np.where(keep, np.take_along_axis(names, order, axis=1), ""), pad,
                                    constant_values="")
                exhausted_ever[grp] |= exh
                need = allowed.sum(axis=1) < k
                more_cells = need & exh & (npb < probe_cap)
                deeper = need & ~exh & (kk < cap)
                complete = ~exh & (kk >= self.num_docs)  # every doc ranked: nothing more exists
                short[grp] = need & ~more_cells & ~deeper & ~complete
                nprobe[grp[more_cells]] = min(2 * npb, probe_cap)
                raised[grp[more_cells]] = True
                depth[grp[deeper]] = min(2 * kk, cap)
                nxt.append(grp[more_cells | deeper])
            todo = np.concatenate(nxt)
        stats = {"short": int(short.sum()), "deepest_k": int(deepest), "exhausted": int(exhausted_ever.sum()),
                 "requeried_nprobe": int(raised.sum()), "max_nprobe": int(nprobe.max()) if nq else self.nprobe}
        if stats["short"]:
            log.warning("search: %d of %d queries have fewer than %d results%s at depth <= %d, nprobe <= %d "
                        "(max_depth / max_nprobe)", stats["short"], nq, k, " below their ceiling" if c is not None
                        else "", cap, probe_cap)
        return out_s, out_g, out_n, above, stats

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
        return merge_lookups(ray.get([a.lookup.remote(qref, qidx, flat) for a in self.actors]), flat, lens)


def merge_lookups(parts: list[np.ndarray], flat: list[str], lens: np.ndarray) -> list[np.ndarray]:
    """Merge the shards' lookups (float32 ``[m]`` each, NaN where the shard does not hold the id) of the
    flattened ids ``flat`` into one array per query (``lens`` ids each); an id held by two shards is an error."""
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
