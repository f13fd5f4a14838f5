"""Reading the region a user wants edited: a mask image or a box, as a size x size mask in [0, 1]."""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from utils.errors import UserError
from utils.io.files import read_json, sha256_file
from utils.io.images import open_image

@dataclass(frozen=True)
class RegionSpec:
    """The region to edit, as read: mask (size, size) float32 in [0, 1] (1: editable; fractional
    where a pixel is partly inside), coverage = the mask's mean (the share of the image editable).

    Where it came from: kind 'file' with the path and the sha256 of the file's bytes, kind 'box'
    with (x0, y0, x1, y1) in fractions of the image's width and height, or kind 'part' with the
    part's name and the parts file it was read from (``read_parts``)."""
    mask: np.ndarray
    kind: str
    coverage: float
    path: str | None = None
    sha256: str | None = None
    box: tuple[float, float, float, float] | None = None
    part: str | None = None

    def describe(self) -> str:
        """One line for logs and metadata: 'file <path> (sha256 <12 hex>), 23.4 % of the image'."""
        where = {"file": lambda: f"file {self.path} (sha256 {(self.sha256 or '')[:12]})",
                 "box": lambda: "box " + ",".join(f"{v:g}" for v in self.box),
                 "part": lambda: f"part {self.part} of {self.path}"}[self.kind]()
        return f"{where}, {self.coverage:.1%} of the image"

    def source(self) -> str:
        """What the region is, the same for every image it is read for: 'part mouth', 'box
        0.2,0.5,0.8,1' or 'file mask.png sha256 <64 hex>' (what a boundary fitted on it records)."""
        return {"file": lambda: f"file {Path(self.path).name} sha256 {self.sha256}",
                "box": lambda: "box " + ",".join(f"{v:g}" for v in self.box),
                "part": lambda: f"part {self.part}"}[self.kind]()

    def record(self) -> dict:
        """What summaries record: where the region came from and the share of the image it covers."""
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256,
                "box": None if self.box is None else list(self.box), "part": self.part, "coverage": self.coverage}


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
    if path.is_file() or "," not in spec:  # no comma: a file (a missing one is _read_mask's error)
        mask = _read_mask(path, size)
        region = RegionSpec(mask, "file", float(mask.mean()), path=str(path), sha256=sha256_file(path))
    else:  # a comma and no such file: a box
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


#: The parts file beside an image (``<image>.parts.npz``) and the data set's (``masks_<split>.npz``):
#: arrays ``names`` (N,), ``parts`` (P,) and ``masks`` (N, P, H, W) uint8 coverage (255: all of the pixel).
PARTS_SUFFIX = ".parts.npz"
MAX_PARTS_FILE = 1 << 30


def parts_files(image: Path, data_dirs: list[Path]) -> list[Path]:
    """Where the named parts of ``image`` may be: its own ``<image>.parts.npz``, then every
    ``masks_*.npz`` of the data folders (the synthetic faces write ``masks_train.npz`` and
    ``masks_test.npz`` beside their images' folder)."""
    found = [image.with_name(image.name + PARTS_SUFFIX)]
    for folder in data_dirs:
        found += sorted(Path(folder).glob("masks_*.npz"))
    return [p for p in found if p.is_file()]


def read_parts(images: Sequence[Path], part: str, size: int, data_dirs: list[Path]) -> list[RegionSpec]:
    """Each image's mask of the part ``part`` (e.g. mouth, eyes, hair, or a union such as
    ``hair+face``: per pixel the largest of the parts' coverages) at size x size, from the first
    parts file that names the image (``parts_files``). Each parts file is read once however many
    images it holds (a data set's file holds every face of its split). UserError naming the parts
    a file has, a part that covers under one pixel of an image, or what to pass instead when no
    parts file names an image."""
    return read_part_sets(images, [part], size, data_dirs)[part]


