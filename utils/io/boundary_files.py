"""Boundary files: a plain ``.npz`` of arrays and strings, read back with ``allow_pickle=False``.

Fields: ``normal`` (D,) float32 unit; ``coef`` (D,) float32; ``intercept``; ``shape`` (the latent's
shape without batch); ``space`` ('h' or 'z'); ``t_0``; ``n_inv_step``; ``attribute``;
``train_acc``/``test_acc``; ``n_train``/``n_test``/``n_pos``/``n_neg``; ``config_name``;
``checkpoint_sha256``; ``format_version``; from version 2 ``class_summary``: (2, 2, 5) float64, for
[train, test] x [negative, positive] class the statistics ``SUMMARY_STATS`` (mean, std, 5th/50th/95th
percentiles) of the signed hyperplane distances (w.x + b) / ||w|| (nan for an empty split or class).
Version 1 files (without it) still load, with ``class_summary`` None. Optional: ``fit_region`` (text),
the region the normal was fitted on (``--boundary_search --region``), absent for the whole latent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from utils.core.boundary import SUMMARY_STATS, Boundary
from utils.core.spaces import SPACES
from utils.errors import UserError
from utils.io.files import write_new_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SPLITS, CLASSES = ("train", "test"), ("neg", "pos")


@dataclass(frozen=True)
class BoundaryRecord:
    normal: np.ndarray
    coef: np.ndarray
    intercept: float
    shape: tuple[int, ...]
    space: str
    t_0: int
    n_inv_step: int
    attribute: str = ""
    train_acc: float = float("nan")
    test_acc: float = float("nan")
    n_train: int = 0
    n_test: int = 0
    n_pos: int = 0
    n_neg: int = 0
    config_name: str = ""
    checkpoint_sha256: str = ""
    #: {'train'|'test': {'neg'|'pos': {stat: value}}} (``utils.core.boundary.class_summary``), or None.
    class_summary: dict | None = None
    #: The region the normal was fitted on (``RegionSpec.source``: 'part mouth', 'box ...', 'file ...'),
    #: '' for the whole latent.
    fit_region: str = ""

    @classmethod
    def from_boundary(cls, boundary: Boundary, **meta) -> "BoundaryRecord":
        return cls(normal=boundary.normal, coef=boundary.coef, intercept=boundary.intercept,
                   train_acc=boundary.train_acc, test_acc=boundary.test_acc, **meta)

    def with_direction(self, normal: np.ndarray) -> "BoundaryRecord":
        """This record's header with ``normal`` (a unit vector of the record's shape) as a direction
        that nothing was fitted for: coef the normal, intercept 0, no accuracies, no class summary."""
        return dataclasses.replace(self, normal=normal, coef=normal.copy(), intercept=0.0, train_acc=float("nan"),
                                   test_acc=float("nan"), class_summary=None)

    def describe(self) -> dict:
        """Metadata without the arrays (for summaries)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("normal", "coef")}


def summary_array(summary: dict) -> np.ndarray:
    """A record's ``class_summary`` dict as the (2, 2, 5) float64 array files store (missing entries nan)."""
    return np.array([[[summary.get(split, {}).get(cls, {}).get(stat, np.nan) for stat in SUMMARY_STATS]
                      for cls in CLASSES] for split in SPLITS], dtype=np.float64)


def summary_dict(array: np.ndarray) -> dict:
    """The inverse of ``summary_array``."""
    return {split: {cls: {stat: float(array[i, j, k]) for k, stat in enumerate(SUMMARY_STATS)}
                    for j, cls in enumerate(CLASSES)} for i, split in enumerate(SPLITS)}


#: The largest |d| an auto range may reach: the bound configs put on edit distances
#: (``edit.start_distance``, ``utils.config``). Class summaries beyond it are damaged, not data: a
#: 256-px latent's projection is of the order of sqrt(D) < 500.
MAX_AUTO_DISTANCE = 1e12


