"""The web app in a real browser, headless Chromium (from the system's packages, driven by Playwright).

On the digits (``python main.py --serve --config digits.yml`` on a free port, no --edit_attr: it
opens on digits.yml's edit.attribute, thick): the example digit is uploaded, and every attribute
slider moves to where the image sits (z's relative position, as the command line's summary.json
gives it). Then twenty arrow-key presses nudge three_vs_eight by +0.20, a mouse drag moves thick, a
hold box is ticked and thick nudged again, and digit_3 is dragged: each time the edit the page shows
-- its pixels read back from the page -- equals the command line's joint edit (``--edit A=u:u ...
--edit_unit shift [--condition_attr slant]``) for the values the sliders show, and the
entanglement warning names digit_3 and three_vs_eight. Two clicks on the region preview draw a box
(outlined in yellow) and thick is nudged again: the edit is the command line's with ``--region`` of
that box, its outside (beyond the feather) is the page's reconstruction and its inside moved. A
sweep in the region (its grid outlines the box, in white on the one-channel digits) fills the strip
and GIF; "Back to the image" puts every slider back where the image is, and "Clear region" clears
the box.

On the default, the faces (``python main.py --serve``, as the README starts it): the page opens on
Smiling, and a nudge of the uploaded face's Smiling slider is the command line's edit; the
screenshot is taken there.

Without Chromium or Playwright the tests are skipped, saying how to install them; with
BOUNDARYDIFFUSION_REQUIRE_BROWSER=1 (set by .ci/run) that is a failure instead.
BOUNDARYDIFFUSION_SCREENSHOT=path keeps the faces screenshot there (docs/app_screenshot.png)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
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
import torch
from PIL import Image

import main as cli
from tests.helpers import REPO
from utils.config import load_config

DIGIT = REPO / "imgs" / "digit_example.png"
FACE = REPO / "imgs" / "face_example.png"
DIGITS = ("--config", "digits.yml")  # the thorough test runs on the fast digits model; the default is the faces
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


@contextlib.contextmanager
def opened_page(url: str):
    """Headless Chromium at 1280 x 1000 showing ``url``: the page, closed on the way out."""
    sync_api, chromium = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            yield page
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path: Path, flags: tuple[str, ...]) -> tuple[str, Path, subprocess.Popen]:
    """``python main.py --serve *flags`` starting in its own process: (url, its output file, the process).
    The server computes with as many threads as this process, where the tests compare its edits
    with the command line's run here: on some CPUs (Intel with AMX) the kernels' results depend on
    the thread count, and test modules set this process to one thread (``torch.set_num_threads``)."""
    _browser()
    port = free_port()
    log = tmp_path / "server.log"
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "main.py", "--serve", "--port", str(port), "--no_cache", *flags],
                                cwd=REPO, stdout=err, stderr=subprocess.STDOUT, env=env)
    return f"http://127.0.0.1:{port}/", log, proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def server(tmp_path):
    """The app on the digits model."""
    url, log, proc = start_server(tmp_path, DIGITS)
    yield url, log, proc
    stop_server(proc)


@pytest.fixture()
def default_server(tmp_path):
    """The app as ``python main.py --serve`` starts it: on the default config, the faces."""
    url, log, proc = start_server(tmp_path, ())
    yield url, log, proc
    stop_server(proc)


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


def cli_joint_edit(tmp_path: Path, values: dict[str, float], positions: dict[str, float] | None = None,
                   held: tuple[str, ...] = (), region: str | None = None, config: tuple[str, ...] = DIGITS,
                   image: Path = DIGIT) -> tuple[np.ndarray, Path]:
    """The command line's joint edit of the example digit that the sliders' ``values`` ask for: each
    moved slider's change from the image's ``positions`` in the shift unit (``--edit A=u:u
    --edit_unit shift``, the moves in the order given; within ``region``, if any): its RGB pixels and
    its run folder. Without ``positions`` the values are the changes themselves."""
    run = tmp_path / f"cli-{len(list(tmp_path.glob('cli-*')))}"
    shifts = {n: round(u - (positions or {}).get(n, 0.0), 2) for n, u in values.items()}
    moves = [arg for name, u in shifts.items() for arg in ("--edit", f"{name}={u}:{u}")]
    hold = ["--condition_attr", ",".join(held)] if held else []
    where = ["--region", region] if region else []
    assert cli.main([*config, "--edit_image_boundary", *moves, *hold, *where, "--edit_unit", "shift",
                     "--edit_img_number", "1", "--img_path", str(image), "--exp", str(run), "--no_cache"]) == 0
    (edit,) = (run / "edit").glob("edit_00_*.png")
    with Image.open(edit) as img:
        return np.asarray(img.convert("RGB")), run / "edit"


def image_positions(tmp_path: Path, names: tuple[str, ...], config: tuple[str, ...] = DIGITS,
                    image: Path = DIGIT) -> dict[str, float]:
    """Where the example digit sits along ``names`` (z, relative unit, on the sliders' 0.01 step),
    from the command line's summary.json (its unedited latent's distances) and each boundary's
    relative unit (-1 and +1 at the class medians)."""
    from runners.engine import relative_scale
    from utils.io.boundary_files import boundary_name, boundary_path, load_boundary

    _, run = cli_joint_edit(tmp_path, dict.fromkeys(names, 0.0), config=config, image=image)
    distances = json.loads((run / "summary.json").read_text())["source_distances"]["z"]
    model = load_config(config[1] if config else cli.build_parser().get_default("config"))
    positions = {}
    for name in names:
        path = boundary_path(REPO / "boundary", boundary_name(model.name, name, model.edit.t_0, "z"))
        centre, half = relative_scale(load_boundary(path))
        distance = distances[name] if isinstance(distances, dict) else distances  # one attribute: a number
        positions[name] = round((distance - centre) / half, 2)
    return positions


def shipped_cosine(a: str, b: str, space: str) -> float:
    """The cosine of two shipped digits boundaries' normals at t_0 200, from the files."""
    normals = [np.load(REPO / "boundary" / f"digits_{name}_t200_{space}.npz")["normal"].astype(np.float64).ravel()
               for name in (a, b)]
    return float(normals[0] @ normals[1] / np.linalg.norm(normals[0]) / np.linalg.norm(normals[1]))


