"""`ReIDDataModule`: the re-id dataset as Lightning loaders of dict batches.

Training batches come from `PKSampler`, which splits identities across DDP ranks itself, so the Trainer
must be built with `use_distributed_sampler=False` (Lightning would otherwise try to re-wrap the batch
sampler). Query and gallery images form one evaluation set, queries first; under DDP each rank reads a
`DistributedSampler` shard, whose padding repeats are dropped by the metric through the "index" key.

Every image of every split is decoded once at setup (`check_images`), so a bad file stops the run before
training instead of at the loader that first reaches it.

What the validation loop reads decides what its numbers may be used for. By default it reads the test
query/gallery: a progress monitor, logged as `test/*`, never a basis for choosing a checkpoint. With
`holdout_images` it reads a query/gallery split of training identities removed from training (logged as
`val/*`), on which choosing a checkpoint touches no test label.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from agw_light.data.datasets import (
    SPLITS,
    DatasetSource,
    ReIDDataset,
    Sample,
    combine_datasets,
    import_dataset_modules,
    verify_images,
)
from agw_light.data.duplicates import drop_duplicates, find_duplicates
from agw_light.data.samplers import PKSampler
from agw_light.data.transforms import Preprocessing, build_train_transform
from agw_light.images import open_rgb

SYNTHETIC = "synthetic"
log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or job's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ReIDImageDataset(Dataset):
    """Samples as dict items; the first `num_query` samples are queries (evaluation sets list them first)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, *, num_query: int = 0) -> None:
        self.samples = samples
        self.transform = transform
        self.num_query = num_query

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, pid, camid = self.samples[index]
        try:
            rgb = open_rgb(path)
        except OSError as error:  # missing, truncated or not an image of the allowed formats
            raise OSError(f"sample {index}: {error}") from error
        return {
            "image": self.transform(rgb),
            "pid": pid,
            "camid": camid,
            "is_query": index < self.num_query,
            "index": index,
        }


