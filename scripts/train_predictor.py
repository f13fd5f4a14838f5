"""Train the factor predictor (utils/faces/predictor.py) on the rendered faces' TRAIN split.

    bash data_download.sh faces .            # or: python -m scripts.make_faces data
    python -m scripts.train_predictor --data_dir data/faces --threads 2

Regression of the 16 continuous factors (mean squared error of the standardised values) plus
binary cross-entropy of the 4 binary ones, AdamW with a linear warm-up and a cosine decay. Only
rendered images are seen, never a diffusion model's samples. No augmentation: a horizontal flip
would need yaw, pos_x and light_x negated, and even then the renderer's faces are not mirror
symmetric (the nose, the brows and the bangs' edge lean one way), so flipped faces are not faces it
draws; 40,000 faces are enough without.

At the end the TEST split is measured: R^2 per continuous factor, accuracy per binary factor, and
per CelebA attribute the accuracy of the sign of ``attribute_scores`` of the measured factors
against the attribute file's +1 / -1 labels (faces labelled 0 not counted); the targets are
R^2 >= 0.95 and accuracy >= 0.97. The weights are written as a float32 state dict under a
temporary name and renamed, and their SHA-256 is printed: set ``PREDICTOR_SHA256`` in
utils/faces/predictor.py to it when these are the weights to ship.

The defaults (16 epochs of 625 steps of 64) are sized from short runs: the slowest factors are
smile, age and mouth_open (sub-pixel lip curvature and thin age lines); after 3,000 steps of 64,
trained in four pieces, every attribute met its target and every R^2 but age (0.929) and smile
(0.921) did. Each epoch prints the worst test R^2, so a run that falls short shows which factor.

Everything random (initialisation, batch order) comes from ``--seed``: the same seed, thread
count and PyTorch version give the same weights.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scripts.train import learning_rate
from utils.faces.factors import ATTRIBUTES, FACTOR_NAMES, PREDICTED_BINARY, PREDICTED_CONTINUOUS
from utils.faces.predictor import (TARGET_ACCURACY, TARGET_R2, FactorPredictor, evaluate_predictor, failures,
                                   images_to_tensor, sha256_of)

REPO = Path(__file__).resolve().parents[1]


def read_factors(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``factors.csv`` -> (names, splits, factors (N, len(FACTOR_NAMES)) float64 in that order)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or any(n not in rows[0] for n in ("name", "split") + FACTOR_NAMES):
        raise ValueError(f"{path} is not a faces factor table (columns name, split and every factor)")
    return ([r["name"] for r in rows], [r["split"] for r in rows],
            np.array([[float(r[n]) for n in FACTOR_NAMES] for r in rows], dtype=np.float64))


def read_attribute_labels(path: Path) -> dict[str, np.ndarray]:
    """A CelebA-format attribute file with the columns of ``ATTRIBUTES`` -> name -> (13,) int64 labels."""
    lines = path.read_text().splitlines()
    if tuple(lines[1].split()) != ATTRIBUTES:
        raise ValueError(f"{path} does not have the columns {' '.join(ATTRIBUTES)}")
    return {parts[0]: np.array([int(v) for v in parts[1:]], dtype=np.int64) for parts in map(str.split, lines[2:])}


def load_images(folder: Path, names: list[str]) -> np.ndarray:
    """The named PNGs of ``folder`` -> (N, 32, 32, 3) uint8."""
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of factors.csv are not in {folder} (first: {missing[0]}); "
                                f"render the data set with `python -m scripts.make_faces`")
    return np.stack([np.asarray(Image.open(folder / n).convert("RGB"), dtype=np.uint8) for n in names])


def load_split(data_dir: Path, split: str, limit: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The first ``limit`` (default: all) faces of a split: (names, images (N, 32, 32, 3) uint8,
    factors (N, len(FACTOR_NAMES)) float64)."""
    names, splits, factors = read_factors(data_dir / "factors.csv")
    rows = [i for i, s in enumerate(splits) if s == split][:limit]
    if not rows:
        raise ValueError(f"no {split} faces in {data_dir / 'factors.csv'}")
    chosen = [names[i] for i in rows]
    return chosen, load_images(data_dir / "images" / split, chosen), factors[rows]


