"""Which boundary files an edit uses, whether they fit the model, and the units they define.

``BoundaryIndex`` reads the header of every file in a boundary folder once and answers every
lookup by name from that scan (the current file of each attribute, space and t_0: one rule,
``utils.io.boundary_files.current_file``). ``check_boundary`` decides, for one loaded model and
t_0, whether a file may be used. ``auto_span`` and ``relative_scale`` turn a file's class summary
into the ``auto`` range and the relative unit. ``suggested_holds`` says which attributes an edit
should hold (``--condition_attr auto``) from the normals themselves.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from models.identity import ModelIdentity
from utils.core.atlas import HOLD_THRESHOLD
from utils.core.spaces import SPACES
from utils.errors import UserError
from utils.io.boundary_files import (BoundaryRecord, auto_range, boundary_name, boundary_path, boundary_writer,
                                     current_target, discover, hyperplane_offset, load_boundary, load_header,
                                     scan_boundaries, select)
from utils.io.files import RunFolder, StagedFiles

log = logging.getLogger(__name__)

BoundarySet = Mapping[str, Mapping[str, BoundaryRecord]]  # {name: {space: record}}

#: How far the ``auto`` range reaches: the span where the classes lie ([negative 5th, positive 95th]
#: percentile) scaled about its centre by this factor. Chosen with scripts/evaluate_edits.py on the
#: digits model (docs/digits_report.md): with the span itself, eta-1 edits at its ends do not yet
#: flip the attribute reliably (the fresh noise pulls them back toward the data); at 2 the edits
#: control the attribute better than the hand-set range, at 0.7 points of identity.
AUTO_SCALE = 2.0


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
        auto_range(record)  # checks the summary
    except UserError:
        return None
    stats = record.class_summary["train"]
    offset = hyperplane_offset(record)
    neg, pos = stats["neg"]["p50"] + offset, stats["pos"]["p50"] + offset
    centre, half = (neg + pos) / 2, (pos - neg) / 2
    if not (math.isfinite(centre) and math.isfinite(half) and half > 0):
        return None
    return centre, half


def fitted_t_0(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The t_0 the boundary file at ``path`` was fitted at (from its header; checked to hold
    latents of ``shapes``)."""
    return load_header(path, dict(shapes)).t_0


@dataclass(frozen=True)
class BoundaryIndex:
    """The boundary files of ``folder`` fitted for ``config_name`` with latents of ``shapes``, each
    file's header read once (``scan``). Built with ``BoundaryIndex.of``."""
    folder: Path
    config_name: str
    scan: tuple[tuple[Path, BoundaryRecord], ...]

    @classmethod
    def of(cls, folder: Path, config_name: str, shapes: Mapping[str, tuple[int, ...]]) -> "BoundaryIndex":
        return cls(Path(folder), config_name, tuple(scan_boundaries(folder, dict(shapes))))

    def attributes(self, t_0: int | None = None) -> dict[str, list[int]]:
        """{attribute: its t_0 values} fitted for the config (at ``t_0`` only, when given)."""
        found: dict[str, set[int]] = {}
        for _, record in self.scan:
            if record.config_name == self.config_name and (t_0 is None or record.t_0 == t_0):
                found.setdefault(record.attribute, set()).add(record.t_0)
        return {name: sorted(ts) for name, ts in sorted(found.items(), key=lambda kv: kv[0].lower())}

    def _missing(self, attribute: str | None, t_0: int | None) -> UserError:
        """Why nothing was found for ``attribute`` at ``t_0``: what exists instead, and what to run."""
        have = self.attributes()
        where = f"in {self.folder} for config {self.config_name}"
        if not have:
            return UserError(f"no boundary {where}; run --boundary_search first (or pass --boundary_dir)")
        match = {n: ts for n, ts in have.items() if attribute and n.lower() == attribute.lower()}
        if attribute and not match:
            names = list(have)
            return UserError(f"no boundary for {attribute!r} {where} (attributes: {', '.join(names[:20])}"
                             f"{', ...' if len(names) > 20 else ''}); fit it with --boundary_search --edit_attr "
                             f"{attribute}")
        ts = sorted({t for v in (match or have).values() for t in v})
        return UserError(f"no boundary{' for ' + repr(attribute) if attribute else ''} at t_0 {t_0} {where} "
                         f"(fitted at t_0 {', '.join(map(str, ts))}); pass one of those with --t_0")

    def find(self, attribute: str | None, t_0: int | None) -> tuple[str, int, dict[str, Path]]:
        """(attribute, t_0, {space: current file}) of ``attribute`` (None: the only one there is) at
        ``t_0`` (None: the only one it has); UserError naming what exists otherwise."""
        found = discover(list(self.scan), self.folder, self.config_name, attribute, t_0)
        if found is None:
            raise self._missing(attribute, t_0)
        return found.attribute, found.t_0, dict(found.paths)

    def held_together(self, names: list[str], t_0: int) -> list[str]:
        """The attribute names fitted at ``t_0`` in both spaces, ``names`` first (for holds)."""
        both = [a for a in self.attributes(t_0)
                if set(select(list(self.scan), self.config_name, a, t_0)) == set(SPACES)]
        return list(dict.fromkeys([*names, *both]))


