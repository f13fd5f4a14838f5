"""What the web app (``runners.app``) keeps between requests, and the work each request does, without
Gradio: the attributes it offers (a server-side table, so that nothing the browser sends becomes a
path), the sessions with their inverted images (least recently used dropped past a limit), and the
edits and sweeps, done by the editing engine (``runners.editor``) exactly as the command line does
them: the same reader, inversion batch, edit description (``runners.edit_description``, the one
builder of edits), seed keys, reconstruction and writer.

An image is inverted once (the engine keeps the latents of as many images as the sessions do,
``runners.editor.RecentLatents``, in front of the latent cache when it is on); an edit then
denoises only its own distance from t_0, and the reconstruction shown beside it is kept per
session and number of steps.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from torch import Tensor

from models.loading import LoadedModel
from runners.edit_description import (MAX_ATTRIBUTES, MOVED, UNITS, Denoising, EditDescription, EditRequest, Move,
                                      describe_edit, spaced)
from runners.editor import Editor, ImageReader, RecentLatents
from runners.outputs import SequenceWriter, edit_file_name
from utils.core.diffusion import Inversion
from utils.core.seeds import image_key
from utils.errors import UserError
from utils.io.boundary_files import BoundaryRecord, discover_boundaries, matching_boundaries

log = logging.getLogger(__name__)

MAX_IMAGES_PER_SESSION = 4   # inverted images a session keeps (least recently used dropped first)
MAX_SESSIONS = 16            # sessions kept at once (the least recently active one dropped first)
MAX_SWEEP = 32               # distances of one sweep
JOBS_KEPT = 2                # output folders a session keeps (Gradio serves them from where they are)
MAX_HELD = 16                # attributes one request may hold fixed
MAX_TEXT = 200               # characters of a text argument (an attribute or space name)

#: (network calls done, calls in this stage, stage name), after every network call
ProgressFn = Callable[[int, int, str], None]


class Cancelled(Exception):
    """The user pressed stop (or the server is stopping): raised from the network-call hook and
    between the stages of a job, so the work ends at the next call or stage."""


# ---------------------------------------------------------------------------------------- arguments
# What the page or an API client sends is checked here, before any work: its type, that numbers are
# whole where they count something, finite and in range, and that lists are bounded.
def _shown(value) -> str:
    """``value`` for a message: its repr, cut to a few dozen characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def whole_number(value, what: str, low: int, high: int) -> int:
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


def name_list(value, what: str, limit: int = MAX_HELD) -> tuple[str, ...]:
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


# ---------------------------------------------------------------------------------------- attributes
@dataclass(frozen=True)
class Attribute:
    """One attribute's boundaries at one t_0 (the files the command line would pick for it)."""
    key: str                      # what the page and the API send: "<attribute>@<t_0>"
    name: str
    t_0: int
    paths: dict[str, Path]        # space -> file
    test_acc: dict[str, float]    # space -> test accuracy recorded in the file

    @property
    def label(self) -> str:
        acc = ", ".join(f"{s} {self.test_acc[s]:.3f}" for s in ("z", "h") if s in self.test_acc)
        return f"{self.name} (t_0 {self.t_0}; test accuracy {acc})"


