"""Parquet tables as folders of parts, and the pieces workers read: the I/O every distributed stage shares.

A *piece* is a slice of one row group of one Parquet file, planned from footers only (the driver never
reads rows). Stages that resume per part map piece ``i`` of their input to output part ``i``
(``part_name(i)``), so a re-run after a crash redoes only the pieces whose part is missing or damaged,
and reading the output parts in name order gives the input order: names carry 9 digits (sorted as text
up to 10^9 parts), and :func:`sort_key` orders numbered parts of any width by number, so folders written
with the older 5-digit names (or past 99,999 parts) still read in input order.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymine import storage

PART = "part-{:09d}.parquet"  # 9 digits: text order = input order up to 10^9 parts
LEGACY_PART = "part-{:05d}.parquet"  # names written before (5 digits, a 6th from part 100,000 on)
_NUMBERED = re.compile(r"part-(\d+(?:-\d+)*)\.parquet")  # part-<i> and ingest's part-<task>-<block>


def part_name(i: int) -> str:
    return PART.format(i)


def part_index(name: str) -> int | None:
    """``i`` of a file named exactly ``part_name(i)`` (a path's base name), else None."""
    m = re.fullmatch(r"part-(\d{9,})\.parquet", name.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1])
    return int(m.group(1)) if m and part_name(int(m.group(1))) == m.group(0) else None


def sort_key(path: str) -> str:
    """Sort key giving input order for numbered parts of any width: each number of a ``part-N[-M].parquet``
    base name zero-padded to 20 digits (equal-width names keep their text order; other names are unchanged)."""
    head, sep, base = path.rpartition("/")
    m = _NUMBERED.fullmatch(base)
    if m is None:
        return path
    return head + sep + "part-" + "-".join(d.zfill(20) for d in m.group(1).split("-")) + ".parquet"


