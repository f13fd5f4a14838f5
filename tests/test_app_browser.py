"""The web app in a real browser: ``python main.py --serve`` on a free port, headless Chromium (from
the system's packages, driven by Playwright) uploads the example digit, sets the distance, and the
edit the page shows -- its pixels read back from the page -- equals the command line's edit at that
distance. Then it moves two of the several-attribute sliders with the mouse and a third with the
arrow keys: each time the edit shown equals the command line's joint edit (``--edit A=u:u ...
--edit_unit relative``) for the values the sliders show. It also takes the screenshot the README shows.

Without Chromium or Playwright the test is skipped, saying how to install them; with
BOUNDARYDIFFUSION_REQUIRE_BROWSER=1 (set by .ci/run) that is a failure instead.
BOUNDARYDIFFUSION_SCREENSHOT=path keeps the screenshot there (docs/app_screenshot.png)."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as cli
from tests.helpers import REPO

DIGIT = REPO / "imgs" / "digit_example.png"
DISTANCE = -3.0
INSTALL = ("install a browser and its driver: apt-get install chromium && pip install -r requirements-test.txt "
           "(or point BOUNDARYDIFFUSION_CHROMIUM at a Chromium binary)")

# Draws an <img> at its natural size onto a canvas and reads the pixels back (RGBA, row-major).
READ_PIXELS = """async (selector) => {
    const img = document.querySelector(selector);
    if (!img.complete) { await new Promise(r => img.addEventListener('load', r, {once: true})); }
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext('2d');
    ctx.drawImage(img, 0, 0);
    return {width: canvas.width, height: canvas.height,
            data: Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data)};
}"""


def _browser() -> tuple[object, str]:
    """(playwright.sync_api, the Chromium binary), or a skip (a failure when the browser is required)."""
    chromium = os.environ.get("BOUNDARYDIFFUSION_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    problem = "Playwright is not installed" if importlib.util.find_spec("playwright") is None else \
        "no Chromium found" if chromium is None else \
        "Gradio is not installed" if importlib.util.find_spec("gradio") is None else None
    if problem is not None:
        message = f"{problem}: {INSTALL}"
        if os.environ.get("BOUNDARYDIFFUSION_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright import sync_api
    return sync_api, chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    """``python main.py --serve`` starting in its own process: (url, its output file, the process)."""
    _browser()
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "main.py", "--serve", "--port", str(port), "--no_cache",
                                 "--edit_attr", "thick"], cwd=REPO, stdout=err, stderr=subprocess.STDOUT)
    yield f"http://127.0.0.1:{port}/", log, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_until_served(url: str, log: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def cli_joint_edit(tmp_path: Path, values: dict[str, float]) -> np.ndarray:
    """The command line's joint edit of the example digit in the relative unit: its RGB pixels."""
    run = tmp_path / f"cli-{len(list(tmp_path.glob('cli-*')))}"
    moves = [arg for name, u in values.items() for arg in ("--edit", f"{name}={u}:{u}")]
    assert cli.main(["--edit_image_boundary", *moves, "--edit_unit", "relative", "--edit_img_number", "1",
                     "--img_path", str(DIGIT), "--exp", str(run), "--no_cache"]) == 0
    (edit,) = (run / "edit").glob("edit_00_*.png")
    with Image.open(edit) as img:
        return np.asarray(img.convert("RGB"))


def shipped_cosine(a: str, b: str, space: str) -> float:
    """The cosine of two shipped digits boundaries' normals at t_0 200, from the files."""
    normals = [np.load(REPO / "boundary" / f"digits_{name}_t200_{space}.npz")["normal"].astype(np.float64).ravel()
               for name in (a, b)]
    return float(normals[0] @ normals[1] / np.linalg.norm(normals[0]) / np.linalg.norm(normals[1]))


def shown_edit(page) -> np.ndarray:
    shown = page.evaluate(READ_PIXELS, "#edit img")
    return np.array(shown["data"], dtype=np.uint8).reshape(shown["height"], shown["width"], 4)[..., :3]


