"""Time and peak memory of the boundary fit: the old ``SVC(kernel='linear')`` on float64 copies
against the Gram-matrix fit (utils/core/gram.py), and the boundary search's fit streamed from a
latent cache of synthetic 256-px entries (z 3x256x256, h 512x8x8).

Every case runs in a subprocess of its own, whose peak resident memory (``ru_maxrss``, data
included) is reported. The synthetic latents are float32 normal noise with a small class shift, so
the classes overlap a little. The old fit runs in a subprocess with a time limit: once a size
takes longer than ``--old_timeout`` the larger ones of that dimension print 'skipped'.

    python -m scripts.benchmark_fit                                # the whole table (hours on 2 cores)
    python -m scripts.benchmark_fit --n 100 1000 --dims 32768 --skip_cache
    python -m scripts.benchmark_fit --n 4000 --dims 196608 --skip_old --skip_cache
    python -m scripts.benchmark_fit --cache_n 10000 --n --dims    # the cache case alone
    python -m scripts.benchmark_fit --cache_n 10000 --n --dims --attributes 1 40 --cache_dir /tmp/c  # 40 columns vs 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
Z_SHAPE, H_SHAPE = (3, 256, 256), (512, 8, 8)


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 latents (made in place, no float64 temporaries) and (n,) labels in {0, 1}."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    u = np.random.default_rng(1).standard_normal(dim, dtype=np.float32) * np.float32(0.02)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    for i in range(n):
        x[i] += u if y[i] else -u
    return x, y


def attribute_labels(y: np.ndarray, n_attributes: int, seed: int = 2) -> np.ndarray:
    """(n, A) labels in {-1, 1}: column 0 is ``y`` (the class the latents are shifted by), the others
    independent, with positive rates spread from 2 % to 50 % (CelebA's attributes range so)."""
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.02, 0.5, max(1, n_attributes - 1))
    others = [np.where(rng.random(len(y)) < rate, 1, -1) for rate in rates[:n_attributes - 1]]
    for column in others:  # each class at least once, however small the set
        column[:2] = (1, -1)
    return np.stack([2 * np.asarray(y) - 1, *others], axis=1).astype(np.int64)


