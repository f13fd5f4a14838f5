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
from models.checkpoints import load_weights, locate_weights, read_state_dict, resolve_checkpoint
from tests.conftest import REPO, tiny_config
from tests.test_hostile import _one_error_line
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
    line = _one_error_line(capsys.readouterr().err)
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


@pytest.mark.parametrize("filename", ["../x", "../../escaped.ckpt", "/tmp/abs.ckpt", "sub/w.ckpt", ".hidden.ckpt",
                                      "..", "w.ckpt.sha256", "a\\b.ckpt"])
def test_a_checkpoint_file_name_must_be_a_plain_name_in_the_cache(filename, tmp_path, capsys):
    path = _write_config(tmp_path, filename=filename, urls=["https://example.org/w.ckpt"])
    with pytest.raises(UserError, match=r"'checkpoint\.filename'.*\(in .*hostile\.yml\)"):
        load_config(path)
    argv = ["--unconditional", "--config", str(path), "--cache_dir", str(tmp_path / "cache"),
            "--boundary_h", "h.npz", "--exp", str(tmp_path / "exp")]
    assert cli.main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
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
    assert cli.main(["--radius", "--config", str(config), "--model_path", str(path), "--device", "cpu",
                     "--exp", str(tmp_path / "exp"), "--cache_dir", str(tmp_path / "cache")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "weights_only" not in line and str(path) in line, line
