"""Edit sequences: move z and h of B images across the boundaries to K distances and denoise
(docs/algorithm.md section 5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.core.boundary import edit_latents, project_boundary
from utils.core.batching import batch_slices, pair_lone
from utils.core.diffusion import HPolicy, Inversion, Net, generate


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


@dataclass(frozen=True)
class EditBatch:
    """One denoised batch of edits: edit k of image b for each (b, k) in ``items`` (n of them), as
    images (n, C, H, W) in [-1, 1] (not clipped) and the edited latents before denoising, z
    (n, C, H, W) and h (n, C_mid, H_mid, W_mid) or None (h not moved)."""
    items: list[tuple[int, int]]
    images: Tensor
    z: Tensor
    h: Tensor | None


def iter_edits(net: Net, inversion: Inversion, alphas_cumprod: Tensor, grid: Sequence[int], distances: Tensor,
               normal_z: Tensor | None, normal_h: Tensor | None, seeds: Sequence[Sequence[int]],
               eta: float = 1.0, h_policy: HPolicy = "lagged", batch_size: int = 8,
               h_distances: Tensor | None = None) -> Iterator[EditBatch]:
    """Edit B latent pairs to K distances each, denoising the B x K edits in batches that mix images
    and distances (image-major: all of image 0's edits, then image 1's, ...), and yield each batch
    as soon as it is denoised, so that callers write results while later edits are denoised.

    inversion: z (B, C, H, W), h (B, C_mid, H_mid, W_mid); distances: (K,), the d_k of edit k (in both
    spaces, unless ``h_distances`` (K,) gives the h space its own, e.g. an ``auto`` range); normal_z: (C*H*W,) or
    None (z left as is); normal_h: (C_mid*H_mid*W_mid,) or None (no h override); seeds: B rows of K
    seeds; edit (b, k) draws its noise from its own generator seeded with seeds[b][k], so results do
    not depend on ``batch_size`` nor on which other images share the run. Memory: one batch of
    edited latents and outputs at a time, whatever K is (the edited latents are computed per batch;
    ``edit_latents`` treats each distance alone, so this changes no value).
    """
    n_images, k_total = len(inversion.z), len(distances)
    if len(seeds) != n_images or any(len(row) != k_total for row in seeds):
        raise ValueError(f"seeds must be {n_images} rows of {k_total}, got {[len(r) for r in seeds]}")
    batch_size = max(1, min(batch_size, n_images * k_total))  # a single edit runs alone, like the reconstruction

    h_distances = distances if h_distances is None else h_distances
    if len(h_distances) != k_total:
        raise ValueError(f"h_distances must hold {k_total} values like distances, got {len(h_distances)}")

    def edited(latent: Tensor, normal: Tensor | None, items: list[tuple[int, int]], targets: Tensor) -> Tensor:
        # The chunk's edited latents, image by image: as a single-image run computes them.
        if normal is None:
            return torch.stack([latent[b] for b, _ in items])
        parts = []
        for b in dict.fromkeys(b for b, _ in items):
            ks = [k for i, k in items if i == b]
            parts.append(edit_latents(latent[b:b + 1], normal, targets[ks])[0])
        return torch.cat(parts)

    for chunk in batch_slices(n_images * k_total, batch_size):
        items = [divmod(i, k_total) for i in range(chunk.start, chunk.stop)]
        n = len(items)
        z_edit = edited(inversion.z, normal_z, items, distances)
        h_edit = None if normal_h is None else edited(inversion.h, normal_h, items, h_distances)
        z = pair_lone(z_edit, batch_size)
        h = None if h_edit is None else pair_lone(h_edit, batch_size)
        generators = [torch.Generator().manual_seed(int(seeds[b][k])) for b, k in items] if eta > 0 else None
        if generators is not None and len(z) > n:  # the duplicate draws from a throwaway generator
            generators.append(torch.Generator().manual_seed(0))
        out = generate(net, z, alphas_cumprod, grid, h_edit=h, h_policy=h_policy, eta=eta, generators=generators)[:n]
        yield EditBatch(items, out, z_edit, h_edit)


def edit_sequence(net: Net, inversion: Inversion, alphas_cumprod: Tensor, grid: Sequence[int],
                  distances: Tensor, normal_z: Tensor | None, normal_h: Tensor | None,
                  seeds: Sequence[Sequence[int]] | Sequence[int], eta: float = 1.0, h_policy: HPolicy = "lagged",
                  batch_size: int = 8) -> Tensor:
    """The K edited images of each of B latent pairs, (B, K, C, H, W) in [-1, 1] (not clipped).

    Arguments as in ``iter_edits``. For one image, ``seeds`` may also be a flat list of K seeds;
    the result is then (K, C, H, W).
    """
    flat = len(seeds) > 0 and not isinstance(seeds[0], (list, tuple))
    if flat and len(inversion.z) != 1:
        raise ValueError(f"a flat list of seeds serves one image, got {len(inversion.z)}")
    rows = [list(seeds)] if flat else seeds
    edits = torch.cat([e.images for e in iter_edits(net, inversion, alphas_cumprod, grid, distances, normal_z,
                                                    normal_h, rows, eta, h_policy, batch_size)])
    edits = edits.reshape(len(rows), len(distances), *edits.shape[1:])
    return edits[0] if flat else edits


def condition_normal(primary: Tensor | np.ndarray, conditions: Sequence[Tensor | np.ndarray]) -> tuple[np.ndarray, list[float]]:
    """The direction of a conditional edit: the primary unit normal projected orthogonal to every
    condition normal and renormalised (``utils.core.boundary.project_boundary``), so that moving along
    it leaves each condition's projection unchanged (docs/algorithm.md section 9).

    primary, conditions: (D,) each. Returns (normal (D,) float32 unit, the angle in degrees between
    the primary and each condition normal, in the conditions' order).
    """
    p = np.asarray(primary, dtype=np.float64).reshape(-1)
    angles = []
    for c in conditions:
        c = np.asarray(c, dtype=np.float64).reshape(-1)
        if c.shape != p.shape:
            raise ValueError(f"condition normal of {c.shape[0]} values does not fit a primary of {p.shape[0]}")
        cos = float(p @ c / (np.linalg.norm(p) * np.linalg.norm(c)))
        angles.append(float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))))
    return project_boundary(p, *[np.asarray(c).reshape(-1) for c in conditions]), angles
