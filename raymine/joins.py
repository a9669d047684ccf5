"""Joins of two Ray Datasets, distributed or in one task: the same rows either way, none through the driver.

Ray Data's hash join starts shuffle actors: on small inputs that start-up is most of the cost (about 10 s
per join for a few thousand rows on 2 cores, three joins per default run). So when every input of a join is
small on disk (``local_join_limit()``, 64 MiB by default, ``RAYMINE_LOCAL_JOIN_BYTES`` to change it; 0 turns
the local path off), the stage joins in **one Ray task** with pyarrow instead; larger inputs always take the
distributed hash join. The stage decides with :func:`is_small` from its input URIs (a listing, no reads).

pyarrow's join takes no list-typed payload columns, so the task joins keys and row numbers only and then
``take``s every other column by row number (missing rows of an outer join become nulls, as in Ray Data).
Output columns: the left table's (keys coalesced), then the right table's non-key columns.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from raymine import storage

LOCAL_JOIN_BYTES = 64 << 20
_HOW = {"inner": "inner", "left_outer": "left outer", "right_outer": "right outer", "full_outer": "full outer"}


def local_join_limit() -> int:
    """Bytes on disk up to which a join runs in one task (``RAYMINE_LOCAL_JOIN_BYTES``, default 64 MiB)."""
    return int(os.environ.get("RAYMINE_LOCAL_JOIN_BYTES", LOCAL_JOIN_BYTES))


JOIN_PARTITION_BYTES = 256 << 20  # input bytes on disk per hash partition of a distributed join (auto sizing)
MIN_PARTITIONS, MAX_PARTITIONS = 4, 4096


def input_bytes(uris: Sequence[str], stop_above: int | None = None) -> int:
    """Bytes on disk of the files under ``uris`` (files or folders): one listing each, no reads; stops
    counting once the total passes ``stop_above``."""
    total = 0
    for uri in uris:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        total += int(info.size or 0) if info.is_file else sum(storage.list_files(uri).values())
        if stop_above is not None and total > stop_above:
            break
    return total


def is_small(uris: Sequence[str]) -> bool:
    """Whether the files under ``uris`` (files or folders) total at most ``local_join_limit()`` bytes."""
    limit = local_join_limit()
    return limit > 0 and input_bytes(uris, stop_above=limit) <= limit


def plan(uris: Sequence[str], partitions: int, output_bytes: int = 0) -> tuple[bool, int]:
    """(local, hash partitions) of a join over the tables under ``uris``: local when they are small
    (:func:`is_small`) and so is ``output_bytes``, the caller's estimate of what the join produces where that is
    larger than its inputs (an id → text join: ids repeated per row, each carrying a passage); else
    ``partitions`` when set (> 0), or one partition per ``JOIN_PARTITION_BYTES`` of the larger of the two (at least
    ``MIN_PARTITIONS``, at most ``MAX_PARTITIONS``), so a 1 TB join is not cut into 4."""
    limit = local_join_limit()
    return plan_bytes(input_bytes(uris, stop_above=None if partitions <= 0 else limit), partitions, output_bytes)


def plan_bytes(total: int, partitions: int, output_bytes: int = 0) -> tuple[bool, int]:
    """:func:`plan` from the inputs' bytes on disk, for a caller that has listed them already."""
    limit = local_join_limit()
    local = limit > 0 and total <= limit and output_bytes <= limit
    if partitions > 0:
        return local, partitions
    size = max(total, output_bytes)
    return local, int(min(MAX_PARTITIONS, max(MIN_PARTITIONS, -(-size // JOIN_PARTITION_BYTES))))


def arrow_join(left: pa.Table, right: pa.Table, on: Sequence[str], how: str) -> pa.Table:
    """``left`` ⋈ ``right`` on ``on`` (Ray Data's ``how`` names), any column types."""
    on = list(on)
    if how not in _HOW:
        raise ValueError(f"join type {how!r} is not one of {list(_HOW)}")
    clash = (set(left.column_names) & set(right.column_names)) - set(on)
    if clash:
        raise ValueError(f"both sides have non-key column(s) {sorted(clash)}; rename one side first")
    li = pa.array(np.arange(left.num_rows, dtype=np.int64))
    ri = pa.array(np.arange(right.num_rows, dtype=np.int64))
    keys = left.select(on).append_column("__left_row", li).join(
        right.select(on).append_column("__right_row", ri), keys=on, join_type=_HOW[how], coalesce_keys=True,
        use_threads=False)
    lrow, rrow = keys.column("__left_row"), keys.column("__right_row")
    cols = {c: keys.column(c) if c in on else left.column(c).take(lrow) for c in left.column_names}
    cols.update({c: right.column(c).take(rrow) for c in right.column_names if c not in on})
    return pa.table(cols)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _join_task(left_refs: list, right_refs: list, on: list[str], how: str) -> pa.Table:
    import ray

    return arrow_join(_concat(ray.get(left_refs)), _concat(ray.get(right_refs)), on, how)


def join(left, right, how: str, num_partitions: int, on: Sequence[str], local: bool, **kwargs):
    """``left.join(right, how, num_partitions, on=on, **kwargs)`` (Ray Data), or with ``local`` the same
    join in one Ray task over both inputs' blocks (``**kwargs`` are the distributed join's only)."""
    import ray
    import ray.data

    if not local:
        return left.join(right, how, num_partitions, on=tuple(on), **kwargs)
    lrefs, rrefs = left.to_arrow_refs(), right.to_arrow_refs()
    if not lrefs or not rrefs:  # an input with no blocks: let Ray Data handle the empty side
        return left.join(right, how, num_partitions, on=tuple(on), **kwargs)
    task = ray.remote(num_cpus=1, max_retries=3)(_join_task)
    return ray.data.from_arrow_refs([task.remote(lrefs, rrefs, list(on), how)])
