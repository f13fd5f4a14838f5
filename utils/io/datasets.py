"""Labelled image sets for boundary search: an attribute table, or two folders (docs/algorithm.md sections 4, 8)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

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


#: Bounds of an attribute file, checked as it is read line by line (never read whole): characters
#: of one line (CelebA's are about 130), and columns (CelebA has 40).
MAX_ATTR_LINE = 1 << 16
MAX_ATTRIBUTES = 1000


def _attr_lines(fh, path: Path):
    """(line number, text) of each line, each read up to ``MAX_ATTR_LINE`` characters."""
    number = 0
    while True:
        try:
            line = fh.readline(MAX_ATTR_LINE + 1)
        except UnicodeDecodeError:
            raise UserError(f"attribute file {path} is not a text file") from None
        if not line:
            return
        number += 1
        if len(line) > MAX_ATTR_LINE and not line.endswith("\n"):
            raise UserError(f"attribute file {path} line {number} is longer than {MAX_ATTR_LINE} characters; "
                            "not an attribute file")
        yield number, line


def read_attr_file(path: str | Path) -> tuple[list[str], Mapping[str, np.ndarray]]:
    """A CelebA / CelebA-HQ attribute file: a count line, a line of attribute names, then rows
    ``<file name> v_1 ... v_A`` with values in {-1, 1} (0 = not labelled, an extension used by
    the digits set). Returns (names, {file name: (A,) int8 array}) (an ``AttributeRows``).

    Read line by line (memory: the table as int8 plus one dict entry per row, never the text
    whole). UserError, naming the file and line, for: a count line that is not the number of rows
    (a file cut short), a column named twice (ignoring case, as --edit_attr does), an image named
    twice with different labels (both line numbers), a line of the wrong length or with values
    outside {-1, 0, 1}, and for more than ``MAX_ATTRIBUTES`` columns or lines past ``MAX_ATTR_LINE``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"attribute file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        lines = _attr_lines(fh, path)
        head = [next(lines, None), next(lines, None)]
        if head[1] is None:
            raise UserError(f"attribute file {path} is too short: expected a count line and a line of names")
        count_text, names = head[0][1].strip(), head[1][1].split()
        if not count_text.isdigit():
            raise UserError(f"attribute file {path} line 1: expected the number of images, got '{count_text[:40]}'")
        if len(names) > MAX_ATTRIBUTES:
            raise UserError(f"attribute file {path} line 2 names {len(names)} attributes, more than {MAX_ATTRIBUTES}")
        seen: dict[str, int] = {}
        for column, name in enumerate(names, start=1):
            if name.lower() in seen:
                raise UserError(f"attribute file {path} line 2 names the attribute '{name}' twice (columns "
                                f"{seen[name.lower()]} and {column})")
            seen[name.lower()] = column
        index: dict[str, int] = {}
        table, line_of = bytearray(), []  # rows of int8 values, one after another
        for number, line in lines:
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
            earlier = index.get(parts[0])
            row = values.astype(np.int8).tobytes()
            if earlier is not None:
                width = len(names)
                if table[earlier * width:(earlier + 1) * width] != row:
                    raise UserError(f"attribute file {path} labels the image {parts[0][:100]} twice, differently: "
                                    f"lines {line_of[earlier]} and {number}")
            else:
                index[parts[0]] = len(line_of)
            table += row
            line_of.append(number)
    if int(count_text) != len(line_of):
        raise UserError(f"attribute file {path} line 1 says {int(count_text)} images, but the file holds "
                        f"{len(line_of)} rows (cut short?)")
    matrix = np.frombuffer(bytes(table), dtype=np.int8).reshape(len(line_of), len(names))
    return names, AttributeRows(index, matrix)


class AttributeRows(Mapping):
    """{file name: (A,) int8 labels} over one (rows, A) int8 matrix: no array object per row."""

    def __init__(self, index: dict[str, int], matrix: np.ndarray):
        self._index, self._matrix = index, matrix

    def __getitem__(self, name: str) -> np.ndarray:
        return self._matrix[self._index[name]]

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass(frozen=True)
class AttributeTable:
    """Images and their labels for several attributes: paths N files; names A attribute names (as
    the file spells them); labels (N, A) int64 in {-1, 0, 1} (0: not labelled)."""
    paths: tuple[Path, ...]
    names: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


ALL_ATTRIBUTES = "all"


def search_attributes(edit_attr: str | None) -> tuple[str, ...] | None:
    """The attributes a multi-attribute search fits: ``all`` -> None (every column), ``a,b,c`` ->
    ('a', 'b', 'c'); () for a single attribute (today's search). UserError for an empty or repeated
    name (ignoring case)."""
    if edit_attr is None or ("," not in edit_attr and edit_attr.strip().lower() != ALL_ATTRIBUTES):
        return ()
    if edit_attr.strip().lower() == ALL_ATTRIBUTES:
        return None
    names = tuple(a.strip() for a in edit_attr.split(","))
    if not all(names):
        raise UserError(f"--edit_attr {edit_attr}: an empty attribute name")
    lower = [a.lower() for a in names]
    twice = sorted({a for a in lower if lower.count(a) > 1})
    if twice:
        raise UserError(f"--edit_attr names {', '.join(twice)} more than once")
    return names


def attribute_table(data_dir: str | Path, attr_file: str | Path, attributes: Sequence[str] | None = None
                    ) -> AttributeTable:
    """The images of ``data_dir`` that have a row in ``attr_file``, with the columns ``attributes``
    (case-insensitive, in the order given; None: every column).

    Images are matched to rows by file name, or by name without suffix (000001.jpg ~ 000001.png);
    images without a row are left out.
    """
    names, rows = read_attr_file(attr_file)
    lower = [n.lower() for n in names]
    wanted = names if attributes is None else list(attributes)
    columns = []
    for attribute in wanted:
        if attribute.lower() not in lower:
            raise UserError(f"attribute '{attribute}' is not in {attr_file} (names: {', '.join(names)})")
        columns.append(lower.index(attribute.lower()))
    by_stem = {Path(name).stem: name for name in rows}
    paths, labels = [], []
    for image in list_images(data_dir):
        values = rows.get(image.name)
        if values is None and image.stem in by_stem:
            values = rows[by_stem[image.stem]]
        if values is not None:
            paths.append(image)
            labels.append(values[columns])
    table = np.array(labels, dtype=np.int64).reshape(len(paths), len(columns))
    return AttributeTable(tuple(paths), tuple(names[c] for c in columns), table)


def from_attr_file(data_dir: str | Path, attr_file: str | Path, attribute: str) -> LabelledImages:
    """Images of ``data_dir`` labelled by the column ``attribute`` (case-insensitive) of ``attr_file``
    (``attribute_table``); rows labelled 0 are left out."""
    table = attribute_table(data_dir, attr_file, [attribute])
    labelled = table.labels[:, 0] != 0
    if not labelled.any():
        raise UserError(f"no image in {data_dir} has a label for '{table.names[0]}' in {attr_file} "
                        "(matched by file name)")
    return LabelledImages(tuple(p for p, keep in zip(table.paths, labelled) if keep),
                          (table.labels[labelled, 0] > 0).astype(np.int64))


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