def shown_edit(page, selector: str = "#edit img") -> np.ndarray:
    shown = page.evaluate(READ_PIXELS, selector)
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


def slider_value(page, name: str) -> float:
    return float(page.locator(f"#joint-{name} input[type=number]").input_value())


def wait_for_value(page, name: str, value: float, timeout: float = 60_000) -> None:
    page.wait_for_function("([s, v]) => { const e = document.querySelector(s); "
                           "return e && !e.disabled && Math.abs(parseFloat(e.value) - v) < 0.001; }",
                           arg=[f"#joint-{name} input[type=range]", value], timeout=timeout)


def press(page, name: str, key: str, times: int) -> float:
    """Press ``key`` on the slider of ``name`` (focused) ``times`` times, faster than the edits run:
    only the last value's edit is shown. The value it shows."""
    keys = page.locator(f"#joint-{name} input[type=range]")
    keys.focus()
    for _ in range(times):
        keys.press(key)
    return slider_value(page, name)


def drag(page, name: str, fraction: float) -> float:
    """Drag the slider of ``name`` with the mouse to ``fraction`` of its track; the value it shows."""
    track = page.locator(f"#joint-{name} input[type=range]")
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * (fraction + 0.5) / 2, y, steps=5)
    page.mouse.move(box["x"] + box["width"] * fraction, y, steps=5)
    page.mouse.up()
    return slider_value(page, name)


def upload_and_locate(page, positions: dict[str, float]) -> None:
    """Upload the digit; every slider named in ``positions`` moves to the image's position."""
    assert page.locator("#joint-thick input[type=range]").is_disabled()  # no image yet: nothing to move from
    page.locator("#upload input[type=file]").set_input_files(str(DIGIT))
    for name, value in positions.items():
        wait_for_value(page, name, value)
    assert "three_vs_eight (z +1.02, h +0.92)" in page.locator("#positions").inner_text()


