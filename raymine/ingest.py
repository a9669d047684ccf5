"""Ingest: BEIR folders, Parquet tables and folders of many files → validated, partitioned Parquet.

Input layout (``IngestConfig.data``: a local folder or any pyarrow/fsspec URI prefix). Each of the three
tables is found as the first that exists of:

======================= =================================================================================
table                   accepted as
======================= =================================================================================
corpus                  ``corpus.parquet`` (a file, or a folder of parts), ``corpus.jsonl``,
                        ``corpus.jsonl.gz``, or a folder ``corpus/`` of many ``*.jsonl``, ``*.jsonl.gz``
                        and ``*.parquet`` files (doc_id, title?, text)
queries                 the same with ``queries`` (query_id, text)
qrels of split S        ``qrels/S.parquet`` (file or folder), ``qrels/S.tsv``, ``qrels/S.tsv.gz``, or a
                        folder ``qrels/S/`` of ``*.tsv``, ``*.tsv.gz`` and ``*.parquet`` files
                        (query_id, doc_id, score)
======================= =================================================================================

Inside a folder, files whose names start with ``_`` or ``.`` are ignored and the rest are ordered by
name. BEIR jsonl rows are ``{"_id", "title"?, "text"}``; qrels tsv lines ``query-id corpus-id score``
(BEIR, with a header) or ``qid iter docid rel`` (TREC); each file of a folder follows these rules on its
own (a header line per file is allowed).

Bad input never passes silently. The rules (``IngestConfig`` chooses where two are offered):

============================== ================================================================
case                           outcome
============================== ================================================================
duplicate doc or query id      error with file, line and the first line (``on_duplicate_id=skip``:
                               keep the first, count the rest)
empty / whitespace-only text   counted skip (``on_empty_text=error`` to stop); a doc counts as
                               empty when title and text both are
qrel → unknown doc or query    counted skip (``on_unknown_qrel=error`` to stop)
query with no positive         counted; listed in ``dropped`` with reason ``no_positive``
row missing a required field   error with file, line and field
non-UTF-8 bytes                error with file, line and byte offset
header-less qrels              read as data (3-column BEIR or 4-column TREC), reported
malformed qrels line           error with file, line and what is wrong
graded relevance               score > 0 is positive; 0 (or negative) is not, counted
nothing usable (issue 14)      error naming the data path and the counts: an empty corpus or one
                               whose every text is blank, no queries, no qrels left after the
                               checks, no training query with a positive
============================== ================================================================

Inside the Ray Data job the workers never raise for bad input: a read task, dedupe or per-query partition
writes what it found as a small record under the stage's work folder (:func:`found`, like Spark's
bad-records path) and carries on as with 'skip'; the driver raises the first (by file, line) once after
the pass (:func:`raise_found`), so the user sees one line and not Ray's traceback of a failed task.

A query "of a split" is one that appears in that split's qrels. Every such query ends up either
with positives or in ``dropped`` with its reason.

Determinism (no result depends on row order or on how files are split into read tasks):

* "first" means first by (file name, line) — line = 1-based line of a jsonl/tsv file, row of a Parquet
  file — never arrival order: the duplicate-id rule keeps that row, a query's positives keep that order
  (the qrels order of a single file), repeated (query, doc) qrels count once;
* ``max_queries`` keeps the first N training queries **by query id** (string order);
* identical-text twins: docs whose ``normalize_text(passage)`` is equal (grouped by its 64-bit hash,
  then compared as text, so a hash collision never makes twins); ``EXCLUDED_IDS`` sorted by id.

Two readers share the parsers and the rules: :func:`read_beir` reads one split into Arrow tables in the
calling process (evaluation holds an mteb task in one process by design), and :func:`ingest_stage` is a
Ray Data job that reads one task per file, validates, normalises and hashes in the workers, finds
duplicate ids and identical texts with hash-partitioned shuffles, joins qrels to docs and queries with
Ray Data joins, and writes the tables below from the workers; the driver sums per-block counts only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymine import columns as C
from raymine import joins, parts, storage
from raymine.config import IngestConfig
from raymine.errors import UserError

if TYPE_CHECKING:
    from raymine.layout import Layout

log = logging.getLogger(__name__)

# dropped-query reasons
NO_POSITIVE = "no_positive"
EMPTY_QUERY = "empty_query_text"
UNKNOWN_QUERY = "unknown_query"  # in qrels but not in the queries file

TABLE_EXTS = {
    "corpus": (".parquet", ".jsonl", ".jsonl.gz"),
    "queries": (".parquet", ".jsonl", ".jsonl.gz"),
    "qrels": (".parquet", ".tsv", ".tsv.gz"),
}

# working columns (never in an output table)
_FILE = "_file"  # int32: index of the row's file in its table's file list (files ordered by name)
_LINE = "_line"  # int64: 1-based line (jsonl/tsv) or row (Parquet) inside that file
_HEADERLESS = "_headerless"  # int8 (qrels): the file's column count when it has no header line, else 0
_DUP = "_dup"  # bool: a later definition of an id (not kept)
_EMPTY = "_empty"  # bool: kept id whose text is blank
_KNOWN = "_known"  # bool (qrels ⋈ docs): the doc exists (null after the join: unknown doc)
_TWINS = "_twins"  # list<string>: other doc ids with the identical normalised passage
_TWINS_CUT = "_twins_cut"  # int64: twins left off _TWINS by ingest.max_twins
_QTEXT = "_qtext"  # string (qrels ⋈ queries): the query's text (null: unknown query)
_QEMPTY = "_qempty"  # bool: the query's text is blank
_QCOUNTS = ("_n_qrels", "_n_kept", "_n_graded", "_n_nonpos", "_n_unknown_doc", "_n_unknown_query",
            "_n_empty_query")


# what to do, per rule (the CLI appends it to the one line); rules not listed: fix that line / that file
_HINTS = {
    "missing_path": "check --data / ingest.data (a local folder or a URI such as s3://bucket/data)",
    "missing_file": "check --data / ingest.data and ingest.train_split; the layouts are in `raymine run --help`",
    "duplicate_id": "give each id once, or set ingest.on_duplicate_id=skip to keep the first",
    "empty_text": "fill in the text, or set ingest.on_empty_text=skip to drop such rows",
    "unknown_id": "fix the id, or set ingest.on_unknown_qrel=skip to drop such qrels",
    "empty_corpus": "",  # the message says what to fix
    "no_queries": "",
    "no_qrels": "check that the qrels name ids of the corpus and queries files",
    "no_train_queries": "a training query needs a qrel with score > 0 to a known doc",
}


class IngestError(UserError, ValueError):
    """Input that cannot be used; the message names the file, the line and the rule, ``hint`` what to do."""

    def __init__(self, file: str, line: int | None, rule: str, detail: str):
        self.file, self.line, self.rule, self.detail = file, line, rule, detail
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: [{rule}] {detail}",
                         hint=_HINTS.get(rule, "fix that line of the input" if line is not None else "fix that file"))

    def __str__(self) -> str:  # the message only; the hint is the CLI's to append
        return Exception.__str__(self)

    def __reduce__(self):  # raised inside Ray workers: must survive pickling
        return IngestError, (self.file, self.line, self.rule, self.detail)

    def to_record(self) -> dict[str, Any]:
        """The error as data (a worker's report to the driver)."""
        return {"file": self.file, "line": self.line, "rule": self.rule, "detail": self.detail}


@dataclass
class IngestReport:
    """Counts of everything read, skipped and why (skips carry file:line samples)."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)
    empty_query_ids: set[str] = field(default_factory=set)  # queries skipped for empty text
    dropped_queries: list[tuple[str, str]] = field(default_factory=list)  # (query id, reason) from qrels checks

    def skip(self, rule: str, where: str) -> None:
        self.counts[f"skipped_{rule}"] += 1
        if len(self.samples[rule]) < 5:
            self.samples[rule].append(where)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "samples": dict(self.samples), "notes": list(self.notes)}


@dataclass
class BeirData:
    """One dataset split: corpus, the queries file, the split's qrels, and what was skipped."""

    corpus: pa.Table  # DOC_ID, TITLE, TEXT
    queries: pa.Table  # QUERY_ID, TEXT (every valid query of the file, all splits)
    qrels: pa.Table  # QUERY_ID, DOC_ID, SCORE (valid rows of this split, graded)
    report: IngestReport
    split: str = "test"

    def positives(self) -> dict[str, list[str]]:
        """query id → positive doc ids (score > 0), in qrels order."""
        out: dict[str, list[str]] = defaultdict(list)
        for q, d, s in zip(*(self.qrels.column(c).to_pylist() for c in C.QRELS_COLUMNS), strict=False):
            if s > 0:
                out[q].append(d)
        return dict(out)

    def split_queries(self) -> tuple[pa.Table, pa.Table]:
        """(queries of this split with ≥ 1 positive, dropped: QUERY_ID + REASON for the rest)."""
        pos = self.positives()
        in_split = list(dict.fromkeys(self.qrels.column(C.QUERY_ID).to_pylist()))
        keep = [q for q in in_split if q in pos]
        dropped_ids = [q for q in in_split if q not in pos]
        dropped = [(q, NO_POSITIVE) for q in dropped_ids] + self.report.dropped_queries
        ids = self.queries.column(C.QUERY_ID)
        mask = pc.is_in(ids, value_set=pa.array(keep, pa.string()))
        queries = self.queries.filter(mask)
        # order as in the qrels file (stable, deterministic)
        order = {q: i for i, q in enumerate(keep)}
        idx = sorted(range(queries.num_rows), key=lambda i: order[queries.column(C.QUERY_ID)[i].as_py()])
        queries = queries.take(pa.array(idx, pa.int64()))
        dropped_tbl = pa.table(
            {C.QUERY_ID: pa.array([q for q, _ in dropped], pa.string()),
             C.REASON: pa.array([r for _, r in dropped], pa.string())}
        )
        return queries, dropped_tbl


# ------------------------------------------------------------------------------------------------
# finding the input files (metadata only)
# ------------------------------------------------------------------------------------------------
def _info(uri: str) -> pafs.FileInfo:
    fs, path = storage.resolve(uri)
    return fs.get_file_info(path)


def _folder_files(uri: str, exts: tuple[str, ...]) -> list[str]:
    """URIs of the files directly in folder ``uri`` ending in one of ``exts``, ordered by name."""
    fs, path = storage.resolve(uri)
    names = sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path))
                   if i.type == pafs.FileType.File)
    return [storage.join(uri, n) for n in names if n.endswith(exts) and not n.startswith(("_", "."))]