def hyperplane_offset(record: BoundaryRecord) -> float:
    """-b / ||w||: where the SVM's hyperplane w.x + b = 0 crosses the unit normal, in v.n. A
    hyperplane distance s = (w.x + b) / ||w|| (what class summaries hold) is the projection v.n
    minus this offset. nan or infinite for a damaged file (the callers check)."""
    with np.errstate(all="ignore"):
        return float(-float(record.intercept) / float(np.linalg.norm(np.asarray(record.coef, dtype=np.float64))))


def _auto_ends(record: BoundaryRecord, split: str) -> tuple[float, float] | str:
    """(start, end) of ``auto_range`` in projection units, or why there is none (the message)."""
    where = f"the {record.space} boundary for '{record.attribute}'"
    if record.class_summary is None:
        return f"{where} has no class summary (an older file); fit it again with --boundary_search to use auto distances"
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (choices: {', '.join(SPLITS)})")
    stats = record.class_summary[split]
    for cls in CLASSES:
        p5, p95 = stats[cls]["p5"], stats[cls]["p95"]
        if np.isinf(p5) or np.isinf(p95):
            return (f"{where} is damaged: its {split} class summary holds an infinite percentile ({cls} class: "
                    f"p5 {p5:g}, p95 {p95:g}); fit it again, or give --start_distance and --end_distance")
        if p5 > p95:
            return (f"{where} is damaged: its {split} class summary has p5 above p95 ({cls} class: p5 {p5:g}, "
                    f"p95 {p95:g}); fit it again, or give --start_distance and --end_distance")
    low, high = stats["neg"]["p5"], stats["pos"]["p95"]
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{where} has no {split} latents of both classes to derive auto distances from"
    offset = hyperplane_offset(record)
    with np.errstate(all="ignore"):
        ends = (float(low) + offset, float(high) + offset)
    if not all(np.isfinite(v) and abs(v) <= MAX_AUTO_DISTANCE for v in ends):
        return (f"{where} is damaged: its {split} class summary puts the auto range at {ends[0]:g} .. {ends[1]:g}, "
                f"beyond the +-{MAX_AUTO_DISTANCE:g} any edit distance may take; fit it again, or give "
                "--start_distance and --end_distance")
    return ends


def auto_range_problem(record: BoundaryRecord, split: str = "train") -> str | None:
    """Why ``record`` gives no ``auto_range`` (the one-line message ``auto_range`` raises), or None
    when it does: no class summary, no latents of one class, an infinite percentile, p5 above p95
    within a class, or ends beyond ``MAX_AUTO_DISTANCE`` (so that ``auto_range`` and the range scaled
    about its centre stay finite). Front ends call it to fall back to the config's range."""
    ends = _auto_ends(record, split)
    return ends if isinstance(ends, str) else None


def auto_range(record: BoundaryRecord, split: str = "train") -> tuple[float, float]:
    """The edit distances that span where the classes lie: (start, end) from the negative class's
    5th percentile to the positive class's 95th, over ``split``'s latents.

    In the units of the edit's d, the projection v.n onto the unit normal that ``edit_latents``
    sets (the SVM intercept ignored), NOT the hyperplane distance s = v.n + b/||w|| the file's
    summary holds: both ends are shifted by -b/||w||. Valid for the record's own normal (a normal
    projected orthogonal to conditions moves the projections). UserError with the message of
    ``auto_range_problem`` when there is none (an older file, a split without latents of both
    classes, a damaged summary); both ends are finite and within +-``MAX_AUTO_DISTANCE``.
    """
    ends = _auto_ends(record, split)
    if isinstance(ends, str):
        raise UserError(ends)
    return ends


# What each field may hold: its numpy kind ('f' float, 'i' integer, 'U' text) and how many values.
_SCALAR_KINDS = {"intercept": "fi", "t_0": "i", "n_inv_step": "i", "train_acc": "fi", "test_acc": "fi",
                 "n_train": "i", "n_test": "i", "n_pos": "i", "n_neg": "i", "format_version": "i",
                 "space": "U", "attribute": "U", "config_name": "U", "checkpoint_sha256": "U",
                 "fit_region": "U"}
