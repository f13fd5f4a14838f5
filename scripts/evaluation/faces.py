"""Measure boundary edits of the synthetic faces (configs/faces.yml) on held-out TEST faces, with
the factor predictor as the instrument.

    python -m scripts.evaluate_edits --config faces.yml --quality --entanglement --ablations \\
        --json docs/faces_eval.json --table docs/faces_eval.md --grid docs/faces_edits.png

The instrument is ``utils.faces.predictor`` (``--predictor``; the shipped weights are checked
against their SHA-256), a CNN trained on rendered faces only, never on this model's outputs. It
measures the 20 factors of a face (``PREDICTED_NAMES``); an attribute's score is
``attribute_scores`` of the measured factors, whose sign is the attribute's class. Its own error is
measured first, on every rendered test face of known factors: per factor and per score the RMSE
against the truth and the spread (sd) of its measurements; both are in the report
(``instrument``).

Every edit goes through the engine (``runners.engine`` via ``scripts/evaluation/common.py``)
exactly as ``main.py --edit_image_boundary`` makes it: the config's t_0, inversion and denoising
steps, distances (``--start_distance``/``--end_distance``, absolute unit by default) and K, eta 1,
h policy lagged, both spaces, seed 1234, edit k of a face drawing its noise from ``item_seed(seed,
image_key(face), 0, k)``; each flag changes one of them. Edits are measured as the command line
writes them (clipped to [-1, 1], 8-bit). Measured:

1. model quality (``--quality``): (a) the frequency of each attribute (score > 0) among
   ``--n_samples`` images sampled from noise (DDIM eta ``--sample_eta``, default 0, over ``--sample_steps`` steps from x_T,
   ``Editor.sample_images``) against the test faces', and the difference in percentage points;
   (b) the Fréchet distance between the predictor's penultimate features (``features``) of the
   samples and of the test faces, beside that of as many TRAIN faces (the floor: two sets of real
   faces of that size); (c) the PSNR of inversion + regeneration (eta 0, no h injection,
   ``Editor.regenerate``) at t_0 of the evaluated faces (``--n_test``).
2. success: for each attribute, the first ``--per_side`` faces (of the ``--n_test`` evaluated) on
   its negative side (score < 0 on the original face) and the first on its positive side, each
   edited along the whole range; a face on the negative side is judged at the range's largest
   target (``to_positive``), one on the positive side at its smallest (``to_negative``). Success:
   the score of that edit moved toward the other side from the unedited reconstruction's (the
   engine's reference, with the edit's h injection) AND lies on the other side of 0. Also reported:
   moved, crossed, the share whose reconstruction already lay across (the inversion flipped it),
   the shares whose score moved toward / away from the other side by more than ``--noise_multiple``
   x the score's RMSE ("beyond noise"), and the share on the positive side at each distance.
3. leak and nuisance: per edit (reference -> judged edit) the change of every other measured factor
   per unit of change of the target's score, both in units of their sd over the test faces,
   pooled over the edits (sum |df| / sd_f over sum |ds| / sd_s; ``utils.core.edit_measures.leak``)
   with the per-edit median and quartiles, and the mean signed change in the factor's units. An
   edit keeps the nuisance factors (bg_r, bg_g, bg_b, pos_x, pos_y, scale, skin_tone, less the
   factors the target's score reads) when each changes by less than ``--noise_multiple`` (3) x the
   predictor's RMSE on that factor (the difference of two measurements of an unchanged factor has
   an sd of about 1.4 RMSE). Per attribute: success, kept, and success with the nuisance kept.
   Where the data set has its part masks, the background is also read off the pixels, with no
   instrument (``faces_measures.background_changed``): kept when under 1 % of its pixels (beyond
   2 px of the head) moved by more than 2/255; the renderer paints it flat and lights only the
   head, so that keeps the background's colour and the head's outline (position and size).
   ``--region_parts`` confines each attribute's edit to its part of each face
   (``utils.faces.factors.ATTRIBUTE_PARTS``), as ``main.py --region <part>`` does.
4. entanglement (``--entanglement``, ``scripts/evaluation/faces_studies.py``): pairs of attributes
   whose z normals have |cos| >= 0.3 (the engine's ``HOLD_THRESHOLD``) or ``--pairs``; the first
   is edited alone, with the second held, and (in a one-space run) with the second moved to each
   face's own position; the leak into the second's score per unit of the first's, and how much
   the hold lowers it, with their spreads over the faces.
5. ablations (``--ablations``, same module): z only, h only and both at each t_0 of ``--ablate_t0``
   (default: every t_0 with boundaries), and the other eta (0 for the command line's 1: how much
   of the change is the edits' fresh noise), on ``--ablation_attributes``; whether h-only edits
   move the attributes (a sign test of the edits that moved beyond the noise: toward against
   away); the best t_0, beside t_m of ``--radius_json`` (``main.py --radius``).

Every change is measured against the engine's reference (the eta-0 reconstruction the command
line writes beside the edits), so with eta 1 it includes what the fresh noise changes; the eta
ablation separates the two.

Cost, in network calls of one image at one step: (inversion + reference) ``--n_test`` x 80, the
attribute runs 13 x 2 ``--per_side`` x K x 40 (defaults: 8,000 + 8,000 + 145,600 = 161,600);
``--quality`` ``--n_samples`` x ``--sample_steps`` + ``--n_test`` x 40 (28,000); ``--entanglement``
pairs x 2 (3 in one space) x ``--entanglement_n`` x ``--entanglement_k`` x 40 (at most 28,800);
``--ablations`` 3 spaces x t_0 values x 4 attributes x 2 ``--ablation_per_side`` x K x 40 (40,320
per t_0, the run's own setting reused) + 13,440 for the other eta. One call costs about 1.1 GFLOP (fp32): 14 ms on one
thread of a loaded 2-core AMD EPYC; ``--precision bf16`` is about 1.5 times faster there. The
progress lines give the rate measured so far and the time left; the report keeps both.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from runners.engine import EVALUATION_NOISE, MOVED, Config, LoadedModel, UserError, item_seed, load_config
from scripts.evaluation import faces_report, faces_studies
from scripts.evaluation.common import (add_output_flags, EngineRunner, command_line, evaluation_engine, load_evaluated_model, psnr,
                                       shown_checkpoint, to_unit, write_report)
from scripts.evaluation.faces_measures import Sweep, frechet_distance, frequency_table, sweep_measures
from scripts.evaluation.faces_runs import (FaceRunner, FaceSetting, FaceSplit, Progress, load_instrument,
                                           read_part_masks, read_split)
from utils.core.edit_measures import spread
from utils.faces.factors import ATTRIBUTES, attribute_scores
from utils.faces.predictor import DEFAULT_PATH, PREDICTED_NAMES
from utils.io.plots import labelled_grid

#: Relative-unit range used when ``--unit relative`` is given without distances: three half class
#: separations either side of the boundary's centre (the class medians are at -1 and +1).
RELATIVE_RANGE = (-3.0, 3.0)


# --------------------------------------------------------------------------------- the attribute runs

def default_setting(args: argparse.Namespace, config: Config) -> FaceSetting:
    """The run's setting: the flags, else the command line's defaults (the config's edit section)."""
    edit = config.edit
    unit = args.unit or edit.unit
    relative = unit == "relative"
    own = unit == edit.unit  # the config's distances are in its own unit
    if not own and not relative and (args.start_distance is None or args.end_distance is None):
        raise UserError(f"the config's distances are in the {edit.unit} unit: give --start and --end in absolute units")
    own_range = edit.default_range(region=args.region_parts)  # main.py's, --region's included
    start = args.start_distance if args.start_distance is not None else \
        (float(own_range[0]) if own else RELATIVE_RANGE[0])
    end = args.end_distance if args.end_distance is not None else \
        (float(own_range[1]) if own else RELATIVE_RANGE[1])
    return FaceSetting("region" if args.region_parts else "default", args.t_0 or edit.t_0, float(start), float(end),
                       args.k or edit.edit_img_number, args.space, unit, edit.eta if args.eta is None else args.eta,
                       args.h_policy, args.n_test_step or edit.n_test_step, args.region_parts)


def evaluated_attributes(runner: EngineRunner, wanted: str | None, t_0: int) -> list[str]:
    """The attributes to evaluate: those of ``--attributes`` (comma-separated, any case), else
    every attribute the predictor scores with boundaries in both spaces at ``t_0``, in
    ``ATTRIBUTES`` order. UserError when none is left."""
    fitted = {name.lower(): name for name in runner.index.held_together([], t_0)}
    known = {a.lower(): a for a in ATTRIBUTES}
    names = [n.strip() for n in wanted.split(",") if n.strip()] if wanted else [a for a in ATTRIBUTES
                                                                                if a.lower() in fitted]
    for name in names:
        if name.lower() not in known:
            raise UserError(f"the factor predictor cannot score {name!r}; the faces attributes are "
                            f"{', '.join(ATTRIBUTES)}")
        if name.lower() not in fitted:
            runner.boundaries(name, t_0)  # the engine's message: what exists, what to run
    if not names:
        raise UserError(f"no boundary of a faces attribute at t_0 {t_0} in {runner.index.folder}; fit them with "
                        "main.py --boundary_search --config faces.yml --edit_attr all")
    return [fitted[n.lower()] for n in names]


def run_attributes(fr: FaceRunner, setting: FaceSetting, attributes: list[str], args: argparse.Namespace,
                   progress: Progress) -> tuple[dict[str, Sweep], dict, dict[str, tuple[np.ndarray, torch.Tensor]]]:
    """Every attribute's sweep of its chosen faces: (the sweeps, their measures, the grid's images:
    per attribute the first ``--grid_faces`` faces of each side with original, reference, edits)."""
    sweeps, results, shown = {}, {}, {}
    for i, attribute in enumerate(attributes):
        started = time.perf_counter()
        rows = fr.chosen(attribute, args.per_side)
        sweep, edits = fr.sweep(setting, attribute, rows, args.batch_size)
        result = sweep_measures(sweep, fr.instrument.scale)
        result["distances"] = sweep.distances.tolist()
        result["seconds"] = time.perf_counter() - started
        sweeps[attribute], results[attribute] = sweep, result
        pick = np.concatenate([np.flatnonzero(sweep.side < 0)[:args.grid_faces],
                               np.flatnonzero(sweep.side > 0)[:args.grid_faces]])
        if len(pick):
            reference = fr.reference(fr.describe(setting, attribute, args.batch_size))[0]
            cells = torch.cat([fr.runner.images[rows[pick]][:, None], reference[rows[pick]][:, None], edits[pick]], 1)
            shown[attribute] = (rows[pick], sweep.side[pick], cells)
        up, down = result["to_positive"], result["to_negative"]
        progress.step(len(rows) * setting.k * setting.n_test_step,
                      f"{attribute} ({i + 1}/{len(attributes)}): to positive {up['success']:.0%} of {up['n']}, "
                      f"to negative {down['success']:.0%} of {down['n']}; nuisance kept "
                      f"{result['both']['kept']:.0%}, success with it {result['both']['success_and_kept']:.0%} "
                      f"({result['seconds']:.0f}s)")
    return sweeps, results, shown


# --------------------------------------------------------------------------------- model quality

def sample_faces(fr: FaceRunner, t_0: int, n: int, steps: int, seed: int, eta: float = 0.0) -> torch.Tensor:
    """``n`` images sampled from noise (DDIM with ``eta``, ``steps`` points from T - 1), x_T and the
    step noise drawn from the evaluation's own seed domain (``EVALUATION_NOISE``)."""
    generator = torch.Generator().manual_seed(item_seed(seed, domain=EVALUATION_NOISE))
    x_T = torch.randn((n, *fr.runner.images.shape[1:]), generator=generator)
    return fr.runner.sample_images(t_0, x_T, steps, eta, seed)


def reconstruction_psnr(original: torch.Tensor, regenerated: torch.Tensor) -> dict:
    """PSNR (pixels in [0, 1]) of regenerated images against the originals: of the mean squared
    error over all faces, and per face (its spread)."""
    errors = ((to_unit(regenerated) - to_unit(original)) ** 2).flatten(1).mean(1).double().numpy()
    per_face = np.array([psnr(float(e)) for e in errors])
    return {"mse": float(errors.mean()), "psnr": psnr(float(errors.mean())), "psnr_per_face": spread(per_face)}


def quality(fr: FaceRunner, setting: FaceSetting, test: FaceSplit, train: FaceSplit, args: argparse.Namespace,
            progress: Progress) -> dict:
    """``--quality``: attribute frequencies and the Fréchet distance of samples from noise against
    the test faces (the floor: as many train faces), and the reconstruction PSNR at t_0."""
    inst = fr.instrument
    samples = sample_faces(fr, setting.t_0, args.n_samples, args.sample_steps, args.seed, args.sample_eta)
    progress.step(args.n_samples * args.sample_steps, f"{args.n_samples} samples from noise")
    if args.samples_png is not None:
        labelled_grid(samples[:64].clamp(-1, 1), args.samples_png, ncol=8, min_tile=96)
    test_scores = attribute_scores(inst.test_measured, PREDICTED_NAMES)
    frequencies = frequency_table(attribute_scores(inst.measure(samples), PREDICTED_NAMES), test_scores)
    test_features = inst.features(test.images)
    distance = {"samples_vs_test": frechet_distance(inst.features(samples), test_features),
                "train_vs_test": frechet_distance(inst.features(train.images), test_features),
                "n_samples": len(samples), "n_train": len(train.names), "n_test": len(test.names),
                "features": f"the factor predictor's penultimate layer ({test_features.shape[1]} values)"}
    regenerated = fr.runner.regeneration(setting.t_0, setting.n_test_step)
    progress.step(len(regenerated) * setting.n_test_step, "inversion + regeneration")
    found = {"sampling_steps": args.sample_steps, "sampling_eta": args.sample_eta, "frequencies": frequencies,
             "mean_abs_frequency_difference_points": float(np.mean([abs(v["difference_points"])
                                                                    for v in frequencies.values()])),
             "frechet": distance, "reconstruction": {"t_0": setting.t_0, "n_test_step": setting.n_test_step,
                                                     "n_faces": len(regenerated),
                                                     **reconstruction_psnr(fr.runner.images, regenerated)}}
    difference = found["mean_abs_frequency_difference_points"]
    print(f"quality: attribute frequencies of samples differ from the test faces' by {difference:.1f} points "
          f"on average; Fréchet distance {distance['samples_vs_test']:.2f} "
          f"(train vs test: {distance['train_vs_test']:.2f}); reconstruction PSNR "
          f"{found['reconstruction']['psnr']:.1f} dB", flush=True)
    return found


# --------------------------------------------------------------------------------- the command line

def _edit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="faces.yml", help="config name in configs/ or a path")
    parser.add_argument("--model_path", type=Path, default=None, help="weights (default: the config's checkpoint)")
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"), help="folder written by make_faces")
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"), help="where the boundary files are")
    parser.add_argument("--predictor", type=Path, default=DEFAULT_PATH,
                        help="factor predictor weights (default: the shipped ones, checked against their SHA-256; "
                             "another file is used as it is and its digest reported)")
    parser.add_argument("--attributes", default=None,
                        help="A,B,...: attributes to evaluate (default: every faces attribute with boundaries)")
    parser.add_argument("--t_0", type=int, default=None, help="mixing step (default: config edit.t_0)")
    parser.add_argument("--n_inv_step", type=int, default=None, help="inversion steps (default: config)")
    parser.add_argument("--n_test_step", type=int, default=None, help="denoising steps (default: config)")
    parser.add_argument("--start_distance", "--start", type=float, default=None,
                        help=f"first target (default: config edit.start_distance, -edit.region_distance with "
                             f"--region_parts where set, as main.py; {RELATIVE_RANGE[0]:g} with --unit relative)")
    parser.add_argument("--end_distance", "--end", type=float, default=None,
                        help=f"last target (default: config edit.end_distance, edit.region_distance with "
                             f"--region_parts where set; {RELATIVE_RANGE[1]:g} with --unit relative)")
    parser.add_argument("--unit", choices=("absolute", "relative"), default=None,
                        help="unit of the distances, as main.py's --edit_unit")
    parser.add_argument("--k", type=int, default=None, help="edits per face (default: config edit.edit_img_number)")
    parser.add_argument("--space", choices=sorted(MOVED), default="both", help="latents to move")
    parser.add_argument("--h_policy", choices=("lagged", "once"), default="lagged", help="h injection")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta of the edits (default: the config's, as on "
                        "the command line)")
    parser.add_argument("--n_test", type=int, default=200, help="test faces inverted (the first of the split)")
    parser.add_argument("--per_side", type=int, default=20,
                        help="faces edited per attribute on each side of its threshold (from the --n_test faces)")
    parser.add_argument("--region_parts", action="store_true",
                        help="confine each attribute's edit to its part of each face (mouth, eyes, hair, face: "
                             "utils.faces.factors.ATTRIBUTE_PARTS), as main.py's --region <part> does")
    parser.add_argument("--noise_multiple", type=float, default=3.0,
                        help="a change below this many RMSEs of the predictor counts as noise (nuisance kept)")


