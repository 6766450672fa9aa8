"""The running service (`python -m agw_light.serve`, uvicorn) against hostile clients: a pixel flood measured by
the server's peak memory, a chunked upload past the limit, slow headers and bodies, a foreign Host header."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the deploy extra: pip install -e '.[deploy]'")
import httpx  # noqa: E402
from test_serve import build_tiny_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_UPLOAD = 1_000_000
MAX_PIXELS = 1_000_000  # conf/serve.yaml's default, which the server below runs with
TIMEOUT_S = 2
CLIENTS = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, int, int]]:
    """(base URL, port, server pid) of `python -m agw_light.serve` on a tiny index, with short timeouts."""
    folder = tmp_path_factory.mktemp("limits")
    _, _, index_dir = build_tiny_index(folder)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "agw_light.serve",
        f"index={index_dir}",
        f"port={port}",
        "device=cpu",
        "encoder_backend=torch",
        f"max_upload_bytes={MAX_UPLOAD}",
        f"header_timeout_s={TIMEOUT_S}",
        f"body_timeout_s={TIMEOUT_S}",
        "log_level=warning",
        f"hydra.run.dir={folder / 'run'}",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {process.stdout.read().decode()}")
            time.sleep(0.2)
        yield base, port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM), which no later free() lowers."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def upload_all_at_once(base: str, files: list[bytes]) -> list[httpx.Response]:
    answers: list = [None] * len(files)
    start = threading.Barrier(len(files))

    def send(slot: int) -> None:
        with httpx.Client(timeout=120) as client:
            start.wait()
            answers[slot] = client.post(f"{base}/search", files={"image": ("q.png", files[slot], "image/png")})

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(len(files))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_a_pixel_flood_is_decoded_one_at_a_time_and_bounded(server):
    """16 uploads at once of the worst image the limit admits (1000x1000 RGBA, a few kB of PNG) raise the
    server's peak memory by about one decoded picture, not sixteen; larger ones are refused unread."""
    base, _, pid = server
    small = png(Image.new("RGB", (16, 32), (90, 40, 200)))
    assert all(answer.status_code == 200 for answer in upload_all_at_once(base, [small] * CLIENTS))  # warm-up
    worst = png(Image.new("RGBA", (1000, MAX_PIXELS // 1000), (10, 200, 30, 255)))
    flood = png(Image.new("RGBA", (6000, 6000), (10, 200, 30, 255)))
    assert len(worst) < 20_000 and len(flood) < 200_000
    before = peak_rss_bytes(pid)
    answers = upload_all_at_once(base, [worst] * CLIENTS)
    refused = upload_all_at_once(base, [flood] * CLIENTS)
    growth = peak_rss_bytes(pid) - before
    assert [answer.status_code for answer in answers] == [200] * CLIENTS
    assert {answer.status_code for answer in refused} == {413}
    assert f"limit of {MAX_PIXELS} pixels" in refused[0].json()["detail"]
    # One decoded picture is ~8 bytes a pixel (RGBA, then RGB): 8 MB. Sixteen decoded at once would be 128 MB.
    assert growth < 4 * 8 * MAX_PIXELS, f"peak memory grew by {growth / 1e6:.0f} MB"


def raw_request(port: int, head: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(head)
    return connection


def test_a_chunked_upload_is_refused_at_the_limit_not_stored_whole(server):
    """No Content-Length: the server counts the body as it arrives and answers 413 long before the client
    has sent all it meant to (64 MB), rather than spooling it all and refusing afterwards."""
    _, port, _ = server
    connection = raw_request(
        port,
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n",
    )
    part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n'
    connection.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    chunk = 64 * 1024
    sent, meant = 0, 64 * 1024 * 1024
    piece = f"{chunk:x}\r\n".encode() + b"\0" * chunk + b"\r\n"
    connection.settimeout(5)
    try:
        while sent < meant:
            connection.sendall(piece)
            sent += chunk
    except OSError:  # the server answered and closed: the rest could not be sent
        pass
    answer = connection.recv(4096)
    connection.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert f"limit of {MAX_UPLOAD} bytes".encode() in answer
    assert sent < meant // 2, f"the server read {sent} bytes before refusing"


def closed_after(connection: socket.socket) -> tuple[float, bytes]:
    """(seconds until the server closed the connection, what it sent before)."""
    start, received = time.monotonic(), b""
    while chunk := connection.recv(4096):
        received += chunk
    return time.monotonic() - start, received


def test_slow_headers_and_slow_bodies_are_cut_off(server):
    _, port, _ = server
    slow_head = raw_request(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line never comes
    seconds, received = closed_after(slow_head)
    assert received == b"" and seconds < TIMEOUT_S + 3
    slow_body = raw_request(
        port,
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n--xyz\r\n",
    )
    seconds, received = closed_after(slow_body)
    assert received.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in received
    assert seconds < TIMEOUT_S + 3


def test_only_the_bound_host_is_answered_and_head_works(server):
    base, port, _ = server
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"http://localhost:{port}/health").status_code == 200
    rebound = httpx.get(f"{base}/health", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status_code == 400 and b"ok" not in rebound.content
    for path in ("/", "/health", "/gallery/0/thumbnail"):
        answer = httpx.head(f"{base}{path}")
        assert answer.status_code == 200 and answer.content == b"", path
