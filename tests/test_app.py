"""The web app (python main.py --serve) through its scripting API, in process: gradio_client calls
the named endpoints of a running app on the shipped digits model. The app's pixels equal the command
line's; the sliders start where the image sits and a nudge edits from there; a bad upload, a
100-megapixel upload, requests of the wrong type or shape (a repeated JSON key, deep nesting, a list
for a name) and two sessions at once each end with a message or a result while the server keeps
serving; an image is inverted once per session, each session keeps its own share of the in-memory
store and is never told of another's work; a region (a box or an uploaded mask) gives the command
line's --region edit, and a bad one is a message; Stop ends a job at any stage; results stay downloadable
for the stated time; the server's files stay bounded, a failed start leaves nothing behind, and it
stops cleanly on SIGTERM."""
from __future__ import annotations

import ast
import builtins
import functools
import io
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import main as cli
from tests.helpers import REPO, assert_one_error_line

gr = pytest.importorskip("gradio", reason="the web app's extra: pip install -r requirements-ui.txt")
from gradio_client import Client, handle_file  # noqa: E402  (comes with gradio)
from gradio_client.exceptions import AppError  # noqa: E402

from runners import app as app_module  # noqa: E402
from runners.app import (WebApp, check_address, entanglement_warning, exposure_warning, page_message,  # noqa: E402
                         slider_range)
from runners.app_state import (JOBS_KEPT, MAX_IMAGES_PER_SESSION, MAX_NAMES, AttributeTable, Cancelled,  # noqa: E402
                               EditService, Prepared, Session, SessionStore)
from runners.engine import (HOLD_THRESHOLD, Engine, EngineOptions, load_model, relative_scale,  # noqa: E402
                            save_boundary)
from utils.errors import UserError  # noqa: E402
from utils.io.boundary_files import load_boundary  # noqa: E402
from utils.io.face_align import FaceAligner  # noqa: E402

DIGIT = REPO / "imgs" / "digit_example.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@functools.lru_cache(maxsize=1)
def digits_model():
    return load_model("digits.yml")


@pytest.fixture(scope="module")
def app():
    # batch sizes 8, 8: the CLI's on the CPU; two jobs at once (the two-sessions test needs them)
    web = WebApp(digits_model(), REPO / "boundary", attribute="thick", concurrency=2)
    web.launch(port=free_port())
    yield web
    root = web.root
    web.close()
    assert not root.exists()  # every temporary file is removed


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def cli_run(tmp_path: Path, *flags) -> Path:
    """The command line's edit of the example digit (no latent cache): its run folder."""
    run = tmp_path / f"cli{len(list(tmp_path.glob('cli*')))}"
    argv = ["--config", "digits.yml", "--edit_image_boundary", "--img_path", str(DIGIT), "--exp", str(run), "--no_cache",
            *map(str, flags)]
    assert cli.main(argv) == 0
    return run / "edit"


def cli_edit(tmp_path: Path, *flags) -> Path:
    """The command line's edit of thick (``--edit_attr thick``)."""
    return cli_run(tmp_path, "--edit_attr", "thick", *flags)


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
    with pytest.raises(AppError, match="unknown attribute '../../etc/passwd'"):  # a key of the table, never a path
        client.predict(handle_file(str(DIGIT)), "../../etc/passwd", -3.0, api_name="/edit")
    edit = client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, api_name="/edit")[0]
    assert pixels(edit).shape == (16, 16)


def test_100_megapixel_upload_is_refused_with_a_message(client, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000), 128).save(huge)  # 100 megapixels, about 100 KB
    with pytest.raises(AppError, match="more than the limit"):
        client.predict(handle_file(str(huge)), "thick@200", -3.0, api_name="/edit")
    assert pixels(client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, api_name="/edit")[0]).shape == (16, 16)


def test_two_sessions_edit_at_once(app, client, tmp_path, monkeypatch):
    """Two clients (two sessions, like two browser tabs) send edits at the same moment to an app
    that runs two jobs at once: the two jobs do run at the same time (each waits for the other to
    start), both are answered, each with its own distance's pixels, and a bad upload in one does not
    disturb the other."""
    quick = ("both", [], 10)  # space, held, steps
    reference = {d: pixels(client.predict(handle_file(str(DIGIT)), "thick@200", d, *quick, api_name="/edit")[0])
                 for d in (-4.0, 0.0)}
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\0" * 64)
    both_started = threading.Barrier(2, timeout=30)  # broken (an internal error) unless two jobs run at once
    calls = iter(range(1_000))
    run = app.service.run

    def run_together(*args, **kwargs):
        if next(calls) < 2:
            both_started.wait()
        return run(*args, **kwargs)

    monkeypatch.setattr(app.service, "run", run_together)
    first, second = Client(app.url, verbose=False), Client(app.url, verbose=False)
    jobs = [first.submit(handle_file(str(DIGIT)), "thick@200", -4.0, *quick, api_name="/edit"),
            second.submit(handle_file(str(DIGIT)), "thick@200", 0.0, *quick, api_name="/edit"),
            second.submit(handle_file(str(bad)), "thick@200", 0.0, *quick, api_name="/edit")]
    np.testing.assert_array_equal(pixels(jobs[0].result(timeout=60)[0]), reference[-4.0])
    np.testing.assert_array_equal(pixels(jobs[1].result(timeout=60)[0]), reference[0.0])
    with pytest.raises(AppError, match="cannot be read"):
        jobs[2].result(timeout=60)
    assert len(app.store) >= 3


def test_a_fresh_session_is_not_told_of_another_sessions_inversion(app):
    """Session B edits an image session A edited: the engine reuses A's latents (no new inversion),
    but B is told what B knows (its first edit of that image), not "inversion kept from before",
    which would tell it that someone else edited the image."""
    a, b = Client(app.url, verbose=False), Client(app.url, verbose=False)
    first = a.predict(handle_file(str(DIGIT)), "thick@200", -2.0, "both", [], 5, api_name="/edit")
    before = dict(app.service.stats)
    fresh = b.predict(handle_file(str(DIGIT)), "thick@200", -2.0, "both", [], 5, api_name="/edit")
    assert app.service.stats["inversions"] == before["inversions"]  # the engine's store served it
    assert fresh[4]["inversion_cached"] is False and "kept from before" not in fresh[3]
    again = b.predict(handle_file(str(DIGIT)), "thick@200", -1.0, "both", [], 5, api_name="/edit")
    assert again[4]["inversion_cached"] is True and "kept from before" in again[3]
    np.testing.assert_array_equal(pixels(first[0]), pixels(fresh[0]))


def test_stop_ends_the_work_in_progress(app, monkeypatch):
    """The stop button's endpoint stops the session's running job at its next network call: of the
    job's 39 + 401 + 401 calls (the inversion at t_0 400 with 40 points, its reconstruction and the
    edit at 401 steps), at most the one under way when the flag is set ends after it."""
    at_flag = []
    stop = app.store.stop

    def stop_noting_the_count(session_id):
        at_flag.append(app.service.stats["network_calls"])
        stop(session_id)

    monkeypatch.setattr(app.store, "stop", stop_noting_the_count)
    stopper = Client(app.url, verbose=False)
    job = stopper.submit(handle_file(str(DIGIT)), "thick@400", -3.0, "both", [], 401, api_name="/edit")
    calls_at_start = app.service.stats["network_calls"]
    deadline = time.monotonic() + 60
    while app.service.stats["network_calls"] < calls_at_start + 5 and not job.done():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stopper.predict(api_name="/stop")
    with pytest.raises(AppError, match="Stopped"):
        job.result(timeout=60)
    assert len(at_flag) == 1 and at_flag[0] - calls_at_start < 39 + 401 + 401
    assert app.service.stats["network_calls"] - at_flag[0] <= 1  # the call under way, whose hook saw the flag


