"""Embed stage: one Ray Data actor pool per dense teacher embeds its passages AND its queries in one pass.

Each actor loads the teacher once (:class:`raymine.encoders.Encoder`) and takes *pieces* of the input
tables (``raymine.parts``: row-group slices planned from Parquet footers); for each piece it reads the rows
itself, encodes them (length-sorted inside the piece; ingest writes the corpus longest passage first, so a
piece already holds passages of about one length and padding stays small), and writes output part ``i``
for input piece ``i`` (id column + ``EMBEDDING`` as ``fixed_size_list<float32|float16>[dim]``). Nothing
per-row passes through the driver: it plans pieces and sums the small per-piece stats the actors return.

Resumable per part: a new invocation after a crash (driver, node, whole cluster) keeps every part whose
footer has the piece's row count and embeds only the missing pieces; Ray's own in-run retries stay as
they are (an actor that dies is restarted and its in-flight pieces retried). Reading the parts in name
order gives the input order. Pieces are planned from the data and the config only, never from the pool
(:func:`piece_rows`: ``rows_per_block``, a small corpus cut into at least ``MIN_PASSAGE_PIECES``), and the
stage key leaves out the pool's resources (:func:`key_config`), so a run resumed on a resized cluster keeps
every finished part. The pool is sized so every actor stays busy: one piece per task
(``max_tasks_in_flight_per_actor=1``), torch threads per actor = the node's cores divided among the pool's
actors on CPU; the manifest reports actors used, their busy fraction and their start-up. Actors report each
part's rows and bytes with its write: the driver never reads a part back.
"""
from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymine import columns as C
from raymine import parts, storage
from raymine.columns import EMBEDDING
from raymine.config import EmbedConfig, TeacherConfig, to_dict

log = logging.getLogger(__name__)

STAGE = "embed"
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
# The Ray step: one encoder per actor, pieces in, parts written by the actor
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedInput:
    """One table to embed: ``side`` texts of ``table_uri`` (column ``text_column``, ids ``id_column``) →
    the folder ``out_uri``. A corpus without a ``PASSAGE`` column gets ``passage_text(title, text)``."""

    side: str  # "query" | "passage"
    table_uri: str
    id_column: str
    text_column: str
    out_uri: str


def _texts(table: pa.Table, text_column: str) -> list[str]:
    if text_column in table.column_names:
        return table.column(text_column).to_pylist()
    if text_column == C.PASSAGE:  # a corpus table written before PASSAGE existed
        from raymine.ingest import passage_text

        titles = table.column(C.TITLE).to_pylist() if C.TITLE in table.column_names else [None] * table.num_rows
        return [passage_text(t, x) for t, x in zip(titles, table.column(C.TEXT).to_pylist(), strict=True)]
    raise ValueError(f"column {text_column!r} missing (has {table.column_names})")