def _run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quality", action="store_true", help="also measure samples from noise and reconstructions")
    parser.add_argument("--n_samples", type=int, default=200, help="--quality: samples from noise")
    parser.add_argument("--sample_steps", type=int, default=100, help="--quality: DDIM steps of the samples")
    parser.add_argument("--sample_eta", type=float, default=0.0,
                        help="--quality: DDIM eta of the samples (1 with --sample_steps 1000: DDPM's ancestral sampler)")
    parser.add_argument("--samples_png", type=Path, default=None, help="--quality: a grid of 64 samples")
    faces_studies.add_flags(parser)
    parser.add_argument("--grid", type=Path, default=None, help="PNG of edits of a few faces along each attribute")
    parser.add_argument("--grid_faces", type=int, default=1, help="faces per attribute and side in --grid")
    add_output_flags(parser, batch_size=64)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The faces evaluation's flags (a bad one exits with argparse's message)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluate_edits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _edit_flags(parser)
    _run_flags(parser)
    args = parser.parse_args(argv)
    small = [flag for flag, value in (("--n_test", args.n_test), ("--per_side", args.per_side),
                                      ("--n_samples", args.n_samples - 1), ("--batch_size", args.batch_size),
                                      ("--threads", args.threads)) if value < 1]
    if small:
        parser.error(f"{small[0]} is too small")
    if args.k is not None and args.k < 2:
        parser.error("--k must be at least 2 (a range has two ends)")
    if not 0 <= args.sample_eta < float("inf"):
        parser.error(f"--sample_eta must be a finite number >= 0, got {args.sample_eta}")
    faces_studies.check_flags(parser, args)
    if args.region_parts and (args.entanglement or args.ablations):
        parser.error("--region_parts measures the attribute runs only; run --entanglement and --ablations without it")
    return args