def table_files(data: str, table: str, split: str = "train") -> list[str]:
    """The files of one input table (``corpus``, ``queries`` or ``qrels``), ordered by name; [] if none.

    See the module docstring for the layouts; the first one found wins."""
    exts = TABLE_EXTS[table]
    folder, stem = (storage.join(data, "qrels"), split) if table == "qrels" else (data, table)
    for ext in exts:
        uri = storage.join(folder, stem + ext)
        kind = _info(uri).type
        if kind == pafs.FileType.File:
            return [uri]
        if kind == pafs.FileType.Directory and ext == ".parquet":
            files = _folder_files(uri, (".parquet",))
            if files:
                return files
    uri = storage.join(folder, stem)
    if _info(uri).type == pafs.FileType.Directory:
        return _folder_files(uri, exts)
    return []


def _input_files(data: str, split: str) -> dict[str, list[str]]:
    if not storage.exists(data):
        raise IngestError(data, None, "missing_path", "data folder not found")
    files = {t: table_files(data, t, split) for t in TABLE_EXTS}
    for t, name in (("corpus", "corpus"), ("queries", "queries"), ("qrels", f"qrels/{split}")):
        if not files[t]:
            raise IngestError(data, None, "missing_file",
                              f"no {name} file (.jsonl[.gz], .tsv[.gz] or .parquet, or a {name}/ folder of them)")
    return files


def input_fingerprint(data: str) -> str:
    """Hash of the names, sizes and modification times of every file under ``data`` (one listing, no reads).

    A corrected data file at the same path changes it, so ingest's stage key changes (issue 14). On object
    stores the modification time is the object's last-modified time (a rewrite changes it)."""
    fs, root = storage.resolve(data)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise IngestError(data, None, "missing_path", "data folder not found")
    return storage.fingerprint(data)


# ------------------------------------------------------------------------------------------------
# line-level parsers (shared by the driver reader and the Ray workers)
# ------------------------------------------------------------------------------------------------
def _lines(uri: str):
    """(line number, raw bytes) of a plain or gzip text file; decompression detected from the name."""
    fs, path = storage.resolve(uri)
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open_input_stream(path, compression=compression) as raw:
        buf = io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[arg-type]
        yield from enumerate(buf, start=1)


