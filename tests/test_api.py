"""The Python API and pairs input (issue 25, items 1-2), against exact references.

- ``raymine.mine_hard_negatives`` on an in-memory ``datasets.Dataset`` of pairs mines the same negatives, id for
  id, as the CLI on the equivalent BEIR folder (ids written as the pairs' text hashes) and as the CLI on the
  same pairs as a jsonl file with other column names (``ingest.format=pairs``).
- With one positive per anchor and ``relative_margin``, the same negatives per anchor as
  sentence-transformers' own ``mine_hard_negatives`` on the same pairs and the same (packaged MiniLM) model,
  both exact (``use_faiss=False``; sentence-transformers given the whole corpus as its window).
- A sentence-transformers user's snippet: the mined rows train one ``SentenceTransformerTrainer`` step.
- The sentence-transformers arguments map onto raymine's config as documented (pure, no Ray).

The two tests against sentence-transformers share one MiniLM pipeline run (~35 s on 2 cores) and are marked
``slow`` (``pytest -m slow tests/test_api.py``); the rest run in ~40 s with BM25.

Data: SciFact's training pairs in tests/data/scifact_mini (45 pairs, 40 queries, 5 with two positives) and a
corpus of those positives plus 75 more SciFact passages (each cut to 400 characters, to encode fast).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import raymine
from raymine import cli
from raymine import columns as C
from raymine.api import ApiError, st_mine_settings
from raymine.config import MineConfig, SearchConfig, TeacherConfig, load_config
from raymine.pairs import PairsError, pairs_block, resolve_columns, text_id

MINI = Path(__file__).resolve().parent / "data" / "scifact_mini"
EXTRA_DOCS = 75
FAST = """
teachers: [bm25]
teacher_defs:
  bm25: {kind: bm25}
embed: {num_actors: 1}
search: {num_shards: 1}
mine: {join_partitions: 1}
export: {join_partitions: 1, formats: [st_ntuple]}
validation: {split: none}
"""
# the mining settings of relative_margin=0.05, num_negatives=3 (sentence-transformers' names), as CLI overrides
MINE_OVERRIDES = ["mine.method=percpos", "mine.perc=0.95", "mine.pos_reduce=min", "mine.num_negatives=3",
                  "mine.sampling=top"]


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _passage(o: dict) -> str:
    """BEIR's passage (title + text), cut to 400 characters: every test encodes less (both libraries see it)."""
    return (f"{o['title']} {o['text']}".strip() if o.get("title") else o["text"])[:400]


