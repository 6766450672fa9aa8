"""Ranked-list pictures and projector thumbnails: what a model retrieves, for eyes rather than numbers.

Rankings follow the evaluation protocol exactly (same-pid-same-camera "junk" removed, ties broken by gallery
order), so a picture's true matches are those R1/mAP count. Used by `python -m agw_light.visualize` and by
the TensorBoard callback `agw_light.lit.callbacks.RankedListLogger`; no Hydra here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agw_light.checks import is_integer
from agw_light.images import open_rgb
from agw_light.metrics.distance import pairwise_distance

if TYPE_CHECKING:
    from PIL import Image

    ImageSource = str | Path | Image.Image

# Layout of one ranked list (pixels): a coloured frame around each thumbnail, its label underneath.
FRAME = 3
SPACING = 4
QUERY_GAP = 16  # extra space that sets the query apart from its ranked gallery images
MARGIN = 4
LABEL_HEIGHT = 14
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
QUERY_COLOUR = (40, 90, 220)
MATCH_COLOUR = (0, 180, 0)
MISMATCH_COLOUR = (220, 0, 0)
DEFAULT_THUMB_SIZE = (128, 64)  # (height, width), the pedestrian aspect ratio of the benchmarks
PROJECTOR_THUMB_SIDE = 32


def protocol_junk(
    q_pids: torch.Tensor, q_camids: torch.Tensor, g_pids: torch.Tensor, g_camids: torch.Tensor
) -> torch.Tensor:
    """(Q, G) mask of the gallery items the protocol removes for each query: same pid and same camera."""
    return (q_pids[:, None] == g_pids[None]) & (q_camids[:, None] == g_camids[None])


def rank_queries(
    query_features: Any,
    gallery_features: Any,
    q_pids: Any,
    q_camids: Any,
    g_pids: Any,
    g_camids: Any,
    *,
    metric: str,
    topk: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gallery indices, distances, true-match flags), each (Q, topk), of every query's top-k.

    A stable sort (not torch.topk, whose tie order is unspecified) orders equal distances by gallery index,
    as `agw_light.metrics.evaluate_rank` does, so even Hamming ties rank as in the metrics. Hamming
    distances come back as integer bit counts, cosine ones as 1 - cos.
    """
    distances = pairwise_distance(query_features, gallery_features, metric)
    device = distances.device
    q_pids, q_camids, g_pids, g_camids = (
        torch.as_tensor(ids, device=device).long() for ids in (q_pids, q_camids, g_pids, g_camids)
    )
    num_query, num_gallery = distances.shape
    if q_pids.shape != (num_query,) or q_camids.shape != (num_query,):
        raise ValueError(f"q_pids and q_camids must have shape ({num_query},) like the query features")
    if g_pids.shape != (num_gallery,) or g_camids.shape != (num_gallery,):
        raise ValueError(f"g_pids and g_camids must have shape ({num_gallery},) like the gallery features")
    junk = protocol_junk(q_pids, q_camids, g_pids, g_camids)
    ranked_count = num_gallery - int(junk.sum(1).max()) if num_query else num_gallery
    if not is_integer(topk) or not 1 <= topk <= ranked_count:
        raise ValueError(
            f"topk={topk!r}: must be an integer in [1, {ranked_count}], the gallery images every query keeps "
            f"after the protocol removes its same-pid-same-camera images ({num_gallery} in the gallery)"
        )
    ranked = torch.sort(distances.masked_fill(junk, float("inf")), dim=1, stable=True)
    indices, top_distances = ranked.indices[:, :topk], ranked.values[:, :topk]
    if metric == "hamming":
        top_distances = top_distances.round().long()
    return indices, top_distances, g_pids[indices] == q_pids[:, None]


def pick_positions(available: int, count: int, *, seed: int | None = None) -> torch.Tensor:
    """`count` sorted positions out of `available`: evenly spaced from 0, or a seeded random choice.

    Deterministic either way, so the pictures of successive validations show the same queries.
    """
    if not 1 <= count <= available:
        raise ValueError(f"cannot pick {count} of {available} items: need 1 <= count <= {available}")
    if seed is None:
        return torch.arange(count) * available // count
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=generator)[:count].sort().values


def format_distance(distance: float | int) -> str:
    return str(distance) if isinstance(distance, int) else f"{distance:.3f}"


