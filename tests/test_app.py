"""The web app (python main.py --serve) through its scripting API, in process: gradio_client calls
the named endpoints of a running app on the shipped digits model. The app's pixels equal the command
line's; a bad upload, a 100-megapixel upload, requests of the wrong type and two sessions at once each
end with a message or a result while the server keeps serving; an image is inverted once per session;
Stop ends a job at any stage; the server's files stay bounded, and it stops cleanly on SIGTERM."""
from __future__ import annotations

import dataclasses
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

from models.loading import load_model  # noqa: E402
from runners.app import (WebApp, atlas_threshold, check_address, entanglement_warning, exposure_warning,  # noqa: E402
                         page_message, slider_range)
from runners.app_state import (JOBS_KEPT, MAX_HELD, MAX_IMAGES_PER_SESSION, AttributeTable,  # noqa: E402
                               Cancelled, EditService, Prepared, Request, SessionStore)
from runners.editor import Editor  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io.boundary_files import load_boundary, save_boundary  # noqa: E402
from utils.io.face_align import FaceAligner  # noqa: E402

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
    # batch sizes 8, 8: the CLI's on the CPU; two jobs at once (the two-sessions test needs them)
    web = WebApp(model, REPO / "boundary", attribute="thick", concurrency=2)
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


# ------------------------------------------------------------------ without a server
def local_service(tmp_path: Path, boundary_dir: Path = REPO / "boundary") -> tuple[EditService, object, Path]:
    """The app's work without a server, on the digits model and ``boundary_dir``'s boundaries:
    (the service, one session, the example digit as an upload it may read)."""
    model = load_model("digits.yml")
    store = SessionStore(tmp_path / "sessions")
    (tmp_path / "up").mkdir()
    image = tmp_path / "up" / "digit.png"
    image.write_bytes(DIGIT.read_bytes())
    service = EditService(model, AttributeTable(boundary_dir, model), store, 40, (8, 8),
                          allowed_roots=[tmp_path / "up"])
    return service, store.get("s"), image


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
    for path in (DIGIT, "/etc/passwd", str(tmp_path / "uploads" / ".." / "x.png"), None):
        with pytest.raises(UserError):
            service.check_path(path)
    with pytest.raises(UserError, match="unknown attribute"):
        table.get("thick@250")  # keys name the mixing step
    assert table.get("thick").key == table.get("THICK@200").key == "thick@200"  # a bare name: the config's t_0
    with pytest.raises(UserError, match="no boundary of it"):
        table.held_paths(["slant"], 300)  # slant was fitted at t_0 200 only


def test_stop_flag_raises_at_the_next_network_call(tmp_path):
    service, session, image = local_service(tmp_path)
    seen = []

    def progress(done, total, stage):
        seen.append((done, total, stage))
        if done == 3 and len(seen) == 3:  # the first job only
            session.stop()

    request = Request((("thick@200", -3.0, -3.0),), steps=10)
    with pytest.raises(Cancelled):
        service.run(session, image, request, progress)
    assert seen[-1] == (3, 39, "inverting")  # the inversion grid has 40 points: 39 calls
    result = service.run(session, image, request, progress)  # the next job runs
    assert result.edits[0].is_file() and service.stats["inversions"] == 1


def test_slider_range_is_the_boundarys_auto_range_else_the_configs():
    model = load_model("digits.yml")
    assert slider_range(None, model.config) == (-5.5, 0.5)  # digits.yml's edit.start/end_distance
    record = Editor(model, 200, 40).check_boundary(REPO / "boundary" / "digits_thick_t200_z.npz", "z", "thick")
    # By hand from digits_thick_t200_z.npz: its train summary puts the negative class's 5th percentile
    # at s = -1.8308 and the positive class's 95th at s = 2.0642 (hyperplane distances); the edit's
    # v.n = s - b/||w|| with b/||w|| = 5.2006 / 2.0215 = 2.5726, so -4.4034 .. -0.5084 (3.8950 wide);
    # widened by 2 about its centre -2.4559 (docs/modes.md): -2.4559 -/+ 3.8950 = -6.3509 .. 1.4391.
    assert slider_range(record, model.config) == (-6.35, 1.44)
    assert record.intercept == pytest.approx(5.2006, abs=1e-4)  # the file the numbers came from


