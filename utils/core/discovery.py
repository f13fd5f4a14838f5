"""Directions without labels: the Jacobian of the predicted clean image, PCA of h, naming the
directions found after supervised boundaries, and SVMs fitted inside a found subspace.

Pure functions, tensors or arrays in and out; no files here. Notation as in utils/core/diffusion.py:

    a_t                 alphas_cumprod[t]
    x_t                 the noisy image at timestep t (z = x_{t_0} when t = t_0), (1, C, H, W)
    eps                 the network's noise prediction e(x_t, t) = out[:, :C]
    x0_hat              (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t), the predicted clean image
    J                   d x0_hat / d x_t at x_t, a (D, D) matrix, D = C H W (flattened C, H, W order)
    V                   (r, D) float64, orthonormal rows: a basis of an r-dimensional subspace
    h                   the UNet's middle-block output, flattened to (D_h,)

A direction along which J has a large singular value moves x0_hat most per unit move of x_t:
the top right singular vectors of J at x_{t_0} are the edits of z that the denoiser amplifies
(``jacobian_subspace``). ``global_basis`` pools them over images; ``principal_directions`` is the
same question asked of h by plain PCA. ``match_directions`` and ``captured_share`` compare what
was found with supervised normals (utils/core/boundary.py); ``fit_within`` turns a few labels into a
boundary inside a found subspace; ``edit_linearity`` says how far J predicts a finite edit.

The network: ``net(x, t, h_override=None) -> (out, h)`` as everywhere, but differentiable -- the
model itself (``models.build_model``, or ``InferenceNet.model``), NOT an ``InferenceNet``, whose
``torch.inference_mode`` would make every derivative silently zero (refused here with a ValueError).
Derivatives use ``torch.func.jvp`` (J v) and ``torch.func.vjp`` (J^T u), batched over vectors with
``torch.func.vmap``; where vmap fails on a network, a loop over the vectors gives the same numbers.
Randomness comes only from an explicit ``torch.Generator``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import scipy.linalg
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap

from utils.core.boundary import Boundary, fit_boundary
from utils.core.diffusion import Net, alpha_bar

Batching = Literal["vmap", "loop"]
BATCHINGS = ("auto", "vmap", "loop")

#: How far from orthonormal (max |V V^T - I|) a basis given to ``captured_share`` or ``fit_within``
#: may be: float32 storage of unit rows of up to ~10^5 values stays far below it.
ORTHONORMAL_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------ the clean image

def x0_hat(net: Net, x_t: Tensor, t: int, alphas_cumprod: Tensor) -> Tensor:
    """The predicted clean image x0_hat = (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t).

    x_t: (B, C, H, W) in the network's dtype (float32 for the project's networks); t: int in
    [0, T-1]. Returns (B, C, H, W) in x_t's dtype, not clipped (as ``ddim_step``'s x0_hat, which
    runs the same equation in float64). The coefficients are rounded to x_t's dtype once, so the
    map is differentiable by ``torch.func`` and linear in eps.
    """
    if t < 0:
        raise ValueError(f"x0_hat needs a noisy timestep t >= 0, got {t}")
    a_t = float(alpha_bar(alphas_cumprod, t))
    out, _ = net(x_t, t)
    eps = out[:, : x_t.shape[1]]  # learned-variance models: the rest are variance channels
    return (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)


def _flat_x0_map(net: Net, x_t: Tensor, t: int, alphas_cumprod: Tensor,
                 output_weights: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """x (D,) -> x0_hat (D,) at timestep t for one image of x_t's shape (1, C, H, W), each output
    value times ``output_weights`` (broadcastable to (C, H, W), e.g. a region's mask (H, W)) when given."""
    if x_t.ndim != 4 or x_t.shape[0] != 1:
        raise ValueError(f"x_t must be one image (1, C, H, W), got shape {tuple(x_t.shape)}")
    shape = x_t.shape
    if output_weights is None:
        return lambda x: x0_hat(net, x.reshape(shape), t, alphas_cumprod).reshape(-1)
    weights = torch.broadcast_to(torch.as_tensor(output_weights, dtype=x_t.dtype, device=x_t.device),
                                 tuple(shape[1:])).reshape(-1)
    return lambda x: x0_hat(net, x.reshape(shape), t, alphas_cumprod).reshape(-1) * weights


def _check_differentiable(net: Net, x_t: Tensor, t: int) -> None:
    """ValueError for a network that runs under ``torch.inference_mode`` (an ``InferenceNet``):
    torch.func would return zero derivatives through it without complaint."""
    with torch.no_grad():
        out, _ = net(x_t, t)
    if out.is_inference():
        raise ValueError("the network runs under torch.inference_mode (an InferenceNet?), so its derivatives would "
                         "be zero: pass the model itself (e.g. InferenceNet.model at fp32)")


# ------------------------------------------------------------------------------------ J v and J^T u

def _rows(fn: Callable[[Tensor], Tensor], vectors: Tensor, batching: Batching) -> Tensor:
    """fn applied to each row of ``vectors`` (K, D) -> (K, D_out), by vmap or a loop."""
    if batching == "vmap":
        return vmap(fn)(vectors)
    return torch.stack([fn(v) for v in vectors])


def _choose_batching(fn: Callable[[Tensor], Tensor], vectors: Tensor,
                     batching: str) -> tuple[Tensor, Batching]:
    """fn on every row by ``batching``; 'auto': by vmap if the network allows it (the project's
    UNets, GroupNorm and attention included, do in torch 2.x), else by a loop. Returns the rows
    and which was used."""
    if batching not in BATCHINGS:
        raise ValueError(f"unknown batching '{batching}' (choices: {', '.join(BATCHINGS)})")
    if batching != "auto":
        return _rows(fn, vectors, batching), batching
    try:
        return vmap(fn)(vectors), "vmap"
    except (RuntimeError, NotImplementedError):
        return torch.stack([fn(v) for v in vectors]), "loop"


@dataclass(frozen=True)
class JacobianSubspace:
    """The top right singular vectors of J = d x0_hat / d x_t at one x_t.

    basis: (rank, D) float64, orthonormal rows v_1..v_rank (J's Ritz vectors), ordered by
    decreasing singular value, each with its largest-magnitude component positive;
    singular_values: (rank,) float64, ||J v_i|| (Ritz values: at most J's true ones, converging to them);
    step_angles: (n_iter,) float64 degrees, the largest principal angle between the rank-dimensional
    Ritz subspaces before and after each power step. The error falls roughly like
    (s_{rank+p+1} / s_rank)^(2k) (p = oversample), each step angle like the error times one minus
    that rate: a small step angle means converged only where the rate is well below 1;
    batching: 'vmap' or 'loop', how the vectors went through the network.
    """
    basis: Tensor
    singular_values: Tensor
    step_angles: np.ndarray
    batching: Batching


def jacobian_subspace(net: Net, x_t: Tensor, t: int, alphas_cumprod: Tensor, rank: int, n_iter: int,
                      generator: torch.Generator, oversample: int = 0,
                      batching: str = "auto", output_weights: Tensor | None = None) -> JacobianSubspace:
    """The top-``rank`` right singular vectors of J = d x0_hat / d x_t at x_t, by subspace
    (block power) iteration on J^T J with a Rayleigh-Ritz step after each power step. With
    ``output_weights`` W (broadcastable to (C, H, W): a region's mask), of diag(W) J instead: the
    moves of x_t that change the predicted clean image inside the region most.

    x_t: (1, C, H, W) in the network's dtype; t: int; rank: 1 <= rank; oversample: p >= 0 extra
    vectors iterated alongside (block size b = rank + p <= D = C H W); n_iter >= 0 power steps;
    generator: the random start V_0 = orth(randn(b, D)) (CPU, float64); batching: 'auto' (vmap
    where the network allows it, else a loop: the same numbers up to rounding), 'vmap' or 'loop'.
    With V_k (b, D) orthonormal:

        V_{k+1} = orth(J^T J V_k^T)^T       (b J v by one vmapped JVP, b J^T u by one vmapped VJP)
        J V_k^T = P S R^T (thin SVD)   ->   Ritz vectors R^T V_k, values S; keep the top rank

    Cost: (n_iter + 1) batches of b JVPs and n_iter batches of b VJP backward passes, the VJP's
    forward pass once. The iterates are orthonormalised in float64; the network sees them in x_t's
    dtype. Returns a ``JacobianSubspace`` (the basis, the singular values, the convergence record).
    """
    dim = x_t[0].numel()
    if rank < 1 or oversample < 0 or rank + oversample > dim:
        raise ValueError(f"need rank >= 1, oversample >= 0 and rank + oversample <= {dim} (the image's values), "
                         f"got rank {rank}, oversample {oversample}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    _check_differentiable(net, x_t, t)
    with torch.no_grad():  # torch.func differentiates w.r.t. x alone; no graph for the weights
        return _subspace_iteration(_flat_x0_map(net, x_t, t, alphas_cumprod, output_weights),
                                   x_t.detach().reshape(-1), rank, rank + oversample, n_iter, generator, batching)


def _subspace_iteration(f: Callable[[Tensor], Tensor], x: Tensor, rank: int, block: int, n_iter: int,
                        generator: torch.Generator, batching: str) -> JacobianSubspace:
    """``jacobian_subspace`` for f: (D,) -> (D_out,) at x (D,) with ``block`` vectors."""
    _, pullback = vjp(f, x)  # one forward pass, reused by every J^T u

    def jv(v: Tensor) -> Tensor:
        return jvp(f, (x,), (v,))[1]

    def jtu(u: Tensor) -> Tensor:
        return pullback(u)[0]

    V = _orthonormal_rows(torch.randn(block, x.numel(), generator=generator, dtype=torch.float64)).to(x.device)
    JV, batching = _choose_batching(jv, V.to(x.dtype), batching)
    ritz, s = _ritz(V, JV, rank)
    angles = []
    for _ in range(n_iter):
        V = _orthonormal_rows(_rows(jtu, JV, batching))  # rows of (J^T J V^T)^T, orthonormalised
        JV = _rows(jv, V.to(x.dtype), batching)
        previous, (ritz, s) = ritz, _ritz(V, JV, rank)
        angles.append(principal_angles(previous, ritz))
    return JacobianSubspace(basis=_sign_fixed(ritz), singular_values=s, step_angles=np.asarray(angles),
                            batching=batching)


def _ritz(V: Tensor, JV: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The top-``rank`` Ritz vectors (rank, D) and values (rank,), float64, of J in the span of V
    (b, D), given JV (b, D_out): J V^T = P S R^T, so J (R^T V)^T = P S, ordered by S."""
    _, s, Rt = torch.linalg.svd(JV.double().T, full_matrices=False)
    return (Rt @ V)[:rank], s[:rank]


def _orthonormal_rows(rows: Tensor) -> Tensor:
    """An orthonormal basis (K, D) float64 of the row space of ``rows`` (K, D) (QR of rows^T,
    signs fixed so that R's diagonal is positive: the same span whatever QR's signs)."""
    Q, R = torch.linalg.qr(rows.double().T)
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return (Q * signs).T.contiguous()


def exact_jacobian(net: Net, x_t: Tensor, t: int, alphas_cumprod: Tensor, chunk_size: int | None = 64) -> Tensor:
    """J = d x0_hat / d x_t at x_t, the full (D, D) matrix (row i: output value i, column j: input
    value j, both flattened in C, H, W order), in x_t's dtype, by ``torch.func.jacrev``.

    x_t: (1, C, H, W). One forward pass, then D VJPs, ``chunk_size`` at a time (None: all at once;
    memory grows with it). For checks at small D (16x16x1 = 256, 32x32x3 = 3072 values).
    """
    _check_differentiable(net, x_t, t)
    f = _flat_x0_map(net, x_t, t, alphas_cumprod)
    with torch.no_grad():  # torch.func differentiates w.r.t. x alone; no graph for the weights
        return jacrev(f, chunk_size=chunk_size)(x_t.detach().reshape(-1))


def principal_angles(U, V) -> float:
    """The largest principal angle, in degrees [0, 90], between the row spaces of U (k, D) and
    V (l, D) (torch or numpy; orthonormal rows are not required, only full row rank).

    With k = l: 0 for the same subspace, 90 when some direction of one is orthogonal to the
    other. With k < l: the largest angle of U's space to its projection on V's (0 when contained).
    Computed by ``scipy.linalg.subspace_angles`` in float64 (accurate at small angles too).
    """
    U, V = _float64(U), _float64(V)
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[1]:
        raise ValueError(f"bases must be (k, D) and (l, D), got {U.shape} and {V.shape}")
    return float(np.degrees(scipy.linalg.subspace_angles(U.T, V.T).max()))


# ------------------------------------------------------------------------------------ across images

def global_basis(local_bases: Sequence, weights: Sequence | None, rank: int) -> np.ndarray:
    """One basis (rank, D) float64 of unit, orthonormal rows for many images' local subspaces.

    local_bases: per image a (rank_i, D) basis with orthonormal rows (``JacobianSubspace.basis``);
    weights: per image (rank_i,) non-negative weights of its rows (the singular values s_ij), or
    None for 1 each. The result is the top-``rank`` right singular vectors of the stacked rows
    w_ij v_ij, i.e. the top eigenvectors of

        M = sum_i sum_j w_ij^2 v_ij v_ij^T      (with w = s: sum_i of J_i^T J_i restricted to each
                                                 image's top subspace; with None: the sum of the
                                                 local projectors)

    so an image whose Jacobian is larger weighs more with singular values as weights. Each row has
    its largest-magnitude component positive. rank <= the number of stacked rows.
    """
    if not local_bases:
        raise ValueError("global_basis needs at least one local basis")
    if weights is not None and len(weights) != len(local_bases):
        raise ValueError(f"{len(local_bases)} local bases but {len(weights)} weight vectors")
    blocks = []
    for i, basis in enumerate(local_bases):
        b = _float64(basis)
        b = b.reshape(1, -1) if b.ndim == 1 else b
        w = np.ones(len(b)) if weights is None else _float64(weights[i]).reshape(-1)
        if len(w) != len(b):
            raise ValueError(f"image {i}: {len(b)} basis rows but {len(w)} weights")
        if np.any(w < 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"image {i}: weights must be finite and non-negative")
        blocks.append(w[:, None] * b)
    stacked = np.concatenate(blocks)
    if not 1 <= rank <= min(stacked.shape):
        raise ValueError(f"rank must lie in [1, {min(stacked.shape)}] for {stacked.shape[0]} stacked rows of "
                         f"{stacked.shape[1]} values, got {rank}")
    _, _, vt = np.linalg.svd(stacked, full_matrices=False)
    return _sign_fixed_np(vt[:rank])


def principal_directions(latents, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of latents (N, D) or (N, ...) (e.g. inverted h, D = 8192), numpy or torch, any float dtype.

    Returns (directions (rank, D) float64 orthonormal rows, explained variance ratio (rank,)
    float64, mean (D,) float64): with X_c = X - mean = U S V^T (thin SVD, N^2 D work, (N, D)
    float64 memory), directions = V^T[:rank], ratio_k = s_k^2 / sum_j s_j^2 (of the total variance),
    each direction's largest-magnitude component positive. 1 <= rank <= min(N - 1, D): a centred
    set of N latents spans at most N - 1 directions.
    """
    X = _float64(latents)
    X = X.reshape(len(X), -1)
    n, dim = X.shape
    if not 1 <= rank <= min(n - 1, dim):
        raise ValueError(f"rank must lie in [1, {min(n - 1, dim)}] for {n} latents of {dim} values, got {rank}")
    if not np.all(np.isfinite(X)):
        raise ValueError("latents must be finite")
    mean = X.mean(axis=0)
    _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
    total = float(np.sum(s ** 2))
    if total == 0:
        raise ValueError("the latents are all equal: no direction of variation")
    return _sign_fixed_np(vt[:rank]), s[:rank] ** 2 / total, mean


def _sign_fixed(rows: Tensor) -> Tensor:
    """Each row times the sign of its largest-magnitude component (the first such on ties)."""
    pick = rows.abs().argmax(dim=1)
    signs = torch.sign(rows.gather(1, pick[:, None]))
    signs[signs == 0] = 1
    return rows * signs


def _sign_fixed_np(rows: np.ndarray) -> np.ndarray:
    """``_sign_fixed`` for numpy rows."""
    signs = np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)])
    signs[signs == 0] = 1
    return rows * signs[:, None]