class EmbedPieces:
    """Callable class for ``map_batches`` over piece descriptors: loads the teacher once, then for each
    piece reads its rows, encodes them and writes the output part; returns per-piece stats only."""

    def __init__(self, teacher: TeacherConfig, inputs: Sequence[EmbedInput], threads: int) -> None:
        self.t_init = time.time()  # the actor's process is up; imports and the model load follow
        import torch

        from raymine.encoders import Encoder

        if threads > 0:
            torch.set_num_threads(threads)
        self.encoder = Encoder(teacher)
        self.inputs = list(inputs)
        self.out_dtype = np.float16 if teacher.storage_dtype == "float16" else np.float32
        self.storage_dtype = teacher.storage_dtype
        self.t_ready = time.time()

    def embed_piece(self, which: int, piece: dict) -> tuple[int, int]:
        """Embed one piece of input ``which`` → its part; (rows, truncated)."""
        spec = self.inputs[which]
        cols = [spec.id_column] + ([spec.text_column] if spec.text_column != C.PASSAGE else [])
        table = parts.read_piece(spec.table_uri, piece)
        table = table.select([c for c in table.column_names if c in cols or c in (C.PASSAGE, C.TITLE, C.TEXT)])
        emb = self.encoder.encode(_texts(table, spec.text_column), spec.side)  # [b, dim] float32
        out = pa.table(
            {spec.id_column: pc_string(table.column(spec.id_column)),
             EMBEDDING: embeddings_to_arrow(emb.astype(self.out_dtype, copy=False))},
            schema=embedding_schema(spec.id_column, emb.shape[1] if emb.size else self.encoder.dim, self.storage_dtype),
        )
        _, self.last_bytes = parts.write_part_sized(out, spec.out_uri, int(piece["part"]))
        return table.num_rows, int(np.asarray(self.encoder.last_truncated).sum())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["part"])
        rows = np.zeros(n, np.int64)
        cut = np.zeros(n, np.int64)
        busy = np.zeros(n, np.float64)
        size = np.zeros(n, np.int64)
        for j in range(n):
            t0 = time.perf_counter()
            piece = {k: batch[k][j] for k in ("path", "row_group", "lo", "hi", "part")}
            rows[j], cut[j] = self.embed_piece(int(batch["input"][j]), piece)
            size[j] = self.last_bytes
            busy[j] = time.perf_counter() - t0
        return {"input": batch["input"], "part": batch["part"], "rows": rows, "truncated": cut, "busy_s": busy,
                "bytes": size,
                "actor": np.full(n, os.getpid(), np.int64), "node": np.array([_node()] * n, dtype=object),
                "t_init": np.full(n, self.t_init), "t_ready": np.full(n, self.t_ready)}