def _decode(uri: str, n: int, line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IngestError(uri, n, "utf8", f"not valid UTF-8 at byte {e.start} of the line") from None


_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Casefolded, whitespace-collapsed text: identical-text comparisons use this."""
    return _WS.sub(" ", text).strip().casefold()


def passage_text(title: str | None, text: str) -> str:
    """The passage a model sees: ``title + " " + text`` when there is a title (BEIR/mteb convention)."""
    title = (title or "").strip()
    return f"{title} {text}".strip() if title else text


def text_hash(passage: str) -> int:
    """Signed 64-bit hash of ``normalize_text(passage)`` (blake2b: stable across processes and machines)."""
    digest = hashlib.blake2b(normalize_text(passage).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _is_blank(kind: str, title: str | None, text: str | None) -> bool:
    return not ((text or "").strip() or (kind == "doc" and (title or "").strip()))


def _jsonl_records(uri: str, kind: str) -> Iterator[tuple[int, str, str, str]]:
    """(line, id, title, text) of a BEIR jsonl file; format errors raise with file and line."""
    for n, raw in _lines(uri):
        if not raw.strip():
            continue
        line = _decode(uri, n, raw)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise IngestError(uri, n, "json", f"not a JSON object: {e.msg}") from None
        if not isinstance(obj, dict):
            raise IngestError(uri, n, "json", "not a JSON object")
        if "_id" not in obj:
            raise IngestError(uri, n, "missing_field", "required field '_id' is missing")
        if "text" not in obj:
            raise IngestError(uri, n, "missing_field", "required field 'text' is missing")
        rid, text = obj["_id"], obj["text"]
        title = obj.get("title") or ""
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            raise IngestError(uri, n, "bad_id", f"'_id' must be a non-empty string, got {rid!r}")
        if not isinstance(text, str) or not isinstance(title, str):
            raise IngestError(uri, n, "bad_field", "'text' and 'title' must be strings")
        yield n, str(rid), title, text


def _qrels_records(uri: str, info: dict[str, int]) -> Iterator[tuple[int, str, str, int]]:
    """(line, query id, doc id, score) of a BEIR (header) or TREC (no header) qrels file.

    ``info["headerless"]`` is set to the column count when the file has no header line."""
    ncols = None
    for n, raw in _lines(uri):
        line = _decode(uri, n, raw).rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if n == 1 and not _is_int(parts[-1]):
            if len(parts) != 3:
                raise IngestError(uri, n, "qrels_header", f"header has {len(parts)} columns, expected 3")
            continue  # the BEIR header
        if ncols is None:
            if len(parts) not in (3, 4):
                raise IngestError(uri, n, "qrels_columns",
                                  f"{len(parts)} columns; expected 3 (query-id corpus-id score) or 4 (TREC)")
            ncols = len(parts)
            if n == 1:
                info["headerless"] = ncols
        elif len(parts) != ncols:
            raise IngestError(uri, n, "qrels_columns", f"{len(parts)} columns, earlier lines have {ncols}")
        q, d, s = (parts[0], parts[1], parts[2]) if ncols == 3 else (parts[0], parts[2], parts[3])
        if not _is_int(s):
            raise IngestError(uri, n, "qrels_score", f"relevance {s!r} is not an integer")
        if not q or not d:
            raise IngestError(uri, n, "qrels_id", "empty query or doc id")
        yield n, q, d, int(s)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


_PARQUET_COLS = {
    "doc": ((C.DOC_ID, C.TEXT), (C.TITLE,)),
    "query": ((C.QUERY_ID, C.TEXT), ()),
    "qrels": ((C.QUERY_ID, C.DOC_ID, C.SCORE), ()),
}


def _parquet_batches(uri: str, kind: str, rows: int = 65536) -> Iterator[tuple[int, pa.Table]]:
    """(first row number, table) of a Parquet file, streamed; columns checked, ids cast to string."""
    required, optional = _PARQUET_COLS[kind]
    fs, path = storage.resolve(uri)
    try:
        f = pq.ParquetFile(fs.open_input_file(path))
        names = f.schema_arrow.names
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(uri, None, "parquet", f"cannot read Parquet: {e}") from None
    missing = [c for c in required if c not in names]
    if missing:
        raise IngestError(uri, None, "missing_field", f"required column(s) {missing} missing; has {names}")
    if kind == "qrels" and not pa.types.is_integer(f.schema_arrow.field(C.SCORE).type):
        raise IngestError(uri, None, "qrels_score",
                          f"score column must be integer, is {f.schema_arrow.field(C.SCORE).type}")
    have = [c for c in (*required, *optional) if c in names]
    start = 1
    try:
        batches = f.iter_batches(batch_size=rows, columns=have)
        for b in batches:
            t = pa.Table.from_batches([b])
            cols = {}
            for c in (*required, *optional):
                col = t.column(c) if c in names else pa.nulls(t.num_rows, pa.string())
                if c in (C.DOC_ID, C.QUERY_ID, C.TITLE, C.TEXT) and not pa.types.is_string(col.type):
                    col = pc.cast(col, pa.string())
                cols[c] = col
            if kind == "doc":
                cols[C.TITLE] = pc.fill_null(cols[C.TITLE], "")
            if kind == "qrels":
                cols[C.SCORE] = pc.cast(cols[C.SCORE], pa.int32())
            out = pa.table(cols)
            for c in required:
                nulls = out.column(c).null_count
                if nulls:
                    first = pc.index(pc.is_null(out.column(c)), True).as_py()
                    raise IngestError(uri, start + first, "missing_field", f"column {c!r} is null in {nulls} row(s)")
            yield start, out
            start += t.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(uri, None, "parquet", f"cannot read Parquet: {e}") from None


# ------------------------------------------------------------------------------------------------
# the driver-side reader (one split in one process: evaluation)
# ------------------------------------------------------------------------------------------------
def _at(names: list[str], f0: int, l0: int, f1: int) -> str:
    """Where the first definition was, as seen from a later one in file ``f1``."""
    return f"line {l0}" if f0 == f1 else f"{names[f0]}:{l0}"


def _read_texts(files: list[str], kind: str, cfg: IngestConfig, report: IngestReport) -> pa.Table:
    """corpus (kind='doc') or queries (kind='query') files → one table, validated per the module rules."""
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    first: dict[str, tuple[int, int]] = {}
    empty_ids: list[str] = []
    for f, uri in enumerate(files):
        if uri.endswith(".parquet"):
            records = ((start + i, rid, ti, te) for start, t in _parquet_batches(uri, kind)
                       for i, (rid, ti, te) in enumerate(zip(
                           t[C.DOC_ID if kind == "doc" else C.QUERY_ID].to_pylist(),
                           t[C.TITLE].to_pylist() if kind == "doc" else [""] * t.num_rows,
                           t[C.TEXT].to_pylist(), strict=True)))
        else:
            records = _jsonl_records(uri, kind)
        for n, rid, title, text in records:
            if rid in first:
                if cfg.on_duplicate_id == "error":
                    raise IngestError(uri, n, "duplicate_id",
                                      f"{kind} id {rid!r} already defined at {_at(files, *first[rid], f)}")
                report.skip(f"duplicate_{kind}_id", f"{uri}:{n}")
                continue
            first[rid] = (f, n)
            if _is_blank(kind, title, text):
                if cfg.on_empty_text == "error":
                    raise IngestError(uri, n, "empty_text", f"{kind} {rid!r} has empty text")
                report.skip(f"empty_{kind}_text", f"{uri}:{n}")
                empty_ids.append(rid)
                continue
            ids.append(rid)
            titles.append(title)
            texts.append(text)
    report.counts["docs_read" if kind == "doc" else "queries_read"] = len(ids)
    if kind == "query":
        report.empty_query_ids = set(empty_ids)
    if kind == "doc":
        return pa.table({C.DOC_ID: pa.array(ids, pa.string()), C.TITLE: pa.array(titles, pa.string()),
                         C.TEXT: pa.array(texts, pa.string())})
    return pa.table({C.QUERY_ID: pa.array(ids, pa.string()), C.TEXT: pa.array(texts, pa.string())})


def _read_qrels(files: list[str], report: IngestReport) -> tuple[pa.Table, list[str]]:
    """(QUERY_ID, DOC_ID, SCORE table, the "file:line" of each row) of the qrels files, in order."""
    tables, where = [], []
    for uri in files:
        if uri.endswith(".parquet"):
            for start, t in _parquet_batches(uri, "qrels"):
                tables.append(t.select(list(C.QRELS_COLUMNS)))
                where += [f"{uri}:{start + i}" for i in range(t.num_rows)]
            continue
        info: dict[str, int] = {}
        qs, ds, ss = [], [], []
        for n, q, d, s in _qrels_records(uri, info):
            qs.append(q)
            ds.append(d)
            ss.append(s)
            where.append(f"{uri}:{n}")
        if info.get("headerless"):
            report.notes.append(f"{uri}: no header line; read as {info['headerless']}-column qrels")
            report.counts["qrels_files_without_header"] += 1
        tables.append(pa.table({C.QUERY_ID: pa.array(qs, pa.string()), C.DOC_ID: pa.array(ds, pa.string()),
                                C.SCORE: pa.array(ss, pa.int32())}))
    return pa.concat_tables(tables), where


def read_beir(path: str, split: str, cfg: IngestConfig | None = None) -> BeirData:
    """Read one split of a data folder (any layout of the module docstring) into Arrow tables; validate.

    Holds the whole split in this process: for evaluation sets. Training data goes through
    :func:`ingest_stage`, which applies the same rules in Ray workers."""
    cfg = cfg or IngestConfig()
    report = IngestReport()
    files = _input_files(path, split)
    corpus = _read_texts(files["corpus"], "doc", cfg, report)
    queries = _read_texts(files["queries"], "query", cfg, report)
    qrels, where = _read_qrels(files["qrels"], report)
    report.counts["qrels_read"] = qrels.num_rows
    qrels = _check_qrels(qrels, where, corpus, queries, cfg, report)
    if corpus.num_rows == 0:
        raise IngestError(path, None, "empty_corpus", f"no usable passage: {_count_line(report.counts, 'doc')}")
    log.info("ingest %s [%s]: %d docs, %d queries in file, %d qrels; %s", path, split, corpus.num_rows,
             queries.num_rows, qrels.num_rows, {k: v for k, v in report.counts.items() if k.startswith("skipped")})
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, report=report, split=split)


def _check_qrels(qrels: pa.Table, where: list[str], corpus: pa.Table, queries: pa.Table, cfg: IngestConfig,
                 report: IngestReport) -> pa.Table:
    """Drop (and count) qrels pointing to unknown docs/queries; queries whose text was empty are dropped
    with their own reason; count graded / non-positive rows."""
    empty_q = report.empty_query_ids
    known_d = pc.is_in(qrels.column(C.DOC_ID), value_set=corpus.column(C.DOC_ID))
    known_q = pc.is_in(qrels.column(C.QUERY_ID), value_set=queries.column(C.QUERY_ID))
    qids = qrels.column(C.QUERY_ID).to_pylist()
    bad_q = [i for i, ok in enumerate(known_q.to_pylist()) if not ok]
    bad_d = [i for i, ok in enumerate(known_d.to_pylist()) if not ok]
    if (bad_q or bad_d) and cfg.on_unknown_qrel == "error":
        i = min(bad_q + bad_d)
        what = "query" if i in set(bad_q) else "doc"
        raise _unknown_qrel(where[i], what, qrels.column(C.QUERY_ID if what == "query" else C.DOC_ID)[i].as_py())
    dropped_queries: dict[str, str] = {}
    for i in bad_q:
        q = qids[i]
        reason = EMPTY_QUERY if q in empty_q else UNKNOWN_QUERY
        report.skip(f"qrel_{reason}", where[i])
        dropped_queries.setdefault(q, reason)
    for i in bad_d:
        if known_q[i].as_py():
            report.skip("qrel_unknown_doc", where[i])
    keep = pc.and_(known_d, known_q)
    qrels = qrels.filter(keep)
    # a query whose every qrel was dropped is still an input query of the split: account for it
    remaining = set(qrels.column(C.QUERY_ID).to_pylist())
    for i in bad_d:
        q = qids[i]
        if q not in remaining and known_q[i].as_py():
            dropped_queries.setdefault(q, NO_POSITIVE)
    report.dropped_queries = [(q, r) for q, r in dropped_queries.items()]
    graded = pc.sum(pc.greater(qrels.column(C.SCORE), 1)).as_py() or 0
    nonpos = pc.sum(pc.less_equal(qrels.column(C.SCORE), 0)).as_py() or 0
    report.counts["qrels_graded_above_1"] = graded
    report.counts["qrels_not_positive"] = nonpos
    report.counts["qrels_kept"] = qrels.num_rows
    return qrels


def _unknown_qrel(where: str, what: str, rid: str) -> IngestError:
    file, _, line = where.rpartition(":")
    return IngestError(file, int(line), "unknown_id", f"qrel names unknown {what} {rid!r}")


def _count_line(counts: dict[str, int], kind: str) -> str:
    read = counts.get(f"{'docs' if kind == 'doc' else 'queries'}_read", 0)
    blank = counts.get(f"skipped_empty_{kind}_text", 0)
    dup = counts.get(f"skipped_duplicate_{kind}_id", 0)
    return f"{read + blank + dup} rows read, {blank} blank, {dup} duplicate ids"


def identical_text_groups(corpus: pa.Table) -> dict[str, list[str]]:
    """doc id → the other doc ids (sorted) whose normalised passage text is identical (docs with twins only).

    In-process reference of the distributed twins step of :func:`ingest_stage`."""
    groups: dict[str, list[str]] = defaultdict(list)
    for d, t, x in zip(*(corpus.column(c).to_pylist() for c in (C.DOC_ID, C.TITLE, C.TEXT)), strict=False):
        groups[normalize_text(passage_text(t, x))].append(d)
    out: dict[str, list[str]] = {}
    for ids in groups.values():
        if len(ids) > 1:
            for d in ids:
                out[d] = sorted(o for o in ids if o != d)
    return out


def positives_table(queries: pa.Table, positives: dict[str, list[str]], twins: dict[str, list[str]]) -> pa.Table:
    """QUERY_ID, TEXT, POSITIVE_IDS, EXCLUDED_IDS (docs with a positive's exact text, never negatives)."""
    qids = queries.column(C.QUERY_ID).to_pylist()
    pos = [positives[q] for q in qids]
    excl = [sorted({t for p in ps for t in twins.get(p, ())} - set(ps)) for ps in pos]
    return pa.table({
        C.QUERY_ID: pa.array(qids, pa.string()),
        C.TEXT: queries.column(C.TEXT),
        C.POSITIVE_IDS: pa.array(pos, pa.list_(pa.string())),
        C.EXCLUDED_IDS: pa.array(excl, pa.list_(pa.string())),
    })


# ------------------------------------------------------------------------------------------------
# Ray Data steps: pure functions over Arrow blocks (no Ray import), run inside the workers
# ------------------------------------------------------------------------------------------------
_STR = pa.string()
_READ_SCHEMA = {
    "doc": pa.schema([(C.DOC_ID, _STR), (C.TITLE, _STR), (C.TEXT, _STR), (_FILE, pa.int32()), (_LINE, pa.int64())]),
    "query": pa.schema([(C.QUERY_ID, _STR), (C.TEXT, _STR), (_FILE, pa.int32()), (_LINE, pa.int64())]),
    "qrels": pa.schema([(C.QUERY_ID, _STR), (C.DOC_ID, _STR), (C.SCORE, pa.int32()), (_FILE, pa.int32()),
                        (_LINE, pa.int64()), (_HEADERLESS, pa.int8())]),
}
CORPUS_SCHEMA = pa.schema([(C.DOC_ID, _STR), (C.TITLE, _STR), (C.TEXT, _STR), (C.PASSAGE, _STR),
                           (C.TEXT_HASH, pa.int64())])
TRAIN_QUERIES_SCHEMA = pa.schema([(C.QUERY_ID, _STR), (C.TEXT, _STR), (C.POSITIVE_IDS, pa.list_(_STR)),
                                  (C.EXCLUDED_IDS, pa.list_(_STR))])
DROPPED_SCHEMA = pa.schema([(C.QUERY_ID, _STR), (C.REASON, _STR)])
QRELS_SCHEMA = pa.schema([(C.QUERY_ID, _STR), (C.DOC_ID, _STR), (C.SCORE, pa.int32())])


def found(err: IngestError, errors: str | None) -> None:
    """Bad input found in a worker, as data: one small JSON file under ``errors`` (named by its content, so a
    retried task rewrites it) that the driver raises once after the pass (:func:`raise_found`). Raising in a
    Ray task would print Ray's traceback above raymine's line. Without a folder (in-process use): raised."""
    if errors is None:
        raise err
    rec = json.dumps(err.to_record(), sort_keys=True)
    name = hashlib.sha1(rec.encode("utf-8")).hexdigest()[:20] + ".json"
    storage.write_bytes(storage.join(errors, name), rec.encode("utf-8"))


def raise_found(errors: str, names: list[str]) -> None:
    """Driver: raise the first (by file order, then line) of the errors the workers reported under ``errors``.

    At most one report per read task (a file stops at its first bad line) and per partition of a check."""
    recs = [storage.read_json(storage.join(errors, n)) for n in sorted(storage.list_files(errors))]
    if recs:
        order = {n: i for i, n in enumerate(names)}
        r = min(recs, key=lambda r: (order.get(r["file"], -1), r["line"] or 0, r["rule"], r["detail"]))
        raise IngestError(r["file"], r["line"], r["rule"], r["detail"])


def read_files_batch(batch: pa.Table, kind: str, rows_per_block: int, errors: str | None = None) -> Iterator[pa.Table]:
    """Read task: each row of ``batch`` (``uri``, ``file`` index) is one file, streamed out in blocks of
    ``_READ_SCHEMA[kind]``; a format error (file and line) ends that file's read and is reported with
    :func:`found` (the rows before it are yielded; the driver raises after the pass)."""
    schema = _READ_SCHEMA[kind]
    for uri, f in zip(batch["uri"].to_pylist(), batch["file"].to_pylist(), strict=True):
        yield schema.empty_table()  # an empty file still gives the dataset its schema
        try:
            yield from _file_blocks(uri, f, kind, rows_per_block, schema)
        except IngestError as e:
            found(e, errors)


def _file_blocks(uri: str, f: int, kind: str, rows: int, schema: pa.Schema) -> Iterator[pa.Table]:
    if uri.endswith(".parquet"):
        for start, t in _parquet_batches(uri, kind, rows):
            n = t.num_rows
            cols = [t[c] for c in schema.names if not c.startswith("_")]
            cols += [pa.array(np.full(n, f, np.int32)), pa.array(np.arange(start, start + n, dtype=np.int64))]
            if kind == "qrels":
                cols.append(pa.array(np.zeros(n, np.int8)))
            yield pa.Table.from_arrays(cols, schema=schema)
        return
    buf: list[list[Any]] = [[] for _ in schema.names]
    info: dict[str, int] = {}
    records = _qrels_records(uri, info) if kind == "qrels" else _jsonl_records(uri, kind)
    for rec in records:
        n, values = rec[0], rec[1:]
        if kind == "query":
            values = (values[0], values[2])  # no title
        for col, v in zip(buf, (*values, f, n), strict=False):
            col.append(v)
        if kind == "qrels":
            buf[-1].append(info.get("headerless", 0))
        if len(buf[0]) >= rows:
            yield pa.Table.from_pydict(dict(zip(schema.names, buf, strict=True)), schema=schema)
            buf = [[] for _ in schema.names]
    if buf[0]:
        yield pa.Table.from_pydict(dict(zip(schema.names, buf, strict=True)), schema=schema)


def dedupe_block(block: pa.Table, kind: str, names: list[str], on_duplicate_id: str, on_empty_text: str,
                 errors: str | None = None) -> pa.Table:
    """One hash partition of a corpus/queries table (every row of an id is in it): flag later definitions
    of an id (``_DUP``; first = smallest (file, line)) and blank kept texts (``_EMPTY``); docs get their
    PASSAGE and TEXT_HASH. With ``on_duplicate_id`` / ``on_empty_text`` = 'error', the partition's first such
    row (by file, line) is reported with :func:`found`; the block is flagged as with 'skip' either way."""
    id_col = C.DOC_ID if kind == "doc" else C.QUERY_ID
    t = block.sort_by([(id_col, "ascending"), (_FILE, "ascending"), (_LINE, "ascending")])
    n = t.num_rows
    ids, files, lines = (t[c].to_pylist() for c in (id_col, _FILE, _LINE))
    texts = t[C.TEXT].to_pylist()
    titles = t[C.TITLE].to_pylist() if kind == "doc" else [""] * n
    dup = np.zeros(n, bool)  # [n]
    empty = np.zeros(n, bool)  # [n]
    first = 0
    bad: list[tuple[int, int, IngestError]] = []  # (file, line, error): the partition's first of each rule
    for i in range(n):
        if i and ids[i] == ids[i - 1]:
            dup[i] = True
            if on_duplicate_id == "error" and (not bad or (files[i], lines[i]) < bad[0][:2]):
                bad = [(files[i], lines[i], IngestError(
                    names[files[i]], lines[i], "duplicate_id",
                    f"{kind} id {ids[i]!r} already defined at {_at(names, files[first], lines[first], files[i])}"))]
        else:
            first = i
            empty[i] = _is_blank(kind, titles[i], texts[i])
    if on_empty_text == "error" and empty.any():
        i = min(np.nonzero(empty)[0], key=lambda i: (files[i], lines[i]))
        bad.append((files[i], lines[i], IngestError(names[files[i]], lines[i], "empty_text",
                                                    f"{kind} {ids[i]!r} has empty text")))
    if bad:
        found(min(bad, key=lambda b: b[:2])[2], errors)
    t = t.append_column(_DUP, pa.array(dup)).append_column(_EMPTY, pa.array(empty))
    if kind == "doc":
        kept = ~(dup | empty)
        passages = [passage_text(ti, te) if k else None for ti, te, k in zip(titles, texts, kept, strict=True)]
        hashes = [text_hash(p) if p is not None else None for p in passages]
        t = t.append_column(C.PASSAGE, pa.array(passages, _STR)).append_column(C.TEXT_HASH, pa.array(hashes, pa.int64()))
    return t


def twins_block(block: pa.Table, max_twins: int = 0) -> pa.Table:
    """One hash partition of the kept docs by TEXT_HASH → DOC_ID, ``_TWINS`` (the other ids with an identical
    normalised passage, sorted; compared as text so a hash collision never makes twins), ``_TWINS_CUT`` (how
    many were left off the list), ``_KNOWN``.

    ``max_twins`` > 0 bounds each list (a cluster of m identical passages — boilerplate, a "page not found" —
    would otherwise make m² ids): a doc lists the first ``max_twins`` others by id, built in O(m · max_twins)."""
    t = block.sort_by([(C.TEXT_HASH, "ascending"), (C.DOC_ID, "ascending")])
    n = t.num_rows
    ids = t[C.DOC_ID].to_pylist()
    h = t[C.TEXT_HASH].to_numpy()  # [n]
    twins: list[list[str]] = [[] for _ in range(n)]
    cut = np.zeros(n, np.int64)
    if n:
        starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])  # first row of each hash run
        ends = np.r_[starts[1:], n]
        passages = t[C.PASSAGE]
        for s, e in zip(starts, ends, strict=True):
            if e - s < 2:
                continue
            groups: dict[str, list[int]] = defaultdict(list)
            for i in range(s, e):
                groups[normalize_text(passages[i].as_py())].append(i)
            for members in groups.values():
                head = members if max_twins <= 0 else members[: max_twins + 1]
                for i in members:
                    listed = [ids[j] for j in head if j != i]  # ids sorted within the run
                    twins[i] = listed if max_twins <= 0 else listed[:max_twins]
                    cut[i] = len(members) - 1 - len(twins[i])
    return pa.table({C.DOC_ID: pa.array(ids, _STR), _TWINS: pa.array(twins, pa.list_(_STR)),
                     _TWINS_CUT: pa.array(cut), _KNOWN: pa.array(np.ones(n, bool))})


