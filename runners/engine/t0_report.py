"""Which t_0: for one attribute with labels (or one discovered direction), how readable and how
editable it is at each candidate timestep, and the t_0 the rule below recommends.

    report = t0_report(model, candidates=[100, 200, 300, 400], attribute=labelled, n_inv_step=20)
    report["recommended"]["t_0"], report["rows"][i]["test_acc"]["z"], report["rows"][i]["linearity"]

Per candidate t (a grid like the radius analysis's, every ``--radius_step``):

- **accuracy**: the images are inverted to t (an ``Editor`` at t, so through the latent cache), a
  linear SVM is fitted on the training images' z and on their h (``fit_boundary``, C as the
  search's) and scored on the held-out images: can the attribute still be read linearly at t?
- **linearity**: ``edit_linearity`` of the z normal (the fitted one; for a direction, the file's)
  at each of a few inverted images, averaged: cos(x0_hat(z + l n) - x0_hat(z), l J n), with l the
  distance between the two class medians along n at t (for a direction, between the medians of
  the lower and upper halves of the projections, the relative unit's -1 and +1 of ``--discover``):
  the size of an edit that takes an image from one class to the other. 1: the denoiser responds to
  the whole edit as its first-order model predicts, so the edit's effect is smooth and predictable;
  well below 1: the move leaves the region where J describes it (the edit is a jump, not a slide).

**The rule** (``recommend_t0``): among the candidates whose accuracy is within ``tolerance`` of
the best and whose linearity is at least ``MIN_LINEARITY`` (0.9), the largest. The accuracy of a t
is the mean of its z and h test accuracies; the tolerance is one standard error of the best
accuracy on the held-out images, sqrt(a (1 - a) / n) (the one-standard-error rule of model
selection: candidates closer than that to the best are not told apart by the test set), and at
least one point and one held-out image. Why the largest: the attribute is as readable there as
anywhere and the edit still behaves linearly, and a larger t_0 leaves the denoiser more steps to
turn the move into a change of content rather than of texture (the reason the method edits at a
mixing step at all). When no accurate candidate is linear enough, the accurate one with the highest
linearity; without labels (a direction) the largest t whose linearity reaches 0.9, else the most
linear. The rule fired is recorded. Given the radius analysis's mixing step t_m, the report says
where t_0 lies from it: t_m is where inverted latents have the radius of sampled ones (a property
of the whole latent distribution, the same for every attribute); the recommended t_0 is
attribute-specific.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from models.loading import LoadedModel
from runners.engine.discover import median_split
from runners.engine.editor import Editor, ImageReader, differentiable_net
from utils.core.boundary import class_summary, fit_boundary, hyperplane_distances
from utils.core.discovery import edit_linearity
from utils.core.gram import FitError
from utils.core.spaces import SPACES
from utils.errors import UserError
from utils.io.boundary_files import load_boundary
from utils.io.datasets import labelled_set

log = logging.getLogger(__name__)

#: The least linearity a recommended t_0 has (``edit_linearity``'s cosine).
MIN_LINEARITY = 0.9
#: The accuracy a recommended t_0 may give up against the best candidate's (one point).
ACCURACY_TOLERANCE = 0.01


@dataclass(frozen=True)
class Labelled:
    """An attribute's labelled images: ``paths`` and ``labels`` (N,) in {0, 1}, split into
    ``train`` and ``test`` indices."""
    name: str
    paths: tuple[Path, ...]
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray


def balanced_split(labels: np.ndarray, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train and test indices, each half positive and half negative as far as the classes
    allow (the other class fills the rest), one image of each class kept for the test; so that a
    rare attribute still has both classes in a small set. UserError with fewer than 2 of a class."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    pos, neg = rng.permutation(np.flatnonzero(labels == 1)), rng.permutation(np.flatnonzero(labels == 0))
    if min(len(pos), len(neg)) < 2:
        raise UserError(f"the labelled set holds {len(pos)} positive and {len(neg)} negative images; the t_0 report "
                        "needs at least 2 of each")
    train_pos = min(-(-n_train // 2), len(pos) - 1)
    train_neg = min(n_train - train_pos, len(neg) - 1)
    test_pos = min(-(-n_test // 2), len(pos) - train_pos)
    test_neg = min(n_test - test_pos, len(neg) - train_neg)
    train = np.concatenate([pos[:train_pos], neg[:train_neg]])
    test = np.concatenate([pos[train_pos:train_pos + test_pos], neg[train_neg:train_neg + test_neg]])
    return np.sort(train), np.sort(test)


def _flat(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().reshape(len(x), -1).numpy()


def _median_gap(distances: np.ndarray, labels: np.ndarray) -> float:
    """The distance between the two classes' medians along a normal."""
    summary = class_summary(distances, labels)
    return float(summary["pos"]["p50"] - summary["neg"]["p50"])


