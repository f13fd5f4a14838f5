"""A run's settings: the command line resolved once, against the config and the boundary files,
into a frozen, typed object that the runner reads and nothing mutates."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from runners.edit_description import MOVED, Denoising, EditRequest, Move
from utils.config import Config, latent_shapes
from utils.errors import UserError
from utils.io.boundary_files import discover_boundaries, load_boundary

log = logging.getLogger(__name__)

MODES = ("boundary_search", "edit_image_boundary", "unconditional", "radius")
EDIT_MODES = ("edit_image_boundary", "unconditional")


@dataclass(frozen=True)
class Settings:
    """Every run-level choice, resolved (config defaults filled in, batch sizes set for the device,
    ranges checked); complete when built. Field names are the command line's flags; ``edit`` is
    the edit modes' request (``runners.edit_description``), None in the other modes."""
    mode: str
    config: Config
    exp: Path
    seed: int
    # model and run folder
    model_path: str | None
    cache_dir: Path | None
    no_cache: bool
    device: str
    precision: str
    ni: bool
    force: bool
    dist_timeout: int
    # diffusion
    t_0: int
    n_inv_step: int
    n_test_step: int
    n_iter: int
    eta: float
    h_policy: str
    # boundary search
    edit_attr: str | None
    data_dir: Path | None
    attr_file: Path | None
    pos_dir: Path | None
    neg_dir: Path | None
    n_train_img: int
    n_test_img: int
    svm_c: float
    balance: bool
    boundary_dir: Path
    align_face: bool | None
    # editing
    img_path: Path | None
    edit: EditRequest | None
    n_samples: int
    gif: bool
    save_tensors: bool
    # mixing step
    radius_step: int
    radius_eps: float
    # batch sizes
    bs_train: int
    bs_test: int
    edit_batch_size: int

    def to_dict(self) -> dict:
        """The settings as plain values, for summary.json."""
        plain = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "config":
                value = value.name
            elif f.name == "edit" and value is not None:
                value = _plain(dataclasses.asdict(value))
            elif isinstance(value, Path):
                value = str(value)
            plain[f.name] = value
        return plain

    def boundary_files(self) -> list[Path]:
        """The boundary files the edit names explicitly (not those looked up by name)."""
        if self.edit is None:
            return []
        named = [p for m in self.edit.moves for p in (m.paths or {}).values()]
        return named + [p for paths in self.edit.held_paths.values() for p in paths]


