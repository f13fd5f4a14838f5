"""A run's settings: the command line resolved once, against the config and the boundary files,
into a frozen, typed object that the runner reads and nothing mutates."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from runners.editor import MOVED, BoundaryChoice, Directions, EditPlan, EditSpace, auto_distances, restrict
from utils.config import Config, latent_shapes
from utils.errors import UserError
from utils.io.boundary_files import discover_boundaries, load_boundary

log = logging.getLogger(__name__)

MODES = ("boundary_search", "edit_image_boundary", "unconditional", "radius")
EDIT_MODES = ("edit_image_boundary", "unconditional")


@dataclass(frozen=True)
class Settings:
    """Every run-level choice, resolved (config defaults filled in, boundaries found, ranges
    checked). Field names are the command line's flags; ``choice`` holds the boundary files."""
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
    choice: BoundaryChoice
    edit_space: EditSpace
    start_distance: float | str  # a number, or "auto" (both ends): see ``edit_plan``
    end_distance: float | str
    edit_img_number: int
    n_samples: int
    gif: bool
    save_tensors: bool
    # mixing step
    radius_step: int
    radius_eps: float
    # batch sizes (None until ``with_batch_sizes``: their default depends on the device)
    bs_train: int | None = None
    bs_test: int | None = None
    edit_batch_size: int | None = None

    def with_batch_sizes(self, default: int) -> "Settings":
        """The settings with every batch size not given set to ``default``."""
        return dataclasses.replace(self, **{name: getattr(self, name) or default
                                            for name in ("bs_train", "bs_test", "edit_batch_size")})

    def edit_plan(self, directions: Directions) -> EditPlan:
        """The edit's plan; with ``auto`` distances each moved space gets K distances spanning its
        own boundary's classes (``runners.editor.auto_distances``)."""
        if self.start_distance == "auto":
            distances, h_distances = auto_distances(directions, self.edit_img_number)
        else:
            distances, h_distances = EditPlan.spaced(self.start_distance, self.end_distance, self.edit_img_number), None
        return EditPlan(distances, self.n_test_step, self.eta, self.h_policy, self.seed, self.edit_batch_size,
                        h_distances)

    def to_dict(self) -> dict:
        """The settings as plain values, for summary.json."""
        plain = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "config":
                value = value.name
            elif f.name == "choice":
                value = {k: (str(v) if isinstance(v, Path) else [str(p) for p in v])
                         for k, v in dataclasses.asdict(value).items() if v}
            elif isinstance(value, Path):
                value = str(value)
            plain[f.name] = value
        return plain


def _discover(args: argparse.Namespace, config: Config, shapes: dict) -> tuple[BoundaryChoice, str | None, int | None]:
    """The boundary files named on the command line, or found in --boundary_dir; with the
    attribute and t_0 of the ones found (None when files were named)."""
    if args.boundary_h is not None or args.boundary_z is not None:
        return BoundaryChoice(z=args.boundary_z, h=args.boundary_h), None, None
    # As in the original README's unconditional command: no boundary named, use the newest fitted
    # ones, preferring those fitted at the run's t_0 (the config's default unless --t_0 is given).
    found = discover_boundaries(args.boundary_dir, config.name, shapes, args.edit_attr, args.t_0 or config.edit.t_0)
    if found is None and args.t_0 is None:
        found = discover_boundaries(args.boundary_dir, config.name, shapes, args.edit_attr)
    if found is None:
        raise UserError(f"no --boundary_h/--boundary_z given and no boundary for config {config.name}"
                        f"{' and ' + args.edit_attr if args.edit_attr else ''} in {args.boundary_dir}; "
                        "run --boundary_search first or pass the files")
    log.info("using the %s boundaries at t_0 %d: %s", found.attribute, found.t_0,
             ", ".join(str(p) for p in found.paths.values()))
    return BoundaryChoice(z=found.paths.get("z"), h=found.paths.get("h")), found.attribute, found.t_0


