"""BoundaryDiffusion: learning-free semantic editing with a frozen DDPM / improved-DDPM.

Modes: --boundary_search (fit SVM boundaries on inverted latents), --edit_image_boundary (edit real
images -- a file, a folder or a glob -- across them), --unconditional (edit sampled latents),
--radius (mixing-step analysis; with --edit_attr also the t_0 report), --discover (directions without
labels, written as boundary files), --serve (the web app: edit in the browser, docs/app.md).
Defaults marked "config" come from the config's edit section. Errors print one line and exit 1.
Under torchrun, --boundary_search and folder edits shard their images across the processes
(docs/distributed.md).
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import traceback
from pathlib import Path

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _edit_count(text: str) -> int:
    """--edit_img_number: every edit is held in memory until written, so the count is capped."""
    from runners.engine import MAX_POINTS

    value = _positive_int(text)
    if value > MAX_POINTS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_POINTS} (every edit is held in memory "
                                         f"until it is written), got {text}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _svm_c(text: str) -> float:
    """--svm_c within the engine's ``SVM_C_RANGE``: outside it the fit cannot succeed."""
    from runners.engine import SVM_C_RANGE

    value = _positive_float(text)
    low, high = SVM_C_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}: below, the hinge loss has no "
                                         "weight and the intercept puts every latent on one side; above, libsvm "
                                         "takes tiny steps and never converges where the classes overlap")
    return value


def _attribute_text(text: str) -> str:
    """--edit_attr: never empty, since an empty value (an unset shell variable) would otherwise leave
    the config's attribute to be edited without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"needs an attribute name, got {text!r}")
    return text


def _distance(text: str) -> float | str:
    return "auto" if text == "auto" else _finite_float(text)


class _Parser(argparse.ArgumentParser):
    """Bad flags end like every other bad input: one line on stderr, exit status 1."""

    def error(self, message: str):
        self.exit(1, f"error: {message} (see --help)\n")


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """Run-level flags: the config, the run folder, the model's weights, device and precision."""
    run = parser.add_argument_group("run")
    run.add_argument("--config", default="faces.yml", help="a file in configs/ or a path")
    run.add_argument("--exp", type=Path, default=Path("runs/test"), help="run folder; each mode writes a subfolder")
    run.add_argument("--seed", type=_seed, default=1234, help="seed of the data split, the sampled noise and the edit noise")
    run.add_argument("--model_path", default=None,
                     help="weights instead of the config's checkpoint: a state-dict file (.pt/.pth/.ckpt), a .safetensors "
                          "file, a diffusers model folder, or a Hugging Face Hub id hf:<owner>/<name>")
    run.add_argument("--cache_dir", type=Path, default=None,
                     help="downloads and inverted-latent cache (default $BOUNDARYDIFFUSION_CACHE or ~/.cache/boundarydiffusion)")
    run.add_argument("--no_cache", action="store_true", help="neither read nor write the inverted-latent cache")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    run.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                     help="network compute precision (fp16 on CUDA only); the DDIM arithmetic stays float64")
    run.add_argument("--ni", action="store_true",
                     help="no interaction: overwrite a finished run folder and existing boundary files "
                          "(default: write to a new numbered folder / file name)")
    run.add_argument("--force", action="store_true", help="use boundaries fitted at another t_0, on another checkpoint or for another config")
    run.add_argument("--dist_timeout", type=_positive_int, default=1800,
                     help="under torchrun: seconds a process waits for the others (start-up, gathering the results)")
    run.add_argument("--verbose", default="info", choices=("info", "debug", "warning"),
                     help="log level; debug also shows tracebacks")



