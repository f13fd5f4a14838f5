"""Stroke thickness and slant measured from pixels, after Morpho-MNIST's definitions
(Castro et al., "Morpho-MNIST: quantitative assessment and diagnostics for representation learning",
JMLR 2019); written for this project.

- **Thickness**: binarise the image (after upsampling it ``scale`` times, as Morpho-MNIST upsamples
  28 -> 112 px), skeletonise the ink, and take twice the mean Euclidean distance map value (distance
  from an ink pixel's centre to the nearest background pixel's centre) over the skeleton pixels.
  Reported in pixels of the *input* image: the value at the measuring resolution divided by
  ``scale``. Because the distance map reaches the centre of the first background pixel, a straight
  stroke n pixels wide at the measuring resolution measures n or n + 1 (even or odd n): the bias is
  at most one measuring pixel, 1 / ``scale`` input pixels.
- **Slant**: from the central second moments of the ink, mu11 = sum w (x - x_mean)(y - y_mean) and
  mu02 = sum w (y - y_mean)^2, with x the column and y the row index (rows grow DOWN the image), the
  horizontal shear s = -mu11 / mu02 and the slant angle atan(s), in radians. **Sign convention: a
  positive slant leans RIGHT** (the top of the stroke lies to the right of its bottom, like "/"),
  matching the ``slant`` label of ``scripts/make_digits.py``. Shearing an upright shape by
  x -> x + s (y_mean - y) gives slant atan(s) exactly (in the continuum). Morpho-MNIST takes the
  moments of the binarised image; here the weights w are the grey levels in [0, 1] at the input
  resolution (the same weighting as the ``slant`` label the boundary was fitted on), which avoids the
  binarisation's quantisation on a 16 x 16 digit.

The bundled digits model works at 16 x 16 (``configs/digits.yml``: sklearn's 8 x 8 digits upsampled
bilinearly by ``scripts/make_digits.py``); ``DIGITS_SCALE`` = 4 measures thickness at 64 x 64, the
same factor as Morpho-MNIST's. Arrays in, numbers out; scikit-image (``pip install scikit-image``)
is needed for the skeleton only.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt, zoom

SKIMAGE_INSTALL = "pip install scikit-image"
DIGITS_SCALE = 4  # 16 x 16 digits measured at 64 x 64, Morpho-MNIST's factor (28 -> 112)
INK_THRESHOLD = 0.5  # grey level in [0, 1] above which a pixel is ink (the binarisation)


def _skeletonize():
    try:
        from skimage.morphology import skeletonize
    except ImportError as exc:  # an optional extra: say how to get it
        raise ImportError(f"stroke thickness needs scikit-image ({SKIMAGE_INSTALL})") from exc
    return skeletonize


def check_scikit_image() -> None:
    """ImportError with the install line unless scikit-image (the skeleton) can be imported."""
    _skeletonize()


def binarise(image: np.ndarray, scale: int = 1, threshold: float = INK_THRESHOLD) -> np.ndarray:
    """Ink mask of a grey image, optionally upsampled first.

    image: (H, W) grey levels in [0, 1] (1 = ink). The image is upsampled ``scale`` times by linear
    interpolation (``scipy.ndimage.zoom``, order 1, grid_mode: pixel areas scale, as in a bilinear
    resize), then thresholded. Returns a (scale H, scale W) bool array.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a (H, W) image, got shape {image.shape}")
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if scale > 1:
        image = zoom(image, scale, order=1, mode="grid-constant", cval=0.0, grid_mode=True)
    return image > threshold


def stroke_thickness(image: np.ndarray, scale: int = 1, threshold: float = INK_THRESHOLD) -> float:
    """Morpho-MNIST's stroke thickness: 2 x mean distance-map value on the skeleton, in input pixels.

    image: (H, W) grey levels in [0, 1] (1 = ink). Measured on ``binarise(image, scale, threshold)``
    and divided by ``scale``. ValueError when no pixel is ink (a blank image has no stroke).
    """
    mask = binarise(image, scale, threshold)
    if not mask.any():
        raise ValueError(f"no ink: no pixel is above {threshold} (a blank image has no stroke thickness)")
    # Pad with background so that ink touching the border still has a finite distance to background.
    mask = np.pad(mask, 1)
    skeleton = _skeletonize()(mask)
    distance = distance_transform_edt(mask)
    return float(2.0 * distance[skeleton].mean() / scale)


def shear(weights: np.ndarray) -> float:
    """Horizontal shear -mu11 / mu02 of a non-negative image; > 0 leans right (rows grow down).

    weights: (H, W) non-negative (grey levels or a mask). Dimensionless (pixels of x per pixel of y).
    ValueError when the image has no ink or no vertical extent (mu02 = 0: a single row).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a (H, W) image, got shape {w.shape}")
    return float(_shears(w[None])[0])


def slant(weights: np.ndarray) -> float:
    """Slant angle atan(shear(weights)) in radians, in (-pi/2, pi/2); > 0 leans right."""
    return float(np.arctan(shear(weights)))


def _shears(w: np.ndarray) -> np.ndarray:
    """(N,) shears -mu11 / mu02 of (N, H, W) non-negative images; ValueError naming a blank one."""
    if np.any(w < 0):
        raise ValueError("moment weights must be non-negative")
    _, height, width = w.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    mass = w.sum(axis=(1, 2))
    if np.any(mass <= 0):
        raise ValueError(f"no ink in image {int(np.argmax(mass <= 0))} of the batch (a blank image has no slant)")
    x_mean = (w * xs).sum(axis=(1, 2)) / mass
    y_mean = (w * ys).sum(axis=(1, 2)) / mass
    dx, dy = xs[None] - x_mean[:, None, None], ys[None] - y_mean[:, None, None]
    mu11, mu02 = (w * dx * dy).sum(axis=(1, 2)), (w * dy * dy).sum(axis=(1, 2))
    if np.any(mu02 <= 0):
        raise ValueError(f"image {int(np.argmax(mu02 <= 0))} of the batch has no vertical extent (mu02 = 0)")
    return -mu11 / mu02


def to_grey(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W) grey levels in [0, 1]: channel mean, then clipped."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {images.shape}")
    return np.clip((images.mean(axis=1) + 1.0) / 2.0, 0.0, 1.0)


def measure_batch(images: np.ndarray, scale: int = DIGITS_SCALE,
                  threshold: float = INK_THRESHOLD) -> dict[str, np.ndarray]:
    """Thickness and slant of every image of a batch.

    images: (N, C, H, W) in [-1, 1] (a float array or anything ``np.asarray`` takes, e.g. a CPU
    tensor). Returns {"thickness": (N,) input pixels, "slant": (N,) radians}, float64, equal to
    ``stroke_thickness`` / ``slant`` of each image's ``to_grey`` (the moments are computed for the
    whole batch at once; the skeleton runs image by image). ValueError naming the first blank image.
    """
    grey = to_grey(images)
    thickness = np.empty(len(grey))
    for i, image in enumerate(grey):
        try:
            thickness[i] = stroke_thickness(image, scale, threshold)
        except ValueError as exc:
            raise ValueError(f"image {i} of the batch: {exc}") from None
    return {"thickness": thickness, "slant": np.arctan(_shears(grey))}
