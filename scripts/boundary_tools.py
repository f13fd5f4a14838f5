"""Convert boundaries: ``import-sav`` (the original's pickled SVC -> this project's .npz),
``export-npy`` (.npz -> an InterFaceGAN-style (1, D) unit normal), and ``atlas`` (the attribute atlas,
atlas.json and atlas.png, of the boundary files in a folder: utils/io/atlas.py), and ``random-control``
(each boundary of a folder with its normal replaced by a seeded random unit direction: the control
that tells what a move of the same size does without the attribute's direction).

    python -m scripts.boundary_tools import-sav smile_z.sav --space z --config celeba.yml --t_0 500 \\
        --n_inv_step 40 --attribute smiling --out boundary/celeba_smiling_t500_z.npz
    python -m scripts.boundary_tools export-npy boundary/celeba_smiling_t500_z.npz smiling_z.npy
    python -m scripts.boundary_tools atlas boundary/ --config_name digits --t_0 200 --out runs/atlas
    python -m scripts.boundary_tools random-control boundary/ runs/random_control --seed 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from utils.errors import UserError


def import_sav(args: argparse.Namespace) -> Path:
    from utils.core.boundary import Boundary
    from utils.io.boundary_files import BoundaryRecord, save_boundary
    from utils.config import latent_shapes, load_config
    from utils.io.sav_import import read_sav

    coef, intercept = read_sav(args.sav)
    config = load_config(args.config)
    shape = latent_shapes(config)[args.space]
    if coef.size != int(np.prod(shape)):
        raise UserError(f"{args.sav} has {coef.size} coefficients; {args.space} latents of {config.name} have "
                        f"shape {shape} ({int(np.prod(shape))} values)")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} exists; pass --overwrite to replace it")
    boundary = Boundary(normal=(coef / np.linalg.norm(coef)).astype(np.float32), coef=coef.astype(np.float32),
                        intercept=intercept, train_acc=float("nan"), test_acc=float("nan"))
    return save_boundary(args.out, BoundaryRecord.from_boundary(
        boundary, shape=shape, space=args.space, t_0=args.t_0, n_inv_step=args.n_inv_step,
        attribute=args.attribute, config_name=config.name))


def export_npy(args: argparse.Namespace) -> Path:
    from utils.io.boundary_files import load_boundary
    from utils.io.files import atomic_path

    record = load_boundary(args.npz)
    out = args.out if args.out.suffix == ".npy" else args.out.with_name(args.out.name + ".npy")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, record.normal.reshape(1, -1).astype(np.float32))
    return out


def atlas(args: argparse.Namespace) -> Path:
    from utils.io.atlas import atlas_from_dir, write_atlas

    found = atlas_from_dir(args.dir, args.config_name, args.t_0)
    json_path, _ = write_atlas(args.out or args.dir, found)
    return json_path


def random_normal(shape: tuple[int, ...], seed: int, index: int) -> np.ndarray:
    """A unit vector of ``prod(shape)`` values, uniform on the sphere, from (``seed``, ``index``)."""
    v = np.random.default_rng([seed, index]).standard_normal(int(np.prod(shape)))
    return (v / np.linalg.norm(v)).astype(np.float32)


def random_control(args: argparse.Namespace) -> Path:
    """Every boundary file of ``args.src`` written to ``args.out`` under its own name and header,
    with a random unit normal (file i of the sorted names: ``random_normal(shape, seed, i)``),
    intercept 0 and no accuracies or class summaries: an edit in the absolute unit then moves each
    latent as far as with the attribute's normal (its projection on a random direction is about
    N(0, 1)), in a direction that carries no attribute."""
    from utils.io.boundary_files import load_boundary, save_boundary

    files = sorted(Path(args.src).glob("*.npz"))
    if not files:
        raise UserError(f"{args.src} holds no boundary file (*.npz)")
    existing = [args.out / f.name for f in files if (args.out / f.name).exists()]
    if existing and not args.overwrite:  # checked for every file before any is written
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace it")
    records = [load_boundary(path) for path in files]
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (path, record) in enumerate(zip(files, records)):
        normal = random_normal(record.shape, args.seed, i)
        save_boundary(args.out / path.name, record.with_direction(normal))
    return args.out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sav = sub.add_parser("import-sav", help="convert a pickled SVC (.sav) without running its code")
    sav.add_argument("sav", type=Path)
    sav.add_argument("--space", choices=("h", "z"), required=True)
    sav.add_argument("--config", required=True, help="config of the model the boundary belongs to")
    sav.add_argument("--t_0", type=int, required=True)
    sav.add_argument("--n_inv_step", type=int, required=True)
    sav.add_argument("--attribute", default="")
    sav.add_argument("--out", type=Path, required=True)
    sav.add_argument("--overwrite", action="store_true")
    npy = sub.add_parser("export-npy", help="write the unit normal as a (1, D) float32 .npy")
    npy.add_argument("npz", type=Path)
    npy.add_argument("out", type=Path)
    at = sub.add_parser("atlas", help="atlas.json and atlas.png of the boundary files in a folder")
    at.add_argument("dir", type=Path, help="folder of boundary files")
    at.add_argument("--config_name", default=None, help="the config whose boundaries to take (if several)")
    at.add_argument("--t_0", type=int, default=None, help="the t_0 whose boundaries to take (if several)")
    at.add_argument("--out", type=Path, default=None, help="folder to write into (default: dir)")
    rc = sub.add_parser("random-control", help="the folder's boundaries with seeded random unit normals")
    rc.add_argument("src", type=Path, help="folder of boundary files")
    rc.add_argument("out", type=Path, help="folder to write the control files into")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        written = {"import-sav": import_sav, "export-npy": export_npy, "atlas": atlas,
                   "random-control": random_control}[args.command](args)
    except (UserError, OSError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
