"""The gallery search service (`agw_light.service`) on a tiny generated gallery, through FastAPI's TestClient."""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the deploy extra: pip install -e '.[deploy]'")
from fastapi.testclient import TestClient  # noqa: E402

from agw_light.cli.search import main as search_main  # noqa: E402
from agw_light.cli.serve import main as serve_main  # noqa: E402
from agw_light.data.datasets import verify_images  # noqa: E402
from agw_light.data.synthetic import generate_synthetic  # noqa: E402
from agw_light.files import file_sha256  # noqa: E402
from agw_light.images import IMAGE_FORMATS, IMAGE_SUFFIXES, open_rgb  # noqa: E402
from agw_light.inference.checkpoint import load_checkpoint  # noqa: E402
from agw_light.lit.module import LitReID  # noqa: E402
from agw_light.search import load_index  # noqa: E402
from agw_light.search.metadata import GalleryMetadata  # noqa: E402
from agw_light.service.app import create_app  # noqa: E402
from agw_light.service.gallery import GallerySearch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOSSES = [{"name": "ce", "type": "cross_entropy", "output": "logits"}]
FLOAT_MODEL = {"backbone": "resnet18", "pretrained": "none"}
MAX_UPLOAD = 50_000


def save_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    module = LitReID(model=FLOAT_MODEL, losses=LOSSES, num_classes=3, image_size=(32, 16))
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def build_tiny_index(folder: Path) -> tuple[Path, Path, Path]:
    """(gallery folder, checkpoint, index folder): a generated 32x16 gallery indexed with `search build`."""
    root = generate_synthetic(folder, num_ids=6, num_cams=2, images_per_id_cam=2, height=32, width=16, seed=5)
    gallery = (root / "Market-1501-v15.09.15" / "bounding_box_test").resolve()
    ckpt = save_checkpoint(folder / "model.ckpt")
    search_main(["build", f"ckpt={ckpt}", f"gallery={gallery}", f"out={folder / 'index'}", "device=cpu"])
    return gallery, ckpt, folder / "index"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    return build_tiny_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def gallery(built) -> GallerySearch:
    return GallerySearch.open(built[2], device="cpu", backend="torch")


@pytest.fixture(scope="module")
def client(gallery):
    with TestClient(create_app(gallery, max_upload_bytes=MAX_UPLOAD, max_k=20)) as test_client:
        yield test_client


def post_image(client, data: bytes, name: str = "query.png", **params):
    return client.post("/search", params=params, files={"image": (name, data, "application/octet-stream")})


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference_features(ckpt: Path, image_paths: list[Path]) -> np.ndarray:
    """The model's eval outputs for the images, preprocessed by hand (resize, scale, ImageNet normalisation)
    instead of through agw_light's encoder."""
    network = load_checkpoint(ckpt).network
    batch = []
    for path in image_paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((16, 32), Image.BILINEAR), dtype=np.float32) / 255
        pixels = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        batch.append(pixels.transpose(2, 0, 1).astype(np.float32))
    with torch.no_grad():
        return network(torch.from_numpy(np.stack(batch))).double().numpy()


