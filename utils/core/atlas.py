"""How the attributes of one model entangle: the cosines between their boundaries' unit normals,
the phi correlation of their labels, and which attributes to hold fixed when editing one.

Arrays in, arrays out; the atlas file is utils/io/atlas.py. Two boundaries whose normals have a
large |cos| move together: an edit along one moves the other's projection by cos times the edit's
distance (docs/algorithm.md section 9), which is what holding the other (projecting it out) stops.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: |cos| between two attributes' normals, in z or in h, from which the other is suggested to hold.
#: An edit by d along one moves the other's projection by cos * d: at 0.3, a third of the edit. (For
#: comparison, unrelated directions in D dimensions have |cos| about 1/sqrt(D): 0.06 for the digits'
#: 256-value z, 0.002 for a 256-px model's.)
HOLD_THRESHOLD = 0.3


def cosine_matrix(normals: np.ndarray) -> np.ndarray:
    """normals (A, D), any scale -> (A, A) float64 cosines, each row rescaled to unit length in
    float64 first (so the diagonal is 1 to rounding)."""
    n = np.asarray(normals, dtype=np.float64).reshape(len(normals), -1)
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    return n @ n.T


def phi_matrix(labels: np.ndarray) -> np.ndarray:
    """The phi coefficients (Pearson's correlation of two binary labels) of every pair of
    attributes: labels (N, A) in {-1, 0, 1} (0: not labelled) -> (A, A) float64, each pair over the
    rows labelled for both; nan where fewer than 2 such rows or one label is constant on them."""
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    n_attr = y.shape[1]
    phi = np.full((n_attr, n_attr), np.nan)
    for a in range(n_attr):
        for b in range(a, n_attr):
            both = (y[:, a] != 0) & (y[:, b] != 0)
            u, v = y[both, a], y[both, b]
            if both.sum() < 2 or u.std() == 0 or v.std() == 0:
                continue
            phi[a, b] = phi[b, a] = float(np.mean((u - u.mean()) * (v - v.mean())) / (u.std() * v.std()))
    return phi


def holds(cosines: dict[str, np.ndarray], names: Sequence[str], threshold: float = HOLD_THRESHOLD
          ) -> dict[str, list[str]]:
    """For each attribute, the others whose |cos| with it reaches ``threshold`` in any space, by
    decreasing largest |cos|. cosines: {space: (A, A)} in the order of ``names``."""
    largest = np.max([np.abs(np.asarray(c, dtype=np.float64)) for c in cosines.values()], axis=0)
    out = {}
    for a, name in enumerate(names):
        others = [b for b in np.argsort(-largest[a], kind="stable") if b != a and largest[a, b] >= threshold]
        out[name] = [names[b] for b in others]
    return out
