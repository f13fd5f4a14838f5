"""Build the bundled digits data set: scikit-learn's 1,797 real 8x8 handwritten digits, offline.

    python scripts/make_digits.py DEST        (or: bash data_download.sh digits DEST)

writes, under ``DEST/digits/``:

    images/train/NNNN.png   the fixed training split (80 %, stratified by class, seed 0)
    images/test/NNNN.png    the held-out test split (20 %)
    list_attr_digits.txt    CelebA-format attribute table for all 1,797 images
    split.txt               "NNNN.png train|test", one line per image
    example.png             one typical test digit (a "3"), the README's demo input

``NNNN`` is the index in ``sklearn.datasets.load_digits()``. Images are 16x16 single-channel
('L') PNGs: the 8x8 values 0..16 scaled to 0..255 and upsampled with bilinear interpolation.

Attributes (+1 / -1; 0 = not labelled, excluded from boundary search), computed on the 8x8
source values:

    digit_0 .. digit_9   one-hot class
    thick                ink mass (sum of pixels) in the top third of its class (+1) or the
                         bottom third (-1); the middle third is 0, so the two classes are
                         separated by a margin. Tercile thresholds come from the train split.
    slant                sign of the shear moment sum_ink (x - x_mean)(y_mean - y) / mass
                         (+1 leans right); |moment| < 0.05 is 0 (upright).
    three_vs_eight       +1 for a 3, -1 for an 8, 0 otherwise
    one_vs_seven         +1 for a 1, -1 for a 7, 0 otherwise
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 16
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SLANT_DEAD_BAND = 0.05  # px^2: |shear moment| below this counts as upright (label 0)
EXAMPLE_CLASS = 3
ATTRIBUTES = tuple(f"digit_{c}" for c in range(10)) + ("thick", "slant", "three_vs_eight", "one_vs_seven")


def to_image(digit: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """One 8x8 digit (values 0..16) as a size x size 'L' image (0..255), bilinear upsampling."""
    pixels = np.clip(np.rint(np.asarray(digit, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR)


def ink_mass(digits: np.ndarray) -> np.ndarray:
    """Sum of pixel values per image. digits: (N, H, W) non-negative. Returns (N,) float64."""
    return np.asarray(digits, dtype=np.float64).reshape(len(digits), -1).sum(axis=1)


def shear_moment(digits: np.ndarray) -> np.ndarray:
    """Ink-weighted mean of (x - x_mean)(y_mean - y) per image, in px^2; > 0 leans right.

    digits: (N, H, W) non-negative, row 0 at the top (so y_mean - y points up). Blank images give 0.
    """
    d = np.asarray(digits, dtype=np.float64)
    _, height, width = d.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    mass = d.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    x_mean = (d * xs).sum(axis=(1, 2)) / safe
    y_mean = (d * ys).sum(axis=(1, 2)) / safe
    dx = xs[None] - x_mean[:, None, None]
    dy = y_mean[:, None, None] - ys[None]
    return np.where(mass > 0, (d * dx * dy).sum(axis=(1, 2)) / safe, 0.0)


def stratified_split(classes: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) mask of test items: round(test_fraction * n_c) items of every class c,
    chosen by a seeded permutation within the class."""
    classes = np.asarray(classes)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(classes), dtype=bool)
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        n_test = int(round(test_fraction * len(members)))
        is_test[rng.permutation(members)[:n_test]] = True
    return is_test


def thick_labels(mass: np.ndarray, classes: np.ndarray, fit_mask: np.ndarray) -> np.ndarray:
    """+1 above the upper tercile of the item's class, -1 below the lower tercile, else 0.

    The terciles of ``mass`` are computed per class over the items where ``fit_mask`` is true
    (the train split), then applied to every item. Returns (N,) int64.
    """
    labels = np.zeros(len(mass), dtype=np.int64)
    for c in np.unique(classes):
        in_class = classes == c
        lo, hi = np.quantile(mass[in_class & fit_mask], [1 / 3, 2 / 3])
        labels[in_class & (mass > hi)] = 1
        labels[in_class & (mass < lo)] = -1
    return labels


