"""MilvusIndex on Milvus Lite: same answers as the in-process exact indexes, filters, live writes, refusals.

One Milvus Lite file (one local server process, conftest's `lite_uri`) serves the whole session; each test makes
its own collections.
References are independent: the in-process faiss indexes, a brute-force Hamming count, numpy masks.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agw_light.search import FloatIndex, HammingIndex, hamming_reference, pack_codes
from agw_light.search.fit import fit_shortlist
from agw_light.search.index import CoarseToFineIndex
from agw_light.search.milvus import MilvusIndex, build_milvus_index

REPO = Path(__file__).resolve().parents[1]
_names = itertools.count()


@pytest.fixture
def collection_name() -> str:
    return f"gallery_{next(_names)}"


def gallery_metadata(count: int, cameras: int = 3) -> dict[str, list]:
    return {
        "paths": [f"/gallery/{i:04d}_c{i % cameras}.jpg" for i in range(count)],
        "pids": [i // 4 for i in range(count)],
        "camids": [i % cameras for i in range(count)],
    }


def positions(added_ids: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Milvus ids -> positions in insertion order (ids grow with insertion order); -1 stays -1."""
    return np.where(found >= 0, np.searchsorted(added_ids, found), -1)


def assert_same_top_k(distances, found, reference_distances, reference_positions):
    """Equal distances everywhere, equal items except among those tied with the k-th distance."""
    np.testing.assert_allclose(distances, reference_distances, rtol=0, atol=1e-6)
    untied = distances < distances[:, -1:]
    np.testing.assert_array_equal(np.where(untied, found, -2), np.where(untied, reference_positions, -2))


def test_binary_rows_give_brute_force_hamming_distances_for_any_bit_count(lite_uri, collection_name):
    """One packing for gallery and queries: Milvus's distances are the bit differences of the codes, also
    for a length that is not a multiple of 8 (padding bits are zero on both sides)."""
    rng = np.random.default_rng(0)
    for bits in (20, 64):
        gallery, queries = rng.standard_normal((60, bits)), rng.standard_normal((7, bits))
        with MilvusIndex.create(lite_uri, f"{collection_name}_{bits}", code_lengths=[bits]) as index:
            ids = index.add(gallery)
            distances, found = index.search(queries, 60)
        reference = hamming_reference(pack_codes(queries), pack_codes(gallery))
        assert distances.dtype == np.int32 and found.shape == (7, 60)
        np.testing.assert_array_equal(distances, np.take_along_axis(reference, positions(ids, found), 1))
        np.testing.assert_array_equal(distances, np.sort(reference, axis=1))


@pytest.mark.parametrize("kind", ["hamming", "float"])
def test_same_top_k_as_the_in_process_exact_index(lite_uri, collection_name, kind):
    rng = np.random.default_rng(1)
    gallery, queries = rng.standard_normal((400, 128)), rng.standard_normal((25, 128))
    reference = HammingIndex(128) if kind == "hamming" else FloatIndex(128)
    reference.add(gallery)
    with build_milvus_index(
        gallery, [128] if kind == "hamming" else None, uri=lite_uri, collection=collection_name
    ) as index:
        assert (index.kind, index.d, index.ntotal, index.backend) == (kind, 128, 400, "milvus")
        ids = index.search(gallery, 1)[1][:, 0]  # each item's own id: its nearest item is itself
        distances, found = index.search(queries, 10)
    reference_distances, reference_positions = reference.search(queries, 10)
    assert distances.dtype == reference_distances.dtype
    assert_same_top_k(distances, positions(ids, found), reference_distances, reference_positions)


def pyramid_codes(count: int, rng: np.random.Generator) -> np.ndarray:
    """[64-bit | 16-bit] codes whose short level is a noisy projection of the long one, as a trained pyramid's."""
    latent = rng.standard_normal((count, 64))
    short = latent[:, :16] + 0.4 * rng.standard_normal((count, 16))
    return np.concatenate([latent, short], axis=1)