class ReIDDataModule(pl.LightningDataModule):
    """A re-id dataset (built in, e.g. "market1501" or the generated "synthetic", or registered) as loaders.

    `dataset_kwargs` go to `build_dataset` (for "synthetic": the generator's parameters). `register` names
    modules imported before the dataset is built, which register parsers of one's own (each process imports
    them, whatever launched it). `also_train` are more datasets whose training splits join this one's
    (`combine_datasets`: labels offset per dataset); query and gallery stay this dataset's. `height` x `width`
    is the input size of the training and test transforms; the query/gallery and validation-split loaders
    take a checkpoint's `preprocessing` instead (its size, normalisation and resampling). `check_images` decodes
    every image at setup with `max(1, num_workers)` threads and lists all unreadable ones in one error.
    Byte-identical images shared by query and gallery, or by training and test, are warned about at setup
    (`agw_light.data.duplicates`) and, with `drop_duplicates`, removed from the gallery and from training.
    `num_workers` is capped at the cores available: more workers than cores only compete with the training
    step (and PyTorch warns). `pin_memory` is for a CUDA run (faster host-to-GPU copies); workers persist
    across epochs whenever there are any. `holdout_images` > 0 removes about that many training images, whole
    identities, from training (labels renumbered) and validates on them (see the module docstring).
    """

    def __init__(
        self,
        name: str,
        root: str,
        *,
        height: int = 256,
        width: int = 128,
        batch_size: int = 64,
        num_instances: int = 4,
        test_batch_size: int = 128,
        num_workers: int = 4,
        seed: int = 0,
        dataset_kwargs: dict | None = None,
        check_images: bool = True,
        drop_duplicates: bool = False,
        pin_memory: bool = False,
        holdout_images: int = 0,
        register: Sequence[str] = (),
        also_train: Sequence[DatasetSource] = (),
    ) -> None:
        super().__init__()
        self.name = name
        self.root = root
        self.height = height
        self.width = width
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.test_batch_size = test_batch_size
        cores = available_cores()
        if num_workers > cores:
            log.info("num_workers=%d capped at the %d CPU cores available", num_workers, cores)
        self.num_workers = min(num_workers, cores)
        self.pin_memory = pin_memory
        self.seed = seed
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.check_images = check_images
        self.drop_duplicates = drop_duplicates
        if holdout_images < 0:
            raise ValueError(f"holdout_images={holdout_images}: expected 0 (none) or a positive image count")
        self.holdout_images = holdout_images
        self.register = list(register)
        self.sources = [DatasetSource(name, root, self.dataset_kwargs), *also_train]
        self._dataset: ReIDDataset | None = None
        self._held_out: tuple[list[Sample], list[Sample]] | None = None

    @property
    def dataset(self) -> ReIDDataset:
        if self._dataset is None:
            raise RuntimeError(f"ReIDDataModule({self.name!r}): call setup() before using the dataset")
        return self._dataset

    @property
    def num_classes(self) -> int:
        """Number of training identities: the classifier's output size."""
        return self.dataset.num_train_pids

    @property
    def num_query(self) -> int:
        return len(self.dataset.query)

    def prepare_data(self) -> None:
        """Generates the synthetic set (Lightning calls this on one process per node); checks real roots."""
        import_dataset_modules(self.register)
        for source in self.sources:
            if source.name == SYNTHETIC:
                source.build()
            elif not Path(source.root).expanduser().is_dir():
                raise FileNotFoundError(
                    f"dataset root {source.root!r} for {source.name!r} does not exist; download the dataset and set "
                    "dataset.root to the folder that holds it"
                )

    def setup(self, stage: str | None = None) -> None:
        """Parses (and checks) the dataset once; later calls (Lightning calls setup per stage) reuse it.

        Every rank checks the images, not rank 0 alone: a rank that does not fail would otherwise wait for
        the failed one at the process-group rendezvous (torchrun, SLURM) until its timeout.
        """
        if self._dataset is not None:
            return
        import_dataset_modules(self.register)
        dataset = combine_datasets([source.build() for source in self.sources])
        if self._is_global_zero():
            log.info("%s", dataset.summary())
        if self.check_images:
            paths = [path for split in SPLITS for path, _, _ in getattr(dataset, split)]
            workers = max(1, self.num_workers)
            start = time.perf_counter()
            verify_images(paths, workers=workers)
            if self._is_global_zero():
                seconds = time.perf_counter() - start
                log.info("checked %d images in %.1f s (%d threads)", len(paths), seconds, workers)
        duplicates = find_duplicates(dataset, workers=max(1, self.num_workers))
        if duplicates and self._is_global_zero():
            action = "dropped" if self.drop_duplicates else "kept; dataset.drop_duplicates=true drops them"
            log.warning("dataset %s: %s\n(%s)", self.name, duplicates.describe(), action)
        if duplicates and self.drop_duplicates:
            dataset = drop_duplicates(dataset, duplicates)
        if self.holdout_images:
            dataset = self._hold_out(dataset)
        self._dataset = dataset

    def _hold_out(self, dataset: ReIDDataset) -> ReIDDataset:
        """The dataset without the held-out identities in its training split, labels renumbered from 0."""
        queries, gallery = identity_split(dataset.train, self.holdout_images)
        held = {pid for _, pid, _ in queries}
        remaining = [sample for sample in dataset.train if sample[1] not in held]
        if not remaining:
            raise ValueError(
                f"holding out {self.holdout_images} images leaves no training identity in {self.name!r} "
                f"({len(dataset.train)} training images); lower eval.fit_images"
            )
        labels = {pid: label for label, pid in enumerate(sorted({pid for _, pid, _ in remaining}))}
        self._held_out = (queries, gallery)
        if self._is_global_zero():
            log.info(
                "held out %d training identities (%d images) for validation; training on the other %d",
                len(held),
                len(queries) + len(gallery),
                len(labels),
            )
        return dataclasses.replace(dataset, train=[(path, labels[pid], camid) for path, pid, camid in remaining])

    @property
    def validation_name(self) -> str:
        """What the validation loop's metrics are logged as: "val" (held-out identities) or "test"."""
        return "val" if self.holdout_images else "test"

    def validation_samples(self) -> list[Sample]:
        """The samples `val_dataloader` reads, in its order (queries first)."""
        if self._held_out is not None:
            return self._held_out[0] + self._held_out[1]
        return self.dataset.query + self.dataset.gallery

    def train_dataloader(self) -> DataLoader:
        return self._train_dataloader(*self._replicas())

    def val_dataloader(self) -> DataLoader:
        if self._held_out is not None:
            queries, gallery = self._held_out
            return self._evaluation_loader(queries, gallery, None, *self._replicas())
        return self.query_gallery_dataloader(*self._replicas())

    def test_dataloader(self) -> DataLoader:
        return self.query_gallery_dataloader(*self._replicas())

    def validation_split_dataloader(self, num_images: int, *, preprocessing: Preprocessing | None = None) -> DataLoader:
        """About `num_images` training images as a query/gallery set (queries first, flagged "is_query").

        Validation data for choices that must not see the test queries or any test label (e.g. the
        coarse-to-fine search's candidate counts); training identities never appear in the test splits. When
        identities are held out of training (`holdout_images`), those are the split and `num_images` is
        unused. `preprocessing` (a checkpoint's) replaces the DataModule's size and agw_light's normalisation.
        """
        if self._held_out is not None:
            queries, gallery = self._held_out
        else:
            queries, gallery = identity_split(self.dataset.train, num_images)
        return self._evaluation_loader(queries, gallery, preprocessing)

    def _test_transform(self, preprocessing: Preprocessing | None) -> Callable:
        return (preprocessing or Preprocessing((self.height, self.width))).transform()

    def _is_global_zero(self) -> bool:
        """Without a trainer (setup called by hand), the rank Lightning's launcher put in the environment."""
        return self.trainer.is_global_zero if self.trainer is not None else rank_zero_only.rank == 0

    def _replicas(self) -> tuple[int, int]:
        """(world size, global rank) of the attached trainer; one process without a trainer."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _loader_options(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }

    def _train_dataloader(self, num_replicas: int, rank: int) -> DataLoader:
        train = self.dataset.train
        # trainer.overfit_batches (conf/debug/overfit.yaml) means the same batches every epoch.
        overfits = self.trainer is not None and self.trainer.overfit_batches > 0
        sampler = (RepeatedDraw if overfits else PKSampler)(
            [pid for _, pid, _ in train],
            num_instances=self.num_instances,
            batch_size=self.batch_size,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
        )
        images = ReIDImageDataset(train, build_train_transform(self.height, self.width))
        return DataLoader(images, batch_sampler=sampler, **self._loader_options())

    def query_gallery_dataloader(
        self, num_replicas: int = 1, rank: int = 0, *, preprocessing: Preprocessing | None = None
    ) -> DataLoader:
        """Query then gallery images, unshuffled; item "index" is the position in that concatenation.

        With the defaults one process reads everything (checkpoint evaluation after a DDP run); with a world
        size each rank reads its shard (validation). `preprocessing` (a checkpoint's: size, normalisation,
        resampling) replaces the DataModule's size and agw_light's normalisation.
        """
        return self._evaluation_loader(self.dataset.query, self.dataset.gallery, preprocessing, num_replicas, rank)

    def _evaluation_loader(
        self,
        queries: list[Sample],
        gallery: list[Sample],
        preprocessing: Preprocessing | None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> DataLoader:
        images = ReIDImageDataset(queries + gallery, self._test_transform(preprocessing), num_query=len(queries))
        shard = None
        if num_replicas > 1:
            shard = DistributedSampler(images, num_replicas, rank, shuffle=False, drop_last=False)
        return DataLoader(
            images, batch_size=self.test_batch_size, shuffle=False, sampler=shard, **self._loader_options()
        )


class RepeatedDraw(PKSampler):
    """A PKSampler that draws epoch 0's batches every epoch: Lightning's overfit_batches takes the first batches
    of each epoch, which must be the same ones for the loss to show whether the model can fit them."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(0)