def slant_labels(moment: np.ndarray, dead_band: float = SLANT_DEAD_BAND) -> np.ndarray:
    """Sign of the shear moment, 0 inside (-dead_band, dead_band). Returns (N,) int64."""
    labels = np.sign(moment).astype(np.int64)
    labels[np.abs(moment) < dead_band] = 0
    return labels


def pair_labels(classes: np.ndarray, positive: int, negative: int) -> np.ndarray:
    """+1 for class ``positive``, -1 for ``negative``, 0 otherwise."""
    return np.where(classes == positive, 1, np.where(classes == negative, -1, 0)).astype(np.int64)


def attribute_table(digits: np.ndarray, classes: np.ndarray, is_test: np.ndarray) -> np.ndarray:
    """(N, len(ATTRIBUTES)) int64 table in {-1, 0, 1}, columns in the order of ATTRIBUTES."""
    one_hot = np.where(classes[:, None] == np.arange(10)[None, :], 1, -1)
    columns = [one_hot,
               thick_labels(ink_mass(digits), classes, ~is_test)[:, None],
               slant_labels(shear_moment(digits))[:, None],
               pair_labels(classes, 3, 8)[:, None],
               pair_labels(classes, 1, 7)[:, None]]
    return np.concatenate(columns, axis=1).astype(np.int64)


def format_attr_file(names: list[str], attributes: tuple[str, ...], table: np.ndarray) -> str:
    """CelebA format: the count, the attribute names, then "name v1 v2 ..." rows."""
    lines = [str(len(names)), " ".join(attributes)]
    lines += [name + " " + " ".join(f"{int(v):2d}" for v in row) for name, row in zip(names, table)]
    return "\n".join(lines) + "\n"


def typical_index(digits: np.ndarray, classes: np.ndarray, candidates: np.ndarray, digit_class: int) -> int:
    """Index of the candidate of ``digit_class`` closest (L2, 8x8) to that class's mean image."""
    pool = np.flatnonzero(candidates & (classes == digit_class))
    flat = np.asarray(digits, dtype=np.float64).reshape(len(digits), -1)
    mean = flat[classes == digit_class].mean(axis=0)
    return int(pool[np.argmin(((flat[pool] - mean) ** 2).sum(axis=1))])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_digits(dest: Path) -> Path:
    """Write the data set under ``dest/digits`` and return that folder."""
    from sklearn.datasets import load_digits

    data = load_digits()
    digits, classes = data.images, data.target.astype(np.int64)
    is_test = stratified_split(classes, TEST_FRACTION, SPLIT_SEED)
    names = [f"{i:04d}.png" for i in range(len(digits))]
    root = Path(dest) / "digits"
    for split in ("train", "test"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for name, digit, test in zip(names, digits, is_test):
        to_image(digit).save(root / "images" / ("test" if test else "train") / name)
    _write_text(root / "list_attr_digits.txt", format_attr_file(names, ATTRIBUTES, attribute_table(digits, classes, is_test)))
    _write_text(root / "split.txt", "".join(f"{n} {'test' if t else 'train'}\n" for n, t in zip(names, is_test)))
    to_image(digits[typical_index(digits, classes, is_test, EXAMPLE_CLASS)]).save(root / "example.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, nargs="?", default=Path("."), help="folder that receives digits/")
    args = parser.parse_args(argv)
    root = make_digits(args.dest)
    n_train = len(list((root / "images" / "train").glob("*.png")))
    n_test = len(list((root / "images" / "test").glob("*.png")))
    print(f"wrote {n_train} train + {n_test} test digits ({IMAGE_SIZE}x{IMAGE_SIZE}) and their attributes to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
