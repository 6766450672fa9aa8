"""Self-distillation inside a code pyramid (Wang et al., "Faster Person Re-Identification", ECCV 2020).

The full-length code teaches each shorter code of the same network, so the short codes that the
coarse-to-fine search ranks with first agree with the long code that finishes the ranking. The teacher
argument is always detached: only the student level learns from a term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProbSelfDistill(nn.Module):
    """Symmetric KL divergence, KL(teacher || student) + KL(student || teacher), of the class distributions.

    As in light-reid: both directions, no temperature by default (T = 1), mean over the batch. It is written
    as sum_c (p_t - p_s)(log p_t - log p_s) from log-softmax, which equals light-reid's two KL sums without
    their 1e-8 guard inside the logarithms. A temperature T > 1 softens both distributions; the T^2 factor
    keeps the gradient scale of `KLDivergenceKD`.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"self-distillation temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"probability self-distillation needs logits of one shape (same identities, same batch), got "
                f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
            )
        t = self.temperature
        log_student = F.log_softmax(student_logits.float() / t, dim=1)
        log_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
        difference = (log_teacher.exp() - log_student.exp()) * (log_teacher - log_student)
        return difference.sum(dim=1).mean() * t * t


def _row_normalised_gram(codes: torch.Tensor) -> torch.Tensor:
    """The batch's inner-product matrix, each row scaled to unit L2 norm (which removes the code length)."""
    codes = codes.float()
    return F.normalize(codes @ codes.t(), dim=1)


class SIMSelfDistill(nn.Module):
    """Mean squared difference of the student's and the teacher's row-normalised batch similarity matrices.

    light-reid's definition: similarities are raw inner products of the relaxed codes, and each row of the
    matrix (not each code) is L2-normalised, so codes of different lengths compare. The values are small
    (rows of unit norm over the batch), hence light-reid's weight of 1000.
    """

    def forward(self, student_codes: torch.Tensor, teacher_codes: torch.Tensor) -> torch.Tensor:
        if student_codes.dim() != 2 or teacher_codes.dim() != 2 or len(student_codes) != len(teacher_codes):
            raise ValueError(
                f"similarity self-distillation needs (B, D) codes of the same batch, got student "
                f"{tuple(student_codes.shape)} and teacher {tuple(teacher_codes.shape)}"
            )
        student = _row_normalised_gram(student_codes)
        teacher = _row_normalised_gram(teacher_codes.detach())
        return F.mse_loss(student, teacher)