def _diffusion_flags(parser: argparse.ArgumentParser) -> None:
    """The inversion and denoising grids, the mixing step, eta."""
    diff = parser.add_argument_group("diffusion")
    diff.add_argument("--t_0", type=_int, default=None, help="mixing step (default: the boundary's, else config)")
    diff.add_argument("--n_inv_step", type=_int, default=None,
                      help="inversion grid points up to t_0 (unconditional: sampling steps from T-1 to t_0) (config)")
    diff.add_argument("--n_test_step", type=_int, default=None, help="generation grid points from t_0 (config)")
    diff.add_argument("--n_train_step", type=_int, default=None, help="accepted for compatibility; unused")
    diff.add_argument("--n_iter", type=_positive_int, default=1, help="edit sequences per image, each with its own noise")
    diff.add_argument("--deterministic_inv", type=_int, default=1, help="accepted for compatibility; inversion is always DDIM eta 0")
    diff.add_argument("--eta", type=_non_negative_float, default=None,
                      help="DDIM eta of the edits; reconstruction uses 0 (config, the original's 1 where it names none)")



def _search_flags(parser: argparse.ArgumentParser) -> None:
    """Boundary search: the labelled images, the split, the SVM."""
    data = parser.add_argument_group("boundary search")
    data.add_argument("--edit_attr", type=_attribute_text, default=None,
                      help="attribute column (case-insensitive), e.g. smiling; --boundary_search also takes "
                           "a,b,c or all: every attribute from one inversion pass, with an atlas")
    data.add_argument("--data_dir", type=Path, default=None, help="image folder (default: config data.data_dir)")
    data.add_argument("--attr_file", type=Path, default=None, help="CelebA-format attribute file (default: config)")
    data.add_argument("--pos_dir", type=Path, default=None, help="folder of positive images (instead of an attribute file)")
    data.add_argument("--neg_dir", type=Path, default=None, help="folder of negative images")
    data.add_argument("--n_train_img", type=_positive_int, default=100, help="images to fit the SVMs on")
    data.add_argument("--n_test_img", type=_positive_int, default=100, help="held-out images to report accuracy on")
    data.add_argument("--svm_c", type=_svm_c, default=1.0,
                      help="the linear SVM's C (hinge-loss weight against the margin), as sklearn's SVC, in "
                           "[1e-6, 1e6]; default 1")
    data.add_argument("--balance", action="store_true",
                      help="fit each attribute on as many images of each class (a seeded subset of the larger "
                           "class), for rare attributes (docs/modes.md)")
    data.add_argument("--bs_train", type=_positive_int, default=None, help="inversion batch size (default: 1 for 256-px models on the CPU, else 8)")
    data.add_argument("--bs_test", type=_positive_int, default=None, help="batch size of the radius analysis (default: 1 for 256-px models on the CPU, else 8)")
    data.add_argument("--boundary_dir", type=Path, default=Path("boundary"), help="where boundary files are written")
    data.add_argument("--within", type=Path, default=None,
                      help="--boundary_search: fit each SVM on the latents' coordinates in the subspace the "
                           "directions of this folder span (written by --discover; the files named "
                           "--discover_prefix_NN, so the supervised boundaries beside them are passed over), a "
                           "few labels suffice (e.g. --n_train_img 10)")
    data.add_argument("--align_face", type=_int, default=None, choices=(0, 1),
                      help="--edit_image_boundary: 1 aligns the largest face the FFHQ way (dlib landmarks; "
                           "pip install -r requirements-face.txt) and edits that crop, 0 does not "
                           "(default: the config's data.align_face, true for celeba.yml)")