def unusable_summary(record, how: str):
    """``record`` with a class summary the app cannot take a range from: without the positive
    class's latents, with its percentiles crossed, or with values near the float limit."""
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
    model = load_model("digits.yml")
    record = load_boundary(REPO / "boundary" / "digits_slant_t200_z.npz", model.shapes)
    with caplog.at_level("WARNING"):
        assert slider_range(unusable_summary(record, how), model.config) == (-5.5, 0.5)
    assert "slant" in caplog.text and "config's range" in caplog.text


def test_the_app_starts_when_one_boundary_file_has_no_class_of_its_summary(tmp_path):
    """One boundary file whose summary lacks a class (item 7 of issue 26) stopped the app from
    starting: that attribute now takes the config's range, the others are offered as before."""
    model = load_model("digits.yml")
    for name in ("digits_thick_t200_z.npz", "digits_thick_t200_h.npz", "digits_slant_t200_h.npz"):
        (tmp_path / name).write_bytes((REPO / "boundary" / name).read_bytes())
    record = load_boundary(REPO / "boundary" / "digits_slant_t200_z.npz", model.shapes)
    save_boundary(tmp_path / "digits_slant_t200_z.npz", unusable_summary(record, "missing class"))
    web = WebApp(model, tmp_path)
    try:
        assert sorted(web.table.entries) == ["slant@200", "thick@200"]
        assert web.bounds == (-6.35, 1.44)  # thick's range (above) holds slant's, the config's -5.5 .. 0.5
    finally:
        web.close()


def test_serve_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert cli.main(["--serve"]) == 1
    assert_one_error_line(1, capsys.readouterr().err, "pip install -r requirements-ui.txt")


def test_other_hosts_than_loopback_are_warned_about():
    for loopback in ("127.0.0.1", "localhost", "127.0.0.2", "LOCALHOST", "::1", "[::1]", "127.255.0.9"):
        assert exposure_warning(loopback) is None, loopback
    for public in ("0.0.0.0", "192.0.2.1", "::", "example.com"):
        assert "no authentication" in exposure_warning(public), public


# ------------------------------------------------------------------ serving (issue 26)
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
    """``python main.py --serve`` in its own process on a free port: (process, port, its output)."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "main.py", "--serve", "--port", str(port), "--no_cache", *flags],
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
    stops, its thread ends, the server exits 0 and its temporary folder is gone (issue 26,
    acceptance 5)."""
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