def draw_ranked_list(
    query_image: ImageSource,
    gallery_images: Sequence[ImageSource],
    distances: Any,
    matches: Any,
    *,
    thumb_size: tuple[int, int] = DEFAULT_THUMB_SIZE,
) -> Image.Image:
    """One row: the query (blue frame, "query"), a gap, then its ranked gallery images framed green (true
    match) or red, each with its distance underneath. `thumb_size` is (height, width)."""
    from PIL import Image, ImageDraw, ImageFont

    distances, matches = torch.as_tensor(distances).tolist(), torch.as_tensor(matches).tolist()
    if not len(gallery_images) == len(distances) == len(matches):
        raise ValueError(
            f"draw_ranked_list: {len(gallery_images)} gallery images, {len(distances)} distances and "
            f"{len(matches)} match flags; expected one of each per ranked image"
        )
    height, width = thumb_size
    cell_width, cell_height = width + 2 * FRAME, height + 2 * FRAME + LABEL_HEIGHT
    count = len(gallery_images)
    picture = Image.new(
        "RGB",
        (2 * MARGIN + (count + 1) * cell_width + QUERY_GAP + max(count - 1, 0) * SPACING, 2 * MARGIN + cell_height),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()

    def draw_cell(left: int, source: ImageSource, colour: tuple[int, int, int], label: str) -> None:
        draw.rectangle((left, MARGIN, left + cell_width - 1, MARGIN + height + 2 * FRAME - 1), fill=colour)
        thumbnail = open_rgb(source).resize((width, height), Image.Resampling.BILINEAR)
        picture.paste(thumbnail, (left + FRAME, MARGIN + FRAME))
        text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), label, font=font)
        draw.text(
            (
                left + (cell_width - text_right - text_left) / 2,
                MARGIN + height + 2 * FRAME + (LABEL_HEIGHT - text_bottom - text_top) / 2,
            ),
            label,
            fill=TEXT_COLOUR,
            font=font,
        )

    draw_cell(MARGIN, query_image, QUERY_COLOUR, "query")
    first = MARGIN + cell_width + QUERY_GAP
    for rank, (source, distance, match) in enumerate(zip(gallery_images, distances, matches, strict=True)):
        colour = MATCH_COLOUR if match else MISMATCH_COLOUR
        draw_cell(first + rank * (cell_width + SPACING), source, colour, format_distance(distance))
    return picture


def stack_rows(rows: Sequence[Image.Image]) -> Image.Image:
    """Pictures one under the other, left-aligned on the background colour."""
    from PIL import Image

    if not rows:
        raise ValueError("stack_rows: no picture to stack")
    picture = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)), BACKGROUND)
    top = 0
    for row in rows:
        picture.paste(row, (0, top))
        top += row.height
    return picture


def ranked_list_pictures(
    samples: Mapping[str, torch.Tensor],
    image_paths: Sequence[str],
    query_positions: Any,
    *,
    metric: str,
    topk: int = 10,
    thumb_size: tuple[int, int] = DEFAULT_THUMB_SIZE,
) -> list[Image.Image]:
    """One ranked-list picture per chosen query (`query_positions` count among the query rows).

    `samples`: features, pids, camids, is_query and index (the position in `image_paths`) of every image,
    as `agw_light.evaluation.extract_features` or `ReIDMetric.gathered_samples` give them.
    """
    is_query = samples["is_query"].bool()
    query_rows = torch.nonzero(is_query).squeeze(1)[torch.as_tensor(query_positions, dtype=torch.long)]
    gallery_rows = torch.nonzero(~is_query).squeeze(1)
    features, pids, camids = samples["features"], samples["pids"], samples["camids"]
    indices, distances, matches = rank_queries(
        features[query_rows],
        features[gallery_rows],
        pids[query_rows],
        camids[query_rows],
        pids[gallery_rows],
        camids[gallery_rows],
        metric=metric,
        topk=topk,
    )
    index = samples["index"].tolist()
    gallery_paths = [image_paths[index[row]] for row in gallery_rows.tolist()]
    return [
        draw_ranked_list(
            image_paths[index[query_row]],
            [gallery_paths[j] for j in ranked.tolist()],
            row_distances,
            row_matches,
            thumb_size=thumb_size,
        )
        for query_row, ranked, row_distances, row_matches in zip(
            query_rows.tolist(), indices.cpu(), distances.cpu(), matches.cpu(), strict=True
        )
    ]


def load_thumbnails(paths: Sequence[str], side: int = PROJECTOR_THUMB_SIDE) -> torch.Tensor:
    """(N, 3, side, side) floats in [0, 1]: the label images of TensorBoard's embedding projector.

    Square, because the projector's sprite sheet (torch's `make_sprite`) only tiles square images: each
    image keeps its aspect ratio, centred on the background colour.
    """
    import numpy as np
    from PIL import Image

    squares = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    for position, path in enumerate(paths):
        image = open_rgb(path)
        scale = side / max(image.width, image.height)
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        square = Image.new("RGB", (side, side), BACKGROUND)
        square.paste(
            image.resize((width, height), Image.Resampling.BILINEAR), ((side - width) // 2, (side - height) // 2)
        )
        squares[position] = np.asarray(square)
    return torch.from_numpy(squares).permute(0, 3, 1, 2).float().div_(255.0)


def save_png_atomic(picture: Image.Image, path: str | Path) -> Path:
    from agw_light.files import write_atomic

    return write_atomic(path, lambda handle: picture.save(handle, format="PNG"))
