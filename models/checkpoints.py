"""Finding, downloading and reading model weights, in every form users keep them.

A checkpoint is a state-dict file (``.pt``, ``.pth``, ``.ckpt``, ``.bin``: ``torch.load`` with
``weights_only=True``), a ``.safetensors`` file, a diffusers model folder (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or ``.bin``, at top level or under ``unet/``), or a Hugging
Face Hub id ``hf:<owner>/<name>`` (fetched with ``huggingface_hub`` into its own cache).

Mirrors are https (or http) URLs and ``gdrive:<id>``; nothing else is fetched. Downloads go
through a temporary file in the cache folder and are renamed only when complete and checked (the
SHA-256 the config names, else that the file reads as a state dict of tensors), so a mirror's error
page is never cached; the SHA-256 of the first download is recorded beside it (``<file>.sha256``)
and checked on every later use, as is the hash a config names. No file is ever unpickled beyond
tensors (``weights_only=True``), and no message advises otherwise. Nothing here knows the
networks: renaming diffusers keys into this project's layout is ``models.diffusers_map``'s job.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from utils.config import MIRROR_SCHEMES, Config, mirror_problem
from utils.errors import UserError
from utils.io.files import atomic_path, read_json, sha256_file, write_bytes

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    return Path(os.environ.get("BOUNDARYDIFFUSION_CACHE", Path.home() / ".cache" / "boundarydiffusion"))


def _fetch(url: str, tmp: Path) -> None:
    """Fetch ``url`` (http(s) or ``gdrive:<id>``) into the file ``tmp``, as the server sends it."""
    if url.startswith("gdrive:"):
        import gdown  # optional at import time: only Drive mirrors need it
        if gdown.download(id=url.split(":", 1)[1], output=str(tmp), quiet=False) is None:
            raise OSError(f"gdown could not fetch {url}")
        return
    with _OPENER.open(url, timeout=60) as response, open(tmp, "wb") as fh:
        shutil.copyfileobj(response, fh, length=1 << 20)
        expected = response.headers.get("Content-Length")
    # http.client returns a short body without error when the connection drops early.
    if expected is not None and tmp.stat().st_size != int(expected):
        raise OSError(f"download cut off: {tmp.stat().st_size} of {expected} bytes")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: a mirror may not send the download to ftp: or elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in MIRROR_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a refused scheme ({newurl[:100]})", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# Only the http and https handlers (plus proxies and errors): no file:, data: or ftp: URLs.
_OPENER = urllib.request.OpenerDirector()
for _handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                 urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(), _HttpOnlyRedirects(),
                 urllib.request.UnknownHandler()):
    _OPENER.add_handler(_handler)


def _download(url: str, target: Path, sha256: str = "") -> None:
    """Fetch ``url`` to ``target`` through a temporary file, renamed to ``target`` only once it has
    been checked: its SHA-256 against ``sha256`` when given, else that it reads as a state dict
    (``weights_only``). A mirror that sends anything else (an error page with status 200, another
    file) leaves nothing in the cache: UserError says what arrived."""
    problem = mirror_problem(url)
    if problem:
        raise UserError(f"mirror refused: {problem}")
    with atomic_path(target) as tmp:
        _fetch(url, tmp)
        if tmp.stat().st_size == 0:
            raise OSError(f"{url} sent an empty file")
        if sha256:
            got = sha256_file(tmp)
            if got != sha256.lower():
                raise UserError(f"sent a file with SHA-256 {got[:16]}..., not the expected {sha256[:16]}... "
                                f"({_sniff(tmp) or 'another file'}); not kept")
        else:
            try:
                _load_state_dict(tmp, target.suffix, mmap=True, label=target.name)
            except UserError as exc:
                raise UserError(f"sent something that is not a checkpoint: {exc}; not kept") from None


HUB_PREFIX = "hf:"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_SUBFOLDERS = ("", "unet")


def resolve_checkpoint(config: Config, model_path: str | Path | None = None,
                       cache_dir: str | Path | None = None) -> Path:
    """The checkpoint to load, a file or a diffusers folder: ``model_path`` if given (a path or
    ``hf:<repo id>``), else the file the config ships or names (downloaded into ``cache_dir`` on
    first use), else the config's Hub mirror. Raises UserError when none can be had."""
    if model_path is not None:
        if not str(model_path):
            raise UserError("--model_path is empty; give a weights file, a diffusers folder or hf:<owner>/<name>")
        if str(model_path).startswith(HUB_PREFIX):
            return fetch_hub(str(model_path)[len(HUB_PREFIX):])
        path = Path(model_path)
        if not path.exists():
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
        if ck.hub:
            return fetch_hub(ck.hub)
        raise UserError(f"config {config.name} names no checkpoint; pass --model_path")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / ck.filename
    if Path(ck.filename).name != ck.filename or ck.filename in (".", "..") or path.parent != cache:
        raise UserError(f"checkpoint.filename {ck.filename!r} of config {config.name} is not a plain name "
                        f"inside the cache folder {cache}")
    recorded = path.with_name(path.name + ".sha256")
    junk = _sniff(path) if path.is_file() else ""
    if junk:  # left by an older version, which cached what a mirror sent unchecked: replaced once a download is good
        log.warning("the cached %s is %s, not a checkpoint; downloading it again", path, junk)
    if not path.is_file() or junk:
        errors = []
        for url in ck.urls:
            try:
                log.info("downloading %s from %s", ck.filename, url)
                _download(url, path, ck.sha256)
                break
            except (UserError, OSError, urllib.error.URLError, ValueError) as exc:
                errors.append(f"{url.split('/')[2] if '://' in url else url}: {exc}")
        else:
            if ck.hub:
                try:
                    return fetch_hub(ck.hub)
                except UserError as exc:
                    errors.append(f"{HUB_PREFIX}{ck.hub}: {exc}")
            raise UserError(f"could not download {ck.filename} ({'; '.join(errors) or 'no mirrors'}); "
                            f"download it by hand and pass --model_path")
        write_bytes(recorded, (sha256_file(path) + "\n").encode())
    expected = ck.sha256 or (recorded.read_text().strip() if recorded.is_file() else "")
    _check_hash(path, expected)
    return path


