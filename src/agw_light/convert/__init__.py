"""Other frameworks' published re-id models as agw_light checkpoints: strictly, exactly, safely.

`convert_checkpoint` reads a fast-reid, ReID-Survey, reid-strong-baseline or torchreid file (a state_dict, a
training checkpoint wrapping one, or a whole pickled `nn.Module`), maps every tensor onto an agw_light network
built with the source network's options (stem, max-pool, pooling, non-local blocks, head, eval output), and writes
a normal agw_light checkpoint that records those options, the source's preprocessing (image size, mean/std,
resampling) and distance, the source format and the source file's SHA-256. Every command then works on it.

Strict by design: every source tensor must be used and every agw_light tensor filled, or the conversion stops
listing the keys left over on each side and the shape mismatches. The only tensors filled without a source key
are the constants the source network's code fixes (fast-reid's fixed GeM p) and BatchNorm step counters that
files from before PyTorch 0.4.1 lack; the notes say so. Safe: the file is read with `weights_only=True`, or, for
a pickled module, with `agw_light.convert.unpickle`, which rebuilds tensors and plain containers only and
refuses a pickle that would call anything else.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agw_light.convert import unpickle
from agw_light.convert.formats import FORMATS, MAPPERS, detect_format
from agw_light.data.transforms import Preprocessing
from agw_light.files import write_atomic
from agw_light.inference.checkpoint import load_checkpoint
from agw_light.models import build_model
from agw_light.models.backbones import key_list, key_problems

log = logging.getLogger(__name__)
# The test image size of every source's published configs (fast-reid SIZE_TEST, ReID-Survey IMG_SIZE,
# reid-strong-baseline's configs, torchreid's default).
DEFAULT_IMAGE_SIZE = (256, 128)
# Keys a checkpoint's wrapper dict may keep the weights under (fast-reid: "model"; torchreid: "state_dict").
WRAPPER_KEYS = ("model", "state_dict")


@dataclass(frozen=True)
class Conversion:
    """What `convert_checkpoint` wrote: the output file, the format it read (and why it chose it), the source
    file's SHA-256, the agw_light model options, the number of classes and the notes on each choice."""

    out: Path
    format: str
    reason: str
    source_sha256: str
    model: dict[str, Any]
    num_classes: int
    notes: list[str]


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, str]:
    """(weights by name, SHA-256 of the file, how they were stored) of another framework's model file.

    The file is read once. A state_dict or a checkpoint wrapping one loads with `weights_only=True`; a whole
    pickled `nn.Module` (ignite's ModelCheckpoint of ReID-Survey and reid-strong-baseline) through
    `agw_light.convert.unpickle` (tensors and plain containers only: no class or function of the file's code is
    ever imported or called). ``module.`` prefixes (DataParallel) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"src={path}: no such file (expected a model file of fast-reid, ReID-Survey, ...)")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        stored = "tensors (weights_only)"
    except pickle.UnpicklingError as weights_only_refusal:
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=unpickle)
        except unpickle.UnsafePickleError as error:
            raise ValueError(f"src={path}: refused, the file would run code when unpickled ({error})") from error
        except Exception as error:  # a damaged file fails in many ways inside torch and pickle
            raise ValueError(f"src={path}: cannot be read ({type(error).__name__}: {error})") from weights_only_refusal
        stored = "a pickled module (read without its code)"
    except Exception as error:  # a truncated zip, a text file ...: torch raises several types
        raise ValueError(
            f"src={path}: not a readable PyTorch model file ({type(error).__name__}: {error}); is it truncated?"
        ) from error
    return _unwrap(loaded, path), sha256, stored


def _unwrap(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The weights inside a loaded file: a pickled module's state_dict, a wrapper's "model"/"state_dict" entry, or
    the file itself."""
    if unpickle.is_module(loaded):
        loaded = unpickle.module_state_dict(loaded)
    elif isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            inner = loaded.get(key)
            if unpickle.is_module(inner):
                loaded = unpickle.module_state_dict(inner)
                break
            if isinstance(inner, Mapping) and inner:
                loaded = inner
                break
    if not isinstance(loaded, Mapping):
        raise ValueError(f"src={path}: expected model weights (a state_dict or a pickled module), got {type(loaded)}")
    not_tensors = sorted(str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"src={path}: expected a state_dict of tensors; not tensors: {key_list(not_tensors)}")
    return {str(key).removeprefix("module."): value for key, value in loaded.items()}


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    format: str = "auto",
    overwrite: bool = False,
    image_size: Sequence[int] = DEFAULT_IMAGE_SIZE,
    last_stride: int | None = None,
    pooling: str = "auto",
    gem_p: float | None = None,
    neck_feat: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Conversion:
    """Converts another framework's model file into an agw_light checkpoint at `out` (written atomically).

    Args:
        src: the model file (state_dict, training checkpoint, or pickled module).
        out: the .ckpt to write; an existing file is refused unless `overwrite`, and never the source itself.
        format: "fastreid", "reid_survey", "strong_baseline", "torchreid", or "auto" (recognised from the keys; the
            choice and the reason are returned and logged).
        image_size: (height, width) of the source's test images (all four projects publish 256x128 models).
        last_stride: the source's last stride when its config changed it (the weights do not show it); None: the
            format's published setting (1; torchreid's resnet50: 2, resnet50_fc512: 1).
        pooling: fast-reid only, where the file stores no pooling weight: "gem" (fixed `gem_p`, default 3) or "avg";
            "auto" picks GeM for a network with non-local blocks (AGW), average pooling without (BoT).
        neck_feat: ReID-Survey / reid-strong-baseline: TEST.NECK_FEAT, "after" (default) or "before".
        mean, std: the source's normalisation on a 0-1 scale, when its config changed it.

    Returns:
        A `Conversion` describing what was written.
    """
    src, out = Path(src), Path(out)
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format={format!r}: expected auto or one of {', '.join(FORMATS)}")
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"out={out} is the source file itself: choose another output path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={out} exists: choose another path, or pass overwrite=true to replace it")
    weights, sha256, stored = read_weights(src)
    detected, reason = detect_format(list(weights))
    if format == "auto":
        format = detected
    elif detected != format and {detected, format} != {"reid_survey", "strong_baseline"}:
        raise ValueError(f"src={src}: format={format} was asked for, but the file has {detected}'s layout ({reason})")
    options = {"last_stride": last_stride, "pooling": pooling, "gem_p": gem_p, "neck_feat": neck_feat}
    reading = MAPPERS[format](weights, options)
    notes = [f"read {stored}", *reading.notes]
    network_weights = _strict_weights(reading, weights, src, format, notes)
    num_classes = int(network_weights["head.classifier.weight"].shape[0])
    preprocessing = Preprocessing(
        tuple(image_size),  # type: ignore[arg-type]
        mean if mean is not None else reading.preprocessing["mean"],
        std if std is not None else reading.preprocessing["std"],
        reading.preprocessing["interpolation"],
    )
    model = {**reading.model, "pretrained": "none"}
    hparams = {
        "model": model,
        "num_classes": num_classes,
        "distance": reading.distance,
        "image_size": list(preprocessing.image_size),
        "preprocessing": preprocessing.to_record(),
        "source": {"format": format, "file": str(src.resolve()), "sha256": sha256, "notes": notes},
    }
    state_dict = {f"model.{key}": value.detach().clone().contiguous() for key, value in network_weights.items()}
    write_atomic(out, lambda handle: torch.save({"hyper_parameters": hparams, "state_dict": state_dict}, handle))
    load_checkpoint(out)  # what every command will do: a file that does not rebuild must fail here, not later
    for note in notes:
        log.info("%s: %s", src.name, note)
    return Conversion(out, format, reason, sha256, model, num_classes, notes)