def _edit_flags(parser: argparse.ArgumentParser) -> None:
    """Editing: images, boundaries, holds, spaces, distances, outputs."""
    edit = parser.add_argument_group("editing")
    edit.add_argument("--img_path", type=Path, default=None,
                      help="image to edit: a file, a folder or a glob (quoted, e.g. 'imgs/*.png'); a folder or "
                           "glob writes <exp>/edit/<image stem>/ per image")
    edit.add_argument("--boundary_h", type=Path, default=None, help="boundary file of the h space (.npz)")
    edit.add_argument("--boundary_z", type=Path, default=None, help="boundary file of the z space (.npz)")
    edit.add_argument("--condition_attr", default=None,
                      help="attributes to hold fixed, A[,B...] or auto (those the atlas of --boundary_dir suggests): "
                           "their boundaries (found in --boundary_dir like --edit_attr's) keep each image's projection "
                           "while the edit moves")
    edit.add_argument("--condition_z", type=Path, nargs="+", default=None, help="z boundary files to hold fixed")
    edit.add_argument("--condition_h", type=Path, nargs="+", default=None, help="h boundary files to hold fixed")
    edit.add_argument("--edit_space", default="both", choices=("both", "z", "h"), help="latents to move")
    edit.add_argument("--h_policy", default="lagged", choices=("lagged", "once"),
                      help="h override after the first call: lagged (reference code) or once (paper)")
    edit.add_argument("--start_distance", type=_distance, default=None,
                      help="first signed distance, or auto with --end_distance auto: each moved space spans its "
                           "boundary's classes, negative 5th to positive 95th percentile (config; with --region, "
                           "-edit.region_distance where the config sets it)")
    edit.add_argument("--end_distance", type=_distance, default=None,
                      help="last signed distance, or auto (config; with --region, edit.region_distance where the "
                           "config sets it)")
    edit.add_argument("--edit_img_number", type=_edit_count, default=None,
                      help="number of distances K, at most 1000 (config); with --edit the points along every "
                           "range, with --grid per axis")
    edit.add_argument("--edit", action="append", default=None, metavar="ATTR=START:END",
                      help="move an attribute, repeatable: ATTR=START:END (K points), ATTR=auto (its classes' "
                           "span) or ATTR=VALUE; the attributes move together, each exactly to its target "
                           "(instead of --edit_attr with --start_distance/--end_distance)")
    edit.add_argument("--grid", action="store_true",
                      help="with two --edit attributes: sweep them over K x K points into a 2-D grid")
    edit.add_argument("--region", default=None, metavar="MASK|x0,y0,x1,y1|PART",
                      help="edit only this part of each image: a mask image (white = editable, any size), a box "
                           "in fractions of the image, or a part's name (mouth, eyes, hair, face, background: "
                           "from the image's parts file, or a union such as hair+face); the rest follows the "
                           "unedited run (docs/modes.md). With --boundary_search: fit each SVM on each image's "
                           "region alone")
    edit.add_argument("--region_h", default="cells", choices=("cells", "none"),
                      help="with --region: confine h to the share of each bottleneck cell the region covers, or "
                           "leave h as it is")
    edit.add_argument("--feather", type=_non_negative_float, default=2.0,
                      help="with --region: pixels over which the outside goes from edited to kept")
    edit.add_argument("--region_method", default="blend", choices=("blend", "loco"),
                      help="with --region: keep the outside on the unedited run while denoising (blend), or keep "
                           "z's move off the outside's top Jacobian directions (loco: LOCO-Edit; z only, small "
                           "images; docs/faces_report.md compares them)")
    edit.add_argument("--region_rank", type=_positive_int, default=32,
                      help="with --region_method loco: the Jacobian directions the move is kept off")
    edit.add_argument("--edit_unit", default=None, choices=("absolute", "relative", "shift"),
                      help="the unit of distances: absolute (signed distance v.n, as the original), relative "
                           "(-1 and +1 at the boundary's class medians, in each space), or shift (changes in the "
                           "relative unit from where each image is, in each space) (config)")
    edit.add_argument("--edit_batch_size", type=_positive_int, default=None,
                      help="edits denoised per batch (default: 1 for 256-px models on the CPU, else 8)")
    edit.add_argument("--n_samples", type=_positive_int, default=1, help="--unconditional: sampled latents to edit")
    edit.add_argument("--gif", action="store_true", help="also write edits.gif: the edits forward and back, looping")
    edit.add_argument("--save_tensors", action="store_true", help="also write tensors.pt (z, h, recon, edits, edited_z, edited_h, distances)")