def reference_ranking(built, query: Path) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine distances of the query to every stored gallery feature, nearest first with ties in
    gallery order."""
    _, ckpt, index_dir = built
    query_feature = reference_features(ckpt, [query])[0]
    query_feature /= np.linalg.norm(query_feature)
    stored = load_index(index_dir).arrays()["features"].astype(np.float64)
    distances = 1.0 - stored @ query_feature
    order = np.argsort(distances, kind="stable")
    return distances[order], order


def test_top_k_equals_a_brute_force_ranking_with_the_items_labels(built, client, gallery):
    gallery_folder = built[0]
    images = sorted(gallery_folder.glob("*.jpg"))
    query = images[3]
    response = post_image(client, query.read_bytes(), name=query.name, k=5)
    assert response.status_code == 200, response.text
    answer = response.json()
    distances, order = reference_ranking(built, query)
    results = answer["results"]
    assert [hit["position"] for hit in results] == order[:5].tolist()
    np.testing.assert_allclose([hit["distance"] for hit in results], distances[:5], atol=1e-5)
    assert [hit["rank"] for hit in results] == [1, 2, 3, 4, 5]
    assert results[0]["name"] == query.name and results[0]["distance"] == pytest.approx(0, abs=1e-5)
    metadata = gallery.index.metadata
    for hit in results:
        assert (hit["pid"], hit["camera"]) == (metadata.pids[hit["position"]], metadata.camids[hit["position"]])
        assert hit["name"] == Path(metadata.paths[hit["position"]]).name
        assert hit["thumbnail"] == f"/gallery/{hit['position']}/thumbnail"
    assert answer["distance"] == "cosine" and answer["k"] == 5


def test_max_distance_drops_the_farther_items(built, client):
    query = sorted((built[0].parent / "query").glob("*.jpg"))[0]  # not in the gallery: no distance is 0
    distances, order = reference_ranking(built, query)
    assert distances[0] > 1e-3
    threshold = float((distances[2] + distances[3]) / 2)  # between the third and fourth nearest
    response = post_image(client, query.read_bytes(), k=10, max_distance=threshold)
    assert [hit["position"] for hit in response.json()["results"]] == order[:3].tolist()
    nothing = post_image(client, query.read_bytes(), k=10, max_distance=float(distances[0]) / 2)
    assert nothing.status_code == 200 and nothing.json()["results"] == []


def test_health_reports_the_index_and_its_checkpoint(built, client):
    _, ckpt, index_dir = built
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "size": len(list(built[0].glob("*.jpg"))),
        "dimension": 512,
        "index_kind": "float",
        "backend": "in_process",
        "writable": False,
        "distance": "cosine",
        "checkpoint_sha256": file_sha256(ckpt),
        "image_size": [32, 16],
        "has_metadata": True,
    }


def test_the_page_is_served_with_its_upload_form(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'id="query-file"' in response.text and "fetch(`search?" in response.text


def test_thumbnails_come_from_the_gallery_list_by_position(built, client, gallery):
    for position in (0, gallery.index.ntotal - 1):
        response = client.get(f"/gallery/{position}/thumbnail")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float64)
        original = np.asarray(Image.open(gallery.index.metadata.paths[position]).convert("RGB"), dtype=np.float64)
        assert served.shape == original.shape  # 32x16 fits the 128x64 box: never enlarged
        assert np.abs(served - original).mean() < 8  # the same picture, re-encoded as JPEG
    for position in (gallery.index.ntotal, 10**12):
        response = client.get(f"/gallery/{position}/thumbnail")
        assert response.status_code == 404 and "no gallery item" in response.json()["detail"]
    assert client.get("/gallery/-1/thumbnail").status_code == 404


def test_no_path_outside_the_gallery_list_is_ever_served(built, client, tmp_path):
    gallery_folder = built[0]
    secret = gallery_folder.parent / "secret.txt"
    secret.write_text("top secret")
    attempts = [
        "/gallery/../secret.txt/thumbnail",
        "/gallery/..%2Fsecret.txt/thumbnail",
        "/gallery/%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumbnail",
        f"/gallery/{secret}/thumbnail",
        f"/gallery/{str(secret).replace('/', '%2F')}/thumbnail",
        "/gallery/0/../../secret.txt",
        "/gallery/0%2F..%2F..%2Fsecret.txt/thumbnail",
        "/gallery/0x1/thumbnail",
        "/gallery/1.0/thumbnail",
        "/../../../etc/passwd",
        "/static/../../etc/passwd",
    ]
    for url in attempts:
        response = client.get(url)
        assert response.status_code in (404, 405, 422), (url, response.status_code)
        assert b"top secret" not in response.content and b"root:" not in response.content


def test_bad_uploads_get_a_4xx_that_says_why(client):
    image = png_bytes(Image.new("RGB", (16, 32), (120, 30, 200)))
    cases = [
        (post_image(client, b""), 400, "empty"),
        (post_image(client, b"this is not an image at all"), 415, "not a readable image"),
        (post_image(client, image[: len(image) // 2]), 415, "not a readable image"),
        (post_image(client, b"\x89PNG" + bytes(MAX_UPLOAD)), 413, f"limit of {MAX_UPLOAD} bytes"),
        (post_image(client, bytes(4 * MAX_UPLOAD)), 413, f"limit of {MAX_UPLOAD} bytes"),  # refused unread
        (client.post("/search"), 422, "image"),
        (post_image(client, image, k=0), 422, "k"),
        (post_image(client, image, k=21), 422, "k"),
        (post_image(client, image, max_distance=-1), 422, "max_distance"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (status, response.text)
        assert message in json.dumps(response.json()["detail"])
    assert "query.png" in post_image(client, b"").json()["detail"]  # the error names the upload
    assert "BytesIO" not in post_image(client, b"GIF89a junk").json()["detail"]  # no server internals


def test_a_decompression_bomb_is_refused(client):
    huge = Image.new("1", (8000, 8000))  # 64 megapixels in a few kilobytes of PNG
    response = post_image(client, png_bytes(huge))
    assert response.status_code == 413 and "pixels" in response.json()["detail"]


def test_concurrent_queries_get_the_answers_of_sequential_ones(built, client):
    images = sorted(built[0].glob("*.jpg"))[:8]
    expected = [post_image(client, path.read_bytes(), k=4).json() for path in images]
    answers: list = [None] * len(images)
    start = threading.Barrier(len(images))

    def ask(slot: int) -> None:
        start.wait()
        answers[slot] = post_image(client, images[slot].read_bytes(), k=4).json()

    threads = [threading.Thread(target=ask, args=(slot,)) for slot in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == expected


def copied_index(built, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the index whose record names a copy of the checkpoint, which a test may change."""
    _, ckpt, index_dir = built
    shutil.copytree(index_dir, tmp_path / "index")
    shutil.copy(ckpt, tmp_path / "model.ckpt")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    manifest["record"]["checkpoint"] = str(tmp_path / "model.ckpt")
    (tmp_path / "index" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "index", tmp_path / "model.ckpt"


def test_a_changed_or_missing_checkpoint_is_refused_naming_it(built, tmp_path):
    index_dir, ckpt = copied_index(built, tmp_path)
    assert GallerySearch.open(index_dir, device="cpu", backend="torch").index.ntotal > 0
    recorded = file_sha256(ckpt)
    save_checkpoint(ckpt, seed=1)
    with pytest.raises(ValueError, match=rf"checkpoint {ckpt}: SHA-256 {file_sha256(ckpt)}.*SHA-256 {recorded}"):
        GallerySearch.open(index_dir, device="cpu", backend="torch")
    ckpt.unlink()
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {ckpt}: not found"):
        GallerySearch.open(index_dir, device="cpu", backend="torch")
    manifest = json.loads((index_dir / "manifest.json").read_text())
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, "record": None}))
    with pytest.raises(ValueError, match="records no checkpoint"):
        GallerySearch.open(index_dir, device="cpu", backend="torch")


