"""Losses as plain modules over the LLM's next-token logits at the selected positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ForwardKL(nn.Module):
    """Mean over positions of KL(p_teacher || p_student), both at temperature T (method.md)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        t = F.log_softmax(teacher_logits.float() / self.temperature, -1)
        s = F.log_softmax(student_logits.float() / self.temperature, -1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")


class TargetCE(nn.Module):
    """Mean cross-entropy of the student on the target (output) tokens."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)
