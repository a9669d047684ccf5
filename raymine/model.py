"""Bi-encoder student: any HF encoder or decoder backbone + pooling, optional LoRA and bidirectional attention.

Pure torch/transformers/peft (no Ray import), so the same model trains in Ray Train workers and runs on
a GPU box without Ray (bench/bench_train_step.py). Shapes: token batches [N, T], embeddings [N, d].

Bidirectional decoders (NV-Retriever-v1): transformers 5.x builds the attention mask through
``masking_utils.create_causal_mask``, which returns a *bidirectional* (padding-only) mask when
``config.is_causal`` is False; attention modules also carry ``is_causal`` (read by SDPA/flash kernels
when no mask is materialised), so both are switched. tests/test_model.py checks the effect on
Mistral, Llama and Qwen2 with and without padding.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from raymine.config import TrainConfig
from raymine.encoders import resolve_dtype as _resolve_dtype
from raymine.encoders import resolve_model_path
from raymine.pooling import Pooling, pool, prompt_pool_mask

log = logging.getLogger(__name__)

Side = Literal["query", "passage"]
_ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last_token": "pooling_mode_lasttoken"}


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' → bf16 on GPU, fp32 on CPU (the encoders' rule, for a device given as a string too)."""
    return _resolve_dtype(dtype, torch.device(device))


def make_bidirectional(model: nn.Module) -> int:
    """Turn a decoder's causal self-attention into full (padding-masked) attention; returns modules switched.

    Sets ``config.is_causal = False`` (mask creation) and ``is_causal = False`` on every attention module
    (kernels that skip the mask). Raises for a backbone with no causal attention to switch.
    """
    switched = 0
    for mod in model.modules():
        if getattr(mod, "is_causal", None) is True and isinstance(mod, nn.Module):
            mod.is_causal = False
            switched += 1
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")}
    for c in configs.values():
        c.is_causal = False
    if switched == 0:
        raise ValueError(
            f"{type(model).__name__}: no causal attention modules found; 'bidirectional' is for decoder "
            "backbones (Mistral, Llama, Qwen2); encoders are bidirectional already"
        )
    return switched


