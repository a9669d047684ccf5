"""(query, positive) pairs → the BEIR-like Parquet layout that :mod:`raymine.ingest` reads.

Most users' data is pairs, not a BEIR folder: jsonl / Parquet files, an HF dataset saved with
``save_to_disk``, a ``datasets.Dataset``, a pandas frame or a Ray Dataset, with their own column names and
no qrels. This module turns them into ``corpus/``, ``queries/`` and ``qrels/<split>/`` folders of Parquet
parts, then the normal ingest reads them, so every validation and error rule of BEIR input applies.

Rules (those of sentence-transformers' ``mine_hard_negatives``, which users know):

- columns: the anchor (query) column is the one named, else the first column; the positive column the one
  named, else the second (an id column, when named, is left out of that choice). A positive column holding
  lists of texts (FlagEmbedding's ``pos``) gives one pair per element. A named column that does not exist
  is an error (sentence-transformers silently falls back to the first/second column).
- ids: a query id is a stable hash of the query text (blake2b, 96 bits, hex) unless an id column is given;
  a passage id is always the hash of the passage text. Rows with the same anchor text (or id) are one query
  with several positives; the same positive text is one passage wherever it occurs.
- corpus: the positives, plus an optional separate corpus (a list of texts, or a table whose ``text``
  column — with ``title`` when present, joined as ingest joins BEIR titles — is the passage).
- splits: the pairs are the training split (``qrels/<train split>``); there is no test split, so the
  evaluate stage skips itself with a line saying so.

Data flow (Ray Data; the driver lists files and sums one row of counts per block)::

    source --map_batches(pairs_block)--> _pairs/ (query_id, query, doc_id, passage)   one part per block
    _pairs (+ corpus) --hash partition by id--> map_batches(write_unique) --> queries/, corpus/, qrels/<split>/

The conversion is keyed by the source's fingerprint and the column choice (``storage.begin``), so a
repeated run with the same input skips it and the files the ingest fingerprints stay the same.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymine import columns as C
from raymine import parts, storage
from raymine.config import IngestConfig
from raymine.errors import UserError

log = logging.getLogger(__name__)

QUERY = C.QUERY  # the query text in the intermediate pairs table
_STR = pa.string()
PAIRS_SCHEMA = pa.schema([(C.QUERY_ID, _STR), (QUERY, _STR), (C.DOC_ID, _STR), (C.PASSAGE, _STR)])
_ID_BYTES = 12  # 96-bit ids: a collision among 10^12 texts has odds of about 10^-5
_TABLE_EXTS = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz")
_PART_BYTES = 64 << 20  # hash partitions of the dedupe shuffles: one per 64 MiB of normalised pairs


class PairsError(UserError, ValueError):
    """Pairs input that cannot be used (missing path or column, nothing to read); names what to fix."""


def text_id(text: str) -> str:
    """Stable id of a text (exact text, as sentence-transformers deduplicates): 24 hex digits of blake2b."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=_ID_BYTES).hexdigest()


@dataclass(frozen=True)
class PairsColumns:
    """The resolved column choice: anchor (query text), positive (text or list of texts), optional id."""

    anchor: str
    positive: str
    id: str = ""


def resolve_columns(names: list[str], anchor: str | None, positive: str | None, id_column: str | None,
                    where: str) -> PairsColumns:
    """sentence-transformers' rule (first / second column by default); a named column must exist."""
    for what, name in (("anchor", anchor), ("positive", positive), ("id", id_column)):
        if name and name not in names:
            raise PairsError(f"{where}: no {what} column {name!r}; columns are {names}")
    rest = [n for n in names if n != id_column]
    anchor = anchor or (rest[0] if rest else None)
    if not positive:
        others = [n for n in rest if n != anchor]
        positive = others[0] if others else None
    if not anchor or not positive:
        raise PairsError(f"{where}: pairs need two text columns (anchor, positive); columns are {names}")
    if anchor == positive:
        raise PairsError(f"{where}: the anchor and positive columns are the same column {anchor!r}")
    return PairsColumns(anchor, positive, id_column or "")


