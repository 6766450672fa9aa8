"""Search engine for re-id galleries: binary codes, exact and coarse-to-fine Hamming search, float search.

Usable without Lightning or a model: indexes take numpy or torch arrays of float codes (bit = value > 0),
packed uint8 codes, or float features (`FloatIndex`). faiss is imported when an index is first built.
"""

from __future__ import annotations

from agw_light.search.codes import (
    hamming_distances,
    hamming_reference,
    pack_codes,
    split_levels,
    unpack_codes,
)
from agw_light.search.index import (
    CoarseToFineIndex,
    FloatIndex,
    GalleryMetadata,
    HammingIndex,
    fit_candidates,
    load_index,
)

__all__ = [
    "CoarseToFineIndex",
    "FloatIndex",
    "GalleryMetadata",
    "HammingIndex",
    "fit_candidates",
    "hamming_distances",
    "hamming_reference",
    "load_index",
    "pack_codes",
    "split_levels",
    "unpack_codes",
]
