"""Encoder inputs and outputs: a single image file, a folder (the one list of image suffixes, shared with the
datasets), a list of paths, the paths returned with the features, and L2-normalised features.

Untrained ResNet-18s at 32 x 16 on tiny random images: seconds in all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agw_light.data.layouts import scan_identity_folders
from agw_light.data.transforms import Preprocessing
from agw_light.images import IMAGE_FORMATS, IMAGE_SUFFIXES
from agw_light.inference import Encoder, list_image_files
from agw_light.models import build_model

FORMAT_OF_SUFFIX = {suffix: name for name, suffixes in IMAGE_FORMATS.items() for suffix in suffixes}


def tiny_encoder(**model: object) -> Encoder:
    torch.manual_seed(0)
    network = build_model("resnet18", num_classes=2, **model)
    return Encoder.from_network(network, preprocessing=Preprocessing((32, 16)), device="cpu", backend="torch")


def save_random_image(path: Path, seed: int, image_format: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=image_format)
    return path


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return tiny_encoder()


@pytest.fixture
def gallery(tmp_path) -> tuple[Path, list[Path]]:
    """(root, the visible image files of root/gallery in listing order): an image_folders dataset whose gallery
    holds every allowed suffix in lower and upper case, plus files no lister may take."""
    root = tmp_path / "people"
    images = []
    for index, suffix in enumerate(IMAGE_SUFFIXES):
        image_format = FORMAT_OF_SUFFIX[suffix]
        images.append(save_random_image(root / "gallery" / "0001" / f"lower{suffix}", 2 * index, image_format))
        images.append(
            save_random_image(root / "gallery" / "0001" / f"UPPER{suffix.upper()}", 2 * index + 1, image_format)
        )
    images.append(save_random_image(root / "gallery" / "0002" / "a.png", 100))
    save_random_image(root / "gallery" / "0001" / "animation.gif", 101, "GIF")  # a format we never read
    save_random_image(root / "gallery" / "0001" / ".hidden.png", 102)  # e.g. macOS "._name" resource forks
    (root / "gallery" / "0001" / "notes.txt").write_text("not an image")
    for split in ("train", "query"):
        save_random_image(root / split / "0001" / "a.jpg", 103, "JPEG")
    # Listing order by hand: identity folder 0001 before 0002, names in code-point order (upper case first).
    by_hand = [f"UPPER{suffix.upper()}" for suffix in IMAGE_SUFFIXES] + [f"lower{suffix}" for suffix in IMAGE_SUFFIXES]
    expected = [root / "gallery" / "0001" / name for name in sorted(by_hand)] + [root / "gallery" / "0002" / "a.png"]
    assert sorted(images) == expected
    return root, expected


def test_folders_list_the_suffixes_the_datasets_accept(gallery):
    root, expected = gallery
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp"} <= set(IMAGE_SUFFIXES)
    assert list_image_files(root / "gallery") == expected
    assert [Path(path) for path, _, _ in scan_identity_folders(root)["gallery"]] == expected
    assert list_image_files(str(expected[0])) == [expected[0]]  # a single file is itself
    with pytest.raises(FileNotFoundError, match="missing.png: no such image file or folder"):
        list_image_files(root / "missing.png")
    (root / "empty" / ".cache").mkdir(parents=True)
    save_random_image(root / "empty" / ".cache" / "thumbnail.png", 104)  # inside a hidden folder: skipped
    with pytest.raises(ValueError, match="empty: no images found"):
        list_image_files(root / "empty")


def test_encode_takes_a_file_a_folder_or_paths_and_encode_files_returns_the_paths(encoder, gallery):
    root, expected = gallery
    with Image.open(expected[3]) as image:
        by_image = encoder.encode([image.copy()])
    single = encoder.encode(str(expected[3]))  # a path as a string: the file, not a folder
    torch.testing.assert_close(single, by_image)
    assert encoder.encode(expected[3]).shape == (1, 512)

    paths, features = encoder.encode_files(root / "gallery", batch_size=4)
    assert paths == expected and features.shape == (len(expected), 512)
    torch.testing.assert_close(features[3:4], single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.encode(root / "gallery"), features, atol=1e-5, rtol=1e-5)

    reordered = [str(expected[5]), expected[0], expected[3]]
    result = encoder.encode_files(reordered)
    assert result.paths == [expected[5], expected[0], expected[3]]
    torch.testing.assert_close(result.features, features[[5, 0, 3]], atol=1e-5, rtol=1e-5)
    assert encoder.encode_files(expected[3]).paths == [expected[3]]

    with pytest.raises(TypeError, match=r"encode_files\(\) takes image paths, not \['Image'\]"):
        encoder.encode_files([Image.new("RGB", (12, 24))])


def test_normalized_features_are_unit_rows_of_the_same_direction(encoder, gallery):
    root, _ = gallery
    features = encoder.encode(root / "gallery")
    normalized = encoder.encode(root / "gallery", normalize=True)
    raw = features.double().numpy()
    by_hand = raw / np.sqrt((raw**2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(normalized.numpy(), by_hand, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(normalized.double().numpy(), axis=1), 1.0, atol=1e-6)
    assert normalized.dtype == torch.float32
    _, from_files = encoder.encode_files(root / "gallery", normalize=True)
    torch.testing.assert_close(from_files, normalized)


def test_normalizing_hash_codes_is_refused(gallery):
    root, expected = gallery
    hashing = tiny_encoder(neck="hash", code_lengths=[16])
    assert hashing.encode(expected[0]).shape == (1, 16)
    with pytest.raises(ValueError, match=r"normalize=True: .*hash codes \(code_lengths=\[16\]\).*Hamming"):
        hashing.encode(expected[0], normalize=True)
    with pytest.raises(ValueError, match="normalize=True"):
        hashing.encode_files(root / "gallery", normalize=True)
