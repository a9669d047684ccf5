"""Every ingest rule's bad input ends the job with exit 2, ONE line on stderr naming the problem, and no
traceback anywhere in the output — including the rules checked inside Ray Data workers (read, dedupe and
per-query tasks report bad input as data; the driver raises once). A real bug in a worker still exits 1
with its traceback.

Each case runs the job's entry point in process (``raymine.cli.main`` on the shared local Ray; output
captured at the file-descriptor level, Ray's own log handlers included). One case per error path runs by
default; the other rows of the table are ``slow`` (each costs one to four Ray Data passes).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine import cli

DOCS = [{"_id": f"d{i}", "title": f"T{i}", "text": f"passage number {i}"} for i in range(1, 5)]
QUERIES = [{"_id": f"q{i}", "text": f"question {i}"} for i in range(1, 4)]
QRELS = ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2\t1", "q3\td3\t1"]


def _jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def write_beir(root: Path, corpus: list | None = None, queries: list | None = None, qrels: list | None = None) -> Path:
    """A valid tiny BEIR folder, with any of its three tables replaced (rows as dicts, or raw bytes lines)."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_bytes(_jsonl(DOCS if corpus is None else corpus))
    (root / "queries.jsonl").write_bytes(_jsonl(QUERIES if queries is None else queries))
    lines = QRELS if qrels is None else qrels
    (root / "qrels" / "train.tsv").write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return root


def _parquet_corpus(root: Path, table: pa.Table) -> None:
    (root / "corpus.jsonl").unlink()
    pq.write_table(table, root / "corpus.parquet")


def _docs_table(**cols) -> pa.Table:
    base = {"doc_id": [d["_id"] for d in DOCS], "title": [d["title"] for d in DOCS], "text": [d["text"] for d in DOCS]}
    base.update(cols)
    return pa.table({k: v for k, v in base.items() if v is not None})


# ------------------------------------------------------------------------------------------------
# The cases: (name, make the data folder, config overrides, the text the one line must contain)
# ------------------------------------------------------------------------------------------------
def _missing_path(root: Path) -> Path:
    return root / "no_such_folder"


def _missing_qrels(root: Path) -> Path:
    write_beir(root)
    (root / "qrels" / "train.tsv").unlink()
    return root


def _dup_doc(root: Path) -> Path:
    return write_beir(root, corpus=[*DOCS, {"_id": "d2", "text": "again"}])


def _truncated_json(root: Path) -> Path:
    return write_beir(root, corpus=[*DOCS[:2], b'{"_id": "d9", "text": "cut sh', *DOCS[2:]])


def _bad_score(root: Path) -> Path:
    return write_beir(root, qrels=[*QRELS[:2], "q2\td2\tyes", QRELS[3]])


def _unknown_doc(root: Path) -> Path:
    return write_beir(root, qrels=[*QRELS, "q1\tnodoc\t1"])


def _unknown_query(root: Path) -> Path:
    return write_beir(root, qrels=[*QRELS, "ghost\td1\t1"])


def _empty_text(root: Path) -> Path:
    return write_beir(root, corpus=[*DOCS, {"_id": "d5", "title": "", "text": "  "}])


def _parquet_columns(root: Path) -> Path:
    write_beir(root)
    _parquet_corpus(root, _docs_table(text=None, body=[d["text"] for d in DOCS]))
    return root


def _no_positive(root: Path) -> Path:
    return write_beir(root, qrels=[QRELS[0], "q1\td1\t0", "q2\td2\t0"])


