"""Train stage: InfoNCE fine-tuning of the bi-encoder student on Ray Train (TorchTrainer).

Input: Parquet in the sentence-transformers layout (``anchor``, ``positive``, ``negative_1..n``; one row per
(query, positive)). Each worker iterates its ``get_dataset_shard("train")``; tokenisation happens in the
collate. DDP for small models (one forward per step: queries and passages concatenated), FSDP2
(``fully_shard`` per decoder layer, bf16 compute over fp32 shards) for 7B. Checkpoints go through
``ray.train.report`` every ``checkpoint_every`` steps; a re-run with the same ``run_name`` and
``storage_path`` resumes from ``ray.train.get_checkpoint()``. Rank 0 saves a folder loadable by
``transformers.AutoModel`` and ``SentenceTransformer``.

Ray is imported inside functions only: the model and loss it uses run without Ray.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from raymine import columns as C
from raymine.config import TrainConfig
from raymine.loss import info_nce, text_keys
from raymine.model import BiEncoder, pad_and_concat, resolve_dtype

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up to the base lr over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return max(0.0, (total_steps - step) / span)

    return f


def negative_columns(names: list[str], num_hard_negatives: int) -> list[str]:
    """The first ``num_hard_negatives`` negative columns; a clear error if the table has fewer."""
    wanted = [C.negative_column(i) for i in range(1, num_hard_negatives + 1)]
    missing = [c for c in [C.ANCHOR, C.POSITIVE, *wanted] if c not in names]
    if missing:
        have = sum(1 for n in names if n.startswith(C.NEGATIVE_PREFIX))
        raise ValueError(
            f"training table lacks columns {missing} (num_hard_negatives={num_hard_negatives}, "
            f"table has {have} negative columns; columns: {names})"
        )
    return wanted


class Collate:
    """Arrow/numpy batch of rows → token tensors + text keys (runs in the worker's data iterator).

    Output: ``q_*`` [B, Tq] and ``p_*`` [B*(1+H), Tp] (positives first, then each row's H negatives,
    row-major), or, with ``single_forward``, ``x_*`` [B + B*(1+H), T] for one concatenated forward.
    ``pos_keys`` [B], ``neg_keys`` [B, H]: text keys to mask duplicates of a positive.
    """

    def __init__(self, model: BiEncoder, neg_cols: list[str], single_forward: bool) -> None:
        self.model = model
        self.neg_cols = neg_cols
        self.single_forward = single_forward

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        queries = list(batch[C.ANCHOR])
        positives = list(batch[C.POSITIVE])
        b, h = len(queries), len(self.neg_cols)
        negs = [batch[c][i] for i in range(b) for c in self.neg_cols]  # row-major [B*H]
        q = self.model.tokenize(queries, "query")
        p = self.model.tokenize(positives + negs, "passage")
        out: dict[str, torch.Tensor] = {
            "pos_keys": text_keys(positives),  # [B]
            "neg_keys": text_keys(negs).reshape(b, h),  # [B, H]
        }
        if self.single_forward:
            x = pad_and_concat([q, p], self.model.tokenizer.pad_token_id, self.model.left_padded)
            out.update({f"x_{k}": v for k, v in x.items()})
        else:
            out.update({f"q_{k}": v for k, v in q.items()})
            out.update({f"p_{k}": v for k, v in p.items()})
        return out


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, group=None):
    """Embed a collated batch (one or two forwards) and return (InfoNCE loss, real tokens)."""
    b, h = batch["neg_keys"].shape
    if "x_input_ids" in batch:
        emb = model(batch["x_input_ids"], batch["x_attention_mask"], batch["x_pool_mask"])  # [B + B*(1+H), d]
        q, p = emb[:b], emb[b:]
        tokens = int(batch["x_attention_mask"].sum())
    else:
        q = model(batch["q_input_ids"], batch["q_attention_mask"], batch["q_pool_mask"])  # [B, d]
        p = model(batch["p_input_ids"], batch["p_attention_mask"], batch["p_pool_mask"])  # [B*(1+H), d]
        tokens = int(batch["q_attention_mask"].sum() + batch["p_attention_mask"].sum())
    pos, negs = p[:b], p[b:].reshape(b, h, -1)  # [B, d], [B, H, d]
    loss = info_nce(
        q, pos, negs, temperature=cfg.temperature, in_batch=cfg.in_batch_negatives,
        pos_keys=batch["pos_keys"] if cfg.mask_duplicate_passages else None,
        neg_keys=batch["neg_keys"] if cfg.mask_duplicate_passages else None,
        group=group,
    )
    return loss, tokens


# ------------------------------------------------------------------------------------------------
# Parallel wrappers (inside an initialised process group)
# ------------------------------------------------------------------------------------------------
def wrap_model(model: BiEncoder, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """DDP (small models) or FSDP2 fully_shard per transformer layer with bf16 compute (large models)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model.to(device)
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model.to(device)
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = resolve_dtype(cfg.dtype, device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layer_names = set(getattr(model.base_model(), "_no_split_modules", None) or [])
    n = 0
    for mod in model.modules():
        if type(mod).__name__ in layer_names:
            fully_shard(mod, mesh=mesh, mp_policy=mp)
            n += 1
    fully_shard(model, mesh=mesh, mp_policy=mp)
    log.info("FSDP: %d layers of %s sharded over %d ranks, compute %s", n, sorted(layer_names), mesh.size(), dtype)
    return model


def _sync_context(wrapped: torch.nn.Module, sync: bool):
    """No gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def _restore():
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return _restore()
    return contextlib.nullcontext()


def _state_options(cfg: TrainConfig, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=cfg.lora, **kw)


# ------------------------------------------------------------------------------------------------
# The per-worker loop
# ------------------------------------------------------------------------------------------------
def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    cfg: TrainConfig = config["cfg"]
    total_steps: int = config["total_steps"]
    steps_per_epoch: int = config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, ctx.get_local_world_size())))

    model = BiEncoder.from_config(cfg, device, for_fsdp=cfg.strategy == "fsdp" and world > 1)
    model.train()
    wrapped = wrap_model(model, cfg, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, total_steps))
    # a separate group for the loss's gathers, so they never interleave with DDP/FSDP's own collectives
    group = dist.new_group(backend="gloo" if device.type == "cpu" else None) if dist.is_initialized() else None

    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        set_model_state_dict(wrapped, state["model"], options=_state_options(cfg, strict=not cfg.lora))
        set_optimizer_state_dict(wrapped, opt, state["optimizer"], options=_state_options(cfg))
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        if rank == 0:
            log.info("resumed from checkpoint at step %d", step)
    start_step = step

    neg_cols = config["neg_cols"]
    collate = Collate(model, neg_cols, single_forward=cfg.strategy == "ddp")
    shard = ray.train.get_dataset_shard("train")
    losses: list[float] = []
    tokens_seen, t_start = 0, time.perf_counter()
    t_log, tok_log = t_start, 0

    def report(with_checkpoint: bool, extra: dict[str, Any] | None = None) -> None:
        metrics = {"step": step, "start_step": start_step, "loss": losses[-1] if losses else float("nan"),
                   "losses": list(losses), "lr": sched.get_last_lr()[0], **(extra or {})}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        state = {
            "model": get_model_state_dict(wrapped, options=_state_options(cfg)),
            "optimizer": get_optimizer_state_dict(wrapped, opt, options=_state_options(cfg)),
        }
        if rank != 0:
            ray.train.report(metrics)
            return
        state.update(scheduler=sched.state_dict(), step=step)
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    while step < total_steps:
        epoch = step // steps_per_epoch
        skip = (step % steps_per_epoch) * cfg.grad_accum  # micro-batches already trained on in this epoch
        it = iter(shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, collate_fn=collate,
            local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=cfg.seed + epoch,
        ))
        for _ in range(skip):
            next(it, None)
        exhausted = False
        while step < total_steps and not exhausted:
            opt.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = next(it, None)
                # every rank must run the same number of micro-steps (collectives): stop together
                have = torch.tensor([0 if batch is None else 1], device=device)
                if group is not None:
                    dist.all_reduce(have, op=dist.ReduceOp.MIN, group=group)
                if int(have.item()) == 0:
                    exhausted = True
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                with _sync_context(wrapped, micro == cfg.grad_accum - 1):
                    loss, ntok = compute_loss(wrapped, batch, cfg, group)
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                step_tokens += ntok
            if exhausted:
                break  # a partial accumulation is dropped (its gradients are zeroed next step)
            opt.step()
            sched.step()
            step += 1
            mean_loss = torch.tensor([step_loss], dtype=torch.float64, device=device)
            if group is not None:
                dist.all_reduce(mean_loss, group=group)
                mean_loss /= world
            losses.append(float(mean_loss.item()))
            tokens_seen += step_tokens
            tok_log += step_tokens
            if rank == 0 and (step % cfg.log_every == 0 or step == total_steps):
                now = time.perf_counter()
                log.info("step %d/%d epoch %d loss %.4f lr %.2e %.0f tokens/s (rank 0)",
                         step, total_steps, epoch, losses[-1], sched.get_last_lr()[0], tok_log / (now - t_log))
                t_log, tok_log = now, 0
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                report(with_checkpoint=True)
        if exhausted and step == start_step and epoch > 0 and skip == 0:
            raise RuntimeError("training data yielded no full batch in an epoch")

    elapsed = time.perf_counter() - t_start
    tok_s = tokens_seen * world / elapsed if elapsed > 0 else 0.0
    _save_final(wrapped, model, cfg, config["out_dir"], rank, world)
    report(with_checkpoint=step > start_step, extra={"tokens_per_s": tok_s, "train_s": elapsed})


def _save_final(wrapped, model: BiEncoder, cfg: TrainConfig, out_dir: str, rank: int, world: int) -> None:
    """Rank 0 writes the model folder (LoRA merged); FSDP first gathers the full weights (all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = cfg.strategy == "fsdp" and world > 1
    full = None
    if sharded:
        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    if sharded:
        target = BiEncoder.from_config(replace(cfg, gradient_checkpointing=False), "cpu", for_fsdp=True)
        target.load_state_dict(full)
    else:
        target = model
    local = out_dir if "://" not in out_dir else tempfile.mkdtemp(prefix="raymine_model_")
    target.to("cpu").save(local)
    if local != out_dir:
        import pyarrow.fs as pafs

        from raymine.storage import resolve

        fs, path = resolve(out_dir)
        pafs.copy_files(local, path, destination_filesystem=fs)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def train_stage(
    train_uri: str, cfg: TrainConfig, out_dir: str, run_name: str, storage_path: str | None = None
) -> dict[str, Any]:
    """Fine-tune the student on the mined table with Ray Train; returns the model folder and the loss curve.

    ``storage_path`` (default: ``<out_dir>_ray``) holds Ray Train's checkpoints; re-running with the
    same ``run_name`` and ``storage_path`` resumes from the latest checkpoint.
    Returns ``{"model_dir", "steps", "start_step", "final_loss", "losses", "wall_s", "tokens_per_s", ...}``.
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    ds = ray.data.read_parquet(train_uri)
    neg_cols = negative_columns(list(ds.schema().names), cfg.num_hard_negatives)
    ds = ds.select_columns([C.ANCHOR, C.POSITIVE, *neg_cols])
    n_rows = ds.count()
    per_worker = n_rows // cfg.num_workers  # the split gives every worker the same number of rows
    micro_per_epoch = per_worker // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n_rows} training rows cannot fill one step: {cfg.num_workers} workers x batch_size "
            f"{cfg.batch_size} x grad_accum {cfg.grad_accum} = {cfg.num_workers * cfg.batch_size * cfg.grad_accum}"
        )
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    dropped = n_rows - steps_per_epoch * cfg.grad_accum * cfg.batch_size * cfg.num_workers
    log.info("train: %d rows, %d workers, %d steps/epoch, %d steps total (%d rows per epoch not in a full step)",
             n_rows, cfg.num_workers, steps_per_epoch, total_steps, dropped)
    if storage_path is None:
        storage_path = out_dir.rstrip("/") + "_ray"
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    if "://" not in out_dir:
        out_dir = os.path.abspath(out_dir)

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                           "neg_cols": neg_cols, "out_dir": out_dir},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
    )
    result = trainer.fit()
    m = result.metrics or {}
    out = {
        "model_dir": out_dir,
        "steps": int(m.get("step", 0)),
        "start_step": int(m.get("start_step", 0)),
        "final_loss": float(m.get("loss", math.nan)),
        "losses": list(m.get("losses", [])),
        "tokens_per_s": float(m.get("tokens_per_s", 0.0)),
        "rows": n_rows,
        "rows_not_in_a_step_per_epoch": dropped,
        "steps_per_epoch": steps_per_epoch,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_s": time.perf_counter() - t0,
    }
    log.info("train: %d steps (from %d), final loss %.4f, %.0f s", out["steps"], out["start_step"],
             out["final_loss"], out["wall_s"])
    return out