def _conditions(args: argparse.Namespace, config: Config, shapes: dict, t_0: int,
                choice: BoundaryChoice) -> BoundaryChoice:
    """``choice`` with the boundaries of --condition_attr (found at t_0) and --condition_z/_h."""
    held = {"z": list(args.condition_z or []), "h": list(args.condition_h or [])}
    for attribute in [a.strip() for a in (args.condition_attr or "").split(",") if a.strip()]:
        found = discover_boundaries(args.boundary_dir, config.name, shapes, attribute, t_0)
        if found is None:
            raise UserError(f"--condition_attr {attribute}: no boundary for config {config.name} at t_0 "
                            f"{t_0} in {args.boundary_dir}")
        for space, path in found.paths.items():
            held[space].append(path)
    return dataclasses.replace(choice, conditions_z=tuple(held["z"]), conditions_h=tuple(held["h"]))


def resolve_settings(args: argparse.Namespace, config: Config) -> Settings:
    """The settings of a parsed command line: run-level defaults from the config (t_0 from the
    boundary file when one is used), boundaries found, ranges checked. ``args`` is not changed."""
    mode = next(m for m in MODES if getattr(args, m))
    shapes = latent_shapes(config)  # boundary files for another model are passed over from their headers
    choice, edit_space, t_0 = BoundaryChoice(), args.edit_space, args.t_0
    if mode in EDIT_MODES:
        choice, found_attribute, found_t_0 = _discover(args, config, shapes)
        if t_0 is None:
            t_0 = found_t_0 if found_t_0 is not None else load_boundary(choice.z or choice.h, shapes).t_0
        if found_attribute is not None and edit_space == "both" and (choice.z is None) != (choice.h is None):
            edit_space = "z" if choice.z is not None else "h"  # only one space was fitted
        choice = restrict(_conditions(args, config, shapes, t_0, choice), edit_space)
        missing = [s for s in MOVED[edit_space] if choice.primary(s) is None]
        if missing:
            raise UserError(f"--edit_space {edit_space} needs --boundary_{missing[0]}")
    elif t_0 is None:
        t_0 = config.edit.t_0
    if mode == "edit_image_boundary" and args.img_path is None:
        raise UserError("--edit_image_boundary needs --img_path")
    edit = {name: getattr(args, name) if getattr(args, name) is not None else getattr(config.edit, name)
            for name in ("n_inv_step", "n_test_step", "start_distance", "end_distance", "edit_img_number")}
    T = config.diffusion.num_diffusion_timesteps
    if not 1 <= t_0 <= T - 1:
        raise UserError(f"--t_0 must be in [1, {T - 1}], got {t_0}")
    for name in ("n_inv_step", "n_test_step"):
        limit = T - t_0 if (mode == "unconditional" and name == "n_inv_step") else t_0 + 1
        if not 2 <= edit[name] <= limit:
            raise UserError(f"--{name} must be in [2, {limit}], got {edit[name]}")
    if (edit["start_distance"] == "auto") != (edit["end_distance"] == "auto"):
        raise UserError("auto distances take both ends: --start_distance auto --end_distance auto")
    if edit["start_distance"] != "auto" and not math.isfinite(edit["end_distance"] - edit["start_distance"]):
        raise UserError(f"--start_distance {edit['start_distance']} and --end_distance {edit['end_distance']} "
                        "lie too far apart to be spaced in float64")
    return Settings(
        mode=mode, config=config, exp=args.exp, seed=args.seed, model_path=args.model_path, cache_dir=args.cache_dir,
        no_cache=args.no_cache, device=args.device, precision=args.precision, ni=args.ni, force=args.force,
        dist_timeout=args.dist_timeout, t_0=t_0, n_iter=args.n_iter, eta=args.eta, h_policy=args.h_policy,
        edit_attr=args.edit_attr, data_dir=args.data_dir, attr_file=args.attr_file, pos_dir=args.pos_dir,
        neg_dir=args.neg_dir, n_train_img=args.n_train_img, n_test_img=args.n_test_img, svm_c=args.svm_c,
        balance=args.balance,
        boundary_dir=args.boundary_dir, align_face=None if args.align_face is None else bool(args.align_face),
        img_path=args.img_path, choice=choice, edit_space=edit_space, n_samples=args.n_samples, gif=args.gif,
        save_tensors=args.save_tensors, radius_step=args.radius_step, radius_eps=args.radius_eps,
        bs_train=args.bs_train, bs_test=args.bs_test, edit_batch_size=args.edit_batch_size, **edit)
