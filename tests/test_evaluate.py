"""Evaluate stage: mteb on local BEIR/Parquet folders, checked against nDCG@10 / MRR@10 computed by hand.

The reference ranking comes from MiniLM embeddings computed here with plain transformers (mean pooling,
L2), independent of raymine's encoder; the metrics follow trec_eval (what mteb's pytrec_eval uses):
nDCG@10 = DCG@10 / IDCG@10 with linear gain rel and discount 1/log2(rank + 1).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine.columns import DOC_ID, QUERY_ID, SCORE, TEXT, TITLE
from raymine.config import EvaluateConfig, TeacherConfig
from raymine.evaluate import EvaluationError, _load_local, evaluate_models, subsample_queries

TINY = Path(__file__).resolve().parent / "data" / "tiny_beir"
ROOT = Path(__file__).resolve().parents[1]


def _tiny_raw() -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    corpus = [json.loads(x) for x in (TINY / "corpus.jsonl").read_text().splitlines() if x.strip()]
    queries = [json.loads(x) for x in (TINY / "queries.jsonl").read_text().splitlines() if x.strip()]
    qrels: dict[str, dict[str, int]] = {}
    for line in (TINY / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    return corpus, queries, qrels


def _embed(path: str, texts: list[str]) -> np.ndarray:
    """Reference MiniLM embeddings: transformers + attention-masked mean + L2 (sentence-transformers' recipe)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # [n, T, H]
        m = enc["attention_mask"].unsqueeze(-1).float()  # [n, T, 1]
        emb = (hidden * m).sum(1) / m.sum(1)  # [n, H]
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb.numpy()


def _hand_metrics(minilm_path: str) -> tuple[float, float, float, dict[str, list[str]]]:
    """(nDCG@10, MRR@10, recall@100, ranking per query) for the tiny folder, by the textbook formulas."""
    corpus, queries, qrels = _tiny_raw()
    doc_ids = [d["_id"] for d in corpus]
    doc_texts = [(d["title"] + " " + d["text"]).strip() for d in corpus]  # mteb's document convention
    # evaluated queries: judged in the split with at least one relevant (score > 0) document
    evaluated = [q for q in queries if any(s > 0 for s in qrels.get(q["_id"], {}).values())]
    assert [q["_id"] for q in evaluated] == ["q1", "q2", "q3", "q4", "q5"]
    d_emb = _embed(minilm_path, doc_texts)
    q_emb = _embed(minilm_path, [q["text"] for q in evaluated])
    sims = q_emb @ d_emb.T  # [5, 12] cosine
    ndcgs, rrs, recalls, rankings = [], [], [], {}
    for qi, q in enumerate(evaluated):
        order = np.argsort(-sims[qi], kind="stable")
        top = np.sort(sims[qi])[::-1][:11]
        assert np.min(-np.diff(top)) > 1e-4, "tiny folder must rank without near-ties"
        ranked = [doc_ids[i] for i in order]
        rankings[q["_id"]] = ranked
        rel = qrels[q["_id"]]
        gains = [rel.get(d, 0) for d in ranked[:10]]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        ideal = sorted((s for s in rel.values() if s > 0), reverse=True)[:10]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        ndcgs.append(dcg / idcg)
        first = next((r for r, d in enumerate(ranked[:10]) if rel.get(d, 0) > 0), None)
        rrs.append(0.0 if first is None else 1.0 / (first + 1))
        relevant = {d for d, s in rel.items() if s > 0}
        recalls.append(len(relevant & set(ranked[:100])) / len(relevant))
    return float(np.mean(ndcgs)), float(np.mean(rrs)), float(np.mean(recalls)), rankings


@pytest.fixture(scope="module")
def saved_copy(minilm_path, tmp_path_factory) -> str:
    """MiniLM saved with transformers' save_pretrained only (no sentence-transformers files) — what a
    training stage leaves behind."""
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("student")
    AutoModel.from_pretrained(minilm_path).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(out)
    assert not (out / "modules.json").exists()
    return str(out)


@pytest.fixture(scope="module")
def tiny_run(minilm_path, saved_copy, tmp_path_factory):
    """One evaluation of three models on the tiny folder: base, its saved copy, the copy with CLS pooling."""
    out = tmp_path_factory.mktemp("eval_out")
    models = {
        "base": TeacherConfig(model=minilm_path),
        "student": TeacherConfig(model=saved_copy),
        "student_cls": TeacherConfig(model=saved_copy, pooling="cls"),
    }
    results = evaluate_models(models, EvaluateConfig(tasks=("local",), split="test"), str(TINY), str(out))
    return results, out


def test_tiny_beir_ndcg_matches_hand_computation(tiny_run, minilm_path):
    results, _ = tiny_run
    ndcg, mrr, recall, rankings = _hand_metrics(minilm_path)
    base = results["tiny_beir"]["base"]
    # the folder is not trivial: one graded query is not ranked ideally
    assert 0.5 < ndcg < 0.999
    assert base["ndcg_at_10"] == pytest.approx(ndcg, abs=2e-5)  # mteb rounds to 5 decimals
    assert base["mrr_at_10"] == pytest.approx(mrr, abs=2e-5)
    assert base["recall_at_100"] == pytest.approx(recall, abs=2e-5)
    # had the zero-judged query q6 been scored (as 0), the mean would be 5/6 of this — it must not be
    assert base["ndcg_at_10"] != pytest.approx(ndcg * 5 / 6, abs=1e-3)


def test_saved_model_folder_evaluates_from_folder_alone(tiny_run):
    results, _ = tiny_run
    r = results["tiny_beir"]
    for metric in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        assert r["student"][metric] == pytest.approx(r["base"][metric], abs=1e-5)
    # another pooling is really applied (a different model → a different score)
    assert r["student_cls"]["ndcg_at_10"] != pytest.approx(r["base"]["ndcg_at_10"], abs=1e-4)


def test_report_files_hold_the_numbers(tiny_run):
    results, out = tiny_run
    report = json.loads((out / "evaluation.json").read_text())
    assert report["results"] == results
    assert report["baseline"] == "base"
    assert report["tasks"]["tiny_beir"]["queries"] == 5
    assert report["tasks"]["tiny_beir"]["skipped"] == {"queries_without_positive": 1, "queries_not_in_split": 1}
    md = (out / "evaluation.md").read_text()
    r = results["tiny_beir"]
    b, s, c = (r[m]["ndcg_at_10"] * 100 for m in ("base", "student", "student_cls"))
    row = next(line for line in md.splitlines() if line.startswith("| tiny_beir | nDCG@10 |"))
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells == ["tiny_beir", "nDCG@10", f"{b:.2f}", f"{s:.2f}", f"{c:.2f}", f"{s - b:+.2f}", f"{c - b:+.2f}"]
    assert "Δ student_cls vs base" in md
    png = (out / "evaluation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_parquet_folder_gives_the_same_scores(tiny_run, minilm_path, tmp_path):
    corpus, queries, qrels = _tiny_raw()
    folder = tmp_path / "tiny_parquet"
    (folder / "qrels").mkdir(parents=True)
    pq.write_table(pa.table({DOC_ID: [d["_id"] for d in corpus], TITLE: [d["title"] for d in corpus],
                             TEXT: [d["text"] for d in corpus]}), folder / "corpus.parquet")
    pq.write_table(pa.table({QUERY_ID: [q["_id"] for q in queries], TEXT: [q["text"] for q in queries]}),
                   folder / "queries.parquet")
    rows = [(q, d, s) for q, ds in qrels.items() for d, s in ds.items()]
    pq.write_table(pa.table({QUERY_ID: [r[0] for r in rows], DOC_ID: [r[1] for r in rows],
                             SCORE: pa.array([r[2] for r in rows], pa.int32())}), folder / "qrels" / "test.parquet")
    res = evaluate_models({"base": TeacherConfig(model=minilm_path)}, EvaluateConfig(tasks=(str(folder),)),
                          "unused", str(tmp_path / "out"))
    assert res["tiny_parquet"]["base"] == pytest.approx(tiny_run[0]["tiny_beir"]["base"], abs=1e-6)


def test_load_local_counts_skips_and_reads_gzip():
    data = _load_local(str(TINY), "test")
    assert data.corpus.num_rows == 12 and data.queries.num_rows == 5
    assert sorted(data.queries.column(QUERY_ID).to_pylist()) == ["q1", "q2", "q3", "q4", "q5"]
    assert data.qrels.num_rows == 9  # q6's lone zero judgement dropped with q6
    assert data.skipped == {"queries_without_positive": 1, "queries_not_in_split": 1}
    sci = _load_local(str(ROOT / "data" / "scifact"), "test")  # gzip BEIR
    assert (sci.corpus.num_rows, sci.queries.num_rows, sci.qrels.num_rows) == (5183, 300, 339)


def test_bad_input_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(TINY, bad)
    (bad / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tx\n")
    with pytest.raises(ValueError, match=r"test\.tsv:2: \[qrels_score\] relevance 'x' is not an integer"):
        _load_local(str(bad), "test")
    with pytest.raises(ValueError, match=r"no qrels/dev file"):
        _load_local(str(TINY), "dev")


def test_max_queries_subset_is_seeded_and_consistent():
    data = _load_local(str(TINY), "test")
    a = subsample_queries(data, 3, seed=1)
    b = subsample_queries(data, 3, seed=1)
    ids = a.queries.column(QUERY_ID).to_pylist()
    assert len(ids) == 3 and ids == b.queries.column(QUERY_ID).to_pylist()
    assert set(a.qrels.column(QUERY_ID).to_pylist()) == set(ids)
    assert a.corpus.num_rows == 12
    seen = {tuple(sorted(subsample_queries(data, 3, seed=s).queries.column(QUERY_ID).to_pylist())) for s in range(8)}
    assert len(seen) > 1  # the seed matters
    assert subsample_queries(data, 0, seed=1) is data


def test_unknown_or_unreachable_mteb_task_fails_naming_it(minilm_path, tmp_path):
    cfg = EvaluateConfig(tasks=("NoSuchTaskXyz",))
    with pytest.raises(EvaluationError, match="NoSuchTaskXyz"):
        evaluate_models({"base": TeacherConfig(model=minilm_path)}, cfg, str(TINY), str(tmp_path))
    # a real MTEB task name needs the hub, which tests never reach (HF_HUB_OFFLINE=1): a clear error, no skip
    with pytest.raises(EvaluationError, match="SciFact"):
        evaluate_models({"base": TeacherConfig(model=minilm_path)}, EvaluateConfig(tasks=("SciFact",)),
                        str(TINY), str(tmp_path))


@pytest.mark.slow
def test_scifact_anchor_reproduces_published_minilm_score(tmp_path):
    """all-MiniLM-L6-v2 on SciFact test: published MTEB nDCG@10 64.51 (±0.5); sentence-transformers' 256-token limit."""
    teacher = TeacherConfig(model="sentence-transformers/all-MiniLM-L6-v2", query_max_length=256,
                            passage_max_length=256)
    res = evaluate_models({"minilm": teacher}, EvaluateConfig(), str(ROOT / "data" / "scifact"), str(tmp_path))
    assert res["scifact"]["minilm"]["ndcg_at_10"] * 100 == pytest.approx(64.51, abs=0.5)


def test_mteb_wrapper_embeds_as_training_does(tiny_sp_mistral_path):
    """What mteb scores is the trained function: the wrapper's query and document vectors for a prompted,
    bidirectional Mistral student equal BiEncoder's training-mode forward (eval mode) to 1e-5."""
    import torch
    from mteb.types import PromptType

    from raymine.config import TrainConfig
    from raymine.evaluate import make_mteb_model
    from raymine.model import BiEncoder

    prompt = "Given a question, retrieve passages that answer the question: "
    common = dict(model=tiny_sp_mistral_path, pooling="mean", query_prompt=prompt, query_max_length=32,
                  passage_max_length=48)
    wrapper = make_mteb_model("student", TeacherConfig(**common, bidirectional=True, device="cpu", batch_size=2))
    student = BiEncoder.from_config(TrainConfig(**common, bidirectional=True)).eval()
    texts = ["what is protein folding", "which planets have moons", "Mars is the fourth planet from the Sun"]
    for prompt_type, side in ((PromptType.query, "query"), (PromptType.document, "passage")):
        got = wrapper.encode([{"text": texts[:2]}, {"text": texts[2:]}], task_metadata=None, hf_split="test",
                             hf_subset="default", prompt_type=prompt_type)
        with torch.no_grad():
            want = student(**student.tokenize(texts, side)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