def nudge_drag_and_hold(page, tmp_path: Path, positions: dict[str, float]) -> dict[str, float]:
    """The moves of the test, each checked against the command line's joint edit; the values moved."""
    moved = {"three_vs_eight": press(page, "three_vs_eight", "ArrowRight", 20)}
    assert moved["three_vs_eight"] == pytest.approx(positions["three_vs_eight"] + 0.2)  # 20 steps of 0.01
    wait_for_edit(page, cli_joint_edit(tmp_path, moved, positions)[0])
    moved = {"thick": drag(page, "thick", 0.2), **moved}  # the page's order: thick (it opens on it) first
    assert moved["thick"] != positions["thick"]
    wait_for_edit(page, cli_joint_edit(tmp_path, moved, positions)[0])
    cosines = page.locator("#cosines").inner_text()
    assert "Cosines of the normals" in cosines and "No pair at |cos| 0.3 or above" in cosines
    page.locator("#hold-slant input").check()
    moved["thick"] = press(page, "thick", "ArrowLeft", 5)
    wait_for_edit(page, cli_joint_edit(tmp_path, moved, positions, held=("slant",))[0])
    assert "slant held" in page.locator("#caption").inner_text()
    # digit_3's shipped normals lie at |cos| above the threshold 0.3 to three_vs_eight's: the page warns
    moved = {"thick": moved["thick"], "digit_3": drag(page, "digit_3", 0.7), "three_vs_eight": moved["three_vs_eight"]}
    wait_for_edit(page, cli_joint_edit(tmp_path, moved, positions, held=("slant",))[0])
    page.locator("#cosines").get_by_text("Warning: entangled attributes").wait_for(timeout=30_000)
    warning = page.locator("#cosines").inner_text()
    for space in ("z", "h"):
        cos = shipped_cosine("digit_3", "three_vs_eight", space)
        assert abs(cos) >= 0.3
        assert re.search(rf"(three_vs_eight and digit_3|digit_3 and three_vs_eight) \({space}: cos "
                         rf"{re.escape(f'{cos:+.2f}')}\)", warning), (space, cos, warning)
    return moved


BOX = "0.25,0.25,0.75,0.75"  # the digit's pixels 4..11 in each direction


def click_pixel(page, pixel: tuple[int, int], size: int = 16) -> None:
    """Click the middle of the model pixel ``pixel`` (column, row) on the region preview (the
    image enlarged, drawn whole in its box: object-fit contain)."""
    box = page.locator("#region-image img").bounding_box()
    side = min(box["width"], box["height"])
    left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
    page.mouse.click(left + (pixel[0] + 0.5) * side / size, top + (pixel[1] + 0.5) * side / size)


def region_box(page) -> str:
    return page.locator("#region-box").locator("textarea, input").first.input_value()


def draw_region_and_nudge(page, tmp_path: Path, moved: dict[str, float], positions: dict[str, float]) -> None:
    """Two clicks on the preview (pixels (4, 4) and (11, 11)) make the box ``BOX``; thick nudged: the
    page's edit is the command line's joint edit with --region BOX, the outside beyond the feather (2
    pixels) is the page's reconstruction, and the inside moved."""
    page.locator("#region-image img").wait_for(timeout=60_000)
    click_pixel(page, (4, 4))
    page.locator("#region-note").get_by_text("click the opposite corner").wait_for(timeout=30_000)
    click_pixel(page, (11, 11))
    page.locator("#region-note").get_by_text(f"Region: box {BOX}, 25.0% of the image").wait_for(timeout=30_000)
    assert region_box(page) == BOX
    moved["thick"] = press(page, "thick", "ArrowRight", 3)
    expected = cli_joint_edit(tmp_path, moved, positions, held=("slant",), region=BOX)[0]
    wait_for_edit(page, expected)
    page.locator("#caption").get_by_text(f"Region: box {BOX}, 25.0% of the image").wait_for(timeout=30_000)
    recon = shown_edit(page, "#reconstruction img").astype(int)
    kept = np.ones((16, 16), dtype=bool)
    kept[2:14, 2:14] = False  # the box and the 2 pixels of the feather around it
    np.testing.assert_array_equal(expected[kept], recon[kept])
    assert np.abs(expected[4:12, 4:12].astype(int) - recon[4:12, 4:12]).max() > 10


