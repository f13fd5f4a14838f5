"""Boundary files: a plain ``.npz`` of arrays and strings, read back with ``allow_pickle=False``.

Fields: ``normal`` (D,) float32 unit; ``coef`` (D,) float32; ``intercept``; ``shape`` (the latent's
shape without batch); ``space`` ('h' or 'z'); ``t_0``; ``n_inv_step``; ``attribute``;
``train_acc``/``test_acc``; ``n_train``/``n_test``/``n_pos``/``n_neg``; ``config_name``;
``checkpoint_sha256``; ``format_version``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.boundary import Boundary
from utils.errors import UserError
from utils.io import atomic_path

FORMAT_VERSION = 1
SPACES = ("h", "z")


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

    @classmethod
    def from_boundary(cls, boundary: Boundary, **meta) -> "BoundaryRecord":
        return cls(normal=boundary.normal, coef=boundary.coef, intercept=boundary.intercept,
                   train_acc=boundary.train_acc, test_acc=boundary.test_acc, **meta)

    def describe(self) -> dict:
        """Metadata without the arrays (for summaries)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("normal", "coef")}


def save_boundary(path: str | Path, record: BoundaryRecord) -> Path:
    """Write ``record`` to ``path`` (``.npz`` appended if missing), atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    if record.space not in SPACES:
        raise ValueError(f"unknown space '{record.space}' (choices: h, z)")
    arrays = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        arrays[f.name] = np.asarray(value, dtype=np.int64) if f.name == "shape" else np.asarray(value)
    arrays["normal"] = arrays["normal"].astype(np.float32).reshape(-1)
    arrays["coef"] = arrays["coef"].astype(np.float32).reshape(-1)
    arrays["format_version"] = np.asarray(FORMAT_VERSION)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return path


def load_boundary(path: str | Path) -> BoundaryRecord:
    """Read a boundary file; UserError if it is missing, corrupt or inconsistent."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"boundary file {path} does not exist")
    if path.suffix == ".sav":
        raise UserError(f"{path} is a pickled boundary of the original code; convert it first "
                        "with python -m utils.boundary_tools import-sav (it is never unpickled here)")
    try:
        with np.load(path, allow_pickle=False) as data:
            fields = {f.name: f for f in dataclasses.fields(BoundaryRecord)}
            missing = [n for n in ("normal", "shape", "space", "t_0", "n_inv_step") if n not in data.files]
            if missing:
                raise UserError(f"boundary file {path} lacks the field '{missing[0]}'")
            values = {}
            for name, f in fields.items():
                if name not in data.files:
                    continue
                arr = data[name]
                if name in ("normal", "coef"):
                    values[name] = arr.astype(np.float32).reshape(-1)
                elif name == "shape":
                    values[name] = tuple(int(v) for v in arr.reshape(-1))
                else:
                    values[name] = arr.item()
            values.setdefault("coef", values["normal"])
            values.setdefault("intercept", 0.0)
    except UserError:
        raise
    except Exception as exc:  # numpy's parsers fail on damaged files with many error types
        raise UserError(f"boundary file {path} is corrupt or not a boundary file ({type(exc).__name__})") from None
    record = BoundaryRecord(**values)
    if record.space not in SPACES:
        raise UserError(f"boundary file {path} has unknown space '{record.space}' (choices: h, z)")
    norm = float(np.linalg.norm(record.normal))
    if record.normal.size != int(np.prod(record.shape)) or not np.isfinite(norm) or abs(norm - 1) > 1e-3:
        raise UserError(f"boundary file {path} is corrupt: its normal is not a unit vector of shape {record.shape}")
    return record


def matching_boundaries(folder: str | Path, config_name: str, attribute: str | None = None, t_0: int | None = None,
                        checkpoint_sha256: str | None = None) -> dict[str, list[tuple[Path, BoundaryRecord]]]:
    """Every readable boundary file in ``folder`` fitted for ``config_name`` (and for ``attribute``,
    ``t_0`` and the checkpoint with ``checkpoint_sha256`` when given), as {space: [(path, record)]}
    in path order. A record without a checkpoint hash matches any checkpoint; unreadable files are
    passed over."""
    found: dict[str, list[tuple[Path, BoundaryRecord]]] = {}
    for path in sorted(Path(folder).glob("*.npz")) if Path(folder).is_dir() else []:
        try:
            record = load_boundary(path)
        except UserError:
            continue
        if record.config_name != config_name or (attribute and record.attribute.lower() != attribute.lower()) \
                or (t_0 is not None and record.t_0 != t_0) \
                or (checkpoint_sha256 and record.checkpoint_sha256 and record.checkpoint_sha256 != checkpoint_sha256):
            continue
        found.setdefault(record.space, []).append((path, record))
    return found


def find_boundaries(folder: str | Path, config_name: str, attribute: str | None = None,
                    t_0: int | None = None) -> dict[str, Path]:
    """The newest boundary file of each space among ``matching_boundaries``."""
    return {space: max(hits, key=lambda hit: hit[0].stat().st_mtime)[0]
            for space, hits in matching_boundaries(folder, config_name, attribute, t_0).items()}