class AttributeTable:
    """The boundaries in ``boundary_dir`` that fit the model (config, latent shapes, checkpoint),
    one entry per attribute and t_0, each with the files ``discover_boundaries`` picks (the
    command line's choice for ``--edit_attr A --t_0 T``). ``t_0``: keep only that mixing step."""

    def __init__(self, boundary_dir: Path, model: LoadedModel, t_0: int | None = None):
        config, shapes = model.config, model.shapes
        self.t_0 = config.edit.t_0 if t_0 is None else t_0  # what a bare name means, as on the command line
        found = matching_boundaries(boundary_dir, config.name, t_0=t_0, checkpoint_sha256=model.checkpoint_sha256,
                                    shapes=shapes)
        pairs = sorted({(r.attribute.lower(), r.t_0) for hits in found.values() for _, r in hits})
        self.entries: dict[str, Attribute] = {}
        for name, at in pairs:
            try:
                chosen = discover_boundaries(boundary_dir, config.name, shapes, name, at)
            except UserError as exc:  # e.g. files of two checkpoints for one attribute: not offered
                log.warning("not offering %s at t_0 %d: %s", name, at, exc)
                continue
            if chosen is None:
                continue
            acc = {s: r.test_acc for hits in found.values() for p, r in hits for s in chosen.paths
                   if p == chosen.paths[s]}
            key = f"{chosen.attribute}@{at}"
            self.entries[key] = Attribute(key, chosen.attribute, at, dict(chosen.paths), acc)

    def __len__(self) -> int:
        return len(self.entries)

    def choices(self) -> list[tuple[str, str]]:
        """(label, key) for a dropdown."""
        return [(a.label, a.key) for a in self.entries.values()]

    def names(self) -> list[str]:
        return sorted({a.name for a in self.entries.values()}, key=str.lower)

    def default(self, t_0: int, name: str | None = None) -> str | None:
        """The first attribute at ``t_0`` (the config's mixing step), else the first one; of those
        named ``name`` (case-insensitive) when there are any."""
        named = [a for a in self.entries.values() if name and a.name.lower() == name.lower()] \
            or list(self.entries.values())
        keys = [a.key for a in named if a.t_0 == t_0] or [a.key for a in named]
        return keys[0] if keys else None

    def get(self, key: str) -> Attribute:
        """The attribute named ``key``: ``<attribute>@<t_0>``, or a bare name, which means the
        config's t_0 (or the one ``--t_0`` chose), as ``--edit_attr`` does; case-insensitive."""
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

    def drop(self, key: str) -> None:
        """Stop offering ``key`` (its files cannot be used)."""
        self.entries.pop(key, None)

    def at(self, t_0: int) -> list[Attribute]:
        """The attributes offered at ``t_0``, in the table's order."""
        return [a for a in self.entries.values() if a.t_0 == t_0]

    def held_paths(self, names: Sequence[str], t_0: int) -> dict[str, tuple[Path, ...]]:
        """The boundary files of the attributes ``names`` held fixed at ``t_0``, per space (the
        command line's ``--condition_attr``); UserError naming one that has none."""
        paths: dict[str, list[Path]] = {"z": [], "h": []}
        for name in names:
            match = [a for a in self.at(t_0) if a.name.lower() == str(name).lower()]
            if not match:
                raise UserError(f"cannot hold {_shown(name)} fixed: no boundary of it at t_0 {t_0}")
            for space, path in match[0].paths.items():
                paths[space].append(path)
        return {space: tuple(found) for space, found in paths.items() if found}


# ---------------------------------------------------------------------------------------- sessions
@dataclass
class Prepared:
    """An image as the model sees it, with its reconstructions at one t_0 (its latents are the
    engine's: ``runners.editor.RecentLatents``, shared by the service's editors)."""
    image: Tensor                 # (C, S, S) in [-1, 1], as ``ImageReader.read`` returns it
    key: int                      # image_key(image): the per-image part of the edit seeds
    reconstructions: dict[tuple, Tensor] = field(default_factory=dict)  # (steps, inject_h, policy) -> (C, S, S)


@dataclass
class Session:
    """One browser tab (or API client): its inverted images, its stop flags, its output folders
    (under a random name: a file is served only to whoever was sent its path) and the uploads its
    kept images came from."""
    number: int                   # the server's own name for it (never the browser's session id)
    folder: Path
    max_images: int
    images: OrderedDict = field(default_factory=OrderedDict)
    running: set = field(default_factory=set)   # the stop flags of its jobs in progress
    jobs: itertools.count = field(default_factory=itertools.count)
    uploads: OrderedDict = field(default_factory=OrderedDict)  # upload paths, least recently used first

    def stop(self) -> None:
        for flag in list(self.running):
            flag.set()

    def lookup(self, key: tuple) -> Prepared | None:
        found = self.images.get(key)
        if found is not None:
            self.images.move_to_end(key)
        return found

    def keep(self, key: tuple, prepared: Prepared) -> None:
        self.images[key] = prepared
        self.images.move_to_end(key)
        while len(self.images) > self.max_images:
            self.images.popitem(last=False)

    def job_folder(self) -> Path:
        """A fresh folder for one job's files; older ones beyond ``JOBS_KEPT`` are removed."""
        number = next(self.jobs)
        stale = self.folder / f"job{number - JOBS_KEPT}"
        if number >= JOBS_KEPT:
            shutil.rmtree(stale, ignore_errors=True)
        folder = self.folder / f"job{number}"
        folder.mkdir(parents=True)
        return folder