def pc_string(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """An id column as plain Arrow strings."""
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col if col.type == pa.string() else pc.cast(col, pa.string())


def _node() -> str:
    import socket

    return socket.gethostname()


def _threads_per_actor(cfg: EmbedConfig) -> int:
    """torch threads per CPU actor: the node's cores shared by the pool (at least 1); 0 = torch's default."""
    if cfg.num_gpus_per_actor > 0:
        return 0
    return max(1, (os.cpu_count() or 1) // max(1, cfg.num_actors))


MIN_PASSAGE_PIECES = 8  # a passage table is cut into at least this many pieces where the batch size allows


def piece_rows(side: str, total_rows: int, cfg: EmbedConfig, batch_size: int) -> int:
    """Rows per piece of one input, from the data and the config only (never the pool, so piece ``i`` and its
    part are the same whatever the cluster a run resumes on): ``cfg.rows_per_block``, except that a passage
    table too small to give ``MIN_PASSAGE_PIECES`` pieces of that size is cut finer (never below one encoder
    batch), so a small corpus still spreads over the actors. 8 is the earlier per-pool rule (4 pieces per
    actor) at the default 2 actors: default pieces, and so vectors, are unchanged (SciFact's 5,183 passages:
    pieces of 256). Queries keep ``rows_per_block``: search maps query piece ``i`` to query-embedding part
    ``i`` with that size."""
    if side == "query":
        return cfg.rows_per_block
    small = -(-total_rows // MIN_PASSAGE_PIECES)  # ceil
    return max(1, min(cfg.rows_per_block, max(small, batch_size)))


def key_config(cfg: EmbedConfig) -> dict[str, Any]:
    """What of the pool config decides the vectors: the piece size, and CPU vs GPU (GPU encodes in half
    precision). Actors, CPUs and GPUs per actor are resources: a run resumed with another pool keeps its parts."""
    return {"rows_per_block": cfg.rows_per_block, "gpu": cfg.num_gpus_per_actor > 0}


def embed_tables(teacher: TeacherConfig, cfg: EmbedConfig, inputs: Sequence[EmbedInput], stage_dir: str,
                 input_key: Any) -> dict[str, Any]:
    """Embed every input table with one actor pool (one model load per actor); manifest under ``stage_dir``.

    ``input_key`` identifies the inputs (the ingest stage's key). Skipped when done with the same teacher,
    config and input; resumed per part when an unfinished run of the same key left parts behind.
    Counts per side: rows, truncated; stage: actors used, busy fraction, texts/s.
    """
    import ray

    if teacher.kind not in ("dense", "openai"):
        raise ValueError(f"embed needs a dense or served (openai) teacher, got kind={teacher.kind!r}; BM25 is "
                         "raymine.bm25")
    for spec in inputs:
        if spec.side not in ("query", "passage"):
            raise ValueError(f"side must be 'query' or 'passage', got {spec.side!r}")
    actor, extra, served = EmbedPieces, {}, None
    if teacher.kind == "openai":  # a served teacher: same pieces and parts, requests instead of a model
        from raymine import served

        actor = served.ServedPieces
    teacher_key = served.key_config(teacher) if served else to_dict(teacher)
    key = storage.stage_key(STAGE, teacher_key, key_config(cfg), [to_dict_input(s) for s in inputs], input_key)
    done, run = storage.begin(stage_dir, f"{STAGE}:{teacher.model}", key,
                              config={"teacher": to_dict(teacher), "embed": to_dict(cfg)}, resume=True)
    if run is None:
        return done
    if served:  # one tiny request before any work: an endpoint that does not answer ends here (exit 2)
        extra = {"dim": served.probe(teacher)}

    todo: list[dict[str, Any]] = []
    expected: dict[str, int] = {}
    kept = 0
    written: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per input: planned rows, rows, bytes [pieces]
    for which, spec in enumerate(inputs):
        groups = parts.row_groups(spec.table_uri)  # footers, read once
        size = piece_rows(spec.side, sum(n for *_, n in groups), cfg, teacher.batch_size)
        pieces = parts.plan_pieces(spec.table_uri, size, groups)
        missing = [c for c in (spec.id_column,) if c not in parts.schema(spec.table_uri).names] if pieces else []
        if missing:
            raise ValueError(f"{spec.table_uri}: column(s) {missing} missing")
        expected[spec.side] = sum(p.rows for p in pieces)
        plan = np.fromiter((p.rows for p in pieces), np.int64, len(pieces))
        have, nbytes = parts.kept_parts(spec.out_uri, plan)  # one listing; footers checked by Ray tasks
        written.append((plan, np.where(have, plan, -1), nbytes))
        kept += int(have.sum())
        todo.extend({**p.to_row(), "part": i, "input": which} for i, p in enumerate(pieces) if not have[i])
    if kept:
        log.info("embed %s: resuming, %d part(s) already written, %d piece(s) to embed", teacher.model, kept, len(todo))

    stats = {"rows": 0, "truncated": 0}
    per_side = {s.side: {"rows": 0, "truncated": 0} for s in inputs}
    actors: dict[int, float] = {}
    ready: dict[int, tuple[float, float]] = {}  # actor -> (constructor entered, model loaded), wall clock
    nodes: set[str] = set()
    t_map = time.time()
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        out = ds.map_batches(
            actor,
            fn_constructor_kwargs={"teacher": teacher, "inputs": list(inputs), "threads": _threads_per_actor(cfg),
                                   **extra},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(todo)), max_tasks_in_flight_per_actor=1),
            num_cpus=cfg.num_cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor or None,
            # fault tolerance: Ray Data's actor pools restart dead actors and retry their in-flight pieces
            # (max_restarts=-1, max_task_retries=-1 in ray 2.60); a piece's part is rewritten whole.
        )
        for b in out.iter_batches(batch_size=None, batch_format="numpy"):
            if served:
                served.raise_piece_errors(b)  # returned as data by the actor: one line, no worker traceback
            for j in range(len(b["part"])):
                which, part = int(b["input"][j]), int(b["part"][j])
                written[which][1][part], written[which][2][part] = int(b["rows"][j]), int(b["bytes"][j])
                side = inputs[which].side
                per_side[side]["rows"] += int(b["rows"][j])
                per_side[side]["truncated"] += int(b["truncated"][j])
                actors[int(b["actor"][j])] = actors.get(int(b["actor"][j]), 0.0) + float(b["busy_s"][j])
                ready[int(b["actor"][j])] = (float(b["t_init"][j]), float(b["t_ready"][j]))
                nodes.add(str(b["node"][j]))
    wall = max(time.time() - t_map, 1e-9)
    for spec, (plan, rows, _) in zip(inputs, written, strict=True):
        if not np.array_equal(rows, plan):  # every part kept or reported by its actor, with its piece's rows
            raise RuntimeError(f"embed {spec.side}: {int(rows[rows > 0].sum())} rows in {int((rows >= 0).sum())} "
                               f"part(s) written, the input has {expected[spec.side]} in {len(plan)} piece(s)")
        if per_side[spec.side]["truncated"]:
            max_len = teacher.query_max_length if spec.side == "query" else teacher.passage_max_length
            log.warning("embed %s: %d of %d %s texts truncated at %d tokens (raise the teacher's %s_max_length "
                        "to keep them whole)", teacher.model, per_side[spec.side]["truncated"],
                        per_side[spec.side]["rows"], spec.side, max_len, spec.side)
    stats["rows"] = sum(v["rows"] for v in per_side.values())
    stats["truncated"] = sum(v["truncated"] for v in per_side.values())
    busy = sum(actors.values())
    run.counts.update({
        **{f"{side}_{k}": v for side, d in per_side.items() for k, v in d.items()},
        "rows": stats["rows"], "truncated": stats["truncated"], "pieces": len(todo), "parts_kept": kept,
        "actors_used": len(actors), "actors_requested": min(cfg.num_actors, len(todo)) if todo else 0,
        "busy_fraction": round(busy / (wall * max(1, len(actors))), 3) if actors else None,
        "texts_per_s": round(stats["rows"] / wall, 1) if todo else None, "nodes": len(nodes),
    })
    # start-up on the critical path, per actor: stage start -> its model loaded (process start + imports + load)
    startup = sorted(round(r - t_map, 2) for _, r in ready.values())
    load = sorted(round(r - i, 2) for i, r in ready.values())
    dim = parts.schema(inputs[0].out_uri).field(EMBEDDING).type.list_size if expected.get(inputs[0].side) else 0
    log.info("embed %s: %d texts in %.1f s by %d actor(s), busy %.0f%%; actors ready %s s after the start "
             "(imports + model load %s s)", teacher.model, stats["rows"], wall, len(actors),
             100 * (run.counts["busy_fraction"] or 0), startup, load)
    return run.finish(parts=_part_records(stage_dir, inputs, written), model=teacher.model, query_prompt=teacher.query_prompt, passage_prompt=teacher.passage_prompt,
                      pooling=teacher.pooling, normalize=teacher.normalize, dim=dim,
                      storage_dtype=teacher.storage_dtype, busy_s_per_actor=sorted(round(v, 2) for v in actors.values()),
                      ready_s_per_actor=startup, load_s_per_actor=load, wall_s=round(wall, 2))


def _part_records(stage_dir: str, inputs: Sequence[EmbedInput],
                  written: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Any:
    """The parts under ``stage_dir`` as ``storage.part_table``, from what was kept and what the actors reported
    (an output folder outside the stage folder is not the stage's to verify, as with a listing)."""
    names, sizes, rows = [], [], []
    for spec, (_, r, b) in zip(inputs, written, strict=True):
        rel = storage.relative(spec.out_uri, stage_dir)
        if rel is None:
            continue
        names.extend(posixpath.join(rel, parts.part_name(i)) if rel else parts.part_name(i) for i in range(len(r)))
        sizes.append(b)
        rows.append(r)
    return storage.part_table(names, np.concatenate(sizes) if sizes else [], np.concatenate(rows) if rows else [])


def to_dict_input(spec: EmbedInput) -> dict[str, str]:
    """What decides a table's embeddings (not where they are written: a moved output folder still resumes)."""
    return {"side": spec.side, "table": spec.table_uri, "id": spec.id_column, "text": spec.text_column}


# ------------------------------------------------------------------------------------------------
# Reading back (pyarrow only; no Ray)
# ------------------------------------------------------------------------------------------------
def embedding_files(uri: str) -> list[str]:
    """Paths (inside the URI's filesystem) of the part files, in input order."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")),
                   key=parts.sort_key)  # numbered parts by number: 5-digit names of older runs too
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
