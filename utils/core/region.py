"""Edit a region and leave the rest: the joint move confined to part of the latent, the refusal of a
region an attribute barely reaches, soft masks, and denoising whose outside follows the unedited run.

Arrays in, arrays out; no files here (``utils/io/region.py`` reads a region from the user).

Notation, as in ``utils/core/boundary.py`` (``joint_move``) and ``utils/core/diffusion.py``:

    v        a latent (z or h), flattened to D values
    N        [normals; held]^T, D x P unit columns (P = M moved + H held)
    t        the targets, P signed projections (a held row's target is its own projection)
    C        a confining linear map, D x D, symmetric positive semi-definite: diag(W) for a mask of
             weights W in [0, 1] (1: editable), or P = I - V^T V for the LOCO-Edit projector
    G_C      N^T C N, the confined Gram matrix (P x P, symmetric)

The confined move is

    v' = v + C N G_C^-1 (t - N^T v),

so N^T v' = t exactly (N^T C N G_C^-1 = I) and v' = v wherever C's rows are zero (W = 0). Among the
moves inside C's range that set the projections it is the one that minimises Delta^T C^+ Delta (C^+
the pseudo-inverse; for a mask, sum_i Delta_i^2 / W_i over W_i > 0): for a binary mask or a
projector (C^2 = C), the least-norm move inside the region. With C = I it is ``joint_move`` (to
float64 rounding).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from torch import Tensor

# _row_dots and sum_in_order are the joint move's batch-invariant sums: shared, not copied, so the
# confined move rounds exactly as the unconfined one does.
from utils.core.boundary import JOINT_TOLERANCE, _row_dots, resolvable_residual, sum_in_order
from utils.core.diffusion import HPolicy, Net, alpha_bar, ddim_trajectory, generation_pairs


class RegionError(ValueError):
    """A region in which a moved attribute cannot be reached sensibly, or in which two normals cannot
    be told apart: refused before any work, naming the attribute."""


#: The smallest share of a moved normal's squared norm that must lie inside the region
#: (``check_region``): 1 %. For a binary mask (and for a projector) the confined move of one
#: attribute is exactly 1 / sqrt(share) times as long as the unconfined one, so this bound caps that
#: amplification at 10. Below it, 99 % of what the classifier weighs lies outside the region: the
#: attribute, as its boundary sees it, is not in the region, and reaching the target there means
#: pushing the few values inside ten times (and more) further than the unconfined edit would.
MIN_REGION_SHARE = 0.01

#: The largest exact outside-pixel Jacobian ``outside_jacobian_basis`` builds, in entries (rows x D):
#: that of a whole 32 x 32 x 3 image, 72 MiB in float64. Larger images need a low-rank method.
MAX_JACOBIAN_ENTRIES = 3072 * 3072


# ----------------------------------------------------------------------------- the confined solve

def latent_weights(weights, shape: Sequence[int]) -> Tensor:
    """A mask broadcast over a latent: weights broadcastable to ``shape`` (one item's latent shape,
    e.g. (H, W) or (1, H, W) for a latent (C, H, W)), values in [0, 1] -> (D,) float64,
    D = prod(shape). ValueError for values outside [0, 1] (NaN included) or a shape that does not
    broadcast."""
    w = torch.as_tensor(weights).double()
    if not bool(((w >= 0) & (w <= 1)).all()):
        raise ValueError("region weights must lie in [0, 1] (1: editable)")
    try:
        return torch.broadcast_to(w, tuple(shape)).reshape(-1)
    except RuntimeError:
        raise ValueError(f"region weights of shape {tuple(w.shape)} do not broadcast to latents of shape "
                         f"{tuple(shape)}") from None


def _basis(normals: Tensor, held: Tensor | None, dim: int, device: torch.device) -> Tensor:
    """[normals; held] (P, D) float64 on ``device``, checked against the latent's D values."""
    basis = normals if held is None or len(held) == 0 else torch.cat([normals, held])
    basis = basis.to(device).double()
    if basis.shape[1] != dim:
        raise ValueError(f"normal of {basis.shape[1]} values does not fit latents of {dim} values")
    return basis


