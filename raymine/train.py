"""Train stage: InfoNCE fine-tuning of the bi-encoder student on Ray Train (TorchTrainer).

Input: the mined table (ids) and the corpus. :mod:`raymine.train_data` joins them (Ray Data) into an
internal id-carrying table — one row per (query, positive) with all positive ids of the query and the
query's negatives (variable number) — and writes each epoch's seeded order once, in row groups of one
rank's batch; every worker reads only its slice of each global batch of that order, so the data order is a
function of the seed alone. The loss masks, for each row, every in-batch passage (any worker) that is a known positive of the
row's query, and optionally the passages the student scores above the row's positive (positive-aware).

DDP for small models (one forward per step: queries and passages concatenated); FSDP2 + LoRA for 7B
(:mod:`raymine.loading`: weights read once on rank 0, bf16 frozen base, adapter-only save). LR schedule
from ``transformers.get_scheduler``; loss, learning rate and masked counts recorded per step, plotted to
``loss_curve.png`` in the model folder. Checkpoints go through ``ray.train.report`` every
``checkpoint_every`` steps; a lost worker restarts the group from the last checkpoint (``FailureConfig``),
and a re-run with the same ``run_name`` and ``storage_path`` resumes from it. Dropout is seeded per
(step, rank), so a resumed run equals an uninterrupted one.

Ray is imported inside functions only: the model and loss it uses run without Ray.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raymine import columns as C
from raymine import storage
from raymine.config import MineConfig, TrainConfig
from raymine.loss import id_keys, info_nce, text_keys
from raymine.model import BiEncoder

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LOSS_PLOT = "loss_curve.png"
MASK_STATS = ("masked_same_query", "masked_positive_aware", "masked_duplicate_text", "candidates")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """``transformers.get_scheduler(cfg.lr_scheduler)`` with ``cfg.warmup_steps`` warm-up over ``total_steps``."""
    from transformers import get_scheduler

    try:
        return get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    except ValueError as e:
        raise ValueError(f"train.lr_scheduler: {e}") from e


def positive_aware_rule(cfg: TrainConfig, mine_cfg: MineConfig | None = None) -> tuple[str, float] | None:
    """``cfg.positive_aware`` → the loss's ``("perc", p)`` / ``("margin", m)`` rule, or None when off.

    'mine' follows the mining method: percpos → ("perc", mine.perc), marginpos → ("margin", -mine.margin).
    """
    if cfg.positive_aware == "none":
        return None
    if cfg.positive_aware == "perc":
        return ("perc", float(cfg.positive_aware_perc))
    if cfg.positive_aware == "margin":
        return ("margin", float(cfg.positive_aware_margin))
    if cfg.positive_aware == "mine":
        if mine_cfg is None:
            raise ValueError("train.positive_aware='mine' needs the mining config (mine_cfg)")
        if mine_cfg.method == "percpos":
            return ("perc", float(mine_cfg.perc))
        if mine_cfg.method == "marginpos":
            return ("margin", -float(mine_cfg.margin))
        raise ValueError(f"train.positive_aware='mine': mine.method {mine_cfg.method!r} has no positive-relative rule "
                         "(percpos or marginpos); set train.positive_aware to 'perc' or 'margin'")
    raise ValueError(f"train.positive_aware: unknown value {cfg.positive_aware!r}")


def _list_column(batch: pa.Table | dict, name: str) -> list[list[str]]:
    col = batch[name]
    return col.to_pylist() if hasattr(col, "to_pylist") else [list(x) for x in col]


def _column(batch: pa.Table | dict, name: str) -> list:
    col = batch[name]
    return col.to_pylist() if hasattr(col, "to_pylist") else list(col)


class Collate:
    """Training rows (``TRAIN_ROW_COLUMNS``, pyarrow table or dict of columns) → token tensors + id/text keys.

    Each row trains on ``min(H, its negatives)`` of its mined negatives, drawn for the epoch by
    :func:`raymine.train_data.draw_negatives` (a function of seed, epoch and ids only). Output: ``q_*``
    [B, Tq] and ``p_*`` [B + R, Tp] (positives first, then the R ≤ B*H drawn negatives, row-major; a short
    row's missing slots are not encoded), or, with ``single_forward``, ``x_*`` [2B + R, T] for one
    concatenated forward. ``neg_valid`` [B, H]: which slots hold a drawn negative (the loss masks the
    others). ``pos_keys`` [B] / ``neg_keys`` [B, H]: text keys (identical-text masking); ``pos_ids`` [B] /
    ``neg_ids`` [B, H]: id keys (0 in empty slots); ``query_pos_ids`` [B, P]: id keys of every positive of
    the row's query (padded by repeating the row's own positive).
    """

    def __init__(self, model: BiEncoder, num_hard_negatives: int, seed: int = 0) -> None:
        self.model = model
        self.h = num_hard_negatives
        self.seed = seed

    def __call__(self, batch: pa.Table | dict, epoch: int = 0) -> dict[str, torch.Tensor]:
        from raymine.train_data import draw_negatives

        queries, positives = _column(batch, C.QUERY), _column(batch, C.POSITIVE)
        pos_id, qids = _column(batch, C.POSITIVE_ID), _column(batch, C.QUERY_ID)
        neg_ids_all, negs_all = _list_column(batch, C.NEGATIVE_IDS), _list_column(batch, C.NEGATIVES)
        qpos = _list_column(batch, C.POSITIVE_IDS)
        b, h = len(queries), self.h
        valid = torch.zeros((b, h), dtype=torch.bool)  # [B, H]
        neg_ids: list[str] = []  # [R] drawn negatives, row-major
        negs: list[str] = []
        slot_ids: list[str | None] = [None] * (b * h)  # [B*H]
        slot_texts: list[str | None] = [None] * (b * h)
        for i in range(b):
            ids = list(neg_ids_all[i] or [])
            for j, k in enumerate(draw_negatives(self.seed, epoch, qids[i], pos_id[i], ids, h)):
                valid[i, j] = True
                slot_ids[i * h + j], slot_texts[i * h + j] = ids[k], negs_all[i][k]
                neg_ids.append(ids[k])
                negs.append(negs_all[i][k])
        width = max([len(x) for x in qpos] + [1])
        qpos_keys = torch.zeros((b, width), dtype=torch.long)  # [B, P]
        for i, (ids, own) in enumerate(zip(qpos, pos_id, strict=True)):
            ids = list(ids) or [own]
            qpos_keys[i] = id_keys(ids + [own] * (width - len(ids)))
        q = self.model.tokenize(queries, "query")
        p = self.model.tokenize(positives + negs, "passage")
        flat = valid.reshape(-1)
        nk = torch.zeros(b * h, dtype=torch.long)
        ni = torch.zeros(b * h, dtype=torch.long)
        if negs:
            nk[flat] = text_keys([t for t in slot_texts if t is not None])
            ni[flat] = id_keys([d for d in slot_ids if d is not None])
        out: dict[str, torch.Tensor] = {
            "pos_keys": text_keys(positives),  # [B]
            "neg_keys": nk.reshape(b, h),  # [B, H]
            "pos_ids": id_keys(pos_id),  # [B]
            "neg_ids": ni.reshape(b, h),  # [B, H]
            "neg_valid": valid,  # [B, H]
            "query_pos_ids": qpos_keys,  # [B, P]
        }
        out.update({f"q_{k}": v for k, v in q.items()})
        out.update({f"p_{k}": v for k, v in p.items()})
        return out


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, group=None,
                 rule: tuple[str, float] | None = None, stats: dict[str, float] | None = None):
    """Embed a collated batch and return (InfoNCE loss, real tokens): DDP makes one forward call (queries and
    passages as two backbone passes inside it, as DDP needs one forward per backward); FSDP two calls.

    ``rule``: positive-aware in-batch masking (:func:`positive_aware_rule`); ``stats`` collects masked counts.
    """
    b, h = batch["neg_keys"].shape
    q_in = (batch["q_input_ids"], batch["q_attention_mask"], batch["q_pool_mask"])
    if cfg.strategy == "ddp":
        q, p = model(*q_in, p_input_ids=batch["p_input_ids"], p_attention_mask=batch["p_attention_mask"],
                     p_pool_mask=batch["p_pool_mask"])  # [B, d], [B + R, d]
    else:
        q = model(*q_in)  # [B, d]
        p = model(batch["p_input_ids"], batch["p_attention_mask"], batch["p_pool_mask"])  # [B + R, d]
    tokens = int(batch["q_attention_mask"].sum() + batch["p_attention_mask"].sum())
    valid = batch.get("neg_valid")
    if valid is None:
        pos, negs = p[:b], p[b:].reshape(b, h, -1)  # [B, d], [B, H, d]
    else:
        pos = p[:b]  # [B, d]
        negs = p.new_zeros((b * h, p.shape[1]))  # [B*H, d]; empty slots stay zero and are masked in the loss
        negs = negs.index_copy(0, valid.reshape(-1).nonzero().squeeze(1), p[b:]).reshape(b, h, -1)  # [B, H, d]
    loss = info_nce(
        q, pos, negs, temperature=cfg.temperature, in_batch=cfg.in_batch_negatives,
        pos_keys=batch["pos_keys"] if cfg.mask_duplicate_passages else None,
        neg_keys=batch["neg_keys"] if cfg.mask_duplicate_passages else None,
        group=group,
        pos_ids=batch["pos_ids"], neg_ids=batch["neg_ids"],
        query_pos_ids=batch["query_pos_ids"] if cfg.mask_same_query else None,
        positive_aware=rule, stats=stats, neg_valid=valid,
    )
    return loss, tokens


# ------------------------------------------------------------------------------------------------
# Parallel wrappers (inside an initialised process group)
# ------------------------------------------------------------------------------------------------
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
def _step_seed(seed: int, step: int, rank: int) -> int:
    """RNG seed of one (step, rank): dropout masks depend on the step, not on when the process started."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2**63)