def test_sliders_start_at_the_image_and_a_nudge_is_the_command_lines_edit(server, tmp_path):
    url, log, proc = server
    positions = image_positions(tmp_path, ("thick", "slant", "three_vs_eight", "digit_3"))  # while the server starts
    wait_until_served(url, log, proc)
    screenshot = tmp_path / "app_screenshot.png"
    with opened_page(url) as page:
        sliders = page.locator("[id^=joint-]")
        assert sliders.first.get_attribute("id") == "joint-thick" and sliders.count() == 13
        upload_and_locate(page, positions)
        moved = nudge_drag_and_hold(page, tmp_path, positions)
        draw_region_and_nudge(page, tmp_path, moved, positions)
        # the sweep (absolute distances, the attribute the page opened on): the strip and GIF
        page.get_by_text("Sweep (absolute distances v.n)", exact=True).first.click()
        page.locator("#sweep-button").click()
        page.locator("#grid").scroll_into_view_if_needed()  # its image loads lazily, once in view
        page.locator("#grid img").wait_for(timeout=60_000)
        page.locator("#gif img").wait_for(timeout=60_000)
        page.locator("#sweep-caption").get_by_text(f"Region: box {BOX}").wait_for(timeout=30_000)
        assert "thick" in page.locator("#attribute").inner_text() or \
            page.locator("#attribute input").input_value().startswith("thick")
        page.wait_for_timeout(300)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        page.locator("#back-button").click()  # every slider back where the image is, every hold cleared
        for name in moved:
            wait_for_value(page, name, positions[name], timeout=30_000)
        assert not page.locator("#hold-slant input").is_checked()
        page.locator("#clear-region").click()
        page.locator("#region-note").get_by_text("Region: the whole image").wait_for(timeout=30_000)
        assert region_box(page) == ""
    assert screenshot.stat().st_size > 10_000

    # the server stops on SIGTERM and removes its temporary files
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    found = re.search(r"temporary files in (\S+)", log.read_text())
    assert found, log.read_text()[-2000:]
    assert not Path(found.group(1)).exists()


def test_the_app_opens_on_the_faces_and_a_smile_nudge_is_the_command_lines_edit(default_server, tmp_path):
    """``python main.py --serve`` as the README starts it: the faces model, the page opening on
    Smiling (faces.yml's edit.attribute) with one slider per shipped attribute; the uploaded face's
    Smiling slider starts where the face is, fifty key presses move it by +0.50, and the page's edit
    equals the command line's. The screenshot (docs/app_screenshot.png) is taken here."""
    from utils.faces.factors import ATTRIBUTES

    url, log, proc = default_server
    positions = image_positions(tmp_path, ("Smiling",), config=(), image=FACE)  # while the server starts
    wait_until_served(url, log, proc)
    screenshot = Path(os.environ.get("BOUNDARYDIFFUSION_SCREENSHOT") or tmp_path / "app_screenshot.png")
    with opened_page(url) as page:
        sliders = page.locator("[id^=joint-]")
        assert sliders.first.get_attribute("id") == "joint-Smiling" and sliders.count() == len(ATTRIBUTES)
        assert page.locator("#joint-Smiling input[type=range]").is_disabled()  # nothing to move from yet
        page.locator("#upload input[type=file]").set_input_files(str(FACE))
        wait_for_value(page, "Smiling", positions["Smiling"])
        moved = {"Smiling": press(page, "Smiling", "ArrowRight", 50)}
        assert moved["Smiling"] == pytest.approx(positions["Smiling"] + 0.5)
        wait_for_edit(page, cli_joint_edit(tmp_path, moved, positions, config=(), image=FACE)[0])
        assert "Smiling" in page.locator("#caption").inner_text()
        page.wait_for_timeout(300)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
