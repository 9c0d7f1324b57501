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


class SparseKL(nn.Module):
    """KL(p_teacher || p_student) with the teacher known only by its top k tokens and the mass r outside them.

    The k tokens and "everything else" form k+1 outcomes: sum_i p_i (log p_i - log q_i) + r (log r - log q_rest),
    q_rest the student's mass outside the same k tokens. It equals ForwardKL when k covers the vocabulary,
    and is otherwise never above it (merging outcomes cannot increase a KL). Both sides at temperature T:
    the teacher's top-k must have been taken at the same T.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, teacher_log_rest: torch.Tensor,
                student_logits: torch.Tensor) -> torch.Tensor:
        if teacher_logp.shape[0] != student_logits.shape[0]:  # gather() would not notice
            raise ValueError(f"{teacher_logp.shape[0]} teacher rows for {student_logits.shape[0]} student rows")
        s = F.log_softmax(student_logits.float() / self.temperature, -1)
        ids = teacher_ids.long()
        head = (teacher_logp.exp() * (teacher_logp - s.gather(1, ids))).sum(-1)
        # r = 0 (k covers the vocabulary) contributes nothing; the where()s keep -inf out of the
        # forward AND the backward (a logsumexp over nothing but -inf has a NaN gradient).
        has_rest = torch.isfinite(teacher_log_rest)
        outside = torch.where(has_rest.unsqueeze(1), s.scatter(1, ids, float("-inf")), torch.zeros_like(s))
        log_r = torch.where(has_rest, teacher_log_rest, torch.zeros_like(teacher_log_rest))
        tail = torch.where(has_rest, log_r.exp() * (log_r - outside.logsumexp(-1)), torch.zeros_like(log_r))
        return (head + tail).sum() / s.shape[0]


class OptionKL(nn.Module):
    """Mean over queries of KL(p_teacher || p_student) between option distributions: softmax(-loss / T)
    over each query's options, loss the mean per-token loss `mendctl eval` ranks them by."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, teacher_losses: list[torch.Tensor], student_losses: list[torch.Tensor]) -> torch.Tensor:
        if len(teacher_losses) != len(student_losses):
            raise ValueError(f"{len(teacher_losses)} teacher queries for {len(student_losses)} student queries")
        kls = [F.kl_div(F.log_softmax(-s.float() / self.temperature, -1), F.log_softmax(-t.float() / self.temperature, -1),
                        log_target=True, reduction="sum") for t, s in zip(teacher_losses, student_losses)]
        return torch.stack(kls).mean()