# ------------------------------------------------------------------------------------------------
# Sources: anything users hold pairs in, as a Ray Dataset (read lazily; never collected on the driver)
# ------------------------------------------------------------------------------------------------
def is_path(source: Any) -> bool:
    return isinstance(source, str) or hasattr(source, "__fspath__")


def _files(uri: str) -> list[str]:
    """The table files of a path: the file itself, or the files of a folder (recursively, ``_``/``.`` skipped)."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise PairsError(f"{uri}: not found; give a jsonl / Parquet file or folder, or an HF dataset folder")
    if info.type == pafs.FileType.File:
        return [uri]
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(_TABLE_EXTS)
                   and not posixpath.basename(i.path).startswith(("_", ".")))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        found = [f"{scheme}://{p}" for p in found]
    return found


def _is_hf_folder(uri: str) -> bool:
    return any(storage.exists(storage.join(uri, n)) for n in ("state.json", "dataset_dict.json"))


def read_source(source: Any, what: str = "pairs"):
    """A Ray Dataset of ``source``: a Ray Dataset, a ``datasets.Dataset``, a pandas frame, a list of texts (a
    corpus), or a path / URI of jsonl / Parquet files or of an HF dataset folder (``save_to_disk``); ``hf://NAME``
    or ``hf://NAME:SPLIT`` loads a hub dataset with ``datasets.load_dataset`` (when a hub is reachable)."""
    import ray.data

    if isinstance(source, ray.data.Dataset):
        return source
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise PairsError(f"{what}: a list must hold texts (str)")
        return ray.data.from_arrow(pa.table({C.TEXT: pa.array(list(source), _STR)}))
    if _is_hf(source):
        return ray.data.from_huggingface(_one_split(source, what))
    if _is_pandas(source):
        return ray.data.from_pandas(source)
    if not is_path(source):
        raise PairsError(f"{what}: cannot read a {type(source).__name__}; give a datasets.Dataset, a pandas "
                         f"DataFrame, a Ray Dataset or a path")
    uri = str(source)
    if uri.startswith("hf://"):
        import datasets

        name, _, split = uri[len("hf://"):].partition(":")
        return ray.data.from_huggingface(datasets.load_dataset(name, split=split or "train"))
    if storage.exists(uri) and _is_hf_folder(uri):
        import datasets

        return ray.data.from_huggingface(_one_split(datasets.load_from_disk(uri), uri))
    files = _files(uri)
    parquet = [f for f in files if f.endswith(".parquet")]
    json = [f for f in files if not f.endswith(".parquet")]
    if not files or (parquet and json):
        raise PairsError(f"{uri}: expected jsonl or Parquet files (one kind), found "
                         f"{len(parquet)} Parquet and {len(json)} json file(s)")
    fs, _ = storage.resolve(uri)
    paths = [storage.resolve(f)[1] for f in files]
    if parquet:
        return ray.data.read_parquet(paths, filesystem=fs)
    return ray.data.read_json(paths, filesystem=fs, file_extensions=None)  # newline-delimited (pyarrow)