# ------------------------------------------------------------------ the sliders start where the image is
def relative_positions(summary: dict) -> dict[str, dict[str, float]]:
    """{attribute: {space: relative position}} of the command line's summary.json: its unedited
    latent's distances through each boundary's relative unit (``relative_scale``)."""
    found = {}
    for space, by_name in summary["source_distances"].items():
        for name, d in by_name.items():
            record = load_boundary(REPO / "boundary" / f"digits_{name}_t200_{space}.npz")
            centre, half = relative_scale(record)
            found.setdefault(name, {})[space] = (d - centre) / half
    return found


def test_sliders_start_at_the_image_and_a_nudge_is_the_command_lines_joint_edit(app, tmp_path):
    """After an upload every slider shows where the image sits (z's relative position, as the
    command line's summary gives it); twenty 0.01 steps of three_vs_eight's slider then edit with
    --edit three_vs_eight=0.2:0.2 --edit_unit shift, pixel for pixel: the target moves 0.2 relative
    units from where the image is, in z and in h alike (before, the slider started at 0 whatever the
    image, so the first press set three_vs_eight's h from +12.30 to +3.16)."""
    session = app.store.get("sliders")
    updates = app.locate(session, None, str(DIGIT), "both", None)
    shown = {e.key: u.value for e, u in zip(app.sliders, updates)}
    assert all(u.interactive for u in updates[:-1]) and "three_vs_eight (z +1.02, h +0.92)" in updates[-1]
    run = cli_run(tmp_path, "--edit", "thick=0:0", "--edit", "slant=0:0", "--edit", "three_vs_eight=0:0",
                  "--edit_img_number", 1)
    expected = relative_positions(json.loads((run / "summary.json").read_text()))
    for name in ("thick", "slant", "three_vs_eight"):
        assert shown[f"{name}@200"] == round(expected[name]["z"], 2)
    values = [shown[e.key] for e in app.sliders]
    nudged = next(i for i, e in enumerate(app.sliders) if e.name == "three_vs_eight")
    values[nudged] = round(values[nudged] + 20 * 0.01, 2)
    result = app.slider_edit(session, None, str(DIGIT), "both", 40, 1234, 1.0, False, values,
                             [False] * len(values))
    edit, details = result[0], result[4]
    assert details["attributes"] == ["three_vs_eight"] and details["unit"] == "shift"  # the others not moved
    theirs = cli_run(tmp_path, "--edit", "three_vs_eight=0.2:0.2", "--edit_unit", "shift", "--edit_img_number", 1)
    assert [p.name for p in theirs.glob("edit_00_*.png")] == [Path(edit).name]
    np.testing.assert_array_equal(pixels(edit), pixels(next(theirs.glob("edit_00_*.png"))))
    for space in ("z", "h"):  # the shift's targets are changes: 0.2 relative units in each space
        half = relative_scale(load_boundary(REPO / "boundary" / f"digits_three_vs_eight_t200_{space}.npz"))[1]
        assert details["targets"][0]["three_vs_eight"][space] == pytest.approx(0.2 * half, rel=1e-9)


def test_a_held_slider_is_held_and_unmoved_sliders_are_not_an_edit(app, tmp_path):
    session = app.store.get("holds")
    shown = {e.key: u.value for e, u in zip(app.sliders, app.locate(session, None, str(DIGIT), "both", None))}
    values = [shown[e.key] for e in app.sliders]
    holds = [e.name == "slant" for e in app.sliders]
    with pytest.raises(UserError, match="every slider is at the image's own position"):
        app.slider_edit(session, None, str(DIGIT), "both", 10, 1234, 1.0, False, values, holds)
    thick = next(i for i, e in enumerate(app.sliders) if e.name == "thick")
    values[thick] = round(values[thick] - 0.5, 2)
    values[next(i for i, e in enumerate(app.sliders) if e.name == "slant")] += 3.0  # held: its value is ignored
    edit, *_, details, _, cosines = app.slider_edit(session, None, str(DIGIT), "both", 10, 1234, 1.0, False, values,
                                                    holds)
    assert details["held"] == ["slant"] and "Cosines of the normals" in cosines
    theirs = cli_run(tmp_path, "--edit", "thick=-0.5:-0.5", "--edit_unit", "shift",
                     "--condition_attr", "slant", "--n_test_step", 10, "--edit_img_number", 1)
    np.testing.assert_array_equal(pixels(edit), pixels(next(theirs.glob("edit_00_*.png"))))


def test_the_page_opens_on_the_configs_attribute_and_keeps_one_control_set():
    """Without --edit_attr the page opens on digits.yml's edit.attribute (thick, the README's), not
    on the first name (digit_0); its slider comes first. The page has no single-attribute distance
    slider beside the attribute sliders."""
    web = WebApp(digits_model(), REPO / "boundary")
    try:
        assert web.opening == "thick@200" and web.sliders[0].key == "thick@200"
        elements = {getattr(b, "elem_id", None) for b in web.blocks.blocks.values()}
        assert "distance" not in elements and {"joint-thick", "hold-thick", "back-button"} <= elements
    finally:
        web.close()
    with pytest.raises(UserError, match="--edit_attr no_such: no usable boundary"):
        WebApp(digits_model(), REPO / "boundary", attribute="no_such")


# ------------------------------------------------------------------ without a server
def local_service(tmp_path: Path, boundary_dir: Path = REPO / "boundary", max_sessions: int = 16,
                  max_images: int = MAX_IMAGES_PER_SESSION) -> tuple[EditService, object, Path]:
    """The app's work without a server, on the digits model and ``boundary_dir``'s boundaries, with
    the engine the app makes (its store shared fairly among the sessions): (the service, one
    session, the example digit as an upload it may read)."""
    engine = Engine(digits_model(), EngineOptions(show_progress=False, recent_images=max_sessions * max_images,
                                                  per_owner=max_images))
    store = SessionStore(tmp_path / "sessions", max_sessions, max_images, on_forget=engine.recent.forget_owner)
    (tmp_path / "up").mkdir()
    image = tmp_path / "up" / "digit.png"
    image.write_bytes(DIGIT.read_bytes())
    table = AttributeTable(engine, engine.boundary_index(boundary_dir), 40, 200)
    service = EditService(engine, table, store, 40, (8, 8), 40, allowed_roots=[tmp_path / "up"])
    return service, store.get("s"), image