def _empty_history() -> dict[str, list[float]]:
    return {"losses": [], "lrs": [], **{k: [] for k in MASK_STATS}, "val_steps": [], "val_scores": []}


def _encode_shared(model: BiEncoder, texts: list[str], side: str, batch_size: int, rank: int, world: int,
                   group) -> np.ndarray:
    """[N, d] embeddings of ``texts``, the batches spread over the ranks and gathered on every rank.

    Rank r encodes batches r, r + world, ...; every rank runs the same number of forwards (a rank short
    of batches repeats its last one), so FSDP's collectives inside the forward line up."""
    import torch.distributed as dist

    from raymine.validation import encode_texts

    bs = max(1, batch_size)
    chunks = [list(range(lo, min(lo + bs, len(texts)))) for lo in range(0, len(texts), bs)]
    mine = chunks[rank::world]
    rounds = -(-len(chunks) // world)
    got: list[tuple[list[int], np.ndarray]] = []
    for j in range(rounds):
        idx = mine[j] if j < len(mine) else (mine[-1] if mine else chunks[0])
        emb = encode_texts(model, [texts[i] for i in idx], side, bs)  # [b, d]
        if j < len(mine):
            got.append((idx, emb))
    parts = [got]
    if group is not None and world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, got, group=group)
    out: np.ndarray | None = None
    for part in parts:
        for idx, emb in part:
            if out is None:
                out = np.zeros((len(texts), emb.shape[1]), np.float32)
            out[idx] = emb
    return out if out is not None else np.zeros((0, 0), np.float32)  # [N, d]


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

    from raymine.loading import build_student
    from raymine.train_data import iter_global_batches

    cfg: TrainConfig = config["cfg"]
    total_steps: int = config["total_steps"]
    steps_per_epoch: int = config["steps_per_epoch"]
    rule = config["rule"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, ctx.get_local_world_size())))

    model, wrapped = build_student(cfg, device, rank, world)
    rss_loaded = _peak_rss_mib()  # host RAM high-water mark once the model is built (the loading path's peak)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg, total_steps)
    # a separate group for the loss's gathers, so they never interleave with DDP/FSDP's own collectives
    group = dist.new_group(backend="gloo" if device.type == "cpu" else None) if dist.is_initialized() else None

    step, history = 0, _empty_history()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        set_model_state_dict(wrapped, state["model"], options=_state_options(cfg, strict=not cfg.lora))
        set_optimizer_state_dict(wrapped, opt, state["optimizer"], options=_state_options(cfg))
        sched.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), state["history"]
        if rank == 0:
            log.info("resumed from checkpoint at step %d", step)
    start_step = step

    collate = Collate(model, cfg.num_hard_negatives, seed=cfg.seed)
    val = config.get("validation")  # None: no validation, the last step's weights are saved
    vset = None
    if val is not None:
        from raymine.validation import ValidationSet, best_point, validation_points

        vset = ValidationSet(val["folder"])
        points = set(validation_points(total_steps, val["every"]))

    def validate() -> None:
        """Score the model at this step; a new best is written to its own file (ties keep the earlier step)."""
        if step == 0 and val.get("base_score") is not None and not history["val_steps"]:
            score = float(val["base_score"])  # the teacher's stored vectors are the base student's own
        else:
            lengths = model.max_lengths
            model.max_lengths = dict(val["max_lengths"])  # the evaluation lengths, not the training ones
            try:
                q = _encode_shared(model, vset.queries, "query", val["batch_size"], rank, world, group)
                p = _encode_shared(model, vset.passages, "passage", val["batch_size"], rank, world, group)
            finally:
                model.max_lengths = lengths
            score = vset.score(q, p)
        best = best_point(list(zip(history["val_steps"], history["val_scores"], strict=True))) \
            if history["val_steps"] else None
        history["val_steps"].append(step)
        history["val_scores"].append(score)
        if best is None or score > best[1]:
            sd = get_model_state_dict(wrapped, options=_state_options(cfg))
            if rank == 0:  # one file per best step: a resumed run still finds the step its history keeps
                storage.write_bytes(_best_file(val, step), _state_bytes({"step": step, "score": score, "model": sd}))
        if rank == 0:
            log.info("validation at step %d: nDCG@10 %.4f (best %.4f at step %d)", step, score,
                     *(best_point(list(zip(history["val_steps"], history["val_scores"], strict=True)))[::-1]))

    def stale() -> bool:
        """Early stop: the last ``patience`` validations brought no gain over the best before them."""
        k = val["patience"] if val else 0
        scores = history["val_scores"]
        return bool(k) and len(scores) > k and max(scores[-k:]) <= max(scores[:-k])

    if vset is not None and step == 0:
        validate()
    global_batch = cfg.batch_size * world
    tokens_seen, t_start = 0, time.perf_counter()
    t_log, tok_log = t_start, 0

    def report(with_checkpoint: bool, extra: dict[str, Any] | None = None) -> None:
        metrics = {"step": step, "start_step": start_step,
                   "loss": history["losses"][-1] if history["losses"] else float("nan"),
                   **{k: list(v) for k, v in history.items()}, **(extra or {})}
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
        state.update(scheduler=sched.state_dict(), step=step, history=history)
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        # every worker streams the same epoch order and reads only its slice of each global micro-batch;
        # micro-batches already trained on in this epoch (resume) are skipped undecoded
        it = iter_global_batches(config["epoch_uris"][epoch], global_batch, skip_batches=in_epoch * cfg.grad_accum,
                                 rows=(rank * cfg.batch_size, cfg.batch_size))  # this rank's rows only
        for _ in range(steps_per_epoch - in_epoch):
            if step >= total_steps:
                break
            torch.manual_seed(_step_seed(cfg.seed, step, rank))
            opt.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]
            step_loss, step_tokens, stats = 0.0, 0, {}
            for micro in range(cfg.grad_accum):
                part = next(it)  # this rank's B rows of the global micro-batch
                batch = {k: v.to(device) for k, v in collate(part, epoch).items()}
                with _sync_context(wrapped, micro == cfg.grad_accum - 1):
                    loss, ntok = compute_loss(wrapped, batch, cfg, group, rule, stats)
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                step_tokens += ntok
            opt.step()
            sched.step()
            step += 1
            agg = torch.tensor([step_loss, *[stats.get(k, 0) for k in MASK_STATS]], dtype=torch.float64)
            if group is not None:
                dist.all_reduce(agg, group=group)
            history["losses"].append(float(agg[0]) / world)
            history["lrs"].append(float(lr))
            for k, v in zip(MASK_STATS, agg[1:].tolist(), strict=True):
                history[k].append(int(v))
            tokens_seen += step_tokens
            tok_log += step_tokens
            if rank == 0 and (step % cfg.log_every == 0 or step == total_steps):
                now = time.perf_counter()
                log.info("step %d/%d epoch %d loss %.4f lr %.2e masked %d same-query %d positive-aware "
                         "%.0f tokens/s (rank 0)", step, total_steps, epoch, history["losses"][-1], lr,
                         history["masked_same_query"][-1], history["masked_positive_aware"][-1],
                         tok_log / (now - t_log))
                t_log, tok_log = now, 0
            if vset is not None and step in points:
                validate()
            stop = vset is not None and stale()
            if step % cfg.checkpoint_every == 0 and step < total_steps or (stop and step < total_steps):
                report(with_checkpoint=True)
            if stop:
                if rank == 0:
                    log.info("early stop at step %d: %d validations without a gain", step, val["patience"])
                break
        else:
            continue
        break

    if vset is not None and history["val_steps"] and history["val_steps"][-1] != step:
        validate()  # a resumed run that stopped between points, or an early stop off the schedule
    kept = None
    if vset is not None and history["val_steps"]:
        kept = best_point(list(zip(history["val_steps"], history["val_scores"], strict=True)))
        if kept[0] != step:  # restore the best weights before saving (every rank: FSDP shards them)
            best = torch.load(io.BytesIO(storage.read_bytes(_best_file(val, kept[0]))), map_location="cpu",
                              weights_only=False)
            if best["step"] != kept[0]:
                raise RuntimeError(f"{_best_file(val, kept[0])} holds step {best['step']}, not {kept[0]}")
            set_model_state_dict(wrapped, best["model"], options=_state_options(cfg, strict=not cfg.lora))
            if rank == 0:
                log.info("restored the weights of step %d (validation nDCG@10 %.4f; last step %d: %.4f)",
                         kept[0], kept[1], step, history["val_scores"][-1])
    elapsed = time.perf_counter() - t_start
    tok_s = tokens_seen * world / elapsed if elapsed > 0 else 0.0
    from raymine.loading import save_student

    save_student(wrapped, model, cfg, config["out_dir"], rank, world)
    rss = torch.tensor([[rss_loaded, _peak_rss_mib()]], dtype=torch.float64)  # [1, 2] high-water marks, MiB
    if group is not None:
        rss = torch.cat(_all_gather(rss, group, world))  # [world, 2]
    report(with_checkpoint=step > start_step,
           extra={"tokens_per_s": tok_s, "train_s": elapsed, "peak_rss_mib_after_load_per_rank": rss[:, 0].tolist(),
                  "peak_rss_mib_per_rank": rss[:, 1].tolist(), "last_step": step,
                  "kept_step": kept[0] if kept else step, "kept_score": kept[1] if kept else None})