CASES = [
    # driver-side checks (no Ray job runs)
    ("missing_folder", _missing_path, [], "{data}: [missing_path] data folder not found — check --data"),
    ("missing_qrels_file", _missing_qrels, [], "{data}: [missing_file] no qrels/train file"),
    # found inside the Ray Data workers: read tasks, dedupe and per-query partitions
    ("duplicate_doc_id", _dup_doc, [],
     "{data}/corpus.jsonl:5: [duplicate_id] doc id 'd2' already defined at line 2 — give each id once, "
     "or set ingest.on_duplicate_id=skip"),
    ("truncated_json", _truncated_json, [], "{data}/corpus.jsonl:3: [json] not a JSON object: Invalid control character"),
    ("non_integer_score", _bad_score, [], "{data}/qrels/train.tsv:3: [qrels_score] relevance 'yes' is not an integer"),
    ("unknown_doc", _unknown_doc, ["ingest.on_unknown_qrel=error"],
     "{data}/qrels/train.tsv:5: [unknown_id] qrel names unknown doc 'nodoc' — fix the id, or set "
     "ingest.on_unknown_qrel=skip"),
    ("empty_text", _empty_text, ["ingest.on_empty_text=error"],
     "{data}/corpus.jsonl:5: [empty_text] doc 'd5' has empty text — fill in the text, or set ingest.on_empty_text=skip"),
    ("parquet_columns", _parquet_columns, [],
     "{data}/corpus.parquet: [missing_field] required column(s) ['text'] missing"),
    # a degenerate input found by the driver from the workers' counts
    ("no_positive", _no_positive, [], "{data}: [no_train_queries] no query of qrels/train has a positive"),
]


def _slow_case(name: str, corpus=None, queries=None, qrels=None, overrides=(), expect: str = ""):
    def make(root: Path) -> Path:
        return write_beir(root, corpus=corpus, queries=queries, qrels=qrels)
    return pytest.param(name, make, list(overrides), expect, id=name, marks=pytest.mark.slow)


def _parquet_case(name: str, table_fn: Callable[[], pa.Table], expect: str):
    def make(root: Path) -> Path:
        write_beir(root)
        _parquet_corpus(root, table_fn())
        return root
    return pytest.param(name, make, [], expect, id=name, marks=pytest.mark.slow)


