"""The web app (python main.py --serve) through its scripting API, in process: gradio_client calls
the named endpoints of a running app on the shipped digits model. The app's pixels equal the command
line's; a bad upload, a 100-megapixel upload and two sessions at once each end with a message or a
result while the server keeps serving; an image is inverted once per session."""
from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as cli
from tests.helpers import REPO, assert_one_error_line

gr = pytest.importorskip("gradio", reason="the web app's extra: pip install -r requirements-ui.txt")
from gradio_client import Client, handle_file  # noqa: E402  (comes with gradio)
from gradio_client.exceptions import AppError  # noqa: E402

from models.loading import load_model  # noqa: E402
from runners.app import WebApp, exposure_warning, slider_range  # noqa: E402
from runners.editor import BoundaryChoice, Editor, auto_span  # noqa: E402
from utils.io.boundary_files import auto_range  # noqa: E402
from runners.app_state import (AttributeTable, Cancelled, EditService, Prepared, Request,  # noqa: E402
                               SessionStore)

DIGIT = REPO / "imgs" / "digit_example.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def app():
    model = load_model("digits.yml")
    web = WebApp(model, REPO / "boundary", attribute="thick")  # batch sizes 8, 8: the CLI's on the CPU
    web.launch(port=free_port())
    yield web
    root = web.root
    web.close()
    assert not root.exists()  # every temporary file is removed


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def cli_edit(tmp_path: Path, *flags) -> Path:
    """The command line's edit of the example digit (no latent cache): its run folder."""
    argv = ["--edit_image_boundary", "--edit_attr", "thick", "--img_path", str(DIGIT), "--exp", str(tmp_path / "cli"),
            "--no_cache", *[str(f) for f in flags]]
    assert cli.main(argv) == 0
    return tmp_path / "cli" / "edit"


def test_edit_endpoint_equals_the_command_line(client, app, tmp_path):
    edit, original, recon, caption, details, files = client.predict(
        handle_file(str(DIGIT)), "thick@200", -3.0, api_name="/edit")
    assert details["distances"] == [-3.0] and details["steps"] == 40 and details["spaces"] == ["z", "h"]
    assert "thick" in caption and len(files) == 3
    run = cli_edit(tmp_path, "--start_distance", -3, "--end_distance", -3, "--edit_img_number", 1)
    assert Path(edit).name == "edit_00_d-3.00.png"
    for mine, theirs in ((edit, run / "edit_00_d-3.00.png"), (original, run / "original.png"),
                         (recon, run / "reconstruction.png")):
        np.testing.assert_array_equal(pixels(mine), pixels(theirs))
    # and the edit moved the digit: it differs from the reconstruction
    assert np.abs(pixels(edit).astype(int) - pixels(recon).astype(int)).max() > 10


def test_sweep_equals_the_command_line_with_other_settings(client, tmp_path):
    grid, gif, caption, details, files = client.predict(
        handle_file(str(DIGIT)), "thick@200", 3, -5.0, 0.0, "z", ["slant"], 12, 7, 0.5, api_name="/sweep")
    assert details["distances"] == [-5.0, -2.5, 0.0] and details["held"] == ["slant"] and details["spaces"] == ["z"]
    run = cli_edit(tmp_path, "--start_distance", -5, "--end_distance", 0, "--edit_img_number", 3, "--edit_space", "z",
                   "--condition_attr", "slant", "--n_test_step", 12, "--seed", 7, "--eta", 0.5, "--gif")
    np.testing.assert_array_equal(pixels(grid), pixels(run / "grid.png"))
    assert Path(gif).read_bytes() == (run / "edits.gif").read_bytes()
    by_name = {Path(f).name: f for f in files}
    for k, d in enumerate((-5.0, -2.5, 0.0)):
        name = f"edit_{k:02d}_d{d:+.2f}.png"
        np.testing.assert_array_equal(pixels(by_name[name]), pixels(run / name))


