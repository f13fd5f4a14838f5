"""Writing files and run folders so that a crash never leaves half a result or destroys an earlier one.

Every file writer goes through ``atomic_path``: the content is written to a temporary name in the
target's folder and renamed over the target only once complete (a rename within one file system
is atomic on POSIX). A run writes its whole folder the same way (``RunFolder``): into a fresh
hidden folder inside ``--exp``, renamed to its final name only when the run has succeeded.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from utils.errors import UserError

log = logging.getLogger(__name__)

# Hidden folders of unfinished runs: .partial-<name>-<pid>-<process start time>-<random>, each
# holding the marker file PARTIAL_MARKER whose content is the folder's own name: only a folder with
# both was made by this tool, and only such a folder is ever removed by another run.
PARTIAL_PREFIX = ".partial-"
PARTIAL_MARKER = ".boundarydiffusion-partial"
_PARTIAL = re.compile(r"^\.partial-(?P<name>.+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (no window for threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_temp(target: Path) -> Path:
    """A fresh empty temporary file in ``target``'s folder (created if missing), with the
    permissions the umask gives (as ``open`` would, not mkstemp's 0600)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@contextlib.contextmanager
def _temp_beside(target: Path) -> Iterator[Path]:
    """``_new_temp(target)``, removed on exit unless renamed away."""
    tmp = _new_temp(target)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it to ``target`` if the block succeeds."""
    target = Path(target)
    with _temp_beside(target) as tmp:
        yield tmp
        os.replace(tmp, target)


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_new_file(target: str | Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """``write(tmp)`` a temporary file, then move it to ``target`` (``overwrite``) or to the first
    free numbered name (``publish_file``). Returns the name taken."""
    target = Path(target)
    with _temp_beside(target) as tmp:
        write(tmp)
        return publish_file(tmp, target, overwrite)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: str | Path, obj: Any) -> None:
    """Strict JSON (RFC 8259): non-finite floats are written as null, never as NaN or Infinity."""
    text = json.dumps(_strict(obj), indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
    write_bytes(target, (text + "\n").encode())


#: The largest JSON file ``read_json`` reads: the JSON this tool reads (a diffusers ``config.json``)
#: is a few KiB, and a file past this is refused before it is read whole.
MAX_JSON_BYTES = 1 << 20
_MAX_INT_DIGITS = 1000  # no field of a config has more; Python refuses to convert past 4300


class _LongInt(str):
    """An integer of more than ``_MAX_INT_DIGITS`` digits, kept as text so that its field can be named."""


def _parse_int(text: str) -> int | _LongInt:
    return _LongInt(text) if len(text) > _MAX_INT_DIGITS else int(text)


def read_capped(path: Path, what: str, max_bytes: int) -> bytes:
    """The bytes of a small file (a config, a ``what``), read up to ``max_bytes``: UserError, one line
    naming the file, for one that is larger (it is not read whole) or cannot be read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise UserError(f"{what} {path} is larger than {max_bytes >> 10} KiB, far more than such a file holds; "
                        "not read")
    return data


def read_json(path: str | Path, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON file ``path`` (a ``what``). UserError, one line naming the file (and the field
    where there is one), for a file over ``max_bytes`` (not read whole), text that is not UTF-8 or
    not JSON, nesting deeper than Python's parser can follow, or an integer of more digits than any
    config holds."""
    path = Path(path)
    data = read_capped(path, what, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise UserError(f"{what} {path}: field '{_deep_field(text)}' is nested too deeply to be read") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from None
    found = find_value(obj, lambda v: isinstance(v, _LongInt))
    if found is not None:
        field, value = found
        raise UserError(f"{what} {path}: field '{field}' is an integer of {len(value.lstrip('+-'))} digits, "
                        f"more than any setting holds (at most {_MAX_INT_DIGITS})")
    return obj


def find_value(obj: Any, predicate: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """The first (field path like ``a.b[2]``, value) in nested dicts and lists whose value satisfies
    ``predicate``; None if none does. Iterative: no nesting depth makes it recurse."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if predicate(value):
            return where or "(top level)", value
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


def _deep_field(text: str, shown: int = 3) -> str:
    """The field of a JSON text whose value is nested deepest, named by its first ``shown`` levels
    (``a.b[0]...``): found by a scan that keeps no recursion of its own."""
    stack: list[list] = []  # [kind, label, index] per open container
    labels: list[str] = []
    deepest: list[str] = []  # the first labels of the deepest path
    depth = 0
    pending = ""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            key = text[i + 1:j]
            k = j + 1
            while k < n and text[k] in " \t\r\n":
                k += 1
            if stack and stack[-1][0] == "{" and k < n and text[k] == ":":
                pending = key
            i = j + 1
            continue
        if ch in "{[":
            if stack:
                parent = stack[-1]
                label = (f".{pending}" if labels else pending) if parent[0] == "{" else f"[{parent[2]}]"
            else:
                label = ""
            stack.append([ch, label, 0])
            labels.append(label)
            if len(labels) > depth:
                depth, deepest = len(labels), labels[:shown + 1]
        elif ch in "}]":
            if stack:
                stack.pop()
                labels.pop()
        elif ch == "," and stack and stack[-1][0] == "[":
            stack[-1][2] += 1
        i += 1
    name = "".join(deepest[1:shown + 1]).lstrip(".")  # deepest[0] is the top level
    return (name or "(top level)") + ("..." if depth > shown + 1 else "")


def _strict(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _strict(obj.tolist())
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _numbered(path: Path) -> Iterator[Path]:
    """``path``, then ``<stem>-1<suffix>``, ``<stem>-2<suffix>``, ...: the names a new result may take."""
    yield path
    n = 0
    while True:
        n += 1
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")


def publish_file(tmp: Path, target: Path, overwrite: bool) -> Path:
    """Move the complete file ``tmp`` to ``target`` (``overwrite``) or to the first free numbered
    name ``<stem>-1<suffix>``, ... . The name is taken atomically (a hard link fails if the name
    exists), so concurrent writers never take the same one. Returns the name taken."""
    if overwrite:
        os.replace(tmp, target)
        return target
    for candidate in _numbered(target):
        try:
            os.link(tmp, candidate)
        except FileExistsError:
            continue
        except OSError as exc:  # a file system without hard links: reserve the name, then replace
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except FileExistsError:
                continue
            os.replace(tmp, candidate)
            return candidate
        tmp.unlink()
        return candidate
    raise AssertionError("unreachable")


class StagedFiles:
    """Files written as a set: all of them or none, and no file they replace lost before the run
    that wrote them has succeeded.

    ``stage`` writes each file complete under a temporary name beside its target. ``publish``
    then moves them all into place with SIGINT and SIGTERM blocked: with ``overwrite`` each under
    its target, the file it replaces kept under a hidden name beside it (a hard link, so the target
    always holds one complete file), else under the first free numbered name (``publish_file``);
    if one move fails, the others are undone before the error is raised. ``rollback`` removes what
    was published and puts every replaced file back; ``commit`` drops the kept ones. ``RunFolder``
    does one or the other when its run fails or succeeds (``RunFolder.attach``).
    """

    KEPT = ".kept-"  # a replaced file waits under .<name>.kept-<random>

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []       # (temporary file, target)
        self._published: list[Path] = []                # names this set took
        self._kept: list[tuple[Path, Path]] = []         # (kept old file, the target it came from)

    def stage(self, target: str | Path, write: Callable[[Path], None]) -> None:
        """``write(tmp)`` the complete file for ``target`` to a temporary name beside it."""
        target = Path(target)
        tmp = _new_temp(target)
        self._staged.append((tmp, target))
        write(tmp)

    def publish(self, overwrite: bool) -> list[Path]:
        """Move every staged file into place (see the class); returns the names taken, in order."""
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            taken = []
            for tmp, target in self._staged:
                if overwrite:
                    self._keep(target)
                    os.replace(tmp, target)
                    self._published.append(target)
                    taken.append(target)
                else:
                    name = publish_file(tmp, target, overwrite=False)
                    self._published.append(name)
                    taken.append(name)
            self._staged = []
            return taken
        except BaseException:
            self.rollback()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _keep(self, target: Path) -> None:
        """Keep the file at ``target`` (if any) under a hidden name until ``commit`` or ``rollback``."""
        if not target.exists():
            return
        kept = target.with_name(f".{target.name}{self.KEPT}{secrets.token_hex(4)}")
        try:
            os.link(target, kept)
        except OSError as exc:  # no hard links here: a copy
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            shutil.copy2(target, kept)
        self._kept.append((kept, target))

    def rollback(self) -> None:
        """Undo ``publish`` and ``stage``: new files removed, replaced ones back (may run more than once)."""
        for path in self._published:
            with contextlib.suppress(OSError):
                path.unlink()
        for kept, target in reversed(self._kept):
            with contextlib.suppress(OSError):
                if target.exists() and os.path.samefile(kept, target):
                    kept.unlink()  # never replaced; rename() between two links of one file does nothing
                else:
                    os.replace(kept, target)
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._published, self._kept, self._staged = [], [], []

    def commit(self) -> None:
        """The run succeeded: drop the kept old files."""
        for kept, _ in self._kept:
            with contextlib.suppress(OSError):
                kept.unlink()
        self._kept, self._published = [], []


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 where /proc does not say)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start == 0 or _start_time(pid) in (0, start)  # a reused pid is another process


def _made_by_a_run(entry: Path) -> bool:
    """Whether ``entry`` is a hidden run folder this tool made: a real folder (not a link) named
    like one, holding the marker file with the folder's own name. A user's folder that merely
    looks like one (or a run folder copied or renamed elsewhere) is not."""
    marker = entry / PARTIAL_MARKER
    try:
        if entry.is_symlink() or not entry.is_dir() or marker.is_symlink() or not marker.is_file():
            return False
        if marker.stat().st_size > 4096:
            return False
        return marker.read_text(encoding="utf-8", errors="replace").strip() == entry.name
    except OSError:
        return False


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the hidden folders of runs whose process is gone (killed with SIGKILL, a power cut):
    only folders this tool made (``_made_by_a_run``); anything else is left alone."""
    removed = []
    for entry in folder.glob(PARTIAL_PREFIX + "*") if folder.is_dir() else []:
        match = _PARTIAL.match(entry.name)
        if match and _made_by_a_run(entry) and not _alive(int(match["pid"]), int(match["start"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            log.info("removed %s, left by an interrupted run", entry)
    return removed


def new_partial_folder(parent: Path, name: str) -> Path:
    """A fresh hidden folder ``<parent>/.partial-<name>-<pid>-<start>-<random>`` with its marker:
    ``remove_stale_partials(parent)`` removes it once this process is gone (killed with SIGKILL)."""
    pid = os.getpid()
    folder = parent / f"{PARTIAL_PREFIX}{name}-{pid}-{_start_time(pid)}-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o777)
    try:
        (folder / PARTIAL_MARKER).write_text(folder.name + "\n", encoding="utf-8")
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            pass
    return list(reversed(missing))


def check_writable_dir(path: Path) -> list[Path]:
    """Create ``path`` if missing and prove it writable with a probe file; returns the folders it
    created (so that a failed run can remove them again). UserError names the folder."""
    try:
        created = _make_dirs(path)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"folder {path} is not writable ({exc.strerror or exc})") from None
    return created


class RunFolder:
    """The folder of one run, written atomically (use as a context manager).

    ``__enter__`` creates a fresh hidden folder ``<exp>/.partial-<name>-<pid>-...`` and returns
    it; a run writes everything there. If the block succeeds, the folder is renamed to ``<exp>/
    <name>``, or (unless ``overwrite``) to the first of ``<name>-1``, ``<name>-2``, ... that does
    not exist: the name is reserved with ``mkdir``, which fails if it exists, so two concurrent
    runs never take the same one. With ``overwrite`` a finished folder is replaced as a whole. If
    the block fails (an exception, SIGINT, SIGTERM turned into an exception) the hidden folder,
    the files of the ``attach``ed sets and the folders this run created are removed. ``inputs``:
    paths the run reads; one inside the folder that would be replaced is refused.
    """

    def __init__(self, exp: str | Path, name: str, overwrite: bool = False, inputs: Iterable[str | Path] = ()):
        self.exp, self.name, self.overwrite = Path(exp), name, overwrite
        self.inputs = [Path(p) for p in inputs if p]
        self.partial: Path | None = None
        self.final: Path | None = None
        self._sets: list[StagedFiles] = []
        self._created: list[Path] = []

    def attach(self, files: StagedFiles) -> None:
        """Files this run writes outside its folder: rolled back if the run fails, committed (the
        files they replaced dropped) once its folder is in place."""
        self._sets.append(files)

    def created_dirs(self, folders: Iterable[Path]) -> None:
        """Remove these folders (created by this run) if the run fails and they are empty."""
        self._created.extend(folders)

    def __enter__(self) -> Path:
        if self.overwrite:
            for path in self.inputs:
                if is_within(path, self.exp / self.name):
                    raise UserError(f"{path} lies inside {self.exp / self.name}, which --ni would replace; "
                                    "move it or choose another --exp")
        try:
            self._created = _make_dirs(self.exp)
            remove_stale_partials(self.exp)
            self.partial = new_partial_folder(self.exp, self.name)
        except OSError as exc:
            if self.partial is not None:
                shutil.rmtree(self.partial, ignore_errors=True)
                self.partial = None
            self._remove_created()
            raise UserError(f"output folder {self.exp} is not writable ({exc.strerror or exc})") from None
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> None:
        # No second SIGINT/SIGTERM may cut the commit or the cleanup in half.
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            if exc_type is None:
                try:
                    self.final = self._commit()
                except BaseException:
                    self._discard()
                    raise
                for files in self._sets:
                    files.commit()
                return
            self._discard()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _commit(self) -> Path:
        target = self.exp / self.name
        (self.partial / PARTIAL_MARKER).unlink(missing_ok=True)  # a finished folder is the user's
        if self.overwrite:
            for _ in range(100):  # another run may take the name between our two renames
                old = self.exp / f"{PARTIAL_PREFIX}{self.name}-old-{os.getpid()}-0-{secrets.token_hex(4)}"
                try:
                    os.rename(target, old)
                except FileNotFoundError:
                    old = None
                try:
                    os.rename(self.partial, target)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    continue
                finally:
                    if old is not None:
                        shutil.rmtree(old, ignore_errors=True)
                return target
            raise UserError(f"could not replace {target}: other runs keep writing it")
        for candidate in _numbered(target):
            try:
                candidate.mkdir()  # reserve the name: fails if it exists
            except FileExistsError:
                continue
            os.rename(self.partial, candidate)  # onto our own empty folder
            return candidate
        raise AssertionError("unreachable")

    def _discard(self) -> None:
        if self.partial is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
        for files in self._sets:
            files.rollback()
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
