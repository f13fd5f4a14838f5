"""Measure boundary edits on the held-out TEST digits: attribute control, identity, fidelity.

    python -m scripts.evaluate_edits --attribute thick --ablations --quality \\
        --json docs/digits_eval.json --table docs/digits_eval.md --grid docs/digits_thick_edits.png

Every test digit is inverted to t_0 (DDIM, eta 0), reconstructed, and edited to K signed distances
along the boundaries of ``--attribute`` in ``--boundary_dir`` (files written by ``main.py
--boundary_search``, the current file of each space found by the engine's ``BoundaryIndex.find``).
Measured per run:

- attribute control (ink mass, for ``thick``): the fraction of digits whose ink mass (sum of pixel
  values in [0, 1]) at the largest distance exceeds the reconstruction's and at the smallest falls
  below it; and the mean over digits of Spearman's rank correlation between d_k and ink mass;
- identity: the fraction of all edits whose class, by a logistic regression (C = 1) trained on the TRAIN
  split (on 8x8 images 2x2-averaged from 16x16, on the 0..16 scale of load_digits), equals the
  digit's true label;
- class flip (with ``--flip POS NEG``, e.g. 3 8 for three_vs_eight): the fraction of POS digits
  classified NEG at the smallest distance and of NEG digits classified POS at the largest;
- fidelity: mean squared error and PSNR of inversion + regeneration (eta 0, no edit), pixels in [0, 1].

``--joint`` runs the multi-attribute evaluation instead (issue 22; docs/digits_report.md;
``scripts/evaluation/digits_joint.py``): thick and slant moved on a K x K grid of targets (the joint
move), thick alone, thick with slant held, and slant with thick held, with the digit's class free
and held (the ``digit_c`` boundaries of each digit's true class); measured from pixels
(``utils.core.morphometry``: stroke thickness and slant after Morpho-MNIST; needs scikit-image) with
``utils.core.edit_measures``: target gain, leak, additivity, class kept, each with its spread over
the digits.

``--ablations`` repeats the run with one setting changed at a time: z only / h only, the other h
policy, the other eta (0 / 1), other t_0 values (``--ablate_t0``; boundaries for them must exist;
the range is shifted by the change of the z boundary's centre, the 0 of the engine's relative unit:
midway between its class medians) and wider or narrower ranges (``--ablate_scale``, about the
range's centre). ``--quality`` also samples digits from noise and checks that the classifier
recognises them. Every digit goes through the engine (``runners.engine``, via
``scripts/evaluation/common.py``) exactly as ``main.py --edit_image_boundary`` edits it: edit k of a
digit draws its noise by the command line's rule, ``item_seed(seed, image_key(digit), 0, k,
domain=EDIT)``, so results depend on neither batch size nor order.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from runners.engine import (AUTO_SCALE, EVALUATION_NOISE, MOVED, Config, EditDescription, LoadedModel,
                            UserError, attribute_table, item_seed, load_config)
from scripts.evaluation import digits_joint
from scripts.evaluation.common import (add_output_flags, EngineRunner, Setting, ablations, command_line, evaluation_engine,
                                       load_evaluated_model, psnr, setting_request, shown_checkpoint,
                                       subset_per_class, t_0_shift, to_unit, write_report)
from utils.core.morphometry import check_scikit_image
from utils.io.plots import labelled_grid


# --------------------------------------------------------------------------------- data and measures

@dataclass(frozen=True)
class Digits:
    """The digits of one evaluation: the TRAIN split (for the classifier), the TEST split, and the
    indices ``chosen`` of the test digits edited."""
    train_images: torch.Tensor
    train_classes: np.ndarray
    test_paths: list[Path]
    test_images: torch.Tensor
    test_classes: np.ndarray
    chosen: np.ndarray

    @property
    def images(self) -> torch.Tensor:
        return self.test_images[self.chosen]

    @property
    def classes(self) -> np.ndarray:
        return self.test_classes[self.chosen]


def load_split(read: Callable[[Path], torch.Tensor], data_dir: Path, split: str
               ) -> tuple[list[Path], torch.Tensor, np.ndarray]:
    """Paths, images (N, C, H, W) in [-1, 1] (each file read by ``read``, e.g. the engine's
    ``ImageReader.read``) and true classes (N,) of one split of the digits set: the class is the
    ``digit_c`` column set to 1 in the attribute file."""
    folder, attr_file = data_dir / "images" / split, data_dir / "list_attr_digits.txt"
    if not folder.is_dir() or not attr_file.is_file():
        raise UserError(f"no digits in {folder} (or no {attr_file.name}); run `bash data_download.sh digits .` first")
    table = attribute_table(folder, attr_file, [f"digit_{c}" for c in range(10)])
    if not len(table):
        raise UserError(f"no image of {folder} has a row in {attr_file}; run `bash data_download.sh digits .` again")
    classes = np.argmax(table.labels, axis=1).astype(np.int64)
    return list(table.paths), torch.stack([read(p) for p in table.paths]), classes


def read_digits(read: Callable[[Path], torch.Tensor], args: argparse.Namespace) -> Digits:
    """Both splits, and the test digits to edit (``--n_test`` per class, ``--flip``'s classes only)."""
    _, train_images, train_classes = load_split(read, args.data_dir, "train")
    test_paths, test_images, test_classes = load_split(read, args.data_dir, "test")
    chosen = subset_per_class(test_classes, args.n_test or None, list(args.flip) if args.flip else None)
    return Digits(train_images, train_classes, test_paths, test_images, test_classes, chosen)


def ink(x: torch.Tensor) -> np.ndarray:
    """Ink mass: the sum of pixel values in [0, 1] per image. x: (N, C, H, W) in [-1, 1]."""
    return to_unit(x).flatten(1).sum(1).double().numpy()


def features_8x8(x: torch.Tensor) -> np.ndarray:
    """The classifier's input: (N, 64), 2x2-averaged pixels (16x16 -> 8x8) on load_digits' 0..16 scale."""
    return 16.0 * torch.nn.functional.avg_pool2d(to_unit(x), 2).flatten(1).double().numpy()


def train_classifier(images: torch.Tensor, classes: np.ndarray) -> LogisticRegression:
    return LogisticRegression(max_iter=5000, C=1.0).fit(features_8x8(images), classes)


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
        result["flip_pos_to_neg"] = float(np.mean(pred[classes == pos, 0] == neg)) if np.any(classes == pos) \
            else float("nan")
        result["flip_neg_to_pos"] = float(np.mean(pred[classes == neg, -1] == pos)) if np.any(classes == neg) \
            else float("nan")
    return result


def fidelity(runner: EngineRunner, t_0: int, n_test_step: int, classes: np.ndarray,
             classifier: LogisticRegression) -> dict:
    """How well the plain inversion + regeneration at ``t_0`` gives the digits back."""
    regenerated = runner.regeneration(t_0, n_test_step)
    recon, images = to_unit(regenerated), to_unit(runner.images)
    mse = float(((recon - images) ** 2).mean())
    return {"mse": mse, "psnr": psnr(mse), "max_abs": float((recon - images).abs().max()),
            "identity": float(np.mean(classifier.predict(features_8x8(regenerated)) == classes))}


def sample_quality(runner: EngineRunner, t_0: int, classifier: LogisticRegression, test_images: torch.Tensor,
                   n: int, steps: int, seed: int, grid_path: Path | None) -> dict:
    """DDIM (eta 0) samples from x_T ~ N(0, I): the classifier's confidence on them vs on real test digits."""
    gen = torch.Generator().manual_seed(item_seed(seed, domain=EVALUATION_NOISE))
    x_T = torch.randn((n, *test_images.shape[1:]), generator=gen)
    samples = runner.sample_images(t_0, x_T, steps)
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


# --------------------------------------------------------------------------------- the command line

def _edit_flags(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--h_policy", choices=("lagged", "once"), default="lagged",
                        help="h injection of the default run")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta of the edits in the default run")
    parser.add_argument("--n_test", type=int, default=100, help="test digits to edit (per class: n/10); 0 = all")
    parser.add_argument("--ablations", action="store_true", help="also run the one-change-at-a-time ablations")
    parser.add_argument("--auto", action="store_true",
                        help="also run the default with the CLI's auto distances (--start_distance auto --end_distance "
                             f"auto: each space's class span widened {AUTO_SCALE:g} times about its centre)")
    parser.add_argument("--ablate_t0", type=int, nargs="*", default=[], help="other t_0 values for the ablations")
    parser.add_argument("--no_shift_t0", action="store_true",
                        help="use the default range unchanged for other t_0 (default: shift it by the change of the "
                             "z boundary's centre, midway between its class medians, so that it stays centred on "
                             "the classes)")
    parser.add_argument("--ablate_scale", type=float, nargs="*", default=[0.5, 1.5],
                        help="multipliers of the range's half-width (about its centre) for the ablations")


def _run_flags(parser: argparse.ArgumentParser) -> None:
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
    add_output_flags(parser, batch_size=256)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The digits evaluation's flags (checked; a bad flag exits with argparse's message)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluate_edits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _edit_flags(parser)
    _run_flags(parser)
    args = parser.parse_args(argv)
    if args.joint and (not args.joint_range[0] < args.joint_range[1] or args.joint_k < 2):
        parser.error("--joint needs START < END and --joint_k of at least 2")
    return args