def test_a_slider_move_denoises_only_its_edit(client, app):
    client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, api_name="/edit")  # the session inverts the digit
    before = dict(app.service.stats)
    client.predict(handle_file(str(DIGIT)), "thick@200", -1.0, "both", [], 10, api_name="/edit")  # new steps
    middle = dict(app.service.stats)
    client.predict(handle_file(str(DIGIT)), "thick@200", -2.0, "both", [], 10, api_name="/edit")
    after = dict(app.service.stats)
    assert middle["inversions"] == before["inversions"]  # this session inverted the digit before
    assert middle["network_calls"] - before["network_calls"] == 20  # its reconstruction at 10 steps, the edit
    assert after["network_calls"] - middle["network_calls"] == 10  # the edit alone
    assert after["inversions"] == before["inversions"]


def test_bad_upload_is_a_message_and_the_server_keeps_serving(client, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    with pytest.raises(AppError, match="cannot be read") as raised:
        client.predict(handle_file(str(bad)), "thick@200", -3.0, api_name="/edit")
    assert "bad.png" in str(raised.value) and "boundarydiffusion-app" not in str(raised.value)  # no server path
    with pytest.raises(AppError, match="not in the list of choices"):  # refused before the app sees it
        client.predict(handle_file(str(DIGIT)), "../../etc/passwd", -3.0, api_name="/edit")
    edit = client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, api_name="/edit")[0]
    assert pixels(edit).shape == (16, 16)


def test_100_megapixel_upload_is_refused_with_a_message(client, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000), 128).save(huge)  # 100 megapixels, about 100 KB
    with pytest.raises(AppError, match="more than the limit"):
        client.predict(handle_file(str(huge)), "thick@200", -3.0, api_name="/edit")
    assert pixels(client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, api_name="/edit")[0]).shape == (16, 16)


def test_two_sessions_edit_at_once(app, client, tmp_path):
    """Two clients (two sessions, like two browser tabs) send edits at the same moment: both are
    answered, each with its own distance's pixels, and a bad upload in one does not disturb the other."""
    quick = ("both", [], 10)  # space, held, steps
    reference = {d: pixels(client.predict(handle_file(str(DIGIT)), "thick@200", d, *quick, api_name="/edit")[0])
                 for d in (-4.0, 0.0)}
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\0" * 64)
    first, second = Client(app.url, verbose=False), Client(app.url, verbose=False)
    jobs = [first.submit(handle_file(str(DIGIT)), "thick@200", -4.0, *quick, api_name="/edit"),
            second.submit(handle_file(str(DIGIT)), "thick@200", 0.0, *quick, api_name="/edit"),
            second.submit(handle_file(str(bad)), "thick@200", 0.0, *quick, api_name="/edit")]
    np.testing.assert_array_equal(pixels(jobs[0].result(timeout=60)[0]), reference[-4.0])
    np.testing.assert_array_equal(pixels(jobs[1].result(timeout=60)[0]), reference[0.0])
    with pytest.raises(AppError, match="cannot be read"):
        jobs[2].result(timeout=60)
    assert len(app.store) >= 3


def test_stop_ends_the_work_in_progress(app):
    """The stop button's endpoint stops the session's running job at its next network call."""
    stopper = Client(app.url, verbose=False)
    job = stopper.submit(handle_file(str(DIGIT)), "thick@400", -3.0, "both", [], 401, api_name="/edit")
    started = threading.Event()
    calls_at_start = app.service.stats["network_calls"]

    def wait_for_calls():
        while app.service.stats["network_calls"] < calls_at_start + 5 and not job.done():
            threading.Event().wait(0.02)
        started.set()

    threading.Thread(target=wait_for_calls, daemon=True).start()
    assert started.wait(60)
    stopper.predict(api_name="/stop")
    with pytest.raises(AppError, match="Stopped"):
        job.result(timeout=60)
    # the inversion at t_0 400 (40 calls), its reconstruction and the edit (401 each) did not all run
    assert app.service.stats["network_calls"] - calls_at_start < 40 + 2 * 401