def _confined_gram(basis: Tensor, confined: Tensor) -> Tensor:
    """G_C = N^T C N from the rows n_i (P, D) and C n_i (P, D): symmetric by construction (the
    product is symmetric in exact arithmetic; its two triangles may round apart)."""
    gram = basis @ confined.T
    return (gram + gram.T) / 2


def _solve_rows(n_moved: int, gram: Tensor, dim: int) -> list[int]:
    """The rows the solve keeps: every moved row, and each held row that the confinement leaves more
    than float32 resolves of, ||C^(1/2) n_h|| >= ``resolvable_residual(D)``. A held row below that
    is held by the confinement itself (the move changes its projection by less than the normal's
    own rounding) and would make G_C singular, so it is left out."""
    floor = resolvable_residual(dim) ** 2
    diagonal = gram.diagonal()
    return [i for i in range(len(gram)) if i < n_moved or float(diagonal[i]) >= floor]


def _confined_move(v: Tensor, normals: Tensor, targets: Tensor, held: Tensor | None,
                   confine: Callable[[Tensor], Tensor]) -> Tensor:
    """The one solve behind ``confined_joint_move`` and ``projected_joint_move``:
    v' = v + C N G_C^-1 (t - N^T v), with ``confine`` mapping rows (P, D) float64 to C applied to
    each row, (P, D) float64. Shapes, dtypes and batch invariance as ``joint_move``: the
    projections are per-row float64 sums (``_row_dots``); G_C and its inverse depend on the normals
    and C alone (never on the batch); the coefficients and the move are elementwise float64 products
    accumulated over the rows in a fixed order (``sum_in_order``)."""
    dim = v[0].numel()
    basis = _basis(normals, held, dim, v.device)
    m = len(normals)
    confined = confine(basis)
    gram = _confined_gram(basis, confined)
    rows = _solve_rows(m, gram, dim)
    basis, confined, gram = basis[rows], confined[rows], gram[rows][:, rows]
    t = torch.as_tensor(targets, device=v.device).double().reshape(-1, m)  # (K, M)
    own = (torch.stack([_row_dots(v, n) for n in basis], dim=1) if len(v)
           else v.new_zeros((0, len(basis))).double())
    shift = torch.cat([t[None, :, :] - own[:, None, :m],  # (B, K, P): held rows move by zero
                       torch.zeros((len(v), len(t), len(basis) - m), dtype=torch.float64, device=v.device)], dim=2)
    inverse = torch.linalg.inv(gram)
    coef = torch.stack([sum_in_order(inverse[i, j] * shift[:, :, j] for j in range(len(basis)))
                        for i in range(len(basis))], dim=2)
    delta = sum_in_order(coef[:, :, i, None] * confined[i][None, None, :] for i in range(len(basis)))  # (B, K, D)
    edited = v.reshape(v.shape[0], 1, -1) + delta.to(v.dtype)
    return edited.reshape(v.shape[0], len(t), *v.shape[1:])


def confined_joint_move(v: Tensor, normals: Tensor, targets: Tensor, held: Tensor | None, weights) -> Tensor:
    """The joint move confined to a region: the smallest move inside it that sets every projection.

    v: (B, ...) latents, D = prod(v.shape[1:]); normals: (M, D) float64 unit rows (``unit_rows``);
    targets: (K, M) float64; held: (H, D) float64 unit rows or None (targets of zero change);
    weights: W, broadcastable to v's per-item shape (e.g. (H, W) for z (C, H, W); ``area_downsample``
    for h), values in [0, 1], 1 = editable. Returns (B, K, ...) in v's dtype:

        v'_k = v + N_W (N_W^T N)^-1 (t_k - N^T v),   N = [normals; held]^T,  N_W = W (.) N,

    where N_W^T N = N^T diag(W) N is symmetric. So v'_k . n_m = t_km and v'_k . n_h = v . n_h up
    to v's precision, and v'_k = v bit for bit wherever W = 0 (the move there is 0 * coefficients).
    With W = 1 everywhere it is ``joint_move`` to float64 rounding before the cast to v's dtype (not
    bit for bit: ``joint_move`` takes G's diagonal as exactly 1, here it is the computed
    n . (W (.) n)). A held normal the region leaves less than float32 resolves of is held by the
    region itself and left out of the solve (``_solve_rows``).

    Refusals come first, from ``check_region``: a moved normal with too little of itself inside the
    region makes N_W^T N (near) singular and the move long.
    """
    w = latent_weights(weights, v.shape[1:]).to(v.device)
    return _confined_move(v, normals, targets, held, lambda rows: rows * w[None, :])


