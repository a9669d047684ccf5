"""Pooling token states into one vector — shared by the teacher encoders and the trained student.

Pure torch. Shapes: ``hidden`` [B, T, H], ``attention_mask`` [B, T] (1 = real token),
``pool_mask`` [B, T] (1 = token counted in the pool; instruction/prompt tokens are 0).
"""
from __future__ import annotations

from typing import Literal

import torch

Pooling = Literal["mean", "cls", "last_token"]


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Average of the states where ``pool_mask`` is 1; the denominator counts only those tokens."""
    m = pool_mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    summed = (hidden * m).sum(dim=1)  # [B, H]
    count = m.sum(dim=1).clamp(min=1e-9)  # [B, 1]
    return summed / count


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the first real token (works for left padding too)."""
    first = attention_mask.to(torch.long).argmax(dim=1)  # [B] index of first 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), first]


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the last real token, correct for left and right padding."""
    b, t = attention_mask.shape
    positions = torch.arange(t, device=attention_mask.device).expand(b, t)  # [B, T]
    last = (positions * attention_mask.to(torch.long)).argmax(dim=1)  # [B] highest index with mask 1
    return hidden[torch.arange(b, device=hidden.device), last]


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    method: Pooling,
    pool_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool [B, T, H] → [B, H]. ``pool_mask`` (mean only) excludes prompt tokens; defaults to the attention mask."""
    if method == "mean":
        return mean_pool(hidden, attention_mask if pool_mask is None else pool_mask * attention_mask)
    if method == "cls":
        return cls_pool(hidden, attention_mask)
    if method == "last_token":
        return last_token_pool(hidden, attention_mask)
    raise ValueError(f"unknown pooling {method!r}; expected mean, cls or last_token")


def prompt_pool_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor, left_padded: bool) -> torch.Tensor:
    """Pool mask with the first ``prompt_lengths[i]`` real tokens of row i zeroed (instruction tokens).

    ``prompt_lengths`` [B] counts the prompt's tokens including any special token before it (e.g. BOS/CLS).
    """
    b, t = attention_mask.shape
    am = attention_mask.to(torch.long)
    if left_padded:
        start = t - am.sum(dim=1)  # [B] index of first real token
    else:
        start = torch.zeros(b, dtype=torch.long, device=am.device)
    positions = torch.arange(t, device=am.device).expand(b, t)  # [B, T]
    in_prompt = (positions >= start[:, None]) & (positions < (start + prompt_lengths.to(am.device))[:, None])
    return am * (~in_prompt).to(am.dtype)
