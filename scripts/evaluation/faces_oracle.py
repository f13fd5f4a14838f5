"""The perfect edit, measured like the model's: what the faces evaluation's criteria give when the
renderer itself changes one attribute (docs/faces_report.md section 6).

    .venv/bin/python -m scripts.evaluation.faces_oracle --json docs/faces_oracle.json --table docs/faces_oracle.md

The first ``--n_test`` rendered test faces of known factors; each attribute is toggled on every face
to the other side of its class (``utils.faces.factors.toggled``: only the factors the attribute's
score reads change) and the face rendered again. Both renders are measured by the factor predictor
and judged by the evaluation's own measures (``scripts/evaluation/faces_measures.py``): success
(the measured score crossed to the other side), the nuisance factors kept (each changed by less than
``--noise_multiple`` x the predictor's RMSE), and both. Since nothing but the attribute changed,
what falls short of 100 % is the instrument's cross-talk: the ceiling the model's edits are judged
against. No model is run; seconds on a CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scripts.evaluation.common import add_output_flags, command_line, run_reporting_errors, write_report
from scripts.evaluation.faces_measures import kept, share
from scripts.evaluation.faces_runs import load_instrument, read_split
from utils.faces.factors import ATTRIBUTES, FACTOR_NAMES, attribute_scores, factors_from_row, toggled
from utils.faces.predictor import DEFAULT_PATH, PREDICTED_NAMES, images_to_tensor
from utils.faces.render import render_face


def rendered(faces) -> torch.Tensor:
    """(N, 3, 32, 32) images in [-1, 1] of FaceFactors ``faces``, as the data set renders them."""
    return images_to_tensor(np.stack([render_face(f)[0] for f in faces]))


def read_png(path: Path) -> torch.Tensor:
    """A rendered face (3, 32, 32) in [-1, 1]."""
    return images_to_tensor(np.asarray(Image.open(path).convert("RGB"))[None])[0]


def oracle(instrument, faces, measured: np.ndarray) -> dict:
    """Per attribute: every face toggled to its other side, judged as the evaluation judges an edit."""
    scale, before = instrument.scale, attribute_scores(measured, PREDICTED_NAMES)
    out = {}
    for a, attribute in enumerate(ATTRIBUTES):
        side = np.where(before[:, a] > 0, 1, -1)
        after = instrument.measure(rendered([toggled(f, attribute, s < 0) for f, s in zip(faces, side)]))
        score = attribute_scores(after, PREDICTED_NAMES)[:, a]
        success = (score * side < 0) & ((before[:, a] - score) * side > 0)
        all_kept, per_factor = kept(measured, after, scale.noise_multiple * scale.factor_rmse,
                                    scale.nuisance(attribute))
        out[attribute] = {"n": int(len(faces)), "success": share(success), "kept": share(all_kept),
                          "success_and_kept": share(success & all_kept), "kept_per_factor": per_factor}
    return out


def table(report: dict) -> str:
    lines = ["| attribute | success | nuisance kept | success with nuisance kept |", "|---|---|---|---|"]
    for attribute, r in report["attributes"].items():
        lines.append(f"| {attribute} | {r['success']:.0%} | {r['kept']:.0%} | {r['success_and_kept']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"))
    parser.add_argument("--n_test", type=int, default=200, help="rendered test faces toggled")
    parser.add_argument("--noise_multiple", type=float, default=3.0,
                        help="a change below this many RMSEs of the predictor counts as noise (as evaluate_edits)")
    add_output_flags(parser, batch_size=8)  # --json and --table (no model runs: the rest are unused)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args, argv)


def run(args: argparse.Namespace, argv) -> int:
    start = time.perf_counter()
    test = read_split(read_png, args.data_dir, "test", args.n_test)
    faces = [factors_from_row(dict(zip(FACTOR_NAMES, row))) for row in test.factors]
    instrument = load_instrument(DEFAULT_PATH, test, args.noise_multiple)
    report = {"attributes": oracle(instrument, faces, instrument.measure(rendered(faces))), "n_test": len(faces),
              "noise_multiple": args.noise_multiple, "command": command_line("scripts.evaluation.faces_oracle", argv),
              "seconds": time.perf_counter() - start}
    write_report(report, table(report), args.json, args.table)
    return 0

if __name__ == "__main__":
    sys.exit(main())
