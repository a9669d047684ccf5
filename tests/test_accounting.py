"""Accounting: every input query of the split ends up exactly once, either mined or dropped with a reason.

A hand-made BEIR folder holds one query for each row of the bad-input table (ingest module
docstring) and for each mining drop reason; it goes through ingest → BM25 search → mine, and the
union of the mined table and both dropped tables must be the split's query ids, each exactly once,
each with the reason worked out by hand below.
"""
from __future__ import annotations

import dataclasses
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
    dropped_mine = pq.read_table(mm["dropped"])  # parts written by the mining tasks
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


# ------------------------------------------------------------------------------------------------
# Mining off the driver (issue 26): the tasks write the dropped rows; the driver sums counts
# ------------------------------------------------------------------------------------------------
def _plan(i: int) -> str:
    """What mining must make of synthetic query i (before the validation hold-out)."""
    return {0: "unknown_query", 1: "no_positive_score", 2: "no_negatives"}.get(i % 10, "mined")


def synthetic_candidates(folder: Path, n: int, name: str = "A", files: int = 3, dup: int | None = None) -> tuple[str, str]:
    """A search-stage table for ``n`` queries (``files`` Parquet files) and the queries table; returns both paths.

    Query i has the positive ``p{i}`` (score 0.8: PercPos 0.95 ceiling 0.76), two candidates over the ceiling,
    then ``n1-i``, ``n2-i``, ``n3-i`` below it; ABOVE_CEILING = i % 5. ``_plan(i)`` says which queries lack
    their text (unknown), their positive score, or every candidate below the ceiling. ``dup``: that query's
    row is repeated in the last file (a damaged table)."""
    rows = []
    for i in range(n):
        q, plan = f"q{i:05d}", _plan(i)
        below = [] if plan == "no_negatives" else [f"n{j}-{i}" for j in (1, 2, 3)]
        rows.append({C.QUERY_ID: q, C.POSITIVE_IDS: [f"p{i}"], C.POSITIVE_SCORES: [] if plan == "no_positive_score" else [0.8],
                     C.EXCLUDED_IDS: [], C.CANDIDATE_IDS: [f"a-{i}", f"p{i}", f"b-{i}", *below],
                     C.CANDIDATE_SCORES: [0.9, 0.8, 0.77, 0.5, 0.4, 0.3][: 3 + len(below)], C.CEILING: 0.76,
                     C.ABOVE_CEILING: i % 5, C.TEACHER: name})
    if dup is not None:
        rows.append(rows[dup])
    schema = pa.schema([(C.QUERY_ID, pa.string()), (C.POSITIVE_IDS, pa.list_(pa.string())),
                        (C.POSITIVE_SCORES, pa.list_(pa.float32())), (C.EXCLUDED_IDS, pa.list_(pa.string())),
                        (C.CANDIDATE_IDS, pa.list_(pa.string())), (C.CANDIDATE_SCORES, pa.list_(pa.float32())),
                        (C.CEILING, pa.float32()), (C.ABOVE_CEILING, pa.int64()), (C.TEACHER, pa.string())])
    cand = folder / f"cand_{name}"
    cand.mkdir(parents=True)
    step = -(-len(rows) // files)
    for k in range(files):
        pq.write_table(pa.Table.from_pylist(rows[k * step:(k + 1) * step], schema), cand / f"part-{k:05d}.parquet")
    known = [f"q{i:05d}" for i in range(n) if _plan(i) != "unknown_query"]
    pq.write_table(pa.table({C.QUERY_ID: known, C.TEXT: [f"text of {q}" for q in known]}), folder / "queries.parquet")
    return str(cand), str(folder / "queries.parquet")


MINE_SYN = MineConfig(method="percpos", perc=0.95, num_negatives=2, sampling="top", batch_size=64, join_partitions=2)


def test_mining_tasks_write_the_dropped_rows_and_every_query_is_accounted(ray_local, tmp_path):
    """300 queries in ~5 batches, a validation hold-out on top: the dropped rows are parts written by the
    mining tasks (one per batch with a drop), mined ∪ dropped ids == the input ids, disjoint, each with the
    reason worked out from the data; the counts the driver summed agree with the tables on disk."""
    from raymine.mine import mine_stage
    from raymine.validation import holdout_mask

    n = 300
    cand, queries = synthetic_candidates(tmp_path, n)
    man = mine_stage({"A": cand}, queries, MINE_SYN, str(tmp_path / "mine"), holdout=(7, 0.2))

    ids = [f"q{i:05d}" for i in range(n)]
    held = dict(zip(ids, holdout_mask(ids, 7, 0.2), strict=True))
    want = {q: "held_out_for_validation" if held[q] else _plan(i) for i, q in enumerate(ids)}
    assert 30 < sum(held.values()) < 90 and set(want.values()) == {
        "held_out_for_validation", "unknown_query", "no_positive_score", "no_negatives", "mined"}

    folder = tmp_path / "mine" / "dropped"
    assert man["dropped"] == str(folder) and not (tmp_path / "mine" / "dropped.parquet").exists()
    files = sorted(folder.glob("*.parquet"))
    assert len(files) >= 2 and all(f.name.startswith("part-h") for f in files)  # one part per task batch
    dropped = pq.read_table(folder)
    mined = pq.read_table(tmp_path / "mine" / "mined")
    got = {q: "mined" for q in mined[C.QUERY_ID].to_pylist()}
    for q, r in zip(dropped[C.QUERY_ID].to_pylist(), dropped[C.REASON].to_pylist(), strict=True):
        assert q not in got, f"{q} is both mined and dropped, or dropped twice"
        got[q] = r
    assert mined.num_rows + dropped.num_rows == n and got == want
    assert all(r[C.NEGATIVE_IDS] == [f"n1-{int(r[C.QUERY_ID][1:])}", f"n2-{int(r[C.QUERY_ID][1:])}"]
               for r in mined.to_pylist())
    # counts (what the driver holds) agree with the rows on disk, part by part
    reasons = {r: list(want.values()).count(r) for r in set(want.values()) - {"mined"}}
    assert man["report"]["dropped_reasons"] == reasons
    c = man["counts"]
    assert (c["queries_out"], c["mined"], c["dropped"]) == (n, mined.num_rows, dropped.num_rows)
    listed = {k: v["rows"] for k, v in man["parts"].items() if k.startswith("dropped/")}
    assert listed == {f"dropped/{f.name}": pq.ParquetFile(f).metadata.num_rows for f in files}
    # the above-ceiling counts (i % 5 over the 300 queries) come through the tasks' histograms
    a = man["report"]["per_teacher"]["A"]
    assert (a["above_ceiling"], a["above_ceiling_queries"], a["above_ceiling_median"]) == (600, 300, 2.0)


def test_every_query_teacher_pair_is_accounted_without_ensembling(ray_local, tmp_path):
    """Two teachers, B with a third of the queries, no ensembling: rows are (query, teacher) pairs; mined ∪
    dropped == the input pairs, disjoint; the dropped table carries the teacher."""
    from raymine.mine import mine_stage

    n = 120
    cand_a, queries = synthetic_candidates(tmp_path / "a", n, "A")
    b = pq.read_table(cand_a)
    (tmp_path / "b").mkdir()
    pq.write_table(b.filter(pa.array([i % 3 == 0 for i in range(n)])), tmp_path / "b" / "part-00000.parquet")
    man = mine_stage({"A": cand_a, "B": str(tmp_path / "b")}, queries, MINE_SYN, str(tmp_path / "mine"),
                     ensemble=False)
    mined = pq.read_table(tmp_path / "mine" / "mined")
    dropped = pq.read_table(man["dropped"])
    assert dropped.column_names == [C.QUERY_ID, C.REASON, C.TEACHER]
    pairs = [(q, t) for t in (mined, dropped) for q, t in zip(t[C.QUERY_ID].to_pylist(), t[C.TEACHER].to_pylist(),
                                                                   strict=True)]
    want = {(f"q{i:05d}", "A") for i in range(n)} | {(f"q{i:05d}", "B") for i in range(0, n, 3)}
    assert len(pairs) == len(set(pairs)) and set(pairs) == want
    plan = {(f"q{i:05d}", t): _plan(i) for i in range(n) for t in "AB"}
    assert all(plan[(q, t)] == r for q, r, t in zip(*(dropped[c].to_pylist() for c in (C.QUERY_ID, C.REASON, C.TEACHER)),
                                                     strict=True))
    assert man["counts"]["queries_out"] == len(want) and man["counts"]["dropped"] == dropped.num_rows


def test_duplicated_query_id_is_refused(ray_local, tmp_path):
    """A candidates table holding one query twice (in two files) repeats an output key: the key check (Ray
    tasks reading the written parts) refuses the run, and no manifest marks it finished."""
    from raymine.mine import mine_stage

    cand, queries = synthetic_candidates(tmp_path, 40, dup=13)
    with pytest.raises(ValueError, match="duplicated query ids"):
        mine_stage({"A": cand}, queries, MINE_SYN, str(tmp_path / "mine"))
    assert not (tmp_path / "mine" / "_manifest.json").exists()


def test_driver_receives_counts_not_queries(ray_local, tmp_path, monkeypatch):
    """Mining N and 4N queries in one batch: the driver receives one summary row of the same byte size and
    keeps state of the same size (sums, a bounded histogram, capped samples, one record per part); only
    the counts grow."""
    from raymine import mine as M

    kept = []

    class Spy(M.Totals):  # the real class; the test only keeps a handle on the instance
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            kept.append(self)

    monkeypatch.setattr(M, "Totals", Spy)
    cfg = dataclasses.replace(MINE_SYN, batch_size=8192, report_sample=64)
    for n in (250, 1000):
        cand, queries = synthetic_candidates(tmp_path / str(n), n, files=1)
        man = M.mine_stage({"A": cand}, queries, cfg, str(tmp_path / str(n) / "mine"))
        assert man["counts"]["queries_out"] == n
    small, large = kept
    assert len(small.parts) == len(large.parts) == 1  # one task batch each
    assert small.received_bytes == large.received_bytes
    assert small.sums["rows"] * 4 == large.sums["rows"]
    for t in (small, large):
        assert len(t.above["A"][0]) == 5  # histogram buckets: the distinct values of i % 5
        assert all(n == 64 for n in t.sampled["A"].values())  # samples capped at report_sample
