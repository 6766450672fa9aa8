"""Build and query a saved gallery index from the command line.

    python -m agw_light.search build ckpt=<model.ckpt> gallery=<image folder> out=<index dir>
    python -m agw_light.search query index=<index dir> image=<image file or folder> topk=10 [json=true]
        [ckpt=<model.ckpt>] [allow_changed_model=true] [max_distance=<threshold>]

`build` embeds every image under `gallery` (recursively: jpg, jpeg, png, bmp, webp) with the checkpoint's model
and saves the index the model's head calls for (float cosine, exact Hamming or coarse-to-fine Hamming)
with the image paths (and pid / camera parsed from Market- or Duke-style names, else -1). The
coarse-to-fine candidate counts are fitted on a sample of the gallery's own codes as queries (no labels
exist here; recall is measured against the exact full-length search). The index's manifest records the
checkpoint (absolute path, SHA-256) and image size, saved atomically with the data, and the gallery paths
are absolute, so the index answers from any working directory.

`query` embeds the query images with the model recorded at build time (or `ckpt=`) and prints the ranked
gallery paths with their distances. It re-hashes that checkpoint and refuses one whose SHA-256 differs from
the recorded one (its outputs would not match the index's) unless `allow_changed_model=true`. With
`max_distance=`, a query lists only the hits at distance <= max_distance (at most topk, maybe none): the
"same person" threshold that `python -m agw_light.evaluate` reports for a target FPR (metrics.json,
"verification"), in the index's distance (1 - cosine, or Hamming bits). Checkpoints
are read with `weights_only=True`: a file holding code is refused, the code never runs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agw_light.inference.checkpoint import LoadedCheckpoint

# Market-1501 / DukeMTMC-reID style names: <pid>_c<camera>...
REID_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# Where agw_light before the record moved into the manifest kept the model, outside the atomic save.
LEGACY_MODEL_RECORD = "model.json"
DEFAULTS: dict[str, dict[str, Any]] = {
    "build": {
        "ckpt": None,
        "gallery": None,
        "out": None,
        "device": "auto",
        "batch_size": 128,
        "height": None,
        "width": None,
        "fit_queries": 1000,
        "target_recall": 0.99,
        "seed": 0,
    },
    "query": {
        "index": None,
        "image": None,
        "topk": 10,
        "ckpt": None,
        "device": "auto",
        "batch_size": 128,
        "height": None,
        "width": None,
        "json": False,
        "allow_changed_model": False,
        "max_distance": None,
    },
}
REQUIRED = {"build": ("ckpt", "gallery", "out"), "query": ("index", "image")}


def parse_arguments(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """`<verb> key=value ...` checked against the verb's keys; values typed by YAML (OmegaConf)."""
    from omegaconf import OmegaConf

    usage = "usage: python -m agw_light.search {build,query} key=value ...  (see --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    verb, pairs = argv[0], argv[1:]
    if verb not in DEFAULTS:
        raise SystemExit(f"unknown command {verb!r}; expected build or query\n{usage}")
    malformed = [pair for pair in pairs if "=" not in pair]
    if malformed:
        raise SystemExit(f"arguments must be key=value, got {malformed}\n{usage}")
    given = OmegaConf.to_container(OmegaConf.from_dotlist(pairs))
    unknown = sorted(set(given) - set(DEFAULTS[verb]))
    if unknown:
        raise SystemExit(f"{verb}: unknown key(s) {unknown}; known: {sorted(DEFAULTS[verb])}")
    options = {**DEFAULTS[verb], **given}
    missing = [key for key in REQUIRED[verb] if options[key] is None]
    if missing:
        raise SystemExit(f"{verb}: missing {', '.join(f'{key}=...' for key in missing)}\n{usage}")
    return verb, options


def reid_labels(path: Path) -> tuple[int, int]:
    """(pid, 0-based camera) from a Market/Duke-style file name, (-1, -1) when the name says nothing."""
    match = REID_NAME.match(path.name)
    return (int(match.group(1)), int(match.group(2)) - 1) if match else (-1, -1)


def _embed_location(loaded: LoadedCheckpoint, location: str | Path, options: dict[str, Any]) -> tuple[list[Path], Any]:
    """The images at `location` and the model's eval-mode outputs for them (`agw_light.inference.Encoder`, torch
    backend: the outputs evaluation ranks), with the checkpoint's preprocessing at `_image_size`."""
    from agw_light.inference import Encoder

    encoder = Encoder.from_loaded(
        loaded, image_size=_image_size(loaded, options), device=options["device"], backend="torch"
    )
    return encoder.encode_files(location, batch_size=options["batch_size"], progress=True)