# ------------------------------------------------------------------------------------ naming

@dataclass(frozen=True)
class Match:
    """One pairing of ``match_directions``: discovered direction ``index`` (None for a name left
    over) with supervised normal ``name`` (None for a direction left over), and their signed cosine
    in [-1, 1] (None when unpaired): cosine -0.9 reads 'direction index is about -name'."""
    index: int | None
    name: str | None
    cosine: float | None


def match_directions(discovered, supervised: Mapping[str, object]) -> list[Match]:
    """Name discovered directions after supervised normals: the one-to-one assignment maximising
    the sum of |cos| (Hungarian, ``scipy.optimize.linear_sum_assignment``).

    discovered: (r, D); supervised: {name: (D,) normal} (any shape of D values); every vector is
    scaled to unit length here (a zero vector is a ValueError). Returns one Match per discovered
    direction in index order (name and cosine None where r exceeds the number of names), then one
    per name left over (index and cosine None), in the mapping's order. min(r, m) pairs are made.
    """
    found = _unit_rows_np(discovered, "discovered direction")
    names = list(supervised)
    normals = _unit_rows_np(np.stack([_float64(supervised[k]).reshape(-1) for k in names]) if names
                            else np.zeros((0, found.shape[1])), "supervised normal")
    if normals.shape[1] != found.shape[1]:
        raise ValueError(f"discovered directions have {found.shape[1]} values, supervised normals {normals.shape[1]}")
    cos = found @ normals.T  # (r, m)
    rows, cols = linear_sum_assignment(np.abs(cos), maximize=True)
    pair = dict(zip(rows.tolist(), cols.tolist()))
    matches = [Match(i, names[pair[i]], float(cos[i, pair[i]])) if i in pair else Match(i, None, None)
               for i in range(len(found))]
    used = set(pair.values())
    return matches + [Match(None, name, None) for j, name in enumerate(names) if j not in used]


