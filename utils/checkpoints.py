"""Finding, downloading and loading model weights.

Downloads go through a temporary file in the cache folder and are renamed when complete; the
SHA-256 of the first download is recorded beside it (``<file>.sha256``) and checked on every
later use, as is the hash a config names. Weights load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from utils.config import Config
from utils.errors import UserError
from utils.io import atomic_path, write_bytes

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    return Path(os.environ.get("BOUNDARYDIFFUSION_CACHE", Path.home() / ".cache" / "boundarydiffusion"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` (http(s) or ``gdrive:<id>``) to ``target`` through a temporary file."""
    with atomic_path(target) as tmp:
        if url.startswith("gdrive:"):
            import gdown  # optional at import time: only Drive mirrors need it
            if gdown.download(id=url.split(":", 1)[1], output=str(tmp), quiet=False) is None:
                raise OSError(f"gdown could not fetch {url}")
        else:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as fh:
                shutil.copyfileobj(response, fh, length=1 << 20)
                expected = response.headers.get("Content-Length")
            # http.client returns a short body without error when the connection drops early.
            if expected is not None and tmp.stat().st_size != int(expected):
                raise OSError(f"download cut off: {tmp.stat().st_size} of {expected} bytes")
        if tmp.stat().st_size == 0:
            raise OSError(f"{url} sent an empty file")


def resolve_checkpoint(config: Config, model_path: str | Path | None = None,
                       cache_dir: str | Path | None = None) -> Path:
    """The weights file to load: ``model_path`` if given, else the file the config ships or names
    (downloaded into ``cache_dir`` on first use). Raises UserError when none can be had."""
    if model_path is not None:
        path = Path(model_path)
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist")
        return path
    ck = config.checkpoint
    if ck.path:
        path = REPO_ROOT / ck.path
        if not path.is_file():
            raise UserError(f"the checkpoint {ck.path} named by config {config.name} is missing from the repository")
        _check_hash(path, ck.sha256)
        return path
    if not ck.filename:
        raise UserError(f"config {config.name} names no checkpoint; pass --model_path")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / ck.filename
    recorded = path.with_name(path.name + ".sha256")
    if not path.is_file():
        errors = []
        for url in ck.urls:
            try:
                log.info("downloading %s from %s", ck.filename, url)
                _download(url, path)
                break
            except (OSError, urllib.error.URLError, ValueError) as exc:
                errors.append(f"{url.split('/')[2] if '://' in url else url}: {exc}")
        else:
            raise UserError(f"could not download {ck.filename} ({'; '.join(errors) or 'no mirrors'}); "
                            f"download it by hand and pass --model_path")
        write_bytes(recorded, (sha256_file(path) + "\n").encode())
    expected = ck.sha256 or (recorded.read_text().strip() if recorded.is_file() else "")
    _check_hash(path, expected)
    return path


def _check_hash(path: Path, expected: str) -> None:
    if expected and sha256_file(path) != expected.lower():
        raise UserError(f"checkpoint {path} has SHA-256 {sha256_file(path)[:16]}..., expected {expected[:16]}...; "
                        "delete it to download again, or pass --model_path")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (plain, or wrapped in {'state_dict': ...} / {'model': ...};
    DataParallel's 'module.' prefix removed), loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails on damaged or unsafe files with many error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} cannot be loaded safely (corrupt or not a state dict): {first[:200]}") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} is not a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model`` strictly; a mismatch names the first differing keys."""
    state = read_state_dict(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected
                 if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise UserError(f"checkpoint {path} does not fit this config's architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