def _image_size(loaded: LoadedCheckpoint, options: dict[str, Any]) -> tuple[int, int]:
    recorded = None if loaded.preprocessing is None else loaded.preprocessing.image_size
    height = options["height"] or (recorded[0] if recorded else None)
    width = options["width"] or (recorded[1] if recorded else None)
    if not height or not width:
        raise SystemExit("the checkpoint does not record its image size: pass height=... width=...")
    return int(height), int(width)


def build(options: dict[str, Any]) -> Path:
    import numpy as np

    from agw_light.inference.checkpoint import load_checkpoint
    from agw_light.search import GalleryMetadata, build_index

    loaded = load_checkpoint(options["ckpt"])
    record = {
        "ckpt": str(Path(options["ckpt"]).resolve()),
        "ckpt_sha256": loaded.sha256,
        "image_size": list(_image_size(loaded, options)),
    }
    gallery = Path(options["gallery"]).expanduser().resolve()  # absolute paths: a query may run elsewhere
    paths, features = _embed_location(loaded, gallery, options)
    labels = [reid_labels(path) for path in paths]
    metadata = GalleryMetadata([str(p) for p in paths], [pid for pid, _ in labels], [cam for _, cam in labels])
    sample = np.random.default_rng(options["seed"]).permutation(len(paths))[: options["fit_queries"]]
    index = build_index(
        features,
        loaded.network.code_lengths,
        metadata=metadata,
        fit_queries=features[np.sort(sample)],
        target_recall=options["target_recall"],
    )
    out = index.save(options["out"], record=record)
    print(f"indexed {len(paths)} images ({type(index).__name__}) into {out}")
    return Path(out)


def _query_model(index_dir: Path, record: dict[str, Any], options: dict[str, Any]) -> LoadedCheckpoint:
    """The model that embeds queries: `ckpt=` or the recorded one, refused if it is not the one that built
    the index (SHA-256) unless `allow_changed_model=true`."""
    from agw_light.inference.checkpoint import load_checkpoint

    if not record and (index_dir / LEGACY_MODEL_RECORD).is_file():
        raise SystemExit(
            f"{index_dir / LEGACY_MODEL_RECORD}: this index was built by an older agw_light, which kept the model "
            "record outside the index (it may describe another build); rebuild it with `search build`"
        )
    ckpt = options["ckpt"] or record.get("ckpt")
    if ckpt is None:
        raise SystemExit(f"{index_dir}: the index records no model (saved without one): pass ckpt=<checkpoint>")
    loaded = load_checkpoint(ckpt)
    recorded = record.get("ckpt_sha256")
    actual = loaded.sha256 if recorded else None
    if actual != recorded:
        mismatch = (
            f"checkpoint {ckpt}: SHA-256 {actual}, but the index {index_dir} was built by a checkpoint with "
            f"SHA-256 {recorded} ({record.get('ckpt')}); its outputs may not match the index"
        )
        if not options["allow_changed_model"]:
            raise SystemExit(f"{mismatch}. Rebuild the index, or pass allow_changed_model=true to query it anyway")
        print(f"warning: {mismatch}; querying anyway (allow_changed_model=true)", file=sys.stderr)
    return loaded


def query(options: dict[str, Any]) -> list[dict[str, Any]]:
    from agw_light.search import load_index

    index_dir = Path(options["index"])
    index = load_index(index_dir)
    record = index.record or {}
    loaded = _query_model(index_dir, record, options)
    if record.get("image_size") and not (options["height"] or options["width"]):
        options = {**options, "height": record["image_size"][0], "width": record["image_size"][1]}
    paths, features = _embed_location(loaded, options["image"], options)
    if options["max_distance"] is None:
        distances, indices = index.search(features, int(options["topk"]))
    else:
        try:
            distances, indices = index.search_within(features, int(options["topk"]), options["max_distance"])
        except ValueError as error:
            raise SystemExit(f"max_distance={options['max_distance']!r}: {error}") from error
    gallery_paths = index.metadata.paths if index.metadata is not None else None
    results = [
        {
            "query": str(path),
            "results": [
                {
                    "rank": rank + 1,
                    "index": int(i),
                    "distance": float(d),
                    "path": gallery_paths[int(i)] if gallery_paths else None,
                }
                for rank, (d, i) in enumerate(zip(distances[row], indices[row], strict=True))
                if i >= 0  # search_within's padding: hits beyond max_distance
            ],
        }
        for row, path in enumerate(paths)
    ]
    if options["json"]:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(result["query"])
            for hit in result["results"]:
                print(f"  {hit['rank']:3d}  {hit['distance']:10.4f}  {hit['path'] or hit['index']}")
    return results


def main(argv: list[str] | None = None) -> None:
    verb, options = parse_arguments(sys.argv[1:] if argv is None else argv)
    (build if verb == "build" else query)(options)


if __name__ == "__main__":
    main()