def read_part_sets(images: Sequence[Path], parts: Sequence[str], size: int, data_dirs: list[Path],
                   asked: str | None = None) -> dict[str, list[RegionSpec]]:
    """``read_parts`` of several parts (or unions) of the same images at once, {part: masks}: each
    parts file is read once for all of them (a data set's file holds every face of its split, and
    ``--region auto`` asks for every part). asked: what the errors call the request (default: the
    parts, comma-separated)."""
    wanted = {part: part.split("+") for part in dict.fromkeys(parts)}
    for part, names in wanted.items():
        if not all(names):
            raise UserError(f"--region {part}: an empty part name; name a part (mouth) or a union of parts (hair+face)")
    indexes: dict[Path, tuple[dict[str, int], list[str]]] = {}

    def index(path: Path) -> tuple[dict[str, int], list[str]]:
        if path not in indexes:
            indexes[path] = _parts_index(path)
        return indexes[path]

    where: list[tuple[Path, int]] = []
    shown = asked or ", ".join(wanted)
    for image in map(Path, images):
        for path in parts_files(image, data_dirs):
            if path.stat().st_size > MAX_PARTS_FILE:
                raise UserError(f"--region {shown}: {path} is {path.stat().st_size} bytes, more than a parts file may "
                                f"be ({MAX_PARTS_FILE})")
            rows, known = index(path)
            if image.name not in rows and path.name != image.name + PARTS_SUFFIX:
                continue
            for part, names in wanted.items():
                if any(p not in known for p in names):
                    raise UserError(f"--region {part}: {path} has the parts {', '.join(known)}")
            where.append((path, rows.get(image.name, 0)))
            break
        else:
            raise UserError(f"--region {shown}: no parts file names {image.name} (looked for {image.name}{PARTS_SUFFIX} "
                            "and the data set's masks_*.npz); give a mask image or a box x0,y0,x1,y1")
    masks: dict[str, list[np.ndarray | None]] = {part: [None] * len(where) for part in wanted}
    for path in dict.fromkeys(p for p, _ in where):
        with np.load(path, allow_pickle=False) as file:
            stack = file["masks"]
        held_here = [(i, row) for i, (source, row) in enumerate(where) if source == path]
        for part, names in wanted.items():
            columns = [indexes[path][1].index(p) for p in names]
            for i, row in held_here:
                masks[part][i] = stack[row, columns].max(axis=0).astype(np.float32) / 255.0
    return {part: [_part_spec(mask, Path(image).name, part, path, size)
                   for mask, image, (path, _) in zip(masks[part], images, where)] for part in wanted}


def _parts_index(path: Path) -> tuple[dict[str, int], list[str]]:
    """({image name: row}, part names) of a parts file, its ``masks`` checked from the header (N
    names x P parts of uint8 images, at most ``MAX_PARTS_FILE`` bytes) before any mask is read.
    UserError in one line for a file that is not such a parts file."""
    try:
        with np.load(path, allow_pickle=False) as parts:
            names, known = [str(n) for n in parts["names"]], [str(p) for p in parts["parts"]]
        with zipfile.ZipFile(path) as archive, archive.open("masks.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"parts file {path} is unreadable or lacks names, parts or masks ({type(exc).__name__})") \
            from None
    if len(shape) != 4 or tuple(shape[:2]) != (len(names), len(known)) or dtype != np.uint8 \
            or int(np.prod(shape)) > MAX_PARTS_FILE:
        raise UserError(f"parts file {path}: masks must be uint8 of shape ({len(names)} names, {len(known)} parts, "
                        f"H, W) and at most {MAX_PARTS_FILE} bytes, got {dtype} {tuple(shape)}")
    return {n: i for i, n in enumerate(names)}, known


def _part_spec(mask: np.ndarray, image_name: str, part: str, path: Path, size: int) -> RegionSpec:
    """One image's part mask resized to size x size (area filter), clipped, checked non-empty."""
    if mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask, mode="F").resize((size, size), Image.Resampling.BOX))
    mask = np.clip(mask, 0.0, 1.0).astype(np.float32)
    if float(mask.sum()) < 1:
        raise UserError(f"--region {part}: the {part} of {image_name} covers under one pixel; choose another")
    return RegionSpec(mask, "part", float(mask.mean()), path=str(path), part=part)


#: ``--region auto``: each attribute on its own part, from the data set's ``ATTRIBUTE_PARTS_FILE``.
AUTO_REGION = "auto"
#: Beside a data set's parts files: {attribute: part} in JSON, the part a ``read_parts`` name (``mouth``,
#: ``hair+face``): where the data set draws each attribute (the synthetic faces write it).
ATTRIBUTE_PARTS_FILE = "attribute_parts.json"


def read_attribute_parts(data_dirs: list[Path]) -> dict[str, str]:
    """The first ``ATTRIBUTE_PARTS_FILE`` of ``data_dirs``: {attribute: part}. UserError in one line
    when there is none or it is not such a mapping."""
    for folder in data_dirs:
        path = Path(folder) / ATTRIBUTE_PARTS_FILE
        if not path.is_file():
            continue
        table = read_json(path, f"--region {AUTO_REGION}: the attributes' parts file")
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                  for k, v in table.items()):
            raise UserError(f"--region {AUTO_REGION}: {path} must map each attribute to a part's name")
        return table
    raise UserError(f"--region {AUTO_REGION}: no {ATTRIBUTE_PARTS_FILE} in the data set's parts folder "
                    f"({', '.join(map(str, data_dirs)) or 'the config names none: data.parts_dir'}); "
                    "name one region for every attribute instead")


def attribute_parts(table: dict[str, str], names) -> dict[str, str]:
    """{name: its part} from ``table`` (names matched ignoring case, as attribute columns are);
    UserError naming the attributes the table leaves out."""
    lower = {k.lower(): v for k, v in table.items()}
    missing = [n for n in names if n.lower() not in lower]
    if missing:
        raise UserError(f"--region {AUTO_REGION}: {ATTRIBUTE_PARTS_FILE} names no part for "
                        f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    return {n: lower[n.lower()] for n in names}
