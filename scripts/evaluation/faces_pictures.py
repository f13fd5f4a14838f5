"""Pictures of the synthetic faces for the docs (scripts/make_pictures.py runs these).

    .venv/bin/python -m scripts.evaluation.faces_pictures data --out docs/faces_data.png
    .venv/bin/python -m scripts.evaluation.faces_pictures samples --out docs/faces_samples.png

``data``: rendered test faces with their part masks (mouth, eyes, hair, face, background) beside
them; ``samples``: faces the model generates from noise (DDIM, 50 steps, eta 0, fixed seeds). Both
are upscaled 3x with nearest neighbours for reading; the images themselves are 32 x 32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from runners.engine import EVALUATION_NOISE, item_seed, load_config
from scripts.evaluation.common import evaluation_engine, load_evaluated_model
from scripts.evaluation.faces_region import load_faces
from utils.io.plots import labelled_grid

UPSCALE = 3


def upscaled(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(images.clamp(-1, 1), scale_factor=UPSCALE, mode="nearest")


def data_picture(data_dir: Path, out: Path, n: int = 6) -> None:
    """n test faces, each followed by its five part masks (white: the part)."""
    faces = load_faces(data_dir, n)
    parts = list(faces.masks)
    cells = []
    for b in range(n):
        cells.append(faces.images[b])
        cells += [torch.from_numpy(faces.masks[p][b] * 2 - 1)[None].expand(3, -1, -1) for p in parts]
    labelled_grid(upscaled(torch.stack(cells)), out, column_labels=["face", *parts], ncol=1 + len(parts))


def samples_picture(out: Path, n: int = 32, steps: int = 50, seed: int = 1234) -> None:
    """n samples from noise: x_T of sample i drawn from ``item_seed(seed, i, domain=EVALUATION_NOISE)``."""
    config = load_config("faces.yml")
    model = load_evaluated_model(config, None, "fp32", 2)
    x_T = torch.stack([torch.randn(model.shapes["z"], generator=torch.Generator().manual_seed(
        item_seed(seed, i, domain=EVALUATION_NOISE))) for i in range(n)])
    with evaluation_engine(model).session(config.edit.t_0, config.edit.n_inv_step) as editor:
        images = editor.sample_images(x_T, steps, batch_size=16)
    labelled_grid(upscaled(images), out, ncol=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("picture", choices=("data", "samples"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"))
    args = parser.parse_args(argv)
    if args.picture == "data":
        data_picture(args.data_dir, args.out)
    else:
        samples_picture(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
