"""Hostile inputs: run folders that are atomic, inputs never touched, every number checked,
memory bounded. Real signals go to real processes, two real runs race, and a
full disk is a 16 KiB tmpfs where mounting is allowed, an injected ENOSPC otherwise."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main as cli
import utils.io.files
from tests.helpers import REPO, assert_one_error_line
from utils.io.boundary_files import discover_boundaries, load_boundary
from utils.core.diffusion import ddim_trajectory, make_alphas_cumprod
from utils.errors import UserError
from utils.io.images import load_image
from utils.io.files import write_json

SUBENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _edit_argv(env, exp: Path, *extra: str) -> list[str]:
    return ["--edit_image_boundary", *env["common"], "--exp", str(exp), "--img_path", str(env["img"]),
            "--boundary_h", str(env["h"]), "--boundary_z", str(env["z"]), *extra]


def _search_argv(env, exp: Path, bd: Path, *extra: str) -> list[str]:
    return ["--boundary_search", *env["common"], "--exp", str(exp), "--data_dir", str(env["images"]),
            "--attr_file", str(env["attr"]), "--edit_attr", "bright_left", "--n_train_img", "8",
            "--n_test_img", "4", "--boundary_dir", str(bd), *extra]


def _config(env, tmp_path: Path, **changes) -> str:
    """The env's config with ``section.key`` values replaced, written to a file."""
    config = yaml.safe_load((env["root"] / "tiny.yml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path = tmp_path / "hostile.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


# --------------------------------------------------------------------------- 1. inputs never touched

def test_an_input_inside_an_unfinished_folder_is_never_overwritten(env, tmp_path, capsys):
    exp = tmp_path / "x"
    (exp / "edit").mkdir(parents=True)
    original = exp / "edit" / "original.png"
    Image.open(env["img"]).resize((64, 64)).save(original)
    before = original.read_bytes()
    argv = ["--edit_image_boundary", *env["common"], "--img_path", str(original), "--exp", str(exp),
            "--boundary_h", str(env["h"]), "--boundary_z", str(env["z"])]
    assert cli.main(argv) == 0
    assert original.read_bytes() == before
    assert (exp / "edit-1" / "summary.json").is_file() and sorted(p.name for p in (exp / "edit").iterdir()) == [
        "original.png"]
    # --ni would replace the folder that holds the input: refused in one line, nothing touched
    capsys.readouterr()
    assert_one_error_line(cli.main([*argv, "--ni"]), capsys.readouterr().err, "lies inside")
    assert original.read_bytes() == before


def test_ni_replaces_a_finished_folder_as_a_whole(env, tmp_path):
    exp = tmp_path / "exp"
    assert cli.main(_edit_argv(env, exp, "--edit_img_number", "5")) == 0
    assert cli.main(_edit_argv(env, exp, "--edit_img_number", "3", "--ni")) == 0
    assert len(list((exp / "edit").glob("edit_*.png"))) == 3
    assert len(json.loads((exp / "edit" / "summary.json").read_text())["distances"]) == 3
    assert sorted(p.name for p in exp.iterdir()) == ["edit"]


def test_files_get_the_permissions_of_the_umask(env, tmp_path):
    old = os.umask(0o027)
    try:
        assert cli.main(_edit_argv(env, tmp_path / "exp")) == 0
    finally:
        os.umask(old)
    folder = tmp_path / "exp" / "edit"
    assert folder.stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o640}, modes


# --------------------------------------------------------------------------- 2. failures leave nothing

def _corrupt_image_folder(env, tmp_path: Path) -> list[str]:
    images = tmp_path / "images"
    images.mkdir()
    for p in env["images"].iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    (images / "000005.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return ["--data_dir", str(images)]


FAILING_RUNS = {
    # name: (argv builder, expected fragment of the one line)
    "edit_img_number 0 in a config": (
        lambda env, t: _edit_argv(env, t / "exp", "--config", _config(env, t, edit__edit_img_number=0)),
        "edit.edit_img_number"),
    "a corrupt image in the boundary-search data": (
        lambda env, t: _search_argv(env, t / "exp", t / "bd", *_corrupt_image_folder(env, t)), "000005.png"),
    "an unwritable --boundary_dir": (
        lambda env, t: _search_argv(env, t / "exp", Path(_file(t / "file")) / "bd"), "not writable"),
}


def _file(path: Path) -> str:
    path.write_bytes(b"x")
    return str(path)


@pytest.mark.parametrize("case", sorted(FAILING_RUNS))
def test_a_failed_run_leaves_nothing_behind(case, env, tmp_path, capsys):
    build, fragment = FAILING_RUNS[case]
    argv = [*build(env, tmp_path), "--cache_dir", str(tmp_path / "cache")]
    assert_one_error_line(cli.main(argv), capsys.readouterr().err, fragment)
    assert not (tmp_path / "exp").exists(), list((tmp_path / "exp").rglob("*"))
    assert not (tmp_path / "bd").exists()
    # the checks come before the long inversion: nothing was inverted (and cached)
    assert not list((tmp_path / "cache").rglob("*.pt"))


def _mount_tmpfs(folder: Path, options: str) -> bool:
    """Whether a tmpfs could be mounted on ``folder`` (root in a container that permits it)."""
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True).returncode == 0
    except OSError:  # no mount program
        return False


@contextlib.contextmanager
def _full_disk(tmp_path: Path, monkeypatch):
    """A folder on a 16 KiB tmpfs where this machine lets us mount one; else a folder whose
    writes fail with ENOSPC once a few files exist (injected into the atomic rename)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if _mount_tmpfs(mount, "size=16k"):
        try:
            yield mount
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        return
    replace, written = os.replace, []

    def replace_until_full(src, dst, *args, **kwargs):
        if str(dst).startswith(str(mount)):
            written.append(dst)
            if len(written) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(utils.io.files.os, "replace", replace_until_full)
    yield mount


def test_a_full_disk_fails_in_one_line_and_leaves_nothing(env, tmp_path, monkeypatch, capsys):
    with _full_disk(tmp_path, monkeypatch) as disk:
        code = cli.main(_edit_argv(env, disk / "exp", "--edit_img_number", "20", "--no_cache"))
        err = capsys.readouterr().err
        assert_one_error_line(code, err, "No space left on device")
        assert not (disk / "exp").exists(), list(disk.rglob("*"))


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_a_run_cleanly(signum, env, tmp_path):
    exp, cache = tmp_path / "exp", tmp_path / "cache"
    argv = _search_argv(env, exp, tmp_path / "bd", "--n_inv_step", "60", "--bs_train", "1", "--cache_dir", str(cache))
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), *argv], env=SUBENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list(cache.glob("latents/*/*.pt"))) >= 2, proc)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert assert_one_error_line(proc.returncode, err, exit_code=128 + signum) == "error: interrupted"
    assert not exp.exists(), list(exp.rglob("*"))
    assert not (tmp_path / "bd").exists()
    assert not list(cache.rglob("*.tmp"))


def test_sigterm_while_edits_are_written_leaves_nothing(env, tmp_path):
    exp = tmp_path / "exp"
    argv = _edit_argv(env, exp, "--edit_img_number", "400", "--no_cache")
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), *argv], env=SUBENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(exp.glob(".partial-edit-*/original.png")), proc)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert assert_one_error_line(proc.returncode, err, exit_code=143) == "error: interrupted"
    assert not exp.exists(), list(exp.rglob("*"))


def test_hidden_folders_of_dead_runs_are_removed_and_live_ones_kept(env, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    # a run killed before it could clean up (os._exit: no handler, no finally) leaves its hidden folder
    gone = subprocess.run([sys.executable, "-c", "import os, sys; from utils.io.files import RunFolder; "
                           "p = RunFolder(sys.argv[1], 'edit').__enter__(); (p / 'edit_00.png').write_bytes(b'partial'); "
                           "print(p.name); os._exit(0)", str(exp)], capture_output=True, text=True, cwd=REPO, env=SUBENV)
    dead = exp / gone.stdout.strip()
    assert gone.returncode == 0 and dead.name.startswith(".partial-edit-") and dead.is_dir(), gone.stderr
    live = exp / f".partial-edit-{os.getpid()}-0-0c0d0e0f"
    live.mkdir()
    (live / utils.io.files.PARTIAL_MARKER).write_text(live.name)
    (live / "edit_00.png").write_bytes(b"partial")
    assert cli.main(_edit_argv(env, exp)) == 0
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in exp.iterdir()) == [live.name, "edit"]


# --------------------------------------------------------------------------- 3. concurrency

def _overlapping(first: list[str], second: list[str], exp: Path) -> None:
    """Run ``second`` from start to end while ``first`` is stopped (SIGSTOP) in the middle of its
    run, after it has made its run folder; then let ``first`` finish. Both must succeed."""
    one = subprocess.Popen([sys.executable, str(REPO / "main.py"), *first], env=SUBENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: exp.is_dir() and any(exp.iterdir()), one, seconds=120)
        one.send_signal(signal.SIGSTOP)
        assert one.poll() is None, "the first run ended before the second started"
        two = subprocess.run([sys.executable, str(REPO / "main.py"), *second], env=SUBENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        assert two.returncode == 0, two.stderr
    finally:
        one.send_signal(signal.SIGCONT)
    assert one.wait(timeout=300) == 0, one.stderr.read()


def test_two_concurrent_edits_keep_both_results(env, tmp_path):
    exp = tmp_path / "exp"
    _overlapping(_edit_argv(env, exp, "--seed", "1", "--no_cache", "--n_inv_step", "100", "--edit_img_number", "4"),
                 _edit_argv(env, exp, "--seed", "2", "--no_cache"), exp)
    folders = sorted(p.name for p in exp.iterdir())
    assert folders == ["edit", "edit-1"], folders
    by_seed = {json.loads((exp / f / "summary.json").read_text())["arguments"]["job"]["request"]["denoising"]["seed"]: f for f in folders}
    assert sorted(by_seed) == [1, 2]
    assert len(list((exp / by_seed[1]).glob("edit_*.png"))) == 4
    assert len(list((exp / by_seed[2]).glob("edit_*.png"))) == 3


def test_two_concurrent_boundary_searches_keep_both_results(env, tmp_path):
    exp, bd = tmp_path / "exp", tmp_path / "bd"
    argv = _search_argv(env, exp, bd, "--cache_dir", str(tmp_path / "cache"))
    _overlapping([*argv, "--bs_train", "1"], argv, exp)
    assert sorted(p.name for p in exp.iterdir()) == ["boundary_search", "boundary_search-1"]
    names = sorted(p.name for p in bd.iterdir())
    assert names == sorted(f"tiny_rel_bright_left_t300_{s}{n}.npz" for s in "hz" for n in ("", "-1")), names
    written = {json.loads((exp / f / "summary.json").read_text())["spaces"]["h"]["path"]
               for f in ("boundary_search", "boundary_search-1")}
    assert len(written) == 2
    for path in bd.iterdir():
        load_boundary(path)
    # the shared cache holds one complete entry per image and batch regime (batch 1, batched), nothing half-written
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2 * 12 and not list((tmp_path / "cache").rglob("*.tmp"))


def test_numbered_names_are_taken_atomically(tmp_path):
    """Many writers racing for one name each get their own (a hard link fails if the name exists)."""
    from concurrent.futures import ThreadPoolExecutor

    def publish(i: int) -> Path:
        return utils.io.files.write_new_file(tmp_path / "b.npz", lambda p: p.write_text(str(i)), overwrite=False)

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(publish, range(24)))
    assert len(set(paths)) == 24
    assert sorted(p.read_text() for p in paths) == sorted(str(i) for i in range(24))


def test_run_folder_names_are_reserved_atomically(tmp_path):
    """Concurrent commits never share a final name, even where one exists as an empty folder."""
    from concurrent.futures import ThreadPoolExecutor

    from utils.io.files import RunFolder

    (tmp_path / "edit").mkdir()  # an empty folder: os.rename would silently take it

    def run(i: int) -> Path:
        folder = RunFolder(tmp_path, "edit")
        with folder as partial:
            (partial / "mark").write_text(str(i))
        return folder.final

    with ThreadPoolExecutor(8) as pool:
        finals = list(pool.map(run, range(16)))
    assert len(set(finals)) == 16 and tmp_path / "edit" not in finals
    assert sorted((f / "mark").read_text() for f in finals) == sorted(str(i) for i in range(16))


# --------------------------------------------------------------------------- 4. every number checked

@pytest.mark.parametrize("change, key", [
    ({"edit__start_distance": float("nan")}, "edit.start_distance"),
    ({"edit__end_distance": float("inf")}, "edit.end_distance"),
    ({"diffusion__beta_end": 2.0}, "diffusion.beta_end"),
    ({"diffusion__beta_start": -0.1}, "diffusion.beta_start"),
    ({"data__image_size": "16"}, "data.image_size"),
    ({"data__channels": 1}, "data.channels"),
    ({"edit__edit_img_number": 0}, "edit.edit_img_number"),
    ({"edit__t_0": 5000}, "edit.t_0"),
    ({"model__dropout": "none"}, "model.dropout"),
    ({"model__resamp_with_conv": 1}, "model.resamp_with_conv"),
    ({"model__ch_mult": [1, "x"]}, "model.ch_mult"),
])
def test_config_values_are_checked_with_one_line_naming_the_key(change, key, env, tmp_path, capsys):
    argv = _edit_argv(env, tmp_path / "exp", "--config", _config(env, tmp_path, **change))
    assert_one_error_line(cli.main(argv), capsys.readouterr().err, key)
    assert not (tmp_path / "exp").exists()


def test_a_config_name_cannot_lead_boundary_files_out_of_boundary_dir(env, tmp_path, capsys):
    config = yaml.safe_load((env["root"] / "tiny.yml").read_text())
    config["name"] = "../escaped"
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    argv = _search_argv(env, tmp_path / "exp", tmp_path / "out" / "bd", "--config", str(tmp_path / "c.yml"))
    assert_one_error_line(cli.main(argv), capsys.readouterr().err, "'name'")
    assert not (tmp_path / "out").exists()


def test_seed_out_of_range_names_the_flag(env, tmp_path, capsys):
    code = cli.main(_edit_argv(env, tmp_path / "exp", "--seed", "-1"))
    assert_one_error_line(code, capsys.readouterr().err, "--seed")


def test_summaries_are_strict_json(tmp_path):
    write_json(tmp_path / "s.json", {"acc": float("nan"), "d": [1.0, float("inf")], "n": np.float64("nan")})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=refuse) == {"acc": None, "d": [1.0, None],
                                                                                    "n": None}


def test_a_broken_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        make_alphas_cumprod(0.0001, 2.0, 1000)
    assert torch.isfinite(make_alphas_cumprod(0.0001, 0.02, 1000)).all()


def test_a_non_finite_network_output_names_the_step():
    def net(x, t, h_override=None):
        out = torch.zeros_like(x) + (float("nan") if t == 6 else 0.0)
        return out, torch.zeros(x.shape[0], 1, 1, 1)

    ac = make_alphas_cumprod(0.0001, 0.02, 20)
    with pytest.raises(ValueError, match="timestep 6"):
        list(ddim_trajectory(net, torch.zeros(1, 1, 2, 2), ac, [(9, 6), (6, 3), (3, 0)]))


def test_a_nan_cache_entry_is_recomputed(env, tmp_path):
    cache = tmp_path / "cache"
    outputs = []
    for run in ("a", "b"):
        assert cli.main(_edit_argv(env, tmp_path / run, "--cache_dir", str(cache), "--save_tensors")) == 0
        outputs.append(torch.load(tmp_path / run / "edit" / "tensors.pt", weights_only=True)["edits"])
        if run == "a":
            (entry,) = cache.rglob("*.pt")
            torch.save({k: torch.full_like(v, float("nan")) for k, v in torch.load(entry, weights_only=True).items()},
                       entry)
    assert torch.isfinite(outputs[1]).all() and torch.equal(outputs[0], outputs[1])


def _png_with_rows(width: int, header_rows: int, data_rows: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = b"".join(b"\x00" + bytes([200] * width) for _ in range(data_rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, header_rows, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))


def test_a_png_with_fewer_rows_than_its_header_is_an_error(env, tmp_path, capsys):
    (tmp_path / "short.png").write_bytes(_png_with_rows(20, 20, 10))
    (tmp_path / "full.png").write_bytes(_png_with_rows(20, 20, 20))
    assert torch.allclose(load_image(tmp_path / "full.png", 16, 3), torch.full((1, 3, 16, 16), 200 / 127.5 - 1))
    code = cli.main(_edit_argv(env, tmp_path / "exp", "--img_path", str(tmp_path / "short.png")))
    assert_one_error_line(code, capsys.readouterr().err, "fewer rows")


# --------------------------------------------------------------------------- 5. memory

def _bomb(path: Path, values: int, space: str = "h") -> Path:
    """A small .npz whose 'normal' declares ``values`` float32 values (zeros, compressed)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (values,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("normal.npy", "w", force_zip64=True) as fh:
            fh.write(header.getvalue())
            block = bytes(1 << 20)
            for _ in range(values * 4 // len(block)):
                fh.write(block)
        for name, value in {"shape": np.asarray([values], np.int64), "space": np.asarray(space),
                            "t_0": np.asarray(300), "n_inv_step": np.asarray(4),
                            "config_name": np.asarray("tiny_rel"), "attribute": np.asarray("bright_left")}.items():
            buf = io.BytesIO()
            np.save(buf, value)
            zf.writestr(f"{name}.npy", buf.getvalue())
    return path


def test_a_boundary_that_declares_gigabytes_is_refused_from_its_header(env, tmp_path):
    bomb = _bomb(tmp_path / "bomb.npz", 1 << 25)  # 128 MiB of float32 in a file of about 130 KB
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="at most"):
            load_boundary(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB"


def test_discovery_passes_over_bombs_odd_types_and_other_models(env, tmp_path, capsys):
    bd = tmp_path / "bd"
    bd.mkdir()
    for space in ("h", "z"):
        (bd / env[space].name).write_bytes(env[space].read_bytes())
    _bomb(bd / "zz_bomb.npz", 1 << 25)
    _bomb(bd / "zz_small_other_model.npz", 12)  # a unit normal of another shape is never read whole
    arrays = dict(np.load(env["h"], allow_pickle=False))
    arrays["attribute"] = np.asarray(5)  # a numeric attribute
    np.savez(bd / "zz_numeric_attribute.npz", **arrays)
    tracemalloc.start()
    try:
        found = discover_boundaries(bd, "tiny_rel", {"z": (3, 16, 16), "h": (32, 8, 8)}, "bright_left", 300).paths
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == {"h": bd / env["h"].name, "z": bd / env["z"].name}
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB"
    argv = ["--edit_image_boundary", *env["common"], "--exp", str(tmp_path / "exp"), "--img_path", str(env["img"]),
            "--boundary_dir", str(bd), "--edit_attr", "bright_left"]
    assert cli.main(argv) == 0, capsys.readouterr().err


def test_a_boundary_field_of_the_wrong_type_is_one_line(env, tmp_path, capsys):
    arrays = dict(np.load(env["h"], allow_pickle=False))
    arrays["t_0"] = np.asarray("300")
    np.savez(tmp_path / "b.npz", **arrays)
    code = cli.main(_edit_argv(env, tmp_path / "exp", "--boundary_h", str(tmp_path / "b.npz")))
    assert_one_error_line(code, capsys.readouterr().err, "'t_0' must be an integer")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_images_above_the_pixel_cap_are_refused(env, tmp_path, monkeypatch, capsys):
    (tmp_path / "huge.png").write_bytes(_png_header_only(12000, 12000))  # 144 megapixels declared
    code = cli.main(_edit_argv(env, tmp_path / "exp", "--img_path", str(tmp_path / "huge.png")))
    assert_one_error_line(code, capsys.readouterr().err, "more than the limit")
    monkeypatch.setenv("BOUNDARYDIFFUSION_MAX_PIXELS", "100")
    with pytest.raises(UserError, match="BOUNDARYDIFFUSION_MAX_PIXELS"):
        load_image(env["img"], 16, 3)  # 16 x 16 = 256 pixels
    monkeypatch.setenv("BOUNDARYDIFFUSION_MAX_PIXELS", "256")
    assert load_image(env["img"], 16, 3).shape == (1, 3, 16, 16)


# --------------------------------------------------------------------------- 7. a broken cache never stops a run

def _cache_cases(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    file_cache = tmp_path / "cache_is_a_file"
    file_cache.write_bytes(b"x")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if not _mount_tmpfs(read_only, "ro,size=16k"):
        read_only.chmod(0o555)  # holds for users other than root
        if os.geteuid() == 0:  # root writes anyway: the file system's refusal is injected
            mkstemp = utils.io.files.tempfile.mkstemp

            def read_only_mkstemp(*args, dir=None, **kwargs):
                if dir is not None and str(dir).startswith(str(read_only)):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
                return mkstemp(*args, dir=dir, **kwargs)

            monkeypatch.setattr(utils.io.files.tempfile, "mkstemp", read_only_mkstemp)
    return {"a path that is a file": file_cache, "a read-only folder": read_only}


def test_a_broken_cache_warns_once_and_the_run_goes_on(env, tmp_path, monkeypatch, capsys):
    cases = _cache_cases(tmp_path, monkeypatch)
    try:
        for name, cache in cases.items():
            argv = _search_argv(env, tmp_path / name, tmp_path / f"bd_{name}", "--cache_dir", str(cache))
            assert cli.main(argv) == 0, (name, capsys.readouterr().err)
            err = capsys.readouterr().err
            assert err.count("cannot be written") == 1, (name, err)
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(cases["a read-only folder"])], capture_output=True)
    with _full_disk(tmp_path, monkeypatch) as disk:
        argv = _search_argv(env, tmp_path / "full", tmp_path / "bd_full", "--cache_dir", str(disk / "cache"))
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert capsys.readouterr().err.count("cannot be written") == 1
