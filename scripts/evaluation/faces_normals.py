"""What the fitted normals are made of, on the synthetic faces (docs/faces_report.md section 9):
each shipped SVM normal beside its attribute's class-mean difference and, given ``--oracle``, the
renderer's perfect move, on the faces the SVM was fitted on, in z and in h.

    .venv/bin/python -m scripts.evaluation.faces_normals --found runs/faces_found64 \\
        --oracle runs/oracle_dirs_t400 --write_mean_difference runs/faces_mean_difference \\
        --json docs/faces_normals.json --table docs/faces_normals.md

The boundary search's own images and split (``plan_search`` with ``--edit_attr all``, ``--n_train_img``,
``--n_test_img`` and the seed of the shipped fit), inverted to the config's t_0 through the command
line's latent cache (seconds when the search has run). Per attribute and space, for up to three unit
directions n: the shipped boundary's normal; the difference of the class means of the training
latents, m = mean(x | +1) - mean(x | -1), over its norm (what the SVM tends to as C -> 0); and the
mean of the renderer's perfect edits inverted to t_0 (``--oracle``: the folder
``faces_oracle_directions`` writes; the best single direction in the least-squares sense):

- test accuracy: the SVM's own (its file); for the other two, with the threshold halfway between
  the classes' mean projections;
- separation: m . n, how far apart the classes' mean latents lie along n (the edits move by tens),
  and d' = that over the classes' pooled within-class sd along n;
- part share (z): the share of n's squared norm on the pixels of the attribute's part (mouth, eyes,
  hair or face; each test face's own mask, averaged; the part's share of the image beside it);
- captured: the share of n's squared norm inside the span of the discovered directions of
  ``--found`` (``--discover``'s ``pc_NN``) in the same space (random baseline r / D).

``--write_mean_difference DIR`` writes the class-mean differences as boundary files (the shipped
files' headers, the halfway threshold as intercept, their accuracies and class summaries), so that
``scripts.evaluate_edits --boundary_dir DIR`` edits along them.

A normal fitted in 3,072 dimensions from about a thousand faces separates them along directions in
which the latents hardly vary (high d', small separation), which no part mask or low-rank subspace
holds; the class-mean difference follows what differs between the classes on average.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runners.engine import (SPACES, BoundaryRecord, Engine, EngineOptions, class_summary, latent_cache_root,
                            load_boundary, load_config, save_boundary)
from scripts.evaluation.common import (add_output_flags, add_search_flags, command_line, load_evaluated_model,
                                       run_reporting_errors, shipped_search, write_report)
from scripts.evaluation.faces_discovery import direction_basis
from scripts.evaluation.faces_region import load_faces
from utils.core.discovery import captured_share

#: The part of the face each attribute is drawn in (None: none of the masks' parts alone).
PARTS = {"Smiling": "mouth", "Mouth_Slightly_Open": "mouth", "Mustache": "mouth", "Narrow_Eyes": "eyes",
         "Eyeglasses": "eyes", "Bangs": "hair", "Black_Hair": "hair", "Brown_Hair": "hair", "Blond_Hair": "hair",
         "Gray_Hair": "hair", "Wearing_Hat": None, "Pale_Skin": "face", "Young": "face"}


def separation(normal: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """(difference of the class means' projections on ``normal``, that over the pooled within-class
    sd of the projections); positive, negative: (n, D) latents."""
    p, q = positive @ normal, negative @ normal
    gap = float(p.mean() - q.mean())
    return gap, gap / float(np.sqrt((p.var() + q.var()) / 2))


def part_share(normal: np.ndarray, masks: np.ndarray) -> float:
    """The mean over faces of the share of ``normal`` (C*H*W,) on each face's part (masks (N, H, W))."""
    energy = (normal.reshape(-1, *masks.shape[1:]) ** 2).sum(axis=0)
    return float(np.mean([energy[m > 0.5].sum() for m in masks]) / energy.sum())


