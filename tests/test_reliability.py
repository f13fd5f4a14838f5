"""Reliability: resumable boundary search after SIGKILL, deterministic reruns, and a table of bad
inputs that each end in one line, exit status 1, and no output left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main as cli
from tests.helpers import REPO, assert_one_error_line, float_tolerance, tiny_model, write_labelled_set
from utils.io.boundary_files import BoundaryRecord, load_boundary, save_boundary


def _search_cmd(env, cache: Path, bd: Path, exp: Path, steps: int = 60) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), "--boundary_search", "--config", str(env["root"] / "tiny.yml"),
            "--model_path", str(env["root"] / "w.pt"), "--cache_dir", str(cache), "--exp", str(exp),
            "--data_dir", str(env["images"]), "--attr_file", str(env["attr"]), "--edit_attr", "bright_left",
            "--n_train_img", "8", "--n_test_img", "4", "--bs_train", "1", "--n_inv_step", str(steps),
            "--boundary_dir", str(bd)]


def test_boundary_search_resumes_after_sigkill(env, tmp_path):
    subenv = {**os.environ, "OMP_NUM_THREADS": "1"}
    cache = tmp_path / "cache"
    proc = subprocess.Popen(_search_cmd(env, cache, tmp_path / "bd", tmp_path / "run"), env=subenv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(cache.glob("latents/*/*.pt"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cache.glob("latents/*/*.pt")))
    assert 3 <= done < 12, f"the kill did not land mid-inversion ({done} of 12 cached)"
    assert not list((tmp_path / "bd").glob("*.npz")), "boundaries were written before the search finished"
    assert [p.name for p in (tmp_path / "run").iterdir()][0].startswith(".partial-boundary_search-")

    resumed = subprocess.run(_search_cmd(env, cache, tmp_path / "bd", tmp_path / "run"), env=subenv,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    reused = int(resumed.stderr.split(" from the cache")[0].rsplit(", ", 1)[1])
    assert reused >= done, resumed.stderr  # what was inverted before the kill is not inverted again
    # the killed run's hidden folder was removed by the later run, which left only its finished one
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["boundary_search"]

    fresh = subprocess.run(_search_cmd(env, tmp_path / "cache2", tmp_path / "bd2", tmp_path / "run2"), env=subenv,
                           capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    for space in ("h", "z"):
        a = load_boundary(tmp_path / "bd" / f"tiny_rel_bright_left_t300_{space}.npz")
        b = load_boundary(tmp_path / "bd2" / f"tiny_rel_bright_left_t300_{space}.npz")
        # The resumed run inverted its images in other batches than the fresh one, and a convolution
        # kernel may depend on the batch size: equal to float32 rounding, not bit for bit.
        np.testing.assert_allclose(a.normal, b.normal, rtol=0, atol=1e-5)
        assert a.intercept == pytest.approx(b.intercept, abs=1e-4)


def test_same_command_gives_bit_identical_outputs(env, tmp_path):
    outputs = []
    for run in ("a", "b"):
        argv = ["--edit_image_boundary", *env["common"], "--exp", str(tmp_path / run), "--img_path", str(env["img"]),
                "--boundary_h", str(env["h"]), "--boundary_z", str(env["z"]), "--save_tensors", "--no_cache"]
        assert cli.main(argv) == 0
        folder = tmp_path / run / "edit"
        outputs.append({p.name: p.read_bytes() for p in folder.glob("*.png")})
        outputs[-1]["tensors"] = torch.load(folder / "tensors.pt", weights_only=True)
    a, b = outputs
    assert a.keys() == b.keys()
    for name in a:
        if name == "tensors":
            for key in a[name]:
                assert torch.equal(a[name][key], b[name][key]), key
        else:
            assert a[name] == b[name], name


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _png_bytes(mode: str) -> bytes:
    import io
    arr = np.random.default_rng(0).integers(0, 255, (20, 24), dtype=np.uint8)
    img = Image.fromarray(arr, "L").convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16) * 257)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


BAD_INPUTS = {
    # name: (how to build the bad input in tmp -> extra argv, expected fragment of the message)
    "zero-byte image": (lambda t, e: ["--img_path", _write(t / "x.png", b"")], "empty"),
    "truncated image": (lambda t, e: ["--img_path", _write(t / "x.png", _png_bytes("L")[:40])], "cannot be read"),
    "text file as image": (lambda t, e: ["--img_path", _write(t / "x.png", b"hello")], "cannot be read"),
    "missing image": (lambda t, e: ["--img_path", str(t / "none.png")], "does not exist"),
    "missing checkpoint": (lambda t, e: ["--img_path", str(e["img"]), "--model_path", str(t / "none.pt")], "does not exist"),
    "corrupt checkpoint": (lambda t, e: ["--img_path", str(e["img"]), "--model_path", _write(t / "c.pt", b"PK\x03\x04xx")],
                           "cannot be loaded"),
    "checkpoint of another architecture": (
        lambda t, e: ["--img_path", str(e["img"]), "--model_path", _other_arch(t)], "does not fit"),
    "corrupt boundary": (lambda t, e: ["--img_path", str(e["img"]), "--boundary_h", _write(t / "b.npz", b"garbage")],
                         "corrupt"),
    "boundary of the other space": (lambda t, e: ["--img_path", str(e["img"]), "--boundary_h", str(e["z"])], "z space"),
    "boundary of another shape": (lambda t, e: ["--img_path", str(e["img"]), "--boundary_h", _bad_shape(t)], "shape"),
    "boundary at another t_0": (lambda t, e: ["--img_path", str(e["img"]), "--t_0", "200"], "t_0 300"),
    "boundary of another checkpoint": (lambda t, e: ["--img_path", str(e["img"]), "--boundary_h", _other_ckpt(t, e)],
                                       "another checkpoint"),
    "t_0 above T-1": (lambda t, e: ["--img_path", str(e["img"]), "--t_0", "1000", "--force"], "--t_0"),
    "t_0 of 0": (lambda t, e: ["--img_path", str(e["img"]), "--t_0", "0", "--force"], "--t_0"),
    "one inversion step": (lambda t, e: ["--img_path", str(e["img"]), "--n_inv_step", "1"], "--n_inv_step"),
    "more steps than t_0 + 1": (lambda t, e: ["--img_path", str(e["img"]), "--n_test_step", "302"], "--n_test_step"),
    "non-finite distance": (lambda t, e: ["--img_path", str(e["img"]), "--end_distance", "inf"], "finite"),
    "output folder not writable": (lambda t, e: ["--img_path", str(e["img"]), "--exp", _write(t / "file", b"x") + "/sub"],
                                   "not writable"),
    "download failure offline": (lambda t, e: ["--img_path", str(e["img"]), "--config", _offline_config(t, e),
                                               "--model_path", None], "--model_path"),
}


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _other_arch(t: Path) -> str:
    torch.save(tiny_model("adm").state_dict(), t / "adm.pt")
    return str(t / "adm.pt")


def _bad_shape(t: Path) -> str:
    return str(save_boundary(t / "s.npz", BoundaryRecord(normal=np.ones(4, np.float32) / 2, coef=np.ones(4, np.float32),
                                                         intercept=0.0, shape=(4,), space="h", t_0=300, n_inv_step=4)))


def _other_ckpt(t: Path, e) -> str:
    record = load_boundary(e["h"])
    return str(save_boundary(t / "o.npz", BoundaryRecord(**{**record.__dict__, "checkpoint_sha256": "0" * 64})))


def _offline_config(t: Path, e) -> str:
    config = yaml.safe_load((e["root"] / "tiny.yml").read_text())
    config["checkpoint"] = {"filename": "tiny.ckpt", "urls": ["http://127.0.0.1:9/tiny.ckpt"]}
    (t / "offline.yml").write_text(yaml.safe_dump(config))
    return str(t / "offline.yml")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_table(case, env, tmp_path, capsys):
    make, fragment = BAD_INPUTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra = make(inputs, env)
    argv = ["--edit_image_boundary", *env["common"], "--exp", str(tmp_path / "out"),
            "--boundary_h", str(env["h"]), "--boundary_z", str(env["z"]), "--cache_dir", str(tmp_path / "cache")]
    # later flags win in argparse; a None value drops the flag (and its value) given before
    for flag, value in zip(extra[::2], extra[1::2]):
        if value is None:
            i = argv.index(flag)
            del argv[i:i + 2]
        else:
            argv += [flag, value]
    before = _snapshot(env["root"]), _snapshot(inputs)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert_one_error_line(code, err, fragment)
    assert not (tmp_path / "out").exists(), "a failed run left an output folder"
    assert (_snapshot(env["root"]), _snapshot(inputs)) == before, "a failed run modified files it did not create"
    leftovers = [str(p) for root in (tmp_path, env["root"]) for p in root.rglob("*.tmp")]
    assert not leftovers, f"a failed run left temporary files: {leftovers}"  # none in the cache, the inputs, anywhere


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_unusual_image_modes_are_converted(mode, env, tmp_path):
    img = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "CMYK":
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).convert("CMYK").save(img)
    else:
        img.write_bytes(_png_bytes(mode))
    argv = ["--edit_image_boundary", *env["common"], "--exp", str(tmp_path / "out"), "--img_path", str(img),
            "--boundary_h", str(env["h"]), "--boundary_z", str(env["z"]), "--edit_img_number", "2"]
    assert cli.main(argv) == 0
    with Image.open(tmp_path / "out" / "edit" / "original.png") as out:
        assert out.mode == "RGB" and out.size == (16, 16)


def test_boundary_at_another_t0_is_used_with_force(env, tmp_path, capsys):
    argv = ["--edit_image_boundary", *env["common"], "--exp", str(tmp_path / "out"), "--img_path", str(env["img"]),
            "--boundary_h", str(env["h"]), "--boundary_z", str(env["z"]), "--t_0", "200", "--force"]
    assert cli.main(argv) == 0


def test_single_class_and_too_few_images(env, tmp_path, capsys):
    few = tmp_path / "few"
    img_dir, _ = write_labelled_set(few, n=3)  # labels +1, -1, +1: one negative only
    attr = few / "attrs.txt"
    argv = ["--boundary_search", *env["common"], "--exp", str(tmp_path / "out"), "--data_dir", str(img_dir),
            "--attr_file", str(attr), "--boundary_dir", str(tmp_path / "bd")]
    assert cli.main([*argv, "--edit_attr", "bright_left"]) == 1
    assert "needs at least 2 of each class" in capsys.readouterr().err
    assert cli.main([*argv, "--edit_attr", "always"]) == 1
    assert "3 positive and 0 negative" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "bd").exists()


def test_batch_sizes_change_results_by_float_rounding_only(env, tmp_path):
    """Per-edit seeds make batching irrelevant to the maths; which convolution kernel runs may still
    depend on the batch size (on some CPUs), so the results agree to float32 rounding."""
    tensors, normals = [], []
    for bs in (2, 3, 5):
        argv = ["--edit_image_boundary", *env["common"], "--exp", str(tmp_path / f"e{bs}"), "--img_path",
                str(env["img"]), "--boundary_h", str(env["h"]), "--boundary_z", str(env["z"]), "--save_tensors",
                "--edit_img_number", "5", "--edit_batch_size", str(bs), "--no_cache"]
        assert cli.main(argv) == 0
        tensors.append(torch.load(tmp_path / f"e{bs}" / "edit" / "tensors.pt", weights_only=True)["edits"])
        argv = ["--boundary_search", *env["common"], "--exp", str(tmp_path / f"s{bs}"), "--data_dir",
                str(env["images"]), "--attr_file", str(env["attr"]), "--edit_attr", "bright_left", "--n_train_img",
                "8", "--n_test_img", "4", "--bs_train", str(bs), "--boundary_dir", str(tmp_path / f"bd{bs}"),
                "--no_cache"]
        assert cli.main(argv) == 0
        normals.append(load_boundary(tmp_path / f"bd{bs}" / "tiny_rel_bright_left_t300_h.npz").normal)
    tolerance = float_tolerance(torch.float32, float(tensors[0].abs().max()), ulps=100)
    for other in tensors[1:]:
        torch.testing.assert_close(other, tensors[0], rtol=0, atol=tolerance)
    for other in normals[1:]:
        np.testing.assert_allclose(other, normals[0], rtol=0, atol=1e-5)
