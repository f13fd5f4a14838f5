"""A per-image cache of inverted latents, so that no image is inverted twice.

An entry is keyed by the model's identity (config name and checkpoint hash), the architecture
and schedule, t_0, the number of inversion steps, the precision, the device type, the batch
regime (``utils.core.batching.batch_regime``) and the image's content (the pixels the network
sees). Entries are written atomically one image at a time, so an interrupted run resumes where it
stopped, and they load with ``torch.load(weights_only=True)``.

An entry is checked before its data is read: its file size against what latents of the model's
shapes can take, then its tensors' shapes from a memory-mapped load, which reads the pickled
header and none of the data; only an entry that passes is read in full.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.core.diffusion import Inversion
from utils.core.gram import Reader
from utils.errors import UserError
from utils.io.files import atomic_path

log = logging.getLogger(__name__)


class LatentCache:
    """A broken cache never stops a run: an unreadable, malformed or non-finite entry counts as
    missing (and is recomputed); if an entry cannot be written (a read-only folder, a path that is
    a file, a full disk) the cache warns once and the run goes on without writing it."""

    def __init__(self, root: str | Path, identity: dict, shapes: dict[str, tuple[int, ...]] | None = None):
        """identity: everything besides the image that decides the latents (JSON-serialisable).
        shapes: the model's latent shapes {'z': ..., 'h': ...}; an entry of other shapes is
        ignored, found so before its data is read (None: any (C, H, W) pair)."""
        self.root = Path(root)
        self._prefix = json.dumps(identity, sort_keys=True).encode()
        self.shapes = None if shapes is None else {s: tuple(int(v) for v in shape) for s, shape in shapes.items()}
        self.writable = True

    def key(self, image: torch.Tensor, regime: str = "") -> str:
        """image: (C, H, W) float32 pixels in [-1, 1]; regime: how it is inverted, when that changes
        the bits (``utils.core.batching.batch_regime``)."""
        digest = hashlib.sha256(self._prefix)
        digest.update(f"{tuple(image.shape)}|{regime}|".encode())
        digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _entry_problem(self, path: Path) -> str:
        """Why the entry at ``path`` cannot hold this model's latents, from its size and its tensors'
        shapes, before any of its data is read ('' when it may)."""
        if self.shapes is None:
            return ""
        values = sum(math.prod(shape) for shape in self.shapes.values())
        most = 8 * values + (1 << 20)  # float64 at most, plus the zip's and the pickle's bytes
        size = path.stat().st_size
        if size > most:
            return f"{size} bytes, more than latents of shapes {self.shapes['z']} and {self.shapes['h']} take"
        header = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # shapes only: nothing is read
        if not isinstance(header, dict):
            return "not a dict of latents"
        for space, shape in self.shapes.items():
            value = header.get(space)
            if not isinstance(value, torch.Tensor):
                return f"no {space} tensor"
            if tuple(value.shape) != shape:
                return f"holds {space} of shape {tuple(value.shape)}, the model's is {shape}"
        return ""

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def holds(self, key: str) -> bool:
        """Whether an entry for ``key`` is on disk (not whether it is readable: ``get`` says)."""
        return self._path(key).is_file()

    def get(self, key: str) -> Inversion | None:
        """The cached latents (z (C, H, W), h (C_mid, H_mid, W_mid)), or None; an unreadable entry,
        one of other shapes and a non-finite one count as missing (and are recomputed), with one
        warning each."""
        path = self._path(key)
        try:
            if not path.is_file():
                return None
            problem = self._entry_problem(path)
            if problem:
                log.warning("ignoring cache entry %s (%s); recomputing it", path, problem)
                return None
            entry = torch.load(path, map_location="cpu", weights_only=True)
            z, h = entry["z"], entry["h"]
            if not all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 3 for v in (z, h)):
                raise ValueError("not a pair of (C, H, W) float tensors")
            if not (torch.isfinite(z).all() and torch.isfinite(h).all()):
                raise ValueError("not finite")
            return Inversion(z=z, h=h)
        except Exception as exc:  # a damaged entry (e.g. from a full disk) is recomputed, whatever the error
            log.warning("ignoring unreadable cache entry %s (%s); recomputing it", path,
                        str(exc)[:80] if isinstance(exc, ValueError) else type(exc).__name__)
            return None

    def put(self, key: str, z: torch.Tensor, h: torch.Tensor) -> None:
        """Write an entry; on the first failure warn once and write nothing more."""
        if not self.writable:
            return
        try:
            with atomic_path(self._path(key)) as tmp:
                torch.save({"z": z.detach().cpu().clone(), "h": h.detach().cpu().clone()}, tmp)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            self.writable = False
            reason = " ".join(str(exc).split())[:200]
            log.warning("the latent cache %s cannot be written (%s); going on without it", self.root, reason)

    def rows(self, keys: Sequence[str], space: str, shape: tuple[int, ...]) -> tuple[Reader, int, int]:
        """A row reader over the ``space`` ('z' or 'h') latents of cached entries, in the order of
        ``keys``: (read, N, D) for utils.core.gram, read(start, stop) -> (stop - start, D) float32.

        A read holds just the rows asked for (and one entry as loaded); the whole set is never in memory. For entries this run has just cached
        (and checked): one that is gone or does not fit ``shape`` is a UserError.
        """
        dim = 1
        for s in shape:
            dim *= int(s)

        def read(start: int, stop: int) -> np.ndarray:
            out = np.empty((stop - start, dim), dtype=np.float32)
            for i, key in enumerate(keys[start:stop]):
                path = self._path(key)
                try:
                    value = torch.load(path, map_location="cpu", weights_only=True)[space]
                except Exception as exc:  # a vanished or damaged entry, whatever the error
                    raise UserError(f"the latent cache entry {path} cannot be read ({type(exc).__name__}); "
                                    "rerun the same command to recompute it") from None
                if tuple(value.shape) != tuple(shape):
                    raise UserError(f"the latent cache entry {path} holds {space} of shape {tuple(value.shape)}, "
                                    f"not {tuple(shape)}; rerun the same command to recompute it")
                # numpy's single-threaded copy: torch's threaded one of a lone row costs far more on a busy CPU.
                out[i] = value.reshape(-1).float().numpy()  # .float(): bf16 has no numpy type
            return out
        return read, len(keys), dim


def entry_rows(cache: LatentCache | None, entries: Sequence, space: str, shape: tuple[int, ...]) -> Reader:
    """A row reader (``LatentCache.rows``) over ``entries`` that are cache keys or, for latents that
    could not be cached, in-memory {space: (D,) float32} dicts: read(start, stop) -> (rows, D)."""
    keys = [e for e in entries if isinstance(e, str)]
    cached = cache.rows(keys, space, shape)[0] if keys else None
    if len(keys) == len(entries):
        return cached
    where = np.cumsum([isinstance(e, str) for e in entries]) - 1  # an entry's row among the cached ones

    def read(start: int, stop: int) -> np.ndarray:
        return np.stack([e[space] if isinstance(e, dict) else cached(where[i], where[i] + 1)[0]
                         for i, e in enumerate(entries[start:stop], start)])
    return read

