"""Knowledge distillation from a frozen teacher: the light model's losses (table rows 2 and 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Batch targets a frozen teacher adds for the loss stack (agw_light.lit.teacher computes them): a loss entry
# whose `target` is one of these needs a teacher checkpoint, and a student's checkpoint drops such entries.
TEACHER_TARGETS = ("teacher_logits", "teacher_features")


class KLDivergenceKD(nn.Module):
    """Hinton's KD: KL(teacher || student) of temperature-softened class distributions, times T^2.

    The T^2 factor keeps the gradient scale independent of the temperature, so the weight in the loss stack
    means the same for any T (light-reid uses T=4).
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"KD needs student and teacher logits of the same shape (same training identities), got "
                f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
            )
        t = self.temperature
        student = F.log_softmax(student_logits.float() / t, dim=1)
        teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
        return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * t * t


class SimilarityKD(nn.Module):
    """Feature-relation KD: the student's batch cosine-similarity matrix should match the teacher's.

    It transfers how the teacher relates the images of a batch, which works across feature sizes (512-d
    student, 2048-d teacher) where a direct feature match cannot.
    """

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        if student_features.shape[0] != teacher_features.shape[0]:
            raise ValueError(
                f"similarity KD needs the same batch for student and teacher, got {student_features.shape[0]} "
                f"and {teacher_features.shape[0]} rows"
            )
        student = F.normalize(student_features.float(), dim=1)
        teacher = F.normalize(teacher_features.float(), dim=1)
        return F.mse_loss(student @ student.t(), teacher @ teacher.t())
