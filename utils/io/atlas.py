"""The attribute atlas of a multi-attribute boundary search: ``atlas.json`` and ``atlas.png``.

``atlas.json`` (format 1) holds ``attributes`` (the names, in the order of every matrix),
``cosines`` ({"z": A x A, "h": A x A}: cosines of the unit normals as the boundary files store them),
``phi`` (A x A phi correlation of the labels over the search's images, null where undefined or when
built from boundary files alone), ``hold_threshold`` (``utils.core.atlas.HOLD_THRESHOLD``),
``per_attribute`` ({name: {"train_acc": {"z", "h"}, "test_acc": {...}, "n_train", "n_test", "n_pos",
"n_neg", "holds": [names]}}; ``holds``: the others whose |cos| reaches the threshold in z or h,
largest first), ``skipped`` ({name: {"train": {"neg", "pos"}, "test": {...}}}: too few images of a
class to be fitted), ``config_name`` and ``t_0``. ``suggested_holds`` reads it for the edit modes.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from utils.core.atlas import HOLD_THRESHOLD, cosine_matrix, holds
from utils.errors import UserError
from utils.core.spaces import SPACES
from utils.io.boundary_files import (MAX_ATTRIBUTE_NAME, BoundaryRecord, current_file, load_boundary, scan_boundaries,
                                     select)
from utils.io.files import read_json, write_json

ATLAS_FORMAT = 1
ATLAS_FILE, ATLAS_PICTURE = "atlas.json", "atlas.png"
#: The largest atlas.json read: 1,000 attributes' two matrices as text are about 40 MB.
MAX_ATLAS_BYTES = 64 << 20


def _matrix(m: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if math.isfinite(v) else None for v in row] for row in np.asarray(m, dtype=np.float64)]


def atlas_from_records(records: dict[str, dict[str, BoundaryRecord]], phi: np.ndarray | None = None,
                       skipped: dict | None = None) -> dict:
    """The atlas of boundaries {attribute: {space: record}} (every attribute with both spaces, one
    config and t_0), in the order of ``records``; phi: (A, A) label correlations, or None."""
    names = list(records)
    if len(names) < 2:
        raise UserError(f"an atlas needs at least two attributes with z and h boundaries, got {len(names)}")
    for name, spaces in records.items():
        if set(spaces) != set(SPACES):
            raise UserError(f"attribute '{name}' has boundaries of {', '.join(sorted(spaces))} only; "
                            "the atlas needs both z and h")
    firsts = [spaces["z"] for spaces in records.values()]
    for what in ("config_name", "t_0"):
        values = sorted({str(getattr(r, what)) for r in firsts})
        if len(values) > 1:
            raise UserError(f"the boundaries are of several {what.replace('_', ' ')}s ({', '.join(values)}); "
                            "an atlas takes one")
    cosines = {space: cosine_matrix(np.stack([records[n][space].normal for n in names])) for space in SPACES}
    held = holds(cosines, names, HOLD_THRESHOLD)
    per_attribute = {}
    for name in names:
        z = records[name]["z"]
        per_attribute[name] = {
            "train_acc": {space: records[name][space].train_acc for space in SPACES},
            "test_acc": {space: records[name][space].test_acc for space in SPACES},
            "n_train": z.n_train, "n_test": z.n_test, "n_pos": z.n_pos, "n_neg": z.n_neg, "holds": held[name]}
    return {"format_version": ATLAS_FORMAT, "config_name": firsts[0].config_name, "t_0": firsts[0].t_0,
            "attributes": names, "cosines": {space: _matrix(c) for space, c in cosines.items()},
            "phi": None if phi is None else _matrix(phi), "hold_threshold": HOLD_THRESHOLD,
            "per_attribute": per_attribute, "skipped": skipped or {}}


def write_atlas(folder: str | Path, atlas: dict) -> tuple[Path, Path]:
    """Write ``atlas.json`` and ``atlas.png`` into ``folder``; returns their paths."""
    from utils.io.plots import atlas_picture

    folder = Path(folder)
    write_json(folder / ATLAS_FILE, atlas)
    atlas_picture(atlas, folder / ATLAS_PICTURE)
    return folder / ATLAS_FILE, folder / ATLAS_PICTURE


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _atlas_problem(atlas) -> str | None:
    """Why ``atlas`` (parsed JSON) is not an atlas this code reads, or None: every field's type and
    size checked before any use (a forged file may hold anything JSON can)."""
    if not isinstance(atlas, dict):
        return "not a JSON object"
    version = atlas.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= 1000:
        return "'format_version' is not a small whole number"
    if version > ATLAS_FORMAT:
        return f"format version {version} is newer than this code reads ({ATLAS_FORMAT}); update BoundaryDiffusion"
    names = atlas.get("attributes")
    if not (isinstance(names, list) and 0 < len(names) <= MAX_ATLAS_ATTRIBUTES
            and all(isinstance(n, str) and len(n) <= MAX_ATTRIBUTE_NAME for n in names)):
        return f"'attributes' is not a list of at most {MAX_ATLAS_ATTRIBUTES} names"
    per = atlas.get("per_attribute")
    if not isinstance(per, dict) or not all(isinstance(per.get(n), dict) and isinstance(per[n].get("holds"), list)
                                            and all(isinstance(h, str) for h in per[n]["holds"]) for n in names):
        return "'per_attribute' does not give each attribute its 'holds' (a list of names)"
    threshold = atlas.get("hold_threshold", HOLD_THRESHOLD)
    if not _is_number(threshold):
        return "'hold_threshold' is not a number"
    cosines = atlas.get("cosines")
    if not isinstance(cosines, dict) or not all(
            isinstance(m, list) and len(m) == len(names) and all(
                isinstance(row, list) and len(row) == len(names) and all(v is None or _is_number(v) for v in row)
                for row in m) for m in cosines.values()):
        return "'cosines' are not square matrices of numbers, one row per attribute"
    return None


#: The most attributes an atlas file may name (an attribute file's own bound).
MAX_ATLAS_ATTRIBUTES = 1000


def load_atlas(path: str | Path) -> dict:
    """An atlas from ``atlas.json`` or a folder holding one; UserError if it is missing, larger than
    ``MAX_ATLAS_BYTES``, or malformed in any field (``_atlas_problem``)."""
    path = Path(path)
    if path.is_dir():
        path = path / ATLAS_FILE
    if not path.is_file():
        raise UserError(f"no atlas at {path}; write one with --boundary_search --edit_attr all or "
                        "python -m scripts.boundary_tools atlas DIR")
    atlas = read_json(path, "atlas file", MAX_ATLAS_BYTES)
    problem = _atlas_problem(atlas)
    if problem:
        raise UserError(f"atlas file {path} cannot be read: {problem}")
    return atlas


def suggested_holds(atlas_or_dir: dict | str | Path, attribute: str) -> list[str]:
    """The attributes the atlas suggests holding fixed when editing ``attribute`` (case-insensitive):
    those whose normals reach |cos| >= the atlas's threshold with its normal, in z or h, largest
    first. atlas_or_dir: an atlas dict, an ``atlas.json`` or a folder holding one. UserError for an
    attribute the atlas does not have."""
    atlas = atlas_or_dir if isinstance(atlas_or_dir, dict) else load_atlas(atlas_or_dir)
    by_lower = {n.lower(): n for n in atlas["attributes"]}
    if attribute.lower() not in by_lower:
        raise UserError(f"the atlas has no attribute '{attribute}' (it has: {', '.join(atlas['attributes'])})")
    return list(atlas["per_attribute"][by_lower[attribute.lower()]]["holds"])


def atlas_from_dir(folder: str | Path, config_name: str | None = None, t_0: int | None = None) -> dict:
    """The atlas of the boundary files in ``folder`` (e.g. the original's, imported with
    ``boundary_tools import-sav``): of each attribute and space the current file (``current_file``,
    as the edit modes pick), for the one config and t_0 there, or the ones given. Phi is null (no
    labels). Each file's header is read once; only the chosen files' normals are read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of boundary files")
    scan = scan_boundaries(folder)
    configs = {config_name} if config_name else {r.config_name for _, r in scan}
    candidates: dict[tuple, dict[str, list[Path]]] = {}
    for config in sorted(configs):
        for space, hits in select(scan, config, t_0=t_0).items():
            for path, record in hits:
                key = (record.config_name, record.t_0, record.attribute.lower())
                candidates.setdefault(key, {}).setdefault(space, []).append(path)
    groups = sorted({key[:2] for key in candidates})
    if not groups:
        raise UserError(f"no boundary files in {folder}")
    if len(groups) > 1:
        raise UserError(f"{folder} holds boundaries of several configs or t_0 values "
                        f"({', '.join(f'{c} t_0 {t}' for c, t in groups)}); choose one with --config_name / --t_0")
    chosen = {}
    for key, spaces in sorted(candidates.items()):
        if set(spaces) == set(SPACES):
            records = {space: load_boundary(current_file(paths)) for space, paths in spaces.items()}
            chosen[records["z"].attribute] = records
    return atlas_from_records(chosen)
