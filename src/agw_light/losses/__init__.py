"""Loss functions and the weighted loss stack a table row selects from its config."""

from agw_light.losses.distill import TEACHER_TARGETS, KLDivergenceKD, SimilarityKD
from agw_light.losses.identity import CrossEntropyLabelSmooth
from agw_light.losses.self_distill import ProbSelfDistill, SIMSelfDistill
from agw_light.losses.stack import LOSSES, PER_LEVEL, LossStack, LossTerm, build_loss_stack, expand_level_losses
from agw_light.losses.triplet import WeightedRegularizedTriplet, pairwise_euclidean

__all__ = [
    "LOSSES",
    "CrossEntropyLabelSmooth",
    "KLDivergenceKD",
    "LossStack",
    "LossTerm",
    "PER_LEVEL",
    "ProbSelfDistill",
    "SIMSelfDistill",
    "SimilarityKD",
    "TEACHER_TARGETS",
    "WeightedRegularizedTriplet",
    "build_loss_stack",
    "expand_level_losses",
    "pairwise_euclidean",
]
