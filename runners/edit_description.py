"""The one description of an edit, and the one function that builds it from a request.

Every front end (the command line, the web app, ``scripts/evaluate_edits.py``) says what it wants as
an ``EditRequest`` -- attributes with a range, values or ``auto``, attributes held fixed, the spaces
to move, the unit, the denoising settings -- and ``describe_edit`` turns it into an
``EditDescription``, checked once against the model: per moved space the M attribute normals
(float64, unit length), a K x M table of targets (signed distances v.n, the unit of the original)
and the held normals. ``Editor.edits`` makes exactly those edits with the joint move
(``utils.core.boundary.joint_move``: v + N G^-1 (t - N^T v)).

    request = EditRequest((Move("thick", -5, 0), Move("slant", 2, -2)), Denoising(n_test_step=40), k=3)
    description = describe_edit(editor, request, BoundaryIndex(Path("boundary"), "digits", shapes))
    for batch in editor.edits(latents, description, seed_keys): ...

Notation: M moved attributes, H held ones, K edits (k = 0..K-1; a 2-D sweep has K = K_a * K_b,
edit k = i * K_b + j at value i of the first attribute and j of the second).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.core.boundary import check_joint, latent_distance, unit_rows
from utils.core.diffusion import HPolicy, Inversion
from utils.core.editing import LatentMove
from utils.core.seeds import EDIT, item_seed
from utils.errors import UserError
from utils.io.atlas import atlas_from_dir, suggested_holds
from utils.io.boundary_files import BoundaryRecord, auto_range, discover_boundaries

if TYPE_CHECKING:  # the editor imports this module
    from runners.editor import Editor

log = logging.getLogger(__name__)

#: The latent spaces, in the order everything lists them; the one table that names them.
SPACES: tuple[str, ...] = ("z", "h")
EditSpace = Literal["both", "z", "h"]
#: --edit_space -> the spaces it moves
MOVED: dict[str, tuple[str, ...]] = {"both": SPACES, **{s: (s,) for s in SPACES}}
UNITS = ("absolute", "relative")

#: How far the ``auto`` range reaches: the span where the classes lie ([negative 5th, positive 95th]
#: percentile) scaled about its centre by this factor. Chosen with scripts/evaluate_edits.py on the
#: digits model (docs/digits_report.md): with the span itself, eta-1 edits at its ends do not yet
#: flip the attribute reliably (the fresh noise pulls them back toward the data); at 2 the edits
#: control the attribute better than the hand-set range, at 0.7 points of identity.
AUTO_SCALE = 2.0
#: Most attributes one edit moves or holds (each is a file read and a row of G).
MAX_ATTRIBUTES = 32


def spaced(start: float, end: float, k: int) -> tuple[float, ...]:
    """K values evenly spaced from ``start`` to ``end`` (float64, as the original spaces distances)."""
    return tuple(torch.linspace(start, end, k, dtype=torch.float64).tolist())


def auto_span(record: BoundaryRecord, scale: float = AUTO_SCALE) -> tuple[float, float]:
    """The ``auto`` range of one boundary, in the edit's units v.n: the span from the negative
    class's 5th percentile to the positive class's 95th over the training latents
    (``utils.io.boundary_files.auto_range``) scaled about its centre by ``scale``. Both ends are
    finite (UserError otherwise: a damaged summary, or a ``scale`` that overflows)."""
    low, high = auto_range(record)
    centre, half = low / 2 + high / 2, scale * (high / 2 - low / 2)  # halves first: no overflow near the float limit
    ends = (centre - half, centre + half)
    if not all(math.isfinite(v) for v in ends):
        raise UserError(f"the auto range of the {record.space} boundary for '{record.attribute}' is not finite "
                        f"({low:g} .. {high:g} scaled by {scale:g}); give --start_distance and --end_distance")
    return ends


def relative_scale(record: BoundaryRecord) -> tuple[float, float] | None:
    """The relative unit of one boundary: (centre, half) in v.n such that the relative value u is
    the distance centre + u * half, i.e. -1 and +1 at the negative and positive class medians of
    the training latents, 0 midway. None when the file has no usable summary (format 1, a class
    missing, not finite, or the medians on the wrong sides)."""
    try:
        low, high = auto_range(record)  # checks the summary; the shift from hyperplane distances to v.n
    except UserError:
        return None
    stats = record.class_summary["train"]
    offset = low - stats["neg"]["p5"]  # -b/||w||: auto_range's own shift
    neg, pos = stats["neg"]["p50"] + offset, stats["pos"]["p50"] + offset
    centre, half = (neg + pos) / 2, (pos - neg) / 2
    if not (math.isfinite(centre) and math.isfinite(half) and half > 0):
        return None
    return centre, half


# ---------------------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class Move:
    """One attribute of a request: K values from ``start`` to ``end`` (equal: one value, held at
    every edit), or the ``auto`` range of each moved space. ``paths``: the attribute's boundary
    files named explicitly ({space: file}, e.g. --boundary_z), else they are looked up by name."""
    attribute: str
    start: float | None = None
    end: float | None = None
    auto: bool = False
    paths: Mapping[str, Path] | None = None

    @classmethod
    def parse(cls, text: str) -> "Move":
        """``ATTR=START:END``, ``ATTR=auto`` or ``ATTR=VALUE`` (the command line's ``--edit``)."""
        name, sep, value = str(text).partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"--edit takes ATTR=START:END, ATTR=auto or ATTR=VALUE, got {text[:40]!r}")
        if value.strip() == "auto":
            return cls(name, auto=True)
        parts = value.split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(parts) not in (1, 2) or len(numbers) != len(parts) or not all(map(math.isfinite, numbers)):
            raise UserError(f"--edit {name}=...: the value must be START:END, auto or one finite number, "
                            f"got {value[:40]!r}")
        return cls(name, numbers[0], numbers[-1])

    def values(self, k: int) -> tuple[float, ...]:
        """The K requested values (not for ``auto``)."""
        if not math.isfinite(self.end - self.start):
            raise UserError(f"{self.attribute}: {self.start} and {self.end} lie too far apart to be spaced in float64")
        return spaced(self.start, self.end, k)


