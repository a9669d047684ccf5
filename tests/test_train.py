"""Train stage: schedule and input checks (no Ray), then real Ray Train runs (2 CPU workers, ~35 s start each).

CI runs two TorchTrainer pairs/runs: MiniLM DDP killed-and-resumed + sentence-transformers load, and the
tiny-Mistral 7B recipe (FSDP, LoRA, bidirectional, checkpointing) for 3 steps.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymine import columns as C
from raymine.config import TrainConfig, load_config
from raymine.train import lr_lambda, negative_columns

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


def write_table(path: Path, rows: int, negatives: int = 2) -> str:
    """A hand-made mined table: query, its positive, hard negatives from other topics (one duplicate positive)."""
    anchors, positives, negs = [], [], [[] for _ in range(negatives)]
    for i in range(rows):
        name, text = TOPICS[i % len(TOPICS)]
        anchors.append(f"what does {name} do? (variant {i})")
        positives.append(text)
        for k in range(negatives):
            negs[k].append(TOPICS[(i + k + 1) % len(TOPICS)][1] + f" Note {i}.")
    table = {C.ANCHOR: anchors, C.POSITIVE: positives}
    table.update({C.negative_column(k + 1): negs[k] for k in range(negatives)})
    pq.write_table(pa.table(table), path)
    return str(path)


def test_lr_schedule():
    f = lr_lambda(4, 10)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(7) == pytest.approx(0.5) and f(10) == 0.0
    g = lr_lambda(0, 4)
    assert [g(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_negative_columns_checked():
    names = [C.ANCHOR, C.POSITIVE, C.negative_column(1), C.negative_column(2)]
    assert negative_columns(names, 2) == [C.negative_column(1), C.negative_column(2)]
    with pytest.raises(ValueError, match="negative_3"):
        negative_columns(names, 3)


def test_shipped_train_configs_load():
    big = load_config(ROOT / "configs" / "nv_retriever_v1_mistral7b.yaml").train
    assert (big.model, big.bidirectional, big.pooling, big.lora_r, big.lora_alpha) == (
        "mistralai/Mistral-7B-v0.1", True, "mean", 16, 32)
    assert (big.query_max_length, big.passage_max_length, big.lr, big.warmup_steps) == (192, 512, 1e-5, 100)
    assert (big.batch_size, big.grad_accum, big.num_hard_negatives, big.dtype, big.strategy) == (
        32, 4, 1, "bfloat16", "fsdp")
    assert big.gradient_checkpointing and big.use_gpu and big.query_prompt and not big.passage_prompt
    small = load_config(ROOT / "configs" / "minilm_cpu_train.yaml").train
    assert small.strategy == "ddp" and not small.use_gpu


def test_collate_layout(minilm_path):
    from raymine.model import BiEncoder
    from raymine.train import Collate

    m = BiEncoder.from_config(TrainConfig(model=minilm_path, query_max_length=16, passage_max_length=32))
    batch = {C.ANCHOR: ["q a", "q b"], C.POSITIVE: ["pa", "pb"], C.negative_column(1): ["n1a", "n1b"],
             C.negative_column(2): ["n2a", "pa"]}
    out = Collate(m, [C.negative_column(1), C.negative_column(2)], single_forward=True)(batch)
    assert out["x_input_ids"].shape[0] == 2 + 2 * 3  # queries, positives, row-major negatives
    texts = m.tokenizer.batch_decode(out["x_input_ids"], skip_special_tokens=True)
    assert texts == ["q a", "q b", "pa", "pb", "n1a", "n2a", "n1b", "pa"]
    assert out["neg_keys"].shape == (2, 2) and out["neg_keys"][1, 1] == out["pos_keys"][0]
    with pytest.raises(ValueError, match="strings"):
        Collate(m, [C.negative_column(1)], single_forward=True)({**batch, C.POSITIVE: ["pa", None]})


# ------------------------------------------------------------------------------------------------
def test_minilm_killed_and_resumed_then_loads_in_sentence_transformers(ray_local, minilm_path, tmp_path):
    from raymine.model import BiEncoder
    from raymine.train import train_stage

    data = write_table(tmp_path / "train.parquet", rows=16)
    run = f"minilm-{uuid.uuid4().hex[:8]}"
    cfg = TrainConfig(model=minilm_path, num_workers=2, batch_size=4, grad_accum=2, num_hard_negatives=2,
                      query_max_length=32, passage_max_length=48, lr=1e-4, warmup_steps=1,
                      max_steps=1, checkpoint_every=1, log_every=1, temperature=0.05)
    # 16 rows / 2 workers / (4 x 2 accum) = 1 step per epoch: max_steps spans epochs
    first = train_stage(data, cfg, str(tmp_path / "m1"), run, storage_path=str(tmp_path / "ray"))
    assert first["steps"] == 1 and first["start_step"] == 0 and len(first["losses"]) == 1
    # "killed" after step 1: a re-run with the same name continues from the checkpoint
    cfg2 = TrainConfig(**{**cfg.__dict__, "max_steps": 3})
    second = train_stage(data, cfg2, str(tmp_path / "m2"), run, storage_path=str(tmp_path / "ray"))
    assert second["start_step"] == 1 and second["steps"] == 3 and len(second["losses"]) == 2
    assert all(x == x and x > 0 for x in second["losses"])

    from sentence_transformers import SentenceTransformer

    out = second["model_dir"]
    ours = BiEncoder.from_config(TrainConfig(model=out))
    base = BiEncoder.from_config(TrainConfig(model=minilm_path))
    texts = ["what does insulin do?", "Telomeres shorten each time a cell divides."]
    theirs = torch.from_numpy(SentenceTransformer(out, device="cpu").encode(texts))
    torch.testing.assert_close(ours.encode(texts), theirs, rtol=1e-4, atol=1e-5)
    assert (ours.encode(texts) - base.encode(texts)).abs().max() > 1e-4  # training changed the model


def test_tiny_mistral_recipe_fsdp_three_steps(ray_local, tiny_mistral_path, tmp_path):
    from raymine.train import train_stage

    cfg = load_config(ROOT / "configs" / "nv_retriever_v1_mistral7b.yaml", overrides=[
        f"train.model={tiny_mistral_path}", "train.use_gpu=false", "train.num_workers=2",
        "train.cpus_per_worker=0.5", "train.batch_size=4", "train.grad_accum=1", "train.dtype=float32",
        "train.lr=0.002", "train.warmup_steps=0", "train.max_steps=3", "train.log_every=1",
        "train.query_max_length=32", "train.passage_max_length=48",
    ]).train
    assert cfg.strategy == "fsdp" and cfg.lora and cfg.bidirectional and cfg.gradient_checkpointing
    data = write_table(tmp_path / "train.parquet", rows=8, negatives=1)  # one step = the whole table
    res = train_stage(data, cfg, str(tmp_path / "model"), f"mistral-{uuid.uuid4().hex[:8]}",
                      storage_path=str(tmp_path / "ray"))
    losses = res["losses"]
    assert res["steps"] == 3 and len(losses) == 3
    assert losses[2] < losses[1] < losses[0], losses

    from transformers import AutoModel

    merged = AutoModel.from_pretrained(res["model_dir"])
    assert merged.config.is_causal is False and not any("lora" in n for n, _ in merged.named_parameters())
