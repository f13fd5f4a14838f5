"""Hostile inputs, round three: checkpoint mirrors and downloads, sizes that would exhaust memory,
a torchrun rank that cannot join, messages that name the file and the field, run folders the tool
does not own, and conditions finer than float32 can resolve. No network beyond loopback."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import main as cli
import models.checkpoints as checkpoints
from models.checkpoints import locate_weights, read_state_dict, resolve_checkpoint
from tests.helpers import REPO, assert_one_error_line, tiny_config, write_labelled_set
from utils.config import load_config, parse_config
from utils.errors import UserError

SUBENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def _write_config(tmp_path: Path, name: str = "hostile.yml", **checkpoint) -> Path:
    """The tiny DDPM config with the given ``checkpoint`` section, written to ``tmp_path/name``."""
    raw = tiny_config("ddpm", name="tiny_mirror")
    raw["checkpoint"] = checkpoint
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _state_dict_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(3, 3, generator=torch.Generator().manual_seed(seed))}, buffer)
    return buffer.getvalue()


QUOTA_PAGE = (b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>"
              b"Too many users have viewed or downloaded this file recently.</body></html>")


# --------------------------------------------------------------------------- A. checkpoint mirrors

@pytest.mark.parametrize("url", ["file:///etc/shadow", "FILE:///etc/passwd", "data:application/octet-stream;base64,AAAA",
                                 "ftp://example.org/w.ckpt", "/etc/shadow", "https:///no-host", "gdrive:../../x",
                                 "http://example.org/w.ckpt\n"])
def test_a_mirror_that_is_not_http_is_refused_when_the_config_is_read(url, tmp_path, capsys):
    path = _write_config(tmp_path, filename="w.ckpt", urls=["https://example.org/w.ckpt", url])
    with pytest.raises(UserError, match=r"'checkpoint\.urls'.*refused.*\(in .*hostile\.yml\)"):
        load_config(path)
    cache = tmp_path / "cache"
    argv = ["--edit_image_boundary", "--config", str(path), "--cache_dir", str(cache), "--img_path", "x.png",
            "--boundary_h", "h.npz", "--exp", str(tmp_path / "exp")]
    assert cli.main(argv) == 1
    line = assert_one_error_line(1, capsys.readouterr().err)
    assert "checkpoint.urls" in line and str(path) in line, line
    assert not cache.exists() and not (tmp_path / "exp").exists()


def test_https_http_and_drive_mirrors_are_accepted(tmp_path):
    urls = ["https://example.org/a/w.ckpt", "http://10.0.0.1:8080/w.ckpt", "gdrive:1f6_swzSPNJXs9FWf6AW585bv7dORzRWf"]
    assert load_config(_write_config(tmp_path, filename="w.ckpt", urls=urls)).checkpoint.urls == tuple(urls)


def test_a_file_url_reaching_the_downloader_is_not_fetched(tmp_path):
    """Defence in depth: a Config built around the reader still never copies a local file."""
    secret = tmp_path / "secret"
    secret.write_bytes(_state_dict_bytes())
    with pytest.raises(UserError, match="mirror refused"):
        checkpoints._download(secret.as_uri(), tmp_path / "cache" / "w.ckpt")
    with pytest.raises(urllib.error.URLError, match="unknown url type"):  # the opener has no file: handler
        checkpoints._OPENER.open(secret.as_uri())
    assert not (tmp_path / "cache" / "w.ckpt").exists()


@pytest.mark.parametrize("location", ["file:///etc/hostname", "ftp://127.0.0.1:1/w.ckpt"])
def test_a_mirror_redirecting_away_from_http_is_not_followed(location, tmp_path, monkeypatch):
    import http.server

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cache = tmp_path / "cache"
        config = _cache_config(urls=[f"http://127.0.0.1:{server.server_address[1]}/w.ckpt"])
        with pytest.raises(UserError, match=r"HTTP Error 302.*(redirect to a refused scheme|Redirection to url .* is not allowed)"):
            resolve_checkpoint(config, cache_dir=cache)
        assert sorted(os.listdir(cache)) == []
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("filename", ["../x", "../../escaped.ckpt", "/tmp/abs.ckpt", "sub/w.ckpt", ".hidden.ckpt",
                                      "..", "w.ckpt.sha256", "a\\b.ckpt"])
def test_a_checkpoint_file_name_must_be_a_plain_name_in_the_cache(filename, tmp_path, capsys):
    path = _write_config(tmp_path, filename=filename, urls=["https://example.org/w.ckpt"])
    with pytest.raises(UserError, match=r"'checkpoint\.filename'.*\(in .*hostile\.yml\)"):
        load_config(path)
    argv = ["--unconditional", "--config", str(path), "--cache_dir", str(tmp_path / "cache"),
            "--boundary_h", "h.npz", "--exp", str(tmp_path / "exp")]
    assert cli.main(argv) == 1
    line = assert_one_error_line(1, capsys.readouterr().err)
    assert "checkpoint.filename" in line and str(path) in line, line


class FakeMirror:
    """Stands in for the network: ``_fetch`` writes what ``serve`` holds for the URL (status 200)."""

    def __init__(self, monkeypatch):
        self.serve: dict[str, bytes] = {}
        self.requests: list[str] = []
        monkeypatch.setattr(checkpoints, "_fetch", self.fetch)

    def fetch(self, url: str, tmp: Path) -> None:
        self.requests.append(url)
        if url not in self.serve:
            raise OSError("HTTP Error 404: Not Found")
        tmp.write_bytes(self.serve[url])


def _cache_config(**checkpoint):
    raw = tiny_config("ddpm", name="tiny_mirror")
    raw["checkpoint"] = {"filename": "tiny.ckpt", **checkpoint}
    return parse_config(raw)


def test_a_mirror_serving_a_quota_page_leaves_nothing_cached_and_the_fixed_mirror_works(tmp_path, monkeypatch):
    mirror = FakeMirror(monkeypatch)
    url = "https://drive.example.org/uc?id=abc"
    mirror.serve[url] = QUOTA_PAGE
    cache = tmp_path / "cache"
    config = _cache_config(urls=[url])
    with pytest.raises(UserError) as info:
        resolve_checkpoint(config, cache_dir=cache)
    message = str(info.value)
    assert "HTML page" in message and "not kept" in message and "--model_path" in message, message
    assert "weights_only" not in message
    assert sorted(os.listdir(cache)) == [], "the quota page was cached"
    # the next run asks the mirror again; once it serves the weights they are cached and used
    content = _state_dict_bytes()
    mirror.serve[url] = content
    path = resolve_checkpoint(config, cache_dir=cache)
    assert path == cache / "tiny.ckpt" and path.read_bytes() == content
    assert sorted(os.listdir(cache)) == ["tiny.ckpt", "tiny.ckpt.sha256"]
    assert torch.equal(read_state_dict(path)["w"], torch.load(io.BytesIO(content))["w"])
    assert len(mirror.requests) == 2


@pytest.mark.parametrize("junk", [QUOTA_PAGE, b"x" * 1000, b'{"error": "quota"}', b"PK\x03\x04broken zip"])
def test_junk_from_the_first_mirror_falls_through_to_the_next(junk, tmp_path, monkeypatch):
    mirror = FakeMirror(monkeypatch)
    mirror.serve["https://a.example.org/w"] = junk
    mirror.serve["https://b.example.org/w"] = content = _state_dict_bytes(1)
    cache = tmp_path / "cache"
    path = resolve_checkpoint(_cache_config(urls=["https://a.example.org/w", "https://b.example.org/w"]), cache_dir=cache)
    assert path.read_bytes() == content and sorted(os.listdir(cache)) == ["tiny.ckpt", "tiny.ckpt.sha256"]


def test_with_a_known_hash_a_wrong_file_is_refused_before_it_is_cached(tmp_path, monkeypatch):
    mirror = FakeMirror(monkeypatch)
    url = "https://a.example.org/w"
    right, wrong = _state_dict_bytes(0), _state_dict_bytes(1)  # both load: only the hash tells them apart
    config = _cache_config(urls=[url], sha256=hashlib.sha256(right).hexdigest())
    cache = tmp_path / "cache"
    for served in (wrong, QUOTA_PAGE):
        mirror.serve[url] = served
        with pytest.raises(UserError, match=r"SHA-256 .*not the expected .*not kept"):
            resolve_checkpoint(config, cache_dir=cache)
        assert sorted(os.listdir(cache)) == []
    mirror.serve[url] = right
    assert resolve_checkpoint(config, cache_dir=cache).read_bytes() == right


def test_a_safetensors_download_is_checked_as_safetensors(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from safetensors.torch import save

    mirror = FakeMirror(monkeypatch)
    raw = tiny_config("ddpm", name="tiny_mirror")
    raw["checkpoint"] = {"filename": "w.safetensors", "urls": ["https://a.example.org/w"]}
    config, cache = parse_config(raw), tmp_path / "cache"
    mirror.serve["https://a.example.org/w"] = QUOTA_PAGE
    with pytest.raises(UserError, match="HTML page"):
        resolve_checkpoint(config, cache_dir=cache)
    assert sorted(os.listdir(cache)) == []
    mirror.serve["https://a.example.org/w"] = save({"w": torch.ones(2)})
    assert read_state_dict(resolve_checkpoint(config, cache_dir=cache))["w"].tolist() == [1.0, 1.0]


class _Unsafe:
    """Not a tensor: unpickling it needs the class, which weights_only=True refuses."""


@pytest.mark.parametrize("kind", ["object", "html", "damaged"])
def test_an_unloadable_checkpoint_never_advises_weights_only_false(kind, tmp_path, capsys):
    path = tmp_path / "w.pt"
    if kind == "object":
        torch.save({"w": torch.zeros(2), "extra": _Unsafe()}, path)
    elif kind == "html":
        path.write_bytes(QUOTA_PAGE)
    else:
        path.write_bytes(_state_dict_bytes()[:300])
    with pytest.raises(UserError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "weights_only" not in message and "False" not in message, message
    assert {"object": "_Unsafe", "html": "HTML page", "damaged": "damaged"}[kind] in message, message
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(tiny_config("ddpm")))
    assert cli.main(["--radius", "--img_path", str(REPO / "imgs" / "digit_example.png"), "--config", str(config), "--model_path", str(path), "--device", "cpu",
                     "--exp", str(tmp_path / "exp"), "--cache_dir", str(tmp_path / "cache")]) == 1
    line = assert_one_error_line(1, capsys.readouterr().err)
    assert "weights_only" not in line and str(path) in line, line


# --------------------------------------------------------------------------- B. sizes

def test_a_huge_edit_count_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch):
    import models.loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models.loading, "load_model", never)
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(tiny_config("ddpm")))
    for count in ("100000000", "1001", "1" + "0" * 40):
        argv = ["--unconditional", "--config", str(config), "--edit_img_number", count, "--exp", str(tmp_path / "exp")]
        assert cli.main(argv) == 1
        line = assert_one_error_line(1, capsys.readouterr().err)
        assert "--edit_img_number" in line and "at most 1000" in line, line
    assert cli.build_parser().parse_args(["--radius", "--edit_img_number", "1000"]).edit_img_number == 1000
    assert not (tmp_path / "exp").exists()


def test_a_config_edit_count_above_the_cap_is_refused_naming_key_and_file(tmp_path):
    raw = tiny_config("ddpm")
    raw["edit"]["edit_img_number"] = 5000
    (tmp_path / "big.yml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"'edit\.edit_img_number' must be in \[1, 1000\].*big\.yml"):
        load_config(tmp_path / "big.yml")


def _diffusers_folder(root: Path, config_text: str | bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_bytes(config_text.encode() if isinstance(config_text, str) else config_text)
    torch.save({"w": torch.zeros(1)}, root / "diffusion_pytorch_model.bin")
    return root


def test_an_oversized_config_json_is_refused_without_being_read_whole(tmp_path, monkeypatch):
    import tracemalloc

    folder = _diffusers_folder(tmp_path / "model", "")
    with open(folder / "config.json", "wb") as fh:  # 64 MiB, sparse: a 1 GiB file behaves the same
        fh.write(b'{"sample_size": 256, "pad": "')
        fh.truncate(64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"config.json is larger than 1024 KiB.*not read"):
            locate_weights(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated to refuse the file"


def test_an_oversized_yaml_config_is_refused(tmp_path):
    path = tmp_path / "big.yml"
    path.write_text(yaml.safe_dump(tiny_config("ddpm")) + "#" * (2 << 20) + "\n")
    with pytest.raises(UserError, match=r"big\.yml is larger than 1024 KiB"):
        load_config(path)


# --------------------------------------------------------------------------- D. messages name the file and the field

@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deeply_nested_config_json_names_file_and_field(depth, tmp_path, capsys):
    text = '{"_class_name": "UNet2DModel", "sample_size": 16, "block_out_channels": ' + "[" * depth + "]" * depth + "}"
    folder = _diffusers_folder(tmp_path / "model", text)
    with pytest.raises(UserError, match=r"config.json: field 'block_out_channels\[0\]\[0\]\.\.\.' is nested too deeply"):
        locate_weights(folder)
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(tiny_config("ddpm")))
    assert cli.main(["--radius", "--img_path", str(REPO / "imgs" / "digit_example.png"), "--config", str(config), "--model_path", str(folder), "--device", "cpu",
                     "--exp", str(tmp_path / "exp"), "--cache_dir", str(tmp_path / "cache")]) == 1
    line = assert_one_error_line(1, capsys.readouterr().err)
    assert str(folder / "config.json") in line and "block_out_channels" in line and "Recursion" not in line, line


@pytest.mark.parametrize("text, field", [
    ('{"sample_size": ' + "9" * 5000 + "}", "sample_size"),
    ('{"a": 1, "block_out_channels": [32, -' + "1" * 4400 + "]}", r"block_out_channels\[1\]"),
    ('{"nested": {"layers_per_block": ' + "7" * 1001 + "}}", r"nested\.layers_per_block"),
])
def test_an_integer_of_thousands_of_digits_in_json_names_file_and_field(text, field, tmp_path):
    folder = _diffusers_folder(tmp_path / "model", text)
    with pytest.raises(UserError, match=rf"config.json: field '{field}' is an integer of \d+ digits"):
        locate_weights(folder)


@pytest.mark.parametrize("tail, key", [
    ("  ch: " + "9" * 5000, r"model\.ch"),
    ("  ch_mult: [1, " + "2" * 4400 + "]", r"model\.ch_mult\[1\]"),
    ("  attn_resolutions: " + "[" * 3000 + "]" * 3000, r"model\.attn_resolutions\[0\]"),
])
def test_yaml_config_with_a_huge_integer_or_deep_nesting_names_file_and_key(tail, key, tmp_path, capsys):
    raw = tiny_config("ddpm")
    del raw["model"][tail.split(":")[0].strip()]
    path = tmp_path / "hostile.yml"
    text = yaml.safe_dump({k: v for k, v in raw.items() if k != "model"})
    text += "model:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in raw["model"].items()) + tail + "\n"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"hostile\.yml: key '{key}"):
        load_config(path)
    assert cli.main(["--radius", "--config", str(path), "--exp", str(tmp_path / "exp")]) == 1
    line = assert_one_error_line(1, capsys.readouterr().err)
    assert str(path) in line and "Exceeds the limit" not in line and "Recursion" not in line, line


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64])
def test_integer_or_boolean_weights_of_the_right_shapes_are_one_line(dtype, tmp_path, capsys):
    from tests.helpers import random_model

    raw = tiny_config("ddpm")
    state = random_model(raw).state_dict()
    bad = {k: (v != 0 if dtype == torch.bool else v.to(dtype)) for k, v in state.items()}
    path = tmp_path / "ints.pt"
    torch.save(bad, path)
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(raw))
    assert cli.main(["--radius", "--img_path", str(REPO / "imgs" / "digit_example.png"), "--config", str(config), "--model_path", str(path), "--device", "cpu",
                     "--exp", str(tmp_path / "exp"), "--cache_dir", str(tmp_path / "cache")]) == 1
    line = assert_one_error_line(1, capsys.readouterr().err)
    dtype_name = str(dtype).replace("torch.", "")
    assert str(path) in line and f"holds {dtype_name} values under '" in line, line
    assert not (tmp_path / "exp").exists()


def test_float64_and_half_weights_still_load(tmp_path):
    from models.loading import load_model
    from tests.helpers import random_model

    raw = tiny_config("ddpm")
    for dtype in (torch.float64, torch.float16):
        path = tmp_path / f"{dtype}.pt"
        torch.save({k: v.to(dtype) for k, v in random_model(raw).state_dict().items()}, path)
        assert load_model(raw, model_path=path).checkpoint == path


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "config.json"])
def test_a_dangling_symlink_in_a_diffusers_folder_is_named_as_such(name, tmp_path, capsys):
    folder = _diffusers_folder(tmp_path / "model", '{"sample_size": 16}')
    (folder / "diffusion_pytorch_model.bin").unlink()
    if name == "config.json":
        (folder / "diffusion_pytorch_model.bin").write_bytes(b"x")
        (folder / "config.json").unlink()
    (folder / name).symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(UserError) as info:
        locate_weights(folder)
    message = str(info.value)
    assert f"{folder / name} is a symbolic link to {tmp_path / 'blobs' / 'gone'}, which does not exist" in message
    assert "found" not in message and "sharded" not in message, message


# --------------------------------------------------------------------------- E. files the tool does not own

def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_users_folder_named_like_a_partial_run_is_never_removed(tmp_path):
    from utils.io.files import PARTIAL_MARKER, RunFolder

    exp = tmp_path / "exp"
    dead = _dead_pid()
    lookalikes = {
        f".partial-notes-{dead}-0-ab": "the name from the report",
        f".partial-edit-{dead}-0-0a0b0c0d": "the exact pattern, no marker",
        f".partial-edit-{dead}-0-1a1b1c1d": "a marker naming another folder",
        f".partial-edit-{dead}-0-2a2b2c2d": "a marker that is a link",
        f".partial-edit-old-{dead}-0-3a3b3c3d": "a finished folder set aside by --ni (marker removed at commit)",
    }
    for name in lookalikes:
        (exp / name).mkdir(parents=True)
        (exp / name / "notes.txt").write_text("mine")
    (exp / f".partial-edit-{dead}-0-1a1b1c1d" / PARTIAL_MARKER).write_text(f".partial-edit-{dead}-0-0a0b0c0d")
    (exp / "elsewhere").write_text(f".partial-edit-{dead}-0-2a2b2c2d")
    (exp / f".partial-edit-{dead}-0-2a2b2c2d" / PARTIAL_MARKER).symlink_to(exp / "elsewhere")
    # a link named like a dead run's folder, pointing at the user's data
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    (tmp_path / "data" / PARTIAL_MARKER).write_text(f".partial-edit-{dead}-0-4a4b4c4d")
    (exp / f".partial-edit-{dead}-0-4a4b4c4d").symlink_to(tmp_path / "data")
    folder = RunFolder(exp, "edit")
    with folder as partial:
        (partial / "result.txt").write_text("new")
    for name, why in lookalikes.items():
        assert (exp / name / "notes.txt").read_text() == "mine", why
    assert (tmp_path / "data" / "keep.txt").exists()
    assert sorted(p.name for p in folder.final.iterdir()) == ["result.txt"]  # the marker is not part of a result


def test_a_killed_runs_own_folder_is_still_cleaned_up(tmp_path):
    exp = tmp_path / "exp"
    code = ("import os, sys; from utils.io.files import RunFolder; p = RunFolder(sys.argv[1], 'edit').__enter__(); "
            "(p / 'half.png').write_bytes(b'x'); print(p.name); os._exit(0)")
    made = subprocess.run([sys.executable, "-c", code, str(exp)], capture_output=True, text=True, cwd=REPO, env=SUBENV)
    left = exp / made.stdout.strip()
    assert made.returncode == 0 and left.is_dir(), made.stderr
    from utils.io.files import RunFolder

    with RunFolder(exp, "edit") as partial:
        (partial / "result.txt").write_text("new")
    assert not left.exists() and sorted(p.name for p in exp.iterdir()) == ["edit"]


# --------------------------------------------------------------------------- F. conditions below float32 precision

def _unit32(rng, dim: int) -> np.ndarray:
    v = rng.normal(size=dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _joint(*normals):
    from utils.core.boundary import check_joint, unit_rows

    return check_joint([f"n{i}" for i in range(len(normals))], unit_rows(np.stack(normals)))


def test_a_condition_equal_to_the_primary_plus_1e7_noise_is_refused():
    rng = np.random.default_rng(0)
    dim = 196_608  # a 256-px image's z space
    p = _unit32(rng, dim)
    c = (p.astype(np.float64) + rng.normal(scale=1e-7, size=dim)).astype(np.float32)
    with pytest.raises(ValueError, match=r"n0 and n1 are too close to move or hold together \(cos \+1.0000; "
                                         r"cond\(G\) [0-9.e+]+ for 196608 values\)"):
        _joint(p, c)


def test_a_condition_resaved_with_a_few_values_one_float32_step_apart_is_refused():
    rng = np.random.default_rng(1)
    dim = 768  # the tiny test models' z space
    p = rng.normal(size=dim) * 1e-3
    p[:4] = [0.6, -0.5, 0.4, 0.45]  # a normal dominated by a few components, where a step is largest
    p = (p / np.linalg.norm(p)).astype(np.float32)
    c = p.copy()
    for i in range(4):
        c[i] = np.nextafter(c[i], np.float32(2 * np.sign(c[i])))
    assert np.count_nonzero(c != p) == 4
    with pytest.raises(ValueError, match="too close to move or hold together"):
        _joint(p, c)


@pytest.mark.parametrize("dim", [768, 196_608])
@pytest.mark.parametrize("factor, refused", [(0.5, True), (0.9, True), (1.2, False), (4.0, False)])
def test_the_threshold_is_sqrt_d_float32_steps_on_both_sides(dim, factor, refused):
    from utils.core.boundary import project_boundary, resolvable_residual

    rng = np.random.default_rng(dim)
    p = rng.normal(size=dim)
    p /= np.linalg.norm(p)
    q = rng.normal(size=dim)
    q -= (q @ p) * p
    q /= np.linalg.norm(q)
    residual = factor * resolvable_residual(dim)  # the part of p that removing c leaves: sin of their angle
    c = np.sqrt(1 - residual ** 2) * p + residual * q
    if refused:
        with pytest.raises(ValueError, match="degrees"):
            project_boundary(p, c)
    else:
        r = project_boundary(p, c).astype(np.float64)
        assert abs(r @ c) < 1e-6 and r @ p > 0
        expected = p - (p @ c) * c  # the part of p orthogonal to c, which the edit follows
        assert r @ (expected / np.linalg.norm(expected)) > 1 - 1e-4
    assert resolvable_residual(dim) == pytest.approx(np.sqrt(dim) * np.finfo(np.float32).eps)


def test_a_condition_at_rounding_distance_from_another_adds_no_direction():
    from utils.core.boundary import project_boundary

    rng = np.random.default_rng(2)
    p, c = _unit32(rng, 4096), _unit32(rng, 4096)
    c_copy = (c.astype(np.float64) + rng.normal(scale=1e-8, size=4096)).astype(np.float32)
    once, twice = project_boundary(p, c), project_boundary(p, c, c_copy)
    assert float(once.astype(np.float64) @ twice) > 1 - 1e-6


def test_the_cli_refuses_a_primary_held_by_its_own_noisy_copy_in_one_line(env, tmp_path, capsys):
    from utils.io.boundary_files import load_boundary, save_boundary
    import dataclasses

    record = load_boundary(env["z"])
    rng = np.random.default_rng(3)
    noisy = (record.normal.astype(np.float64) + rng.normal(scale=1e-7, size=record.normal.size)).astype(np.float32)
    copy = save_boundary(tmp_path / "copy_z.npz", dataclasses.replace(record, normal=noisy.reshape(record.normal.shape)))
    exp = tmp_path / "exp"
    argv = ["--edit_image_boundary", *env["common"], "--exp", str(exp), "--img_path", str(env["img"]),
            "--boundary_z", str(env["z"]), "--edit_space", "z", "--condition_z", str(copy)]
    assert cli.main(argv) == 1
    line = assert_one_error_line(1, capsys.readouterr().err)
    assert "cannot edit the z space" in line and "too close" in line and "cos +1.0000" in line, line
    assert not exp.exists()


# --------------------------------------------------------------------------- C. a torchrun rank that cannot join

class SilentListener:
    """A loopback port where connections are accepted and never answered (a stale process, another
    program that took MASTER_PORT)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_port():
    listener = SilentListener()
    yield listener
    listener.close()


