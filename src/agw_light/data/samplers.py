"""`PKSampler`: identity-balanced training batches (P identities x K images), so the triplet loss always
finds positives and negatives inside a batch.

How an epoch is drawn (numpy Generator seeded by (seed, epoch) only, so every DDP rank and a resumed run
draw the same epoch):

1. Each identity's images are shuffled and cut into chunks of K. The incomplete tail chunk is dropped (those
   images are simply left out this epoch; the shuffle changes which). An identity with fewer than K images
   gives one chunk that cycles through its shuffled images (every image used, some twice).
2. The chunks become `steps` global steps of P x R chunks of distinct identities (R = num_replicas).
   Identities are laid out in a random order, each identity's chunks next to each other, and chunk t goes to
   step t mod `steps`: an identity owns at most `steps` consecutive slots, so it lands at most once in a
   step. `steps` is the largest S with sum_i min(c_i, S) >= P * R * S (c_i = chunks of identity i), the
   most steps that can hold distinct identities; it depends on the identity sizes only, so the epoch length
   is the same every epoch. Usually it is sum_i c_i // (P * R), i.e. about len(pids) // (batch_size * R).
   Chunks past the P * R * S slots (fewer than P * R unless one identity dominates) are left out; they
   belong to the identities laid out last, a fresh random choice each epoch. DDP therefore needs at least
   P * R identities.
3. Steps are shuffled, identities shuffled within each step, and rank r takes identities [r*P, (r+1)*P) of
   every step: all ranks yield the same number of batches and no identity is on two ranks at the same step.

Lightning calls `set_epoch` on `dataloader.batch_sampler.sampler` (not on the batch sampler itself), so
`sampler` points back at this object.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from agw_light.checks import is_integer, positive_int


def _offsets_within_groups(group_sizes: np.ndarray) -> np.ndarray:
    """0, 1, ..., size - 1 for each group in turn: the rank of every element inside its group."""
    return np.arange(group_sizes.sum()) - np.repeat(np.cumsum(group_sizes) - group_sizes, group_sizes)


def _max_steps(chunk_counts: np.ndarray, slots_per_step: int) -> int:
    """Largest S with sum_i min(c_i, S) >= slots_per_step * S: the most steps of distinct identities."""
    sorted_counts = np.sort(chunk_counts)
    below_sums = np.concatenate([[0], np.cumsum(sorted_counts)])
    candidates = np.arange(int(sorted_counts.sum()) // slots_per_step + 1)
    num_below = np.searchsorted(sorted_counts, candidates, side="left")
    capacity = below_sums[num_below] + candidates * (len(sorted_counts) - num_below)
    # capacity - slots * S is concave with value 0 at S = 0, so the feasible S form a prefix.
    return int(np.flatnonzero(capacity >= slots_per_step * candidates)[-1])


class PKSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler over dataset indices: each batch is P = batch_size // num_instances distinct identities
    with num_instances images each, grouped by identity. See the module docstring for the epoch layout."""

    def __init__(
        self,
        pids: Sequence[int],
        *,
        num_instances: int,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        num_instances = positive_int(num_instances, "PKSampler num_instances")
        batch_size = positive_int(batch_size, "PKSampler batch_size")
        num_replicas = positive_int(num_replicas, "PKSampler num_replicas")
        if batch_size % num_instances != 0:
            raise ValueError(
                f"PKSampler batch_size={batch_size} must be a multiple of num_instances={num_instances} "
                "(a batch is P identities x num_instances images)"
            )
        if not is_integer(rank) or not 0 <= rank < num_replicas:
            raise ValueError(f"PKSampler rank must be an integer in [0, {num_replicas}), got {rank!r}")
        if not is_integer(seed) or seed < 0:
            raise ValueError(f"PKSampler seed must be a non-negative integer, got {seed!r}")
        pid_array = np.asarray(pids)
        if pid_array.ndim != 1 or pid_array.size == 0 or not np.issubdtype(pid_array.dtype, np.integer):
            raise ValueError(
                f"PKSampler pids must be a non-empty 1-D sequence of integer identities, got "
                f"shape {pid_array.shape} and dtype {pid_array.dtype}"
            )
        self.num_instances = num_instances
        self.batch_size = batch_size
        self.num_pids_per_batch = batch_size // num_instances
        self.num_replicas = num_replicas
        self.rank = int(rank)
        self.seed = int(seed)
        self.epoch = 0
        self.sampler = self

        _, labels, image_counts = np.unique(pid_array, return_inverse=True, return_counts=True)
        num_ids = len(image_counts)
        slots_per_step = self.num_pids_per_batch * num_replicas
        if num_ids < slots_per_step:
            raise ValueError(
                f"PKSampler needs at least {slots_per_step} distinct identities (P={self.num_pids_per_batch} "
                f"per batch = batch_size {batch_size} // num_instances {num_instances}, x {num_replicas} "
                f"replica(s)), but pids holds {num_ids}"
            )
        self._labels = labels
        chunk_counts = np.maximum(image_counts // num_instances, 1)
        self._steps = _max_steps(chunk_counts, slots_per_step)

        # Fixed layout: chunk slot s of identity i reads position (s mod n_i) of i's shuffled images, which
        # is the plain prefix when n_i >= K and cycles the images when n_i < K.
        group_starts = np.concatenate([[0], np.cumsum(image_counts)[:-1]])
        slots = chunk_counts * num_instances
        slot_labels = np.repeat(np.arange(num_ids), slots)
        slot_offsets = _offsets_within_groups(slots) % image_counts[slot_labels]
        self._slot_positions = group_starts[slot_labels] + slot_offsets
        # Identities with more chunks than steps keep only their first `steps` (random) chunks.
        chunk_labels = np.repeat(np.arange(num_ids), chunk_counts)
        kept = _offsets_within_groups(chunk_counts) < self._steps
        self._kept_chunks = np.flatnonzero(kept)
        self._kept_chunk_labels = chunk_labels[kept]
        self._num_ids = num_ids

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's draw; Lightning calls this at the start of every training epoch."""
        if not is_integer(epoch) or epoch < 0:
            raise ValueError(f"PKSampler epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._rank_batches().tolist()

    def _rank_batches(self) -> np.ndarray:
        """(steps, batch_size) dataset indices of this rank for the current epoch."""
        rng = np.random.default_rng((self.seed, self.epoch))
        num_ids, k, p = self._num_ids, self.num_instances, self.num_pids_per_batch
        shuffled = np.lexsort((rng.random(len(self._labels)), self._labels))  # grouped by identity
        chunks = shuffled[self._slot_positions].reshape(-1, k)

        id_order = np.empty(num_ids, dtype=np.int64)
        id_order[rng.permutation(num_ids)] = np.arange(num_ids)
        laid_out = self._kept_chunks[np.argsort(id_order[self._kept_chunk_labels], kind="stable")]
        slots_per_step = p * self.num_replicas
        steps = laid_out[: slots_per_step * self._steps].reshape(slots_per_step, self._steps).T
        steps = rng.permuted(steps[rng.permutation(self._steps)], axis=1)
        mine = steps[:, self.rank * p : (self.rank + 1) * p]
        return chunks[mine].reshape(self._steps, p * k)