_MAX_TEXT = 1024          # characters of a text field
_MAX_DIMS = 8             # entries of ``shape``
MAX_VALUES = 1 << 24      # entries of a normal when the model is not known (64 MiB as float32)
#: Characters of an attribute name a boundary file may carry (its ``attribute`` field is text of at
#: most ``_MAX_TEXT`` characters; CelebA's longest name has 19).
MAX_ATTRIBUTE_NAME = 200
_SLUG_CHARS = 60          # characters of the attribute's part of a file name


def attribute_slug(attribute: str) -> str:
    """The attribute's part of a boundary file name: lower-cased, anything but ASCII letters, digits,
    ``-`` and ``_`` as ``_``, at most 60 characters (``boundary_name``; ``check_attribute_names``)."""
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in attribute.lower())[:_SLUG_CHARS] \
        or "attribute"


def boundary_name(config_name: str, attribute: str, t_0: int, space: str) -> str:
    """The name a boundary search gives its file: ``<config>_<attribute slug>_t<t_0>_<space>``."""
    return f"{config_name}_{attribute_slug(attribute)}_t{t_0}_{space}"


def check_attribute_names(names) -> None:
    """That the attributes ``names`` can each have boundary files of their own that load again: no
    name longer than ``MAX_ATTRIBUTE_NAME`` characters, and no two names with one file name
    (``attribute_slug``: ``a.b``, ``a,b`` and ``a_b`` are all ``a_b``). UserError naming them, before
    any work."""
    owners: dict[str, str] = {}
    for name in names:
        if len(name) > MAX_ATTRIBUTE_NAME:
            raise UserError(f"the attribute name {name[:40]!r}... has {len(name)} characters, more than the "
                            f"{MAX_ATTRIBUTE_NAME} a boundary file keeps; rename the column")
        slug = attribute_slug(name)
        if slug in owners:
            raise UserError(f"the attributes {owners[slug]!r} and {name!r} would share the boundary file name "
                            f"'{slug}'; rename one of the columns")
        owners[slug] = name


def boundary_path(folder: str | Path, name: str) -> Path:
    """``<folder>/<name>.npz``; UserError if ``name`` would leave ``folder`` or be hidden."""
    if not name or Path(name).name != name or name.startswith(".") or "/" in name or "\\" in name:
        raise UserError(f"boundary name '{name}' is not a plain file name")
    return Path(folder) / f"{name}.npz"


def boundary_writer(record: BoundaryRecord) -> Callable[[Path], None]:
    """A function that writes ``record`` as a boundary file to the path it is given (for
    ``utils.io.files.StagedFiles.stage``; ``save_boundary`` writes one file on its own)."""
    if record.space not in SPACES:
        raise ValueError(f"unknown space '{record.space}' (choices: {', '.join(SPACES)})")
    arrays = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "class_summary":
            if value is not None:
                arrays[f.name] = summary_array(value)
            continue
        if f.name == "fit_region" and not value:  # the whole latent: files as before the field existed
            continue
        arrays[f.name] = np.asarray(value, dtype=np.int64) if f.name == "shape" else np.asarray(value)
    arrays["normal"] = arrays["normal"].astype(np.float32).reshape(-1)
    arrays["coef"] = arrays["coef"].astype(np.float32).reshape(-1)
    arrays["format_version"] = np.asarray(FORMAT_VERSION)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return write


def save_boundary(path: str | Path, record: BoundaryRecord, overwrite: bool = True) -> Path:
    """Write ``record`` to ``path`` (``.npz`` appended if missing), atomically. Unless
    ``overwrite``, an existing file is kept and the first free ``<stem>-1.npz``, ... is taken
    (atomically: concurrent writers never take the same name). Returns the path written."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    return write_new_file(path, boundary_writer(record), overwrite)


def _headers(zf: zipfile.ZipFile) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every ``<field>.npy`` member, read from its header only (no data)."""
    headers = {}
    for member in zf.namelist():
        if not member.endswith(".npy"):
            continue
        with zf.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
        headers[member[:-4]] = (tuple(shape), dtype)
    return headers


