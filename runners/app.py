"""The web app, ``python main.py --serve``: Gradio wiring around ``runners.app_state.EditService``.

One model, loaded once; per browser tab (session) the uploaded images inverted once each. Moving the
distance slider denoises that one edit from t_0; the several-attribute sliders (relative unit, hold
boxes) edit with the joint move of every non-zero one; 'Sweep' renders K distances (or a K x K grid of
two attributes) as the command line's labelled strip and GIF. Every edit is built by the one builder
(``runners.edit_description``), so the pixels equal the command line's for the same settings. Named
endpoints for ``gradio_client``: ``/edit``, ``/edit_many``, ``/sweep`` and ``/stop`` (docs/app.md).
"""
import argparse
import errno
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from models.checkpoints import default_cache_dir
from models.loading import LoadedModel
from runners.app_state import (MAX_SWEEP, AttributeTable, Cancelled, EditService, Result, SessionStore,
                               real_number)
from runners.edit_description import UNITS, auto_span, relative_scale
from utils.config import Config
from utils.errors import UserError
from utils.core.atlas import HOLD_THRESHOLD
from utils.io.atlas import load_atlas
from utils.io.boundary_files import BoundaryRecord, auto_range_problem
from utils.io.files import new_partial_folder, remove_stale_partials

log = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-ui.txt"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "imgs"
MAX_UPLOAD = "50mb"          # larger uploads are refused by Gradio with a message
MAX_MOVES_TEXT = 10_000      # characters of /edit_many's moves given as JSON text
STOP_WAIT = 60.0             # seconds a stopping server waits for its jobs (each ends at its next network call)
# Command-line words in the engine's messages, and what the page calls the same thing.
PAGE_WORDS = {"pass --align_face 0 to skip it": "untick 'Align the face' to skip it",
              "--align_face": "'Align the face'", "--n_test_step": "'Denoising steps'", "--seed": "'Seed'",
              "--eta": "'eta'", "--edit_space": "'Space'", "--condition_attr": "'Hold fixed'",
              "--edit_attr": "'Attribute'"}
# Small images (the digits are 16 px) are drawn large and sharp; the pixels served are the files'.
CSS = ("#original img, #reconstruction img, #edit img, #gif img, #upload img "
       "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated} "
       "#grid img {width: 100%; object-fit: contain}")


def slider_range(record: BoundaryRecord | None, config: Config) -> tuple[float, float]:
    """The distance slider's range for an edit along the boundary ``record`` (an attribute's primary
    space: z, or h when only h was fitted): where the file records where its classes lie, the
    command line's ``auto`` range for that space (``runners.edit_description.auto_span``);
    otherwise (no summary, one class missing, a damaged summary: with a warning) the config's edit
    range. The slider's d moves every moved space, as the command line's explicit distances do."""
    span = None
    if record is not None and record.class_summary is not None:
        problem = auto_range_problem(record)
        try:
            span = None if problem else auto_span(record)
        except UserError as exc:
            problem = str(exc)
        if problem:
            log.warning("%s; its slider takes the config's range", problem)
    if span is None:
        span = float(config.edit.start_distance), float(config.edit.end_distance)
    lo, hi = sorted((round(span[0], 2), round(span[1], 2)))
    return (lo - 1.0, hi + 1.0) if lo == hi else (lo, hi)


def relative_range(record: BoundaryRecord | None, absolute: tuple[float, float]) -> tuple[float, float]:
    """A several-attribute slider's range: the attribute's ``absolute`` range (``slider_range``) in
    its relative unit (``relative_scale``: -1 / +1 at the class medians); ``absolute`` itself when
    the file has no usable summary (the edit then takes its value as a distance, as the builder
    does)."""
    scale = None if record is None else relative_scale(record)
    if scale is None:
        return absolute
    centre, half = scale
    lo, hi = sorted(round((v - centre) / half, 2) for v in absolute)
    return (lo - 1.0, hi + 1.0) if lo == hi else (lo, hi)


