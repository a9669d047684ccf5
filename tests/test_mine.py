"""Mining stage: pure batch function (hand-computed, batching-independent) and the Ray stage end to end."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine import columns as C
from raymine import mine as M
from raymine.config import MineConfig

CFG = dataclasses.replace(MineConfig(), method="percpos", perc=0.95, num_negatives=2, sampling="top",
                          ensemble="intra_sample_no_dedup", batch_size=2, join_partitions=2)
F32 = pa.list_(pa.float32())
STR = pa.list_(pa.string())


def cand_table(rows, teacher, above=None):
    """rows: (qid, pos_ids, pos_scores, excluded, cand_ids, cand_scores); ``above``: the search's
    ABOVE_CEILING per row (None: a table written before that column existed)."""
    cols = list(zip(*rows, strict=False))
    extra = {} if above is None else {C.ABOVE_CEILING: pa.array(above, pa.int64())}
    return pa.table({**extra,
        C.QUERY_ID: pa.array(cols[0], pa.string()), C.POSITIVE_IDS: pa.array(cols[1], STR),
        C.POSITIVE_SCORES: pa.array(cols[2], F32), C.EXCLUDED_IDS: pa.array(cols[3], STR),
        C.CANDIDATE_IDS: pa.array(cols[4], STR), C.CANDIDATE_SCORES: pa.array(cols[5], F32),
        C.CEILING: pa.array([0.0] * len(rows), pa.float32()), C.TEACHER: pa.array([teacher] * len(rows)),
    })


# Teacher A, percpos 0.95 with the min positive:
#  q1 anchor 0.8 -> ceiling 0.76: d1,d2 positives, d4 excluded, d3 (0.78) over the ceiling -> d5, d6
#  q2 anchor -0.2 -> sign-safe ceiling -0.21: d7 positive, d8 (-0.1) above -> d9 only (short by 1)
#  q3 no positive score; q5 unknown to the queries table
A = cand_table([
    ("q1", ["d1", "d2"], [0.9, 0.8], ["d4"], ["d1", "d2", "d3", "d4", "d5", "d6"], [0.9, 0.8, 0.78, 0.7, 0.6, 0.5]),
    ("q2", ["d7"], [-0.2], [], ["d8", "d7", "d9"], [-0.1, -0.2, -0.3]),
    ("q3", ["d1"], [], [], ["d2", "d4"], [0.5, 0.4]),
    ("q5", ["d2"], [0.9], [], ["d1"], [0.5]),
], "A", above=[7, 1, 0, 3])  # A's search also removed docs at/over its ceilings (counted there)
# Teacher B: q1 anchor 0.5 -> ceiling 0.475 -> d6, d3 (then d10); q3 only its positive -> no negatives;
# q4 only in B -> d5, d6
B = cand_table([
    ("q1", ["d1", "d2"], [0.5, 0.6], [], ["d2", "d6", "d3", "d10"], [0.6, 0.47, 0.46, 0.1]),
    ("q3", ["d1"], [0.7], [], ["d1"], [0.7]),
    ("q4", ["d2"], [0.9], [], ["d5", "d6"], [0.5, 0.4]),
], "B")
QUERIES = pa.table({C.QUERY_ID: ["q1", "q2", "q3", "q4", "q9"], C.TEXT: ["one", "two", "three", "four", "nine"]})
CORPUS = pa.table({C.DOC_ID: [f"d{i}" for i in range(1, 11)],
                   C.TITLE: ["T1", "", "T3", "", "T5", "", "", "", "", ""],
                   C.TEXT: [f"text {i}" for i in range(1, 11)]})


def joined(teachers=("A", "B"), full=None):
    """Reference join in plain Python (what the Ray stage builds with Dataset.join)."""
    tabs = {"A": A, "B": B}
    rows: dict[str, dict] = {}
    for t in teachers:
        for r in tabs[t].to_pylist():
            rows.setdefault(r[C.QUERY_ID], {}).update({f"{c}@{t}": r[c] for c in (*M._IN_COLS, C.ABOVE_CEILING)
                                                      if c in r})
    text = dict(zip(QUERIES[C.QUERY_ID].to_pylist(), QUERIES[C.TEXT].to_pylist(), strict=False))
    fp = {} if full is None else {k: sorted(v) for k, v in full.items()}
    qids = sorted(rows)
    cols = {C.QUERY_ID: pa.array(qids, pa.string()), C.QUERY: pa.array([text.get(q) for q in qids], pa.string())}
    for t in teachers:
        for c in M._IN_COLS:
            typ = F32 if c in (C.POSITIVE_SCORES, C.CANDIDATE_SCORES) else STR
            cols[f"{c}@{t}"] = pa.array([rows[q].get(f"{c}@{t}") for q in qids], typ)
        if C.ABOVE_CEILING in tabs[t].column_names:
            cols[f"{C.ABOVE_CEILING}@{t}"] = pa.array([rows[q].get(f"{C.ABOVE_CEILING}@{t}") for q in qids],
                                                     pa.int64())
    if full is not None:
        cols[M._FULL_POS] = pa.array([fp.get(q) for q in qids], STR)
    return pa.table(cols)


def by_qid(table, teacher=None):
    rows = table.to_pylist()
    return {(r[C.QUERY_ID] if teacher is None else (r[C.QUERY_ID], r[C.TEACHER])): r for r in rows}


def test_passage_text():
    assert M.passage_text("Title", "body") == "Title body"
    assert M.passage_text("", "body") == "body" and M.passage_text(None, "body") == "body"
    assert M.passage_text("  ", "body") == "body"


def test_mine_batch_hand_computed_ensemble_and_batching():
    j = joined(full={"q1": ["d1", "d2", "d5"]})
    whole = M.mine_batch(j, CFG, ["A", "B"], ensemble=True)
    r = by_qid(whole)
    assert set(r) == {"q1", "q2", "q3", "q4", "q5"}
    assert r["q1"][C.NEGATIVE_IDS] == ["d5", "d6"] and r["q1"][C.TEACHER] == "A+B"  # A's top-1, B's top-1
    np.testing.assert_allclose(r["q1"][C.NEGATIVE_SCORES], [0.6, 0.47], rtol=1e-6)
    np.testing.assert_allclose(r["q1"][C.POSITIVE_SCORES], [0.9, 0.8], rtol=1e-6)  # first contributing teacher
    assert r["q2"][C.NEGATIVE_IDS] == ["d9"] and r["q2"][C.NUM_SHORT] == 1 and r["q2"][C.TEACHER] == "A"
    assert r["q3"]["_reason"] == "no_negatives"
    assert r["q4"][C.NEGATIVE_IDS] == ["d5", "d6"] and r["q4"][C.TEACHER] == "B" and r["q4"][C.NUM_SHORT] == 0
    assert r["q5"]["_reason"] == "unknown_query"
    assert r["q1"]["_known_fn"] == 1 and r["q1"][C.METHOD] == "percpos(0.95)/top"
    # teacher A's counts, summed over rows
    sums = {s: sum(x[f"_{s}@A"] for x in r.values()) for s in M._STATS}
    assert sums == {"present": 4, "no_positive_score": 1, "seen": 10, "drop_positive": 3, "drop_excluded": 1,
                    "drop_method": 2, "kept": 4, "requested": 6, "delivered": 4, "known_fn": 1}
    assert sorted(sum((x["_hist_dropped@A"] for x in r.values()), [])) == pytest.approx([-0.1, 0.78])
    # the search's above-ceiling counts pass through per query (A has the column, B's table predates it)
    assert {q: x["_above_ceiling@A"] for q, x in r.items() if x["_above_ceiling@A"] is not None} == {
        "q1": 7, "q2": 1, "q3": 0, "q5": 3}
    assert all(x["_above_ceiling@B"] is None for x in r.values())
    # any batching gives the same rows
    for size in (1, 2, 3):
        parts = pa.concat_tables([M.mine_batch(j.slice(i, size), CFG, ["A", "B"], True)
                                  for i in range(0, j.num_rows, size)])
        assert by_qid(parts) == r


def test_mine_batch_per_teacher_and_dedup():
    j = joined()
    per = by_qid(M.mine_batch(j, CFG, ["A", "B"], ensemble=False), teacher=True)
    assert set(per) == {("q1", "A"), ("q1", "B"), ("q2", "A"), ("q3", "A"), ("q3", "B"), ("q4", "B"), ("q5", "A")}
    assert per[("q1", "B")][C.NEGATIVE_IDS] == ["d6", "d3"] and per[("q1", "A")][C.NEGATIVE_IDS] == ["d5", "d6"]
    assert per[("q3", "A")]["_reason"] == "no_positive_score" and per[("q3", "B")]["_reason"] == "no_negatives"
    # 3 negatives, dedup: A d5, B d6, A's next unique (d6 taken, none left) -> B's d3; no-dedup: A d5 B d6 A d6
    c3 = dataclasses.replace(CFG, num_negatives=3)
    dd = by_qid(M.mine_batch(j, dataclasses.replace(c3, ensemble="intra_sample_dedup"), ["A", "B"], True))
    nd = by_qid(M.mine_batch(j, c3, ["A", "B"], True))
    assert dd["q1"][C.NEGATIVE_IDS] == ["d5", "d6", "d3"] and nd["q1"][C.NEGATIVE_IDS] == ["d5", "d6", "d6"]
    cs = by_qid(M.mine_batch(j, dataclasses.replace(CFG, ensemble="cross_sample"), ["A", "B"], True))
    assert cs["q1"][C.TEACHER] in ("A", "B") and len(cs["q1"][C.NEGATIVE_IDS]) == 2


def test_hide_positives_seeded_and_keeps_one():
    qrels = pa.table({C.QUERY_ID: ["a", "a", "b", "b", "b", "b", "c", "d"],
                      C.DOC_ID: ["1", "2", "3", "4", "5", "6", "7", "8"],
                      C.SCORE: [1, 1, 1, 1, 1, 1, 1, 0]})
    vis, hid = M.hide_positives(qrels, 0.5, seed=3)
    assert vis.num_rows + hid.num_rows == 8
    hidden = hid.to_pylist()
    assert sum(r[C.QUERY_ID] == "a" for r in hidden) == 1 and sum(r[C.QUERY_ID] == "b" for r in hidden) == 2
    assert not [r for r in hidden if r[C.QUERY_ID] in ("c", "d")]  # single positive / non-positive: never hidden
    vis2, hid2 = M.hide_positives(qrels.take([7, 6, 5, 4, 3, 2, 1, 0]), 0.5, seed=3)  # row order irrelevant
    assert sorted(hid2[C.DOC_ID].to_pylist()) == sorted(hid[C.DOC_ID].to_pylist())
    assert M.hide_positives(qrels, 1.0, 3)[1].num_rows == 4  # at most p - 1 per query
    assert M.hide_positives(qrels, 0.0, 3)[1].num_rows == 0


def test_mine_stage_ray(ray_local, tmp_path):
    paths = {}
    for name, t in (("A", A), ("B", B)):
        paths[name] = str(tmp_path / f"cand_{name}.parquet")
        pq.write_table(t, paths[name])
    pq.write_table(QUERIES, tmp_path / "queries.parquet")
    pq.write_table(CORPUS, tmp_path / "corpus.parquet")
    out = str(tmp_path / "mine")
    full = pa.table({C.QUERY_ID: ["q1", "q1", "q1", "q2"], C.DOC_ID: ["d1", "d2", "d5", "d7"]})
    man = M.mine_stage(paths, str(tmp_path / "queries.parquet"), CFG, out, ensemble=True, full_positives=full)

    mined = by_qid(pq.read_table(tmp_path / "mine" / "mined"))
    dropped = {r[C.QUERY_ID]: r[C.REASON] for r in pq.read_table(tmp_path / "mine" / "dropped.parquet").to_pylist()}
    assert set(mined) | set(dropped) == {"q1", "q2", "q3", "q4", "q5"} and not set(mined) & set(dropped)
    assert dropped == {"q3": "no_negatives", "q5": "unknown_query"}
    assert mined["q1"][C.NEGATIVE_IDS] == ["d5", "d6"] and mined["q2"][C.NUM_SHORT] == 1
    assert mined["q1"][C.QUERY] == "one"
    for r in mined.values():
        assert not set(r[C.NEGATIVE_IDS]) & set(r[C.POSITIVE_IDS])
    rep = man["report"]
    assert rep["totals"]["requested"] == 6 and rep["totals"]["delivered"] == 5 and rep["totals"]["short_queries"] == 1
    assert rep["totals"]["known_false_negative_rate"] == pytest.approx(1 / 5)
    assert rep["per_teacher"]["A"]["drop_method"] == 2 and rep["per_teacher"]["B"]["drop_positive"] == 2
    # removals inside the search: summed from A's ABOVE_CEILING; B's older table reports none
    a, b = rep["per_teacher"]["A"], rep["per_teacher"]["B"]
    assert (a["above_ceiling"], a["above_ceiling_median"], a["above_ceiling_queries"]) == (11, 2.0, 4)
    assert (b["above_ceiling"], b["above_ceiling_median"], b["above_ceiling_queries"]) == (None, None, 0)
    assert rep["dropped_reasons"] == {"no_negatives": 1, "unknown_query": 1}
    assert (tmp_path / "mine" / "scores.png").stat().st_size > 1000
    assert json.loads((tmp_path / "mine" / "report.json").read_text())["totals"] == rep["totals"]

    # exports: texts joined by streaming the corpus; short queries left out of the fixed-width ST table
    st_counts = M.export_sentence_transformers(str(tmp_path / "mine" / "mined"), str(tmp_path / "corpus.parquet"),
                                               str(tmp_path / "st.parquet"), 2)
    st_rows = pq.read_table(tmp_path / "st.parquet").to_pylist()
    assert st_counts["short_rows"] == 1  # q2: one positive, one negative
    assert len(st_rows) == 3  # q1 x 2 positives + q4 x 1
    q1 = [r for r in st_rows if r[C.ANCHOR] == "one"]
    assert sorted(r[C.POSITIVE] for r in q1) == ["T1 text 1", "text 2"]
    assert q1[0][C.negative_column(1)] == "T5 text 5" and q1[0][C.negative_column(2)] == "text 6"
    fe = M.export_flagembedding(str(tmp_path / "mine" / "mined"), str(tmp_path / "corpus.parquet"),
                                str(tmp_path / "fe.jsonl"))
    lines = [json.loads(x) for x in (tmp_path / "fe.jsonl").read_text().splitlines()]
    assert fe["queries"] == 3 and {"query": "two", "pos": ["text 7"], "neg": ["text 9"]} in lines
