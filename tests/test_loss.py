"""InfoNCE: against a per-query loop written from the definition, and 2-process gloo vs one process."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raymine.loss import id_keys, info_nce, text_keys


def _reference(q, pos, negs, t, in_batch, pos_keys=None, neg_keys=None):
    """Loop over queries: -log softmax of the own positive among the candidate list, mean over queries."""
    b, h = negs.shape[0], negs.shape[1]
    total = 0.0
    for i in range(b):
        if in_batch:
            cands = [pos[j] for j in range(b)] + [negs[j, k] for j in range(b) for k in range(h)]
            ckeys = None if pos_keys is None else [pos_keys[j] for j in range(b)] + [
                neg_keys[j, k] for j in range(b) for k in range(h)
            ]
            own = i
        else:
            cands = [pos[i]] + [negs[i, k] for k in range(h)]
            ckeys, own = None, 0
        scores = []
        for c_idx, c in enumerate(cands):
            if ckeys is not None and c_idx != own and int(ckeys[c_idx]) == int(pos_keys[i]):
                continue  # duplicate of the own positive: not a negative
            scores.append(float(q[i] @ c) / t)
        denom = math.log(sum(math.exp(s) for s in scores))
        total += denom - float(q[i] @ cands[own]) / t
    return total / b


def _data(b=4, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    pos = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    negs = torch.nn.functional.normalize(torch.randn(b, h, d, generator=g, dtype=torch.float64), dim=-1)
    return q, pos, negs


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("h", [0, 1, 3])
def test_matches_definition(in_batch, h):
    q, pos, negs = _data(b=5, h=h)
    got = info_nce(q, pos, negs, temperature=0.07, in_batch=in_batch)
    assert got.item() == pytest.approx(_reference(q, pos, negs, 0.07, in_batch), rel=1e-9)


@pytest.mark.parametrize("in_batch", [True, False])
def test_short_rows_equal_the_definition_without_their_empty_slots(in_batch):
    """Rows with fewer negatives than H (``neg_valid``): the loss equals the definition computed over the
    negatives that exist — an empty slot is no candidate for any row — and its gradient reaches no slot."""
    q, pos, negs = _data(b=4, h=3, seed=3)
    valid = torch.tensor([[True, True, True], [True, False, False], [False, False, False], [True, True, False]])
    garbage = negs.clone()
    garbage[~valid] = 5.0  # whatever sits in an empty slot must not matter
    garbage.requires_grad_(True)
    got = info_nce(q, pos, garbage, temperature=0.05, in_batch=in_batch, neg_valid=valid)
    want = 0.0
    for i in range(4):  # per row: its own list of existing negatives (in-batch: everyone's existing ones)
        if in_batch:
            cands = [pos[j] for j in range(4)] + [negs[j, k] for j in range(4) for k in range(3) if valid[j, k]]
            own = i
        else:
            cands = [pos[i]] + [negs[i, k] for k in range(3) if valid[i, k]]
            own = 0
        s = [float(q[i] @ c) / 0.05 for c in cands]
        want += math.log(sum(math.exp(x) for x in s)) - s[own]
    assert got.item() == pytest.approx(want / 4, rel=1e-9)
    got.backward()
    assert garbage.grad[~valid].abs().max() == 0 and garbage.grad[valid].abs().max() > 0


def test_duplicate_positive_masked():
    q, pos, negs = _data(b=4, h=2)
    texts_pos = ["alpha", "beta", "Alpha  ", "gamma"]  # rows 0 and 2 share a positive (normalised)
    texts_neg = [["x", "y"], ["beta", "z"], ["u", "v"], ["w", "ALPHA"]]  # row 1's neg = row 1's positive
    pk = text_keys(texts_pos)
    nk = text_keys([t for row in texts_neg for t in row]).reshape(4, 2)
    assert pk[0] == pk[2] and pk[1] == nk[1, 0]
    got = info_nce(q, pos, negs, temperature=0.05, pos_keys=pk, neg_keys=nk)
    ref = _reference(q, pos, negs, 0.05, True, pk, nk)
    assert got.item() == pytest.approx(ref, rel=1e-9)
    unmasked = info_nce(q, pos, negs, temperature=0.05)
    assert unmasked.item() > got.item()  # masking removes candidates: the loss can only fall


def _masked_reference(q, pos, negs, t, allowed):
    """-log softmax of row i's positive over the in-batch candidate columns ``allowed(i)`` (mean over rows).

    Columns: [positives of rows 0..N-1, then hard negatives row-major]; plain python floats.
    """
    b, h = negs.shape[0], negs.shape[1]
    cands = [pos[j] for j in range(b)] + [negs[j, k] for j in range(b) for k in range(h)]
    total = 0.0
    for i in range(b):
        scores = [float(q[i] @ cands[c]) / t for c in allowed(i)]
        total += math.log(sum(math.exp(s) for s in scores)) - float(q[i] @ pos[i]) / t
    return total / b


def test_siblings_masked_by_query_id():
    """Rows 0 and 1 are one query (positives d0, d1): each row's logits lose the sibling positive and row 2's
    hard negative d1 (also a positive of that query). Row 3 lists its own hard negative d9 among its query's
    positives: own hard negatives are never masked."""
    q, pos, negs = _data(b=4, h=1, seed=3)
    pos_ids = id_keys(["d0", "d1", "d2", "d3"])
    neg_ids = id_keys(["d7", "d7", "d1", "d9"]).reshape(4, 1)
    qpos = torch.stack([id_keys(x) for x in (["d0", "d1"], ["d0", "d1"], ["d2", "d2"], ["d3", "d9"])])  # [4, 2]
    # columns: 0 d0 | 1 d1 | 2 d2 | 3 d3 | 4 d7 (row 0's neg) | 5 d7 (row 1's) | 6 d1 (row 2's) | 7 d9 (row 3's)
    allowed = {0: [0, 2, 3, 4, 5, 7], 1: [1, 2, 3, 4, 5, 7], 2: list(range(8)), 3: list(range(8))}
    stats: dict = {}
    got = info_nce(q, pos, negs, temperature=0.05, pos_ids=pos_ids, neg_ids=neg_ids, query_pos_ids=qpos, stats=stats)
    assert got.item() == pytest.approx(_masked_reference(q, pos, negs, 0.05, allowed.__getitem__), rel=1e-9)
    assert stats["masked_same_query"] == 4 and stats["candidates"] == 4 * 8
    unmasked = info_nce(q, pos, negs, temperature=0.05)
    assert unmasked.item() == pytest.approx(_masked_reference(q, pos, negs, 0.05, lambda i: range(8)), rel=1e-9)
    assert got.item() < unmasked.item()
    with pytest.raises(ValueError, match="pos_ids"):
        info_nce(q, pos, negs, query_pos_ids=qpos)


@pytest.mark.parametrize("rule", [("perc", 0.9), ("perc", 0.5), ("margin", -0.1), ("margin", 0.05)])
def test_positive_aware_masking_matches_hand_rule(rule):
    """Candidate c (not row i's positive nor its hard negatives) is dropped when s(q_i, c) > ceiling_i, with
    ceiling = pos - |pos|*(1-p) or pos + m, written out in plain floats (negative positive scores included)."""
    b, h = 6, 2
    q, pos, negs = _data(b=b, h=h, d=4, seed=5)
    cands = [pos[j] for j in range(b)] + [negs[j, k] for j in range(b) for k in range(h)]
    n_masked = 0
    keep: dict[int, list[int]] = {}
    for i in range(b):
        p = float(q[i] @ pos[i])
        ceiling = p - abs(p) * (1 - rule[1]) if rule[0] == "perc" else p + rule[1]
        own = {i} | {b + i * h + k for k in range(h)}
        keep[i] = [c for c in range(len(cands)) if c in own or float(q[i] @ cands[c]) <= ceiling]
        n_masked += len(cands) - len(keep[i])
    assert any(float(q[i] @ pos[i]) < 0 for i in range(b))  # the sign-safe case is exercised
    stats: dict = {}
    got = info_nce(q, pos, negs, temperature=0.05, positive_aware=rule, stats=stats)
    assert got.item() == pytest.approx(_masked_reference(q, pos, negs, 0.05, keep.__getitem__), rel=1e-9)
    assert stats["masked_positive_aware"] == n_masked
    if rule == ("perc", 0.5):
        assert n_masked > 0


def test_shape_errors():
    q, pos, negs = _data()
    with pytest.raises(ValueError, match="pos must be"):
        info_nce(q, pos[:2], negs)
    with pytest.raises(ValueError, match="negs must be"):
        info_nce(q, pos, negs[:, :, :3])


# ------------------------------------------------------------------------------------------------
WORLD, B, H, D, T = 2, 3, 2, 8, 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keys():
    # row 0 of rank 0 and row 1 of rank 1 share a positive text: masked across workers
    pos_texts = ["p0", "p1", "p2", "q0", "p0", "q2"]
    neg_texts = [f"n{i}" for i in range(WORLD * B * H)]
    neg_texts[7] = "p1"  # a rank-1 hard negative identical to rank 0's positive 1
    return text_keys(pos_texts), text_keys(neg_texts).reshape(WORLD * B, H)


def _id_args(sl: slice) -> dict:
    """Query-id masking + positive-aware masking across workers: rows 0 (rank 0) and 4 (rank 1) are siblings."""
    pos_ids = [f"d{i}" for i in range(WORLD * B)]
    neg_ids = [f"n{i}" for i in range(WORLD * B * H)]
    neg_ids[7] = "d0"  # a rank-1 hard negative (row 3) that is a positive of row 0's query
    qpos = [[p, p] for p in pos_ids]
    qpos[0] = qpos[4] = ["d0", "d4"]
    return {"pos_ids": id_keys(pos_ids)[sl], "neg_ids": id_keys(neg_ids).reshape(WORLD * B, H)[sl],
            "query_pos_ids": torch.stack([id_keys(x) for x in qpos])[sl], "positive_aware": ("perc", 0.7)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        q, pos, negs = _data(b=WORLD * B, h=H, d=D, seed=1)
        pk, nk = _keys()
        sl = slice(rank * B, (rank + 1) * B)
        q, pos, negs = (x[sl].clone().requires_grad_(True) for x in (q, pos, negs))
        stats: dict = {}
        loss = info_nce(q, pos, negs, temperature=T, pos_keys=pk[sl], neg_keys=nk[sl], **_id_args(sl), stats=stats)
        (loss / WORLD).backward()  # DDP averages gradients over workers: the same scaling
        total = loss.detach() / WORLD
        dist.all_reduce(total)
        torch.save({"stats": stats, "loss": total, "q": q.grad, "pos": pos.grad, "negs": negs.grad}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_equal_single_process(tmp_path):
    q, pos, negs = _data(b=WORLD * B, h=H, d=D, seed=1)
    pk, nk = _keys()
    q, pos, negs = (x.clone().requires_grad_(True) for x in (q, pos, negs))
    plain = info_nce(q, pos, negs, temperature=T, pos_keys=pk, neg_keys=nk)
    assert plain.item() == pytest.approx(_reference(q.detach(), pos.detach(), negs.detach(), T, True, pk, nk), rel=1e-9)
    stats: dict = {}
    ref = info_nce(q, pos, negs, temperature=T, pos_keys=pk, neg_keys=nk, **_id_args(slice(None)), stats=stats)
    ref.backward()
    assert stats["masked_same_query"] == 4 and stats["masked_positive_aware"] > 0

    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    parts = [torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD)]
    assert parts[0]["loss"].item() == pytest.approx(ref.item(), rel=1e-12)
    for k, v in stats.items():
        assert sum(p["stats"][k] for p in parts) == v, k
    for name, full in (("q", q.grad), ("pos", pos.grad), ("negs", negs.grad)):
        got = torch.cat([p[name] for p in parts])
        torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-14)
    assert pos.grad.abs().sum() > 0 and negs.grad.abs().sum() > 0
