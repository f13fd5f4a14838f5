"""The linear SVM through its Gram matrix: the exact problem of ``SVC(kernel='linear')``, fast.

The linear SVM's dual depends on the latents only through K = X X^T (N x N). libsvm given K
(``kernel='precomputed'``) runs the same solver on the same numbers as with ``kernel='linear'``,
which takes each dot product on its own; one matrix product is many times faster at D ~ 10^5.
The normal is then w = sum_i alpha_i y_i x_i over the support vectors.

Rows come from a *reader*: ``read(start, stop)`` returns rows [start, stop) as a (stop - start, D)
float array (numpy or torch, any float dtype), so the latents can be an array in memory or entries
of the latent cache; they are never converted to float64 as a whole. K is accumulated in float64
tile by tile:

    rows are cut into panels [s, e) of ``panel_rows``; panel p fills K[s:e, :e] (the lower
    triangle's tiles): K[s:e, s:e] = P P^T, then K[s:e, c:c+b] = P B^T for column blocks B of
    ``block_rows`` rows before s.

A tile's value depends only on its panel and column block, never on which process computed it or
what else it computed, so panels can be split over processes (``panel_share``) and summed into one
K that equals a single process's bit for bit. Memory: K (N^2 float64), one panel and one column
block in float64 on ``device``, plus whatever the reader returns for one of them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import SVC

from utils.interruptible import call_interruptibly

Reader = Callable[[int, int], "np.ndarray | torch.Tensor"]

#: Default float64 bytes of one panel; the column blocks are a quarter of it.
PANEL_BYTES = 1 << 30


@dataclass(frozen=True)
class DualSolution:
    """The SVM's dual: w = sum_k dual_coef[k] * x[support[k]], decision f(x) = w.x + intercept.

    support: (S,) int64 row indices, increasing; dual_coef: (S,) float64 (alpha_k y_k, y in {-1, 1})."""
    support: np.ndarray
    dual_coef: np.ndarray
    intercept: float


def array_reader(latents) -> tuple[Reader, int, int]:
    """A reader over latents (N, ...) in memory (numpy or torch, any float dtype): (read, N, D).

    read returns views (no copy) where the array is contiguous."""
    n = len(latents)
    flat = latents.reshape(n, -1)
    return (lambda start, stop: flat[start:stop]), n, int(flat.shape[1]) if n else 0


def panel_rows_for(dim: int, panel_bytes: int = PANEL_BYTES) -> int:
    """Rows of a float64 panel of ``dim`` values each that fit in ``panel_bytes`` (at least 1)."""
    return max(1, panel_bytes // (8 * max(1, dim)))


def panel_bounds(n: int, panel_rows: int) -> list[tuple[int, int]]:
    """[start, stop) of each panel of ``panel_rows`` rows covering range(n)."""
    if panel_rows < 1:
        raise ValueError(f"panel_rows must be at least 1, got {panel_rows}")
    return [(s, min(s + panel_rows, n)) for s in range(0, n, panel_rows)]


def panel_share(n_panels: int, rank: int, world_size: int) -> list[int]:
    """The panels rank ``rank`` of ``world_size`` computes, dealt in snake order (0..W-1, W-1..0, ...).

    Panel p costs about p + 1 tiles; dealing back and forth gives every rank nearly the same sum."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return [p for p in range(n_panels) if (p % world_size if (p // world_size) % 2 == 0
                                           else world_size - 1 - p % world_size) == rank]


