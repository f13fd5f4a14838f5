"""Directions without labels (``--discover``): N images inverted to t_0 through the editor (and so
through the latent cache), the top r directions of each latent space found, and each written as a
boundary file that the edits, both units, ``auto``, the web app and the atlas take as they take a
supervised one; a contact sheet of every direction, its names after the supervised boundaries
already in the folder, and a summary.

    plan = plan_discover(job, config)                          # every check that needs no model
    summary = run_discover(editor, job, plan, index, folder, run_dir, summary)

How the directions are found (utils/core/discovery.py):

- **z**: per image the top right singular vectors of J = d x0_hat / d x_t at x_t = z, the inverted
  latent at t_0 (the moves of z the denoiser amplifies most; ``jacobian_subspace``, block power
  iteration with ``oversample`` extra vectors), then one basis for all images (``global_basis``,
  each image's vectors weighted by their singular values).
- **h**: the principal directions of the inverted h (``principal_directions``).
- **Pairs**: direction k of z and direction k of h share the name ``<prefix>_<k>`` (an edit of
  ``both`` moves them together), so the h direction given to z direction k is the principal
  direction whose projections correlate best with z direction k's over the N images (one-to-one,
  ``linear_sum_assignment`` on |Pearson r|), its sign chosen to make r positive; ``component``
  records which principal direction it is, ``z_h_correlation`` how well the two agree.
- **Signs**: a direction named after a supervised boundary (below) points toward it (positive
  cosine in z, else in h); otherwise its largest-magnitude z component is positive.

What a discovered file holds: the unit direction as ``normal`` and ``coef``, intercept 0, ``t_0``,
``n_inv_step``, config name, checkpoint SHA-256, ``space``, and a class summary built from the
projections v.x of the N inverted latents, split at their median: the lower half is the
'negative' class and the upper half the 'positive' one (the train split; the test split empty, and
the accuracies nan: there are no labels). So the relative unit puts -1 and +1 at the medians of the
two halves (about the 25th and 75th percentiles of the images' projections, -+0.67 standard
deviations for a normal spread) and 0 at the overall median, and ``auto`` spans from the lower
half's 5th to the upper half's 95th percentile (about the 2.5th and 97.5th of all images), scaled by
``AUTO_SCALE`` about its centre: as for a supervised boundary, the range where the images lie and
somewhat beyond. The contact sheet shows each direction from -``sheet_range`` to +``sheet_range``
in the relative unit (3: about -+2 standard deviations of the projections).

**Naming**: each direction is matched one to one with the current supervised boundaries of the
folder at this t_0 (``BoundaryIndex``; files named ``<prefix>_<number>``, earlier discoveries, are
left out) by |cos| (``match_directions``), in each space: "pc_03 ~ Smiling (cos 0.71 in z)".
On the synthetic faces ``factor_matches`` also names each direction after the factor its edit moves
most (the factor predictor, utils/faces; imported only when called).
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata
from torch import Tensor
from tqdm import tqdm

from runners.engine.boundaries import BoundaryIndex, stage_boundary_set
from runners.engine.describe import describe_edit
from runners.engine.editor import Editor, ImageReader, differentiable_net
from runners.engine.outputs import thumbnail, write_contact_sheet
from runners.engine.regions import part_folders, region_masks, space_weights
from runners.engine.requests import (MAX_POINTS, Denoising, EditRequest, Inverting, Move, Region, check_steps,
                                     spaced)
from runners.engine.within import is_discovered_name
from utils.config import Config, latent_shapes
from utils.core.atlas import HOLD_THRESHOLD
from utils.core.batching import batch_slices
from utils.core.boundary import class_summary
from utils.core.diffusion import Inversion
from utils.core.region import confined_rows
from utils.core.discovery import (captured_share, global_basis, jacobian_subspace, match_directions,
                                  principal_directions)
from utils.core.seeds import image_key
from utils.core.spaces import SPACES
from utils.errors import UserError
from utils.io.boundary_files import BoundaryRecord, check_attribute_names, load_boundary
from utils.io.files import RunFolder, check_writable_dir, write_json
from utils.io.images import expand_image_paths, list_images, quantize

log = logging.getLogger(__name__)

#: The most directions one run finds (two-digit names; each is two files and a contact-sheet row per image).
MAX_DIRECTIONS = 100
#: Images inverted at a time (their latents go to the cache before the next chunk is read).
READ_CHUNK = 64
#: The |cos| from which a direction is named after a supervised boundary (and turned to point toward
#: it): the atlas's threshold for two normals that move together (``HOLD_THRESHOLD``), far above
#: chance (a random direction has |cos| about 1 / sqrt(D) with any normal: 0.02 for 32 x 32 RGB).
NAME_THRESHOLD = HOLD_THRESHOLD
#: A name prefix: letters, digits, '-' and '_' (a name must survive --edit NAME=... and file names).
PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,39}")


@dataclass(frozen=True)
class DiscoverJob:
    """Directions without labels (``--discover``): the first ``n_images`` of ``images`` (a file,
    folder or glob; None: ``data_dir``, else the config's data folder) inverted at ``inverting``;
    ``n_directions`` found per space (the Jacobian iteration: ``oversample`` extra vectors,
    ``n_power_iter`` power steps, its random starts seeded from ``seed`` and each image's pixels);
    written to ``boundary_dir`` as ``<prefix>_00``, ... (``overwrite``: --ni, replacing the current
    files of those names); a contact sheet of the first ``sheet_images`` images (0: none) at
    ``sheet_points`` values from -``sheet_range`` to +``sheet_range`` in the relative unit, denoised
    as ``denoising`` says."""
    inverting: Inverting
    images: Path | None
    data_dir: Path | None
    boundary_dir: Path
    denoising: Denoising
    n_images: int = 64
    n_directions: int = 8
    prefix: str = "pc"
    oversample: int = 8
    n_power_iter: int = 5
    sheet_images: int = 3
    sheet_points: int = 5
    sheet_range: float = 3.0
    seed: int = 1234
    overwrite: bool = False
    #: --region: find the moves that change each image's region most (z: the Jacobian's rows of the
    #: region's pixels; h: PCA of h confined to the region's cells); None: the whole image.
    region: str | None = None


@dataclass(frozen=True)
class DiscoverPlan:
    """The images a discovery inverts and the names its directions get."""
    paths: tuple[Path, ...]
    names: tuple[str, ...]


def direction_names(prefix: str, n: int) -> tuple[str, ...]:
    """``<prefix>_00`` .. : the names of n discovered directions (two digits at least)."""
    return tuple(f"{prefix}_{k:02d}" for k in range(n))


def plan_discover(job: DiscoverJob, config: Config) -> DiscoverPlan:
    """The discovery's images and names, every check that needs no model done (UserError in one
    line): the numbers in range, the images there (at least one more than directions: a centred
    set of N latents spans at most N - 1 directions of h), the names writable, the contact sheet
    within the edit limits."""
    r = job.n_directions
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_DIRECTIONS:
        raise UserError(f"--n_directions must be in [1, {MAX_DIRECTIONS}], got {r!r}")
    if not isinstance(job.prefix, str) or not PREFIX.fullmatch(job.prefix):
        raise UserError(f"--discover_prefix must start with a letter and hold at most 40 letters, digits, '-' or "
                        f"'_', got {str(job.prefix)[:40]!r}")
    for name, value, low in (("--oversample", job.oversample, 0), ("--n_power_iter", job.n_power_iter, 0),
                             ("--sheet_images", job.sheet_images, 0), ("--n_discover_img", job.n_images, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 1 <= job.sheet_points <= MAX_POINTS:
        raise UserError(f"the contact sheet's points must be in [1, {MAX_POINTS}], got {job.sheet_points}")
    if not (math.isfinite(job.sheet_range) and 0 < job.sheet_range <= 1e6):
        raise UserError(f"the contact sheet's range must be a positive number, got {job.sheet_range}")
    shapes = latent_shapes(config)
    dims = {s: int(np.prod(shape)) for s, shape in shapes.items()}
    if r + job.oversample > dims["z"] or r > dims["h"]:
        raise UserError(f"{r} directions and {job.oversample} oversampling vectors do not fit latents of "
                        f"{dims['z']} (z) and {dims['h']} (h) values")
    check_steps(job.inverting.n_inv_step, job.inverting.t_0, "--n_inv_step")
    if job.sheet_images:
        check_steps(job.denoising.n_test_step, job.inverting.t_0)
    data_dir = job.data_dir or (Path(config.data.data_dir) if config.data.data_dir else None)
    if job.images:
        paths = expand_image_paths(job.images)[0][: job.n_images]
    elif data_dir:
        if not Path(data_dir).is_dir():
            hint = f"; run `bash data_download.sh {config.data.dataset}` first" if not job.data_dir else ""
            raise UserError(f"{data_dir} does not exist{hint}")
        paths = list_images(data_dir)[: job.n_images]
    else:
        raise UserError("--discover needs images: --img_path or --data_dir (the config names no data folder)")
    if len(paths) < r + 1:
        raise UserError(f"--discover finds {r} directions from at least {r + 1} images (N latents, centred, span "
                        f"N - 1 directions of h); found {len(paths)}")
    names = direction_names(job.prefix, r)
    check_attribute_names(names)
    return DiscoverPlan(tuple(paths), names)


# ---------------------------------------------------------------------------------------- the network

def _start_generator(seed: int, image: Tensor) -> torch.Generator:
    """The Jacobian iteration's random start for one image: from (seed, the image's pixels) under a
    tag of its own, so that it does not depend on the image's place in the set. It decides where the
    iteration starts, not the subspace it converges to."""
    key = image_key(image)
    words = [0xD15C0, seed & 0xFFFFFFFF, seed >> 32, key & 0xFFFFFFFF, key >> 32]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1))


# ---------------------------------------------------------------------------------------- the directions

@dataclass(frozen=True)
class Directions:
    """The directions of one discovery: {space: (r, D) float64 orthonormal rows}, in name order.

    z_gain: (r,) the root mean square over images of ||J_i g_k|| restricted to each image's top
    subspace (how much the denoiser amplifies direction k); h_variance: (r,) the explained variance
    ratio of each h direction's principal component; h_component: (r,) which principal direction
    (by decreasing variance) each h direction is; z_h_correlation: (r,) Pearson r of the z and h
    projections of the N images; jacobian: the iteration's record (last step angles, the share of
    the images' Jacobian energy the global basis holds)."""
    bases: dict
    z_gain: np.ndarray
    h_variance: np.ndarray
    h_component: np.ndarray
    z_h_correlation: np.ndarray
    jacobian: dict