def _discover_flags(parser: argparse.ArgumentParser) -> None:
    """Directions without labels (--discover)."""
    found = parser.add_argument_group("directions without labels (--discover)")
    found.add_argument("--n_directions", type=_positive_int, default=8, help="directions found in each space")
    found.add_argument("--n_discover_img", type=_positive_int, default=64,
                       help="images inverted (the first of --img_path, else of the data folder)")
    found.add_argument("--discover_prefix", default="pc", help="the directions' names: PREFIX_00, PREFIX_01, ... (--within takes those)")
    found.add_argument("--oversample", type=_int, default=8,
                       help="extra vectors of the Jacobian's subspace iteration (faster convergence)")
    found.add_argument("--n_power_iter", type=_int, default=5, help="power steps of the Jacobian's subspace iteration")
    found.add_argument("--sheet_images", type=_int, default=3,
                       help="images of the contact sheet (each direction in each space; 0: none)")
    found.add_argument("--sheet_range", type=_positive_float, default=3.0,
                       help="the contact sheet's edits span -R..+R in the relative unit (K points: --edit_img_number, "
                            "default 5)")


def _mixing_and_app_flags(parser: argparse.ArgumentParser) -> None:
    """The mixing-step analysis and the web app."""
    mix = parser.add_argument_group("mixing step")
    mix.add_argument("--radius_step", type=_positive_int, default=50, help="spacing of candidate timesteps")
    mix.add_argument("--radius_eps", type=_non_negative_float, default=0.01, help="relative radius difference counted as mixed")
    app = parser.add_argument_group("web app (--serve)")
    app.add_argument("--host", default="127.0.0.1", help="address to bind; any other than loopback is reachable "
                                                          "by others, and the app has no authentication")
    app.add_argument("--port", type=_positive_int, default=7860, help="port to serve on")
    app.add_argument("--concurrency", type=_positive_int, default=1,
                     help="jobs run at once (others wait in a queue); 1 suits a CPU")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a flag is taken only as spelled in full, so that --edit never stands for
    # --edit_attr or --edit_space (nor a typo for another flag).
    parser = _Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--boundary_search", action="store_true", help="invert labelled images to t_0 and fit boundaries")
    mode.add_argument("--edit_image_boundary", action="store_true", help="edit real images (a file, a folder or a glob) across the boundaries")
    mode.add_argument("--unconditional", action="store_true", help="edit latents sampled from noise")
    mode.add_argument("--radius", action="store_true", help="mixing-step analysis: radius of sampled vs inverted "
                                                             "latents; with --edit_attr also the t_0 report")
    mode.add_argument("--discover", action="store_true",
                      help="directions without labels: the top Jacobian directions of z and principal directions of h "
                           "of N inverted images, written as boundary files (pc_00, ...) with a contact sheet")
    mode.add_argument("--serve", action="store_true",
                      help="web app: edit in the browser with a distance slider (pip install -r requirements-ui.txt)")

    for add in (_run_flags, _diffusion_flags, _search_flags, _edit_flags, _discover_flags, _mixing_and_app_flags):
        add(parser)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so that the run folder is cleaned up on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _install_signal_handlers() -> dict:
    """SIGINT and SIGTERM become ``Interrupted``; returns the previous handlers (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (1, already reported in one line)
        return int(exc.code or 0)
    logging.basicConfig(level=args.verbose.upper(), format="%(levelname)s %(name)s: %(message)s", force=True)
    from runners.boundary_diffusion import run_command
    from runners.engine import UserError

    previous = _install_signal_handlers()
    try:
        return run_command(args, parser)
    except KeyboardInterrupt as exc:  # the run folder has been removed on the way here
        print("error: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except Exception as exc:  # one line for the user; the traceback with --verbose debug
        if args.verbose == "debug":
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (UserError, OSError)):  # a ValueError is a bug: bad input raises UserError
            message = f"internal error: {type(exc).__name__}: {message} (rerun with --verbose debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    sys.exit(main())
