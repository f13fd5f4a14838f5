"""Pixel measures after Morpho-MNIST (utils/core/morphometry.py), against shapes of known width and shear.

The shapes are rendered by area coverage (each pixel's share of the shape, from 8 x 8 sub-samples),
so their true width and shear are known in the continuum; the tolerances are derived below from the
measurement's discretisation, not from what the code printed."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from utils.core import morphometry as mm

SUB = 8  # sub-samples per pixel side of the coverage rendering


def render(inside, size: int) -> np.ndarray:
    """(size, size) coverage in [0, 1] of the shape ``inside(x, y)`` (x = column, y = row, pixel i
    spans [i, i + 1))."""
    offsets = (np.arange(SUB) + 0.5) / SUB
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    return sum(inside(xs + dx, ys + dy).astype(np.float64) for dy in offsets for dx in offsets) / SUB ** 2


def annulus(size: int, width: float) -> np.ndarray:
    """A ring of stroke ``width`` px about the circle of radius 0.3 size: a stroke without ends."""
    c, radius = size / 2, 0.3 * size
    return render(lambda x, y: np.abs(np.hypot(x - c, y - c) - radius) < width / 2, size)


def bar(size: int, width: float, shear: float = 0.0, height: float = 10.0) -> np.ndarray:
    """An upright bar (``width`` wide, ``height`` tall) centred in the image, sheared by
    x -> x + shear (y_mean - y): its top moves right for shear > 0."""
    c = size / 2
    return render(lambda x, y: (np.abs(x - c - shear * (c - y)) < width / 2) & (np.abs(y - c) < height / 2), size)


# Tolerance of the thickness, in input pixels at upsampling factor s. At the measuring resolution the
# distance map runs from a skeleton pixel's centre to the nearest *background* pixel's centre, so a
# stroke n pixels wide measures n or n + 1 (at most 1 measuring px too thick), the skeleton pixel may
# sit half a pixel off the medial axis (at most 1 px over both sides, as 2 x distance), and each
# binarised edge lies within half a measuring pixel of the true one (1 px over both edges): 3 / s.
def thickness_tolerance(scale: int) -> float:
    return 3.0 / scale


@pytest.mark.parametrize("width", [1.5, 2.0, 3.0, 4.0, 5.0])
def test_thickness_of_a_ring_is_its_stroke_width_at_the_digits_resolution(width):
    # a 16 x 16 image measured at 64 x 64, as the digits are: the answer is in 16-px units
    got = mm.stroke_thickness(annulus(16, width), scale=mm.DIGITS_SCALE)
    assert got == pytest.approx(width, abs=thickness_tolerance(mm.DIGITS_SCALE))


@pytest.mark.parametrize("width", [2.0, 3.0, 4.0])
def test_thickness_of_a_bar_and_a_disc(width):
    assert mm.stroke_thickness(bar(16, width, height=12), scale=4) == pytest.approx(width, abs=thickness_tolerance(4))
    # a disc's skeleton is its centre, at distance radius from the background: thickness = diameter
    disc = render(lambda x, y: np.hypot(x - 8, y - 8) < width / 2 + 1, 16)
    assert mm.stroke_thickness(disc, scale=4) == pytest.approx(width + 2, abs=thickness_tolerance(4))


def test_thickness_is_in_input_pixels_whatever_the_upsampling():
    # the same 32-px ring measured at 32, 64 and 128 px: one answer in 32-px units
    image = annulus(32, 4.0)
    for scale in (1, 2, 4):
        assert mm.stroke_thickness(image, scale=scale) == pytest.approx(4.0, abs=thickness_tolerance(scale))


def test_thickness_orders_strokes_by_width():
    widths = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    measured = [mm.stroke_thickness(annulus(16, w), scale=4) for w in widths]
    assert measured == sorted(measured)


@pytest.mark.parametrize("s", [-0.6, -0.25, 0.0, 0.3, 0.7])
def test_slant_of_a_sheared_bar_is_atan_of_its_shear(s):
    # Shearing x -> x + s (y_mean - y) keeps mu02 and adds -s mu02 to mu11, so -mu11 / mu02 = s exactly
    # in the continuum; the 8 x 8 sub-sampled coverage leaves an error far below 0.01.
    image = bar(32, 4.0, shear=s, height=16)
    assert mm.shear(image) == pytest.approx(s, abs=0.01)
    assert mm.slant(image) == pytest.approx(np.arctan(s), abs=0.01)


def test_sign_convention_a_stroke_whose_top_is_to_the_right_leans_right():
    image = np.zeros((10, 10))
    for row in range(2, 8):  # "/": the top row (row 2) holds the rightmost pixel
        image[row, 9 - row] = 1.0
    assert mm.slant(image) > 0
    assert mm.slant(image[:, ::-1]) < 0  # its mirror image, "\", leans left
    assert mm.slant(image) == pytest.approx(np.arctan(1.0))  # one column per row: 45 degrees


def test_a_blank_image_is_refused():
    with pytest.raises(ValueError, match="no ink"):
        mm.stroke_thickness(np.zeros((16, 16)), scale=4)
    with pytest.raises(ValueError, match="no ink"):
        mm.slant(np.zeros((16, 16)))
    with pytest.raises(ValueError, match="no vertical extent"):
        mm.slant(np.pad(np.ones((1, 5)), 3))  # one row of ink: mu02 = 0
    batch = -np.ones((3, 1, 16, 16))
    batch[0, 0] = 2 * annulus(16, 3.0) - 1
    batch[2, 0] = 2 * annulus(16, 2.0) - 1
    with pytest.raises(ValueError, match="image 1 of the batch"):
        mm.measure_batch(batch)


def test_batch_equals_each_image_measured_alone():
    shapes = [annulus(16, 2.0), annulus(16, 3.5), bar(16, 3.0, shear=0.4, height=12), bar(16, 2.0, shear=-0.3, height=12)]
    grey = np.stack(shapes)
    images = np.repeat(2 * grey[:, None] - 1, 3, axis=1)  # (N, 3, H, W) in [-1, 1]: the channels are averaged
    got = mm.measure_batch(images)
    assert got["thickness"].shape == got["slant"].shape == (4,)
    for i, image in enumerate(grey):
        assert got["thickness"][i] == mm.stroke_thickness(image, scale=mm.DIGITS_SCALE)
        assert got["slant"][i] == pytest.approx(mm.slant(image), abs=1e-12)


def test_missing_scikit_image_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.morphology", None)  # import of it now fails
    with pytest.raises(ImportError, match="pip install scikit-image"):
        mm.stroke_thickness(annulus(16, 2.0))