def _best_file(val: dict[str, Any], step: int) -> str:
    """Where the weights of a best validation step are kept (beside Ray Train's checkpoints, never rotated)."""
    return storage.join(val["best_dir"], f"best_step{step:08d}.pt")


def _state_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _all_gather(x: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    out = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(out, x, group=group)
    return out


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def plot_losses(history: dict[str, list[float]], out_uri: str) -> str | None:
    """Loss (and learning rate, masked in-batch candidates) per step → PNG at ``out_uri``; None if no steps."""
    if not history.get("losses"):
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(history["losses"]) + 1))
    with_val = bool(history.get("val_steps"))
    fig, axes = plt.subplots(1, 3 if with_val else 2, figsize=(15 if with_val else 10, 3.5))
    if with_val:
        axes[2].plot(history["val_steps"], [100 * v for v in history["val_scores"]], marker="o",
                     label="validation nDCG@10")
        from raymine.validation import best_point

        k, v = best_point(list(zip(history["val_steps"], history["val_scores"], strict=True)))
        axes[2].scatter([k], [100 * v], color="tab:red", zorder=3, label=f"kept: step {k}")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("nDCG@10")
        axes[2].legend(loc="lower right")
    axes[0].plot(steps, history["losses"], label="InfoNCE loss (mean over workers)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right")
    lr_ax = axes[0].twinx()
    lr_ax.plot(steps, history["lrs"], color="tab:gray", linestyle="--", linewidth=1)
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    for k in ("masked_same_query", "masked_positive_aware", "masked_duplicate_text"):
        axes[1].plot(steps, history.get(k) or [0] * len(steps), label=k.replace("masked_", ""))
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("masked in-batch (row, passage) pairs")
    axes[1].legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(out_uri, buf.getvalue())
    return out_uri


