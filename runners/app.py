"""The web app, ``python main.py --serve``: Gradio wiring around ``runners.app_state.EditService``.

One model, loaded once, behind one engine (``runners.engine``); per browser tab (session) the uploaded
images inverted once each. The page has one control set: a slider per attribute (the relative unit)
that starts where the uploaded image sits along that attribute, and a hold box beside it. Moving a
slider edits with the joint move of every attribute whose slider is away from the image's own
position, the ticked ones held, the others not moved: a small nudge is a small edit. The Sweep panel
(absolute distances v.n) renders K edits (or a K x K grid of two attributes) as the command line's
labelled strip and GIF. A region box, drawn by two clicks on the region preview (or typed), confines
the slider moves and the sweep as the command line's ``--region`` does. Every edit is the engine's,
so the pixels equal the command line's for the same settings. Named endpoints for
``gradio_client``: ``/edit``, ``/edit_many``, ``/sweep`` (each with an optional region: a box's
text or an uploaded mask image) and ``/stop`` (docs/app.md).
"""
import argparse
import errno
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from runners.app_state import (KEEP_SECONDS, MAX_IMAGES_PER_SESSION, MAX_JOBS, MAX_SESSIONS, MAX_SWEEP,
                               AttributeTable, Cancelled, EditService, Result, SessionStore, box_text, flag, parse_box,
                               preview_factor, real_number, short_text)
from runners.engine import (HOLD_THRESHOLD, MOVED, REGION_H, SPACES, UNITS, BoundaryRecord, Config, Engine, EngineOptions,
                            LoadedModel, UserError, auto_span, check_steps, default_batch_size, latent_cache_root,
                            load_model, server_folder)

log = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-ui.txt"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "imgs"
MAX_UPLOAD = "50mb"          # larger uploads are refused by Gradio with a message
STOP_WAIT = 60.0             # seconds a stopping server waits for its jobs (each ends at its next network call)
STEP = 0.01                  # a slider's step (relative unit); a slider within half a step of the image is unmoved
# Command-line words in the engine's messages, and what the page calls the same thing.
PAGE_WORDS = {"drop --region": "clear the region", "--region_h": "'Region h'", "--region": "'Region'",
              "--feather": "'Feather'", "pass --align_face 0 to skip it": "untick 'Align the face' to skip it",
              "--align_face": "'Align the face'", "--n_test_step": "'Denoising steps'", "--seed": "'Seed'",
              "--eta": "'eta'", "--edit_space": "'Space'", "--condition_attr": "'Hold fixed'",
              "--edit_attr": "'Attribute'", "--edit_img_number": "'Distances K'", "--edit_unit": "the unit"}
# Small images (the digits are 16 px) are drawn large and sharp; the pixels served are the files'.
CSS = ("#original img, #reconstruction img, #edit img, #gif img, #upload img, #region-image img "
       "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated} "
       "#grid img {width: 100%; object-fit: contain}")


# ---------------------------------------------------------------------------------------- ranges and words
def slider_range(record: BoundaryRecord | None, config: Config) -> tuple[float, float]:
    """The absolute range (v.n) offered for an edit along the boundary ``record`` (an attribute's
    primary space: z, or h when only h was fitted): where the file records where its classes lie,
    the command line's ``auto`` range for that space (``auto_span``); otherwise (no summary, one
    class missing, a damaged summary: with a warning) the config's edit range."""
    span = None
    if record is not None:
        try:
            span = auto_span(record)
        except UserError as exc:
            if record.class_summary is not None:
                log.warning("%s; its slider takes the config's range", exc)
    if span is None:
        span = float(config.edit.start_distance), float(config.edit.end_distance)
    lo, hi = sorted((round(span[0], 2), round(span[1], 2)))
    return (lo - 1.0, hi + 1.0) if lo == hi else (lo, hi)


def relative_range(scale: tuple[float, float], absolute: tuple[float, float]) -> tuple[float, float]:
    """A slider's range in the relative unit: the ``absolute`` range (``slider_range``) through the
    relative ``scale`` (centre, half) of the same space, on the slider's step."""
    centre, half = scale
    lo, hi = sorted(round((v - centre) / half, 2) for v in absolute)
    return (lo - 1.0, hi + 1.0) if lo == hi else (lo, hi)


def entanglement_warning(names: list[str], cosines: dict, threshold: float = HOLD_THRESHOLD) -> str | None:
    """A plain warning naming each pair of attributes whose normals have |cos| at or above
    ``threshold`` (the engine's hold threshold, the command line's rule) in some space, or None."""
    pairs = [f"{names[i]} and {names[j]} ({space}: cos {matrix[i][j]:+.2f})"
             for space, matrix in cosines.items() for i in range(len(names)) for j in range(i + 1, len(names))
             if abs(matrix[i][j]) >= threshold]
    if not pairs:
        return None
    return ("Warning: entangled attributes: " + "; ".join(pairs) + ". Moving one moves the other along, unless the "
            "other is held or moved too (the joint move sets both).")


