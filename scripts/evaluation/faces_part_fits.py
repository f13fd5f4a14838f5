"""Boundaries fitted on each attribute's part of the face only (docs/faces_report.md section 7).

    .venv/bin/python -m scripts.evaluation.faces_part_fits --out runs/faces_part_fits \\
        --json docs/faces_part_fits.json --table docs/faces_part_fits.md
    .venv/bin/python -m scripts.evaluate_edits --config faces.yml --boundary_dir runs/faces_part_fits \\
        --n_test 200 --per_side 10 --k 3 --start -10 --end 10 [--region_parts]

The command line fits each z normal on the whole inverted latent x_{t_0}; on these faces most of it
then lies off the attribute's part (7 % of Smiling's on the mouth, section 7), so a move along it
changes the whole image, and a move confined to the part must be 1 / |n_M| longer there. Here the
search's linear SVM (``fit_boundary``, C 1), on the shipped search's faces (its ``--n_train_img`` /
``--n_test_img`` split of the data set with the seed of the shipped fit, inverted through the
command line's latent cache), is fitted on each face's latent multiplied by its part's
coverage (``part_masked``; ``utils.faces.factors.ATTRIBUTE_PARTS``, the renderer's masks), so that
the normal is made of the parts' pixels only. It is written to ``--out`` as a boundary file with the
shipped z file's header (its fitted coef, intercept and accuracies, no class summary: the absolute
unit only); the shipped h file is copied unchanged (at t_0 400 with eta 0 the h move does not change
the output, section 7). Reported per attribute beside the shipped normal: held-out accuracy (of the
masked latents for the part fit), the normal's mean share on each face's part (``part_share``), and
the cosine between the two normals.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runners.engine import (Engine, EngineOptions, fit_boundary, latent_cache_root, load_boundary, load_config,
                            save_boundary)
from scripts.evaluation.common import (add_output_flags, add_search_flags, command_line, load_evaluated_model,
                                       run_reporting_errors, shipped_search, write_report)
from scripts.evaluation.faces_normals import part_share
from scripts.evaluation.faces_runs import attribute_region, read_part_masks


def part_masked(latents: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Latents (N, C, H, W) times each face's part coverage (N, H, W) in [0, 1], every channel alike:
    what a fit on the part alone sees (0 off the part)."""
    return np.asarray(latents) * np.asarray(coverage)[:, None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml")
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"), help="the shipped boundaries")
    parser.add_argument("--out", type=Path, required=True, help="folder the part fits are written to")
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"))
    parser.add_argument("--attributes", default="all", help="A,B,... (default: every attribute of the data set)")
    add_search_flags(parser)
    add_output_flags(parser, batch_size=16)  # --seed: the search's split seed (the shipped fit's)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args, argv)


def run(args: argparse.Namespace, argv) -> int:
    start = time.perf_counter()
    config = load_config(args.config)
    t_0 = config.edit.t_0
    plan = shipped_search(config, args.attributes, args)
    engine = Engine(load_evaluated_model(config, None, args.precision, args.threads),
                    EngineOptions(cache_root=latent_cache_root(None), show_progress=False))
    index = engine.boundary_index(args.boundary_dir)
    shipped = {a: index.find(a, t_0)[2] for a in plan.names}  # every file found before any inversion
    rows = np.concatenate([plan.train, plan.test])
    read = engine.reader(False).read
    with engine.session(t_0, config.edit.n_inv_step) as editor:
        latents, _ = editor.invert(torch.stack([read(plan.paths[i]) for i in rows]), args.batch_size)
    z = latents.z.double().numpy()
    masks = read_part_masks(args.data_dir, "train", [Path(plan.paths[i]).name for i in rows])
    train, test = np.arange(len(plan.train)), len(plan.train) + np.arange(len(plan.test))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"attributes": {}}
    for a, attribute in enumerate(plan.names):
        coverage = attribute_region(masks, attribute)
        masked = part_masked(z, coverage)
        labels = plan.labels[rows, a]
        fit_rows, test_rows = train[labels[train] != 0], test[labels[test] != 0]
        fitted = fit_boundary(masked[fit_rows], labels[fit_rows] > 0, masked[test_rows], labels[test_rows] > 0)
        record = load_boundary(shipped[attribute]["z"])
        save_boundary(args.out / Path(shipped[attribute]["z"]).name, dataclasses.replace(
            record, normal=fitted.normal.reshape(record.normal.shape), coef=fitted.coef.reshape(record.normal.shape),
            intercept=fitted.intercept, train_acc=fitted.train_acc, test_acc=fitted.test_acc, class_summary=None))
        shutil.copyfile(shipped[attribute]["h"], args.out / Path(shipped[attribute]["h"]).name)
        own = record.normal.astype(np.float64).reshape(-1)
        flat = z.reshape(len(z), -1)
        report["attributes"][attribute] = {
            "shipped": {"test_acc": float(np.mean((flat[test_rows] @ record.coef.astype(np.float64).reshape(-1)
                                                   + record.intercept > 0) == (labels[test_rows] > 0))),
                        "part_share": part_share(own, coverage[test_rows])},
            "part_fit": {"test_acc": float(fitted.test_acc), "train_acc": float(fitted.train_acc),
                         "part_share": part_share(fitted.normal.astype(np.float64), coverage[test_rows])},
            "cos": float(own @ fitted.normal.astype(np.float64))}
        print(f"{attribute}: held-out accuracy {report['attributes'][attribute]['shipped']['test_acc']:.3f} shipped, "
              f"{fitted.test_acc:.3f} on the part", flush=True)
    report.update(command=command_line("scripts.evaluation.faces_part_fits", argv), seconds=time.perf_counter() - start,
                  t_0=t_0, n_train=int(len(plan.train)), n_test=int(len(plan.test)), out=str(args.out))
    write_report(report, table(report), args.json, args.table)
    return 0


def table(report: dict) -> str:
    lines = ["| attribute | held-out accuracy: shipped / part fit | share on the part: shipped / part fit | cos |",
             "|---|---|---|---|"]
    for attribute, e in report["attributes"].items():
        s, p = e["shipped"], e["part_fit"]
        lines.append(f"| {attribute} | {s['test_acc']:.3f} / {p['test_acc']:.3f} | {s['part_share']:.2f} / "
                     f"{p['part_share']:.2f} | {e['cos']:+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
