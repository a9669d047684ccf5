"""Export stage: ids joined to corpus texts with Ray Data; every layout checked against an independent
reference built here from a plain {id: text} dict, loaded by the library that reads it, and independent
of how the inputs are split into files and blocks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from raymine import columns as C
from raymine.config import Config, ConfigError, ExportConfig, MineConfig, TrainConfig
from raymine.export import FORMATS, explode_ids, export_stage, regroup_texts
from raymine.layout import Layout

TITLES = {"d1": "Aspirin", "d2": "", "d3": "Café", "d4": None, "d5": "Heart", "d6": "", "d7": "Lung",
          "d8": "", "d9": "Bone", "d10": "", "d11": "Skin", "d12": ""}
TEXTS = {d: f"passage {d} about {'naïve ' if d == 'd3' else ''}topic {i}" for i, d in enumerate(TITLES)}


def passage(d: str) -> str:
    """Independent of ingest.passage_text: title + ' ' + text when there is a title."""
    t = TITLES[d]
    return f"{t} {TEXTS[d]}" if t else TEXTS[d]


# query_id, teacher, query, positives, positive scores, negatives, negative scores
MINED = [
    ("q1", "minilm", "what is aspirin", ["d1"], [0.9], ["d2", "d3", "d4"], [0.8, 0.7, 0.6]),
    ("q2", "minilm+bm25", "heart disease", ["d5", "d6"], [0.85, 0.83], ["d7", "d8"], [0.5, 12.0]),
    ("q3", "bm25", "bone density", ["d9"], [15.0], ["d10", "missing1"], [10.0, 9.0]),  # 1 negative with text
    ("q4", "minilm", "lost positive", ["missing2"], [0.7], ["d2", "d3"], [0.6, 0.5]),
    ("q5", "minilm", "skin", ["d11", "missing3"], [0.9, 0.8], ["d12", "d1", "d3"], [0.7, 0.65, 0.6]),
    ("q6", "bm25", "short", ["d4"], [11.0], ["d5"], [9.0]),
    ("q7", "bm25", "bm25 only", ["d7"], [13.0], ["d1", "d2"], [8.0, 7.5]),
]
MIN_NEG = 2
EXPORTED = {"q1", "q2", "q5", "q7"}
DROPPED = {"q3": "too_few_negatives", "q4": "no_positive_text", "q6": "too_few_negatives"}


def _mined_table() -> pa.Table:
    cols = list(zip(*MINED, strict=True))
    return pa.table({
        C.QUERY_ID: pa.array(cols[0], pa.string()), C.TEACHER: pa.array(cols[1], pa.string()),
        C.QUERY: pa.array(cols[2], pa.string()),
        C.POSITIVE_IDS: pa.array(cols[3], pa.list_(pa.string())),
        C.POSITIVE_SCORES: pa.array(cols[4], pa.list_(pa.float32())),
        C.NEGATIVE_IDS: pa.array(cols[5], pa.list_(pa.string())),
        C.NEGATIVE_SCORES: pa.array(cols[6], pa.list_(pa.float32())),
        C.METHOD: pa.array(["percpos(0.95)/top"] * len(MINED), pa.string()),
        C.NUM_SHORT: pa.array([0] * len(MINED), pa.int32()),
    })


def _write_parts(table: pa.Table, folder: Path, n_parts: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    step = math.ceil(table.num_rows / n_parts)
    for i in range(n_parts):
        pq.write_table(table.slice(i * step, step), folder / f"part-{i:03d}.parquet")


def _make_run(root: Path, n_parts: int = 1, corpus_folder: bool = True) -> Layout:
    layout = Layout(str(root))
    ids = list(TITLES)
    if corpus_folder:  # the ingest rewrite's layout: a folder with the passage written once
        corpus = pa.table({C.DOC_ID: ids, C.TITLE: [TITLES[d] for d in ids], C.TEXT: [TEXTS[d] for d in ids],
                           C.PASSAGE: [passage(d) for d in ids]})
        _write_parts(corpus, Path(layout.corpus), max(1, n_parts))
    else:  # today's single file without the passage column
        Path(layout.ingest).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({C.DOC_ID: ids, C.TITLE: [TITLES[d] for d in ids], C.TEXT: [TEXTS[d] for d in ids]}),
                       layout.corpus + ".parquet")
    _write_parts(_mined_table(), Path(layout.mined), n_parts)
    return layout


def _cfg(root: Path, **export) -> Config:
    """The optional cut ``export.num_negatives=MIN_NEG`` unless given (0: every mined negative, the default)."""
    return Config(output=str(root), mine=MineConfig(num_negatives=4), train=TrainConfig(num_hard_negatives=MIN_NEG),
                  export=ExportConfig(**{"num_negatives": MIN_NEG, **export}))


def _read(layout: Layout, fmt: str) -> list[dict]:
    folder = Path(layout.exports) / fmt
    if fmt in ("flagembedding", "nemo"):
        return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text("utf-8").splitlines()]
    return pads.dataset(str(folder), format="parquet").to_table().to_pylist()


def _canon(records: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records)


# ------------------------------------------------------------------------------------------------
# Independent reference, straight from MINED and the {id: text} dict
# ------------------------------------------------------------------------------------------------
def _reference(fmt: str, score_teacher: str = "minilm", st_scores: bool = False, unscored: str = "omit",
               prompt: str = "", data_type: str = "normal") -> list[dict]:
    out = []
    for qid, teacher, query, pos, ps, neg, ns in MINED:
        if qid not in EXPORTED:
            continue
        P = [(passage(d), s) for d, s in zip(pos, ps, strict=True) if d in TITLES]
        N = [(passage(d), s) for d, s in zip(neg, ns, strict=True) if d in TITLES]
        scored = teacher == score_teacher
        f32 = lambda x: float(f"{float(pa.scalar(x, pa.float32()).as_py()):.7g}")  # noqa: E731
        if fmt == "flagembedding":
            if unscored == "drop" and not scored:
                continue
            line = {"query": query, "pos": [p for p, _ in P], "neg": [n for n, _ in N]}
            if scored:  # scores only where they are real; no key (never null) otherwise
                line.update(pos_scores=[f32(s) for _, s in P], neg_scores=[f32(s) for _, s in N])
            line.update({"prompt": prompt} if prompt else {})  # an empty prompt would override the CLI's
            line.update({"type": data_type} if data_type else {})
            out.append(line)
            continue
        if fmt == "nemo":
            out += [{"query": query, "pos_doc": p, "neg_doc": [n for n, _ in N]} for p, _ in P]
            continue
        if st_scores and not scored:
            continue
        for p, sp in P:
            if fmt == "st_ntuple":
                r = {"anchor": query, "positive": p, **{f"negative_{j + 1}": N[j][0] for j in range(MIN_NEG)}}
                if st_scores:
                    r["scores"] = [sp] + [s for _, s in N[:MIN_NEG]]
                out.append(r)
            elif fmt == "st_triplet":
                for n, sn in N:
                    out.append({"anchor": query, "positive": p, "negative": n, **({"scores": [sp, sn]} if st_scores else {})})
            elif fmt == "st_labeled_list":
                r = {"anchor": query, "documents": [p] + [n for n, _ in N]}
                r.update({"scores": [sp] + [s for _, s in N]} if st_scores else {"labels": [1] + [0] * len(N)})
                out.append(r)
            elif fmt == "st_labeled_pair":
                out.append({"anchor": query, "document": p, **({"score": sp} if st_scores else {"label": 1})})
        if fmt == "st_labeled_pair":
            out += [{"anchor": query, "document": n, **({"score": s} if st_scores else {"label": 0})} for n, s in N]
    return out


def _close(a: list[dict], b: list[dict]) -> bool:
    """Equal records, float32 scores compared to 1e-6 (Parquet float32 vs Python float)."""
    def norm(x):
        if isinstance(x, float):
            return round(x, 5)
        if isinstance(x, list):
            return [norm(v) for v in x]
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        return x
    return _canon([norm(r) for r in a]) == _canon([norm(r) for r in b])


# ------------------------------------------------------------------------------------------------
# Pure steps
# ------------------------------------------------------------------------------------------------
def test_explode_ids_on_a_sliced_table_keeps_slots_and_keys():
    t = _mined_table().slice(2, 3)  # q3, q4, q5: offsets that do not start at 0
    e = explode_ids(t).to_pylist()
    got = {(r[C.QUERY_ID], r["_role"], r["_slot"]): r[C.DOC_ID] for r in e}
    want = {}
    for qid, _, _, pos, _, neg, _ in MINED[2:5]:
        want.update({(qid, 0, j): d for j, d in enumerate(pos)})
        want.update({(qid, 1, j): d for j, d in enumerate(neg)})
    assert got == want and len(e) == len(want)


def test_regroup_texts_orders_by_slot_and_rejects_duplicate_ids():
    g = pa.table({C.QUERY_ID: ["q"] * 3, C.TEACHER: ["t"] * 3, "_role": pa.array([1, 0, 1], pa.int8()),
                  "_slot": pa.array([1, 0, 0], pa.int32()), C.DOC_ID: ["b", "a", "c"], C.PASSAGE: ["B", "A", None]})
    r = regroup_texts(g).to_pylist()[0]
    assert r["_positive_texts"] == ["A"] and r["_negative_texts"] == [None, "B"]
    dup = pa.concat_tables([g, g.slice(1, 1)])
    with pytest.raises(ValueError, match="duplicate doc_id"):
        regroup_texts(dup)


def test_config_rejects_unknown_score_teacher_and_too_many_negatives(tmp_path):
    with pytest.raises(ConfigError, match="export.score_teacher"):
        _cfg(tmp_path, score_teacher="nope")
    with pytest.raises(ConfigError, match="export.num_negatives"):
        _cfg(tmp_path, num_negatives=5)


# ------------------------------------------------------------------------------------------------
# The stage on Ray (three runs in all: Ray Data start-up dominates on 2 cores)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(ray_local, tmp_path_factory) -> tuple[Layout, dict]:
    """The default export config on a 2-file mined table and a 2-file corpus folder."""
    root = tmp_path_factory.mktemp("export_default")
    layout = _make_run(root, n_parts=2)
    return layout, export_stage(_cfg(root), layout)


def test_every_format_equals_the_reference_and_every_query_is_accounted_for(default_run):
    layout, m = default_run
    c = m["counts"]
    assert c["mined_rows"] == len(MINED) and c["exported_rows"] == len(EXPORTED)
    assert c["dropped"] == {"no_query_text": 0, "no_positive_text": 1, "too_few_negatives": 2}
    assert c["missing_texts"] == 3 and c["min_negatives"] == MIN_NEG and c["score_teacher"] == "minilm"
    for fmt in FORMATS:
        got, want = _read(layout, fmt), _reference(fmt)
        assert _close(got, want), fmt
        assert c["formats"][fmt]["records"] == len(want) and c["formats"][fmt]["rows"] == len(EXPORTED)
    dropped = pads.dataset(str(Path(layout.exports) / "dropped"), format="parquet").to_table().to_pylist()
    assert {r[C.QUERY_ID]: r[C.REASON] for r in dropped} == DROPPED
    # exported and dropped partition the mined rows
    assert EXPORTED | set(DROPPED) == {r[0] for r in MINED} and not EXPORTED & set(DROPPED)
    # done: the same call is skipped
    assert export_stage(_cfg(Path(layout.root)), layout)["finished_at"] == m["finished_at"]
    # FlagEmbedding with unscored=omit (default): every exported row is a line, without score keys where the
    # row's negatives come from several teachers or from a teacher other than score_teacher (minilm)
    lines = _read(layout, "flagembedding")
    assert {ln["query"] for ln in lines if "pos_scores" not in ln} == {"heart disease", "bm25 only"}
    assert all("prompt" not in ln and ln["type"] == "normal" for ln in lines)  # no prompt configured: no key


def test_result_is_independent_of_files_blocks_and_partitions(default_run, tmp_path, monkeypatch):
    a, _ = default_run  # 2 files, 4 join partitions, one batch, joins in one task (small inputs)
    b = _make_run(tmp_path, n_parts=1)
    monkeypatch.setenv("RAYMINE_LOCAL_JOIN_BYTES", "0")  # b: Ray Data's distributed joins
    export_stage(_cfg(tmp_path, join_partitions=1, rows_per_part=1), b)  # 1 file, 1 partition, 1 row a batch
    for fmt in FORMATS:
        assert _canon(_read(a, fmt)) == _canon(_read(b, fmt)), fmt
    assert len(list((Path(b.exports) / "nemo").glob("*.jsonl"))) > 1  # several worker parts


SCORED_FORMATS = tuple(f for f in FORMATS if f != "st_labeled_pair")


@pytest.fixture(scope="module")
def scored_run(ray_local, tmp_path_factory) -> tuple[Layout, dict]:
    """score_teacher=bm25 with scores required everywhere; the corpus is the single-file ingest output
    without a passage column (passage built from title + text); st_labeled_pair not asked for."""
    root = tmp_path_factory.mktemp("export_scored")
    layout = _make_run(root, corpus_folder=False)
    cfg = _cfg(root, formats=SCORED_FORMATS, score_teacher="bm25", st_scores=True, unscored="drop",
               prompt="Given a claim: ", data_type="normal")
    return layout, export_stage(cfg, layout)


def test_scores_come_from_one_teacher_and_single_parquet_corpus_without_passage(scored_run):
    layout, m = scored_run
    c = m["counts"]
    assert not (Path(layout.exports) / "st_labeled_pair").exists() and set(c["formats"]) == set(SCORED_FORMATS)
    for fmt in SCORED_FORMATS:
        want = _reference(fmt, score_teacher="bm25", st_scores=True, unscored="drop", prompt="Given a claim: ")
        assert _close(_read(layout, fmt), want), fmt
    # only q7 is wholly bm25 among the exported rows
    assert c["formats"]["flagembedding"]["rows"] == 1 and c["formats"]["flagembedding"]["no_teacher_scores"] == 3
    assert c["formats"]["nemo"]["no_teacher_scores"] == 0 and c["formats"]["nemo"]["rows"] == 4
    dropped = pads.dataset(str(Path(layout.exports) / "dropped"), format="parquet").to_table().to_pylist()
    assert {(r[C.QUERY_ID], r["format"]) for r in dropped if r[C.REASON] == "no_teacher_scores"} == {
        (q, f) for q in ("q1", "q2", "q5") for f in ("flagembedding", "st_ntuple", "st_triplet", "st_labeled_list")}


def test_flagembedding_lines_follow_its_data_format(scored_run, tmp_path):
    """FlagEmbedding's loader: datasets.load_dataset('json') over the folder's .jsonl files, then per line
    (AbsEmbedderTrainDataset.__getitem__): query str, pos/neg lists, and with knowledge distillation
    pos_scores/neg_scores numeric lists indexed like pos/neg; prompt str; type str."""
    import datasets

    layout, m = scored_run
    single = m["counts"]["formats"]["flagembedding"]["file"]  # what --train_data names
    assert single == str(Path(layout.exports) / "flagembedding.jsonl")
    ds = datasets.load_dataset("json", data_files=single, split="train", cache_dir=str(tmp_path / "hf"))
    assert set(ds.column_names) == {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "type"}
    assert ds["query"] == ["bm25 only"]  # q7: the one exported row wholly from bm25
    for row in ds:
        assert isinstance(row["query"], str) and row["query"]
        assert isinstance(row["pos"], list) and row["pos"] and all(isinstance(p, str) for p in row["pos"])
        assert isinstance(row["neg"], list) and len(row["neg"]) >= MIN_NEG
        assert len(row["pos_scores"]) == len(row["pos"]) and len(row["neg_scores"]) == len(row["neg"])
        teacher_scores = [row["pos_scores"][0]] + [row["neg_scores"][j] for j in range(len(row["neg"]))]
        assert all(isinstance(s, (int, float)) for s in teacher_scores)
        assert max(row["neg_scores"]) < min(row["pos_scores"])  # one teacher's scale: negatives below positives
        assert row["prompt"] == "Given a claim: " and row["type"] == "normal"


def test_jsonl_layouts_are_also_one_file_each(default_run, tmp_path):
    """NeMo AutoModel's inline loader opens files (``data_dir_list``), FlagEmbedding's ``--train_data`` a file:
    ``exports/<format>.jsonl`` holds exactly the lines of the format's parts; the Parquet layouts stay folders."""
    import datasets

    layout, m = default_run
    ex = Path(layout.exports)
    assert sorted(p.name for p in ex.glob("*.jsonl")) == ["flagembedding.jsonl", "nemo.jsonl"]
    for fmt in ("flagembedding", "nemo"):
        assert m["counts"]["formats"][fmt]["file"] == str(ex / f"{fmt}.jsonl")
        single = [json.loads(x) for x in (ex / f"{fmt}.jsonl").read_text("utf-8").splitlines()]
        assert _canon(single) == _canon(_read(layout, fmt)) and _close(single, _reference(fmt)), fmt
        assert len(single) == m["counts"]["formats"][fmt]["records"]
        assert not list(ex.glob(f"{fmt}.jsonl.tmp"))
    assert all("file" not in m["counts"]["formats"][f] for f in FORMATS if f.startswith("st_"))
    # FlagEmbedding's reading of the default file (unscored=omit, no prompt): no null anywhere in a line, and
    # no 'prompt' column, so its --query_instruction_for_retrieval applies; without --knowledge_distillation
    # it drops the score columns (rows of other teachers read as None there, never as a null in the file)
    text = (ex / "flagembedding.jsonl").read_text("utf-8")
    assert "null" not in text and '"prompt"' not in text
    ds = datasets.load_dataset("json", data_files=str(ex / "flagembedding.jsonl"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert "prompt" not in ds.column_names and {"pos_scores", "neg_scores"} <= set(ds.column_names)
    scored = {r["query"]: r["pos_scores"] for r in ds}
    assert scored["what is aspirin"] == pytest.approx([0.9]) and scored["heart disease"] is None


def test_flagembedding_line_keys_follow_the_config():
    """Pure: a prompt key only when one is set; score keys only with the score teacher's scores."""
    from raymine.export import ExportPlan, _Row, flagembedding_record

    plan = ExportPlan(formats=("flagembedding",), min_negatives=1, ntuple_width=1, score_teacher="t",
                      unscored="omit", st_scores=False, prompt="", data_type="")
    row = _Row(qid="q", teacher="t", query="Q", pos=["P"], neg=["N"], pos_scores=None, neg_scores=None, missing=0)
    assert flagembedding_record(row, plan) == {"query": "Q", "pos": ["P"], "neg": ["N"]}
    scored = _Row(qid="q", teacher="t", query="Q", pos=["P"], neg=["N"], pos_scores=[0.5], neg_scores=[0.25],
                  missing=0)
    with_prompt = ExportPlan(**{**plan.__dict__, "prompt": "Represent: ", "data_type": "normal"})
    assert flagembedding_record(scored, with_prompt) == {
        "query": "Q", "pos": ["P"], "neg": ["N"], "pos_scores": [0.5], "neg_scores": [0.25],
        "prompt": "Represent: ", "type": "normal"}


def test_nemo_lines_follow_the_customizer_embedding_format(default_run):
    layout, _ = default_run
    lines = _read(layout, "nemo")
    assert lines and all(set(ln) == {"query", "pos_doc", "neg_doc"} for ln in lines)
    for ln in lines:
        assert isinstance(ln["query"], str) and isinstance(ln["pos_doc"], str)
        assert isinstance(ln["neg_doc"], list) and len(ln["neg_doc"]) >= MIN_NEG
        assert all(isinstance(d, str) and d for d in ln["neg_doc"])


def test_sentence_transformers_loads_every_layout_and_trains_one_step(default_run, tmp_path, minilm_path):
    """datasets.load_dataset('parquet') on each layout; one MultipleNegativesRankingLoss step on the n-tuple
    and the triplet exports with the packaged MiniLM (weights move, loss finite)."""
    import datasets
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    layout, _ = default_run
    loaded = {}
    for fmt in ("st_ntuple", "st_triplet", "st_labeled_pair", "st_labeled_list"):
        files = sorted(str(p) for p in (Path(layout.exports) / fmt).glob("*.parquet"))
        loaded[fmt] = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
        assert len(loaded[fmt]) == len(_reference(fmt)), fmt
    assert loaded["st_ntuple"].column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert loaded["st_triplet"].column_names == ["anchor", "positive", "negative"]
    assert loaded["st_labeled_pair"].column_names == ["anchor", "document", "label"]
    assert loaded["st_labeled_list"].column_names == ["anchor", "documents", "labels"]

    model = SentenceTransformer(minilm_path, device="cpu")
    for fmt in ("st_ntuple", "st_triplet"):
        before = [p.detach().clone() for p in model.parameters()]
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / f"st-{fmt}"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-4,
            report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=loaded[fmt],
                                             loss=MultipleNegativesRankingLoss(model))
        out = trainer.train()
        assert out.global_step == 1 and math.isfinite(out.training_loss), fmt
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), fmt


