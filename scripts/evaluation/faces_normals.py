"""What the fitted z normals are made of, on the synthetic faces (docs/faces_report.md section 7):
each shipped SVM normal beside its attribute's class-mean difference, on the faces it was fitted on.

    .venv/bin/python -m scripts.evaluation.faces_normals --found runs/faces_found64 \\
        --json docs/faces_normals.json --table docs/faces_normals.md

The boundary search's own images and split (``plan_search`` with ``--edit_attr all``, ``--n_train_img``,
``--n_test_img`` and the seed of the shipped fit), inverted to the config's t_0 through the command
line's latent cache (seconds when the search has run). Per attribute, for two unit directions n in z:
the shipped boundary's normal, and the difference of the class means of the training latents,
m = mean(z | +1) - mean(z | -1), over its norm (what the SVM tends to as C -> 0):

- test accuracy: the SVM's own (its file), and the mean difference's with the threshold halfway
  between the class means' projections;
- separation: m . n, how far apart the classes' mean latents lie along n (z units; the edits move
  by tens), and d' = that over the classes' pooled within-class sd along n;
- part share: the share of n's squared norm on the pixels of the attribute's part (mouth, eyes,
  hair or face; each test face's own mask, averaged; the part's share of the image beside it);
- captured: the share of n's squared norm inside the span of the discovered z directions of
  ``--found`` (``--discover``'s ``pc_NN``; random baseline r / 3,072).

A normal fitted in 3,072 dimensions from about a thousand faces separates them along directions in
which the latents hardly vary (high d', small separation), which no part mask or low-rank subspace
holds; the class-mean difference follows what differs between the classes on average.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runners.engine import Engine, EngineOptions, latent_cache_root, load_boundary, load_config
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


def mean_difference(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, float]:
    """The unit class-mean difference and the threshold halfway between the classes' projections."""
    m = positive.mean(axis=0) - negative.mean(axis=0)
    n = m / np.linalg.norm(m)
    return n, float((positive.mean(axis=0) + negative.mean(axis=0)) @ n / 2)


def found_basis(folder: Path | None) -> np.ndarray | None:
    """Orthonormal rows spanning the z directions ``pc_NN`` of ``folder`` (None without one)."""
    files = sorted(Path(folder).glob("*_pc_*_z.npz")) if folder is not None else []
    return direction_basis(files) if files else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml")
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"))
    parser.add_argument("--found", type=Path, default=None, help="a folder of --discover's directions")
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
    z = latents.z.flatten(1).double().numpy()
    train, test = z[:len(plan.train)], z[len(plan.train):]
    labels_train, labels_test = plan.labels[plan.train], plan.labels[plan.test]
    masks = load_faces(args.data_dir, args.n_masks).masks
    basis = found_basis(args.found)
    index = engine.boundary_index(args.boundary_dir)
    report = {"attributes": {}}
    for a, attribute in enumerate(plan.names):
        pos, neg = train[labels_train[:, a] > 0], train[labels_train[:, a] < 0]
        labelled = labels_test[:, a] != 0
        shipped = load_boundary(index.find(attribute, t_0)[2]["z"])
        difference, threshold = mean_difference(pos, neg)
        entry = {"part": PARTS.get(attribute),
                 "part_area": float(np.mean(masks[PARTS[attribute]] > 0.5)) if PARTS.get(attribute) else None}
        for name, normal, accuracy in (
                ("svm", shipped.normal.astype(np.float64), float(shipped.test_acc)),
                ("mean_difference", difference,
                 float(np.mean(np.sign(test[labelled] @ difference - threshold) == labels_test[labelled, a])))):
            gap, d_prime = separation(normal, pos, neg)
            entry[name] = {"test_acc": accuracy, "separation": gap, "d_prime": d_prime,
                           "part_share": part_share(normal, masks[PARTS[attribute]]) if PARTS.get(attribute) else None,
                           "captured": float(captured_share(normal, basis)) if basis is not None else None}
        entry["cos"] = float(shipped.normal.astype(np.float64) @ difference)
        report["attributes"][attribute] = entry
    report.update(command=command_line("scripts.evaluation.faces_normals", argv),
                  seconds=time.perf_counter() - start, t_0=t_0,
                  n_train=len(plan.train), n_test=len(plan.test), cached=cached,
                  found=str(args.found) if basis is not None else None,
                  baseline_captured=(len(basis) / z.shape[1]) if basis is not None else None)
    write_report(report, table(report), args.json, args.table)
    return 0


def table(report: dict) -> str:
    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| attribute | part (area) | normal | test acc | separation | d' | part share | captured |",
             "|---|---|---|---|---|---|---|---|"]
    for attribute, e in report["attributes"].items():
        part = f"{e['part']} ({e['part_area']:.0%})" if e["part"] else ""
        for name, label in (("svm", "SVM (shipped)"), ("mean_difference", "class-mean difference")):
            m = e[name]
            lines.append(f"| {attribute if name == 'svm' else ''} | {part if name == 'svm' else ''} | {label} | "
                         f"{m['test_acc']:.3f} | {m['separation']:.2f} | {m['d_prime']:.1f} | "
                         f"{cell(m['part_share'], '.2f')} | {cell(m['captured'], '.3f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