class SessionStore:
    """The sessions, at most ``max_sessions`` (least recently active dropped first, with its files),
    each keeping at most ``max_images`` inverted images: memory is bounded whatever the clients do.

    ``upload_root``: where the web framework stores uploads. An upload that no session's kept
    images came from any more is deleted, so that its copies do not pile up (the framework's own
    clean-up only removes files after half an hour). The store also counts the jobs in progress,
    so that ``close`` can stop them and wait for them before the server exits."""

    def __init__(self, root: Path, max_sessions: int = MAX_SESSIONS, max_images: int = MAX_IMAGES_PER_SESSION,
                 upload_root: Path | None = None):
        self.root, self.max_sessions, self.max_images = Path(root), max_sessions, max_images
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
                number = next(self._numbers)
                session = Session(number, self.root / secrets.token_hex(16), self.max_images)
                self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.max_sessions:
                _, old = self._sessions.popitem(last=False)
                self._forget(old)
            return session

    @contextlib.contextmanager
    def job(self, session: Session) -> Iterator[threading.Event]:
        """A stop flag for one job of ``session``, set by ``stop`` (or ``close``) while it runs."""
        flag = threading.Event()
        with self._jobs:
            if self._closing:
                raise Cancelled("the server is stopping")
            self._running += 1
            session.running.add(flag)
        try:
            yield flag
        finally:
            with self._jobs:
                session.running.discard(flag)
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
        """A session dropped (lock held): its work stops, its files and unshared uploads go."""
        session.stop()
        shutil.rmtree(session.folder, ignore_errors=True)
        for path in list(session.uploads):
            self._release(path, session.number)
        session.uploads.clear()

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
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Request:
    """One edit or sweep, its arguments checked (``EditService.request``): the moved attributes
    (keys of the table, all at one t_0), each with its (start, end) (equal: one value); K points
    along them (``grid``: K x K over exactly two); the space; the attributes held fixed (at most
    ``MAX_HELD`` distinct names, none of them moved); the unit of the values; the denoising."""
    moves: tuple[tuple[str, float, float], ...]
    k: int = 1
    grid: bool = False
    space: str = "both"
    held: tuple[str, ...] = ()
    unit: str = "absolute"
    steps: int | None = None      # None: the config's n_test_step
    seed: int = 1234
    eta: float = 1.0
    align: bool | None = None     # None: the config's data.align_face


@dataclass
class Result:
    original: Path
    reconstruction: Path
    edits: list[Path]
    grid: Path | None = None
    gif: Path | None = None
    info: dict = field(default_factory=dict)


