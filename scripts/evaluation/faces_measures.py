"""The measures of the faces evaluation (``scripts/evaluation/faces.py``), on arrays of factors
measured by the factor predictor (``utils.faces.predictor``): arrays in, numbers out, no model.

Notation: F measured factors in the order of ``PREDICTED_NAMES`` (16 continuous factors in their own
units, 4 binary ones as P(present)); A = 13 CelebA attributes in the order of ``ATTRIBUTES``, whose
scores (``attribute_scores``) are positive on the attribute's positive side and negative on its
negative side (0 is the class threshold). Shares are in [0, 1]; NaN where nothing was counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from utils.core.edit_measures import leak, pooled_leak, spread
from utils.faces.factors import ATTRIBUTES, attribute_scores
from utils.faces.predictor import PREDICTED_NAMES

#: The factors an edit of a face attribute should leave alone, and whose change is checked against
#: the predictor's own error (``kept``): background colour, position, size and skin tone.
NUISANCE_KEPT = ("bg_r", "bg_g", "bg_b", "pos_x", "pos_y", "scale", "skin_tone")
#: A pixel changed when its 8-bit value moved by more than this many levels (issue 31's 2/255) ...
PIXEL_LEVELS = 2
#: ... and a face's background is kept when under this share of its pixels changed (its 1 %).
BACKGROUND_KEPT_SHARE = 0.01
#: The background's pixels within this many pixels of the head are not counted (a region's feather).
BACKGROUND_FEATHER = 2.0


def canonical(attribute: str) -> str:
    """The ``ATTRIBUTES`` name of ``attribute`` in any case (boundary files keep the case they were
    fitted with); ValueError for a name the predictor cannot score."""
    for name in ATTRIBUTES:
        if name.lower() == str(attribute).lower():
            return name
    raise ValueError(f"the factor predictor cannot score {attribute!r}")


def share(mask: np.ndarray) -> float:
    """The share of True in a boolean array; NaN for an empty one."""
    mask = np.asarray(mask, dtype=bool)
    return float(mask.mean()) if mask.size else float("nan")


# --------------------------------------------------------------------------------- attributes and factors

def score_factors(factors: np.ndarray, names: Sequence[str] = PREDICTED_NAMES, step: float = 1e-3
                  ) -> dict[str, tuple[str, ...]]:
    """Which factors each attribute's score reads, found from ``attribute_scores`` itself: a factor
    belongs to an attribute when moving it by ``step`` changes that attribute's score on any of the
    faces ``factors`` (N, len(names)) (real faces: every branch of a min() is taken somewhere).
    Returns {attribute: factor names, in ``names`` order}."""
    factors = np.asarray(factors, dtype=np.float64)
    base = attribute_scores(factors, tuple(names))
    reads: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    for j, name in enumerate(names):
        moved = factors.copy()
        moved[:, j] += step
        changed = np.any(np.abs(attribute_scores(moved, tuple(names)) - base) > step / 100, axis=0)
        for a in np.flatnonzero(changed):
            reads[ATTRIBUTES[a]].append(name)
    return {a: tuple(v) for a, v in reads.items()}


def rmse(measured: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Root mean squared error per column: (N, K), (N, K) -> (K,) float64."""
    measured, truth = np.asarray(measured, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if measured.shape != truth.shape or measured.ndim != 2:
        raise ValueError(f"need two (N, K) arrays of one shape, got {measured.shape} and {truth.shape}")
    return np.sqrt(((measured - truth) ** 2).mean(axis=0))


def attribute_frequencies(scores: np.ndarray) -> np.ndarray:
    """The share of faces on each attribute's positive side: scores (N, A) -> (A,) (score > 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    return (scores > 0).mean(axis=0) if len(scores) else np.full(scores.shape[1], np.nan)


def frequency_table(sample_scores: np.ndarray, test_scores: np.ndarray,
                    attributes: Sequence[str] = ATTRIBUTES) -> dict[str, dict[str, float]]:
    """Per attribute, its frequency among samples and test faces (shares) and the difference
    samples - test in percentage points."""
    ours, theirs = attribute_frequencies(sample_scores), attribute_frequencies(test_scores)
    return {a: {"samples": float(s), "test": float(t), "difference_points": float(100 * (s - t))}
            for a, s, t in zip(attributes, ours, theirs)}


# --------------------------------------------------------------------------------- Fréchet distance

def frechet_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b):
    ||mu_a - mu_b||^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a^1/2 cov_b cov_a^1/2)^1/2).

    The last trace equals tr((cov_a cov_b)^1/2) and is computed from symmetric eigenvalues (clipped
    at 0), so singular covariances (fewer images than features) give a real, finite value."""
    mu_a, mu_b = np.asarray(mu_a, dtype=np.float64), np.asarray(mu_b, dtype=np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    values, vectors = np.linalg.eigh((cov_a + cov_a.T) / 2)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians fitted to two sets of features (N_a, D), (N_b, D):
    sample means and covariances (ddof 1), ``frechet_from_moments``."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N, D) feature sets with N >= 2 and one D, got {a.shape} and {b.shape}")
    return frechet_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------------- success, leak, kept

def success_masks(side: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    """Whether each edit did what it was asked. side (n,): the face's side before the edit (-1 or
    +1; the edit aims at the other side); before, after (n,): the attribute's score on the unedited
    reconstruction and on the edit.

    moved: the score changed toward the other side ((after - before) * side < 0); crossed: the edit
    ends on the other side of the threshold (after * side < 0); success: both; already_across: the
    reconstruction was already on the other side (the inversion, not the edit, crossed)."""
    side, before, after = (np.asarray(v, dtype=np.float64) for v in (side, before, after))
    moved = (after - before) * side < 0
    crossed = after * side < 0
    return {"moved": moved, "crossed": crossed, "success": moved & crossed, "already_across": before * side < 0}


def leak_per_factor(reference: np.ndarray, edited: np.ndarray, target: int, factor_sd: np.ndarray,
                    target_sd: float, names: Sequence[str] = PREDICTED_NAMES,
                    skip: Sequence[str] = ()) -> dict[str, dict]:
    """The change of every factor per unit of change of the target's score, both in units of their
    spread over the test faces (``utils.core.edit_measures.leak``, StyleSpace's attribute
    dependency): for factor f over the n edits,

        pooled = sum_i |delta f_i| / sd_f  /  sum_i |delta s_i| / sd_s,

    and per edit the same ratio (its median and quartiles, ``spread``; undefined where the score
    did not change). reference, edited: (n, F) measured factors of the reconstructions and of the
    edits; target: the attribute's index in ``ATTRIBUTES``; factor_sd (F,), target_sd: the spreads.
    Also ``mean_change``: the mean signed change of f in its own units. ``skip``: factors left out
    (the target's own). Returns {factor: {"pooled", "median", "q25", "q75", "mean_change"}}."""
    reference, edited = np.asarray(reference, dtype=np.float64), np.asarray(edited, dtype=np.float64)
    scores = [attribute_scores(m, tuple(names))[:, target] for m in (reference, edited)]
    moved = np.stack(scores, axis=1)[:, None, :]  # (n, 1, 2): one sweep of two points per edit
    out = {}
    for j, name in enumerate(names):
        if name in skip:
            continue
        other = np.stack([reference[:, j], edited[:, j]], axis=1)[:, None, :]
        if len(reference) == 0 or not target_sd > 0 or not factor_sd[j] > 0:
            out[name] = {"pooled": float("nan"), "median": float("nan"), "q25": float("nan"),
                         "q75": float("nan"), "mean_change": float("nan")}
            continue
        per_edit = spread(leak(moved, other, target_sd, float(factor_sd[j])))
        out[name] = {"pooled": pooled_leak(moved, other, target_sd, float(factor_sd[j])),
                     "median": per_edit["median"], "q25": per_edit["q25"], "q75": per_edit["q75"],
                     "mean_change": float((edited[:, j] - reference[:, j]).mean())}
    return out


def kept(reference: np.ndarray, edited: np.ndarray, thresholds: np.ndarray, factors: Sequence[str],
         names: Sequence[str] = PREDICTED_NAMES) -> tuple[np.ndarray, dict[str, float]]:
    """Whether each edit kept the named ``factors``: |edited - reference| below the factor's
    threshold (``thresholds`` (F,), e.g. 3 x the predictor's RMSE on it). reference, edited (n, F).
    Returns ((n,) bool: every factor kept, {factor: share of edits keeping it})."""
    reference, edited = np.asarray(reference, dtype=np.float64), np.asarray(edited, dtype=np.float64)
    columns = [list(names).index(f) for f in factors]
    within = np.abs(edited[:, columns] - reference[:, columns]) < np.asarray(thresholds)[columns]
    return within.all(axis=1), {f: share(within[:, i]) for i, f in enumerate(factors)}


def quantised(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> 8-bit levels, as the edits are written."""
    return np.rint((x.clamp(-1, 1).numpy() + 1) * 127.5).astype(np.int16)


def outside_changed(edit: torch.Tensor, recon: torch.Tensor, kept: np.ndarray) -> float:
    """The share of kept pixels (``kept`` (H, W) bool) whose 8-bit value changed by more than
    ``PIXEL_LEVELS`` levels in any channel; edit, recon: (C, H, W)."""
    moved = (np.abs(quantised(edit) - quantised(recon)) > PIXEL_LEVELS).any(axis=0)
    return float(moved[kept].mean()) if kept.any() else 0.0


def kept_pixels(mask: np.ndarray, feather: float) -> np.ndarray:
    """The pixels beyond the feather: at least ``feather`` from every pixel the mask touches."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~(mask > 0)) >= max(feather, 1e-9)


def background_changed(edits: torch.Tensor, references: torch.Tensor, background: np.ndarray,
                       feather: float = BACKGROUND_FEATHER) -> np.ndarray:
    """(n,) per face, the share of its background's pixels whose 8-bit value an edit changed
    (``outside_changed``), counting only the pixels at least ``feather`` from the head, since a
    region that touches the background (the hair) blends into it over its feather. edits,
    references (n, C, H, W) in [-1, 1]; background (n, H, W): the faces' background coverage.

    Read off the pixels, with no instrument: the renderer paints the background one flat colour
    and lights the head only, so background pixels that stay put keep the background's colour and
    the head's outline, hence its position and size."""
    return np.array([outside_changed(e, r, kept_pixels(1.0 - b, feather))
                     for e, r, b in zip(edits, references, np.asarray(background))])


def moved_beyond_noise(side: np.ndarray, before: np.ndarray, after: np.ndarray, noise: float) -> np.ndarray:
    """(n,) bool: the score moved toward the other side by more than ``noise`` (e.g. 3 x the
    predictor's RMSE on that score): an edit that moves the attribute, whether or not it crosses."""
    side, before, after = (np.asarray(v, dtype=np.float64) for v in (side, before, after))
    return (before - after) * side > noise


# --------------------------------------------------------------------------------- one attribute's edits

@dataclass(frozen=True)
class Sweep:
    """One attribute's edits of n faces, as measured: ``side`` (n,) the side of each original face
    (-1 / +1, by the predictor), ``distances`` the K targets of the edit (v.n of its first space),
    ``reference`` (n, F) the measured reconstructions, ``edits`` (n, K, F) the measured edits,
    ``background_changed`` (n,) or None: the share of each face's background pixels that its edit
    at the end of the range changed (``background_changed``; None where the masks are unknown)."""
    attribute: str
    rows: np.ndarray
    side: np.ndarray
    distances: np.ndarray
    reference: np.ndarray
    edits: np.ndarray
    background_changed: np.ndarray | None = None

    def end(self) -> np.ndarray:
        """(n, F): each face's edit at the end of the range it is edited toward (``end_index``)."""
        return self.edits[np.arange(len(self.side)), self.end_index()] if len(self.side) else self.reference

    def end_index(self) -> np.ndarray:
        """(n,) which of the K edits each face is judged at: the largest target for a face on the
        negative side, the smallest for one on the positive side."""
        return np.where(self.side < 0, int(np.argmax(self.distances)), int(np.argmin(self.distances)))

    def subset(self, chosen: np.ndarray) -> "Sweep":
        return Sweep(self.attribute, self.rows[chosen], self.side[chosen], self.distances, self.reference[chosen],
                     self.edits[chosen], None if self.background_changed is None else self.background_changed[chosen])


@dataclass(frozen=True)
class Scale:
    """What the measures are relative to, all from the predictor on rendered test faces of known
    factors: each factor's spread (sd over the faces of its measurements) and error (RMSE against
    the truth), the same for each attribute's score, the factors each score reads (``score_factors``)
    and the multiple of the error below which a change counts as noise (``noise_multiple``)."""
    factor_sd: np.ndarray
    factor_rmse: np.ndarray
    score_sd: np.ndarray
    score_rmse: np.ndarray
    own: dict[str, tuple[str, ...]]
    noise_multiple: float = 3.0

    def nuisance(self, attribute: str) -> tuple[str, ...]:
        """The nuisance factors checked for an edit of ``attribute``: ``NUISANCE_KEPT`` but its own."""
        return tuple(f for f in NUISANCE_KEPT if f not in self.own.get(canonical(attribute), ()))


def pixel_measures(sweep: Sweep, group: np.ndarray, success: np.ndarray) -> dict:
    """The faces ``group``'s background read off the pixels: the share whose background was kept
    (under ``BACKGROUND_KEPT_SHARE`` of its pixels changed), and whose edit succeeded (``success``,
    the group's (m,) bool) with it kept; {} where the sweep has no pixel measure."""
    if sweep.background_changed is None:
        return {}
    background_kept = sweep.background_changed[group] < BACKGROUND_KEPT_SHARE
    return {"background_kept": share(background_kept), "success_and_background_kept": share(success & background_kept),
            "background_changed": spread(sweep.background_changed[group])}


DIRECTIONS = {"to_positive": -1, "to_negative": 1}  # direction -> the side of the faces edited that way


def _direction(sweep: Sweep, scale: Scale, group: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict:
    """The measures of the faces ``group`` (bool (n,)) of one sweep, all edited one way."""
    a = ATTRIBUTES.index(canonical(sweep.attribute))
    side, reference, end = sweep.side[group], sweep.reference[group], sweep.end()[group]
    masks = success_masks(side, before[group], after[group])
    all_kept, per_factor = kept(reference, end, scale.noise_multiple * scale.factor_rmse,
                                scale.nuisance(sweep.attribute))
    beyond = moved_beyond_noise(side, before[group], after[group], scale.noise_multiple * scale.score_rmse[a])
    scores = attribute_scores(sweep.edits[group].reshape(-1, sweep.edits.shape[-1]), PREDICTED_NAMES)[:, a]
    return {"n": int(group.sum()), **{k: share(v) for k, v in masks.items()}, "moved_beyond_noise": share(beyond),
            "kept": share(all_kept), "success_and_kept": share(masks["success"] & all_kept),
            **pixel_measures(sweep, group, masks["success"]),
            "kept_per_factor": per_factor,
            "score_change": spread(after[group] - before[group]),
            "score_change_in_sd": spread((after[group] - before[group]) / scale.score_sd[a]),
            "positive_per_distance": [share(v) for v in (scores.reshape(len(side), -1) > 0).T] if len(side) else [],
            "leak": leak_per_factor(reference, end, a, scale.factor_sd, float(scale.score_sd[a]),
                                    skip=scale.own.get(canonical(sweep.attribute), ()))}


def sweep_measures(sweep: Sweep, scale: Scale) -> dict:
    """Every measure of one attribute's sweep: per direction (``DIRECTIONS``) success, its parts,
    nuisance kept, leak and the share on the positive side at each distance; over both directions
    success, kept and success with the nuisance kept; per face the numbers they come from."""
    a = ATTRIBUTES.index(canonical(sweep.attribute))
    before = attribute_scores(sweep.reference, PREDICTED_NAMES)[:, a]
    after = attribute_scores(sweep.end(), PREDICTED_NAMES)[:, a]
    out = {name: _direction(sweep, scale, sweep.side == sign, before, after) for name, sign in DIRECTIONS.items()}
    masks = success_masks(sweep.side, before, after)
    all_kept, _ = kept(sweep.reference, sweep.end(), scale.noise_multiple * scale.factor_rmse,
                       scale.nuisance(sweep.attribute))
    noise = scale.noise_multiple * scale.score_rmse[a]
    beyond = moved_beyond_noise(sweep.side, before, after, noise)
    away = moved_beyond_noise(-sweep.side, before, after, noise)
    out["both"] = {"n": int(len(sweep.side)), "success": share(masks["success"]), "kept": share(all_kept),
                   "success_and_kept": share(masks["success"] & all_kept), "moved_beyond_noise": share(beyond),
                   **pixel_measures(sweep, np.ones(len(sweep.side), bool), masks["success"]),
                   "moved_away_beyond_noise": share(away), "n_toward": int(beyond.sum()), "n_away": int(away.sum()),
                   "score_change_toward_in_sd": spread((before - after) * sweep.side / scale.score_sd[a])}
    out["nuisance_checked"] = list(scale.nuisance(sweep.attribute))
    out["faces"] = {"rows": sweep.rows.tolist(), "side": sweep.side.tolist(), "score_reference": before.tolist(),
                    "score_end": after.tolist(), "success": masks["success"].tolist(), "kept": all_kept.tolist(),
                    **({} if sweep.background_changed is None else
                       {"background_changed": sweep.background_changed.tolist()})}
    return out