# ------------------------------------------------------------------ without a server
def test_session_store_is_bounded(tmp_path):
    store = SessionStore(tmp_path, max_sessions=2, max_images=2)
    first = store.get("a")
    first.folder.mkdir(parents=True)
    for key in range(3):
        first.keep(key, Prepared(None, key, None))
    assert list(first.images) == [1, 2]  # the least recently used image was dropped
    assert first.lookup(1) is not None and list(first.images) == [2, 1]
    store.get("b")
    store.get("c")  # a third session: the least recently active one goes, with its files
    assert len(store) == 2 and not first.folder.exists()
    assert store.get("a").number != first.number  # "a" comes back as a new session
    store.drop("a")
    assert len(store) == 1


def test_service_refuses_paths_outside_the_upload_folder(tmp_path):
    model = load_model("digits.yml")
    table = AttributeTable(REPO / "boundary", model)
    service = EditService(model, table, SessionStore(tmp_path), 40, (8, 8), allowed_roots=[tmp_path / "uploads"])
    from utils.errors import UserError
    for path in (DIGIT, "/etc/passwd", str(tmp_path / "uploads" / ".." / "x.png"), None):
        with pytest.raises(UserError):
            service.check_path(path)
    with pytest.raises(UserError, match="unknown attribute"):
        table.get("thick")  # keys name the mixing step: thick@200
    with pytest.raises(UserError, match="no boundary of it"):
        table.choice("thick@300", "both", ["slant"])  # slant was fitted at t_0 200 only


def test_stop_flag_raises_at_the_next_network_call(tmp_path):
    model = load_model("digits.yml")
    table = AttributeTable(REPO / "boundary", model)
    store = SessionStore(tmp_path / "sessions")
    (tmp_path / "up").mkdir()
    image = tmp_path / "up" / "digit.png"
    image.write_bytes(DIGIT.read_bytes())
    service = EditService(model, table, store, 40, (8, 8), allowed_roots=[tmp_path / "up"])
    session = store.get("s")
    seen = []

    def progress(done, total, stage):
        seen.append((done, total, stage))
        if done == 3 and len(seen) == 3:  # the first job only
            session.stop()

    with pytest.raises(Cancelled):
        service.run(session, image, Request("thick@200", steps=10), [-3.0], progress)
    assert seen[-1] == (3, 39, "inverting")  # the inversion grid has 40 points: 39 calls
    result = service.run(session, image, Request("thick@200", steps=10), [-3.0], progress)  # the next job runs
    assert result.edits[0].is_file() and service.stats["inversions"] == 1


def test_slider_range_is_the_boundarys_auto_range_else_the_configs():
    model = load_model("digits.yml")
    assert slider_range(None, model.config) == (-5.5, 0.5)
    editor = Editor(model, 200, 40)
    directions = editor.directions(BoundaryChoice(z=REPO / "boundary" / "digits_thick_t200_z.npz",
                                                  h=REPO / "boundary" / "digits_thick_t200_h.npz"))
    lo, hi = auto_span(directions.records["z"])  # the command line's auto range of z, in the edit's v.n
    assert slider_range(directions, model.config) == (round(lo, 2), round(hi, 2))
    low, high = auto_range(directions.records["z"])  # where the thick classes lie along z
    assert lo < low < -2.6 < high < hi  # across both classes and the hyperplane (z.n = -2.6)


def test_serve_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert cli.main(["--serve"]) == 1
    assert_one_error_line(1, capsys.readouterr().err, "pip install -r requirements-ui.txt")


def test_other_hosts_than_loopback_are_warned_about():
    assert exposure_warning("127.0.0.1") is None and exposure_warning("localhost") is None
    assert "no authentication" in exposure_warning("0.0.0.0")
