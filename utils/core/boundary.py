"""Semantic boundaries: fit a linear SVM, edit latents across it, project one normal off others.

Arrays in, arrays out (numpy for fitting, torch or numpy for editing); no files here. A latent of
any shape is flattened to D = prod(shape) first (docs/algorithm.md sections 4, 5 and 9).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from utils.core.gram import (NotConverged, OneSided, Reader, array_reader, gram_matrix, row_dots, solve_dual,
                             weighted_row_sum)
from utils.errors import UserError


@dataclass(frozen=True)
class Boundary:
    """A linear SVM's hyperplane w.x + b = 0 and its unit normal n = w / ||w||.

    normal, coef: (D,) float32; intercept: b; accuracies in [0, 1] (test_acc is nan without a test set).
    """
    normal: np.ndarray
    coef: np.ndarray
    intercept: float
    train_acc: float
    test_acc: float


def split_indices(n: int, n_train: int, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into disjoint train (n_train) and test (n_test) indices."""
    if n_train + n_test > n:
        raise ValueError(f"asked for {n_train} train + {n_test} test items but only {n} are available")
    order = rng.permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_test])


@dataclass(frozen=True)
class BoundaryFit:
    """A fitted boundary and the signed hyperplane distances (w.x + b) / ||w|| of its training
    and test rows, (N_train,) and (N_test,) float64 (what ``hyperplane_distances`` gives)."""
    boundary: Boundary
    train_distances: np.ndarray
    test_distances: np.ndarray
    #: The training and test rows those distances belong to (indices into the fit's rows).
    train_rows: np.ndarray | None = None
    test_rows: np.ndarray | None = None


def fit_boundary(train_latents: np.ndarray, train_labels: np.ndarray,
                 test_latents: np.ndarray | None = None, test_labels: np.ndarray | None = None, *,
                 C: float = 1.0, device: torch.device | str = "cpu") -> Boundary:
    """The hyperplane of ``SVC(kernel='linear', C=C)`` (hinge loss, raw features) separating
    labels 1 (positive) from 0, solved through the Gram matrix (utils/core/gram.py).

    train_latents: (N, D) or (N, ...) (flattened), any float dtype, numpy or torch; never copied
    whole to float64 (memory: the latents, N^2 float64, a panel); train_labels: (N,) in {0, 1}
    or {-1, 1}. device: where the Gram products run (e.g. 'cuda').
    NOTE: the normal points toward the positive class, so a positive distance adds the attribute.
    """
    test = array_reader(test_latents) if test_latents is not None and len(test_latents) > 0 else None
    return fit_boundary_rows(array_reader(train_latents), train_labels, test, test_labels, C=C,
                             device=device).boundary


def fit_boundary_rows(train: tuple[Reader, int, int], train_labels: np.ndarray,
                      test: tuple[Reader, int, int] | None = None, test_labels: np.ndarray | None = None, *,
                      C: float = 1.0, device: torch.device | str = "cpu", gram: np.ndarray | None = None,
                      panel_rows: int | None = None, balance: Balance = "none") -> BoundaryFit:
    """``fit_boundary`` on rows from readers, (read, N, D) each (``array_reader`` or the latent cache's).

    gram: the training rows' Gram matrix (N, N) float64 when already computed (e.g. by several
    processes); else it is computed here. The normal is summed from the dual block by block, the
    training distances come from the Gram matrix and the test rows are read once. One attribute
    of ``fit_attributes``.
    """
    y = _binary(train_labels)
    yt = None if test is None or test[1] == 0 else 2 * _binary(test_labels) - 1
    return fit_attributes(train, (2 * y - 1)[:, None], test, None if yt is None else yt[:, None], C=C,
                          device=device, gram=gram, panel_rows=panel_rows, balance=balance)[0]


#: The fewest training rows of each class an attribute of a multi-attribute search needs; one
#: with fewer is skipped (and its counts reported). Ten per class: with fewer, a linear SVM in
#: hundreds of dimensions separates any labelling, and one test image moves the accuracy by 10 %.
MIN_CLASS_COUNT = 10


