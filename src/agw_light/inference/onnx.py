"""ONNX export of a re-id network's eval forward, and the metadata that lets the file stand alone.

The exported graph is exactly the eval forward (`ReIDModel.forward` in eval mode): the BNNeck feature for a
float head, the relaxed codes (tanh, all pyramid levels side by side) for a code head; `ranking_features`
and the distance stay with the reader, who finds what it needs in the model's metadata_props: input size,
normalisation, resampling, code lengths, distance and the SHA-256 of the checkpoint it came from. The batch dimension
is dynamic. torch 2.14's exporter is the dynamo one (`torch.onnx.export(..., dynamo=True)`, which needs
onnxscript); the TorchScript exporter still works but is deprecated.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agw_light.data.transforms import Preprocessing

INPUT_NAME = "images"
OUTPUT_NAME = "outputs"
# metadata_props keys; values are JSON text (ONNX metadata values are strings). "interpolation" is optional: files
# exported before it was recorded were all bilinear.
METADATA_KEYS = ("image_size", "mean", "std", "code_lengths", "distance", "checkpoint_sha256")
OPTIONAL_METADATA = {"interpolation": "bilinear"}
# The ONNX operator set the export targets (onnxruntime 1.17+ runs it).
OPSET = 18


def _require(module: str, why: str) -> Any:
    """Imports an optional dependency of the `deploy` extra, or says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{why} needs the {module!r} package: pip install -e '.[deploy]'") from error


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO (dozens of lines per model); keep warnings only."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def onnx_metadata(network, *, preprocessing: Preprocessing, checkpoint_sha256: str | None) -> dict[str, str]:
    """The metadata_props of an exported `ReIDModel`: everything an encoder needs besides the graph (the
    checkpoint's preprocessing: input size, resampling, normalisation; the code lengths and distance of its
    retrieval contract)."""
    code_lengths = network.code_lengths
    values = {
        **preprocessing.to_record(),
        "code_lengths": None if code_lengths is None else [int(v) for v in code_lengths],
        "distance": network.distance,
        "checkpoint_sha256": checkpoint_sha256,
    }
    return {key: json.dumps(value) for key, value in values.items()}


def parse_metadata(path: str | Path, props: dict[str, str]) -> dict[str, Any]:
    """metadata_props back to the Encoder's arguments (preprocessing, code_lengths, distance, checkpoint_sha256);
    an error naming the file when one is missing or malformed."""
    missing = [key for key in METADATA_KEYS if key not in props]
    if missing:
        raise ValueError(
            f"ONNX model {path} lacks metadata {missing}: expected a file written by `python -m agw_light.export`"
        )
    try:
        values = {key: json.loads(props[key]) for key in (*METADATA_KEYS, *OPTIONAL_METADATA) if key in props}
    except json.JSONDecodeError as error:
        raise ValueError(f"ONNX model {path}: metadata is not JSON ({error})") from error
    record = {key: values.pop(key, default) for key, default in (("image_size", None), *OPTIONAL_METADATA.items())}
    record.update(mean=values.pop("mean"), std=values.pop("std"))
    return {**values, "preprocessing": Preprocessing.from_record(record, source=f"ONNX model {path}")}


def export_onnx(network: nn.Module, *, image_size: Sequence[int], metadata: dict[str, str]) -> bytes:
    """The network's eval forward as a serialised ONNX model (dynamic batch), `metadata` in its props.

    The network is exported on the CPU in float32 and left in eval mode.
    """
    _require("onnxscript", "ONNX export (torch's dynamo exporter)")
    height, width = (int(v) for v in image_size)
    network = network.cpu().eval()
    example = torch.zeros(2, 3, height, width)
    with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def export_checkpoint(ckpt: str | Path, out: str | Path, *, image_size: Sequence[int] | None = None) -> Path:
    """Writes the checkpoint's eval network as ONNX at `out` (atomically), with the checkpoint's preprocessing,
    at its recorded image size unless `image_size` (height, width) asks for another; returns the path."""
    from agw_light.files import write_atomic
    from agw_light.inference.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt)
    preprocessing = loaded.preprocessing_or(None if image_size is None else tuple(image_size)).resized(image_size)
    metadata = onnx_metadata(loaded.network, preprocessing=preprocessing, checkpoint_sha256=loaded.sha256)
    data = export_onnx(loaded.network, image_size=preprocessing.image_size, metadata=metadata)
    return write_atomic(out, lambda handle: handle.write(data))