def cosine_view(names: list[str], cosines: dict, threshold: float = HOLD_THRESHOLD) -> str:
    """Markdown: per space the cosine table of the attributes' normals, and the entanglement warning."""
    parts = []
    for space, matrix in cosines.items():
        rows = [f"| {space} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        rows += [f"| {a} | " + " | ".join(f"{matrix[i][j]:+.2f}" for j in range(len(names))) + " |"
                 for i, a in enumerate(names)]
        parts.append("\n".join(rows))
    warning = entanglement_warning(names, cosines, threshold)
    return "**Cosines of the normals**\n\n" + "\n\n".join(parts) + "\n\n" + (
        warning or f"No pair at |cos| {threshold:g} or above: each slider moves its own attribute.")


def page_message(message: str, hidden: Path) -> str:
    """An error message as the page shows it: on one line, without the server's folder ``hidden``,
    with the page's names for what the command line calls by its flags, and without the clauses
    that tell a command-line user what to run."""
    message = re.sub(re.escape(str(hidden)) + r"\S*/", "", " ".join(message.split()))
    for words, page in PAGE_WORDS.items():
        message = message.replace(words, page)
    first, *rest = message.split("; ")
    return "; ".join([first, *(part for part in rest if "--" not in part)])


# ---------------------------------------------------------------------------------------- serving
def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    """What to tell the user who binds the app to ``host``: None for the loopback interface."""
    if is_loopback(host):
        return None
    return (f"warning: serving on {host}: the app has no authentication; anyone who can reach this address "
            "can use it (and this machine's CPU or GPU)")


