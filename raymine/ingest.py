"""Ingest: BEIR folders and Parquet tables → validated Arrow tables with the project's column names.

Layouts read (local paths or any pyarrow/fsspec URI):

* BEIR: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv`` — each plain or ``.gz``.
* Parquet: ``corpus.parquet`` (doc_id, title?, text), ``queries.parquet`` (query_id, text),
  ``qrels/<split>.parquet`` (query_id, doc_id, score) — each a file or a folder of files.

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
============================== ================================================================

A query "of a split" is one that appears in that split's qrels. Every such query ends up either
with positives or in ``dropped`` with its reason.
"""
from __future__ import annotations

import io
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raymine import columns as C
from raymine import storage
from raymine.config import IngestConfig

log = logging.getLogger(__name__)

# dropped-query reasons
NO_POSITIVE = "no_positive"
EMPTY_QUERY = "empty_query_text"
UNKNOWN_QUERY = "unknown_query"  # in qrels but not in the queries file


class IngestError(ValueError):
    """Input that cannot be used; the message names the file, the line and the rule."""

    def __init__(self, file: str, line: int | None, rule: str, detail: str):
        self.file, self.line, self.rule = file, line, rule
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: [{rule}] {detail}")


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
# file helpers
# ------------------------------------------------------------------------------------------------
def _find(folder: str, stem: str, exts: tuple[str, ...]) -> str | None:
    for ext in exts:
        uri = storage.join(folder, stem + ext)
        if storage.exists(uri):
            return uri
    return None


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


# ------------------------------------------------------------------------------------------------
# BEIR jsonl readers
# ------------------------------------------------------------------------------------------------
def _read_jsonl(uri: str, kind: str, cfg: IngestConfig, report: IngestReport) -> pa.Table:
    """corpus (kind='doc') or queries (kind='query') jsonl → table, validated per the module rules."""
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    empty_ids: list[str] = []
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
        rid = str(rid)
        if rid in first_line:
            if cfg.on_duplicate_id == "error":
                raise IngestError(uri, n, "duplicate_id",
                                  f"{kind} id {rid!r} already defined at line {first_line[rid]}")
            report.skip(f"duplicate_{kind}_id", f"{uri}:{n}")
            continue
        first_line[rid] = n
        if not (text.strip() or (kind == "doc" and title.strip())):
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


