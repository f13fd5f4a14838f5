"""A few labels inside discovered directions (``--boundary_search --within DIR``): the SVM fitted on
the coordinates of the latents in the subspace the directions of DIR span, written as a boundary of
the full space like any other (utils/core/discovery.py ``fit_within``).

The basis of a space: the current file of every direction in DIR fitted for the run's config at its
t_0 in that space (on its checkpoint, or naming none), in name order. A direction is a file named as
``--discover`` names them (``<prefix>_NN``, ``--discover_prefix``); a folder without such names
gives all its files. They must be orthonormal, as ``--discover`` writes them, so the folder that
``--discover`` wrote into, next to the supervised boundaries it named its directions after, serves
as it is (those boundaries are passed over); a folder of other files that are not orthonormal is
refused, naming the worst pair.

With V (r, D) the basis and c = V x (r,) a latent's coordinates, the subspace SVM (w (r,), b) is
the hyperplane V^T w . x + b = 0 of the full space: the file's ``coef`` is V^T w, its normal
V^T w / ||w|| lies in the span of V, and the signed distances of the latents, (w . c + b) / ||w||,
are those of the full-space hyperplane, so the class summary, ``auto`` and the relative unit mean
what they mean for any boundary.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from utils.core.batching import batch_slices
from utils.core.boundary import Boundary, BoundaryFit, attribute_rows, hyperplane_distances
from utils.core.discovery import ORTHONORMAL_TOLERANCE, fit_within
from utils.core.gram import FitError
from utils.errors import UserError
from utils.io.boundary_files import current_file, load_boundary, scan_boundaries, select

#: Latent rows read at a time to take their coordinates (memory: this many rows of D float32).
COORDINATE_CHUNK = 256


def is_discovered_name(name: str, prefix: str) -> bool:
    """Whether ``name`` is one a discovery with ``prefix`` writes (case-insensitive)."""
    return re.fullmatch(rf"{re.escape(prefix)}_\d+", name, flags=re.IGNORECASE) is not None


def within_basis(folder: Path, config_name: str, shapes: Mapping[str, tuple[int, ...]], t_0: int, space: str,
                 checkpoint_sha256: str = "", prefix: str | None = None) -> tuple[np.ndarray, list[Path]]:
    """The basis (r, D) float64 of ``space`` that the directions in ``folder`` span at ``t_0``, and
    their files (one per name, the current one, in name order): those named ``<prefix>_NN`` when
    the folder holds any (``prefix`` None: every file). UserError when there is none, or when they
    are not orthonormal (naming the worst pair)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--within {folder}: not a folder; write directions there with --discover --boundary_dir "
                        f"{folder}")
    hits = select(scan_boundaries(folder, dict(shapes)), config_name, t_0=t_0,
                  checkpoint_sha256=checkpoint_sha256 or None).get(space, [])
    by_name: dict[str, list[Path]] = {}
    for path, record in hits:
        by_name.setdefault(record.attribute.lower(), []).append(path)
    directions = {n: paths for n, paths in by_name.items() if prefix and is_discovered_name(n, prefix)}
    by_name = directions or by_name
    if not by_name:
        raise UserError(f"--within {folder} holds no {space} direction for config {config_name} at t_0 {t_0}; write "
                        f"them with --discover --t_0 {t_0} --boundary_dir {folder}")
    files = [current_file(paths) for _, paths in sorted(by_name.items())]
    records = [load_boundary(p, dict(shapes)) for p in files]
    V = np.stack([r.normal.astype(np.float64) for r in records])
    gram = V @ V.T - np.eye(len(V))
    worst = np.unravel_index(int(np.argmax(np.abs(gram))), gram.shape)
    if abs(gram[worst]) > ORTHONORMAL_TOLERANCE:
        a, b = records[worst[0]].attribute, records[worst[1]].attribute
        raise UserError(f"--within {folder}: the {space} directions are not orthonormal ({a} and {b}: "
                        f"cos {gram[worst] + (1 if worst[0] == worst[1] else 0):.3f}); --within takes the "
                        "directions of one --discover run (named --discover_prefix_NN)")
    return V, files


def coordinates(read: Callable[[int, int], np.ndarray], start: int, stop: int, basis: np.ndarray) -> np.ndarray:
    """c = X V^T (stop - start, r) float64 of latent rows [start, stop) read ``COORDINATE_CHUNK`` at a time."""
    parts = [np.asarray(read(start + s.start, start + s.stop), dtype=np.float64) @ basis.T
             for s in batch_slices(stop - start, COORDINATE_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, len(basis)))


def lift(inner: Boundary, basis: np.ndarray) -> Boundary:
    """The full-space hyperplane of a subspace SVM (as ``fit_within`` returns it): coef V^T w."""
    w_full = basis.T @ inner.coef.astype(np.float64)
    return Boundary(normal=(w_full / np.linalg.norm(w_full)).astype(np.float32), coef=w_full.astype(np.float32),
                    intercept=inner.intercept, train_acc=inner.train_acc, test_acc=inner.test_acc)


def fit_space_within(read: Callable[[int, int], np.ndarray], n_train: int, n_test: int, train_labels: np.ndarray,
                     test_labels: np.ndarray, basis: np.ndarray, C: float, balance: str, seed: int,
                     names: Sequence[str], space: str) -> list[BoundaryFit]:
    """One ``BoundaryFit`` per attribute, as ``fit_attributes`` returns them (the training rows an
    attribute uses, ``attribute_rows`` with 'equal' balance when asked, and the test rows labelled for
    it, with their signed distances), each the SVM of ``fit_within`` on the latents' coordinates in
    ``basis``. read(a, b): latent rows, training rows first ([0, n_train)), then the test rows;
    labels (n, A) in {-1, 0, 1}."""
    train_c = coordinates(read, 0, n_train, basis)
    test_c = coordinates(read, n_train, n_train + n_test, basis)
    identity = np.eye(len(basis))
    fits = []
    for a, name in enumerate(names):
        rows = attribute_rows(train_labels[:, a], "equal" if balance == "equal" else "none", seed)
        y = (train_labels[rows, a] > 0).astype(np.int64)
        if y.min(initial=1) == y.max(initial=0):
            raise UserError(f"'{name}': the training split holds one class only; --within needs both")
        test_rows = np.flatnonzero(test_labels[:, a] != 0) if n_test else np.zeros(0, dtype=np.int64)
        y_test = (test_labels[test_rows, a] > 0).astype(np.int64)
        try:
            inner = fit_within(train_c[rows], y, identity, test_c[test_rows] if len(test_rows) else None,
                               y_test if len(test_rows) else None, C=C)
        except FitError as exc:
            raise UserError(f"the {space} boundary of '{name}' cannot be fitted in the subspace at --svm_c {C:g}: "
                            f"{exc}") from None
        if not np.isfinite(np.linalg.norm(inner.coef)) or not np.linalg.norm(inner.coef) > 0:
            raise UserError(f"'{name}': the SVM in the subspace found no separating direction (zero normal)")
        fits.append(BoundaryFit(lift(inner, basis), hyperplane_distances(train_c[rows], inner),
                                hyperplane_distances(test_c[test_rows], inner) if len(test_rows) else np.zeros(0),
                                rows, test_rows))
    return fits