def run_case(kind: str, n: int, dim: int, device: str, cache: str | None, save: str | None = None,
             attributes: int = 1) -> dict:
    """One measurement, in this process: the fit's seconds and the process's peak memory."""
    import torch

    from sklearn.svm import SVC

    from utils.core.boundary import fit_attributes, fit_boundary
    from utils.io.latent_cache import LatentCache

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    # One-time costs (thread pools, first BLAS calls) outside the timings, for both fits alike.
    xw, yw = synthetic(8, 64)
    SVC(kernel="linear").fit(xw.astype(np.float64), yw)
    fit_boundary(xw, yw, device=device)
    if kind == "cache":
        keys = sorted(p.stem for p in Path(cache).glob("*/*.pt"))[:n]
        store = LatentCache(cache, {})
        y = attribute_labels(np.random.default_rng(0).integers(0, 2, len(keys)), attributes)
        n_train = len(keys) - len(keys) // 5
        start = time.perf_counter()
        for space, shape in (("h", H_SHAPE), ("z", Z_SHAPE)):  # as the boundary search does
            read, _, d = store.rows(keys, space, shape)
            fit_attributes((read, n_train, d), y[:n_train], (lambda a, b, read=read: read(n_train + a, n_train + b),
                           len(keys) - n_train, d), y[n_train:], device=device)
        seconds = time.perf_counter() - start
    else:
        # With ``save``, n // 5 held-out rows more, and the hyperplane and its test accuracy are saved
        # so that the parent can compare the two fits.
        x, y = synthetic(n + (n // 5 if save else 0), dim)
        xt, yt = x[n:], y[n:]
        start = time.perf_counter()
        if kind == "old":
            svm = SVC(kernel="linear").fit(x[:n].astype(np.float64), y[:n])
            seconds = time.perf_counter() - start
            coef, intercept = svm.coef_.reshape(-1), float(svm.intercept_[0])
            test_acc = float(svm.score(xt.astype(np.float64), yt)) if save else float("nan")
        else:
            boundary = fit_boundary(x[:n], y[:n], xt if save else None, yt if save else None, device=device)
            seconds = time.perf_counter() - start
            coef, intercept, test_acc = boundary.coef, boundary.intercept, boundary.test_acc
        if save:
            np.savez(save, coef=np.asarray(coef, dtype=np.float64), intercept=intercept, test_acc=test_acc)
    return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def measure(kind: str, n: int, dim: int, device: str, timeout: float | None, cache: str | None = None,
            save: str | None = None, attributes: int = 1) -> dict | None:
    """``run_case`` in a fresh subprocess; None if it ran past ``timeout``."""
    cmd = [sys.executable, "-m", "scripts.benchmark_fit", "--case", kind, "--n", str(n), "--dims", str(dim),
           "--device", device, "--attributes", str(attributes)] + (["--cache_dir", cache] if cache else []) \
        + (["--save", save] if save else [])
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {exc.stderr.strip().splitlines()[-1:]}") from None
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_cache(root: Path, n: int) -> None:
    """n synthetic 256-px entries in the latent cache's layout (z, h float32; classes shifted in z)."""
    import torch

    from utils.io.latent_cache import LatentCache

    store = LatentCache(root, {})
    have = len(list(root.glob("*/*.pt")))
    y = np.random.default_rng(0).integers(0, 2, n)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(Z_SHAPE, generator=g) * 0.02
    for i in range(have, n):  # entries sort by key, and key i sorts as i: labels follow the index
        z = torch.randn(Z_SHAPE, generator=g) + (u if y[i] else -u)
        store.put(f"{i:064d}", z, torch.randn(H_SHAPE, generator=g))


def _agreement(old_file: str, new_file: str) -> str:
    """How closely the two fits agree: 1 - cosine of the normals, intercept difference, test accuracies."""
    with np.load(old_file) as a, np.load(new_file) as b:
        cos = float(a["coef"] @ b["coef"] / (np.linalg.norm(a["coef"]) * np.linalg.norm(b["coef"])))
        return (f"{1 - cos:.1e}, {abs(float(a['intercept']) - float(b['intercept'])):.1e}, "
                f"{float(a['test_acc']):.3f} / {float(b['test_acc']):.3f}")


def _cell(result: dict | None, skipped: bool = False) -> str:
    if skipped:
        return "skipped"
    return "timeout" if result is None else f"{result['seconds']:.1f} s / {result['peak_gib']:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[100, 500, 1000, 2000, 5000, 10000])
    parser.add_argument("--dims", type=int, nargs="*", default=[32768, 196608])
    parser.add_argument("--skip_old", "--skip-old", action="store_true", help="only the Gram fit")
    parser.add_argument("--old_timeout", type=float, default=120, help="seconds after which the old fit is abandoned")
    parser.add_argument("--skip_cache", "--skip-cache", action="store_true", help="no latent-cache case")
    parser.add_argument("--cache_n", type=int, default=10000, help="entries of the latent-cache case")
    parser.add_argument("--cache_dir", default=None, help="keep the synthetic cache here (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="where the Gram products run (cpu, cuda)")
    parser.add_argument("--attributes", type=int, nargs="*", default=[1],
                        help="label columns fitted together in the latent-cache case, e.g. 1 40 (one Gram matrix, "
                             "one solve per column)")
    parser.add_argument("--case", choices=("old", "new", "cache"), help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.n[0], args.dims[0] if args.dims else 0, args.device, args.cache_dir,
                                  args.save, args.attributes[0])))
        return 0
    print(f"{'D':>7} {'n':>6}  {'old SVC(linear)':>24}  {'Gram fit':>24}  speed-up  same hyperplane? "
          "(1 - cos, |intercept diff|, test acc old / new)", flush=True)
    with tempfile.TemporaryDirectory() as saved:
        for dim in args.dims:
            skip_old = args.skip_old
            for n in args.n:
                files = {k: None if skip_old else str(Path(saved) / f"{k}_{dim}_{n}.npz") for k in ("old", "new")}
                old = None if skip_old else measure("old", n, dim, "cpu", args.old_timeout, save=files["old"])
                new = measure("new", n, dim, args.device, None, save=files["new"] if old else None)
                ratio = f"{old['seconds'] / new['seconds']:.1f}x" if old else ""
                print(f"{dim:>7} {n:>6}  {_cell(old, skipped=skip_old):>24}  {_cell(new):>24}  {ratio:>8}  "
                      + (_agreement(files["old"], files["new"]) if old else ""), flush=True)
                skip_old = skip_old or old is None  # a larger n would take longer still
    if not args.skip_cache:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.cache_dir or tmp)
            start = time.perf_counter()
            make_cache(root, args.cache_n)
            made = time.perf_counter() - start
            print(f"latent cache of {args.cache_n} 256-px entries written in {made:.0f} s", flush=True)
            for attributes in args.attributes:
                result = measure("cache", args.cache_n, 0, args.device, None, str(root), attributes=attributes)
                print(f"boundary search fit from the cache (train {args.cache_n - args.cache_n // 5}, test "
                      f"{args.cache_n // 5}; h and z), {attributes} attribute(s): {_cell(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