def cosine_view(names: list[str], cosines: dict, threshold: float = HOLD_THRESHOLD) -> str:
    """Markdown: per space the cosine table of the attributes' normals, and a warning naming each
    pair with |cos| above ``threshold`` (moving one moves the other unless it is held)."""
    parts = []
    for space, matrix in cosines.items():
        rows = [f"| {space} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        rows += [f"| {a} | " + " | ".join(f"{matrix[i][j]:+.2f}" for j in range(len(names))) + " |"
                 for i, a in enumerate(names)]
        parts.append("\n".join(rows))
    warning = entanglement_warning(names, cosines, threshold)
    return "**Cosines of the normals**\n\n" + "\n\n".join(parts) + "\n\n" + (
        warning or f"No pair above |cos| {threshold:g}: each slider moves its own attribute.")


def entanglement_warning(names: list[str], cosines: dict, threshold: float = HOLD_THRESHOLD) -> str | None:
    """A plain warning naming each pair of attributes whose normals have |cos| above ``threshold``
    (the atlas's hold threshold) in some space, or None."""
    pairs = [f"{names[i]} and {names[j]} ({space}: cos {matrix[i][j]:+.2f})"
             for space, matrix in cosines.items() for i in range(len(names)) for j in range(i + 1, len(names))
             if abs(matrix[i][j]) > threshold]
    if not pairs:
        return None
    return ("Warning: entangled attributes: " + "; ".join(pairs) + ". Moving one moves the other along, unless the "
            "other is held or moved too (the joint move sets both).")


def atlas_threshold(boundary_dir: Path) -> float:
    """The |cos| above which two attributes are called entangled: the hold threshold of the boundary
    folder's atlas (``atlas.json``) when it has one, else the atlas's default."""
    if not (Path(boundary_dir) / "atlas.json").is_file():
        return HOLD_THRESHOLD
    try:
        threshold = float(load_atlas(boundary_dir).get("hold_threshold", HOLD_THRESHOLD))
    except (UserError, TypeError, ValueError) as exc:
        log.warning("the atlas in %s cannot be used (%s); entanglement is |cos| above %g", boundary_dir, exc,
                    HOLD_THRESHOLD)
        return HOLD_THRESHOLD
    return threshold if 0 < threshold < 1 else HOLD_THRESHOLD


def parse_moves(moves) -> dict:
    """/edit_many's moves: an object {attribute: distance}, or its JSON text (bounded)."""
    if isinstance(moves, str):
        if len(moves) > MAX_MOVES_TEXT:
            raise UserError(f"the moves must be at most {MAX_MOVES_TEXT} characters of JSON")
        try:
            moves = json.loads(moves)
        except ValueError:
            raise UserError("the moves must be a JSON object {attribute: distance}") from None
    return moves


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


def page_message(message: str, hidden: Path) -> str:
    """An error message as the page shows it: on one line, without the server's folder ``hidden``,
    and with the page's names for what the command line calls by its flags."""
    message = re.sub(re.escape(str(hidden)) + r"\S*/", "", " ".join(message.split()))
    for words, page in PAGE_WORDS.items():
        message = message.replace(words, page)
    return message


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