def test_shortlist_ranks_the_short_codes_candidates_by_the_full_code(lite_uri, collection_name):
    """Coarse-to-fine: the top-k are the exact full-code ranking of the `candidates` nearest by the short code."""
    rng = np.random.default_rng(2)
    gallery, queries = pyramid_codes(300, rng), pyramid_codes(12, rng)
    with MilvusIndex.create(lite_uri, collection_name, code_lengths=[64, 16], shortlist=(16, 40)) as index:
        ids = index.add(gallery)
        distances, found = index.search(queries, 5)
    full = hamming_reference(pack_codes(queries[:, :64]), pack_codes(gallery[:, :64]))
    short = hamming_reference(pack_codes(queries[:, 64:]), pack_codes(gallery[:, 64:]))
    found = positions(ids, found)
    np.testing.assert_array_equal(distances, np.take_along_axis(full, found, 1))
    assert (np.diff(distances, axis=1) >= 0).all()
    # The shortlist holds every item nearer than the 40th short distance t and some at t (Milvus picks
    # among those tied): every hit comes from it, and no sure member outranks the 5th hit by (full, position).
    t = np.sort(short, axis=1)[:, 39:40]
    assert (np.take_along_axis(short, found, 1) <= t).all()
    sure = short < t
    keys = full * 300 + np.arange(300)
    fifth = np.take_along_axis(keys, found[:, 4:5], 1)
    returned = np.zeros_like(sure)
    np.put_along_axis(returned, found, True, 1)
    assert not (sure & ~returned & (keys < fifth)).any()
    assert (sure.sum(axis=1) >= 5).all() and (short == t).sum() > 0  # the check covers tied shortlists too


def test_fit_shortlist_keeps_the_target_recall_and_follows_the_cost(lite_uri, collection_name):
    rng = np.random.default_rng(3)
    gallery, validation = pyramid_codes(400, rng), pyramid_codes(60, rng)
    local = CoarseToFineIndex([64, 16])
    local.add(gallery)
    cheap_fetch = fit_shortlist(local, validation, lambda bits, count: 400 * bits + count, target_recall=0.9)
    assert cheap_fetch is not None and cheap_fetch[0] == 16
    # Its validation recall of the exact top-1 reaches the aim.
    with MilvusIndex.create(lite_uri, collection_name, code_lengths=[64, 16], shortlist=cheap_fetch) as index:
        ids = index.add(gallery)
        found = positions(ids, index.search(validation, 1)[1][:, 0])
    exact = HammingIndex(64)
    exact.add(gallery[:, :64])
    assert np.mean(found == exact.search(validation[:, :64], 1)[1][:, 0]) >= 0.9
    # When ranking a candidate costs as much as the whole scan, the exact scan wins.
    assert fit_shortlist(local, validation, lambda bits, count: 400 * bits + count * 10**6) is None


def test_filters_exclude_the_query_camera_and_keep_a_time_window_and_cameras(lite_uri, collection_name):
    rng = np.random.default_rng(4)
    gallery, queries = rng.standard_normal((240, 32)), rng.standard_normal((9, 32))
    meta, stamps = gallery_metadata(240, cameras=4), 1000.0 + np.arange(240)
    query_cameras = np.arange(9) % 4
    distance = hamming_reference(pack_codes(queries), pack_codes(gallery)).astype(float)
    camids = np.asarray(meta["camids"])
    with MilvusIndex.create(lite_uri, collection_name, code_lengths=[32]) as index:
        ids = index.add(gallery, meta, timestamps=stamps)
        cases = [
            ({"query_cameras": query_cameras}, camids[None, :] != query_cameras[:, None]),
            ({"since": 1050.0, "until": 1100.0}, np.broadcast_to((stamps >= 1050) & (stamps <= 1100), distance.shape)),
            (
                {"cameras": [1, 3], "query_cameras": query_cameras},
                np.isin(camids, [1, 3]) & (camids != query_cameras[:, None]),
            ),
        ]
        for filters, allowed in cases:
            found_distances, found = index.search(queries, 8, **filters)
            masked = np.where(allowed, distance, np.inf)
            order = np.lexsort((np.broadcast_to(np.arange(240), masked.shape), masked), axis=1)[:, :8]
            assert_same_top_k(found_distances, positions(ids, found), np.take_along_axis(masked, order, 1), order)
        # A window holding 3 items: rows padded faiss-style, and search_within pads with inf.
        distances, found = index.search(queries, 5, since=1000.0, until=1002.0)
        assert (found[:, 3:] == -1).all() and (distances[:, 3:] == np.iinfo(np.int32).max).all()
        within = index.search_within(queries, 5, 1e9, since=1000.0, until=1002.0)
        assert np.isinf(within[0][:, 3:]).all() and (within[1][:, 3:] == -1).all()