@pytest.fixture(scope="module")
def scifact():
    """(pairs [(query, passage)] in qrels order, extra corpus passages not among the positives)."""
    docs = {o["_id"]: _passage(o) for o in map(json.loads, (MINI / "corpus.jsonl").read_text().splitlines())}
    queries = {o["_id"]: o["text"] for o in map(json.loads, (MINI / "queries.jsonl").read_text().splitlines())}
    rows = [line.split("\t") for line in (MINI / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    pairs = [(queries[q], docs[d]) for q, d, _ in rows]
    positives = {p for _, p in pairs}
    extra = [t for t in docs.values() if t not in positives][:EXTRA_DOCS]
    return pairs, extra


@pytest.fixture(scope="module")
def fast_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    path.write_text(FAST)
    return path


def _positives(out: Path) -> dict[str, list[str]]:
    """query id → sorted positive ids of a run's ingested training queries."""
    t = pq.read_table(out / "ingest" / "train_queries")
    return {q: sorted(p) for q, p in zip(t.column(C.QUERY_ID).to_pylist(), t.column(C.POSITIVE_IDS).to_pylist(),
                                         strict=True)}


def _mined(out: Path) -> dict[str, tuple[list[str], list[str]]]:
    """query id → (sorted positive ids, negative ids in mined order) of a run's mined table."""
    t = pq.read_table(out / "mined")
    return {q: (sorted(p), list(n)) for q, p, n in zip(*(t.column(c).to_pylist() for c in (
        C.QUERY_ID, C.POSITIVE_IDS, C.NEGATIVE_IDS)), strict=True)}


@pytest.fixture(scope="module")
def cli_beir(ray_local, scifact, fast_yaml, tmp_path_factory) -> dict:
    """The CLI on the BEIR folder equivalent to the pairs (ids = the text hashes the pairs input derives)."""
    pairs, extra = scifact
    root = tmp_path_factory.mktemp("beir")
    data = root / "data"
    (data / "qrels").mkdir(parents=True)
    passages = list(dict.fromkeys([p for _, p in pairs] + extra))
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": text_id(p), "text": p}) + "\n" for p in passages))
    queries = list(dict.fromkeys(q for q, _ in pairs))
    (data / "queries.jsonl").write_text("".join(json.dumps({"_id": text_id(q), "text": q}) + "\n" for q in queries))
    (data / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{text_id(q)}\t{text_id(p)}\t1\n" for q, p in pairs))
    out = root / "out"
    code = cli.main(["run", "--config", str(fast_yaml), "--stages", "mine", "--data", str(data), "--output", str(out),
                     *MINE_OVERRIDES])
    assert code == 0
    return {"mined": _mined(out), "positives": _positives(out)}


# ------------------------------------------------------------------------------------------------
# the API against the CLI
# ------------------------------------------------------------------------------------------------
def test_api_on_in_memory_pairs_equals_cli_on_beir_folder(cli_beir, scifact, fast_yaml, tmp_path, monkeypatch):
    import datasets

    pairs, extra = scifact
    ds = datasets.Dataset.from_dict({"question": [q for q, _ in pairs], "answer": [p for _, p in pairs],
                                     "source": ["scifact"] * len(pairs)})
    monkeypatch.setenv("RAYMINE_CACHE", str(tmp_path / "cache"))
    kw = dict(model="bm25", anchor_column_name="question", positive_column_name="answer", relative_margin=0.05,
              num_negatives=3, output_format="n-tuple", config=fast_yaml)
    mined = raymine.mine_hard_negatives(ds, extra, **kw)
    work = Path(mined.path)
    assert work.parent == tmp_path / "cache"
    got = _mined(work)
    assert got == cli_beir["mined"]
    # a repeated call finds its work folder by the inputs' key and redoes nothing
    stamp = (work / "mine" / "_manifest.json").stat().st_mtime_ns
    again = raymine.mine_hard_negatives(ds, extra, **kw)
    assert again.path == mined.path and (work / "mine" / "_manifest.json").stat().st_mtime_ns == stamp
    # repeated anchors are one query with every positive: 40 queries, 5 of them with two positives
    assert _positives(work) == cli_beir["positives"]
    assert sorted(map(len, cli_beir["positives"].values())) == [1] * 35 + [2] * 5
    assert len(got) + sum(mined.report["dropped_reasons"].values()) == 40
    # the n-tuple rows: one per (query, positive), the input's column names, negatives in mined order
    text = {text_id(t): t for t in [p for _, p in pairs] + extra + [q for q, _ in pairs]}
    hf = mined.to_hf()
    assert hf.column_names == ["question", "answer", "negative_1", "negative_2", "negative_3"]
    expected = sorted((text[q], text[p], *(text[d] for d in n)) for q, (ps, n) in got.items() for p in ps
                      if len(n) == 3)  # sentence-transformers' n-tuple: rows short of negatives left out
    assert len(expected) >= 30
    assert sorted(tuple(r.values()) for r in hf) == expected
    assert mined.ray.count() == len(expected) and len(mined.to_pandas()) == len(expected)


def test_pairs_jsonl_via_cli_groups_anchors_and_skips_evaluation(cli_beir, scifact, fast_yaml, tmp_path, caplog):
    """``ingest.format=pairs`` on jsonl with other column names and a separate corpus ingests the BEIR
    folder's queries, positives and corpus (same ids); with no test split the evaluate stage skips itself."""
    from raymine.layout import Layout
    from raymine.pipeline import _Run

    pairs, extra = scifact
    lines = [{"id": i, "prompt_text": q, "doc_text": p} for i, (q, p) in enumerate(pairs)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"title": "", "text": t}) + "\n" for t in extra))
    out = tmp_path / "out"
    overrides = [f"ingest.data={tmp_path / 'pairs.jsonl'}", "ingest.format=pairs", "ingest.anchor_column=prompt_text",
                 "ingest.positive_column=doc_text", f"ingest.corpus={tmp_path / 'corpus.jsonl'}", *MINE_OVERRIDES]
    # the embed stage has nothing to do for BM25: this runs the pairs conversion and the ingest only
    assert cli.main(["run", "--config", str(fast_yaml), "--stages", "embed", "--output", str(out), *overrides]) == 0
    assert _positives(out) == cli_beir["positives"]
    ids = pq.read_table(out / "ingest" / "corpus").column(C.DOC_ID).to_pylist()
    assert sorted(ids) == sorted({text_id(p) for _, p in pairs} | {text_id(t) for t in extra})
    manifest = json.loads((out / "pairs" / "_manifest.json").read_text())
    assert manifest["counts"] | {"rows": 45} == {"rows": 45, "pairs": 45, "queries": 40, "passages": 120,
                                                 "qrels": 45, "max_positives": 2, "corpus_rows": EXTRA_DOCS}
    cfg = load_config(fast_yaml, [*overrides, f"output={out}"])
    run = _Run(cfg, Layout(str(out)))
    with caplog.at_level(logging.WARNING, logger="raymine.pipeline"):
        run.evaluate()
    assert "has no test split" in run.report["evaluate_skipped"]
    assert any("evaluate: skipped" in r.getMessage() for r in caplog.records)
    assert not (out / "evaluate").exists()