def per_query_block(block: pa.Table, names: list[str], on_unknown_qrel: str, errors: str | None = None) -> pa.Table:
    """One hash partition of the annotated qrels by QUERY_ID (every qrel of a query is in it) → one row per
    query of the split: TEXT, POSITIVE_IDS (score > 0, first by (file, line), each once), EXCLUDED_IDS
    (twins of the positives, sorted), REASON (null = a training query). With ``on_unknown_qrel='error'`` the
    partition's first qrel (by file, line) naming an unknown id is reported with :func:`found`."""
    t = block.sort_by([(C.QUERY_ID, "ascending"), (_FILE, "ascending"), (_LINE, "ascending")])
    qids, dids, scores, files, lines, known, twins, qtext, qempty = (
        t[c].to_pylist() for c in (C.QUERY_ID, C.DOC_ID, C.SCORE, _FILE, _LINE, _KNOWN, _TWINS, _QTEXT, _QEMPTY))
    out: dict[str, list[Any]] = {c: [] for c in (C.QUERY_ID, C.TEXT, C.POSITIVE_IDS, C.EXCLUDED_IDS, C.REASON)}
    if on_unknown_qrel == "error":
        unknown = [k for k in range(t.num_rows) if qempty[k] is None or not known[k]]
        if unknown:
            k = min(unknown, key=lambda k: (files[k], lines[k]))
            what, rid = ("query", qids[k]) if qempty[k] is None else ("doc", dids[k])
            found(IngestError(names[files[k]], lines[k], "unknown_id", f"qrel names unknown {what} {rid!r}"), errors)
    i, n = 0, t.num_rows
    while i < n:
        j = i
        while j < n and qids[j] == qids[i]:
            j += 1
        q_ok = qempty[i] is False
        pos: list[str] = []
        excl: set[str] = set()
        if q_ok:
            for k in range(i, j):
                if known[k] and scores[k] > 0 and dids[k] not in pos:
                    pos.append(dids[k])
                    excl.update(twins[k] or ())
        reason = None if pos else (NO_POSITIVE if q_ok else (UNKNOWN_QUERY if qempty[i] is None else EMPTY_QUERY))
        out[C.QUERY_ID].append(qids[i])
        out[C.TEXT].append(qtext[i] if q_ok else None)
        out[C.POSITIVE_IDS].append(pos)
        out[C.EXCLUDED_IDS].append(sorted(excl - set(pos)))
        out[C.REASON].append(reason)
        i = j
    return pa.table({C.QUERY_ID: pa.array(out[C.QUERY_ID], _STR), C.TEXT: pa.array(out[C.TEXT], _STR),
                     C.POSITIVE_IDS: pa.array(out[C.POSITIVE_IDS], pa.list_(_STR)),
                     C.EXCLUDED_IDS: pa.array(out[C.EXCLUDED_IDS], pa.list_(_STR)),
                     C.REASON: pa.array(out[C.REASON], _STR)})