def captured_share(normal, basis) -> float:
    """The share of a normal's squared length inside the span of ``basis``: ||V n||^2 / ||n||^2 in
    [0, 1]. normal: (D,) (any shape of D values); basis: (r, D) orthonormal rows (checked to
    ``ORTHONORMAL_TOLERANCE``). A random unit normal scores r / D on average."""
    n = _float64(normal).reshape(-1)
    V = _orthonormal_np(basis)
    if V.shape[1] != n.size:
        raise ValueError(f"a normal of {n.size} values does not fit a basis of {V.shape[1]}")
    length = float(n @ n)
    if length == 0 or not np.isfinite(length):
        raise ValueError("the normal is zero or not finite")
    coords = V @ n
    return float(coords @ coords / length)


# ------------------------------------------------------------------------------------ a few labels

def fit_within(latents, labels, basis, test_latents=None, test_labels=None, C: float = 1.0) -> Boundary:
    """A linear SVM (``fit_boundary``, i.e. ``SVC(kernel='linear', C=C)``) on the coordinates of
    the latents in a subspace, returned as a hyperplane of the full space.

    latents: (N, D) or (N, ...); labels: (N,) in {0, 1} or {-1, 1}; basis: (r, D) orthonormal rows
    V (checked to ``ORTHONORMAL_TOLERANCE``); test set likewise or None. With coordinates
    c = V x (N, r) and the subspace SVM's w (r,), b:

        coef = w_full = V^T w  (D,) float32,   normal = w_full / ||w_full||  (D,) float32,
        intercept = b,   train_acc, test_acc = the subspace SVM's,

    so that for every full latent x, w_full . x + b = w . (V x) + b and ||w_full|| = ||w||: the
    signed distances (w_full . x + b) / ||w_full|| (``hyperplane_distances``) equal the subspace
    SVM's, and the fit is the SVM of the latents projected onto the subspace (V^T V x). The normal
    lies in the span of V. NOTE: the normal points toward the positive class.
    """
    V = _orthonormal_np(basis)
    coords = _coordinates(latents, V)
    test_coords = None if test_latents is None else _coordinates(test_latents, V)
    inner = fit_boundary(coords, labels, test_coords, test_labels, C=C)
    w_full = V.T @ inner.coef.astype(np.float64)
    return Boundary(normal=(w_full / np.linalg.norm(w_full)).astype(np.float32), coef=w_full.astype(np.float32),
                    intercept=inner.intercept, train_acc=inner.train_acc, test_acc=inner.test_acc)


