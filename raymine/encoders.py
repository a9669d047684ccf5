"""Dense encoders at inference: teachers, and students being evaluated → L2-normalised float32 vectors.

:class:`Encoder` is a thin inference wrapper around :class:`raymine.model.BiEncoder`, the one class that
also trains: tokenisation, prompt masking, appended EOS, bidirectional attention, position ids and
pooling are the student's own code path, so an "after" evaluation measures the trained function.
What this wrapper adds: checks on the texts, length-sorted batches (padding is not paid for, output
comes back in input order), numpy output and truncation counts.

Pure torch/transformers (no Ray import): the Ray embed stage holds one :class:`Encoder` per actor,
and the same class runs on a GPU box that has no Ray.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from raymine.config import TeacherConfig
from raymine.model import MINILM_NAMES, BiEncoder, resolve_device, resolve_dtype, resolve_model_path

log = logging.getLogger(__name__)

Side = Literal["query", "passage"]

__all__ = [
    "CPU_BATCH_TOKENS", "MINILM_NAMES", "Encoder", "apply_prompt", "batch_bounds", "check_texts", "resolve_device",
    "resolve_dtype", "resolve_model_path",
]


def apply_prompt(texts: Sequence[str], prompt: str) -> list[str]:
    """Prefix every text with the side's prompt (e.g. 'query: ', 'Instruct: ...\\nQuery: ')."""
    return [prompt + t for t in texts] if prompt else list(texts)


