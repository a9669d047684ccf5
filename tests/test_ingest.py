"""Ingest: SciFact counts, every layout, URIs, one test per row of the bad-input table, and the Ray Data stage:
many files == one file, counts summed across files, errors naming file and line, results independent of
how rows are split into files, blocks and partitions, degenerate inputs, the input fingerprint."""
from __future__ import annotations

import dataclasses
import gzip
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import SCIFACT

from raymine import columns as C
from raymine.config import IngestConfig
from raymine.ingest import (
    EMPTY_QUERY,
    NO_POSITIVE,
    UNKNOWN_QUERY,
    IngestError,
    identical_text_groups,
    ingest_stage,
    input_fingerprint,
    normalize_text,
    passage_text,
    positives_table,
    read_beir,
    table_files,
    text_hash,
    twins_block,
)
from raymine.layout import Layout


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
    with pytest.raises(IngestError, match=r"train.tsv:3: \[unknown_id\] qrel names unknown doc 'nodoc'"):
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


# ------------------------------------------------------------------------------------------------
# Multi-file layouts (driver reader) and the Ray Data stage
# ------------------------------------------------------------------------------------------------
DOCS = [
    {"_id": "d1", "title": "Cats", "text": "cats purr"},
    {"_id": "d2", "title": "", "text": "dogs bark"},
    {"_id": "d3", "title": "cats", "text": "Cats  PURR"},  # identical passage to d1 once normalised
    {"_id": "d4", "title": "", "text": "   "},  # blank: skipped
    {"_id": "d5", "title": "Fish", "text": "fish swim"},
    {"_id": "d2", "title": "", "text": "a second d2: skipped, the first is kept"},
    {"_id": "d6", "title": "", "text": "cats\tcats purr"},  # a third twin
    {"_id": "d7", "title": "Birds", "text": "birds fly"},
    {"_id": "d5", "title": "", "text": " "},  # duplicate (blank, still a duplicate)
    {"_id": "d8", "title": "Dogs", "text": "dogs bark"},  # "dogs dogs bark": not d2's twin
    {"_id": "d9", "title": "", "text": "owls hoot at night"},
    {"_id": "d10", "title": "Owls", "text": "hoot at night"},  # "Owls hoot at night": d9's twin
    {"_id": "d11", "title": "", "text": "frogs croak"},
]
QUERIES = [
    {"_id": "q1", "text": "what purrs"}, {"_id": "q2", "text": "who barks"}, {"_id": "q3", "text": "who flies"},
    {"_id": "q3", "text": "duplicate q3: skipped"}, {"_id": "q4", "text": "blank doc"},
    {"_id": "q5", "text": "only a zero grade"}, {"_id": "q6", "text": "dogs"}, {"_id": "q7", "text": "  "},
    {"_id": "q8", "text": "cats again"}, {"_id": "q9", "text": "not in the train qrels"},
]
QRELS = [("q1", "d1", 1), ("q1", "d5", 0), ("q2", "d2", 2), ("q2", "nodoc", 1), ("q3", "d7", 1), ("q3", "d1", 1),
         ("ghost", "d1", 1), ("q7", "d1", 1), ("q4", "d4", 1), ("q5", "d5", 0), ("q6", "d8", 1), ("q8", "d6", 1),
         ("q8", "d9", 1), ("q8", "d6", 1)]
QRELS_HEADER = "query-id\tcorpus-id\tscore"


