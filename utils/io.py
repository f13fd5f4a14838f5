"""Writing files so that a crash never leaves half a file or destroys an earlier result.

Every writer goes through ``atomic_path``: the content is written to a temporary name in the
target's folder and renamed over the target only once complete (a rename within one file system
is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from utils.errors import UserError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it to ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: str | Path, obj: Any) -> None:
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def free_path(path: Path, taken: Callable[[Path], bool] = Path.exists) -> Path:
    """``path``, or the first of ``<stem>-1<suffix>``, ``<stem>-2<suffix>``, ... that is not ``taken``."""
    candidate, n = path, 0
    while taken(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """The folder a run writes into, never one that holds a finished run unless ``overwrite``.

    A folder that holds ``summary.json`` is finished; without ``overwrite`` the run goes to the
    first free ``<path>-1``, ``<path>-2``, ... instead. Checks that the folder is writable.
    """
    candidate = path if overwrite else free_path(path, lambda p: (p / "summary.json").exists())
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=candidate, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise UserError(f"output folder {candidate} is not writable ({exc.strerror or exc})") from None
    return candidate