def _flag_rows(block: pa.Table, flags: dict[str, pa.Array]) -> pa.Table:
    """Per (block, file) summary: rows, the number of rows of each flag and the first (min) line of each."""
    t = pa.table({_FILE: block[_FILE], _LINE: block[_LINE],
                  **{f"n{k}": pc.cast(v, pa.int64()) for k, v in flags.items()},
                  **{f"at{k}": pc.if_else(v, block[_LINE], None) for k, v in flags.items()}})
    aggs = [(_LINE, "count")] + [(f"n{k}", "sum") for k in flags] + [(f"at{k}", "min") for k in flags]
    return t.group_by(_FILE).aggregate(aggs)


def text_summary_block(block: pa.Table) -> pa.Table:
    """Counts of a deduplicated corpus/queries part, per file (duplicates, blank texts)."""
    return _flag_rows(block, {"_dup": block[_DUP], "_blank": pc.and_(pc.invert(block[_DUP]), block[_EMPTY])})


def qrels_summary_block(block: pa.Table) -> pa.Table:
    """Counts of annotated qrels rows, per file: each skip rule, kept, graded, not positive, header."""
    q_unknown = pc.is_null(block[_QEMPTY])
    q_empty = pc.fill_null(block[_QEMPTY], False)
    q_ok = pc.invert(pc.or_(q_unknown, q_empty))
    d_ok = pc.fill_null(block[_KNOWN], False)
    kept = pc.and_(q_ok, d_ok)
    flags = {
        "_qrel_unknown_query": q_unknown, "_qrel_empty_query_text": q_empty,
        "_qrel_unknown_doc": pc.and_(q_ok, pc.invert(d_ok)), "_kept": kept,
        "_graded": pc.and_(kept, pc.greater(block[C.SCORE], 1)),
        "_nonpos": pc.and_(kept, pc.less_equal(block[C.SCORE], 0)),
    }
    t = _flag_rows(block, flags)
    head = pa.table({_FILE: block[_FILE], _HEADERLESS: block[_HEADERLESS]}).group_by(_FILE).aggregate(
        [(_HEADERLESS, "max")])
    return t.join(head, _FILE)


