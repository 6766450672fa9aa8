"""The image formats agw_light reads, stated once, and the one way it opens an image file.

Pillow decodes dozens of formats (TIFF, GIF, ICO, EPS through Ghostscript, ...), and each is a parser exposed
to whatever file a dataset, a folder or an upload hands us. Only the formats below are ever tried: uploads
and thumbnails in the service, the Encoder, the datasets' loaders and image check, and the folder listers
(by suffix: `list_image_files` here, the identity-folder layout) all go through `open_rgb` and
`IMAGE_SUFFIXES`. Any other file is "not a readable image".

`open_rgb` can also bound the pixels it decodes (`max_pixels`, checked on the header, before any pixel is
decoded) and decode a JPEG at a reduced scale (`draft_size`: Pillow's draft mode decodes 1/2, 1/4 or 1/8 of
each side when that still covers the size asked for), so an upload cannot make the process decode a picture
far larger than the model needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    ImageSource = str | Path | IO[bytes] | Image.Image

# Pillow format name -> the file suffixes (lower case) that name it. The allow-list, stated only here.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "BMP": (".bmp",),
    "WEBP": (".webp",),
}
IMAGE_SUFFIXES: tuple[str, ...] = tuple(suffix for suffixes in IMAGE_FORMATS.values() for suffix in suffixes)
FORMATS_TEXT = ", ".join(IMAGE_FORMATS)


def list_image_files(location: str | os.PathLike[str]) -> list[Path]:
    """The image files at `location`: a file as itself, a folder as every file below it (recursively) whose
    suffix is one of `IMAGE_SUFFIXES` in any case, sorted so that outputs come in a reproducible order.

    Names starting with "." are skipped below a folder, as the identity-folder layout does: hidden folders
    (.git, .thumbnails) and the "._name.jpg" resource forks macOS leaves on shared drives are not images.
    A single file is returned whatever its suffix: opening it (`open_rgb`) decides whether it is an image.

    Args:
        location: an image file or a folder of them.

    Raises:
        FileNotFoundError: `location` is neither a file nor a folder.
        ValueError: the folder holds no image file.
    """
    path = Path(location).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such image file or folder")
    images = sorted(
        found
        for found in path.rglob("*")
        if found.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in found.relative_to(path).parts)
        and found.is_file()
    )
    if not images:
        raise ValueError(f"{path}: no images found (expected files ending in {list(IMAGE_SUFFIXES)}, any case)")
    return images


class ImageTooLarge(OSError):
    """An image whose header declares more pixels than the caller accepts (refused before decoding)."""

    def __init__(self, message: str, width: int, height: int) -> None:
        super().__init__(message)
        self.width = width
        self.height = height


def open_rgb(
    source: ImageSource, *, max_pixels: int | None = None, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """`source` (a path, a binary file object or a PIL image) as a decoded RGB PIL image.

    Args:
        source: the image; a PIL image is only converted, a file must be one of `IMAGE_FORMATS`.
        max_pixels: refuse (ImageTooLarge) an image that would decode to more pixels than this.
        draft_size: (height, width) the caller needs at least: a JPEG is decoded at the smallest reduced
            scale that still covers it (the pixel bound then applies to the reduced size).

    Raises:
        OSError naming the file: missing, truncated, not one of the allowed formats, or (ImageTooLarge) too
        many pixels.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = source if isinstance(source, str | Path) else getattr(source, "name", "in-memory data")
    try:
        with Image.open(source, formats=list(IMAGE_FORMATS)) as image:
            if draft_size is not None:
                image.draft("RGB", (int(draft_size[1]), int(draft_size[0])))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"image {str(name)!r} is {width}x{height} pixels, more than the limit of {max_pixels} pixels",
                    width,
                    height,
                )
            return image.convert("RGB")
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"image {str(name)!r}: {error}", 0, 0) from error
    except Image.UnidentifiedImageError as error:
        raise OSError(
            f"cannot read image file {str(name)!r}: not an image of the formats read ({FORMATS_TEXT})"
        ) from error
    except (OSError, AttributeError, TypeError, ValueError, SyntaxError) as error:  # missing, truncated, not a path
        raise OSError(f"cannot read image file {str(name)!r}: {error}") from error