def test_pairs_with_a_missing_column_exit_2_with_one_line(ray_local, fast_yaml, tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text('{"q": "a question", "p": "a passage"}\n')
    code = cli.main(["run", "--config", str(fast_yaml), "--stages", "embed", "--output", str(tmp_path / "out"),
                     f"ingest.data={tmp_path / 'pairs.jsonl'}", "ingest.format=pairs", "ingest.anchor_column=query"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: stage ingest: {tmp_path / 'pairs.jsonl'}: no anchor column "
                                            f"'query'; columns are ['q', 'p']")


def test_fingerprints_follow_content_not_row_order(ray_local):
    import pandas as pd
    import ray.data

    from raymine.pairs import PairsInput, fingerprint

    df = pd.DataFrame({"q": ["a", "b", "c"], "p": ["x", "y", "z"]})
    assert PairsInput.of(df).columns == PairsInput.of(ray.data.from_pandas(df)).columns  # q, p
    shuffled, changed = df.iloc[[2, 0, 1]], df.assign(p=["x", "y", "w"])
    assert fingerprint(df) == fingerprint(shuffled) != fingerprint(changed)
    ray_fp = [fingerprint(ray.data.from_pandas(f)) for f in (df, shuffled, changed)]
    assert ray_fp[0] == ray_fp[1] != ray_fp[2]


# ------------------------------------------------------------------------------------------------
# against sentence-transformers' own mine_hard_negatives
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_positive(scifact):
    import datasets

    pairs, extra = scifact
    first = dict(reversed(pairs))  # query → its first positive
    first = {q: first[q] for q in dict.fromkeys(q for q, _ in pairs)}
    return datasets.Dataset.from_dict({"query": list(first), "answer": list(first.values())}), extra


@pytest.fixture(scope="module")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="module")
def raymine_minilm(ray_local, one_positive, st_model, fast_yaml, tmp_path_factory):
    ds, extra = one_positive
    work = tmp_path_factory.mktemp("minilm")
    return raymine.mine_hard_negatives(ds, extra, model=st_model, relative_margin=0.05, num_negatives=3,
                                       output_format="n-tuple", config=fast_yaml, work_dir=str(work / "run"))


@pytest.mark.slow  # ~35 s on 2 cores: a dense-teacher pipeline run (MiniLM actors)
def test_same_negatives_as_sentence_transformers(raymine_minilm, one_positive, st_model):
    """Tie rule: raymine breaks equal scores by doc id, sentence-transformers by corpus position; the
    comparison is exact, and every reference list is checked to have no tie (scores 1e-6 apart or more)."""
    from sentence_transformers.util import mine_hard_negatives as st_mine

    ds, extra = one_positive
    n_passages = len(set(ds["answer"]) | set(extra))
    ref = st_mine(ds, st_model, corpus=extra, range_max=n_passages, relative_margin=0.05, num_negatives=3,
                  output_format="n-tuple", output_scores=True, use_faiss=False, verbose=False)
    ours = raymine_minilm.to_hf()
    assert ours.column_names == ["query", "answer", "negative_1", "negative_2", "negative_3"]
    negs = [f"negative_{i}" for i in (1, 2, 3)]
    want = {r["query"]: (r["answer"], *(r[c] for c in negs)) for r in ref}
    got = {r["query"]: (r["answer"], *(r[c] for c in negs)) for r in ours}
    assert len(want) >= 30 and got == want
    for r in ref:
        s = r["scores"][1:]
        assert all(a - b >= 1e-6 for a, b in zip(s, s[1:], strict=False)), s


@pytest.mark.slow  # ~35 s on 2 cores: a dense-teacher pipeline run (MiniLM actors)
def test_sentence_transformers_user_snippet_trains_one_step(raymine_minilm, minilm_path, tmp_path):
    """load a dataset → raymine.mine_hard_negatives → SentenceTransformerTrainer with MNRL, one step."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(minilm_path, device="cpu")
    before = next(model.parameters()).detach().clone()
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "st"), max_steps=1,
                                                per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                                save_strategy="no", logging_strategy="no")
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=raymine_minilm.to_hf(),
                                         loss=MultipleNegativesRankingLoss(model))
    out = trainer.train()
    assert out.global_step == 1
    assert not next(model.parameters()).detach().equal(before)


# ------------------------------------------------------------------------------------------------
# pure parts: the argument mapping, columns, ids, blocks
# ------------------------------------------------------------------------------------------------
def _map(**kw):
    return st_mine_settings(MineConfig(), SearchConfig(), **{"num_negatives": 3, **kw})


def test_sentence_transformers_arguments_map_onto_the_methods():
    m, s = _map()
    assert (m.method, m.sampling, m.num_negatives, s.use_ceiling, s.depth) == ("naive", "top", 3, True, 0)
    m, _ = _map(relative_margin=0.05)
    assert (m.method, m.pos_reduce) == ("percpos", "min") and m.perc == pytest.approx(0.95, abs=1e-15)
    m, _ = _map(absolute_margin=0.1)
    assert (m.method, m.margin, m.pos_reduce) == ("marginpos", 0.1, "min")
    m, _ = _map(max_score=0.8)
    assert (m.method, m.abs_threshold) == ("abs", 0.8)
    m, _ = _map(range_min=10)
    assert (m.method, m.shift) == ("shifted", 10)
    # the window of raw ranks, positives included; "random" samples from it
    m, s = _map(relative_margin=0.05, range_max=50, range_min=0, sampling_strategy="random", max_positives=2)
    assert (s.use_ceiling, s.depth, m.sampling, m.sample_top_k, m.sample_weighting) == (False, 52, "sampled", 50,
                                                                                        "uniform")
    m, _ = _map(sampling_strategy="random", relative_margin=0.05, max_positives=3)  # derived range_max = 30 + 3
    assert m.sample_top_k == 33
    m, _ = _map(method="percpos", keep_method=True)
    assert m.method == "percpos" and m.perc == MineConfig().perc


@pytest.mark.parametrize("kw, words", [
    ({"relative_margin": 0.05, "absolute_margin": 0.1}, "one filter rule"),
    ({"relative_margin": 0.05, "range_min": 5}, "one filter rule"),
    ({"method": "abs", "max_score": 0.5}, "raymine's own filter"),
    ({"relative_margin": 1.0}, "[0, 1)"),
    ({"num_negatives": 0}, "at least 1"),
    ({"range_min": 5, "range_max": 5}, "smaller than range_max"),
    ({"range_max": 4, "num_negatives": 5}, "cannot mine 5 negatives"),
])
def test_argument_errors_name_the_argument(kw, words):
    with pytest.raises(ApiError) as e:
        _map(**kw)
    assert words in str(e.value)


def test_bad_api_arguments_are_user_errors_before_any_work():
    with pytest.raises(ApiError, match="output_format"):
        raymine.mine_hard_negatives(None, output_format="pairs")
    with pytest.raises(ApiError, match="not raymine export formats"):
        raymine.mine_hard_negatives(None, exports=["jsonl"])
    with pytest.raises(ApiError, match="not both"):
        raymine.mine_hard_negatives(None, model="bm25", teachers=["bm25"])


def test_columns_default_to_first_and_second_and_must_exist():
    cols = resolve_columns(["q", "p", "x"], None, None, None, "f")
    assert (cols.anchor, cols.positive, cols.id) == ("q", "p", "")
    cols = resolve_columns(["qid", "q", "p"], None, None, "qid", "f")  # an id column is not the anchor
    assert (cols.anchor, cols.positive, cols.id) == ("q", "p", "qid")
    cols = resolve_columns(["a", "b", "c"], "c", None, None, "f")
    assert (cols.anchor, cols.positive) == ("c", "a")
    with pytest.raises(PairsError, match="no positive column 'answer'; columns are"):
        resolve_columns(["q", "p"], None, "answer", None, "pairs.jsonl")
    with pytest.raises(PairsError, match="two text columns"):
        resolve_columns(["q"], None, None, None, "pairs.jsonl")


def test_ids_are_blake2b_of_the_exact_text_and_list_positives_explode():
    assert text_id("héllo") == hashlib.blake2b("héllo".encode(), digest_size=12).hexdigest()
    assert text_id("a") != text_id("A") != text_id("a ")
    batch = pa.table({"q": ["what", "why", None], "pos": [["x", "y"], ["z"], ["w"]], "n": [1, 2, 3]})
    t = pairs_block(batch, "q", "pos", "")
    assert t.column(C.QUERY).to_pylist() == ["what", "what", "why", ""]
    assert t.column(C.PASSAGE).to_pylist() == ["x", "y", "z", "w"]
    assert t.column(C.QUERY_ID).to_pylist() == [text_id("what")] * 2 + [text_id("why"), text_id("")]
    assert t.column(C.DOC_ID).to_pylist() == [text_id(x) for x in "xyzw"]
    t = pairs_block(batch, "q", "pos", "n")  # a given id column, cast to string
    assert t.column(C.QUERY_ID).to_pylist() == ["1", "1", "2", "3"]
    t = pairs_block(pa.table({"pos": ["x"]}), "q", "pos", "")  # a block without the anchor key: blank text
    assert t.column(C.QUERY).to_pylist() == [""] and t.column(C.QUERY_ID).to_pylist() == [text_id("")]


def test_a_result_without_rows_is_an_empty_table_of_the_layout(tmp_path):
    from raymine.api import MinedDataset

    schema = pa.schema([("anchor", pa.string()), ("positive", pa.string()), ("negative", pa.string())])
    empty = MinedDataset(path=str(tmp_path), output_format="triplet", report={}, rename={"anchor": "q"},
                         exports={"st_triplet": str(tmp_path / "exports" / "st_triplet")}, schema=schema)
    hf = empty.to_hf()
    assert hf.column_names == ["q", "positive", "negative"] and len(hf) == 0 and len(empty) == 0


def test_model_folder_maps_to_its_sentence_transformers_encoding(minilm_path, st_model):
    from raymine.api import teacher_from_model

    t = teacher_from_model(minilm_path)
    assert (t.model, t.pooling, t.query_max_length, t.passage_max_length) == (minilm_path, "mean", 256, 256)
    s = teacher_from_model(st_model)
    assert (s.pooling, s.query_max_length, s.normalize, s.query_prompt, s.passage_prompt) == ("mean", 256, True, "", "")
    assert teacher_from_model("bm25") == TeacherConfig(kind="bm25")