def _flat(latents: Tensor) -> np.ndarray:
    return latents.detach().cpu().double().reshape(len(latents), -1).numpy()


def z_directions(net, latents_z: Tensor, images: Tensor, t_0: int, alphas_cumprod: Tensor, rank: int,
                 oversample: int, n_iter: int, seed: int, device, show_progress: bool = False,
                 masks: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The global z basis (rank, D) of N inverted latents (N, C, H, W), the pooled gain of each
    direction (rank,), and the iteration's record; with ``masks`` (N of (H, W)) each image's
    Jacobian restricted to its region's pixels (``jacobian_subspace``'s output weights)."""
    local, weights, last_angles = [], [], []
    for i in tqdm(range(len(latents_z)), desc="jacobian", unit="image", leave=False, disable=not show_progress):
        region = None if masks is None else torch.from_numpy(masks[i]).to(device)
        found = jacobian_subspace(net, latents_z[i:i + 1].to(device=device, dtype=torch.float32), t_0,
                                  alphas_cumprod, rank, n_iter, _start_generator(seed, images[i]), oversample,
                                  output_weights=region)
        local.append(found.basis.cpu().numpy())
        weights.append(found.singular_values.cpu().numpy())
        last_angles.append(float(found.step_angles[-1]) if len(found.step_angles) else float("nan"))
    basis = global_basis(local, weights, rank)
    stacked = np.concatenate([w[:, None] * b for w, b in zip(weights, local)])
    energy = ((stacked @ basis.T) ** 2).sum(axis=0)  # (rank,): g_k^T M g_k
    record = {"batching": found.batching, "last_step_angles": last_angles,
              "max_last_step_angle": float(np.nanmax(last_angles)) if n_iter else None,
              "captured_energy": float(energy.sum() / (stacked ** 2).sum()),
              "local_singular_values": [w.tolist() for w in weights]}
    return basis, np.sqrt(energy / len(local)), record


def _correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between the columns of a (N, r) and b (N, s): (r, s), 0 where a column is constant."""
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(all="ignore"):
        c = (a.T @ b) / np.outer(na, nb)
    return np.where(np.isfinite(c), c, 0.0)


