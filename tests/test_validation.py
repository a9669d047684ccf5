"""Model selection on a validation split: the pure rules (hold-out by id, schedule, nDCG against its
definition), and real Ray Train runs where training hurts (the base is kept and shipped) and where a later
step wins (the shipped weights reproduce that step's logged score)."""
from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymine import columns as C
from raymine.config import TrainConfig
from raymine.validation import (
    POOL_FILE,
    QUERIES_FILE,
    ValidationSet,
    best_point,
    encode_texts,
    holdout_mask,
    retrieval_ndcg,
    slice_share,
    validation_points,
)


def _ndcg10(ranked: list[str], relevant: set[str]) -> float:
    """nDCG@10 from its definition (binary gains, log2 discount)."""
    dcg = sum(1 / math.log2(r + 2) for r, d in enumerate(ranked[:10]) if d in relevant)
    ideal = sum(1 / math.log2(r + 2) for r in range(min(10, len(relevant))))
    return dcg / ideal


def test_ndcg_equals_the_definition():
    rng = np.random.default_rng(0)
    pool = [f"d{i}" for i in range(40)]
    qids = [f"q{i}" for i in range(7)]
    rel = {q: [pool[j] for j in rng.choice(40, size=1 + i % 4, replace=False)] for i, q in enumerate(qids)}
    scores = rng.normal(size=(7, 40))
    want = np.mean([_ndcg10([pool[j] for j in np.argsort(-scores[i])], set(rel[q])) for i, q in enumerate(qids)])
    assert retrieval_ndcg(qids, pool, scores, rel) == pytest.approx(want, abs=6e-6)  # mteb rounds to 5 digits
    perfect = np.array([[1.0 if d in rel[q] else 0.0 for d in pool] for q in qids])
    assert retrieval_ndcg(qids, pool, perfect, rel) == pytest.approx(1.0)


def test_holdout_is_a_rule_of_the_id_and_schedule_and_ties():
    ids = [f"q{i}" for i in range(5000)]
    m = holdout_mask(ids, 13, 0.1)
    assert 400 < m.sum() < 600  # about the share
    assert np.array_equal(holdout_mask(ids[::-1], 13, 0.1)[::-1], m)  # per id, not per position
    assert not np.array_equal(holdout_mask(ids, 14, 0.1), m)
    assert np.all(holdout_mask(ids, 13, 0.05) <= m)  # a smaller share holds out a subset
    assert slice_share(0.1, 300, 809) == 0.1 and slice_share(0.1, 300, 100_000) == pytest.approx(0.003)
    assert validation_points(22, 0) == [0, 11, 22] and validation_points(25, 0) == [0, 13, 25] and validation_points(6, 2) == [0, 2, 4, 6]
    assert best_point([(0, 0.5), (4, 0.7), (8, 0.7), (9, 0.6)]) == (4, 0.7)  # ties: the earlier
    assert best_point([(0, 0.5), (4, 0.5)]) == (0, 0.5)


# ------------------------------------------------------------------------------------------------
# Real Ray Train runs (MiniLM, 2 CPU workers)
# ------------------------------------------------------------------------------------------------
TOPICS = ["aspirin", "insulin", "vaccines", "telomeres", "mitochondria", "ribosomes", "neurons", "antibiotics"]
FACTS = ["Glaciers carve U-shaped valleys.", "Jazz grew from blues and ragtime.", "Basalt forms from fast-cooling lava.",
         "Chess openings are catalogued by ECO codes.", "Tides follow the moon's gravity.",
         "Sourdough rises with wild yeast.", "Comets grow tails near the sun.", "Violins have four strings."]


