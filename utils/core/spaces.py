"""The method's two latent spaces, named once (docs/algorithm.md section 3).

z is the noisy image x_{t_0}; h is the UNet's middle-block output at the last inversion call. Every
loop over the spaces walks ``SPACES`` in this order, and every choice of spaces to move is a key of
``MOVED``; no other module spells the two names out, except where a file's or a flag's own name
holds them (``boundary_z``, ``*_h.npz``).
"""
from __future__ import annotations

from typing import Literal

SPACES: tuple[str, ...] = ("z", "h")
#: What an edit may move: both spaces, or one of them.
EditSpace = Literal["both", "z", "h"]
MOVED: dict[str, tuple[str, ...]] = {"both": SPACES, **{s: (s,) for s in SPACES}}