@dataclass(frozen=True)
class Denoising:
    """How each edit is denoised from t_0: ``n_test_step`` grid points, DDIM ``eta``, the h
    policy, the seed of the edit noise, and how many edits share a batch (``batch_size``;
    results do not depend on it)."""
    n_test_step: int
    eta: float = 1.0
    h_policy: HPolicy = "lagged"
    seed: int = 1234
    batch_size: int = 8


@dataclass(frozen=True)
class EditRequest:
    """What a front end asks for. ``k``: the number of points along the moves (a ``grid`` sweeps
    exactly two attributes over k x k points). ``held``: attribute names kept where each image
    has them; ``held_paths``: held boundary files named explicitly ({space: files}). ``space``:
    both, z or h. ``unit``: absolute (signed distances v.n, as the original defines them) or
    relative (``relative_scale``: -1 / +1 at each boundary's class medians, in each space)."""
    moves: tuple[Move, ...]
    denoising: Denoising
    k: int = 1
    held: tuple[str, ...] = ()    # "auto" among them: the attributes the atlas suggests (``suggested_holds``)
    held_paths: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    space: EditSpace = "both"
    unit: str = "absolute"
    grid: bool = False


# ---------------------------------------------------------------------------------------- the description
@dataclass(frozen=True)
class SpaceEdit:
    """The edit of one latent space: the M moved attributes (names, checked boundary records and
    files, unit normals (M, D) float64), their targets (K, M) float64 in v.n, the H held ones, and
    the cosine matrix (M + H, M + H) of all their normals (moved first)."""
    space: str
    attributes: tuple[str, ...]
    records: tuple[BoundaryRecord, ...]
    paths: tuple[Path, ...]
    normals: Tensor
    targets: np.ndarray
    held: tuple[str, ...] = ()
    held_paths: tuple[Path, ...] = ()
    held_normals: Tensor | None = None
    cosines: np.ndarray = field(default_factory=lambda: np.eye(1))
    unit: str = "absolute"

    def move(self) -> LatentMove:
        return LatentMove(self.normals, torch.from_numpy(self.targets), self.held_normals)