def train_stage(
    mined_uri: str,
    corpus_uri: str,
    cfg: TrainConfig,
    model_dir: str,
    run_name: str,
    storage_path: str | None = None,
    mine_cfg: MineConfig | None = None,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune the student on the mined table with Ray Train; returns counts, the loss curve and the model folder.

    ``mined_uri``: the mined table (ids); ``corpus_uri``: the corpus (Parquet file or folder, ``PASSAGE`` or
    ``TITLE``/``TEXT``). The training rows are built once per (inputs, num_hard_negatives) under
    ``storage_path/train_rows/<key>`` (Ray Data join, :mod:`raymine.train_data`). ``storage_path``
    (default ``<model_dir>_ray``) holds Ray Train's checkpoints; it must be reachable from every node.
    Re-running with the same ``run_name`` and the same input files resumes from the latest checkpoint (the Ray
    Train run is ``<run_name>-<rows key>``: rows rebuilt from a re-mined table start afresh); a worker lost
    mid-run is restarted from it (``cfg.max_failures`` times). ``mine_cfg`` is used by ``positive_aware='mine'``.

    ``validation`` (model selection; None = keep the last step): ``folder`` (a :mod:`raymine.validation`
    folder), ``every``, ``patience``, ``batch_size``, ``max_lengths`` ({"query", "passage"}: the evaluation
    lengths), ``base_score`` (step 0's score when known without encoding, else None). The workers score the
    model at step 0 and at :func:`raymine.validation.validation_points`; the best weights (ties: the earlier
    step) are written beside the checkpoints, outside Ray Train's rotation, and restored before the model
    is saved. Returned: ``validation`` {"steps", "scores", "kept_step", "kept_score", "last_step",
    "last_score", "base_score", "base_kept"}.

    The epoch order is a function of ``cfg.seed`` alone, and dropout is seeded per (step, rank): two runs
    with the same inputs and config train the same model, interrupted or not.
    Returns ``{"model_dir", "steps", "start_step", "final_loss", "losses", "lrs", "masked_*", "loss_plot",
    "rows", ...}``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymine.train_data import build_rows, write_epoch

    t0 = time.perf_counter()
    rule = positive_aware_rule(cfg, mine_cfg)
    if storage_path is None:
        storage_path = model_dir.rstrip("/") + "_ray"
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    if "://" not in model_dir:
        model_dir = os.path.abspath(model_dir)
    rows_key = storage.stage_key(  # by content: a re-mine in the same folder gets new rows and a new run
        "train_rows", mined_uri, storage.fingerprint(mined_uri), corpus_uri, storage.fingerprint(corpus_uri),
        cfg.num_hard_negatives)
    rows_uri = storage.join(storage_path, "train_rows", rows_key)
    run_name = f"{run_name}-{rows_key[:8]}"  # never resume a checkpoint trained on other rows
    counts = build_rows(mined_uri, corpus_uri, rows_uri, cfg.num_hard_negatives)
    if validation is not None:
        validation = {**validation, "best_dir": storage.join(storage_path, f"{run_name}_best")}
    n_rows = counts["rows"]
    global_batch = cfg.num_workers * cfg.batch_size
    steps_per_epoch = n_rows // global_batch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n_rows} training rows cannot fill one step: {cfg.num_workers} workers x batch_size "
            f"{cfg.batch_size} x grad_accum {cfg.grad_accum} = {global_batch * cfg.grad_accum}"
        )
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    dropped = n_rows - steps_per_epoch * cfg.grad_accum * global_batch
    log.info("train: %d rows, %d workers, %d steps/epoch, %d steps total (%d rows per epoch not in a full step)",
             n_rows, cfg.num_workers, steps_per_epoch, total_steps, dropped)
    # each epoch's order (seeded global shuffle) is written once, before the workers start
    epoch_uris = [write_epoch(rows_uri, cfg.seed, e, f"{rows_uri}_seed{cfg.seed}_epoch{e}", cfg.batch_size)
                  for e in range(math.ceil(total_steps / steps_per_epoch))]

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                           "epoch_uris": epoch_uris, "out_dir": model_dir, "rule": rule, "validation": validation},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    m = result.metrics or {}
    history = {k: list(m.get(k, [])) for k in _empty_history()}
    plot = plot_losses(history, storage.join(model_dir, LOSS_PLOT))
    val_out = None
    if validation is not None and history["val_steps"]:
        scores = history["val_scores"]
        val_out = {"steps": history["val_steps"], "scores": scores, "kept_step": int(m.get("kept_step", 0)),
                   "kept_score": m.get("kept_score"), "last_step": int(m.get("last_step", 0)),
                   "last_score": scores[-1], "base_score": scores[0] if history["val_steps"][0] == 0 else None,
                   "base_kept": int(m.get("kept_step", 0)) == 0}
        log.info("validation: nDCG@10 %s; kept step %d (%.4f)%s", ", ".join(
            f"{s_}:{100 * v:.2f}" for s_, v in zip(history["val_steps"], scores, strict=True)), val_out["kept_step"],
            val_out["kept_score"], " — the base model scored best: it is the model saved" if val_out["base_kept"] else "")
    out = {
        "model_dir": model_dir,
        "steps": int(m.get("step", 0)),
        "start_step": int(m.get("start_step", 0)),
        "final_loss": float(m.get("loss", math.nan)),
        **history,
        "loss_plot": plot,
        "tokens_per_s": float(m.get("tokens_per_s", 0.0)),
        "peak_rss_mib_after_load_per_rank": list(m.get("peak_rss_mib_after_load_per_rank", [])),
        "peak_rss_mib_per_rank": list(m.get("peak_rss_mib_per_rank", [])),
        **counts,
        "rows_not_in_a_step_per_epoch": dropped,
        "steps_per_epoch": steps_per_epoch,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "validation": val_out,
        "wall_s": time.perf_counter() - t0,
    }
    log.info("train: %d steps (from %d), final loss %.4f, %.0f s", out["steps"], out["start_step"],
             out["final_loss"], out["wall_s"])
    return out