def _gradio():
    """Gradio, or a UserError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    try:
        import gradio
    except ImportError:
        raise UserError(f"the web app needs Gradio: {INSTALL}") from None
    return gradio


class WebApp:
    """The Gradio app on one loaded model. Its temporary files (Gradio's copies of uploads, the
    sessions' output folders, which Gradio serves from where they are) live in one folder that
    ``close`` removes; a folder left by a server killed with SIGKILL is removed by the next start."""

    def __init__(self, model: LoadedModel, boundary_dir: Path, t_0: int | None = None, n_inv_step: int | None = None,
                 batch_sizes: tuple[int, int] = (8, 8), cache_root: Path | None = None, precision: str = "fp32",
                 concurrency: int = 1, max_sessions: int | None = None, max_images: int | None = None,
                 attribute: str | None = None):
        """attribute: the one chosen when a page opens (a name, e.g. thick; default: the first at t_0)."""
        gr = _gradio()
        self.config, self.concurrency = model.config, concurrency
        self.table = AttributeTable(Path(boundary_dir), model, t_0)
        if not len(self.table):
            raise UserError(f"no boundary in {boundary_dir} fits config {model.config.name}"
                            f"{f' at t_0 {t_0}' if t_0 is not None else ''} and this checkpoint; "
                            "run --boundary_search first or pass --boundary_dir")
        temp = Path(tempfile.gettempdir())
        remove_stale_partials(temp)  # folders of app servers killed with SIGKILL
        self.root = new_partial_folder(temp, "boundarydiffusion-app")
        self._previous_temp = os.environ.get("GRADIO_TEMP_DIR")
        uploads = self.root / "gradio"
        os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # Gradio's copies, removed with the rest
        store_args = {k: v for k, v in (("max_sessions", max_sessions), ("max_images", max_images)) if v is not None}
        # The outputs inside Gradio's folder: it serves them without copies of its own.
        self.store = SessionStore(uploads / "sessions", upload_root=uploads, **store_args)
        self.service = EditService(model, self.table, self.store, n_inv_step or self.config.edit.n_inv_step,
                                   batch_sizes, cache_root, precision, allowed_roots=[uploads, EXAMPLES])
        self.default_t_0 = t_0 if t_0 is not None else self.config.edit.t_0
        self.entangled = atlas_threshold(Path(boundary_dir))
        self.attribute = attribute
        self.blocks = self._build(gr)
        self.url: str | None = None
        self._closed = False

    # ---------------------------------------------------------------- callbacks
    def _run(self, gr, session_id: str, image, make_request, progress, sweep: bool) -> Result:
        """The work of one event: ``make_request()`` checks the arguments (a ``Request``), then the
        edit; every failure becomes a message in the page (a bad request, stop) or an internal
        error (a bug; its traceback in the log), and the server keeps serving."""
        def report(done: int, total: int, stage: str) -> None:
            progress((done, total), desc=stage, unit="network calls")

        try:
            request = make_request()
            session = self.store.get(session_id or "anonymous")
            return self.service.run(session, image, request, report, sweep=sweep)
        except Cancelled:
            raise gr.Error("Stopped.", print_exception=False) from None
        except (UserError, OSError) as exc:  # the server's folders are not named to the client
            raise gr.Error(page_message(str(exc), self.root) or type(exc).__name__, print_exception=False) from None
        except Exception as exc:
            log.exception("edit failed")
            raise gr.Error(f"internal error: {type(exc).__name__}: {page_message(str(exc), self.root)}",
                           print_exception=False) from None

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
        how = "inversion kept from before" if i["inversion_cached"] else "inverted now"
        warning = "".join(f" {w}" for w in {entanglement_warning(c["names"], {s: c["matrix"]}, self.entangled)
                                             for s, c in i["cosines"].items()} if w)
        reached = "" if single or len(i["targets"]) != 1 else " Set: " + "; ".join(
            f"{a} " + ", ".join(f"{s} {v:+.2f}" for s, v in per_space.items())
            for a, per_space in i["targets"][0].items()) + "."
        return (f"**{i['attribute']}** at t_0 {i['t_0']} in {' and '.join(i['spaces'])}{held}: "
                f"{len(i['targets'])} edit(s), {i['steps']} steps, seed {i['seed']}, eta {i['eta']:g}.{reached} "
                f"Unedited: {source}. {how}; edit {i['edit_seconds']:.2f} s, total {i['total_seconds']:.2f} s.{warning}")

    # ---------------------------------------------------------------- layout
    def _build(self, gr):
        config, table = self.config, self.table
        # The slider's bounds as built hold for every attribute (the server checks API calls against
        # them); a page narrows them to its attribute's range when it loads and on every change.
        ranges = {}
        for key in list(table.entries):
            try:
                ranges[key] = slider_range(self.service.primary_record(key), config)
            except UserError as exc:  # its files cannot be used: the others are still offered
                log.warning("not offering %s: %s", key, exc)
                table.drop(key)
        if not len(table):
            raise UserError("no boundary file in the boundary folder can be used (see the warnings above)")
        default = table.default(self.default_t_0, self.attribute)
        lo, hi = min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())
        self.bounds = (lo, hi)
        joint = table.at(table.t_0)
        joint_ranges = {e.key: relative_range(self.service.primary_record(e.key), ranges[e.key]) for e in joint}
        t_max = max(a.t_0 for a in table.entries.values()) + 1  # each attribute's own limit is checked

        with gr.Blocks(title="BoundaryDiffusion", delete_cache=(600, 1800)) as blocks:
            gr.Markdown(f"## BoundaryDiffusion: edit along a boundary\nModel **{config.name}**. Upload an image "
                        "(or pick an example), choose an attribute, move the distance slider. Each image is "
                        "inverted once; a slider move denoises only that edit.")
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    image = gr.Image(label="Image", type="filepath", sources=["upload"], elem_id="upload", height=220)
                    # The upload reaches the app as Gradio's stored copy, undecoded: the app decodes it
                    # itself with the command line's checks (pixel cap, decoding, modes). (An instance
                    # attribute, not a subclass: Gradio writes a .pyi stub beside any Image subclass.)
                    image.preprocess = _upload_path
                    image.data_model = _upload_model(gr)  # anything sent gets the app's message
                    examples = sorted(p for p in EXAMPLES.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=[image], label="Examples")
                    attribute = gr.Dropdown(table.choices(), value=default, label="Attribute", elem_id="attribute")
                    distance = gr.Slider(lo, hi, value=round((lo + hi) / 2, 2), step=0.01, label="Distance d",
                                         info="the signed distance v.n the edit sets", elem_id="distance")
                    with gr.Row():
                        edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop-button")
                    with gr.Accordion(f"Several attributes at t_0 {table.t_0} (relative unit)", open=True):
                        gr.Markdown("Each slider in the relative unit (-1 and +1 at the boundary's class medians, "
                                    "in z and in h). Moving one edits with the joint move of every non-zero slider; "
                                    "a held attribute keeps its distances.")
                        joint_sliders, joint_holds = [], []
                        for entry in joint:
                            element = re.sub(r"[^A-Za-z0-9_-]", "_", entry.name)
                            with gr.Row(equal_height=True):
                                s_lo, s_hi = joint_ranges[entry.key]
                                joint_sliders.append(gr.Slider(s_lo, s_hi, value=0.0, step=0.01, label=entry.name,
                                                               elem_id=f"joint-{element}", scale=4))
                                joint_holds.append(gr.Checkbox(False, label="hold", elem_id=f"hold-{element}", scale=1,
                                                               min_width=60))
                        reset_button = gr.Button("Reset", elem_id="reset-button", size="sm")
                        cosines = gr.Markdown("The cosines of the moved and held attributes' normals appear here "
                                              "after a move.", elem_id="cosines")
                    with gr.Accordion("Settings", open=False):
                        space = gr.Radio(["both", "z", "h"], value="both", label="Space (latents moved)")
                        hold = gr.Dropdown(table.names(), value=[], multiselect=True, label="Hold fixed",
                                           info="attributes whose boundaries the edit must not cross")
                        steps = gr.Slider(2, t_max, value=config.edit.n_test_step, step=1, label="Denoising steps",
                                          info=f"fewer for a quick preview; {config.edit.n_test_step} (the config's) "
                                               "for the result")
                        with gr.Row():
                            seed = gr.Number(1234, precision=0, label="Seed", minimum=0)
                            eta = gr.Number(1.0, label="eta", minimum=0)
                        align = gr.Checkbox(bool(config.data.align_face), label="Align the face (face extra)",
                                            visible=bool(config.data.align_face))
                    with gr.Accordion("Sweep", open=False):
                        k = gr.Slider(2, MAX_SWEEP, value=config.edit.edit_img_number, step=1, label="Distances K")
                        with gr.Row():
                            start = gr.Number(lo, label="From")
                            end = gr.Number(hi, label="To")
                        second = gr.Dropdown([("none", "")] + table.choices(), value="", label="Second attribute",
                                             info="a K x K grid of the two (the command line's --grid)",
                                             elem_id="second")
                        with gr.Row():
                            second_start = gr.Number(lo, label="Second from")
                            second_end = gr.Number(hi, label="Second to")
                        sweep_button = gr.Button("Sweep", elem_id="sweep-button")
                    # /edit_many's own inputs (no control on the page): {attribute: distance} and the unit
                    many = gr.JSON(visible=False)
                    unit = gr.Radio(list(UNITS), value="absolute", visible=False)
                    many_button = gr.Button(visible=False)
                with gr.Column(scale=2):
                    with gr.Row():
                        original = gr.Image(label="Original", type="filepath", interactive=False, elem_id="original",
                                            height=220)
                        reconstruction = gr.Image(label="Reconstruction", type="filepath", interactive=False,
                                                  elem_id="reconstruction", height=220)
                        edited = gr.Image(label="Edit", type="filepath", interactive=False, elem_id="edit", height=220)
                    caption = gr.Markdown(label="Caption", elem_id="caption")
                    with gr.Row():
                        grid = gr.Image(label="Sweep: labelled strip", show_label=False, type="filepath",
                                        interactive=False, elem_id="grid", scale=4)
                        gif = gr.Image(label="Sweep: GIF", type="filepath", interactive=False, elem_id="gif",
                                       height=160, scale=1, min_width=120)
                    files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="files",
                                    height=180)
                    with gr.Accordion("Details", open=False):
                        details = gr.JSON(label="Details", show_label=False)

            settings = [space, hold, steps, seed, eta, align]
            for component in (attribute, distance, *settings, k, start, end, second, second_start, second_end, many,
                              unit, *joint_sliders, *joint_holds):
                # What is sent reaches the app as it is, to be checked there with its own messages
                # (Gradio's checks end a string for a number in an empty error and a traceback,
                # and round 2.5 steps to 2); a bare attribute name means the config's t_0.
                component.preprocess = lambda payload: payload

            def edit(image, attribute, distance, space="both", hold=(), steps=config.edit.n_test_step, seed=1234,
                     eta=1.0, align=bool(config.data.align_face), request: gr.Request = None,
                     progress=gr.Progress()):
                def make():
                    if isinstance(attribute, str):
                        self.table.get(attribute)  # an unknown name before the distance is looked at
                    return self.service.request({attribute: distance}, space, hold, steps, seed, eta, align,
                                                bounds=(lo, hi))
                return self._shown_edit(self._run(gr, request.session_hash if request else "", image, make, progress,
                                                  sweep=False))

            def edit_many(image, moves, space="both", hold=(), steps=config.edit.n_test_step, seed=1234, eta=1.0,
                          align=bool(config.data.align_face), unit="absolute", request: gr.Request = None,
                          progress=gr.Progress()):
                return self._shown_edit(self._run(
                    gr, request.session_hash if request else "", image,
                    lambda: self.service.request(parse_moves(moves), space, hold, steps, seed, eta, align, unit),
                    progress, sweep=False))

            def edit_joint(image, *values, request: gr.Request = None, progress=gr.Progress()):
                """A move of one of the several-attribute sliders: the joint move of every non-zero
                slider, in the relative unit, the attributes whose hold box is ticked held fixed."""
                n = len(joint)
                levels, holds, (space, hold, steps, seed, eta, align) = values[:n], values[n:2 * n], values[2 * n:]
                held = [*(hold or ()), *(e.name for e, h in zip(joint, holds) if h is True)]
                moves = {e.key: v for e, v, h in zip(joint, levels, holds) if h is not True and v != 0}
                if not moves:
                    raise gr.Error("Every slider is at 0: move one to edit.", print_exception=False)
                result = self._run(gr, request.session_hash if request else "", image,
                                   lambda: self.service.request(moves, space, held, steps, seed, eta, align,
                                                                "relative"), progress, sweep=False)
                names = next(iter(result.info["cosines"].values()))["names"]
                return (*self._shown_edit(result),
                        cosine_view(names, {s: c["matrix"] for s, c in result.info["cosines"].items()},
                                    self.entangled))

            def sweep(image, attribute, k=config.edit.edit_img_number, start=lo, end=hi, space="both", hold=(),
                      steps=config.edit.n_test_step, seed=1234, eta=1.0, align=bool(config.data.align_face),
                      second="", second_start=lo, second_end=hi, request: gr.Request = None, progress=gr.Progress()):
                def make():
                    self.service.spaced(start, end, k)  # K and the range checked, with their own messages
                    moves = {attribute: [start, end]}
                    if second:
                        moves[second] = [second_start, second_end]
                    return self.service.request(moves, space, hold, steps, seed, eta, align, k=k, grid=bool(second))
                result = self._run(gr, request.session_hash if request else "", image, make, progress, sweep=True)
                shown = [result.grid, result.gif, result.original, result.reconstruction, *result.edits]
                return (str(result.grid), str(result.gif), self._caption(result), result.info, [str(p) for p in shown])

            def reset():
                return [gr.Slider(value=0.0) for _ in joint_sliders] + [gr.Checkbox(value=False) for _ in joint_holds]

            def attribute_changed(attribute):
                """The slider's and the sweep's range for the chosen attribute."""
                try:
                    new_lo, new_hi = ranges[self.table.get(attribute).key]
                except UserError as exc:
                    raise gr.Error(page_message(str(exc), self.root), print_exception=False) from None
                return gr.Slider(minimum=new_lo, maximum=new_hi), gr.Number(new_lo), gr.Number(new_hi)

            def stop(request: gr.Request = None):
                if request is not None:
                    self.store.stop(request.session_hash)

            def unload(request: gr.Request = None):
                if request is not None:
                    self.store.drop(request.session_hash)

            edit_outputs = [edited, original, reconstruction, caption, details, files]
            work = {"concurrency_limit": self.concurrency, "concurrency_id": "model"}
            edit_event = edit_button.click(edit, [image, attribute, distance, *settings], edit_outputs,
                                           api_name="edit", **work)
            # Every way a slider move ends (a drag, the arrow keys, a typed number) edits the value
            # shown: the latest waiting move runs once the one in progress ends ("always_last").
            release_event = distance.release(edit, [image, attribute, distance, *settings], edit_outputs,
                                             api_visibility="private", trigger_mode="always_last", **work)
            input_event = distance.input(edit, [image, attribute, distance, *settings], edit_outputs,
                                         api_visibility="private", trigger_mode="always_last", **work)
            many_event = many_button.click(edit_many, [image, many, *settings, unit], edit_outputs, api_name="edit_many",
                                           **work)
            joint_inputs = [image, *joint_sliders, *joint_holds, *settings]
            joint_events = [slider.input(edit_joint, joint_inputs, [*edit_outputs, cosines], api_visibility="private",
                                         trigger_mode="always_last", **work) for slider in joint_sliders]
            reset_button.click(reset, None, [*joint_sliders, *joint_holds], api_visibility="private")
            sweep_event = sweep_button.click(sweep, [image, attribute, k, start, end, *settings, second, second_start,
                                                     second_end], [grid, gif, caption, details, files],
                                             api_name="sweep", **work)
            attribute.change(attribute_changed, [attribute], [distance, start, end], api_visibility="private")
            blocks.load(attribute_changed, [attribute], [distance, start, end], api_visibility="private")
            stop_button.click(stop, None, None, cancels=[edit_event, release_event, input_event, sweep_event, many_event,
                                                         *joint_events], queue=False, api_name="stop")
            blocks.unload(unload)
        blocks.queue(default_concurrency_limit=self.concurrency)
        return blocks

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
            shutil.rmtree(self.root, ignore_errors=True)
            if self._previous_temp is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._previous_temp


def serve(args: argparse.Namespace, config: Config, device) -> int:
    """``python main.py --serve``: load the model once, serve the app until interrupted."""
    import atexit

    from models.loading import load_model
    from models.runtime import default_batch_size

    _gradio()  # before the model: a missing extra, a bad address or a port in use are said at once
    check_address(args.host, args.port)
    for name in ("httpx", "gradio_client"):  # no log line per request Gradio makes to itself
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    model = load_model(config, args.model_path, args.cache_dir, device, args.precision)
    default = default_batch_size(device, config.data.image_size)
    app = WebApp(model, args.boundary_dir, args.t_0, args.n_inv_step, (args.bs_train or default,
                 args.edit_batch_size or default),
                 None if args.no_cache else Path(args.cache_dir or default_cache_dir()) / "latents",
                 args.precision, args.concurrency, attribute=args.edit_attr)
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
