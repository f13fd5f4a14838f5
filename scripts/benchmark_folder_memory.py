"""Peak memory of a folder edit against the number of images: does it grow with the folder?

    python -m scripts.benchmark_folder_memory --images 5 80

Builds a random-weight 256-px DDPM (the CelebA-HQ layout of six levels, narrowed to ``--ch``
channels so that a call takes well under a second on a CPU: the per-image data -- images,
latents, reconstructions, outputs -- is what the measurement is about, and it is the real 256-px
size), random z and h boundaries, and N random 256 x 256 photos, then runs
``main.py --edit_image_boundary`` on the folder at few steps, each N in a fresh process, and prints
the peak resident memory of each run (``ru_maxrss``) and its ratio to the first.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from runners.engine import BoundaryRecord, build_model, latent_shapes, parse_config, save_boundary

REPO = Path(__file__).resolve().parents[1]
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def make_model(root: Path, ch: int) -> tuple[Path, Path, dict]:
    """(config file, checkpoint file, latent shapes) of a random-weight 256-px DDPM."""
    raw = yaml.safe_load((REPO / "configs" / "celeba.yml").read_text())
    raw["model"].update(ch=ch, num_groups=min(ch, 32))
    raw["data"]["align_face"] = False
    raw.pop("checkpoint", None)
    config_path = root / "wide256.yml"
    config_path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw, "wide256")
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    checkpoint = root / "random256.pt"
    torch.save(model.state_dict(), checkpoint)
    return config_path, checkpoint, latent_shapes(config)


def make_boundaries(root: Path, shapes: dict, t_0: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {}
    for space, shape in shapes.items():
        normal = rng.normal(size=int(np.prod(shape))).astype(np.float32)
        normal /= np.linalg.norm(normal)
        paths[space] = save_boundary(root / f"random_{space}", BoundaryRecord(
            normal=normal, coef=normal, intercept=0.0, shape=tuple(shape), space=space, t_0=t_0, n_inv_step=2,
            attribute="random", config_name="wide256"))
    return paths


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"photo_{i:03d}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[5, 80], help="folder sizes, each a run")
    parser.add_argument("--ch", type=int, default=16, help="base channels of the 256-px model (real: 128)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, checkpoint, shapes = make_model(root, args.ch)
        boundaries = make_boundaries(root, shapes, t_0=500)
        for n in args.images:
            make_images(root / f"in{n}", n)
            command = [sys.executable, "main.py", "--edit_image_boundary", "--config", str(config),
                       "--model_path", str(checkpoint), "--img_path", str(root / f"in{n}"),
                       "--boundary_z", str(boundaries["z"]), "--boundary_h", str(boundaries["h"]), "--t_0", "500",
                       "--n_inv_step", "2", "--n_test_step", "2", "--edit_img_number", "2", "--no_cache",
                       "--exp", str(root / f"exp{n}"), "--verbose", "warning"]
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", PEAK, *command], cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr.strip().splitlines()[-1:], file=sys.stderr)
                return 1
            peak_mib = int(done.stdout.strip().splitlines()[-1]) / 1024
            rows.append({"images": n, "peak_mib": peak_mib, "seconds": time.perf_counter() - start})
            print(f"{n:4d} images: peak {peak_mib:7.0f} MiB ({peak_mib / rows[0]['peak_mib']:.2f}x the first), "
                  f"{rows[-1]['seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"ch": args.ch, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
