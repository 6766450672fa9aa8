"""Binary codes: splitting a code pyramid into levels, bit-packing, and exact Hamming distances.

A code is the sign pattern of a float vector: bit = value > 0 (the convention of
`agw_light.metrics.pairwise_distance(..., "hamming")`). Packed codes are uint8 rows of ceil(bits / 8) bytes
made by `np.packbits` with bitorder "big": feature j is bit 7 - j % 8 of byte j // 8, and the padding bits
at the end of the last byte are zero, so they never add to a distance.

Distances XOR whole machine words: a packed row is viewed as the widest unsigned integers that divide its
byte count (uint64 for every length that is a multiple of 64), so a 2048-bit distance is 32 popcounts
(`np.bitwise_count`, numpy 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Query x gallery entries per block of `hamming_distances`.
_BLOCK_ENTRIES = 1 << 20
# Candidates up to which `gathered_hamming` sums words in one reduction (a single query's re-ranking).
_SMALL_GATHER = 4096


def split_levels(features: Any, code_lengths: Sequence[int]) -> list[Any]:
    """The per-level blocks (views) of a concatenated code pyramid, in the order of `code_lengths`.

    The model's eval output is [2048 | 1024 | ... | 32] along the last axis with `head.code_lengths`
    listing the same lengths, so `split_levels(output, head.code_lengths)` gives one tensor per level.
    Works on torch tensors and numpy arrays alike.
    """
    lengths = [int(length) for length in code_lengths]
    if not lengths or any(length < 1 for length in lengths):
        raise ValueError(f"code_lengths must be a non-empty sequence of positive ints, got {list(code_lengths)}")
    width = features.shape[-1]
    if width != sum(lengths):
        raise ValueError(
            f"features have {width} columns but code_lengths {lengths} add up to {sum(lengths)}: "
            "expected the concatenation of every level"
        )
    if isinstance(features, np.ndarray):
        return np.split(features, np.cumsum(lengths)[:-1], axis=-1)
    return list(features.split(lengths, dim=-1))


def code_bytes(bits: int) -> int:
    """Bytes per packed code of `bits` bits."""
    return (int(bits) + 7) // 8


def as_numpy(values: Any) -> np.ndarray:
    """numpy view or copy of a numpy array, a torch tensor (any device; half floats widened) or array-like."""
    if isinstance(values, np.ndarray):
        return values
    if hasattr(values, "detach"):
        tensor = values.detach().cpu()
        if tensor.dtype.is_floating_point and tensor.dtype.itemsize < 4:  # bfloat16 has no numpy dtype
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(values)


def pack_codes(codes: Any) -> np.ndarray:
    """(N, bits) codes (torch or numpy; float, int or bool; bit = value > 0) -> (N, ceil(bits/8)) uint8."""
    codes = as_numpy(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (num_items, bits), got {codes.shape}")
    if codes.dtype.kind not in "biuf":
        raise ValueError(f"codes must hold real numbers or booleans, got dtype {codes.dtype}")
    return np.packbits(codes > 0, axis=1, bitorder="big")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """(N, ceil(bits/8)) uint8 -> (N, bits) bool, the inverse of `pack_codes`."""
    packed = check_packed(packed, bits, "packed")
    return np.unpackbits(packed, axis=1, count=int(bits), bitorder="big").astype(bool)


def check_packed(packed: Any, bits: int, name: str) -> np.ndarray:
    """`packed` as a C-contiguous (N, ceil(bits/8)) uint8 array, or a clear error."""
    packed = np.asarray(packed)
    width = code_bytes(bits)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != width:
        raise ValueError(
            f"{name} must be packed {bits}-bit codes: uint8 of shape (N, {width}), "
            f"got {packed.dtype} of shape {packed.shape}"
        )
    return np.ascontiguousarray(packed)


def as_packed(codes: Any, bits: int, name: str) -> np.ndarray:
    """(N, bits) values (bit = value > 0) packed, or (N, ceil(bits / 8)) uint8 taken as packed already.

    Padding bits of packed input are cleared so that they can never count in a distance.
    """
    array = as_numpy(codes)
    width = code_bytes(bits)
    if array.ndim == 2 and array.shape[1] == bits:
        return pack_codes(array)
    if array.ndim == 2 and array.dtype == np.uint8 and array.shape[1] == width:
        packed = np.array(array, order="C")
        if bits % 8:
            packed[:, -1] &= np.uint8((0xFF << (8 - bits % 8)) & 0xFF)
        return packed
    raise ValueError(
        f"{name} must be (N, {bits}) code values (bit = value > 0) or (N, {width}) packed uint8, "
        f"got {array.dtype} of shape {array.shape}"
    )


def as_words(packed: np.ndarray) -> np.ndarray:
    """A view of packed rows as the widest unsigned words dividing the row's byte count."""
    packed = np.ascontiguousarray(packed)
    width = packed.shape[1]
    for dtype in (np.uint64, np.uint32, np.uint16):
        size = np.dtype(dtype).itemsize
        if width % size == 0:
            return packed.view(dtype)
    return packed


