"""The web page end to end in a real headless browser: start `serve`, upload an image, submit, read the result."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from diffusion_classifier import DiffusionClassifier, Exhaustive
from diffusion_classifier.cli import main

pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist" / "test00018-bag.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_classifier", "serve", "--model", "fashion-mnist-class",
                             "--port", str(port), "--timesteps", "4", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("serve did not come up: " + (proc.stdout.read() if proc.stdout else ""))
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium)")
def test_the_page_classifies_an_uploaded_image_as_the_library_does(server):
    labels = ["Sneaker", "Bag", "Dress"]
    expected = DiffusionClassifier.from_pretrained("fashion-mnist-class", labels=labels,
                                                   strategy=Exhaustive(4)).classify([str(EXAMPLE)])[0]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server, wait_until="networkidle")
            page.locator("#image input[type=file]").set_input_files(str(EXAMPLE))
            page.locator("#labels textarea").fill(", ".join(labels))
            page.wait_for_timeout(1000)  # the upload reaches the server before the click
            preview = page.locator("#image img").first.bounding_box()  # the 28 px image, shown large enough to see
            page.locator("#classify").click()
            page.locator("#cost").get_by_text("network evaluations").wait_for(timeout=90_000)
            cost = page.locator("#cost").inner_text()
            ranked = page.locator("#ranked").inner_text()
        finally:
            browser.close()
    assert cost.startswith(f"{expected.prediction}:") and f"{expected.nfe} network evaluations" in cost
    assert expected.nfe == 3 * 4
    assert preview is not None and min(preview["width"], preview["height"]) >= 150, preview
    shown = [line for line in ranked.splitlines() if line in labels]
    assert shown[0] == expected.prediction and set(shown) == set(labels)


def test_serve_refuses_a_bad_port(capsys):
    assert main(["serve", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