def projected_joint_move(v: Tensor, normals: Tensor, targets: Tensor, held: Tensor | None, basis: Tensor) -> Tensor:
    """The joint move kept off a subspace (LOCO-Edit's null-space projection, Chen et al. 2024):

        v'_k = v + P N (N^T P N)^-1 (t_k - N^T v),   P = I - V^T V,

    V = ``basis`` (k, D) float64 orthonormal rows (``outside_jacobian_basis``: the directions that
    change the outside of the predicted clean image most). The targets are still hit exactly
    (N^T P N (N^T P N)^-1 = I) and the move is orthogonal to every row of V. Arguments and result
    otherwise as ``confined_joint_move``; refusals from ``check_projection``.
    """
    V = _orthonormal_rows(basis, v[0].numel(), v.device)
    return _confined_move(v, normals, targets, held, lambda rows: rows - (rows @ V.T) @ V)


def _orthonormal_rows(basis: Tensor, dim: int, device: torch.device) -> Tensor:
    V = torch.as_tensor(basis, device=device).double().reshape(len(basis), -1)
    if V.shape[1] != dim:
        raise ValueError(f"a basis of {V.shape[1]} values does not fit latents of {dim} values")
    if len(V) and float((V @ V.T - torch.eye(len(V), dtype=torch.float64, device=device)).abs().max()) > 1e-8:
        raise ValueError("the basis rows must be orthonormal (V V^T = I), as the rows of an SVD's Vh are")
    return V


# ----------------------------------------------------------------------------------- refusals

def check_region(names: Sequence[str], normals: Tensor, weights, n_held: int = 0) -> np.ndarray:
    """The share of each normal inside the region, (A,) float64 in [0, 1], or RegionError.

    names: one per row; normals: (A, D) float64 unit rows, the moved ones first, then the last
    ``n_held`` held ones (as ``check_joint`` takes them); weights: W with D values (any shape,
    flattened; ``latent_weights`` broadcasts a mask over a latent), in [0, 1]. The share is

        s = n^T diag(W) n / ||n||^2,

    the fraction of the normal's squared norm inside the region (||W (.) n||^2 / ||n||^2 for a
    binary mask). For one moved attribute the confined move is exactly

        ||W (.) n|| ||n|| / (n^T diag(W) n)  <=  1 / sqrt(s)

    times as long as the unconfined one (equality for a binary mask). Refused, naming the attribute:
    a moved normal with s < ``MIN_REGION_SHARE``; and, as ``check_joint`` does for G, a confined
    Gram matrix G_C = N^T diag(W) N too ill-conditioned to trust (see ``_check_confined``).
    """
    w = torch.as_tensor(weights).double().reshape(-1).to(normals.device)
    if w.numel() != normals.shape[1]:
        raise ValueError(f"region weights of {w.numel()} values do not fit normals of {normals.shape[1]} values")
    if not bool(((w >= 0) & (w <= 1)).all()):
        raise ValueError("region weights must lie in [0, 1] (1: editable)")
    basis = normals.double()
    return _check_confined(names, basis, basis * w[None, :], n_held, "the region")


def check_projection(names: Sequence[str], normals: Tensor, basis: Tensor, n_held: int = 0) -> np.ndarray:
    """``check_region`` for ``projected_joint_move``: the share ||P n||^2 / ||n||^2 of each normal
    that survives the projector P = I - V^T V, refused below ``MIN_REGION_SHARE`` (the projected
    move of one attribute is exactly 1 / sqrt(share) times as long as the unprojected one)."""
    rows = normals.double()
    V = _orthonormal_rows(basis, rows.shape[1], rows.device)
    return _check_confined(names, rows, rows - (rows @ V.T) @ V, n_held, "the projection")