def _arbitrary_pairs(root: Path, queries: int = 16) -> tuple[str, str, str]:
    """Mined rows pairing each topic with an unrelated fact (the base model cannot know the pairing; training
    teaches it), a corpus, and a validation folder asking about the same topics in other words."""
    ids, texts = [], []
    rows: dict[str, list] = {C.QUERY_ID: [], C.QUERY: [], C.POSITIVE_IDS: [], C.NEGATIVE_IDS: []}
    for t, fact in enumerate(FACTS):
        ids.append(f"f{t}")
        texts.append(fact)
    for i in range(queries):
        t = i % len(TOPICS)
        rows[C.QUERY_ID].append(f"q{i}")
        rows[C.QUERY].append(f"what goes with {TOPICS[t]}? ({i})")
        rows[C.POSITIVE_IDS].append([f"f{t}"])
        rows[C.NEGATIVE_IDS].append([f"f{(t + 1) % 8}", f"f{(t + 2) % 8}"])
    (root / "mined").mkdir(parents=True)
    pq.write_table(pa.table(rows), root / "mined" / "part-0.parquet")
    pq.write_table(pa.table({C.DOC_ID: ids, C.PASSAGE: texts}), root / "corpus.parquet")
    val = root / "validation"
    val.mkdir()
    pq.write_table(pa.table({C.QUERY_ID: [f"v{t}" for t in range(8)], C.TEXT: [f"tell me about {x}" for x in TOPICS],
                             C.POSITIVE_IDS: [[f"f{t}"] for t in range(8)]}), val / QUERIES_FILE)
    pq.write_table(pa.table({C.DOC_ID: ids, C.PASSAGE: texts}), val / POOL_FILE)
    return str(root / "mined"), str(root / "corpus.parquet"), str(val)


def _run(root: Path, minilm_path: str, lr: float, every: int, patience: int, steps: int, workers: int = 2) -> dict:
    from raymine.train import train_stage

    mined, corpus, val = _arbitrary_pairs(root)
    cfg = TrainConfig(model=minilm_path, num_workers=workers, batch_size=2, num_hard_negatives=2, query_max_length=24,
                      passage_max_length=32, lr=lr, warmup_steps=0, max_steps=steps, checkpoint_every=100,
                      log_every=1, seed=3, max_failures=0)
    validation = {"folder": val, "every": every, "patience": patience, "batch_size": 4, "base_score": None,
                  "max_lengths": {"query": 24, "passage": 32}}
    return train_stage(mined, corpus, cfg, str(root / "model"), f"v-{uuid.uuid4().hex[:8]}",
                       storage_path=str(root / "ray"), validation=validation)


def _score(model_dir: str, val: str) -> float:
    from raymine.model import BiEncoder

    m = BiEncoder.from_config(TrainConfig(model=model_dir, query_max_length=24, passage_max_length=32))
    vs = ValidationSet(val)
    return vs.score(encode_texts(m, vs.queries, "query", 4), encode_texts(m, vs.passages, "passage", 4))


def test_training_that_hurts_ships_the_base_model_and_stops_early(ray_local, minilm_path, tmp_path):
    """A learning rate that wrecks MiniLM (0.5, no warm-up): the step-2 point scores far below step 0 (0.456 vs
    0.558 on a 2-core AVX2 CPU), so step 0 is kept, the saved model is the base model (same vectors), the report
    says so, and patience 1 stops at that first point without a gain. (5e-2 was used before: on this CPU its
    step-2 point scored 0.565, above the base — the 8-query validation set is noisy, so the margin matters.)
    One worker: spreading the validation over ranks is the next test's (2 workers)."""
    from raymine.model import BiEncoder

    res = _run(tmp_path, minilm_path, lr=0.5, every=2, patience=1, steps=8, workers=1)
    v = res["validation"]
    assert v["steps"] == [0, 2] and res["steps"] == 2  # early stop after one point without gain
    assert v["scores"][1] < v["scores"][0] and v["kept_step"] == 0 and v["base_kept"]
    texts = ["tell me about insulin", "Tides follow the moon's gravity."]
    shipped = BiEncoder.from_config(TrainConfig(model=res["model_dir"])).encode(texts)
    base = BiEncoder.from_config(TrainConfig(model=minilm_path)).encode(texts)
    torch.testing.assert_close(shipped, base, rtol=0, atol=1e-6)
    assert _score(res["model_dir"], str(tmp_path / "validation")) == pytest.approx(v["scores"][0], abs=1e-6)