def check_address(host: str, port: int) -> str:
    """That the app can listen on ``host``:``port`` (before the model loads), as the name Gradio
    takes (an IPv6 address in brackets); UserError naming --host or --port otherwise."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in [1, 65535], got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host}: not an address or a known host name ({exc})") from None
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use: choose another with --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"cannot serve on {host}: it is not an address of this machine; choose another with "
                            "--host") from None
        raise UserError(f"cannot serve on {host} port {port} ({exc.strerror or exc}); choose another --host or "
                        "--port") from None
    return f"[{address[0]}]" if family == socket.AF_INET6 else host


class NotAnUpload:
    """What an API client sent where an image upload belongs (a list, a number): refused by
    ``EditService.check_path`` with a message."""

    def __init__(self, sent):
        self.sent = sent

    def __repr__(self) -> str:
        return self.sent  # already its repr


def _upload_model(gr):
    """Gradio's data model of an image upload, taking anything: what is not a file object comes to
    the app as ``NotAnUpload`` (so that it gets a message, not a validation traceback)."""
    from gradio.data_classes import ImageData
    from pydantic import model_validator

    class AnyUpload(ImageData):
        not_a_file: str | None = None  # what was sent instead of a file object (cut short)

        @model_validator(mode="before")
        @classmethod
        def _anything(cls, data):
            if isinstance(data, dict) and isinstance(data.get("path"), str):
                return data
            return {"path": "", "meta": {"_type": "gradio.FileData"}, "not_a_file": repr(data)[:60]}

    return AnyUpload


def _upload_path(payload):
    """The image component's value as the app takes it: the path of Gradio's stored copy,
    undecoded (the app decodes it with the command line's checks), or ``NotAnUpload``."""
    if payload is None:
        return None
    return NotAnUpload(payload.not_a_file) if payload.not_a_file is not None else payload.path


def _region_model(gr):
    """The data model of the API's region: an uploaded mask image (a file object), or anything else,
    kept as sent (text is a box; the rest gets the app's message)."""
    from gradio.data_classes import FileData
    from pydantic import model_validator

    class AnyRegion(FileData):
        sent: Any = None  # what was sent instead of a file object

        @model_validator(mode="before")
        @classmethod
        def _anything(cls, data):
            if isinstance(data, dict) and isinstance(data.get("path"), str):  # its path is the app's to check
                return {**data, "meta": {"_type": "gradio.FileData"}}
            return {"path": "", "meta": {"_type": "gradio.FileData"}, "sent": data}

    return AnyRegion


def _region_value(payload):
    """The API's region as the app takes it: None, the text sent (a box), the ``Path`` of Gradio's
    stored copy of an uploaded mask image, or ``NotAnUpload`` (a list, a number, ...)."""
    if payload is None or payload.sent is None and not payload.path:
        return None
    if payload.path:
        return Path(payload.path)
    return payload.sent if isinstance(payload.sent, str) else NotAnUpload(repr(payload.sent)[:60])


def _gradio():
    """Gradio, or a UserError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    try:
        import gradio
    except ImportError:
        raise UserError(f"the web app needs Gradio: {INSTALL}") from None
    return gradio


def _session_id(request) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"


# ---------------------------------------------------------------------------------------- the app
class WebApp:
    """The Gradio app on one loaded model. Its temporary files (Gradio's copies of uploads, the
    sessions' output folders, which Gradio serves from where they are) live in one folder that
    ``close`` removes (as does a failed start); a folder left by a server killed with SIGKILL is
    removed by the next start."""

    def __init__(self, model: LoadedModel, boundary_dir: Path, t_0: int | None = None, n_inv_step: int | None = None,
                 batch_sizes: tuple[int, int] = (8, 8), cache_root: Path | None = None, concurrency: int = 1,
                 max_sessions: int = MAX_SESSIONS, max_images: int = MAX_IMAGES_PER_SESSION,
                 attribute: str | None = None, n_test_step: int | None = None, h_policy: str = "lagged",
                 keep_seconds: float = KEEP_SECONDS, max_jobs: int = MAX_JOBS):
        """t_0: only the boundaries of that mixing step (else every one; a bare name means the
        config's); attribute: the one the page opens on (default: the config's edit.attribute);
        n_test_step, h_policy: the page's default denoising (--n_test_step, --h_policy)."""
        gr = self.gr = _gradio()
        config = self.config = model.config
        self.concurrency, self._closed = concurrency, False
        default_t_0 = t_0 if t_0 is not None else config.edit.t_0
        n_inv_step = check_steps(n_inv_step if n_inv_step is not None else config.edit.n_inv_step, default_t_0,
                                 "--n_inv_step")
        steps = check_steps(n_test_step if n_test_step is not None else config.edit.n_test_step, default_t_0)
        self.engine = Engine(model, EngineOptions(cache_root=cache_root, show_progress=False,
                                                  recent_images=max_sessions * max_images, per_owner=max_images))
        self.table = AttributeTable(self.engine, self.engine.boundary_index(Path(boundary_dir)), n_inv_step,
                                    default_t_0, t_0)
        if not len(self.table):
            raise UserError(f"no boundary in {boundary_dir} can be used with config {config.name}"
                            f"{f' at t_0 {t_0}' if t_0 is not None else ''} and this checkpoint (see the warnings "
                            "above); run --boundary_search first or pass --boundary_dir")
        self.opening = self._opening(attribute, boundary_dir)
        self.sliders = self.table.sliders(self.opening)
        self.ranges = {key: slider_range(entry.primary, config) for key, entry in self.table.entries.items()}
        self.root = server_folder("boundarydiffusion-app")
        self._previous_temp = os.environ.get("GRADIO_TEMP_DIR")
        try:
            uploads = self.root / "gradio"
            os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # Gradio's copies, removed with the rest
            forget = self.engine.recent.forget_owner if self.engine.recent is not None else None
            # The outputs inside Gradio's folder: it serves them without copies of its own.
            self.store = SessionStore(uploads / "sessions", max_sessions, max_images, upload_root=uploads,
                                      keep_seconds=keep_seconds, max_jobs=max_jobs, on_forget=forget)
            self.service = EditService(self.engine, self.table, self.store, n_inv_step, batch_sizes, steps, h_policy,
                                       allowed_roots=[uploads, EXAMPLES], sliders=self.sliders)
            self.blocks = self._build(gr)
        except BaseException:
            self._remove_folder()
            raise
        self.url: str | None = None

    def _opening(self, attribute: str | None, boundary_dir: Path) -> str:
        """The key the page opens on: ``attribute`` (an unknown one is refused), else the config's
        edit.attribute when offered, else the first attribute."""
        key = self.table.default(attribute or self.config.edit.attribute or None)
        if key is None and attribute:
            raise UserError(f"--edit_attr {attribute}: no usable boundary of it in {boundary_dir} "
                            f"(attributes: {', '.join(self.table.entries)})")
        return key or self.table.default()

    # ---------------------------------------------------------------- the work of one event
    def _run(self, request, progress, work):
        """One event's work, ``work(session, report)``: every failure becomes a message in the page
        (a bad request, stop) or an internal error (a bug; its traceback in the log), and the
        server keeps serving."""
        gr = self.gr

        def report(done: int, total: int, stage: str) -> None:
            progress((done, total), desc=stage, unit="network calls")

        try:
            return work(self.store.get(_session_id(request)), report)
        except Cancelled:
            raise gr.Error("Stopped.", print_exception=False) from None
        except (UserError, OSError) as exc:  # the server's folders are not named to the client
            raise gr.Error(page_message(str(exc), self.root) or type(exc).__name__, print_exception=False) from None
        except Exception as exc:
            log.exception("edit failed")
            raise gr.Error(f"internal error: {type(exc).__name__}: {page_message(str(exc), self.root)}",
                           print_exception=False) from None

    def edit(self, session, report, image, attribute, distance, space, hold, steps, seed, eta, align, region=None,
             feather=2.0, region_h="cells") -> tuple:
        """/edit: one attribute at an absolute distance (within ``region``, if any)."""
        key = self.table.get(attribute).key  # an unknown name before the distance is looked at
        request = self.service.request({key: distance}, space, hold, steps, seed, eta, align, region=region,
                                       feather=feather, region_h=region_h)
        return self._shown_edit(self.service.run(session, image, request, report))

    def edit_many(self, session, report, image, moves, space, hold, steps, seed, eta, align, unit, region=None,
                  feather=2.0, region_h="cells") -> tuple:
        """/edit_many: several attributes at once ({attribute: distance}, the joint move)."""
        request = self.service.request(moves, space, hold, steps, seed, eta, align, unit, region=region,
                                       feather=feather, region_h=region_h)
        return self._shown_edit(self.service.run(session, image, request, report))

    def sweep(self, session, report, image, attribute, k, start, end, space, hold, steps, seed, eta, align,
              second, second_start, second_end, region=None, feather=2.0, region_h="cells") -> tuple:
        """/sweep: K absolute distances of one attribute, or with ``second`` a K x K grid of two."""
        moves = {self.table.get(attribute).key: [start, end]}
        second = "" if second is None else short_text(second, "the second attribute")
        if second:
            moves[self.table.get(second).key] = [second_start, second_end]
        request = self.service.request(moves, space, hold, steps, seed, eta, align, k=k, grid=bool(second),
                                       region=region, feather=feather, region_h=region_h)
        result = self.service.run(session, image, request, report, sweep=True)
        shown = [result.grid, result.gif, result.original, result.reconstruction, *result.edits]
        return str(result.grid), str(result.gif), self._caption(result), result.info, [str(p) for p in shown]

    def slider_edit(self, session, report, image, space, steps, seed, eta, align, values, holds, region=None,
                    feather=2.0, region_h="cells") -> tuple:
        """A slider moved: the joint move of every slider away from the image's own position, by as
        much as it was moved (the shift unit: from where the image is, in z and in h alike), the
        ticked attributes held, the others not moved; within the page's region box."""
        shown = self.positions_shown(self.service.locate(session, image, align, report), space)
        held, moves = [], {}
        for entry, value, hold in zip(self.sliders, values, holds):
            value = real_number(value, f"the slider of {entry.name}")
            if flag(hold, f"the hold box of {entry.name}"):
                held.append(entry.name)
            elif abs(value - shown[entry.key]) > STEP / 2:
                moves[entry.key] = round(value - shown[entry.key], 2)  # on the slider's step, as shown
        if not moves:
            raise UserError("every slider is at the image's own position (or held): move one to edit")
        request = self.service.request(moves, space, held, steps, seed, eta, align, "shift", region=region,
                                       feather=feather, region_h=region_h)
        result = self.service.run(session, image, request, report)
        names = next(iter(result.info["cosines"].values()))["names"]
        return (*self._shown_edit(result),
                cosine_view(names, {s: c["matrix"] for s, c in result.info["cosines"].items()}))

    def locate(self, session, report, image, space, align) -> tuple:
        """The image changed: every slider set to where the image sits (``positions_shown``), its
        range widened to hold it; without an image the sliders wait (not interactive)."""
        gr = self.gr
        if image is None:
            return (*(gr.Slider(interactive=False) for _ in self.sliders),
                    "Upload an image (or pick an example): the sliders then show where it sits.")
        positions = self.service.locate(session, image, align, report)
        shown = self.positions_shown(positions, space)
        updates = []
        for entry in self.sliders:
            lo, hi = self.slider_bounds(entry)
            value = shown[entry.key]
            updates.append(gr.Slider(minimum=min(lo, value), maximum=max(hi, value), value=value, interactive=True))
        return (*updates, self.where(positions))

    def back(self, session, report, image, space, align) -> tuple:
        """Every slider back to the image's own position, every hold box cleared."""
        return (*self.locate(session, report, image, space, align)[:-1],
                *(self.gr.Checkbox(value=False) for _ in self.sliders))

    # ---------------------------------------------------------------- the region on the page
    def region_view(self, session, image, box, corner, align) -> tuple:
        """The region preview (the image as the model sees it, the box outlined, a first corner
        marked) and the line under it. No image (or one that cannot be read: the sliders' event
        says why): no preview."""
        if image is None:
            return None, "Upload an image, then click two corners on it to edit only that box."
        try:
            preview = self.service.preview(session, image, box, corner, align)
        except (UserError, Cancelled):
            return None, ""
        found = parse_box(box)
        if corner is not None:
            line = f"First corner at pixel ({corner[0]}, {corner[1]}): click the opposite corner."
        elif found is not None:
            x0, y0, x1, y1 = found
            line = (f"Region: box {box.strip()}, {(x1 - x0) * (y1 - y0):.1%} of the image: the edits change only "
                    "this box (beyond the feather the image stays the reconstruction). Clear it for the whole image.")
        elif box and box.strip():
            line = "Not a box x0,y0,x1,y1 (fractions of the image, x0 < x1, y0 < y1): the edits will say why."
        else:
            line = "Region: the whole image. Click two corners on the image to edit only that box."
        return str(preview), line

    def region_click(self, session, image, box, corner, align, index) -> tuple:
        """A click on the preview at ``index`` (its pixel [x, y]): the first click marks a corner,
        the second makes the box of the two (the model pixels clicked and those between)."""
        size = self.config.data.image_size
        f = preview_factor(size)
        pixel = [min(max(int(v) // f, 0), size - 1) for v in index]
        corner, box = (pixel, box) if corner is None else (None, box_text(corner, pixel, size))
        return (box, corner, *self.region_view(session, image, box, corner, align))

    # ---------------------------------------------------------------- positions
    def slider_bounds(self, entry) -> tuple[float, float]:
        scale = entry.scale(entry.primary_space)
        return relative_range(scale, self.ranges[entry.key])

    def positions_shown(self, positions: dict, space) -> dict[str, float]:
        """{key: the image's position in the relative unit, on the slider's step}: in the first
        space the edit moves (z for ``both`` and ``z``, h for ``h``; an attribute fitted in one
        space only, that one)."""
        shown = {}
        for entry in self.sliders:
            spaces = positions[entry.key]
            s = space if space in spaces else next(x for x in SPACES if x in spaces)
            centre, half = entry.scale(s)
            shown[entry.key] = round((spaces[s] - centre) / half, 2)
        return shown

    def where(self, positions: dict) -> str:
        """Markdown: where the image sits along each slider's attribute, in each space (relative unit)."""
        rows = []
        for entry in self.sliders:
            values = ", ".join(f"{s} {(d - entry.scale(s)[0]) / entry.scale(s)[1]:+.2f}"
                               for s, d in positions[entry.key].items())
            rows.append(f"{entry.name} ({values})")
        return "The image sits at (relative unit): " + "; ".join(rows) + "."

    # ---------------------------------------------------------------- what a result shows
    def _shown_edit(self, result: Result) -> tuple:
        """An edit's outputs: the edit, the original, the reconstruction, the caption, the details, the files."""
        shown = [result.original, result.reconstruction, *result.edits]
        return (str(result.edits[0]), str(result.original), str(result.reconstruction), self._caption(result),
                result.info, [str(p) for p in shown])

    def _caption(self, result: Result) -> str:
        i = result.info
        single = len(i["attributes"]) == 1
        source = ", ".join(f"{s}.n = {v:+.2f}" if single else
                           f"{s}: " + ", ".join(f"{a} {d:+.2f}" for a, d in v.items())
                           for s, v in i["source_distances"].items())
        held = f"; {', '.join(i['held'])} held" if i["held"] else ""
        how = "inversion kept from before" if i["inversion_cached"] else "inverted for this session"
        names = next(iter(i["cosines"].values()))["names"]  # moved then held, the same in every space
        warning = entanglement_warning(names, {s: c["matrix"] for s, c in i["cosines"].items()})
        warning = f" {warning}" if warning else ""
        region = i.get("region")
        region = "" if region is None else (
            f" Region: {'box ' + ','.join(f'{v:g}' for v in region['box']) if region['box'] else region['file']}, "
            f"{region['coverage']:.1%} of the image (h {region['h']}, feather {region['feather']:g} px).")
        reached = "" if len(i["targets"]) != 1 else " Set: " + "; ".join(
            f"{a} " + ", ".join(f"{s} {v:+.2f}" for s, v in per_space.items())
            for a, per_space in i["targets"][0].items()) + " (v.n)."
        return (f"**{i['attribute']}** at t_0 {i['t_0']} in {' and '.join(i['spaces'])}{held}: "
                f"{len(i['targets'])} edit(s), {i['steps']} steps, seed {i['seed']}, eta {i['eta']:g}, "
                f"h policy {i['h_policy']}.{region}{reached} Unedited: {source}. {how}; edit {i['edit_seconds']:.2f} s, "
                f"total {i['total_seconds']:.2f} s.{warning}")

    # ---------------------------------------------------------------- layout
    def _build(self, gr):
        with gr.Blocks(title="BoundaryDiffusion", delete_cache=(600, 1800)) as blocks:
            gr.Markdown(f"## BoundaryDiffusion: edit along a boundary\nModel **{self.config.name}**. Upload an "
                        "image (or pick an example): each attribute slider then shows where the image sits along its "
                        "attribute; move one to edit from there. Each image is inverted once; a move denoises only "
                        "that edit.")
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    page = self._controls(gr)
                with gr.Column(scale=2):
                    page.update(self._edit_outputs(gr))
                    page.update(self._slider_panel(gr))
                    page.update(self._sweep_outputs(gr))
            page.update(self._api_inputs(gr))
            c = SimpleNamespace(**page)
            for component in (*c.sliders, *c.holds, c.space, c.steps, c.seed, c.eta, c.align, c.attribute, c.k,
                              c.start, c.end, c.second, c.second_start, c.second_end, c.api_attribute, c.distance,
                              c.hold, c.many, c.unit, c.region_box, c.feather, c.region_h):
                # What is sent reaches the app as it is, to be checked there with its own messages
                # (Gradio's checks end a string for a number in an empty error and a traceback,
                # and round 2.5 steps to 2).
                component.preprocess = lambda payload: payload
            c.api_region.preprocess, c.api_region.data_model = _region_value, _region_model(gr)
            self._wire(gr, blocks, c)
            self._wire_region(gr, c)
        blocks.queue(default_concurrency_limit=self.concurrency)
        return blocks

    def _controls(self, gr) -> dict:
        image = gr.Image(label="Image", type="filepath", sources=["upload"], elem_id="upload", height=220)
        # The upload reaches the app as Gradio's stored copy, undecoded: the app decodes it itself
        # with the command line's checks. (An instance attribute, not a subclass: Gradio writes a
        # .pyi stub beside any Image subclass.)
        image.preprocess = _upload_path
        image.data_model = _upload_model(gr)  # anything sent gets the app's message
        examples = sorted(p for p in EXAMPLES.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[image], label="Examples")
        page = self._region_panel(gr)
        with gr.Row():
            back = gr.Button("Back to the image", elem_id="back-button", size="sm")
            stop = gr.Button("Stop", variant="stop", elem_id="stop-button", size="sm")
        where = gr.Markdown("Upload an image (or pick an example): the sliders then show where it sits.",
                            elem_id="positions")
        page.update(image=image, back=back, stop=stop, where=where)
        page.update(self._settings(gr))
        page.update(self._sweep_panel(gr))
        return page

    def _region_panel(self, gr) -> dict:
        """The region: the image as the model sees it, on which two clicks draw a box (outlined in
        yellow), the box as text (typed, or set by the clicks), and a button that clears it."""
        with gr.Group():
            view = gr.Image(label="Region: click two corners", type="filepath", interactive=False,
                            elem_id="region-image", height=220, buttons=[])
            box = gr.Textbox("", label="Region box x0,y0,x1,y1 (fractions of the image; empty: the whole image)",
                             elem_id="region-box", max_lines=1)
            note = gr.Markdown("Upload an image, then click two corners on it to edit only that box.",
                               elem_id="region-note")
            clear = gr.Button("Clear region", elem_id="clear-region", size="sm")
        return {"region_view": view, "region_box": box, "region_note": note, "clear_region": clear,
                "corner": gr.State(None)}

    def _slider_panel(self, gr) -> dict:
        t_0 = self.sliders[0].t_0 if self.sliders else self.table.t_0
        gr.Markdown(f"### Attributes at t_0 {t_0}\nEach slider shows where the image sits along its attribute, "
                    "in the relative unit (-1 and +1 at the boundary's class medians; z's position, h's with "
                    "Space h). Moving one edits: every slider away from the image's position sets its attribute "
                    "there, together (the joint move); a ticked attribute is held where the image has it; the "
                    "others are not moved.")
        sliders, holds, half = [], [], -(-len(self.sliders) // 2)
        with gr.Row():
            for part in (self.sliders[:half], self.sliders[half:]):
                with gr.Column(min_width=280):
                    for entry in part:
                        element = re.sub(r"[^A-Za-z0-9_-]", "_", entry.name)
                        lo, hi = self.slider_bounds(entry)
                        with gr.Row(equal_height=True):
                            sliders.append(gr.Slider(lo, hi, value=round((lo + hi) / 2, 2), step=STEP,
                                                     label=entry.name, interactive=False, elem_id=f"joint-{element}",
                                                     scale=4))
                            holds.append(gr.Checkbox(False, label="hold", elem_id=f"hold-{element}", scale=1,
                                                     min_width=60))
        cosines = gr.Markdown("The cosines of the moved and held attributes' normals appear here after a move.",
                              elem_id="cosines")
        return {"sliders": sliders, "holds": holds, "cosines": cosines}

    def _settings(self, gr) -> dict:
        config = self.config
        t_max = max(a.t_0 for a in self.table.entries.values()) + 1  # each attribute's own limit is the engine's
        with gr.Accordion("Settings", open=False):
            space = gr.Radio(list(MOVED), value="both", label="Space (latents moved)")
            steps = gr.Slider(2, t_max, value=self.service.steps, step=1, label="Denoising steps",
                              info=f"fewer for a quick preview; {self.service.steps} for the result")
            with gr.Row():
                seed = gr.Number(1234, precision=0, label="Seed", minimum=0)
                eta = gr.Number(self.config.edit.eta, label="eta", minimum=0)
            align = gr.Checkbox(bool(config.data.align_face), label="Align the face (face extra)",
                                visible=bool(config.data.align_face))
            with gr.Row():
                feather = gr.Number(2.0, label="Feather (pixels)", minimum=0, elem_id="feather",
                                    info="with a region: where the edit fades into the kept outside")
                region_h = gr.Radio(list(REGION_H), value="cells", label="Region h", elem_id="region-h",
                                    info="with a region: h confined to the region's share of each cell, or not moved")
        return {"space": space, "steps": steps, "seed": seed, "eta": eta, "align": align, "feather": feather,
                "region_h": region_h}

    def _sweep_panel(self, gr) -> dict:
        lo, hi = self.ranges[self.opening]
        with gr.Accordion("Sweep (absolute distances v.n)", open=False):
            attribute = gr.Dropdown(self.table.choices(), value=self.opening, label="Attribute", elem_id="attribute")
            k = gr.Slider(1, MAX_SWEEP, value=self.config.edit.edit_img_number, step=1, label="Distances K")
            with gr.Row():
                start, end = gr.Number(lo, label="From"), gr.Number(hi, label="To")
            second = gr.Dropdown([("none", "")] + self.table.choices(), value="", label="Second attribute",
                                 info="a K x K grid of the two (the command line's --grid)", elem_id="second")
            with gr.Row():
                second_start, second_end = gr.Number(lo, label="Second from"), gr.Number(hi, label="Second to")
            sweep = gr.Button("Sweep", elem_id="sweep-button")
        return {"attribute": attribute, "k": k, "start": start, "end": end, "second": second,
                "second_start": second_start, "second_end": second_end, "sweep": sweep}

    def _edit_outputs(self, gr) -> dict:
        with gr.Row():
            original = gr.Image(label="Original", type="filepath", interactive=False, elem_id="original", height=220)
            reconstruction = gr.Image(label="Reconstruction", type="filepath", interactive=False,
                                      elem_id="reconstruction", height=220)
            edited = gr.Image(label="Edit", type="filepath", interactive=False, elem_id="edit", height=220)
        caption = gr.Markdown(label="Caption", elem_id="caption")
        return {"original": original, "reconstruction": reconstruction, "edited": edited, "caption": caption}

    def _sweep_outputs(self, gr) -> dict:
        with gr.Row():
            grid = gr.Image(label="Sweep: labelled strip", show_label=False, type="filepath", interactive=False,
                            elem_id="grid", scale=4)
            gif = gr.Image(label="Sweep: GIF", type="filepath", interactive=False, elem_id="gif", height=160, scale=1,
                           min_width=120)
        sweep_caption = gr.Markdown(elem_id="sweep-caption")
        files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="files", height=180)
        with gr.Accordion("Details", open=False):
            details = gr.JSON(label="Details", show_label=False)
        return {"grid": grid, "gif": gif, "sweep_caption": sweep_caption, "files": files, "details": details}

    def _api_inputs(self, gr) -> dict:
        """The API's own inputs, with no control on the page: /edit's attribute and distance, the
        held attributes of /edit, /edit_many and /sweep, /edit_many's moves and unit, and the region
        (a box's text or an uploaded mask image)."""
        return {"api_attribute": gr.Textbox(self.opening, visible=False), "distance": gr.Number(0.0, visible=False),
                "hold": gr.Dropdown(sorted({a.name for a in self.table.entries.values()}, key=str.lower), value=[],
                                    multiselect=True, allow_custom_value=True, visible=False),
                "many": gr.JSON(visible=False), "unit": gr.Radio(list(UNITS), value="absolute", visible=False),
                "api_region": gr.File(None, visible=False),
                "edit_button": gr.Button(visible=False), "many_button": gr.Button(visible=False),
                "sweep_button": gr.Button(visible=False)}

    def _wire(self, gr, blocks, c) -> None:
        fn = self._handlers(gr)
        work = {"concurrency_limit": self.concurrency, "concurrency_id": "model"}
        private = {"api_visibility": "private", "trigger_mode": "always_last", **work}
        settings = [c.space, c.steps, c.seed, c.eta, c.align]
        shown = [c.edited, c.original, c.reconstruction, c.caption, c.details, c.files]
        swept = [c.grid, c.gif, c.sweep_caption, c.details, c.files]
        api_region, page_region = [c.api_region, c.feather, c.region_h], [c.region_box, c.feather, c.region_h]
        sweep_inputs = [c.image, c.attribute, c.k, c.start, c.end, c.space, c.hold, *settings[1:], c.second,
                        c.second_start, c.second_end]
        events = [
            c.edit_button.click(fn.edit, [c.image, c.api_attribute, c.distance, c.space, c.hold, *settings[1:],
                                          *api_region], shown, api_name="edit", **work),
            c.many_button.click(fn.edit_many, [c.image, c.many, c.space, c.hold, *settings[1:], c.unit, *api_region],
                                shown, api_name="edit_many", **work),
            c.sweep_button.click(fn.sweep, [*sweep_inputs, *api_region], swept, api_name="sweep", **work),
            c.sweep.click(fn.page_sweep, [*sweep_inputs[:6], *sweep_inputs[7:], *page_region, *c.holds], swept,
                          **private),
            c.image.change(fn.locate, [c.image, c.space, c.align], [*c.sliders, c.where], **private),
            c.space.change(fn.locate, [c.image, c.space, c.align], [*c.sliders, c.where], **private),
            c.back.click(fn.back, [c.image, c.space, c.align], [*c.sliders, *c.holds], **private),
            *(slider.input(fn.slider_edit, [c.image, *settings, *page_region, *c.sliders, *c.holds],
                           [*shown, c.cosines], **private) for slider in c.sliders)]
        c.attribute.change(fn.attribute_changed, [c.attribute], [c.start, c.end], api_visibility="private")
        c.stop.click(fn.stop, None, None, cancels=events, queue=False, api_name="stop")
        blocks.unload(fn.unload)

    def _handlers(self, gr) -> SimpleNamespace:
        """The functions Gradio calls: each names ``gr.Request`` and ``gr.Progress`` among its
        positional parameters (how Gradio finds them) and hands the work to a method (``_run``)."""
        n = len(self.sliders)

        def edit(image, attribute, distance, space, hold, steps, seed, eta, align, region=None, feather=2.0,
                 region_h="cells", request: gr.Request = None, progress=gr.Progress()):
            return self._run(request, progress, lambda s, r: self.edit(s, r, image, attribute, distance, space, hold,
                                                                       steps, seed, eta, align, region, feather,
                                                                       region_h))

        def edit_many(image, moves, space, hold, steps, seed, eta, align, unit, region=None, feather=2.0,
                      region_h="cells", request: gr.Request = None, progress=gr.Progress()):
            return self._run(request, progress, lambda s, r: self.edit_many(s, r, image, moves, space, hold, steps,
                                                                            seed, eta, align, unit, region, feather,
                                                                            region_h))

        def sweep(image, attribute, k, start, end, space, hold, steps, seed, eta, align, second, second_start,
                  second_end, region=None, feather=2.0, region_h="cells", request: gr.Request = None,
                  progress=gr.Progress()):
            return self._run(request, progress, lambda s, r: self.sweep(
                s, r, image, attribute, k, start, end, space, hold, steps, seed, eta, align, second, second_start,
                second_end, region, feather, region_h))

        def page_sweep(request: gr.Request, progress=gr.Progress(), *values):
            held = [e.name for e, h in zip(self.sliders, values[-n:]) if h is True]
            return sweep(*values[:6], held, *values[6:len(values) - n], request=request, progress=progress)

        def slider_edit(request: gr.Request, progress=gr.Progress(), *values):
            image, settings, region, rest = values[0], values[1:6], values[6:9], values[9:]
            return self._run(request, progress, lambda s, r: self.slider_edit(s, r, image, *settings, rest[:n],
                                                                              rest[n:], *region))

        def locate(image, space, align, request: gr.Request = None, progress=gr.Progress()):
            return self._run(request, progress, lambda s, r: self.locate(s, r, image, space, align))

        def back(image, space, align, request: gr.Request = None, progress=gr.Progress()):
            return self._run(request, progress, lambda s, r: self.back(s, r, image, space, align))

        def attribute_changed(attribute):
            try:
                lo, hi = self.ranges[self.table.get(attribute).key]
            except UserError as exc:
                raise gr.Error(page_message(str(exc), self.root), print_exception=False) from None
            return gr.Number(lo), gr.Number(hi)

        def stop(request: gr.Request = None):
            self.store.stop(_session_id(request))

        def unload(request: gr.Request = None):
            if request is not None:
                self.store.drop(_session_id(request))

        return SimpleNamespace(**{f.__name__: f for f in (edit, edit_many, sweep, page_sweep, slider_edit, locate,
                                                           back, attribute_changed, stop, unload)})

    def _wire_region(self, gr, c) -> None:
        """The region's events: the preview follows the image and the box (typed, clicked, cleared);
        none denoises (each reads the image with the engine's reader, no network call)."""
        light = {"api_visibility": "private", "trigger_mode": "always_last", "concurrency_limit": 4,
                 "concurrency_id": "region"}
        view = [c.region_view, c.region_note]

        def shown(request: gr.Request, image, box, corner, align):
            return self._run(request, None, lambda s, r: self.region_view(s, image, box, corner, align))

        def click(request: gr.Request, image, box, corner, align, evt: gr.SelectData):
            if evt is None or not isinstance(evt.index, (list, tuple)) or len(evt.index) != 2:
                return box, corner, *shown(request, image, box, corner, align)
            return self._run(request, None, lambda s, r: self.region_click(s, image, box, corner, align, evt.index))

        def clear(request: gr.Request, image, align):
            return "", None, *shown(request, image, "", None, align)

        c.image.change(shown, [c.image, c.region_box, c.corner, c.align], view, **light)
        c.region_box.input(shown, [c.image, c.region_box, c.corner, c.align], view, **light)
        c.region_view.select(click, [c.image, c.region_box, c.corner, c.align], [c.region_box, c.corner, *view],
                             **light)
        c.clear_region.click(clear, [c.image, c.align], [c.region_box, c.corner, *view], **light)

    # ---------------------------------------------------------------- life cycle
    def launch(self, host: str = "127.0.0.1", port: int = 7860, quiet: bool = True) -> str:
        server_name = check_address(host, port)
        warning = exposure_warning(host)
        if warning:
            print(warning, file=sys.stderr)
        try:
            self.blocks.launch(server_name=server_name, server_port=port, prevent_thread_lock=True, quiet=quiet,
                               max_file_size=MAX_UPLOAD, allowed_paths=[str(EXAMPLES)], css=CSS, ssr_mode=False,
                               show_error=False, inbrowser=False)
        except OSError:  # taken since the check (Gradio's message names its environment variable)
            raise UserError(f"cannot serve on {host} port {port}: choose another with --port or --host") from None
        self.url = self.blocks.local_url
        return self.url

    def _remove_folder(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._previous_temp is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = self._previous_temp

    def close(self) -> None:
        """Stop the work in progress and wait for it (each job ends at its next network call), then
        stop the server and remove every temporary file."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.store.close(STOP_WAIT):
                log.warning("a job did not stop within %.0f s", STOP_WAIT)
            self.blocks.close()
        finally:
            self._remove_folder()


def serve(args: argparse.Namespace, config: Config, device) -> int:
    """``python main.py --serve``: load the model once, serve the app until interrupted. Honours
    --t_0, --n_inv_step, --n_test_step (the page's default steps), --h_policy, --boundary_dir,
    --edit_attr (the attribute the page opens on), the batch sizes and the latent cache."""
    import atexit

    _gradio()  # before the model: a missing extra, a bad address or a port in use are said at once
    check_address(args.host, args.port)
    for name in ("httpx", "gradio_client"):  # no log line per request Gradio makes to itself
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    model = load_model(config, args.model_path, args.cache_dir, device, args.precision)
    default = default_batch_size(device, config.data.image_size)
    app = WebApp(model, args.boundary_dir, args.t_0, args.n_inv_step, (args.bs_train or default,
                 args.edit_batch_size or default), latent_cache_root(args.cache_dir, args.no_cache),
                 args.concurrency, attribute=args.edit_attr, n_test_step=args.n_test_step, h_policy=args.h_policy)
    atexit.register(app.close)
    try:
        url = app.launch(args.host, args.port)
        log.info("temporary files in %s", app.root)
        print(f"serving {config.name} ({len(app.table)} attribute(s)) on {url} (model and app ready in "
              f"{time.perf_counter() - start:.1f} s); Ctrl-C stops", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:  # SIGINT or SIGTERM (main.py's handlers)
        print("stopping", file=sys.stderr, flush=True)
    finally:
        # No second signal may cut the clean-up short: the jobs stop, their threads end, the
        # server closes and its folder goes; then the process exits 0.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            app.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    print("stopped", file=sys.stderr, flush=True)
    return 0
