"""Build, shard and save the student inside a training process group — pure torch/transformers/peft, no Ray.

- DDP or one process (small models): :meth:`BiEncoder.from_config` on every rank, then DDP.
- FSDP + LoRA (the 7B recipe): the weights are read **once, on rank 0**, in the compute dtype (bf16 for
  the 7B recipe: the frozen base is never fp32). Every other rank builds the same module with its
  parameters on the meta device (buffers such as rotary frequencies stay real); all ranks apply
  ``fully_shard`` per decoder layer, materialise their shards empty, and rank 0's full state dict is
  broadcast into them (``set_model_state_dict(..., broadcast_from_rank0=True)``), one tensor at a time.
  Host RAM: rank 0 ≈ the model in bf16 + its shard; other ranks ≈ their shard. LoRA adapters are
  initialised on rank 0 (seeded) and broadcast with the base, so every rank starts equal.
- FSDP without LoRA: fp32 weights loaded on every rank, then sharded (full fine-tuning of a small model).

Saving (:func:`save_student`): with LoRA only the adapter is gathered (trainable parameters; frozen ones
are skipped) and written in peft's format to ``<model_dir>/adapter``; with ``cfg.save_merged``, rank 0
then merges it into the base loaded in the compute dtype and writes a folder loadable by ``AutoModel``
and ``SentenceTransformer``. Without LoRA the full weights are gathered to rank 0 and saved.
"""
from __future__ import annotations

import gc
import logging
import os
import tempfile

import torch
from torch import nn

