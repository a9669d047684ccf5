"""InfoNCE over [own positive, own hard negatives, in-batch passages of every worker] — pure torch.

No Ray import: the same code runs inside Ray Train workers and on a GPU box without Ray.
Passages are gathered across workers *with gradients* (:func:`gather_with_grad`), so the loss
each worker computes over its own queries sees the whole global batch of passages, and the sum of
the workers' losses has exactly the gradients of one process holding the concatenated batch.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 with uneven sizes; backward sums each rank's grads back to its own rows.

    Backward uses all_reduce (works on gloo and NCCL; gloo lacks reduce_scatter), then keeps
    this rank's slice: d(sum of every rank's loss)/d(own rows).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes_t = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes_t, n, group=group)
        sizes = [int(s.item()) for s in sizes_t]
        pad = max(sizes)
        xp = x.contiguous()
        if x.shape[0] < pad:
            xp = torch.cat([xp, xp.new_zeros((pad - x.shape[0], *x.shape[1:]))])  # [max_n, ...]
        out = [torch.empty_like(xp) for _ in range(world)]
        dist.all_gather(out, xp, group=group)
        ctx.group, ctx.sizes, ctx.rank, ctx.pad = group, sizes, rank, pad
        return torch.cat([o[:s] for o, s in zip(out, sizes, strict=False)])  # [sum(sizes), ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        sizes, pad = ctx.sizes, ctx.pad
        parts = list(torch.split(grad, sizes))
        padded = torch.stack(
            [torch.cat([p, p.new_zeros((pad - p.shape[0], *p.shape[1:]))]) if p.shape[0] < pad else p for p in parts]
        )  # [world, max_n, ...]
        padded = padded.contiguous()
        dist.all_reduce(padded, op=dist.ReduceOp.SUM, group=ctx.group)
        return padded[ctx.rank, : sizes[ctx.rank]], None


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits → fp32 for the softmax; fp32/fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] of every rank along dim 0 (rank order); identity when not distributed."""
    if not _distributed(group):
        return x
    return _GatherWithGrad.apply(x, group)


def gather_no_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (ids, keys)."""
    if not _distributed(group):
        return x
    with torch.no_grad():
        return _GatherWithGrad.apply(x.detach(), group)


def rank_offset(n: int, group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> int:
    """Index of this rank's first row in the gathered tensor (sum of the sizes of lower ranks)."""
    if not _distributed(group):
        return 0
    sizes = gather_no_grad(torch.tensor([n], dtype=torch.long, device=device), group)  # [world]
    return int(sizes[: dist.get_rank(group)].sum().item())


