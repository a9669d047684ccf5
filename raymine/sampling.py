"""Choosing n negatives from each query's kept candidates, pure numpy, reproducible per query and teacher.

Modes (NV-Retriever, arXiv 2407.15831):

- ``top``: the first n kept candidates.
- ``sampled``: n drawn without replacement from the first k kept ("randomly sample n of the top-k").
- ``top1_sampled``: the best kept candidate always, plus n-1 drawn the same way from kept ranks 2..k.

Weighting of the draws (``MineConfig.sample_weighting``):

- ``uniform`` (default): every candidate of the window equally likely — independent of the teacher's
  score scale (cosine, BM25, logits all behave the same).
- ``softmax``: p ∝ exp(z / T) with z the scores **min-max normalised within the query's sampling window**
  (z = (s - min) / (max - min) in [0, 1]; all equal -> uniform), so T means the same for every
  teacher: T = 1 makes the best candidate at most e times likelier than the worst of its window.

Sampling without replacement uses the Gumbel-top-n trick: key = z / T + Gumbel noise (uniform weighting:
key = the uniform itself, the T -> ∞ limit), take the n largest keys. This is exactly successive draws
with p ∝ exp(z / T), renormalised after each draw (Plackett-Luce), and it is fully vectorised.

Randomness is a pure function of ``(seed, teacher, query_id, kept rank)``: a query's 64-bit seed is
splitmix64(FNV-1a-64(UTF-8 query id) XOR splitmix64(seed)); a teacher's stream for it is
splitmix64(query seed XOR splitmix64(FNV-1a-64(teacher name))), so teachers draw independently; the
uniform for kept rank j is splitmix64(stream seed + (j + 1) * golden) — a counter-based generator.
Python's ``hash()`` (salted per process) is never used, so results do not depend on batch boundaries,
padding width, worker count or process. Chosen negatives are returned in rank order (best first).
"""
from __future__ import annotations

import logging
import warnings
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
    if not data.size:
        return h
    last = len(data) - 1
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):  # one pass per byte position, all ids at once
            act = lengths > j
            b = data[np.minimum(starts + j, last)].astype(np.uint64)
            h = np.where(act, (h ^ b) * _FNV_PRIME, h)
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


def teacher_seeds(query_seeds_: np.ndarray, teacher: str) -> np.ndarray:
    """One teacher's stream seeds ``[nq]`` from the per-query seeds: teachers draw independently."""
    t = splitmix64(fnv1a64([teacher]))[0]
    return splitmix64(np.asarray(query_seeds_, dtype=np.uint64) ^ t)


# ------------------------------------------------------------------------------------------------
def kept_rank(keep: np.ndarray) -> np.ndarray:
    """Rank of each kept candidate among its query's kept ones (0 = best), ``[nq, K]`` (junk where not kept)."""
    return np.cumsum(keep, axis=1, dtype=np.int32) - 1


def top(keep: np.ndarray, n: int) -> np.ndarray:
    """The first n kept candidates; chosen-mask ``[nq, K]``."""
    return keep & (kept_rank(keep) < n)


