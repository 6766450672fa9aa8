"""Build, query and change a gallery index from the command line.

    python -m agw_light.search build ckpt=<model.ckpt> gallery=<image folder> out=<index dir>
        [layout=auto|market|image_folders|image_list|none] [camera_pattern=<regex>] [list_file=<list>]
    python -m agw_light.search query index=<index dir> image=<image file or folder> topk=10 [json=true]
        [ckpt=<model.ckpt>] [allow_changed_model=true] [max_distance=<threshold>]
        [cameras=[0,2]] [since=<seconds>] [until=<seconds>] [exclude_own_camera=true]
    A Milvus collection instead of a folder (a Milvus Lite file or a server), which can also change:
    python -m agw_light.search build ... backend=milvus uri=<gallery.db | http://host:19530> collection=<name>
    python -m agw_light.search query ... backend=milvus uri=... collection=... [token=<user:password>]
    python -m agw_light.search add image=<image file or folder> uri=... collection=...
    python -m agw_light.search delete ids=[3,5] uri=... collection=...   (or paths=[/abs/img.jpg])

The first word picks the subcommand and its config, conf/search/<subcommand>.yaml, which lists every key
with its default; the rest are Hydra overrides of it, as for the other commands. `build`
embeds a gallery with a checkpoint's model and saves the index its head calls for, recording the checkpoint
(path, SHA-256) and image size, and each image's pid and camera as its `layout` gives them. `query` embeds
the query images with the recorded model (or `ckpt=`) and prints the ranked gallery paths with their
distances; a checkpoint whose SHA-256 differs from the recorded one is refused unless
`allow_changed_model=true`. With `max_distance=`, a query lists only the hits at
distance <= max_distance: the "same person" threshold `python -m agw_light.evaluate` reports for a target FPR
(metrics.json, "verification"). `cameras=`, `since=`/`until=` (a Milvus gallery's time window) and
`exclude_own_camera=true` filter the gallery. `add` embeds images with the model a collection records
(another model is refused, naming both); `delete` removes items by id or path (an unknown one deletes
nothing and is named). How: `agw_light.gallery_index`; docs/galleries.md.

The subcommands compose their config without starting a Hydra job: they write only the index named by `out=` or
`collection=` (no run folder, no log file). They check their settings before loading a model, and a bad setting or
file ends them with a one-line reason (exit status 1), never a traceback.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from agw_light.cli import CONF_DIR

SUBCOMMANDS = ("build", "query", "add", "delete")
USAGE = "usage: python -m agw_light.search {build,query,add,delete} key=value ...  (see --help)"
# Hydra's compose API initialises one process-wide instance: calls from several threads take turns.
_COMPOSING = threading.Lock()


def parse_arguments(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """(subcommand, options): conf/search/<subcommand>.yaml composed with the overrides that follow it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    verb, overrides = argv[0], argv[1:]
    if verb not in SUBCOMMANDS:
        raise SystemExit(f"unknown command {verb!r}; expected {', '.join(SUBCOMMANDS)}\n{USAGE}")
    try:
        with _COMPOSING, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=f"search/{verb}", overrides=overrides)
    except HydraException as error:
        raise SystemExit(f"{verb}: {error}\n{USAGE}") from error
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SystemExit(f"{verb}: missing {', '.join(f'{key}=...' for key in missing)}\n{USAGE}")
    return verb, OmegaConf.to_container(cfg, resolve=True)


def build(options: dict[str, Any]) -> None:
    from agw_light.gallery_index import build_gallery_index

    out, index = build_gallery_index(**options)
    print(f"indexed {index.ntotal} images ({type(index).__name__}) into {out}")
    index.close()


def query(options: dict[str, Any]) -> list[dict[str, Any]]:
    from agw_light.gallery_index import query_gallery_index

    printed_json = options.pop("json")
    results = query_gallery_index(options.pop("index"), **options)
    if printed_json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(result["query"])
            for hit in result["results"]:
                print(f"  {hit['rank']:3d}  {hit['distance']:10.4f}  {hit['path'] or hit['index']}")
    return results


def add(options: dict[str, Any]) -> None:
    from agw_light.gallery_index import add_to_gallery

    ids, paths = add_to_gallery(options.pop("image"), **options)
    for item, path in zip(ids.tolist(), paths, strict=True):
        print(f"{item}\t{path}")
    print(f"added {len(ids)} images to collection {options['collection']!r} at {options['uri']}")


def delete(options: dict[str, Any]) -> None:
    from agw_light.gallery_index import delete_from_gallery

    ids = options.pop("ids")
    ids = [ids] if isinstance(ids, int) else ids
    paths = options.pop("paths")
    paths = [paths] if isinstance(paths, str) else paths
    deleted = delete_from_gallery(ids=ids, paths=paths, **options)
    print(
        f"deleted {len(deleted)} items {deleted.tolist()} from collection {options['collection']!r} at {options['uri']}"
    )


COMMANDS = {"build": build, "query": query, "add": add, "delete": delete}


def main(argv: list[str] | None = None) -> None:
    verb, options = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        COMMANDS[verb](options)
    except (OSError, ValueError, LookupError) as error:  # bad settings, files or models: the reason, one line
        raise SystemExit(f"{verb}: {error}") from error


if __name__ == "__main__":
    main()