def check_boundary(identity: ModelIdentity, path: Path, space: str, label: str, t_0: int, n_inv_step: int,
                   force: bool = False) -> BoundaryRecord:
    """The boundary file at ``path`` if it fits the model of ``identity`` and ``t_0`` (model and
    t_0 may be overridden by ``force``), as a record; ``label``: how the user named it.

    The model: the file's ``checkpoint_sha256`` when it has one (then its ``config_name`` may
    differ: the same weights under a renamed config); else its ``config_name`` (files imported from
    the original's ``.sav`` have no hash); a file with neither is used with a warning. Another
    ``n_inv_step`` is a warning, not a refusal: the inversion grid moves the latents by little next
    to the classes' spread (docs/reliability.md, "Boundary checks")."""
    record = load_boundary(path, dict(identity.shapes))  # the normal's size checked from its header first
    if record.space != space:
        raise UserError(f"{path} is a boundary of the {record.space} space, given as {label}")
    if record.checkpoint_sha256 and record.checkpoint_sha256 != identity.checkpoint_sha256 and not force:
        raise UserError(f"{path} was fitted on another checkpoint (sha256 {record.checkpoint_sha256[:12]}...); "
                        "pass --force to use it anyway")
    if not record.checkpoint_sha256 and record.config_name and record.config_name != identity.config_name \
            and not force:
        raise UserError(f"{path} was fitted for the model of config '{record.config_name[:40]}' (field "
                        f"config_name; it has no checkpoint_sha256), this run uses '{identity.config_name}'; "
                        "pass --force to use it anyway")
    if not record.checkpoint_sha256 and not record.config_name:
        log.warning("%s names no model (fields checkpoint_sha256 and config_name are empty): it cannot be "
                    "checked against %s; using it", path, identity.config_name)
    if record.n_inv_step != n_inv_step:
        log.warning("%s was fitted on latents inverted in %d steps (field n_inv_step); this run's --n_inv_step "
                    "is %d", path, record.n_inv_step, n_inv_step)
    if record.t_0 != t_0 and not force:
        raise UserError(f"{path} was fitted at t_0 {record.t_0}, this run uses t_0 {t_0}; "
                        "pass --force to use it anyway")
    return record


def suggested_holds(index: BoundaryIndex, moved: list[str], t_0: int, threshold: float = HOLD_THRESHOLD
                    ) -> list[str]:
    """The attributes to hold when editing ``moved`` at ``t_0`` (``--condition_attr auto``): those of
    the index, fitted in both spaces, whose current normal has |cos| >= ``threshold`` (the atlas's
    hold threshold, ``utils.core.atlas.HOLD_THRESHOLD``) with a moved attribute's, in z or in h;
    largest first. With no other attribute there is nothing to hold (an empty list)."""
    names = index.held_together([], t_0)
    lower = {m.lower() for m in moved}
    if len(names) < 2 or not lower & {n.lower() for n in names}:
        return []
    normals = {}
    for name in names:
        _, _, paths = index.find(name, t_0)
        normals[name] = {s: load_boundary(paths[s]).normal.astype(np.float64) for s in SPACES}
    largest: dict[str, float] = {}
    for m in [n for n in names if n.lower() in lower]:
        for other in (n for n in names if n.lower() not in lower):
            cos = max(abs(float(normals[m][s] @ normals[other][s])) for s in SPACES)
            if cos >= threshold:
                largest[other] = max(largest.get(other, 0.0), cos)
    return sorted(largest, key=lambda n: -largest[n])


def stage_boundary_set(folder: RunFolder, boundary_dir: Path, overwrite: bool, records: BoundarySet, config_name: str,
                       t_0: int) -> Callable[[], dict[str, dict[str, Path]]]:
    """Write a search's or a discovery's files as a set: each complete under a temporary name now
    (``StagedFiles``, attached to the run folder, so a failed run rolls them back). The returned
    call moves them all into place together and gives {name: {space: path}}; with ``overwrite``
    (--ni) each replaces the current file of its name (``current_target``), else takes the next free
    name (``boundary_path``)."""
    staged = StagedFiles()
    folder.attach(staged)
    for name in records:
        for space in SPACES:
            file_name = boundary_name(config_name, name, t_0, space)
            target = current_target(boundary_dir, file_name) if overwrite else boundary_path(boundary_dir, file_name)
            staged.stage(target, boundary_writer(records[name][space]))

    def publish() -> dict[str, dict[str, Path]]:
        taken = iter(staged.publish(overwrite=overwrite))
        return {name: {space: next(taken) for space in SPACES} for name in records}
    return publish