def _read_qrels_tsv(uri: str, report: IngestReport) -> pa.Table:
    """BEIR ``query-id corpus-id score`` (header) or TREC ``qid iter docid rel`` (no header)."""
    qs: list[str] = []
    ds: list[str] = []
    scores: list[int] = []
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
        if n == 1:
            report.notes.append(f"{uri}: no header line; read as {len(parts)}-column qrels")
            report.counts["qrels_files_without_header"] += 1
        if ncols is None:
            if len(parts) not in (3, 4):
                raise IngestError(uri, n, "qrels_columns",
                                  f"{len(parts)} columns; expected 3 (query-id corpus-id score) or 4 (TREC)")
            ncols = len(parts)
        elif len(parts) != ncols:
            raise IngestError(uri, n, "qrels_columns", f"{len(parts)} columns, earlier lines have {ncols}")
        q, d, s = (parts[0], parts[1], parts[2]) if ncols == 3 else (parts[0], parts[2], parts[3])
        if not _is_int(s):
            raise IngestError(uri, n, "qrels_score", f"relevance {s!r} is not an integer")
        if not q or not d:
            raise IngestError(uri, n, "qrels_id", "empty query or doc id")
        qs.append(q)
        ds.append(d)
        scores.append(int(s))
    return pa.table({C.QUERY_ID: pa.array(qs, pa.string()), C.DOC_ID: pa.array(ds, pa.string()),
                     C.SCORE: pa.array(scores, pa.int32())})


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------
# Parquet readers
# ------------------------------------------------------------------------------------------------
def _read_parquet_table(uri: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> pa.Table:
    fs, path = storage.resolve(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(uri, None, "parquet", f"cannot read Parquet: {e}") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise IngestError(uri, None, "missing_field", f"required column(s) {missing} missing; has {table.column_names}")
    cols = {c: table.column(c) for c in required}
    for c in optional:
        cols[c] = table.column(c) if c in table.column_names else pa.array([""] * table.num_rows, pa.string())
    for c in (C.DOC_ID, C.QUERY_ID):
        if c in cols and not pa.types.is_string(cols[c].type) and not pa.types.is_large_string(cols[c].type):
            cols[c] = pc.cast(cols[c], pa.string())
    out = pa.table(cols)
    for c in required:
        nulls = out.column(c).null_count
        if nulls:
            first = pc.index(pc.is_null(out.column(c)), True).as_py()
            raise IngestError(uri, first + 1, "missing_field", f"column {c!r} is null in {nulls} row(s)")
    return out


def _validate_table(uri: str, table: pa.Table, kind: str, cfg: IngestConfig, report: IngestReport) -> pa.Table:
    """Duplicate ids and empty texts for a Parquet corpus/queries table (row numbers are 1-based)."""
    id_col = C.DOC_ID if kind == "doc" else C.QUERY_ID
    ids = table.column(id_col).to_pylist()
    seen: dict[str, int] = {}
    keep = []
    empty_ids = []
    texts = table.column(C.TEXT).to_pylist()
    titles = table.column(C.TITLE).to_pylist() if C.TITLE in table.column_names else [""] * len(ids)
    for i, rid in enumerate(ids):
        if rid in seen:
            if cfg.on_duplicate_id == "error":
                raise IngestError(uri, i + 1, "duplicate_id", f"{kind} id {rid!r} already defined at row {seen[rid]}")
            report.skip(f"duplicate_{kind}_id", f"{uri}:{i + 1}")
            continue
        seen[rid] = i + 1
        if not ((texts[i] or "").strip() or (kind == "doc" and (titles[i] or "").strip())):
            if cfg.on_empty_text == "error":
                raise IngestError(uri, i + 1, "empty_text", f"{kind} {rid!r} has empty text")
            report.skip(f"empty_{kind}_text", f"{uri}:{i + 1}")
            empty_ids.append(rid)
            continue
        keep.append(i)
    if kind == "query":
        report.empty_query_ids = set(empty_ids)
    report.counts["docs_read" if kind == "doc" else "queries_read"] = len(keep)
    return table.take(pa.array(keep, pa.int64())) if len(keep) != table.num_rows else table


# ------------------------------------------------------------------------------------------------
def read_beir(path: str, split: str, cfg: IngestConfig | None = None) -> BeirData:
    """Read a BEIR folder (jsonl/tsv, plain or .gz) or a Parquet folder; validate; return one split."""
    cfg = cfg or IngestConfig()
    report = IngestReport()
    if not storage.exists(path):
        raise IngestError(path, None, "missing_path", "data folder not found")

    corpus_uri = _find(path, "corpus", (".parquet", ".jsonl", ".jsonl.gz"))
    queries_uri = _find(path, "queries", (".parquet", ".jsonl", ".jsonl.gz"))
    qrels_uri = _find(storage.join(path, "qrels"), split, (".parquet", ".tsv", ".tsv.gz"))
    for name, uri in (("corpus", corpus_uri), ("queries", queries_uri), (f"qrels/{split}", qrels_uri)):
        if uri is None:
            raise IngestError(path, None, "missing_file", f"no {name} file (.jsonl[.gz], .tsv[.gz] or .parquet)")
    assert corpus_uri and queries_uri and qrels_uri

    if corpus_uri.endswith(".parquet"):
        corpus = _validate_table(corpus_uri, _read_parquet_table(corpus_uri, (C.DOC_ID, C.TEXT), (C.TITLE,)),
                                 "doc", cfg, report)
        corpus = corpus.select([C.DOC_ID, C.TITLE, C.TEXT])
    else:
        corpus = _read_jsonl(corpus_uri, "doc", cfg, report)
    if queries_uri.endswith(".parquet"):
        queries = _validate_table(queries_uri, _read_parquet_table(queries_uri, (C.QUERY_ID, C.TEXT)),
                                  "query", cfg, report)
    else:
        queries = _read_jsonl(queries_uri, "query", cfg, report)
    if qrels_uri.endswith(".parquet"):
        qrels = _read_parquet_table(qrels_uri, (C.QUERY_ID, C.DOC_ID, C.SCORE))
        if not pa.types.is_integer(qrels.column(C.SCORE).type):
            raise IngestError(qrels_uri, None, "qrels_score", f"score column must be integer, is {qrels.column(C.SCORE).type}")
        qrels = qrels.set_column(2, C.SCORE, pc.cast(qrels.column(C.SCORE), pa.int32()))
    else:
        qrels = _read_qrels_tsv(qrels_uri, report)
    report.counts["qrels_read"] = qrels.num_rows

    qrels = _check_qrels(qrels_uri, qrels, corpus, queries, cfg, report)
    log.info("ingest %s [%s]: %d docs, %d queries in file, %d qrels; %s", path, split, corpus.num_rows,
             queries.num_rows, qrels.num_rows, {k: v for k, v in report.counts.items() if k.startswith("skipped")})
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, report=report, split=split)


def _check_qrels(uri: str, qrels: pa.Table, corpus: pa.Table, queries: pa.Table, cfg: IngestConfig,
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
        raise IngestError(uri, None, "unknown_id",
                          f"qrels row {i + 1} names unknown {what} {qrels.column(C.QUERY_ID if what == 'query' else C.DOC_ID)[i].as_py()!r}")
    dropped_queries: dict[str, str] = {}
    for i in bad_q:
        q = qids[i]
        reason = EMPTY_QUERY if q in empty_q else UNKNOWN_QUERY
        report.skip(f"qrel_{reason}", f"{uri} row {i + 1}")
        dropped_queries.setdefault(q, reason)
    for i in bad_d:
        if known_q[i].as_py():
            report.skip("qrel_unknown_doc", f"{uri} row {i + 1}")
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


# ------------------------------------------------------------------------------------------------
def identical_text_groups(corpus: pa.Table) -> dict[str, list[str]]:
    """doc id → the other doc ids whose normalised passage text is identical (only docs that have twins)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for d, t, x in zip(*(corpus.column(c).to_pylist() for c in (C.DOC_ID, C.TITLE, C.TEXT)), strict=False):
        groups[normalize_text(passage_text(t, x))].append(d)
    out: dict[str, list[str]] = {}
    for ids in groups.values():
        if len(ids) > 1:
            for d in ids:
                out[d] = [o for o in ids if o != d]
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


def ingest_stage(cfg: IngestConfig, out_uri: str) -> dict[str, Any]:
    """Validate the data once and write the tables every later stage reads:

    ``corpus.parquet`` (DOC_ID, TITLE, TEXT), ``train_queries.parquet`` (QUERY_ID, TEXT, POSITIVE_IDS,
    EXCLUDED_IDS), ``train_dropped.parquet`` (QUERY_ID, REASON), ``full_qrels_<split>.parquet``.
    Skipped when a finished manifest with the same config and input exists.
    """
    key = storage.stage_key("ingest", cfg)
    done = storage.completed(out_uri, key)
    if done:
        log.info("ingest: already done (%s)", out_uri)
        return done
    run = storage.StageRun(out_uri, "ingest", key, config=storage.config_hash(cfg))
    data = read_beir(cfg.data, cfg.train_split, cfg)
    queries, dropped = data.split_queries()
    if cfg.max_queries and queries.num_rows > cfg.max_queries:
        queries = queries.slice(0, cfg.max_queries)
        run.counts["queries_limited_to"] = cfg.max_queries
    twins = identical_text_groups(data.corpus)
    table = positives_table(queries, data.positives(), twins)
    storage.makedirs(out_uri)
    for name, tbl in (("corpus", data.corpus), ("train_queries", table), ("train_dropped", dropped),
                      (f"qrels_{cfg.train_split}", data.qrels)):
        write_parquet(tbl, storage.join(out_uri, f"{name}.parquet"))
    run.counts.update({
        "docs": data.corpus.num_rows,
        "train_queries": table.num_rows,
        "train_queries_dropped": dropped.num_rows,
        "docs_with_identical_text": len(twins),
        "queries_with_excluded_twins": sum(1 for x in table.column(C.EXCLUDED_IDS).to_pylist() if x),
        **data.report.counts,
    })
    return run.finish(report=data.report.to_dict(), data=cfg.data)


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write one Parquet file to a local path or URI."""
    fs, path = storage.resolve(uri)
    pq.write_table(table, path, filesystem=fs)


def corpus_dataset(out_uri: str, num_blocks: int | None = None):
    """The ingested corpus as a Ray Dataset (streamed from Parquet; never collected on the driver)."""
    import ray.data

    ds = ray.data.read_parquet(storage.join(out_uri, "corpus.parquet"))
    return ds.repartition(num_blocks) if num_blocks else ds