def split_summary_block(block: pa.Table) -> pa.Table:
    """Counts of the per-query table: training queries, queries with excluded twins, drops per reason."""
    if C.REASON not in block.column_names:  # a train_queries table: every row a training query
        block = block.append_column(C.REASON, pa.nulls(block.num_rows, _STR))
    reason = pc.fill_null(block[C.REASON], "")
    has_excl = pc.greater(pc.list_value_length(block[C.EXCLUDED_IDS]), 0)
    t = pa.table({C.REASON: reason, "_excl": pc.cast(pc.and_(pc.equal(reason, ""), has_excl), pa.int64())})
    return t.group_by(C.REASON).aggregate([("_excl", "count"), ("_excl", "sum")])


def sort_by_length(corpus: pa.Table) -> pa.Table:
    """A corpus part in embedding order: longest passage (in characters) first, ties by doc id.

    The embed stage cuts each part into consecutive pieces and sorts each piece by token length; with the part
    already sorted, a piece holds passages of about one length, so its batches carry little padding (SciFact,
    MiniLM tokens, batch 32, 256-row pieces: +0.99% padded tokens, against +3.14% for doc-id order and +0.21% for
    an exact token sort of the whole corpus — ``bench/bench_padding.py``). Longest first also queues the costly
    pieces first, so the pool's tail is short pieces. One sort per written block: no extra shuffle."""
    key = "_passage_chars"
    t = corpus.append_column(key, pc.utf8_length(corpus[C.PASSAGE]))
    return t.sort_by([(key, "descending"), (C.DOC_ID, "ascending")]).drop_columns([key])


def select_block(block: pa.Table, rule: str) -> pa.Table:
    """Filter and project a work table to one output table (``rule`` names which)."""
    if rule == "corpus":
        t = block.filter(pc.invert(pc.or_(block[_DUP], block[_EMPTY])))
        t = t.select(CORPUS_SCHEMA.names).cast(CORPUS_SCHEMA)
        return sort_by_length(t)
    if rule == "all":
        return block
    if rule == "doc_hash":
        t = block.filter(pc.invert(pc.or_(block[_DUP], block[_EMPTY])))
        return t.select([C.DOC_ID, C.PASSAGE, C.TEXT_HASH])
    if rule == "query_keys":
        t = block.filter(pc.invert(block[_DUP]))
        return pa.table({C.QUERY_ID: t[C.QUERY_ID], _QTEXT: t[C.TEXT], _QEMPTY: t[_EMPTY]})
    if rule == "qrels":
        ok = pc.and_(pc.fill_null(block[_KNOWN], False), pc.equal(pc.fill_null(block[_QEMPTY], True), False))
        return block.filter(ok).select(QRELS_SCHEMA.names).cast(QRELS_SCHEMA)
    if rule == "train" and C.REASON not in block.column_names:  # already a train_queries table
        return block.select(TRAIN_QUERIES_SCHEMA.names).cast(TRAIN_QUERIES_SCHEMA)
    if rule == "train":
        return block.filter(pc.is_null(block[C.REASON])).select(TRAIN_QUERIES_SCHEMA.names).cast(TRAIN_QUERIES_SCHEMA)
    if rule == "dropped":
        return block.filter(pc.is_valid(block[C.REASON])).select(DROPPED_SCHEMA.names).cast(DROPPED_SCHEMA)
    raise ValueError(f"unknown rule {rule!r}")


# ------------------------------------------------------------------------------------------------
# the stage (driver: orchestration and counts only)
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Re-raise an IngestError raised inside a Ray worker as itself (one clear line, no Ray wrapper)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unchanged unless it wraps an IngestError
        err = _wrapped_ingest_error(e)
        if err is None or err is e:
            raise
        raise IngestError(err.file, err.line, err.rule, err.detail) from None


def _wrapped_ingest_error(e: BaseException) -> IngestError | None:
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if type(x) is IngestError:
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    # a cause lost on the way back from a worker still has its line in Ray's message
    m = _WORKER_ERROR.search(str(e))
    if m is None:
        return None
    where, rule, detail = m.groups()
    file, _, line = where.rpartition(":")
    return IngestError(file, int(line), rule, detail) if file and line.isdigit() else IngestError(where, None, rule, detail)


_WORKER_ERROR = re.compile(r"raymine\.ingest\.IngestError: (.+?): \[(\w+)\] ([^\n]*)")