def _rank_process(tmp_path: Path, port: int, rank: int, timeout: int) -> subprocess.Popen:
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(tiny_config("ddpm")))
    images, attrs = write_labelled_set(tmp_path / "data", n=8)  # the data is checked before the rendezvous
    env = {**SUBENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    argv = [sys.executable, str(REPO / "main.py"), "--boundary_search", "--config", str(config), "--device", "cpu",
            "--dist_timeout", str(timeout), "--exp", str(tmp_path / "exp"), "--cache_dir", str(tmp_path / "cache"),
            "--data_dir", str(images), "--attr_file", str(attrs), "--edit_attr", "Bright_Left", "--n_train_img", "4",
            "--n_test_img", "4"]
    return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_rank_whose_master_port_never_answers_gives_up_after_dist_timeout_in_one_line(silent_port, tmp_path):
    proc = _rank_process(tmp_path, silent_port.port, rank=1, timeout=2)
    try:
        _, err = proc.communicate(timeout=60)  # bounds the test; before the fix it waited for ever
    finally:
        proc.kill()
    assert silent_port.accepted, "the rank never reached the rendezvous"
    assert proc.returncode == 1, err
    line = assert_one_error_line(1, err)
    assert "rank 1 of 2 could not join the process group within 2 s" in line, line
    assert f"127.0.0.1:{silent_port.port}" in line, line
    assert "frame #" not in err and "c10::" not in err, err
    assert not (tmp_path / "exp").exists()


def test_sigterm_ends_a_rank_waiting_at_the_rendezvous(silent_port, tmp_path):
    proc = _rank_process(tmp_path, silent_port.port, rank=1, timeout=600)
    try:
        deadline = time.monotonic() + 120
        while not silent_port.accepted and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert silent_port.accepted and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.5)  # well inside the blocking call
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "frame #" not in err, err


def test_a_quota_page_cached_by_an_older_version_is_replaced_by_the_next_good_download(tmp_path, monkeypatch):
    mirror = FakeMirror(monkeypatch)
    url = "https://a.example.org/w"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny.ckpt").write_bytes(QUOTA_PAGE)
    (cache / "tiny.ckpt.sha256").write_text(hashlib.sha256(QUOTA_PAGE).hexdigest() + "\n")
    config = _cache_config(urls=[url])
    with pytest.raises(UserError, match="could not download"):  # the mirror still fails: the junk stays, unused
        resolve_checkpoint(config, cache_dir=cache)
    mirror.serve[url] = content = _state_dict_bytes(2)
    path = resolve_checkpoint(config, cache_dir=cache)
    assert path.read_bytes() == content
    assert (cache / "tiny.ckpt.sha256").read_text().strip() == hashlib.sha256(content).hexdigest()