def pair_h(z_proj: np.ndarray, h_proj: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which h direction goes with each z direction: (order (r,), signs (r,), correlations (r,)) such
    that h direction ``order[k]`` times ``signs[k]`` is paired with z direction k, one to one,
    maximising the sum of |Pearson r| of their projections (N, r) each; r >= 0 after the signs."""
    c = _correlations(z_proj, h_proj)
    rows, cols = linear_sum_assignment(np.abs(c), maximize=True)
    order = cols[np.argsort(rows)]
    picked = c[np.arange(len(order)), order]
    signs = np.where(picked < 0, -1.0, 1.0)
    return order, signs, picked * signs


def find_directions(editor: Editor, latents: Inversion, images: Tensor, job: DiscoverJob,
                    net: torch.nn.Module | None = None, masks: Sequence[np.ndarray] | None = None) -> Directions:
    """Both spaces' directions of the inverted ``latents`` (N, ...) of ``images`` (N, C, H, W); with
    ``masks`` (each image's region, (H, W)) those that change the regions: z from the Jacobian's
    rows of the region's pixels, h by PCA of h times the region's share of each bottleneck cell."""
    r = job.n_directions
    net = net if net is not None else differentiable_net(editor.model)
    z_basis, gain, record = z_directions(net, latents.z, images, editor.t_0, editor.alphas_cumprod, r, job.oversample,
                                         job.n_power_iter, job.seed, editor.device, editor.net.show, masks)
    h_flat = _flat(latents.h)
    if masks is not None:
        h_flat = confined_rows(h_flat, space_weights(masks, editor.shapes["h"][-1])["h"])
    h_basis, variance, _ = principal_directions(h_flat, r)
    order, signs, corr = pair_h(_flat(latents.z) @ z_basis.T, h_flat @ h_basis.T)
    return Directions({"z": z_basis, "h": signs[:, None] * h_basis[order]}, gain, variance[order], order, corr, record)


# ---------------------------------------------------------------------------------------- naming

def supervised_normals(index: BoundaryIndex, t_0: int, checkpoint_sha256: str, prefix: str,
                       shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, np.ndarray]]:
    """{space: {attribute: unit normal (D,) float64}}: the current boundary of every attribute of
    ``index`` at ``t_0`` fitted on this checkpoint (or naming none), discovered directions
    (``<prefix>_<number>``) left out. An attribute the index cannot resolve is passed over with a
    warning."""
    normals: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPACES}
    for name in index.attributes(t_0):
        if is_discovered_name(name, prefix):
            continue
        try:
            attribute, _, paths = index.find(name, t_0)
        except UserError as exc:
            log.warning("naming: passing over %s: %s", name, exc)
            continue
        for space, path in paths.items():
            record = load_boundary(path, dict(shapes))
            if record.checkpoint_sha256 and record.checkpoint_sha256 != checkpoint_sha256:
                continue
            normals[space][attribute] = record.normal.astype(np.float64)
    return normals


def name_directions(bases: Mapping[str, np.ndarray], names: Sequence[str],
                    supervised: Mapping[str, Mapping[str, np.ndarray]], threshold: float = NAME_THRESHOLD) -> dict:
    """Each direction's name after the supervised normals, per space (``match_directions``: one to
    one by |cos|), and how much of each supervised normal the discovered subspace holds
    (``captured_share``; a random normal scores r / D). Returns {"matches": {name: {space:
    {"attribute", "cosine"}}} (every pair the assignment makes), "captured": {attribute: {space:
    share}}, "cosines": {space: {attribute: [r cosines]}}, "lines": one per direction, "pc_03 ≈
    Smiling (cos 0.71 in z)" for the pairs at |cos| >= ``threshold``, else "pc_03: no supervised
    boundary at |cos| >= 0.3"}."""
    matches = {name: {} for name in names}
    captured: dict[str, dict[str, float]] = {}
    cosines: dict[str, dict[str, list[float]]] = {}
    for space, basis in bases.items():
        normals = supervised.get(space) or {}
        if not normals:
            continue
        cosines[space] = {a: (basis @ (n / np.linalg.norm(n))).tolist() for a, n in normals.items()}
        for a, n in normals.items():
            captured.setdefault(a, {})[space] = captured_share(n, basis)
        for match in match_directions(basis, normals):
            if match.index is not None and match.name is not None:
                matches[names[match.index]][space] = {"attribute": match.name, "cosine": match.cosine}
    lines = []
    for name in names:
        parts = [f"{'-' if m['cosine'] < 0 else ''}{m['attribute']} (cos {m['cosine']:.2f} in {space})"
                 for space, m in matches[name].items() if abs(m["cosine"]) >= threshold]
        lines.append(f"{name} \u2248 " + "; \u2248 ".join(parts) if parts
                     else f"{name}: no supervised boundary at |cos| >= {threshold:g}")
    return {"matches": matches, "captured": captured, "cosines": cosines, "lines": lines, "threshold": threshold}


def orient(directions: Directions, names: Sequence[str], supervised: Mapping[str, Mapping[str, np.ndarray]],
           threshold: float = NAME_THRESHOLD) -> Directions:
    """The directions with each pair's sign flipped, where needed, to point toward the supervised
    boundary it is named after (in z when named there, else in h: ``name_directions`` at
    ``threshold``); pairs stay paired, unnamed ones keep their signs."""
    first = name_directions(directions.bases, names, supervised, threshold)["matches"]
    signs = np.ones(len(names))
    for k, name in enumerate(names):
        named = [m for m in (first[name].get("z"), first[name].get("h")) if m and abs(m["cosine"]) >= threshold]
        if named and named[0]["cosine"] < 0:
            signs[k] = -1.0
    bases = {s: signs[:, None] * b for s, b in directions.bases.items()}
    return Directions(bases, directions.z_gain, directions.h_variance, directions.h_component,
                      directions.z_h_correlation, directions.jacobian)


# ---------------------------------------------------------------------------------------- the files

def median_split(projections: np.ndarray) -> np.ndarray:
    """The 'classes' of a discovered direction: 1 for the upper half of the projections (N,), 0 for
    the lower half (by rank, ties by position; with N odd the middle one is in the upper half)."""
    order = np.argsort(projections, kind="stable")
    labels = np.zeros(len(projections), dtype=np.int64)
    labels[order[len(projections) // 2:]] = 1
    return labels


def direction_records(editor: Editor, directions: Directions, latents: Inversion, names: Sequence[str],
                      fit_region: str = "") -> dict[str, dict[str, BoundaryRecord]]:
    """{name: {space: BoundaryRecord}}: the unit direction as normal and coef, intercept 0, the class
    summary of its projections split at the median (``median_split``; the module docstring), and the
    region it was found in (``fit_region``, '' for the whole image)."""
    flat = {"z": _flat(latents.z), "h": _flat(latents.h)}
    empty = class_summary(np.zeros(0), np.zeros(0, dtype=np.int64))
    records: dict[str, dict[str, BoundaryRecord]] = {name: {} for name in names}
    for space in SPACES:
        for k, name in enumerate(names):
            v = directions.bases[space][k]
            v = (v / np.linalg.norm(v)).astype(np.float32)
            projections = flat[space] @ v.astype(np.float64)
            y = median_split(projections)
            records[name][space] = BoundaryRecord(
                normal=v, coef=v.copy(), intercept=0.0, shape=tuple(editor.shapes[space]), space=space,
                t_0=editor.t_0, n_inv_step=editor.n_inv_step, attribute=name, n_train=len(y), n_test=0,
                n_pos=int(y.sum()), n_neg=int(len(y) - y.sum()), config_name=editor.config.name,
                checkpoint_sha256=editor.model.checkpoint_sha256, fit_region=fit_region,
                class_summary={"train": class_summary(projections, y), "test": empty})
    return records


# ---------------------------------------------------------------------------------------- the contact sheet

def sweep_request(name: str, paths: Mapping[str, Path], space: str, job: DiscoverJob) -> EditRequest:
    """The edit of one direction in one space that the contact sheet shows: ``sheet_points`` values
    from -``sheet_range`` to +``sheet_range`` in the relative unit, the files named explicitly."""
    return EditRequest(moves=(Move(name, -job.sheet_range, job.sheet_range, paths={space: paths[space]}),),
                       denoising=job.denoising, k=job.sheet_points, space=space, unit="relative")


def sweep_edits(editor: Editor, job: DiscoverJob, written: Mapping[str, Mapping[str, Path]], latents: Inversion,
                images: Tensor) -> dict[tuple[str, str], Tensor]:
    """{(name, space): (B, K, C, H, W) edits in [-1, 1]} of B images, through the engine's edit
    machinery (``describe_edit``, ``Editor.edit_all``, the edit seed rule)."""
    keys = [(image_key(image),) for image in images]
    edits = {}
    for name, paths in written.items():
        for space in SPACES:
            description = describe_edit(sweep_request(name, paths, space, job), None, editor.model.identity,
                                        editor.t_0, editor.n_inv_step)
            edits[(name, space)] = editor.edit_all(latents, description, keys)
    return edits


def write_sweep_sheet(edits: Mapping[tuple[str, str], Tensor], images: Tensor, values: Sequence[float],
                      path: Path) -> None:
    """One row per direction, space and image: the original, then the K edits."""
    rows, labels = [], []
    for (name, space), batch in edits.items():
        for b in range(len(images)):
            rows.append(thumbnail(quantize(torch.cat([images[b:b + 1], batch[b]]))))
            labels.append(f"{name} {space} #{b}")
    write_contact_sheet(rows, labels, ["original", *(f"{v:+.2g}" for v in values)], path)


# ---------------------------------------------------------------------------------------- faces

def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of two (K,) sequences; nan where one is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.linalg.norm(rx) * np.linalg.norm(ry))
    return float(rx @ ry / denominator) if denominator > 0 else float("nan")


def _mean_finite(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def factor_matches(edits: Mapping, values: Sequence[float], predictor=None) -> dict:
    """Name edit sequences after the synthetic faces' factors (the faces data set only): for each
    sequence, which factor its edit moves most, and how monotonically.

    edits: {key: (B, K, 3, 32, 32) images in [-1, 1]}, each image's K edits along ``values`` (K,)
    (e.g. ``sweep_edits``); predictor: a ``FactorPredictor`` (default: ``load_predictor()``, the
    shipped weights). Every edit is measured; per factor, ``change`` is the mean over the B images
    of (last edit - first edit) in the factor's units of spread (a continuous factor's standard
    deviation over the predictor's training faces; 0.5 for a binary factor's probability), and
    ``spearman`` the mean over images of Spearman's rho between ``values`` and the measurement. The
    factor a sequence moves most is the one of largest |change|. Returns {key: {"factor", "change",
    "spearman", "factors": {factor: {"change", "spearman"}}}}. Imports utils.faces here, so the
    engine does not depend on it."""
    from utils.faces.predictor import PREDICTED_CONTINUOUS, PREDICTED_NAMES, load_predictor, prediction_matrix

    predictor = predictor if predictor is not None else load_predictor()
    spread = np.concatenate([predictor.std.detach().cpu().double().numpy(),
                             np.full(len(PREDICTED_NAMES) - len(PREDICTED_CONTINUOUS), 0.5)])
    x = np.asarray(values, dtype=np.float64)
    out = {}
    for key, batch in edits.items():
        b, k = batch.shape[:2]
        measured = prediction_matrix(predictor.predict(batch.reshape(b * k, *batch.shape[2:]).clamp(-1, 1)))
        measured = measured.reshape(b, k, -1)
        change = (measured[:, -1] - measured[:, 0]).mean(axis=0) / spread
        rho = np.array([_mean_finite([_spearman(x, measured[i, :, f]) for i in range(b)])
                        for f in range(measured.shape[2])])
        best = int(np.argmax(np.abs(change)))
        out[key] = {"factor": PREDICTED_NAMES[best], "change": float(change[best]), "spearman": float(rho[best]),
                    "factors": {n: {"change": float(change[f]), "spearman": float(rho[f])}
                                for f, n in enumerate(PREDICTED_NAMES)}}
    return out


def _faces_naming(edits, values) -> tuple[dict | None, str | None]:
    """``factor_matches`` of the contact sheet's edits, or why there is none (no predictor yet)."""
    try:
        return factor_matches(edits, values), None
    except UserError as exc:
        log.warning("no naming by the factor predictor: %s", exc)
        return None, str(exc)


# ---------------------------------------------------------------------------------------- the run

def invert_images(editor: Editor, paths: Sequence[Path], batch_size: int, reader: ImageReader | None = None
                  ) -> tuple[Tensor, Inversion, int]:
    """Read and invert ``paths`` a chunk at a time (cached as they go): (images (N, C, H, W), latents,
    how many came from memory or the cache)."""
    reader = reader or ImageReader.for_config(editor.config, align_face=False)
    images, zs, hs, hits = [], [], [], 0
    for chunk in batch_slices(len(paths), READ_CHUNK):
        part = torch.stack([reader.read(p) for p in paths[chunk]])
        latents, cached = editor.invert(part, batch_size)
        images.append(part)
        zs.append(latents.z)
        hs.append(latents.h)
        hits += cached
    return torch.cat(images), Inversion(torch.cat(zs), torch.cat(hs)), hits


def run_discover(editor: Editor, job: DiscoverJob, plan: DiscoverPlan, index: BoundaryIndex,
                 folder: RunFolder, run_dir: Path, summary: dict) -> dict:
    """Invert, find, name, write (the files as a set, then the contact sheet and summary.json into
    ``run_dir``). ``index``: the boundary folder as it was before this run (the supervised
    boundaries the directions are named after). Returns the summary, with ``names`` (the lines to
    print) and ``written`` ({name: {space: path}})."""
    folder.created_dirs(check_writable_dir(Path(job.boundary_dir)))
    regions = None if job.region is None else region_masks(Region(job.region), plan.paths,
                                                           editor.config.data.image_size, part_folders(editor.config))
    timings = {}
    start = time.perf_counter()
    images, latents, hits = invert_images(editor, plan.paths, job.inverting.batch_size)
    timings["invert_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    directions = find_directions(editor, latents, images, job,
                                 masks=None if regions is None else [r.mask for r in regions])
    timings["directions_seconds"] = time.perf_counter() - start
    supervised = supervised_normals(index, editor.t_0, editor.model.checkpoint_sha256, job.prefix, editor.shapes)
    directions = orient(directions, plan.names, supervised)
    naming = name_directions(directions.bases, plan.names, supervised)
    for line in naming["lines"]:
        log.info("%s", line)
    records = direction_records(editor, directions, latents, plan.names, "" if regions is None else regions[0].source())
    written = stage_boundary_set(folder, job.boundary_dir, job.overwrite, records, editor.config.name,
                                 editor.t_0)()
    values = list(spaced(-job.sheet_range, job.sheet_range, job.sheet_points))
    factor_naming, factor_problem, sheet = None, None, None
    if job.sheet_images:
        start = time.perf_counter()
        b = min(job.sheet_images, len(images))
        shown = Inversion(latents.z[:b], latents.h[:b])
        edits = sweep_edits(editor, job, written, shown, images[:b])
        write_sweep_sheet(edits, images[:b], values, run_dir / "contact_sheet.png")
        sheet = "contact_sheet.png"
        timings["sheet_seconds"] = time.perf_counter() - start
        if editor.config.data.dataset == "faces":
            factor_naming, factor_problem = _faces_naming(edits, values)
            if factor_naming:
                factor_naming = {f"{name} {space}": found for (name, space), found in factor_naming.items()}
    per_direction = {}
    for k, name in enumerate(plan.names):
        per_direction[name] = {
            "z": {"path": str(written[name]["z"]), "gain": float(directions.z_gain[k])},
            "h": {"path": str(written[name]["h"]), "explained_variance": float(directions.h_variance[k]),
                  "component": int(directions.h_component[k])},
            "z_h_correlation": float(directions.z_h_correlation[k]),
            "relative_unit": {s: records[name][s].class_summary["train"]["pos"]["p50"] / 2
                              - records[name][s].class_summary["train"]["neg"]["p50"] / 2 for s in SPACES},
            "matches": naming["matches"][name]}
    result = {"mode": "discover", **summary, "t_0": editor.t_0, "n_inv_step": editor.n_inv_step,
              "n_images": len(plan.paths), "cache_hits": hits, "images": [str(p) for p in plan.paths],
              "n_directions": len(plan.names), "directions": per_direction, "jacobian": directions.jacobian,
              "oversample": job.oversample, "n_power_iter": job.n_power_iter,
              "names": naming["lines"], "name_threshold": naming["threshold"], "captured_share": naming["captured"], "cosines": naming["cosines"],
              "factor_naming": factor_naming, "factor_naming_problem": factor_problem,
              "contact_sheet": sheet, "sheet_values": values, "sheet_unit": "relative", **timings,
              **editor.model.identity.summary()}
    write_json(run_dir / "summary.json", result)
    return {**result, "written": {n: {s: str(p) for s, p in spaces.items()} for n, spaces in written.items()}}
