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

from raymine.columns import CANDIDATE_IDS, DOC_ID, QUERY_ID, SCORE, TEXT, TITLE
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


# ------------------------------------------------------------------------------------------------
# The run's own test split, distributed (ingested tables → embed actor pool → sharded exact search → mteb scoring)
# ------------------------------------------------------------------------------------------------
def _ingest_with_test_split(data: Path, out: Path):
    from raymine.config import IngestConfig
    from raymine.ingest import ingest_stage
    from raymine.layout import Layout

    layout = Layout(str(out))
    return ingest_stage(IngestConfig(data=str(data)), layout), layout


def _split_cfg(data: Path, **evaluate):
    from raymine.config import Config, EmbedConfig, IngestConfig, SearchConfig

    return Config(ingest=IngestConfig(data=str(data)), embed=EmbedConfig(num_actors=1, rows_per_block=4),
                  search=SearchConfig(num_shards=2, search_tasks=2), evaluate=EvaluateConfig(**evaluate))


def _mteb_on_stored_vectors(layout, label: str, corpus_uri: str, name: str) -> dict[str, float]:
    """The reference: ``mteb.evaluate`` of a local task built from the ingested split, its encoder answering with
    the vectors the new path stored (queries by text, passages by the ingested PASSAGE text; every text found)."""
    import mteb
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    from raymine.columns import PASSAGE
    from raymine.embed import read_embeddings
    from raymine.evaluate import LocalData, _read_folder, _scores_of, make_local_task

    corpus = _read_folder(layout.corpus)
    queries = _read_folder(layout.test_queries)
    q_ids, q_emb = read_embeddings(layout.evaluate_embed(label, "queries"), QUERY_ID)
    d_ids, d_emb = read_embeddings(corpus_uri, DOC_ID)
    qtext = dict(zip(queries[QUERY_ID].to_pylist(), queries[TEXT].to_pylist(), strict=True))
    dtext = dict(zip(corpus[DOC_ID].to_pylist(), corpus[PASSAGE].to_pylist(), strict=True))
    vectors = {"query": {qtext[i]: v for i, v in zip(q_ids, q_emb, strict=True)},
               "passage": {dtext[i]: v for i, v in zip(d_ids, d_emb, strict=True)}}
    dim = q_emb.shape[1]

    class Stored(AbsEncoder):
        mteb_model_meta = ModelMeta(
            loader=None, name="raymine/stored", revision=None, release_date=None, languages=None, n_parameters=None,
            memory_usage_mb=None, max_tokens=512.0, embed_dim=dim, license=None, open_weights=True,
            public_training_code=None, public_training_data=None, framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.COSINE, use_instructions=False, training_datasets=None)

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            side = "query" if prompt_type == PromptType.query else "passage"
            texts = [t for batch in inputs for t in batch["text"]]
            return np.stack([vectors[side][t] for t in texts])  # KeyError: a text the new path did not encode

    data = LocalData(corpus=corpus.select([DOC_ID, TITLE, TEXT]), queries=queries, qrels=_read_folder(layout.test_qrels))
    task = make_local_task(name, data, "test")
    res = mteb.evaluate(Stored(), tasks=[task], cache=None, overwrite_strategy="always", show_progress_bar=False)
    return _scores_of(res, task.metadata.name, "test")


@pytest.fixture(scope="module")
def tiny_split(ray_local, minilm_path, tmp_path_factory):
    """tiny_beir ingested (its test qrels reused as the train split) and evaluated through the new path: the
    base model encoding the corpus itself, and the same model reusing those corpus vectors (a teacher's)."""
    from raymine.evaluate import SplitModel, evaluate_split

    data = tmp_path_factory.mktemp("tiny_split") / "data"
    shutil.copytree(TINY, data)
    shutil.copy(data / "qrels" / "test.tsv", data / "qrels" / "train.tsv")
    manifest, layout = _ingest_with_test_split(data, tmp_path_factory.mktemp("tiny_split_out"))
    cfg = _split_cfg(data)
    base = TeacherConfig(model=minilm_path)
    results, info = evaluate_split(cfg, layout, {"base": SplitModel(base)})
    reused, _ = evaluate_split(cfg, layout, {"reused": SplitModel(base, layout.evaluate_embed("base", "corpus"))})
    return manifest, layout, results, reused, info


def test_ingest_writes_the_test_split(tiny_split):
    manifest, layout, *_ = tiny_split
    from raymine.evaluate import _read_folder

    q = _read_folder(layout.test_queries)
    assert q[QUERY_ID].to_pylist() == ["q1", "q2", "q3", "q4", "q5"]  # q6: only a zero judgement
    assert _read_folder(layout.test_qrels).num_rows == 9  # zeros of kept queries stay (mteb's qrels)
    c = manifest["counts"]
    assert (c["test_queries"], c["test_qrels"]) == (5, 9)
    assert (c["test_queries_without_positive"], c["test_queries_not_in_split"]) == (1, 1)  # as _load_local counts


def test_split_path_equals_mteb_on_the_same_vectors(tiny_split, tiny_run):
    _, layout, results, _, info = tiny_split
    want = _mteb_on_stored_vectors(layout, "base", layout.evaluate_embed("base", "corpus"), "tiny_stored")
    got = results["base"]
    for metric in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        assert got[metric] == pytest.approx(want[metric], abs=1e-4)
        # and mteb's whole in-process evaluation of the raw folder (its own encoding and exact search)
        assert got[metric] == pytest.approx(tiny_run[0]["tiny_beir"]["base"][metric], abs=1e-4)
    assert 0.5 < got["ndcg_at_10"] < 0.999
    assert info["queries"] == 5 and info["documents"] == 12 and info["top_k"] == 12  # k = min(100, corpus)


