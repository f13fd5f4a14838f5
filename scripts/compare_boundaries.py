"""Check that two folders hold the same boundaries: every ``.npz`` of the first has a namesake in
the second whose unit normal agrees within ``--tol`` (max absolute difference) and whose intercept
agrees within ``--tol`` relative. Exit status 1 if one does not (or is missing).

    python -m scripts.compare_boundaries boundary /tmp/refit/boundary --tol 1e-6
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from utils.io.boundary_files import load_boundary


def compare(old_dir: Path, new_dir: Path, tol: float, minimum: int = 1) -> bool:
    files = sorted(Path(old_dir).glob("*.npz"))
    ok = len(files) >= minimum
    if not ok:
        print(f"{old_dir} holds {len(files)} boundary files, expected at least {minimum}")
    for path in files:
        other = Path(new_dir) / path.name
        if not other.is_file():
            print(f"{path.name}: missing in {new_dir}")
            ok = False
            continue
        a, b = load_boundary(path), load_boundary(other)
        diff = float(np.abs(a.normal.astype(np.float64) - b.normal).max())
        rel = abs(a.intercept - b.intercept) / max(1.0, abs(a.intercept))
        good = diff <= tol and rel <= tol
        ok &= good
        print(f"{path.name}: max |normal difference| {diff:.2e}, intercept {a.intercept:.6f} / {b.intercept:.6f}, "
              f"test acc {a.test_acc:.3f} / {b.test_acc:.3f}{'' if good else '  DIFFERS'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--minimum", type=int, default=1, help="files the first folder must hold")
    args = parser.parse_args(argv)
    return 0 if compare(args.old, args.new, args.tol, args.minimum) else 1


if __name__ == "__main__":
    sys.exit(main())
