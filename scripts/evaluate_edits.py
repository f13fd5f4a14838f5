"""Measure boundary edits on the held-out TEST digits: attribute control, identity, fidelity.

    python -m scripts.evaluate_edits --attribute thick --ablations --quality \\
        --json docs/digits_eval.json --table docs/digits_eval.md --grid docs/digits_thick_edits.png

Every test digit is inverted to t_0 (DDIM, eta 0), reconstructed, and edited to K signed distances
along the boundaries of ``--attribute`` found in ``--boundary_dir`` (files written by
``main.py --boundary_search``, matched by their attribute and t_0). Measured per run:

- attribute control (ink mass, for ``thick``): the fraction of digits whose ink mass (sum of pixel
  values in [0, 1]) at the largest distance exceeds the reconstruction's and at the smallest falls
  below it; and the mean over digits of Spearman's rank correlation between d_k and ink mass;
- identity: the fraction of all edits whose class, by a logistic regression (C = 1) trained on the TRAIN
  split (on 8x8 images 2x2-averaged from 16x16, on the 0..16 scale of load_digits), equals the
  digit's true label;
- class flip (with ``--flip POS NEG``, e.g. 3 8 for three_vs_eight): the fraction of POS digits
  classified NEG at the smallest distance and of NEG digits classified POS at the largest;
- fidelity: mean squared error and PSNR of inversion + regeneration (eta 0, no edit), pixels in [0, 1].

``--joint`` runs the multi-attribute evaluation instead (issue 22; docs/digits_report.md): thick and
slant moved on a K x K grid of targets (the joint move), thick alone, thick with slant held, and
slant with thick held, with the digit's class free and held (the ``digit_c`` boundaries of each
digit's true class); measured from pixels (``utils.core.morphometry``: stroke thickness and
slant after Morpho-MNIST; needs scikit-image) with ``utils.core.edit_measures``: target gain,
leak, additivity, class kept, each with its spread over the digits.

``--ablations`` repeats the run with one setting changed at a time: z only / h only, the other h
policy, the other eta (0 / 1), other t_0 values (``--ablate_t0``; boundaries for them must exist;
the range is shifted with the z hyperplane's offset -b/||w||) and wider or narrower ranges
(``--ablate_scale``, about the range's centre). ``--quality`` also samples digits from noise and checks that
the classifier recognises them. Every digit goes through the editing engine (runners/editor.py)
exactly as ``main.py --edit_image_boundary`` edits it: edit k of a digit draws its noise by the CLI's
rule, ``item_seed(seed, image_key(digit), 0, k, domain=EDIT)``, so results depend on neither batch size nor order.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from models.loading import LoadedModel, load_model
from models.runtime import PRECISIONS, retain_freed_memory
from runners.edit_description import (AUTO_SCALE, MOVED, Denoising, EditDescription, EditRequest, Move,
                                      describe_edit)
from runners.editor import Editor, RecentLatents
from utils.config import load_config
from utils.core.boundary import latent_distance
from utils.core.diffusion import Inversion
from utils.core.edit_measures import additivity_error, class_kept, leak, pooled_leak, spread, target_gain
from utils.core.morphometry import check_scikit_image, measure_batch
from utils.core.seeds import EVALUATION_NOISE, image_key, item_seed
from utils.io.boundary_files import BoundaryRecord, matching_boundaries
from utils.io.images import load_image
from utils.io.plots import labelled_grid
from utils.io.files import write_bytes, write_json

REPO = Path(__file__).resolve().parents[1]

@dataclass(frozen=True)
class Setting:
    """One evaluated configuration of the edit."""
    name: str
    space: str = "both"
    h_policy: str = "lagged"
    eta: float = 1.0
    t_0: int = 400
    start: float | None = -20.0  # None: the CLI's auto range per space (from the boundary files)
    end: float | None = 20.0
    k: int = 9


# --- data and measurements ----------------------------------------------------------------------

def load_split(data_dir: Path, split: str, size: int, channels: int) -> tuple[list[Path], torch.Tensor, np.ndarray]:
    """Paths, images (N, C, H, W) in [-1, 1] and true classes (N,) of one split of the digits set."""
    folder = data_dir / "images" / split
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no images in {folder}; run `bash data_download.sh digits .` first")
    lines = (data_dir / "list_attr_digits.txt").read_text().splitlines()
    names = lines[1].split()
    digit_cols = [names.index(f"digit_{c}") for c in range(10)]
    rows = {parts[0]: [int(v) for v in parts[1:]] for parts in (line.split() for line in lines[2:]) if parts}
    classes = np.array([int(np.argmax([rows[p.name][c] for c in digit_cols])) for p in paths], dtype=np.int64)
    images = torch.cat([load_image(p, size, channels) for p in paths])
    return paths, images, classes


def subset_per_class(classes: np.ndarray, n: int | None, only: list[int] | None = None) -> np.ndarray:
    """Indices of the first ceil(n / #classes) items of each (selected) class, in name order."""
    chosen = sorted(set(classes.tolist()) if only is None else only)
    if n is None:
        return np.flatnonzero(np.isin(classes, chosen))
    per = -(-n // len(chosen))
    return np.sort(np.concatenate([np.flatnonzero(classes == c)[:per] for c in chosen]))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (not clipped) -> [0, 1], clipped."""
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def ink(x: torch.Tensor) -> np.ndarray:
    """Ink mass: the sum of pixel values in [0, 1] per image. x: (N, C, H, W) in [-1, 1]."""
    return to_unit(x).flatten(1).sum(1).double().numpy()


def features_8x8(x: torch.Tensor) -> np.ndarray:
    """The classifier's input: (N, 64), 2x2-averaged pixels (16x16 -> 8x8) on load_digits' 0..16 scale."""
    return 16.0 * torch.nn.functional.avg_pool2d(to_unit(x), 2).flatten(1).double().numpy()


def train_classifier(images: torch.Tensor, classes: np.ndarray) -> LogisticRegression:
    return LogisticRegression(max_iter=5000, C=1.0).fit(features_8x8(images), classes)


def psnr(mse: float) -> float:
    return float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")


# --- boundaries ---------------------------------------------------------------------------------

def unique_boundaries(boundary_dir: Path, config_name: str, attribute: str, t_0: int,
                      sha256: str) -> dict[str, tuple[Path, BoundaryRecord]]:
    """{space: (path, record)} of the boundary files in ``boundary_dir`` for ``attribute`` at ``t_0``
    fitted on the checkpoint with ``sha256``; raises if a space has none or several (an evaluation
    must not silently pick one of two candidates, as the edit modes' newest-file default does)."""
    found = matching_boundaries(boundary_dir, config_name, attribute, t_0, sha256)
    for space in ("z", "h"):
        hits = found.get(space, [])
        if len(hits) != 1:
            names = ", ".join(str(p) for p, _ in hits) or "none"
            raise FileNotFoundError(f"need exactly one {space} boundary for '{attribute}' at t_0 = {t_0} "
                                    f"in {boundary_dir}, found {names}; run main.py --boundary_search")
    return {space: found[space][0] for space in ("z", "h")}


def z_offset(boundary_dir: Path, config_name: str, attribute: str, t_0: int, sha256: str) -> float:
    """Where the z boundary's SVM hyperplane crosses its unit normal: -b / ||w||."""
    _, record = unique_boundaries(boundary_dir, config_name, attribute, t_0, sha256)["z"]
    return float(-record.intercept / np.linalg.norm(record.coef))


# --- one run ------------------------------------------------------------------------------------

class Evaluator:
    """The test digits through the editing engine (``runners.editor``), one ``Editor`` per t_0: each
    digit is inverted once per t_0, every edit is built by ``describe_edit`` (the command line's
    builder) and made by ``Editor.edit_all``, and edit k of digit b draws its noise by the CLI's
    rule, ``item_seed(seed, image_key(digit), 0, k, domain=EDIT)``."""

    def __init__(self, model: LoadedModel, images: torch.Tensor, n_inv_step: int, batch_size: int):
        self.model, self.images = model, images
        self.n_inv_step, self.batch_size = n_inv_step, batch_size
        self.seed_keys = [(image_key(image),) for image in images]
        self._editors: dict[int, Editor] = {}
        # every digit's latents at every t_0 evaluated, kept by the engine (its one inversion store)
        self._recent = RecentLatents(capacity=len(images) * 8)
        self._plain_recon: dict[int, torch.Tensor] = {}

    def editor(self, t_0: int) -> Editor:
        if t_0 not in self._editors:
            self._editors[t_0] = Editor(self.model, t_0, self.n_inv_step, recent=self._recent)
        return self._editors[t_0]

    def describe(self, t_0: int, request: EditRequest) -> EditDescription:
        """The checked edit of ``request`` at ``t_0`` (every boundary named by path in the request)."""
        return describe_edit(self.editor(t_0), request, None)

    def inversion(self, t_0: int) -> Inversion:
        """Latents of the digits at t_0 (inverted once per t_0, then served by the engine's
        ``RecentLatents``)."""
        return self.editor(t_0).invert(self.images, self.batch_size)[0]

    def plain_reconstruction(self, t_0: int, description: EditDescription) -> torch.Tensor:
        """Invert + regenerate with eta 0 and no h injection (``description`` moves z only): the
        fidelity measurement."""
        if t_0 not in self._plain_recon:
            self._plain_recon[t_0] = self.editor(t_0).reconstruct(self.inversion(t_0), description)
        return self._plain_recon[t_0]

    def reference(self, t_0: int, description: EditDescription) -> torch.Tensor:
        """The reconstructions (N, C, H, W) the edits of ``description`` are compared with: through
        the same h injection as the edits (``Editor.reconstruct``)."""
        return self.editor(t_0).reconstruct(self.inversion(t_0), description)

    def edits(self, t_0: int, description: EditDescription, rows: np.ndarray | None = None) -> torch.Tensor:
        """The edits (n, K, C, H, W) of the digits ``rows`` (default: all), in [-1, 1], not clipped."""
        latents, keys = self.inversion(t_0), self.seed_keys
        if rows is not None:
            latents = Inversion(latents.z[rows], latents.h[rows])
            keys = [self.seed_keys[i] for i in rows]
        return self.editor(t_0).edit_all(latents, description, keys)


def setting_request(setting: Setting, paths: dict[str, Path], n_test_step: int, seed: int,
                    batch_size: int) -> EditRequest:
    """The command line's request for ``setting``: ``--edit_attr A --start_distance S --end_distance
    E`` (``auto`` when start is None) with the boundary files ``paths``."""
    move = Move("", setting.start, setting.end, auto=setting.start is None, paths=paths)
    return EditRequest((move,), Denoising(n_test_step, setting.eta, setting.h_policy, seed, batch_size),
                       k=setting.k, space=setting.space)


def measure(reference: torch.Tensor, edits: torch.Tensor, distances: torch.Tensor, classes: np.ndarray,
            classifier: LogisticRegression, flip: tuple[int, int] | None) -> dict:
    """The numbers of one run (see the module docstring)."""
    n, k = edits.shape[:2]
    flat = edits.reshape(n * k, *edits.shape[2:])
    ink_edit = ink(flat).reshape(n, k)
    ink_ref = ink(reference)
    d = distances.numpy()
    rhos = []
    for row in ink_edit:
        rho = spearmanr(d, row).statistic
        rhos.append(0.0 if not np.isfinite(rho) else float(rho))
    pred = classifier.predict(features_8x8(flat)).reshape(n, k)
    result = {
        "n_digits": int(n), "n_edits": int(n * k),
        "attribute_control": float(np.mean((ink_edit[:, -1] > ink_ref) & (ink_edit[:, 0] < ink_ref))),
        "spearman_mean": float(np.mean(rhos)),
        "ink_ratio_low": float(np.mean(ink_edit[:, 0] / ink_ref)),
        "ink_ratio_high": float(np.mean(ink_edit[:, -1] / ink_ref)),
        "identity": float(np.mean(pred == classes[:, None])),
        "identity_endpoints": float(np.mean(pred[:, [0, -1]] == classes[:, None])),
        "identity_per_distance": np.mean(pred == classes[:, None], axis=0).tolist(),
        "ink_ratio_per_distance": np.mean(ink_edit / ink_ref[:, None], axis=0).tolist(),
        "identity_reference": float(np.mean(classifier.predict(features_8x8(reference)) == classes)),
        "pixel_change": float((to_unit(flat) - to_unit(reference).repeat_interleave(k, 0)).abs().mean()),
    }
    if flip is not None:
        pos, neg = flip
        result["flip_pos_to_neg"] = float(np.mean(pred[classes == pos, 0] == neg)) if np.any(classes == pos) else float("nan")
        result["flip_neg_to_pos"] = float(np.mean(pred[classes == neg, -1] == pos)) if np.any(classes == neg) else float("nan")
    return result


# --- several attributes at once (issue 22) -------------------------------------------------------

@dataclass(frozen=True)
class JointSetting:
    """The multi-attribute evaluation: ``moved`` (thick) is the attribute whose leak into ``other``
    (slant) is measured; both get the K targets spaced from ``start`` to ``end`` in ``unit``."""
    moved: str = "thick"
    other: str = "slant"
    start: float = -3.0
    end: float = 3.0
    k: int = 3
    unit: str = "relative"
    space: str = "both"
    h_policy: str = "lagged"
    eta: float = 0.0
    n_test_step: int = 5
    t_0: int = 200


#: The four edits of one variant: both attributes on a K x K grid (the joint move; edit i K + j at
#: value i of ``moved`` and j of ``other``), ``moved`` alone, ``moved`` with ``other`` held, and
#: ``other`` with ``moved`` held (the last two with the grid give the additivity).
JOINT_EDITS = ("grid", "single", "held", "other_held")


def joint_requests(setting: JointSetting, paths: dict[str, dict[str, Path]], held: tuple[dict[str, Path], ...],
                   seed: int, batch_size: int) -> dict[str, EditRequest]:
    """The requests of ``JOINT_EDITS``; ``paths``: {attribute: {space: file}} of the two attributes;
    every request also holds the boundaries ``held`` (e.g. the digit's class)."""
    denoising = Denoising(setting.n_test_step, setting.eta, setting.h_policy, seed, batch_size)

    def move(name: str) -> Move:
        return Move(name, setting.start, setting.end, paths=paths[name])

    def holding(*names: str) -> dict[str, tuple[Path, ...]]:
        files = [paths[n] for n in names] + list(held)
        return {space: tuple(f[space] for f in files) for space in MOVED[setting.space]}

    common = {"denoising": denoising, "k": setting.k, "space": setting.space, "unit": setting.unit}
    a, b = setting.moved, setting.other
    return {"grid": EditRequest((move(a), move(b)), held_paths=holding(), grid=True, **common),
            "single": EditRequest((move(a),), held_paths=holding(), **common),
            "held": EditRequest((move(a),), held_paths=holding(b), **common),
            "other_held": EditRequest((move(b),), held_paths=holding(a), **common)}


def projection_moved(latents: torch.Tensor, description: EditDescription, normal: torch.Tensor) -> np.ndarray:
    """|change of v.n| (N, K) that the z move of ``description`` gives each latent along ``normal``
    (the latent cross-talk into an attribute the edit does not name)."""
    move = description.move("z")
    before = latent_distance(latents, normal).numpy()
    after = np.stack([latent_distance(move.apply(latents[b:b + 1], range(len(move))), normal).numpy()
                      for b in range(len(latents))])
    return np.abs(after - before[:, None])


def joint_measures(reference: torch.Tensor, edits: dict[str, torch.Tensor], targets: np.ndarray,
                   sigma: dict[str, float], classes: np.ndarray, classifier: LogisticRegression) -> dict:
    """The multi-attribute measures of one variant, each per digit with its spread.

    reference: (N, C, H, W); edits: ``JOINT_EDITS`` -> (N, K', C, H, W) in [-1, 1] (grid: K' = K^2,
    the others K); targets: (K^2, 2) the grid's targets of (moved, other) in z; sigma: the spread of
    each measured attribute ("thickness", "slant") over the test digits."""
    n, k = len(reference), edits["single"].shape[1]
    measured = {name: {a: v.reshape(n, -1) for a, v in measure_batch(x.flatten(0, 1).numpy()).items()}
                for name, x in edits.items()}
    grid = measured["grid"]
    result = {"gain": {"thickness": spread(target_gain(grid["thickness"], targets[:, 0])),
                       "slant": spread(target_gain(grid["slant"], targets[:, 1])),
                       "slant_on_thick_target": spread(target_gain(grid["slant"], targets[:, 0]))}}
    sweeps = {"single": (measured["single"]["thickness"][:, None], measured["single"]["slant"][:, None]),
              "held": (measured["held"]["thickness"][:, None], measured["held"]["slant"][:, None]),
              # the grid's rows at one slant target each: thickness moves along i, the slant target is fixed
              "joint": (grid["thickness"].reshape(n, k, k).transpose(0, 2, 1), grid["slant"].reshape(n, k, k).transpose(0, 2, 1))}
    result["leak"] = {name: {**spread(leak(t, sl, sigma["thickness"], sigma["slant"])),
                             "pooled": pooled_leak(t, sl, sigma["thickness"], sigma["slant"])}
                      for name, (t, sl) in sweeps.items()}
    result["thickness_gain"] = {name: spread(target_gain(t.reshape(n, -1), np.tile(np.arange(t.shape[2]), t.shape[1])))
                                for name, (t, _) in sweeps.items()}
    unit = {name: to_unit(x).numpy() for name, x in edits.items()}
    ref = to_unit(reference).numpy()
    errors = [additivity_error(ref, unit["held"][:, i], unit["other_held"][:, j], unit["grid"][:, i * k + j])
              for i in range(k) for j in range(k)]
    result["additivity"] = {m: spread(np.mean([e[m] for e in errors], axis=0)) for m in ("mean_abs", "relative")}
    kept = {name: class_kept(classifier.predict(features_8x8(x.flatten(0, 1))).reshape(n, -1), classes)
            for name, x in edits.items()}
    result["class_kept"] = {"single": spread(kept["single"]), "held": spread(kept["held"]), "joint": spread(kept["grid"])}
    return result


def run_joint(evaluator: Evaluator, setting: JointSetting, boundary_dir: Path, config_name: str, sha: str,
              classes: np.ndarray, classifier: LogisticRegression, seed: int, batch_size: int) -> dict:
    """Both variants of the joint evaluation: the digit's class free, and held (the ``digit_c``
    boundaries of each digit's true class c, one description per class)."""
    def files(attribute: str) -> dict[str, Path]:
        return {s: p for s, (p, _) in unique_boundaries(boundary_dir, config_name, attribute, setting.t_0, sha).items()}

    paths = {a: files(a) for a in (setting.moved, setting.other)}
    latents = evaluator.inversion(setting.t_0)
    free = {name: evaluator.describe(setting.t_0, r) for name, r in
            joint_requests(setting, paths, (), seed, batch_size).items()}
    grid_z = free["grid"].spaces["z"]
    other_normal = grid_z.normals[1]
    reference = evaluator.reference(setting.t_0, free["grid"])
    sigma = {a: float(v.std()) for a, v in measure_batch(evaluator.images.numpy()).items()}
    other_proj_sd = float(latent_distance(latents.z, other_normal).std())
    report = {"setting": dataclasses.asdict(setting), "sigma": sigma,
              "targets_z": grid_z.targets.tolist(), "targets_h": free["grid"].spaces["h"].targets.tolist()
              if "h" in free["grid"].spaces else None,
              "cosines_z": {"names": [*grid_z.attributes], "matrix": grid_z.cosines.tolist()},
              # the largest gain a K x K grid allows: its targets repeat (ties), a measurement cannot
              "gain_ceiling": float(target_gain(np.arange(len(grid_z.targets), dtype=float)[None], grid_z.targets[:, 0])[0]),
              "variants": {}}
    for variant in ("class free", "class held"):
        t0 = time.perf_counter()
        edits: dict[str, list] = {name: [None] * len(classes) for name in JOINT_EDITS}
        cross = {"single": np.zeros((len(classes), setting.k)), "held": np.zeros((len(classes), setting.k))}
        cosines = []
        groups = [(None, np.arange(len(classes)))] if variant == "class free" else \
            [(c, np.flatnonzero(classes == c)) for c in np.unique(classes)]
        for c, rows in groups:
            held = () if c is None else (files(f"digit_{c}"),)
            described = free if c is None else {name: evaluator.describe(setting.t_0, r) for name, r in
                                                joint_requests(setting, paths, held, seed, batch_size).items()}
            if c is not None:
                cosines.append(described["single"].spaces["z"].cosines[0, 1])  # moved . digit_c
            for name, description in described.items():
                images = evaluator.edits(setting.t_0, description, rows)
                for i, row in enumerate(rows):
                    edits[name][row] = images[i]
            for name in cross:
                cross[name][rows] = projection_moved(latents.z[rows], described[name], other_normal) / other_proj_sd
        stacked = {name: torch.stack(v) for name, v in edits.items()}
        result = joint_measures(reference, stacked, grid_z.targets, sigma, classes, classifier)
        result["other_projection_moved"] = {name: spread(v.mean(axis=1)) for name, v in cross.items()}
        if cosines:
            result["abs_cos_moved_digit_z"] = spread(np.abs(cosines))
        result["seconds"] = time.perf_counter() - t0
        report["variants"][variant] = result
        print(f"joint, {variant}: leak single {result['leak']['single']['median']:.3f} held "
              f"{result['leak']['held']['median']:.3f} joint {result['leak']['joint']['median']:.3f}  "
              f"({result['seconds']:.0f}s)", flush=True)
    return report


def joint_table(report: dict) -> str:
    """The markdown table of ``run_joint``: one row per variant and edit."""
    def ms(d: dict, fmt: str = ".3f") -> str:
        return f"{d['mean']:{fmt}} ± {d['sd']:{fmt}}"

    def med(d: dict) -> str:
        return f"{d['median']:.3f} [{d['q25']:.3f}, {d['q75']:.3f}]"

    head = ["class", "edit", "thickness gain", "slant gain", "leak, median [IQR]", "leak, pooled",
            "slant projection moved", "additivity: mean abs", "additivity: relative", "class kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, r in report["variants"].items():
        for edit in ("single", "held", "joint"):
            grid = edit == "joint"
            cells = [variant, edit,
                     ms(r["gain"]["thickness"]) if grid else ms(r["thickness_gain"][edit]),
                     ms(r["gain"]["slant"]) if grid else "",
                     med(r["leak"][edit]), f"{r['leak'][edit]['pooled']:.3f}",
                     ms(r["other_projection_moved"][edit]) if edit in r["other_projection_moved"] else "",
                     ms(r["additivity"]["mean_abs"], ".4f") if grid else "",
                     ms(r["additivity"]["relative"]) if grid else "",
                     f"{r['class_kept'][edit]['mean']:.1%} ± {r['class_kept'][edit]['sd']:.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- sample quality ------------------------------------------------------------------------------

def sample_quality(editor: Editor, classifier: LogisticRegression, test_images: torch.Tensor, n: int, steps: int,
                   seed: int, batch_size: int, grid_path: Path | None) -> dict:
    """DDIM (eta 0) samples from x_T ~ N(0, I): the classifier's confidence on them vs on real test digits."""
    gen = torch.Generator().manual_seed(item_seed(seed, domain=EVALUATION_NOISE))
    x_T = torch.randn((n, *test_images.shape[1:]), generator=gen)
    samples = editor.sample_images(x_T, steps, batch_size)
    if grid_path is not None:
        labelled_grid(samples[:100].clamp(-1, 1), grid_path, ncol=10)
    p_samples = classifier.predict_proba(features_8x8(samples))
    p_real = classifier.predict_proba(features_8x8(test_images))
    counts = np.bincount(p_samples.argmax(1), minlength=10)
    return {
        "n_samples": n, "sampling_steps": steps,
        "confident_samples": float(np.mean(p_samples.max(1) >= 0.9)),
        "confident_real_test": float(np.mean(p_real.max(1) >= 0.9)),
        "mean_max_prob_samples": float(p_samples.max(1).mean()),
        "mean_max_prob_real_test": float(p_real.max(1).mean()),
        "class_histogram_samples": counts.tolist(),
        "ink_mean_samples": float(ink(samples).mean()), "ink_mean_real_test": float(ink(test_images).mean()),
    }


# --- report ---------------------------------------------------------------------------------------

def markdown_table(runs: list[dict], flip: bool) -> str:
    """One row per run; with ``flip`` the class-flip columns replace the ink-mass ones."""
    head = ["run", "spaces", "h policy", "eta", "t_0", "distances"]
    head += ["class kept", "flip pos->neg (at -d)", "flip neg->pos (at +d)"] if flip else \
        ["attr. control", "mean Spearman", "identity", "ink -d / +d"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        s = r["setting"]
        cells = [s["name"], s["space"], s["h_policy"], f"{s['eta']:g}", str(s["t_0"]),
                 f"auto: {r['distances'][0]:.2f}..{r['distances'][-1]:.2f} ({s['k']})" if s["start"] is None
                 else f"{s['start']:g}..{s['end']:g} ({s['k']})"]
        if flip:
            cells += [f"{r['identity']:.1%}", f"{r['flip_pos_to_neg']:.1%}", f"{r['flip_neg_to_pos']:.1%}"]
        else:
            cells += [f"{r['attribute_control']:.1%}", f"{r['spearman_mean']:.3f}", f"{r['identity']:.1%}",
                      f"{r['ink_ratio_low']:.2f} / {r['ink_ratio_high']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits.yml", help="config name in configs/ or a path")
    parser.add_argument("--model_path", type=Path, default=None, help="weights (default: the config's checkpoint)")
    parser.add_argument("--data_dir", type=Path, default=Path("data/digits"), help="folder written by make_digits")
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"), help="where the boundary files are")
    parser.add_argument("--attribute", default="thick", help="boundary attribute to edit along")
    parser.add_argument("--flip", type=int, nargs=2, metavar=("POS", "NEG"), default=None,
                        help="measure class flips POS->NEG at -d and NEG->POS at +d (and edit only these classes)")
    parser.add_argument("--t_0", type=int, default=None, help="mixing step (default: config edit.t_0)")
    parser.add_argument("--start_distance", type=float, default=None, help="default: config edit.start_distance")
    parser.add_argument("--end_distance", type=float, default=None, help="default: config edit.end_distance")
    parser.add_argument("--k", type=int, default=None, help="distances per edit (default: config edit.edit_img_number)")
    parser.add_argument("--space", choices=sorted(MOVED), default="both", help="latents to move in the default run")
    parser.add_argument("--h_policy", choices=("lagged", "once"), default="lagged", help="h injection of the default run")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta of the edits in the default run")
    parser.add_argument("--n_test", type=int, default=100, help="test digits to edit (per class: n/10); 0 = all")
    parser.add_argument("--ablations", action="store_true", help="also run the one-change-at-a-time ablations")
    parser.add_argument("--auto", action="store_true",
                        help="also run the default with the CLI's auto distances (--start_distance auto --end_distance "
                             f"auto: each space's class span widened {AUTO_SCALE:g} times about its centre)")
    parser.add_argument("--ablate_t0", type=int, nargs="*", default=[], help="other t_0 values for the ablations")
    parser.add_argument("--no_shift_t0", action="store_true",
                        help="use the default range unchanged for other t_0 (default: shift it by the change of the "
                             "z boundary's offset -b/||w||, so that it stays centred on the hyperplane)")
    parser.add_argument("--ablate_scale", type=float, nargs="*", default=[0.5, 1.5],
                        help="multipliers of the range's half-width (about its centre) for the ablations")
    parser.add_argument("--joint", action="store_true",
                        help="instead: the multi-attribute evaluation of thick and slant (a K x K grid, the single, "
                             "held and joint edits, with the digit's class free and held; see docs/digits_report.md)")
    parser.add_argument("--joint_range", type=float, nargs=2, default=(-3.0, 3.0), metavar=("START", "END"),
                        help="--joint: both attributes' targets, in the relative unit (-1 / +1: the class medians)")
    parser.add_argument("--joint_k", type=int, default=3, help="--joint: targets per attribute (the grid has K x K)")
    parser.add_argument("--joint_steps", type=int, default=5, help="--joint: denoising steps of every edit")
    parser.add_argument("--joint_eta", type=float, default=0.0, help="--joint: DDIM eta of every edit")
    parser.add_argument("--quality", action="store_true", help="also measure samples from noise")
    parser.add_argument("--n_samples", type=int, default=200, help="samples for --quality")
    parser.add_argument("--samples_png", type=Path, default=None, help="grid of 100 samples (with --quality)")
    parser.add_argument("--grid", type=Path, default=None, help="PNG of the default run's edits of 10 digits")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument("--table", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--batch_size", type=int, default=256, help="images per network call")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the edit and sampling noise (the CLI's default)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="network precision")
    args = parser.parse_args(argv)
    if args.joint:
        if not args.joint_range[0] < args.joint_range[1] or args.joint_k < 2:
            parser.error("--joint needs START < END and --joint_k of at least 2")
        try:
            check_scikit_image()  # an optional extra, needed for the stroke thickness
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    torch.set_num_threads(args.threads)
    retain_freed_memory()
    start_time = time.perf_counter()
    config = load_config(args.config)
    loaded = load_model(config, args.model_path, precision=args.precision)
    ckpt, sha = loaded.checkpoint, loaded.checkpoint_sha256
    size, channels = config.data.image_size, config.data.channels
    _, train_images, train_classes = load_split(args.data_dir, "train", size, channels)
    test_paths, test_images, test_classes = load_split(args.data_dir, "test", size, channels)
    classifier = train_classifier(train_images, train_classes)
    classifier_info = {"train_acc": float(classifier.score(features_8x8(train_images), train_classes)),
                       "test_acc": float(classifier.score(features_8x8(test_images), test_classes))}
    print(f"classifier: train acc {classifier_info['train_acc']:.3f}, test acc {classifier_info['test_acc']:.3f}", flush=True)

    idx = subset_per_class(test_classes, args.n_test or None, list(args.flip) if args.flip else None)
    images, classes = test_images[idx], test_classes[idx]
    edit = config.edit
    default = Setting("default", args.space, args.h_policy, args.eta, args.t_0 or edit.t_0,
                      edit.start_distance if args.start_distance is None else args.start_distance,
                      edit.end_distance if args.end_distance is None else args.end_distance, args.k or edit.edit_img_number)
    settings = [default] + ([dataclasses.replace(default, name=f"auto x{AUTO_SCALE:g}", start=None, end=None)]
                            if args.auto else [])
    if args.ablations:
        settings += [dataclasses.replace(default, name=f"{space} only", space=space) for space in ("z", "h") if space != default.space]
        if default.space != "both":
            settings.append(dataclasses.replace(default, name="both", space="both"))
        other_policy = "once" if default.h_policy == "lagged" else "lagged"
        settings.append(dataclasses.replace(default, name=f"h {other_policy}", h_policy=other_policy))
        settings.append(dataclasses.replace(default, name=f"eta {0.0 if default.eta > 0 else 1.0:g}", eta=0.0 if default.eta > 0 else 1.0))
        for t in args.ablate_t0:
            if t == default.t_0:
                continue
            # Keep the range centred on the z boundary as it moves with t_0 (the edit ignores the intercept).
            shift = 0.0 if args.no_shift_t0 else (
                z_offset(args.boundary_dir, config.name, args.attribute, t, sha)
                - z_offset(args.boundary_dir, config.name, args.attribute, default.t_0, sha))
            settings.append(dataclasses.replace(default, name=f"t_0 {t}", t_0=t, start=round(default.start + shift, 2),
                                                end=round(default.end + shift, 2)))
        center, half = (default.start + default.end) / 2, (default.end - default.start) / 2
        settings += [dataclasses.replace(default, name=f"range x{m:g}", start=center - m * half, end=center + m * half)
                     for m in args.ablate_scale]

    evaluator = Evaluator(loaded, images, edit.n_inv_step, args.batch_size)
    command = " ".join(["python", "-m", "scripts.evaluate_edits", *(argv if argv is not None else sys.argv[1:])])
    if args.joint:
        joint = JointSetting(start=args.joint_range[0], end=args.joint_range[1], k=args.joint_k, space=args.space,
                             h_policy=args.h_policy, eta=args.joint_eta, n_test_step=args.joint_steps,
                             t_0=args.t_0 or edit.t_0)
        with torch.inference_mode():
            report = run_joint(evaluator, joint, args.boundary_dir, config.name, sha, classes, classifier, args.seed,
                               args.batch_size)
        report.update({"config": config.name, "checkpoint_sha256": sha, "n_inv_step": edit.n_inv_step,
                       "test_digits": [test_paths[i].name for i in idx], "seed": args.seed,
                       "classifier": classifier_info, "command": command, "seconds": time.perf_counter() - start_time})
        if args.json:
            write_json(args.json, report)
        if args.table:
            write_bytes(args.table, joint_table(report).encode())
        print(joint_table(report))
        print(f"done in {report['seconds']:.0f}s")
        return 0
    runs, fidelity, boundary_info = [], {}, {}
    with torch.inference_mode():
        for setting in settings:
            t0 = time.perf_counter()
            found = unique_boundaries(args.boundary_dir, config.name, args.attribute, setting.t_0, sha)
            boundary_info[setting.t_0] = {s: {"path": str(p), "train_acc": r.train_acc, "test_acc": r.test_acc,
                                              "n_train": r.n_train, "n_test": r.n_test} for s, (p, r) in found.items()}
            paths = {s: p for s, (p, _) in found.items()}
            description = evaluator.describe(setting.t_0, setting_request(setting, paths, edit.n_test_step, args.seed,
                                                                          args.batch_size))
            normals = {s: torch.from_numpy(r.normal) for s, (_, r) in found.items()}
            inv = evaluator.inversion(setting.t_0)
            for s, n in normals.items():  # where the test latents sit along each normal: guides the distances
                proj = getattr(inv, s).flatten(1).double() @ n.double()
                boundary_info[setting.t_0][s]["projection_mean_std"] = [float(proj.mean()), float(proj.std())]
                boundary_info[setting.t_0][s]["latent_norm_mean"] = float(getattr(inv, s).flatten(1).norm(dim=1).mean())
            reference, edits = evaluator.reference(setting.t_0, description), evaluator.edits(setting.t_0, description)
            distances = torch.tensor(description.distances(), dtype=torch.float64)
            result = {"setting": dataclasses.asdict(setting), "distances": distances.tolist(),
                      **measure(reference, edits, distances, classes, classifier, tuple(args.flip) if args.flip else None)}
            if setting.t_0 not in fidelity:
                plain = dataclasses.replace(setting, space="z", start=0.0, end=0.0, k=1)
                recon = evaluator.plain_reconstruction(setting.t_0, evaluator.describe(setting.t_0, setting_request(
                    plain, paths, edit.n_test_step, args.seed, args.batch_size)))
                mse = float(((to_unit(recon) - to_unit(images)) ** 2).mean())
                fidelity[setting.t_0] = {"mse": mse, "psnr": psnr(mse),
                                         "max_abs": float((to_unit(recon) - to_unit(images)).abs().max()),
                                         "identity": float(np.mean(classifier.predict(features_8x8(recon)) == classes))}
            result["seconds"] = time.perf_counter() - t0
            runs.append(result)
            print(f"{setting.name:14s} control {result['attribute_control']:.1%}  spearman {result['spearman_mean']:.3f}  "
                  f"identity {result['identity']:.1%}  ink {result['ink_ratio_low']:.2f}/{result['ink_ratio_high']:.2f}"
                  + (f"  flip {result['flip_pos_to_neg']:.1%}/{result['flip_neg_to_pos']:.1%}" if args.flip else "")
                  + f"  ({result['seconds']:.0f}s)", flush=True)
            if setting is default and args.grid is not None:
                rows = subset_per_class(classes, 10)[:10]
                cells = torch.cat([images[rows][:, None], reference[rows][:, None], edits[rows]], dim=1)
                labelled_grid(cells.reshape(-1, *cells.shape[2:]).clamp(-1, 1), args.grid, ncol=cells.shape[1],
                              column_labels=["original", "reconstruction", *(f"d={d:+.2f}" for d in distances.tolist())])
        quality = None
        if args.quality:
            quality = sample_quality(evaluator.editor(default.t_0), classifier, test_images, args.n_samples, 100, args.seed,
                                     args.batch_size, args.samples_png)
            print(f"samples: {quality['confident_samples']:.1%} classified with p >= 0.9 "
                  f"(real test digits: {quality['confident_real_test']:.1%}); classes {quality['class_histogram_samples']}")

    shown = ckpt.resolve().relative_to(REPO) if ckpt.resolve().is_relative_to(REPO) else ckpt
    report = {"config": config.name, "checkpoint": str(shown), "checkpoint_sha256": sha, "attribute": args.attribute,
              "test_digits": [test_paths[i].name for i in idx], "n_inv_step": edit.n_inv_step,
              "n_test_step": edit.n_test_step, "seed": args.seed, "classifier": classifier_info,
              "boundaries": boundary_info, "fidelity": fidelity, "runs": runs, "quality": quality,
              "command": command,
              "seconds": time.perf_counter() - start_time}
    for t, f in fidelity.items():
        print(f"fidelity t_0 {t}: reconstruction MSE {f['mse']:.5f} (PSNR {f['psnr']:.1f} dB), identity {f['identity']:.1%}")
    if args.json:
        write_json(args.json, report)
    if args.table:
        write_bytes(args.table, markdown_table(runs, bool(args.flip)).encode())
    print(markdown_table(runs, bool(args.flip)))
    print(f"done in {report['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
