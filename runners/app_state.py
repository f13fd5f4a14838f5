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
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
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
JOBS_KEPT = 2                # output folders a session keeps (Gradio copies what it shows)

#: (network calls done, calls in this stage, stage name), after every network call
ProgressFn = Callable[[int, int, str], None]


class Cancelled(Exception):
    """The user pressed stop: raised from the network-call hook, so the work ends at the next call."""


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
        try:
            return self.entries[key]
        except (KeyError, TypeError):
            raise UserError(f"unknown attribute {key!r} (choices: {', '.join(self.entries) or 'none'})") from None

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
        for name in held:
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
    """One browser tab (or API client): its inverted images, its stop flag and its output folders."""
    number: int                   # the server's own name for it (never the browser's session id)
    folder: Path
    max_images: int
    images: OrderedDict = field(default_factory=OrderedDict)
    running: set = field(default_factory=set)   # the stop flags of its jobs in progress
    jobs: itertools.count = field(default_factory=itertools.count)

    @contextlib.contextmanager
    def job(self) -> Iterator[threading.Event]:
        """A stop flag for one job, set by ``stop`` while the job runs."""
        flag = threading.Event()
        self.running.add(flag)
        try:
            yield flag
        finally:
            self.running.discard(flag)

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
    each keeping at most ``max_images`` inverted images: memory is bounded whatever the clients do."""

    def __init__(self, root: Path, max_sessions: int = MAX_SESSIONS, max_images: int = MAX_IMAGES_PER_SESSION):
        self.root, self.max_sessions, self.max_images = Path(root), max_sessions, max_images
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                number = next(self._numbers)
                session = Session(number, self.root / f"session{number}", self.max_images)
                self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.max_sessions:
                _, old = self._sessions.popitem(last=False)
                shutil.rmtree(old.folder, ignore_errors=True)
            return session

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
            session.stop()
            shutil.rmtree(session.folder, ignore_errors=True)

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
    """One edit or sweep, as the page or the API sends it (after the table lookup of ``attribute``)."""
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
        with self.editor(self.table.get(attribute).t_0, threading.Event(), None) as editor:
            return self.directions(editor, Request(attribute, space))

    @staticmethod
    def spaced(start: float, end: float, k: int) -> tuple[float, ...]:
        """K distances from ``start`` to ``end``, spaced as the command line spaces them."""
        if not all(map(lambda v: abs(v) < float("inf"), (start, end, end - start))):
            raise UserError(f"the sweep's range must be finite, got {start} .. {end}")
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
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.allowed_roots):
            raise UserError("the image must be uploaded (or be one of the examples)")
        return resolved

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

    def steps(self, request: Request, t_0: int) -> int:
        steps = self.config.edit.n_test_step if request.steps is None else int(request.steps)
        if not 2 <= steps <= t_0 + 1:
            raise UserError(f"steps must be in [2, {t_0 + 1}], got {steps}")
        return steps

    def plan(self, request: Request, distances: Sequence[float], t_0: int) -> EditPlan:
        if not all(torch.isfinite(torch.tensor(distances, dtype=torch.float64))):
            raise UserError("distances must be finite numbers")
        if not 0 <= request.seed < 2 ** 63:
            raise UserError(f"seed must be an integer in [0, 2**63), got {request.seed}")
        if not (request.eta >= 0 and request.eta < float("inf")):
            raise UserError(f"eta must be >= 0, got {request.eta}")
        return EditPlan(tuple(float(d) for d in distances), self.steps(request, t_0), float(request.eta),
                        "lagged", int(request.seed), self.bs_edit)

    def run(self, session: Session, path: str | Path | None, request: Request, distances: Sequence[float],
            progress: ProgressFn | None = None, sweep: bool = False) -> Result:
        """Edit the image at ``path`` to ``distances`` (one: a slider edit; several: a sweep, with the
        command line's grid and GIF). Writes the command line's files into a fresh job folder."""
        attribute = self.table.get(request.attribute)
        start = time.perf_counter()
        stage = {"name": "inverting"}
        with session.job() as cancel, self.editor(attribute.t_0, cancel, progress, stage) as editor:
            directions = self.directions(editor, request)
            plan = self.plan(request, distances, attribute.t_0)
            prepared, cached = self.prepare(session, editor, path, request.align)
            inverted = time.perf_counter()
            stage["name"] = "reconstructing"
            recon = self.reconstruction(editor, prepared, plan, directions)
            stage["name"] = "editing"
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