@dataclass(frozen=True)
class EditDescription:
    """A checked edit: per moved space (in ``SPACES`` order) its ``SpaceEdit``, the denoising, the
    mixing step, and for a 2-D sweep its (K_a, K_b) shape."""
    t_0: int
    spaces: Mapping[str, SpaceEdit]
    denoising: Denoising
    grid: tuple[int, int] | None = None

    @property
    def attributes(self) -> tuple[str, ...]:
        return next(iter(self.spaces.values())).attributes

    @property
    def held(self) -> tuple[str, ...]:
        return next(iter(self.spaces.values())).held

    def __len__(self) -> int:
        """K, the number of edits."""
        return len(next(iter(self.spaces.values())).targets)

    def move(self, space: str) -> LatentMove | None:
        edit = self.spaces.get(space)
        return None if edit is None else edit.move()

    def targets(self, k: int) -> dict[str, dict[str, float]]:
        """Edit k's target of every attribute in every moved space: {attribute: {space: v.n}}."""
        return {a: {s: float(e.targets[k, m]) for s, e in self.spaces.items()} for m, a in enumerate(self.attributes)}

    def distances(self, space: str | None = None) -> list[float]:
        """The K targets of the first attribute in ``space`` (default: the first moved space)."""
        edit = self.spaces[space] if space else next(iter(self.spaces.values()))
        return edit.targets[:, 0].tolist()

    def seeds(self, seed_keys: Sequence[tuple[int, ...]], iteration: int = 0, domain: int = EDIT) -> list[list[int]]:
        """B rows of K seeds: edit k of image b in this iteration (the documented rule,
        ``utils.core.seeds``: ``domain`` EDIT for real images, SAMPLE_EDIT for sampled latents)."""
        return [[item_seed(self.denoising.seed, *key, iteration, k, domain=domain) for k in range(len(self))]
                for key in seed_keys]

    def source_distances(self, latents: Inversion) -> list[dict]:
        """Where each unedited latent sits along each moved normal: B dicts {space: v.n} for one
        attribute, {space: {attribute: v.n}} for several."""
        per_space = {}
        for space, edit in self.spaces.items():
            values = {a: latent_distance(getattr(latents, space), torch.from_numpy(r.normal)).tolist()
                      for a, r in zip(edit.attributes, edit.records)}
            per_space[space] = values
        single = len(self.attributes) == 1
        return [{s: (v[self.attributes[0]][b] if single else {a: d[b] for a, d in v.items()})
                 for s, v in per_space.items()} for b in range(len(latents.z))]

    def describe(self) -> dict:
        """The edit for summaries: attributes, held, each space's files, targets and cosines."""
        return {"attributes": list(self.attributes), "held": list(self.held), "grid": self.grid,
                "t_0": self.t_0, **{f: getattr(self.denoising, f) for f in ("n_test_step", "eta", "h_policy", "seed")},
                "spaces": {s: {"unit": e.unit, "boundaries": {a: {"path": str(p), **r.describe()}
                                                              for a, p, r in zip(e.attributes, e.paths, e.records)},
                               "held_boundaries": {a: str(p) for a, p in zip(e.held, e.held_paths)},
                               "targets": e.targets.tolist(),
                               "cosines": {"names": [*e.attributes, *e.held], "matrix": e.cosines.tolist()}}
                           for s, e in self.spaces.items()}}


# ---------------------------------------------------------------------------------------- the builder
@dataclass(frozen=True)
class BoundaryIndex:
    """Where attribute names are looked up: the boundary files in ``folder`` fitted for
    ``config_name`` with latents of ``shapes`` (``discover_boundaries``: the newest of one
    checkpoint, never a mix)."""
    folder: Path
    config_name: str
    shapes: Mapping[str, tuple[int, ...]]

    def find(self, attribute: str, t_0: int) -> dict[str, Path]:
        found = discover_boundaries(self.folder, self.config_name, dict(self.shapes), attribute, t_0)
        if found is None:
            raise UserError(f"no boundary for {attribute!r} at t_0 {t_0} (config {self.config_name}) in {self.folder}")
        return dict(found.paths)


