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
    from raymine.ingest import passage_text

    assert passage_text("Title", "body") == "Title body"
    assert passage_text("", "body") == "body" and passage_text(None, "body") == "body"
    assert passage_text("  ", "body") == "body"


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
    # cross-sample: q1's teacher is A when its seeded uniform u < 1/2 (A and B both have negatives), else B.
    # u is the documented generator's draw for (seed, q1); one seed of each kind, found by that rule.
    from raymine import sampling as S

    def u_q1(seed):
        return float(S.uniforms(S.query_seeds(seed, ["q1"]), 1, S.STREAM_TEACHER)[0, 0])

    seed_a = next(s for s in range(100) if u_q1(s) < 0.5)
    seed_b = next(s for s in range(100) if u_q1(s) >= 0.5)
    for seed, want2, want3, who3 in (
        # A drawn: its 2 = d5 d6; 3 wanted -> A has only 2 kept, B fills in: d6 taken, then d3
        (seed_a, ["d5", "d6"], ["d5", "d6", "d3"], "A+B"),
        # B drawn: d6 d3, and with 3 wanted B's own third kept candidate d10 (no fill needed)
        (seed_b, ["d6", "d3"], ["d6", "d3", "d10"], "B"),
    ):
        cs = by_qid(M.mine_batch(j, dataclasses.replace(CFG, ensemble="cross_sample", seed=seed), ["A", "B"], True))
        assert cs["q1"][C.NEGATIVE_IDS] == want2 and cs["q1"][C.TEACHER] == who3[0]
        cs3 = by_qid(M.mine_batch(j, dataclasses.replace(c3, ensemble="cross_sample", seed=seed), ["A", "B"], True))
        assert cs3["q1"][C.NEGATIVE_IDS] == want3 and cs3["q1"][C.TEACHER] == who3
        assert cs3["q2"][C.NEGATIVE_IDS] == ["d9"] and cs3["q4"][C.NEGATIVE_IDS] == ["d5", "d6"]  # one teacher each


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


@pytest.mark.parametrize("join_limit", ["0", str(64 << 20)], ids=["distributed_join", "one_task_join"])
def test_mine_stage_ray(ray_local, tmp_path, monkeypatch, join_limit):
    monkeypatch.setenv("RAYMINE_LOCAL_JOIN_BYTES", join_limit)  # both join paths give the same mined table
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
    assert man["dropped"] == str(tmp_path / "mine" / "dropped")  # parts written by the mining tasks
    dropped = {r[C.QUERY_ID]: r[C.REASON] for r in pq.read_table(man["dropped"]).to_pylist()}
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
    assert len(list((tmp_path / "mine" / "mined").glob("*.parquet"))) >= 2  # batches of at most 2 queries

    if join_limit == "0":
        return
    # task count bounded (RAYMINE_READ_TASKS: here 1): one read task per table, batches raised to one mining
    # task for the 5 queries; the mined and dropped rows are the same (mining is per query)
    monkeypatch.setenv("RAYMINE_READ_TASKS", "1")
    assert M.batch_rows(CFG, 5) == 5 and M.batch_rows(CFG, 1) == CFG.batch_size
    man1 = M.mine_stage(paths, str(tmp_path / "queries.parquet"), CFG, str(tmp_path / "mine1"), ensemble=True,
                        full_positives=full)
    assert len(list((tmp_path / "mine1" / "mined").glob("*.parquet"))) == 1
    assert by_qid(pq.read_table(tmp_path / "mine1" / "mined")) == mined
    assert {r[C.QUERY_ID]: r[C.REASON] for r in pq.read_table(man1["dropped"]).to_pylist()} == dropped
    assert man1["report"]["totals"] == rep["totals"]


# ------------------------------------------------------------------------------------------------
# mine_batch (vectorised) against a straightforward per-query reference
# ------------------------------------------------------------------------------------------------
def _ref_anchor(scores, how):
    vals = [float(s) for s in scores if s is not None and np.isfinite(s)]
    if not vals:
        return None
    return {"min": min(vals), "max": max(vals), "mean": sum(vals) / len(vals)}[how]


def _ref_keep(c, row, t):
    """Kept candidates (rank order) of one query for one teacher, from the paper's definitions."""
    cand, sc = row[f"{C.CANDIDATE_IDS}@{t}"], row[f"{C.CANDIDATE_SCORES}@{t}"]
    banned = set(row[f"{C.POSITIVE_IDS}@{t}"] or [])
    if c.exclude_identical_text:
        banned |= set(row[f"{C.EXCLUDED_IDS}@{t}"] or [])
    pos = _ref_anchor(row[f"{C.POSITIVE_SCORES}@{t}"] or [], c.pos_reduce)
    if pos is None:
        return None, None
    ceil = {"naive": np.inf, "shifted": np.inf, "abs": c.abs_threshold, "marginpos": pos - c.margin,
            "percpos": pos * c.perc if pos >= 0 else pos * (2 - c.perc)}[c.method]
    listed = [j for j, d in enumerate(cand) if d not in banned]
    kept = listed[c.shift:] if c.method == "shifted" else [j for j in listed if sc[j] < ceil]
    return kept, len(listed)