def check_texts(texts: Sequence[str]) -> None:
    """Raise ValueError naming the first empty/whitespace or non-string text (ingest should have dropped it)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text at index {i} is {type(t).__name__}, not str: {t!r}")
        if not t.strip():
            raise ValueError(
                f"text at index {i} is empty or whitespace-only; ingest drops these with a count, "
                "so reaching the encoder with one is a bug upstream"
            )


def quantize_int8(bi: BiEncoder, device: torch.device) -> int:
    """Replace every ``nn.Linear`` of ``bi``'s backbone by torch's dynamic int8 version (weights int8 per
    output channel, activations quantised per batch): inference only, CPU only. Returns the layers replaced."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantize='int8' runs on the CPU only (device is {device}); on a GPU use dtype=bfloat16")
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    n = sum(isinstance(m, torch.nn.Linear) for m in bi.backbone.modules())
    with warnings.catch_warnings():  # torch marks the eager int8 API deprecated in favour of torchao
        warnings.simplefilter("ignore")
        # per output channel: on MiniLM the mean cosine to fp32 is 0.98 (per tensor: 0.92), at the same speed
        bi.backbone = quantize_dynamic(bi.backbone, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    log.info("int8 dynamic quantisation: %d Linear layers replaced", n)
    return n


class Encoder:
    """One dense encoder loaded once: ``encode(texts, side)`` → float32 [n, dim].

    ``bi`` is the underlying :class:`~raymine.model.BiEncoder` (``model`` its transformers backbone,
    ``tokenizer`` its tokenizer). ``truncated`` counts texts cut at the side's max length since
    construction (per side in ``truncated_by_side``); ``last_truncated`` is the per-text flag of the
    latest ``encode`` call.
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        if cfg.kind != "dense":
            raise ValueError(f"Encoder needs a dense teacher, got kind={cfg.kind!r} (use raymine.bm25 for BM25)")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.bi = BiEncoder.from_teacher(cfg, self.device)
        if cfg.quantize == "int8":
            quantize_int8(self.bi, self.device)
        self.model = self.bi.backbone
        self.tokenizer = self.bi.tokenizer
        self.truncated = 0
        self.truncated_by_side: dict[str, int] = {"query": 0, "passage": 0}
        self.last_truncated = np.zeros(0, dtype=bool)
        log.info(
            "loaded %s (%s) on %s as %s, pooling=%s, bidirectional=%s, eos appended=%s", cfg.model,
            getattr(self.model.config, "model_type", ""), self.device,
            "int8 (dynamic)" if cfg.quantize == "int8" else self.dtype, cfg.pooling, cfg.bidirectional,
            self.bi.eos_id is not None,
        )

    @property
    def dim(self) -> int:
        """Embedding dimension (the model's hidden size)."""
        return self.bi.dim

    def max_length(self, side: Side) -> int:
        return self.bi.max_lengths[side]

    def prompt(self, side: Side) -> str:
        return self.bi.prompts[side]

    @torch.inference_mode()
    def _forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        """One padded batch (``BiEncoder.pad``'s tensors [B, T]) → pooled float32 [B, H] on the CPU."""
        if self.device.type == "cuda":  # page-locked host memory: the copies overlap the queued kernels
            f = {k: v.pin_memory() for k, v in f.items()}
        return self.bi(**{k: v.to(self.device, non_blocking=True) for k, v in f.items()}).cpu()  # [B, H]

    @property
    def batch_tokens(self) -> int:
        """Padded tokens per forward pass at most (0 = no cap): ``max_batch_tokens``, or with -1 (auto)
        :data:`CPU_BATCH_TOKENS` for fp32 (and int8) compute on a CPU; no cap in bf16/fp16 (on this CPU bf16 ran
        3% slower capped) or on an accelerator."""
        if self.cfg.max_batch_tokens >= 0:
            return self.cfg.max_batch_tokens
        return CPU_BATCH_TOKENS if self.device.type == "cpu" and self.dtype == torch.float32 else 0

    def encode(self, texts: Sequence[str], side: Side, batch_size: int | None = None) -> np.ndarray:
        """Encode ``texts`` as ``side`` ('query'/'passage') → float32 [n, dim] in input order.

        Texts are tokenised once, sorted longest first (an OOM shows at once) and cut into batches of at
        most ``batch_size`` texts and :attr:`batch_tokens` padded tokens (:func:`batch_bounds`)."""
        if side not in ("query", "passage"):
            raise ValueError(f"side must be 'query' or 'passage', got {side!r}")
        texts = list(texts)
        check_texts(texts)
        n = len(texts)
        if n == 0:
            self.last_truncated = np.zeros(0, dtype=bool)
            return np.zeros((0, self.dim), dtype=np.float32)
        batch_size = batch_size or self.cfg.batch_size
        tok = self.bi.tokenize_rows(texts, side)
        lengths = np.fromiter((len(r) for r in tok.rows), dtype=np.int64, count=n)  # [n]
        truncated = np.asarray(tok.truncated, dtype=bool)  # [n]
        order = np.argsort(-lengths, kind="stable")  # longest first
        out = np.empty((n, self.dim), dtype=np.float32)
        for lo, hi in batch_bounds(lengths[order], batch_size, self.batch_tokens):
            idx = order[lo:hi]
            out[idx] = self._forward(self.bi.pad(tok, idx.tolist())).numpy()
        n_cut = int(truncated.sum())
        self.last_truncated = truncated
        self.truncated += n_cut
        self.truncated_by_side[side] += n_cut
        if n_cut:
            log.debug("%d of %d %s texts truncated at %d tokens", n_cut, n, side, self.max_length(side))
        return out


# Padded tokens per forward pass on a CPU by default (``max_batch_tokens=-1``): fp32 MiniLM on SciFact passages
# (most at 256 tokens) encodes 1.145x faster on one core of a 2-core EPYC in batches of 2048 tokens than of 32
# texts (4096: 1.03x, 1024: 1.13x; the activations stay in the caches), int8 1.26x; bf16 0.97x, so bf16 is not
# capped: bench/bench_batch_tokens.py (--dtype, --quantize).
CPU_BATCH_TOKENS = 2048


def batch_bounds(lengths_desc: np.ndarray, batch_size: int, max_tokens: int) -> list[tuple[int, int]]:
    """[lo, hi) batches over texts sorted longest first: at most ``batch_size`` texts and, when ``max_tokens``
    > 0, at most ``max_tokens`` padded tokens (rows x the batch's first, longest length; one text at least)."""
    n = len(lengths_desc)
    out, lo = [], 0
    while lo < n:
        rows = batch_size
        if max_tokens > 0:
            rows = max(1, min(batch_size, max_tokens // max(1, int(lengths_desc[lo]))))
        out.append((lo, min(n, lo + rows)))
        lo += rows
    return out