def find_part(folder_uri: str, i: int) -> str:
    """URI of part ``i`` of a folder table: its 9-digit name, or the older 5-digit one where only that exists
    (a folder written before the rename). Called by workers: two metadata calls at most."""
    uri = storage.join(folder_uri, part_name(i))
    if storage.exists(uri):
        return uri
    legacy = storage.join(folder_uri, LEGACY_PART.format(i))
    return legacy if storage.exists(legacy) else uri


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` of row group ``row_group`` of one Parquet file (path inside the URI's filesystem)."""

    path: str
    row_group: int
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    def to_row(self) -> dict:
        return asdict(self)


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
    return sorted(files, key=sort_key)


def row_groups(uri: str) -> list[tuple[str, int, int]]:
    """[(path, row group, rows)] of a table in file-name order, from footers only (one listing here; the
    footers read by Ray tasks past a few files: ``storage.map_files``)."""
    files = list_parquet(uri)
    out = []
    for path, rows in zip(files, storage.map_files(uri, files, storage.footer_rows), strict=True):
        if rows is None:
            raise OSError(f"{path}: not a readable Parquet file")
        out.extend((path, g, n) for g, n in enumerate(rows))
    return out


def num_rows(uri: str) -> int:
    """The table's row count, from its footers (no rows read)."""
    return sum(n for *_, n in row_groups(uri))


def schema(uri: str) -> pa.Schema:
    """The table's schema, from its first file's footer (no rows read)."""
    fs, _ = storage.resolve(uri)
    return pq.read_schema(list_parquet(uri)[0], filesystem=fs)


def plan_pieces(uri: str, rows_per_piece: int, groups: list[tuple[str, int, int]] | None = None) -> list[Piece]:
    """Pieces of at most ``rows_per_piece`` rows covering the table in order (empty row groups skipped).
    ``groups``: the table's :func:`row_groups` when the caller has read them already."""
    if rows_per_piece < 1:
        raise ValueError(f"rows_per_piece must be >= 1, got {rows_per_piece}")
    pieces = []
    for path, g, n in row_groups(uri) if groups is None else groups:
        pieces.extend(Piece(path, g, lo, min(n, lo + rows_per_piece)) for lo in range(0, n, rows_per_piece))
    return pieces


def read_piece(uri: str, piece: Piece | dict, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of one piece (``uri`` names the table, for its filesystem)."""
    p = piece if isinstance(piece, Piece) else Piece(**{k: piece[k] for k in ("path", "row_group", "lo", "hi")})
    fs, _ = storage.resolve(uri)
    with fs.open_input_file(p.path) as f:
        table = pq.ParquetFile(f).read_row_group(p.row_group, columns=list(columns) if columns else None)
    return table.slice(p.lo, p.rows)


def read_dataset(uri: str, columns: Sequence[str] | None = None):
    """A table of raymine's (a folder of parts, or one file) as a Ray Dataset: at most :func:`read_tasks`
    read tasks, each reading a run of consecutive files and yielding their row groups one at a time (Ray Data
    may merge small ones into one block), ``columns`` only. The driver lists the files (names only). Row order
    across tasks is not kept (like ``read_parquet``'s default).

    Used for every table raymine wrote itself instead of ``ray.data.read_parquet``, whose default reader in Ray
    2.60 (DataSourceV2: a ListFiles task, then ReadFiles) costs 2–3 s per call even for one small file, against
    0.05 s for this (warm local cluster, 2 cores); a SciFact mining job reads a dozen such tables, ~15 s of it.
    Ray's older V1 reader is as fast but hung a distributed join in the tests.

    The number of tasks is bounded because each Ray Data task costs the driver memory it keeps until the job
    ends (measured: ~14 KB per task for a plain read, ~100 KB per mining task): one task per file made the
    driver grow with the number of parts, i.e. with the queries (one search part per 1,024 queries)."""
    import ray.data

    files = list_parquet(uri)
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, min(len(files), read_tasks()))
                               ).map_batches(_read_files, batch_size=1, batch_format="pyarrow",
                                             fn_kwargs={"uri": uri, "columns": list(columns) if columns else None})


MIN_TASKS = 200  # Ray Data's own floor for a read's parallelism (DataContext.read_op_min_num_blocks)


def read_tasks() -> int:
    """Most tasks one distributed pass over a table gets: Ray Data's default read parallelism, max(200, 2 × the
    cluster's CPUs) — enough to keep every CPU busy, bounded in the data size (``RAYMINE_READ_TASKS`` sets it)."""
    env = os.environ.get("RAYMINE_READ_TASKS")
    if env:
        return max(1, int(env))
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    return max(MIN_TASKS, 2 * cpus)


def bounded_batch(n_rows: int, batch: int) -> int:
    """Rows per task of a pass over ``n_rows`` rows: ``batch``, raised so that the pass has at most
    :func:`read_tasks` tasks (each Ray Data task costs the driver memory for the rest of the job)."""
    return max(batch, -(-n_rows // read_tasks()))


def manifest_rows(uri: str, manifest_uri: str, count: str, path_key: str | None = None) -> int:
    """Row count of the table ``uri``: ``counts[count]`` of the stage manifest that wrote it (no file read; with
    ``path_key``, only when the manifest's ``path_key`` names ``uri``), else its footers (Ray tasks past a few files)."""
    m = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else {}
    n = (m.get("counts") or {}).get(count)
    if n is not None and (path_key is None or m.get(path_key) == uri):
        return int(n)
    return num_rows(uri)


def _read_files(batch: pa.Table, uri: str, columns: list[str] | None) -> Iterator[pa.Table]:
    """``read_dataset``'s task: each row group of each listed file (a file with none: its empty table)."""
    fs, _ = storage.resolve(uri)
    for path in batch.column("path").to_pylist():
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_row_groups == 0:
                schema = pf.schema_arrow
                yield schema.empty_table().select(columns) if columns else schema.empty_table()
            for g in range(pf.metadata.num_row_groups):
                yield pf.read_row_group(g, columns=columns)


def write_part(table: pa.Table, folder_uri: str, i: int, row_group_size: int | None = None) -> str:
    """Write ``table`` as part ``i`` of a folder table (row groups of ``row_group_size`` rows, else pyarrow's
    default); returns its URI. Written under a temporary name and moved into place, so a part that exists is
    complete."""
    return write_part_sized(table, folder_uri, i, row_group_size)[0]


def write_part_sized(table: pa.Table, folder_uri: str, i: int, row_group_size: int | None = None) -> tuple[str, int]:
    """:func:`write_part`, also returning the part's size in bytes: the worker reports its part's metadata
    (rows, bytes) with the write, so the driver never reads it back part by part."""
    uri = storage.join(folder_uri, part_name(i))
    fs, path = storage.resolve(uri)
    fs.create_dir(os.path.dirname(path) if "://" not in uri else path.rsplit("/", 1)[0], recursive=True)
    tmp = path + ".tmp"
    pq.write_table(table, tmp, filesystem=fs, row_group_size=row_group_size)
    size = fs.get_file_info(tmp).size
    fs.move(tmp, path)
    return uri, int(size)


# ------------------------------------------------------------------------------------------------
# Resume: which parts of an earlier run to keep (one listing + footer checks in parallel Ray tasks)
# ------------------------------------------------------------------------------------------------
def kept_parts(folder_uri: str, expected_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept bool [n], bytes int64 [n]) of parts ``0..n-1`` of ``folder_uri`` left by an earlier run of the
    same key: a part is kept when its footer has ``expected_rows[i]`` rows; a damaged one is deleted (so the
    caller redoes it). The driver lists the folder once; the footers of the parts the listing holds are
    read by Ray tasks, at most ``storage.FILES_TASKS_MAX`` of them whatever the number of parts (none when the
    folder is empty: a first run costs one listing)."""
    n = len(expected_rows)
    kept, size = np.zeros(n, bool), np.zeros(n, np.int64)
    present = []
    for name, nbytes in storage.list_files(folder_uri).items():
        i = part_index(name) if "/" not in name and os.sep not in name else None
        if i is not None and i < n:
            present.append(i)
            size[i] = nbytes
    if not present:
        return kept, size
    import ray

    idx = np.sort(np.asarray(present, np.int64))
    check = ray.remote(num_cpus=0.25)(_check_parts)
    chunks = [idx[lo:hi] for lo, hi in storage.file_chunks(len(idx))]
    for chunk, ok in zip(chunks, ray.get([check.remote(folder_uri, c, expected_rows[c]) for c in chunks]), strict=True):
        kept[chunk] = ok
    size[~kept] = 0
    return kept, size


def _check_parts(folder_uri: str, idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``kept_parts``' task: footer row count == expected, for each part of ``idx`` (damaged ones deleted)."""
    return np.fromiter((storage.valid_part(storage.join(folder_uri, part_name(int(i))), int(r))
                        for i, r in zip(idx, rows, strict=True)), bool, len(idx))