def _is_hf(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def _is_pandas(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "pandas" and hasattr(obj, "columns")


def _one_split(ds: Any, where: str) -> Any:
    """A ``DatasetDict`` gives its ``train`` split (its only split when it has one)."""
    if type(ds).__name__ in ("DatasetDict", "IterableDatasetDict"):
        splits = list(ds.keys())
        if "train" in splits or len(splits) == 1:
            return ds["train" if "train" in splits else splits[0]]
        raise PairsError(f"{where}: a DatasetDict with splits {splits}; pass one split (dataset['train'])")
    return ds


def column_names(source: Any, ds: Any) -> list[str]:
    """Column names without reading data where the source knows them."""
    if _is_hf(source):
        return list(_one_split(source, "pairs").column_names)
    if _is_pandas(source):
        return [str(c) for c in source.columns]
    return list(ds.columns())


def fingerprint(source: Any, cols: tuple[str, ...] = ()) -> str:
    """A key of the source's content: file names / sizes / modification times for a path, the HF
    fingerprint for a ``datasets.Dataset``, a hash of the columns' values for a frame, a list or a Ray
    Dataset (an order-independent sum of row hashes, one number per block)."""
    if is_path(source):
        uri = str(source)
        return "hf:" + uri if uri.startswith("hf://") else storage.fingerprint(uri)
    if _is_hf(source) and getattr(_one_split(source, "pairs"), "_fingerprint", None):
        return "hf:" + _one_split(source, "pairs")._fingerprint
    if isinstance(source, (list, tuple)):
        return hashlib.sha256("\x1e".join(source).encode("utf-8")).hexdigest()[:16]
    if _is_pandas(source):
        return _frame_digest(source, list(cols) or [str(c) for c in source.columns])
    import ray.data

    if isinstance(source, ray.data.Dataset):
        rows = source.map_batches(_digest_block, batch_format="pandas", batch_size=None,
                                  fn_kwargs={"cols": list(cols) or None}).take_all()
        total = sum(int(r["digest"]) for r in rows) % (1 << 64)
        return f"ray:{sum(int(r['rows']) for r in rows)}:{total:016x}"
    return "unknown"


def _frame_digest(df: Any, cols: list[str]) -> str:
    import pandas as pd

    sub = df[cols].copy()
    for c in cols:  # lists and other unhashable values hash by their text
        if sub[c].dtype == object:
            sub[c] = sub[c].astype(str)
    h = pd.util.hash_pandas_object(sub, index=False).to_numpy()
    return f"df:{len(h)}:{int(h.sum(dtype=np.uint64)):016x}"


def _digest_block(df: Any, cols: list[str] | None) -> Any:
    import pandas as pd

    d = _frame_digest(df, cols or [str(c) for c in df.columns]).split(":")
    return pd.DataFrame({"rows": [int(d[1])], "digest": [str(int(d[2], 16))]})


# ------------------------------------------------------------------------------------------------
# Block steps (pure pyarrow, no Ray): run inside Ray Data tasks
# ------------------------------------------------------------------------------------------------
def _texts(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as strings (numbers cast; nulls become "", which ingest counts as blank text)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = pc.cast(col, _STR)
    return pc.fill_null(col.cast(_STR), "")


def pairs_block(batch: pa.Table, anchor: str, positive: str, id_column: str) -> pa.Table:
    """User rows → ``PAIRS_SCHEMA`` rows: a list-valued positive gives one row per element; query ids from the
    id column or the query text's hash, passage ids from the passage text's hash."""
    batch = _with_columns(batch, (anchor, positive, id_column))
    pos = batch.column(positive).combine_chunks()
    rows = None
    if pa.types.is_list(pos.type) or pa.types.is_large_list(pos.type):
        rows = pc.list_parent_indices(pos)  # [n positives] row of each element
        pos = pc.list_flatten(pos)
    query = _texts(batch.column(anchor) if rows is None else batch.column(anchor).take(rows))
    passage = _texts(pos)
    if id_column:
        ids = batch.column(id_column) if rows is None else batch.column(id_column).take(rows)
        qid = pc.cast(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids, _STR)  # null stays null
    else:
        qid = pa.array([text_id(t) for t in query.to_pylist()], _STR)
    did = pa.array([text_id(t) for t in passage.to_pylist()], _STR)
    return pa.table([qid, query, did, passage], schema=PAIRS_SCHEMA)


def _with_columns(batch: pa.Table, names: tuple[str, ...]) -> pa.Table:
    """A jsonl block whose lines all lack a key has no such column: it reads as nulls (blank text, counted by
    the ingest), not as an error inside the worker."""
    for name in names:
        if name and name not in batch.column_names:
            batch = batch.append_column(name, pa.nulls(batch.num_rows, _STR))
    return batch


def corpus_block(batch: pa.Table, text: str, title: str) -> pa.Table:
    """Corpus rows → (DOC_ID, PASSAGE): the passage is ``title text`` when a title column exists (as ingest
    joins BEIR titles), its id the passage text's hash."""
    from raymine.ingest import passage_text

    batch = _with_columns(batch, (text, title))
    texts = _texts(batch.column(text)).to_pylist()
    titles = _texts(batch.column(title)).to_pylist() if title else [""] * len(texts)
    passages = [passage_text(ti, te) for ti, te in zip(titles, texts, strict=True)]
    return pa.table({C.DOC_ID: pa.array([text_id(p) for p in passages], _STR), C.PASSAGE: pa.array(passages, _STR)})


def _part_uri(folder: str, keys: pa.Array) -> str:
    """``part-<hash of the block's keys>``: a retried task rewrites the same file."""
    h = hashlib.sha1("\x1e".join(sorted(str(k) for k in keys.to_pylist())).encode("utf-8")).hexdigest()[:20]
    return storage.join(folder, f"part-{h}.parquet")


def _write(table: pa.Table, uri: str) -> None:
    fs, path = storage.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def write_pairs_block(batch: pa.Table, folder: str, cols: PairsColumns) -> pa.Table:
    """Task: one block of user rows → one part of ``_pairs/``; returns its row counts."""
    t = pairs_block(batch, cols.anchor, cols.positive, cols.id)
    if t.num_rows:
        _write(t, _part_uri(folder, pc.binary_join_element_wise(t[C.QUERY_ID], t[C.DOC_ID], "\x1f")))
    return pa.table({"rows": [batch.num_rows], "pairs": [t.num_rows]})


def write_corpus_block(batch: pa.Table, folder: str, text: str, title: str) -> pa.Table:
    t = corpus_block(batch, text, title)
    if t.num_rows:
        _write(t, _part_uri(folder, t[C.DOC_ID]))
    return pa.table({"rows": [t.num_rows]})


def write_unique(block: pa.Table, table: str, folder: str) -> pa.Table:
    """Task: one hash partition (every row of a key in it) → its distinct rows as one part of ``table``
    (``queries``: QUERY_ID, TEXT; ``corpus``: DOC_ID, TEXT; ``qrels``: QUERY_ID, DOC_ID, SCORE = 1).
    Returns rows written and, for qrels, the most positives of one query in it."""
    if block.num_rows == 0:
        return pa.table({"rows": pa.array([0], pa.int64()), "max_positives": pa.array([0], pa.int64())})
    if table == "queries":
        t = block.select([C.QUERY_ID, QUERY]).group_by([C.QUERY_ID, QUERY]).aggregate([])
        t = pa.table({C.QUERY_ID: t[C.QUERY_ID], C.TEXT: t[QUERY]})
    elif table == "corpus":
        t = block.select([C.DOC_ID, C.PASSAGE]).group_by([C.DOC_ID, C.PASSAGE]).aggregate([])
        t = pa.table({C.DOC_ID: t[C.DOC_ID], C.TEXT: t[C.PASSAGE]})
    else:
        t = block.select([C.QUERY_ID, C.DOC_ID]).group_by([C.QUERY_ID, C.DOC_ID]).aggregate([])
        t = t.append_column(C.SCORE, pa.array(np.ones(t.num_rows, np.int32)))
    t = t.sort_by([(c, "ascending") for c in t.column_names[:2]])
    _write(t, _part_uri(folder, t[t.column_names[0]]))
    most = 0
    if table == "qrels":
        most = int(pc.max(t.group_by(C.QUERY_ID).aggregate([(C.DOC_ID, "count")])[f"{C.DOC_ID}_count"]).as_py())
    return pa.table({"rows": pa.array([t.num_rows], pa.int64()), "max_positives": pa.array([most], pa.int64())})


# ------------------------------------------------------------------------------------------------
# The conversion (driver: plans and sums counts)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairsInput:
    """A pairs source with its resolved columns and its content key."""

    source: Any
    columns: PairsColumns
    fingerprint: str

    @classmethod
    def of(cls, source: Any, anchor: str | None = None, positive: str | None = None,
           id_column: str | None = None) -> PairsInput:
        ds = read_source(source)
        where = str(source) if is_path(source) else type(source).__name__
        cols = resolve_columns(column_names(source, ds), anchor, positive, id_column, where)
        used = tuple(c for c in (cols.anchor, cols.positive, cols.id) if c)
        return cls(source, cols, fingerprint(source, used))


def corpus_columns(names: list[str], where: str) -> tuple[str, str]:
    """(text column, title column or '') of a separate corpus: ``text`` (+ ``title``), or its only column."""
    if C.TEXT in names:
        return C.TEXT, C.TITLE if C.TITLE in names else ""
    if len(names) == 1:
        return names[0], ""
    raise PairsError(f"{where}: a corpus needs a 'text' column (optionally 'title'), or a single column; "
                     f"columns are {names}")


def convert_pairs(pairs: PairsInput, out: str, corpus: Any = None, split: str = "train") -> dict[str, Any]:
    """Write ``out/{corpus,queries,qrels/<split>}`` from ``pairs`` (+ an optional separate ``corpus``);
    returns the manifest (``counts``: rows, pairs, queries, passages, qrels, max_positives). Skipped when done
    with the same input and columns."""
    corpus_key = None if corpus is None else fingerprint(corpus)
    key = storage.stage_key("pairs", dataclasses.asdict(pairs.columns), pairs.fingerprint, corpus_key, split)
    done, run = storage.begin(out, "pairs", key, config={"columns": dataclasses.asdict(pairs.columns), "split": split})
    if done is not None:
        return done
    assert run is not None
    work = storage.join(out, "_pairs")
    rows = read_source(pairs.source).map_batches(
        write_pairs_block, batch_format="pyarrow", fn_kwargs={"folder": work, "cols": pairs.columns}).take_all()
    counts = {"rows": sum(r["rows"] for r in rows), "pairs": sum(r["pairs"] for r in rows)}
    if counts["pairs"] == 0:
        raise PairsError(f"{_name(pairs.source)}: no (anchor, positive) pairs to read ({counts['rows']} rows)")
    passages = parts.read_dataset(work, [C.DOC_ID, C.PASSAGE])
    if corpus is not None:
        extra = storage.join(out, "_corpus")
        cds = read_source(corpus, "corpus")
        text, title = corpus_columns(column_names(corpus, cds), _name(corpus))
        n = sum(r["rows"] for r in cds.map_batches(write_corpus_block, batch_format="pyarrow", fn_kwargs={
            "folder": extra, "text": text, "title": title}).take_all())
        counts["corpus_rows"] = n
        if n:
            passages = passages.union(parts.read_dataset(extra, [C.DOC_ID, C.PASSAGE]))
    nparts = max(1, sum(storage.list_files(work).values()) // _PART_BYTES)
    plan = (("queries", parts.read_dataset(work, [C.QUERY_ID, QUERY]), C.QUERY_ID, "queries"),
            ("corpus", passages, C.DOC_ID, "corpus"),
            ("qrels", parts.read_dataset(work, [C.QUERY_ID, C.DOC_ID]), C.QUERY_ID, posixpath.join("qrels", split)))
    for table, ds, key_col, rel in plan:
        ds = ds.repartition(1) if nparts == 1 else ds.repartition(nparts, keys=[key_col], sort=True)
        res = ds.map_batches(write_unique, batch_size=None, batch_format="pyarrow", fn_kwargs={
            "table": table, "folder": storage.join(out, *rel.split("/"))}).take_all()
        counts[{"queries": "queries", "corpus": "passages", "qrels": "qrels"}[table]] = sum(r["rows"] for r in res)
        if table == "qrels":
            counts["max_positives"] = max(r["max_positives"] for r in res)
    for tmp in (work, storage.join(out, "_corpus")):
        storage.delete_dir(tmp)
    run.counts = counts
    log.info("pairs %s: %d rows -> %d queries, %d passages, %d (query, positive) pairs (most positives of one "
             "query: %d)", _name(pairs.source), counts["rows"], counts["queries"], counts["passages"],
             counts["qrels"], counts["max_positives"])
    return run.finish(columns=dataclasses.asdict(pairs.columns))


def _name(source: Any) -> str:
    return str(source) if is_path(source) else type(source).__name__


def pairs_stage(cfg: IngestConfig, layout: Any) -> IngestConfig:
    """``ingest.format=pairs``: convert ``ingest.data`` (+ ``ingest.corpus``) under ``OUTPUT/pairs`` and return
    the ingest config that reads the result as BEIR-like input."""
    pairs = PairsInput.of(cfg.data, cfg.anchor_column or None, cfg.positive_column or None, cfg.id_column or None)
    out = layout.path("pairs")
    convert_pairs(pairs, out, cfg.corpus or None, cfg.train_split)
    return dataclasses.replace(cfg, data=out, format="beir")