def test_a_later_step_wins_and_its_weights_reproduce_its_score(ray_local, minilm_path, tmp_path):
    res = _run(tmp_path, minilm_path, lr=1e-4, every=3, patience=0, steps=6)
    v = res["validation"]
    assert v["steps"] == [0, 3, 6] and res["steps"] == 6
    assert v["kept_step"] > 0 and v["kept_score"] > v["scores"][0] and not v["base_kept"]
    assert v["kept_score"] == max(v["scores"])
    assert _score(res["model_dir"], str(tmp_path / "validation")) == pytest.approx(v["kept_score"], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# The stage on real data: a dev split (queries embedded by the teacher's actor pool, top-k by exact search)
# ------------------------------------------------------------------------------------------------
def test_dev_split_pool_and_base_score_from_the_teacher(ray_local, tmp_path):
    """scifact_mini with a dev split (its test qrels copied): every dev query with a judged passage is a
    validation query; the pool holds its judged passages and its teacher top-3 (equal to a brute-force search
    over the teacher's stored corpus vectors) plus a seeded fill; no training query is held out; the base
    score (from the stored vectors, the student being the teacher) equals nDCG@10 computed here."""
    import shutil

    from raymine.config import load_config
    from raymine.embed import read_embeddings
    from raymine.pipeline import run_pipeline

    data = tmp_path / "data"
    shutil.copytree(Path(__file__).parent / "data" / "scifact_mini", data)
    shutil.copy(data / "qrels" / "test.tsv", data / "qrels" / "dev.tsv")
    cfg = load_config(Path(__file__).parent / "data" / "tiny_e2e.yaml", overrides=[
        f"output={tmp_path / 'out'}", f"ingest.data={data}", "teachers=minilm", "embed.num_actors=1",
        "validation.top_k=3", "validation.pool_size=60"])
    report = run_pipeline(cfg, ["mine"])
    v = report["stages"]["validation"]
    assert v["mode"] == "dev" and v["share"] == 0.0
    q = pq.read_table(tmp_path / "out" / "validation" / QUERIES_FILE)
    pool = pq.read_table(tmp_path / "out" / "validation" / POOL_FILE).column(C.DOC_ID).to_pylist()
    rows = [line.split("\t") for line in (data / "qrels" / "dev.tsv").read_text().splitlines()[1:]]
    corpus_ids = set(pq.read_table(tmp_path / "out" / "ingest" / "corpus").column(C.DOC_ID).to_pylist())
    want: dict[str, set[str]] = {}
    for qid, did, score in rows:
        if int(score) > 0 and did in corpus_ids:
            want.setdefault(qid, set()).add(did)
    got = dict(zip(q.column(C.QUERY_ID).to_pylist(), q.column(C.POSITIVE_IDS).to_pylist(), strict=True))
    assert {k: set(x) for k, x in got.items()} == want
    ids, emb = read_embeddings(str(tmp_path / "out" / "embed" / "minilm" / "corpus"), C.DOC_ID)
    qids, qemb = read_embeddings(str(tmp_path / "out" / "validation_work" / "embed" / "queries"), C.QUERY_ID)
    top = {qq: {ids[j] for j in np.argsort(-(emb @ qemb[i]), kind="stable")[:3]} for i, qq in enumerate(qids)}
    assert set(qids) == set(want) and all(top[qq] <= set(pool) for qq in qids)
    assert set().union(*want.values()) <= set(pool) and len(pool) >= len(set().union(*want.values(), *top.values()))
    by_id = dict(zip(ids, emb, strict=True))
    scores = qemb @ np.stack([by_id[d] for d in pool]).T  # [Q, P]
    ndcg = np.mean([_ndcg10([pool[j] for j in np.argsort(-scores[i], kind="stable")], want[x])
                    for i, x in enumerate(qids)])
    assert v["base_score"] == pytest.approx(ndcg, abs=6e-6)
    assert report["stages"]["mine"]["counts"]["dropped"] == 0  # a dev split holds no training query out
