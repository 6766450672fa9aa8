"""Search engine for re-id galleries: binary codes, exact and coarse-to-fine Hamming search, float search.

Usable without Lightning or a model: indexes take numpy or torch arrays of float codes (bit = value > 0),
packed uint8 codes, or float features (`FloatIndex`). faiss is imported when an index is first built.

Modules: `codes` (packing, Hamming distances), `metadata` (what a result points at), `index` (the three
index kinds), `fit` (coarse-to-fine candidate counts), `storage` (the on-disk format), `model_index` (the
index a model's code lengths call for), `gallery` (an image gallery's labels and the record of the model that
filled an index, checked by whoever embeds queries for it).
"""

from __future__ import annotations

from agw_light.search.codes import (
    hamming_distances,
    hamming_reference,
    pack_codes,
    split_levels,
    unpack_codes,
)
from agw_light.search.fit import fit_candidates
from agw_light.search.index import CoarseToFineIndex, FloatIndex, HammingIndex, SearchIndex, load_index
from agw_light.search.metadata import GalleryMetadata
from agw_light.search.model_index import build_index

__all__ = [
    "CoarseToFineIndex",
    "FloatIndex",
    "GalleryMetadata",
    "HammingIndex",
    "SearchIndex",
    "build_index",
    "fit_candidates",
    "hamming_distances",
    "hamming_reference",
    "load_index",
    "pack_codes",
    "split_levels",
    "unpack_codes",
]
