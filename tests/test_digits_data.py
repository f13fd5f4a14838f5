"""The bundled digits set (scripts/make_digits.py) and the shipped digits checkpoint."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model
from scripts import make_digits as md
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return md.make_digits(tmp_path_factory.mktemp("dest"))


def _split(root: Path) -> dict[str, str]:
    return dict(line.split() for line in (root / "split.txt").read_text().splitlines())


# --- the written files -------------------------------------------------------------------------

def test_attribute_file_is_celeba_format(digits_root):
    lines = (digits_root / "list_attr_digits.txt").read_text().splitlines()
    assert lines[0] == "1797"
    assert tuple(lines[1].split()) == md.ATTRIBUTES
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 1797
    assert rows[0][0] == "0000.png" and rows[-1][0] == "1796.png"
    table = np.array([[int(v) for v in row[1:]] for row in rows])
    assert table.shape == (1797, len(md.ATTRIBUTES))
    assert np.isin(table, (-1, 0, 1)).all()
    one_hot = table[:, :10]
    assert (np.sum(one_hot == 1, axis=1) == 1).all(), "every digit has exactly one class"
    assert not (one_hot == 0).any()
    col = {name: i for i, name in enumerate(md.ATTRIBUTES)}
    classes = one_hot.argmax(axis=1)
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(classes, load_digits().target)
    np.testing.assert_array_equal(table[:, col["three_vs_eight"]], np.where(classes == 3, 1, np.where(classes == 8, -1, 0)))
    np.testing.assert_array_equal(table[:, col["one_vs_seven"]], np.where(classes == 1, 1, np.where(classes == 7, -1, 0)))
    thick = table[:, col["thick"]]
    for label in (-1, 0, 1):  # terciles: about a third each
        assert 0.28 < np.mean(thick == label) < 0.39, (label, np.mean(thick == label))


def test_images_are_16px_grayscale_in_their_split_folder(digits_root):
    split = _split(digits_root)
    for name in ("0000.png", "0005.png", "1796.png"):
        img = Image.open(digits_root / "images" / split[name] / name)
        assert img.mode == "L" and img.size == (md.IMAGE_SIZE, md.IMAGE_SIZE)
    example = Image.open(digits_root / "example.png")
    assert example.mode == "L" and example.size == (16, 16)


def test_split_is_fixed_disjoint_and_stratified(digits_root):
    split = _split(digits_root)
    train = {p.name for p in (digits_root / "images" / "train").glob("*.png")}
    test = {p.name for p in (digits_root / "images" / "test").glob("*.png")}
    assert not train & test
    assert len(train) + len(test) == 1797
    assert train == {n for n, s in split.items() if s == "train"}
    assert test == {n for n, s in split.items() if s == "test"}
    assert len(test) == 359
    # Pinned: the same 359 test items on every machine (a change of numpy's generator would show here).
    test_idx = np.array(sorted(int(n[:4]) for n in test), dtype="<i8")
    assert test_idx[:8].tolist() == [5, 9, 12, 14, 16, 17, 19, 23], test_idx[:8].tolist()
    assert hashlib.sha256(test_idx.tobytes()).hexdigest().startswith("f71c9ddf"), hashlib.sha256(test_idx.tobytes()).hexdigest()
    from sklearn.datasets import load_digits
    target = load_digits().target
    for c in range(10):
        in_test = np.isin(np.flatnonzero(target == c), test_idx).mean()
        assert abs(in_test - 0.2) < 0.01, (c, in_test)


def test_shipped_example_is_the_generated_one(digits_root):
    shipped = np.asarray(Image.open(REPO / "imgs" / "digit_example.png"))
    made = np.asarray(Image.open(digits_root / "example.png"))
    np.testing.assert_array_equal(shipped, made)
    assert "example.png" not in _split(digits_root)  # not a separate item; it is a copy of a test digit
    test_dir = digits_root / "images" / "test"
    assert any(np.array_equal(made, np.asarray(Image.open(p))) for p in test_dir.glob("*.png"))


# --- attribute maths on hand-made arrays --------------------------------------------------------

def test_to_image_scales_0_16_to_0_255():
    blank, full = np.zeros((8, 8)), np.full((8, 8), 16.0)
    assert np.asarray(md.to_image(blank)).max() == 0
    assert (np.asarray(md.to_image(full)) == 255).all()
    half = np.zeros((8, 8))
    half[:, :4] = 16
    pixels = np.asarray(md.to_image(half), dtype=np.int64)
    assert (pixels[:, :7] == 255).all() and (pixels[:, 9:] == 0).all()  # smooth edge in between
    assert 0 < pixels[0, 7] < 255 and 0 < pixels[0, 8] < 255


def test_ink_mass_and_shear_moment_on_hand_made_strokes():
    right = np.zeros((8, 8))  # "/": bottom-left to top-right
    for i in range(8):
        right[7 - i, i] = 16
    left = right[:, ::-1].copy()  # "\"
    upright = np.zeros((8, 8))
    upright[:, 3] = 10
    digits = np.stack([right, left, upright, np.zeros((8, 8))])
    np.testing.assert_allclose(md.ink_mass(digits), [128, 128, 80, 0])
    moment = md.shear_moment(digits)
    # "/" pixels: x - 3.5 = k, y_mean - y = k for k = -3.5..3.5 -> mean of k^2 = 5.25
    np.testing.assert_allclose(moment, [5.25, -5.25, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(md.slant_labels(moment), [1, -1, 0, 0])
    np.testing.assert_array_equal(md.slant_labels(np.array([0.04, -0.04, 0.06])), [0, 0, 1])


def test_thick_labels_use_train_terciles_per_class():
    mass = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0, 20.0, 30.0, 100.0, 0.5])
    classes = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    fit = np.array([True] * 6 + [True, True, True, False, False])
    labels = md.thick_labels(mass, classes, fit)
    # class 0 (train 1..6): terciles 2.67, 4.33; class 1 (train 10, 20, 30): 16.7, 23.3
    np.testing.assert_array_equal(labels, [-1, -1, 0, 0, 1, 1, -1, 0, 1, 1, -1])


def test_stratified_split_is_seeded():
    classes = np.repeat(np.arange(3), 10)
    a, b = md.stratified_split(classes, 0.2, 0), md.stratified_split(classes, 0.2, 0)
    np.testing.assert_array_equal(a, b)
    assert [int(a[classes == c].sum()) for c in range(3)] == [2, 2, 2]
    assert not np.array_equal(a, md.stratified_split(classes, 0.2, 1))


# --- the shipped checkpoint ---------------------------------------------------------------------

def test_shipped_checkpoint_loads_strictly_and_matches_its_hash():
    config = load_config("digits.yml")
    path = REPO / config.checkpoint.path
    assert path.is_file(), f"{path} is missing"
    assert path.stat().st_size <= 10 * 1024 * 1024
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == config.checkpoint.sha256, f"{path} has SHA-256 {digest}"
    model = build_model(config)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    x = torch.zeros(2, 1, 16, 16)
    with torch.no_grad():
        out, h = model(x, torch.tensor([10.0, 500.0]))
    assert out.shape == (2, 1, 16, 16) and h.shape == (2, 64, 4, 4)
    assert torch.isfinite(out).all()