def _check_headers(path: Path, headers: dict) -> None:
    """Every field's kind and size, before any data is read (a small file may declare gigabytes)."""
    for name in ("normal", "shape", "space", "t_0", "n_inv_step"):
        if name not in headers:
            raise UserError(f"boundary file {path} lacks the field '{name}'")
    for name, (shape, dtype) in headers.items():
        size = int(np.prod(shape))
        if dtype.hasobject:
            raise UserError(f"boundary file {path}: field '{name}' holds Python objects")
        if name in _SCALAR_KINDS:
            kinds = _SCALAR_KINDS[name]
            wanted = {"f": "a number", "i": "an integer", "U": "text"}[kinds[-1] if kinds != "fi" else "f"]
            if dtype.kind not in kinds or size != 1 or (dtype.kind == "U" and dtype.itemsize > 4 * _MAX_TEXT):
                raise UserError(f"boundary file {path}: field '{name}' must be {wanted}, "
                                f"got {dtype.name} of shape {shape}")
        elif name == "shape" and (dtype.kind not in "iu" or not 1 <= size <= _MAX_DIMS or len(shape) != 1):
            raise UserError(f"boundary file {path}: field 'shape' must be a list of at most {_MAX_DIMS} integers")
        elif name == "class_summary" and (dtype.kind != "f" or shape != (len(SPLITS), len(CLASSES), len(SUMMARY_STATS))):
            raise UserError(f"boundary file {path}: field 'class_summary' must be floats of shape "
                            f"{(len(SPLITS), len(CLASSES), len(SUMMARY_STATS))}, got {dtype.name} of shape {shape}")
        elif name in ("normal", "coef") and (dtype.kind != "f" or size > MAX_VALUES):
            raise UserError(f"boundary file {path}: field '{name}' must hold at most {MAX_VALUES} floats, "
                            f"got {dtype.name} of shape {shape}")
    if "coef" in headers and int(np.prod(headers["coef"][0])) != int(np.prod(headers["normal"][0])):
        raise UserError(f"boundary file {path}: 'coef' and 'normal' differ in size")