def _coordinates(latents, V: np.ndarray) -> np.ndarray:
    """c = X V^T (N, r) float64 for latents X (N, D) or (N, ...)."""
    X = _float64(latents)
    X = X.reshape(len(X), -1)
    if X.shape[1] != V.shape[1]:
        raise ValueError(f"latents of {X.shape[1]} values do not fit a basis of {V.shape[1]}")
    return X @ V.T


# ------------------------------------------------------------------------------------ which t_0

def edit_linearity(net: Net, x_t: Tensor, t: int, alphas_cumprod: Tensor, direction, step: float) -> float:
    """How well J predicts a finite edit: cos(x0_hat(x_t + l n) - x0_hat(x_t), l J n) in [-1, 1].

    x_t: (1, C, H, W); direction: D = C H W values (any shape), scaled to the unit vector n here;
    step: l, the distance moved in x_t's units (as an edit's d along a unit normal). J n comes from
    one JVP; the cosine is taken in float64. 1 means the edit is linear at this size; for tiny l
    the float32 difference loses digits (cancellation), so l should move x0_hat well above rounding.
    """
    if step == 0:
        raise ValueError("step must be non-zero")
    _check_differentiable(net, x_t, t)
    f = _flat_x0_map(net, x_t, t, alphas_cumprod)
    x = x_t.detach().reshape(-1)
    n = torch.as_tensor(direction).reshape(-1).double()
    if n.numel() != x.numel():
        raise ValueError(f"a direction of {n.numel()} values does not fit x_t of {x.numel()}")
    norm = n.norm()
    if norm == 0 or not torch.isfinite(norm):
        raise ValueError("the direction is zero or not finite")
    n = (n / norm).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        base, Jn = jvp(f, (x,), (n,))
        moved = f(x + step * n)
    delta, linear = (moved - base).double(), step * Jn.double()
    denominator = float(delta.norm() * linear.norm())
    if denominator == 0:
        raise ValueError("the edit moves x0_hat by nothing (zero difference or zero J n): take a larger step")
    return float(delta @ linear) / denominator


