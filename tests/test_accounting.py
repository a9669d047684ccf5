"""Accounting: every input query of the split ends up exactly once, either mined or dropped with a reason.

A hand-made BEIR folder holds one query for each row of the bad-input table (ingest module
docstring) and for each mining drop reason; it goes through ingest → BM25 search → mine, and the
union of the mined table and both dropped tables must be the split's query ids, each exactly once,
each with the reason worked out by hand below.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from raymine import columns as C
from raymine.config import IngestConfig, MineConfig, SearchConfig, TeacherConfig

CORPUS = [
    {"_id": "d1", "title": "Pasta", "text": "boil spaghetti in salted water for ten minutes"},
    {"_id": "d2", "title": "Moons", "text": "jupiter and saturn have many moons"},
    {"_id": "d2", "title": "Duplicate", "text": "a second d2: skipped, the first one is kept"},
    {"_id": "d3", "title": "", "text": "penguins live in antarctica"},
    {"_id": "d4", "title": "Bread", "text": "bake bread dough in a hot oven"},
    {"_id": "d5", "title": "Rice", "text": "rice cooks in salted water in twenty minutes"},
    {"_id": "d6", "title": "Tea", "text": "steep green tea leaves in hot water"},
    {"_id": "d7", "title": " ", "text": "   "},  # empty doc: skipped
    {"_id": "d8", "title": "Soup", "text": "simmer the soup with spaghetti and water"},
    {"_id": "d9", "title": "Planets", "text": "mars has two small moons and saturn has rings"},
    {"_id": "d10", "title": "Astronomy", "text": "telescopes show craters, comets, asteroids and the moons of far stars"},
]
QUERIES = [
    {"_id": "q1", "text": "how long to boil spaghetti in water"},
    {"_id": "q2", "text": "which planets have moons"},
    {"_id": "q2", "text": "duplicate q2: skipped, the first text is kept"},
    {"_id": "q3", "text": "zebra stripes"},  # shares no word with any doc: no candidate at all
    {"_id": "q4", "text": "what bakes in an oven"},
    {"_id": "q5", "text": "how to cook rice in water"},
    {"_id": "q6", "text": "how hot should water be for tea"},
    {"_id": "q7", "text": "what is an empty doc"},
    {"_id": "qe", "text": "  "},  # empty query: skipped
    {"_id": "q9", "text": "not in the train qrels: not an input query of the split"},
]
QRELS = [
    ("q1", "d1", 1),
    ("q2", "d2", 1), ("q2", "d9", 1),
    ("q3", "d3", 1),
    ("q4", "d_missing", 1),  # positive missing from the corpus
    ("q5", "d5", 0),  # only a non-positive judgement
    ("q6", "d6", 1), ("q6", "d_gone", 1),  # one positive missing: mined with the other
    ("q7", "d7", 1),  # positive is the skipped empty doc
    ("qe", "d1", 1),  # empty query text
    ("qu", "d1", 1),  # query id not in queries.jsonl
]
EXPECTED = {
    "q1": "mined", "q2": "mined", "q6": "mined",
    "q3": "no_negatives",  # no other doc shares a word with it (BM25 returns only docs scoring > 0)
    "q4": "no_positive", "q5": "no_positive", "q7": "no_positive",
    "qe": "empty_query_text", "qu": "unknown_query",
    "qs": "no_positive_score",  # added after ingest: its positive is not in the searched corpus
}


@pytest.fixture(scope="module")
def bad_beir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_beir")
    (root / "qrels").mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUERIES))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                               + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    return root


def test_every_query_is_mined_or_dropped_with_reason(ray_local, bad_beir, tmp_path):
    from raymine.ingest import ingest_stage
    from raymine.layout import Layout
    from raymine.mine import mine_stage
    from raymine.search import SearchSpec, open_index, search_teacher

    icfg = IngestConfig(data=str(bad_beir), on_duplicate_id="skip", on_empty_text="skip", on_unknown_qrel="skip")
    layout = Layout(str(tmp_path))
    im = ingest_stage(icfg, layout)
    counts = im["counts"]
    assert counts["skipped_duplicate_doc_id"] == 1 and counts["skipped_duplicate_query_id"] == 1
    assert counts["skipped_empty_doc_text"] == 1 and counts["skipped_empty_query_text"] == 1

    queries = pads.dataset(layout.train_queries, format="parquet").to_table()
    # a query whose positive the searched corpus lacks (e.g. embeddings of an older corpus)
    extra = pa.table({C.QUERY_ID: ["qs"], C.TEXT: ["spaghetti water moons"], C.POSITIVE_IDS: [["d_stale"]],
                      C.EXCLUDED_IDS: [[]]}, schema=queries.schema)
    queries = pa.concat_tables([queries, extra]).sort_by(C.QUERY_ID)
    queries_uri = str(tmp_path / "queries_plus.parquet")
    pq.write_table(queries, queries_uri)
    assert dict(zip(queries[C.QUERY_ID].to_pylist(), queries[C.TEXT].to_pylist(), strict=True))["q2"] == QUERIES[1]["text"]

    mine = MineConfig(method="percpos", num_negatives=2, sampling="top", join_partitions=2)
    scfg = SearchConfig(search_tasks=1)
    spec = SearchSpec("bm25", queries_uri, None, str(tmp_path / "search"), mine, scfg, 64)
    with open_index(TeacherConfig(kind="bm25"), scfg, layout.corpus, None) as index:
        sm = search_teacher(index, spec, im["key"], dense=False)
    assert sm["counts"]["positives_not_found"] == 1 and sm["counts"]["queries"] == queries.num_rows
    mm = mine_stage({"bm25": str(tmp_path / "search")}, queries_uri, mine, str(tmp_path / "mine"))

    mined = pads.dataset(str(tmp_path / "mine" / "mined"), format="parquet").to_table()
    dropped_ingest = pads.dataset(layout.train_dropped, format="parquet").to_table()
    dropped_mine = pq.read_table(tmp_path / "mine" / "dropped.parquet")
    seen: list[tuple[str, str]] = [(q, "mined") for q in mined[C.QUERY_ID].to_pylist()]
    for t in (dropped_ingest, dropped_mine):
        seen += list(zip(t[C.QUERY_ID].to_pylist(), t[C.REASON].to_pylist(), strict=True))
    ids = [q for q, _ in seen]
    assert len(ids) == len(set(ids)), f"a query is accounted twice: {sorted(seen)}"
    assert dict(seen) == EXPECTED
    # the split's input queries are exactly the qrels' query ids (+ the added one): nothing lost, nothing extra
    assert set(ids) == {q for q, _, _ in QRELS} | {"qs"}
    assert mm["counts"]["mined"] == 3 and mm["counts"]["dropped"] == 2
    # mined rows: negatives never a positive, never a skipped doc; q6 keeps its one remaining positive
    rows = {r[C.QUERY_ID]: r for r in mined.to_pylist()}
    assert rows["q6"][C.POSITIVE_IDS] == ["d6"]
    assert sorted(rows["q2"][C.POSITIVE_IDS]) == ["d2", "d9"]
    for r in rows.values():
        assert r[C.NEGATIVE_IDS], r
        assert not set(r[C.NEGATIVE_IDS]) & set(r[C.POSITIVE_IDS])
        assert "d7" not in r[C.NEGATIVE_IDS]
        assert r[C.NUM_SHORT] == 2 - len(r[C.NEGATIVE_IDS])