def text_keys(texts: Sequence[str]) -> torch.Tensor:
    """Stable int64 key per text (casefolded, whitespace collapsed) — equal keys mean identical text."""
    out = []
    for t in texts:
        norm = " ".join(str(t).casefold().split()).encode("utf-8")
        out.append(int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little", signed=True))
    return torch.tensor(out, dtype=torch.long)  # [N]


def id_keys(ids: Sequence[str]) -> torch.Tensor:
    """Stable int64 key per id string (exact, no normalisation) — equal keys mean the same document."""
    out = [int.from_bytes(hashlib.blake2b(str(i).encode("utf-8"), digest_size=8).digest(), "little", signed=True)
           for i in ids]
    return torch.tensor(out, dtype=torch.long)  # [N]


def positive_aware_ceiling(pos_scores: torch.Tensor, rule: tuple[str, float]) -> torch.Tensor:
    """Per-row ceiling [B] above which an in-batch candidate is masked as a likely false negative.

    ``("perc", p)``: sign-safe ``pos - |pos| * (1 - p)`` (mining's TopK-PercPos); ``("margin", m)``:
    ``pos + m`` (Qwen3-Embedding's rule with m = 0.1; m < 0 is mining's TopK-MarginPos ``pos - |m|``).
    """
    kind, value = rule
    if kind == "perc":
        return pos_scores - pos_scores.abs() * (1.0 - value)
    if kind == "margin":
        return pos_scores + value
    raise ValueError(f"positive-aware rule must be ('perc', p) or ('margin', m), got {rule!r}")


def info_nce(
    q: torch.Tensor,
    pos: torch.Tensor,
    negs: torch.Tensor | None = None,
    temperature: float = 0.05,
    in_batch: bool = True,
    pos_keys: torch.Tensor | None = None,
    neg_keys: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    reduction: str = "mean",
    *,
    pos_ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    query_pos_ids: torch.Tensor | None = None,
    positive_aware: tuple[str, float] | None = None,
    stats: dict[str, float] | None = None,
    neg_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of local queries against their positive, hard negatives and (optionally) in-batch passages.

    Shapes: ``q`` [B, d], ``pos`` [B, d], ``negs`` [B, H, d] (H ≥ 0) or None. Scores are plain inner
    products divided by ``temperature`` (normalise the embeddings beforehand for cosine).

    ``in_batch``: the candidates of query i are every positive and every hard negative of the global
    batch (all ranks, gathered with gradients), so they include its own positive and own hard
    negatives exactly once. Otherwise only [own positive, own hard negatives].

    ``pos_keys`` [B] / ``neg_keys`` [B, H] (int64 text keys, see :func:`text_keys`): an in-batch
    candidate whose key equals query i's own positive key (other than that positive itself) is
    masked, so a duplicate of the positive is not a negative.

    Masking by query (in-batch only): ``pos_ids`` [B] / ``neg_ids`` [B, H] are the int64 id keys
    (:func:`id_keys`) of each row's positive and hard negatives, ``query_pos_ids`` [B, P] the keys of
    *every* known positive of the row's query (pad by repeating one). A candidate anywhere in the
    global batch whose id is a known positive of row i's query is masked for row i — except row i's
    own positive (the target) and row i's own hard negatives, which are never masked.

    ``positive_aware`` (in-batch only): ``("perc", p)`` or ``("margin", m)`` — a candidate other than
    the own positive and own hard negatives whose (detached) score for row i's query exceeds
    :func:`positive_aware_ceiling` of row i's positive score is masked as a likely unlabelled positive.

    ``neg_valid`` [B, H] bool: which hard-negative slots hold a negative (rows with fewer negatives than H
    pad their slots with any vector); an empty slot is no candidate for any row (own or in-batch).

    ``stats``: a dict to which the numbers of masked (row, candidate) pairs are added:
    ``masked_same_query``, ``masked_positive_aware``, ``masked_duplicate_text`` (each pair counted once,
    in that order of precedence), and ``candidates`` (row x candidate pairs before masking).

    Returns the mean (or ``reduction="sum"``/``"none"``) over the local queries. Summed over ranks,
    the local means have the gradients of one process computing the sum of the per-rank means; with
    equal rank batch sizes, dividing by the world size (as DDP's gradient averaging does) gives the
    single-process mean over the concatenated batch.
    """
    b, d = q.shape
    if pos.shape != (b, d):
        raise ValueError(f"pos must be [B, d] = {(b, d)}, got {tuple(pos.shape)}")
    if negs is None:
        negs = q.new_zeros((b, 0, d))
    if negs.dim() != 3 or negs.shape[0] != b or negs.shape[2] != d:
        raise ValueError(f"negs must be [B, H, d] with B={b}, d={d}, got {tuple(negs.shape)}")
    h = negs.shape[1]

    if not in_batch:
        cand = torch.cat([pos[:, None, :], negs], dim=1)  # [B, 1+H, d]
        logits = torch.einsum("bd,bkd->bk", q, cand) / temperature  # [B, 1+H]
        if neg_valid is not None and h:
            empty = torch.cat([neg_valid.new_ones((b, 1)), neg_valid.to(q.device)], dim=1).logical_not()  # [B, 1+H]
            logits = logits.masked_fill(empty, float("-inf"))
        target = torch.zeros(b, dtype=torch.long, device=q.device)
        return F.cross_entropy(_upcast(logits), target, reduction=reduction)

    all_pos = gather_with_grad(pos, group)  # [N, d], N = global batch
    all_neg = gather_with_grad(negs.reshape(b * h, d), group)  # [N*H, d]
    offset = rank_offset(b, group, q.device)
    n = all_pos.shape[0]
    cand = torch.cat([all_pos, all_neg], dim=0)  # [N + N*H, d]
    scores = q @ cand.T  # [B, N + N*H]
    logits = scores / temperature
    rows = torch.arange(b, device=q.device)
    target = rows + offset  # [B] own positive's column
    # columns never masked for row i: its own positive and its own H hard negatives
    keep_own = torch.zeros_like(logits, dtype=torch.bool)  # [B, N + N*H]
    keep_own[rows, target] = True
    if h:
        own_neg_cols = n + (target[:, None] * h + torch.arange(h, device=q.device)[None, :])  # [B, H]
        keep_own[rows[:, None], own_neg_cols] = True
    masked = torch.zeros_like(keep_own)
    counts = {"masked_same_query": 0, "masked_positive_aware": 0, "masked_duplicate_text": 0}
    if query_pos_ids is not None:
        if pos_ids is None or (h and neg_ids is None):
            raise ValueError("query_pos_ids needs pos_ids [B] and neg_ids [B, H]")
        ids = torch.cat([pos_ids.reshape(b), (neg_ids if h else pos_ids.new_zeros((b, 0))).reshape(b * h)])
        ids = ids.to(q.device)  # [B + B*H]
        cand_ids = torch.cat([gather_no_grad(ids[:b], group), gather_no_grad(ids[b:], group)])  # [N + N*H]
        qp = query_pos_ids.to(q.device)  # [B, P]
        same = (cand_ids[None, :, None] == qp[:, None, :]).any(dim=-1) & ~keep_own  # [B, N + N*H]
        counts["masked_same_query"] = int(same.sum())
        masked |= same
    if positive_aware is not None:
        s = scores.detach()
        ceiling = positive_aware_ceiling(s[rows, target], positive_aware)  # [B]
        above = (s > ceiling[:, None]) & ~keep_own & ~masked  # [B, N + N*H]
        counts["masked_positive_aware"] = int(above.sum())
        masked |= above
    if pos_keys is not None:
        if neg_keys is None:
            neg_keys = torch.zeros((b, h), dtype=torch.long)
        keys = torch.cat([pos_keys.reshape(b), neg_keys.reshape(b * h)]).to(q.device)  # [B + B*H]
        # gather positives' and negatives' keys separately so they line up with ``cand``
        all_pk = gather_no_grad(keys[:b], group)  # [N]
        all_nk = gather_no_grad(keys[b:], group)  # [N*H]
        cand_keys = torch.cat([all_pk, all_nk])  # [N + N*H]
        dup = cand_keys[None, :] == pos_keys.to(q.device)[:, None]  # [B, N + N*H]
        dup[rows, target] = False  # the own positive stays
        counts["masked_duplicate_text"] = int((dup & ~masked).sum())
        masked |= dup
    if neg_valid is not None and h:
        all_valid = gather_no_grad(neg_valid.reshape(b * h).to(device=q.device, dtype=torch.long), group)  # [N*H]
        empty = torch.cat([all_valid.new_ones(n), all_valid]).eq(0)  # [N + N*H]
        masked |= empty[None, :]
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + b * cand.shape[0]
        for k, v in counts.items():
            stats[k] = stats.get(k, 0) + v
    if masked.any():
        logits = logits.masked_fill(masked, float("-inf"))
    return F.cross_entropy(_upcast(logits), target, reduction=reduction)
