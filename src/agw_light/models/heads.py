"""Re-id heads: pool the feature map into one vector per image, then what training and retrieval need.

BNNeck (Luo et al. 2019, "Bag of Tricks", used by AGW): the triplet loss sees the pooled feature, the ID
classifier and retrieval see it after a BatchNorm whose bias is frozen at zero (no shift, so the feature
stays centred on the hypersphere the classifier separates). Inits follow BoT/AGW: BN weight 1 and bias 0,
classifier weights N(0, 0.001^2) without bias.

Code heads (light feature and light search) put a tanh relaxation after the BNNeck: the classifier sees
tanh(BN(x)) during training (the triplet loss still sees the feature before the BatchNorm), and the sign of
BN(x) is the binary code compared by Hamming distance at test time.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from agw_light.checks import is_integer
from agw_light.models.pooling import GeneralizedMeanPooling

# Which BNNeck output a BNNeckHead returns for retrieval: after the BatchNorm (BoT, AGW, fast-reid) or before it
# (reid-strong-baseline's and ReID-Survey's TEST.NECK_FEAT: 'before').
NECK_FEATS = ("after", "before")


def _check_classes(head: nn.Module, num_classes: int) -> None:
    if not is_integer(num_classes) or num_classes < 1:
        raise ValueError(f"{type(head).__name__} needs num_classes >= 1 (training identities), got {num_classes!r}")


class BNNeckHead(nn.Module):
    """Pooling + BNNeck + ID classifier.

    `outputs` (and train mode) gives {"features": pooled, "bn_features": after BN, "logits": classifier output};
    eval mode returns only the retrieval feature of size ``feature_dim``: after the BatchNorm, or before it with
    ``neck_feat="before"``.
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, pooling: nn.Module | None = None, neck_feat: str = "after"
    ) -> None:
        super().__init__()
        _check_classes(self, num_classes)
        if neck_feat not in NECK_FEATS:
            raise ValueError(f"neck_feat={neck_feat!r}: expected one of {NECK_FEATS}")
        self.feature_dim = in_channels
        self.num_classes = num_classes
        self.neck_feat = neck_feat
        self.pooling = GeneralizedMeanPooling() if pooling is None else pooling
        self.bottleneck = nn.BatchNorm1d(in_channels)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(in_channels, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def outputs(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output, in either mode: the pooled feature, its BNNeck output and the class logits."""
        features = self.pooling(feature_map)
        bn_features = self.bottleneck(features)
        return {"features": features, "bn_features": bn_features, "logits": self.classifier(bn_features)}

    @property
    def retrieval_output(self) -> str:
        """The `outputs` key eval mode returns."""
        return "bn_features" if self.neck_feat == "after" else "features"

    def forward(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        outputs = self.outputs(feature_map)
        return outputs if self.training else outputs[self.retrieval_output]


class PlainHead(nn.Module):
    """Pooling (+ an optional embedding: linear, BatchNorm, ReLU) + a classifier with bias, no BNNeck.

    The head of torchreid's softmax ResNets (``fc_dims=[512]`` for ``resnet50_fc512``) and of
    reid-strong-baseline with ``MODEL.NECK: 'no'``: retrieval compares the pooled (or embedded) feature itself.
    `outputs` gives {"features", "bn_features" (the same tensor: there is no neck), "logits"}.
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, pooling: nn.Module | None = None, embedding_dim: int | None = None
    ) -> None:
        super().__init__()
        _check_classes(self, num_classes)
        self.pooling = GeneralizedMeanPooling() if pooling is None else pooling
        self.embedding = None
        if embedding_dim is not None:
            if not is_integer(embedding_dim) or embedding_dim < 1:
                raise ValueError(f"embedding_dim={embedding_dim!r}: expected a positive integer or null")
            self.embedding = nn.Sequential(
                nn.Linear(in_channels, embedding_dim), nn.BatchNorm1d(embedding_dim), nn.ReLU(inplace=True)
            )
        self.feature_dim = in_channels if embedding_dim is None else embedding_dim
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    retrieval_output = "features"

    def outputs(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output, in either mode: the (embedded) pooled feature and the class logits."""
        features = self.pooling(feature_map)
        if self.embedding is not None:
            features = self.embedding(features)
        return {"features": features, "bn_features": features, "logits": self.classifier(features)}

    def forward(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        outputs = self.outputs(feature_map)
        return outputs if self.training else outputs["features"]


DEFAULT_PYRAMID = (2048, 1024, 512, 256, 128, 64, 32)


def _bnneck(size: int) -> nn.BatchNorm1d:
    """BNNeck's BatchNorm: weight 1, bias 0 and frozen, so no learnt offset shifts the code's bits."""
    bn = nn.BatchNorm1d(size)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


def _id_classifier(size: int, num_classes: int) -> nn.Linear:
    classifier = nn.Linear(size, num_classes, bias=False)
    nn.init.normal_(classifier.weight, std=0.001)
    return classifier


class CodePyramidHead(nn.Module):
    """Binary codes of decreasing lengths from one pooled feature (Wang et al., ECCV 2020, light search).

    Each level k has a pre-BN projection p_k, a BNNeck BatchNorm and an ID classifier; its relaxed code is
    tanh(BN(p_k)) in training, and its binary code the sign of that (bit = value > 0) at test time.
    Level 0 is the hash head of the light feature: p_0 is the pooled feature itself or, when the backbone's
    width differs from the first length, a linear layer on BN(pooled) (light-reid's "middle fc", bias-free
    here because the BatchNorm after it cancels a bias). Level k > 0: p_k is a bias-free linear layer on
    p_{k-1} DETACHED, so a shorter code learns from the longer one without pulling it (or the backbone)
    toward itself; only level 0's losses train the backbone.

    Train mode returns, for every length L, "codes_L" (the relaxed code), "logits_L" (the classifier on
    it) and "features_L" (what the level's triplet loss reads, before the BatchNorm as in BNNeck and
    light-reid: the pooled feature for the first level, the level's projection p_k for the others), plus
    the first level under the names the row-1 loss entries read: "features" (the pooled feature),
    "logits", and "bn_features" (its BN output before tanh, for feature distillation). Eval mode returns
    the relaxed codes of all levels side by side in order of decreasing length, (B, sum(code_lengths)):
    their signs are the codes.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        pooling: nn.Module | None = None,
        code_lengths: tuple[int, ...] | list[int] = DEFAULT_PYRAMID,
    ) -> None:
        super().__init__()
        _check_classes(self, num_classes)
        lengths = tuple(int(length) for length in code_lengths)
        if not lengths or min(lengths) < 1 or any(a <= b for a, b in itertools.pairwise(lengths)):
            raise ValueError(
                f"code_lengths={list(code_lengths)}: expected positive lengths in strictly decreasing order, "
                f"e.g. {list(DEFAULT_PYRAMID)}"
            )
        self.code_lengths = lengths
        self.feature_dim = sum(lengths)
        self.num_classes = num_classes
        self.pooling = GeneralizedMeanPooling() if pooling is None else pooling
        first = lengths[0]
        self.input_projection = (
            None
            if first == in_channels
            else nn.Sequential(_bnneck(in_channels), nn.Linear(in_channels, first, bias=False))
        )
        self.projections = nn.ModuleList(
            nn.Linear(longer, shorter, bias=False) for longer, shorter in itertools.pairwise(lengths)
        )
        self.bottlenecks = nn.ModuleList(_bnneck(length) for length in lengths)
        self.classifiers = nn.ModuleList(_id_classifier(length, num_classes) for length in lengths)

    def forward(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        pooled = self.pooling(feature_map)
        projected = [pooled if self.input_projection is None else self.input_projection(pooled)]
        for projection in self.projections:
            projected.append(projection(projected[-1].detach()))
        bn_features = [bn(p) for bn, p in zip(self.bottlenecks, projected, strict=True)]
        codes = [torch.tanh(bn) for bn in bn_features]
        if not self.training:
            return torch.cat(codes, dim=1)
        outputs: dict[str, torch.Tensor] = {}
        metric_inputs = [pooled, *projected[1:]]
        levels = zip(self.code_lengths, metric_inputs, codes, self.classifiers, strict=True)
        for length, features, code, classifier in levels:
            outputs[f"features_{length}"] = features
            outputs[f"codes_{length}"] = code
            outputs[f"logits_{length}"] = classifier(code)
        first = self.code_lengths[0]
        outputs.update(features=pooled, bn_features=bn_features[0], logits=outputs[f"logits_{first}"])
        return outputs


class HashHead(CodePyramidHead):
    """The light feature's head (table row 3): a one-level pyramid, one `code_length`-bit code.

    Pooling + BNNeck + tanh relaxation (+ a linear layer and a second BN, light-reid's "middle fc", when
    the backbone's width is not `code_length`); the classifier sees the relaxed code. Same outputs as
    `CodePyramidHead`, with ``code_lengths == (code_length,)`` and an eval output of shape (B, code_length).
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, pooling: nn.Module | None = None, code_length: int = 2048
    ) -> None:
        super().__init__(in_channels, num_classes, pooling=pooling, code_lengths=(code_length,))
