"""Inference: one encoder from images to what a model ranks with, from a checkpoint or an ONNX export.

Between the library (models, data) and Lightning: it reads checkpoints without Lightning
(`agw_light.inference.checkpoint`, which LitReID uses too), so serving a model needs neither Lightning nor Hydra.
"""

from agw_light.inference.encoder import (
    BACKENDS,
    EncodedImages,
    Encoder,
    list_image_files,
    onnxruntime_available,
    pick_device,
)

__all__ = ["BACKENDS", "EncodedImages", "Encoder", "list_image_files", "onnxruntime_available", "pick_device"]
