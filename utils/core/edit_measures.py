"""How well a multi-attribute edit does what it was asked, from attributes measured on its pixels
(``utils.core.morphometry``): target gain, leak into another attribute, additivity, class kept.

Arrays in, arrays out; every per-image measure returns one value per image so that its spread over
the images can be reported (``spread``). NaN marks an image on which a measure is undefined (say, a
sweep that did not change the moved attribute at all); ``spread`` counts those apart.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def spread(values: np.ndarray) -> dict[str, float | int]:
    """Summary of per-image values (N,): mean, sd (population), quartiles, over the finite ones;
    ``n`` of them and ``undefined`` (the NaN count). All NaN: the statistics are NaN."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        stats = dict.fromkeys(("mean", "sd", "q25", "median", "q75"), float("nan"))
    else:
        q25, median, q75 = np.quantile(finite, [0.25, 0.5, 0.75])
        stats = {"mean": float(finite.mean()), "sd": float(finite.std()), "q25": float(q25),
                 "median": float(median), "q75": float(q75)}
    return {**stats, "n": int(finite.size), "undefined": int(values.size - finite.size)}


def target_gain(measured: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per image, Spearman's rank correlation between a measured attribute and an edit target.

    measured: (N, P), the attribute measured on each image's P edits; targets: (P,), the target the
    edits were given for that attribute (ties allowed: on a 2-D grid each value appears once per
    level of the other attribute). Ranks are averaged over ties. Returns (N,) in [-1, 1]; NaN for an
    image whose P measurements are all equal (no rank order), and ValueError when the targets are.
    """
    measured = np.asarray(measured, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if measured.ndim != 2 or targets.shape != (measured.shape[1],):
        raise ValueError(f"need measured (N, P) and targets (P,), got {measured.shape} and {targets.shape}")
    t = rankdata(targets)
    t = t - t.mean()
    if not np.any(t):
        raise ValueError("the targets are all equal: no gain to measure")
    m = rankdata(measured, axis=1)
    m = m - m.mean(axis=1, keepdims=True)
    norm = np.sqrt((m * m).sum(axis=1) * (t * t).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (m @ t) / np.where(norm > 0, norm, 1.0), np.nan)


def leak_terms(moved: np.ndarray, other: np.ndarray, sigma_moved: float,
               sigma_other: float) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator of the leak from a moved attribute into another, per image.

    moved, other: (N, R, K): both attributes measured on R sweeps of K edits per image, each sweep
    changing only the moved attribute's target (the other's target is fixed within a sweep, or
    free for a single-attribute edit). Each sweep's change is the absolute deviation from its own
    mean, in units of the attribute's spread over images (StyleSpace's "attribute dependency",
    Wu et al. 2021, with measured attributes):

        numerator_i = sum_{r,k} |other_irk - mean_k other_irk| / sigma_other
        denominator_i = sum_{r,k} |moved_irk - mean_k moved_irk| / sigma_moved

    Returns ((N,), (N,)). The per-image leak is numerator / denominator (``leak``); the pooled
    leak over images is sum(numerator) / sum(denominator).
    """
    moved, other = np.asarray(moved, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if moved.ndim != 3 or moved.shape != other.shape:
        raise ValueError(f"need moved and other of one shape (N, R, K), got {moved.shape} and {other.shape}")
    if not (sigma_moved > 0 and sigma_other > 0):
        raise ValueError(f"the attributes' spreads must be positive, got {sigma_moved} and {sigma_other}")

    def change(a: np.ndarray, sigma: float) -> np.ndarray:
        return np.abs(a - a.mean(axis=2, keepdims=True)).sum(axis=(1, 2)) / sigma

    return change(other, sigma_other), change(moved, sigma_moved)


def leak(moved: np.ndarray, other: np.ndarray, sigma_moved: float, sigma_other: float) -> np.ndarray:
    """Per image, the other attribute's change per unit of the moved one's (``leak_terms``): (N,),
    0 when the other did not change, NaN when the moved attribute did not change."""
    numerator, denominator = leak_terms(moved, other, sigma_moved, sigma_other)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def pooled_leak(moved: np.ndarray, other: np.ndarray, sigma_moved: float, sigma_other: float) -> float:
    """The leak over all images at once: sum of ``leak_terms``' numerators / sum of denominators."""
    numerator, denominator = leak_terms(moved, other, sigma_moved, sigma_other)
    total = denominator.sum()
    return float(numerator.sum() / total) if total > 0 else float("nan")


def additivity_error(reference: np.ndarray, edit_a: np.ndarray, edit_b: np.ndarray,
                     edit_ab: np.ndarray) -> dict[str, np.ndarray]:
    """How far an edit's pixel change f is from additive: e = f(a + b) - f(a) - f(b), per image.

    reference, edit_a, edit_b, edit_ab: (N, ...) images (any pixel scale; the digits use [0, 1]):
    the unedited reconstruction and the edits by a, by b and by both, so f(x) = edit_x - reference
    and e = edit_ab - edit_a - edit_b + reference. Returns {"mean_abs": (N,) mean |e| per pixel, in
    the images' units; "relative": (N,) ||e|| / (||f(a)|| + ||f(b)||) (L2 norms; NaN when neither
    edit changed a pixel)}.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (reference, edit_a, edit_b, edit_ab)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim < 2:
        raise ValueError(f"need four (N, ...) arrays of one shape, got {[a.shape for a in arrays]}")
    ref, a, b, ab = (x.reshape(len(x), -1) for x in arrays)
    error = ab - a - b + ref
    scale = np.linalg.norm(a - ref, axis=1) + np.linalg.norm(b - ref, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(scale > 0, np.linalg.norm(error, axis=1) / np.where(scale > 0, scale, 1.0), np.nan)
    return {"mean_abs": np.abs(error).mean(axis=1), "relative": relative}


def class_kept(predicted: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per image, the share of its edits classified as its true class.

    predicted: (N, K) classes of each image's K edits; classes: (N,) the true ones. Returns (N,)."""
    predicted, classes = np.asarray(predicted), np.asarray(classes)
    if predicted.ndim != 2 or classes.shape != (predicted.shape[0],):
        raise ValueError(f"need predicted (N, K) and classes (N,), got {predicted.shape} and {classes.shape}")
    return (predicted == classes[:, None]).mean(axis=1)