def test_the_command_refuses_a_missing_checkpoint_before_serving(built, tmp_path):
    index_dir, ckpt = copied_index(built, tmp_path)
    ckpt.unlink()
    run = subprocess.run(
        [sys.executable, "-m", "agw_light.serve", f"index={index_dir}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode != 0 and f"checkpoint {ckpt}: not found" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_slow_query_does_not_hold_up_other_requests(built, gallery):
    """Embedding runs in the server's thread pool: /health answers while a query is being embedded."""
    started, release = threading.Event(), threading.Event()
    real_encoder = gallery.encoder

    class SlowEncoder:
        distance, image_size = real_encoder.distance, real_encoder.image_size

        def encode(self, images):
            started.set()
            release.wait(timeout=30)
            return real_encoder.encode(images)

    slow = GallerySearch(gallery.index, SlowEncoder(), index_dir=gallery.index_dir)
    with TestClient(create_app(slow)) as slow_client:
        query = sorted(built[0].glob("*.jpg"))[0]
        answer: list = []
        worker = threading.Thread(target=lambda: answer.append(post_image(slow_client, query.read_bytes(), k=1)))
        worker.start()
        assert started.wait(timeout=30)
        before = time.monotonic()
        assert slow_client.get("/health").status_code == 200
        assert time.monotonic() - before < 10 and not release.is_set()  # answered while the query still waits
        release.set()
        worker.join(timeout=30)
    assert answer[0].json()["results"][0]["name"] == query.name


def test_a_hamming_index_answers_with_integer_distances(built, tmp_path):
    """A hash-head model's index (exact Hamming): distances are bit counts, checked against a brute force."""
    gallery_folder = built[0]
    torch.manual_seed(0)
    hash_model = {**FLOAT_MODEL, "neck": "hash", "code_lengths": [64]}
    module = LitReID(model=hash_model, losses=LOSSES, num_classes=3, image_size=(32, 16))
    ckpt = tmp_path / "hash.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    search_main(["build", f"ckpt={ckpt}", f"gallery={gallery_folder}", f"out={tmp_path / 'hash'}", "device=cpu"])
    query = sorted((gallery_folder.parent / "query").glob("*.jpg"))[0]
    with TestClient(create_app(GallerySearch.open(tmp_path / "hash", device="cpu", backend="torch"))) as client:
        assert client.get("/health").json()["index_kind"] == "hamming"
        results = post_image(client, query.read_bytes(), k=4).json()["results"]
    bits = reference_features(ckpt, [query, *sorted(gallery_folder.glob("*.jpg"))]) > 0
    distances = (bits[1:] != bits[0]).sum(axis=1)
    order = np.argsort(distances, kind="stable")[:4]
    assert [hit["position"] for hit in results] == order.tolist()
    assert [hit["distance"] for hit in results] == distances[order].tolist()


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height one-bit pixels, with a few bytes of data: what a
    decompression bomb looks like to a reader that trusts the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_only_the_allowed_formats_are_decoded_by_uploads_the_encoder_and_the_datasets(client, tmp_path):
    """One allow-list (agw_light.images.IMAGE_FORMATS): a TIFF, GIF or ICO is refused by the upload, by the
    opener the Encoder and the ranked-list pictures use, and by the datasets' image check; the allowed
    formats pass all three."""
    picture = Image.new("RGB", (16, 32), (200, 90, 10))
    assert set(IMAGE_FORMATS) == {"JPEG", "PNG", "BMP", "WEBP"} and ".tif" not in IMAGE_SUFFIXES
    for name in ("TIFF", "GIF", "ICO", *IMAGE_FORMATS):
        buffer = io.BytesIO()
        picture.save(buffer, format=name)
        path = tmp_path / f"picture.{name.lower()}"
        path.write_bytes(buffer.getvalue())
        response = post_image(client, buffer.getvalue(), name=path.name)
        if name in IMAGE_FORMATS:
            assert response.status_code == 200, (name, response.text)
            assert open_rgb(path).size == (16, 32)
            verify_images([str(path)])
            continue
        assert response.status_code == 415 and "expected JPEG, PNG, BMP, WEBP" in response.json()["detail"], name
        with pytest.raises(OSError, match=rf"{path}.*not an image of the formats read \(JPEG, PNG, BMP, WEBP\)"):
            open_rgb(path)
        with pytest.raises(
            OSError, match=rf"1 of 1 images cannot be read .*\n  {path}: not an image of the formats read"
        ):
            verify_images([str(path)])


def test_a_declared_pixel_bomb_is_refused_as_upload_and_as_thumbnail(built, client, gallery, tmp_path):
    """Refused on the header, never decoded: an upload with 413 naming the limit, a gallery item's
    thumbnail with 404 (it was a 500), whatever the declared size (over Pillow's own bomb limit too)."""
    for width, height in ((2000, 1000), (20_000, 20_000)):
        response = post_image(client, declared_png(width, height))
        assert response.status_code == 413, response.text
        assert "limit of 1000000 pixels (max_image_pixels)" in response.json()["detail"]
    metadata = gallery.index.metadata
    paths = list(metadata.paths)
    for position, size in ((0, (2000, 1000)), (1, (20_000, 20_000))):
        paths[position] = str(tmp_path / f"bomb{position}.png")
        Path(paths[position]).write_bytes(declared_png(*size))
    index = load_index(built[2])
    index.metadata = GalleryMetadata(paths, metadata.pids, metadata.camids)
    bombed = GallerySearch(index, gallery.encoder, index_dir=gallery.index_dir)
    with TestClient(create_app(bombed)) as bombed_client:
        for position in (0, 1):
            response = bombed_client.get(f"/gallery/{position}/thumbnail")
            assert response.status_code == 404 and "cannot be shown (ImageTooLarge)" in response.json()["detail"]
        assert bombed_client.get("/gallery/2/thumbnail").status_code == 200


def test_faiss_padding_is_no_hit(gallery):
    """A result shorter than k comes back from faiss padded with position -1: the service returns no hit
    for it (it used to name the last gallery item)."""

    class PaddedIndex:
        metadata = gallery.index.metadata
        backend = "in_process"
        items = gallery.index.items

        def search(self, features, k):
            return np.array([[0.1, 0.2, np.inf, np.inf]]), np.array([[3, 0, -1, -1]])

    padded = GallerySearch(PaddedIndex(), gallery.encoder, index_dir=gallery.index_dir)
    hits = padded.search(Image.new("RGB", (16, 32)), 4)
    metadata = gallery.index.metadata
    assert [(hit.rank, hit.position, hit.distance) for hit in hits] == [(1, 3, 0.1), (2, 0, 0.2)]
    assert hits[0].name == Path(metadata.paths[3]).name and hits[1].name == Path(metadata.paths[0]).name


def serve_error(index_dir: Path, tmp_path: Path, monkeypatch) -> str:
    """What `python -m agw_light.serve index=<index_dir>` exits with (run in this process)."""
    argv = ["serve", f"index={index_dir}", "encoder_backend=torch", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        serve_main()
    return str(exited.value.code)


def test_a_malformed_manifest_or_image_size_ends_serve_with_its_one_line_reason(built, tmp_path, monkeypatch):
    index_dir, ckpt = copied_index(built, tmp_path)
    manifest_path = index_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    cases = {
        "'files' must map each array name": {**manifest, "files": list(manifest["files"])},
        r"image_size \[-32, 16\] is not \[height, width\]": {
            **manifest,
            "record": {**manifest["record"], "image_size": [-32, 16]},
        },
    }
    for message, payload in cases.items():
        manifest_path.write_text(json.dumps(payload))
        error = serve_error(index_dir, tmp_path, monkeypatch)
        assert error.startswith("serve: ") and re.search(message, error), error
    manifest_path.write_text("[" * 100_000)
    assert "nested too deeply" in serve_error(index_dir, tmp_path, monkeypatch)


def test_an_index_built_at_another_image_size_is_served_at_its_size_with_a_warning(built, tmp_path, caplog):
    """`search build height= width=` embeds the gallery at another size than the checkpoint's: queries follow the
    index (as its gallery was embedded), and the mismatch is said at start."""
    index_dir, _ = copied_index(built, tmp_path)
    manifest_path = index_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["record"]["image_size"] = [64, 32]
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="agw_light.service.gallery"):
        search = GallerySearch.open(index_dir, device="cpu", backend="torch")
    assert search.encoder.image_size == (64, 32)
    assert re.search(r"records image size \[64, 32\] .* was trained at \[32, 16\]", caplog.text)