def _load(read: Reader, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [start, stop) copied into the float64 buffer ``out`` (converted there, never as a whole)."""
    rows = torch.as_tensor(read(start, stop))
    rows = rows.reshape(len(rows), -1)
    if rows.shape != (stop - start, out.shape[1]):
        raise ValueError(f"the reader returned rows of shape {tuple(rows.shape)} for [{start}, {stop}) "
                         f"of {out.shape[1]} values")
    view = out[:stop - start]
    if view.device.type == "cpu" and rows.dtype in (torch.float16, torch.float32, torch.float64):
        # numpy converts in one thread; torch's threaded copy stalls when the CPU is shared.
        np.copyto(view.numpy(), rows.numpy(), casting="same_kind")
    else:
        view.copy_(rows)
    return view


def gram_panels(read: Reader, n: int, dim: int, panels: Sequence[int] | None = None, *,
                panel_rows: int | None = None, device: torch.device | str = "cpu",
                out: np.ndarray | None = None) -> np.ndarray:
    """The lower-triangle tiles of K = X X^T that ``panels`` (default: all) fill, (n, n) float64.

    Entries of other panels and above the diagonal are left as they are in ``out`` (zeros when it
    is new); ``symmetrize`` completes K once every panel is in. The products run on ``device``.
    """
    panel_rows = panel_rows or panel_rows_for(dim)
    bounds = panel_bounds(n, panel_rows)
    K = np.zeros((n, n)) if out is None else out
    device = torch.device(device)
    block_rows = max(1, panel_rows // 4)
    panel_buf = torch.empty((min(panel_rows, n), dim), dtype=torch.float64, device=device)
    block_buf = torch.empty((min(block_rows, n), dim), dtype=torch.float64, device=device)
    for p in range(len(bounds)) if panels is None else panels:
        s, e = bounds[p]
        P = _load(read, s, e, panel_buf)
        K[s:e, s:e] = (P @ P.T).cpu().numpy()
        for c in range(0, s, block_rows):
            B = _load(read, c, min(c + block_rows, s), block_buf)
            K[s:e, c:c + len(B)] = (P @ B.T).cpu().numpy()
    return K


def symmetrize(K: np.ndarray, panel_rows: int) -> np.ndarray:
    """Copy the lower triangle of K (n, n) onto the upper, in place, a panel at a time (no n^2 temporaries)."""
    for s, e in panel_bounds(len(K), panel_rows):
        K[:s, s:e] = K[s:e, :s].T
        K[s:e, s:e] = np.tril(K[s:e, s:e]) + np.tril(K[s:e, s:e], -1).T
    return K


def gram_matrix(read: Reader, n: int, dim: int, *, panel_rows: int | None = None,
                device: torch.device | str = "cpu") -> np.ndarray:
    """K = X X^T, (n, n) float64, from the rows ``read`` returns (see the module docstring)."""
    panel_rows = panel_rows or panel_rows_for(dim)
    return symmetrize(gram_panels(read, n, dim, panel_rows=panel_rows, device=device), panel_rows)


#: The most iterations libsvm may take for one fit (its ``max_iter``). A converging fit of the
#: boundary search takes far fewer (hundreds to a few tens of thousands at n up to 10,000); a large C
#: on classes that overlap can keep libsvm stepping for ever. Measured on the 2-core EPYC: 10^7
#: iterations take 7.5 s at n = 40 (each costs O(n), so minutes at n in the thousands).
MAX_SVM_ITERATIONS = 10_000_000


#: The C values a fit may take. Below 1e-6 the hinge loss weighs nothing against the margin: every
#: row becomes a bounded support vector, ||w|| shrinks with C while the intercept stays of order 1,
#: so the hyperplane puts every row on one side (and distances grow as 1/C: at 1e-30 they overflow
#: the report). Above 1e6, on classes that overlap, libsvm's steps become so small that it runs
#: into ``MAX_SVM_ITERATIONS``. Inside the range both are still checked after the fit.
SVM_C_RANGE = (1e-6, 1e6)


class FitError(ValueError):
    """The SVM has no usable solution at this C (the caller names the flag that sets it)."""


class NotConverged(FitError):
    """libsvm stopped at its iteration bound before it converged."""


class OneSided(FitError):
    """The solution puts every training row on one side of its hyperplane."""


def solve_dual(K: np.ndarray, labels: np.ndarray, C: float = 1.0, *, class_weight: str | None = None,
               max_iter: int = MAX_SVM_ITERATIONS) -> DualSolution:
    """``SVC(kernel='linear', C=C)``'s dual solution from the Gram matrix K (n, n) float64 of the
    training rows; labels (n,) in {0, 1} (1 positive). The same libsvm solver on the same problem,
    so the hyperplane is the one ``kernel='linear'`` finds (up to float64 rounding of K).

    class_weight: None, or 'balanced' (sklearn's: C of class c times n / (2 n_c)). libsvm runs in a
    thread of its own while this thread waits (``utils.interruptible``), so SIGINT / SIGTERM are
    handled during the solve; it stops after ``max_iter`` iterations: NotConverged.
    """
    if not C > 0:
        raise ValueError(f"the SVM's C must be positive, got {C}")

    def fit() -> SVC:
        with warnings.catch_warnings():  # fit_status_ says it, below
            warnings.simplefilter("ignore", ConvergenceWarning)
            return SVC(kernel="precomputed", C=C, class_weight=class_weight, max_iter=max_iter).fit(K, labels)

    svm = call_interruptibly(fit, "svm-solve")
    if svm.fit_status_ == 1:
        raise NotConverged(f"libsvm stopped after {max_iter} iterations without converging (C {C:g})")
    # sklearn already flips the binary dual and intercept so that positive decisions mean class 1.
    return DualSolution(support=svm.support_.astype(np.int64), dual_coef=svm.dual_coef_[0].astype(np.float64),
                        intercept=float(svm.intercept_[0]))


def weighted_row_sum(read: Reader, coef: np.ndarray, dim: int, *, block_rows: int | None = None,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """sum_i coef[i] * x_i in one pass over the rows, block by block: coef (n,) -> (D,) float64, or
    coef (n, A), one column per normal -> (A, D) float64. Blocks whose coefficients are all zero are
    not read."""
    coef = np.asarray(coef, dtype=np.float64)
    columns = coef.reshape(len(coef), -1)
    block_rows = block_rows or max(1, panel_rows_for(dim) // 4)
    device = torch.device(device)
    total = torch.zeros((columns.shape[1], dim), dtype=torch.float64, device=device)
    buf = torch.empty((min(block_rows, max(len(coef), 1)), dim), dtype=torch.float64, device=device)
    for s, e in panel_bounds(len(coef), block_rows):
        if columns[s:e].any():
            total += torch.as_tensor(columns[s:e].T.copy(), device=device) @ _load(read, s, e, buf)
    out = total.cpu().numpy()
    return out[0] if coef.ndim == 1 else out


def row_dots(read: Reader, n: int, w: np.ndarray, *, block_rows: int | None = None,
             device: torch.device | str = "cpu") -> np.ndarray:
    """x_i . w for every row in one pass, block by block: w (D,) -> (n,) float64, or w (A, D) ->
    (n, A) float64."""
    w = np.asarray(w, dtype=np.float64)
    rows_w = w.reshape(-1, w.shape[-1])
    dim = rows_w.shape[1]
    block_rows = block_rows or max(1, panel_rows_for(dim) // 4)
    device = torch.device(device)
    wt = torch.as_tensor(rows_w.T.copy(), device=device)  # (D, A)
    buf = torch.empty((min(block_rows, max(n, 1)), dim), dtype=torch.float64, device=device)
    out = [(_load(read, s, e, buf) @ wt).cpu().numpy() for s, e in panel_bounds(n, block_rows)]
    dots = np.concatenate(out) if out else np.zeros((0, len(rows_w)))
    return dots[:, 0] if w.ndim == 1 else dots