def _rows_to_file(path: Path, rows: list[dict], kind: str) -> None:
    """jsonl, jsonl.gz or parquet by the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        idc = C.DOC_ID if kind == "doc" else C.QUERY_ID
        cols = {idc: [r["_id"] for r in rows], C.TEXT: [r["text"] for r in rows]}
        if kind == "doc":
            cols[C.TITLE] = [r.get("title", "") for r in rows]
        pq.write_table(pa.table(cols), path)
        return
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _qrels_to_file(path: Path, rows: list[tuple], header: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        pq.write_table(pa.table({C.QUERY_ID: [r[0] for r in rows], C.DOC_ID: [r[1] for r in rows],
                                 C.SCORE: pa.array([r[2] for r in rows], pa.int32())}), path)
        return
    text = (QRELS_HEADER + "\n" if header else "") + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())


def _split(rows: list, cuts: list[int]) -> list[list]:
    bounds = [0, *cuts, len(rows)]
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def make_multi(root: Path, docs=DOCS, queries=QUERIES, qrels=QRELS, doc_files=("a-000.jsonl", "a-001.jsonl.gz",
               "a-002.parquet"), doc_cuts=(5, 11), query_files=("000.jsonl", "001.parquet"), query_cuts=(4,),
               qrel_files=("000.tsv", "001.tsv"), qrel_cuts=(6,), headerless=(1,)) -> str:
    """The same rows as ``make_beir`` would write, split over folders of files (names in reading order)."""
    for name, part in zip(doc_files, _split(list(docs), list(doc_cuts)), strict=True):
        _rows_to_file(root / "corpus" / name, part, "doc")
    for name, part in zip(query_files, _split(list(queries), list(query_cuts)), strict=True):
        _rows_to_file(root / "queries" / name, part, "query")
    for i, (name, part) in enumerate(zip(qrel_files, _split(list(qrels), list(qrel_cuts)), strict=True)):
        _qrels_to_file(root / "qrels" / "train" / name, part, header=i not in headerless)
    (root / "corpus" / "_SUCCESS").write_text("")  # ignored: starts with "_"
    return str(root)


def make_single(root: Path) -> str:
    return make_beir(root, corpus=DOCS, queries=QUERIES,
                     qrels=[QRELS_HEADER] + [f"{q}\t{d}\t{s}" for q, d, s in QRELS])


SKIP = IngestConfig(on_duplicate_id="skip")


def test_folder_layout_reads_like_one_file(tmp_path):
    one = read_beir(make_single(tmp_path / "one"), "train", SKIP)
    many = read_beir(make_multi(tmp_path / "many"), "train", SKIP)
    assert many.corpus.equals(one.corpus) and many.queries.equals(one.queries) and many.qrels.equals(one.qrels)
    skips = {k: v for k, v in one.report.counts.items() if k != "qrels_files_without_header"}
    assert {k: v for k, v in many.report.counts.items() if k != "qrels_files_without_header"} == skips
    assert many.report.counts["qrels_files_without_header"] == 1


def test_duplicate_across_files_names_both_files(tmp_path):
    root = make_multi(tmp_path, docs=[{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"_id": "d1", "text": "c"}],
                      doc_files=("p0.jsonl", "p1.jsonl"), doc_cuts=(2,))
    with pytest.raises(IngestError, match=r"corpus/p1.jsonl:1: \[duplicate_id\] doc id 'd1' already defined at "
                                          r".*corpus/p0.jsonl:1"):
        read_beir(root, "train")


def test_table_files_layouts(tmp_path):
    root = Path(make_multi(tmp_path))
    assert [Path(f).name for f in table_files(str(root), "corpus")] == ["a-000.jsonl", "a-001.jsonl.gz", "a-002.parquet"]
    assert [Path(f).name for f in table_files(str(root), "qrels", "train")] == ["000.tsv", "001.tsv"]
    assert table_files(str(root), "qrels", "test") == []
    # a single file wins over a folder; a `corpus.parquet` folder is read as its parts
    _rows_to_file(root / "corpus.jsonl", DOCS[:2], "doc")
    assert [Path(f).name for f in table_files(str(root), "corpus")] == ["corpus.jsonl"]
    (root / "corpus.jsonl").unlink()
    _rows_to_file(root / "corpus.parquet" / "part-1.parquet", DOCS[:2], "doc")
    assert [Path(f).name for f in table_files(str(root), "corpus")] == ["part-1.parquet"]


def test_twins_block_compares_text_not_only_hash():
    """A forced hash collision (equal TEXT_HASH, different texts) never makes twins; lists sorted by id."""
    t = pa.table({C.DOC_ID: ["b", "a", "c", "d"], C.PASSAGE: ["X  y", "x Y", "other", "solo"],
                  C.TEXT_HASH: pa.array([7, 7, 7, 9], pa.int64())})
    out = twins_block(t).to_pylist()
    assert {r[C.DOC_ID]: r["_twins"] for r in out} == {"a": ["b"], "b": ["a"], "c": [], "d": []}
    assert text_hash("X  y") == text_hash("x Y") != text_hash("x y z")


def test_twin_lists_are_bounded_for_a_large_identical_cluster():
    """m identical passages: each lists at most max_twins others (the first by id, never itself) and counts the
    rest, instead of m - 1 each (m² ids in all); without a bound every other member is listed."""
    m, cap = 50, 4
    ids = [f"d{i:03d}" for i in range(m)]
    t = pa.table({C.DOC_ID: ids[::-1], C.PASSAGE: ["page not found"] * m, C.TEXT_HASH: pa.array([5] * m, pa.int64())})
    out = {r[C.DOC_ID]: r for r in twins_block(t, max_twins=cap).to_pylist()}
    assert out["d000"]["_twins"] == ids[1 : cap + 1] and out["d049"]["_twins"] == ids[:cap]
    assert out["d002"]["_twins"] == ["d000", "d001", "d003", "d004"]
    assert all(len(r["_twins"]) == cap and r["_twins_cut"] == m - 1 - cap for r in out.values())
    full = {r[C.DOC_ID]: r for r in twins_block(t).to_pylist()}
    assert all(r["_twins"] == [d for d in ids if d != k] and r["_twins_cut"] == 0 for k, r in full.items())


def test_ingest_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(IngestError("f.jsonl", 3, "json", "bad")))
    assert isinstance(e, IngestError) and str(e) == "f.jsonl:3: [json] bad" and e.line == 3


# ------------------------------------------------------------------------------------------------
def _stage(data: str, out: Path, cfg: IngestConfig = SKIP) -> dict:
    return ingest_stage(dataclasses.replace(cfg, data=data), Layout(str(out)))


def _table(uri: str, key: str) -> list[dict]:
    return pads.dataset(uri, format="parquet").to_table().sort_by([(key, "ascending")]).to_pylist()


def _outputs(out: Path) -> dict[str, list[dict]]:
    lay = Layout(str(out))
    qrels = sorted(pads.dataset(lay.qrels, format="parquet").to_table().to_pylist(),
                   key=lambda r: (r[C.QUERY_ID], r[C.DOC_ID], r[C.SCORE]))
    return {"corpus": _table(lay.corpus, C.DOC_ID), "train_queries": _table(lay.train_queries, C.QUERY_ID),
            "train_dropped": _table(lay.train_dropped, C.QUERY_ID), "qrels": qrels}


@pytest.fixture(scope="module")
def stage_runs(ray_local, tmp_path_factory):
    """The same rows ingested from one file per table, from folders of files, and split differently again
    (other cuts, rows shuffled where the order has no meaning, other partitions and block sizes, and the
    distributed join where the others join in one task)."""
    root = tmp_path_factory.mktemp("stage")
    runs = {}
    runs["one"] = (_stage(make_single(root / "one"), root / "out_one"), _outputs(root / "out_one"))
    runs["many"] = (_stage(make_multi(root / "many"), root / "out_many"), _outputs(root / "out_many"))
    # shuffle the corpus and queries, keeping each duplicated id's definitions in their order
    rng = random.Random(3)

    def shuffled(rows):
        order = list(range(len(rows)))
        rng.shuffle(order)
        out = [rows[i] for i in order]
        for rid in {r["_id"] for r in rows}:
            slots = [k for k, r in enumerate(out) if r["_id"] == rid]
            for k, r in zip(slots, [r for r in rows if r["_id"] == rid], strict=True):
                out[k] = r
        return out

    data = make_multi(root / "other", docs=shuffled(DOCS), queries=shuffled(QUERIES),
                      doc_files=("x0.parquet", "x1.jsonl", "x2.jsonl.gz", "x3.jsonl", "x4.jsonl"), doc_cuts=(1, 4, 9, 10),
                      query_files=("q.jsonl.gz",), query_cuts=(), qrel_files=("a.tsv", "b.tsv.gz", "c.parquet"),
                      qrel_cuts=(1, 9), headerless=())
    import os

    os.environ["RAYMINE_LOCAL_JOIN_BYTES"] = "0"  # "other" also takes Ray Data's distributed qrels joins
    try:
        runs["other"] = (_stage(data, root / "out_other", dataclasses.replace(SKIP, partitions=3, rows_per_block=1)),
                         _outputs(root / "out_other"))
    finally:
        del os.environ["RAYMINE_LOCAL_JOIN_BYTES"]
    runs["reference"] = read_beir(str(root / "one"), "train", SKIP)
    runs["root"] = root
    return runs


def test_stage_matches_the_in_process_reference(stage_runs):
    manifest, out = stage_runs["one"]
    ref = stage_runs["reference"]
    queries, dropped = ref.split_queries()
    twins = identical_text_groups(ref.corpus)
    expected = positives_table(queries, ref.positives(), twins)
    corpus = ref.corpus.to_pylist()
    for r in corpus:
        r[C.PASSAGE] = passage_text(r[C.TITLE], r[C.TEXT])
        r[C.TEXT_HASH] = text_hash(r[C.PASSAGE])
    assert out["corpus"] == sorted(corpus, key=lambda r: r[C.DOC_ID])
    # positives keep qrels order and count a repeated (query, doc) once; the reference repeats it
    exp_q = sorted(expected.to_pylist(), key=lambda r: r[C.QUERY_ID])
    for r in exp_q:
        r[C.POSITIVE_IDS] = list(dict.fromkeys(r[C.POSITIVE_IDS]))
    assert out["train_queries"] == exp_q
    assert out["train_dropped"] == sorted(dropped.to_pylist(), key=lambda r: r[C.QUERY_ID])
    assert out["qrels"] == sorted(ref.qrels.to_pylist(), key=lambda r: (r[C.QUERY_ID], r[C.DOC_ID], r[C.SCORE]))
    # worked out by hand
    rows = {r[C.QUERY_ID]: r for r in out["train_queries"]}
    assert rows["q1"][C.EXCLUDED_IDS] == ["d3", "d6"] and rows["q3"][C.POSITIVE_IDS] == ["d7", "d1"]
    assert rows["q8"][C.POSITIVE_IDS] == ["d6", "d9"] and rows["q8"][C.EXCLUDED_IDS] == ["d1", "d10", "d3"]
    assert {r[C.QUERY_ID]: r[C.REASON] for r in out["train_dropped"]} == {
        "ghost": UNKNOWN_QUERY, "q7": EMPTY_QUERY, "q4": NO_POSITIVE, "q5": NO_POSITIVE}
    c = manifest["counts"]
    for k, v in ref.report.counts.items():
        assert c[k] == v, k
    assert (c["docs"], c["train_queries"], c["train_queries_dropped"], c["docs_with_identical_text"],
            c["queries_with_excluded_twins"]) == (10, 5, 4, 5, 3)
    assert {r[C.DOC_ID]: r[C.TEXT] for r in out["corpus"]}["d2"] == "dogs bark"  # the first d2


def test_many_files_equal_one_file(stage_runs):
    assert stage_runs["many"][1] == stage_runs["one"][1]
    assert stage_runs["other"][1] == stage_runs["one"][1]


def test_counts_summed_across_files(stage_runs):
    one, many, other = (stage_runs[k][0]["counts"] for k in ("one", "many", "other"))
    ignore = {"qrels_files_without_header"}
    assert {k: v for k, v in many.items() if k not in ignore} == {k: v for k, v in one.items() if k not in ignore}
    assert {k: v for k, v in other.items() if k not in ignore} == {k: v for k, v in one.items() if k not in ignore}
    assert many["qrels_files_without_header"] == 1 and "qrels_files_without_header" not in other
    files = stage_runs["many"][0]["files"]
    corpus = {k: v for k, v in files.items() if "/corpus/" in k}
    assert [v["rows"] for _, v in sorted(corpus.items())] == [5, 6, 2]
    assert sum(v["kept"] for v in corpus.values()) == one["docs_read"] == 10
    assert sum(v["duplicate_ids"] for v in corpus.values()) == one["skipped_duplicate_doc_id"] == 2
    assert sum(v["blank"] for v in corpus.values()) == one["skipped_empty_doc_text"] == 1
    qrels = {k: v for k, v in files.items() if "/qrels/" in k}
    assert sum(v["rows"] for v in qrels.values()) == one["qrels_read"] == len(QRELS)
    assert sum(v["kept"] for v in qrels.values()) == one["qrels_kept"]
    m = stage_runs["many"][0]
    assert any("a-001.jsonl.gz:" in s for s in m["report"]["samples"]["duplicate_doc_id"])


def test_stage_errors_name_file_and_line(ray_local, tmp_path):
    docs = [*DOCS[:7], b'{"_id": "d99", "text": "truncated']
    root = make_multi(tmp_path / "bad", docs=docs, doc_files=("p0.jsonl", "p1.jsonl"), doc_cuts=(5,))
    with pytest.raises(IngestError, match=r"corpus/p1.jsonl:3: \[json\] not a JSON object") as e:
        _stage(root, tmp_path / "out")
    assert e.value.line == 3 and "Ray" not in str(e.value)
    docs = [r for i, r in enumerate(DOCS) if i != 8]  # one duplicate only (d2): which one raises is then fixed
    root = make_multi(tmp_path / "dup", docs=docs, doc_files=("p0.jsonl", "p1.parquet"), doc_cuts=(4,))
    with pytest.raises(IngestError, match=r"corpus/p1.parquet:2: \[duplicate_id\] doc id 'd2' already defined at "
                                          r".*corpus/p0.jsonl:2"):
        _stage(root, tmp_path / "out", IngestConfig())
    qrels = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d7", 1), ("q2", "nodoc", 1)]  # one unknown id only
    root = make_multi(tmp_path / "unk", qrels=qrels, qrel_files=("a.tsv", "b.tsv"), qrel_cuts=(2,), headerless=())
    with pytest.raises(IngestError, match=r"qrels/train/b.tsv:3: \[unknown_id\] qrel names unknown doc 'nodoc'"):
        _stage(root, tmp_path / "out", dataclasses.replace(SKIP, on_unknown_qrel="error"))


@pytest.mark.parametrize("case", ["empty_corpus", "blank_corpus", "no_queries", "no_qrels", "no_positive"])
def test_degenerate_inputs_are_clear_errors(ray_local, tmp_path, case):
    kw: dict = {}
    rule = {"empty_corpus": "empty_corpus", "blank_corpus": "empty_corpus", "no_queries": "no_queries",
            "no_qrels": "no_qrels", "no_positive": "no_train_queries"}[case]
    if case == "empty_corpus":
        kw["corpus"] = []
    elif case == "blank_corpus":
        kw["corpus"] = [{"_id": "d1", "text": " "}, {"_id": "d2", "title": "", "text": "\t"}]
    elif case == "no_queries":
        kw["queries"] = [{"_id": "q1", "text": ""}]
    elif case == "no_qrels":
        kw["qrels"] = [QRELS_HEADER, "q1\tnodoc\t1", "ghost\td1\t1"]
    else:
        kw["qrels"] = [QRELS_HEADER, "q1\td1\t0", "q2\td2\t0"]
    root = make_beir(tmp_path / "in", **kw)
    with pytest.raises(IngestError, match=rf"{re.escape(root)}: \[{rule}\]") as e:
        _stage(root, tmp_path / "out")
    msg = str(e.value)
    if case == "blank_corpus":
        assert "2 rows read" in msg and "empty_doc_text: 2" in msg
    if case == "no_qrels":
        assert "2 rows read" in msg and "qrel_unknown_doc: 1" in msg and "qrel_unknown_query: 1" in msg
    if case == "no_positive":
        assert "no_positive" in msg


def test_stage_skips_rerun_and_notices_changed_input(ray_local, tmp_path):
    root = make_beir(tmp_path / "in", qrels=[QRELS_HEADER, "q1\td1\t1", "q2\td2\t0"])
    m1 = _stage(root, tmp_path / "out", IngestConfig())
    assert m1["counts"]["train_queries"] == 1 and m1["counts"]["train_queries_dropped"] == 1
    t = pads.dataset(Layout(str(tmp_path / "out")).train_queries, format="parquet").to_table()
    assert t.column(C.POSITIVE_IDS).to_pylist() == [["d1"]]
    m2 = _stage(root, tmp_path / "out", IngestConfig(partitions=2))  # a knob of how, not what: still done
    assert m2["finished_at"] == m1["finished_at"]
    fp = input_fingerprint(root)
    qrels = Path(root) / "qrels" / "train.tsv"
    qrels.write_text(QRELS_HEADER + "\nq1\td1\t1\nq2\td2\t1\n")  # a corrected file at the same path
    assert input_fingerprint(root) != fp
    m3 = _stage(root, tmp_path / "out", IngestConfig())
    assert m3["key"] != m1["key"] and m3["counts"]["train_queries"] == 2


def test_max_queries_takes_the_first_by_id(ray_local, tmp_path):
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in (3, 1, 10, 2)]
    qrels = [QRELS_HEADER] + [f"q{i}\td{1 + i % 3}\t1" for i in (3, 1, 10, 2)]
    root = make_beir(tmp_path / "in", queries=queries, qrels=qrels)
    m = _stage(root, tmp_path / "out", IngestConfig(max_queries=2))
    got = _table(Layout(str(tmp_path / "out")).train_queries, C.QUERY_ID)
    assert [r[C.QUERY_ID] for r in got] == ["q1", "q10"]  # string order
    assert m["counts"]["train_queries"] == 2 and m["counts"]["queries_limited_to"] == 2


def test_sort_by_length_longest_first_ties_by_id():
    from raymine.ingest import CORPUS_SCHEMA, sort_by_length

    rows = [("d3", "ab"), ("d1", "abc"), ("d2", "éé"), ("d0", "a"), ("d9", "xyz")]  # "éé": 2 characters, 4 bytes
    t = pa.table({C.DOC_ID: [r[0] for r in rows], C.TITLE: [""] * 5, C.TEXT: [r[1] for r in rows],
                  C.PASSAGE: [r[1] for r in rows], C.TEXT_HASH: [0] * 5}, schema=CORPUS_SCHEMA)
    out = sort_by_length(t)
    assert out.column(C.DOC_ID).to_pylist() == ["d1", "d9", "d2", "d3", "d0"]
    assert out.schema == CORPUS_SCHEMA


def test_corpus_parts_are_written_longest_passage_first(stage_runs):
    """Every corpus part (one partition, and three) is in embedding order: passage length in characters
    descending, ties by doc id — the same rows as before, in that order."""
    for out in ("out_one", "out_other"):
        files = sorted(Path(Layout(str(stage_runs["root"] / out)).corpus).glob("*.parquet"))
        assert files
        for f in files:
            t = pq.read_table(f)
            keys = [(-len(p), d) for p, d in zip(t.column(C.PASSAGE).to_pylist(), t.column(C.DOC_ID).to_pylist(),
                                                  strict=True)]
            assert keys == sorted(keys), f
    one = pq.read_table(next(Path(Layout(str(stage_runs["root"] / "out_one")).corpus).glob("*.parquet")))
    assert one.num_rows == 10 and one.column(C.DOC_ID).to_pylist() != sorted(one.column(C.DOC_ID).to_pylist())


def test_summaries_fold_per_file_in_the_write_tasks():
    """What a write task returns for its blocks: one row per input file (and per drop reason), counts summed,
    first lines the minimum — so the driver gets rows per (task, file), not per block."""
    from raymine.ingest import _FILE, _LINE, _fold_summaries

    blocks = [{_FILE: 0, f"{_LINE}_count": 5, "n_dup_sum": 1, "at_dup_min": 7},
              {_FILE: 1, f"{_LINE}_count": 2, "n_dup_sum": 0, "at_dup_min": None},
              {_FILE: 0, f"{_LINE}_count": 4, "n_dup_sum": 2, "at_dup_min": 3}]
    assert sorted(_fold_summaries(blocks), key=lambda r: r[_FILE]) == [
        {_FILE: 0, f"{_LINE}_count": 9, "n_dup_sum": 3, "at_dup_min": 3},
        {_FILE: 1, f"{_LINE}_count": 2, "n_dup_sum": 0}]
    reasons = [{"reason": "", "_excl_count": 3, "_excl_sum": 1}, {"reason": "no_positive", "_excl_count": 2,
               "_excl_sum": 0}, {"reason": "", "_excl_count": 1, "_excl_sum": 1}]
    assert {r["reason"]: r["_excl_count"] for r in _fold_summaries(reasons)} == {"": 4, "no_positive": 2}
    assert _fold_summaries([{"n": 2}, {"n": 3}]) == [{"n": 5}]


def test_partitions_sized_from_one_listing_of_the_input(tmp_path):
    """Ingest's shuffle partitions come from the input's size, taken from one listing of the data folder (not
    a call per input file): the same bytes as the files' own sizes; one partition per 64 MiB, at least 1."""
    from raymine import storage
    from raymine.ingest import _input_files, _partitions

    data = Path(__file__).resolve().parents[1] / "data" / "scifact"
    cfg = IngestConfig(data=str(data))
    files = _input_files(cfg.data, "train")
    size = sum((data / storage.relative(u, cfg.data)).stat().st_size for fs in files.values() for u in fs)
    assert _partitions(cfg, files) == max(1, size // (64 << 20)) == 1
    assert _partitions(dataclasses.replace(cfg, partitions=7), files) == 7