def _check_confined(names: Sequence[str], basis: Tensor, confined: Tensor, n_held: int, where: str) -> np.ndarray:
    """Shares s_i = n_i . C n_i / ||n_i||^2 of rows n_i (A, D) and their confinements C n_i (A, D),
    refusing (RegionError) before any work:

    - a moved row with s < ``MIN_REGION_SHARE``, with its share and the exact amplification
      ||C n|| ||n|| / (n . C n) of its move alone;
    - the solve's rows (``_solve_rows``) when the confined Gram matrix, scaled to a unit diagonal
      (G_hat = S^-1/2 G_C S^-1/2, the cosines of the confined normals C^(1/2) n), is near singular,
      as ``check_joint`` judges G: sqrt(lambda_min(G_hat)) below the rounding r_C, or
      cond(G_hat) x 2 r_C above ``JOINT_TOLERANCE``. r_C = ``resolvable_residual(D)`` /
      sqrt(min moved share): the float32 rounding of a normal, about r of its length, is up to
      1 / sqrt(s) times larger relative to the part inside the region. The most parallel pair of
      confined normals is named.
    """
    names = list(names)
    if len(names) != len(basis):
        raise ValueError(f"{len(names)} names for {len(basis)} normals")
    n_moved, dim = len(basis) - n_held, basis.shape[1]
    lengths = (basis * basis).sum(dim=1)
    gram = _confined_gram(basis, confined)
    shares = (gram.diagonal() / lengths).clamp(0, 1)
    for i in range(n_moved):
        if float(shares[i]) < MIN_REGION_SHARE:
            inside = float(gram[i, i])
            amplification = (float(confined[i].norm() * lengths[i].sqrt()) / inside) if inside > 0 else math.inf
            raise RegionError(f"{names[i]} has {float(shares[i]):.2%} of its squared norm inside {where} (at least "
                              f"{MIN_REGION_SHARE:.0%} is needed): reaching its target there takes a move "
                              f"{amplification:.3g} times as long as without the region; enlarge the region or "
                              "drop the attribute")
    rows = _solve_rows(n_moved, gram, dim)
    if len(rows) > 1:
        sub = gram[rows][:, rows]
        scale = sub.diagonal().sqrt()
        cosines = sub / scale[:, None] / scale[None, :]
        eigenvalues = torch.linalg.eigvalsh(cosines)
        smallest, largest = float(eigenvalues[0].clamp(min=0)), float(eigenvalues[-1])
        rounding = resolvable_residual(dim) / math.sqrt(float(shares[:n_moved].min())) if n_moved else 0.0
        condition = largest / smallest if smallest > 0 else math.inf
        if math.sqrt(smallest) < rounding or condition * 2 * rounding > JOINT_TOLERANCE:
            off = (cosines - torch.eye(len(rows), dtype=torch.float64, device=cosines.device)).abs()
            i, j = np.unravel_index(int(torch.argmax(off)), off.shape)
            raise RegionError(f"inside {where}, {names[rows[i]]} and {names[rows[j]]} are too close to move or "
                              f"hold together (cos {float(cosines[i, j]):+.4f}; cond {condition:.3g} for {dim} "
                              "values): enlarge the region or drop one of them")
    return shares.cpu().numpy()


# --------------------------------------------------------------------------------- soft masks

