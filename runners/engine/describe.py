"""The one description of an edit, and the one function that builds it from a request.

Every front end says what it wants as an ``EditRequest`` (``runners.engine.requests``) and
``describe_edit`` turns it into an ``EditDescription``, checked once against the model: per moved
space the M attribute normals (float64, unit length), a K x M table of targets (signed distances
v.n, the unit of the original) and the held normals. The editor makes exactly those edits with the
joint move (``utils.core.boundary.joint_move``: v + N G^-1 (t - N^T v)).

    description = describe_edit(request, BoundaryIndex.of(folder, config.name, shapes), model.identity,
                                 t_0=200, n_inv_step=40)

Notation: M moved attributes, H held ones, K edits (k = 0..K-1; a 2-D sweep has K = K_a * K_b,
edit k = i * K_b + j at value i of the first attribute and j of the second).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from models.identity import ModelIdentity
from runners.engine.boundaries import BoundaryIndex, auto_span, check_boundary, relative_scale, suggested_holds
from utils.core.atlas import HOLD_THRESHOLD
from runners.engine.requests import Denoising, EditRequest, Region, check_request, spaced
from utils.core.boundary import check_joint, latent_distance, unit_rows
from utils.core.diffusion import Inversion
from utils.core.editing import LatentMove
from utils.core.seeds import EDIT, item_seed
from utils.core.spaces import MOVED, SPACES
from utils.errors import UserError
from utils.io.boundary_files import BoundaryRecord

log = logging.getLogger(__name__)

#: The most a hold may lengthen the move of an attribute, ||move with holds|| / ||move without||,
#: unless --force. For one held attribute at |cos c| with the moved one the ratio is 1/sqrt(1 - c^2):
#: 2 at |c| = 0.87. Beyond it the edit pushes the latent far off where the data lie to keep the held
#: projection (a 10-unit edit holding an attribute at |cos| 0.97 moves the latent 41 units).
MAX_HOLD_RATIO = 2.0


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
    #: per moved attribute, ||move with the holds|| / ||move without them|` (``hold_ratios``)
    hold_ratios: tuple[float, ...] = ()

    def move(self) -> LatentMove:
        return LatentMove(self.normals, torch.from_numpy(self.targets), self.held_normals, self.unit == "shift")


@dataclass(frozen=True)
class EditDescription:
    """A checked edit: per moved space (in ``SPACES`` order) its ``SpaceEdit``, the denoising, the
    mixing step, and for a 2-D sweep its (K_a, K_b) shape."""
    t_0: int
    spaces: Mapping[str, SpaceEdit]
    denoising: Denoising
    grid: tuple[int, int] | None = None
    region: Region | None = None  # the part of each image the edit may change (runners/engine/regions.py)

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
                "region": None if self.region is None else dataclasses.asdict(self.region),
                "t_0": self.t_0, **{f: getattr(self.denoising, f) for f in ("n_test_step", "eta", "h_policy", "seed")},
                "spaces": {s: {"unit": e.unit, "boundaries": {a: {"path": str(p), **r.describe()}
                                                              for a, p, r in zip(e.attributes, e.paths, e.records)},
                               "held_boundaries": {a: str(p) for a, p in zip(e.held, e.held_paths)},
                               "hold_ratios": dict(zip(e.attributes, e.hold_ratios)),
                               "targets": e.targets.tolist(),
                               "cosines": {"names": [*e.attributes, *e.held], "matrix": e.cosines.tolist()}}
                           for s, e in self.spaces.items()}}



# ---------------------------------------------------------------------------------------- the builder
def hold_ratios(cosines: np.ndarray, m: int) -> np.ndarray:
    """For each of the first ``m`` (moved) of A unit normals with Gram matrix ``cosines`` (A, A),
    how much the holds (the other A - m) lengthen its move: sqrt((G^-1)_ii / (G_M^-1)_ii), the
    length of the joint move that shifts attribute i by one unit with every held projection kept,
    over the same move without holds (G_M: the moved block). ||N c||^2 = c^T G c with c = G^-1 e_i,
    so the squared length is (G^-1)_ii. All ones when nothing is held. (m,) float64."""
    g = np.asarray(cosines, dtype=np.float64)
    with_holds = np.diag(np.linalg.inv(g))[:m]
    without = np.diag(np.linalg.inv(g[:m, :m]))
    return np.sqrt(with_holds / without)


def _spaces(request: EditRequest, paths: Sequence[Mapping[str, Path]]) -> tuple[str, ...]:
    """The spaces the request moves: ``MOVED[space]``; with ``both``, the one space every moved
    attribute was fitted in when none has the other (a boundary search of one space)."""
    wanted = MOVED[request.space]
    if request.region is not None and request.region.h == "none":  # the bottleneck is left as it is
        wanted = tuple(s for s in wanted if s != "h")  # never empty: check_request refuses h alone
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


def _absolute(values: Sequence[float], record: BoundaryRecord, unit: str) -> np.ndarray:
    """Requested values as signed distances v.n: as they are (absolute), through the boundary's
    relative scale (relative), or as changes of v.n in that scale (shift: the targets of the
    description are then changes from each latent's own projection); UserError for a boundary
    without a usable class summary in the relative units."""
    v = np.asarray(values, dtype=np.float64)
    if unit == "absolute":
        return v
    scale = relative_scale(record)
    if scale is None:
        raise UserError(f"the {record.space} boundary of {record.attribute or 'the edit'} has no usable class "
                        f"summary, so it has no {unit} unit; fit it again with --boundary_search (or add the "
                        "summary with python -m scripts.add_class_summaries), or pass --edit_unit absolute")
    centre, half = scale
    return v * half if unit == "shift" else centre + v * half


def _targets(request: EditRequest, records: Sequence[BoundaryRecord]) -> np.ndarray:
    """The (K, M) target table of one space, in v.n."""
    k, columns = request.k, []
    for move, record in zip(request.moves, records):
        if move.auto:
            low, high = auto_span(record)
            columns.append(np.asarray(spaced(low, high, k)))
            log.info("auto distances of %s in %s: %+.2f .. %+.2f (%d)", move.attribute, record.space, low, high, k)
        else:
            columns.append(_absolute(move.values(k), record, request.unit))
    if request.grid:
        a, b = columns
        return np.stack([np.repeat(a, len(b)), np.tile(b, len(a))], axis=1)
    return np.stack(columns, axis=1)


@dataclass(frozen=True)
class Files:
    """The boundary files of one edit: per moved attribute {space: path}, the held names (``auto``
    resolved) with theirs, and the spaces moved."""
    moved: tuple[Mapping[str, Path], ...]
    held_names: tuple[str, ...]
    held: tuple[Mapping[str, Path], ...]
    spaces: tuple[str, ...]


def _files(request: EditRequest, index: BoundaryIndex | None, t_0: int) -> Files:
    """Every boundary file the request needs, found by name in ``index`` or named in the request."""
    def find(name: str, explicit: Mapping[str, Path] | None) -> Mapping[str, Path]:
        if explicit is not None:
            return explicit
        if index is None:
            raise UserError(f"no boundary folder to find {name!r} in")
        return index.find(name, t_0)[2]

    moved = tuple(find(m.attribute, m.paths) for m in request.moves)
    spaces = _spaces(request, moved)
    held_names = _held_names(request, index, t_0)
    held = tuple(find(name, None) for name in held_names)
    for name, found in zip(held_names, held):
        missing = [s for s in spaces if s not in found]
        if missing:
            raise UserError(f"cannot hold {name} fixed: it has no {missing[0]} boundary at t_0 {t_0}")
    return Files(moved, held_names, held, spaces)


def _held_names(request: EditRequest, index: BoundaryIndex | None, t_0: int) -> tuple[str, ...]:
    """The held attribute names, with ``auto`` replaced by those whose normals reach the atlas's
    hold threshold with a moved one's (``boundaries.suggested_holds``); none when there is no other
    attribute at this t_0."""
    if not any(str(name).lower() == "auto" for name in request.held):
        return tuple(request.held)
    if index is None:
        raise UserError("--condition_attr auto needs a boundary folder to find the other attributes in")
    moved = [m.attribute for m in request.moves]
    named = [n for n in request.held if str(n).lower() != "auto"]
    chosen = tuple(dict.fromkeys(n for n in [*named, *suggested_holds(index, moved, t_0)]
                                 if n.lower() not in {m.lower() for m in moved}))
    log.info("holding the attributes whose normals are close to the edited ones (|cos| >= %g): %s", HOLD_THRESHOLD,
             ", ".join(chosen) if chosen else "none (no other attribute's normal is that close)")
    return chosen


def _one_attribute(paths: Mapping[str, Path], records: Mapping[str, BoundaryRecord], force: bool) -> None:
    """That the z and h files named for one attribute are boundaries of the same attribute."""
    names = {s: r.attribute for s, r in records.items() if r.attribute}
    if len(set(n.lower() for n in names.values())) > 1 and not force:
        shown = ", ".join(f"{paths[s]} is {n!r}" for s, n in names.items())
        raise UserError(f"the files given for one edit are boundaries of different attributes ({shown}); "
                        "name files of one attribute, or use --edit to move two (pass --force to use them anyway)")


def _space_edit(space: str, request: EditRequest, files: Files, check) -> SpaceEdit:
    """One space's edit: the files checked, normals, targets, cosines and hold ratios."""
    records = [check(p[space], space, f"{m.attribute} ({space})") for m, p in zip(request.moves, files.moved)]
    held_paths = [p[space] for p in files.held] + list(request.held_paths.get(space, ()))
    held = [check(p, space, f"held ({space})") for p in held_paths]
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
    ratios = hold_ratios(cosines, len(names))
    if len(names) + len(held_names) > 1:
        log.info("cosines of the %s normals (%s), the cross-talk a plain sum of moves would cause: %s", space,
                 ", ".join([*names, *(f"{h} (held)" for h in held_names)]),
                 "; ".join(" ".join(f"{c:+.3f}" for c in row) for row in cosines))
    if held_names:
        log.info("holding lengthens the %s move by %s", space,
                 ", ".join(f"{r:.2f}x ({a})" for a, r in zip(names, ratios)))
        worst = int(np.argmax(ratios))
        if ratios[worst] > MAX_HOLD_RATIO and not request.force:
            raise UserError(f"holding {', '.join(held_names)} lengthens the {space} move of {names[worst]} "
                            f"{ratios[worst]:.2f} times (more than {MAX_HOLD_RATIO:g}): their normals are nearly "
                            "parallel, and the edit would leave the data to keep the hold; hold fewer attributes, "
                            "or pass --force")
    return SpaceEdit(space, names, tuple(records), tuple(p[space] for p in files.moved), normals,
                     _targets(request, records), held_names, tuple(held_paths), held_normals, cosines,
                     request.unit if any(not m.auto for m in request.moves) else "absolute",
                     tuple(float(r) for r in ratios))


def describe_edit(request: EditRequest, index: BoundaryIndex | None, identity: ModelIdentity, t_0: int,
                  n_inv_step: int) -> EditDescription:
    """The checked description of ``request`` on the model of ``identity`` at ``t_0``: every
    boundary file found (``index``, or the move's own ``paths``) and checked (``check_boundary``;
    the request's ``force`` passes another t_0 or checkpoint), targets in v.n, the normals' cosine
    matrix and the hold ratios logged and kept. UserError for anything that cannot be edited:
    unknown attributes, a missing space, files of two attributes given as one, a pair of normals
    too close to move or hold together, a hold that lengthens the move past ``MAX_HOLD_RATIO``."""
    check_request(request)
    files = _files(request, index, t_0)

    def check(path: Path, space: str, label: str) -> BoundaryRecord:
        return check_boundary(identity, path, space, label, t_0, n_inv_step, request.force)

    edits = {space: _space_edit(space, request, files, check) for space in files.spaces}
    for m, paths in enumerate(files.moved):
        _one_attribute(paths, {s: e.records[m] for s, e in edits.items()}, request.force)
    names = next(iter(edits.values())).attributes  # one name per moved attribute in every space (--force)
    edits = {space: dataclasses.replace(e, attributes=names) for space, e in edits.items()}
    grid = (request.k, request.k) if request.grid else None
    return EditDescription(t_0, edits, request.denoising, grid, request.region)
