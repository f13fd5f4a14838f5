"""What the web app (``runners.app``) keeps between requests, and the work each request does, without
Gradio: the attributes it offers (a server-side table, so that nothing the browser sends becomes a
path), the sessions with their inverted images (least recently used dropped past a limit), and the
edits and sweeps, done by the editing engine (``runners.editor``) exactly as the command line does
them: the same reader, inversion batch, ``EditPlan``, seed keys, reconstruction and writer.

An image is inverted once per session (and through the latent cache when it is on); an edit then
denoises only its own distance from t_0, and the reconstruction shown beside it is kept per number
of steps.
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
from runners.editor import MOVED, BoundaryChoice, Directions, EditPlan, Editor, ImageReader, restrict
from runners.outputs import SequenceWriter
from utils.core.diffusion import Inversion
from utils.core.seeds import image_key
from utils.errors import UserError
from utils.io.boundary_files import discover_boundaries, matching_boundaries

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

    def choice(self, key: str, space: str, held: Sequence[str] = ()) -> BoundaryChoice:
        """The boundary files of an edit of ``key`` in ``space`` with the attributes ``held`` fixed,
        as the command line builds them (``--edit_attr``, ``--edit_space``, ``--condition_attr``)."""
        primary = self.get(key)
        if space not in MOVED:
            raise UserError(f"unknown space {space!r} (choices: both, z, h)")
        if space == "both" and len(primary.paths) == 1:
            space = next(iter(primary.paths))  # only one space was fitted
        missing = [s for s in MOVED[space] if s not in primary.paths]
        if missing:
            raise UserError(f"{primary.name} has no {missing[0]} boundary at t_0 {primary.t_0}")
        conditions: dict[str, list[Path]] = {"z": [], "h": []}
        for name in name_list(held, "hold fixed"):
            match = [a for a in self.entries.values() if a.name.lower() == str(name).lower() and a.t_0 == primary.t_0]
            if not match:
                raise UserError(f"cannot hold {name!r} fixed: no boundary of it at t_0 {primary.t_0}")
            for s, path in match[0].paths.items():
                conditions[s].append(path)
        choice = BoundaryChoice(z=primary.paths.get("z"), h=primary.paths.get("h"),
                                conditions_z=tuple(conditions["z"]), conditions_h=tuple(conditions["h"]))
        return restrict(choice, space)


# ---------------------------------------------------------------------------------------- sessions
@dataclass
class Prepared:
    """An image as the model sees it and its inversion at one t_0, with its reconstructions."""
    image: Tensor                 # (C, S, S) in [-1, 1], as ``ImageReader.read`` returns it
    key: int                      # image_key(image): the per-image part of the edit seeds
    latents: Inversion            # (1, ...) each
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
    """One edit or sweep, its arguments checked (``EditService.request``): ``attribute`` a key of
    the table, the attributes ``held`` at most ``MAX_HELD`` distinct names."""
    attribute: str
    space: str = "both"
    held: tuple[str, ...] = ()
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
        self._readers: dict[bool | None, ImageReader] = {}
        self._directions: OrderedDict[tuple, Directions] = OrderedDict()
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
            editor = Editor(self.model, t_0, self.n_inv_step, self.cache_root, self.precision, show_progress=False)

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

    def directions_for(self, attribute: str, space: str = "both") -> Directions:
        """The checked directions of an attribute (for the slider's range)."""
        entry = self.table.get(attribute)
        with self.editor(entry.t_0, threading.Event(), None) as editor:
            return self.directions(editor, Request(entry.key, space))

    @staticmethod
    def spaced(start, end, k) -> tuple[float, ...]:
        """K (a whole number in [1, ``MAX_SWEEP``]) distances from ``start`` to ``end`` (finite),
        spaced as the command line spaces them."""
        k = whole_number(k, "K", 1, MAX_SWEEP)
        start, end = real_number(start, "the sweep's start"), real_number(end, "the sweep's end")
        if not math.isfinite(end - start):
            raise UserError(f"the sweep's range must be finite, got {start:g} .. {end:g}")
        return EditPlan.spaced(start, end, k)

    def reader(self, align: bool | None) -> ImageReader:
        with self._lock:
            if align not in self._readers:
                self._readers[align] = ImageReader.for_config(self.config, align)
            return self._readers[align]

    def directions(self, editor: Editor, request: Request) -> Directions:
        key = (request.attribute, request.space, tuple(sorted(h.lower() for h in request.held)), editor.t_0)
        with self._lock:
            found = self._directions.get(key)
        if found is None:
            found = editor.directions(self.table.choice(request.attribute, request.space, request.held))
            with self._lock:
                self._directions[key] = found
                while len(self._directions) > 32:
                    self._directions.popitem(last=False)
        return found

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

    def request(self, attribute, space="both", hold=(), steps=None, seed=1234, eta=1.0, align=None) -> Request:
        """A ``Request`` from what the page or an API client sent, every argument checked (type,
        range, a whole number where one is counted, lists bounded), the held attributes' boundary
        files looked up (not yet read): UserError before any work."""
        entry = self.table.get(attribute)
        space = short_text(space, "space")
        held = name_list(hold, "hold fixed")
        self.table.choice(entry.key, space, held)  # the space and every held name exist at this t_0
        return Request(entry.key, space, held,
                       None if steps is None else whole_number(steps, "steps", 2, entry.t_0 + 1),
                       whole_number(seed, "seed", 0, 2 ** 63 - 1), real_number(eta, "eta", 0.0),
                       None if align is None else flag(align, "align"))

    @staticmethod
    def distances(values: Sequence, bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, ...]:
        """At most ``MAX_SWEEP`` finite distances in ``bounds``."""
        if not isinstance(values, (list, tuple)) or not 1 <= len(values) <= MAX_SWEEP:
            raise UserError(f"an edit takes 1 to {MAX_SWEEP} distances")
        return tuple(real_number(v, "the distance", *bounds) for v in values)

    def align_flag(self, align: bool | None) -> bool | None:
        """The reader's alignment: None (follow the config, as the command line's default) when
        ``align`` is what the config says."""
        return None if align is None or bool(align) == bool(self.config.data.align_face) else bool(align)

    # ---------------------------------------------------------------- steps of a job
    def prepare(self, session: Session, editor: Editor, path: str | Path | None, align: bool | None) -> tuple[Prepared, bool]:
        """The upload read (pixel cap, decoding, modes, alignment) and inverted, or found in the
        session: (prepared image, whether it was found)."""
        path = self.check_path(path)
        align = self.align_flag(align)
        key = (_file_digest(path), align, editor.t_0)  # the same image uploaded again is found
        self.store.use_upload(session, path)
        found = session.lookup(key)
        if found is not None:
            return found, True
        image = self.reader(align).read(path)
        latents, _ = editor.invert(image[None], self.bs_invert)  # the command line's batch: a lone image as a pair
        self.stats["inversions"] += 1
        prepared = Prepared(image, image_key(image), latents)
        session.keep(key, prepared)
        return prepared, False

    def reconstruction(self, editor: Editor, prepared: Prepared, plan: EditPlan, directions: Directions) -> Tensor:
        key = (plan.n_test_step, directions.records["h"] is not None, plan.h_policy)
        if key not in prepared.reconstructions:
            prepared.reconstructions[key] = editor.reconstruct(prepared.latents, plan, directions)[0]
        return prepared.reconstructions[key]

    def plan(self, request: Request, distances: Sequence[float], t_0: int) -> EditPlan:
        """The command line's plan for a checked request (``request``, ``distances``)."""
        steps = self.config.edit.n_test_step if request.steps is None else request.steps
        if not 2 <= steps <= t_0 + 1:  # the config's own count at another attribute's t_0
            raise UserError(f"steps must be in [2, {t_0 + 1}], got {steps}")
        return EditPlan(self.distances(distances), steps, request.eta, "lagged", request.seed, self.bs_edit)

    def run(self, session: Session, path: str | Path | None, request: Request, distances: Sequence[float],
            progress: ProgressFn | None = None, sweep: bool = False) -> Result:
        """Edit the image at ``path`` to ``distances`` (one: a slider edit; several: a sweep, with the
        command line's grid and GIF). Writes the command line's files into a fresh job folder.
        Everything is checked before any work; stop ends the job at its next network call or stage
        (``Cancelled``)."""
        attribute = self.table.get(request.attribute)
        plan = self.plan(request, distances, attribute.t_0)
        path = self.check_path(path)
        start = time.perf_counter()
        stage = {"name": "reading the boundaries"}
        with self.store.job(session) as cancel, self.editor(attribute.t_0, cancel, progress, stage) as editor:
            def stage_ends(name: str) -> None:
                if cancel.is_set():
                    raise Cancelled("stopped")
                stage["name"] = name

            stage_ends("reading the boundaries")
            directions = self.directions(editor, request)
            stage_ends("inverting")
            prepared, cached = self.prepare(session, editor, path, request.align)
            inverted = time.perf_counter()
            stage_ends("reconstructing")
            recon = self.reconstruction(editor, prepared, plan, directions)
            stage_ends("editing")
            folder = session.job_folder()
            writer = SequenceWriter([folder], [{"original": prepared.image, "reconstruction": recon}],
                                    plan.distances, gif=sweep)
            edit_start = time.perf_counter()
            for batch in editor.edits(prepared.latents, directions, plan, [(prepared.key,)]):
                writer.add(batch, 0)
            done = time.perf_counter()
        self.stats["sweeps" if sweep else "edits"] += 1
        edits = [folder / f"edit_{k:02d}_d{d:+.2f}.png" for k, d in enumerate(plan.distances)]
        source = editor.source_distances(prepared.latents, directions)[0]
        info = {"attribute": attribute.name, "t_0": attribute.t_0, "distances": list(plan.distances),
                "steps": plan.n_test_step, "seed": plan.seed, "eta": plan.eta,
                "spaces": [s for s in ("z", "h") if directions.records[s] is not None],
                "held": [c["attribute"] for cs in directions.conditions.values() for c in cs],
                "source_distances": source, "inversion_cached": cached,
                "prepare_seconds": inverted - start, "edit_seconds": done - edit_start,
                "total_seconds": done - start}
        if not sweep:
            (folder / "grid.png").unlink(missing_ok=True)  # a one-edit strip: the page shows the three images
        return Result(folder / "original.png", folder / "reconstruction.png", edits,
                      folder / "grid.png" if sweep else None, folder / "edits.gif" if sweep else None, info)