def default_setting(args: argparse.Namespace, config: Config) -> Setting:
    """The default run: the flags, else the config's edit section."""
    edit = config.edit
    return Setting("default", args.space, args.h_policy, args.eta, args.t_0 or edit.t_0,
                   edit.start_distance if args.start_distance is None else args.start_distance,
                   edit.end_distance if args.end_distance is None else args.end_distance,
                   args.k or edit.edit_img_number)


def settings(args: argparse.Namespace, config: Config, runner: EngineRunner) -> list[Setting]:
    """The default run, the auto run (``--auto``) and the ablations (``--ablations``)."""
    default = default_setting(args, config)
    found = [default] + ([dataclasses.replace(default, name=f"auto x{AUTO_SCALE:g}", start=None, end=None)]
                         if args.auto else [])
    if args.ablations:
        def shift(t: int) -> float:
            return 0.0 if args.no_shift_t0 else t_0_shift(runner, args.attribute, t, default.t_0)
        found += ablations(default, args.ablate_t0, args.ablate_scale, shift)
    return found


# --------------------------------------------------------------------------------- one-attribute runs

def boundary_info(runner: EngineRunner, attribute: str, t_0: int) -> dict:
    """The boundary files used at ``t_0`` (the engine's current files), their fit, and where the
    evaluated latents sit along each normal (which guides the distances)."""
    paths = runner.boundaries(attribute, t_0)
    latents = runner.inversion(t_0)
    placed = runner.probe(attribute, t_0).source_distances(latents)
    info = {}
    for space, path in paths.items():
        header = runner.header(path)
        values = torch.tensor([row[space] for row in placed], dtype=torch.float64)
        info[space] = {"path": str(path), "train_acc": header.train_acc, "test_acc": header.test_acc,
                       "n_train": header.n_train, "n_test": header.n_test,
                       "projection_mean_std": [float(values.mean()), float(values.std())],
                       "latent_norm_mean": float(getattr(latents, space).flatten(1).norm(dim=1).mean())}
    return info


