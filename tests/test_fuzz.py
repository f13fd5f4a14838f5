"""Property-based fuzzing of the command line, config files, boundary files and image files: every input either
succeeds or fails with one anticipated line and exit status 1; never a traceback, and never a
change to files the tool did not create. Bounded: a few dozen examples per property."""
from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import main as cli
from tests.helpers import assert_one_error_line
from utils.io.boundary_files import load_boundary
from utils.errors import UserError
from utils.io.images import load_image

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow], derandomize=True)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _value_strategies(env):
    paths = [str(env["img"]), str(env["h"]), str(env["z"]), str(env["attr"]), str(env["images"]), "/nonexistent/x",
             str(env["root"] / "w.pt"), ""]
    numbers = st.one_of(st.integers(-5, 1005).map(str), st.sampled_from(["nan", "inf", "-inf", "1e309", "0.5", "x", ""]))
    small = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(["nan", "1.5", "abc", ""]))
    distance = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr), st.sampled_from(["x"]))
    return {
        "--t_0": numbers, "--n_inv_step": small, "--n_test_step": small, "--edit_img_number": small,
        "--start_distance": distance, "--end_distance": distance, "--eta": distance, "--n_iter": small,
        "--edit_batch_size": small, "--bs_train": small, "--n_train_img": small, "--n_test_img": small,
        "--img_path": st.sampled_from(paths), "--boundary_h": st.sampled_from(paths),
        "--boundary_z": st.sampled_from(paths), "--model_path": st.sampled_from(paths),
        "--data_dir": st.sampled_from(paths), "--attr_file": st.sampled_from(paths),
        "--edit_attr": st.sampled_from(["bright_left", "always", "BRIGHT_LEFT", "nope", ""]),
        "--edit_space": st.sampled_from(["both", "z", "h", "q"]), "--h_policy": st.sampled_from(["lagged", "once", "x"]),
        "--config": st.sampled_from([str(env["root"] / "tiny.yml"), "nope.yml", str(env["img"])]),
        "--radius_step": small, "--radius_eps": distance, "--seed": numbers, "--device": st.sampled_from(["cpu", "gpu9"]),
    }


@pytest.mark.parametrize("mode", ["--boundary_search", "--edit_image_boundary", "--unconditional", "--radius"])
def test_fuzz_command_line(mode, env, capsys):
    values = _value_strategies(env)
    flags = st.lists(st.sampled_from(sorted(values)).flatmap(lambda f: st.tuples(st.just(f), values[f])), max_size=5)

    @FUZZ
    @given(pairs=flags, drop_value=st.booleans())
    def check(pairs, drop_value):
        with tempfile.TemporaryDirectory() as tmp:
            base = [mode, *env["common"], "--exp", f"{tmp}/out", "--cache_dir", f"{tmp}/cache", "--boundary_dir",
                    f"{tmp}/bd", "--n_inv_step", "3", "--n_test_step", "3", "--edit_img_number", "2",
                    "--n_train_img", "6", "--n_test_img", "4", "--radius_step", "400",
                    "--data_dir", str(env["images"]), "--attr_file", str(env["attr"]), "--edit_attr", "bright_left",
                    "--img_path", str(env["img"]), "--boundary_h", str(env["h"]), "--boundary_z", str(env["z"])]
            argv = base + [item for pair in pairs for item in pair]
            if drop_value and pairs:
                argv = argv[:-1]  # a flag missing its value
            before = _snapshot(env["root"])
            code = cli.main(argv)
            err = capsys.readouterr().err
            assert code in (0, 1), (argv, err)
            if code == 1:
                assert_one_error_line(code, err)
            else:
                assert "Traceback" not in err
            assert _snapshot(env["root"]) == before, f"{argv} modified files it did not create"

    check()


