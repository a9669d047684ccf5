"""Embed stage: a Ray Data actor pool of dense teachers → Parquet embedding files + manifest.

Each actor holds one :class:`raymine.encoders.Encoder` (loaded once) and embeds blocks of texts;
the driver consumes the output in input order and writes ``part-00000.parquet``, ``part-00001…``
(id column + ``EMBEDDING`` as ``fixed_size_list<float32|float16>[dim]``), so reading the files in
name order gives the input order. Peak memory per actor is one block, whatever the corpus size.
A finished stage with the same teacher, embed config and input is skipped on re-run.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymine import storage
from raymine.columns import EMBEDDING
from raymine.config import EmbedConfig, TeacherConfig, to_dict

log = logging.getLogger(__name__)

STAGE = "embed"
PART = "part-{:05d}.parquet"
_TRUNCATED = "__truncated"  # per-row flag carried from the actors to the driver, not written
_ACTOR = "__actor"  # per-row pid of the actor that embedded it: shows whether the pool was used


# ------------------------------------------------------------------------------------------------
# Arrow helpers (pure)
# ------------------------------------------------------------------------------------------------
def embeddings_to_arrow(emb: np.ndarray) -> pa.FixedSizeListArray:
    """[n, dim] float16/float32 → fixed_size_list<float>[dim] without copying to Python objects."""
    n, dim = emb.shape
    flat = pa.array(np.ascontiguousarray(emb).reshape(-1))  # [n * dim]
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def arrow_to_embeddings(col: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """fixed_size_list<float>[dim] column → float32 [n, dim]."""
    if isinstance(col, pa.ChunkedArray):
        chunks = [arrow_to_embeddings(c) for c in col.chunks]
        dim = col.type.list_size
        return np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    dim = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False)  # [n * dim], respects slicing offsets
    return values.reshape(len(col), dim).astype(np.float32, copy=False)  # [n, dim]


def embedding_schema(id_column: str, dim: int, storage_dtype: str) -> pa.Schema:
    value = pa.float16() if storage_dtype == "float16" else pa.float32()
    return pa.schema([(id_column, pa.string()), (EMBEDDING, pa.list_(value, dim))])


# ------------------------------------------------------------------------------------------------
# The Ray step: one encoder per actor
# ------------------------------------------------------------------------------------------------
class EmbedBatch:
    """Callable class for ``map_batches``: loads the teacher once, embeds each batch of texts."""

    def __init__(self, teacher: TeacherConfig, side: str, id_column: str, text_column: str) -> None:
        from raymine.encoders import Encoder

        self.encoder = Encoder(teacher)
        self.side = side
        self.id_column = id_column
        self.text_column = text_column
        self.out_dtype = np.float16 if teacher.storage_dtype == "float16" else np.float32

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.encoder.encode(batch[self.text_column], self.side)  # [b, dim] float32
        return {
            self.id_column: batch[self.id_column].astype(str).astype(object),
            EMBEDDING: emb.astype(self.out_dtype, copy=False),
            _TRUNCATED: self.encoder.last_truncated,
            _ACTOR: np.full(len(emb), os.getpid(), dtype=np.int64),
        }


# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _preserve_order(ds: Any) -> Iterator[None]:
    """Run ``ds`` with ordered output (the context is shared with the caller: restore it after)."""
    opts = ds.context.execution_options
    before = opts.preserve_order
    opts.preserve_order = True
    try:
        yield
    finally:
        opts.preserve_order = before


def dataset_fingerprint(ds: Any, id_column: str, text_column: str) -> tuple[str, int]:
    """(sha256 of ids and texts in order, row count): one streamed read pass on the driver.

    At web scale pass ``input_key`` (the ingest stage's manifest key) to ``embed_stage`` instead.
    """
    h = hashlib.sha256()
    n = 0
    with _preserve_order(ds):
        for batch in ds.select_columns([id_column, text_column]).iter_batches(
            batch_size=8192, batch_format="pyarrow"
        ):
            for name in (id_column, text_column):
                values = batch.column(name).to_pylist()  # strings only, never embeddings
                h.update("\x1f".join("\x00" if v is None else str(v) for v in values).encode("utf-8"))
                h.update(b"\x1e")
            n += batch.num_rows
    return h.hexdigest()[:16], n


class _PartWriter:
    """Writes ordered batches into part files of at most ``rows_per_file`` rows."""

    def __init__(self, out_uri: str, schema: pa.Schema, rows_per_file: int) -> None:
        self.fs, self.root = storage.resolve(out_uri)
        self.fs.create_dir(self.root, recursive=True)
        self.out_uri = out_uri
        self.schema = schema
        self.rows_per_file = max(1, rows_per_file)
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0

    def _open(self) -> None:
        name = PART.format(len(self.files))
        self.files.append(name)
        self._writer = pq.ParquetWriter(f"{self.root}/{name}", self.schema, filesystem=self.fs)
        self._rows_in_file = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._rows_in_file >= self.rows_per_file:
                self.close()
                self._open()
            take = min(table.num_rows - start, self.rows_per_file - self._rows_in_file)
            self._writer.write_table(table.slice(start, take))
            self._rows_in_file += take
            start += take

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def embed_stage(
    ds: Any,
    id_column: str,
    text_column: str,
    teacher: TeacherConfig,
    embed_cfg: EmbedConfig,
    side: str,
    out_uri: str,
    input_key: str | None = None,
) -> dict[str, Any]:
    """Embed ``ds[text_column]`` with ``teacher`` as ``side`` texts; write Parquet + manifest under ``out_uri``.

    Returns the manifest (counts: rows, truncated; dim; model; prompts; pooling; files; wall time).
    ``input_key`` identifies the input for the skip check (e.g. the ingest stage's key); without it the
    ids and texts are hashed in one streamed pass. Output rows are in input order (file name order).
    """
    import ray

    if side not in ("query", "passage"):
        raise ValueError(f"side must be 'query' or 'passage', got {side!r}")
    if teacher.kind != "dense":
        raise ValueError(f"embed_stage needs a dense teacher, got kind={teacher.kind!r}; BM25 is raymine.bm25")
    missing = [c for c in (id_column, text_column) if c not in ds.columns()]
    if missing:
        raise ValueError(f"embed_stage: input lacks column(s) {missing}; has {ds.columns()}")

    n_rows: int | None = None
    if input_key is None:
        input_key, n_rows = dataset_fingerprint(ds, id_column, text_column)
    key = storage.stage_key(STAGE, to_dict(teacher), to_dict(embed_cfg), side, id_column, text_column, input_key)
    done = storage.completed(out_uri, key)
    if done is not None:
        log.info("embed %s: %s already complete (%s rows), skipping", side, out_uri, done["counts"].get("rows"))
        return done
    storage.delete_dir(out_uri)  # a stale or partial run under this folder

    config = {"teacher": to_dict(teacher), "embed": to_dict(embed_cfg), "side": side, "input_key": input_key}
    run = storage.StageRun(out_uri, f"{STAGE}/{side}", key, config=config)
    ds = ds.select_columns([id_column, text_column])
    if n_rows is None:
        n_rows = ds.count()
    num_blocks = embed_cfg.num_blocks
    if num_blocks < 0:
        num_blocks = max(embed_cfg.num_actors, math.ceil(n_rows / max(1, embed_cfg.rows_per_block)))
    if num_blocks > 0:
        ds = ds.repartition(num_blocks)  # no shuffle: order kept; a few small files would be one block

    out = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"teacher": teacher, "side": side, "id_column": id_column, "text_column": text_column},
        batch_size=embed_cfg.rows_per_block,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=embed_cfg.num_actors),
        num_cpus=embed_cfg.num_cpus_per_actor,
        num_gpus=embed_cfg.num_gpus_per_actor or None,
        # fault tolerance: Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1
        # (ray 2.60 actor_pool_map_operator), so an actor that dies (node lost, OOM kill, preemption) is
        # restarted and its in-flight blocks retried; blocks are pure functions of their rows, so the output
        # is unchanged (tests/test_faults.py kills one mid-stage). Passing them here would go through the
        # deprecated **ray_remote_args.
    )

    writer: _PartWriter | None = None
    written = truncated = 0
    actors: set[int] = set()
    dim = 0
    with _preserve_order(out):
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            emb = batch[EMBEDDING]  # [b, dim]
            if writer is None:
                dim = int(emb.shape[1])
                writer = _PartWriter(out_uri, embedding_schema(id_column, dim, teacher.storage_dtype),
                                     embed_cfg.rows_per_file)
            table = pa.table(
                {id_column: pa.array(batch[id_column], type=pa.string()), EMBEDDING: embeddings_to_arrow(emb)},
                schema=writer.schema,
            )
            writer.write(table)
            written += len(emb)
            truncated += int(np.asarray(batch[_TRUNCATED]).sum())
            actors.update(np.unique(batch[_ACTOR]).tolist())
    if writer is not None:
        writer.close()
    if written != n_rows:
        raise RuntimeError(f"embed {side}: wrote {written} rows but the input has {n_rows}")

    run.counts.update({"rows": written, "truncated": truncated, "input_blocks": num_blocks or None, "actors_used": len(actors)})
    if truncated:
        max_len = teacher.query_max_length if side == "query" else teacher.passage_max_length
        log.warning("embed %s: %d of %d texts truncated at %d tokens", side, truncated, written, max_len)
    return run.finish(
        model=teacher.model,
        side=side,
        prompt=teacher.query_prompt if side == "query" else teacher.passage_prompt,
        query_prompt=teacher.query_prompt,
        passage_prompt=teacher.passage_prompt,
        pooling=teacher.pooling,
        normalize=teacher.normalize,
        dim=dim,
        storage_dtype=teacher.storage_dtype,
        id_column=id_column,
        files=writer.files if writer else [],
    )


# ------------------------------------------------------------------------------------------------
# Reading back (pyarrow only; no Ray)
# ------------------------------------------------------------------------------------------------
def embedding_files(uri: str) -> list[str]:
    """Paths (inside the URI's filesystem) of the part files, in input order."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    return [f"{root}/{n}" for n in names]


def iter_embedding_batches(uri: str, id_column: str, batch_rows: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (ids object [b], embeddings float32 [b, dim]) in input order, one batch in memory at a time."""
    fs, _ = storage.resolve(uri)
    for path in embedding_files(uri):
        pf = pq.ParquetFile(path, filesystem=fs)
        for rb in pf.iter_batches(batch_size=batch_rows, columns=[id_column, EMBEDDING]):
            ids = rb.column(id_column).to_numpy(zero_copy_only=False).astype(object)
            yield ids, arrow_to_embeddings(rb.column(EMBEDDING))


def read_embeddings(uri: str, id_column: str) -> tuple[np.ndarray, np.ndarray]:
    """All (ids object [n], embeddings float32 [n, dim]) — for query-sized tables on the driver."""
    ids, embs = [], []
    for i, e in iter_embedding_batches(uri, id_column):
        ids.append(i)
        embs.append(e)
    if not ids:
        manifest = storage.read_json(storage.join(uri, storage.MANIFEST)) if storage.exists(
            storage.join(uri, storage.MANIFEST)) else {}
        return np.zeros(0, dtype=object), np.zeros((0, int(manifest.get("dim", 0))), dtype=np.float32)
    return np.concatenate(ids), np.concatenate(embs)