def midpoint(normal: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """The threshold halfway between the classes' mean projections on ``normal``."""
    return float((positive.mean(axis=0) + negative.mean(axis=0)) @ normal / 2)


def labelled_accuracy(distances: np.ndarray, labels: np.ndarray) -> float:
    """The share of the labelled rows (labels -1 / +1; 0 skipped) on their class's side of 0."""
    labelled = labels != 0
    return float(np.mean(np.sign(distances[labelled]) == labels[labelled]))


def mean_difference(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, float]:
    """The unit class-mean difference and the threshold halfway between the classes' projections."""
    m = positive.mean(axis=0) - negative.mean(axis=0)
    n = m / np.linalg.norm(m)
    return n, midpoint(n, positive, negative)


def found_basis(folder: Path | None, space: str) -> np.ndarray | None:
    """Orthonormal rows spanning the ``space`` directions ``pc_NN`` of ``folder`` (None without one)."""
    files = sorted(Path(folder).glob(f"*_pc_*_{space}.npz")) if folder is not None else []
    return direction_basis(files) if files else None


def midpoint_accuracy(normal: np.ndarray, positive: np.ndarray, negative: np.ndarray, test: np.ndarray,
                      labels: np.ndarray) -> float:
    """Accuracy on the labelled ``test`` rows (labels -1 / +1; 0 skipped) of the unit ``normal`` with
    its threshold halfway between the training classes' mean projections."""
    return labelled_accuracy(test @ normal - midpoint(normal, positive, negative), labels)


def mean_difference_record(shipped: BoundaryRecord, normal: np.ndarray, threshold: float, train: np.ndarray,
                           labels_train: np.ndarray, test: np.ndarray, labels_test: np.ndarray) -> BoundaryRecord:
    """The shipped file's header with the class-mean difference as its hyperplane (intercept -threshold),
    the accuracies and class summaries of the labelled rows along it."""
    sides = {}
    for split, x, y in (("train", train, labels_train), ("test", test, labels_test)):
        distances, labelled = x @ normal - threshold, y != 0
        sides[split] = (labelled_accuracy(distances, y), class_summary(distances[labelled], y[labelled]))
    weights = normal.reshape(shipped.normal.shape).astype(shipped.normal.dtype)
    return dataclasses.replace(shipped, normal=weights, coef=weights.copy(), intercept=-threshold,
                               train_acc=float(sides["train"][0]), test_acc=float(sides["test"][0]),
                               class_summary={split: side[1] for split, side in sides.items()})


def measures(normal: np.ndarray, accuracy: float, positive: np.ndarray, negative: np.ndarray,
             masks: np.ndarray | None, basis: np.ndarray | None) -> dict:
    """One unit normal's row of the table: its test accuracy, separation and d', part share (given
    the part's masks) and captured share (given a basis of discovered directions)."""
    gap, d_prime = separation(normal, positive, negative)
    return {"test_acc": accuracy, "separation": gap, "d_prime": d_prime,
            "part_share": part_share(normal, masks) if masks is not None else None,
            "captured": float(captured_share(normal, basis)) if basis is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml")
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"))
    parser.add_argument("--found", type=Path, default=None, help="a folder of --discover's directions")
    parser.add_argument("--oracle", type=Path, default=None,
                        help="a folder of faces_oracle_directions' mean perfect moves (its --out)")
    parser.add_argument("--write_mean_difference", type=Path, default=None, metavar="DIR",
                        help="write the class-mean differences as boundary files into DIR")
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"))
    add_search_flags(parser)
    parser.add_argument("--n_masks", type=int, default=200, help="test faces whose part masks are averaged")
    add_output_flags(parser, batch_size=8)  # --seed: the search's split seed (the shipped fit's)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args, argv)


def run(args: argparse.Namespace, argv) -> int:
    start = time.perf_counter()
    config = load_config(args.config)
    t_0 = config.edit.t_0
    plan = shipped_search(config, "all", args)
    model = load_evaluated_model(config, None, args.precision, args.threads)
    engine = Engine(model, EngineOptions(cache_root=latent_cache_root(None), show_progress=False))
    read = engine.reader(False).read
    rows = np.concatenate([plan.train, plan.test])
    with engine.session(t_0, config.edit.n_inv_step) as editor:
        latents, cached = editor.invert(torch.stack([read(plan.paths[i]) for i in rows]), args.batch_size)
    masks = load_faces(args.data_dir, args.n_masks).masks
    index = engine.boundary_index(args.boundary_dir)
    oracle = engine.boundary_index(args.oracle) if args.oracle is not None else None
    oracle_names = set(oracle.attributes(t_0)) if oracle is not None else set()  # the attributes it has moves for
    if args.write_mean_difference is not None:
        args.write_mean_difference.mkdir(parents=True, exist_ok=True)
    report = {"attributes": {a: {"part": PARTS.get(a)} for a in plan.names}, "baseline_captured": {}}
    for space in SPACES:
        x = getattr(latents, space).flatten(1).double().numpy()
        train, test = x[:len(plan.train)], x[len(plan.train):]
        basis = found_basis(args.found, space)
        report["baseline_captured"][space] = len(basis) / x.shape[1] if basis is not None else None
        for a, attribute in enumerate(plan.names):
            labels_train, labels_test = plan.labels[plan.train, a], plan.labels[plan.test, a]
            pos, neg = train[labels_train > 0], train[labels_train < 0]
            path = index.find(attribute, t_0)[2][space]
            shipped = load_boundary(path)
            difference, threshold = mean_difference(pos, neg)
            normals = {"svm": (shipped.normal.astype(np.float64).reshape(-1), float(shipped.test_acc)),
                       "mean_difference": (difference, midpoint_accuracy(difference, pos, neg, test, labels_test))}
            if oracle is not None and attribute in oracle_names:
                move = load_boundary(oracle.find(attribute, t_0)[2][space]).normal.astype(np.float64).reshape(-1)
                normals["oracle"] = (move, midpoint_accuracy(move, pos, neg, test, labels_test))
            if args.write_mean_difference is not None:
                save_boundary(args.write_mean_difference / path.name, mean_difference_record(
                    shipped, difference, threshold, train, labels_train, test, labels_test))
            part = PARTS.get(attribute) if space == "z" else None
            entry = report["attributes"][attribute]
            entry[space] = {name: measures(normal, accuracy, pos, neg, masks[part] if part else None, basis)
                            for name, (normal, accuracy) in normals.items()}
            entry[space]["cos_svm_mean_difference"] = float(normals["svm"][0] @ difference)
            if part:
                entry["part_area"] = float(np.mean(masks[part] > 0.5))
    report.update(command=command_line("scripts.evaluation.faces_normals", argv),
                  seconds=time.perf_counter() - start, t_0=t_0,
                  n_train=len(plan.train), n_test=len(plan.test), cached=cached,
                  found=str(args.found) if args.found is not None else None,
                  oracle=str(args.oracle) if args.oracle is not None else None)
    write_report(report, table(report), args.json, args.table)
    return 0


NORMALS = (("svm", "SVM (shipped)"), ("mean_difference", "class-mean difference"),
           ("oracle", "renderer's mean perfect move"))


def table(report: dict) -> str:
    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| attribute | part (area) | normal | test acc z / h | separation z / h | d' z / h | part share (z) | "
             "captured z / h |", "|---|---|---|---|---|---|---|---|"]
    for attribute, e in report["attributes"].items():
        part = f"{e['part']} ({e['part_area']:.0%})" if e["part"] else ""
        for i, (name, label) in enumerate(n for n in NORMALS if n[0] in e["z"]):
            z, h = e["z"][name], e["h"][name]
            lines.append(f"| {attribute if i == 0 else ''} | {part if i == 0 else ''} | {label} | "
                         f"{z['test_acc']:.3f} / {h['test_acc']:.3f} | {z['separation']:.2f} / {h['separation']:.2f} | "
                         f"{z['d_prime']:.1f} / {h['d_prime']:.1f} | {cell(z['part_share'], '.2f')} | "
                         f"{cell(z['captured'], '.3f')} / {cell(h['captured'], '.3f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
