"""Config to objects: the one place a composed Hydra config becomes library objects.

Commands call these; the library below takes plain arguments and never sees a config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError

from agw_light.data.datasets import DatasetSource
from agw_light.inference.checkpoint import architecture_differences, architecture_of, initialise_from, load_checkpoint
from agw_light.lit.datamodule import ReIDDataModule
from agw_light.lit.module import LitReID
from agw_light.lit.teacher import resolve_teacher_checkpoint
from agw_light.losses import expand_level_losses
from agw_light.protocol import EvaluationProtocol, Rerank

log = logging.getLogger(__name__)
# Lightning accelerators that pick a CUDA GPU when there is one.
CUDA_ACCELERATORS = ("auto", "gpu", "cuda")


def runs_on_cuda(cfg: DictConfig) -> bool:
    """Whether the run computes on a CUDA GPU: `trainer.accelerator` for training, `device` for the other commands."""
    accelerator = cfg.get("trainer", {}).get("accelerator")  # evaluate/visualize: a dataset's trainer keys only
    if accelerator is not None:
        return str(accelerator) in CUDA_ACCELERATORS and torch.cuda.is_available()
    wanted = str(cfg.get("device", "auto"))
    return wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available())


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """Lightning Trainer keyword arguments of `trainer`, with `precision: auto` resolved.

    auto is mixed precision on CUDA (bf16 where the GPU supports it: no loss scaling, same range as float32,
    else float16) and 32-true elsewhere, where the CPU's autocast would change the numbers for no sure gain.
    """
    arguments = OmegaConf.to_container(cfg.trainer, resolve=True)
    if arguments.get("precision") == "auto":
        if runs_on_cuda(cfg):
            arguments["precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            arguments["precision"] = "32-true"
    return arguments


def configured_callbacks(cfg: DictConfig) -> list:
    """The extra Lightning callbacks of `callbacks` (each a Hydra `_target_` entry), checked to be Callbacks."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    callbacks = []
    for entry in cfg.callbacks:
        callback = instantiate(entry)
        if not isinstance(callback, pl.Callback):
            raise TypeError(f"callbacks: {entry.get('_target_')} made a {type(callback).__name__}, not a Callback")
        callbacks.append(callback)
    return callbacks


def model_arguments(cfg: DictConfig) -> dict[str, Any]:
    """LitReID's `model`: build_model's arguments plus its `compile` and `channels_last` options, auto resolved
    here (on when the run trains on CUDA, where NHWC convolutions are faster; off on the CPU)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("channels_last") == "auto":
        model["channels_last"] = runs_on_cuda(cfg)
    return model


# The package's Hydra configs (a wheel carries them inside the package).
CONF_DIR = Path(__file__).resolve().parent / "conf"
GLOBAL_PACKAGE = "# @package _global_"


def _config_folders() -> list[Path]:
    """Where config groups are looked up: the running Hydra app's file sources in its search order (a user's
    `hydra.searchpath` folders included), then the package's conf/."""
    from hydra.core.hydra_config import HydraConfig

    folders = []
    if HydraConfig.initialized():
        folders = [Path(source.path) for source in HydraConfig.get().runtime.config_sources if source.schema == "file"]
    return list(dict.fromkeys([*folders, CONF_DIR]))


def _apply_override(node: DictConfig, override: str, source: Path) -> None:
    """One Hydra-style ``key=value`` (``dataset.`` prefix optional; ``+``/``++`` may add a key) on the node."""
    key, equals, value = override.partition("=")
    adds = key.startswith("+")
    key = key.lstrip("+").removeprefix("dataset.")
    if not equals or not key:
        raise ValueError(f"dataset override {override!r} for {source}: expected key=value (e.g. root=/data)")
    parsed = OmegaConf.from_dotlist([f"{key}={value}"])
    try:
        if adds:
            with open_dict(node):
                node.merge_with(parsed)
        else:
            node.merge_with(parsed)
    except ConfigKeyError as error:
        raise ValueError(
            f"dataset override {override!r}: {source} has no key {key!r} (prefix it with + to add one)"
        ) from error


