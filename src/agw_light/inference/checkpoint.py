"""agw_light checkpoints: read once, hashed once, rebuilt once, safely (no pickled code runs).

`load_checkpoint` is the one way a command opens a checkpoint: evaluation, the ranked-list pictures, the search
index, the service, ONNX export, the distillation teacher, `model.init_from` and the converter all get the same
`LoadedCheckpoint` (the network with every weight key matched, its preprocessing, where it came from and the
file's SHA-256, computed from the very bytes that were loaded). No LightningModule is built to get a network.

A checkpoint holds the plain arguments the network was built with (``hyper_parameters["model"]``) and its
weights (``state_dict``, keys prefixed ``model.``), so it rebuilds from the file alone: no Hydra config, no
ImageNet download. Checkpoints converted from other frameworks (`agw_light.convert`) have the same form, plus the
source network's preprocessing and provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agw_light.data.transforms import Preprocessing
from agw_light.models import ReIDModel, build_model

# Checkpoints written before `nonlocal_inter_channels` existed were built with blocks of half width.
LEGACY_MODEL_DEFAULTS = {"nonlocal_inter_channels": "half"}
# Keys of the recorded `model` dict that are training options (LitReID's), not build_model's arguments.
TRAINING_MODEL_OPTIONS = ("channels_last", "compile", "init_from", "drop_classifier")
# build_model arguments that shape the network's function or its weights' layout. Two networks that differ in
# one of them cannot share weights (`model.init_from`) or continue each other's training (`resume=`). `pretrained`
# (an initialisation), `gem_p` (p's starting value: the weights carry p) and `gem_learnable` (whether p trains)
# are not among them.
ARCHITECTURE_OPTIONS = (
    "backbone",
    "last_stride",
    "nonlocal_layers",
    "nonlocal_inter_channels",
    "stem_relu",
    "maxpool",
    "pooling",
    "neck",
    "neck_feat",
    "embedding_dim",
    "code_lengths",
)
# The ID classifier's weights: dropped on request when fine-tuning on a dataset with another class count.
CLASSIFIER_KEYS = ("head.classifier.weight", "head.classifier.bias")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """(checkpoint dict, SHA-256 of the bytes it was loaded from), loaded with `weights_only=True` (a crafted
    pickle cannot run code) and checked to be an agw_light checkpoint. The file is read once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path}: no such file (expected a .ckpt written by agw_light.train or agw_light.convert)"
        )
    data = path.read_bytes()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a damaged zip, a pickle or a refused global
        raise ValueError(
            f"checkpoint {path} cannot be read safely ({type(error).__name__}: {error}); is it truncated, not a "
            "checkpoint, or a file holding code? A model of another framework is converted first: "
            "python -m agw_light.convert src=<file> out=<file.ckpt>"
        ) from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"checkpoint {path} is not an agw_light checkpoint: expected keys 'hyper_parameters' (with 'model') and "
            "'state_dict'. A model of another framework is converted first: python -m agw_light.convert src=<file>"
        )
    return checkpoint, hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def rebuilding(path: str | Path) -> Iterator[None]:
    """Turns a failure to rebuild the network from a checkpoint into one error that names the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"checkpoint {path} does not rebuild into an agw_light model (hyper-parameters or weights do not "
            f"match this version's architecture): {error}"
        ) from error


def network_arguments(recorded_model: Mapping[str, Any]) -> dict[str, Any]:
    """build_model's arguments for a recorded `model` dict: legacy defaults filled, training options dropped,
    no pretrained download (the weights come from the checkpoint)."""
    arguments = {**LEGACY_MODEL_DEFAULTS, **recorded_model, "pretrained": "none"}
    return {key: value for key, value in arguments.items() if key not in TRAINING_MODEL_OPTIONS}


def network_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights in a checkpoint's state_dict (LitReID keeps them under ``model.``)."""
    return {name.removeprefix("model."): value for name, value in state_dict.items() if name.startswith("model.")}


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint as every command uses it.

    Attributes:
        path: the file.
        sha256: SHA-256 of the bytes that were loaded.
        hparams: the recorded hyper-parameters (``model``, ``num_classes``, ``image_size`` ...).
        network: the rebuilt `ReIDModel`, every weight key matched, in eval mode on the CPU.
        preprocessing: the test images the network expects (size, normalisation, resampling), or None for a
            checkpoint written before agw_light recorded its image size.
        contents: the whole loaded dict (training state included), for resuming without reading it again.
    """

    path: Path
    sha256: str
    hparams: dict[str, Any]
    network: ReIDModel
    preprocessing: Preprocessing | None
    contents: dict[str, Any] = field(repr=False)

    @property
    def source(self) -> dict[str, Any] | None:
        """Where a converted checkpoint came from (format, file, SHA-256, the code followed); None when agw_light
        trained it."""
        return self.hparams.get("source")

    @property
    def architecture(self) -> dict[str, Any]:
        """The recorded build_model options that define the network (`architecture_of`)."""
        return architecture_of(network_arguments(self.hparams["model"]))

    def preprocessing_or(self, image_size: tuple[int, int] | None) -> Preprocessing:
        """The recorded preprocessing, or agw_light's at `image_size` when the checkpoint records none."""
        if self.preprocessing is not None:
            return self.preprocessing
        if image_size is None:
            raise ValueError(f"checkpoint {self.path} records no image size: pass image_size=[height,width]")
        return Preprocessing(image_size)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Reads an agw_light checkpoint once and rebuilds its network (see `LoadedCheckpoint`)."""
    path = Path(path)
    checkpoint, sha256 = read_checkpoint(path, map_location)
    hparams = checkpoint["hyper_parameters"]
    with rebuilding(path):
        network = build_model(
            num_classes=hparams["num_classes"],
            distance=hparams.get("distance"),
            **network_arguments(hparams["model"]),
        )
        network.load_state_dict(network_weights(checkpoint["state_dict"]), strict=True)
        preprocessing = recorded_preprocessing(hparams, source=f"checkpoint {path}")
    return LoadedCheckpoint(path, sha256, hparams, network.eval(), preprocessing, checkpoint)


def recorded_preprocessing(hparams: Mapping[str, Any], *, source: str) -> Preprocessing | None:
    """A converted checkpoint's "preprocessing" record, else agw_light's own at its recorded "image_size" (what it
    was trained with: ImageNet normalisation, bilinear resizing), else None (written before sizes were recorded)."""
    record = hparams.get("preprocessing")
    if record is not None:
        return Preprocessing.from_record(record, source=source)
    size = hparams.get("image_size")
    return Preprocessing.from_record({"image_size": list(size)}, source=source) if size else None


def architecture_of(model: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture options of a recorded or configured `model` dict, normalised so that two dicts describing
    the same network compare equal: build_model's defaults filled in, the backbone's default non-local placement
    spelt out, and no non-local width where there is no non-local block."""
    import inspect

    from agw_light.models.backbones import resnet_spec

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(build_model).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    options = {key: model.get(key, defaults.get(key)) for key in ARCHITECTURE_OPTIONS}
    placement = options["nonlocal_layers"]
    if placement is None:
        placement = resnet_spec(options["backbone"]).default_nonlocal_layers
    options["nonlocal_layers"] = [int(count) for count in placement]
    options["nonlocal_inter_channels"] = str(options["nonlocal_inter_channels"]) if any(placement) else None
    if options["code_lengths"] is not None:
        options["code_lengths"] = [int(length) for length in options["code_lengths"]]
    return options


