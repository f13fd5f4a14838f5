"""Directions without labels measured on the synthetic faces (issue 32; docs/faces_report.md section 9).

    .venv/bin/python main.py --discover --n_discover_img 64 --boundary_dir runs/faces_found --exp runs/faces_discover
    .venv/bin/python -m scripts.evaluation.faces_discovery --found runs/faces_found \\
        --json docs/faces_discovery.json --table docs/faces_discovery.md

Given the directions ``--discover`` wrote (``--found``) and the shipped supervised boundaries
(``--boundary_dir``), at the config's t_0:

- **found**: every direction edited on ``--n_test`` test faces from -3 to +3 (relative unit, z and h
  together, the config's denoising), each edit measured by the factor predictor; per direction and
  factor the mean over faces of Spearman's rho between the distance and the measured factor
  (``runners.engine.factor_matches``); a factor is found when some direction reaches |rho| >= 0.8;
- **captured**: the share of each supervised z normal's squared norm inside the span of the
  discovered z directions (random baseline r / D);
- **few labels**: per attribute and space, the SVM fitted in the discovered subspace (``fit_within``,
  as ``--boundary_search --within`` fits it) on ``--n_labels`` faces, half of each class, of the
  shipped search's training split, and, as the baseline, the SVM fitted on the same faces' full
  latents; each one's mean accuracy over ``--n_draws`` draws of the labels on that search's test
  split, beside the shipped full-label boundary's on the same faces;
- **subspace iteration**: on ``--n_exact`` test faces, the largest principal angle between the top-r
  subspace the iteration finds (the discovery's settings) and the exact one (a full Jacobian and
  its SVD).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runners.engine import (SPACES, Denoising, EditRequest, Engine, EngineOptions, Move, UserError, differentiable_net,
                            factor_matches, fit_boundary, latent_cache_root, load_boundary, load_config)
from scripts.evaluation.common import (EngineRunner, add_output_flags, add_search_flags, command_line, evaluation_engine,
                                       load_evaluated_model, run_reporting_errors, shipped_search, write_report)
from scripts.evaluation.faces_region import load_faces
from utils.faces.factors import ATTRIBUTES

RHO_FOUND = 0.8
CAPTURED = 0.5


def discovered(runner: EngineRunner, t_0: int, prefix: str) -> dict[str, dict[str, Path]]:
    """{direction: {space: file}} of the found folder at t_0 (``<prefix>_00`` ...)."""
    names = sorted(n for n in runner.index.attributes(t_0) if n.startswith(prefix + "_"))
    if not names:
        raise UserError(f"no {prefix}_NN directions at t_0 {t_0} in {runner.index.folder}: run main.py --discover")
    return {n: runner.index.find(n, t_0)[2] for n in names}


def found(runner: EngineRunner, directions: dict, t_0: int, denoising: Denoising, k: int) -> dict:
    """Each direction's edits on the runner's faces, named by the factor it moves (``factor_matches``)."""
    values = np.linspace(-3, 3, k)
    edits = {}
    for name, paths in directions.items():
        request = EditRequest((Move(name, -3.0, 3.0, paths=paths),), denoising, k=k, unit="relative")
        edits[name] = runner.edits(t_0, runner.describe(t_0, request))
        print(f"edited along {name}", flush=True)
    return factor_matches(edits, values)


def direction_basis(files) -> np.ndarray:
    """Orthonormal rows (r, D) float64 spanning the unit normals of the boundary ``files``."""
    rows = np.stack([load_boundary(f).normal.astype(np.float64) for f in files])
    return np.linalg.qr(rows.T)[0].T


def captured(runner: EngineRunner, directions: dict, supervised: dict, t_0: int) -> dict:
    """{attribute: share of its z normal inside the span of the discovered z directions}."""
    from utils.core.discovery import captured_share

    basis = direction_basis([p["z"] for p in directions.values()])
    return {a: float(captured_share(load_boundary(p["z"]).normal.astype(np.float64), basis))
            for a, p in supervised.items()}


def stratified_labels(labels: np.ndarray, pool: np.ndarray, n_labels: int, seed: int) -> list[np.ndarray]:
    """Per attribute (column of labels (N, A) in {-1, 0, 1}), n_labels // 2 positive and as many
    negative rows of ``pool``, seeded: the few labels a person would give, both classes shown."""
    rng = np.random.default_rng(seed)
    half, chosen = n_labels // 2, []
    for a in range(labels.shape[1]):
        pos, neg = pool[labels[pool, a] > 0], pool[labels[pool, a] < 0]
        if min(len(pos), len(neg)) < half:
            raise UserError(f"attribute {a}: fewer than {half} labelled faces of a class to choose from")
        chosen.append(np.concatenate([rng.choice(pos, half, replace=False), rng.choice(neg, half, replace=False)]))
    return chosen


def few_labels(engine, config, args, found: dict, supervised: dict, t_0: int) -> dict:
    """Per attribute and space, over ``--n_draws`` draws of ``--n_labels`` faces (half of each class,
    ``stratified_labels`` seeded seed, seed + 1, ...) from the shipped search's training split: the
    SVM fitted on their coordinates in the discovered directions' subspace (``fit_within``, what
    ``--boundary_search --within`` fits) and, as the baseline it should beat, the SVM fitted on the
    same faces' full latents (``fit_boundary``); each one's mean accuracy over the draws (and its
    standard error) on that search's test split (``plan_search`` with ``--n_train_img``,
    ``--n_test_img`` and the seed of the shipped fit), beside the shipped full-label boundary's on
    the same faces. ``engine``: the command line's (its latent cache)."""
    from utils.core.discovery import fit_within

    plan = shipped_search(config, ",".join(supervised), args)
    column = {name.lower(): a for a, name in enumerate(plan.names)}
    draws = [stratified_labels(plan.labels, plan.train, args.n_labels, args.seed + k) for k in range(args.n_draws)]
    test = plan.test
    rows = np.unique(np.concatenate([test, *(r for chosen in draws for r in chosen)]))
    read = engine.reader(False).read
    with engine.session(t_0, config.edit.n_inv_step) as editor:
        latents, _ = editor.invert(torch.stack([read(plan.paths[i]) for i in rows]), args.batch_size)
    where = {int(r): i for i, r in enumerate(rows)}
    bases = {s: np.stack([load_boundary(p[s]).normal.astype(np.float64) for p in found.values()]) for s in SPACES}
    flat = {s: getattr(latents, s).flatten(1).double().numpy() for s in SPACES}
    out = {}
    for attribute in supervised:
        out[attribute], a = {}, column[attribute.lower()]
        labelled = test[plan.labels[test, a] != 0]
        y_test = (plan.labels[labelled, a] > 0).astype(np.int64)
        for s in SPACES:
            x = flat[s]
            x_test = x[[where[int(r)] for r in labelled]]
            within, whole = [], []
            for chosen in draws:
                x_few = x[[where[int(r)] for r in chosen[a]]]
                y = (plan.labels[chosen[a], a] > 0).astype(np.int64)
                within.append(fit_within(x_few, y, bases[s], x_test, y_test).test_acc)
                whole.append(fit_boundary(x_few, y, x_test, y_test).test_acc)
            full = load_boundary(supervised[attribute][s])
            full_acc = float(np.mean((x_test @ full.coef.astype(np.float64) + full.intercept > 0) == y_test))
            out[attribute][s] = {"few": float(np.mean(within)), "few_se": standard_error(within),
                                 "few_full_space": float(np.mean(whole)), "few_full_space_se": standard_error(whole),
                                 "full": full_acc, "ratio": float(np.mean(within)) / full_acc,
                                 "ratio_full_space": float(np.mean(whole)) / full_acc,
                                 "full_file": float(full.test_acc), "n_test": int(len(labelled)),
                                 "n_draws": len(draws)}
        print(f"{attribute}: few labels z {out[attribute]['z']['few']:.3f} / full {out[attribute]['z']['full']:.3f}",
              flush=True)
    return out


