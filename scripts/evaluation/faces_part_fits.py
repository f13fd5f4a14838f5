"""Boundaries fitted on each attribute's part of the face against the shipped whole-latent ones
(docs/faces_report.md section 8).

    .venv/bin/python main.py --boundary_search --edit_attr all --region auto --t_0 400 --n_train_img 1000 \\
        --n_test_img 300 --boundary_dir boundary/faces_parts --exp runs/faces_parts_search
    .venv/bin/python -m scripts.evaluation.faces_part_fits --json docs/faces_part_fits.json --table docs/faces_part_fits.md

The command line fits each z normal on the whole inverted latent x_{t_0}; on these faces most of it
then lies off the attribute's part (7 % of Smiling's on the mouth), so a move along it changes the
whole image, and a move confined to the part must be 1 / |n_M| longer there. ``--region auto`` fits
the same SVM on the same faces and split, each latent multiplied by its attribute's part (the data
set's ``attribute_parts.json``: where the renderer draws it). Reported per attribute from the two
folders' z files: held-out accuracy (as each search recorded it), the normal's mean share on each
test face's own part (``part_share``, over the shipped search's labelled test faces), and the
cosine between the two normals. Nothing is inverted or fitted here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from runners.engine import BoundaryIndex, latent_shapes, load_boundary, load_config
from scripts.evaluation.common import (add_search_flags, command_line, run_reporting_errors, shipped_search,
                                       write_report)
from scripts.evaluation.faces_normals import part_share
from scripts.evaluation.faces_runs import attribute_region, read_part_masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml")
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"), help="the whole-latent boundaries")
    parser.add_argument("--part_dir", type=Path, default=Path("boundary/faces_parts"), help="the part fits")
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"))
    parser.add_argument("--attributes", default="all", help="A,B,... (default: every attribute of the data set)")
    add_search_flags(parser)
    parser.add_argument("--seed", type=int, default=1234, help="the search's split seed (the shipped fit's)")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument("--table", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args, argv)


def run(args: argparse.Namespace, argv) -> int:
    start = time.perf_counter()
    config = load_config(args.config)
    t_0 = config.edit.t_0
    plan = shipped_search(config, args.attributes, args)
    masks = read_part_masks(args.data_dir, "train", [Path(plan.paths[i]).name for i in plan.test])
    indexes = [BoundaryIndex.of(folder, config.name, latent_shapes(config)) for folder in (args.boundary_dir,
                                                                                         args.part_dir)]
    report = {"attributes": {}}
    for a, attribute in enumerate(plan.names):
        whole, part = (load_boundary(index.find(attribute, t_0)[2]["z"]) for index in indexes)
        labelled = plan.labels[plan.test, a] != 0
        coverage = attribute_region(masks, attribute)[labelled]
        report["attributes"][attribute] = {
            "shipped": {"test_acc": float(whole.test_acc), "part_share": part_share(whole.normal.astype(np.float64),
                                                                                    coverage)},
            "part_fit": {"test_acc": float(part.test_acc), "train_acc": float(part.train_acc),
                         "part_share": part_share(part.normal.astype(np.float64), coverage),
                         "fit_region": part.fit_region},
            "cos": float(whole.normal.astype(np.float64) @ part.normal.astype(np.float64))}
    report.update(command=command_line("scripts.evaluation.faces_part_fits", argv), seconds=time.perf_counter() - start,
                  t_0=t_0, n_test=int(len(plan.test)), boundary_dir=str(args.boundary_dir), part_dir=str(args.part_dir))
    write_report(report, table(report), args.json, args.table)
    return 0


def table(report: dict) -> str:
    lines = ["| attribute | fitted on | held-out accuracy: shipped / part fit | share on the part: shipped / part fit "
             "| cos |", "|---|---|---|---|---|"]
    for attribute, e in report["attributes"].items():
        s, p = e["shipped"], e["part_fit"]
        lines.append(f"| {attribute} | {p['fit_region'] or 'the whole latent'} | {s['test_acc']:.3f} / "
                     f"{p['test_acc']:.3f} | {s['part_share']:.2f} / {p['part_share']:.2f} | {e['cos']:+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