def _linearity(net, z: torch.Tensor, t: int, alphas_cumprod: torch.Tensor, normal: np.ndarray, step: float,
               device) -> tuple[float, float]:
    """Mean and standard deviation of ``edit_linearity`` over the latents z (n, ...)."""
    if not (math.isfinite(step) and step != 0):
        return float("nan"), float("nan")
    direction = torch.from_numpy(np.asarray(normal, dtype=np.float64)).to(device)  # beside x_t (any device)
    values = [edit_linearity(net, z[i:i + 1].to(device=device, dtype=torch.float32), t, alphas_cumprod, direction,
                             step) for i in range(len(z))]
    return float(np.mean(values)), float(np.std(values))


def _sources(model: LoadedModel, labelled: Labelled | None, direction: Path | None, images: Sequence[Path],
             n_linearity: int) -> tuple[list[Path], slice, np.ndarray | None]:
    """The images a t_0 report inverts, the rows its linearity is measured on, and the fixed
    direction (a z boundary file's normal) when it measures one instead of fitting SVMs."""
    if labelled is not None:
        order = np.concatenate([labelled.train, labelled.test])
        shown = slice(len(labelled.train), len(labelled.train) + min(n_linearity, len(labelled.test)))
        return [labelled.paths[i] for i in order], shown, None
    if len(images) < 2:
        raise UserError("the t_0 report of a direction needs at least 2 images")
    record = load_boundary(direction, dict(model.shapes))
    if record.space != "z":
        raise UserError(f"{direction} is a boundary of {record.space}; linearity is measured in z: give the z file")
    return list(images), slice(0, min(n_linearity, len(images))), record.normal.astype(np.float64)


def _labelled_row(row: dict, latents, labelled: Labelled, svm_c: float, t: int) -> tuple[np.ndarray, float] | None:
    """Fit the SVMs of one t (their accuracies into ``row``); the z normal and the edit's step, or
    None when z has no SVM."""
    n_train = len(labelled.train)
    y = labelled.labels[np.concatenate([labelled.train, labelled.test])]
    row["train_acc"], row["test_acc"], fitted = {}, {}, {}
    for space in SPACES:
        x = _flat(getattr(latents, space))
        try:
            fitted[space] = fit_boundary(x[:n_train], y[:n_train], x[n_train:], y[n_train:], C=svm_c)
        except (FitError, UserError, ValueError) as exc:
            log.warning("t %d, %s: no SVM (%s)", t, space, exc)
            fitted[space] = None
        row["train_acc"][space] = None if fitted[space] is None else fitted[space].train_acc
        row["test_acc"][space] = None if fitted[space] is None else fitted[space].test_acc
    if fitted["z"] is None:
        return None
    normal = fitted["z"].normal.astype(np.float64)
    return normal, _median_gap(hyperplane_distances(_flat(latents.z)[:n_train], fitted["z"]), y[:n_train])


def t0_rows(model: LoadedModel, candidates: Sequence[int], n_inv_step: int, *, labelled: Labelled | None = None,
            direction: Path | None = None, images: Sequence[Path] = (), n_linearity: int = 4, svm_c: float = 1.0,
            batch_size: int = 8, cache_root: Path | None = None, show_progress: bool = False) -> list[dict]:
    """The measurements of each candidate t (ascending): {"t", "n_inv_step", "test_acc" {z, h} and
    "train_acc" {z, h} (labels only), "linearity", "linearity_std", "step"}. With ``labelled``: its
    images, the SVMs fitted on its train split, linearity on the first ``n_linearity`` test images.
    With ``direction`` (a z boundary file, e.g. a discovered one) instead: linearity of that
    direction on the first ``n_linearity`` of ``images`` (at least 2). The inversion grid at t has
    min(n_inv_step, t + 1) points."""
    if (labelled is None) == (direction is None):
        raise ValueError("give labelled images or a direction, not both")
    paths, shown, fixed = _sources(model, labelled, direction, images, n_linearity)
    reader = ImageReader.for_config(model.config, align_face=False)
    images_t = torch.stack([reader.read(p) for p in paths])
    net, T, rows = differentiable_net(model), model.config.diffusion.num_diffusion_timesteps, []
    for t in sorted({int(t) for t in candidates if 1 <= int(t) <= model.config.diffusion.num_diffusion_timesteps - 1}):
        steps = min(n_inv_step, t + 1)
        latents, _ = Editor(model, t, steps, cache_root, show_progress).invert(images_t, batch_size,
                                                                                desc=f"inverting to t {t}")
        row = {"t": t, "n_inv_step": steps}
        if labelled is not None:
            found = _labelled_row(row, latents, labelled, svm_c, t)
            if found is None:
                rows.append({**row, "linearity": None, "linearity_std": None, "step": None})
                continue
            normal, step = found
        else:
            normal, projections = fixed, _flat(latents.z) @ fixed
            step = _median_gap(projections, median_split(projections))
        mean, std = _linearity(net, latents.z[shown], t, model.alphas_cumprod, normal, abs(step), model.device)
        rows.append({**row, "linearity": mean, "linearity_std": std, "step": abs(step)})
    if not rows:
        raise UserError(f"no candidate timestep in [1, {T - 1}]")
    return rows


