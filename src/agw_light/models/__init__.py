"""Re-id networks as plain nn.Modules: ResNet backbones, non-local attention, GeM pooling, heads."""

from agw_light.models.attention import NonLocalBlock
from agw_light.models.backbones import (
    ResNetBackbone,
    load_backbone_state_dict,
    load_pretrained,
    read_state_dict,
)
from agw_light.models.build import BACKBONES, NECKS, build_model
from agw_light.models.heads import BNNeckHead, CodePyramidHead, HashHead, PlainHead
from agw_light.models.pooling import AveragePooling, GeneralizedMeanPooling
from agw_light.models.reid import ReIDModel

__all__ = [
    "AveragePooling",
    "BACKBONES",
    "BNNeckHead",
    "CodePyramidHead",
    "GeneralizedMeanPooling",
    "HashHead",
    "NECKS",
    "NonLocalBlock",
    "PlainHead",
    "ReIDModel",
    "ResNetBackbone",
    "build_model",
    "load_backbone_state_dict",
    "load_pretrained",
    "read_state_dict",
]
