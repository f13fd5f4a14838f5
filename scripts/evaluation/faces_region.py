"""Region-locked edits measured on the synthetic faces (issue 31; docs/faces_report.md section 8).

    .venv/bin/python -m scripts.evaluation.faces_region --n_test 40 --n_loco 6 \\
        --json docs/faces_region.json --table docs/faces_region.md --picture docs/faces_region.png

For each (attribute, part) pair -- Smiling with the mouth, Eyeglasses with the eyes, a hair colour
with the hair -- test faces on the attribute's negative side (by the factor predictor) are edited
toward its positive side, to ``--target`` (in ``--unit``), with the command line's defaults
otherwise (the config's t_0, steps, eta, seeds): without a region, with the face's own part mask
(``--region <part>``: the outside kept on the unedited run, h confined to the part's cells or not
moved), and with LOCO-Edit's projection (``--region_method loco``) on the first ``--n_loco`` faces.
Every edit is made by the engine (``Engine.edit_in_regions``, the command line's region edit).

Measured per variant, over the faces (median and quartiles where per face):

- outside changed: the share of the pixels beyond the feather whose 8-bit value moved by more
  than 2 levels from the reconstruction (the target: under 1 %);
- leakage (LOCO-Edit's audit): RMS change outside / (RMS change inside + RMS change outside);
- success: the attribute's predicted score crosses its class threshold (``attribute_scores``);
- score change: the edited attribute's |score change| in units of its spread over the test faces;
- other factors: the mean absolute change of every other predicted factor, each in units of its
  spread over the test faces; and per unit of score change, pooled over the faces (sum over sum):
  the leak as section 6 measures it, fair between an edit that moves its attribute and one that
  hardly does; each factor's mean change is reported too, and the table names the three largest;
- seam: the mean gradient magnitude on the ring of pixels along the region's border, over the
  reconstruction's there (1: no seam).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runners.engine import Denoising, EditRequest, Move, Region, load_config, outline_region
from scripts.evaluation.common import (EngineRunner, command_line, evaluation_engine, load_evaluated_model,
                                       run_reporting_errors, write_report)
from scripts.evaluation.faces_measures import kept_pixels, outside_changed
from scripts.evaluation.faces_runs import read_part_masks
from utils.faces.factors import ATTRIBUTES, FACTOR_NAMES, PREDICTED_CONTINUOUS, attribute_scores
from utils.faces.predictor import images_to_tensor, load_predictor
from utils.io.images import dequantize, quantize
from utils.io.plots import labelled_grid

PAIRS = (("Smiling", "mouth"), ("Eyeglasses", "eyes"), ("Blond_Hair", "hair"))
#: The factors each attribute is defined on (``utils.faces.factors.ATTRIBUTE_RULES``): not "other" factors.
OWN_FACTORS = {"Smiling": ("smile",), "Eyeglasses": ("glasses",), "Blond_Hair": ("hair_tone", "hair_gray")}
VARIANTS = ("whole image", "region, h in its cells", "region, h kept", "LOCO projection")


@dataclass(frozen=True)
class Faces:
    """The evaluated test faces: images (N, 3, 32, 32) in [-1, 1], their names and part masks
    {part: (N, 32, 32) float32 in [0, 1]}."""
    images: torch.Tensor
    names: list[str]
    masks: dict[str, np.ndarray]


def load_faces(data_dir: Path, n: int) -> Faces:
    """The first ``n`` test faces of the data set and their part masks (masks_test.npz)."""
    from PIL import Image

    with np.load(data_dir / "masks_test.npz", allow_pickle=False) as parts:
        names = [str(v) for v in parts["names"][:n]]
    masks = read_part_masks(data_dir, "test", names)
    images = images_to_tensor(np.stack([np.asarray(Image.open(data_dir / "images" / "test" / name).convert("RGB"))
                                        for name in names]))
    return Faces(images, names, masks)


# ----------------------------------------------------------------------------------- measures

def leakage(edit: torch.Tensor, recon: torch.Tensor, inside: np.ndarray, outside: np.ndarray) -> float:
    """RMS change outside / (RMS change inside + RMS change outside) (LOCO-Edit's leakage)."""
    change = ((edit - recon) ** 2).sum(dim=0).numpy()
    rms_in = float(np.sqrt(change[inside].mean())) if inside.any() else 0.0
    rms_out = float(np.sqrt(change[outside].mean())) if outside.any() else 0.0
    return rms_out / (rms_in + rms_out) if rms_in + rms_out > 0 else 0.0


def seam(image: torch.Tensor, ring: np.ndarray) -> float:
    """The mean gradient magnitude of ``image`` (C, H, W) on the pixels of ``ring`` (H, W) bool."""
    x = image.clamp(-1, 1).numpy()
    gy, gx = np.gradient(x, axis=(1, 2))
    return float(np.sqrt(gx ** 2 + gy ** 2).sum(axis=0)[ring].mean())


def border_ring(mask: np.ndarray) -> np.ndarray:
    """The pixels of the region (mask > 0.5) next to a pixel outside it, and those outside next to it."""
    inside = mask > 0.5
    padded = np.pad(inside, 1, mode="edge")
    near_out = ~padded[:-2, 1:-1] | ~padded[2:, 1:-1] | ~padded[1:-1, :-2] | ~padded[1:-1, 2:]
    near_in = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return (inside & near_out) | (~inside & near_in)


@dataclass(frozen=True)
class Measured:
    """One variant's numbers over the faces (per face arrays)."""
    outside: np.ndarray
    leakage: np.ndarray
    success: np.ndarray
    others: np.ndarray
    seam: np.ndarray
    #: |score change| over the score's spread across the faces: what ``others`` is per unit of.
    moved: np.ndarray
    #: {other factor: (N,) |change| over its spread}: what ``others`` averages.
    per_factor: dict[str, np.ndarray]

    def summary(self) -> dict:
        def spread(v):
            return {"median": float(np.median(v)), "q1": float(np.quantile(v, 0.25)), "q3": float(np.quantile(v, 0.75)),
                    "mean": float(np.mean(v))}
        return {"n": int(len(self.success)), "outside_changed": spread(self.outside), "leakage": spread(self.leakage),
                "success": float(np.mean(self.success)), "other_factors": spread(self.others),
                "score_change": spread(self.moved), "other_per_unit": self.other_per_unit(), "seam": spread(self.seam),
                "other_factor_means": {n: float(np.mean(v)) for n, v in self.per_factor.items()}}

    def other_per_unit(self) -> float:
        """The other factors' mean change per unit of the edited score's, pooled over the faces
        (sum over sum, as ``utils.core.edit_measures.pooled_leak``): an edit that moves its
        attribute further may move the rest further too."""
        total = float(self.moved.sum())
        return float(self.others.sum()) / total if total > 0 else float("nan")


def scores_of(predicted: dict) -> np.ndarray:
    """(N, A) attribute scores (``ATTRIBUTES`` order) of the predictor's measurements {factor: (N,)}."""
    names = tuple(n for n in FACTOR_NAMES if n in predicted)
    return attribute_scores(np.stack([np.asarray(predicted[n], dtype=np.float64) for n in names], axis=1), names)


def measure(edits: torch.Tensor, recon: torch.Tensor, masks: np.ndarray, attribute: str, predictor, spread: np.ndarray,
            feather: float, score_sd: float) -> Measured:
    """The measures of edits (B, C, H, W) against their reconstructions, with the faces' masks (B, H, W);
    spread: the continuous factors' spread, score_sd: the attribute score's, over the test faces."""
    predicted = {k: v.double().numpy() for k, v in predictor.predict(edits).items()}
    before = {k: v.double().numpy() for k, v in predictor.predict(recon).items()}
    a = ATTRIBUTES.index(attribute)
    scores = scores_of(predicted)[:, a]
    moved = np.abs(scores - scores_of(before)[:, a]) / score_sd
    others = [i for i, n in enumerate(PREDICTED_CONTINUOUS) if n not in OWN_FACTORS[attribute]]
    continuous = np.stack([predicted[n] - before[n] for n in PREDICTED_CONTINUOUS], axis=1) / spread
    rows = []
    for b in range(len(edits)):
        inside, kept = masks[b] > 0.5, kept_pixels(masks[b], feather)
        ring = border_ring(masks[b])
        rows.append((outside_changed(edits[b], recon[b], kept), leakage(edits[b], recon[b], inside, kept),
                     seam(edits[b], ring) / max(seam(recon[b], ring), 1e-9)))
    rows = np.array(rows)
    changes = np.abs(continuous[:, others])
    per_factor = {PREDICTED_CONTINUOUS[i]: changes[:, j] for j, i in enumerate(others)}
    return Measured(rows[:, 0], rows[:, 1], scores > 0, changes.mean(axis=1), rows[:, 2], moved, per_factor)


# ----------------------------------------------------------------------------------- the runs

def variant_request(attribute: str, target: float, denoising: Denoising, variant: str, feather: float,
                    part_mask: str = "part", unit: str = "relative", held: tuple[str, ...] = ()) -> EditRequest:
    """The command line's request of one variant, holding ``held`` (``--condition_attr``; "auto": the
    atlas's suggestion) in every variant alike (the region's spec is a placeholder: the masks are
    each face's own part, given to ``Engine.edit_in_regions``)."""
    region = {"whole image": None,
              "region, h in its cells": Region(part_mask, "cells", feather),
              "region, h kept": Region(part_mask, "none", feather),
              "LOCO projection": Region(part_mask, "none", feather, "loco")}[variant]
    return EditRequest((Move(attribute, target, target),), denoising, k=1, held=held, unit=unit, region=region)


def run_pair(runner: EngineRunner, attribute: str, part: str, faces: Faces, rows: np.ndarray, args, predictor,
             spread: np.ndarray, score_sd: float, denoising: Denoising) -> tuple[dict, dict]:
    """Every variant of one (attribute, part) pair: {variant: summary} and {variant: edits} (for the picture)."""
    t_0 = runner.engine.model.config.edit.t_0
    results, pictures = {}, {}
    for variant in VARIANTS:
        chosen = rows[: args.n_loco] if variant == "LOCO projection" else rows
        if not len(chosen):
            continue
        start = time.perf_counter()
        sub = runner.subset(chosen)
        description = sub.describe(t_0, variant_request(attribute, args.target, denoising, variant, args.feather,
                                                        unit=args.unit, held=args.held))
        masks = faces.masks[part][chosen]
        with sub.session(t_0) as editor:
            latents = sub.inversion(t_0)
            if description.region is None:
                recon, edits = editor.reconstruct(latents, description), editor.edit_all(latents, description,
                                                                                         sub.seed_keys)
            else:
                recon, edits = runner.engine.edit_in_regions(editor, latents, description, masks, sub.seed_keys)
        measured = measure(edits[:, 0], recon, masks, attribute, predictor, spread, args.feather, score_sd)
        results[variant] = {**measured.summary(), "seconds": time.perf_counter() - start}
        pictures[variant] = (recon, edits[:, 0])
        print(f"{attribute} / {part}, {variant}: success {results[variant]['success']:.0%}, outside changed "
              f"{results[variant]['outside_changed']['median']:.2%}, leakage {results[variant]['leakage']['median']:.3f}"
              f" ({results[variant]['seconds']:.0f} s)", flush=True)
    return results, pictures


def picture(faces: Faces, pairs: dict, path: Path, n: int = 3) -> None:
    """Rows: a few faces of each pair; columns: original, reconstruction, each variant's edit, the
    region-locked ones with the part outlined (a variant run on none of the pairs has no column;
    a face a variant did not reach is left white); upscaled 4x for reading."""
    variants = [v for v in VARIANTS if any(v in shown for _, shown in pairs.values())]
    cells, labels = [], ["original", "reconstruction", *variants]
    for (attribute, part), (rows, shown) in pairs.items():
        for j, row in enumerate(rows[:n]):
            recon, _ = shown["whole image"]
            line = [faces.images[row], recon[j]]
            for variant in variants:
                edit = shown[variant][1][j] if variant in shown and j < len(shown[variant][1]) else torch.ones_like(recon[j])
                line.append(edit if variant == "whole image" else
                            dequantize(outline_region(quantize(edit[None]), faces.masks[part][row]))[0])
            cells += line
    images = torch.nn.functional.interpolate(torch.stack(cells).clamp(-1, 1), scale_factor=4, mode="nearest")
    labelled_grid(images, path, column_labels=labels, ncol=len(labels))


def largest(summary: dict, n: int = 3) -> str:
    """The ``n`` other factors that changed most on average, as 'name value, ...'."""
    means = summary.get("other_factor_means", {})
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(means.items(), key=lambda kv: -kv[1])[:n])


