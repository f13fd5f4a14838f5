"""The command line resolved once: flags and the config's defaults turned into one typed, frozen
``Settings`` per run (the run-level choices and the engine's job), with every check that needs no
model done before any model loads (``runners.engine.check_job``)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from runners.engine import (MAX_EDITS, MOVED, BoundaryIndex, Config, Denoising, DiscoverJob, EditJob, EditRequest, Inverting, Move,
                            RadiusJob, Region, SampleJob, SearchJob, UserError, check_request, check_steps, fitted_t_0, latent_shapes)

log = logging.getLogger(__name__)

MODES = ("boundary_search", "edit_image_boundary", "unconditional", "radius", "discover")
EDIT_MODES = ("edit_image_boundary", "unconditional")
#: The flags each run-level field comes from, and those --serve honours besides them.
SERVE_FLAGS = {"config", "model_path", "cache_dir", "no_cache", "device", "precision", "verbose", "t_0",
               "n_inv_step", "boundary_dir", "edit_attr", "bs_train", "edit_batch_size", "host", "port",
               "concurrency", "serve", "n_test_step", "h_policy"}


@dataclass(frozen=True)
class RunSettings:
    """What every mode shares: the model and where it computes, the run folder and its writing."""
    config: Config
    exp: Path
    model_path: str | None
    cache_dir: Path | None
    no_cache: bool
    device: str
    precision: str
    overwrite: bool          # --ni
    dist_timeout: int


@dataclass(frozen=True)
class Settings:
    """A run: its run-level settings and the engine's job (``runners.engine``), complete when built."""
    run: RunSettings
    job: SearchJob | EditJob | SampleJob | RadiusJob | DiscoverJob

    @property
    def mode(self) -> str:
        return {SearchJob: "boundary_search", EditJob: "edit_image_boundary", SampleJob: "unconditional",
                RadiusJob: "radius", DiscoverJob: "discover"}[type(self.job)]

    def to_dict(self) -> dict:
        """The settings as plain values, for summary.json."""
        run = {f.name: getattr(self.run, f.name) for f in dataclasses.fields(self.run)}
        run["config"] = self.run.config.name
        return _plain({"mode": self.mode, **run, "job": dataclasses.asdict(self.job)})