def _spaces(request: EditRequest, paths: Sequence[Mapping[str, Path]]) -> tuple[str, ...]:
    """The spaces the request moves: ``MOVED[space]``; with ``both``, the one space every moved
    attribute was fitted in when none has the other (a boundary search of one space)."""
    if request.space not in MOVED:
        raise UserError(f"unknown space {request.space!r} (choices: {', '.join(MOVED)})")
    wanted = MOVED[request.space]
    if request.space == "both":
        fitted = [s for s in SPACES if all(s in p for p in paths)]
        if fitted and all(set(p) <= set(fitted) for p in paths):
            wanted = tuple(fitted)
    for move, found in zip(request.moves, paths):
        missing = [s for s in wanted if s not in found]
        if missing:
            raise UserError(f"{move.attribute} has no {missing[0]} boundary (needed to move the {missing[0]} space; "
                            f"choose the space with --edit_space)")
    return wanted


def _absolute(values: Sequence[float], record: BoundaryRecord, unit: str) -> tuple[np.ndarray, str]:
    """Requested values as signed distances v.n: as they are (absolute), or through the boundary's
    relative scale; a boundary without usable class summaries falls back to absolute."""
    v = np.asarray(values, dtype=np.float64)
    if unit == "absolute":
        return v, unit
    scale = relative_scale(record)
    if scale is None:
        log.warning("the %s boundary of %s has no usable class summary: its values are absolute distances",
                    record.space, record.attribute)
        return v, "absolute"
    centre, half = scale
    return centre + v * half, unit


def _targets(request: EditRequest, records: Sequence[BoundaryRecord]) -> tuple[np.ndarray, str]:
    """The (K, M) target table of one space, in v.n; and the unit it was given in."""
    k, units, columns = request.k, [], []
    for move, record in zip(request.moves, records):
        if move.auto:
            low, high = auto_span(record)
            columns.append(np.asarray(spaced(low, high, k)))
            log.info("auto distances of %s in %s: %+.2f .. %+.2f (%d)", move.attribute, record.space, low, high, k)
        else:
            column, unit = _absolute(move.values(k), record, request.unit)
            columns.append(column)
            units.append(unit)
    unit = "absolute" if "absolute" in units or not units else request.unit
    if request.grid:
        a, b = columns
        return np.stack([np.repeat(a, len(b)), np.tile(b, len(a))], axis=1), unit
    return np.stack(columns, axis=1), unit


def _check_request(request: EditRequest) -> None:
    if not request.moves:
        raise UserError("nothing to edit: name at least one attribute")
    if isinstance(request.held, str):
        raise UserError("held attributes are a list of names, not one string")
    if len(request.moves) + len(request.held) > MAX_ATTRIBUTES:
        raise UserError(f"at most {MAX_ATTRIBUTES} attributes can be moved and held at once, "
                        f"got {len(request.moves) + len(request.held)}")
    if request.unit not in UNITS:
        raise UserError(f"unknown unit {request.unit!r} (choices: {', '.join(UNITS)})")
    if not 1 <= request.k <= 1000:
        raise UserError(f"the number of edits must be in [1, 1000], got {request.k}")
    if request.grid and len(request.moves) != 2:
        raise UserError(f"a grid sweeps exactly two attributes, got {len(request.moves)}")
    names = [m.attribute.lower() for m in request.moves if m.paths is None]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            raise UserError(f"{name} is moved twice: give it one range")
    for name in request.held:
        if not isinstance(name, str):
            raise UserError(f"held attributes are names, got {type(name).__name__}")
        if name.lower() in names:
            raise UserError(f"{name} cannot be moved and held at once")