def feather(mask, pixels: float) -> Tensor:
    """A soft region: (H, W) mask -> (H, W) float32 in [0, 1], exactly 1 on the region and exactly
    0 at ``pixels`` or more from it, linear in between:

        f(p) = max(0, 1 - d(p) / pixels),   d(p) = Euclidean distance (pixel centres) to the region,

    the region being every pixel where mask > 0 (every pixel the user's region touches at all after
    area resizing). d comes from an exact Euclidean distance transform (scipy.ndimage), not from
    repeated box blurs: it is isotropic (a blurred square's feather is wider along the diagonals)
    and puts the zero exactly at ``pixels``, so "the outside beyond the feather" is the set
    d >= pixels, exactly kept by ``blend`` with keep = 1 - f. The ramp lies outside the region so
    that the whole region stays editable. pixels = 0: the hard mask (mask > 0) itself.
    """
    region = np.asarray(torch.as_tensor(mask).detach().cpu().numpy()) > 0
    if region.ndim != 2:
        raise ValueError(f"a mask is (H, W), got shape {region.shape}")
    if not region.any():
        raise ValueError("the mask holds no region (no value above 0)")
    if not pixels >= 0:
        raise ValueError(f"the feather width must be >= 0 pixels, got {pixels}")
    if pixels == 0:
        return torch.from_numpy(region.astype(np.float32))
    distance = distance_transform_edt(~region)  # 0 on the region, else the distance to its nearest pixel
    return torch.from_numpy(np.clip(1.0 - distance / pixels, 0.0, 1.0).astype(np.float32))


def _cell_overlaps(n: int, side: int) -> Tensor:
    """(side, n) float64: the share of cell i of ``side`` equal cells over [0, n) that pixel
    [j, j + 1) covers, so each row sums to 1."""
    edges = torch.arange(side + 1, dtype=torch.float64) * n / side
    pixel = torch.arange(n, dtype=torch.float64)
    overlap = (torch.minimum(edges[1:, None], pixel[None, :] + 1) - torch.maximum(edges[:-1, None], pixel[None, :]))
    return overlap.clamp(min=0) / (n / side)


def area_downsample(mask, side: int) -> Tensor:
    """The share of each cell of a side x side grid that the mask covers: (H, W) values in [0, 1]
    -> (side, side) float64, cell (i, j) = the mean of the mask over the area of [i H/side, (i+1)
    H/side) x [j W/side, (j+1) W/side), pixels split between cells counted by the part inside.

    For the UNet bottleneck h, which is spatial (8 x 8 at 32 px, 4 x 4 at 16 px, 8 x 8 at 256 px):
    ``confined_joint_move(h, ..., weights=area_downsample(mask, 8))`` broadcasts it over h's channels.
    Exact where side divides H and W (the mean of each block).
    """
    m = torch.as_tensor(mask).double()
    if m.ndim != 2:
        raise ValueError(f"a mask is (H, W), got shape {tuple(m.shape)}")
    if side < 1:
        raise ValueError(f"the grid side must be >= 1, got {side}")
    return _cell_overlaps(m.shape[0], side) @ m.cpu() @ _cell_overlaps(m.shape[1], side).T


# ------------------------------------------------------------------------ fitting on a region