def test_add_delete_items_and_refusals_leave_the_gallery_as_it_was(lite_uri, collection_name, monkeypatch):
    rng = np.random.default_rng(5)
    gallery = rng.standard_normal((50, 16))
    meta = gallery_metadata(50)
    with MilvusIndex.create(lite_uri, collection_name, code_lengths=[16]) as index:
        ids = index.add(gallery, meta)
        assert index.items(ids[[3, 1]]).paths == [meta["paths"][3], meta["paths"][1]]
        assert index.items(ids[[3]]).pids == [0] and index.items(ids[[5]]).camids == [2]
        np.testing.assert_array_equal(index.delete(ids[:2]), ids[:2])
        np.testing.assert_array_equal(index.delete(paths=[meta["paths"][2]]), ids[2:3])
        assert index.ntotal == 47
        with pytest.raises(LookupError, match=rf"no item with id \[{ids[0]}\]; nothing was deleted"):
            index.delete([ids[0], ids[10]])
        with pytest.raises(LookupError, match="no item with path"):
            index.delete(paths=[meta["paths"][11], "/gallery/unknown.jpg"])
        with pytest.raises(LookupError, match="no item with id"):
            index.items([ids[0]])
        assert index.ntotal == 47 and index.search(gallery[10:11], 1)[1][0, 0] == ids[10]
        # A write that fails half-way removes what it wrote: here the second insert request fails.
        monkeypatch.setattr("agw_light.search.milvus.INSERT_BYTES", 10 * 64)
        insert = index._collection.insert
        calls = itertools.count()

        def failing_insert(columns):
            if next(calls) == 1:
                raise OSError("disk full")
            return insert(columns)

        monkeypatch.setattr(index._collection, "insert", failing_insert)
        with pytest.raises(RuntimeError, match=r"failed after [1-9]\d* were written.*disk full.*as before"):
            index.add(gallery, meta)
        assert index.ntotal == 47
        with pytest.raises(ValueError, match="control characters"):
            index.add(gallery[:1], {"paths": ["a\nb"], "pids": [1], "camids": [1]})
        with pytest.raises(ValueError, match=r"\(N, 16\) code values"):
            index.add(rng.standard_normal((2, 17)))
        assert index.ntotal == 47


def test_a_collection_of_another_model_or_code_length_is_refused_naming_both(lite_uri, collection_name):
    record = {"ckpt_sha256": "a" * 64, "image_size": [256, 128]}
    MilvusIndex.create(lite_uri, collection_name, code_lengths=[64, 32], record=record).close()
    with MilvusIndex.open(lite_uri, collection_name, expect={**record, "code_lengths": [64, 32]}) as index:
        assert index.record == record and index.kind == "coarse_to_fine" and index.d == 96
    with pytest.raises(ValueError, match=f"built with ckpt_sha256='{'a' * 64}'.*this model has ckpt_sha256='bbb'"):
        MilvusIndex.open(lite_uri, collection_name, expect={"ckpt_sha256": "bbb"})
    with pytest.raises(ValueError, match=r"code_lengths=\[64, 32\].*this model has code_lengths=\[2048\]"):
        MilvusIndex.open(lite_uri, collection_name, expect={"code_lengths": [2048]})
    with pytest.raises(FileExistsError, match="exists already"):
        MilvusIndex.create(lite_uri, collection_name, code_lengths=[64])
    with pytest.raises(LookupError, match=f"no collection 'missing' at .*holds .*{collection_name}"):
        MilvusIndex.open(lite_uri, "missing")


