"""Galleries on Milvus through the commands and the service: `search build|query|add|delete backend=milvus` and
`serve` on a collection, against the in-process index of the same gallery and hand-filtered references.

One Milvus Lite file serves the session (conftest's `lite_uri`); each test uses collections of its own. The
models are tiny untrained ResNet-18s on a generated 32x16 gallery.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the service needs the deploy extra: pip install -e '.[deploy]'")
from fastapi.testclient import TestClient  # noqa: E402

from agw_light.cli.search import main as search_main  # noqa: E402
from agw_light.cli.serve import main as serve_main  # noqa: E402
from agw_light.data.synthetic import generate_synthetic  # noqa: E402
from agw_light.files import file_sha256  # noqa: E402
from agw_light.gallery_index import build_gallery_index  # noqa: E402
from agw_light.lit.module import LitReID  # noqa: E402
from agw_light.search import HammingIndex, hamming_reference, pack_codes  # noqa: E402
from agw_light.search.filters import filtered_search  # noqa: E402
from agw_light.search.milvus import MilvusIndex  # noqa: E402
from agw_light.service.app import create_app  # noqa: E402
from agw_light.service.gallery import GallerySearch  # noqa: E402

LOSSES = [{"name": "ce", "type": "cross_entropy", "output": "logits"}]
FLOAT_MODEL = {"backbone": "resnet18", "pretrained": "none"}
HASH_MODEL = {"backbone": "resnet18", "pretrained": "none", "neck": "hash", "code_lengths": [64]}
FIRST_TAKEN = 1_700_000_000.0  # the gallery's i-th image (sorted) was "taken" i seconds after this
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def checkpoint(path: Path, model: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    module = LitReID(model=model, losses=LOSSES, num_classes=3, image_size=(32, 16))
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> tuple[Path, Path]:
    """(gallery folder, query folder): 24 gallery images of 2 cameras, their mtimes FIRST_TAKEN + i."""
    root = generate_synthetic(
        tmp_path_factory.mktemp("market"), num_ids=6, num_cams=2, images_per_id_cam=2, height=32, width=16, seed=4
    )
    gallery = (root / "Market-1501-v15.09.15" / "bounding_box_test").resolve()
    for i, path in enumerate(sorted(gallery.glob("*.jpg"))):
        os.utime(path, (FIRST_TAKEN + i, FIRST_TAKEN + i))
    return gallery, (root / "Market-1501-v15.09.15" / "query").resolve()


def gallery_images(market) -> list[Path]:
    return sorted(market[0].glob("*.jpg"))


def camera_of(path: str) -> int:
    """The 0-based camera of a Market-style name, read here by hand (<pid>_c<camera>...)."""
    return int(Path(path).name.split("_c")[1][0]) - 1


def search(capsys, *argv: str) -> str:
    capsys.readouterr()
    search_main(list(argv))
    return capsys.readouterr().out


def query(capsys, *argv: str) -> list[dict]:
    return json.loads(search(capsys, "query", "json=true", "device=cpu", *argv))


def ranked(results: list[dict]) -> list[list[tuple[float, str]]]:
    """Each query's (distance, path) pairs, sorted: the answer whatever order ties come in."""
    return [sorted((hit["distance"], hit["path"]) for hit in result["results"]) for result in results]