def run_setting(runner: EngineRunner, setting: Setting, args: argparse.Namespace, n_test_step: int,
                classes: np.ndarray, classifier: LogisticRegression
                ) -> tuple[dict, EditDescription, torch.Tensor, torch.Tensor]:
    """One run: its result (the setting, distances and ``measure``), its description, the
    reference reconstructions and the edits."""
    description = runner.describe(setting.t_0, setting_request(setting, args.attribute, n_test_step, args.seed,
                                                               args.batch_size))
    reference, edits = runner.reference(setting.t_0, description), runner.edits(setting.t_0, description)
    distances = torch.tensor(description.distances(), dtype=torch.float64)
    result = {"setting": dataclasses.asdict(setting), "distances": distances.tolist(),
              **measure(reference, edits, distances, classes, classifier, tuple(args.flip) if args.flip else None)}
    return result, description, reference, edits


def edit_grid(path: Path, digits: Digits, reference: torch.Tensor, edits: torch.Tensor, distances: list[float]
              ) -> None:
    """The default run's edits of 10 digits (one per class where it can): original, reconstruction, edits."""
    rows = subset_per_class(digits.classes, 10)[:10]
    cells = torch.cat([digits.images[rows][:, None], reference[rows][:, None], edits[rows]], dim=1)
    labelled_grid(cells.reshape(-1, *cells.shape[2:]).clamp(-1, 1), path, ncol=cells.shape[1],
                  column_labels=["original", "reconstruction", *(f"d={d:+.2f}" for d in distances)])