class EditService:
    """The app's work on one loaded model: read an upload, invert it once per session, edit it.

    ``allowed_roots``: the folders an image may be read from (Gradio's upload folder, the bundled
    examples); anything else is refused. ``batch_sizes``: (inversion, edits), the command line's
    defaults for the device unless given, so that the pixels equal the command line's."""

    def __init__(self, model: LoadedModel, table: AttributeTable, store: SessionStore, n_inv_step: int,
                 batch_sizes: tuple[int, int], cache_root: Path | None = None, precision: str = "fp32",
                 allowed_roots: Sequence[Path] = ()):
        self.model, self.config, self.table, self.store = model, model.config, table, store
        self.n_inv_step, self.cache_root, self.precision = n_inv_step, cache_root, precision
        self.bs_invert, self.bs_edit = batch_sizes
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots]
        self.output_root = store.root.resolve()  # the sessions' outputs are never read as images
        self._idle: dict[int, list[Editor]] = {}   # per t_0, editors not in use
        # The inverted images, one store for every editor: as many as the sessions keep.
        self.recent = RecentLatents(store.max_sessions * store.max_images)
        self._readers: dict[bool | None, ImageReader] = {}
        self._lock = threading.Lock()
        self.stats = {"inversions": 0, "edits": 0, "sweeps": 0, "network_calls": 0}

    # ---------------------------------------------------------------- engine objects
    @contextlib.contextmanager
    def editor(self, t_0: int, cancel: threading.Event, progress: ProgressFn | None,
               stage: dict | None = None) -> Iterator[Editor]:
        """An editor at ``t_0`` for one job (one per concurrent job: each has its own call counter),
        its network-call hook reporting progress (with the job's ``stage["name"]``) and raising
        ``Cancelled`` once stop is pressed."""
        stage = {"name": ""} if stage is None else stage
        with self._lock:
            idle = self._idle.setdefault(t_0, [])
            editor = idle.pop() if idle else None
        if editor is None:
            if not 2 <= self.n_inv_step <= t_0 + 1:
                raise UserError(f"n_inv_step {self.n_inv_step} does not fit t_0 {t_0} (at most {t_0 + 1})")
            editor = Editor(self.model, t_0, self.n_inv_step, self.cache_root, self.precision, show_progress=False,
                            recent=self.recent)

        def on_call(done: int, total: int) -> None:
            self.stats["network_calls"] += 1
            if cancel.is_set():
                raise Cancelled("stopped")
            if progress is not None:
                progress(done, total, stage["name"])

        editor.net.on_call = on_call
        try:
            yield editor
        finally:
            editor.net.on_call = None
            with self._lock:
                self._idle[t_0].append(editor)

    def primary_record(self, attribute: str) -> BoundaryRecord:
        """The checked boundary record of an attribute's primary space (z, or h when only h was
        fitted): the one its slider's range comes from."""
        entry = self.table.get(attribute)
        space = "z" if "z" in entry.paths else "h"
        with self.editor(entry.t_0, threading.Event(), None) as editor:
            return editor.check_boundary(entry.paths[space], space, f"{entry.name} ({space})")

    @staticmethod
    def spaced(start, end, k) -> tuple[float, ...]:
        """K (a whole number in [1, ``MAX_SWEEP``]) distances from ``start`` to ``end`` (finite),
        spaced as the command line spaces them."""
        k = whole_number(k, "K", 1, MAX_SWEEP)
        start, end = real_number(start, "the sweep's start"), real_number(end, "the sweep's end")
        if not math.isfinite(end - start):
            raise UserError(f"the sweep's range must be finite, got {start:g} .. {end:g}")
        return spaced(start, end, k)

    def reader(self, align: bool | None) -> ImageReader:
        with self._lock:
            if align not in self._readers:
                self._readers[align] = ImageReader.for_config(self.config, align)
            return self._readers[align]

    def check_path(self, path: str | Path | None) -> Path:
        """``path`` if it lies in an allowed folder (Gradio's copy of an upload, a bundled example)."""
        if not path:
            raise UserError("no image: upload one or pick an example")
        if not isinstance(path, (str, Path)) or len(str(path)) > 4096:
            raise UserError(f"the image must be an uploaded file, got {_shown(path)}")
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.allowed_roots) \
                or resolved.is_relative_to(self.output_root):
            raise UserError("the image must be uploaded (or be one of the examples)")
        return resolved

    def request(self, moves, space="both", hold=(), steps=None, seed=1234, eta=1.0, align=None, unit="absolute",
                k=1, grid=False, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Request:
        """A ``Request`` from what the page or an API client sent, every argument checked (type,
        range, a whole number where one is counted, lists bounded), before any work: UserError.

        moves: {attribute: value or [start, end]} (a bare name means the config's t_0), every
        value finite and in ``bounds``; the attributes at one t_0, none also held."""
        if not isinstance(moves, dict) or not moves:
            raise UserError(f"the attributes to move must be an object {{attribute: distance}}, got {_shown(moves)}")
        if len(moves) > MAX_HELD:
            raise UserError(f"at most {MAX_HELD} attributes can be moved at once, got {len(moves)}")
        checked, t_0s = [], set()
        for name, value in moves.items():
            entry = self.table.get(name)
            ends = value if isinstance(value, (list, tuple)) else [value]
            if len(ends) not in (1, 2):
                raise UserError(f"{entry.name}: give one distance or [start, end], got {_shown(value)}")
            start, end = (real_number(v, f"the distance of {entry.name}", *bounds) for v in (ends[0], ends[-1]))
            checked.append((entry.key, start, end))
            t_0s.add(entry.t_0)
        if len(t_0s) > 1:
            raise UserError(f"the attributes moved together must share one t_0, got {', '.join(k for k, _, _ in checked)}")
        if len({key for key, _, _ in checked}) < len(checked):
            raise UserError("an attribute is named twice: give it one distance")
        t_0 = t_0s.pop()
        space = short_text(space, "space")
        if space not in MOVED:
            raise UserError(f"unknown space {_shown(space)} (choices: {', '.join(MOVED)})")
        unit = short_text(unit, "unit")
        if unit not in UNITS:
            raise UserError(f"unknown unit {_shown(unit)} (choices: {', '.join(UNITS)})")
        held = name_list(hold, "hold fixed")
        self.table.held_paths(held, t_0)  # each held name has boundaries at this t_0
        moved = {self.table.get(key).name.lower() for key, _, _ in checked}
        both = [h for h in held if h.lower() in moved]
        if both:
            raise UserError(f"{both[0]} cannot be moved and held at once")
        if len(checked) + len(held) > MAX_ATTRIBUTES:
            raise UserError(f"at most {MAX_ATTRIBUTES} attributes can be moved and held at once")
        k = whole_number(k, "K", 1, MAX_SWEEP)
        if grid and len(checked) != 2:
            raise UserError(f"a two-attribute sweep takes exactly two attributes, got {len(checked)}")
        return Request(tuple(checked), k, bool(grid), space, held, unit,
                       None if steps is None else whole_number(steps, "steps", 2, t_0 + 1),
                       whole_number(seed, "seed", 0, 2 ** 63 - 1), real_number(eta, "eta", 0.0),
                       None if align is None else flag(align, "align"))

    def align_flag(self, align: bool | None) -> bool | None:
        """The reader's alignment: None (follow the config, as the command line's default) when
        ``align`` is what the config says."""
        return None if align is None or bool(align) == bool(self.config.data.align_face) else bool(align)

    # ---------------------------------------------------------------- steps of a job
    def prepare(self, session: Session, editor: Editor, path: str | Path | None, align: bool | None
                ) -> tuple[Prepared, Inversion, bool]:
        """The upload read (pixel cap, decoding, modes, alignment), or found in the session, and its
        latents from the engine (inverted once: ``RecentLatents``, then the latent cache):
        (prepared image, latents (1, ...) each, whether they were inverted before)."""
        path = self.check_path(path)
        align = self.align_flag(align)
        key = (_file_digest(path), align, editor.t_0)  # the same image uploaded again is found
        self.store.use_upload(session, path)
        prepared = session.lookup(key)
        if prepared is None:
            image = self.reader(align).read(path)
            prepared = Prepared(image, image_key(image))
            session.keep(key, prepared)
        latents, hits = editor.invert(prepared.image[None], self.bs_invert)  # the CLI's batch: a lone image as a pair
        if not hits:
            self.stats["inversions"] += 1
        return prepared, latents, hits > 0

    def reconstruction(self, editor: Editor, prepared: Prepared, latents: Inversion,
                       description: EditDescription) -> Tensor:
        denoising = description.denoising
        key = (denoising.n_test_step, "h" in description.spaces, denoising.h_policy)
        if key not in prepared.reconstructions:
            prepared.reconstructions[key] = editor.reconstruct(latents, description)[0]
        return prepared.reconstructions[key]

    def edit_request(self, request: Request) -> EditRequest:
        """The request as the one edit builder takes it (``runners.edit_description``): each
        attribute's files from the table (nothing the browser sends becomes a path), the held
        attributes' files as the command line's ``--condition_attr`` finds them, the command
        line's denoising (its batch size, the h policy ``lagged``)."""
        entries = [self.table.get(key) for key, _, _ in request.moves]
        t_0 = entries[0].t_0
        steps = self.config.edit.n_test_step if request.steps is None else request.steps
        if not 2 <= steps <= t_0 + 1:  # the config's own count at another attribute's t_0
            raise UserError(f"steps must be in [2, {t_0 + 1}], got {steps}")
        moves = tuple(Move(entry.name, start, end, paths=dict(entry.paths))
                      for entry, (_, start, end) in zip(entries, request.moves))
        return EditRequest(moves, Denoising(steps, request.eta, "lagged", request.seed, self.bs_edit), request.k,
                           held_paths=self.table.held_paths(request.held, t_0), space=request.space,
                           unit=request.unit, grid=request.grid)

    def run(self, session: Session, path: str | Path | None, request: Request, progress: ProgressFn | None = None,
            sweep: bool = False) -> Result:
        """Edit the image at ``path`` as ``request`` says (one edit: a slider move; several: a
        sweep, with the command line's grid and GIF). Writes the command line's files into a fresh
        job folder. Everything is checked before any work; stop ends the job at its next network
        call or stage (``Cancelled``)."""
        edit_request = self.edit_request(request)
        t_0 = self.table.get(request.moves[0][0]).t_0
        path = self.check_path(path)
        start = time.perf_counter()
        stage = {"name": "reading the boundaries"}
        with self.store.job(session) as cancel, self.editor(t_0, cancel, progress, stage) as editor:
            def stage_ends(name: str) -> None:
                if cancel.is_set():
                    raise Cancelled("stopped")
                stage["name"] = name

            stage_ends("reading the boundaries")
            description = self.describe(editor, edit_request)
            stage_ends("inverting")
            prepared, latents, cached = self.prepare(session, editor, path, request.align)
            inverted = time.perf_counter()
            stage_ends("reconstructing")
            recon = self.reconstruction(editor, prepared, latents, description)
            stage_ends("editing")
            folder = session.job_folder()
            writer = SequenceWriter([folder], [{"original": prepared.image, "reconstruction": recon}], description,
                                    gif=sweep)
            edit_start = time.perf_counter()
            for batch in editor.edits(latents, description, [(prepared.key,)]):
                writer.add(batch, 0)
            done = time.perf_counter()
        self.stats["sweeps" if sweep else "edits"] += 1
        edits = [folder / edit_file_name(description, k) for k in range(len(description))]
        source = description.source_distances(latents)[0]
        info = {"attribute": ", ".join(description.attributes), "attributes": list(description.attributes),
                "t_0": t_0, "distances": description.distances(), "unit": request.unit,
                "targets": [description.targets(k) for k in range(len(description))],
                "steps": description.denoising.n_test_step, "seed": description.denoising.seed,
                "eta": description.denoising.eta, "spaces": list(description.spaces), "held": list(description.held),
                "cosines": {s: {"names": [*e.attributes, *e.held], "matrix": e.cosines.tolist()}
                            for s, e in description.spaces.items()},
                "source_distances": source, "inversion_cached": cached,
                "prepare_seconds": inverted - start, "edit_seconds": done - edit_start,
                "total_seconds": done - start}
        if not sweep:
            (folder / "grid.png").unlink(missing_ok=True)  # a one-edit strip: the page shows the three images
        return Result(folder / "original.png", folder / "reconstruction.png", edits,
                      folder / "grid.png" if sweep else None, folder / "edits.gif" if sweep else None, info)

    def describe(self, editor: Editor, edit_request: EditRequest) -> EditDescription:
        """The checked edit description (the boundary files read; a near-parallel pair refused)."""
        return describe_edit(editor, edit_request, None)