def _plain(value):
    """Paths as text, containers as lists and dicts (for JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _first_boundaries(args: argparse.Namespace, config: Config, shapes: dict, attribute: str | None
                      ) -> tuple[str, int, dict[str, Path]]:
    """The boundaries of ``attribute`` (None: the only attribute there is) in --boundary_dir, as
    the original README's commands find them: the newest fitted, preferring the run's t_0 (the
    config's unless --t_0 is given). Returns (attribute, t_0, {space: file})."""
    found = discover_boundaries(args.boundary_dir, config.name, shapes, attribute, args.t_0 or config.edit.t_0)
    if found is None and args.t_0 is None:
        found = discover_boundaries(args.boundary_dir, config.name, shapes, attribute)
    if found is None:
        raise UserError(f"no --boundary_h/--boundary_z given and no boundary for config {config.name}"
                        f"{' and ' + attribute if attribute else ''} in {args.boundary_dir}; "
                        "run --boundary_search first or pass the files")
    log.info("using the %s boundaries at t_0 %d: %s", found.attribute, found.t_0,
             ", ".join(str(p) for p in found.paths.values()))
    return found.attribute, found.t_0, dict(found.paths)


def _edit_request(args: argparse.Namespace, config: Config, shapes: dict, batch_size: int
                  ) -> tuple[EditRequest, int]:
    """The edit modes' request and t_0 (--t_0, else that of the first attribute's boundaries).

    Two spellings: ``--edit ATTR=START:END`` (repeatable; ``ATTR=auto``, ``ATTR=VALUE``) or the
    original's ``--edit_attr A --start_distance S --end_distance E`` (or named files
    ``--boundary_z/--boundary_h``)."""
    edit = {name: getattr(args, name) if getattr(args, name) is not None else getattr(config.edit, name)
            for name in ("start_distance", "end_distance", "edit_img_number")}
    if args.edit:
        clash = [flag for flag, given in (("--edit_attr", args.edit_attr), ("--boundary_z", args.boundary_z),
                                          ("--boundary_h", args.boundary_h), ("--start_distance", args.start_distance),
                                          ("--end_distance", args.end_distance)) if given is not None]
        if clash:
            raise UserError(f"--edit names each attribute with its range; drop {clash[0]}")
        moves = tuple(Move.parse(text) for text in args.edit)
        _, t_0, _ = _first_boundaries(args, config, shapes, moves[0].attribute)
        t_0 = args.t_0 if args.t_0 is not None else t_0
    else:
        if (edit["start_distance"] == "auto") != (edit["end_distance"] == "auto"):
            raise UserError("auto distances take both ends: --start_distance auto --end_distance auto")
        auto = edit["start_distance"] == "auto"
        start, end = (None, None) if auto else (edit["start_distance"], edit["end_distance"])
        if args.boundary_h is not None or args.boundary_z is not None:
            paths = {s: p for s, p in (("z", args.boundary_z), ("h", args.boundary_h)) if p is not None}
            missing = [s for s in MOVED[args.edit_space] if s not in paths]
            if missing:
                raise UserError(f"--edit_space {args.edit_space} needs --boundary_{missing[0]}")
            t_0 = args.t_0 if args.t_0 is not None else load_boundary(next(iter(paths.values())), shapes).t_0
            move = Move(args.edit_attr or "", start, end, auto, paths)
        else:
            attribute, t_0, _ = _first_boundaries(args, config, shapes, args.edit_attr)
            t_0 = args.t_0 if args.t_0 is not None else t_0
            move = Move(attribute, start, end, auto)
        moves = (move,)
        if not auto:
            move.values(1)  # ranges too wide for float64 are refused before any work
    held = tuple(a.strip() for a in (args.condition_attr or "").split(",") if a.strip())
    held_paths = {s: tuple(p) for s, p in (("z", args.condition_z), ("h", args.condition_h)) if p}
    denoising = Denoising(args.n_test_step if args.n_test_step is not None else config.edit.n_test_step,
                          args.eta, args.h_policy, args.seed, batch_size)
    return EditRequest(moves, denoising, edit["edit_img_number"], held, held_paths, args.edit_space,
                       args.edit_unit, args.grid), t_0


def resolve_settings(args: argparse.Namespace, config: Config, default_batch_size: int = 8) -> Settings:
    """The settings of a parsed command line: run-level defaults from the config (t_0 from the
    boundary file when one is used), batch sizes not given set to ``default_batch_size`` (the
    device's), boundaries found, ranges checked. ``args`` is not changed."""
    mode = next(m for m in MODES if getattr(args, m))
    shapes = latent_shapes(config)  # boundary files for another model are passed over from their headers
    batch = {name: getattr(args, name) or default_batch_size for name in ("bs_train", "bs_test", "edit_batch_size")}
    request, t_0 = None, args.t_0
    if mode in EDIT_MODES:
        request, t_0 = _edit_request(args, config, shapes, batch["edit_batch_size"])
    elif args.edit or args.grid:
        raise UserError(f"--edit and --grid are for the edit modes, not --{mode}")
    elif t_0 is None:
        t_0 = config.edit.t_0
    if mode == "edit_image_boundary" and args.img_path is None:
        raise UserError("--edit_image_boundary needs --img_path")
    steps = {name: getattr(args, name) if getattr(args, name) is not None else getattr(config.edit, name)
             for name in ("n_inv_step", "n_test_step")}
    T = config.diffusion.num_diffusion_timesteps
    if not 1 <= t_0 <= T - 1:
        raise UserError(f"--t_0 must be in [1, {T - 1}], got {t_0}")
    for name in ("n_inv_step", "n_test_step"):
        limit = T - t_0 if (mode == "unconditional" and name == "n_inv_step") else t_0 + 1
        if not 2 <= steps[name] <= limit:
            raise UserError(f"--{name} must be in [2, {limit}], got {steps[name]}")
    return Settings(
        mode=mode, config=config, exp=args.exp, seed=args.seed, model_path=args.model_path, cache_dir=args.cache_dir,
        no_cache=args.no_cache, device=args.device, precision=args.precision, ni=args.ni, force=args.force,
        dist_timeout=args.dist_timeout, t_0=t_0, n_iter=args.n_iter, eta=args.eta, h_policy=args.h_policy,
        edit_attr=args.edit_attr, data_dir=args.data_dir, attr_file=args.attr_file, pos_dir=args.pos_dir,
        neg_dir=args.neg_dir, n_train_img=args.n_train_img, n_test_img=args.n_test_img, svm_c=args.svm_c,
        balance=args.balance,
        boundary_dir=args.boundary_dir, align_face=None if args.align_face is None else bool(args.align_face),
        img_path=args.img_path, edit=request, n_samples=args.n_samples, gif=args.gif,
        save_tensors=args.save_tensors, radius_step=args.radius_step, radius_eps=args.radius_eps, **steps, **batch)