def table(report: dict) -> str:
    lines = ["| attribute / part | variant | success | outside changed (> 2/255), median [IQR] | leakage | "
             "score change (sd) | other factors (sd) | other factors per unit of score change | seam | "
             "largest other factors (mean, sd) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for pair, variants in report["pairs"].items():
        for variant, r in variants.items():
            o, leak, oth, sm = r["outside_changed"], r["leakage"], r["other_factors"], r["seam"]
            lines.append(f"| {pair} | {variant} (n {r['n']}) | {r['success']:.0%} | {o['median']:.2%} "
                         f"[{o['q1']:.2%}, {o['q3']:.2%}] | {leak['median']:.3f} | {r['score_change']['median']:.2f} | "
                         f"{oth['median']:.3f} | {r['other_per_unit']:.3f} | {sm['median']:.2f} | {largest(r)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml")
    parser.add_argument("--model_path", type=Path, default=None)
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"))
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"))
    parser.add_argument("--n_test", type=int, default=40, help="test faces considered (those on the negative side are edited)")
    parser.add_argument("--n_loco", type=int, default=6, help="faces edited with LOCO's projection (an exact Jacobian each)")
    parser.add_argument("--target", type=float, default=30.0, help="the edit's target, in --unit (default: the "
                                                                   "far end of faces.yml's range)")
    parser.add_argument("--unit", choices=("absolute", "relative"), default="absolute", help="the target's unit")
    parser.add_argument("--held", type=lambda v: tuple(a for a in v.split(",") if a), default=(),
                        help="attributes every variant holds, comma-separated, as --condition_attr (auto: the atlas's)")
    parser.add_argument("--feather", type=float, default=2.0, help="the region's feather, pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None)
    parser.add_argument("--picture", type=Path, default=None)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args, argv)


def run(args: argparse.Namespace, argv) -> int:
    start = time.perf_counter()
    config = load_config(args.config)
    model = load_evaluated_model(config, args.model_path, "fp32", args.threads)
    faces = load_faces(args.data_dir, args.n_test)
    runner = EngineRunner(evaluation_engine(model), faces.images, config.edit.n_inv_step, 8, args.boundary_dir)
    predictor = load_predictor()
    measured = {k: v.double().numpy() for k, v in predictor.predict(faces.images).items()}
    spread = np.array([float(measured[n].std(ddof=1)) for n in PREDICTED_CONTINUOUS])
    denoising = Denoising(config.edit.n_test_step, eta=config.edit.eta, batch_size=8)  # the command line's
    report, shown = {"pairs": {}}, {}
    scores = scores_of(measured)
    for attribute, part in PAIRS:
        a = ATTRIBUTES.index(attribute)
        rows = np.flatnonzero(scores[:, a] < 0)  # the faces on the attribute's negative side
        results, pictures = run_pair(runner, attribute, part, faces, rows, args, predictor, spread,
                                     float(scores[:, a].std()), denoising)
        report["pairs"][f"{attribute} / {part}"] = results
        shown[(attribute, part)] = (rows, pictures)
    report.update(command=command_line("scripts.evaluation.faces_region", argv), seconds=time.perf_counter() - start,
                  n_test=args.n_test, target=args.target, unit=args.unit, held=list(args.held), eta=config.edit.eta,
                  feather=args.feather, t_0=config.edit.t_0)
    write_report(report, table(report), args.json, args.table)
    if args.picture:
        picture(faces, shown, args.picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
