"""The seed rule: every random draw of an edit comes from a generator of its own, seeded from
integer keys, so that results depend on neither batch size, nor order, nor the other images of a
run (docs/algorithm.md section 5).

Edit k of iteration i of an image: ``item_seed(seed, image_key(image), i, k)``; of a sampled latent
(``--unconditional``): ``item_seed(seed, i, k)``.
"""
from __future__ import annotations

import hashlib

import numpy as np
from torch import Tensor


def item_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys, e.g. (seed, k): independent streams per edit."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def image_key(image: Tensor) -> int:
    """A 63-bit integer naming an image by its pixels, (C, H, W) float: the per-image part of its edit
    seeds, so that an image gets the same noise alone, in any folder, batch or shard."""
    digest = hashlib.sha256(image.detach().cpu().float().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