def identity_split(train: Sequence[Sample], num_images: int) -> tuple[list[Sample], list[Sample]]:
    """(queries, gallery) of about `num_images` training images, whole identities, evenly spaced by label.

    Each query finds its identity's other images in the gallery, as a test query does: per identity the
    first image of each camera is a query and the rest is gallery; an identity that would keep no gallery
    image that way (each image under a camera of its own, as without camera ids) gets one query, its first.
    """
    if num_images < 1:
        raise ValueError(f"a validation split needs num_images >= 1, got {num_images}")
    by_pid: dict[int, list[Sample]] = {}
    for sample in train:
        by_pid.setdefault(sample[1], []).append(sample)
    pids = sorted(by_pid)
    wanted = min(len(pids), max(1, round(num_images * len(pids) / len(train))))
    queries: list[Sample] = []
    gallery: list[Sample] = []
    for position in torch.linspace(0, len(pids) - 1, wanted).round().long().unique().tolist():
        samples = by_pid[pids[position]]
        first_of_camera: dict[int, int] = {}
        for index, (_, _, camid) in enumerate(samples):
            first_of_camera.setdefault(camid, index)
        chosen = set(first_of_camera.values())
        if len(chosen) == len(samples):  # each image under a camera of its own (no camera ids): one query
            chosen = {0}
        queries += [sample for index, sample in enumerate(samples) if index in chosen]
        gallery += [sample for index, sample in enumerate(samples) if index not in chosen]
    return queries, gallery
