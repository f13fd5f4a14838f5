"""Region edits in the engine (docs/algorithm.md section 10): which pixels an edit may change, how the
moves are confined to them, and the unedited run the outside follows while denoising.

``region_masks`` reads what the user named (a mask image, a box, or a part of the image such as
``mouth``, per image) as a mask at the model's size; ``region_edits`` turns the masks of B images
into the ``utils.core.editing.RegionEdits`` the edit loop takes: the confining weights of z (the
mask) and of h (the mask's share of each bottleneck cell, or h not moved), the kept share of each
pixel (one minus the feathered mask) and the reference trajectory of every image.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from runners.engine.describe import EditDescription
from runners.engine.editor import Editor, differentiable_net
from runners.engine.requests import MAX_REGION_RANK, Region
from utils.core.diffusion import Inversion
from utils.core.editing import RegionEdits
from utils.core.region import (MAX_JACOBIAN_ENTRIES, RegionError, area_downsample, check_projection, check_region,
                               feather, outside_jacobian_basis)
from utils.errors import UserError
from utils.io.region import RegionSpec, read_part_sets, read_region

log = logging.getLogger(__name__)


def is_part(spec: str) -> bool:
    """Whether ``spec`` names a part of each image (``mouth``) rather than one mask for all (a file
    or a box ``x0,y0,x1,y1``)."""
    return "," not in spec and not Path(spec).exists() and Path(spec).name == spec and "." not in spec


def part_folders(config) -> list[Path]:
    """Where a config's data set keeps its part masks (``data.parts_dir``), if anywhere."""
    return [Path(config.data.parts_dir)] if config.data.parts_dir else []


def region_masks(region: Region, images: Sequence[Path | None], size: int, data_dirs: Sequence[Path]
                 ) -> list[RegionSpec]:
    """Each image's region at ``size`` x ``size``: the same mask for all (a file, a box) or the named
    part of each (``utils.io.region.read_parts``: a sampled latent has no parts). UserError in one line."""
    return region_mask_sets([region.spec], images, size, data_dirs)[region.spec]


def region_mask_sets(specs: Sequence[str], images: Sequence[Path | None], size: int, data_dirs: Sequence[Path],
                     asked: str | None = None) -> dict[str, list[RegionSpec]]:
    """``region_masks`` of several regions of the same images, {spec: masks}, every named part
    read in one pass over the parts files (``read_part_sets``). asked: what the errors call the
    request (default: the part names)."""
    parts = [spec for spec in dict.fromkeys(specs) if is_part(spec)]
    if parts and any(image is None for image in images):
        raise UserError(f"--region {asked or parts[0]}: a part names a part of a real image; latents sampled from "
                        "noise have none: give a mask image or a box")
    found = read_part_sets([Path(image) for image in images], parts, size, list(data_dirs), asked) if parts else {}
    for spec in dict.fromkeys(specs):
        if spec not in found:
            found[spec] = [read_region(spec, size)] * len(images)
    return found


def space_weights(masks: Sequence[np.ndarray], h_side: int) -> dict[str, np.ndarray]:
    """Each image's region as weights of its flattened latents' values per channel, {space: (N, S)
    float32}: z the mask itself (S = H * W), h the mask's share of each bottleneck cell (S =
    h_side^2): what a search fits on and a discovery looks in (``utils.core.region.confined_rows``)."""
    return {"z": np.stack([np.asarray(m, dtype=np.float32).reshape(-1) for m in masks]),
            "h": np.stack([area_downsample(torch.from_numpy(np.asarray(m)), h_side).reshape(-1).float().numpy()
                           for m in masks])}


def _h_weights(mask: np.ndarray, shape: tuple[int, ...]) -> Tensor:
    """The mask's share of each cell of the bottleneck h (C_mid, H_mid, W_mid): (1, H_mid, W_mid)."""
    return area_downsample(torch.from_numpy(mask), shape[-1])[None].float()


