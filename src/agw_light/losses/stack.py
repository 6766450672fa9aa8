"""A weighted list of loss terms, each reading one model output: rows add terms in config, not in code."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from agw_light.losses.distill import KLDivergenceKD, SimilarityKD
from agw_light.losses.identity import CrossEntropyLabelSmooth
from agw_light.losses.self_distill import ProbSelfDistill, SIMSelfDistill
from agw_light.losses.triplet import WeightedRegularizedTriplet

# type name -> factory(num_classes=..., **options).
LOSSES: dict[str, Callable[..., nn.Module]] = {
    "cross_entropy": lambda num_classes, epsilon=0.1: CrossEntropyLabelSmooth(epsilon),
    "weighted_triplet": lambda num_classes: WeightedRegularizedTriplet(),
    "kd_kl": lambda num_classes, temperature=4.0: KLDivergenceKD(temperature),
    "kd_similarity": lambda num_classes: SimilarityKD(),
    "prob_self_distill": lambda num_classes, temperature=1.0: ProbSelfDistill(temperature),
    "sim_self_distill": lambda num_classes: SIMSelfDistill(),
}


@dataclass(frozen=True)
class LossTerm:
    """One configured term: loss(outputs[output], targets[target]) * weight, logged as `name`.

    `target` names a batch target ("pids", a teacher's output) or, for self-distillation, another output of
    the model itself (e.g. the full-length code's "logits_2048"), which is then used detached.
    """

    name: str
    weight: float
    output: str
    target: str = "pids"


class LossStack(nn.Module):
    """Sums weighted terms and returns each unweighted value too, so every term can be logged separately."""

    def __init__(self, terms: Sequence[LossTerm], losses: Sequence[nn.Module]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("the loss stack is empty: configure at least one entry under `losses`")
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss names must be unique, got {names}")
        self.terms = list(terms)
        self.losses = nn.ModuleList(losses)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = None
        values: dict[str, torch.Tensor] = {}
        for term, loss in zip(self.terms, self.losses, strict=True):
            if term.output not in outputs:
                raise KeyError(
                    f"loss {term.name!r} reads model output {term.output!r}, but the model gives {sorted(outputs)}"
                )
            if term.target in targets:
                target = targets[term.target]
            elif term.target in outputs:
                # A model output as the reference: a fixed target of this step, never trained through.
                target = outputs[term.target].detach()
            else:
                raise KeyError(
                    f"loss {term.name!r} needs target {term.target!r}, which is neither a batch target "
                    f"{sorted(targets)} nor a model output {sorted(outputs)}"
                )
            value = loss(outputs[term.output], target)
            values[term.name] = value.detach()
            weighted = term.weight * value
            total = weighted if total is None else total + weighted
        return total, values


# `per_level` of a loss entry: which levels of a code pyramid it is repeated for.
PER_LEVEL = ("every", "shorter")


def expand_level_losses(specs: Sequence[Mapping[str, Any]], code_lengths: Sequence[int] | None) -> list[dict]:
    """The loss entries with each `per_level` entry written out for the levels of a code pyramid.

    A code pyramid (`code_lengths`, longest first) names its outputs per level (`logits_2048`, `codes_32`), so
    one entry stands for all levels: `per_level: every` repeats it for every level, and `per_level: shorter`
    for every level but the longest, reading its `target` from the longest level (self-distillation: the
    full-length code teaches the shorter ones). A repeated entry's `name` and `output` get the suffix
    `_<bits>`; a `shorter` entry's `target` gets `_<longest bits>`. Entries keep their order, each one's
    levels in `code_lengths` order; entries without `per_level` are kept as they are.

    Args:
        specs: loss entries as `build_loss_stack` takes them, some with `per_level: every | shorter`.
        code_lengths: the model's code lengths, longest first (None or empty: no pyramid, and then no entry
            may ask for `per_level`).

    Returns:
        New entries, none with `per_level`.
    """
    expanded = []
    for position, spec in enumerate(specs):
        options = dict(spec)
        per_level = options.pop("per_level", None)
        if per_level is None:
            expanded.append(options)
            continue
        if per_level not in PER_LEVEL:
            raise ValueError(f"losses[{position}].per_level={per_level!r}: expected one of {list(PER_LEVEL)}")
        if not code_lengths:
            raise ValueError(
                f"losses[{position}] ({options.get('name')}) has per_level={per_level}, but the model has no code "
                "lengths (model.code_lengths): per-level losses need a code pyramid head"
            )
        required = {"name", "output", "target"} if per_level == "shorter" else {"name", "output"}
        missing = required - options.keys()
        if missing:
            raise ValueError(f"losses[{position}] = {dict(spec)}: missing key(s) {sorted(missing)}")
        longest, *shorter = code_lengths
        for bits in code_lengths if per_level == "every" else shorter:
            level = {**options, "name": f"{options['name']}_{bits}", "output": f"{options['output']}_{bits}"}
            if per_level == "shorter":
                level["target"] = f"{options['target']}_{longest}"
            expanded.append(level)
    return expanded


def build_loss_stack(specs: Sequence[Mapping[str, Any]], *, num_classes: int) -> LossStack:
    """specs: [{name, type, weight, output[, target], **loss options}], e.g. from conf/light/<row>.yaml
    (entries with `per_level` written out first by `expand_level_losses`)."""
    terms, losses = [], []
    for position, spec in enumerate(specs):
        options = dict(spec)
        if "per_level" in options:
            raise ValueError(
                f"losses[{position}] ({options.get('name')}) has per_level={options['per_level']!r}: write its "
                "levels out with agw_light.losses.expand_level_losses(specs, code_lengths) first"
            )
        missing = {"name", "type", "output"} - options.keys()
        if missing:
            raise ValueError(f"losses[{position}] = {dict(spec)}: missing key(s) {sorted(missing)}")
        kind = options.pop("type")
        if kind not in LOSSES:
            raise ValueError(f"losses[{position}].type={kind!r}: unknown; known types: {sorted(LOSSES)}")
        term = LossTerm(
            name=options.pop("name"),
            weight=float(options.pop("weight", 1.0)),
            output=options.pop("output"),
            target=options.pop("target", "pids"),
        )
        try:
            losses.append(LOSSES[kind](num_classes=num_classes, **options))
        except TypeError as error:
            raise ValueError(
                f"losses[{position}] ({term.name}): bad options {options} for type {kind!r}: {error}"
            ) from error
        terms.append(term)
    return LossStack(terms, losses)
