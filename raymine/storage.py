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
import pyarrow.fs as pafs

from raymine.config import config_hash

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
@dataclass
class StageRun:
    """Timing and counts of one stage; ``finish`` writes the manifest that marks it complete."""

    stage_dir: str
    stage: str
    key: str  # hash of this stage's config and its inputs' keys
    config: Any = None
    started: float = field(default_factory=time.time)
    counts: dict[str, Any] = field(default_factory=dict)

    def finish(self, **extra: Any) -> dict[str, Any]:
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "config": self.config,
            "counts": self.counts,
            "wall_s": round(time.time() - self.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        write_json(join(self.stage_dir, MANIFEST), manifest)
        log.info("%s: done in %.1f s %s", self.stage, manifest["wall_s"], self.counts)
        return manifest


def stage_key(*parts: Any) -> str:
    """Key of a stage run: its config plus the keys of the stages it reads."""
    return config_hash(list(parts))


def completed(stage_dir: str, key: str) -> dict[str, Any] | None:
    """The manifest of a finished stage with this key, or None when it must (re-)run."""
    uri = join(stage_dir, MANIFEST)
    if not exists(uri):
        return None
    try:
        manifest = read_json(uri)
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("key") == key else None


def begin(stage_dir: str, stage: str, key: str, config: Any = None) -> tuple[dict[str, Any] | None, StageRun | None]:
    """(manifest, None) when the stage is already done with this key; else clear the folder of any stale
    or partial run and return (None, a StageRun to ``finish``)."""
    done = completed(stage_dir, key)
    if done is not None:
        log.info("%s: up to date (%s), skipped", stage, stage_dir)
        return done, None
    delete_dir(stage_dir)
    return None, StageRun(stage_dir, stage, key, config=config)