def test_session_store_is_bounded(tmp_path):
    forgotten = []
    store = SessionStore(tmp_path, max_sessions=2, max_images=2, on_forget=forgotten.append)
    first = store.get("a")
    with first.job_folder() as folder:
        (folder / "edit.png").write_bytes(b"x")
    for key in range(3):
        first.keep(key, Prepared(None))
    assert list(first.images) == [1, 2]  # the least recently used image was dropped
    assert first.lookup(1) is not None and list(first.images) == [2, 1]
    store.get("b")
    store.get("c")  # a third session: the least recently active one goes, with its files and latents
    assert len(store) == 2 and not first.folder.exists() and forgotten == [first.number]
    assert store.get("a").number != first.number  # "a" comes back as a new session
    store.drop("a")
    assert len(store) == 1


def finished_job(session: Session) -> Path:
    with session.job_folder() as folder:
        (folder / "edit.png").write_bytes(b"x")
    return folder


def test_results_are_kept_for_the_stated_time_and_never_removed_while_their_job_runs(tmp_path):
    """A job's folder is removed only after its job ends (before, starting job n removed job n - 2,
    even while it ran under --concurrency 2); finished ones stay at least ``keep_seconds`` (before,
    58 of 60 back-to-back results were gone before the client downloaded them), at most
    ``max_jobs`` of them; a failed job's folder goes at once."""
    kept = Session(0, tmp_path / "kept", 4, keep_seconds=600, max_jobs=64)
    folders = [finished_job(kept) for _ in range(60)]
    assert all(f.is_dir() for f in folders)
    capped = Session(1, tmp_path / "capped", 4, keep_seconds=600, max_jobs=3)
    folders = [finished_job(capped) for _ in range(5)]
    assert [f.is_dir() for f in folders] == [False, False, True, True, True]
    expiring = Session(2, tmp_path / "expiring", 4, keep_seconds=0, max_jobs=64)
    with expiring.job_folder() as running:
        (running / "edit_00.png").write_bytes(b"x")
        others = [finished_job(expiring) for _ in range(4)]
        assert running.is_dir()  # still running: never removed
        assert [f.is_dir() for f in others] == [False, False, True, True]  # the newest JOBS_KEPT stay
    assert not running.exists() and len(list(expiring.folder.iterdir())) == JOBS_KEPT
    with pytest.raises(RuntimeError), expiring.job_folder() as failed:
        raise RuntimeError("the job failed")
    assert not failed.exists()


def test_a_dropped_session_removes_a_running_jobs_folder_when_the_job_ends(tmp_path):
    store = SessionStore(tmp_path / "sessions")
    session = store.get("tab")
    done = finished_job(session)
    with session.job_folder() as running:
        store.drop("tab")
        assert not done.exists() and running.is_dir()
    assert not session.folder.exists()


class SlowImages(OrderedDict):
    """A session's images whose lookups take a while: another thread runs between finding an entry
    and using it (what a thread switch does, rarely, to a real OrderedDict)."""

    def get(self, key, default=None):
        found = super().get(key, default)
        time.sleep(0.0001)
        return found