@pytest.fixture(scope="module")
def hash_galleries(market, lite_uri, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(checkpoint, index folder, Milvus options) of one hash-code gallery built both ways by the command."""
    folder = tmp_path_factory.mktemp("hash")
    ckpt = checkpoint(folder / "hash.ckpt", HASH_MODEL)
    build = ["build", f"ckpt={ckpt}", f"gallery={market[0]}", "device=cpu"]
    milvus = ["backend=milvus", f"uri={lite_uri}", "collection=galleries_hash"]
    search_main([*build, f"out={folder / 'index'}"])
    search_main([*build, *milvus])
    return ckpt, folder / "index", milvus


def test_query_on_milvus_answers_as_the_folder_index_also_filtered(market, hash_galleries, capsys):
    _, index, milvus = hash_galleries
    everything = f"topk={len(gallery_images(market))}"
    folder_full = query(capsys, f"index={index}", f"image={market[1]}", everything)
    milvus_full = query(capsys, *milvus, f"image={market[1]}", everything)
    assert ranked(milvus_full) == ranked(folder_full)
    assert all(hit["distance"] == int(hit["distance"]) for result in milvus_full for hit in result["results"])
    # Filters, against the unfiltered ranking filtered by hand (the in-process filters: the brute-force test below).
    for option, keep in [
        ("exclude_own_camera=true", lambda query_path, path: camera_of(path) != camera_of(query_path)),
        ("cameras=[1]", lambda query_path, path: camera_of(path) == 1),
    ]:
        expected = [
            sorted((hit["distance"], hit["path"]) for hit in result["results"] if keep(result["query"], hit["path"]))
            for result in folder_full
        ]
        assert ranked(query(capsys, *milvus, f"image={market[1]}", everything, option)) == expected
    window = [str(path) for path in gallery_images(market)[3:9]]  # taken FIRST_TAKEN + 3 ... + 8
    timed = query(
        capsys, *milvus, f"image={market[1]}", everything, f"since={FIRST_TAKEN + 3}", f"until={FIRST_TAKEN + 8}"
    )
    assert all(sorted(path for _, path in result) == window for result in ranked(timed))
    with pytest.raises(SystemExit, match="a time window .* needs .* backend=milvus"):
        query(capsys, f"index={index}", f"image={market[1]}", f"since={FIRST_TAKEN}")


def test_add_and_delete_change_the_collection_and_refuse_another_model_or_unknown_items(
    market, hash_galleries, lite_uri, tmp_path, capsys
):
    ckpt, _, _ = hash_galleries
    first = gallery_images(market)[0]
    milvus = [f"uri={lite_uri}", "collection=galleries_live"]
    search(capsys, "build", f"ckpt={ckpt}", f"gallery={first}", "device=cpu", "backend=milvus", *milvus)
    printed = search(capsys, "add", f"image={market[0]}", "device=cpu", *milvus).splitlines()
    added = {int(line.split("\t")[0]): line.split("\t")[1] for line in printed[:-1]}
    assert sorted(added.values()) == [str(path) for path in gallery_images(market)]
    assert printed[-1] == f"added {len(added)} images to collection 'galleries_live' at {lite_uri}"
    with MilvusIndex.open(lite_uri, "galleries_live") as index:
        assert index.ntotal == len(added) + 1
        assert index.items(list(added)).paths == list(added.values())

    other = checkpoint(tmp_path / "other.ckpt", HASH_MODEL, seed=1)
    both = rf"checkpoint_sha256='{file_sha256(ckpt)}'.*checkpoint_sha256='{file_sha256(other)}'"
    with pytest.raises(SystemExit, match=both):
        search(capsys, "add", f"image={first}", f"ckpt={other}", "device=cpu", *milvus)
    float_ckpt = checkpoint(tmp_path / "float.ckpt", FLOAT_MODEL)
    with pytest.raises(SystemExit, match=r"code_lengths=\[64\], but this model has code_lengths=\[\]"):
        query(capsys, "backend=milvus", *milvus, f"image={first}", f"ckpt={float_ckpt}", "allow_changed_model=true")

    some_id = next(item for item, path in added.items() if path != str(first))
    assert f"deleted 1 items [{some_id}]" in search(capsys, "delete", f"ids=[{some_id}]", *milvus)
    with pytest.raises(SystemExit, match=rf"holds no item with id \[{some_id}\]; nothing was deleted"):
        search(capsys, "delete", f"ids={some_id}", *milvus)
    assert "deleted 2 items" in search(capsys, "delete", f"paths=[{first}]", *milvus)  # built and added
    with pytest.raises(SystemExit, match="holds no item with path"):
        search(capsys, "delete", f"paths=[{first}]", *milvus)
    with MilvusIndex.open(lite_uri, "galleries_live") as index:
        assert index.ntotal == len(added) + 1 - 3
    ranked_paths = [
        hit["path"] for hit in query(capsys, "backend=milvus", *milvus, f"image={first}", "topk=50")[0]["results"]
    ]
    assert str(first) not in ranked_paths and added[some_id] not in ranked_paths


def test_an_unreachable_server_is_one_line_naming_it(capsys, tmp_path, monkeypatch):
    server = ["uri=http://127.0.0.1:9", "collection=gallery", "timeout=1"]
    with pytest.raises(SystemExit, match=r"Milvus at http://127\.0\.0\.1:9: cannot connect \("):
        query(capsys, "backend=milvus", *server, f"image={tmp_path}")
    argv = ["serve", "backend=milvus", *server, f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"^serve: Milvus at http://127\.0\.0\.1:9: cannot connect \("):
        serve_main()
    monkeypatch.setattr(sys, "argv", ["serve", "backend=torch", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit, match="backend='torch': expected in_process or milvus .*encoder_backend="):
        serve_main()


@pytest.mark.parametrize(
    ("cameras", "exclude_own"), [([1, 2], False), (None, True), ([0, 3], True), ([9], True), ([2], False)]
)
def test_in_process_camera_filters_give_the_brute_force_filtered_top_k(cameras, exclude_own):
    rng = np.random.default_rng(2)
    gallery, queries = rng.standard_normal((120, 48)), rng.standard_normal((9, 48))
    gallery_cameras, query_cameras = rng.integers(0, 4, 120), rng.integers(0, 4, 9)
    index = HammingIndex(48)
    index.add(gallery, {"paths": [""] * 120, "pids": [0] * 120, "camids": gallery_cameras.tolist()})
    own = query_cameras.tolist() if exclude_own else None
    distances, found = filtered_search(index, queries, 10, cameras=cameras, query_cameras=own)
    reference = hamming_reference(pack_codes(queries), pack_codes(gallery)).astype(np.float64)
    allowed = np.repeat(np.isin(gallery_cameras, cameras if cameras is not None else np.arange(4))[None], 9, axis=0)
    if exclude_own:
        allowed &= gallery_cameras[None, :] != query_cameras[:, None]
    reference = np.where(allowed, reference, np.inf)
    expected = np.sort(reference, axis=1)[:, :10]
    assert found.shape == (9, 10)
    np.testing.assert_array_equal(np.where(found >= 0, distances, np.inf), expected)
    kept = found >= 0
    assert allowed[np.nonzero(kept)[0], found[kept]].all()
    np.testing.assert_array_equal(np.take_along_axis(reference, np.where(kept, found, 0), 1)[kept], expected[kept])


# The service.


@pytest.fixture(scope="module")
def float_model(market, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, folder index of the whole gallery) of a float-feature model."""
    folder = tmp_path_factory.mktemp("float")
    ckpt = checkpoint(folder / "float.ckpt", FLOAT_MODEL)
    build_gallery_index(ckpt, market[0], folder / "index", device="cpu")
    return ckpt, folder / "index"


def milvus_gallery(float_model, images: Path, uri: str, collection: str, upload_dir: Path) -> GallerySearch:
    build_gallery_index(float_model[0], images, backend="milvus", uri=uri, collection=collection, device="cpu")[
        1
    ].close()
    return GallerySearch.open_milvus(uri, collection, upload_dir=upload_dir, device="cpu", backend="torch")


def post_query(client, data: bytes, **params):
    return client.post("/search", params=params, files={"image": ("query.jpg", data, "image/jpeg")})


def names(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["name"] for hit in response.json()["results"]]


def test_the_service_on_milvus_answers_as_on_the_folder_index_with_filters_and_thumbnails(
    market, float_model, lite_uri, tmp_path
):
    everything = len(gallery_images(market))
    milvus = milvus_gallery(float_model, market[0], lite_uri, "galleries_served", tmp_path / "uploads")
    local = GallerySearch.open(float_model[1], device="cpu", backend="torch")
    with TestClient(create_app(milvus, max_k=50)) as on_milvus, TestClient(create_app(local, max_k=50)) as on_folder:
        health = on_milvus.get("/health").json()
        assert (health["backend"], health["writable"], health["size"]) == ("milvus", True, everything)
        data = sorted(market[1].glob("*.jpg"))[0].read_bytes()  # camera 0 (c1)
        full = post_query(on_folder, data, k=everything).json()["results"]
        answer = post_query(on_milvus, data, k=everything).json()["results"]
        assert [(hit["name"], hit["pid"], hit["camera"]) for hit in answer] == [
            (hit["name"], hit["pid"], hit["camera"]) for hit in full
        ]
        assert [hit["distance"] for hit in answer] == pytest.approx([hit["distance"] for hit in full], abs=1e-5)
        for params, keep in [
            ({"query_camera": 0}, lambda hit: hit["camera"] != 0),
            ({"cameras": [1]}, lambda hit: hit["camera"] == 1),
        ]:
            expected = [hit["name"] for hit in full if keep(hit)][:5]
            assert names(post_query(on_milvus, data, k=5, **params)) == expected
            assert names(post_query(on_folder, data, k=5, **params)) == expected
        window = {path.name for path in gallery_images(market)[:4]}
        timed = post_query(on_milvus, data, k=everything, since=FIRST_TAKEN, until=FIRST_TAKEN + 3)
        assert set(names(timed)) == window
        refused = post_query(on_folder, data, since=FIRST_TAKEN)
        assert refused.status_code == 400 and "backend=milvus" in refused.json()["detail"]

        thumbnail = on_milvus.get(answer[0]["thumbnail"])
        assert answer[0]["thumbnail"] == f"/gallery/{answer[0]['position']}/thumbnail"
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        missing = on_milvus.get(f"/gallery/{max(hit['position'] for hit in answer) + 1000}/thumbnail")
        assert missing.status_code == 404 and "holds no item with id" in missing.json()["detail"]
        # A read-only folder index refuses writes whatever the token.
        with TestClient(create_app(local, write_token=TOKEN)) as read_only:
            upload = {"image": ("a.jpg", data, "image/jpeg")}
            assert read_only.post("/gallery", files=upload, headers=AUTH).status_code == 405
    milvus.close()


def test_writes_need_the_token_and_survive_a_restart(market, float_model, lite_uri, tmp_path):
    images = gallery_images(market)
    start = tmp_path / "start"
    start.mkdir()
    for path in images[:2]:
        shutil.copy(path, start / path.name)
    uploads = tmp_path / "uploads"
    gallery = milvus_gallery(float_model, start, lite_uri, "galleries_writes", uploads)
    first, second = images[5].read_bytes(), images[6].read_bytes()
    files = [("image", ("a.jpg", first, "image/jpeg")), ("image", ("b.jpg", second, "image/jpeg"))]
    with TestClient(create_app(gallery, write_token=TOKEN)) as client:
        missing = client.post("/gallery", files=files)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert client.post("/gallery", files=files, headers={"Authorization": "Bearer nope"}).status_code == 403
        assert client.delete("/gallery/1", headers={"Authorization": "Bearer nope"}).status_code == 403
        assert client.get("/health").json()["size"] == 2  # nothing written
        bad = client.post("/gallery", files={"image": ("x.jpg", b"not an image", "image/jpeg")}, headers=AUTH)
        assert bad.status_code == 415 and not uploads.exists()

        added = client.post("/gallery", files=files, params={"pid": 7, "camera": 1, "timestamp": 5.0}, headers=AUTH)
        assert added.status_code == 201, added.text
        ids = added.json()["ids"]
        hit = post_query(client, first, k=1).json()["results"][0]
        assert (hit["position"], hit["pid"], hit["camera"]) == (ids[0], 7, 1)
        assert hit["name"] == f"{hashlib.sha256(first).hexdigest()}.jpg" and hit["distance"] == pytest.approx(
            0, abs=1e-5
        )
        assert (uploads / hit["name"]).read_bytes() == first
        assert client.get(hit["thumbnail"]).status_code == 200
        assert [hit["position"] for hit in post_query(client, first, k=10, since=4, until=6).json()["results"]] == ids

        assert client.delete(f"/gallery/{ids[1]}").status_code == 401
        assert client.delete(f"/gallery/{ids[1]}", headers=AUTH).json() == {"deleted": ids[1]}
        again = client.delete(f"/gallery/{ids[1]}", headers=AUTH)
        assert again.status_code == 404 and f"holds no item with id [{ids[1]}]" in again.json()["detail"]
        assert client.get(f"/gallery/{ids[1]}/thumbnail").status_code == 404
    with TestClient(create_app(gallery)) as no_token:  # a service without a write token takes no writes
        refused = no_token.post("/gallery", files=files, headers=AUTH)
        assert refused.status_code == 403 and "writes are disabled" in refused.json()["detail"]
    gallery.close()

    reopened = GallerySearch.open_milvus(
        lite_uri, "galleries_writes", upload_dir=uploads, device="cpu", backend="torch"
    )
    assert reopened.index.ntotal == 3
    assert [hit.position for hit in reopened.search_upload(first, 10, max_bytes=10**6, max_pixels=10**6)][:1] == ids[:1]
    assert ids[1] not in [hit.position for hit in reopened.search_upload(second, 10, max_bytes=10**6, max_pixels=10**6)]
    reopened.close()


def test_a_failed_write_leaves_the_gallery_and_the_upload_folder_as_before(market, float_model, lite_uri, tmp_path):
    uploads = tmp_path / "uploads"
    gallery = milvus_gallery(float_model, gallery_images(market)[0], lite_uri, "galleries_failing", uploads)

    def refuse(columns):
        raise ConnectionError("the server went away")

    gallery.index._collection.insert = refuse
    with TestClient(create_app(gallery, write_token=TOKEN)) as client:
        data = gallery_images(market)[3].read_bytes()
        failed = client.post("/gallery", files={"image": ("a.jpg", data, "image/jpeg")}, headers=AUTH)
        assert failed.status_code == 503 and "the gallery is as before" in failed.json()["detail"]
        assert client.get("/health").json()["size"] == 1
    assert list(uploads.iterdir()) == []
    gallery.close()


def test_concurrent_writes_and_queries_through_the_service(market, float_model, lite_uri, tmp_path):
    images = gallery_images(market)
    gallery = milvus_gallery(float_model, images[0], lite_uri, "galleries_busy", tmp_path / "uploads")
    with TestClient(create_app(gallery, write_token=TOKEN)) as client:
        written, statuses, seen = [], [], []
        done = threading.Event()

        def write(offset: int) -> None:
            for path in images[offset : offset + 6 : 2]:
                answer = client.post(
                    "/gallery", files={"image": (path.name, path.read_bytes(), "image/jpeg")}, headers=AUTH
                )
                statuses.append(answer.status_code)
                written.extend(answer.json().get("ids", []))

        def read() -> None:
            while not done.is_set():
                answer = post_query(client, images[1].read_bytes(), k=20)
                statuses.append(answer.status_code)
                seen.extend(hit["position"] for hit in answer.json().get("results", []))

        writers = [threading.Thread(target=write, args=(offset,)) for offset in (1, 2)]
        readers = [threading.Thread(target=read) for _ in range(2)]
        for thread in writers + readers:
            thread.start()
        for thread in writers:
            thread.join(timeout=120)
        done.set()
        for thread in readers:
            thread.join(timeout=120)
        assert set(statuses) <= {200, 201} and statuses.count(201) == 6
        assert client.get("/health").json()["size"] == 7
        original = gallery.index.search(gallery.encoder.encode([images[0]]), 1)[1][0, 0]
        assert set(seen) <= {int(original), *written}
    gallery.close()