def _corrupt_parquet(root: Path) -> Path:
    write_beir(root)
    (root / "corpus.jsonl").unlink()
    (root / "corpus.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return root


SLOW_CASES = [
    _slow_case("not_an_object", corpus=[DOCS[0], b"[1, 2]"], expect="{data}/corpus.jsonl:2: [json] not a JSON object"),
    _slow_case("missing_id", corpus=[DOCS[0], {"text": "x"}],
               expect="{data}/corpus.jsonl:2: [missing_field] required field '_id' is missing"),
    _slow_case("missing_text", queries=[QUERIES[0], {"_id": "q2"}],
               expect="{data}/queries.jsonl:2: [missing_field] required field 'text' is missing"),
    _slow_case("empty_id", corpus=[DOCS[0], {"_id": "", "text": "x"}],
               expect="{data}/corpus.jsonl:2: [bad_id] '_id' must be a non-empty string"),
    _slow_case("text_not_string", corpus=[DOCS[0], {"_id": "d7", "text": 3}],
               expect="{data}/corpus.jsonl:2: [bad_field] 'text' and 'title' must be strings"),
    _slow_case("not_utf8", queries=[QUERIES[0], b'{"_id": "q2", "text": "caf\xe9"}'],
               expect="{data}/queries.jsonl:2: [utf8] not valid UTF-8 at byte"),
    _slow_case("duplicate_query_id", queries=[*QUERIES, QUERIES[0]],
               expect="{data}/queries.jsonl:4: [duplicate_id] query id 'q1' already defined at line 1"),
    _slow_case("qrels_header", qrels=["query-id\tcorpus-id", *QRELS[1:]],
               expect="{data}/qrels/train.tsv:1: [qrels_header] header has 2 columns, expected 3"),
    _slow_case("qrels_columns", qrels=[*QRELS, "q1\td1"],
               expect="{data}/qrels/train.tsv:5: [qrels_columns] 2 columns, earlier lines have 3"),
    _slow_case("qrels_empty_id", qrels=[*QRELS, "q1\t\t1"], expect="{data}/qrels/train.tsv:5: [qrels_id] empty query or doc id"),
    _slow_case("unknown_query", qrels=[*QRELS, "ghost\td1\t1"], overrides=["ingest.on_unknown_qrel=error"],
               expect="{data}/qrels/train.tsv:5: [unknown_id] qrel names unknown query 'ghost'"),
    _slow_case("blank_corpus", corpus=[{"_id": "d1", "text": " "}], expect="{data}: [empty_corpus] no usable passage"),
    _slow_case("no_queries", queries=[{"_id": "q1", "text": ""}], expect="{data}: [no_queries] no usable query"),
    _slow_case("no_qrels", qrels=[QRELS[0], "q1\tnodoc\t1"], expect="{data}: [no_qrels] no usable qrels in qrels/train"),
    _parquet_case("parquet_null_id", lambda: _docs_table(doc_id=["d1", None, "d3", "d4"]),
                  "{data}/corpus.parquet:2: [missing_field] column 'doc_id' is null in 1 row(s)"),
    pytest.param("parquet_corrupt", _corrupt_parquet, [], "{data}/corpus.parquet: [parquet] cannot read Parquet",
                 id="parquet_corrupt", marks=pytest.mark.slow),
]


def _run(tmp_path: Path, data: Path, overrides: list[str], capfd) -> tuple[int, str, str]:
    code = cli.main(["run", "--data", str(data), "--output", str(tmp_path / "out"), "--stages", "embed",
                     "teachers=bm25", *overrides])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize(("name", "make", "overrides", "expect"),
                         [pytest.param(*c, id=c[0]) for c in CASES] + SLOW_CASES)
def test_bad_input_is_one_line_and_no_traceback(ray_local, tmp_path, capfd, name, make, overrides, expect):
    data = make(tmp_path / "data")
    code, out, err = _run(tmp_path, data, overrides, capfd)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"error: stage ingest: {expect.format(data=data)}"), errors[0]
    assert "Traceback" not in out + err, err[-3000:]
    assert not [ln for ln in err.splitlines() if " ERROR " in ln], err[-3000:]  # nor Ray's report of a task
    if name == "missing_folder":
        assert "fix that line" not in errors[0]


def test_user_error_raised_in_a_ray_data_task_logs_no_traceback(ray_local, capfd):
    """The second line of defence: a UserError that still escapes a Ray Data task (a datasink's write, where
    Ray logs the task's full traceback itself) ends in the one line only."""
    import ray.data

    from raymine.ingest import IngestError

    class Sink(ray.data.Datasink):
        def write(self, blocks, ctx):
            raise IngestError("s3://bucket/corpus.jsonl", 7, "json", "not a JSON object")

    ds = ray.data.range(4)
    assert cli.guard(lambda: ds.write_datasink(Sink())) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: s3://bucket/corpus.jsonl:7: [json] not a JSON object — fix that line of the input"]


def test_a_bug_in_a_worker_exits_1_with_its_traceback(ray_local, tmp_path, capfd, monkeypatch):
    """Test hook: ``raymine.ingest.dedupe_block`` (the function the stage sends to its Ray Data workers) is
    replaced by one that fails like a bug would; a nested function is pickled by value, so the worker runs it."""
    import raymine.ingest

    def dedupe_block(block, **kwargs):
        return 1 // (block.num_rows - block.num_rows)  # ZeroDivisionError: not a user error

    monkeypatch.setattr(raymine.ingest, "dedupe_block", dedupe_block)
    code, out, err = _run(tmp_path, write_beir(tmp_path / "data"), [], capfd)
    assert code == 1, err[-3000:]
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert "integer division or modulo by zero" in err
    assert err.rstrip().splitlines()[-1].startswith("failed: ZeroDivisionError"), err[-2000:]
    assert not [ln for ln in err.splitlines() if ln.startswith("error:")]
