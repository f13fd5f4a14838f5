"""Labelled image sets for boundary search: an attribute table, or two folders (docs/algorithm.md sections 4, 8)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.io.images import list_images


@dataclass(frozen=True)
class LabelledImages:
    """paths: N image files; labels: (N,) int64 in {0, 1} (1 = has the attribute)."""
    paths: tuple[Path, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def read_attr_file(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """A CelebA / CelebA-HQ attribute file: a count line, a line of attribute names, then rows
    ``<file name> v_1 ... v_A`` with values in {-1, 1} (0 = not labelled, an extension used by
    the digits set). Returns (names, {file name: (A,) int array})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"attribute file {path} does not exist")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"attribute file {path} is not a text file") from None
    if len(lines) < 2:
        raise UserError(f"attribute file {path} is too short: expected a count line and a line of names")
    names = lines[1].split()
    rows: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise UserError(f"attribute file {path} line {number}: {len(parts) - 1} values for {len(names)} attributes")
        try:
            values = np.array([int(v) for v in parts[1:]], dtype=np.int64)
        except ValueError:
            raise UserError(f"attribute file {path} line {number}: values must be -1, 0 or 1") from None
        if not np.isin(values, (-1, 0, 1)).all():
            raise UserError(f"attribute file {path} line {number}: values must be -1, 0 or 1")
        rows[parts[0]] = values
    return names, rows


def from_attr_file(data_dir: str | Path, attr_file: str | Path, attribute: str) -> LabelledImages:
    """Images of ``data_dir`` labelled by the column ``attribute`` (case-insensitive) of ``attr_file``.

    Images are matched to rows by file name, or by name without suffix (000001.jpg ~ 000001.png);
    images without a row and rows labelled 0 are left out.
    """
    names, rows = read_attr_file(attr_file)
    lower = [n.lower() for n in names]
    if attribute.lower() not in lower:
        raise UserError(f"attribute '{attribute}' is not in {attr_file} (names: {', '.join(names)})")
    column = lower.index(attribute.lower())
    by_stem = {Path(name).stem: values for name, values in rows.items()}
    paths, labels = [], []
    for image in list_images(data_dir):
        values = rows.get(image.name)
        if values is None:
            values = by_stem.get(image.stem)
        if values is None or values[column] == 0:
            continue
        paths.append(image)
        labels.append(int(values[column] > 0))
    if not paths:
        raise UserError(f"no image in {data_dir} has a label for '{names[column]}' in {attr_file} (matched by file name)")
    return LabelledImages(tuple(paths), np.array(labels, dtype=np.int64))


def from_folders(pos_dir: str | Path, neg_dir: str | Path) -> LabelledImages:
    """Positives from one folder, negatives from another (the text-conditioned recipe, docs/algorithm.md section 8)."""
    pos, neg = list_images(pos_dir), list_images(neg_dir)
    return LabelledImages(tuple(pos + neg), np.array([1] * len(pos) + [0] * len(neg), dtype=np.int64))


def labelled_set(attribute: str | None, data_dir: str | Path | None, attr_file: str | Path | None,
                 pos_dir: str | Path | None = None, neg_dir: str | Path | None = None) -> tuple[LabelledImages, str]:
    """The boundary search's labelled images and the attribute's name: from two folders (positives,
    negatives; the attribute defaults to the positive folder's name) when given, else ``attribute``'s
    column of a CelebA-format attribute file. UserError when the flags do not name a set."""
    if pos_dir or neg_dir:
        if not (pos_dir and neg_dir):
            raise UserError("--pos_dir and --neg_dir go together")
        return from_folders(pos_dir, neg_dir), attribute or Path(pos_dir).name
    if not attribute:
        raise UserError("--boundary_search needs --edit_attr (with --data_dir/--attr_file) or --pos_dir/--neg_dir")
    if not data_dir or not attr_file:
        raise UserError("the config names no data folder; pass --data_dir and --attr_file")
    return from_attr_file(data_dir, attr_file, attribute), attribute


def check_two_classes(labels: np.ndarray, what: str, minimum: int = 2) -> None:
    """UserError unless ``labels`` hold at least ``minimum`` items of each class."""
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if min(n_pos, n_neg) < minimum:
        raise UserError(f"the {what} holds {n_pos} positive and {n_neg} negative images; "
                        f"boundary search needs at least {minimum} of each class")