def gather(mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices of the True entries of each row, in order: (idx ``[nq, width]`` padded -1, count ``[nq]``)."""
    nq, k = mask.shape
    idx = np.full((nq, width), -1, dtype=np.int64)
    rank = np.cumsum(mask, axis=1, dtype=np.int32) - 1  # [nq, K]
    take = mask & (rank < width)
    r, c = np.nonzero(take)
    idx[r, rank[r, c]] = c
    return idx, np.count_nonzero(take, axis=1)


def window_size(cfg: MineConfig) -> int:
    """Kept ranks a mode looks at: ``num_negatives`` for top, ``max(num_negatives, sample_top_k)`` otherwise."""
    return cfg.num_negatives if cfg.sampling == "top" else max(cfg.num_negatives, cfg.sample_top_k)


def _pick(win_scores: np.ndarray, win_ok: np.ndarray, n: int, lo: int, hi: int, weighting: str,
          temperature: float, seeds: np.ndarray) -> np.ndarray:
    """n of the window positions lo..hi-1 per row, without replacement; chosen-mask ``[nq, W]``.

    ``win_scores``/``win_ok`` ``[nq, W]``: the first W kept candidates in rank order (ok False past a
    row's kept count). The uniform of position j is the j-th of the row's stream, so a row's draw
    depends only on that row.
    """
    nq, w_all = win_ok.shape
    chosen = np.zeros((nq, w_all), dtype=bool)
    hi = min(hi, w_all)
    w = hi - lo
    if n <= 0 or w <= 0:
        return chosen
    ok = win_ok[:, lo:hi]  # [nq, w]
    if n >= w:
        chosen[:, lo:hi] = ok
        return chosen
    u = uniforms(seeds, w, STREAM_SAMPLING + lo)  # [nq, w]
    if weighting == "uniform":
        key = np.where(ok, u, -np.inf)
    elif weighting == "softmax":
        if temperature <= 0:
            raise ValueError(f"sample_temperature must be > 0, got {temperature}")
        s = win_scores[:, lo:hi].astype(np.float64)  # [nq, w]
        s_ok = np.where(ok & np.isfinite(s), s, np.nan)
        with warnings.catch_warnings():  # rows with no valid entry: all-NaN slices, never chosen
            warnings.simplefilter("ignore", RuntimeWarning)
            smin = np.nanmin(s_ok, axis=1, keepdims=True)  # [nq, 1]
            smax = np.nanmax(s_ok, axis=1, keepdims=True)
        span = smax - smin
        z = np.where(span > 0, (s - smin) / np.where(span > 0, span, 1.0), 0.0)  # [nq, w] in [0, 1]
        z = np.where(np.isfinite(z), z, 0.0)  # a ±inf/NaN score: weight of the window's worst
        key = np.where(ok, z / temperature - np.log(-np.log(u)), -np.inf)
    else:
        raise ValueError(f"mine.sample_weighting: unknown weighting {weighting!r}")
    part = np.argpartition(-key, n - 1, axis=1)[:, :n]  # [nq, n] the n largest keys
    rows = np.arange(nq)[:, None]
    chosen[rows, part + lo] = ok[rows, part]  # rows with < n ok keep only their ok positions
    return chosen


def sample_window(cfg: MineConfig, win_scores: np.ndarray, win_ok: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The configured mode on a window of the first W kept (rank order); chosen-mask ``[nq, W]``.

    ``seeds`` ``[nq]``: the teacher's stream seeds (:func:`teacher_seeds`); unused for ``top``.
    """
    n, k = cfg.num_negatives, cfg.sample_top_k
    nq, w = win_ok.shape
    if cfg.sampling == "top":
        chosen = win_ok.copy()
        chosen[:, n:] = False
        return chosen
    if cfg.sampling == "sampled":
        return _pick(win_scores, win_ok, n, 0, k, cfg.sample_weighting, cfg.sample_temperature, seeds)
    if cfg.sampling == "top1_sampled":
        if n <= 0:
            return np.zeros((nq, w), dtype=bool)
        chosen = _pick(win_scores, win_ok, n - 1, 1, k, cfg.sample_weighting, cfg.sample_temperature, seeds)
        chosen[:, 0] = win_ok[:, 0]
        return chosen
    raise ValueError(f"mine.sampling: unknown mode {cfg.sampling!r}")


def sample(cfg: MineConfig, scores: np.ndarray, keep: np.ndarray, query_ids, teacher: str = "") -> np.ndarray:
    """The configured mode on padded ``[nq, K]`` arrays; rows seeded by (cfg.seed, teacher, query id).

    Returns the chosen-mask ``[nq, K]``.
    """
    w = window_size(cfg)
    idx, _ = gather(keep, w)  # [nq, w] columns of the first w kept, -1 padded
    ok = idx >= 0
    rows = np.arange(len(keep))[:, None]
    win_scores = np.where(ok, scores[rows, np.maximum(idx, 0)], -np.inf) if scores.size else np.zeros(idx.shape)
    seeds = (teacher_seeds(query_seeds(cfg.seed, query_ids), teacher) if cfg.sampling != "top"
             else np.zeros(len(keep), np.uint64))
    ch = sample_window(cfg, win_scores, ok, seeds)  # [nq, w]
    out = np.zeros(keep.shape, dtype=bool)
    r, c = np.nonzero(ch)
    out[r, idx[r, c]] = True
    return out


def sampling_label(cfg: MineConfig) -> str:
    """e.g. ``top``, ``top1_sampled(k=10)`` (uniform) or ``sampled(k=10,softmax T=0.5)``."""
    if cfg.sampling == "top":
        return "top"
    if cfg.sample_weighting == "uniform":
        return f"{cfg.sampling}(k={cfg.sample_top_k})"
    return f"{cfg.sampling}(k={cfg.sample_top_k},softmax T={cfg.sample_temperature:g})"