def load_backbone(
    name: str, dtype: torch.dtype = torch.float32, bidirectional: bool = False, trust_remote_code: bool = False
) -> tuple[nn.Module, object]:
    """(backbone, tokenizer) for a local folder or hub name; BERT-likes without their pooler (unused → breaks DDP)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    model_cls = AutoModel._model_mapping.get(type(config), None) if not trust_remote_code else None
    if model_cls is not None and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    model = AutoModel.from_pretrained(path, **kwargs)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # decoders (Mistral/Llama) ship without a pad token
        tok.pad_token = tok.eos_token or tok.unk_token
        log.info("%s: no pad token; using %r", name, tok.pad_token)
    if bidirectional:
        n = make_bidirectional(model)
        log.info("%s: bidirectional attention (%d attention modules switched)", name, n)
    return model, tok


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs, LoRA, DDP and FSDP)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, targets: Sequence[str]) -> nn.Module:
    """Wrap with peft LoRA adapters on ``targets``; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    model = get_peft_model(model, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %d / %d parameters trainable", r, alpha, list(targets), n_train, n_all)
    return model


def _prompt_length(tokenizer, prompt: str) -> int:
    """Tokens a prompt occupies at the start of an encoded text, counting leading special tokens (CLS/BOS)."""
    if not prompt:
        return 0
    with_special = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    bare = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    lead = with_special.index(bare[0]) if bare and bare[0] in with_special else 0  # CLS/BOS before the prompt
    return lead + len(bare)


def pad_and_concat(batches: Sequence[dict[str, torch.Tensor]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    """Pad token batches to one length and stack them row-wise (one forward for queries + passages)."""
    t = max(b["input_ids"].shape[1] for b in batches)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in batches[0]}
    for b in batches:
        extra = t - b["input_ids"].shape[1]
        for k, v in b.items():
            if extra:
                fill = v.new_full((v.shape[0], extra), pad_id if k == "input_ids" else 0)
                v = torch.cat([fill, v] if left else [v, fill], dim=1)
            out[k].append(v)
    return {k: torch.cat(v, dim=0) for k, v in out.items()}  # each [sum N, T]


class BiEncoder(nn.Module):
    """Backbone + pooling (+ L2). One model embeds queries and passages; prompts are excluded from mean pooling."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        pooling: Pooling = "mean",
        normalize: bool = True,
        query_prompt: str = "",
        passage_prompt: str = "",
        query_max_length: int = 192,
        passage_max_length: int = 512,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for p in (query_prompt, passage_prompt):
            if "{task}" in p:
                raise ValueError(f"prompt {p!r} still holds the '{{task}}' placeholder: write the task definition in")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.prompts = {"query": query_prompt, "passage": passage_prompt}
        self.max_lengths = {"query": query_max_length, "passage": passage_max_length}
        self.prompt_lengths = {s: _prompt_length(tokenizer, p) for s, p in self.prompts.items()}
        self.autocast_dtype = autocast_dtype

    # -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device | str = "cpu", for_fsdp: bool = False) -> BiEncoder:
        """Build the student described by ``cfg``: dtype, bidirectional switch, LoRA, gradient checkpointing.

        LoRA (DDP / one process): the frozen base sits in the compute dtype, adapters stay fp32 (peft's
        default), forward under autocast. Full fine-tuning: fp32 master weights + autocast, so lr 1e-5
        updates are not lost to bf16. ``for_fsdp``: everything fp32 (FSDP needs one dtype per shard
        group); FSDP's MixedPrecisionPolicy computes in the configured dtype.
        """
        dtype = resolve_dtype(cfg.dtype, device)
        load_dtype = dtype if (cfg.lora and not for_fsdp) else torch.float32
        backbone, tok = load_backbone(cfg.model, load_dtype, cfg.bidirectional)
        if cfg.gradient_checkpointing:
            enable_checkpointing(backbone)
            backbone.config.use_cache = False
        if cfg.lora:
            backbone = apply_lora(backbone, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        return cls(
            backbone, tok, cfg.pooling, cfg.normalize, cfg.query_prompt, cfg.passage_prompt,
            cfg.query_max_length, cfg.passage_max_length,
            autocast_dtype=dtype if dtype != torch.float32 and not for_fsdp else None,
        )

    @property
    def left_padded(self) -> bool:
        return getattr(self.tokenizer, "padding_side", "right") == "left"

    @property
    def dim(self) -> int:
        return int(self.base_model().config.hidden_size)

    def base_model(self) -> nn.Module:
        """The transformers model under any peft wrapper."""
        m = self.backbone
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    # -------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], side: Side) -> dict[str, torch.Tensor]:
        """Prompt + text → ``input_ids``, ``attention_mask``, ``pool_mask`` [N, T] (prompt tokens 0 in pool_mask)."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"{side} texts must be strings; row {bad[0]} is {texts[bad[0]]!r} ({len(bad)} bad rows)")
        prompt = self.prompts[side]
        enc = self.tokenizer(
            [prompt + t for t in texts], padding=True, truncation=True, max_length=self.max_lengths[side],
            return_tensors="pt",
        )
        am = enc["attention_mask"]
        lengths = torch.full((am.shape[0],), self.prompt_lengths[side], dtype=torch.long)  # [N]
        pm = prompt_pool_mask(am, lengths, self.left_padded)
        return {"input_ids": enc["input_ids"], "attention_mask": am, "pool_mask": pm}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None = None):
        """[N, T] tokens → [N, d] embeddings (pooled, L2-normalised when configured), fp32."""
        dev = input_ids.device
        ctx = (
            torch.autocast(dev.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else torch.autocast(dev.type, enabled=False)
        )
        with ctx:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [N, T, H]
        emb = pool(hidden.float(), attention_mask, self.pooling, pool_mask)  # [N, H]
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb

    @torch.no_grad()
    def encode(self, texts: Sequence[str], side: Side = "passage", batch_size: int = 32) -> torch.Tensor:
        """Embed texts in eval mode → [N, d] fp32 on CPU."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            f = self.tokenize(texts[i : i + batch_size], side)
            out.append(self(**{k: v.to(dev) for k, v in f.items()}).cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    # -------------------------------------------------------------------------------------------
    def save(self, out_dir: str) -> str:
        """Write a folder loadable by ``AutoModel`` and ``SentenceTransformer`` (LoRA merged into the base)."""
        os.makedirs(out_dir, exist_ok=True)
        model = self.backbone
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
            self.backbone = model
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        write_sentence_transformers_files(
            out_dir, self.dim, self.pooling, self.normalize, self.prompts, self.max_lengths["passage"]
        )
        log.info("saved bi-encoder to %s", out_dir)
        return out_dir


def write_sentence_transformers_files(
    out_dir: str, dim: int, pooling: Pooling, normalize: bool, prompts: dict[str, str], max_seq_length: int
) -> None:
    """modules.json, 1_Pooling/config.json (+ 2_Normalize), sentence_bert_config.json, prompts."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
    pool_cfg = {"word_embedding_dimension": dim, **{k: False for k in _ST_POOLING.values()}}
    pool_cfg[_ST_POOLING[pooling]] = True
    pool_cfg["include_prompt"] = not any(prompts.values())
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pool_cfg,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": {"query": prompts["query"], "document": prompts["passage"]},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }
    for rel, obj in files.items():
        with open(os.path.join(out_dir, rel), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