def architecture_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    """The overrides that turn the `actual` architecture into the `expected` one, as a sentence ("" when none):
    "set model.stem_relu=false model.maxpool=ceil (this config has true, padded)"."""
    keys = [key for key in ARCHITECTURE_OPTIONS if expected[key] != actual[key]]
    if not keys:
        return ""
    wanted = " ".join(f"model.{key}={_override_value(expected[key])}" for key in keys)
    return f"set {wanted} (this config has {', '.join(_override_value(actual[key]) for key in keys)})"


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def initialise_from(
    network: ReIDModel, loaded: LoadedCheckpoint, configured_model: Mapping[str, Any], *, drop_classifier: bool = False
) -> list[str]:
    """Copies a checkpoint's weights into a network about to be trained (`model.init_from`); returns the keys left
    at their fresh initialisation (the classifier's, when dropped).

    Strict: the checkpoint's architecture must be the one `configured_model` (the run's `model` config, which
    built `network`) describes — the error lists the overrides that make them match — and every weight loads,
    except the ID classifier when `drop_classifier` is set (fine-tuning on other identities: a classifier of
    another class count is an error unless it is dropped).
    """
    differences = architecture_differences(loaded.architecture, architecture_of(configured_model))
    if differences:
        raise ValueError(f"model.init_from={loaded.path}: its network is not this run's model config: {differences}")
    weights = dict(loaded.network.state_dict())
    own = network.state_dict()
    dropped = [key for key in CLASSIFIER_KEYS if key in own] if drop_classifier else []
    mismatched = [
        f"{key} (checkpoint {tuple(weights[key].shape)}, model {tuple(own[key].shape)})"
        for key in own
        if key in weights and key not in dropped and weights[key].shape != own[key].shape
    ]
    if mismatched:
        hint = ""
        if any(key.startswith(CLASSIFIER_KEYS) for key in mismatched):
            hint = " (another number of training identities: set model.drop_classifier=true to fine-tune)"
        raise ValueError(f"model.init_from={loaded.path}: shapes differ: {', '.join(mismatched)}{hint}")
    for key in dropped:
        weights[key] = own[key]
    network.load_state_dict(weights, strict=True)
    return dropped
