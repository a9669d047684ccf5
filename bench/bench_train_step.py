"""Tokens/s of one InfoNCE train step (forward + backward + AdamW) — pure torch, no Ray (runs on the GPU box).

Default: all-MiniLM-L6-v2 on the CPU, one concatenated forward (DDP mode) vs two forwards (queries, passages)
side by side. ``--mistral`` builds a random-init Mistral-shaped model (7B shape by default; shrink with
``--layers``/``--hidden``) with LoRA + gradient checkpointing in bf16 and prints peak memory and the
achieved fraction of bf16 peak (``--peak-tflops``, 989 = H100 SXM dense bf16).

    python bench/bench_train_step.py                                   # MiniLM, CPU
    python bench/bench_train_step.py --mistral --device cuda --batch 8 # 7B-shaped, one GPU
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raymine.config import TrainConfig  # noqa: E402
from raymine.loss import info_nce  # noqa: E402
from raymine.model import BiEncoder, apply_lora, enable_checkpointing, make_bidirectional, pad_and_concat  # noqa: E402


def mistral_model(args, dtype: torch.dtype, device: str) -> BiEncoder:
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=32000,
                        max_position_embeddings=4096)
    with torch.device(device):
        backbone = MistralModel(cfg).to(dtype)
    make_bidirectional(backbone)
    if not args.no_gc:
        enable_checkpointing(backbone)
    backbone = apply_lora(backbone, 16, 32, 0.0, TrainConfig().lora_targets)
    return BiEncoder(backbone, None, "mean", True, autocast_dtype=dtype if dtype != torch.float32 else None)


def random_tokens(n: int, t: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab, (n, t), device=device)
    am = torch.ones(n, t, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": am, "pool_mask": am}


def batch_from_texts(m: BiEncoder, b: int, h: int) -> tuple[dict, dict]:
    words = "protein folding in yeast cells depends on chaperones and temperature".split()
    q = [" ".join(words[: 4 + i % 6]) + f" query {i}" for i in range(b)]
    p = [" ".join(words * (2 + i % 4)) + f" passage {i}" for i in range(b * (1 + h))]
    return m.tokenize(q, "query"), m.tokenize(p, "passage")


def step(m: BiEncoder, opt, q: dict, p: dict, b: int, h: int, single: bool) -> None:
    opt.zero_grad(set_to_none=True)
    if single:
        x = pad_and_concat([q, p], 0, False)
        emb = m(**x)  # [B + B*(1+H), d]
        qe, pe = emb[:b], emb[b:]
    else:
        qe, pe = m(**q), m(**p)
    loss = info_nce(qe, pe[:b], pe[b:].reshape(b, h, -1), temperature=0.02)
    loss.backward()
    opt.step()


def timed(m, opt, q, p, b, h, single, steps, device) -> float:
    step(m, opt, q, p, b, h, single)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(m, opt, q, p, b, h, single)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16, help="queries per step")
    ap.add_argument("--negatives", type=int, default=1, help="hard negatives per query")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mistral", action="store_true", help="random-init Mistral-shaped model, LoRA, bf16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--query-len", type=int, default=192)
    ap.add_argument("--passage-len", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", help="--mistral compute dtype")
    ap.add_argument("--no-gc", action="store_true", help="--mistral without gradient checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM 989)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    b, h = args.batch, args.negatives
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")

    if not args.mistral:
        m = BiEncoder.from_config(TrainConfig(model=args.model, query_max_length=64, passage_max_length=256))
        m.to(args.device).train()
        opt = torch.optim.AdamW([x for x in m.parameters() if x.requires_grad], lr=1e-5)
        q, p = batch_from_texts(m, b, h)
        q, p = ({k: v.to(args.device) for k, v in d.items()} for d in (q, p))
        real = int(q["attention_mask"].sum() + p["attention_mask"].sum())
        t_pad = max(q["input_ids"].shape[1], p["input_ids"].shape[1])
        res = {}
        for single in (True, False):
            res[single] = timed(m, opt, q, p, b, h, single, args.steps, args.device)
        print(f"{args.model}: batch {b} queries + {b * (1 + h)} passages, {real} real tokens "
              f"(query pad {q['input_ids'].shape[1]}, passage pad {p['input_ids'].shape[1]}, one-forward pad {t_pad})")
        for single, s in res.items():
            name = "one concatenated forward (DDP)" if single else "two forwards (FSDP)"
            print(f"  {name:32s} {s:7.3f} s/step  {real / s:9.0f} real tokens/s")
        print(f"  ratio two-forward / one-forward speed: {res[True] / res[False]:.2f}x")
        return

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    m = mistral_model(args, dtype, args.device)
    m.train()
    n_params = sum(x.numel() for x in m.parameters())
    n_train = sum(x.numel() for x in m.parameters() if x.requires_grad)
    opt = torch.optim.AdamW([x for x in m.parameters() if x.requires_grad], lr=1e-5)
    q = random_tokens(b, args.query_len, 32000, args.device)
    p = random_tokens(b * (1 + h), args.passage_len, 32000, args.device)
    tokens = b * args.query_len + b * (1 + h) * args.passage_len
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    s = timed(m, opt, q, p, b, h, False, args.steps, args.device)
    # FLOP per token: frozen base → forward 2N + input-grad backward 2N (+ 2N recompute with checkpointing);
    # attention scores/values add 4·L·T·d per token forward, same multiplier.
    mult = 2 if args.no_gc else 3  # in units of one forward pass
    n_matmul = n_params - m.base_model().embed_tokens.weight.numel()  # the embedding lookup is no matmul
    fwd = lambda t: 2 * n_matmul + 4 * args.layers * t * args.hidden  # noqa: E731
    flop = mult * (b * args.query_len * fwd(args.query_len) + b * (1 + h) * args.passage_len * fwd(args.passage_len))
    tflops = flop / s / 1e12
    print(f"Mistral-shaped random init: {n_params / 1e9:.2f} B params, {n_train / 1e6:.1f} M LoRA trainable, "
          f"{args.layers} layers, hidden {args.hidden}, {args.dtype}, gradient checkpointing {not args.no_gc}")
    print(f"  batch {b} queries x {args.query_len} + {b * (1 + h)} passages x {args.passage_len} = {tokens} tokens")
    print(f"  {s:.3f} s/step, {tokens / s:.0f} tokens/s, {tflops:.1f} TFLOP/s achieved")
    if args.device.startswith("cuda"):
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
              f"{100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:.0f} TFLOP/s bf16 peak")


if __name__ == "__main__":
    main()
