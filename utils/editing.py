"""Edit sequences: move z and h across the boundaries to K distances and denoise (docs/algorithm.md section 5)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from utils.boundary import edit_latents
from utils.diffusion import HPolicy, Inversion, Net, generate


def item_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys, e.g. (seed, k): independent streams per edit."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def reconstruct(net: Net, inversion: Inversion, alphas_cumprod: Tensor, grid: Sequence[int], inject_h: bool,
                h_policy: HPolicy = "lagged") -> Tensor:
    """The unedited image (B, C, H, W) that edits are compared with: eta 0 from z, and -- when the
    edits move h -- the same h injection as the edits with the inverted h unchanged, so that an
    edit to a latent's own distance reproduces it bit for bit.

    NOTE: injecting h is not neutral even at distance 0 (the inverted h comes from the last
    inversion call, below t_0, and "lagged" feeds each call the previous call's h), which is why
    the reference image goes through the same path as the edits.
    """
    return generate(net, inversion.z, alphas_cumprod, grid, h_edit=inversion.h if inject_h else None,
                    h_policy=h_policy)


def edit_sequence(net: Net, inversion: Inversion, alphas_cumprod: Tensor, grid: Sequence[int],
                  distances: Tensor, normal_z: Tensor | None, normal_h: Tensor | None,
                  seeds: Sequence[int], eta: float = 1.0, h_policy: HPolicy = "lagged",
                  batch_size: int = 8) -> Tensor:
    """The K edited images of one latent pair.

    inversion: z (1, C, H, W), h (1, C_mid, H_mid, W_mid); distances: (K,); normal_z: (C*H*W,) or
    None (z left as is); normal_h: (C_mid*H_mid*W_mid,) or None (no h override); seeds: K seeds,
    edit k draws its noise from its own generator seeded with seeds[k], so the result does not
    depend on ``batch_size``. Returns (K, C, H, W) in [-1, 1] (not clipped).
    """
    k_total = len(distances)
    if len(seeds) != k_total:
        raise ValueError(f"{len(seeds)} seeds for {k_total} distances")
    z_all = edit_latents(inversion.z, normal_z, distances)[0] if normal_z is not None \
        else inversion.z.expand(k_total, *inversion.z.shape[1:])
    h_all = edit_latents(inversion.h, normal_h, distances)[0] if normal_h is not None else None
    images = []
    batch_size = min(batch_size, k_total)  # a single edit runs alone, like the reconstruction
    for chunk in batch_slices(k_total, batch_size):
        n = chunk.stop - chunk.start
        z = pair_lone(z_all[chunk], batch_size)
        h = None if h_all is None else pair_lone(h_all[chunk], batch_size)
        generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]] if eta > 0 else None
        if generators is not None and len(z) > n:  # the duplicate draws from a throwaway generator
            generators.append(torch.Generator().manual_seed(0))
        images.append(generate(net, z, alphas_cumprod, grid, h_edit=h, h_policy=h_policy, eta=eta,
                               generators=generators)[:n])
    return torch.cat(images)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` items covering range(n).

    NOTE: for a batch of exactly one, oneDNN picks other convolution kernels for some shapes, whose
    rounding differs from larger batches; callers run a lone remainder of a larger batch size as a
    pair (the item twice) so that every batch size of 2 or more gives bit-identical results.
    """
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def pair_lone(x: Tensor, batch_size: int) -> Tensor:
    """x (1, ...) twice along the batch when it is a lone remainder of batches of ``batch_size`` > 1
    (see ``batch_slices``); otherwise x unchanged. Callers keep the first ``len(x)`` results."""
    return x.repeat(2, *[1] * (x.ndim - 1)) if len(x) == 1 and batch_size > 1 else x