def hamming_reference(q_packed: np.ndarray, g_packed: np.ndarray) -> np.ndarray:
    """(Q, G) int64 Hamming distances by unpacking to bits and counting differences, one query at a time.

    The slow, obvious definition, kept as the reference for tests.
    """
    q_bits, g_bits = np.unpackbits(q_packed, axis=1), np.unpackbits(g_packed, axis=1)
    if q_bits.shape[1] != g_bits.shape[1]:
        raise ValueError(f"query and gallery codes differ in width: {q_packed.shape} vs {g_packed.shape}")
    return np.array([np.count_nonzero(row != g_bits, axis=1) for row in q_bits], dtype=np.int64).reshape(
        len(q_bits), len(g_bits)
    )


def hamming_distances(q_packed: np.ndarray, g_packed: np.ndarray) -> np.ndarray:
    """(Q, G) int32 exact Hamming distances of packed codes: XOR of machine words, popcount, sum.

    Loops over the few words of a code (not over queries): each step is one XOR and popcount of a block
    of query rows against a contiguous column of gallery words, which numpy runs far faster than a
    reduction over a short last axis. Blocks of query rows keep temporaries near 8 MB.
    """
    if q_packed.ndim != 2 or g_packed.ndim != 2 or q_packed.shape[1] != g_packed.shape[1]:
        raise ValueError(
            f"query and gallery codes must be (N, bytes) arrays of equal width, got {q_packed.shape} "
            f"and {g_packed.shape}"
        )
    q_words, g_columns = as_words(q_packed), np.ascontiguousarray(as_words(g_packed).T)
    out = np.zeros((len(q_words), g_columns.shape[1]), dtype=np.int32)
    rows = max(1, _BLOCK_ENTRIES // max(1, g_columns.shape[1]))
    for start in range(0, len(q_words), rows):
        block = out[start : start + rows]
        xor = np.empty(block.shape, dtype=g_columns.dtype)
        for word, column in enumerate(g_columns):
            np.bitwise_xor(q_words[start : start + rows, word, None], column[None, :], out=xor)
            block += np.bitwise_count(xor)
    return out


def gathered_hamming(q_words: np.ndarray, g_words: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(Q, C) int32 distances from each query to its own candidate gallery rows (`candidates`: (Q, C) ints).

    The re-ranking step of coarse-to-fine search, for the whole query batch at once: `np.take` of the
    candidate rows (several times faster than fancy indexing), XOR in place, popcount, and a sum over the
    few words of a code.
    """
    block = np.take(g_words, candidates, axis=0)
    np.bitwise_xor(block, q_words[:, None, :], out=block)
    counts = np.bitwise_count(block)
    if candidates.size <= _SMALL_GATHER:  # one reduction call beats a loop of tiny ones
        return counts.sum(axis=2, dtype=np.int32)
    distances = counts[:, :, 0].astype(np.int32)
    for word in range(1, counts.shape[2]):
        distances += counts[:, :, word]
    return distances