def check_masks(description: EditDescription, masks: Sequence[RegionSpec], names: Sequence[str], h_side: int) -> None:
    """Every moved attribute reaches into every image's region (``check_region``), in each space moved.
    Logs each moved normal's smallest share inside the images' regions, and the fit's region."""
    for space, edit in description.spaces.items():
        everything = edit.normals if edit.held_normals is None else torch.cat([edit.normals, edit.held_normals])
        shape = tuple(edit.records[0].shape)
        smallest = np.ones(len(edit.attributes))
        for mask, name in zip(masks, names):
            weights = torch.from_numpy(mask.mask) if space == "z" else area_downsample(torch.from_numpy(mask.mask),
                                                                                    h_side)
            weights = torch.broadcast_to(weights.double(), shape)
            try:
                shares = check_region([*edit.attributes, *edit.held], everything, weights, n_held=len(edit.held))
            except RegionError as exc:
                raise UserError(f"--region {mask.describe()} in {space} for {name}: {exc}") from None
            smallest = np.minimum(smallest, shares[:len(edit.attributes)])
        for attribute, share, record in zip(edit.attributes, smallest, edit.records):
            log.info("%s %s: %.1f %% of its normal inside the region (the confined move up to %.1fx as long); "
                     "fitted on %s", attribute, space, 100 * share, 1 / np.sqrt(share),
                     record.fit_region or "the whole latent (--boundary_search --region fits on the region)")


def region_edits(editor: Editor, description: EditDescription, latents: Inversion, region: Region,
                 masks: Sequence[RegionSpec], names: Sequence[str], batch_size: int | None = None) -> RegionEdits:
    """The ``RegionEdits`` of B images (latents (B, ...)) with their ``masks``: z confined to the mask,
    h to the mask's share of each bottleneck cell (the description moves h only with
    ``region.h == "cells"``), and each image's outside kept on its own unedited run beyond
    ``region.feather`` pixels: the reconstruction's trajectory, in the reconstruction's batches
    (``batch_size``, ``Editor.trajectories``), so the outside ends on the reconstruction bit for bit.
    UserError naming the image when an attribute barely reaches into its region."""
    h_shape = editor.shapes["h"]
    inject_h = "h" in description.spaces
    # each method's checks before the unedited runs, so that a refusal costs no denoising
    if region.method == "loco":
        bases = loco_bases(editor, description, latents, region, masks)
        return RegionEdits(z=[None] * len(masks), h=[None] * len(masks), keep=None,
                           states=editor.trajectories(latents, description, batch_size), z_basis=bases)
    check_masks(description, masks, names, h_shape[-1])
    states = editor.trajectories(latents, description, batch_size)
    return RegionEdits(z=[torch.from_numpy(m.mask)[None] for m in masks],
                       h=[_h_weights(m.mask, h_shape) for m in masks] if inject_h else [None] * len(masks),
                       keep=[(1 - feather(torch.from_numpy(m.mask), region.feather))[None] for m in masks],
                       states=states)


def check_loco(region: Region, z_shape: Sequence[int]) -> None:
    """UserError, before any inversion, when ``--region_method loco`` cannot run on latents of
    ``z_shape``: its exact outside Jacobian holds up to ``MAX_JACOBIAN_ENTRIES`` entries (32 x 32 x 3)."""
    size = int(np.prod(z_shape))
    if region.method == "loco" and size * size > MAX_JACOBIAN_ENTRIES:
        raise UserError(f"--region_method loco computes the exact Jacobian of the outside, affordable up to "
                        f"{MAX_REGION_RANK} latent values; this model's have {size} "
                        f"({' x '.join(map(str, z_shape))}): use --region_method blend")


def loco_bases(editor: Editor, description: EditDescription, latents: Inversion, region: Region,
               masks: Sequence[RegionSpec]) -> list[Tensor]:
    """Per image, the ``region.rank`` directions of z that change the outside of the predicted clean
    image most at t_0 (``utils.core.region.outside_jacobian_basis``: LOCO-Edit's exact Jacobian,
    for small images), which the move is then kept off; the outside is every pixel the mask does
    not touch. Refused, naming the attribute, when that leaves a normal too little to move."""
    net = differentiable_net(editor.model)
    bases = []
    for b, mask in enumerate(masks):
        outside = torch.from_numpy(mask.mask) <= 0
        try:
            basis = outside_jacobian_basis(net, latents.z[b:b + 1].to(device=editor.device, dtype=torch.float32),
                                           editor.t_0, editor.alphas_cumprod, outside, region.rank).cpu()
        except ValueError as exc:  # too large for the exact Jacobian, or a rank beyond the outside's values
            raise UserError(f"--region_method loco on {mask.describe()}: {exc}") from None
        edit = description.spaces["z"]
        everything = edit.normals if edit.held_normals is None else torch.cat([edit.normals, edit.held_normals])
        try:
            check_projection([*edit.attributes, *edit.held], everything, basis, n_held=len(edit.held))
        except RegionError as exc:
            raise UserError(f"--region_method loco: {exc}") from None
        bases.append(basis)
    return bases
