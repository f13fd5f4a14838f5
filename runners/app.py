"""The web app, ``python main.py --serve``: Gradio wiring around ``runners.app_state.EditService``.

One model, loaded once; per browser tab (session) the uploaded images inverted once each. Moving the
distance slider denoises that one edit from t_0; 'Sweep' renders K distances as the command line's
labelled strip and GIF. The pixels equal the command line's for the same settings (same engine, seeds
and writer). Named endpoints for ``gradio_client``: ``/edit`` and ``/sweep`` (docs/app.md).
"""
import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from models.checkpoints import default_cache_dir
from models.loading import LoadedModel
from runners.app_state import (MAX_SWEEP, AttributeTable, Cancelled, EditService, Request, Result, SessionStore)
from runners.editor import Directions, auto_span
from utils.config import Config
from utils.errors import UserError

log = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-ui.txt"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "imgs"
MAX_UPLOAD = "50mb"          # larger uploads are refused by Gradio with a message
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Small images (the digits are 16 px) are drawn large and sharp; the pixels served are the files'.
CSS = ("#original img, #reconstruction img, #edit img, #gif img, #upload img "
       "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated} "
       "#grid img {width: 100%; object-fit: contain}")


def slider_range(directions: Directions | None, config: Config) -> tuple[float, float]:
    """The distance slider's range for an edit along ``directions``: where the primary boundary (z,
    or h when only h moves) records where its classes lie, the command line's ``auto`` range for that
    space (``runners.editor.auto_span``); otherwise the config's edit range. The slider's d moves every moved space, as the
    command line's explicit distances do."""
    record = None if directions is None else directions.records["z"] or directions.records["h"]
    if record is not None and record.class_summary is not None:
        lo, hi = auto_span(record)
    else:
        lo, hi = float(config.edit.start_distance), float(config.edit.end_distance)
    lo, hi = sorted((round(lo, 2), round(hi, 2)))
    return (lo - 1.0, hi + 1.0) if lo == hi else (lo, hi)


def exposure_warning(host: str) -> str | None:
    """What to tell the user who binds the app to ``host``: None for the loopback interface."""
    if host in LOOPBACK:
        return None
    return (f"warning: serving on {host}: the app has no authentication; anyone who can reach this address "
            "can use it (and this machine's CPU or GPU)")


