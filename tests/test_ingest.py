"""Ingest: SciFact counts, both layouts, URIs, and one test per row of the bad-input table."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SCIFACT

from raymine import columns as C
from raymine.config import IngestConfig
from raymine.ingest import (
    NO_POSITIVE,
    UNKNOWN_QUERY,
    IngestError,
    identical_text_groups,
    ingest_stage,
    normalize_text,
    positives_table,
    read_beir,
)


def make_beir(root: Path, corpus=None, queries=None, qrels=None, split="train", gz=False) -> str:
    """Write a BEIR folder; rows given as dicts (jsonl) or raw lines (bytes/str) to test malformed input."""
    corpus = corpus if corpus is not None else [
        {"_id": "d1", "title": "Cats", "text": "cats purr"},
        {"_id": "d2", "title": "", "text": "dogs bark"},
        {"_id": "d3", "title": "Fish", "text": "fish swim"},
    ]
    queries = queries if queries is not None else [
        {"_id": "q1", "text": "what purrs"}, {"_id": "q2", "text": "who barks"},
    ]
    qrels = qrels if qrels is not None else ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2\t1"]
    (root / "qrels").mkdir(parents=True, exist_ok=True)

    def dump(path: Path, rows):
        data = b"".join(
            (r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n"
            for r in rows
        )
        if gz:
            path = path.with_name(path.name + ".gz")
            data = gzip.compress(data)
        path.write_bytes(data)

    dump(root / "corpus.jsonl", corpus)
    dump(root / "queries.jsonl", queries)
    dump(root / "qrels" / f"{split}.tsv", qrels)
    return str(root)


# ------------------------------------------------------------------------------------------------
def test_scifact_counts():
    train = read_beir(str(SCIFACT), "train")
    test = read_beir(str(SCIFACT), "test")
    assert train.corpus.num_rows == 5183
    q_train, dropped = train.split_queries()
    assert (q_train.num_rows, train.qrels.num_rows, dropped.num_rows) == (809, 919, 0)
    q_test, dropped = test.split_queries()
    assert (q_test.num_rows, test.qrels.num_rows, dropped.num_rows) == (300, 339, 0)
    # positives: every qrel > 0 kept, per query
    assert sum(len(v) for v in train.positives().values()) == 919


def test_plain_and_gz_equal(tmp_path):
    a = read_beir(make_beir(tmp_path / "a"), "train")
    b = read_beir(make_beir(tmp_path / "b", gz=True), "train")
    assert a.corpus.equals(b.corpus) and a.qrels.equals(b.qrels) and a.queries.equals(b.queries)


def test_parquet_layout_equals_beir(tmp_path):
    beir = read_beir(make_beir(tmp_path / "beir"), "train")
    pdir = tmp_path / "pq"
    (pdir / "qrels").mkdir(parents=True)
    pq.write_table(beir.corpus, pdir / "corpus.parquet")
    pq.write_table(beir.queries, pdir / "queries.parquet")
    pq.write_table(beir.qrels, pdir / "qrels" / "train.parquet")
    got = read_beir(str(pdir), "train")
    assert got.corpus.equals(beir.corpus) and got.qrels.equals(beir.qrels)
    # a corpus without a title column gets empty titles
    pq.write_table(beir.corpus.drop([C.TITLE]), pdir / "corpus.parquet")
    assert read_beir(str(pdir), "train").corpus.column(C.TITLE).to_pylist() == ["", "", ""]


def test_reads_through_uri(tmp_path):
    root = make_beir(tmp_path / "u", gz=True)
    data = read_beir("file://" + root, "train")
    assert data.corpus.num_rows == 3 and data.qrels.num_rows == 2


def test_missing_file_is_named(tmp_path):
    root = make_beir(tmp_path / "m")
    with pytest.raises(IngestError, match=r"no qrels/test file"):
        read_beir(root, "test")


# ------------------------------------------------------------------------------------------------
# The bad-input table: one test per row.
# ------------------------------------------------------------------------------------------------
def test_duplicate_doc_id_is_an_error_with_both_lines(tmp_path):
    root = make_beir(tmp_path, corpus=[{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"},
                                       {"_id": "d1", "text": "c"}])
    with pytest.raises(IngestError, match=r"corpus.jsonl:3: \[duplicate_id\] doc id 'd1' already defined at line 1"):
        read_beir(root, "train")


def test_duplicate_query_id_skip_mode_counts(tmp_path):
    root = make_beir(tmp_path, queries=[{"_id": "q1", "text": "x"}, {"_id": "q1", "text": "y"},
                                        {"_id": "q2", "text": "z"}, {"_id": "q2", "text": "w"}])
    data = read_beir(root, "train", IngestConfig(on_duplicate_id="skip"))
    assert data.report.counts["skipped_duplicate_query_id"] == 2
    assert data.queries.column(C.TEXT).to_pylist() == ["x", "z"]  # the first definition wins


def test_empty_or_whitespace_text_is_counted_skip(tmp_path):
    root = make_beir(tmp_path, corpus=[{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "  \t "},
                                       {"_id": "d3", "title": "T", "text": ""}, {"_id": "d4", "text": ""}],
                     queries=[{"_id": "q1", "text": "x"}, {"_id": "q2", "text": " "}],
                     qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td1\t1", "q1\td2\t1"])
    data = read_beir(root, "train")
    # d3 has a title, so its passage is not empty
    assert data.corpus.column(C.DOC_ID).to_pylist() == ["d1", "d3"]
    assert data.report.counts["skipped_empty_doc_text"] == 2
    assert data.report.counts["skipped_empty_query_text"] == 1
    # the qrels of the empty query and to the empty doc are counted too
    assert data.report.counts["skipped_qrel_empty_query_text"] == 1
    assert data.report.counts["skipped_qrel_unknown_doc"] == 1
    queries, dropped = data.split_queries()
    assert queries.column(C.QUERY_ID).to_pylist() == ["q1"]
    assert dict(zip(*(dropped.column(c).to_pylist() for c in (C.QUERY_ID, C.REASON)), strict=False)) == {"q2": "empty_query_text"}


def test_empty_text_error_mode(tmp_path):
    root = make_beir(tmp_path, corpus=[{"_id": "d1", "text": "a"}, {"_id": "d2", "text": ""}])
    with pytest.raises(IngestError, match=r"corpus.jsonl:2: \[empty_text\]"):
        read_beir(root, "train", IngestConfig(on_empty_text="error"))


def test_qrels_to_unknown_docs_and_queries_are_counted(tmp_path):
    root = make_beir(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\tnodoc\t1",
                                      "ghost\td2\t1", "q2\tnodoc\t1"])
    data = read_beir(root, "train")
    assert data.report.counts["skipped_qrel_unknown_doc"] == 2
    assert data.report.counts["skipped_qrel_unknown_query"] == 1
    assert data.qrels.num_rows == 1
    queries, dropped = data.split_queries()
    assert queries.column(C.QUERY_ID).to_pylist() == ["q1"]
    reasons = dict(zip(*(dropped.column(c).to_pylist() for c in (C.QUERY_ID, C.REASON)), strict=False))
    # every query of the split is accounted for: q2 lost its only qrel, ghost is not in queries.jsonl
    assert reasons == {"q2": NO_POSITIVE, "ghost": UNKNOWN_QUERY}


def test_unknown_qrel_error_mode(tmp_path):
    root = make_beir(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\tnodoc\t1"])
    with pytest.raises(IngestError, match=r"\[unknown_id\] qrels row 2 names unknown doc 'nodoc'"):
        read_beir(root, "train", IngestConfig(on_unknown_qrel="error"))


def test_query_with_no_positive_is_dropped_with_reason(tmp_path):
    root = make_beir(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2\t0"])
    data = read_beir(root, "train")
    queries, dropped = data.split_queries()
    assert queries.column(C.QUERY_ID).to_pylist() == ["q1"]
    assert dropped.to_pylist() == [{C.QUERY_ID: "q2", C.REASON: NO_POSITIVE}]
    assert data.report.counts["qrels_not_positive"] == 1


@pytest.mark.parametrize("row, field", [({"text": "no id"}, "_id"), ({"_id": "d9"}, "text")])
def test_row_missing_required_field(tmp_path, row, field):
    root = make_beir(tmp_path, corpus=[{"_id": "d1", "text": "a"}, row])
    with pytest.raises(IngestError, match=rf"corpus.jsonl:2: \[missing_field\] required field '{field}'"):
        read_beir(root, "train")


def test_parquet_missing_column_and_nulls(tmp_path):
    (tmp_path / "qrels").mkdir()
    pq.write_table(pa.table({"doc_id": ["d1"], "body": ["x"]}), tmp_path / "corpus.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["x"]}), tmp_path / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "doc_id": ["d1"], "score": [1]}), tmp_path / "qrels" / "train.parquet")
    with pytest.raises(IngestError, match=r"corpus.parquet: \[missing_field\] required column\(s\) \['text'\]"):
        read_beir(str(tmp_path), "train")
    pq.write_table(pa.table({"doc_id": ["d1", None], "text": ["x", "y"]}), tmp_path / "corpus.parquet")
    with pytest.raises(IngestError, match=r"corpus.parquet:2: \[missing_field\] column 'doc_id' is null"):
        read_beir(str(tmp_path), "train")


def test_non_utf8_bytes_error_names_line(tmp_path):
    root = make_beir(tmp_path, queries=[{"_id": "q1", "text": "x"}, b'{"_id": "q2", "text": "caf\xe9"}'])
    with pytest.raises(IngestError, match=r"queries.jsonl:2: \[utf8\] not valid UTF-8 at byte 26"):
        read_beir(root, "train")


def test_non_utf8_in_gz_qrels(tmp_path):
    root = make_beir(tmp_path, qrels=["query-id\tcorpus-id\tscore", b"q1\td\xff1\t1"], gz=True)
    with pytest.raises(IngestError, match=r"train.tsv.gz:2: \[utf8\]"):
        read_beir(root, "train")


def test_headerless_qrels_are_read_and_reported(tmp_path):
    root = make_beir(tmp_path, qrels=["q1\td1\t1", "q2\td2\t1"])
    data = read_beir(root, "train")
    assert data.qrels.num_rows == 2
    assert data.report.counts["qrels_files_without_header"] == 1
    # TREC 4-column layout (qid iter docid rel), space separated
    root = make_beir(tmp_path / "trec", qrels=["q1 0 d1 1", "q2 0 d2 2"])
    data = read_beir(root, "train")
    assert data.qrels.column(C.DOC_ID).to_pylist() == ["d1", "d2"]
    assert data.qrels.column(C.SCORE).to_pylist() == [1, 2]


@pytest.mark.parametrize(
    "bad, message",
    [("q1\td1", r"train.tsv:3: \[qrels_columns\] 2 columns, earlier lines have 3"),
     ("q1\td1\tyes", r"train.tsv:3: \[qrels_score\] relevance 'yes' is not an integer"),
     ("q1\td1\t1\t0", r"train.tsv:3: \[qrels_columns\] 4 columns, earlier lines have 3")],
)
def test_malformed_qrels_line(tmp_path, bad, message):
    root = make_beir(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", bad])
    with pytest.raises(IngestError, match=message):
        read_beir(root, "train")


def test_graded_relevance_positive_only_above_zero(tmp_path):
    root = make_beir(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\td2\t0", "q1\td3\t1",
                                      "q2\td2\t1"])
    data = read_beir(root, "train")
    assert data.positives() == {"q1": ["d1", "d3"], "q2": ["d2"]}
    assert data.report.counts["qrels_graded_above_1"] == 1
    assert data.report.counts["qrels_not_positive"] == 1


# ------------------------------------------------------------------------------------------------
def test_identical_text_twins_become_excluded_ids():
    corpus = pa.table({C.DOC_ID: ["a", "b", "c", "d"], C.TITLE: ["T", "", "", ""],
                       C.TEXT: ["Hello  World", "t hello world", "other", "HELLO world"]})
    twins = identical_text_groups(corpus)
    # "T" + "Hello  World" == "t hello world" after normalisation; "HELLO world" is a different passage
    assert twins == {"a": ["b"], "b": ["a"]}
    assert normalize_text("  A\tb \n") == "a b"
    queries = pa.table({C.QUERY_ID: ["q"], C.TEXT: ["x"]})
    table = positives_table(queries, {"q": ["a"]}, twins)
    assert table.column(C.EXCLUDED_IDS).to_pylist() == [["b"]]


def test_ingest_stage_writes_tables_and_skips_rerun(tmp_path):
    root = make_beir(tmp_path / "in", qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2\t0"])
    out = str(tmp_path / "out")
    m1 = ingest_stage(IngestConfig(data=root), out)
    assert m1["counts"]["train_queries"] == 1 and m1["counts"]["train_queries_dropped"] == 1
    t = pq.read_table(Path(out) / "train_queries.parquet")
    assert t.column(C.POSITIVE_IDS).to_pylist() == [["d1"]]
    m2 = ingest_stage(IngestConfig(data=root), out)
    assert m2["finished_at"] == m1["finished_at"]  # nothing re-ran
    m3 = ingest_stage(IngestConfig(data=root, max_queries=5), out)
    assert m3["key"] != m1["key"]
