"""The seed rule: every random draw of an edit comes from a generator of its own, seeded from
integer keys, so that results depend on neither batch size, nor order, nor the other images of a
run (docs/algorithm.md section 5).

``item_seed(seed, *key, domain=D)`` feeds ``np.random.SeedSequence`` the 32-bit words

    [D, n, lo(seed), hi(seed), lo(key[0]), hi(key[0]), ..., lo(key[n-2]), hi(key[n-2])]

where n = 1 + len(key) counts the integers and lo/hi are the low and high 32 bits of each (every
integer in [0, 2**64)). Fixed-width words and the count make the map injective on its words:
SeedSequence by itself drops trailing zero words and splits a large integer into as many words as
it needs, so ``SeedSequence([s, i])`` equals ``SeedSequence([s, i, 0])`` and ``[s, 1, 2**32 * 3 + 7]``
equals ``[s, 1, 7, 3]``. The domain tag keeps the draws of different uses apart, where the
earlier rule added offsets (10_000, 20_000, ...) to keys that real keys could reach.

The uses and their keys:

- ``EDIT``: edit k of iteration i of a real image, key (image_key(image), i, k);
- ``SAMPLE_EDIT``: edit k of iteration i of sampled latent j (``--unconditional``), key (j, i, k);
- ``SAMPLE``: the x_T that sampled latent j starts from, key (j,);
- ``RADIUS_NOISE``: the x_{T-1} draws of the mixing-step analysis, key ();
- ``EVALUATION_NOISE``: the x_T of ``scripts/evaluate_edits.py``'s sample-quality check, key ();
  with eta > 0 the step noise of its sample j, key (j,) (``Editor.sample_images``).
"""
from __future__ import annotations

import hashlib

import numpy as np
from torch import Tensor

EDIT, SAMPLE_EDIT, SAMPLE, RADIUS_NOISE, EVALUATION_NOISE = 1, 2, 3, 4, 5
DOMAINS = (EDIT, SAMPLE_EDIT, SAMPLE, RADIUS_NOISE, EVALUATION_NOISE)
_WORD = (1 << 32) - 1


def seed_words(seed: int, *key: int, domain: int = EDIT) -> list[int]:
    """The 32-bit words ``item_seed`` hashes (the encoding in the module docstring); ValueError for
    an unknown domain or an integer outside [0, 2**64)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown seed domain {domain!r}")
    values = [int(seed), *(int(k) for k in key)]
    if any(not 0 <= v < 1 << 64 for v in values):
        raise ValueError(f"seed keys must be integers in [0, 2**64), got {values}")
    return [domain, len(values), *(w for v in values for w in (v & _WORD, v >> 32))]


def item_seed(seed: int, *key: int, domain: int = EDIT) -> int:
    """A 63-bit seed for the draw named by (seed, key) in ``domain``: independent streams per edit."""
    state = np.random.SeedSequence(seed_words(seed, *key, domain=domain)).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def image_key(image: Tensor) -> int:
    """A 63-bit integer naming an image by its pixels, (C, H, W) float: the per-image part of its edit
    seeds, so that an image gets the same noise alone, in any folder, batch or shard."""
    digest = hashlib.sha256(image.detach().cpu().float().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
