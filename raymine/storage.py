"""Local paths and remote URIs (s3://, gs://, hdfs://, file://) through pyarrow's filesystems,
plus stage manifests: a small JSON per stage (config hash, counts, timings) so re-runs skip work."""
from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs
import pyarrow.ipc  # noqa: F401  (pa.ipc)

from raymine.config import config_hash
from raymine.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any pyarrow/fsspec URI."""
    if "://" not in uri:
        import os

        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        import fsspec  # fsspec covers schemes pyarrow lacks (memory://, gcsfs, abfs...)

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    import os

    return os.path.join(uri, *parts)


def relative(uri: str, root: str) -> str | None:
    """``uri``'s path below ``root`` ("" for ``root`` itself, "/"-separated), or None when it is not below it."""
    if ("://" in uri) != ("://" in root):
        return None
    if "://" in uri:
        u, r = uri.rstrip("/"), root.rstrip("/")
        return "" if u == r else (u[len(r) + 1:] if u.startswith(r + "/") else None)
    import os

    rel = os.path.relpath(os.path.abspath(uri), os.path.abspath(root))
    return None if rel == ".." or rel.startswith(".." + os.sep) else ("" if rel == "." else rel.replace(os.sep, "/"))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if "://" in uri else __import__("os").path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


# ------------------------------------------------------------------------------------------------
# Stage manifests: the one skip / clear / resume rule
# ------------------------------------------------------------------------------------------------
STARTED = "_started.json"  # written when a stage starts: its key (a re-run with the same key resumes)


