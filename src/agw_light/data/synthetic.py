"""A procedural pedestrian dataset in the Market-1501 layout, so training runs with nothing downloaded.

Each identity is a stable appearance (clothing colours and patterns, body proportions, hair, shoes, bags);
each camera is a stable nuisance (colour cast, background, viewpoint, scale, blur, noise, occluders), and
every image adds its own pose, placement and lighting jitter. Matching people therefore needs features
that survive camera changes, which keeps the task learnable but not trivial.

Every image comes from its own seeded generator, so the bytes depend only on the parameters, never on the
order of drawing. The tree is written once into a folder named by a hash of the parameters and reused.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agw_light.checks import is_integer

if TYPE_CHECKING:
    from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# Bump whenever the drawing changes: the folder name includes it, so old caches are never reused.
GENERATOR_VERSION = 1
MARKET_DIR = "Market-1501-v15.09.15"
TRAIN_DIR, QUERY_DIR, GALLERY_DIR = "bounding_box_train", "query", "bounding_box_test"
COMPLETE_MARKER = ".complete"
JPEG_QUALITY = 90
# Market-1501 names hold a 4-digit pid, a 1-digit camera and a 6-digit frame (100 * pid + image index).
MAX_IDS, MAX_CAMS, MAX_IMAGES_PER_ID_CAM = 9999, 9, 99
MIN_SIZE = 16
# Shares of the gallery added as distractors (pid 0000) and junk (pid -1), as in the real gallery.
DISTRACTOR_SHARE, JUNK_SHARE = 0.05, 0.02

# Independent random streams: (seed, stream, ...) never collide between identities, cameras and images.
_IDENTITY, _CAMERA, _IMAGE, _DISTRACTOR, _DISTRACTOR_IMAGE, _JUNK = range(6)

# Labels of the part map; each label is one colour of the palette.
_BG, _SKIN, _HAIR, _UPPER, _SLEEVE, _LOWER, _SHOES, _BAG, _STRAP, _HAT, _OCCLUDER = range(11)
_CLUTTER = 11  # clutter objects take labels _CLUTTER.._CLUTTER + _MAX_CLUTTER - 1
_MAX_CLUTTER = 3
_NUM_LABELS = _CLUTTER + _MAX_CLUTTER

_FRONT, _BACK, _SIDE = range(3)
_PLAIN, _STRIPES, _CHECKS, _BAND = range(4)
_TROUSERS, _SHORTS, _SKIRT = range(3)
_SHORT_HAIR, _LONG_HAIR, _CAP, _BALD = range(4)
_NO_BAG, _BACKPACK, _SHOULDER_BAG, _HANDBAG = range(4)


@dataclass(frozen=True)
class _ImageSpec:
    split: str
    filename: str
    stream: tuple[int, ...]  # seeds this image's generator
    appearance_stream: tuple[int, ...]  # seeds the look, shared by all images of one identity
    cam: int  # 0-based
    junk: bool = False


@dataclass(frozen=True)
class _Appearance:
    colours: np.ndarray  # (_NUM_LABELS, 3) RGB in [0, 1]; background and clutter rows are unused
    upper_alt: np.ndarray
    upper_pattern: int
    pattern_period: float  # fraction of the person's height
    lower_style: int
    short_sleeves: bool
    hair_style: int
    bag: int
    bag_side: int  # +1: the person's right
    bag_size: float
    stature: float  # scales the person's height in the frame
    head: float  # proportions as fractions of the person's height
    shoulders: float
    hips: float
    legs: float


@dataclass(frozen=True)
class _CameraStyle:
    background: np.ndarray  # (1.5 H, 1.5 W, 3) texture, cropped at a random offset per image
    gains: np.ndarray  # per-channel colour cast
    brightness: float
    gamma: float
    saturation: float
    view: int
    facing: int  # +1: walks to the right of the image in side views
    scale: float  # person height as a fraction of the frame height
    shift: float  # horizontal offset as a fraction of the frame width
    blur: float  # Gaussian radius as a fraction of the frame height
    noise: float  # standard deviation in [0, 1] units
    occlusion_p: float


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if not is_integer(value):
        raise TypeError(f"generate_synthetic: {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"generate_synthetic: {name} must be {bound}, got {value}")
    return int(value)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """Clothes are often neutral (black, grey, white, navy, beige); the rest take any hue."""
    if rng.random() < 0.4:
        value = rng.uniform(0.06, 0.92)
        return np.clip(value + rng.normal(0.0, 0.03, 3), 0.0, 1.0)
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.35, 0.95), rng.uniform(0.25, 0.95)))


def _denim(rng: np.random.Generator) -> np.ndarray:
    """Half of all trousers are jeans-like blues, which makes lower bodies less telling than upper ones."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0.55, 0.68), rng.uniform(0.2, 0.7), rng.uniform(0.1, 0.6)))