def class_counts(labels: np.ndarray) -> np.ndarray:
    """Per attribute, how many rows are labelled negative and positive: labels (N, A) in {-1, 0, 1}
    -> (A, 2) int64 [negative, positive]."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    return np.stack([(labels < 0).sum(axis=0), (labels > 0).sum(axis=0)], axis=1).astype(np.int64)


#: How the classes are weighed: 'none' (every row alike, as ``SVC``), 'weight' (sklearn's
#: ``class_weight='balanced'``: C of class c times n / (2 n_c)), 'equal' (a seeded random subset of
#: the larger class, as many rows as the smaller has).
Balance = Literal["none", "weight", "equal"]
BALANCES = ("none", "weight", "equal")


def attribute_rows(labels: np.ndarray, balance: Balance = "none", seed: int = 0) -> np.ndarray:
    """The rows an attribute's fit uses, increasing: those labelled (+1 or -1, not 0) in ``labels``
    (N,), and with ``balance='equal'`` a seeded random subset of the larger class's as large as the
    smaller class."""
    labels = np.asarray(labels).reshape(-1)
    rows = np.flatnonzero(labels != 0)
    if balance != "equal":
        return rows
    pos, neg = rows[labels[rows] > 0], rows[labels[rows] < 0]
    keep = min(len(pos), len(neg))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(pos, keep, replace=False), rng.choice(neg, keep, replace=False)]))


def fit_attributes(train: tuple[Reader, int, int], train_labels: np.ndarray,
                   test: tuple[Reader, int, int] | None = None, test_labels: np.ndarray | None = None, *,
                   C: float = 1.0, device: torch.device | str = "cpu", gram: np.ndarray | None = None,
                   panel_rows: int | None = None, balance: Balance = "none", seed: int = 0,
                   names: Sequence[str] | None = None) -> list[BoundaryFit]:
    """One linear SVM per attribute on one set of rows, all from one Gram matrix.

    train_labels: (N, A) in {-1, 0, 1} (0: not labelled for that attribute); test_labels (N_test, A)
    likewise. Attribute a is fitted, exactly as ``SVC(kernel='linear', C=C)`` would on them alone,
    on its ``attribute_rows`` (each class at least one row), through the slice of K = X X^T at those
    rows; K is computed once (or given as ``gram``), every normal is summed in one more pass over
    the training rows and every test decision in one pass over the test rows. Returns one
    BoundaryFit per attribute, whose distances are those of its own rows (training: its
    ``attribute_rows``; test: the rows labelled for it), in row order. Memory: K, one slice of it
    (none where an attribute uses every row), the (A, D) normals, a panel.
    FitError (NotConverged, OneSided) when an attribute's SVM has no usable solution at this C;
    messages name attribute a as ``names[a]`` (default: its index).
    """
    read, n, dim = train
    labels = np.asarray(train_labels).reshape(n, -1) if n else np.zeros((0, 1))
    if len(np.asarray(train_labels)) != n:
        raise ValueError(f"{n} training latents but {len(np.asarray(train_labels))} labels")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError("attribute labels must be -1, 0 or 1")
    n_attr = labels.shape[1]
    names = [f"attribute {a}" for a in range(n_attr)] if names is None else [f"'{a}'" for a in names]
    K = gram_matrix(read, n, dim, panel_rows=panel_rows, device=device) if gram is None else gram
    coef, solved = np.zeros((n, n_attr)), []
    for a in range(n_attr):
        rows = attribute_rows(labels[:, a], balance, seed)
        y = (labels[rows, a] > 0).astype(np.int64)
        counts = np.bincount(y, minlength=2)
        if counts.min() < 1:
            raise ValueError(f"{names[a]}: the training labels hold one class only "
                             f"({int(counts[0])} negative, {int(counts[1])} positive)")
        # Every row labelled: K itself, no copy.
        K_a = K if len(rows) == n else K[np.ix_(rows, rows)]
        try:
            dual = solve_dual(K_a, y, C, class_weight="balanced" if balance == "weight" else None)
        except NotConverged as exc:
            raise NotConverged(f"{names[a]}: {exc}") from None
        coef[rows[dual.support], a] = dual.dual_coef
        train_decision = K_a[:, dual.support] @ dual.dual_coef + dual.intercept
        if np.all(train_decision > 0) or np.all(train_decision <= 0):
            raise OneSided(f"{names[a]}: the hyperplane puts all {len(rows)} training rows on one side "
                           f"(intercept {dual.intercept:.3g})")
        solved.append((rows, y, dual, train_decision))
        del K_a
    W = weighted_row_sum(read, coef, dim, device=device)  # (A, D)
    norms = np.linalg.norm(W, axis=1)
    test_decisions = None
    if test is not None and test[1] > 0:
        test_decisions = row_dots(test[0], test[1], W, device=device)  # (N_test, A)
        test_labels = np.asarray(test_labels).reshape(test[1], -1)
    fits = []
    for a, (rows, y, dual, train_decision) in enumerate(solved):
        norm = norms[a]
        if not np.isfinite(norm) or norm == 0:
            raise UserError(f"{names[a]}: the SVM found no separating direction (zero normal): the latents of the "
                            "two classes cannot be told apart; check the labels, or try another --svm_c or --t_0")
        test_distances, test_acc, test_rows = np.zeros(0), float("nan"), np.zeros(0, dtype=np.int64)
        if test_decisions is not None:
            labelled = test_labels[:, a] != 0
            test_rows = np.flatnonzero(labelled)
            decision = test_decisions[labelled, a] + dual.intercept
            if labelled.any():
                test_acc = float(np.mean((decision > 0) == (test_labels[labelled, a] > 0)))
            test_distances = decision / norm
        boundary = Boundary(normal=(W[a] / norm).astype(np.float32), coef=W[a].astype(np.float32),
                            intercept=dual.intercept, train_acc=float(np.mean((train_decision > 0) == y)),
                            test_acc=test_acc)
        fits.append(BoundaryFit(boundary, train_decision / norm, test_distances, rows, test_rows))
    return fits


def _binary(labels: np.ndarray) -> np.ndarray:
    """Labels in {0, 1} or {-1, 1} as int64 {0, 1}."""
    y = np.asarray(labels).reshape(-1)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1} and not values <= {-1, 1}:
        raise ValueError(f"labels must be binary, in {{0, 1}} or {{-1, 1}}; got values {sorted(values)[:5]}")
    return (y > 0).astype(np.int64)


def _unit_float64(normal, device: torch.device) -> torch.Tensor:
    """normal (D,) or any shape with D values -> (D,) float64 of unit length."""
    n = torch.as_tensor(normal, device=device).reshape(-1).double()
    return n / n.norm()


def _row_dots(v: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """v (B, ...) . n (D,) for each row, float64 -> (B,).

    Batch-invariant by construction: each row's products are float64 elementwise, and each row is
    summed by a call of its own on that row alone, so row i's value does not depend on which
    other rows share the batch. A matrix-vector product would not promise that: BLAS libraries
    pick another kernel (another summation order) for 4 rows than for 1.
    """
    flat = v.reshape(v.shape[0], -1).double()
    return torch.stack([(row * n).sum() for row in flat]) if len(flat) else flat.new_zeros(0)


def latent_distance(v: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Signed projections v.n: v (B, ...), normal (D,) -> (B,) float64 (the distance an edit sets).

    The normal is scaled to unit length; each row's value is independent of the batch around it.
    """
    return _row_dots(v, _unit_float64(normal, v.device))