# --------------------------------------------------------------------------------- main

def planned_calls(n_faces: int, setting: FaceSetting, n_inv_step: int, attributes: list[str],
                  args: argparse.Namespace) -> int:
    """About how many network calls (image x step) the attribute runs and ``--quality`` take."""
    calls = n_faces * (n_inv_step + setting.n_test_step) + len(attributes) * 2 * args.per_side * setting.k * \
        setting.n_test_step
    return calls + (args.n_samples * args.sample_steps + n_faces * setting.n_test_step if args.quality else 0)


def evaluate(args: argparse.Namespace, config: Config, model: LoadedModel, argv: list[str] | None,
             started: float) -> tuple[dict, str]:
    """The whole evaluation on the loaded ``model``: (the report, its markdown tables)."""
    engine = evaluation_engine(model)
    read = engine.reader(False).read
    test = read_split(read, args.data_dir, "test")
    instrument = load_instrument(args.predictor, test, args.noise_multiple)
    setting = default_setting(args, config)
    n_inv_step = args.n_inv_step or config.edit.n_inv_step
    runner = EngineRunner(engine, test.images[:args.n_test], n_inv_step, args.batch_size, args.boundary_dir)
    attributes = evaluated_attributes(runner, args.attributes, setting.t_0)
    # the part masks, where the data set has them: the region setting needs them (else one line),
    # and each edit's background is read off the pixels with them
    has_masks = setting.region or (args.data_dir / "masks_test.npz").is_file()
    masks = read_part_masks(args.data_dir, "test", test.names[:args.n_test]) if has_masks else None
    fr = FaceRunner(runner, instrument, args.seed, masks)
    plans = faces_studies.plan_studies(fr, setting, attributes, args)
    progress = Progress(planned_calls(len(runner.images), setting, n_inv_step, attributes, args)
                        + sum(plan.calls() for plan in plans.values()))
    report = {"config": config.name, "checkpoint": shown_checkpoint(model.checkpoint),
              "checkpoint_sha256": model.checkpoint_sha256, "precision": args.precision,
              "setting": dataclasses.asdict(setting), "n_inv_step": n_inv_step, "seed": args.seed,
              "attributes": attributes, "test_faces": test.names[:args.n_test], "per_side": args.per_side,
              "instrument": instrument.info, "noise_multiple": args.noise_multiple}
    with torch.inference_mode():
        runner.inversion(setting.t_0)
        progress.step(len(runner.images) * n_inv_step, f"{len(runner.images)} test faces inverted to t_0 "
                                                       f"{setting.t_0}")
        sweeps, report["edits"], shown = run_attributes(fr, setting, attributes, args, progress)
        if args.quality:
            train = read_split(read, args.data_dir, "train", args.n_samples)
            report["quality"] = quality(fr, setting, test, train, args, progress)
        report.update(faces_studies.run_studies(fr, sweeps, plans, args, progress))
    if args.grid is not None:
        faces_report.edit_grid(args.grid, shown, setting, report["edits"], report["test_faces"])
    report.update({"command": command_line("scripts.evaluate_edits", argv),
                   "hardware": faces_report.hardware(args.threads), "seconds": time.perf_counter() - started, "network": progress.summary()})
    return report, faces_report.markdown(report)


def main(argv: list[str] | None = None) -> int:
    """Parse -> load the model -> evaluate -> write. UserError (and OSError) propagate to the
    dispatcher (``scripts/evaluate_edits.py``), which prints them as one line."""
    args = parse(argv)
    started = time.perf_counter()
    config = load_config(args.config)
    model = load_evaluated_model(config, args.model_path, args.precision, args.threads)
    report, table = evaluate(args, config, model, argv, started)
    write_report(report, table, args.json, args.table)
    return 0