@FUZZ
@given(data=st.data())
def test_fuzz_boundary_files(env, data):
    valid = Path(env["h"]).read_bytes()
    mutation = data.draw(st.sampled_from(["flip", "truncate", "random", "fields"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.npz"
        if mutation == "flip":
            raw = bytearray(valid)
            for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
                raw[pos] ^= data.draw(st.integers(1, 255))
            path.write_bytes(bytes(raw))
        elif mutation == "truncate":
            path.write_bytes(valid[: data.draw(st.integers(0, len(valid) - 1))])
        elif mutation == "random":
            path.write_bytes(data.draw(st.binary(max_size=2000)))
        else:  # well-formed npz, ill-typed fields
            arrays = {k: np.asarray(v) for k, v in np.load(env["h"], allow_pickle=False).items()}
            for key in data.draw(st.lists(st.sampled_from(sorted(arrays)), min_size=1, max_size=3)):
                arrays[key] = data.draw(st.sampled_from([np.asarray("x"), np.asarray([1.5, 2.0]), np.zeros((2, 2)),
                                                         np.asarray(7), np.asarray(np.nan), np.asarray([], dtype=np.int64)]))
            with open(path, "wb") as fh:
                np.savez(fh, **arrays)
        try:
            record = load_boundary(path)
        except UserError:
            return
        assert record.normal.shape == (int(np.prod(record.shape)),)
        assert abs(float(np.linalg.norm(record.normal)) - 1) < 1e-3 and record.space in ("h", "z")


HOSTILE_VALUES = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e309, -1, 0, 2.0, 1e12, 10 ** 30,
                                   "16", "", "x", None, True, [], [1, "x"], {"a": 1}, 0.5, 3])


@FUZZ
@given(data=st.data())
def test_fuzz_config_files(env, data):
    """Config files with hostile values and types: a Config whose numbers all make sense, or one
    UserError line that names the key. A config that parses also runs (or fails in one line)."""
    import yaml

    from models import latent_shapes
    from utils.config import load_config
    from utils.core.diffusion import make_alphas_cumprod

    config = yaml.safe_load((env["root"] / "tiny.yml").read_text())
    keys = [(section, key) for section in ("data", "model", "diffusion", "edit") for key in config[section]]
    changes = data.draw(st.lists(st.tuples(st.sampled_from(keys), HOSTILE_VALUES), min_size=1, max_size=3))
    for (section, key), value in changes:
        config[section][key] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yml"
        path.write_text(yaml.safe_dump(config))
        try:
            parsed = load_config(path)
        except UserError as exc:
            message = str(exc)
            assert "\n" not in message and any(f"{s}.{k}" in message for (s, k), _ in changes), message
            return
        ac = make_alphas_cumprod(parsed.diffusion.beta_start, parsed.diffusion.beta_end,
                                 parsed.diffusion.num_diffusion_timesteps)
        assert torch.isfinite(ac).all() and (ac > 0).all()
        assert all(math.isfinite(v) for v in (parsed.edit.start_distance, parsed.edit.end_distance))
        assert parsed.edit.edit_img_number >= 1 and 1 <= parsed.edit.t_0 < parsed.diffusion.num_diffusion_timesteps
        assert all(n > 0 for shape in latent_shapes(parsed).values() for n in shape)


@FUZZ
@given(data=st.data())
def test_fuzz_boundary_fields(env, data):
    """Well-formed .npz files whose fields hold hostile values and types, and normals that declare
    huge sizes: each loads as a consistent boundary of the model, or fails with one UserError."""
    from models import latent_shapes
    from utils.config import load_config

    shapes = latent_shapes(load_config(env["root"] / "tiny.yml"))
    arrays = {k: np.asarray(v) for k, v in np.load(env["h"], allow_pickle=False).items()}
    hostile = st.sampled_from([np.asarray("300"), np.asarray(5), np.asarray(2.5), np.asarray(np.nan),
                               np.asarray(True), np.asarray([1, 2]), np.asarray("z"), np.asarray("h"),
                               np.asarray([32, 8, 8]), np.asarray([3, 16, 16]), np.asarray([-1, 8, 8]),
                               np.asarray("x" * 5000), np.zeros(0, np.float32), np.full(2048, np.inf, np.float32),
                               np.asarray(["a", "b"]), np.asarray(2 ** 40)])
    for key in data.draw(st.lists(st.sampled_from(sorted(arrays)), min_size=1, max_size=3)):
        arrays[key] = data.draw(hostile)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.npz"
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        try:
            record = load_boundary(path, shapes)
        except UserError as exc:
            assert "\n" not in str(exc)
            return
        assert record.space in ("h", "z") and tuple(record.shape) == shapes[record.space]
        assert isinstance(record.t_0, int) and isinstance(record.attribute, str)
        assert record.normal.shape == (int(np.prod(record.shape)),) and np.isfinite(record.normal).all()
        assert abs(float(np.linalg.norm(record.normal)) - 1) < 1e-3


def _image_bytes(data) -> bytes:
    kind = data.draw(st.sampled_from(["valid", "truncated", "random"]))
    if kind == "random":
        return data.draw(st.binary(max_size=500))
    h, w = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    mode = data.draw(st.sampled_from(["L", "RGB", "RGBA", "P", "LA", "I;16", "1", "F", "I"]))
    fmt = data.draw(st.sampled_from(["PNG", "BMP", "TIFF", "JPEG"]))
    arr = np.random.default_rng(data.draw(st.integers(0, 100))).integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    img = img.convert(mode) if mode not in ("I;16",) else Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    if fmt == "JPEG" and img.mode not in ("L", "RGB", "CMYK"):
        img = img.convert("RGB")
    if fmt == "BMP" and img.mode in ("I;16", "F", "I", "LA", "RGBA"):
        fmt = "PNG" if img.mode not in ("F",) else "TIFF"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    raw = buf.getvalue()
    return raw if kind == "valid" else raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]


@FUZZ
@given(data=st.data())
def test_fuzz_image_files(data):
    raw = _image_bytes(data)
    channels = data.draw(st.sampled_from([1, 3]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / data.draw(st.sampled_from(["i.png", "i.jpg", "i.bmp", "i.tif", "i"]))
        path.write_bytes(raw)
        try:
            x = load_image(path, 16, channels)
        except UserError:
            return
        assert x.shape == (1, channels, 16, 16)
        assert np.isfinite(x.numpy()).all() and x.min() >= -1 and x.max() <= 1