def fetch_hub(repo_id: str) -> Path:
    """The local folder of the diffusers model ``repo_id`` on the Hugging Face Hub: its
    ``config.json`` and one weights file, fetched into huggingface_hub's cache (``$HF_HOME``) or
    found there. Raises UserError when the package is missing, the Hub unreachable, or the
    repository holds no diffusers model."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"'{HUB_PREFIX}{repo_id}' is not a Hub id; expected {HUB_PREFIX}<owner>/<name>, "
                        f"e.g. {HUB_PREFIX}google/ddpm-ema-celebahq-256")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"{HUB_PREFIX}{repo_id} needs the huggingface_hub package (pip install huggingface_hub "
                        f"safetensors); or pass --model_path with a local copy of the model folder") from None

    def download(filename: str) -> Path | None:
        """The cached file, or None when the repository has no such file."""
        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not cached
            raise UserError(f"cannot reach the Hugging Face Hub for {HUB_PREFIX}{repo_id} and it is not in the local "
                            "cache; connect once, or pass --model_path with a local copy of the model folder") from None
        except EntryNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # unknown or gated repository, HTTP errors
            raise UserError(f"cannot fetch {HUB_PREFIX}{repo_id} from the Hugging Face Hub: {_first_line(exc)}") from None

    for sub in DIFFUSERS_SUBFOLDERS:
        prefix = f"{sub}/" if sub else ""
        config_file = download(prefix + "config.json")
        if config_file is None:
            continue
        for name in _readable_weight_names():
            if download(prefix + name) is not None:
                return config_file.parent
    raise UserError(f"{HUB_PREFIX}{repo_id} holds no diffusers model (config.json with "
                    f"{' or '.join(_readable_weight_names())}, at top level or under unet/)")


def _readable_weight_names() -> tuple[str, ...]:
    """The diffusers weight files this installation can read, preferred first."""
    return DIFFUSERS_WEIGHTS if _have_safetensors() else DIFFUSERS_WEIGHTS[1:]


def _have_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checkpoint consists of: the weights file, and for a diffusers folder its
    ``config.json`` (path and parsed content); ``diffusers_config`` is None for a plain file."""
    weights: Path
    config_file: Path | None = None
    diffusers_config: Mapping | None = None