def _held(request: EditRequest, index: BoundaryIndex | None, t_0: int) -> tuple[str, ...]:
    """The held attribute names, with ``auto`` replaced by those the atlas of ``index``'s folder
    suggests holding for the moved attributes (|cos| of their normals at least the atlas's
    threshold, in z or h: ``utils.io.atlas.suggested_holds``), the moved ones left out."""
    if not any(str(name).lower() == "auto" for name in request.held):
        return tuple(request.held)
    if index is None:
        raise UserError("--condition_attr auto needs a boundary folder to build the atlas from")
    atlas = atlas_from_dir(index.folder, index.config_name, t_0)
    moved = {m.attribute.lower() for m in request.moves}
    named = [n for n in request.held if str(n).lower() != "auto"]
    suggested = [n for m in request.moves for n in suggested_holds(atlas, m.attribute)]
    chosen = tuple(dict.fromkeys(n for n in [*named, *suggested] if n.lower() not in moved))
    log.info("holding %s: %s", "the attributes the atlas suggests (|cos| >= %g)" % atlas["hold_threshold"],
             ", ".join(chosen) if chosen else "none (no attribute's normal is that close to the edited ones)")
    return chosen


def describe_edit(editor: "Editor", request: EditRequest, index: BoundaryIndex | None, force: bool = False
                  ) -> EditDescription:
    """The checked description of ``request`` on ``editor``'s model and t_0: every boundary file
    found (``index``, or the move's own ``paths``) and checked (``Editor.check_boundary``; ``force``
    passes another t_0 or checkpoint), targets in v.n, the normals' cosine matrix logged and kept.
    UserError for anything that cannot be edited: unknown attributes, a missing space, a pair of
    normals too close to move or hold together (``utils.core.boundary.check_joint``)."""
    _check_request(request)
    t_0 = editor.t_0

    def files(name: str, explicit: Mapping[str, Path] | None) -> Mapping[str, Path]:
        if explicit is not None:
            return explicit
        if index is None:
            raise UserError(f"no boundary folder to find {name!r} in")
        return index.find(name, t_0)

    move_paths = [files(m.attribute, m.paths) for m in request.moves]
    spaces = _spaces(request, move_paths)
    held_names = _held(request, index, t_0)
    held_found = [files(name, None) for name in held_names]
    for name, found in zip(held_names, held_found):
        missing = [s for s in spaces if s not in found]
        if missing:
            raise UserError(f"cannot hold {name} fixed: it has no {missing[0]} boundary at t_0 {t_0}")
    edits = {}
    for space in spaces:
        records = [editor.check_boundary(p[space], space, f"{m.attribute} ({space})", force)
                   for m, p in zip(request.moves, move_paths)]
        held_paths = [p[space] for p in held_found] + list(request.held_paths.get(space, ()))
        held = [editor.check_boundary(p, space, f"held ({space})", force) for p in held_paths]
        names = tuple(m.attribute if m.paths is None else (r.attribute or m.attribute)
                      for m, r in zip(request.moves, records))
        held_names = tuple(r.attribute or p.stem for p, r in zip(held_paths, held))
        normals = unit_rows(np.stack([r.normal for r in records]))
        held_normals = unit_rows(np.stack([r.normal for r in held])) if held else None
        everything = normals if held_normals is None else torch.cat([normals, held_normals])
        try:
            cosines = check_joint([*names, *held_names], everything)
        except ValueError as exc:
            raise UserError(f"cannot edit the {space} space: {exc}") from None
        targets, unit = _targets(request, records)
        edits[space] = SpaceEdit(space, names, tuple(records), tuple(p[space] for p in move_paths), normals,
                                 targets, held_names, tuple(held_paths), held_normals, cosines, unit)
        if len(names) + len(held_names) > 1:
            log.info("cosines of the %s normals (%s), the cross-talk a plain sum of moves would cause:\n%s", space,
                     ", ".join([*names, *(f"{h} (held)" for h in held_names)]),
                     np.array2string(cosines, precision=3, suppress_small=True))
    grid = (request.k, request.k) if request.grid else None
    return EditDescription(t_0, edits, request.denoising, grid)