def test_split_path_reuses_corpus_vectors_and_writes_topk_parts(tiny_split):
    _, layout, results, reused, _ = tiny_split
    assert reused["reused"] == results["base"]
    assert not Path(layout.evaluate_embed("reused", "corpus")).exists()  # no corpus pass for a reused model
    from raymine.evaluate import _read_folder

    top = _read_folder(layout.evaluate_topk("base"))
    assert sorted(top[QUERY_ID].to_pylist()) == ["q1", "q2", "q3", "q4", "q5"]
    assert all(len(c) == 12 for c in top[CANDIDATE_IDS].to_pylist())  # every doc ranked: k = corpus size


def test_split_path_builds_no_driver_corpus_dict(tiny_split, monkeypatch, minilm_path):
    """The old driver-side pieces are gone, and the new path never parses the raw BEIR folder."""
    import raymine.ingest
    import raymine.pipeline as pipeline
    from raymine.evaluate import SplitModel, evaluate_split

    assert not hasattr(pipeline._Run, "_corpus_vectors") and not hasattr(pipeline, "_passages_by_id")
    data = _load_local(str(TINY), "test")  # the same seeded subset as the mteb path's max_queries (reference)
    chosen = subsample_queries(data, 3, seed=1).queries.column(QUERY_ID).to_pylist()

    def boom(*a, **k):
        raise AssertionError("read_beir called by the evaluation")

    monkeypatch.setattr(raymine.ingest, "read_beir", boom)
    _, layout, _, _, _ = tiny_split
    cfg = _split_cfg(Path(layout.root) / "nowhere", max_queries=3, seed=1)
    _, info = evaluate_split(cfg, layout, {"sub": SplitModel(TeacherConfig(model=minilm_path),
                                                              layout.evaluate_embed("base", "corpus"))})
    assert info["subset"] and info["queries"] == 3 and info["queries_available"] == 5
    from raymine.evaluate import _read_folder

    assert sorted(_read_folder(layout.evaluate_topk("sub"))[QUERY_ID].to_pylist()) == sorted(chosen)


def test_metric_cutoffs_and_bad_metric_names():
    from raymine.evaluate import metric_ks

    assert metric_ks(("ndcg_at_10", "recall_at_100", "mrr_at_10")) == [1, 10, 100]
    with pytest.raises(EvaluationError, match="main_score"):
        metric_ks(("main_score",))


@pytest.mark.slow
def test_scifact_base_through_the_split_path_is_the_published_score(ray_local, tmp_path):
    """SciFact test, base all-MiniLM-L6-v2 from the teacher's stored vectors (as the default run reuses them):
    nDCG@10 64.51 (published, ±0.5) through the new path, equal to mteb's own evaluation of those vectors to 1e-4."""
    from raymine.config import Config, EmbedConfig, IngestConfig, SearchConfig
    from raymine.embed import EmbedInput, embed_tables
    from raymine.evaluate import SplitModel, evaluate_split

    _, layout = _ingest_with_test_split(ROOT / "data" / "scifact", tmp_path)
    teacher = TeacherConfig(model="sentence-transformers/all-MiniLM-L6-v2", query_max_length=256,
                            passage_max_length=256)
    cfg = Config(ingest=IngestConfig(data=str(ROOT / "data" / "scifact")), embed=EmbedConfig(),
                 search=SearchConfig(num_shards=2), evaluate=EvaluateConfig())
    from raymine import columns as C

    embed_tables(teacher, cfg.embed, [EmbedInput("passage", layout.corpus, C.DOC_ID, C.PASSAGE,
                                                 layout.embed("minilm", "corpus"))], layout.embed("minilm"), "k")
    res, info = evaluate_split(cfg, layout, {"before": SplitModel(teacher, layout.embed("minilm", "corpus"))})
    assert info["queries"] == 300 and info["documents"] == 5183
    assert res["before"]["ndcg_at_10"] * 100 == pytest.approx(64.51, abs=0.5)
    want = _mteb_on_stored_vectors(layout, "before", layout.embed("minilm", "corpus"), "scifact_stored")
    for metric in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        assert res["before"][metric] == pytest.approx(want[metric], abs=1e-4)


def test_mteb_task_encoded_by_the_actor_pool_equals_in_process(ray_local, tiny_run, minilm_path, tmp_path):
    """A task evaluated through mteb (a local folder standing in for a named MTEB task: no hub here) with every
    encode call routed through the embed actor pool scores what the in-process encoder scored (the hand-checked
    figures of ``tiny_run``); the texts were embedded by actors (their parts are on disk), and a second
    evaluation finds them done."""
    from raymine.config import EmbedConfig
    from raymine.evaluate import _mteb_results

    results, _ = tiny_run
    cfg = EvaluateConfig(tasks=(str(TINY),), split="test")
    got, *_ = _mteb_results({"base": TeacherConfig(model=minilm_path)}, cfg, str(TINY), str(tmp_path),
                            embed_cfg=EmbedConfig(num_actors=1))
    for metric, value in results["tiny_beir"]["base"].items():
        assert got["tiny_beir"]["base"][metric] == pytest.approx(value, abs=2e-5), metric
    manifests = sorted((tmp_path / "mteb_embed" / "base").glob("*/_manifest.json"))
    assert {m.parent.name.split("-")[0] for m in manifests} == {"query", "passage"}
    again, *_ = _mteb_results({"base": TeacherConfig(model=minilm_path)}, cfg, str(TINY), str(tmp_path),
                              embed_cfg=EmbedConfig(num_actors=1))
    assert again == got
    assert sorted((tmp_path / "mteb_embed" / "base").glob("*/_manifest.json")) == manifests
