"""Rows of different lengths stacked into one batch: the one padding function the models use."""
from __future__ import annotations

import torch


def pad(rows: list[torch.Tensor], value: float | int = 0, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i] or [L_i, d] rows into [B, L] or [B, L, d] plus a [B, L] mask of real positions.

    Right padding for the LLM (its positions count from the left); left padding for the distiller,
    whose last K positions are read, so every row must end at the same place.
    """
    length = max(r.shape[0] for r in rows)
    first = rows[0]
    out = first.new_full((len(rows), length, *first.shape[1:]), value)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=first.device)
    for i, r in enumerate(rows):
        where = slice(length - r.shape[0], length) if left else slice(0, r.shape[0])
        out[i, where] = r
        mask[i, where] = 1
    return out, mask
