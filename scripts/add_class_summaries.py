"""Add class summaries (boundary-file format 2) to boundary files that lack them, keeping their
normals: the file's train/test images are found again from its metadata (attribute, t_0,
n_inv_step, n_train, n_test; the split is the boundary search's, seeded with --seed), inverted
(or taken from the latent cache) and their signed distances to the file's own hyperplane
summarised per class.

For files whose fit cannot be reproduced bit for bit on this machine (its latents differ from
the ones they were fitted on at about 1e-5), this describes where this machine's latents of the
same images lie, against the shipped hyperplane.

    python -m scripts.add_class_summaries boundary/digits_*.npz --data_dir data/digits/images/train \\
        --attr_file data/digits/list_attr_digits.txt
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--attr_file", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1234, help="the boundary search's --seed")
    parser.add_argument("--cache_dir", type=Path, default=None)
    parser.add_argument("--bs_train", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from runners.engine import Engine, EngineOptions, latent_cache_root, load_model
    from utils.core.boundary import Boundary, class_summary, hyperplane_distances, split_indices
    from utils.io.boundary_files import load_boundary, save_boundary
    from utils.io.datasets import from_attr_file

    model = None
    for path in args.files:
        record = load_boundary(path)
        data = from_attr_file(args.data_dir, args.attr_file, record.attribute)
        train_idx, test_idx = split_indices(len(data), record.n_train, record.n_test, np.random.default_rng(args.seed))
        if model is None or model.config.name != record.config_name:
            model = load_model(f"{record.config_name}.yml", device=args.device)
        if model.checkpoint_sha256 != record.checkpoint_sha256:
            sys.exit(f"error: {path} was fitted with checkpoint {record.checkpoint_sha256[:12]}..., "
                     f"this model is {model.checkpoint_sha256[:12]}...")
        engine = Engine(model, EngineOptions(latent_cache_root(args.cache_dir)))
        reader = engine.reader(align_face=False)
        images = torch.stack([reader.read(data.paths[i]) for i in np.concatenate([train_idx, test_idx])])
        with engine.session(record.t_0, record.n_inv_step) as editor:
            latents = getattr(editor.invert(images, args.bs_train, f"inverting for {path.name}")[0], record.space)
        boundary = Boundary(record.normal, record.coef, record.intercept, record.train_acc, record.test_acc)
        distances = hyperplane_distances(latents.flatten(1).numpy(), boundary)
        n = record.n_train
        summary = {"train": class_summary(distances[:n], data.labels[train_idx]),
                   "test": class_summary(distances[n:], data.labels[test_idx])}
        acc = [float(np.mean((d > 0) == y)) for d, y in ((distances[:n], data.labels[train_idx]),
                                                          (distances[n:], data.labels[test_idx]))]
        save_boundary(path, dataclasses.replace(record, class_summary=summary))
        print(f"{path}: summaries added (this machine's latents: train acc {acc[0]:.3f}, test acc {acc[1]:.3f}; "
              f"file: {record.train_acc:.3f}, {record.test_acc:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