def locate_weights(path: str | Path) -> CheckpointFiles:
    """The files of the checkpoint at ``path``: a weights file, or a diffusers model folder (files at
    top level or under ``unet/``; ``.safetensors`` preferred to ``.bin`` when both are present)."""
    path = Path(path)
    if path.is_file():
        return CheckpointFiles(weights=path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    for folder in (path / sub if sub else path for sub in DIFFUSERS_SUBFOLDERS):
        config_file = folder / "config.json"
        _refuse_broken_link(config_file)
        if not config_file.is_file():
            continue
        for name in DIFFUSERS_WEIGHTS:
            _refuse_broken_link(folder / name)
        present = [folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()]
        if not present:
            sharded = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
            raise UserError(f"diffusers folder {folder} has config.json but no {' or '.join(DIFFUSERS_WEIGHTS)}"
                            + (f" (found {', '.join(sharded[:3])}; sharded or variant files are not supported)"
                               if sharded else ""))
        readable = [p for p in present if p.suffix != ".safetensors" or _have_safetensors()]
        weights = readable[0] if readable else present[0]  # an unreadable .safetensors fails with its own message
        diffusers_config = read_json(config_file, what="diffusers config")
        if not isinstance(diffusers_config, dict):
            raise UserError(f"{config_file} is not a JSON object")
        return CheckpointFiles(weights=weights, config_file=config_file, diffusers_config=diffusers_config)
    raise UserError(f"checkpoint folder {path} is not a diffusers model folder (no config.json at top level "
                    "or under unet/); pass a weights file or the model folder")


def _refuse_broken_link(path: Path) -> None:
    """UserError naming ``path`` when it is a symbolic link to nothing (a moved or deleted target)."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist "
                        "(moved or deleted?); fix the link or pass the real files")


def _check_hash(path: Path, expected: str) -> None:
    if expected and sha256_file(path) != expected.lower():
        raise UserError(f"checkpoint {path} has SHA-256 {sha256_file(path)[:16]}..., expected {expected[:16]}...; "
                        "delete it to download again, or pass --model_path")


def read_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from the file ``path``: ``.safetensors``, or a torch file (plain, or wrapped in
    {'state_dict': ...} / {'model': ...} / {'ema': ...}; DataParallel's 'module.' prefix removed),
    loaded without unpickling arbitrary objects. ``mmap``: map the file instead of reading it
    (torch zip files and safetensors; older torch files are read whole)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return _load_state_dict(path, path.suffix, mmap, path)


def _load_state_dict(path: Path, suffix: str, mmap: bool, label: str | Path) -> dict[str, torch.Tensor]:
    """``read_state_dict`` of the file ``path`` read as a ``suffix`` file; messages name ``label``."""
    if suffix == ".safetensors":
        obj = _read_safetensors(path, label)
    else:
        obj = _torch_load(path, mmap, label)
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {label} is not a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _sniff(path: Path) -> str:
    """What the start of ``path`` shows it to be when that is plainly no checkpoint, else ''."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return ""
    if not head:
        return "an empty file"
    start = head.lstrip()[:64].lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head.lower():
        return "an HTML page (a mirror's error or quota page?)"
    if start.startswith(b"<"):
        return "an XML or HTML text"
    if start.startswith((b"{", b"[")):
        return "a JSON text"
    return ""


def _unloadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, in our words: PyTorch's own message advises
    loading with ``weights_only=False``, which must never be done with a file from elsewhere."""
    sniffed = _sniff(path)
    if sniffed:
        return f"is {sniffed}, not a checkpoint"
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return (f"holds a pickled {found[1]} object besides tensors; only state dicts of tensors are read "
                "(other pickled objects can run code and are never loaded)")
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
        return ("holds pickled Python objects besides tensors; only state dicts of tensors are read "
                "(other pickled objects can run code and are never loaded)")
    return f"is damaged or not a PyTorch checkpoint ({type(exc).__name__})"


def _torch_load(path: Path, mmap: bool, label: str | Path | None = None):
    label = path if label is None else label
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # a pre-zip torch file
    except Exception as exc:  # torch.load fails on damaged or unsafe files with many error types
        raise UserError(f"checkpoint {label} cannot be loaded: it {_unloadable(path, exc)}") from None


def _read_safetensors(path: Path, label: str | Path | None = None) -> dict[str, torch.Tensor]:
    label = path if label is None else label
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"reading {Path(str(label)).name} needs the safetensors package (pip install safetensors); "
                        "or pass a .bin / .pt copy of the weights") from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types on damaged headers or data
        sniffed = _sniff(path)
        raise UserError(f"checkpoint {label} is not a readable safetensors file: "
                        f"{sniffed + ', not a checkpoint' if sniffed else _first_line(exc)}") from None


def load_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor], assign: bool = False,
                 label: str | Path | None = None) -> None:
    """Load ``source`` (a weights file, or a state dict already read) into ``model`` strictly; a
    mismatch names the first differing keys (``label`` names the checkpoint in that message).
    ``assign``: take the tensors themselves instead of copying into the model's (a model built on
    the meta device has nothing to copy into)."""
    state = source if isinstance(source, Mapping) else read_state_dict(source)
    label = label if label is not None else ("the state dict" if isinstance(source, Mapping) else source)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected
                 if k in state and tuple(state[k].shape) != expected[k]]
    kinds = {k: v.dtype for k, v in model.state_dict().items()}
    if not (missing or unexpected or misshaped):
        for k, dtype in kinds.items():
            if dtype.is_floating_point and not state[k].dtype.is_floating_point:
                raise UserError(f"checkpoint {label} holds {str(state[k].dtype).replace('torch.', '')} values under "
                                f"'{k}', where the network has floating-point weights; not a checkpoint of this model")
    if missing or unexpected or misshaped:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                parts.append(f"{len(keys)} {name} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise UserError(f"checkpoint {label} does not fit this config's architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True, assign=assign)
