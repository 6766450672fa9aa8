"""The service's web page in a real headless browser: Debian's chromium driven by selenium through chromedriver.

The server is uvicorn on a free port in a thread; the browser uploads a query image through the page's file
input, and the ranked list it shows must be the API's answer for the same image. Needs `chromium` and
`chromium-driver` from apt (.ci/run installs them); selenium gets the driver's path, so it never downloads one.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service needs the deploy extra: pip install -e '.[deploy]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (dev extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "no chromium/chromedriver on this machine: apt-get install chromium chromium-driver (.ci/run does)",
        allow_module_level=True,
    )

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import build_tiny_index  # noqa: E402

from agw_light.service.app import create_app  # noqa: E402
from agw_light.service.gallery import GallerySearch  # noqa: E402


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """uvicorn serving `app` on a free port of 127.0.0.1 in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def headless_chromium(width: int = 1500, height: int = 520) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # The page's own size, whatever window decorations headless chromium counts in its window size.
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        yield driver
    finally:
        driver.quit()


def search_through_the_page(driver, base_url: str, query: Path, k: int) -> list[dict]:
    """Uploads `query` with the page's file input and reads the ranked list from the page's DOM."""
    driver.get(base_url + "/")
    WebDriverWait(driver, 30).until(lambda d: "gallery images" in d.find_element(By.ID, "about").text)
    k_box = driver.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys(str(k))
    driver.find_element(By.ID, "query-file").send_keys(str(query))
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searches"))
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return [...document.images].every((i) => i.complete && i.naturalWidth > 0)")
    )
    return [
        {
            "rank": int(item.get_attribute("data-rank")),
            "position": int(item.get_attribute("data-position")),
            "distance": float(item.get_attribute("data-distance")),
            "pid": int(item.find_element(By.CLASS_NAME, "pid").text),
            "camera": int(item.find_element(By.CLASS_NAME, "camera").text) - 1,
        }
        for item in driver.find_elements(By.CSS_SELECTOR, "#results .hit")
    ]


@pytest.fixture(autouse=True)
def no_driver_downloads(monkeypatch) -> None:
    """Selenium must use the apt chromedriver it is given, never fetch one with selenium-manager."""
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def refuse(*_args, **_kwargs):
        raise AssertionError("selenium-manager was called: the test must not download a driver")

    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(base URL of a running server, its gallery folder)."""
    gallery_folder, _, index_dir = build_tiny_index(tmp_path_factory.mktemp("browser"))
    gallery = GallerySearch.open(index_dir, device="cpu", backend="torch")
    with running_server(create_app(gallery)) as base_url:
        yield base_url, gallery_folder


def test_the_page_shows_the_apis_ranking_for_an_uploaded_image(served, tmp_path):
    base_url, gallery_folder = served
    query = sorted((gallery_folder.parent / "query").glob("*.jpg"))[1]
    with headless_chromium() as driver:
        shown = search_through_the_page(driver, base_url, query, k=6)
        screenshot = tmp_path / "serve.png"
        assert driver.save_screenshot(str(screenshot))
        shown_query = driver.execute_script("return document.getElementById('query-image').naturalWidth")
    answer = httpx.post(f"{base_url}/search", params={"k": 6}, files={"image": (query.name, query.read_bytes())})
    expected = answer.json()["results"]
    assert len(shown) == 6 and shown_query > 0
    assert [(h["rank"], h["position"], h["pid"], h["camera"]) for h in shown] == [
        (h["rank"], h["position"], h["pid"], h["camera"]) for h in expected
    ]
    assert [h["distance"] for h in shown] == pytest.approx([h["distance"] for h in expected], abs=1e-6)
    assert screenshot.stat().st_size > 5000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_shows_the_reason_for_a_refused_upload(served, tmp_path):
    base_url, _ = served
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with headless_chromium() as driver:
        driver.get(base_url + "/")
        driver.find_element(By.ID, "query-file").send_keys(str(not_an_image))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text)
        assert "notes.png: the upload is not a readable image" in driver.find_element(By.ID, "error").text
