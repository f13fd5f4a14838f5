"""Reading the region a user wants edited: a mask image or a box, as a size x size mask in [0, 1]."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from utils.errors import UserError
from utils.io.images import open_image

@dataclass(frozen=True)
class RegionSpec:
    """The region to edit, as read: mask (size, size) float32 in [0, 1] (1: editable; fractional
    where a pixel is partly inside), coverage = the mask's mean (the share of the image editable).

    Where it came from: kind 'file' with the path and the sha256 of the file's bytes, or kind 'box'
    with (x0, y0, x1, y1) in fractions of the image's width and height."""
    mask: np.ndarray
    kind: str
    coverage: float
    path: str | None = None
    sha256: str | None = None
    box: tuple[float, float, float, float] | None = None

    def describe(self) -> str:
        """One line for logs and metadata: 'file <path> (sha256 <12 hex>), 23.4 % of the image'."""
        where = (f"file {self.path} (sha256 {self.sha256[:12]})" if self.kind == "file"
                 else "box " + ",".join(f"{v:g}" for v in self.box))
        return f"{where}, {self.coverage:.1%} of the image"


def read_region(spec: str, size: int) -> RegionSpec:
    """The region ``spec`` names at ``size`` x ``size`` pixels: an existing file is a mask image;
    anything else with a comma is a box; anything else is a missing mask image.

    - A mask image (any format and size ``utils.io.images.open_image`` reads): white = editable.
      Converted to grey (transparent pixels count as white, as ``open_image`` composites them),
      centre-cropped to a square exactly as ``image_to_tensor`` crops the images it is paired
      with, then resized with an area (box) filter, so each pixel's value is the share of it the
      white covers, in [0, 1].
    - A box ``x0,y0,x1,y1`` in fractions of the image (0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1; x
      rightward, y downward): each pixel's value is the share of its area inside the box.

    UserError (one line) for a missing or unreadable file, a malformed box, and a region that is
    empty (under one pixel editable in all) or full (under one pixel kept: that is not a region).
    """
    if size < 1:
        raise ValueError(f"the mask size must be >= 1, got {size}")
    path = Path(spec)
    if path.is_file() or "," not in spec:  # a comma and no such file: a box
        mask = _read_mask(path, size)
        region = RegionSpec(mask, "file", float(mask.mean()), path=str(path), sha256=_sha256(path))
    else:
        box = _parse_box(spec, size)
        mask = _box_mask(box, size)
        region = RegionSpec(mask, "box", float(mask.mean()), box=box)
    editable = float(mask.astype(np.float64).sum())
    if editable < 1:
        raise UserError(f"--region {spec}: nothing to edit ({editable:.2g} of {size} x {size} pixels editable); "
                        "white marks the editable part of a mask")
    if size * size - editable < 1:
        raise UserError(f"--region {spec}: everything is editable, that is not a region; drop --region")
    return region


def _read_mask(path: Path, size: int) -> np.ndarray:
    """A mask image as (size, size) float32 in [0, 1]: grey, centre-cropped, area-resized."""
    if not path.exists():
        raise UserError(f"--region {path}: no such mask image (nor a box x0,y0,x1,y1)")
    grey = open_image(path, channels=1).convert("F")  # 0..255 as float: no rounding while resizing
    side = min(grey.size)
    if grey.size[0] != grey.size[1]:  # the very crop ``image_to_tensor`` makes of the image
        grey = ImageOps.fit(grey, (side, side), method=Image.Resampling.BICUBIC)
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BOX)
    return np.clip(np.asarray(grey, dtype=np.float32) / 255.0, 0.0, 1.0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_box(spec: str, size: int) -> tuple[float, float, float, float]:
    """x0,y0,x1,y1 -> four floats, or UserError saying what is wrong."""
    parts = [p.strip() for p in spec.split(",")]
    form = "a box is x0,y0,x1,y1 in fractions of the image, 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
    if len(parts) != 4:
        raise UserError(f"--region {spec}: {len(parts)} values and no such mask image; {form}")
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--region {spec}: not four numbers and no such mask image; {form}") from None
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in (x0, y0, x1, y1)):
        raise UserError(f"--region {spec}: a value outside [0, 1]; {form}")
    if not (x0 < x1 and y0 < y1):
        raise UserError(f"--region {spec}: the box is empty or inverted; {form}")
    area = (x1 - x0) * (y1 - y0) * size * size
    if area < 1:
        raise UserError(f"--region {spec}: the box covers {area:.2g} pixel at {size} x {size}, under one pixel")
    return x0, y0, x1, y1


def _box_mask(box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """(size, size) float32: the share of each pixel's area inside the box (separable: the
    overlap of the pixel's column with [x0, x1] times that of its row with [y0, y1])."""
    x0, y0, x1, y1 = (v * size for v in box)
    pixel = np.arange(size, dtype=np.float64)

    def overlap(lo: float, hi: float) -> np.ndarray:
        return np.clip(np.minimum(pixel + 1, hi) - np.maximum(pixel, lo), 0.0, 1.0)

    return np.outer(overlap(y0, y1), overlap(x0, x1)).astype(np.float32)