class SlowCounts(dict):
    """Counters whose reads take a while: ``stats[name] += 1`` from two threads loses counts
    unless a lock orders them."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        time.sleep(0.0001)
        return value


def test_sessions_and_counters_change_under_a_lock(tmp_path):
    """Concurrent jobs of one session (--concurrency > 1) and of many sessions update a session's
    images and the service's counters at once: every count arrives and a lookup never meets an
    entry another job is dropping (before, with no lock: lost counts and KeyErrors)."""
    service, _, _ = local_service(tmp_path)
    service.stats = SlowCounts(service.stats)
    session, errors = Session(0, tmp_path / "s", max_images=2), []
    session.images = SlowImages()

    def hammer(offset: int) -> None:
        for i in range(300):
            service.count("edits")
            try:
                session.keep((offset + i) % 5, Prepared(None))
                session.lookup((offset + i + 1) % 5)
            except Exception as exc:  # noqa: BLE001 (a lost race is the failure)
                errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and service.stats["edits"] == 4 * 300 and len(session.images) == 2


def test_one_session_cannot_evict_another_sessions_images(tmp_path):
    """Session b uploads five different images while session a keeps one: a's stays in the engine's
    store (each session holds its own ``per_owner`` share), so a's next edit inverts nothing.
    (Before, the store was one LRU for all: 66 uploads from one tab evicted every other tab's.)"""
    service, a, image = local_service(tmp_path, max_sessions=2, max_images=2)
    b = service.store.get("b")
    request = service.request({"thick": -2.0}, steps=2)
    service.run(a, image, request)
    base = pixels(DIGIT)
    for i in range(5):
        variant = base.copy()
        variant.flat[i] ^= 0xFF
        path = tmp_path / "up" / f"other{i}.png"
        Image.fromarray(variant).save(path)
        service.run(b, path, request)
    before = service.stats["inversions"]
    service.run(a, image, request)
    assert service.stats["inversions"] == before
    assert len(service.engine.recent) <= 4


def test_a_few_reconstructions_are_kept_per_image(tmp_path):
    """Edits at many step counts keep at most the engine's few reconstructions per image (before,
    every step count's stayed in the session for as long as the image did)."""
    service, session, image = local_service(tmp_path)
    for steps in (2, 3, 4, 5, 6):
        service.run(session, image, service.request({"thick": -2.0}, steps=steps))
    assert len(service.engine.reconstructions) == 2
    before = service.stats["network_calls"]
    service.run(session, image, service.request({"thick": -1.0}, steps=6))  # the latest is kept: edit only
    assert service.stats["network_calls"] - before == 6


def test_service_refuses_paths_outside_the_upload_folder(tmp_path):
    service, session, image = local_service(tmp_path)
    for path in (DIGIT, "/etc/passwd", str(tmp_path / "up" / ".." / "x.png"), None):
        with pytest.raises(UserError):
            service.check_path(path)
    with pytest.raises(UserError, match="unknown attribute"):
        service.table.get("thick@250")  # keys name the mixing step
    assert service.table.get("thick").key == service.table.get("THICK@200").key == "thick@200"  # the default t_0
    with pytest.raises(UserError, match="no boundary for 'slant' at t_0 300"):  # slant was fitted at t_0 200 only
        service.run(session, image, service.request({"thick@300": -3.0}, hold=["slant"], steps=5))
    assert service.stats["network_calls"] == 0


def test_stop_flag_raises_at_the_next_network_call(tmp_path):
    service, session, image = local_service(tmp_path)
    seen = []

    def progress(done, total, stage):
        seen.append((done, total, stage))
        if done == 3 and len(seen) == 3:  # the first job only
            session.stop()

    request = service.request({"thick@200": -3.0}, steps=10)
    with pytest.raises(Cancelled):
        service.run(session, image, request, progress)
    assert seen[-1] == (3, 39, "inverting")  # the inversion grid has 40 points: 39 calls
    assert list(session.folder.iterdir()) == []  # the stopped job's folder is gone
    result = service.run(session, image, request, progress)  # the next job runs
    assert result.edits[0].is_file() and service.stats["inversions"] == 1


def test_stop_ends_a_job_between_stages(tmp_path, monkeypatch):
    """Stop pressed while the boundary files are read (no network call runs then) ends the job
    before its inversion starts: not one network call."""
    service, session, image = local_service(tmp_path)
    read = service.engine.describe

    def stop_while_reading(*args):
        found = read(*args)
        session.stop()  # the user presses stop while the condition files load
        return found

    monkeypatch.setattr(service.engine, "describe", stop_while_reading)
    with pytest.raises(Cancelled):
        service.run(session, image, service.request({"thick@200": -3.0}, hold=["slant"], steps=10))
    assert service.stats["network_calls"] == 0 and service.stats["inversions"] == 0


def test_slider_range_is_the_boundarys_auto_range_else_the_configs():
    model = digits_model()
    assert slider_range(None, model.config) == (-5.5, 0.5)  # digits.yml's edit.start/end_distance
    record = load_boundary(REPO / "boundary" / "digits_thick_t200_z.npz", model.shapes)
    # By hand from digits_thick_t200_z.npz: its train summary puts the negative class's 5th percentile
    # at s = -1.8308 and the positive class's 95th at s = 2.0642 (hyperplane distances); the edit's
    # v.n = s - b/||w|| with b/||w|| = 5.2006 / 2.0215 = 2.5726, so -4.4034 .. -0.5084 (3.8950 wide);
    # widened by 2 about its centre -2.4559 (docs/modes.md): -2.4559 -/+ 3.8950 = -6.3509 .. 1.4391.
    assert slider_range(record, model.config) == (-6.35, 1.44)
    assert record.intercept == pytest.approx(5.2006, abs=1e-4)  # the file the numbers came from


def unusable_summary(record, how: str):
    """``record`` with a class summary the app cannot take a range from: without the positive
    class's latents, with its percentiles crossed, or with values near the float limit."""
    import dataclasses

    summary = {split: {cls: dict(stats) for cls, stats in by_class.items()}
               for split, by_class in record.class_summary.items()}
    if how == "missing class":
        summary["train"]["pos"] = dict.fromkeys(summary["train"]["pos"], float("nan"))
    elif how == "crossed":
        summary["train"]["neg"]["p5"], summary["train"]["pos"]["p95"] = 30.0, -30.0
    else:
        summary["train"]["neg"]["p5"], summary["train"]["pos"]["p95"] = -1e308, 1e308
    return dataclasses.replace(record, class_summary=summary)


@pytest.mark.parametrize("how", ["missing class", "crossed", "near the float limit"])
def test_a_boundary_whose_summary_is_unusable_takes_the_configs_range(how, caplog):
    record = load_boundary(REPO / "boundary" / "digits_slant_t200_z.npz", digits_model().shapes)
    with caplog.at_level("WARNING"):
        assert slider_range(unusable_summary(record, how), digits_model().config) == (-5.5, 0.5)
    assert "slant" in caplog.text and "config's range" in caplog.text


def copy_boundaries(folder: Path, names=("slant", "thick")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        for space in ("z", "h"):
            path = REPO / "boundary" / f"digits_{name}_t200_{space}.npz"
            (folder / path.name).write_bytes(path.read_bytes())


def test_the_app_starts_when_one_boundary_file_has_no_class_of_its_summary(tmp_path):
    """One boundary file whose summary lacks a class stopped the app from starting: that attribute
    now takes the config's range for its sweep and has no slider (it has no relative unit); the
    others are offered as before."""
    copy_boundaries(tmp_path)
    record = load_boundary(REPO / "boundary" / "digits_slant_t200_z.npz", digits_model().shapes)
    save_boundary(tmp_path / "digits_slant_t200_z.npz", unusable_summary(record, "missing class"))
    web = WebApp(digits_model(), tmp_path)
    try:
        assert sorted(web.table.entries) == ["slant@200", "thick@200"]
        assert web.ranges == {"slant@200": (-5.5, 0.5), "thick@200": (-6.35, 1.44)}
        assert [e.key for e in web.sliders] == ["thick@200"]
    finally:
        web.close()


def partial_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(".partial-boundarydiffusion-app-*"))


def test_a_failed_start_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """A start that fails after the app's folder was made (here: building the page) removes it
    and gives Gradio's folder setting back; a folder of unusable boundaries is one message."""
    before, previous = partial_folders(), app_module.os.environ.get("GRADIO_TEMP_DIR")

    def broken(self, gr):
        raise UserError("the page cannot be built")

    monkeypatch.setattr(WebApp, "_build", broken)
    with pytest.raises(UserError, match="the page cannot be built"):
        WebApp(digits_model(), REPO / "boundary")
    assert partial_folders() <= before and app_module.os.environ.get("GRADIO_TEMP_DIR") == previous
    monkeypatch.undo()
    import dataclasses

    copy_boundaries(tmp_path, ["thick"])
    for space in ("z", "h"):  # fitted on another checkpoint: the engine refuses them
        path = tmp_path / f"digits_thick_t200_{space}.npz"
        save_boundary(path, dataclasses.replace(load_boundary(path), checkpoint_sha256="0" * 64))
    with pytest.raises(UserError, match="no boundary in .* can be used"):
        WebApp(digits_model(), tmp_path)
    assert partial_folders() <= before


def test_a_forged_atlas_is_never_read(tmp_path, monkeypatch):
    """The app reads no atlas.json (a 63 MB one took 58 s and 7.4 GB at start; one with
    format_version 1e400 or list-valued entries stopped it from starting): it starts beside a
    forged one, and the entanglement threshold is the engine's HOLD_THRESHOLD."""
    copy_boundaries(tmp_path)
    (tmp_path / "atlas.json").write_text('{"format_version": 1e400, "hold_threshold": [0.05], "attributes": 7, '
                                         '"cosines": {"z": [[1e400]]}}')
    opened = []
    real_open, real_io_open = builtins.open, io.open

    def noting(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", noting)
    monkeypatch.setattr(io, "open", lambda file, *a, **k: (opened.append(str(file)), real_io_open(file, *a, **k))[1])
    web = WebApp(digits_model(), tmp_path)
    monkeypatch.undo()
    try:
        assert not [p for p in opened if p.endswith("atlas.json")]
        assert sorted(web.table.entries) == ["slant@200", "thick@200"]
    finally:
        web.close()


def test_the_entanglement_threshold_is_the_engines_and_reached_counts():
    """One threshold, the engine's HOLD_THRESHOLD, compared with >= as the command line's
    --condition_attr auto does: a pair at exactly the threshold is entangled (before: >)."""
    names = ["age", "glasses", "smile"]
    at = HOLD_THRESHOLD
    cosines = {"z": [[1, at, 0.1], [at, 1, -0.05], [0.1, -0.05, 1]],
               "h": [[1, 0.2, -0.31], [0.2, 1, 0.0], [-0.31, 0.0, 1]]}
    warning = entanglement_warning(names, cosines)
    assert f"age and glasses (z: cos {at:+.2f})" in warning and "age and smile (h: cos -0.31)" in warning
    assert "glasses and smile" not in warning
    assert entanglement_warning(names, {"z": [[1, 0.1, 0], [0.1, 1, 0], [0, 0, 1]]}) is None
    assert not hasattr(app_module, "atlas_threshold")


def test_serve_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert cli.main(["--serve"]) == 1
    assert_one_error_line(1, capsys.readouterr().err, "pip install -r requirements-ui.txt")


def test_other_hosts_than_loopback_are_warned_about():
    for loopback in ("127.0.0.1", "localhost", "127.0.0.2", "LOCALHOST", "::1", "[::1]", "127.255.0.9"):
        assert exposure_warning(loopback) is None, loopback
    for public in ("0.0.0.0", "192.0.2.1", "::", "example.com"):
        assert "no authentication" in exposure_warning(public), public


def test_no_function_of_the_app_is_longer_than_60_lines():
    """Each function of runners/app.py and runners/app_state.py fits on a screen (before,
    ``WebApp._build`` was 205 lines with nine closures)."""
    for path in (REPO / "runners" / "app.py", REPO / "runners" / "app_state.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name}"


# ------------------------------------------------------------------ serving
@pytest.mark.parametrize("flags, words", [
    (["--port", "65536"], ["--port must be in [1, 65535], got 65536"]),
    (["--host", "192.0.2.1"], ["cannot serve on 192.0.2.1", "choose another with --host"]),  # TEST-NET-1
    (["--host", "no-such-host.invalid"], ["--host no-such-host.invalid"]),
])
def test_an_address_the_app_cannot_serve_on_is_one_line_naming_the_flag(flags, words, capsys):
    assert_one_error_line(cli.main(["--serve", *flags]), capsys.readouterr().err, *words)


def test_a_port_in_use_is_one_line_naming_the_port(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = assert_one_error_line(cli.main(["--serve", "--port", str(port)]), capsys.readouterr().err,
                                     f"port {port} on 127.0.0.1 is in use: choose another with --port")
    assert "GRADIO" not in line


def test_an_ipv6_address_is_served_in_brackets():
    assert check_address("::1", free_port()) == "[::1]"
    assert check_address("127.0.0.1", free_port()) == "127.0.0.1"


def start_server(tmp_path: Path, name: str, *flags) -> tuple[subprocess.Popen, int, Path]:
    """``python main.py --serve`` (on the digits unless ``flags`` name a config) in its own process on a free
    port: (process, port, its output)."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        config = () if "--config" in flags else ("--config", "digits.yml")  # the fast model; the default is the faces
        proc = subprocess.Popen([sys.executable, "main.py", "--serve", "--port", str(port), "--no_cache", *config, *flags],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return proc, port, log


def served_folder(proc: subprocess.Popen, log: Path, timeout: float = 120) -> Path:
    """Once the server serves: the temporary folder it names in its log."""
    deadline = time.monotonic() + timeout
    while "serving" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return Path(re.search(r"temporary files in (\S+)", log.read_text()).group(1))


def folder_of_a_killed_server() -> Path:
    """The temporary folder a server killed with SIGKILL leaves: made as the app makes its own, by
    a process that is then gone."""
    made = subprocess.run([sys.executable, "-c", "import tempfile; from pathlib import Path; "
                           "from utils.io.files import new_partial_folder; "
                           "print(new_partial_folder(Path(tempfile.gettempdir()), 'boundarydiffusion-app'))"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    folder = Path(made.stdout.strip())
    (folder / "gradio").mkdir()
    (folder / "gradio" / "upload.png").write_bytes(DIGIT.read_bytes())
    return folder


def test_sigterm_during_a_sweep_stops_the_server_cleanly(tmp_path):
    """A server starting (here on the IPv6 loopback address, without the public-address warning)
    removes the folder a killed server left. SIGTERM while a sweep is being denoised: the job
    stops, its thread ends, the server exits 0 and its temporary folder is gone."""
    left = folder_of_a_killed_server()
    proc, port, log = start_server(tmp_path, "server", "--host", "::1")
    try:
        folder = served_folder(proc, log)
        assert not left.exists() and folder.is_dir()
        assert "warning" not in log.read_text()
        client = Client(f"http://[::1]:{port}/", verbose=False)
        job = client.submit(handle_file(str(DIGIT)), "thick@400", 8, -5.0, 0.0, "both", [], 401, api_name="/sweep")
        deadline = time.monotonic() + 60
        while not (job.status().progress_data or job.done()):  # the sweep is under way
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert not job.done()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert not folder.exists()
    assert output.index("stopping") < output.index("stopped")
    assert "Traceback" not in output and "terminate called" not in output


def test_serve_honours_its_flags(tmp_path):
    """--serve takes --h_policy (before, the app hard-coded lagged), --n_test_step (the page's default
    steps), --n_inv_step, --t_0 and --edit_attr (the attribute the page opens on): /edit with no
    steps named is the command line's edit with the same flags, pixel for pixel."""
    flags = ["--h_policy", "once", "--n_test_step", "7", "--n_inv_step", "30", "--t_0", "200", "--edit_attr", "slant"]
    proc, port, log = start_server(tmp_path, "flags", *flags)
    try:
        served_folder(proc, log)
        url = f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url + "config", timeout=10) as response:
            components = json.load(response)["components"]
        props = {c["props"].get("elem_id"): c["props"] for c in components if c.get("props", {}).get("elem_id")}
        assert props["attribute"]["value"] == "slant@200" and "joint-slant" in props
        assert all(value.endswith("@200") for _, value in props["attribute"]["choices"])  # --t_0 200 only
        edit, _, _, _, details, _ = Client(url, verbose=False).predict(handle_file(str(DIGIT)), "slant", 1.0,
                                                                       api_name="/edit")
        assert details["steps"] == 7 and details["h_policy"] == "once" and details["t_0"] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    run = cli_run(tmp_path, *flags, "--start_distance", 1, "--end_distance", 1, "--edit_img_number", 1)
    np.testing.assert_array_equal(pixels(edit), pixels(run / "edit_00_d+1.00.png"))


# ------------------------------------------------------------------ hostile requests
WRONG_TYPES = {  # what is sent (after the image and attribute) -> the message
    "a string for the distance": ("/edit", ["abc"], "the distance of thick must be a number, got 'abc'"),
    "a string for the steps": ("/edit", [-3.0, "both", [], "x"], "steps must be a whole number, got 'x'"),
    "fractional steps": ("/edit", [-3.0, "both", [], 10.5], "steps must be a whole number, got 10.5"),
    "steps beyond t_0": ("/edit", [-3.0, "both", [], 500], "'Denoising steps' must be in [2, 201] at t_0 200"),
    "a fractional seed": ("/edit", [-3.0, "both", [], 10, 7.5], "seed must be a whole number, got 7.5"),
    "a string for eta": ("/edit", [-3.0, "both", [], 10, 1, "q"], "eta must be a number, got 'q'"),
    "a number for the held attributes": ("/edit", [-3.0, "both", 5], "must be a list of attribute names"),
    "a list for the space": ("/edit", [-3.0, ["z"]], "space must be text"),
    "an unknown space": ("/edit", [-3.0, "w"], "unknown space 'w' (choices: both, z, h)"),
    "a fractional K": ("/sweep", [2.5, -5.0, 0.0], "K must be a whole number, got 2.5"),
    "K beyond the app's sweeps": ("/sweep", [33, -5.0, 0.0], "the number of edits must be in [1, 32], got 33"),
    "a string for the sweep's end": ("/sweep", [3, -5.0, "0"], "the distance of thick must be a number, got '0'"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_a_request_of_the_wrong_type_gets_a_message_and_no_traceback(case, client, capfd):
    endpoint, args, message = WRONG_TYPES[case]
    capfd.readouterr()
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(handle_file(str(DIGIT)), "thick@200", *args, api_name=endpoint)
    assert "Traceback" not in "".join(capfd.readouterr())  # the server's log: no traceback


def test_a_list_as_the_image_gets_a_message_and_no_traceback(client, capfd):
    capfd.readouterr()
    with pytest.raises(AppError, match=r"the image must be an uploaded file, got \['a', 'b'\]$"):
        client.predict(["a", "b"], "thick@200", -3.0, api_name="/edit")
    assert "Traceback" not in "".join(capfd.readouterr())


def nested(depth: int, leaf=1.0):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


HOSTILE = {  # endpoint, arguments after the image, the message
    "a repeated key": ("/edit_many", ['{"thick": 1, "thick": 2}'], "'thick' is given twice in the moves"),
    "JSON text nested 5,000 deep": ("/edit_many", ["[" * 5000 + "]" * 5000], "the moves are nested too deeply"),
    "an object nested 500 deep": ("/edit_many", [{"thick": nested(500)}], "the distance of thick must be a number, "
                                                                        "got [[[[...]]]]"),
    "a list for the sweep's attribute": ("/sweep", [["thick"], 3, -5.0, 0.0], "attribute must be text, got ['thick']"),
    "a list for the second attribute": ("/sweep", ["thick@200", 2, -5.0, 0.0, "both", [], 10, 1234, 1.0, False,
                                                   ["slant"]], "the second attribute must be text, got ['slant']"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_request_is_a_message_and_the_server_keeps_serving(case, app, client, capfd):
    """Before, each of these ended in an internal error and a traceback in the log (a TypeError for
    an unhashable list, a RecursionError) or, for the repeated key, edited with the last value."""
    endpoint, args, message = HOSTILE[case]
    capfd.readouterr()
    before = dict(app.service.stats)
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(handle_file(str(DIGIT)), *args, api_name=endpoint)
    assert app.service.stats == before
    assert "Traceback" not in "".join(capfd.readouterr())
    assert client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", [], 2, api_name="/edit")[4]


def test_a_hold_given_as_one_string_is_one_attribute(client):
    details = client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", "slant", 10, api_name="/edit")[4]
    assert details["held"] == ["slant"]  # not as 's', 'l', 'a', ...


def test_a_long_list_of_held_attributes_is_refused_before_any_work(app, client):
    """A request holding 100,000 attributes kept the worker reading condition files for minutes
    while every other session waited; it is refused at once, before any network call."""
    before = dict(app.service.stats)
    started = time.monotonic()
    with pytest.raises(AppError, match=f"hold fixed: at most {MAX_NAMES} attributes, got 100000"):
        client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", ["slant"] * 100_000, 10,
                       api_name="/edit")
    assert time.monotonic() - started < 30  # the upload and the refusal, no work
    assert app.service.stats == before
    with pytest.raises(AppError, match="no boundary for 'no_such'"):  # every name is checked before the work
        client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", ["slant", "no_such"], 10, 1234, 1.0,
                       api_name="/edit")
    assert app.service.stats == before


def test_a_bare_attribute_name_means_the_configs_t_0(client):
    named = client.predict(handle_file(str(DIGIT)), "thick", -3.0, "both", [], 10, api_name="/edit")
    keyed = client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", [], 10, api_name="/edit")
    assert named[4]["t_0"] == 200  # digits.yml's edit.t_0, as --edit_attr thick picks it
    np.testing.assert_array_equal(pixels(named[0]), pixels(keyed[0]))
    with pytest.raises(AppError, match="unknown attribute 'slant@400'"):
        client.predict(handle_file(str(DIGIT)), "slant@400", -3.0, api_name="/edit")


def test_a_bug_is_an_internal_error_not_a_users_mistake(app, client, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug in the app")

    monkeypatch.setattr(app.service, "prepare", broken)
    with pytest.raises(AppError, match="internal error: ValueError: a bug in the app"):
        client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", [], 10, api_name="/edit")


def test_page_messages_do_not_name_command_line_flags():
    faceless = SimpleNamespace(detector=lambda rgb, upsample: [])  # dlib's detector finding no face
    with pytest.raises(UserError) as raised:
        FaceAligner.landmarks(faceless, Image.new("RGB", (32, 32)))
    assert "--align_face" in str(raised.value)  # the command line's message
    shown = page_message(str(raised.value), Path("/tmp/x"))
    assert "--" not in shown and "untick 'Align the face'" in shown
    assert page_message("cannot read /tmp/x/gradio/abc/digit.png: bad", Path("/tmp/x")) == "cannot read digit.png: bad"
    engine_says = ("no boundary for 'curly' in boundary for config digits (attributes: slant, thick); fit it with "
                   "--boundary_search --edit_attr curly")
    assert page_message(engine_says, Path("/tmp/x")) == ("no boundary for 'curly' in boundary for config digits "
                                                         "(attributes: slant, thick)")


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def served(app, path) -> int:
    url = f"{app.url}gradio_api/file={urllib.parse.quote(str(path))}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def newest_session_folder(app) -> Path:
    return max((app.root / "gradio" / "sessions").iterdir(), key=lambda p: p.stat().st_mtime)


def test_back_to_back_results_stay_downloadable(app, tmp_path):
    """60 back-to-back /edit_many calls from one client: every result is still served afterwards
    (before, 58 of the 60 had been deleted before the client could download them)."""
    session = Client(app.url, verbose=False)
    for i in range(60):
        session.predict(handle_file(str(DIGIT)), {"thick": -3.0 + i / 60, "slant": 1.0}, "both", [], 2,
                        api_name="/edit_many")
    jobs = sorted(newest_session_folder(app).iterdir(), key=lambda p: int(p.name[3:]))
    assert len(jobs) == 60
    for job in jobs:
        (edit,) = job.glob("edit_00_*.png")
        assert served(app, edit) == 200


def test_the_servers_files_stay_bounded_and_no_route_serves_other_files(app, tmp_path):
    """Eight edits of eight different uploads in one session keep the uploads of its last
    MAX_IMAGES_PER_SESSION images only (Gradio made a copy of every upload and of every file shown,
    kept for half an hour: 961 files after 240 edits), and its eight results (3 files each) for the
    stated time. The file route serves the session's files, and nothing else: not the repository's
    files, not the server's folders, not a job that is not there."""
    uploads = app.root / "gradio"
    before = count_files(uploads)
    session = Client(app.url, verbose=False)
    base = pixels(DIGIT)
    for i in range(8):
        variant = base.copy()
        variant.flat[i] ^= 0xFF  # a different image each time: a new upload, a new inversion
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(variant).save(path)
        session.predict(handle_file(str(path)), "thick@200", -3.0, "both", [], 2, api_name="/edit")
    assert count_files(uploads) - before <= 8 * 3 + MAX_IMAGES_PER_SESSION
    newest = newest_session_folder(app)
    assert re.fullmatch(r"[0-9a-f]{32}", newest.name)  # a session's folder name cannot be guessed
    jobs = sorted(newest.iterdir(), key=lambda p: int(p.name[3:]))
    assert [j.name for j in jobs] == [f"job{i}" for i in range(8)]
    assert served(app, jobs[-1] / "edit_00_d-3.00.png") == 200
    for path in ("/etc/passwd", REPO / "main.py", REPO / "boundary" / "digits_thick_t200_z.npz",
                 REPO / "checkpoints" / "digits_ddpm_ema.pt", app.root / ".boundarydiffusion-partial",
                 newest / "job99" / "edit_00_d-3.00.png", newest, uploads / ".." / ".." / "etc" / "passwd"):
        assert served(app, path) in (403, 404), path


# ------------------------------------------------------------------ several attributes
def test_edit_many_equals_the_command_lines_two_attribute_edit(client, tmp_path):
    """/edit_many with {thick: -3, slant: 1} (absolute distances) is the command line's
    --edit thick=-3:-3 --edit slant=1:1 --edit_img_number 1, pixel for pixel: one engine."""
    edit, original, recon, caption, details, files = client.predict(
        handle_file(str(DIGIT)), {"thick": -3.0, "slant": 1.0}, api_name="/edit_many")
    assert details["attributes"] == ["thick", "slant"] and details["spaces"] == ["z", "h"]
    assert details["targets"] == [{"thick": {"z": -3.0, "h": -3.0}, "slant": {"z": 1.0, "h": 1.0}}]
    run = cli_run(tmp_path, "--edit", "thick=-3:-3", "--edit", "slant=1:1", "--edit_img_number", "1")
    theirs = [p for p in run.glob("edit_00_*.png")]
    assert [p.name for p in theirs] == [Path(edit).name]  # the one naming function
    for mine, other in ((edit, theirs[0]), (original, run / "original.png"), (recon, run / "reconstruction.png")):
        np.testing.assert_array_equal(pixels(mine), pixels(other))
    single = client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, api_name="/edit")[0]
    assert np.abs(pixels(edit).astype(int) - pixels(single).astype(int)).max() > 0  # slant moved it too


def test_edit_many_holds_an_attribute_as_the_command_line_does(client, tmp_path):
    edit, _, _, _, details, _ = client.predict(handle_file(str(DIGIT)), '{"thick": -3}', "both", ["slant"], 12,
                                               api_name="/edit_many")
    assert details["held"] == ["slant"] and details["cosines"]["z"]["names"] == ["thick", "slant"]
    run = cli_edit(tmp_path, "--start_distance", -3, "--end_distance", -3, "--edit_img_number", 1,
                   "--condition_attr", "slant", "--n_test_step", 12)
    np.testing.assert_array_equal(pixels(edit), pixels(run / Path(edit).name))


@pytest.mark.parametrize("moves, message", [
    ({}, "the attributes to move must be an object"),
    ({"thick": -3, "THICK@200": 1}, "thick is moved twice"),
    ({"thick@200": -3, "thick@300": 1}, "share one t_0"),
    ({"thick": [1, 2, 3]}, "give one distance or [start, end]"),
    ("[1, 2", "must be a JSON object"),
])
def test_edit_many_refuses_bad_moves_with_a_message(client, moves, message):
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(handle_file(str(DIGIT)), moves, api_name="/edit_many")


def test_moving_and_holding_one_attribute_is_refused(client):
    with pytest.raises(AppError, match="slant cannot be moved and held at once"):
        client.predict(handle_file(str(DIGIT)), {"slant": 1.0}, "both", ["slant"], api_name="/edit_many")


def test_a_near_parallel_pair_is_refused_and_the_service_keeps_working(tmp_path):
    """Two boundaries whose normals are (nearly) the same cannot be moved to two targets at once:
    the engine refuses it with a message; the next request is served."""
    import dataclasses

    folder = tmp_path / "boundaries"
    copy_boundaries(folder, ["thick"])
    for space in ("z", "h"):
        twin = dataclasses.replace(load_boundary(folder / f"digits_thick_t200_{space}.npz"), attribute="twin")
        save_boundary(folder / f"digits_twin_t200_{space}.npz", twin)
    service, session, image = local_service(tmp_path, folder)
    with pytest.raises(UserError, match="cannot edit the z space"):
        service.run(session, image, service.request({"thick": -3.0, "twin": 1.0}, steps=5))
    assert service.stats["network_calls"] == 0
    assert service.run(session, image, service.request({"twin": 1.0}, steps=5)).edits[0].is_file()


def test_a_two_attribute_sweep_is_the_command_lines_grid(client, tmp_path):
    grid, gif, caption, details, files = client.predict(
        handle_file(str(DIGIT)), "thick@200", 2, -5.0, 0.0, "both", [], 10, 1234, 1.0, False, "slant@200", -2.0, 2.0,
        api_name="/sweep")
    assert len(details["targets"]) == 4
    run = cli_run(tmp_path, "--edit", "thick=-5:0", "--edit", "slant=-2:2", "--grid", "--edit_img_number", "2",
                  "--n_test_step", "10", "--gif")
    np.testing.assert_array_equal(pixels(grid), pixels(run / "grid.png"))


# ------------------------------------------------------------------ regions (issue 31: everywhere a move exists)
BOX = "0.25,0.25,0.75,0.75"  # the digit's pixels 4..11 in each direction


def outside(feather: int) -> np.ndarray:
    """The pixels of the 16 x 16 digit beyond ``feather`` pixels of ``BOX``: kept as the reconstruction's."""
    kept = np.ones((16, 16), dtype=bool)
    kept[4 - feather:12 + feather, 4 - feather:12 + feather] = False
    return kept


def test_a_region_edit_equals_the_command_lines_region_edit(client, tmp_path):
    """/edit_many with a box region is the command line's --edit ... --region <the same box>, pixel
    for pixel; beyond the feather (2 pixels) the edit is the reconstruction, inside it moved."""
    edit, original, recon, caption, details, files = client.predict(
        handle_file(str(DIGIT)), {"thick": -3.0, "slant": 1.0}, "both", [], 40, 1234, 1.0, False, "absolute", BOX,
        api_name="/edit_many")
    assert details["region"] == {"kind": "box", "box": [0.25, 0.25, 0.75, 0.75], "coverage": 0.25, "file": None,
                                 "sha256": None, "h": "cells", "feather": 2.0}
    assert "Region: box 0.25,0.25,0.75,0.75, 25.0% of the image (h cells, feather 2 px)" in caption
    run = cli_run(tmp_path, "--edit", "thick=-3:-3", "--edit", "slant=1:1", "--edit_img_number", "1",
                  "--region", BOX)
    assert json.loads((run / "summary.json").read_text())["region"]["coverage"] == pytest.approx(0.25)
    (theirs,) = run.glob("edit_00_*.png")
    assert Path(edit).name == theirs.name
    for mine, other in ((edit, theirs), (original, run / "original.png"), (recon, run / "reconstruction.png")):
        np.testing.assert_array_equal(pixels(mine), pixels(other))
    edited, kept = pixels(edit).astype(int), pixels(recon).astype(int)
    np.testing.assert_array_equal(edited[outside(2)], kept[outside(2)])
    assert np.abs(edited[4:12, 4:12] - kept[4:12, 4:12]).max() > 10  # the inside moved


def test_an_uploaded_mask_region_equals_the_command_lines_with_its_settings(client, tmp_path):
    """/edit with an uploaded mask image (any size; white: editable), feather 0 and region_h none is
    the command line's --region mask.png --feather 0 --region_h none; the left half is the
    reconstruction exactly, and the details name the mask (not the server's copy) and its hash."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    edit, _, recon, caption, details, _ = client.predict(
        handle_file(str(DIGIT)), "thick@200", -3.0, "z", [], 12, 1234, 1.0, False, handle_file(str(tmp_path / "mask.png")),
        0.0, "none", api_name="/edit")
    run = cli_edit(tmp_path, "--start_distance", -3, "--end_distance", -3, "--edit_img_number", 1, "--edit_space", "z",
                   "--n_test_step", 12, "--region", tmp_path / "mask.png", "--feather", 0, "--region_h", "none")
    np.testing.assert_array_equal(pixels(edit), pixels(run / Path(edit).name))
    summary = json.loads((run / "summary.json").read_text())
    assert details["region"]["sha256"] == summary["region"]["sha256"] and details["region"]["coverage"] == 0.5
    assert details["region"]["file"] == "mask.png" and "mask.png, 50.0% of the image (h none, feather 0 px)" in caption
    np.testing.assert_array_equal(pixels(edit)[:, :8], pixels(recon)[:, :8])
    assert np.abs(pixels(edit)[:, 8:].astype(int) - pixels(recon)[:, 8:].astype(int)).max() > 10


def test_a_sweep_in_a_region_is_the_command_lines_outlined_strip(client, tmp_path):
    grid, gif, caption, details, files = client.predict(
        handle_file(str(DIGIT)), "thick@200", 3, -5.0, 0.0, "both", [], 10, 1234, 1.0, False, "", -5.0, 0.0, BOX,
        api_name="/sweep")
    run = cli_edit(tmp_path, "--start_distance", -5, "--end_distance", 0, "--edit_img_number", 3, "--n_test_step", 10,
                   "--gif", "--region", BOX)
    np.testing.assert_array_equal(pixels(grid), pixels(run / "grid.png"))  # the region outlined in yellow
    assert Path(gif).read_bytes() == (run / "edits.gif").read_bytes()
    assert details["region"]["coverage"] == 0.25 and "Region: box" in caption


BAD_REGIONS = {  # the region, feather, region_h (and space) sent -> the message
    "an empty box": (["0.5,0.5,0.5,0.9"], "'Region' 0.5,0.5,0.5,0.9: the box is empty or inverted"),
    "a box under one pixel": (["0,0,0.01,0.01"], "the box covers 0.026 pixel at 16 x 16, under one pixel"),
    "everything": (["0,0,1,1"], "'Region' 0,0,1,1: everything is editable, that is not a region; clear the region"),
    "a non-image file": ("text", "notes.png cannot be read"),
    "a path outside the upload folders": ([{"path": "/etc/passwd"}],
                                          "the region's mask image must be uploaded (or be one of the examples)"),
    "the repository's file": ([{"path": str(REPO / "main.py")}], "the region's mask image must be uploaded"),
    "a file named as text": (["imgs/digit_example.png"], "the region must be a box x0,y0,x1,y1 in fractions of the "
                                                         "image (or an uploaded mask image), got 'imgs/digit_example.png'"),
    "a list": ([[0.25, 0.25, 0.75, 0.75]], "the region must be a box x0,y0,x1,y1"),
    "a long text": (["0," * 150 + "1"], "the region must be at most 200 characters"),
    "a negative feather": ([BOX, -1.0], "'Feather' must be in [0, 16] pixels, got -1.0"),
    "an unknown region h": ([BOX, 2.0, "all"], "unknown 'Region h' 'all' (choices: cells, none)"),
    "region h none in h alone": ([BOX, 2.0, "none", "h"], "'Region h' none leaves h as it is: move z too"),
}


@pytest.mark.parametrize("case", sorted(BAD_REGIONS))
def test_a_bad_region_is_a_message_and_the_server_keeps_serving(case, app, client, capfd, tmp_path):
    """Each is refused with one message before any network call, no traceback in the server's log,
    and the next request is served."""
    sent, message = BAD_REGIONS[case]
    if sent == "text":
        (tmp_path / "notes.png").write_text("not an image")
        sent = [handle_file(str(tmp_path / "notes.png"))]
    region, rest = sent[0], sent[1:3]
    space = sent[3] if len(sent) > 3 else "both"
    capfd.readouterr()
    before = dict(app.service.stats)
    with pytest.raises(AppError, match=re.escape(message)) as raised:
        client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, space, [], 10, 1234, 1.0, False, region, *rest,
                       api_name="/edit")
    assert "boundarydiffusion-app" not in str(raised.value) and "--" not in str(raised.value)
    assert app.service.stats == before
    assert "Traceback" not in "".join(capfd.readouterr())
    assert client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", [], 2, api_name="/edit")[4]


def test_the_service_reads_a_region_only_from_the_upload_folders(tmp_path):
    service, session, image = local_service(tmp_path)
    mask = tmp_path / "up" / "mask.png"
    Image.new("L", (16, 16), 0).save(mask)
    assert service.region(None) is None and service.region("  ") is None  # the whole image
    assert service.region(" 0.25,0.25,0.75,0.75 ").spec == BOX and service.region(mask).spec == str(mask.resolve())
    for sent in (Path("/etc/passwd"), REPO / "main.py", tmp_path / "up" / ".." / "elsewhere.png", "/etc/passwd",
                 str(mask), "mouth", 0.5, ["0", "0", "1", "1"]):
        with pytest.raises(UserError, match="region"):
            service.region(sent)
    with session.job_folder() as folder:  # the sessions' own outputs are never read as a mask
        (folder / "edit.png").write_bytes(mask.read_bytes())
    with pytest.raises(UserError, match="must be uploaded"):
        service.region(folder / "edit.png")


def test_two_clicks_on_the_preview_draw_the_box_and_the_preview_outlines_it(app):
    """The page's region: the preview is the image as the model sees it, enlarged 16 times (the
    digit is 16 px); a click marks a model pixel, a second one makes the box of the two pixels
    (and those between), outlined in yellow; a session keeps its newest previews only."""
    session = app.store.get("region-clicks")
    box, corner, preview, line = app.region_click(session, str(DIGIT), "", None, False, [4 * 16 + 3, 4 * 16 + 15])
    assert (box, corner) == ("", [4, 4]) and "click the opposite corner" in line
    box, corner, preview, line = app.region_click(session, str(DIGIT), box, corner, False, [11 * 16 + 8, 11 * 16])
    assert (box, corner) == (BOX, None) and "Region: box 0.25,0.25,0.75,0.75, 25.0% of the image" in line
    shown = pixels(preview)
    assert shown.shape == (256, 256, 3)
    yellow = (shown[..., 0] == 255) & (shown[..., 1] == 255) & (shown[..., 2] == 0)
    assert yellow[64:66, 64:192].all() and yellow[64:192, 190:192].all() and not yellow[:60].any()
    digit = np.asarray(Image.open(DIGIT).convert("RGB"))
    np.testing.assert_array_equal(shown[100:180:16, 100:180:16], digit[6:11, 6:11])  # the inside as it is
    for _ in range(5):
        app.region_view(session, str(DIGIT), "", None, False)
    assert len(list((session.folder / "previews").iterdir())) == 4 and not Path(preview).exists()
    assert app.region_view(session, str(DIGIT), "0.9,0.1,0.2,0.5", None, False)[1].startswith("Not a box")