def confined_rows(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Flattened latents (n, C * S) times each one's region weights (n, S) in [0, 1] (S = H * W, its
    mask at the latent's size), every channel alike: what a boundary fitted on the region alone
    sees. A linear SVM's normal is a combination of the rows it is fitted on, so it is 0 wherever
    every row's weight is 0: made of the region's values only, the move a region edit confines."""
    rows, weights = np.asarray(rows), np.asarray(weights)
    n, size = weights.shape
    if rows.shape[0] != n or rows.shape[1] % size:
        raise ValueError(f"rows of shape {rows.shape} are not {n} latents of C x {size} values")
    return (rows.reshape(n, -1, size) * weights[:, None, :].astype(rows.dtype)).reshape(rows.shape)


# ------------------------------------------------------------------------ blended denoising

def reference_trajectory(net: Net, z: Tensor, alphas_cumprod: Tensor, grid: Sequence[int],
                         h_edit: Tensor | None = None, h_policy: HPolicy = "lagged") -> dict[int, Tensor]:
    """The unedited run, {t: x_t (B, C, H, W)} for every timestep of ``generation_pairs(grid)``:
    t_0 (z itself), then each timestep reached, down to -1 (the image).

    Eta 0 through ``ddim_trajectory``, the path ``utils.core.editing.reconstruct`` takes: pass
    ``h_edit`` = the inverted h when the edits move h, so that x_{-1} is the reconstruction bit for
    bit.
    """
    states = {grid[-1]: z}
    for step in ddim_trajectory(net, z, alphas_cumprod, generation_pairs(grid), h_edit=h_edit, h_policy=h_policy):
        states[step.t] = step.x
    return states


# ------------------------------------------------------------ LOCO-Edit: the outside's Jacobian

def _outside_rows(outside_mask, channels: int) -> Tensor:
    """Which values of x0_hat (C, H, W), flattened, lie outside the region: (R,) int64 indices,
    every channel at each pixel where outside_mask (H, W) > 0."""
    outside = torch.as_tensor(outside_mask) > 0
    if outside.ndim != 2:
        raise ValueError(f"the outside mask is (H, W), got shape {tuple(outside.shape)}")
    return torch.nonzero(outside.expand(channels, *outside.shape).reshape(-1)).reshape(-1)


def outside_jacobian_basis(net: Net, x_t: Tensor, t: int, alphas_cumprod: Tensor, outside_mask, k: int,
                           chunk: int = 64) -> Tensor:
    """The k directions of x_t that change the outside of the predicted clean image most: (k, D)
    float64 orthonormal rows, the top-k right singular vectors of J_out (LOCO-Edit, Chen et al.,
    NeurIPS 2024), for ``projected_joint_move`` at t = t_0.

        x0_hat(x_t) = (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t),   J = d x0_hat / d x_t (D x D),

    J_out = the rows of J at the outside pixels (every channel where outside_mask (H, W) > 0).
    Exact: each row is a vector-Jacobian product (``torch.func.vjp``, vmapped over ``chunk`` rows at
    a time), then a float64 SVD of J_out. x_t: (1, C, H, W), one image (each image has its own
    basis), in the dtype the network computes in. ``net`` must be differentiable: the model itself
    (``model(x, t, h_override=None) -> (out, h)``), not an ``InferenceNet``, which runs under
    inference mode (ValueError). Affordable for J_out of up to ``MAX_JACOBIAN_ENTRIES`` entries
    (32 x 32 x 3 images); ValueError beyond.
    """
    if x_t.ndim != 4 or len(x_t) != 1:
        raise ValueError(f"x_t is one image (1, C, H, W), got shape {tuple(x_t.shape)}")
    channels, dim = x_t.shape[1], x_t[0].numel()
    rows = _outside_rows(outside_mask, channels).to(x_t.device)
    if rows.numel() * dim > MAX_JACOBIAN_ENTRIES:
        raise ValueError(f"the exact outside Jacobian would hold {rows.numel()} x {dim} entries, more than "
                         f"{MAX_JACOBIAN_ENTRIES}: too large for the exact method")
    if not 1 <= k <= min(rows.numel(), dim):
        raise ValueError(f"k must lie in [1, {min(rows.numel(), dim)}] (outside values, latent values), got {k}")
    a = alpha_bar(alphas_cumprod, t).to(device=x_t.device, dtype=x_t.dtype)

    def outside_x0_hat(flat: Tensor) -> Tensor:
        x = flat.reshape(x_t.shape)
        eps = net(x, t, h_override=None)[0][:, :channels]  # learned-variance models: the rest are variances
        return ((x - (1 - a).sqrt() * eps) / a.sqrt()).reshape(-1)[rows]

    probe = x_t.detach().clone().requires_grad_(True)
    with torch.enable_grad():  # one plain call: an eps that does not depend on x would give J = I / sqrt(a_t)
        if not net(probe, t, h_override=None)[0].requires_grad:
            raise ValueError("the network is not differentiable (an InferenceNet runs under inference mode): "
                             "pass the model itself")
    _, pullback = torch.func.vjp(outside_x0_hat, x_t.detach().reshape(-1))
    eye = torch.eye(rows.numel(), dtype=x_t.dtype, device=x_t.device)
    jacobian = torch.cat([torch.func.vmap(pullback)(eye[s:s + chunk])[0].double()
                          for s in range(0, rows.numel(), chunk)])  # (R, D)
    _, _, vh = torch.linalg.svd(jacobian, full_matrices=False)
    return vh[:k]