def wait_for_edit(page, expected: np.ndarray, timeout: float = 90) -> None:
    """Until the edit the page shows is ``expected`` (the command line's), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if np.array_equal(shown_edit(page), expected):
                return
        except Exception:  # the image is being replaced
            pass
        if time.monotonic() > deadline:
            pytest.fail("the page's edit never equalled the command line's for the values shown")
        page.wait_for_timeout(200)


def drag(page, selector: str, fraction: float) -> float:
    """Drag the slider ``selector`` with the mouse to ``fraction`` of its track; the value it shows."""
    track = page.locator(f"{selector} input[type=range]")
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * (fraction + 0.5) / 2, y, steps=5)
    page.mouse.move(box["x"] + box["width"] * fraction, y, steps=5)
    page.mouse.up()
    return float(page.locator(f"{selector} input[type=number]").input_value())


def test_edit_in_a_real_browser_equals_the_command_line(server, tmp_path):
    sync_api, chromium = _browser()
    url, log, proc = server
    run = tmp_path / "cli"  # the command line's edit, while the server starts
    assert cli.main(["--edit_image_boundary", "--edit_attr", "thick", "--img_path", str(DIGIT), "--exp", str(run),
                     "--no_cache", "--start_distance", str(DISTANCE), "--end_distance", str(DISTANCE),
                     "--edit_img_number", "1"]) == 0
    with Image.open(run / "edit" / f"edit_00_d{DISTANCE:+.2f}.png") as img:
        expected = np.asarray(img.convert("RGB"))
    wait_until_served(url, log, proc)

    screenshot = Path(os.environ.get("BOUNDARYDIFFUSION_SCREENSHOT") or tmp_path / "app_screenshot.png")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(DIGIT))
            page.locator("#upload img").wait_for(timeout=30_000)  # the upload's preview
            number = page.locator("#distance input[type=number]")
            number.fill(f"{DISTANCE}")
            number.press("Tab")  # leaving the box releases the slider: the edit starts
            edit = page.locator("#edit img")
            edit.wait_for(timeout=60_000)
            page.locator("#caption").get_by_text("edit(s)").wait_for(timeout=60_000)
            shown = page.evaluate(READ_PIXELS, "#edit img")
            rgba = np.array(shown["data"], dtype=np.uint8).reshape(shown["height"], shown["width"], 4)
            assert rgba.shape[:2] == expected.shape[:2] == (16, 16)
            assert (rgba[..., 3] == 255).all()
            np.testing.assert_array_equal(rgba[..., :3], expected)
            assert "edit_00_d-3.00" in page.locator("#files").inner_text()  # offered for download
            # the sweep: the command line's labelled strip and GIF, for the screenshot
            page.get_by_text("Sweep", exact=True).first.click()
            page.locator("#sweep-button").click()
            page.locator("#grid").scroll_into_view_if_needed()  # its image loads lazily, once in view
            page.locator("#grid img").wait_for(timeout=60_000)
            page.locator("#gif img").wait_for(timeout=60_000)
            page.wait_for_timeout(300)

            # several attributes: one slider and one hold box per attribute at t_0 200
            for name in ("slant", "thick", "three_vs_eight"):
                assert page.locator(f"#joint-{name}").get_by_text(name).count() >= 1
            values = {"thick": drag(page, "#joint-thick", 0.2)}
            assert values["thick"] != 0
            wait_for_edit(page, cli_joint_edit(tmp_path, values))
            values["slant"] = drag(page, "#joint-slant", 0.8)
            assert values["slant"] != 0
            wait_for_edit(page, cli_joint_edit(tmp_path, values))
            keys = page.locator("#joint-three_vs_eight input[type=range]")
            keys.focus()
            for _ in range(20):  # twenty presses, faster than the edits: the last value's edit is shown
                keys.press("ArrowRight")
            values["three_vs_eight"] = float(page.locator("#joint-three_vs_eight input[type=number]").input_value())
            assert values["three_vs_eight"] == pytest.approx(0.2)  # 20 steps of 0.01
            wait_for_edit(page, cli_joint_edit(tmp_path, values))
            cosines = page.locator("#cosines").inner_text()  # the three moved attributes' normals, z and h
            assert "Cosines of the normals" in cosines and "three_vs_eight" in cosines and "No pair above" in cosines
            # digit_3's shipped normals lie at |cos| above the threshold 0.3 to three_vs_eight's: the page warns
            values["digit_3"] = drag(page, "#joint-digit_3", 0.6)
            assert values["digit_3"] != 0
            wait_for_edit(page, cli_joint_edit(tmp_path, values))
            page.locator("#cosines").get_by_text("Warning: entangled attributes").wait_for(timeout=30_000)
            warning = page.locator("#cosines").inner_text()
            for space in ("z", "h"):
                cos = shipped_cosine("digit_3", "three_vs_eight", space)
                assert abs(cos) > 0.3
                assert re.search(rf"(three_vs_eight and digit_3|digit_3 and three_vs_eight) \({space}: cos "
                                 rf"{re.escape(f'{cos:+.2f}')}\)", warning), (space, cos, warning)
            page.wait_for_timeout(300)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            page.locator("#hold-slant input").check()
            page.locator("#reset-button").click()  # every slider back to 0, every hold box cleared
            for name in values:
                page.wait_for_function("(s) => document.querySelector(s).value == '0'",
                                       arg=f"#joint-{name} input[type=number]", timeout=10_000)
            assert not page.locator("#hold-slant input").is_checked()
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000

    # the server stops on SIGTERM and removes its temporary files
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    found = re.search(r"temporary files in (\S+)", log.read_text())
    assert found, log.read_text()[-2000:]
    assert not Path(found.group(1)).exists()