def _sample_appearance(rng: np.random.Generator) -> _Appearance:
    colours = np.zeros((_NUM_LABELS, 3))
    tone = rng.uniform(0.25, 0.95)
    colours[_SKIN] = np.array([0.95, 0.72, 0.58]) * tone + np.array([0.05, 0.03, 0.02])
    hair_value = rng.choice([rng.uniform(0.03, 0.18), rng.uniform(0.2, 0.55), rng.uniform(0.6, 0.85)])
    colours[_HAIR] = np.clip(hair_value * np.array([1.0, 0.85, 0.7]) + rng.normal(0, 0.02, 3), 0, 1)
    colours[_UPPER] = _colour(rng)
    colours[_SLEEVE] = colours[_UPPER]
    colours[_LOWER] = _colour(rng) if rng.random() < 0.5 else _denim(rng)
    colours[_SHOES] = _colour(rng) * rng.uniform(0.4, 1.0)
    colours[_BAG] = _colour(rng)
    colours[_STRAP] = colours[_BAG] * 0.6
    colours[_HAT] = _colour(rng)
    return _Appearance(
        colours=colours,
        upper_alt=_colour(rng),
        upper_pattern=int(rng.choice(4, p=[0.45, 0.25, 0.15, 0.15])),
        pattern_period=rng.uniform(0.025, 0.06),
        lower_style=int(rng.choice(3, p=[0.7, 0.18, 0.12])),
        short_sleeves=bool(rng.random() < 0.4),
        hair_style=int(rng.choice(4, p=[0.5, 0.3, 0.12, 0.08])),
        bag=int(rng.choice(4, p=[0.4, 0.25, 0.2, 0.15])),
        bag_side=int(rng.choice([-1, 1])),
        bag_size=rng.uniform(0.8, 1.25),
        stature=rng.uniform(0.9, 1.05),
        head=rng.uniform(0.11, 0.135),
        shoulders=rng.uniform(0.2, 0.28),
        hips=rng.uniform(0.14, 0.19),
        legs=rng.uniform(0.43, 0.5),
    )


def _sample_camera(seed: int, cam: int, height: int, width: int) -> _CameraStyle:
    from PIL import Image

    rng = np.random.default_rng([seed, _CAMERA, cam])
    tex_h, tex_w = height * 3 // 2, width * 3 // 2
    # Streets and halls are mostly greyish: blend a random colour towards grey.
    wall = 0.3 * _colour(rng) + 0.7 * rng.uniform(0.25, 0.8)
    floor = (0.3 * _colour(rng) + 0.7 * rng.uniform(0.2, 0.7)) * rng.uniform(0.6, 1.0)
    horizon = rng.uniform(0.5, 0.85) * tex_h
    rows = np.arange(tex_h)[:, None, None]
    cols = np.arange(tex_w)[None, :, None]
    texture = np.where(rows < horizon, wall, floor) * np.ones((1, tex_w, 1))
    # Smooth blotches: a coarse random grid upsampled to the texture size.
    coarse = (rng.random((6, 4, 3)) * 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((tex_w, tex_h), Image.Resampling.BICUBIC)) / 255.0 - 0.5
    texture = texture + rng.uniform(0.05, 0.25) * blotches
    period = rng.uniform(0.15, 0.4) * width
    if rng.random() < 0.5:  # columns or windows on the wall
        bars = (cols % period) < period * rng.uniform(0.2, 0.5)
        texture = np.where(bars & (rows < horizon), texture * rng.uniform(0.6, 1.4), texture)
    if rng.random() < 0.5:  # floor tiles
        lines = ((cols % period) < 1.5) | ((rows % (period * 0.6)) < 1.5)
        texture = np.where(lines & (rows >= horizon), texture * 0.7, texture)
    return _CameraStyle(
        background=np.clip(texture, 0.0, 1.0),
        gains=np.clip(rng.normal(1.0, 0.12, 3), 0.7, 1.3),
        brightness=rng.uniform(0.7, 1.2),
        gamma=rng.uniform(0.8, 1.25),
        saturation=rng.uniform(0.6, 1.15),
        view=int(rng.integers(3)),
        facing=int(rng.choice([-1, 1])),
        scale=rng.uniform(0.76, 0.9),
        shift=rng.uniform(-0.08, 0.08),
        blur=rng.uniform(0.0, 0.009),
        noise=rng.uniform(0.005, 0.03),
        occlusion_p=rng.uniform(0.0, 0.35),
    )