def test_an_unreachable_server_fails_fast_with_its_address(tmp_path):
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"Milvus at http://127\.0\.0\.1:9: cannot connect \(Fail connecting"):
        MilvusIndex.open("http://127.0.0.1:9", "gallery", timeout=1.0)
    assert time.monotonic() - started < 10
    with pytest.raises(FileNotFoundError, match="no Milvus Lite file"):
        MilvusIndex.open(str(tmp_path / "none.db"), "gallery")
    with pytest.raises(ValueError, match="expected a Milvus Lite file"):
        MilvusIndex.open(str(tmp_path / "gallery.sqlite"), "gallery")


def test_writes_and_queries_run_concurrently(lite_uri, collection_name):
    """A writer adds and deletes batches while two readers query: no query fails or returns an item that was
    never written, and the gallery ends with exactly the items added and not deleted."""
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((20, 32)) for _ in range(8)]
    queries = rng.standard_normal((5, 32))
    with MilvusIndex.create(lite_uri, collection_name, code_lengths=[32]) as index:
        written, kept, errors, seen = set(), set(), [], []
        done = threading.Event()

        def write():
            try:
                for batch in batches:
                    ids = index.add(batch).tolist()
                    written.update(ids)
                    kept.update(ids[5:])
                    index.delete(ids[:5])
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                errors.append(error)
            finally:
                done.set()

        def read():
            try:
                while not done.is_set():
                    seen.append(index.search(queries, 10)[1])
            except Exception as error:  # noqa: BLE001
                errors.append(error)

        threads = [threading.Thread(target=write), threading.Thread(target=read), threading.Thread(target=read)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors and len(seen) > 2
        returned = set(np.concatenate([found.reshape(-1) for found in seen]).tolist()) - {-1}
        assert returned <= written
        assert index.ntotal == len(kept) == 120
        assert set(index.search(queries, 200)[1].reshape(-1).tolist()) == kept


WRITER = """
import os, sys
import numpy as np
from agw_light.search.milvus import MilvusIndex
index = MilvusIndex.create(sys.argv[1], "live", code_lengths=[32], record={"ckpt_sha256": "abc"})
codes = np.random.default_rng(7).standard_normal((30, 32))
ids = index.add(codes, {"paths": [f"/g/{i}.jpg" for i in range(30)], "pids": [0] * 30, "camids": [1] * 30})
index.delete(paths=["/g/0.jpg"])
print(ids[1], flush=True)
os.kill(os.getpid(), 9)  # no close, no flush: only what Milvus acknowledged
"""


def test_acknowledged_writes_survive_a_killed_process(tmp_path):
    uri = str(tmp_path / "live.db")
    done = subprocess.run(
        [sys.executable, "-c", WRITER, uri],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    with MilvusIndex.open(uri, "live", expect={"ckpt_sha256": "abc"}) as index:
        assert index.ntotal == 29
        first_kept = int(done.stdout.strip())
        assert index.items([first_kept]).paths == ["/g/1.jpg"]
        query = np.random.default_rng(7).standard_normal((30, 32))[1:2]
        assert index.search(query, 1)[1][0, 0] == first_kept


def test_importing_the_backend_does_not_import_pymilvus():
    code = "import sys, agw_light.search.milvus; print('pymilvus' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_bench_milvus_runs_at_a_tiny_size(tmp_path):
    """scripts/bench_milvus.py end to end: every method measured, Milvus Lite exact finds the exact top-10."""
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "scripts" / "bench_milvus.py"), "--code-sizes", "600", "--float-size", "300"]
    command += [
        "--queries",
        "8",
        "--single",
        "2",
        "--validation",
        "16",
        "--validation-gallery",
        "40",
        "--json",
        str(out),
    ]
    done = subprocess.run(
        command, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == [
        "in-process exact",
        "in-process coarse-to-fine",
        "Milvus Lite exact",
        "Milvus Lite coarse-to-fine",
        "in-process exact (faiss IP)",
        "Milvus Lite exact (FLAT IP)",
    ]
    assert all(row["build_s"] >= 0 and row["batched_ms"] > 0 and row["peak_mb"] > 0 for row in rows)
    assert rows[2]["recall_top10"] == rows[5]["recall_top10"] == 1.0