def test_ntuple_carries_every_mined_negative_by_default_and_trains_on_its_scores(ray_local, tmp_path, minilm_path):
    """No cut (``export.num_negatives=0``, the default): the n-tuple has one column per mined negative
    (mine.num_negatives=3) and carries all of them; a row with fewer is left out of the n-tuple only and
    counted; every other layout keeps it. One sentence-transformers step with DistillKLDivLoss reads the
    scored n-tuple (scores = [positive, negative_1..3], the teacher's)."""
    import datasets
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss

    layout = _make_run(tmp_path)
    cfg = Config(output=str(tmp_path), mine=MineConfig(num_negatives=3), train=TrainConfig(num_hard_negatives=3),
                 export=ExportConfig(st_scores=True, score_teacher="minilm"))
    c = export_stage(cfg, layout)["counts"]
    assert c["ntuple_width"] == 3 and c["min_negatives"] == 1
    assert c["dropped"] == {"no_query_text": 0, "no_positive_text": 1, "too_few_negatives": 0}
    nt = c["formats"]["st_ntuple"]  # q2, q3, q6, q7 lack minilm's scores (checked first)
    assert (nt["rows"], nt["short_of_ntuple_width"], nt["no_teacher_scores"]) == (2, 0, 4)
    plain = _make_run(tmp_path / "plain")  # without scores: the same four rows are short of the width
    pc = export_stage(Config(output=str(tmp_path / "plain"), mine=MineConfig(num_negatives=3)), plain)["counts"]
    assert (pc["formats"]["st_ntuple"]["rows"], pc["formats"]["st_ntuple"]["short_of_ntuple_width"]) == (2, 4)
    short = pads.dataset(str(Path(plain.exports) / "dropped"), format="parquet").to_table().to_pylist()
    assert {(r[C.QUERY_ID], r["format"]) for r in short if r[C.REASON] == "short_of_ntuple_width"} == {
        (q, "st_ntuple") for q in ("q2", "q3", "q6", "q7")}
    rows = {r["anchor"]: r for r in _read(layout, "st_ntuple")}
    assert set(rows) == {"what is aspirin", "skin"}
    assert [rows["what is aspirin"][f"negative_{j}"] for j in (1, 2, 3)] == [passage(d) for d in ("d2", "d3", "d4")]
    assert [rows["skin"][f"negative_{j}"] for j in (1, 2, 3)] == [passage(d) for d in ("d12", "d1", "d3")]
    assert rows["skin"]["scores"] == pytest.approx([0.9, 0.7, 0.65, 0.6])
    # a layout without a fixed width keeps the short rows (q3, q6: one negative with text)
    assert {r["query"] for r in _read(layout, "nemo")} >= {"bone density", "short"}

    files = sorted(str(p) for p in (Path(layout.exports) / "st_ntuple").glob("*.parquet"))
    data = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert data.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "scores"]
    model = SentenceTransformer(minilm_path, device="cpu")
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-4,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0)
    out = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=DistillKLDivLoss(model)).train()
    assert out.global_step == 1 and math.isfinite(out.training_loss) and out.training_loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