def dataset_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The `dataset` node of conf/dataset/<name>.yaml, with `overrides` (``key=value``, ``dataset.key=value``,
    ``+key=value`` to add a key) applied, as `dataset=<name>` would compose it.

    Plain OmegaConf on the file, so it works alike inside a running @hydra.main app (whose search path,
    `hydra.searchpath` included, is used) and outside one (tests, notebooks: the package's conf/). A file in
    the `_global_` package (synthetic.yaml) gives its `dataset` node, its interpolations (`${dataset.height}`)
    resolving against that node; its other sections are not part of the result.
    """
    folders = _config_folders()
    for folder in folders:
        path = folder / "dataset" / f"{name}.yaml"
        if path.is_file():
            break
    else:
        available = sorted({found.stem for folder in folders for found in (folder / "dataset").glob("*.yaml")})
        raise ValueError(
            f"no dataset config {name!r}: looked for dataset/{name}.yaml in {', '.join(map(str, folders))}; "
            f"available: {', '.join(available)}"
        )
    loaded = OmegaConf.load(path)
    is_global = any(line.strip() == GLOBAL_PACKAGE for line in path.read_text(encoding="utf-8").splitlines())
    config = loaded if is_global else OmegaConf.create({"dataset": loaded})
    if not isinstance(config.get("dataset"), DictConfig) or "defaults" in config.dataset:
        raise ValueError(f"{path}: expected a dataset config, a mapping without a defaults list")
    OmegaConf.set_struct(config, True)
    for override in overrides:
        _apply_override(config.dataset, override, path)
    return config.dataset


def _register_modules(node: DictConfig) -> list[str]:
    """`register`: a module name or a list of them (absent: none)."""
    value = node.get("register")
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(module) for module in value]


def _parser_kwargs(node: DictConfig) -> dict:
    kwargs = node.get("kwargs")
    return {} if kwargs is None else OmegaConf.to_container(kwargs, resolve=True)


def dataset_parts(dataset: DictConfig) -> list[DictConfig]:
    """The dataset nodes a run trains on: itself, or for a combination (`names`) each named config with the
    combination's image size, `root` when set, and its entry in `overrides` (a mapping merged into it, or a
    list of ``key=value`` strings) applied."""
    names = dataset.get("names")
    if names is None:
        return [dataset]
    if not names:
        raise ValueError(
            "dataset.names is empty: name at least one dataset config (the first one gives the test split)"
        )
    overrides = dataset.get("overrides") or {}
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(
            f"dataset.overrides names {', '.join(unknown)}, which dataset.names ({', '.join(names)}) lacks"
        )
    shared = [f"++height={dataset.height}", f"++width={dataset.width}"]
    if dataset.get("root") is not None:
        shared.append(f"root={dataset.root}")
    parts = []
    for name in names:
        own = overrides.get(name)
        if isinstance(own, DictConfig):
            part = dataset_config(name, shared)
            try:
                part.merge_with(own)
            except ConfigKeyError as error:
                raise ValueError(
                    f"dataset.overrides.{name}: {error.msg} (dataset/{name}.yaml lacks that key)"
                ) from error
        else:
            part = dataset_config(name, [*shared, *(own or [])])
        parts.append(part)
    return parts


def build_datamodule(cfg: DictConfig, *, holdout_images: int = 0) -> ReIDDataModule:
    """The DataModule of a config's dataset and loader sections (train, evaluate and visualize share it).

    `dataset.names` combines datasets: the first named one gives the test split, all give training images.
    `holdout_images` training images (whole identities) are kept out of training for validation.
    """
    first, *more = dataset_parts(cfg.dataset)
    register = [*_register_modules(cfg.dataset), *(m for part in (first, *more) for m in _register_modules(part))]
    return ReIDDataModule(
        name=first.name,
        root=str(Path(first.root).expanduser()),
        height=cfg.dataset.height,
        width=cfg.dataset.width,
        batch_size=cfg.loader.batch_size,
        num_instances=cfg.loader.num_instances,
        test_batch_size=cfg.loader.test_batch_size,
        num_workers=cfg.loader.num_workers,
        seed=cfg.seed,
        dataset_kwargs=_parser_kwargs(first),
        check_images=cfg.dataset.check_images,
        drop_duplicates=cfg.dataset.get("drop_duplicates", False),
        pin_memory=runs_on_cuda(cfg),
        holdout_images=holdout_images,
        register=list(dict.fromkeys(register)),
        also_train=[DatasetSource(part.name, str(Path(part.root).expanduser()), _parser_kwargs(part)) for part in more],
    )


def evaluation_protocol(cfg: DictConfig) -> EvaluationProtocol:
    """The `eval` section as the typed protocol object (train's final evaluation and evaluate use the same),
    checked: an unknown key or a value the protocol cannot run with is an error naming it."""
    settings = OmegaConf.to_container(cfg.eval, resolve=True)
    rerank = settings.pop("rerank", {})
    if not isinstance(rerank, dict):
        raise ValueError(
            f"eval.rerank={rerank!r}: re-ranking is a section now: eval.rerank.enabled=true (and eval.rerank.k1, "
            "k2, lambda_value)"
        )
    try:
        protocol = EvaluationProtocol(**settings, rerank=Rerank(**rerank))
    except TypeError as error:
        raise ValueError(f"eval: {error} (the keys of eval are agw_light.protocol.EvaluationProtocol's)") from error
    protocol.check()
    return protocol


def with_dataset(cfg: DictConfig, dataset: DictConfig) -> DictConfig:
    """A copy of `cfg` whose `dataset` node is `dataset` (the rest, e.g. the loader, kept)."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(copy, False)
    copy.dataset = dataset
    return copy


def target_datamodules(cfg: DictConfig) -> dict[str, ReIDDataModule]:
    """The DataModule of each name in `eval.targets` other than the run's own dataset, by name.

    Each target keeps its own protocol (its parser, query and gallery) with the run's loader settings;
    `eval.target_overrides.<name>` lists dataset overrides (`dataset.root=...`) for that target.
    """
    overrides = cfg.eval.get("target_overrides") or {}
    unknown = sorted(set(overrides) - set(cfg.eval.get("targets") or ()))
    if unknown:
        raise ValueError(f"eval.target_overrides names {unknown}, which eval.targets does not list")
    modules = {}
    for name in cfg.eval.get("targets") or ():
        if name == cfg.dataset.name or name in modules:
            continue
        node = dataset_config(name, list(overrides.get(name, ())))
        modules[name] = build_datamodule(with_dataset(cfg, node))
    return modules


def loss_entries(cfg: DictConfig) -> list[dict]:
    """The row's loss stack entries: `losses`, then `distill_losses` (rows 2 and 5), with the `per_level`
    entries of a code pyramid (rows 4 and 5) written out for each of `model.code_lengths`."""
    entries = [
        *OmegaConf.to_container(cfg.losses, resolve=True),
        *OmegaConf.to_container(cfg.distill_losses, resolve=True),
    ]
    return expand_level_losses(entries, OmegaConf.to_container(cfg.model, resolve=True).get("code_lengths"))


def build_module(cfg: DictConfig, num_classes: int, *, resumed: dict[str, Any] | None = None) -> LitReID:
    """The row's LitReID: model, loss stack, optimizer settings and, for rows 2 and 5, the teacher.

    A new run with `model.init_from=<checkpoint>` (one of agw_light's or a converted one) starts from that
    checkpoint's weights (`agw_light.inference.checkpoint.initialise_from`: same architecture, every weight, the ID
    classifier too unless `model.drop_classifier=true`). A resumed run (`resumed`: the checkpoint `resume=` names,
    already read) must have this config's architecture, and keeps the teacher and init_from hashes it was started
    with, so a swapped teacher file is caught; its weights come from the resumed checkpoint, so init_from is not
    read again.
    """
    model = model_arguments(cfg)
    recorded: dict[str, Any] = {}
    if resumed is not None:
        recorded = resumed["hyper_parameters"]
        differences = architecture_differences(architecture_of(recorded["model"]), architecture_of(model))
        if differences:
            raise ValueError(f"resume={cfg.resume}: the checkpoint's network is not this config's: {differences}")
    teacher_ckpt = cfg.light.get("teacher_ckpt")
    if teacher_ckpt is not None:
        teacher_ckpt = str(resolve_teacher_checkpoint(teacher_ckpt))
    initial = None
    if model.get("init_from") is not None and resumed is None:
        initial = load_checkpoint(model["init_from"])
    module = LitReID(
        model=model,
        losses=loss_entries(cfg),
        num_classes=num_classes,
        **OmegaConf.to_container(cfg.optim, resolve=True),
        distance=cfg.eval.distance,
        max_rank=cfg.eval.max_rank,
        teacher_ckpt=teacher_ckpt,
        image_size=(cfg.dataset.height, cfg.dataset.width),
        teacher_sha256=recorded.get("teacher_sha256"),
        train_dataset=cfg.dataset.name,
        init_from_sha256=initial.sha256 if initial is not None else recorded.get("init_from_sha256"),
    )
    if initial is not None:
        dropped = initialise_from(module.model, initial, model, drop_classifier=bool(model.get("drop_classifier")))
        log.info(
            "initialised from %s (SHA-256 %s)%s",
            initial.path,
            initial.sha256[:12],
            f"; the ID classifier starts afresh ({', '.join(dropped)}): model.drop_classifier=true" if dropped else "",
        )
    return module


# Trackers that are optional extras: logger name -> the package its Lightning logger needs.
TRACKER_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
TRACKING_EXTRA = "pip install 'agw_light[tracking]'"
# How long the start of a run waits for an MLflow tracking server to answer.
TRACKING_SERVER_TIMEOUT_S = 10.0


def check_tracking_server(uri: str, timeout: float = TRACKING_SERVER_TIMEOUT_S) -> None:
    """Raises ConnectionError naming `uri` when an http(s) MLflow tracking server does not answer its /health
    endpoint: a run must fail at its start, not after hours of training when it logs its first metric.
    Local stores (sqlite:, file:, a path) need no check."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout):  # noqa: S310 (http(s) only, checked above)
            pass
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(
            f"logger.mlflow.tracking_uri={uri}: the MLflow tracking server does not answer ({health}: {error}); "
            "start it (mlflow server ...), fix the URI, or leave tracking_uri at its default local store"
        ) from error


def build_loggers(cfg: DictConfig) -> list:
    """The Lightning loggers of the `logger` group (conf/logger/), each a Hydra `_target_` entry, in name order.

    A tracker that is an optional extra is imported only when chosen; missing, it is an error naming the
    extra. Each logger's run is opened here, before any training: an MLflow server that does not answer, or a
    store that cannot be written, fails the run at its start.
    """
    import importlib.util

    from hydra.utils import instantiate
    from pytorch_lightning.loggers import Logger

    loggers = []
    for name, entry in sorted((cfg.get("logger") or {}).items()):
        package = TRACKER_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(
                f"logger={name} needs the {package} package, which is not installed: {TRACKING_EXTRA}"
            )
        if name == "mlflow":
            check_tracking_server(str(entry.tracking_uri))
        logger = instantiate(entry)
        if not isinstance(logger, Logger):
            raise TypeError(f"logger.{name}: {entry.get('_target_')} made a {type(logger).__name__}, not a Logger")
        _ = logger.experiment  # opens the run (a tracker's store, a W&B run) now rather than at the first metric
        loggers.append(logger)
    return loggers


def config_parameters(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as a nested dict for a tracker's parameters: resolved where it can be (outside a
    Hydra job, `${hydra:...}` values stay as written)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # an interpolation that only a running Hydra job resolves
        return OmegaConf.to_container(cfg, resolve=False)