def run_settings(runner: EngineRunner, args: argparse.Namespace, config: Config, digits: Digits,
                 classifier: LogisticRegression) -> dict:
    """Every setting's run, the boundaries and fidelity per t_0: the report's ``runs``,
    ``boundaries`` and ``fidelity``."""
    runs, fidelities, boundaries = [], {}, {}
    n_test_step = config.edit.n_test_step
    for setting in settings(args, config, runner):
        t0 = time.perf_counter()
        if setting.t_0 not in boundaries:
            boundaries[setting.t_0] = boundary_info(runner, args.attribute, setting.t_0)
        result, description, reference, edits = run_setting(runner, setting, args, n_test_step, digits.classes,
                                                            classifier)
        if setting.t_0 not in fidelities:
            fidelities[setting.t_0] = fidelity(runner, setting.t_0, n_test_step, digits.classes, classifier)
        result["seconds"] = time.perf_counter() - t0
        runs.append(result)
        print(f"{setting.name:14s} control {result['attribute_control']:.1%}  spearman {result['spearman_mean']:.3f}  "
              f"identity {result['identity']:.1%}  ink {result['ink_ratio_low']:.2f}/{result['ink_ratio_high']:.2f}"
              + (f"  flip {result['flip_pos_to_neg']:.1%}/{result['flip_neg_to_pos']:.1%}" if args.flip else "")
              + f"  ({result['seconds']:.0f}s)", flush=True)
        if setting.name == "default" and args.grid is not None:
            edit_grid(args.grid, digits, reference, edits, result["distances"])
    for t, f in fidelities.items():
        print(f"fidelity t_0 {t}: reconstruction MSE {f['mse']:.5f} (PSNR {f['psnr']:.1f} dB), "
              f"identity {f['identity']:.1%}")
    return {"boundaries": boundaries, "fidelity": fidelities, "runs": runs}


def quality(runner: EngineRunner, args: argparse.Namespace, config: Config, digits: Digits,
            classifier: LogisticRegression) -> dict | None:
    """``--quality``: the sample-quality check (None without it)."""
    if not args.quality:
        return None
    found = sample_quality(runner, args.t_0 or config.edit.t_0, classifier, digits.test_images, args.n_samples, 100,
                           args.seed, args.samples_png)
    print(f"samples: {found['confident_samples']:.1%} classified with p >= 0.9 "
          f"(real test digits: {found['confident_real_test']:.1%}); classes {found['class_histogram_samples']}")
    return found


# --------------------------------------------------------------------------------- main

def classifier_for(digits: Digits) -> tuple[LogisticRegression, dict]:
    """The identity classifier, trained on the TRAIN split, and its accuracies."""
    classifier = train_classifier(digits.train_images, digits.train_classes)
    info = {"train_acc": float(classifier.score(features_8x8(digits.train_images), digits.train_classes)),
            "test_acc": float(classifier.score(features_8x8(digits.test_images), digits.test_classes))}
    print(f"classifier: train acc {info['train_acc']:.3f}, test acc {info['test_acc']:.3f}", flush=True)
    return classifier, info


def evaluate(args: argparse.Namespace, config: Config, model: LoadedModel, argv: list[str] | None,
             started: float) -> tuple[dict, str]:
    """The whole evaluation on the loaded ``model``: (the report, its markdown table)."""
    engine = evaluation_engine(model)
    digits = read_digits(engine.reader(False).read, args)
    classifier, classifier_info = classifier_for(digits)
    runner = EngineRunner(engine, digits.images, config.edit.n_inv_step, args.batch_size, args.boundary_dir)
    report = {"config": config.name, "checkpoint_sha256": model.checkpoint_sha256,
              "n_inv_step": config.edit.n_inv_step, "test_digits": [digits.test_paths[i].name for i in digits.chosen],
              "seed": args.seed, "classifier": classifier_info}
    with torch.inference_mode():
        if args.joint:
            def classify(x: torch.Tensor) -> np.ndarray:
                return classifier.predict(features_8x8(x))
            report = {**digits_joint.evaluate(runner, args, config, digits.classes, classify), **report}
            table = digits_joint.joint_table(report)
        else:
            report.update({"checkpoint": shown_checkpoint(model.checkpoint), "attribute": args.attribute,
                           "n_test_step": config.edit.n_test_step,
                           **run_settings(runner, args, config, digits, classifier),
                           "quality": quality(runner, args, config, digits, classifier)})
            table = markdown_table(report["runs"], bool(args.flip))
    report.update({"command": command_line("scripts.evaluate_edits", argv), "seconds": time.perf_counter() - started})
    return report, table


def main(argv: list[str] | None = None) -> int:
    """Parse -> load the model -> evaluate -> write. UserError (and OSError) propagate to the
    dispatcher (``scripts/evaluate_edits.py``), which prints them as one line."""
    args = parse(argv)
    if args.joint:
        try:
            check_scikit_image()  # an optional extra, needed for the stroke thickness
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    started = time.perf_counter()
    config = load_config(args.config)
    model = load_evaluated_model(config, args.model_path, args.precision, args.threads)
    report, table = evaluate(args, config, model, argv, started)
    write_report(report, table, args.json, args.table)
    return 0