def _gradio():
    """Gradio, or a UserError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    try:
        import gradio
    except ImportError:
        raise UserError(f"the web app needs Gradio: {INSTALL}") from None
    return gradio


class WebApp:
    """The Gradio app on one loaded model. Its temporary files (Gradio's copies of uploads and
    results, the sessions' output folders) live in one folder that ``close`` removes."""

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
        self.root = Path(tempfile.mkdtemp(prefix="boundarydiffusion-app-"))
        self._previous_temp = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.root / "gradio")  # Gradio's copies, removed with the rest
        store_args = {k: v for k, v in (("max_sessions", max_sessions), ("max_images", max_images)) if v is not None}
        self.store = SessionStore(self.root / "sessions", **store_args)
        self.service = EditService(model, self.table, self.store, n_inv_step or self.config.edit.n_inv_step,
                                   batch_sizes, cache_root, precision,
                                   allowed_roots=[self.root / "gradio", EXAMPLES])
        self.default_t_0 = t_0 if t_0 is not None else self.config.edit.t_0
        self.attribute = attribute
        self.blocks = self._build(gr)
        self.url: str | None = None
        self._closed = False

    # ---------------------------------------------------------------- callbacks
    def _request(self, attribute, space, hold, steps, seed, eta, align) -> Request:
        try:
            return Request(attribute=attribute, space=space or "both", held=tuple(hold or ()),
                           steps=None if steps is None else int(steps), seed=int(seed if seed is not None else 1234),
                           eta=float(eta if eta is not None else 1.0), align=None if align is None else bool(align))
        except (TypeError, ValueError) as exc:
            raise UserError(f"bad setting: {exc}") from None

    def _run(self, gr, session_id: str, image, request: Request, distances, progress, sweep: bool) -> Result:
        """The work of one event, with every failure turned into a message in the page."""
        session = self.store.get(session_id or "anonymous")

        def report(done: int, total: int, stage: str) -> None:
            progress((done, total), desc=stage, unit="network calls")

        try:
            return self.service.run(session, image, request, distances, report, sweep=sweep)
        except Cancelled:
            raise gr.Error("Stopped.", print_exception=False) from None
        except (UserError, ValueError, OSError) as exc:  # the server's folders are not named to the client
            message = re.sub(re.escape(str(self.root)) + r"\S*/", "", " ".join(str(exc).split()))
            raise gr.Error(message or type(exc).__name__, print_exception=False) from None
        except Exception as exc:  # the server keeps serving; the traceback goes to the log
            log.exception("edit failed")
            raise gr.Error(f"internal error: {type(exc).__name__}: {exc}", print_exception=False) from None

    @staticmethod
    def _caption(result: Result) -> str:
        i = result.info
        source = ", ".join(f"{s}.n = {v:+.2f}" for s, v in i["source_distances"].items())
        held = f"; {', '.join(i['held'])} held" if i["held"] else ""
        how = "inversion kept from before" if i["inversion_cached"] else "inverted now"
        return (f"**{i['attribute']}** at t_0 {i['t_0']} in {' and '.join(i['spaces'])}{held}: "
                f"{len(i['distances'])} edit(s), {i['steps']} steps, seed {i['seed']}, eta {i['eta']:g}. "
                f"Unedited: {source}. {how}; edit {i['edit_seconds']:.2f} s, total {i['total_seconds']:.2f} s.")

    # ---------------------------------------------------------------- layout
    def _build(self, gr):
        config, table = self.config, self.table
        default = table.default(self.default_t_0, self.attribute)
        # The slider's bounds as built hold for every attribute (the server checks API calls against
        # them); a page narrows them to its attribute's range when it loads and on every change.
        ranges = [slider_range(self.service.directions_for(key), config) for key in table.entries] or \
            [slider_range(None, config)]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
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
                    image.preprocess = lambda payload: None if payload is None else payload.path
                    examples = sorted(p for p in EXAMPLES.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=[image], label="Examples")
                    attribute = gr.Dropdown(table.choices(), value=default, label="Attribute", elem_id="attribute")
                    distance = gr.Slider(lo, hi, value=round((lo + hi) / 2, 2), step=0.01, label="Distance d",
                                         info="the signed distance v.n the edit sets", elem_id="distance")
                    with gr.Row():
                        edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop-button")
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
                        sweep_button = gr.Button("Sweep", elem_id="sweep-button")
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

            def edit(image, attribute, distance, space="both", hold=(), steps=config.edit.n_test_step, seed=1234,
                     eta=1.0, align=bool(config.data.align_face), request: gr.Request = None,
                     progress=gr.Progress()):
                req = self._request(attribute, space, hold, steps, seed, eta, align)
                result = self._run(gr, request.session_hash if request else "", image, req, [distance], progress,
                                   sweep=False)
                shown = [result.original, result.reconstruction, *result.edits]
                return (str(result.edits[0]), str(result.original), str(result.reconstruction), self._caption(result), result.info,
                        [str(p) for p in shown])

            def sweep(image, attribute, k=config.edit.edit_img_number, start=lo, end=hi, space="both", hold=(),
                      steps=config.edit.n_test_step, seed=1234, eta=1.0, align=bool(config.data.align_face),
                      request: gr.Request = None, progress=gr.Progress()):
                req = self._request(attribute, space, hold, steps, seed, eta, align)
                try:
                    k = int(k)
                    if not 1 <= k <= MAX_SWEEP:
                        raise ValueError(f"K must be in [1, {MAX_SWEEP}], got {k}")
                    distances = self.service.spaced(float(start), float(end), k)
                except (TypeError, ValueError, UserError) as exc:
                    raise gr.Error(str(exc), print_exception=False) from None
                result = self._run(gr, request.session_hash if request else "", image, req, distances, progress,
                                   sweep=True)
                shown = [result.grid, result.gif, result.original, result.reconstruction, *result.edits]
                return (str(result.grid), str(result.gif), self._caption(result), result.info, [str(p) for p in shown])

            def attribute_changed(attribute):
                """The slider's and the sweep's range for the chosen attribute."""
                try:
                    new_lo, new_hi = slider_range(self.service.directions_for(attribute), config)
                except UserError as exc:
                    raise gr.Error(str(exc), print_exception=False) from None
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
            release_event = distance.release(edit, [image, attribute, distance, *settings], edit_outputs,
                                             api_visibility="private", trigger_mode="always_last", **work)
            sweep_event = sweep_button.click(sweep, [image, attribute, k, start, end, *settings],
                                             [grid, gif, caption, details, files], api_name="sweep", **work)
            attribute.change(attribute_changed, [attribute], [distance, start, end], api_visibility="private")
            blocks.load(attribute_changed, [attribute], [distance, start, end], api_visibility="private")
            stop_button.click(stop, None, None, cancels=[edit_event, release_event, sweep_event], queue=False,
                              api_name="stop")
            blocks.unload(unload)
        blocks.queue(default_concurrency_limit=self.concurrency)
        return blocks

    # ---------------------------------------------------------------- life cycle
    def launch(self, host: str = "127.0.0.1", port: int = 7860, quiet: bool = True) -> str:
        warning = exposure_warning(host)
        if warning:
            print(warning, file=sys.stderr)
        self.blocks.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=quiet,
                           max_file_size=MAX_UPLOAD, allowed_paths=[str(EXAMPLES)], css=CSS, ssr_mode=False,
                           show_error=False, inbrowser=False)
        self.url = self.blocks.local_url
        return self.url

    def close(self) -> None:
        """Stop the server and remove every temporary file."""
        if self._closed:
            return
        self._closed = True
        try:
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

    _gradio()  # before the model: a missing extra is said at once
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
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        app.close()
    return 0