# ------------------------------------------------------------------------------------ arrays

def _float64(a) -> np.ndarray:
    """A numpy or torch array (any device, any float dtype) as a float64 numpy array."""
    if isinstance(a, Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _unit_rows_np(rows, what: str) -> np.ndarray:
    """(K, D) float64 rows scaled to unit length; ValueError naming ``what`` for a zero row."""
    R = _float64(rows)
    R = R if R.ndim == 2 else R.reshape(len(R), -1)
    norms = np.linalg.norm(R, axis=1)
    bad = np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))
    if len(bad):
        raise ValueError(f"{what} {int(bad[0])} is zero or not finite")
    return R / norms[:, None]


def _orthonormal_np(basis) -> np.ndarray:
    """basis (r, D) as float64, or ValueError unless its rows are orthonormal to ``ORTHONORMAL_TOLERANCE``."""
    V = _float64(basis)
    V = V.reshape(1, -1) if V.ndim == 1 else V
    error = float(np.abs(V @ V.T - np.eye(len(V))).max()) if len(V) else 0.0
    if not error <= ORTHONORMAL_TOLERANCE:
        raise ValueError(f"the basis rows are not orthonormal (max |V V^T - I| = {error:.3g}); orthonormalise them "
                         "first (e.g. with global_basis or principal_directions)")
    return V