# ------------------------------------------------------------------ hostile requests (issue 26)
WRONG_TYPES = {  # what is sent (after the image and attribute) -> the message
    "a string for the distance": ("/edit", ["abc"], "the distance of thick must be a number, got 'abc'"),
    "a string for the steps": ("/edit", [-3.0, "both", [], "x"], "steps must be a whole number, got 'x'"),
    "fractional steps": ("/edit", [-3.0, "both", [], 10.5], "steps must be a whole number, got 10.5"),
    "a fractional seed": ("/edit", [-3.0, "both", [], 10, 7.5], "seed must be a whole number, got 7.5"),
    "a string for eta": ("/edit", [-3.0, "both", [], 10, 1, "q"], "eta must be a number, got 'q'"),
    "a number for the held attributes": ("/edit", [-3.0, "both", 5], "must be a list of attribute names"),
    "a list for the space": ("/edit", [-3.0, ["z"]], "space must be text"),
    "a fractional K": ("/sweep", [2.5, -5.0, 0.0], "K must be a whole number, got 2.5"),
    "a string for the sweep's end": ("/sweep", [3, -5.0, "0"], "the sweep's end must be a number"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_a_request_of_the_wrong_type_gets_a_message_and_no_traceback(case, client, capfd):
    endpoint, args, message = WRONG_TYPES[case]
    capfd.readouterr()
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(handle_file(str(DIGIT)), "thick@200", *args, api_name=endpoint)
    assert "gradio/queueing.py" not in "".join(capfd.readouterr())  # the server's log: no 27-line traceback


def test_a_list_as_the_image_gets_a_message_and_no_traceback(client, capfd):
    capfd.readouterr()
    with pytest.raises(AppError, match=r"the image must be an uploaded file, got \['a', 'b'\]$"):
        client.predict(["a", "b"], "thick@200", -3.0, api_name="/edit")
    assert "gradio/queueing.py" not in "".join(capfd.readouterr())


def test_a_hold_given_as_one_string_is_one_attribute(client):
    details = client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", "slant", 10, api_name="/edit")[4]
    assert details["held"] == ["slant"]  # not as 's', 'l', 'a', ...


def test_a_long_list_of_held_attributes_is_refused_before_any_work(app, client):
    """A request holding 100,000 attributes kept the worker reading condition files for minutes
    while every other session waited; it is refused at once, before any network call."""
    before = dict(app.service.stats)
    started = time.monotonic()
    with pytest.raises(AppError, match=f"hold fixed: at most {MAX_HELD} attributes, got 100000"):
        client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", ["slant"] * 100_000, 10,
                       api_name="/edit")
    assert time.monotonic() - started < 30  # the upload and the refusal, no work
    assert app.service.stats == before
    with pytest.raises(AppError, match="cannot hold 'no_such' fixed"):  # every name is checked before the work
        client.predict(handle_file(str(DIGIT)), "thick@200", -3.0, "both", ["slant", "no_such"], 10, 1234, -1.0,
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


def test_stop_ends_a_job_between_stages(tmp_path):
    """Stop pressed while the boundary files are read (no network call runs then) ends the job
    before its inversion starts: not one network call."""
    service, session, image = local_service(tmp_path)
    read = service.describe

    def stop_while_reading(editor, edit_request):
        found = read(editor, edit_request)
        session.stop()  # the user presses stop while the condition files load
        return found

    service.describe = stop_while_reading
    with pytest.raises(Cancelled):
        service.run(session, image, service.request({"thick@200": -3.0}, hold=["slant"], steps=10))
    assert service.stats["network_calls"] == 0 and service.stats["inversions"] == 0


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def test_the_servers_files_stay_bounded_and_no_route_serves_other_files(app, tmp_path):
    """Eight edits of eight different uploads in one session leave at most the session's last
    JOBS_KEPT jobs' files and the uploads of its last MAX_IMAGES_PER_SESSION images (Gradio made
    a copy of every upload and of every file shown, kept for half an hour: 961 files after 240
    edits). The file route serves the session's current files, and nothing else: not the
    repository's files, not the server's folders, not the files of a job that was dropped."""
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
    added = count_files(uploads) - before
    assert added <= JOBS_KEPT * 3 + MAX_IMAGES_PER_SESSION  # 3 files a job: original, reconstruction, edit

    def served(path) -> int:
        url = f"{app.url}gradio_api/file={urllib.parse.quote(str(path))}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    folders = sorted((uploads / "sessions").iterdir(), key=lambda p: p.stat().st_mtime)
    newest = folders[-1]
    assert re.fullmatch(r"[0-9a-f]{32}", newest.name)  # a session's folder name cannot be guessed
    jobs = sorted(newest.iterdir(), key=lambda p: int(p.name[3:]))
    assert [j.name for j in jobs] == ["job6", "job7"]
    assert served(jobs[-1] / "edit_00_d-3.00.png") == 200
    for path in ("/etc/passwd", REPO / "main.py", REPO / "boundary" / "digits_thick_t200_z.npz",
                 REPO / "checkpoints" / "digits_ddpm_ema.pt", app.root / ".boundarydiffusion-partial",
                 newest / "job0" / "edit_00_d-3.00.png", newest, uploads / ".." / ".." / "etc" / "passwd"):
        assert served(path) in (403, 404), path


# ------------------------------------------------------------------ several attributes (issue 24)
def test_edit_many_equals_the_command_lines_two_attribute_edit(client, tmp_path):
    """/edit_many with {thick: -3, slant: 1} (absolute distances) is the command line's
    --edit thick=-3:-3 --edit slant=1:1 --edit_img_number 1, pixel for pixel: one edit builder."""
    edit, original, recon, caption, details, files = client.predict(
        handle_file(str(DIGIT)), {"thick": -3.0, "slant": 1.0}, api_name="/edit_many")
    assert details["attributes"] == ["thick", "slant"] and details["spaces"] == ["z", "h"]
    assert details["targets"] == [{"thick": {"z": -3.0, "h": -3.0}, "slant": {"z": 1.0, "h": 1.0}}]
    argv = ["--edit_image_boundary", "--edit", "thick=-3:-3", "--edit", "slant=1:1", "--edit_img_number", "1",
            "--img_path", str(DIGIT), "--exp", str(tmp_path / "cli"), "--no_cache"]
    assert cli.main(argv) == 0
    run = tmp_path / "cli" / "edit"
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
    ({"thick": -3, "THICK@200": 1}, "named twice"),
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
    the builder refuses it with a message; the next request is served."""
    model = load_model("digits.yml")
    for space in ("z", "h"):
        name = f"digits_thick_t200_{space}.npz"
        (tmp_path / name).write_bytes((REPO / "boundary" / name).read_bytes())
        twin = dataclasses.replace(load_boundary(REPO / "boundary" / name, model.shapes), attribute="twin")
        save_boundary(tmp_path / f"digits_twin_t200_{space}.npz", twin)
    service, session, image = local_service(tmp_path, tmp_path)
    with pytest.raises(UserError, match="cannot edit the z space"):
        service.run(session, image, service.request({"thick": -3.0, "twin": 1.0}, steps=5))
    assert service.stats["network_calls"] == 0
    assert service.run(session, image, service.request({"twin": 1.0}, steps=5)).edits[0].is_file()


def test_the_entanglement_warning_names_each_pair_above_the_threshold():
    names = ["age", "glasses", "smile"]
    cosines = {"z": [[1, 0.72, 0.1], [0.72, 1, -0.05], [0.1, -0.05, 1]],
               "h": [[1, 0.2, -0.31], [0.2, 1, 0.0], [-0.31, 0.0, 1]]}
    warning = entanglement_warning(names, cosines)
    assert "age and glasses (z: cos +0.72)" in warning and "age and smile (h: cos -0.31)" in warning
    assert "glasses and smile" not in warning
    assert entanglement_warning(names, {"z": [[1, 0.1, 0], [0.1, 1, 0], [0, 0, 1]]}) is None


def test_a_two_attribute_sweep_is_the_command_lines_grid(client, tmp_path):
    grid, gif, caption, details, files = client.predict(
        handle_file(str(DIGIT)), "thick@200", 2, -5.0, 0.0, "both", [], 10, 1234, 1.0, False, "slant@200", -2.0, 2.0,
        api_name="/sweep")
    assert len(details["targets"]) == 4
    argv = ["--edit_image_boundary", "--edit", "thick=-5:0", "--edit", "slant=-2:2", "--grid", "--edit_img_number",
            "2", "--n_test_step", "10", "--gif", "--img_path", str(DIGIT), "--exp", str(tmp_path / "cli"), "--no_cache"]
    assert cli.main(argv) == 0
    np.testing.assert_array_equal(pixels(grid), pixels(tmp_path / "cli" / "edit" / "grid.png"))


def test_the_entanglement_threshold_is_the_atlas_s(tmp_path):
    """Without an atlas the threshold is the atlas's default (0.3); with one, its hold threshold:
    at 0.05, the shipped slant and thick normals (h: cos +0.08) are named as entangled."""
    from utils.io.atlas import atlas_from_dir, write_atlas

    for name in ("slant", "thick"):
        for space in ("z", "h"):
            path = REPO / "boundary" / f"digits_{name}_t200_{space}.npz"
            (tmp_path / path.name).write_bytes(path.read_bytes())
    assert atlas_threshold(tmp_path) == 0.3
    atlas = atlas_from_dir(tmp_path)
    write_atlas(tmp_path, {**atlas, "hold_threshold": 0.05})
    assert atlas_threshold(tmp_path) == 0.05
    names = atlas["attributes"]
    warning = entanglement_warning(names, {s: atlas["cosines"][s] for s in ("z", "h")}, atlas_threshold(tmp_path))
    assert "slant and thick (h: cos +0.08)" in warning and "(z:" not in warning  # z: cos -0.01