def _strict_weights(
    reading: Any, source: Mapping[str, torch.Tensor], src: Path, format: str, notes: list[str]
) -> dict[str, torch.Tensor]:
    """The network's full state_dict from a format's reading, or an error listing every key left over on either
    side and every shape mismatch."""
    classes = reading.weights.get("head.classifier.weight")
    num_classes = int(classes[1].shape[0]) if classes is not None else 1
    target = build_model(num_classes=num_classes, distance=reading.distance, **reading.model).state_dict()
    filled = {key: value for key, (_, value) in reading.weights.items()}
    counters = [key for key in target if key.endswith(".num_batches_tracked") and key not in filled]
    if counters and len(counters) == sum(key.endswith(".num_batches_tracked") for key in target):
        notes.append("the file holds no BatchNorm step counters (written before PyTorch 0.4.1): set to 0")
        filled.update({key: torch.zeros((), dtype=torch.long) for key in counters})
    taken = {source_key for name, (source_key, _) in reading.weights.items() if name in target}
    used = taken | set(reading.used_otherwise)
    unused = [key for key in source if key not in used]
    unfilled = [key for key in target if key not in filled]
    mismatched = [
        f"{key} (file {tuple(filled[key].shape)} from {reading.weights[key][0]}, agw_light {tuple(target[key].shape)})"
        for key in target
        if key in filled and filled[key].shape != target[key].shape
    ]
    summary = key_problems(
        {
            "source keys no agw_light weight takes": unused,
            "agw_light weights the file does not fill": unfilled,
            "shape mismatches": mismatched,
        }
    )
    if summary:
        raise ValueError(
            f"src={src} does not convert as {format} ({reading.model['backbone']}, neck {reading.model['neck']}): "
            + summary
            + ". The network is not one agw_light reproduces (IBN or SE blocks, ResNet-101, an embedding conv, "
            "another head), or the format is another one: try format=auto"
        )
    return {key: filled[key] for key in target}


__all__ = ["FORMATS", "Conversion", "convert_checkpoint", "read_weights"]
