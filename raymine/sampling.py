"""Choosing n negatives from each query's kept candidates, pure numpy, reproducible per query.

Modes (NV-Retriever, arXiv 2407.15831):

- ``top``: the first n kept candidates.
- ``sampled``: n drawn without replacement from the first k kept, p = softmax(score / temperature).
- ``top1_sampled``: the best kept candidate always, plus n-1 drawn the same way from kept ranks 2..k.

Sampling without replacement uses the Gumbel-top-n trick: key = score / T + Gumbel noise, take the
n largest keys. This is exactly successive draws with p ∝ softmax(score / T), renormalised after
each draw (Plackett-Luce), and it is fully vectorised.

Randomness is a pure function of ``(seed, query_id, position)``: each query's 64-bit seed is
splitmix64(FNV-1a-64(UTF-8 query id) XOR splitmix64(seed)), and the uniform for candidate j is
splitmix64(query seed + (j + 1) * golden) — a counter-based generator. Python's ``hash()`` (salted
per process) is never used, so results do not depend on batch boundaries, worker count or process.
Chosen negatives are returned in rank order (best first), whatever order they were drawn in.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from raymine.config import MineConfig

log = logging.getLogger(__name__)

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: Stream offsets so different uses of one query's seed draw unrelated numbers.
STREAM_SAMPLING = 0
STREAM_TEACHER = 1 << 20
STREAM_HIDE = 2 << 20


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def fnv1a64(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Stable 64-bit FNV-1a hash of each id's UTF-8 bytes, vectorised over ids ``[nq]``."""
    import pyarrow as pa  # only for its contiguous UTF-8 buffer; no Ray

    if isinstance(ids, pa.ChunkedArray):
        arr = ids.combine_chunks()
    elif isinstance(ids, pa.Array):
        arr = ids
    else:
        arr = pa.array(np.asarray(ids, dtype=object), pa.string())
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    if arr.null_count:
        raise ValueError("query ids must not be null")
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):
            act = lengths > j
            idx = np.nonzero(act)[0]
            h[idx] = (h[idx] ^ data[starts[idx] + j].astype(np.uint64)) * _FNV_PRIME
    return h


def query_seeds(seed: int, query_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Per-query 64-bit seeds from (seed, query id) — stable across processes and batchings."""
    base = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return splitmix64(fnv1a64(query_ids) ^ base)


def uniforms(seeds: np.ndarray, n: int, stream: int = STREAM_SAMPLING) -> np.ndarray:
    """Uniforms in (0, 1), float64 ``[nq, n]``: element j depends only on (seed of the row, stream + j)."""
    j = np.arange(stream + 1, stream + n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = splitmix64(seeds[:, None] + j[None, :] * _GOLDEN)  # [nq, n]
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


# ------------------------------------------------------------------------------------------------
def kept_rank(keep: np.ndarray) -> np.ndarray:
    """Rank of each kept candidate among its query's kept ones (0 = best), ``[nq, K]`` (junk where not kept)."""
    return np.cumsum(keep, axis=1, dtype=np.int32) - 1


def top(keep: np.ndarray, n: int) -> np.ndarray:
    """The first n kept candidates; chosen-mask ``[nq, K]``."""
    return keep & (kept_rank(keep) < n)


def _gumbel_pick(scores: np.ndarray, keep: np.ndarray, n: int, lo: int, hi: int, temperature: float,
                 seeds: np.ndarray) -> np.ndarray:
    """n of the kept candidates of kept-rank lo..hi-1 per row, without replacement, p ∝ softmax(score / T).

    Works on the compact window ``[nq, hi - lo]``; the uniform of a candidate depends on its kept rank,
    so a row's draw depends only on that row. Returns the chosen-mask ``[nq, K]``.
    """
    if temperature <= 0:
        raise ValueError(f"sample_temperature must be > 0, got {temperature}")
    nq, k = scores.shape
    chosen = np.zeros((nq, k), dtype=bool)
    w = hi - lo
    if n <= 0 or k == 0 or w <= 0:
        return chosen
    idx, _ = gather(keep, hi)  # [nq, hi] columns of the first hi kept, -1 padded
    idx = idx[:, lo:]  # [nq, w]
    ok = idx >= 0
    rows = np.arange(nq)[:, None]
    if n >= w:
        pick = idx
    else:
        g = -np.log(-np.log(uniforms(seeds, w, STREAM_SAMPLING + lo)))  # [nq, w] Gumbel(0, 1)
        key = np.where(ok, scores[rows, np.maximum(idx, 0)].astype(np.float64) / temperature + g, -np.inf)
        part = np.argpartition(-key, n - 1, axis=1)[:, :n]  # [nq, n] the n largest keys
        pick = idx[rows, part]
    r, c = np.nonzero(pick >= 0)
    chosen[r, pick[r, c]] = True
    return chosen


def sampled(scores: np.ndarray, keep: np.ndarray, n: int, k: int, temperature: float,
            seeds: np.ndarray) -> np.ndarray:
    """n drawn without replacement from the first k kept, p = softmax(score / T); mask ``[nq, K]``."""
    return _gumbel_pick(scores, keep, n, 0, k, temperature, seeds)


def top1_sampled(scores: np.ndarray, keep: np.ndarray, n: int, k: int, temperature: float,
                 seeds: np.ndarray) -> np.ndarray:
    """The best kept always, plus n-1 drawn from kept ranks 2..k; mask ``[nq, K]``."""
    first = keep & (kept_rank(keep) == 0)
    if n <= 1:
        return first if n == 1 else np.zeros_like(keep)
    return first | _gumbel_pick(scores, keep, n - 1, 1, k, temperature, seeds)


def sample(cfg: MineConfig, scores: np.ndarray, keep: np.ndarray, query_ids) -> np.ndarray:
    """The configured sampling mode; ``query_ids`` seed each row. Chosen-mask ``[nq, K]``."""
    n = cfg.num_negatives
    if cfg.sampling == "top":
        return top(keep, n)
    seeds = query_seeds(cfg.seed, query_ids)
    if cfg.sampling == "sampled":
        return sampled(scores, keep, n, cfg.sample_top_k, cfg.sample_temperature, seeds)
    if cfg.sampling == "top1_sampled":
        return top1_sampled(scores, keep, n, cfg.sample_top_k, cfg.sample_temperature, seeds)
    raise ValueError(f"mine.sampling: unknown mode {cfg.sampling!r}")


def sampling_label(cfg: MineConfig) -> str:
    """e.g. ``top`` or ``top1_sampled(k=10,T=1)``."""
    if cfg.sampling == "top":
        return "top"
    return f"{cfg.sampling}(k={cfg.sample_top_k},T={cfg.sample_temperature:g})"


def gather(mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices of the True entries of each row, in order: (idx ``[nq, width]`` padded -1, count ``[nq]``)."""
    nq, k = mask.shape
    idx = np.full((nq, width), -1, dtype=np.int64)
    rank = np.cumsum(mask, axis=1, dtype=np.int32) - 1  # [nq, K]
    take = mask & (rank < width)
    r, c = np.nonzero(take)
    idx[r, rank[r, c]] = c
    return idx, take.sum(axis=1)