def _accuracy(row: dict) -> float | None:
    """A row's accuracy: the mean of its z and h test accuracies (those there are)."""
    values = [v for v in (row.get("test_acc") or {}).values() if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def accuracy_tolerance(best: float | None, n_test: int | None) -> float:
    """How far below the best accuracy a candidate still counts as accurate: one standard error of
    ``best`` on ``n_test`` held-out images, sqrt(a (1 - a) / n), and at least one point
    (``ACCURACY_TOLERANCE``) and one image (1 / n); one point without a test set."""
    if not n_test:
        return ACCURACY_TOLERANCE
    standard_error = math.sqrt(best * (1 - best) / n_test) if best is not None else 0.0
    return max(ACCURACY_TOLERANCE, 1.0 / n_test, standard_error)


def _measured_linearity(row: dict) -> float:
    """A row's linearity for ranking: -2 (below any cosine) where it was not measured or is NaN
    (a zero or non-finite step), which ``max`` would otherwise never pass over."""
    value = row.get("linearity")
    return value if value is not None and math.isfinite(value) else -2.0


def recommend_t0(rows: Sequence[dict], n_test: int | None = None, t_m: int | None = None,
                 min_linearity: float = MIN_LINEARITY) -> dict:
    """The t_0 the rule of the module docstring picks from ``t0_rows``: {"t_0", "rule", "tolerance",
    "best_accuracy", "min_linearity", "t_m", "versus_t_m"}. n_test: held-out images (the tolerance:
    ``accuracy_tolerance``); t_m: the radius analysis's mixing step, or None."""
    linear = [r for r in rows if r.get("linearity") is not None and r["linearity"] >= min_linearity]
    accuracies = {r["t"]: _accuracy(r) for r in rows}
    labelled = any(a is not None for a in accuracies.values())
    best = max((a for a in accuracies.values() if a is not None), default=None)
    tolerance = accuracy_tolerance(best, n_test)
    if labelled:
        accurate = [r for r in rows if accuracies[r["t"]] is not None and accuracies[r["t"]] >= best - tolerance]
        both = [r for r in accurate if r in linear]
        if both:
            pick, rule = max(both, key=lambda r: r["t"]), (f"largest t with accuracy within {tolerance:.3f} of the best "
                                                           f"and linearity >= {min_linearity}")
        else:
            pick = max(accurate, key=lambda r: (_measured_linearity(r), r["t"]))
            rule = f"no accurate t reaches linearity {min_linearity}: the accurate t with the highest linearity"
    elif linear:
        pick, rule = max(linear, key=lambda r: r["t"]), f"largest t with linearity >= {min_linearity} (no labels)"
    else:
        pick = max(rows, key=lambda r: (_measured_linearity(r), r["t"]))
        rule = f"no t reaches linearity {min_linearity}: the most linear t (no labels)"
    t_0 = pick["t"]
    versus = None
    if t_m is not None:
        relation = "below" if t_0 < t_m else "above" if t_0 > t_m else "at"
        versus = (f"t_0 {t_0} is {relation} the mixing step t_m {t_m}"
                  + (f" ({t_0 - t_m:+d})" if t_0 != t_m else ""))
    return {"t_0": t_0, "rule": rule, "tolerance": tolerance, "best_accuracy": best, "min_linearity": min_linearity,
            "t_m": t_m, "versus_t_m": versus}


def t0_report(model: LoadedModel, candidates: Sequence[int], n_inv_step: int, *, labelled: Labelled | None = None,
              direction: Path | None = None, images: Sequence[Path] = (), t_m: int | None = None, **options) -> dict:
    """``t0_rows`` and ``recommend_t0`` together: {"attribute", "rows", "recommended", "table"}
    (``table``: the rows as CSV text)."""
    rows = t0_rows(model, candidates, n_inv_step, labelled=labelled, direction=direction, images=images, **options)
    recommended = recommend_t0(rows, len(labelled.test) if labelled is not None else None, t_m)
    return {"attribute": labelled.name if labelled is not None else str(direction), "rows": rows,
            "recommended": recommended, "table": t0_table(rows)}


def t0_table(rows: Sequence[dict]) -> str:
    """The rows as CSV: t, n_inv_step, test_acc_z, test_acc_h, linearity, linearity_std, step."""
    def text(v):
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"
    lines = ["t,n_inv_step,test_acc_z,test_acc_h,linearity,linearity_std,step"]
    for r in rows:
        acc = r.get("test_acc") or {}
        lines.append(",".join([str(r["t"]), str(r["n_inv_step"]), text(acc.get("z")), text(acc.get("h")),
                               text(r.get("linearity")), text(r.get("linearity_std")), text(r.get("step"))]))
    return "\n".join(lines)


def labelled_for_report(attribute: str, data_dir: Path, attr_file: Path, n_train: int, n_test: int, seed: int
                        ) -> Labelled:
    """The attribute's labelled images from a CelebA-format attribute file, split by ``balanced_split``."""
    data, name = labelled_set(attribute, data_dir, attr_file)
    train, test = balanced_split(data.labels, n_train, n_test, seed)
    return Labelled(name, tuple(data.paths), np.asarray(data.labels), train, test)
