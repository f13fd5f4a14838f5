"""What the web app (``runners.app``) keeps between requests, and the work each request does, without
Gradio. The app only parses what the browser or an API client sends (types: finite numbers, whole
numbers where something is counted, true/false, bounded lists of names) and builds the engine's
requests (``runners.engine``); every semantic check (K, the grid, moved and held names, units,
spaces, steps, boundary files, regions) is the engine's, so a request the app accepts is a request
the command line would accept, with the same pixels. A region is a box's text (four numbers: text
never names a file) or the path of an uploaded mask image (read only from the upload folders).

What the app keeps:

* the attributes it offers (``AttributeTable``): one scan of the boundary folder
  (``Engine.boundary_index``), each attribute described once by the engine at start;
* the sessions (``SessionStore``), each with its images and where they sit along every attribute,
  its output folders (``Session``: kept ``KEEP_SECONDS`` after their job ends, at most
  ``MAX_JOBS``, never while their job runs), its region previews (its newest ``PREVIEWS_KEPT``),
  its stop flags and its uploads;
* the inversions and reconstructions are the engine's (``EngineOptions.recent_images`` and
  ``per_owner``: each session holds its own share, so no session evicts another's images).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import reprlib
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from runners.engine import (SPACES, sha256_file, BoundaryIndex, BoundaryRecord, Denoising, EditDescription, EditLimits, EditRequest, Engine,
                            Move, Region, UserError, check_request, relative_scale)

log = logging.getLogger(__name__)

MAX_IMAGES_PER_SESSION = 4   # inverted images a session keeps (its share of the engine's store)
MAX_SESSIONS = 16            # sessions kept at once (the least recently active one dropped first)
MAX_SWEEP = 32               # points along one sweep (the engine's limit for the app: ``LIMITS``)
LIMITS = EditLimits(max_points=MAX_SWEEP)
KEEP_SECONDS = 600.0         # a finished job's files are kept at least this long (10 minutes) ...
MAX_JOBS = 64                # ... unless the session has more job folders than this (oldest finished go first)
JOBS_KEPT = 2                # a session's newest finished jobs, kept whatever their age
MAX_NAMES = 64               # names in one list sent (held attributes, moved attributes)
MAX_TEXT = 200               # characters of a text argument (an attribute or space name)
MAX_MOVES_TEXT = 10_000      # characters of /edit_many's moves given as JSON text
PREVIEW_SIDE = 256           # a region preview is the image enlarged by a whole factor to at least this side
PREVIEWS_KEPT = 4            # region previews a session keeps (its newest; the page shows the last)
YELLOW = (255, 255, 0)       # the region's outline, as the engine outlines it in a sweep's grid
#: A box as text: four numbers separated by commas (nothing else: a region sent as text never names a file).
BOX = re.compile(r"[-+0-9.eE\s]+(,[-+0-9.eE\s]+){3}")

#: (network calls done, calls in this stage, stage name), after every network call
ProgressFn = Callable[[int, int, str], None]


class Cancelled(Exception):
    """The user pressed stop (or the server is stopping): raised from the network-call hook and
    between the stages of a job, so the work ends at the next call or stage."""


# ---------------------------------------------------------------------------------------- arguments
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 40, 40, 6, 4


def _shown(value) -> str:
    """``value`` for a message: a short repr, whatever its size or depth (``reprlib``)."""
    return _REPR.repr(value)


def whole_number(value, what: str, low: float = -math.inf, high: float = math.inf) -> int:
    """``value`` as an int in [low, high]: an int or a float without a fractional part (2.0, not
    2.5, a string or a bool); UserError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a whole number, got {_shown(value)}")
    if isinstance(value, float) and not value.is_integer():  # also nan and infinity
        raise UserError(f"{what} must be a whole number, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise UserError(f"{what} must be in [{low}, {high}], got {number}")
    return number


def real_number(value, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a finite float in [low, high] (an int or a float, not a string or a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {_shown(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise UserError(f"{what} must be a finite number, got {value!r}")
    if not low <= number <= high:
        raise UserError(f"{what} must be in [{low:g}, {high:g}], got {number:g}")
    return number


def short_text(value, what: str) -> str:
    """``value`` as a string of at most ``MAX_TEXT`` characters."""
    if not isinstance(value, str):
        raise UserError(f"{what} must be text, got {_shown(value)}")
    if len(value) > MAX_TEXT:
        raise UserError(f"{what} must be at most {MAX_TEXT} characters, got {len(value)}")
    return value


def name_list(value, what: str, limit: int = MAX_NAMES) -> tuple[str, ...]:
    """``value`` as a tuple of distinct names (case-insensitive, first spelling kept), at most
    ``limit``: None or an empty list is none, one string is one name (not its letters)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{what} must be a list of attribute names, got {_shown(value)}")
    if len(value) > limit:
        raise UserError(f"{what}: at most {limit} attributes, got {len(value)}")
    names: dict[str, str] = {}
    for item in value:
        names.setdefault(short_text(item, what).lower(), item)
    return tuple(names.values())


def flag(value, what: str) -> bool:
    """``value`` as a bool (a checkbox): True or False only."""
    if not isinstance(value, bool):
        raise UserError(f"{what} must be true or false, got {_shown(value)}")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's members, refusing a key given twice (``json.loads`` keeps the last silently)."""
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise UserError(f"{_shown(key)} is given twice in the moves: give each attribute once")
        found[key] = value
    return found


def parse_moves(moves) -> object:
    """/edit_many's moves: an object {attribute: distance}, or its JSON text (at most
    ``MAX_MOVES_TEXT`` characters; a key given twice or nesting too deep for the parser refused)."""
    if not isinstance(moves, str):
        return moves
    if len(moves) > MAX_MOVES_TEXT:
        raise UserError(f"the moves must be at most {MAX_MOVES_TEXT} characters of JSON")
    try:
        return json.loads(moves, object_pairs_hook=_unique_keys)
    except UserError:
        raise
    except RecursionError:
        raise UserError("the moves are nested too deeply: give a JSON object {attribute: distance}") from None
    except ValueError:
        raise UserError("the moves must be a JSON object {attribute: distance}") from None


def parse_box(text) -> tuple[float, float, float, float] | None:
    """A box ``x0,y0,x1,y1`` (fractions, 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1) from ``text``, or
    None when it is not one: only for drawing it (the engine checks the box an edit uses)."""
    if not isinstance(text, str) or not BOX.fullmatch(text.strip()):
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        return None
    return (x0, y0, x1, y1) if 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 else None


def box_text(first: Sequence[int], second: Sequence[int], size: int) -> str:
    """The box (fractions of the image) whose corners are the model pixels ``first`` and ``second``
    ((column, row) in a ``size`` x ``size`` image): both pixels and those between them are inside."""
    (a, b), (c, d) = first, second
    values = (min(a, c) / size, min(b, d) / size, (max(a, c) + 1) / size, (max(b, d) + 1) / size)
    return ",".join(f"{v:.10g}" for v in values)


def preview_factor(size: int) -> int:
    """How many preview pixels a model pixel takes (a whole number: a click names one model pixel)."""
    return max(1, -(-PREVIEW_SIDE // size))


def region_picture(image, box: tuple[float, float, float, float] | None, corner: Sequence[int] | None
                   ) -> np.ndarray:
    """The image as the model sees it ((C, S, S) in [-1, 1]), enlarged by ``preview_factor``, as RGB
    uint8: the box outlined in yellow with its outside dimmed, and a first corner (a model pixel)
    marked, when given."""
    pixels = ((np.asarray(image, dtype=np.float32).clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    pixels = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels[:3]
    size, f = pixels.shape[-1], preview_factor(pixels.shape[-1])
    picture = pixels.transpose(1, 2, 0).repeat(f, axis=0).repeat(f, axis=1)
    side = size * f
    line = max(1, side // 128)
    if box is not None:
        x0, y0, x1, y1 = (round(v * side) for v in box)
        inside = np.zeros((side, side), dtype=bool)
        inside[y0:y1, x0:x1] = True
        picture[~inside] = (picture[~inside] * 0.55).astype(np.uint8)
        for rows, cols in (((y0, y0 + line), (x0, x1)), ((y1 - line, y1), (x0, x1)),
                           ((y0, y1), (x0, x0 + line)), ((y0, y1), (x1 - line, x1))):
            picture[max(rows[0], 0):rows[1], max(cols[0], 0):cols[1]] = YELLOW
    if corner is not None:
        half = max(f, 8) // 2
        cx, cy = (int(v) * f + f // 2 for v in corner)
        x0, x1, y0, y1 = max(cx - half, 0), min(cx + half, side), max(cy - half, 0), min(cy + half, side)
        picture[y0:y1, x0:x1] = YELLOW
        picture[y0 + line:y1 - line, x0 + line:x1 - line] = pixels[:, int(corner[1]), int(corner[0])]
    return picture


# ---------------------------------------------------------------------------------------- attributes
@dataclass(frozen=True)
class Attribute:
    """One attribute's boundaries at one t_0, as the engine describes a move of it: the files the
    command line picks for ``--edit_attr A --t_0 T`` (``BoundaryIndex.find``), checked against the
    model (``Engine.describe``)."""
    key: str                      # what the page and the API send: "<attribute>@<t_0>"
    name: str
    t_0: int
    description: EditDescription  # a move of this attribute alone (its source distances locate an image)

    @property
    def records(self) -> dict[str, BoundaryRecord]:
        return {s: e.records[0] for s, e in self.description.spaces.items()}

    @property
    def primary(self) -> BoundaryRecord:
        """The record of its primary space (the first of ``SPACES`` it was fitted in): its slider's range."""
        return self.records[self.primary_space]

    @property
    def primary_space(self) -> str:
        return next(s for s in SPACES if s in self.records)

    def scale(self, space: str) -> tuple[float, float] | None:
        """(centre, half) of the relative unit in ``space`` (``relative_scale``), or None."""
        record = self.records.get(space)
        return None if record is None else relative_scale(record)

    @property
    def relative(self) -> bool:
        """Whether every space of it has a relative unit (a slider on the page)."""
        return all(self.scale(s) is not None for s in self.records)

    @property
    def label(self) -> str:
        acc = ", ".join(f"{s} {self.records[s].test_acc:.3f}" for s in SPACES if s in self.records)
        return f"{self.name} (t_0 {self.t_0}; test accuracy {acc})"


class AttributeTable:
    """The boundaries of ``index`` (one scan of the boundary folder) that the engine accepts for the
    model at ``n_inv_step``: one entry per attribute and t_0 (``t_0``: only that mixing step).
    ``default_t_0``: the mixing step a bare name means, as on the command line."""

    def __init__(self, engine: Engine, index: BoundaryIndex, n_inv_step: int, default_t_0: int,
                 t_0: int | None = None):
        self.index, self.t_0 = index, default_t_0
        self.entries: dict[str, Attribute] = {}
        for name, t_0s in index.attributes(t_0).items():
            for at in t_0s:
                request = EditRequest((Move(name, 0.0, 0.0),), Denoising(2))
                try:
                    description = engine.describe(request, at, n_inv_step, index)
                except UserError as exc:  # e.g. fitted on another checkpoint: not offered
                    log.warning("not offering %s at t_0 %d: %s", name, at, exc)
                    continue
                key = f"{name}@{at}"
                self.entries[key] = Attribute(key, name, at, description)

    def __len__(self) -> int:
        return len(self.entries)

    def choices(self) -> list[tuple[str, str]]:
        """(label, key) for a dropdown."""
        return [(a.label, a.key) for a in self.entries.values()]

    def default(self, name: str | None = None) -> str | None:
        """The key of ``name`` (case-insensitive) at the default t_0, else at its first t_0; without
        a name, the first attribute at the default t_0. None when there is no such attribute."""
        named = [a for a in self.entries.values() if name is None or a.name.lower() == name.lower()]
        keys = [a.key for a in named if a.t_0 == self.t_0] or [a.key for a in named]
        return keys[0] if keys else None

    def get(self, key) -> Attribute:
        """The attribute named ``key``: ``<attribute>@<t_0>``, or a bare name, which means the
        default t_0, as ``--edit_attr`` does; case-insensitive."""
        key = short_text(key, "attribute")
        if key in self.entries:
            return self.entries[key]
        name, at, t_0 = key.partition("@")
        wanted = f"{name}@{t_0 if at else self.t_0}".lower()
        for entry in self.entries.values():
            if entry.key.lower() == wanted:
                return entry
        raise UserError(f"unknown attribute {_shown(key)} (choices: {', '.join(self.entries) or 'none'}; a bare "
                        f"name means t_0 {self.t_0})")

    def sliders(self, first: str | None = None) -> list[Attribute]:
        """The attributes with a slider on the page: those at the default t_0 with a relative unit
        in every space, ``first`` (a key) first, then in the table's order."""
        found = [a for a in self.entries.values() if a.t_0 == self.t_0 and a.relative]
        return sorted(found, key=lambda a: a.key != first)


# ---------------------------------------------------------------------------------------- sessions
@dataclass
class Prepared:
    """An image as the model sees it in one session at one t_0 (its latents are the engine's,
    ``owner`` the session), where it sits along each slider's attribute ({key: {space: v.n}},
    once known), and whether this session has inverted it (its own knowledge: the engine may hold
    the latents because another session edited the same image)."""
    image: object                 # (C, S, S) in [-1, 1], as the engine's reader returns it
    positions: dict | None = None
    inverted: bool = False


@dataclass
class JobFolder:
    path: Path
    running: bool = True
    ended: float = 0.0            # time.monotonic() when its job ended


class Session:
    """One browser tab (or API client): its images, stop flags, output folders (under a random
    name: a file is served only to whoever was sent its path) and the uploads its images came from.
    Its images and folders change under its own lock (concurrent jobs of one session).

    Output folders: one per job, removed only once the job has ended, and then only when older
    than ``keep_seconds`` (and not among its ``JOBS_KEPT`` newest), or when the session holds more
    than ``max_jobs`` folders (its oldest finished ones first); a failed job's folder goes at once."""

    def __init__(self, number: int, folder: Path, max_images: int, keep_seconds: float = KEEP_SECONDS,
                 max_jobs: int = MAX_JOBS):
        self.number, self.folder, self.max_images = number, folder, max_images
        self.keep_seconds, self.max_jobs = keep_seconds, max_jobs
        self.images: OrderedDict[tuple, Prepared] = OrderedDict()
        self.running: set[threading.Event] = set()   # the stop flags of its jobs in progress
        self.uploads: OrderedDict[Path, None] = OrderedDict()  # upload paths, least recently used first
        self.folders: OrderedDict[int, JobFolder] = OrderedDict()
        self.previews: list[Path] = []               # its region previews, oldest first
        self._preview_numbers = itertools.count()
        self.closed = False
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def stop(self) -> None:
        for event in list(self.running):
            event.set()

    def lookup(self, key: tuple) -> Prepared | None:
        with self._lock:
            found = self.images.get(key)
            if found is not None:
                self.images.move_to_end(key)
            return found

    def keep(self, key: tuple, prepared: Prepared) -> Prepared:
        """Keep ``prepared`` under ``key`` (or the one another job of the session kept first)."""
        with self._lock:
            prepared = self.images.setdefault(key, prepared)
            self.images.move_to_end(key)
            while len(self.images) > self.max_images:
                self.images.popitem(last=False)
            return prepared

    @contextlib.contextmanager
    def job_folder(self) -> Iterator[Path]:
        """A fresh folder for one job's files, kept after the job as the class says (removed at
        once if the job fails)."""
        with self._lock:
            number = next(self._numbers)
            folder = self.folder / f"job{number}"
            folder.mkdir(parents=True)
            self.folders[number] = JobFolder(folder)
        failed = True
        try:
            yield folder
            failed = False
        finally:
            with self._lock:
                job = self.folders[number]
                job.running, job.ended = False, time.monotonic()
                if failed:
                    self._remove(number)
                self._prune()

    def save_preview(self, picture: np.ndarray) -> Path:
        """``picture`` as a fresh PNG in the session's folder (a new name each time: the browser
        never shows an old one from its cache); the session keeps its newest ``PREVIEWS_KEPT``."""
        with self._lock:
            if self.closed:
                raise Cancelled("the session was closed")
            path = self.folder / "previews" / f"region{next(self._preview_numbers)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(path)
            self.previews.append(path)
            while len(self.previews) > PREVIEWS_KEPT:
                self.previews.pop(0).unlink(missing_ok=True)
            return path

    def _remove(self, number: int) -> None:
        shutil.rmtree(self.folders.pop(number).path, ignore_errors=True)

    def _prune(self) -> None:
        """Remove the finished folders past their time (lock held); all of them once closed."""
        finished = [n for n, j in self.folders.items() if not j.running]
        if self.closed:
            for number in finished:
                self._remove(number)
            if not self.folders:
                shutil.rmtree(self.folder, ignore_errors=True)
            return
        now = time.monotonic()
        for number in finished[:-JOBS_KEPT] if JOBS_KEPT else finished:
            if now - self.folders[number].ended >= self.keep_seconds:
                self._remove(number)
        for number in [n for n, j in self.folders.items() if not j.running]:
            if len(self.folders) <= self.max_jobs:
                break
            self._remove(number)

    def close(self) -> None:
        """The session is dropped: its work stops, its finished folders go now, the others when their
        jobs end."""
        self.stop()
        with self._lock:
            self.closed = True
            self.images.clear()
            self._prune()


class SessionStore:
    """The sessions, at most ``max_sessions`` (least recently active dropped first, with its files),
    each keeping at most ``max_images`` images: memory is bounded whatever the clients do.

    ``upload_root``: where the web framework stores uploads. An upload that no session's kept
    images came from any more is deleted, so that its copies do not pile up. ``on_forget(number)``
    hears of each session dropped (the engine forgets its latents). The store also counts the jobs
    in progress, so that ``close`` can stop them and wait for them before the server exits."""

    def __init__(self, root: Path, max_sessions: int = MAX_SESSIONS, max_images: int = MAX_IMAGES_PER_SESSION,
                 upload_root: Path | None = None, keep_seconds: float = KEEP_SECONDS, max_jobs: int = MAX_JOBS,
                 on_forget: Callable[[int], None] | None = None):
        self.root, self.max_sessions, self.max_images = Path(root), max_sessions, max_images
        self.keep_seconds, self.max_jobs, self.on_forget = keep_seconds, max_jobs, on_forget
        self.upload_root = None if upload_root is None else Path(upload_root).resolve()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._upload_users: dict[Path, set[int]] = {}
        self._jobs = threading.Condition()
        self._running = 0
        self._closing = False

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = Session(next(self._numbers), self.root / secrets.token_hex(16), self.max_images,
                                  self.keep_seconds, self.max_jobs)
                self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.max_sessions:
                _, old = self._sessions.popitem(last=False)
                self._forget(old)
            return session

    @contextlib.contextmanager
    def job(self, session: Session) -> Iterator[threading.Event]:
        """A stop flag for one job of ``session``, set by ``stop`` (or ``close``) while it runs."""
        event = threading.Event()
        with self._jobs:
            if self._closing:
                raise Cancelled("the server is stopping")
            self._running += 1
            session.running.add(event)
        try:
            yield event
        finally:
            with self._jobs:
                session.running.discard(event)
                self._running -= 1
                self._jobs.notify_all()

    def close(self, timeout: float) -> bool:
        """Refuse new jobs, stop those in progress, and wait up to ``timeout`` seconds for them to
        end (each ends at its next network call). Whether none is left."""
        with self._jobs:
            self._closing = True
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.stop()
        with self._jobs:
            return self._jobs.wait_for(lambda: self._running == 0, timeout)

    def use_upload(self, session: Session, path: Path) -> None:
        """Note that ``session`` keeps an image read from ``path``; of its uploads it keeps those of
        its last ``max_images`` images, and an upload no session keeps is deleted."""
        if self.upload_root is None or not path.is_relative_to(self.upload_root):
            return  # a bundled example
        with self._lock:
            session.uploads[path] = None
            session.uploads.move_to_end(path)
            self._upload_users.setdefault(path, set()).add(session.number)
            while len(session.uploads) > self.max_images:
                old, _ = session.uploads.popitem(last=False)
                self._release(old, session.number)

    def _release(self, path: Path, number: int) -> None:
        users = self._upload_users.get(path, set())
        users.discard(number)
        if users:
            return
        self._upload_users.pop(path, None)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the framework's folder for that upload, once empty
            path.parent.rmdir()

    def _forget(self, session: Session) -> None:
        """A session dropped (lock held): its work stops, its files and unshared uploads go (a
        running job's folder when that job ends), the engine forgets its latents."""
        session.close()
        for path in list(session.uploads):
            self._release(path, session.number)
        session.uploads.clear()
        if self.on_forget is not None:
            self.on_forget(session.number)

    def stop(self, session_id: str) -> None:
        """Stop the session's work in progress (at its next network call)."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            session.stop()

    def drop(self, session_id: str) -> None:
        """Forget a session (its tab closed): its work stops, its images and files go."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._forget(session)

    def __len__(self) -> int:
        return len(self._sessions)


# ---------------------------------------------------------------------------------------- the work
@dataclass(frozen=True)
class AppRequest:
    """One edit or sweep as the engine takes it (``EditRequest``, checked by ``check_request``
    with the app's ``LIMITS``), the t_0 of its attributes and the image's alignment (None: the
    config's)."""
    edit: EditRequest
    t_0: int
    align: bool | None = None


@dataclass
class Result:
    original: Path
    reconstruction: Path
    edits: list[Path]
    grid: Path | None = None
    gif: Path | None = None
    info: dict = field(default_factory=dict)


class Stages:
    """One job's progress: the stage under way (the network-call hook reports it), when each stage
    began, and the stop flag, looked at between stages and at every network call."""

    def __init__(self, cancel: threading.Event, progress: ProgressFn | None, count: Callable[[], None]):
        self.cancel, self.progress, self.count = cancel, progress, count
        self.name, self.started = "", {"start": time.perf_counter()}

    def __call__(self, name: str) -> None:
        if self.cancel.is_set():
            raise Cancelled("stopped")
        self.name = name
        self.started[name] = time.perf_counter()

    def on_call(self, done: int, total: int) -> None:
        self.count()
        if self.cancel.is_set():
            raise Cancelled("stopped")
        if self.progress is not None:
            self.progress(done, total, self.name)


class EditService:
    """The app's work on one engine: read an upload, locate it along the attributes, edit it.

    ``allowed_roots``: the folders an image may be read from (Gradio's upload folder, the bundled
    examples); anything else is refused. ``batch_sizes``: (inversion, edits), the command line's
    defaults for the device unless given, so that the pixels equal the command line's.
    ``steps`` and ``h_policy``: the denoising a request takes when it names no steps
    (``--n_test_step``, ``--h_policy``). ``sliders``: the attributes ``locate`` places an image
    along (default: ``AttributeTable.sliders``), all at one t_0."""

    def __init__(self, engine: Engine, table: AttributeTable, store: SessionStore, n_inv_step: int,
                 batch_sizes: tuple[int, int], steps: int, h_policy: str = "lagged",
                 allowed_roots: Sequence[Path] = (), sliders: Sequence[Attribute] | None = None):
        self.engine, self.table, self.store, self.n_inv_step = engine, table, store, n_inv_step
        self.sliders = list(table.sliders() if sliders is None else sliders)
        self.bs_invert, self.bs_edit = batch_sizes
        self.steps, self.h_policy = steps, h_policy
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots]
        self.output_root = store.root.resolve()  # the sessions' outputs are never read as images
        self.stats = {"inversions": 0, "edits": 0, "sweeps": 0, "network_calls": 0}
        self._stats_lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def check_path(self, path, what: str = "the image") -> Path:
        """``path`` if it lies in an allowed folder (Gradio's copy of an upload, a bundled example)."""
        if not path:
            raise UserError("no image: upload one or pick an example")
        if not isinstance(path, (str, Path)) or len(str(path)) > 4096:
            raise UserError(f"{what} must be an uploaded file, got {_shown(path)}")
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.allowed_roots) \
                or resolved.is_relative_to(self.output_root):
            raise UserError(f"{what} must be uploaded (or be one of the examples)")
        return resolved

    def region(self, region, feather=2.0, region_h="cells") -> Region | None:
        """The engine's ``Region`` for what was sent: None (or empty text) is the whole image; text is a
        box ``x0,y0,x1,y1`` (four numbers: text never names a file); a ``Path`` is an uploaded mask
        image, read only from the allowed folders, as images are. ``feather`` and ``region_h`` are
        parsed here; the engine checks the rest (the box's values, the mask, the coverage) and says
        what is wrong in one line. Without a region they are not used."""
        if region is None or isinstance(region, str) and not region.strip():
            return None
        if isinstance(region, Path):
            spec = str(self.check_path(region, "the region's mask image"))
        elif isinstance(region, str) and BOX.fullmatch(short_text(region, "the region").strip()) \
                and not Path(region).exists():
            spec = region.strip()
        else:
            raise UserError("the region must be a box x0,y0,x1,y1 in fractions of the image (or an uploaded "
                            f"mask image), got {_shown(region)}")
        return Region(spec, short_text(region_h, "region h"), real_number(feather, "feather"))

    def _moves(self, moves) -> tuple[tuple[Move, ...], int]:
        """The parsed moves {key: value or [start, end]} as the engine's moves, and their t_0."""
        moves = parse_moves(moves)
        if not isinstance(moves, dict) or not moves:
            raise UserError(f"the attributes to move must be an object {{attribute: distance}}, got {_shown(moves)}")
        if len(moves) > MAX_NAMES:
            raise UserError(f"at most {MAX_NAMES} attributes can be named at once, got {len(moves)}")
        checked, t_0s = [], {}
        for key, value in moves.items():
            entry = self.table.get(key)
            ends = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(ends) not in (1, 2):
                raise UserError(f"{entry.name}: give one distance or [start, end], got {_shown(value)}")
            start, end = (real_number(v, f"the distance of {entry.name}") for v in (ends[0], ends[-1]))
            checked.append(Move(entry.name, start, end))
            t_0s[entry.t_0] = entry.key
        if len(t_0s) > 1:
            raise UserError(f"the attributes moved together must share one t_0, got {', '.join(t_0s.values())}")
        return tuple(checked), next(iter(t_0s))

    def request(self, moves, space="both", hold=(), steps=None, seed=1234, eta=None, align=None, unit="absolute",
                k=1, grid=False, region=None, feather=2.0, region_h="cells") -> AppRequest:
        """An ``AppRequest`` from what the page or an API client sent: each argument's type parsed
        here (UserError), then the request checked by the engine (``check_request``), before any
        work. moves: {attribute: value or [start, end]} (a bare name means the default t_0);
        region, feather, region_h: the part of the image the edit may change (``region``)."""
        moves, t_0 = self._moves(moves)
        steps = self.steps if steps is None else whole_number(steps, "steps")
        eta = self.engine.model.config.edit.eta if eta is None else eta  # the config's, as on the command line
        denoising = Denoising(steps, real_number(eta, "eta", 0.0), self.h_policy,
                              whole_number(seed, "seed", 0, 2 ** 63 - 1), self.bs_edit)
        edit = EditRequest(moves, denoising, whole_number(k, "K"), held=name_list(hold, "hold fixed"),
                           space=short_text(space, "space"), unit=short_text(unit, "unit"), grid=flag(grid, "grid"),
                           region=self.region(region, feather, region_h))
        return AppRequest(check_request(edit, LIMITS), t_0, None if align is None else flag(align, "align"))

    def _align(self, align: bool | None) -> bool | None:
        """The reader's alignment: None (follow the config, as the command line's default) when
        ``align`` is what the config says."""
        config = self.engine.model.config
        return None if align is None or bool(align) == bool(config.data.align_face) else bool(align)

    def prepare(self, session: Session, path: Path, align: bool | None, t_0: int) -> Prepared:
        """The upload read (the engine's reader: pixel cap, decoding, modes, alignment), or found
        in the session (the same file uploaded again is found)."""
        align = self._align(align)
        key = (sha256_file(path), align, t_0)
        self.store.use_upload(session, path)
        prepared = session.lookup(key)
        if prepared is None:
            prepared = session.keep(key, Prepared(self.engine.reader(align).read(path)))
        return prepared

    def locate(self, session: Session, path, align: bool | None = None, progress: ProgressFn | None = None) -> dict:
        """Where the image at ``path`` sits along each slider's attribute (at their t_0): {key:
        {space: v.n}} of its inverted latents (the engine's ``source_distances``). The image is
        inverted once per session (its latents kept by the engine as this session's)."""
        path = self.check_path(path)
        t_0 = self.sliders[0].t_0 if self.sliders else self.table.t_0
        with self.store.job(session) as cancel:
            stages = Stages(cancel, progress, lambda: self.count("network_calls"))
            with self.engine.session(t_0, self.n_inv_step, stages.on_call) as editor:
                stages("reading the image")
                prepared = self.prepare(session, path, align, t_0)
                if prepared.positions is None:
                    stages("inverting")
                    latents, hits = editor.invert(prepared.image[None], self.bs_invert, owner=session.number)
                    self.count("inversions", 0 if hits else 1)
                    prepared.inverted = True
                    prepared.positions = {a.key: a.description.source_distances(latents)[0]
                                          for a in self.sliders}
        return prepared.positions

    def preview(self, session: Session, path, box: str | None = None, corner: Sequence[int] | None = None,
                align: bool | None = None) -> Path:
        """The region preview of the image at ``path``: the image as the model sees it (the engine's
        reader, as the edits read it), enlarged, with ``box`` outlined and ``corner`` marked
        (``region_picture``), saved in the session's folder. No network call."""
        path = self.check_path(path)
        t_0 = self.sliders[0].t_0 if self.sliders else self.table.t_0
        prepared = self.prepare(session, path, align, t_0)
        return session.save_preview(region_picture(prepared.image, parse_box(box), corner))

    def run(self, session: Session, path, request: AppRequest, progress: ProgressFn | None = None,
            sweep: bool = False) -> Result:
        """Edit the image at ``path`` as ``request`` says (one edit: a slider move; several: a
        sweep, with the command line's grid and GIF), through the engine (``Engine.edit_one``)
        into a fresh job folder of the session. Everything is checked before any network call;
        stop ends the job at its next network call or stage (``Cancelled``)."""
        path = self.check_path(path)
        with self.store.job(session) as cancel:
            stages = Stages(cancel, progress, lambda: self.count("network_calls"))
            with self.engine.session(request.t_0, self.n_inv_step, stages.on_call) as editor:
                stages("reading the boundaries")
                description = self.engine.describe(request.edit, request.t_0, self.n_inv_step, self.table.index)
                stages("reading the image")
                prepared = self.prepare(session, path, request.align, request.t_0)
                kept = prepared.inverted
                with session.job_folder() as folder:
                    one = self.engine.edit_one(editor, prepared.image, description, folder, self.bs_invert,
                                               owner=session.number, sweep=sweep, on_stage=stages)
                prepared.inverted = True
        done = time.perf_counter()
        self.count("inversions", 0 if one.inverted_before else 1)
        self.count("sweeps" if sweep else "edits")
        info = self.details(request, description, one.source_distances, kept, one.region)
        start, editing = stages.started["start"], stages.started.get("editing", done)
        info.update(prepare_seconds=editing - start, edit_seconds=done - editing, total_seconds=done - start)
        return Result(one.original, one.reconstruction, one.edits, one.grid, one.gif, info)

    @staticmethod
    def details(request: AppRequest, description: EditDescription, source: dict, kept: bool,
                region: dict | None = None) -> dict:
        """What a result says of its edit (the page's Details, the API's ``details``); ``region``: the
        engine's record of the region (``OneEdit.region``), shown without the server's folders."""
        denoising = description.denoising
        if region is not None:
            shape = description.region
            region = {"kind": region["kind"], "box": region["box"], "coverage": region["coverage"],
                      "file": region["path"] and Path(region["path"]).name, "sha256": region["sha256"],
                      "h": shape.h, "feather": shape.feather}
        return {"attribute": ", ".join(description.attributes), "attributes": list(description.attributes),
                "t_0": request.t_0, "distances": description.distances(), "unit": request.edit.unit,
                "targets": [description.targets(k) for k in range(len(description))],
                "steps": denoising.n_test_step, "seed": denoising.seed, "eta": denoising.eta,
                "h_policy": denoising.h_policy, "spaces": list(description.spaces), "held": list(description.held),
                "cosines": {s: {"names": [*e.attributes, *e.held], "matrix": e.cosines.tolist()}
                            for s, e in description.spaces.items()},
                "source_distances": source, "inversion_cached": kept, "region": region}