class _Renderer:
    """Draws one person crop: a part-label map with Pillow, coloured and degraded with numpy."""

    def __init__(self, seed: int, num_cams: int, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.cameras = [_sample_camera(seed, cam, height, width) for cam in range(num_cams)]
        self.rows = np.arange(height, dtype=np.float32)[:, None]
        self.cols = np.arange(width, dtype=np.float32)[None, :]

    def render(self, spec: _ImageSpec) -> Image.Image:
        from PIL import Image, ImageDraw, ImageFilter

        rng = np.random.default_rng(list(spec.stream))
        look = _sample_appearance(np.random.default_rng(list(spec.appearance_stream)))
        camera = self.cameras[spec.cam]
        h, w = self.height, self.width

        view = camera.view if rng.random() < 0.75 else int(rng.integers(3))
        facing = camera.facing if rng.random() < 0.8 else -camera.facing
        person_h = h * camera.scale * look.stature * rng.uniform(0.94, 1.06)
        cx = w * (0.5 + camera.shift + rng.uniform(-0.06, 0.06))
        feet = h * rng.uniform(0.94, 0.99)
        if spec.junk:  # a bad detection: a zoomed or mostly out-of-frame fragment
            person_h *= rng.uniform(1.4, 2.4)
            cx += rng.choice([-1, 1]) * w * rng.uniform(0.0, 0.6)
            feet = h * rng.uniform(0.9, 1.8)

        labels = Image.new("L", (w, h), _BG)
        draw = ImageDraw.Draw(labels)
        for index in range(int(rng.integers(_MAX_CLUTTER + 1))):
            x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(0.0, 0.9) * h
            draw.rectangle(
                [x0, y0, x0 + rng.uniform(0.1, 0.5) * w, y0 + rng.uniform(0.05, 0.4) * h],
                fill=_CLUTTER + index,
            )
        _draw_person(draw, look, view, facing, cx, feet, person_h, rng.uniform(-1.0, 1.0))
        if rng.random() < camera.occlusion_p:
            _draw_occluder(draw, rng, w, h)
        label_map = np.asarray(labels)

        palette = look.colours.copy()
        palette[_OCCLUDER] = _colour(rng)
        palette[_CLUTTER:] = [_colour(rng) for _ in range(_MAX_CLUTTER)]
        image = palette[label_map]
        person = (label_map > _BG) & (label_map < _OCCLUDER)
        if look.upper_pattern != _PLAIN:  # patterns move with the person: person-relative coordinates
            from_top = (self.rows - (feet - person_h)) / person_h
            cells_down = np.floor(from_top / look.pattern_period)
            if look.upper_pattern == _STRIPES:
                alt = cells_down % 2 == 1
            elif look.upper_pattern == _CHECKS:
                alt = (cells_down + np.floor((self.cols - cx) / (person_h * look.pattern_period))) % 2 == 1
            else:  # a chest band
                alt = (from_top > 0.27) & (from_top < 0.36)
            image[(label_map == _UPPER) & np.broadcast_to(alt, label_map.shape)] = look.upper_alt
        # Round-body shading: darker towards the silhouette's left and right edges.
        across = np.clip(np.abs(self.cols - cx) / (0.2 * person_h), 0.0, 1.0)
        image = np.where(person[..., None], image * (1.0 - 0.3 * across**2)[..., None], image)

        top, left = int(rng.integers(h // 2 + 1)), int(rng.integers(w // 2 + 1))
        background = camera.background[top : top + h, left : left + w] * rng.uniform(0.9, 1.1)
        image = np.where((label_map == _BG)[..., None], background, image)
        image = _light(image, camera, rng)

        picture = Image.fromarray((image * 255.0 + 0.5).astype(np.uint8))
        radius = h * max(camera.blur + rng.normal(0.0, 0.002), 0.0)
        if radius > 0.2:
            picture = picture.filter(ImageFilter.GaussianBlur(radius))
        noisy = np.asarray(picture, dtype=np.float32) + rng.normal(0.0, camera.noise * 255.0, (h, w, 3))
        return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


def _light(image: np.ndarray, camera: _CameraStyle, rng: np.random.Generator) -> np.ndarray:
    """The camera's colour cast, exposure, contrast curve and saturation, with a little per-image drift."""
    gains = camera.gains * camera.brightness * rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, 3)
    image = np.clip(image * gains, 0.0, 1.0) ** camera.gamma
    grey = image.mean(axis=2, keepdims=True)
    return np.clip(grey + camera.saturation * (image - grey), 0.0, 1.0)


def _draw_occluder(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int) -> None:
    """Something between camera and person: a low object, a pole, or a passer-by at the side."""
    kind = rng.integers(3)
    if kind == 0:
        draw.rectangle([-1, h * rng.uniform(0.65, 0.85), w, h], fill=_OCCLUDER)
    elif kind == 1:
        x0 = rng.uniform(0.1, 0.8) * w
        draw.rectangle([x0, -1, x0 + rng.uniform(0.08, 0.2) * w, h], fill=_OCCLUDER)
    else:
        edge = rng.uniform(0.15, 0.35) * w
        box = [-1, h * 0.1, edge, h] if rng.random() < 0.5 else [w - edge, h * 0.1, w, h]
        draw.rectangle(box, fill=_OCCLUDER)


def _draw_person(
    draw: ImageDraw.ImageDraw,
    look: _Appearance,
    view: int,
    facing: int,
    cx: float,
    feet: float,
    ph: float,
    phase: float,
) -> None:
    """Paints the body parts back to front; `ph` is the person's height in pixels, `phase` the gait."""
    top = feet - ph
    head_h = look.head * ph
    head_w = head_h * 0.8
    neck = top + head_h
    shoulder_y = neck + 0.02 * ph
    hip_y = feet - look.legs * ph
    narrow = 0.6 if view == _SIDE else 1.0
    sw, hw = look.shoulders * ph * narrow, look.hips * ph * narrow
    # Mirror the person's right to the image left when they face the camera.
    bag_x = look.bag_side * (1 if view == _BACK else -1) if view != _SIDE else -facing
    bag_w, bag_h = 0.13 * ph * look.bag_size, 0.16 * ph * look.bag_size

    if look.bag == _BACKPACK and view == _SIDE:
        back = cx - facing * sw / 2
        draw.rectangle(
            _sorted_box(back, shoulder_y + 0.02 * ph, back - facing * 0.08 * ph * look.bag_size, hip_y - 0.03 * ph),
            fill=_BAG,
        )
    if look.hair_style == _LONG_HAIR and view != _SIDE:
        draw.rectangle([cx - head_w * 0.55, top + head_h * 0.3, cx + head_w * 0.55, shoulder_y + 0.06 * ph], fill=_HAIR)

    # Legs swing in opposite directions; skirts and shorts show skin below the hem.
    stride = 0.12 * ph * phase
    leg_w = hw * 0.48
    leg_colour = _LOWER if look.lower_style == _TROUSERS else _SKIN
    for side in (-1, 1):
        top_x = cx + side * hw * 0.26
        foot_x = top_x + side * stride * (0.5 if view != _SIDE else facing * side)
        draw.polygon(_leg(top_x, hip_y, foot_x, feet, leg_w, 0.0, 1.0), fill=leg_colour)
        if look.lower_style == _SHORTS:
            draw.polygon(_leg(top_x, hip_y, foot_x, feet, leg_w * 1.15, 0.0, 0.42), fill=_LOWER)
        shoe_dx = facing * 0.05 * ph if view == _SIDE else 0.0
        draw.ellipse(
            _sorted_box(foot_x - leg_w * 0.6, feet - 0.035 * ph, foot_x + leg_w * 0.6 + shoe_dx, feet + 0.005 * ph),
            fill=_SHOES,
        )
    draw.rectangle([cx - hw / 2, hip_y - 0.02 * ph, cx + hw / 2, hip_y + 0.06 * ph], fill=_LOWER)
    if look.lower_style == _SKIRT:
        hem = hip_y + 0.45 * look.legs * ph
        draw.polygon(
            [(cx - hw / 2, hip_y), (cx + hw / 2, hip_y), (cx + hw * 0.8, hem), (cx - hw * 0.8, hem)],
            fill=_LOWER,
        )

    draw.polygon(
        [
            (cx - sw / 2, shoulder_y),
            (cx + sw / 2, shoulder_y),
            (cx + hw / 2, hip_y + 0.03 * ph),
            (cx - hw / 2, hip_y + 0.03 * ph),
        ],
        fill=_UPPER,
    )
    draw.ellipse([cx - sw / 2, shoulder_y - 0.015 * ph, cx + sw / 2, shoulder_y + 0.05 * ph], fill=_UPPER)
    draw.rectangle([cx - head_w * 0.22, neck - 0.01 * ph, cx + head_w * 0.22, shoulder_y + 0.01 * ph], fill=_SKIN)
    if look.bag == _BACKPACK and view == _BACK:
        draw.rectangle([cx - sw * 0.36, shoulder_y + 0.02 * ph, cx + sw * 0.36, hip_y - 0.02 * ph], fill=_BAG)
    elif look.bag == _BACKPACK and view == _FRONT:
        for side in (-1, 1):
            x = cx + side * sw * 0.3
            draw.line([(x, shoulder_y), (x, shoulder_y + 0.2 * ph)], fill=_STRAP, width=max(1, round(0.012 * ph)))
    elif look.bag == _SHOULDER_BAG:
        draw.line(
            [(cx - bag_x * sw * 0.4, shoulder_y), (cx + bag_x * hw * 0.6, hip_y)],
            fill=_STRAP,
            width=max(1, round(0.01 * ph)),
        )

    # Arms swing against the legs; short sleeves show the forearm.
    arm_w = 0.055 * ph
    arm_len = 0.38 * ph
    arm_sides = (-1, 1) if view != _SIDE else (facing,)
    for side in arm_sides:
        shoulder_x = cx + side * (sw / 2 - arm_w * 0.35) if view != _SIDE else cx
        hand_x = shoulder_x + (-side * stride * 0.6 if view != _SIDE else -stride * 0.8) + side * 0.02 * ph
        hand_y = shoulder_y + arm_len
        draw.polygon(_leg(shoulder_x, shoulder_y, hand_x, hand_y, arm_w, 0.0, 1.0), fill=_SKIN)
        sleeve_end = 0.4 if look.short_sleeves else 0.92
        draw.polygon(_leg(shoulder_x, shoulder_y, hand_x, hand_y, arm_w * 1.1, 0.0, sleeve_end), fill=_SLEEVE)
        draw.ellipse(
            [hand_x - arm_w * 0.45, hand_y - arm_w * 0.3, hand_x + arm_w * 0.45, hand_y + arm_w * 0.6],
            fill=_SKIN,
        )
        if look.bag == _HANDBAG and side == (bag_x if view != _SIDE else facing):
            draw.rectangle([hand_x - bag_w / 2, hand_y + arm_w * 0.3, hand_x + bag_w / 2, hand_y + bag_h], fill=_BAG)
    if look.bag == _SHOULDER_BAG:
        x = cx + bag_x * (hw * 0.6 if view != _SIDE else 0.0)
        draw.rectangle([x - bag_w / 2, hip_y - 0.05 * ph, x + bag_w / 2, hip_y - 0.05 * ph + bag_h * 0.8], fill=_BAG)

    # Head: from behind the hair covers it; a cap sits on top.
    head_box = [cx - head_w / 2, top, cx + head_w / 2, neck]
    draw.ellipse(head_box, fill=_HAIR if view == _BACK and look.hair_style != _BALD else _SKIN)
    if look.hair_style in (_SHORT_HAIR, _LONG_HAIR) and view != _BACK:
        hair_w = head_w * (1.0 if view == _FRONT else 0.9)
        offset = 0.0 if view == _FRONT else -facing * head_w * 0.1
        draw.chord(
            [cx + offset - hair_w / 2, top - 0.005 * ph, cx + offset + hair_w / 2, top + head_h * 0.8],
            180,
            360,
            fill=_HAIR,
        )
    if look.hair_style == _CAP:
        draw.chord(
            [cx - head_w * 0.56, top - 0.01 * ph, cx + head_w * 0.56, top + head_h * 0.75],
            180,
            360,
            fill=_HAT,
        )
        if view == _SIDE:
            draw.rectangle(
                _sorted_box(cx, top + head_h * 0.3, cx + facing * head_w * 0.8, top + head_h * 0.4), fill=_HAT
            )


def _sorted_box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Pillow wants boxes as (left, top, right, bottom); mirrored drawings give them in either order."""
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


def _leg(x0: float, y0: float, x1: float, y1: float, width: float, t0: float, t1: float) -> list[tuple[float, float]]:
    """The quad of a limb from (x0, y0) to (x1, y1) between fractions t0 and t1 of its length."""
    xa, ya = x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0
    xb, yb = x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1
    half = width / 2
    return [(xa - half, ya), (xa + half, ya), (xb + half * 0.8, yb), (xb - half * 0.8, yb)]


def _plan(seed: int, num_ids: int, num_cams: int, images_per_id_cam: int) -> list[_ImageSpec]:
    """Market-style splits: the first ceil(num_ids / 2) identities train, the rest are queried.

    A test identity gives each camera one query and images_per_id_cam - 1 gallery images, so every query
    has true matches in the other cameras. Distractors (pid 0000, unseen people) and junk (pid -1, bad
    crops) are added to the gallery: DISTRACTOR_SHARE and JUNK_SHARE of its size, at least one of each.
    """
    num_train = math.ceil(num_ids / 2)
    specs = []
    for pid in range(1, num_ids + 1):
        for cam in range(num_cams):
            for k in range(images_per_id_cam):
                split = TRAIN_DIR if pid <= num_train else (QUERY_DIR if k == 0 else GALLERY_DIR)
                name = f"{pid:04d}_c{cam + 1}s1_{100 * pid + k:06d}_01.jpg"
                specs.append(_ImageSpec(split, name, (seed, _IMAGE, pid, cam, k), (seed, _IDENTITY, pid), cam))
    gallery_size = (num_ids - num_train) * num_cams * (images_per_id_cam - 1)
    for i in range(max(1, round(DISTRACTOR_SHARE * gallery_size))):
        cam = i % num_cams
        name = f"0000_c{cam + 1}s1_{i:06d}_01.jpg"
        specs.append(_ImageSpec(GALLERY_DIR, name, (seed, _DISTRACTOR_IMAGE, i), (seed, _DISTRACTOR, i), cam))
    for i in range(max(1, round(JUNK_SHARE * gallery_size))):
        cam = i % num_cams
        name = f"-1_c{cam + 1}s1_{i:06d}_01.jpg"
        specs.append(_ImageSpec(GALLERY_DIR, name, (seed, _JUNK, i, 0), (seed, _JUNK, i, 1), cam, junk=True))
    return specs


def _folder_name(params: dict[str, int]) -> str:
    text = json.dumps({"generator_version": GENERATOR_VERSION, **params}, sort_keys=True)
    return f"market-like-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _set_aside(folder: Path) -> None:
    """Moves an incomplete tree out of the way in one atomic step, then deletes it."""
    trash = folder.with_name(f"{folder.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        folder.rename(trash)
    except FileNotFoundError:  # another process moved it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def generate_synthetic(
    root: str | Path,
    *,
    num_ids: int = 100,
    num_cams: int = 4,
    images_per_id_cam: int = 4,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
) -> Path:
    """Writes (once) and returns the folder that contains the generated Market-1501-v15.09.15 tree.

    The tree is drawn into a private temporary sibling and renamed into place when complete, so
    concurrent callers (e.g. DDP ranks) never see half a dataset; a loser of the race keeps the winner's.
    A marker-less tree at the target is replaced; `.tmp-` siblings of killed runs are left alone, since
    another process may still be writing them.
    """
    params = {
        "num_ids": _check_int("num_ids", num_ids, 2, MAX_IDS),
        "num_cams": _check_int("num_cams", num_cams, 2, MAX_CAMS),
        "images_per_id_cam": _check_int("images_per_id_cam", images_per_id_cam, 2, MAX_IMAGES_PER_ID_CAM),
        "height": _check_int("height", height, MIN_SIZE),
        "width": _check_int("width", width, MIN_SIZE),
        "seed": _check_int("seed", seed, 0),
    }
    root = Path(root).expanduser()
    target = root / _folder_name(params)
    if _is_complete(target):
        return target

    from tqdm import tqdm

    specs = _plan(params["seed"], params["num_ids"], params["num_cams"], params["images_per_id_cam"])
    log.info("generating %d synthetic images (%s) into %s", len(specs), params, target)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        market = staging / MARKET_DIR
        for split in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
            (market / split).mkdir(parents=True)
        renderer = _Renderer(params["seed"], params["num_cams"], params["height"], params["width"])
        for spec in tqdm(specs, desc="generating images", unit="img", leave=False):
            renderer.render(spec).save(market / spec.split / spec.filename, quality=JPEG_QUALITY)
        (staging / COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        if target.exists() and not _is_complete(target):
            _set_aside(target)
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
