"""Edit sequences: move z and h of B images across the boundaries to K distances and denoise
(docs/algorithm.md section 5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.core.boundary import joint_move, unit_rows
from utils.core.batching import batch_slices, pair_lone
from utils.core.diffusion import HPolicy, Inversion, Keep, Net, generate
from utils.core.region import confined_joint_move, projected_joint_move


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
class LatentMove:
    """How one latent space (z or h) moves: to every target of the move's K edits at once.

    normals: (M, D) float64 unit rows, the moved attributes (``utils.core.boundary.unit_rows``);
    targets: (K, M) float64, edit k's signed projection onto each (``shift``: the change of each
    projection from the latent's own, so edit k sets v'.n_m = v.n_m + targets[k, m]); held: (H, D)
    float64 unit rows or None, the attributes whose projection each edit leaves where it is
    (``joint_move``)."""
    normals: Tensor
    targets: Tensor
    held: Tensor | None = None
    shift: bool = False

    @classmethod
    def along(cls, normal: Tensor | np.ndarray, distances: Tensor | Sequence[float]) -> "LatentMove":
        """One attribute to K distances: normal (D,) (scaled to unit length), distances (K,)."""
        d = torch.as_tensor(distances).reshape(-1, 1).double()
        return cls(unit_rows(torch.as_tensor(normal).reshape(1, -1)), d)

    def __len__(self) -> int:
        return len(self.targets)

    def apply(self, latent: Tensor, ks: Sequence[int], weights: Tensor | None = None,
              basis: Tensor | None = None) -> Tensor:
        """Edits ``ks`` of one latent (1, ...) -> (len(ks), ...); with ``weights`` (broadcastable to the
        latent's shape, in [0, 1]) the move is confined to them (``utils.core.region.confined_joint_move``:
        the same targets, zero change where the weights are 0); with ``basis`` (r, D) orthonormal rows it
        is kept off their span (``projected_joint_move``, LOCO-Edit's projection)."""
        targets = self.targets[list(ks)]
        if self.shift:  # from where this latent is: its own projections plus the changes
            flat = latent.reshape(1, -1).double()
            targets = targets + (flat @ self.normals.to(flat.device).T).cpu()
        if basis is not None:
            return projected_joint_move(latent, self.normals, targets, self.held, basis)[0]
        if weights is None:
            return joint_move(latent, self.normals, targets, self.held)[0]
        return confined_joint_move(latent, self.normals, targets, self.held, weights)[0]


@dataclass(frozen=True)
class RegionEdits:
    """A region edit of B images (docs/algorithm.md section 10): per image b, the weights that
    confine its z move (``z[b]``, broadcastable to z's (C, H, W)) and its h move (``h[b]``, to h's
    (C_mid, H_mid, W_mid); None: h moved unconfined), the share of each pixel kept on the unedited
    run (``keep[b]``, (1, H, W) in [0, 1]) and that run's states (``states[b]``: {t: x_t (C, H, W)}).
    LOCO-Edit's alternative instead keeps each z move off a basis (``z_basis[b]``, (r, D)
    orthonormal rows) and keeps no pixels (``keep`` None)."""
    z: Sequence[Tensor | None]
    h: Sequence[Tensor | None]
    keep: Sequence[Tensor] | None
    states: Sequence[Mapping[int, Tensor]]
    z_basis: Sequence[Tensor] | None = None

    def keeping(self, items: Sequence[tuple[int, int]], n: int, device) -> Keep | None:
        """The ``Keep`` of one batch of edits (b, k), padded to ``n`` rows like the batch."""
        if self.keep is None:
            return None
        rows = [b for b, _ in items] + [items[-1][0]] * (n - len(items))
        return Keep(torch.stack([self.keep[b] for b in rows]).to(device),
                    {t: torch.stack([self.states[b][t] for b in rows]).to(device) for t in self.states[rows[0]]})


@dataclass(frozen=True)
class EditBatch:
    """One denoised batch of edits: edit k of image b for each (b, k) in ``items`` (n of them), as
    images (n, C, H, W) in [-1, 1] (not clipped) and the edited latents before denoising, z
    (n, C, H, W) and h (n, C_mid, H_mid, W_mid) or None (h not moved)."""
    items: list[tuple[int, int]]
    images: Tensor
    z: Tensor
    h: Tensor | None


def iter_edits(net: Net, inversion: Inversion, alphas_cumprod: Tensor, grid: Sequence[int],
               move_z: LatentMove | None, move_h: LatentMove | None, seeds: Sequence[Sequence[int]],
               eta: float = 1.0, h_policy: HPolicy = "lagged", batch_size: int = 8,
               region: RegionEdits | None = None) -> Iterator[EditBatch]:
    """Make the K edits of each of B latent pairs, denoising the B x K edits in batches that mix
    images and edits (image-major: all of image 0's edits, then image 1's, ...), and yield each
    batch as soon as it is denoised, so that callers write results while later edits are denoised.

    inversion: z (B, C, H, W), h (B, C_mid, H_mid, W_mid); move_z, move_h: each space's move to K
    targets (``LatentMove``; None: that space is left as is, and h gets no override); seeds: B rows
    of K seeds; edit (b, k) draws its noise from its own generator seeded with seeds[b][k], so
    results do not depend on ``batch_size`` nor on which other images share the run. Memory: one
    batch of edited latents and outputs at a time, whatever K is (the edited latents are computed
    per batch, image by image; ``joint_move`` treats each target alone, so this changes no value).
    ``region``: each image's moves confined to its region, and its outside kept on its unedited run
    while denoising (``RegionEdits``).
    """
    moves = [m for m in (move_z, move_h) if m is not None]
    if not moves:
        raise ValueError("no space to move: give move_z, move_h or both")
    n_images, k_total = len(inversion.z), len(moves[0])
    if any(len(m) != k_total for m in moves):
        raise ValueError(f"the z and h moves must hold the same number of edits, got {[len(m) for m in moves]}")
    if len(seeds) != n_images or any(len(row) != k_total for row in seeds):
        raise ValueError(f"seeds must be {n_images} rows of {k_total}, got {[len(r) for r in seeds]}")
    if n_images * k_total == 0:
        return
    batch_size = min(batch_size, n_images * k_total)  # a single edit runs alone, like the reconstruction

    def edited(latent: Tensor, move: LatentMove | None, items: list[tuple[int, int]], weights, basis=None) -> Tensor:
        # The chunk's edited latents, image by image: as a single-image run computes them.
        if move is None:
            return torch.stack([latent[b] for b, _ in items])
        return torch.cat([move.apply(latent[b:b + 1], [k for i, k in items if i == b],
                                     None if weights is None else weights[b], None if basis is None else basis[b])
                          for b in dict.fromkeys(b for b, _ in items)])

    for chunk in batch_slices(n_images * k_total, batch_size):
        items = [divmod(i, k_total) for i in range(chunk.start, chunk.stop)]
        n = len(items)
        z_edit = edited(inversion.z, move_z, items, None if region is None else region.z,
                        None if region is None else region.z_basis)
        h_edit = None if move_h is None else edited(inversion.h, move_h, items, None if region is None else region.h)
        z = pair_lone(z_edit, batch_size)
        h = None if h_edit is None else pair_lone(h_edit, batch_size)
        generators = [torch.Generator().manual_seed(int(seeds[b][k])) for b, k in items] if eta > 0 else None
        if generators is not None and len(z) > n:  # the duplicate draws from a throwaway generator
            generators.append(torch.Generator().manual_seed(0))
        keep = None if region is None else region.keeping(items, len(z), z.device)
        out = generate(net, z, alphas_cumprod, grid, h_edit=h, h_policy=h_policy, eta=eta, generators=generators,
                       keep=keep)[:n]
        yield EditBatch(items, out, z_edit, h_edit)


def edit_sequence(net: Net, inversion: Inversion, alphas_cumprod: Tensor, grid: Sequence[int],
                  move_z: LatentMove | None, move_h: LatentMove | None,
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
    k_total = len(move_z if move_z is not None else move_h)
    edits = torch.cat([e.images for e in iter_edits(net, inversion, alphas_cumprod, grid, move_z, move_h, rows,
                                                    eta, h_policy, batch_size)])
    edits = edits.reshape(len(rows), k_total, *edits.shape[1:])
    return edits[0] if flat else edits