def _ref_sample(c, qid, t, kept, scores):
    """The sampling definition: n of the window, keys = uniforms (or z / T + Gumbel), largest first."""
    from raymine import sampling as S

    n, k = c.num_negatives, c.sample_top_k
    if c.sampling == "top":
        return kept[:n]
    lo = 1 if c.sampling == "top1_sampled" else 0
    want = n - lo
    win = kept[lo:k]
    if want <= 0:
        return kept[:lo] if n > 0 else []
    if want >= len(win):
        return kept[: lo + len(win)]
    seed = S.teacher_seeds(S.query_seeds(c.seed, [qid]), t)
    u = S.uniforms(seed, len(win), S.STREAM_SAMPLING + lo)[0]
    if c.sample_weighting == "uniform":
        keys = list(u)
    else:
        s = [float(scores[j]) for j in win]
        span = max(s) - min(s)
        z = [(x - min(s)) / span if span > 0 else 0.0 for x in s]
        keys = [zi / c.sample_temperature - np.log(-np.log(ui)) for zi, ui in zip(z, u, strict=True)]
    pick = sorted(sorted(range(len(win)), key=lambda i: -keys[i])[:want])
    return kept[:lo] + [win[i] for i in pick]


def reference_mine(table, c, teachers, ensemble):
    from raymine import ensemble as E
    from raymine import sampling as S

    out = []
    for row in table.to_pylist():
        qid = row[C.QUERY_ID]
        per = {}
        for t in teachers:
            if row.get(f"{C.CANDIDATE_IDS}@{t}") is None:
                continue
            kept, _ = _ref_keep(c, row, t)
            if kept is None:
                per[t] = None
                continue
            sc = row[f"{C.CANDIDATE_SCORES}@{t}"]
            chosen = _ref_sample(c, qid, t, kept, sc)
            rest = [j for j in kept if j not in chosen]
            per[t] = (chosen, rest, sc, row[f"{C.CANDIDATE_IDS}@{t}"])
        groups = [[t for t in teachers if t in per]] if ensemble else [[t] for t in teachers if t in per]
        u = float(S.uniforms(S.query_seeds(c.seed, [qid]), 1, S.STREAM_TEACHER)[0, 0])
        for grp in groups:
            usable = [t for t in grp if per[t] is not None]
            r = {"qid": qid, "teacher": "+".join(grp), "neg": None, "sc": None, "reason": None}
            if row[C.QUERY] is None:
                r["reason"] = "unknown_query"
            elif not usable:
                r["reason"] = "no_positive_score"
            else:
                lists = [[per[t][3][j] for j in per[t][0] + (per[t][1] if ensemble else [])] for t in usable]
                scs = [[per[t][2][j] for j in per[t][0] + (per[t][1] if ensemble else [])] for t in usable]
                picks = E.ensemble(c.ensemble, lists, c.num_negatives, u)
                if not picks:
                    r["reason"] = "no_negatives"
                else:
                    r["neg"] = [lists[ti][j] for ti, j in picks]
                    r["sc"] = [scs[ti][j] for ti, j in picks]
                    r["teacher"] = "+".join(usable[ti] for ti in sorted({ti for ti, _ in picks}))
                    r["pos"] = row[f"{C.POSITIVE_IDS}@{usable[min(ti for ti, _ in picks)]}"]
            out.append(r)
    return out