from raymine.config import TrainConfig
from raymine.model import (
    BiEncoder,
    apply_lora,
    enable_checkpointing,
    load_backbone,
    make_bidirectional,
    resolve_dtype,
)

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def fsdp_shard(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """FSDP2 ``fully_shard`` per transformer layer + the root; compute in the configured dtype, fp32 reduce."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = resolve_dtype(cfg.dtype, device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    base = model.base_model() if isinstance(model, BiEncoder) else model
    layer_names = set(getattr(base, "_no_split_modules", None) or [])
    n = 0
    for mod in model.modules():
        if type(mod).__name__ in layer_names:
            fully_shard(mod, mesh=mesh, mp_policy=mp)
            n += 1
    fully_shard(model, mesh=mesh, mp_policy=mp)
    log.info("FSDP: %d layers of %s sharded over %d ranks, compute %s", n, sorted(layer_names), mesh.size(), dtype)
    return model


def wrap_model(model: BiEncoder, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """DDP (small models) or FSDP2 (large models); the model itself when not distributed."""
    if not _distributed():
        return model.to(device)
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model.to(device)
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return fsdp_shard(model, cfg, device)


def _meta_backbone(cfg: TrainConfig, dtype: torch.dtype):
    """(backbone with parameters on the meta device and real buffers, tokenizer) — no weights read."""
    import inspect

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from raymine.encoders import resolve_model_path

    path = resolve_model_path(cfg.model)
    config = AutoConfig.from_pretrained(path)
    kwargs: dict = {"dtype": dtype}
    model_cls = AutoModel._model_mapping.get(type(config), None)
    if model_cls is not None and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    with init_empty_weights(include_buffers=False):
        backbone = AutoModel.from_config(config, **kwargs)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # as load_backbone
        tok.pad_token = tok.eos_token or tok.unk_token
    if cfg.bidirectional:
        make_bidirectional(backbone)
    return backbone, tok


def _student(backbone: nn.Module, tok, cfg: TrainConfig) -> BiEncoder:
    if cfg.gradient_checkpointing:
        enable_checkpointing(backbone)
        backbone.config.use_cache = False
    torch.manual_seed(cfg.seed)  # LoRA init (rank 0's values are broadcast)
    backbone = apply_lora(backbone, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return BiEncoder(backbone, tok, cfg.pooling, cfg.normalize, cfg.query_prompt, cfg.passage_prompt,
                     cfg.query_max_length, cfg.passage_max_length, autocast_dtype=None,
                     mask_leading_special=cfg.mask_leading_special)


def build_fsdp_lora(cfg: TrainConfig, device: torch.device, rank: int) -> BiEncoder:
    """The FSDP + LoRA student, weights read on rank 0 only and broadcast into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    dtype = resolve_dtype(cfg.dtype, device)
    if rank == 0:
        backbone, tok = load_backbone(cfg.model, dtype, cfg.bidirectional)
    else:
        backbone, tok = _meta_backbone(cfg, dtype)
    model = _student(backbone, tok, cfg)
    full = model.state_dict() if rank == 0 else {}  # rank 0 keeps the full tensors alive until the broadcast
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # real on every rank (tiny)
    fsdp_shard(model, cfg, device)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full, buffers
    gc.collect()
    return model


def build_student(cfg: TrainConfig, device: torch.device, rank: int, world: int) -> tuple[BiEncoder, nn.Module]:
    """(the BiEncoder, the module to train: itself, DDP- or FSDP-wrapped), in train mode."""
    if cfg.strategy == "fsdp" and cfg.lora and world > 1:
        model = build_fsdp_lora(cfg, device, rank)
        wrapped: nn.Module = model
    else:
        model = BiEncoder.from_config(cfg, device, for_fsdp=cfg.strategy == "fsdp" and world > 1)
        wrapped = wrap_model(model, cfg, device)
    model.train()
    return model, wrapped


# ------------------------------------------------------------------------------------------------
def _copy_out(local: str, out_dir: str) -> None:
    if local == out_dir:
        return
    import pyarrow.fs as pafs

    from raymine.storage import resolve

    fs, path = resolve(out_dir)
    pafs.copy_files(local, path, destination_filesystem=fs)


def save_merged_from_adapter(cfg: TrainConfig, adapter_dir: str, out_dir: str) -> str:
    """Base weights (compute dtype) + the adapter → merged model folder (AutoModel / SentenceTransformer)."""
    from peft import PeftModel

    dtype = resolve_dtype(cfg.dtype, "cpu" if not cfg.use_gpu else "cuda")
    base, tok = load_backbone(cfg.model, dtype, cfg.bidirectional)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    BiEncoder(merged, tok, cfg.pooling, cfg.normalize, cfg.query_prompt, cfg.passage_prompt,
              cfg.query_max_length, cfg.passage_max_length, mask_leading_special=cfg.mask_leading_special).save(out_dir)
    return out_dir


def save_student(wrapped: nn.Module, model: BiEncoder, cfg: TrainConfig, out_dir: str, rank: int, world: int) -> None:
    """Write the trained student to ``out_dir`` (rank 0); a collective under FSDP (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = cfg.strategy == "fsdp" and world > 1
    local = out_dir if "://" not in out_dir else tempfile.mkdtemp(prefix="raymine_model_")
    if cfg.lora:
        # only the adapter is gathered: frozen base weights never leave their shards
        sd = get_model_state_dict(wrapped, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)) if sharded else None
        if rank != 0:
            return
        peft_model = model.backbone
        adapter = os.path.join(local, ADAPTER_DIR)
        if sd is not None:
            sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
            peft_model.save_pretrained(adapter, state_dict=sd)
        else:
            peft_model.save_pretrained(adapter)
        model.tokenizer.save_pretrained(adapter)
        log.info("saved LoRA adapter to %s", adapter)
        if cfg.save_merged:
            save_merged_from_adapter(cfg, adapter, local)
        _copy_out(local, out_dir)
        return
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if sharded else None
    if rank != 0:
        return
    if sharded:
        from dataclasses import replace

        target = BiEncoder.from_config(replace(cfg, gradient_checkpointing=False), "cpu", for_fsdp=True)
        target.load_state_dict(full)
    else:
        target = model
    target.to("cpu").save(local)
    _copy_out(local, out_dir)