def _read(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    with zf.open(f"{name}.npy") as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def load_boundary(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None) -> BoundaryRecord:
    """Read a boundary file; UserError if it is missing, corrupt or inconsistent.

    shapes: the model's latent shapes {'z': ..., 'h': ...}; the normal's size is checked against
    them from its header, before its data is read. Memory is bounded by the header checks either way.
    """
    values = _read_fields(Path(path), shapes, arrays=True)
    values.setdefault("coef", values["normal"])
    values.setdefault("intercept", 0.0)
    record = BoundaryRecord(**values)
    norm = float(np.linalg.norm(record.normal))
    if not np.isfinite(norm) or abs(norm - 1) > 1e-3 or not np.isfinite(record.coef).all() \
            or not np.isfinite(record.intercept):
        raise UserError(f"boundary file {path} is corrupt: its normal is not a finite unit vector of shape {record.shape}")
    return record


def load_header(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None) -> BoundaryRecord:
    """A boundary file's fields without its arrays (``normal`` and ``coef`` are empty): what a folder
    scan needs, read without the D-value arrays. The same checks as ``load_boundary`` but the
    normal's length."""
    values = _read_fields(Path(path), shapes, arrays=False)
    values.update(normal=np.zeros(0, np.float32), coef=np.zeros(0, np.float32))
    values.setdefault("intercept", 0.0)
    return BoundaryRecord(**values)


def _read_fields(path: Path, shapes: dict[str, tuple[int, ...]] | None, arrays: bool) -> dict:
    """The fields of a boundary file (``normal`` and ``coef`` only with ``arrays``), every header
    checked before any data is read."""
    if not path.is_file():
        raise UserError(f"boundary file {path} does not exist")
    if path.suffix == ".sav":
        raise UserError(f"{path} is a pickled boundary of the original code; convert it first "
                        "with python -m scripts.boundary_tools import-sav (it is never unpickled here)")
    try:
        with zipfile.ZipFile(path) as zf:
            headers = _headers(zf)
            _check_headers(path, headers)
            values = {}
            for name in dataclasses.fields(BoundaryRecord):
                name = name.name
                if name not in headers or name in ("normal", "coef"):
                    continue
                arr = _read(zf, name)
                if name == "class_summary":
                    values[name] = summary_dict(arr)
                    continue
                values[name] = tuple(int(v) for v in arr.reshape(-1)) if name == "shape" else arr.item()
            version = int(_read(zf, "format_version").item()) if "format_version" in headers else 1
            if version > FORMAT_VERSION:
                raise UserError(f"boundary file {path} has format version {version}, newer than this code reads "
                                f"({FORMAT_VERSION}); update BoundaryDiffusion")
            if values["space"] not in SPACES:
                raise UserError(f"boundary file {path} has unknown space '{values['space']}' "
                                f"(choices: {', '.join(SPACES)})")
            size = int(np.prod(headers["normal"][0]))
            if size != int(np.prod(values["shape"])) or min(values["shape"]) < 1:
                raise UserError(f"boundary file {path} is corrupt: its normal has {size} values for shape "
                                f"{values['shape']}")
            if shapes is not None and values["space"] in shapes and tuple(values["shape"]) != tuple(shapes[values["space"]]):
                raise UserError(f"{path} is a boundary for {values['space']} latents of shape {values['shape']}, "
                                f"but this model's are {tuple(shapes[values['space']])}")
            for name in ("normal", "coef") if arrays else ():
                if name in headers:
                    values[name] = _read(zf, name).astype(np.float32).reshape(-1)
    except UserError:
        raise
    except Exception as exc:  # zipfile's and numpy's parsers fail on damaged files with many error types
        raise UserError(f"boundary file {path} is corrupt or not a boundary file ({type(exc).__name__})") from None
    return values


#: Most boundary files a folder scan reads (each header a few kilobytes): a folder with more is
#: not a boundary folder.
MAX_FOLDER_FILES = 100_000


def scan_boundaries(folder: str | Path, shapes: dict[str, tuple[int, ...]] | None = None
                    ) -> list[tuple[Path, BoundaryRecord]]:
    """(path, header) of every boundary file in ``folder`` (``load_header``: fields without the
    arrays), in path order; each file's header is read once. A file that does not load as a
    boundary (of latents of ``shapes`` when given) is passed over with a debug-level note."""
    folder = Path(folder)
    found = []
    paths = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    if len(paths) > MAX_FOLDER_FILES:
        raise UserError(f"{folder} holds {len(paths)} .npz files, more than {MAX_FOLDER_FILES}; "
                        "point --boundary_dir at a folder of boundaries")
    for path in paths:
        try:
            found.append((path, load_header(path, shapes)))
        except (UserError, OSError) as exc:
            log.debug("passing over %s: %s", path, exc)
    return found


def select(scan: list[tuple[Path, BoundaryRecord]], config_name: str, attribute: str | None = None,
           t_0: int | None = None, checkpoint_sha256: str | None = None) -> dict[str, list[tuple[Path, BoundaryRecord]]]:
    """The entries of a scan fitted for ``config_name`` (and ``attribute``, ``t_0``, the checkpoint
    ``checkpoint_sha256`` when given; a file without a hash matches any checkpoint), as {space:
    [(path, header)]} in path order."""
    found: dict[str, list[tuple[Path, BoundaryRecord]]] = {}
    for path, record in scan:
        if record.config_name != config_name or (attribute and record.attribute.lower() != attribute.lower()) \
                or (t_0 is not None and record.t_0 != t_0) \
                or (checkpoint_sha256 and record.checkpoint_sha256 and record.checkpoint_sha256 != checkpoint_sha256):
            continue
        found.setdefault(record.space, []).append((path, record))
    return found


def matching_boundaries(folder: str | Path, config_name: str, attribute: str | None = None, t_0: int | None = None,
                        checkpoint_sha256: str | None = None, shapes: dict[str, tuple[int, ...]] | None = None
                        ) -> dict[str, list[tuple[Path, BoundaryRecord]]]:
    """``select`` on a fresh ``scan_boundaries`` of ``folder``: the headers, without arrays."""
    return select(scan_boundaries(folder, shapes), config_name, attribute, t_0, checkpoint_sha256)


@dataclass(frozen=True)
class Discovered:
    """The boundary files of one attribute at one t_0 fitted on one checkpoint: {space: path}."""
    attribute: str
    t_0: int
    paths: dict[str, Path]


def save_number(path: Path) -> int:
    """N of a file saved as ``<name>-N.npz`` (``save_boundary`` takes the first free N, so a larger N
    was written later), 0 for ``<name>.npz`` (and for any name whose tail is not ASCII digits):
    an order that no checkout or copy can change."""
    stem, _, number = path.stem.rpartition("-")
    return int(number) if stem and number.isascii() and number.isdigit() else 0


def current_file(paths: list[Path]) -> Path:
    """THE rule for which of several files of one boundary is current: the largest save number
    (``save_number``), then the name. Edits, the web app and the atlas read this one; a search with
    --ni replaces this one (``current_target``), so a re-fit is what they read next."""
    return max(paths, key=lambda p: (save_number(p), p.name))


def current_target(folder: str | Path, name: str) -> Path:
    """Where a search with --ni writes boundary ``name``: the file ``current_file`` picks among
    ``<name>.npz`` and ``<name>-N.npz`` in ``folder``, or ``<name>.npz`` when there is none."""
    base = boundary_path(folder, name)
    numbered = [p for p in Path(folder).glob(f"{glob_escape(name)}-*.npz") if p.stem.rpartition("-")[0] == name
                and save_number(p) > 0] if Path(folder).is_dir() else []
    candidates = numbered + ([base] if base.exists() else [])
    return current_file(candidates) if candidates else base


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def discover(scan: list[tuple[Path, BoundaryRecord]], folder: str | Path, config_name: str,
             attribute: str | None = None, t_0: int | None = None) -> Discovered | None:
    """The boundaries an edit uses when none is named, from a folder's scan: those of ``select``
    (for ``attribute`` and ``t_0`` when given), or None when there are none.

    A z and an h boundary are only paired when they share attribute, t_0 and checkpoint; several
    attributes, t_0 values or checkpoints among the candidates is a UserError that lists them, never
    a silent pick. Of several files of one space the current one is taken (``current_file``).
    """
    found = select(scan, config_name, attribute, t_0)
    hits = [(path, record) for space_hits in found.values() for path, record in space_hits]
    if not hits:
        return None
    for what, key, hint in (("attributes", lambda r: r.attribute.lower(), "choose one with --edit_attr"),
                            ("t_0 values", lambda r: str(r.t_0), "choose one with --t_0"),
                            ("checkpoints", lambda r: r.checkpoint_sha256[:12] or "unknown",
                             "name the files with --boundary_z / --boundary_h")):
        values = sorted({key(r) for _, r in hits})
        if len(values) > 1:
            raise UserError(f"{folder} holds boundaries of several {what} for config {config_name}"
                            f"{' and ' + attribute if attribute else ''}: {', '.join(values)}; {hint}")
    newest = {space: current_file([p for p, _ in space_hits]) for space, space_hits in found.items()}
    first = hits[0][1]
    return Discovered(first.attribute, first.t_0, newest)


def discover_boundaries(folder: str | Path, config_name: str, shapes: dict[str, tuple[int, ...]],
                        attribute: str | None = None, t_0: int | None = None) -> Discovered | None:
    """``discover`` on a fresh scan of ``folder``."""
    return discover(scan_boundaries(folder, shapes), folder, config_name, attribute, t_0)
