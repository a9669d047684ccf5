"""Train stage: schedule and input checks (no Ray), then real Ray Train runs (2 CPU workers, ~35 s start each).

CI runs two TorchTrainer pairs/runs: MiniLM DDP killed-and-resumed + sentence-transformers load, and the
tiny-Mistral 7B recipe (FSDP, LoRA, bidirectional, checkpointing) for 3 steps.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymine import columns as C
from raymine.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

TOPICS = [
    ("aspirin", "Aspirin reduces fever and mild pain by inhibiting cyclooxygenase."),
    ("insulin", "Insulin is a hormone that lowers blood glucose levels."),
    ("vaccines", "Vaccines train the immune system to recognise a pathogen."),
    ("telomeres", "Telomeres shorten each time a cell divides."),
    ("mitochondria", "Mitochondria produce most of the cell's ATP."),
    ("ribosomes", "Ribosomes translate messenger RNA into protein."),
    ("neurons", "Neurons transmit signals with action potentials."),
    ("antibiotics", "Antibiotics kill bacteria but not viruses."),
]


def write_mined(folder: Path, queries: int = 12, negatives: int = 2) -> tuple[str, str]:
    """A hand-made mined table (ids only) + corpus: every second query has two positives (sibling rows).

    Query i is about topic i % 8; its positives are doc ``p{i}`` (and ``p{i}b``), its negatives the next
    topics' docs ``n{i}_{k}``. Returns (mined folder, corpus file with TITLE/TEXT).
    """
    ids, titles, texts = [], [], []
    rows = {C.QUERY_ID: [], C.QUERY: [], C.POSITIVE_IDS: [], C.NEGATIVE_IDS: []}
    for i in range(queries):
        name, text = TOPICS[i % len(TOPICS)]
        pos = [f"p{i}"] + ([f"p{i}b"] if i % 2 == 0 else [])
        for j, p in enumerate(pos):
            ids.append(p)
            titles.append(name)
            texts.append(text + (f" Study {i}." if j == 0 else f" Another study {i}."))
        negs = []
        for k in range(negatives):
            ids.append(f"n{i}_{k}")
            titles.append("")
            texts.append(TOPICS[(i + k + 1) % len(TOPICS)][1] + f" Note {i}.")
            negs.append(f"n{i}_{k}")
        rows[C.QUERY_ID].append(f"q{i}")
        rows[C.QUERY].append(f"what does {name} do? (variant {i})")
        rows[C.POSITIVE_IDS].append(pos)
        rows[C.NEGATIVE_IDS].append(negs)
    (folder / "mined").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "mined" / "part-0.parquet")
    pq.write_table(pa.table({C.DOC_ID: ids, C.TITLE: titles, C.TEXT: texts}), folder / "corpus.parquet")
    return str(folder / "mined"), str(folder / "corpus.parquet")


def test_lr_schedule_is_transformers_named_schedule():
    """linear: s/w during warm-up, then (T - s)/(T - w); cosine: 0.5 (1 + cos(pi progress)) — written out."""
    import math

    from raymine.train import make_scheduler

    def lrs(name, w, total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched = make_scheduler(opt, TrainConfig(lr_scheduler=name, warmup_steps=w), total)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert lrs("linear", 4, 10) == pytest.approx([2 * s / 4 for s in range(4)] + [2 * (10 - s) / 6 for s in range(4, 10)])
    cos = [2 * s / 2 if s < 2 else 2 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(8)]
    assert lrs("cosine", 2, 8) == pytest.approx(cos)
    with pytest.raises(ValueError, match="lr_scheduler"):
        lrs("no-such-schedule", 1, 4)


def test_positive_aware_rule_from_config():
    from raymine.config import MineConfig
    from raymine.train import positive_aware_rule

    assert positive_aware_rule(TrainConfig()) is None
    assert positive_aware_rule(TrainConfig(positive_aware="perc", positive_aware_perc=0.9)) == ("perc", 0.9)
    assert positive_aware_rule(TrainConfig(positive_aware="margin", positive_aware_margin=0.1)) == ("margin", 0.1)
    mine = TrainConfig(positive_aware="mine")
    assert positive_aware_rule(mine, MineConfig(method="percpos", perc=0.95)) == ("perc", 0.95)
    assert positive_aware_rule(mine, MineConfig(method="marginpos", margin=0.05)) == ("margin", -0.05)
    with pytest.raises(ValueError, match="percpos or marginpos"):
        positive_aware_rule(mine, MineConfig(method="naive"))
    with pytest.raises(ValueError, match="mine_cfg"):
        positive_aware_rule(mine)


def test_shipped_train_configs_load():
    big = load_config(ROOT / "configs" / "nv_retriever_v1_mistral7b.yaml").train
    assert (big.model, big.bidirectional, big.pooling, big.lora_r, big.lora_alpha) == (
        "mistralai/Mistral-7B-v0.1", True, "mean", 16, 32)
    assert (big.query_max_length, big.passage_max_length, big.lr, big.warmup_steps) == (192, 512, 1e-5, 100)
    assert (big.batch_size, big.grad_accum, big.num_hard_negatives, big.dtype, big.strategy) == (
        32, 4, 1, "bfloat16", "fsdp")
    assert big.gradient_checkpointing and big.use_gpu and big.query_prompt and big.passage_prompt == "passage: "
    small = load_config(ROOT / "configs" / "minilm_cpu_train.yaml").train
    assert small.strategy == "ddp" and not small.use_gpu


def test_collate_layout_and_id_keys(minilm_path):
    from raymine.loss import id_keys
    from raymine.model import BiEncoder
    from raymine.train import Collate
    from raymine.train_data import draw_negatives

    m = BiEncoder.from_config(TrainConfig(model=minilm_path, query_max_length=16, passage_max_length=32))
    batch = pa.table({C.QUERY_ID: ["qa", "qa", "qb"], C.QUERY: ["q a", "q a", "q b"],
                      C.POSITIVE_ID: ["d1", "d2", "d3"], C.POSITIVE: ["pa1", "pa2", "pb"],
                      C.POSITIVE_IDS: [["d1", "d2"], ["d1", "d2"], ["d3"]],
                      C.NEGATIVE_IDS: [["x", "y", "z"], ["x", "y", "z"], ["u", "v"]],
                      C.NEGATIVES: [["nx", "ny", "nz"], ["nx", "ny", "nz"], ["nu", "pa1"]]})
    out = Collate(m, 2, seed=5)(batch, epoch=1)
    drawn = [draw_negatives(5, 1, q, p, n, 2) for q, p, n in (("qa", "d1", "xyz"), ("qa", "d2", "xyz"), ("qb", "d3", "uv"))]
    neg_text = {"x": "nx", "y": "ny", "z": "nz", "u": "nu", "v": "pa1"}
    picked = [["xyz"[k] for k in drawn[0]], ["xyz"[k] for k in drawn[1]], ["u", "v"]]
    assert out["q_input_ids"].shape[0] == 3 and out["p_input_ids"].shape[0] == 3 + 6  # positives, drawn negatives
    texts = m.tokenizer.batch_decode(torch.cat([out["q_input_ids"][:, :8], out["p_input_ids"][:, :8]]),
                                     skip_special_tokens=True)
    assert texts == ["q a", "q a", "q b", "pa1", "pa2", "pb"] + [neg_text[d] for row in picked for d in row]
    assert torch.equal(out["pos_ids"], id_keys(["d1", "d2", "d3"]))
    assert torch.equal(out["neg_ids"], id_keys([d for row in picked for d in row]).reshape(3, 2))
    assert out["neg_valid"].all()
    assert torch.equal(out["query_pos_ids"], torch.stack([id_keys(x) for x in (["d1", "d2"], ["d1", "d2"], ["d3", "d3"])]))
    assert out["neg_keys"][2, 1] == out["pos_keys"][0]  # identical text → identical text key
    # H = 3: the short row (2 negatives) trains with both, its third slot empty and not encoded
    out3 = Collate(m, 3)(batch)
    assert out3["neg_valid"].tolist() == [[True, True, True], [True, True, True], [True, True, False]]
    assert out3["p_input_ids"].shape[0] == 3 + 8 and out3["neg_ids"][2, 2] == 0


def test_draw_negatives_uses_every_mined_negative_seeded_by_ids():
    """Each epoch a row draws min(h, n) of its n negatives; the draw depends on (seed, epoch, ids) only, so
    reordering the row's negatives or the rows changes nothing; every negative is drawn within ceil(n/h)
    epochs; a document mined twice in a row (intra-sample no-dedup) is kept twice."""
    import math
    import random

    from raymine.train_data import draw_negatives

    rng = random.Random(0)
    for n in range(0, 9):
        for h in range(1, 6):
            negs = [f"d{rng.randrange(10**6)}" for _ in range(n)]
            seen = set()
            for epoch in range(max(1, math.ceil(n / h))):
                got = [negs[i] for i in draw_negatives(7, epoch, "q", "p", negs, h)]
                assert len(got) == min(h, n) and len(set(got)) == len(got)
                shuffled = negs[:]
                rng.shuffle(shuffled)
                assert sorted(shuffled[i] for i in draw_negatives(7, epoch, "q", "p", shuffled, h)) == sorted(got)
                seen |= set(got)
            assert seen == set(negs), (n, h)
    negs = [f"d{i}" for i in range(8)]
    draws = {tuple(draw_negatives(s, e, q, "p", negs, 3)) for s in (1, 2) for e in (0, 1) for q in ("a", "b")}
    assert len(draws) > 4  # seed, epoch and query id each move the draw
    assert draw_negatives(1, 0, "a", "p", negs, 3) == draw_negatives(1, 0, "a", "p", negs, 3)
    dup = ["x", "y", "x", "z"]
    assert sorted(dup[i] for i in draw_negatives(3, 0, "q", "p", dup, 4)) == ["x", "x", "y", "z"]
    assert sorted(dup[i] for e in (0, 1) for i in draw_negatives(3, e, "q", "p", dup, 2)) == ["x", "x", "y", "z"]


def test_build_rows_joins_texts_and_counts(ray_local, tmp_path):
    """Rows per (query, positive) with texts from the corpus (TITLE/TEXT file, or a PASSAGE folder);
    a query with a missing positive text is counted and left out; one with fewer negatives (with a text)
    than the training uses is kept and counted."""
    from raymine.ingest import passage_text
    from raymine.train_data import build_rows

    mined, corpus = write_mined(tmp_path, queries=4, negatives=2)
    extra = pa.table({C.QUERY_ID: ["qx", "qy"], C.QUERY: ["x?", "y?"], C.POSITIVE_IDS: [["nope"], ["p1"]],
                      C.NEGATIVE_IDS: [["n1_0", "n1_1"], ["n1_0", "gone"]]})
    pq.write_table(extra, Path(mined) / "part-1.parquet")
    counts = build_rows(mined, corpus, str(tmp_path / "rows"), num_hard_negatives=2)
    assert {k: counts[k] for k in ("queries", "rows", "rows_short", "rows_without_negatives", "negatives",
                                   "rows_positive_missing", "negatives_missing_text")} == {
        "queries": 6, "rows": 7, "rows_short": 1, "rows_without_negatives": 0, "negatives": 13,
        "rows_positive_missing": 1, "negatives_missing_text": 1}
    got = sorted(pq.read_table(tmp_path / "rows").to_pylist(), key=lambda r: (r[C.QUERY_ID], r[C.POSITIVE_ID]))
    assert [(r[C.QUERY_ID], r[C.POSITIVE_ID]) for r in got] == [("q0", "p0"), ("q0", "p0b"), ("q1", "p1"), ("q2", "p2"),
                                                                 ("q2", "p2b"), ("q3", "p3"), ("qy", "p1")]
    corpus_t = pq.read_table(corpus).to_pylist()
    text = {r[C.DOC_ID]: passage_text(r[C.TITLE], r[C.TEXT]) for r in corpus_t}
    for r in got:
        assert r[C.POSITIVE] == text[r[C.POSITIVE_ID]]
        assert r[C.NEGATIVES] == [text[n] for n in r[C.NEGATIVE_IDS]]
    assert got[0][C.POSITIVE_IDS] == got[1][C.POSITIVE_IDS] == ["p0", "p0b"]
    assert got[0][C.NEGATIVE_IDS] == ["n0_0", "n0_1"]
    # a corpus folder with a PASSAGE column is used as is
    (tmp_path / "corpus2").mkdir()
    pq.write_table(pa.table({C.DOC_ID: list(text), C.PASSAGE: [f"P:{v}" for v in text.values()]}),
                   tmp_path / "corpus2" / "part-0.parquet")
    build_rows(mined, str(tmp_path / "corpus2"), str(tmp_path / "rows2"), num_hard_negatives=1)
    got2 = {(r[C.QUERY_ID], r[C.POSITIVE_ID]): r for r in pq.read_table(tmp_path / "rows2").to_pylist()}
    assert got2[("q1", "p1")][C.POSITIVE] == "P:" + text["p1"]
    assert got2[("qy", "p1")][C.NEGATIVE_IDS] == ["n1_0"]  # one negative has no text: the row keeps the other


@pytest.mark.slow  # CI budget (25 min): 50 s on 2 quiet cores; `make test-slow` runs it
def test_rows_and_epoch_rebuilt_when_mined_table_is_rewritten_in_place(ray_local, tmp_path):
    """Another mining run in the same output folder rewrites the mined table at the same path: the training
    rows and the epoch order written from them must follow the new table, not a cache keyed by path."""
    from raymine.train_data import build_rows, iter_global_batches, write_epoch

    mined, corpus = write_mined(tmp_path, queries=4, negatives=2)
    rows_uri, epoch_uri = str(tmp_path / "rows"), str(tmp_path / "epoch")
    assert build_rows(mined, corpus, rows_uri, num_hard_negatives=2)["rows"] == 6  # q0, q2 have two positives
    first = [b.column(C.QUERY_ID).to_pylist() for b in iter_global_batches(write_epoch(rows_uri, 13, 0, epoch_uri), 1)]
    assert sorted(q for b in first for q in b) == ["q0", "q0", "q1", "q2", "q2", "q3"]
    assert build_rows(mined, corpus, rows_uri, num_hard_negatives=2)["rows"] == 6  # unchanged input: reused

    mined2, corpus2 = write_mined(tmp_path, queries=7, negatives=2)  # same paths, other content
    assert (mined2, corpus2) == (mined, corpus)
    counts = build_rows(mined, corpus, rows_uri, num_hard_negatives=2)
    assert (counts["queries"], counts["rows"]) == (7, 11)  # q0, q2, q4, q6 have two positives
    got = [q for b in iter_global_batches(write_epoch(rows_uri, 13, 0, epoch_uri), 1) for q in b.column(C.QUERY_ID).to_pylist()]
    assert sorted(got) == sorted([f"q{i}" for i in range(7)] + ["q0", "q2", "q4", "q6"])


def test_each_rank_reads_only_its_slice_of_the_epoch(tmp_path, monkeypatch):
    """A rank reads its B rows of each global batch of world × B rows from the row groups that hold them
    (the epoch written in groups of B rows): the ranks' slices put together are the global batches, and a
    rank reads about 1/world of the groups, not all of them; a resume skip reads nothing before it."""
    from raymine.train_data import ORDER, iter_global_batches

    n, b, world = 100, 4, 3  # 8 global batches of 12 rows, 4 rows left over
    t = pa.table({ORDER: np.arange(n, dtype=np.int64), C.QUERY_ID: [f"q{i:03d}" for i in range(n)],
                  C.POSITIVE_ID: [f"p{i:03d}" for i in range(n)]})
    (tmp_path / "e").mkdir()
    pq.write_table(t.slice(0, 30), tmp_path / "e" / "a.parquet", row_group_size=b)  # groups cross the files'
    pq.write_table(t.slice(30), tmp_path / "e" / "b.parquet", row_group_size=b)  # and the batches' bounds
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, *a, **k: reads.append(i) or real(self, i, *a, **k))
    whole = [x.column(C.QUERY_ID).to_pylist() for x in iter_global_batches(str(tmp_path / "e"), b * world)]
    assert len(whole) == 8 and whole[0] == [f"q{i:03d}" for i in range(12)]
    n_groups, per_rank = len(reads), []
    for r in range(world):
        reads.clear()
        got = [x.column(C.QUERY_ID).to_pylist() for x in iter_global_batches(str(tmp_path / "e"), b * world,
                                                                               rows=(r * b, b))]
        assert got == [w[r * b : (r + 1) * b] for w in whole]
        per_rank.append(len(reads))
    assert max(per_rank) <= 2 * 8 and max(per_rank) < n_groups / 1.4  # about its share, not every group
    reads.clear()
    assert [x.column(C.QUERY_ID).to_pylist() for x in iter_global_batches(str(tmp_path / "e"), 12, skip_batches=6,
                                                                          rows=(4, 4))] == [w[4:8] for w in whole[6:]]
    assert len(reads) <= 4
    with pytest.raises(ValueError, match="inside a batch"):
        next(iter_global_batches(str(tmp_path / "e"), 12, rows=(10, 4)))


def test_epoch_order_is_a_function_of_the_seed(ray_local, tmp_path):
    """The same rows split into different files give the same written epoch order; another seed or epoch
    another order; global batches come back exactly sized, with a resume skip."""
    from raymine.train_data import iter_global_batches, order_keys, write_epoch

    rows = pa.table({C.QUERY_ID: [f"q{i}" for i in range(40)], C.QUERY: ["x"] * 40,
                     C.POSITIVE_ID: [f"p{i}" for i in range(40)], C.POSITIVE: ["y"] * 40,
                     C.POSITIVE_IDS: [[f"p{i}"] for i in range(40)], C.NEGATIVE_IDS: [[]] * 40, C.NEGATIVES: [[]] * 40})
    one, three = tmp_path / "one", tmp_path / "three"
    one.mkdir()
    three.mkdir()
    pq.write_table(rows, one / "a.parquet")
    rev = rows.take(list(range(39, -1, -1)))
    for k, (lo, hi) in enumerate([(0, 7), (7, 30), (30, 40)]):
        pq.write_table(rev.slice(lo, hi - lo), three / f"part-{k}.parquet")

    def order(path, seed, epoch, skip=0):
        out = write_epoch(str(path), seed, epoch, str(tmp_path / f"{path.name}-{seed}-{epoch}"))
        batches = list(iter_global_batches(out, 6, skip_batches=skip))
        assert all(b.num_rows == 6 for b in batches) and len(batches) == 6 - skip  # 40 // 6 = 6, rest dropped
        return [p for b in batches for p in b.column(C.POSITIVE_ID).to_pylist()]

    a = order(one, 13, 0)
    assert a == order(three, 13, 0) and len(set(a)) == 36
    assert order(three, 13, 0, skip=2) == a[12:]  # reuses the written epoch
    qids, pids = rows.column(C.QUERY_ID).to_pylist(), rows.column(C.POSITIVE_ID).to_pylist()
    base = order_keys(13, 0, qids, pids)
    assert not np.array_equal(base, order_keys(14, 0, qids, pids))
    assert not np.array_equal(base, order_keys(13, 1, qids, pids))
    assert np.array_equal(base, order_keys(13, 0, qids[::-1], pids[::-1])[::-1])  # per row, not per position


def test_write_epoch_is_one_exact_sort_over_its_key_ranges(ray_local, tmp_path):
    """The epoch written through several key ranges (scatter tasks over three files, one sort task per range) holds
    exactly the rows of the table, each once, in the order of one in-process sort by (key, query id, positive id),
    in row groups of the given size and one part per non-empty range; the scratch folder is gone; one range gives
    the same rows in the same order."""
    from raymine.train_data import ORDER, epoch_buckets, order_keys, write_epoch

    n = 60
    qids = [f"q{i % 45}" for i in range(n)]  # some queries with two positives
    rows = pa.table({C.QUERY_ID: qids, C.QUERY: ["x"] * n, C.POSITIVE_ID: [f"p{i}" for i in range(n)],
                     C.POSITIVE: ["y"] * n, C.POSITIVE_IDS: [[f"p{i}"] for i in range(n)],
                     C.NEGATIVE_IDS: [[f"n{i}"] for i in range(n)], C.NEGATIVES: [[f"t{i}"] for i in range(n)]})
    (tmp_path / "rows").mkdir()
    for k, (lo, hi) in enumerate([(0, 11), (11, 40), (40, 60)]):
        pq.write_table(rows.slice(lo, hi - lo), tmp_path / "rows" / f"part-{k}.parquet")
    keys = order_keys(7, 2, rows.column(C.QUERY_ID).to_pylist(), rows.column(C.POSITIVE_ID).to_pylist())
    want = sorted(zip(keys.tolist(), qids, rows.column(C.POSITIVE_ID).to_pylist(), strict=True))
    ranges = epoch_buckets(keys, 9)
    assert ranges.min() >= 0 and ranges.max() <= 8 and len(set(ranges.tolist())) >= 5  # spread over the ranges
    by_key = [r for _, r in sorted(zip(keys.tolist(), ranges.tolist(), strict=True))]
    assert by_key == sorted(by_key)  # ranges follow the key order

    out = write_epoch(str(tmp_path / "rows"), 7, 2, str(tmp_path / "epoch"), row_group_rows=4, bucket_rows=7)
    files = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))
    assert len(files) == len(set(ranges.tolist())) and not os.path.exists(os.path.join(out, "_scatter"))
    got = pa.concat_tables([pq.read_table(os.path.join(out, f)) for f in files])
    assert list(zip(got.column(ORDER).to_pylist(), got.column(C.QUERY_ID).to_pylist(),
                    got.column(C.POSITIVE_ID).to_pylist(), strict=True)) == want
    assert got.column(C.NEGATIVES).to_pylist() == [[f"t{p[1:]}"] for _, _, p in want]  # whole rows moved
    assert all(pq.ParquetFile(os.path.join(out, f)).metadata.row_group(0).num_rows == min(
        4, pq.ParquetFile(os.path.join(out, f)).metadata.num_rows) for f in files)
    one = write_epoch(str(tmp_path / "rows"), 7, 2, str(tmp_path / "epoch1"))
    assert pq.read_table(one).column(C.POSITIVE_ID).to_pylist() == got.column(C.POSITIVE_ID).to_pylist()


# ------------------------------------------------------------------------------------------------
# Real Ray Train runs: MiniLM DDP on 2 CPU workers
# ------------------------------------------------------------------------------------------------
def _minilm_cfg(minilm_path: str, **kw) -> TrainConfig:
    base = dict(model=minilm_path, num_workers=2, batch_size=2, grad_accum=1, num_hard_negatives=2,
                query_max_length=24, passage_max_length=32, lr=1e-4, warmup_steps=1, max_steps=8,
                checkpoint_every=3, log_every=1, temperature=0.05, seed=2, max_failures=1)
    return TrainConfig(**{**base, **kw})


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    mined, corpus = write_mined(root, queries=12, negatives=2)  # 18 rows: 4 steps of 2 workers x 2 per epoch
    return mined, corpus, str(root / "ray")  # one storage path: the rows are built once


@pytest.fixture(scope="module")
def minilm_run(ray_local, minilm_path, minilm_data, tmp_path_factory):
    from raymine.train import train_stage

    mined, corpus, storage_path = minilm_data
    out = tmp_path_factory.mktemp("minilm_a")
    return train_stage(mined, corpus, _minilm_cfg(minilm_path), str(out / "model"), f"a-{uuid.uuid4().hex[:8]}",
                       storage_path=storage_path)


def test_minilm_trains_records_and_loads_in_sentence_transformers(minilm_run, minilm_path, minilm_data):
    from sentence_transformers import SentenceTransformer

    from raymine.model import BiEncoder
    from raymine.train_data import order_keys

    res = minilm_run
    assert res["rows"] == 18 and res["steps_per_epoch"] == 4 and res["steps"] == 8 and res["start_step"] == 0
    assert len(res["losses"]) == len(res["lrs"]) == len(res["masked_same_query"]) == 8
    assert res["lrs"][0] == 0.0 and res["lrs"][1] == pytest.approx(1e-4)  # linear warm-up of 1 step, then decay
    # reference: each epoch's order recomputed here (python sort of the seeded keys); two sibling rows in one
    # global batch of 4 mask each other's positive: 2 masked (row, passage) pairs per pair
    rows = [(r[C.QUERY_ID], p) for r in pq.read_table(minilm_data[0]).to_pylist() for p in r[C.POSITIVE_IDS]]
    expected = []
    for epoch in (0, 1):
        keys = order_keys(2, epoch, [q for q, _ in rows], [p for _, p in rows])
        order = [rows[i] for i in sorted(range(len(rows)), key=lambda i: (keys[i], rows[i]))]
        for b in range(4):
            batch = order[4 * b: 4 * b + 4]
            expected.append(2 * (len(batch) - len({q for q, _ in batch})))
    assert res["masked_same_query"] == expected and sum(expected) > 0
    assert Path(res["loss_plot"]).name == "loss_curve.png" and Path(res["loss_plot"]).stat().st_size > 1000
    out = res["model_dir"]
    ours = BiEncoder.from_config(TrainConfig(model=out))
    base = BiEncoder.from_config(TrainConfig(model=minilm_path))
    texts = ["what does insulin do?", "Telomeres shorten each time a cell divides."]
    theirs = torch.from_numpy(SentenceTransformer(out, device="cpu").encode(texts))
    torch.testing.assert_close(ours.encode(texts), theirs, rtol=1e-4, atol=1e-5)
    assert (ours.encode(texts) - base.encode(texts)).abs().max() > 1e-4  # training changed the model


def test_same_seed_same_model(minilm_run, minilm_path, minilm_data, tmp_path):
    """A second run with the same seed and data: identical losses and bit-identical weights."""
    from raymine.train import train_stage

    mined, corpus, storage_path = minilm_data
    res = train_stage(mined, corpus, _minilm_cfg(minilm_path), str(tmp_path / "model"), f"b-{uuid.uuid4().hex[:8]}",
                      storage_path=storage_path)
    assert res["losses"] == minilm_run["losses"] and res["masked_same_query"] == minilm_run["masked_same_query"]
    a, b = _weights(minilm_run["model_dir"]), _weights(res["model_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_worker_pids() -> list[int]:
    """PIDs of this test session's Ray Train worker processes (descendants of this process only)."""
    import psutil

    pids = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def test_worker_killed_mid_epoch_resumes_equal_to_uninterrupted(minilm_run, minilm_path, minilm_data, tmp_path):
    """SIGKILL one training worker once a checkpoint is committed (steps 3 and 6, both mid-epoch: 4 steps per
    epoch, 8 in all):
    FailureConfig restarts the group from the checkpoint by itself; steps, losses and weights equal the
    uninterrupted run."""
    from raymine.train import train_stage

    mined, corpus, storage_path = minilm_data
    run = f"k-{uuid.uuid4().hex[:8]}"
    state: dict = {"killed": None, "done": False}

    def killer():
        deadline = time.time() + 400
        while time.time() < deadline and not state["done"]:
            # a checkpoint Ray Train has committed (what a restart resumes from)
            if glob.glob(str(Path(storage_path) / f"{run}-*" / "checkpoint_manager_snapshot.json")):
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    state["killed"] = pids[-1]
                    return
            time.sleep(0.1)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    res = train_stage(mined, corpus, _minilm_cfg(minilm_path), str(tmp_path / "model"), run, storage_path=storage_path)
    state["done"] = True
    th.join(timeout=5)
    assert state["killed"] is not None, "no training worker was killed"
    assert res["start_step"] in (3, 6), res["start_step"]  # resumed mid-epoch from a checkpoint, not from scratch
    assert res["steps"] == 8
    assert res["losses"] == pytest.approx(minilm_run["losses"], rel=1e-5, abs=1e-6)
    a, b = _weights(minilm_run["model_dir"]), _weights(res["model_dir"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # CI budget (25 min): 142 s on 2 quiet cores; `make test-slow` runs it
def test_rerun_after_a_re_mine_trains_afresh_on_the_new_rows(ray_local, minilm_path, tmp_path):
    """The same run name and storage path, but the mined table rewritten in place (another mining config in
    the same output folder): the run must not resume the finished checkpoint of the old rows."""
    from raymine.train import train_stage

    storage_path, cfg = str(tmp_path / "ray"), _minilm_cfg(minilm_path, max_steps=1, checkpoint_every=1)
    mined, corpus = write_mined(tmp_path / "data", queries=4, negatives=2)  # 6 rows: one step of 2 x 2
    first = train_stage(mined, corpus, cfg, str(tmp_path / "model"), "same", storage_path=storage_path)
    assert (first["rows"], first["steps"], first["start_step"]) == (6, 1, 0)
    write_mined(tmp_path / "data", queries=6, negatives=2)  # 9 rows at the same paths
    again = train_stage(mined, corpus, dataclasses.replace(cfg, max_steps=2), str(tmp_path / "model"), "same",
                        storage_path=storage_path)
    assert (again["rows"], again["steps"], again["start_step"]) == (9, 2, 0)


@pytest.mark.slow  # ~2 min on 2 cores; the FSDP+LoRA loading itself stays in CI (test_fsdp_lora_weights_read_on_rank0_and_broadcast)
def test_tiny_mistral_recipe_fsdp_three_steps(ray_local, tiny_mistral_path, tmp_path):
    from raymine.train import train_stage

    cfg = load_config(ROOT / "configs" / "nv_retriever_v1_mistral7b.yaml", overrides=[
        f"train.model={tiny_mistral_path}", "train.use_gpu=false", "train.num_workers=2",
        "train.cpus_per_worker=0.5", "train.batch_size=4", "train.grad_accum=1", "train.dtype=float32",
        "train.lr=0.002", "train.warmup_steps=0", "train.max_steps=3", "train.log_every=1",
        "train.query_max_length=32", "train.passage_max_length=48",
    ]).train
    assert cfg.strategy == "fsdp" and cfg.lora and cfg.bidirectional and cfg.gradient_checkpointing
    mined, corpus = write_mined(tmp_path, queries=6, negatives=1)  # 9 rows: one step of 2 workers x 4
    res = train_stage(mined, corpus, cfg, str(tmp_path / "model"), f"mistral-{uuid.uuid4().hex[:8]}",
                      storage_path=str(tmp_path / "ray"))
    losses = res["losses"]
    assert res["steps"] == 3 and len(losses) == 3
    assert losses[2] < losses[1] < losses[0], losses

    from transformers import AutoModel

    merged = AutoModel.from_pretrained(res["model_dir"])
    assert merged.config.is_causal is False and not any("lora" in n for n, _ in merged.named_parameters())


# ------------------------------------------------------------------------------------------------
# 7B loading path on 2 gloo processes (no Ray): weights read on rank 0 only, broadcast into FSDP shards
# ------------------------------------------------------------------------------------------------
def _fsdp_load_worker(rank: int, port: int, path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from raymine.loading import _student, build_student
    from raymine.model import load_backbone

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = TrainConfig(model=path, strategy="fsdp", lora=True, dtype="bfloat16", bidirectional=True,
                          gradient_checkpointing=True, seed=5)
        model, wrapped = build_student(cfg, torch.device("cpu"), rank, 2)
        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
        # reference, built independently in this process: pretrained weights + LoRA init with the same seed
        ref = _student(*load_backbone(path, torch.bfloat16, True), cfg).state_dict()
        bad = [k for k in ref if not torch.equal(full[k].float(), ref[k].float())]
        dtypes = sorted({str(v.dtype) for k, v in full.items() if "lora_" not in k and v.is_floating_point()})
        buffers_ok = all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in
                         _student(*load_backbone(path, torch.bfloat16, True), cfg).named_buffers())
        torch.save({"bad": bad, "n": len(ref), "keys_equal": set(full) == set(ref), "base_dtypes": dtypes,
                    "buffers_ok": buffers_ok}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_lora_weights_read_on_rank0_and_broadcast(tiny_mistral_path, tmp_path):
    """Rank 1 builds on the meta device and never reads the weights; after sharding and the broadcast,
    both ranks' full state dicts equal the pretrained weights + the seeded LoRA init (bf16 base)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp_load_worker, args=(port, tiny_mistral_path, str(tmp_path)), nprocs=2, start_method="spawn")
    for r in range(2):
        res = torch.load(tmp_path / f"r{r}.pt")
        assert res["keys_equal"] and res["n"] > 20 and res["bad"] == [], (r, res["bad"][:5])
        assert res["base_dtypes"] == ["torch.bfloat16"] and res["buffers_ok"]