def list_files(uri: str) -> dict[str, int]:
    """{path relative to ``uri``: size in bytes} of every file under ``uri`` (one listing, no reads)."""
    fs, root = resolve(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return {}
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            out[posixpath.relpath(info.path, root) if "://" in uri else __import__("os").path.relpath(info.path, root)] = int(info.size)
    return out


def fingerprint(uri: str) -> str:
    """Hash of the names, sizes and modification times of the file ``uri`` or of every file under it (one
    listing, no reads; "missing" when absent). A table rewritten at the same path changes it, so a cache
    keyed by it is never reused for other content. On object stores the modification time is the object's
    last-modified time (a rewrite changes it)."""
    import hashlib

    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    infos = [info] if info.type == pafs.FileType.File else [
        i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    h = hashlib.sha256()
    for i in sorted(infos, key=lambda i: i.path):
        rel = i.path[len(root):].lstrip("/\\")
        mtime = i.mtime_ns if i.mtime_ns is not None else -1
        h.update(f"{rel}\0{i.size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def parquet_rows(uri: str) -> int | None:
    """Row count from a Parquet file's footer (None when the file is unreadable: truncated, not Parquet)."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowInvalid, pa.ArrowException):
        return None


# ------------------------------------------------------------------------------------------------
# Per-file work on many files (footers): no serial per-file remote call on the driver
# ------------------------------------------------------------------------------------------------
FILES_LOCAL_MAX = 16  # up to this many files the caller reads itself (a Ray round trip costs more)
FILES_PER_TASK = 256  # at least this many files per Ray task ...
FILES_TASKS_MAX = 32  # ... and at most this many tasks, whatever the number of files


def file_chunks(n: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) slices of ``n`` files, one per Ray task: at most ``FILES_TASKS_MAX`` of them (so the
    driver's calls do not grow with the number of parts), each at least ``FILES_PER_TASK`` files."""
    tasks = max(1, min(FILES_TASKS_MAX, n // FILES_PER_TASK))
    return [(n * i // tasks, n * (i + 1) // tasks) for i in range(tasks)]


def map_files(uri: str, paths: list[str], fn: Any) -> list[Any]:
    """``[fn(fs, path) for path in paths]`` in order, ``paths`` inside ``uri``'s filesystem.

    A few files (``FILES_LOCAL_MAX``), or no Ray in this process: done here. More: Ray tasks, each resolving the
    filesystem from ``uri`` and doing a contiguous slice (:func:`file_chunks`), so the driver's own filesystem
    calls stay constant in the number of files (on an object store each would be a request). ``fn`` must be a
    module-level function and return something small (row counts, flags): the results come to the caller."""
    import sys

    ray = sys.modules.get("ray")
    if len(paths) <= FILES_LOCAL_MAX or ray is None or not ray.is_initialized():
        fs, _ = resolve(uri)
        return [fn(fs, p) for p in paths]
    task = ray.remote(num_cpus=0.25)(_map_chunk)
    refs = [task.remote(uri, paths[lo:hi], fn) for lo, hi in file_chunks(len(paths))]
    return [r for chunk in ray.get(refs) for r in chunk]


def _map_chunk(uri: str, paths: list[str], fn: Any) -> list[Any]:
    fs, _ = resolve(uri)
    return [fn(fs, p) for p in paths]


def footer_rows(fs: pafs.FileSystem, path: str) -> list[int] | None:
    """Rows per row group of one Parquet file, from its footer (None when unreadable: truncated, not Parquet)."""
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            md = pq.ParquetFile(f).metadata
            return [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    except (OSError, pa.ArrowInvalid, pa.ArrowException):
        return None


def inside(uri: str, root: str, name: str) -> str:
    """The filesystem-internal path of ``name`` (relative to ``uri``, as :func:`list_files` gives it) under
    ``root`` (``uri``'s own internal path)."""
    import os

    return posixpath.join(root, name) if "://" in uri else os.path.join(root, name)


def _part_records(stage_dir: str) -> pa.Table:
    """(name, bytes, rows) of the files a stage wrote (rows for Parquet parts, from their footers, read by Ray
    tasks past a few files: :func:`map_files`): for stages whose workers do not report their parts."""
    files = [(n, s) for n, s in sorted(list_files(stage_dir).items())
             if not (posixpath.basename(n).startswith("_") or n.startswith("."))]
    _, root = resolve(stage_dir)
    pq_names = [n for n, _ in files if n.endswith(".parquet")]
    groups = dict(zip(pq_names, map_files(stage_dir, [inside(stage_dir, root, n) for n in pq_names], footer_rows), strict=True))
    rows = [None if groups.get(n) is None else sum(groups[n]) for n, _ in files]
    return part_table([n for n, _ in files], [s for _, s in files], rows)


PARTS_FILE = "_parts.arrow"  # the parts of a stage with more than INLINE_PARTS of them (Arrow IPC: name, bytes, rows)
INLINE_PARTS = 1000  # up to this many parts are listed in the manifest itself (and so in report.json)


def part_table(names: Any, sizes: Any, rows: Any) -> pa.Table:
    """The parts of a stage as a table: name (relative to the stage folder), bytes, rows (null: not Parquet)."""
    return pa.table({"name": pa.array(names, pa.string()), "bytes": pa.array(sizes, pa.int64()),
                     "rows": pa.array(rows, pa.int64())})


def _summarise_parts(stage_dir: str, table: pa.Table) -> dict[str, Any]:
    """The manifest's ``parts``: every part inline while there are few; past ``INLINE_PARTS`` the list goes to
    the side file ``PARTS_FILE`` (one write) and the manifest keeps its count, bytes and rows."""
    table = table.sort_by("name")
    if table.num_rows <= INLINE_PARTS:
        return {n: {"bytes": b, **({} if r is None and not n.endswith(".parquet") else {"rows": r})}
                for n, b, r in zip(*(table.column(c).to_pylist() for c in ("name", "bytes", "rows")), strict=True)}
    fs, path = resolve(join(stage_dir, PARTS_FILE))
    with fs.open_output_stream(path) as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return {"file": PARTS_FILE, "count": table.num_rows, "bytes": int(pa.compute.sum(table.column("bytes")).as_py()),
            "rows": int(pa.compute.sum(table.column("rows")).as_py() or 0)}


def listed_parts(stage_dir: str, manifest: dict[str, Any]) -> dict[str, int | None]:
    """{part: bytes} a manifest recorded: inline, or read from its side file (one read)."""
    listed = manifest.get("parts") or {}
    if isinstance(listed.get("file"), str):
        try:
            fs, path = resolve(join(stage_dir, listed["file"]))
            with fs.open_input_file(path) as f:
                t = pa.ipc.open_file(f).read_all()
        except (OSError, pa.ArrowInvalid):
            return {listed["file"]: None}  # a side file gone or damaged: the stage is redone
        return dict(zip(t.column("name").to_pylist(), t.column("bytes").to_pylist(), strict=True))
    return {name: rec.get("bytes") for name, rec in listed.items()}


@dataclass
class StageRun:
    """Timing and counts of one stage; ``finish`` writes the manifest that marks it complete, recording every
    part it wrote with its size and row count (inline, or in a side file past ``INLINE_PARTS``) so a re-run
    can verify them from one listing without reading the data."""

    stage_dir: str
    stage: str
    key: str  # hash of this stage's config and its inputs' keys
    config: Any = None
    started: float = field(default_factory=time.time)
    counts: dict[str, Any] = field(default_factory=dict)

    def finish(self, parts: pa.Table | None = None, **extra: Any) -> dict[str, Any]:
        """Write the manifest. ``parts``: the stage's parts as :func:`part_table` (what its workers reported
        with each write); without it, the stage folder is listed and each Parquet footer read here."""
        records = _part_records(self.stage_dir) if parts is None else parts
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "config": self.config,
            "counts": self.counts,
            "wall_s": round(time.time() - self.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
            "parts": _summarise_parts(self.stage_dir, records),
        }
        write_json(join(self.stage_dir, MANIFEST), manifest)
        log.info("%s: done in %.1f s %s", self.stage, manifest["wall_s"], self.counts)
        return manifest


def stage_key(*parts: Any) -> str:
    """Key of a stage run: its config plus the keys of the stages it reads."""
    return config_hash(list(parts))


def damaged_parts(stage_dir: str, manifest: dict[str, Any]) -> list[str]:
    """Parts recorded in a manifest that are missing or whose size changed (a listing, plus the side file's
    one read where the manifest has one; no part is read)."""
    listed = listed_parts(stage_dir, manifest)
    if not listed:
        return []
    have = list_files(stage_dir)
    return [name for name, size in listed.items() if have.get(name) != size]


def completed(stage_dir: str, key: str) -> dict[str, Any] | None:
    """The manifest of a finished stage with this key whose parts are all intact, or None when it must
    (re-)run. A damaged part (missing, truncated, replaced) is named in a warning."""
    uri = join(stage_dir, MANIFEST)
    if not exists(uri):
        return None
    try:
        manifest = read_json(uri)
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        return None
    bad = damaged_parts(stage_dir, manifest)
    if bad:
        log.warning("%s: %d part(s) missing or changed since the stage finished (%s); redoing them",
                    manifest.get("stage", stage_dir), len(bad), ", ".join(bad[:5]))
        return None
    return manifest


def begin(stage_dir: str, stage: str, key: str, config: Any = None, resume: bool = False
          ) -> tuple[dict[str, Any] | None, StageRun | None]:
    """The one skip / clear / resume rule of every stage.

    (manifest, None) when the stage is done with this key and its parts are intact. Otherwise
    (None, a StageRun to ``finish``): with ``resume`` and an unfinished (or damaged) run of the same key in
    the folder, its parts are kept (the stage redoes only missing or invalid ones, see ``valid_part``);
    anything else in the folder (another key, or a stage that cannot resume) is cleared first."""
    done = completed(stage_dir, key)
    if done is not None:
        log.info("%s: up to date (%s), skipped", stage, stage_dir)
        return done, None
    started = join(stage_dir, STARTED)
    same = False
    if resume and exists(started):
        try:
            same = read_json(started).get("key") == key
        except (OSError, ValueError):
            same = False
    if same:
        log.info("%s: resuming an unfinished run in %s", stage, stage_dir)
        manifest = join(stage_dir, MANIFEST)
        if exists(manifest):
            fs, path = resolve(manifest)
            fs.delete_file(path)
    else:
        delete_dir(stage_dir)
        write_json(started, {"key": key, "stage": stage, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return None, StageRun(stage_dir, stage, key, config=config)


def valid_part(uri: str, rows: int) -> bool:
    """A part left by an earlier run is kept only when its footer says ``rows`` rows; a damaged one is deleted
    (with a warning naming it) so the caller redoes it."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return False
    got = parquet_rows(uri)
    if got == rows:
        return True
    log.warning("%s: damaged part (%s rows, expected %d); redoing it", uri, "unreadable" if got is None else got, rows)
    fs.delete_file(path)
    return False


# ------------------------------------------------------------------------------------------------
# One live run per output folder
# ------------------------------------------------------------------------------------------------
LOCK = "_lock.json"


class RunLock:
    """An output folder owned by one live run: ``OUTPUT/_lock.json`` holds the owner (host, pid) and a
    heartbeat refreshed by a daemon thread. A second run fails while the heartbeat is fresh; a stale lock
    (owner killed: no heartbeat for ``stale_s``, or a dead pid on this host) is taken over with a warning, so
    kill-and-resume works. Object stores have no atomic create: there the check is best effort (two runs
    starting within one heartbeat can both pass)."""

    def __init__(self, output: str, heartbeat_s: float = 10.0, stale_s: float = 60.0) -> None:
        import os
        import socket

        self.uri = join(output, LOCK)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = None

    def _alive(self, held: dict[str, Any]) -> bool:
        import os
        import socket

        if time.time() - float(held.get("heartbeat", 0)) > self.stale_s:
            return False
        if held.get("host") == socket.gethostname():
            try:
                os.kill(int(held.get("pid", -1)), 0)
            except (ProcessLookupError, ValueError):
                return False
            except PermissionError:
                return True
        return True

    def acquire(self) -> RunLock:
        import threading

        if exists(self.uri):
            try:
                held = read_json(self.uri)
            except (OSError, ValueError):
                held = {}
            if held and (held.get("host"), held.get("pid")) != (self.owner["host"], self.owner["pid"]):
                if self._alive(held):
                    raise LockedError(
                        f"{self.uri}: output folder in use by a live run (host {held.get('host')}, pid "
                        f"{held.get('pid')}); wait for it, stop it, or choose another --output")
                log.warning("%s: taking over a stale lock of host %s pid %s (no heartbeat for %.0f s)", self.uri,
                            held.get("host"), held.get("pid"), time.time() - float(held.get("heartbeat", 0)))
        self._beat()
        self._stop = threading.Event()

        def loop(stop=self._stop) -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    self._beat()
                except OSError:  # a transient storage error must not kill the run
                    log.debug("lock heartbeat failed", exc_info=True)

        threading.Thread(target=loop, name="raymine-lock", daemon=True).start()
        return self

    def _beat(self) -> None:
        write_json(self.uri, {**self.owner, "heartbeat": time.time()})

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        fs, path = resolve(self.uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class LockedError(UserError):
    """The output folder belongs to another live run."""