def standard_error(values) -> float:
    """The standard error of the mean of ``values`` (0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def subspace_accuracy(runner: EngineRunner, t_0: int, rank: int, n: int) -> list[dict]:
    """On n faces: the iteration's top-``rank`` z subspace against the exact Jacobian's (degrees)."""
    from utils.core.discovery import exact_jacobian, jacobian_subspace, principal_angles

    net, out = differentiable_net(runner.engine.model), []
    latents = runner.inversion(t_0)
    for b in range(n):
        z = latents.z[b:b + 1].float()
        start = time.perf_counter()
        found_ = jacobian_subspace(net, z, t_0, runner.engine.model.alphas_cumprod, rank, 5,
                                   torch.Generator().manual_seed(b), oversample=8)
        iteration = time.perf_counter() - start
        start = time.perf_counter()
        jacobian = exact_jacobian(net, z, t_0, runner.engine.model.alphas_cumprod).double()
        exact = torch.linalg.svd(jacobian, full_matrices=False)[2][:rank]
        out.append({"angle": float(principal_angles(found_.basis, exact)), "iteration_seconds": iteration,
                    "exact_seconds": time.perf_counter() - start})
        print(f"face {b}: {out[-1]['angle']:.2f} degrees from the exact top-{rank}", flush=True)
    return out


def table(report: dict) -> str:
    lines = ["| direction | factor it moves most | mean per-face Spearman | change (sd) |", "|---|---|---|---|"]
    for name, m in report["found"].items():
        lines.append(f"| {name} | {m['factor']} | {m['spearman']:+.2f} | {m['change']:+.2f} |")
    lines += ["", "Few labels: mean accuracy over the draws (standard error) of the fit in the subspace, of the same "
              "labels' fit in the full space, and of the full-label boundary; the ratio is the subspace fit's to "
              "the full-label one's.", "",
              "| attribute | captured by the top directions | few labels z: subspace / full space / full labels (ratio) "
              "| few labels h: subspace / full space / full labels (ratio) |", "|---|---|---|---|"]
    for a in report["captured"]:
        few = report["few_labels"].get(a)
        cells = [f"{few[s]['few']:.3f} ({few[s]['few_se']:.3f}) / {few[s]['few_full_space']:.3f} / "
                 f"{few[s]['full']:.3f} ({few[s]['ratio']:.2f})" if few else "" for s in SPACES]
        lines.append(f"| {a} | {report['captured'][a]:.2f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml")
    parser.add_argument("--found", type=Path, required=True, help="the folder --discover wrote its directions into")
    parser.add_argument("--prefix", default="pc")
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"))
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"))
    parser.add_argument("--n_test", type=int, default=20, help="test faces each direction is edited on")
    parser.add_argument("--k", type=int, default=7, help="edits per face along each direction")
    parser.add_argument("--n_labels", type=int, default=10, help="labels of each few-label fit (half of each class)")
    parser.add_argument("--n_draws", type=int, default=10, help="draws of those labels, each fitted and scored")
    add_search_flags(parser)
    parser.add_argument("--attributes", default=",".join(ATTRIBUTES))
    parser.add_argument("--n_exact", type=int, default=3, help="faces whose exact Jacobian is compared")
    parser.add_argument("--cache_dir", type=Path, default=None,
                        help="the latent cache of the few-label fits' faces (default: the command line's)")
    add_output_flags(parser, batch_size=8)
    args = parser.parse_args(argv)
    if args.n_labels < 2 or args.n_draws < 1:
        parser.error(f"need --n_labels >= 2 (one face of each class) and --n_draws >= 1, got {args.n_labels} and "
                     f"{args.n_draws}")
    return run_reporting_errors(run, args, argv)


def run(args: argparse.Namespace, argv) -> int:
    start = time.perf_counter()
    config = load_config(args.config)
    t_0 = config.edit.t_0
    model = load_evaluated_model(config, None, args.precision, args.threads)
    engine = evaluation_engine(model)
    faces = load_faces(args.data_dir, args.n_test)
    runner = EngineRunner(engine, faces.images, config.edit.n_inv_step, args.batch_size, args.found)
    supervised_runner = EngineRunner(engine, faces.images, config.edit.n_inv_step, args.batch_size, args.boundary_dir)
    directions = discovered(runner, t_0, args.prefix)
    attributes = [a for a in args.attributes.split(",") if a]
    supervised = {a: supervised_runner.index.find(a, t_0)[2] for a in attributes}
    denoising = Denoising(config.edit.n_test_step, config.edit.eta, batch_size=args.batch_size, seed=args.seed)
    report = {"found": found(runner, directions, t_0, denoising, args.k),
              "captured": captured(runner, directions, supervised, t_0)}
    search_engine = Engine(model, EngineOptions(cache_root=latent_cache_root(args.cache_dir), show_progress=False))
    report["few_labels"] = few_labels(search_engine, config, args, directions, supervised, t_0)
    report["subspace"] = subspace_accuracy(runner, t_0, len(directions), args.n_exact)
    report.update(command=command_line("scripts.evaluation.faces_discovery", argv),
                  seconds=time.perf_counter() - start, t_0=t_0,
                  baseline_share=len(directions) / int(np.prod(model.shapes["z"])))
    write_report(report, table(report), args.json, args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