def targets(factors: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor rows (N, len(FACTOR_NAMES)) -> (continuous (N, 16), binary (N, 4)) float32, predictor order."""
    cont = [FACTOR_NAMES.index(n) for n in PREDICTED_CONTINUOUS]
    binary = [FACTOR_NAMES.index(n) for n in PREDICTED_BINARY]
    return torch.from_numpy(factors[:, cont]).float(), torch.from_numpy(factors[:, binary]).float()


def training_loss(model: FactorPredictor, x: torch.Tensor, continuous: torch.Tensor,
                  binary: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the standardised continuous factors + binary cross-entropy of the logits."""
    out, logits = model(x)
    z = (continuous - model.mean) / model.std
    return torch.mean((out - z) ** 2) + torch.nn.functional.binary_cross_entropy_with_logits(logits, binary)


def format_scores(scores: dict[str, dict[str, float]]) -> str:
    """A table of ``evaluate_predictor``'s scores, each marked with whether it meets its target."""
    lines = []
    for kind, values in scores.items():
        target = TARGET_R2 if kind == "r2" else TARGET_ACCURACY
        lines.append(f"{kind} (target >= {target})")
        lines += [f"  {name:<20s} {value:8.4f}  {'ok' if value >= target else 'BELOW'}" for name, value in values.items()]
    return "\n".join(lines)


def save_weights(model: FactorPredictor, path: Path) -> str:
    """Write the float32 state dict (contiguous CPU tensors) under a temporary name, rename it; return
    its SHA-256. Serialised in memory first, so the bytes depend on the weights only (a file that
    ``torch.save`` writes itself records its own name inside)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()},
               buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return sha256_of(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=REPO / "data" / "faces", help="the faces data set (factors.csv, images/)")
    parser.add_argument("--out", type=Path, default=REPO / "checkpoints" / "faces_predictor.pt", help="weights to write")
    parser.add_argument("--epochs", type=int, default=16, help="passes over the training faces")
    parser.add_argument("--batch_size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    parser.add_argument("--n_train", type=int, default=None, help="train on the first N training faces only (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch")
    parser.add_argument("--log_every", type=int, default=200, help="print progress every N steps")
    parser.add_argument("--report", type=Path, default=None, help="also write the test scores as JSON here")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or (args.n_train is not None and args.n_train < 1):
        parser.error("--epochs, --batch_size and --n_train must be at least 1")
    if not (args.data_dir / "factors.csv").is_file():
        parser.error(f"no faces data set at {args.data_dir} (no factors.csv): render it with "
                     f"`python -m scripts.make_faces data` or `bash data_download.sh faces .`")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # initialisation
    gen = torch.Generator().manual_seed(args.seed + 1)  # batch order
    start = time.time()
    _, train_images, train_factors = load_split(args.data_dir, "train", args.n_train)
    test_names, test_images, test_factors = load_split(args.data_dir, "test")
    labels_by_name = read_attribute_labels(args.data_dir / "list_attr_faces.txt")
    test_labels = np.stack([labels_by_name[n] for n in test_names])
    x_train, x_test = images_to_tensor(train_images), images_to_tensor(test_images)
    y_cont, y_bin = targets(train_factors)
    print(f"loaded {len(x_train)} train and {len(x_test)} test faces in {time.time() - start:.1f}s", flush=True)

    model = FactorPredictor()
    model.set_standardisation(y_cont.mean(dim=0), y_cont.std(dim=0))
    model = model.to(memory_format=torch.channels_last).train()  # channels-last convolutions: ~25 % faster on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    total = args.epochs * steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training the factor predictor: {n_params / 1e6:.2f}M parameters, {args.epochs} epochs of "
          f"{steps_per_epoch} steps of {args.batch_size}, {args.threads} threads", flush=True)

    step, start, running = 0, time.time(), []
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for first in range(0, len(order), args.batch_size):
            batch = order[first:first + args.batch_size]
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args.lr, args.warmup, total, final_fraction=0.01)
            x = x_train[batch].contiguous(memory_format=torch.channels_last)
            loss = training_loss(model, x, y_cont[batch], y_bin[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(loss.item())
            step += 1
            if step % args.log_every == 0 or step == total:
                elapsed = time.time() - start
                print(f"epoch {epoch + 1:3d}  step {step:6d}/{total}  loss {np.mean(running):.4f}  "
                      f"lr {opt.param_groups[0]['lr']:.2e}  {elapsed:7.1f}s  eta {(total - step) * elapsed / step:6.0f}s",
                      flush=True)
                running = []
        scores = evaluate_predictor(model, x_test, test_factors, test_labels)  # leaves the model in train mode
        print(f"epoch {epoch + 1:3d} done at {time.time() - start:.0f}s: test R^2 min {min(scores['r2'].values()):.4f} "
              f"({min(scores['r2'], key=scores['r2'].get)}), attribute accuracy min "
              f"{min(scores['attribute_accuracy'].values()):.4f}", flush=True)

    print(f"\ntest faces: {len(x_test)}\n{format_scores(scores)}")
    missed = failures(scores)
    print("every target met" if not missed else f"{len(missed)} below target: " + "; ".join(missed))
    digest = save_weights(model, args.out)
    print(f"done in {time.time() - start:.0f}s; wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) sha256 {digest}\n"
          f"to ship these weights, set PREDICTOR_SHA256 in utils/faces/predictor.py to that digest", flush=True)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "sha256": digest,
                                           "seconds": round(time.time() - start, 1), "test_faces": len(x_test),
                                           "scores": scores, "below_target": missed}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
