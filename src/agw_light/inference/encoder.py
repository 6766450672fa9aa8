"""Encoder: images in, what the model ranks with out, from a checkpoint or an exported ONNX file.

One preprocessing (the checkpoint's `Preprocessing`: image size, resampling, normalisation) and one output
(the eval forward: the float feature, or the relaxed codes of every pyramid level, before the model's
`ranking_features`), whatever runs the network: PyTorch on any device, or onnxruntime on the CPU.
Evaluation, the ranked-list pictures and the search CLI embed through it, so a user's own images are
encoded exactly as the benchmark's were.

Backends: "torch" runs the rebuilt network; "onnxruntime" runs its ONNX export (about twice as fast on the
CPU, see docs/benchmarks.md). "auto" picks onnxruntime for a CPU device when the `deploy` extra is installed,
else torch. A checkpoint run through onnxruntime is exported in memory when the encoder is built (seconds;
no file to go stale or to clean up); `python -m agw_light.export` writes the file once for `from_onnx`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from agw_light.checks import is_integer
from agw_light.data.transforms import Preprocessing
from agw_light.images import list_image_files, open_rgb

if TYPE_CHECKING:
    from agw_light.inference.checkpoint import LoadedCheckpoint

BACKENDS = ("auto", "torch", "onnxruntime")
# encode() shows a progress bar from this many images on (a single request stays quiet).
PROGRESS_MIN_IMAGES = 512


class EncodedImages(NamedTuple):
    """`Encoder.encode_files`' answer: the image files and their outputs, row i for `paths[i]`.

    A tuple, so `paths, features = encoder.encode_files(folder)` unpacks it.
    """

    paths: list[Path]
    features: torch.Tensor


class _Images(torch.utils.data.Dataset):
    """PIL images or image paths, preprocessed one by one (a DataLoader's workers can share the decoding)."""

    def __init__(self, sources: Sequence[Any], transform: Callable) -> None:
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(open_rgb(self.sources[index]))


def pick_device(name: str | torch.device) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; any other name is torch's."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def onnxruntime_available() -> bool:
    """The `deploy` extra is installed: onnxruntime to run, onnxscript (with onnx) to export."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnxscript", "onnx"))


class _TorchRunner:
    """The network on `device`; on CUDA in channels-last layout (NHWC convolutions are faster there)."""

    def __init__(self, network: nn.Module, device: torch.device) -> None:
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.network = network.to(device, memory_format=self.memory_format).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return self.network(images).float().cpu()


class _OnnxRuntimeRunner:
    """An onnxruntime CPU session tuned for throughput: every graph optimisation, `threads` intra-op threads."""

    def __init__(self, model: bytes | str | Path, *, threads: int | None = None, source: str | Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: not the per-node placement notes
        # Idle threads sleep instead of spinning: a spinning pool slows whatever shares the cores (the
        # service beside it, torch in the same process, other jobs) for a gain lost in the noise here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(
                model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
            raise ValueError(f"ONNX model {source} cannot be loaded by onnxruntime: {error}") from error
        self.input_name = self.session.get_inputs()[0].name

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


class Encoder:
    """Images -> the model's eval output (float features or relaxed codes), one row per image.

    Build it with `from_checkpoint`, `from_loaded`, `from_onnx` or `from_network`. It exposes what a user of the
    outputs needs: `distance` (how to compare them), `code_lengths` (None for a float feature; else the pyramid,
    whose first `code_lengths[0]` columns exact ranking compares), `preprocessing` (image size, resampling,
    normalisation; `image_size` is its (height, width)), `checkpoint_sha256` (None when unknown), and `backend`
    ("torch" or "onnxruntime").
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        *,
        backend: str,
        preprocessing: Preprocessing | None,
        distance: str,
        code_lengths: Sequence[int] | None,
        checkpoint_sha256: str | None = None,
    ) -> None:
        self._run = run
        self.backend = backend
        self.preprocessing = preprocessing
        self.distance = distance
        self.code_lengths = None if code_lengths is None else tuple(int(v) for v in code_lengths)
        self.checkpoint_sha256 = checkpoint_sha256
        self.transform = None if preprocessing is None else preprocessing.transform()

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) the images are resized to; None for an encoder of preprocessed batches only."""
        return None if self.preprocessing is None else self.preprocessing.image_size

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_network(
        cls,
        network: nn.Module,
        *,
        preprocessing: Preprocessing | None,
        device: str | torch.device = "auto",
        backend: str = "torch",
        checkpoint_sha256: str | None = None,
        threads: int | None = None,
    ) -> Encoder:
        """An encoder around an in-memory `ReIDModel`.

        Args:
            network: the model; it is moved to `device` and put in eval mode.
            preprocessing: how images become its input; None makes an encoder of preprocessed batches only
                (`encode_loader`, `__call__`). onnxruntime needs one (the exported input size).
            device: "auto" (the GPU when there is one), "cpu", "cuda", ...
            backend: "torch", "onnxruntime" (CPU only; the network is exported in memory) or "auto".
            checkpoint_sha256: recorded on the encoder (and in an ONNX export's metadata).
            threads: onnxruntime's intra-op threads (default: torch's thread count).
        """
        device = pick_device(device)
        backend = _resolve_backend(backend, device)
        if backend == "onnxruntime":
            from agw_light.inference.onnx import export_onnx, onnx_metadata

            if preprocessing is None:
                raise ValueError("backend='onnxruntime' exports the network at one input size: pass preprocessing")
            metadata = onnx_metadata(network, preprocessing=preprocessing, checkpoint_sha256=checkpoint_sha256)
            onnx_model = export_onnx(network, image_size=preprocessing.image_size, metadata=metadata)
            run: Callable = _OnnxRuntimeRunner(onnx_model, threads=threads, source="<exported in memory>")
        else:
            run = _TorchRunner(network, device)
        return cls(
            run,
            backend=backend,
            preprocessing=preprocessing,
            distance=network.distance,
            code_lengths=network.code_lengths,
            checkpoint_sha256=checkpoint_sha256,
        )

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedCheckpoint,
        *,
        device: str | torch.device = "auto",
        backend: str = "auto",
        image_size: Sequence[int] | None = None,
        threads: int | None = None,
    ) -> Encoder:
        """An encoder for a checkpoint already loaded (`agw_light.inference.checkpoint.load_checkpoint`), with its
        preprocessing, at another input size only if `image_size` (height, width) asks for one."""
        preprocessing = loaded.preprocessing_or(None if image_size is None else tuple(image_size))
        return cls.from_network(
            loaded.network,
            preprocessing=preprocessing.resized(image_size),
            device=device,
            backend=backend,
            checkpoint_sha256=loaded.sha256,
            threads=threads,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "auto",
        backend: str = "auto",
        image_size: Sequence[int] | None = None,
        threads: int | None = None,
    ) -> Encoder:
        """The checkpoint's network and preprocessing (an agw_light checkpoint, trained or converted from another
        framework: read with weights_only=True, every weight key matched).

        Args:
            path: the .ckpt file.
            device: "auto" (the GPU when there is one), "cpu", "cuda", ...
            backend: "auto" (onnxruntime on the CPU when the deploy extra is installed, else torch), "torch" or
                "onnxruntime".
            image_size: (height, width) to feed instead of the size the checkpoint records.
            threads: onnxruntime's intra-op threads (default: torch's thread count).
        """
        from agw_light.inference.checkpoint import load_checkpoint

        _resolve_backend(backend, pick_device(device))  # a wrong backend fails before the checkpoint is read
        return cls.from_loaded(
            load_checkpoint(path), device=device, backend=backend, image_size=image_size, threads=threads
        )

    @classmethod
    def from_onnx(cls, path: str | Path, *, threads: int | None = None) -> Encoder:
        """An encoder for a file written by `python -m agw_light.export`, run by onnxruntime on the CPU."""
        from agw_light.inference.onnx import parse_metadata

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path}: no such file (expected one written by agw_light.export)")
        if not onnxruntime_available():
            raise ImportError(f"running ONNX model {path} needs onnxruntime: pip install -e '.[deploy]'")
        runner = _OnnxRuntimeRunner(path, threads=threads, source=path)
        values = parse_metadata(path, runner.metadata())
        return cls(runner, backend="onnxruntime", **values)

    # --- encoding -----------------------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The outputs for a preprocessed batch (N, 3, height, width), as a float32 CPU tensor."""
        return self._run(images)

    def encode(
        self,
        images: str | Path | Sequence[Any],
        batch_size: int = 64,
        *,
        num_workers: int = 0,
        progress: bool | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Outputs (N, D), one row per image, in the order given.

        Args:
            images: an image file, a folder (its image files, recursively, sorted: `list_image_files`), or a
                list of image paths and PIL images. `encode_files` also returns the paths a folder gave.
            batch_size: images per forward pass.
            num_workers: DataLoader workers that decode and resize (0: in this process).
            progress: show a tqdm bar (default: from 512 images on; a single request stays quiet).
            normalize: divide each float feature by its L2 norm (an all-zero row stays zero), so that a dot
                product is the cosine similarity (e.g. for an inner-product index). Refused for hash codes.

        Returns:
            float32 CPU tensor (N, D): the float features, or the relaxed codes of every pyramid level.
        """
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        if self.transform is None:
            raise ValueError("this encoder was built without an image size: it encodes batches (encode_loader)")
        if normalize and self.code_lengths is not None:
            raise ValueError(
                f"normalize=True: this encoder outputs relaxed hash codes (code_lengths={list(self.code_lengths)}), "
                "which are compared by their signs (Hamming distance); L2 normalisation is for float features"
            )
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        images = list_image_files(images) if isinstance(images, str | os.PathLike) else list(images)
        if not images:
            raise ValueError("encode() got no images")
        loader = DataLoader(_Images(images, self.transform), batch_size=batch_size, num_workers=num_workers)
        show = len(images) >= PROGRESS_MIN_IMAGES if progress is None else progress
        batches = tqdm(loader, desc="encoding images", unit="batch", leave=False, disable=not show)
        features = torch.cat([self(batch) for batch in batches])
        return torch.nn.functional.normalize(features, dim=1) if normalize else features

    def encode_files(
        self,
        location: str | Path | Sequence[str | Path],
        batch_size: int = 64,
        *,
        num_workers: int = 0,
        progress: bool | None = None,
        normalize: bool = False,
    ) -> EncodedImages:
        """The image files at `location` and their outputs, for callers that must know which row is which file
        (an index of a folder, a table of results).

        Args:
            location: an image file, a folder (its image files, recursively, sorted: `list_image_files`), or a
                list of image paths (kept in its order).
            batch_size, num_workers, progress, normalize: as for `encode`.

        Returns:
            EncodedImages(paths, features): `paths` as Path objects, `features[i]` the output for `paths[i]`.
        """
        if isinstance(location, str | os.PathLike):
            paths = list_image_files(location)
        else:
            items = list(location)
            not_paths = sorted({type(item).__name__ for item in items if not isinstance(item, str | os.PathLike)})
            if not_paths:
                raise TypeError(f"encode_files() takes image paths, not {not_paths}; encode() takes PIL images")
            paths = [Path(item) for item in items]
        features = self.encode(paths, batch_size, num_workers=num_workers, progress=progress, normalize=normalize)
        return EncodedImages(paths, features)

    def encode_loader(self, loader: Iterable[dict[str, Any]], *, desc: str = "encoding") -> dict[str, torch.Tensor]:
        """Outputs for every batch of a loader of dict batches (an "image" tensor plus labels): "features",
        and every other key of the batches concatenated (pids, cameras, query flags ...)."""
        from tqdm import tqdm

        parts: dict[str, list[torch.Tensor]] = {"features": []}
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            parts["features"].append(self(batch["image"]))
            for key, value in batch.items():
                if key != "image":
                    parts.setdefault(key, []).append(torch.as_tensor(value))
        return {name: torch.cat(values) for name, values in parts.items()}


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"backend='onnxruntime' runs on the CPU, not on device {device}; use backend='torch'")
        if not onnxruntime_available():
            raise ImportError("backend='onnxruntime' needs onnxruntime, onnx, onnxscript: pip install -e '.[deploy]'")
    return backend


__all__ = ["BACKENDS", "EncodedImages", "Encoder", "list_image_files", "onnxruntime_available", "pick_device"]