def random_joined(rng, nq, teachers, max_k=14):
    """Uneven positive counts, negative scores, empty candidate lists, missing teachers, unknown queries."""
    cols = {C.QUERY_ID: pa.array([f"q{i}-{rng.integers(1000)}" for i in range(nq)]),
            C.QUERY: pa.array([None if rng.random() < 0.1 else f"text{i}" for i in range(nq)], pa.string())}
    for t in teachers:
        pid, psc, exc, cid, csc = [], [], [], [], []
        for _ in range(nq):
            if rng.random() < 0.15:  # no row for this teacher
                for lst in (pid, psc, exc, cid, csc):
                    lst.append(None)
                continue
            k = int(rng.integers(0, max_k))
            ids = [f"d{x}" for x in rng.choice(30, size=k, replace=False)]
            sc = sorted((rng.integers(-64, 64, size=k) / 32).tolist(), reverse=True)
            npos = int(rng.integers(0, 4))
            pos = [f"d{x}" for x in rng.choice(30, size=npos, replace=False)]
            ps = [None if rng.random() < 0.1 else float(x) for x in rng.integers(-64, 64, size=npos) / 32]
            pid.append(pos)
            psc.append(ps)
            exc.append([f"d{x}" for x in rng.choice(30, size=int(rng.integers(0, 3)), replace=False)])
            cid.append(ids)
            csc.append(sc)
        for name, vals, typ in ((C.POSITIVE_IDS, pid, STR), (C.POSITIVE_SCORES, psc, F32), (C.EXCLUDED_IDS, exc, STR),
                                (C.CANDIDATE_IDS, cid, STR), (C.CANDIDATE_SCORES, csc, F32)):
            cols[f"{name}@{t}"] = pa.array(vals, typ)
    return pa.table(cols)


@pytest.mark.parametrize("method", ["naive", "shifted", "abs", "marginpos", "percpos"])
def test_mine_batch_equals_reference_on_random_inputs(method):
    rng = np.random.default_rng(["naive", "shifted", "abs", "marginpos", "percpos"].index(method))
    teachers = ["A", "B", "C"]
    for trial in range(4):
        nt = 1 + trial % 3
        tab = random_joined(rng, int(rng.integers(1, 25)), teachers[:nt])
        for sampling in ("top", "sampled", "top1_sampled"):
            for weighting in ("uniform", "softmax"):
                if sampling == "top" and weighting == "softmax":
                    continue
                for ens in ("intra_sample_no_dedup", "intra_sample_dedup", "cross_sample"):
                    c = dataclasses.replace(
                        MineConfig(), method=method, shift=int(rng.integers(0, 3)), abs_threshold=0.25, margin=0.125,
                        perc=0.875, pos_reduce=str(rng.choice(["min", "mean", "max"])),
                        num_negatives=int(rng.integers(1, 6)), sampling=sampling, sample_top_k=int(rng.integers(1, 8)),
                        sample_weighting=weighting, sample_temperature=0.5, ensemble=ens,
                        exclude_identical_text=bool(rng.random() < 0.7), seed=int(rng.integers(100)))
                    for ensemble in (True, False):
                        got = M.mine_batch(tab, c, teachers[:nt], ensemble).to_pylist()
                        want = reference_mine(tab, c, teachers[:nt], ensemble)
                        assert len(got) == len(want)
                        for g, w in zip(got, want, strict=True):
                            ctx = (method, sampling, weighting, ens, ensemble, w)
                            assert (g[C.QUERY_ID], g["_reason"], g[C.TEACHER]) == (w["qid"], w["reason"], w["teacher"]), ctx
                            assert g[C.NEGATIVE_IDS] == w["neg"], (ctx, g)
                            if w["neg"] is not None:
                                np.testing.assert_array_equal(np.float32(g[C.NEGATIVE_SCORES]), np.float32(w["sc"]))
                                assert g[C.POSITIVE_IDS] == w["pos"] and g[C.NUM_SHORT] == c.num_negatives - len(w["neg"])
                        if not ensemble or ens != "cross_sample":
                            continue
                        # batching: any split gives the same rows
                        parts = pa.concat_tables([M.mine_batch(tab.slice(i, 4), c, teachers[:nt], True)
                                                  for i in range(0, tab.num_rows, 4)])
                        assert parts.to_pylist() == M.mine_batch(tab, c, teachers[:nt], True).to_pylist()


def test_above_ceiling_histogram_median():
    """The driver's above-ceiling histogram (bounded buckets, whatever the number of queries): its median is
    ``np.median``'s exactly below 2**13 and within 2**-12 (relative) above; buckets increase with the value."""
    rng = np.random.default_rng(5)
    for n in (1, 2, 5, 100, 1001):
        for hi in (10, 8192, 10**9):
            v = rng.integers(0, hi, n)
            b, c = np.unique(M.above_bucket(v), return_counts=True)
            got, want = M._median(b, c), float(np.median(v))
            if hi <= 8192:
                assert got == want
            else:
                assert got == pytest.approx(want, rel=2.0 ** -12, abs=0.5)
    v = np.sort(rng.integers(0, 10**12, 10_000))
    b = M.above_bucket(v)
    assert (np.diff(b) >= 0).all() and len(np.unique(b)) < 52 << M.ABOVE_EXACT_BITS
    assert np.allclose(M.above_value(b), v, rtol=2.0 ** -12)
    assert (M.above_bucket(np.arange(8192)) == np.arange(8192)).all()