def edit_latents(v: torch.Tensor, normal: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Set the signed projection of each latent onto ``normal`` to each target distance.

    v: (B, ...) latents; normal: (D,) unit norm, D = prod(v.shape[1:]); distances: (K,).
    Returns (B, K, ...): v'_k = v + (d_k - v.n) n, so that v'_k . n = d_k (exactly up to v's
    precision): ``joint_move`` with one normal. The shift is computed in float64 and added in v's
    dtype, so an edit to the distance ``latent_distance(v, normal)`` returns v bit for bit (both
    take the same row sums of the same unit normal). Every step is per row, so a latent's edits do
    not depend on the batch. The SVM intercept is ignored: the hyperplane is taken through the
    origin, as InterFaceGAN's ``linear_interpolate`` does.
    """
    # Rescaled to unit length: guards against a stored normal that drifted from it.
    n = _unit_float64(normal, v.device)
    d = torch.as_tensor(distances, device=v.device).reshape(-1).double()
    return joint_move(v, n[None], d[:, None])


def unit_rows(normals) -> torch.Tensor:
    """Normals (M, D) (or (M, ...)), any float dtype, numpy or torch -> (M, D) float64, each row of
    unit length, as ``edit_latents`` scales a single normal (so that M = 1 gives its bits)."""
    rows = torch.as_tensor(normals).reshape(len(normals), -1)
    return torch.stack([_unit_float64(row, rows.device) for row in rows]) if len(rows) else rows.double()


def joint_move(v: torch.Tensor, normals: torch.Tensor, targets: torch.Tensor,
               held: torch.Tensor | None = None) -> torch.Tensor:
    """The smallest move of each latent that sets its projection onto every normal to a target.

    v: (B, ...) latents, D = prod(v.shape[1:]); normals: (M, D) float64 unit rows (``unit_rows``),
    the moved attributes; targets: (K, M) float64, edit k's signed projection onto each; held:
    (H, D) float64 unit rows or None, attributes whose projection stays where it is (a target of
    zero change). Returns (B, K, ...) in v's dtype:

        v'_k = v + N G^-1 (t_k - N^T v),    N = [normals; held]^T (D x (M+H)),  G = N^T N,

    the least-norm solution of N^T v' = t_k (t_k holds the held rows' own projections), so
    v'_k . n_m = t_km for every moved m and v'_k . n_h = v . n_h for every held h, up to v's
    precision. The plain sum v + sum_m (t_km - v.n_m) n_m misses each target by G's off-diagonal.
    G's diagonal is 1 by construction (unit rows), so with M = 1 and no held rows the coefficient
    is the shift itself and the result equals ``edit_latents`` bit for bit.

    Batch-invariant by construction: projections are per-row float64 sums (``_row_dots``), and the
    coefficients and the move are elementwise float64 products accumulated over the M + H normals
    in a fixed order, so no BLAS kernel choice (which depends on B or K) enters. G must be well
    conditioned: ``check_joint`` refuses near-parallel normals before any work.
    """
    basis = normals if held is None or len(held) == 0 else torch.cat([normals, held])
    basis = basis.to(v.device)
    m = len(normals)
    if basis.shape[1] != v[0].numel():
        raise ValueError(f"normal of {basis.shape[1]} values does not fit latents of shape {tuple(v.shape[1:])}")
    t = torch.as_tensor(targets, device=v.device).double().reshape(-1, m)  # (K, M)
    own = torch.stack([_row_dots(v, n) for n in basis], dim=1) if len(v) else v.new_zeros((0, len(basis))).double()
    shift = torch.cat([t[None, :, :] - own[:, None, :m],  # (B, K, M + H): held rows move by zero
                       torch.zeros((len(v), len(t), len(basis) - m), dtype=torch.float64, device=v.device)], dim=2)
    if len(basis) == 1:
        coef = shift
    else:
        gram = basis @ basis.T
        gram.fill_diagonal_(1.0)
        inverse = torch.linalg.inv(gram)
        coef = torch.stack([sum_in_order(inverse[i, j] * shift[:, :, j] for j in range(len(basis)))
                            for i in range(len(basis))], dim=2)
    delta = sum_in_order(coef[:, :, i, None] * basis[i][None, None, :] for i in range(len(basis)))  # (B, K, D)
    edited = v.reshape(v.shape[0], 1, -1) + delta.to(v.dtype)
    return edited.reshape(v.shape[0], len(t), *v.shape[1:])


def sum_in_order(terms):
    """The sum of tensors, first to last: elementwise, so the same bits whatever their shapes."""
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total


#: The most a joint move may amplify the float32 rounding of its normals, relative to the move
#: (``check_joint``): 1 %.
JOINT_TOLERANCE = 0.01


def check_joint(names: list[str], normals: torch.Tensor) -> np.ndarray:
    """The cosine matrix (A, A) of unit normals (A, D) float64 that ``joint_move`` may combine, or
    ValueError naming the most parallel pair and its cosine when the move cannot be trusted:

    - a normal lies within float32 rounding of the span of the others: the smallest singular value
      of the normals is below ``resolvable_residual(D)`` (the part of a normal float32 resolves);
    - or cond(G) = (s_max / s_min)^2 times twice that rounding exceeds ``JOINT_TOLERANCE``: the
      stored normals' float32 rounding, amplified by G^-1, could move the solution by more than
      1 % (D = 256: |cos| up to about 0.9992 passes; D = 196,608: up to about 0.98).
    """
    cos = (normals @ normals.T).cpu().numpy()
    np.fill_diagonal(cos, 1.0)
    if len(names) < 2:
        return cos
    s = torch.linalg.svdvals(normals).cpu().numpy()
    rounding = resolvable_residual(normals.shape[1])
    condition = (s[0] / s[-1]) ** 2 if s[-1] > 0 else float("inf")
    if s[-1] < rounding or condition * 2 * rounding > JOINT_TOLERANCE:
        off = np.abs(cos - np.eye(len(names)))
        i, j = np.unravel_index(int(np.argmax(off)), off.shape)
        raise ValueError(f"{names[i]} and {names[j]} are too close to move or hold together (cos {cos[i, j]:+.4f}; "
                         f"cond(G) {condition:.3g} for {normals.shape[1]} values): drop one of them")
    return cos


FLOAT32_EPS = float(np.finfo(np.float32).eps)


def resolvable_residual(dim: int) -> float:
    """The smallest part of a unit normal of ``dim`` values, relative to its length, that float32
    can carry: sqrt(dim) * eps32 (dim 196,608: 5.3e-5, an angle of 0.003 degrees; dim 768: 3.3e-6).

    Why: normals are stored as float32 unit vectors. Every component lies in [-1, 1], where one
    float32 step is at most eps32 (2^-23 ~ 1.19e-7); a normal saved, re-saved or recomputed by
    another float32 pipeline can differ from the "same" normal by about a step per component,
    i.e. by a vector of norm up to sqrt(dim) * eps32 (a condition equal to the primary plus noise
    at the 1e-7 level, or with values one step apart, is such a vector). What is left of the
    primary after removing the conditions, if shorter than that, can be made of rounding alone:
    its direction is noise, and an edit along it moves along noise. Real conditions lie degrees
    away from the primary and leave sin(angle) >> 1e-4 of it; a condition this close to the primary
    is the primary itself as far as float32 can tell. The bound is absolute per component (a step
    at magnitude 1), so it also covers normals concentrated on a few large components.
    """
    return math.sqrt(dim) * FLOAT32_EPS


def project_boundary(primary: np.ndarray, *conditions: np.ndarray) -> np.ndarray:
    """Unit normal of ``primary`` made orthogonal to every condition normal (docs/algorithm.md section 9).

    primary, conditions: (D,). Editing along the result leaves each condition's projection
    unchanged. Raises ValueError (with the angle in degrees) if what is left of the primary after
    removing the conditions is shorter than float32 normals of D values resolve
    (``resolvable_residual``): the primary then lies in the span of the conditions, as far as
    float32 can tell. Conditions that differ from the span of the others by less than that add no
    direction of their own.
    """
    p = np.asarray(primary, dtype=np.float64).reshape(-1)
    if not conditions:
        return (p / np.linalg.norm(p)).astype(np.float32)
    c = np.stack([np.asarray(cond, dtype=np.float64).reshape(-1) for cond in conditions], axis=1)  # (D, M)
    norms = np.linalg.norm(c, axis=0)
    if not np.all(norms > 0) or not np.all(np.isfinite(c)):
        raise ValueError("a condition normal is zero or not finite")
    tolerance = resolvable_residual(p.size)
    # An orthonormal basis of the conditions' span; the SVD drops the directions of repeated or
    # linearly dependent conditions (and differences between conditions at the rounding level),
    # which a QR factorisation would keep as arbitrary columns.
    u, s, _ = np.linalg.svd(c / norms, full_matrices=False)
    basis = u[:, s > s[0] * tolerance]
    residual = p - basis @ (basis.T @ p)
    norm, length = float(np.linalg.norm(residual)), float(np.linalg.norm(p))
    if norm < tolerance * length:
        angle = math.degrees(math.asin(min(1.0, norm / length)))
        raise ValueError(f"the primary boundary lies in the span of the condition boundaries, as far as float32 "
                         f"normals of {p.size} values can tell: {angle:.2g} degrees from it, under the "
                         f"{math.degrees(math.asin(tolerance)):.2g} degrees they resolve (a condition that is the "
                         "edited boundary itself, or a copy of it, cannot be held fixed)")
    return (residual / norm).astype(np.float32)


def hyperplane_distances(latents: np.ndarray, boundary: Boundary) -> np.ndarray:
    """Signed distances (w.x + b) / ||w|| of latents (N, D) or (N, ...) to the SVM's hyperplane,
    (N,) float64: positive on the positive class's side (what the boundary report shows)."""
    x = np.asarray(latents, dtype=np.float64).reshape(len(latents), -1)
    w = np.asarray(boundary.coef, dtype=np.float64).reshape(-1)
    return (x @ w + boundary.intercept) / np.linalg.norm(w)


#: The statistics of a class summary, in the order files store them.
SUMMARY_STATS = ("mean", "std", "p5", "p50", "p95")


def class_summary(distances: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Where each class lies along a boundary: {'neg': {...}, 'pos': {...}}, each with the mean,
    standard deviation and 5th/50th/95th percentiles of its distances (nan for an empty class).

    distances: (N,) signed distances (e.g. ``BoundaryFit.train_distances``); labels: (N,) in
    {0, 1} or {-1, 1}."""
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    y = _binary(labels) if len(d) else np.zeros(0, dtype=np.int64)
    if len(y) != len(d):
        raise ValueError(f"{len(d)} distances but {len(y)} labels")
    summary = {}
    for name, cls in (("neg", 0), ("pos", 1)):
        v = d[y == cls]
        if len(v) == 0:
            summary[name] = dict.fromkeys(SUMMARY_STATS, float("nan"))
            continue
        p5, p50, p95 = np.percentile(v, [5, 50, 95])
        summary[name] = {"mean": float(v.mean()), "std": float(v.std()), "p5": float(p5), "p50": float(p50),
                         "p95": float(p95)}
    return summary