def _partitions(cfg: IngestConfig, files: dict[str, list[str]]) -> int:
    if cfg.partitions:
        return cfg.partitions
    sizes = storage.list_files(cfg.data)  # one listing of the input, not a call per file
    rel = (storage.relative(u, cfg.data) for fs in files.values() for u in fs)
    size = sum(sizes.get(r, 0) for r in rel if r is not None)
    return int(min(4096, max(1, size // (64 << 20))))


def _read(files: list[str], kind: str, cfg: IngestConfig, errors: str):
    """One read task per file (listed on the driver: names only); format errors reported under ``errors``."""
    import ray.data

    items = ray.data.from_arrow(pa.table({"uri": pa.array(files, _STR), "file": pa.array(range(len(files)), pa.int32())}))
    if len(files) > 1:
        items = items.repartition(len(files))
    return items.map_batches(read_files_batch, batch_size=1, batch_format="pyarrow",
                             fn_kwargs={"kind": kind, "rows_per_block": cfg.rows_per_block, "errors": errors})


def _hash_partition(ds, parts: int, key: str):
    """``parts`` blocks, every row of a ``key`` value in the same one. One partition holds every row: that is a
    plain concatenation into one block, without a shuffle's operators (~1 s less on SciFact's 10 s ingest).
    The block functions sort their block themselves, so both give the same rows."""
    return ds.repartition(1) if parts == 1 else ds.repartition(parts, keys=[key], sort=True)


def _parquet(uri: str, columns: list[str] | None = None):
    return parts.read_dataset(uri, columns)


_RULE_SCHEMA = {"corpus": CORPUS_SCHEMA, "train": TRAIN_QUERIES_SCHEMA, "dropped": DROPPED_SCHEMA, "qrels": QRELS_SCHEMA}


def _parts_sink(outputs: dict[str, tuple[str, str]], summary: Any = None):
    """A Ray Data sink whose write tasks write every block to several tables at once (``outputs``: name →
    (folder, ``select_block`` rule)) and return ``summary(block)`` rows: one pass makes the tables and
    their counts. Part names are ``part-<task>-<block>``: a retried task rewrites its own parts."""
    from ray.data import Datasink

    class _PartsSink(Datasink):
        def __init__(self) -> None:
            self.summaries: list[dict[str, Any]] = []

        def write(self, blocks, ctx) -> list[dict[str, Any]]:
            with _user_errors():  # in the worker: Ray's UserCodeException loses its cause when pickled
                return self._write(blocks, ctx)

        def _write(self, blocks, ctx) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            for j, block in enumerate(blocks):
                if not isinstance(block, pa.Table):
                    block = pa.Table.from_pandas(block, preserve_index=False)
                if block.num_rows == 0:  # an empty block may skip the UDF and lack its columns
                    continue
                for uri, rule in outputs.values():
                    t = select_block(block, rule)
                    if t.num_rows:
                        fs, path = storage.resolve(storage.join(uri, f"part-{ctx.task_idx:05d}-{j:05d}.parquet"))
                        pq.write_table(t, path, filesystem=fs)
                if summary is not None:
                    rows = _fold_summaries(rows + summary(block).to_pylist())
            return rows  # one row per input file this task saw, whatever the number of blocks

        def on_write_complete(self, write_result) -> None:
            self.summaries = _fold_summaries([r for rs in write_result.write_returns for r in rs])

    return _PartsSink()


def _execute(ds, outputs: dict[str, tuple[str, str]], summary: Any = None) -> list[dict[str, Any]]:
    """Run ``ds`` into the ``outputs`` tables; the summary rows (one per input file, folded in the write tasks;
    never per-row data) come back."""
    for uri, _ in outputs.values():
        storage.delete_dir(uri)
        storage.makedirs(uri)
    sink = _parts_sink(outputs, summary)
    ds.write_datasink(sink)
    for uri, rule in outputs.values():  # an empty table is still a readable table
        if rule in _RULE_SCHEMA and not _folder_files(uri, (".parquet",)):
            fs, path = storage.resolve(storage.join(uri, "part-00000-00000.parquet"))
            pq.write_table(_RULE_SCHEMA[rule].empty_table(), path, filesystem=fs)
    return sink.summaries


_SUMMARY_KEYS = (_FILE, C.REASON)


def _fold_summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows summed per key — the input file, or the drop reason — (counts add up, ``_min``/``_max``
    columns take the min/max): each write task folds its blocks' rows, so one row per (task, key) reaches the
    driver, not one per block."""
    out: dict[Any, dict[str, Any]] = {}
    for r in rows:
        key = tuple((k, r[k]) for k in _SUMMARY_KEYS if k in r)  # the file (or the drop reason), else one row
        acc = out.setdefault(key, dict(key))
        for k, v in r.items():
            if k in _SUMMARY_KEYS or v is None:
                continue
            if k.endswith("_min") or k.endswith("_max"):
                pick = min if k.endswith("_min") else max
                acc[k] = pick(acc[k], v) if k in acc else v
            else:
                acc[k] = acc.get(k, 0) + v
    return list(out.values())


def _by_file(rows: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """:func:`_execute`'s summaries (already folded per file) by file name."""
    return {names[r[_FILE]]: {k: v for k, v in r.items() if k != _FILE} for r in rows}


def _add_skips(report: IngestReport, per_file: dict[str, dict[str, Any]], rules: dict[str, str]) -> None:
    """Totals of each skip rule and up to 5 file:line samples (the first skipped line of each file)."""
    for flag, rule in rules.items():
        for name in sorted(per_file):
            c = per_file[name]
            if c.get(f"n{flag}_sum"):
                report.counts[f"skipped_{rule}"] += c[f"n{flag}_sum"]
                if len(report.samples[rule]) < 5:
                    report.samples[rule].append(f"{name}:{c[f'at{flag}_min']}")


TABLES = "tables-2"  # what the stage writes, in its key: 2 = the test split's tables added (re-ingest older runs)


def _keyed(cfg: IngestConfig) -> IngestConfig:
    """The config as it keys the stage: knobs that change how, not what, are left out."""
    return dataclasses.replace(cfg, partitions=0, rows_per_block=1)


def ingest_stage(cfg: IngestConfig, layout: Layout) -> dict[str, Any]:
    """Validate the data once, as a Ray Data job, and write the tables every later stage reads
    (folders of Parquet parts written by the workers):

    ``layout.corpus`` (DOC_ID, TITLE, TEXT, PASSAGE, TEXT_HASH; each part longest passage first,
    :func:`sort_by_length`), ``layout.train_queries`` (QUERY_ID, TEXT,
    POSITIVE_IDS, EXCLUDED_IDS), ``layout.train_dropped`` (QUERY_ID, REASON), ``layout.qrels`` (QUERY_ID,
    DOC_ID, SCORE: the train split's kept rows). Skipped when a finished manifest with the same config and
    the same input files (names, sizes, modification times: :func:`input_fingerprint`) exists.
    Returns the manifest: ``counts`` as :func:`read_beir` reports them (ints only), ``files``: counts per
    input file, ``report``: skip samples (file:line) and notes, ``input_fingerprint``.
    Five Ray Data passes: corpus, queries, twins, qrels, per-query (a sixth sorts for ``max_queries``).
    ``ingest.format=pairs``: the pairs are first converted into that input layout (:mod:`raymine.pairs`).
    """
    if cfg.format == "pairs":
        from raymine.pairs import pairs_stage

        cfg = pairs_stage(cfg, layout)
    files = _input_files(cfg.data, cfg.train_split)
    fingerprint = input_fingerprint(cfg.data)
    key = storage.stage_key("ingest", _keyed(cfg), fingerprint, TABLES)
    done, run = storage.begin(layout.ingest, "ingest", key, config=storage.config_hash(cfg))
    if done is not None:
        return done
    assert run is not None
    work = layout.path("ingest", "_work")
    try:
        with _user_errors():
            report, per_file = _run(cfg, layout, files, work, run.counts)
            _test_split(cfg, layout, storage.join(work, "query_keys"), run.counts, report)
    finally:
        storage.delete_dir(work)
    return run.finish(report=report.to_dict(), files=per_file, data=cfg.data, input_fingerprint=fingerprint,
                      partitions=_partitions(cfg, files))


def _run(cfg: IngestConfig, layout: Layout, files: dict[str, list[str]], work: str,
         counts: dict[str, Any]) -> tuple[IngestReport, dict[str, dict[str, int]]]:
    """The five passes; fills ``counts``; returns the report (skip samples, notes) and counts per file."""
    parts = _partitions(cfg, files)
    report = IngestReport()
    per_file: dict[str, dict[str, int]] = {}
    join_args = {"aggregator_ray_remote_args": {"num_cpus": 0.25}}
    w = {name: storage.join(work, name) for name in ("doc_hash", "query_keys", "doc_keys", "qrels", "train")}
    errors = storage.join(work, "errors")  # bad input the workers found, as data (see `found`)
    storage.delete_dir(errors)

    # 1-2. corpus and queries: read (a task per file) → hash-partition by id → first definition wins
    for kind, table in (("doc", "corpus"), ("query", "queries")):
        id_col = C.DOC_ID if kind == "doc" else C.QUERY_ID
        ds = _hash_partition(_read(files[table], kind, cfg, errors), parts, id_col)
        ds = ds.map_batches(dedupe_block, batch_size=None, batch_format="pyarrow", fn_kwargs={
            "kind": kind, "names": files[table], "on_duplicate_id": cfg.on_duplicate_id,
            "on_empty_text": cfg.on_empty_text, "errors": errors})
        outputs = ({"corpus": (layout.corpus, "corpus"), "doc_hash": (w["doc_hash"], "doc_hash")} if kind == "doc"
                   else {"query_keys": (w["query_keys"], "query_keys")})
        summary = _by_file(_execute(ds, outputs, text_summary_block), files[table])
        raise_found(errors, files[table])
        _add_skips(report, summary, {"_dup": f"duplicate_{kind}_id", "_blank": f"empty_{kind}_text"})
        read = sum(c[f"{_LINE}_count"] for c in summary.values())
        kept = read - sum(c["n_dup_sum"] + c["n_blank_sum"] for c in summary.values())
        counts["docs_read" if kind == "doc" else "queries_read"] = kept
        for name in files[table]:
            c = summary.get(name, {})
            rows, dup, blank = c.get(f"{_LINE}_count", 0), c.get("n_dup_sum", 0), c.get("n_blank_sum", 0)
            per_file[name] = {"rows": rows, "duplicate_ids": dup, "blank": blank, "kept": rows - dup - blank}
        if kept == 0:
            what = "passage" if kind == "doc" else "query"
            raise IngestError(cfg.data, None, "empty_corpus" if kind == "doc" else "no_queries",
                              f"no usable {what} in {table}: {read} rows read, {read - kept} blank or duplicate "
                              f"({_skip_line(report, kind)}); fix the {table} files")
    counts["docs"] = counts["docs_read"]

    # 3. each doc's identical-text twins (hash-partitioned by TEXT_HASH, compared as text)
    ds = _hash_partition(_parquet(w["doc_hash"]), parts, C.TEXT_HASH).map_batches(
        twins_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"max_twins": cfg.max_twins})
    twin_counts = _execute(ds, {"doc_keys": (w["doc_keys"], "all")}, _twin_count_block)  # one folded row
    counts["docs_with_identical_text"] = sum(r["n"] for r in twin_counts)
    if cut := sum(r.get("cut", 0) for r in twin_counts):
        counts["identical_twins_not_listed"] = cut
        report.notes.append(f"{cut} identical-text twin ids left off the excluded lists (ingest.max_twins="
                            f"{cfg.max_twins}): a cluster that large is mostly boilerplate; a positive-aware method "
                            f"drops the rest by score (they score as the positive), naive top-k may mine them")

    # 4. qrels joined to the docs (known? twins) and the queries (known? blank?)
    qrels = _read(files["qrels"], "qrels", cfg, errors)
    local = joins.is_small([*files["qrels"], w["doc_keys"], w["query_keys"]])
    qrels = joins.join(qrels, _parquet(w["doc_keys"]), "left_outer", parts, (C.DOC_ID,), local, **join_args)
    qrels = joins.join(qrels, _parquet(w["query_keys"]), "left_outer", parts, (C.QUERY_ID,), local, **join_args)
    summary = _by_file(_execute(qrels, {"work": (w["qrels"], "all"), "qrels": (layout.qrels, "qrels")},
                                qrels_summary_block), files["qrels"])
    raise_found(errors, files["qrels"])
    _add_skips(report, summary, {f"_qrel_{r}": f"qrel_{r}" for r in ("unknown_query", "empty_query_text", "unknown_doc")})
    counts["qrels_read"] = sum(c[f"{_LINE}_count"] for c in summary.values())
    for k, flag in (("qrels_kept", "_kept"), ("qrels_graded_above_1", "_graded"), ("qrels_not_positive", "_nonpos")):
        counts[k] = sum(c[f"n{flag}_sum"] for c in summary.values())
    for name in files["qrels"]:
        c = summary.get(name, {})
        per_file[name] = {"rows": c.get(f"{_LINE}_count", 0), "kept": c.get("n_kept_sum", 0)}
        if c.get(f"{_HEADERLESS}_max"):
            report.notes.append(f"{name}: no header line; read as {c[f'{_HEADERLESS}_max']}-column qrels")
            report.counts["qrels_files_without_header"] += 1
    no_qrels = IngestError(cfg.data, None, "no_qrels",
                           f"no usable qrels in qrels/{cfg.train_split}: {counts['qrels_read']} rows read, none "
                           f"names a known query and doc ({_skip_line(report, 'qrel')})")
    if counts["qrels_read"] == 0:
        raise no_qrels

    # 5. one row per query of the split (hash-partitioned by QUERY_ID): positives, twins, or a drop reason;
    # with on_unknown_qrel=error the first unknown id (file and line) is raised after the pass
    ds = _hash_partition(_parquet(w["qrels"]), parts, C.QUERY_ID).map_batches(
        per_query_block, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"names": files["qrels"], "on_unknown_qrel": cfg.on_unknown_qrel, "errors": errors})
    limit = cfg.max_queries
    train_uri = w["train"] if limit else layout.train_queries
    rows = _execute(ds, {"train": (train_uri, "train"), "dropped": (layout.train_dropped, "dropped")},
                    split_summary_block)
    raise_found(errors, files["qrels"])
    if counts["qrels_kept"] == 0:
        raise no_qrels
    reasons: dict[str, int] = defaultdict(int)
    excluded = 0
    for r in rows:
        reasons[r[C.REASON]] += r["_excl_count"]
        excluded += r["_excl_sum"]
    train = reasons.pop("", 0)
    if train == 0:
        raise IngestError(cfg.data, None, "no_train_queries",
                          f"no query of qrels/{cfg.train_split} has a positive: dropped {dict(reasons)}")
    if limit and train > limit:  # the first N by query id: no row order involved
        ds = _parquet(train_uri).sort(C.QUERY_ID).limit(limit)
        excluded = sum(r["_excl_sum"] for r in _execute(ds, {"train": (layout.train_queries, "train")},
                                                          split_summary_block))
        counts["queries_limited_to"] = limit
        train = limit
    elif limit:
        _execute(_parquet(train_uri), {"train": (layout.train_queries, "train")})
    counts["train_queries"] = train
    counts["train_queries_dropped"] = sum(reasons.values())
    report.notes.append(f"train queries dropped by reason: {dict(sorted(reasons.items()))}")
    counts["queries_with_excluded_twins"] = excluded
    counts.update(report.counts)
    log.info("ingest %s [%s]: %d docs, %d training queries, %d dropped, %d qrels kept; %s", cfg.data,
             cfg.train_split, counts["docs"], counts["train_queries"], counts["train_queries_dropped"],
             counts["qrels_kept"], {k: v for k, v in report.counts.items() if k.startswith("skipped")})
    return report, per_file


TEST_QUERIES_SCHEMA = pa.schema([(C.QUERY_ID, _STR), (C.TEXT, _STR)])


def ids_in_block(block: pa.Table, column: str, wanted: pa.Array) -> pa.Table:
    """Rows whose ``column`` is in ``wanted`` (a test-split-sized id set); a work table's ``_QEMPTY`` rows
    (blank query texts) are left out. Runs in Ray workers: the driver never reads the whole table."""
    keep = pc.is_in(block[column], value_set=wanted)
    if _QEMPTY in block.column_names:
        keep = pc.and_(keep, pc.invert(pc.fill_null(block[_QEMPTY], False)))
    return block.filter(keep)


def _collect(ds: Any) -> pa.Table | None:
    blocks = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(blocks) if blocks else None


def _test_split(cfg: IngestConfig, layout: Layout, query_keys: str, counts: dict[str, Any],
                report: IngestReport) -> None:
    """``layout.test_queries`` (QUERY_ID, TEXT) and ``layout.test_qrels`` (QUERY_ID, DOC_ID, SCORE) of
    ``cfg.test_split``, for the evaluate stage: queries judged in the split with a relevant (score > 0) known
    document, and their judgements (zeros kept: mteb's qrels). Only the split's qrels are read on the driver
    (test-split-sized, with the ingest's qrels parser and rules); the queries and corpus are filtered to the
    ids they name by two Ray Data passes. Counts: ``test_queries``, ``test_qrels``, and what was left out
    (``test_queries_without_positive``, ``test_queries_not_in_split``, ``test_skipped_*``). No qrels file for
    the split: no tables (the evaluate stage then says so)."""
    for uri in (layout.test_queries, layout.test_qrels):
        storage.delete_dir(uri)
    files = table_files(cfg.data, "qrels", cfg.test_split)
    if not files:
        return
    treport = IngestReport()
    qrels, where = _read_qrels(files, treport)
    qids = pa.array(sorted(set(qrels.column(C.QUERY_ID).to_pylist())), _STR)
    dids = pa.array(sorted(set(qrels.column(C.DOC_ID).to_pylist())), _STR)
    found_q = _collect(_parquet(query_keys).map_batches(
        ids_in_block, batch_format="pyarrow", fn_kwargs={"column": C.QUERY_ID, "wanted": qids}))
    found_d = _collect(_parquet(layout.corpus, [C.DOC_ID]).map_batches(
        ids_in_block, batch_format="pyarrow", fn_kwargs={"column": C.DOC_ID, "wanted": dids}))
    queries = (pa.table({C.QUERY_ID: found_q[C.QUERY_ID], C.TEXT: found_q[_QTEXT]}) if found_q is not None
               else TEST_QUERIES_SCHEMA.empty_table())
    docs = found_d if found_d is not None else pa.table({C.DOC_ID: pa.array([], _STR)})
    qrels = _check_qrels(qrels, where, docs, queries, cfg, treport)
    positive = pc.unique(qrels.filter(pc.greater(qrels[C.SCORE], 0))[C.QUERY_ID])
    judged = pc.unique(qrels[C.QUERY_ID])
    qrels = qrels.filter(pc.is_in(qrels[C.QUERY_ID], value_set=positive)).cast(QRELS_SCHEMA)
    queries = queries.filter(pc.is_in(queries[C.QUERY_ID], value_set=positive)).sort_by(C.QUERY_ID)
    parts.write_part(queries.cast(TEST_QUERIES_SCHEMA), layout.test_queries, 0)
    parts.write_part(qrels, layout.test_qrels, 0)
    counts.update({"test_queries": queries.num_rows, "test_qrels": qrels.num_rows,
                   "test_queries_without_positive": len(judged) - len(positive),
                   "test_queries_not_in_split": int(counts.get("queries_read", 0)) - len(judged),
                   **{f"test_{k}": v for k, v in treport.counts.items() if k.startswith("skipped_") and v}})
    report.notes.append(f"test split {cfg.test_split}: {queries.num_rows} queries, {qrels.num_rows} qrels")
    log.info("ingest %s [%s]: %d test queries, %d qrels; left out %s", cfg.data, cfg.test_split, queries.num_rows,
             qrels.num_rows, {k: v for k, v in counts.items() if k.startswith("test_") and k not in
                              ("test_queries", "test_qrels")})


def _twin_count_block(block: pa.Table) -> pa.Table:
    n = pc.sum(pc.greater(pc.list_value_length(block[_TWINS]), 0)).as_py() or 0
    cut = pc.sum(block[_TWINS_CUT]).as_py() or 0
    return pa.table({"n": pa.array([n], pa.int64()), "cut": pa.array([cut], pa.int64())})


def _skip_line(report: IngestReport, kind: str) -> str:
    skips = {k.removeprefix("skipped_"): v for k, v in report.counts.items()
             if k.startswith("skipped_") and kind in k and v}
    return ", ".join(f"{k}: {v}" for k, v in sorted(skips.items())) or "no rows skipped"


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write one Parquet file to a local path or URI."""
    fs, path = storage.resolve(uri)
    pq.write_table(table, path, filesystem=fs)


def corpus_dataset(corpus_uri: str, num_blocks: int | None = None):
    """The ingested corpus (``layout.corpus``) as a Ray Dataset (streamed from Parquet; never collected)."""
    ds = parts.read_dataset(corpus_uri)
    return ds.repartition(num_blocks) if num_blocks else ds