def _plain(value):
    """Paths as text, containers as lists and dicts (for JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _index(args: argparse.Namespace, config: Config) -> BoundaryIndex:
    return BoundaryIndex.of(args.boundary_dir, config.name, latent_shapes(config))


def _first_boundaries(index: BoundaryIndex, args: argparse.Namespace, config: Config, attribute: str | None
                      ) -> tuple[str, int]:
    """The attribute (None: the only one there is) and t_0 an edit uses when no file is named, as
    the original README's commands find them: the newest fitted at the run's t_0 (--t_0, else the
    config's), else at the only t_0 it has. UserError naming the attributes and t_0 values there are."""
    t_0 = args.t_0 if args.t_0 is not None else config.edit.t_0
    try:
        found = index.find(attribute, t_0)
    except UserError:
        if args.t_0 is not None:
            raise
        found = index.find(attribute, None)
    log.info("using the %s boundaries at t_0 %d: %s", found[0], found[1], ", ".join(map(str, found[2].values())))
    return found[0], found[1]


def _named_files(args: argparse.Namespace, start, end, auto: bool, shapes: dict) -> tuple[Move, int | None]:
    """The move of ``--boundary_z/--boundary_h`` (files named on the command line) and the t_0 they
    were fitted at (the first file's)."""
    paths = {s: p for s, p in (("z", args.boundary_z), ("h", args.boundary_h)) if p is not None}
    missing = [s for s in MOVED[args.edit_space] if s not in paths]
    if missing:
        raise UserError(f"--edit_space {args.edit_space} needs --boundary_{missing[0]}")
    t_0 = fitted_t_0(next(iter(paths.values())), shapes)  # from the file's header, before the model loads
    return Move(args.edit_attr or "", start, end, auto, paths), t_0


def _moves(args: argparse.Namespace, config: Config, index: BoundaryIndex) -> tuple[tuple[Move, ...], int]:
    """The moved attributes and the t_0 (--t_0, else that of the first attribute's boundaries), from
    ``--edit ATTR=START:END`` (repeatable) or the original's ``--edit_attr A --start_distance S
    --end_distance E`` (or the files ``--boundary_z/--boundary_h``)."""
    if args.edit:
        clash = [flag for flag, given in (("--edit_attr", args.edit_attr), ("--boundary_z", args.boundary_z),
                                          ("--boundary_h", args.boundary_h), ("--start_distance", args.start_distance),
                                          ("--end_distance", args.end_distance)) if given is not None]
        if clash:
            raise UserError(f"--edit names each attribute with its range; drop {clash[0]}")
        moves = tuple(Move.parse(text) for text in args.edit)
        t_0 = _first_boundaries(index, args, config, moves[0].attribute)[1]
        return moves, args.t_0 if args.t_0 is not None else t_0
    ends = [v if v is not None else default for v, default in
            zip((args.start_distance, args.end_distance), config.edit.default_range(args.region is not None))]
    if (ends[0] == "auto") != (ends[1] == "auto"):
        raise UserError("auto distances take both ends: --start_distance auto --end_distance auto")
    auto = ends[0] == "auto"
    start, end = (None, None) if auto else ends
    if args.boundary_h is not None or args.boundary_z is not None:
        move, t_0 = _named_files(args, start, end, auto, latent_shapes(config))
    else:
        if args.edit_attr is not None and "," in args.edit_attr:
            raise UserError(f"--edit_attr {args.edit_attr}: an edit takes one attribute here; move several with "
                            "--edit A=START:END --edit B=START:END")
        attribute, t_0 = _first_boundaries(index, args, config, args.edit_attr or config.edit.attribute or None)
        move = Move(attribute, start, end, auto)
    return (move,), args.t_0 if args.t_0 is not None else t_0


def edit_request(args: argparse.Namespace, config: Config, batch_size: int) -> tuple[EditRequest, int]:
    """The edit modes' request (checked: ``check_request``) and its t_0."""
    moves, t_0 = _moves(args, config, _index(args, config))
    held = tuple(a.strip() for a in (args.condition_attr or "").split(",") if a.strip())
    held_paths = {s: tuple(p) for s, p in (("z", args.condition_z), ("h", args.condition_h)) if p}
    k = args.edit_img_number if args.edit_img_number is not None else config.edit.edit_img_number
    steps = args.n_test_step if args.n_test_step is not None else config.edit.n_test_step
    denoising = Denoising(steps, config.edit.eta if args.eta is None else args.eta, args.h_policy, args.seed, batch_size)
    region = None if args.region is None else Region(args.region, args.region_h, args.feather, args.region_method,
                                                     args.region_rank)
    if region is None and (args.region_h != "cells" or args.feather != 2.0 or args.region_method != "blend"):
        raise UserError("--region_h, --feather and --region_method go with --region")
    unit = args.edit_unit or config.edit.unit
    request = EditRequest(moves, denoising, k, held, held_paths, args.edit_space, unit, args.grid,
                          args.force, region)
    return check_request(request), t_0


def _inverting(args: argparse.Namespace, config: Config, t_0: int, batch_size: int, mode: str) -> Inverting:
    """The inversion grid, its points checked against t_0 (unconditional: sampling steps from T - 1)."""
    T = config.diffusion.num_diffusion_timesteps
    if not 1 <= t_0 <= T - 1:
        raise UserError(f"--t_0 must be in [1, {T - 1}], got {t_0}")
    n_inv_step = args.n_inv_step if args.n_inv_step is not None else config.edit.n_inv_step
    if mode == "unconditional":
        if not 2 <= n_inv_step <= T - t_0:
            raise UserError(f"--n_inv_step must be in [2, {T - t_0}], got {n_inv_step}")
    else:
        check_steps(n_inv_step, t_0, "--n_inv_step")
    return Inverting(t_0, n_inv_step, batch_size)


def _edit_job(args, config, mode: str, batches: dict) -> EditJob | SampleJob:
    request, t_0 = edit_request(args, config, batches["edit_batch_size"])
    inverting = _inverting(args, config, t_0, batches["bs_train"], mode)
    check_steps(request.denoising.n_test_step, t_0)
    if args.save_tensors and args.n_iter * request.n_edits > MAX_EDITS:
        raise UserError(f"--save_tensors keeps every edit in memory until tensors.pt is written: --n_iter "
                        f"{args.n_iter} x {request.n_edits} edits is more than {MAX_EDITS}; lower --n_iter")
    if mode == "unconditional":
        return SampleJob(inverting, request, args.boundary_dir, args.n_samples, args.seed, args.n_iter, args.gif,
                         args.save_tensors)
    if args.img_path is None:
        raise UserError("--edit_image_boundary needs --img_path")
    align = None if args.align_face is None else bool(args.align_face)
    return EditJob(inverting, args.img_path, request, args.boundary_dir, align, args.n_iter, args.gif,
                   args.save_tensors)


def _discover_job(args: argparse.Namespace, config: Config, t_0: int, batches: dict) -> DiscoverJob:
    """--discover: the images, the directions' search and names, the contact sheet's edits."""
    steps = args.n_test_step if args.n_test_step is not None else config.edit.n_test_step
    denoising = Denoising(steps, config.edit.eta if args.eta is None else args.eta, args.h_policy, args.seed,
                          batches["edit_batch_size"])
    sheet = {} if args.edit_img_number is None else {"sheet_points": args.edit_img_number}
    return DiscoverJob(_inverting(args, config, t_0, batches["bs_train"], "discover"), args.img_path, args.data_dir,
                       args.boundary_dir, denoising, n_images=args.n_discover_img, n_directions=args.n_directions,
                       prefix=args.discover_prefix, oversample=args.oversample, n_power_iter=args.n_power_iter,
                       sheet_images=args.sheet_images, sheet_range=args.sheet_range, seed=args.seed,
                       overwrite=args.ni, region=_fitting_region(args), **sheet)


def _job(args: argparse.Namespace, config: Config, mode: str, batches: dict):
    if args.within is not None and mode != "boundary_search":
        raise UserError(f"--within is for --boundary_search, not --{mode}")
    if mode in EDIT_MODES:
        return _edit_job(args, config, mode, batches)
    if args.edit or args.grid:
        raise UserError(f"--edit and --grid are for the edit modes, not --{mode}")
    if args.region is not None and mode not in ("boundary_search", "discover"):
        raise UserError(f"--region is for the edit modes, --boundary_search and --discover, not --{mode}")
    t_0 = args.t_0 if args.t_0 is not None else config.edit.t_0
    if mode == "discover":
        return _discover_job(args, config, t_0, batches)
    if mode == "radius":
        n_inv_step = args.n_inv_step if args.n_inv_step is not None else config.edit.n_inv_step
        return RadiusJob(args.img_path, args.data_dir or (Path(config.data.data_dir) if config.data.data_dir else None),
                         args.n_test_img, args.radius_step, args.radius_eps, batches["bs_test"], args.seed,
                         attribute=args.edit_attr,
                         attr_file=args.attr_file or (Path(config.data.attr_file) if config.data.attr_file else None),
                         n_train_img=args.n_train_img, n_test_img=args.n_test_img, n_inv_step=n_inv_step,
                         svm_c=args.svm_c)
    return SearchJob(_inverting(args, config, t_0, batches["bs_train"], mode), args.edit_attr, args.data_dir,
                     args.attr_file, args.pos_dir, args.neg_dir, args.n_train_img, args.n_test_img, args.svm_c,
                     args.balance, args.boundary_dir, args.seed, args.ni, within=args.within,
                     within_prefix=args.discover_prefix, region=_fitting_region(args))


def _fitting_region(args: argparse.Namespace) -> str | None:
    """--boundary_search / --discover --region: the region each SVM is fitted on, or the directions
    are found in (z on its pixels, h on its share of each bottleneck cell); the edit's other region
    flags do not apply."""
    if args.region_h != "cells" or args.feather != 2.0 or args.region_method != "blend":
        raise UserError("--region_h, --feather and --region_method are for edits; a search or a discovery takes z on "
                        "the region's pixels and h on its share of each bottleneck cell")
    return args.region


def resolve_settings(args: argparse.Namespace, config: Config, default_batch_size: int = 8) -> Settings:
    """The settings of a parsed command line: run-level defaults from the config (t_0 from the
    boundary file when one is used), batch sizes not given set to ``default_batch_size`` (the
    device's), boundaries found, ranges checked. ``args`` is not changed."""
    mode = next(m for m in MODES if getattr(args, m))
    batches = {name: getattr(args, name) or default_batch_size for name in ("bs_train", "bs_test", "edit_batch_size")}
    run = RunSettings(config=config, exp=args.exp, model_path=args.model_path, cache_dir=args.cache_dir,
                      no_cache=args.no_cache, device=args.device, precision=args.precision, overwrite=args.ni,
                      dist_timeout=args.dist_timeout)
    return Settings(run, _job(args, config, mode, batches))


def check_serve_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--serve takes only the flags the app honours (``SERVE_FLAGS``); any other flag given (a value
    other than its default) is refused in one line, rather than silently ignored."""
    for action in parser._actions:  # argparse keeps no other record of the flags
        name = action.dest
        if name in SERVE_FLAGS or name == "help" or not hasattr(args, name):
            continue
        if getattr(args, name) != action.default:
            flag = action.option_strings[0] if action.option_strings else name
            raise UserError(f"--serve does not use {flag}: the page sets each edit's own settings; drop it")
