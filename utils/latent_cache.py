"""A per-image cache of inverted latents, so that no image is inverted twice.

An entry is keyed by the model's identity (config name and checkpoint hash), the architecture
and schedule, t_0, the number of inversion steps and the image's content (the pixels the network
sees). Entries are written atomically one image at a time, so an interrupted run resumes where it
stopped, and they load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from utils.diffusion import Inversion
from utils.io import atomic_path

log = logging.getLogger(__name__)


class LatentCache:
    def __init__(self, root: str | Path, identity: dict):
        """identity: everything besides the image that decides the latents (JSON-serialisable)."""
        self.root = Path(root)
        self._prefix = json.dumps(identity, sort_keys=True).encode()

    def key(self, image: torch.Tensor) -> str:
        """image: (C, H, W) float32 pixels in [-1, 1]."""
        digest = hashlib.sha256(self._prefix)
        digest.update(str(tuple(image.shape)).encode())
        digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get(self, key: str) -> Inversion | None:
        """The cached latents (z (C, H, W), h (C_mid, H_mid, W_mid)), or None; an unreadable entry
        counts as missing (and is recomputed)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            return Inversion(z=entry["z"], h=entry["h"])
        except Exception:  # a damaged entry (e.g. from a full disk) is recomputed, whatever the error
            log.warning("ignoring unreadable cache entry %s", path)
            return None

    def put(self, key: str, z: torch.Tensor, h: torch.Tensor) -> None:
        with atomic_path(self._path(key)) as tmp:
            torch.save({"z": z.detach().cpu().clone(), "h": h.detach().cpu().clone()}, tmp)
