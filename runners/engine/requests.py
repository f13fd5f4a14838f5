"""What a front end asks the engine for: typed, frozen requests, checked here and only here.

The command line, the web app, the evaluation and the benchmarks build these objects and hand them
to ``runners.engine.Engine``; nothing else decides whether a request is valid. Every check that
needs no model runs in ``check_*`` before any model is loaded, and says what exists or what to run.

    request = EditRequest((Move("thick", -5, 0), Move("slant", 2, -2)), Denoising(n_test_step=40), k=3)
    check_request(request)                       # limits, names, units, the grid, the work it asks for

Notation: M moved attributes, H held ones, K edits per image (a 2-D sweep has K = K_a * K_b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from utils.config import MAX_EDIT_IMG_NUMBER
from utils.core.diffusion import H_POLICIES, HPolicy
from utils.core.region import MAX_JACOBIAN_ENTRIES
from utils.core.spaces import MOVED, EditSpace
from utils.errors import UserError

#: absolute: signed distances v.n (the original's); relative: -1 / +1 at each boundary's class
#: medians; shift: changes in the relative unit from where each image is (0: leave it).
UNITS = ("absolute", "relative", "shift")
#: Most attributes one edit moves or holds (each is a file read and a row of G).
MAX_ATTRIBUTES = 32
#: Most points along one edit's moves (--edit_img_number, the config's edit.edit_img_number): every
#: edit of an image is held in memory (as 8-bit pixels) until its grid is written.
MAX_POINTS = MAX_EDIT_IMG_NUMBER
#: Most edits of one image in all (a 2-D sweep has K x K of them): the grid picture of one image holds
#: them all (at 256 px, 1,000 edits are about 200 MB of 8-bit pixels).
MAX_EDITS = 1000
#: Most pixels one grid picture may have (2 x 10^8: about 600 MB as 8-bit RGB while it is drawn).
MAX_GRID_PIXELS = 200_000_000
#: The largest |distance| an edit may ask for: beyond it the latents leave float32's range
#: (a 256-px latent's projection is of the order of sqrt(D) < 500).
MAX_DISTANCE = 1e12


def spaced(start: float, end: float, k: int) -> tuple[float, ...]:
    """K values evenly spaced from ``start`` to ``end`` (float64, as the original spaces distances)."""
    return tuple(torch.linspace(start, end, k, dtype=torch.float64).tolist())


def check_distance(value: float, what: str) -> float:
    """``value`` as a finite float within +-``MAX_DISTANCE``; UserError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > MAX_DISTANCE:
        raise UserError(f"{what} must be a finite number within +-{MAX_DISTANCE:g}, got {value!r}")
    return float(value)


def check_steps(n_steps: int, t_0: int, what: str = "--n_test_step") -> int:
    """A denoising or inversion grid of ``n_steps`` points up to ``t_0``: in [2, t_0 + 1]."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not 2 <= n_steps <= t_0 + 1:
        raise UserError(f"{what} must be in [2, {t_0 + 1}] at t_0 {t_0}, got {n_steps!r}")
    return n_steps


def check_t_0(t_0: int, num_timesteps: int) -> int:
    if isinstance(t_0, bool) or not isinstance(t_0, int) or not 1 <= t_0 <= num_timesteps - 1:
        raise UserError(f"--t_0 must be in [1, {num_timesteps - 1}], got {t_0!r}")
    return t_0


@dataclass(frozen=True)
class Move:
    """One attribute of a request: K values from ``start`` to ``end`` (equal: one value, held at
    every edit), or the ``auto`` range of each moved space. ``paths``: the attribute's boundary
    files named explicitly ({space: file}, e.g. --boundary_z), else they are looked up by name."""
    attribute: str
    start: float | None = None
    end: float | None = None
    auto: bool = False
    paths: Mapping[str, Path] | None = None

    @classmethod
    def parse(cls, text: str) -> "Move":
        """``ATTR=START:END``, ``ATTR=auto`` or ``ATTR=VALUE`` (the command line's ``--edit``)."""
        name, sep, value = str(text).partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"--edit takes ATTR=START:END, ATTR=auto or ATTR=VALUE, got {text[:40]!r}")
        if value.strip() == "auto":
            return cls(name, auto=True)
        parts = value.split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(parts) not in (1, 2) or len(numbers) != len(parts) or not all(map(math.isfinite, numbers)):
            raise UserError(f"--edit {name}=...: the value must be START:END, auto or one finite number, "
                            f"got {value[:40]!r}")
        return cls(name, numbers[0], numbers[-1])

    def values(self, k: int) -> tuple[float, ...]:
        """The K requested values (not for ``auto``)."""
        if not math.isfinite(self.end - self.start):
            raise UserError(f"{self.attribute}: {self.start} and {self.end} lie too far apart to be spaced in float64")
        return spaced(self.start, self.end, k)


@dataclass(frozen=True)
class Denoising:
    """How each edit is denoised from t_0: ``n_test_step`` grid points, DDIM ``eta``, the h
    policy, the seed of the edit noise, and how many edits share a batch (``batch_size``;
    results do not depend on it)."""
    n_test_step: int
    eta: float = 1.0
    h_policy: HPolicy = "lagged"
    seed: int = 1234
    batch_size: int = 8


#: How a region confines h, the spatial bottleneck: to the share of each cell the region covers, or
#: not at all (h is then not moved; docs/algorithm.md section 10 has the measurement that chose).
REGION_H = ("cells", "none")
#: The widest feather (in pixels) between a region and the kept outside.
MAX_FEATHER = 16.0
#: How the outside of a region is kept: ``blend`` sets it back on the unedited run after every
#: denoising step; ``loco`` keeps the z move off the directions that change the outside of the
#: predicted clean image most (LOCO-Edit, Chen et al. 2024; z only, an exact Jacobian: small images).
REGION_METHODS = ("blend", "loco")
#: The most directions ``loco`` may keep the move off: the latent values of the largest image its
#: exact Jacobian affords (``utils.core.region.MAX_JACOBIAN_ENTRIES``, 32 x 32 x 3).
MAX_REGION_RANK = math.isqrt(MAX_JACOBIAN_ENTRIES)


@dataclass(frozen=True)
class Region:
    """The part of each image an edit may change (``--region``): ``spec`` a mask image (white:
    editable), a box ``x0,y0,x1,y1`` in fractions of the image, or a part of the image by name
    (``mouth``, ``eyes``, ``hair``, ... from its parts file); ``h``: how the bottleneck is confined
    (``REGION_H``); ``feather``: the pixels over which the outside's pixels go from edited to kept."""
    spec: str
    h: str = "cells"
    feather: float = 2.0
    method: str = "blend"
    rank: int = 32  # loco: the directions of the outside's Jacobian the move is kept off


@dataclass(frozen=True)
class EditRequest:
    """What a front end asks for. ``k``: the number of points along the moves (a ``grid`` sweeps
    exactly two attributes over k x k points). ``held``: attribute names kept where each image
    has them ("auto" among them: those the boundary folder's atlas suggests); ``held_paths``: held
    boundary files named explicitly ({space: files}). ``space``: both, z or h. ``unit``: absolute
    (signed distances v.n, as the original defines them) or relative (-1 / +1 at each boundary's
    class medians, in each space). ``force``: use boundaries of another t_0 or checkpoint, and
    holds that lengthen the move beyond ``MAX_HOLD_RATIO``. ``region``: the part of each image the
    edit may change (``Region``; None: the whole image)."""
    moves: tuple[Move, ...]
    denoising: Denoising
    k: int = 1
    held: tuple[str, ...] = ()
    held_paths: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    space: EditSpace = "both"
    unit: str = "absolute"
    grid: bool = False
    force: bool = False
    region: Region | None = None

    @property
    def n_edits(self) -> int:
        """K, the edits of each image: k, or k x k for a grid."""
        return self.k * self.k if self.grid else self.k


@dataclass(frozen=True)
class EditLimits:
    """Bounds a front end may tighten (the web app's sweeps are shorter than the command line's)."""
    max_points: int = MAX_POINTS
    max_edits: int = MAX_EDITS


def _check_names(request: EditRequest) -> None:
    names = [m.attribute.lower() for m in request.moves if m.paths is None]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            raise UserError(f"{name} is moved twice: give it one range")
    for name in request.held:
        if not isinstance(name, str):
            raise UserError(f"held attributes are names, got {type(name).__name__}")
        if name.lower() in names:
            raise UserError(f"{name} cannot be moved and held at once")


def _check_values(request: EditRequest) -> None:
    for move in request.moves:
        if move.auto:
            continue
        for value, end in ((move.start, "start"), (move.end, "end")):
            check_distance(value, f"the {end} of {move.attribute or 'the edit'}")
        move.values(1)  # ranges too wide for float64 are refused before any work


def check_request(request: EditRequest, limits: EditLimits = EditLimits()) -> EditRequest:
    """``request`` if it can be edited, else UserError in one line: nothing to move, too many
    attributes, an unknown space, unit or h policy, a K outside [1, ``limits.max_points``], a grid of
    other than two attributes, more than ``limits.max_edits`` edits per image, a distance that is not
    finite or beyond ``MAX_DISTANCE``, a name moved twice or moved and held. No file is read."""
    if not request.moves:
        raise UserError("nothing to edit: name at least one attribute")
    if isinstance(request.held, str):  # before counting: a string's length counts characters
        raise UserError("held attributes are a list of names, not one string")
    if len(request.moves) + len(request.held) > MAX_ATTRIBUTES:
        raise UserError(f"at most {MAX_ATTRIBUTES} attributes can be moved and held at once, "
                        f"got {len(request.moves) + len(request.held)}")
    if request.space not in MOVED:
        raise UserError(f"unknown space {request.space!r} (choices: {', '.join(MOVED)})")
    if request.unit not in UNITS:
        raise UserError(f"unknown unit {request.unit!r} (choices: {', '.join(UNITS)})")
    if request.denoising.h_policy not in H_POLICIES:
        raise UserError(f"unknown h policy {request.denoising.h_policy!r} (choices: {', '.join(H_POLICIES)})")
    if isinstance(request.k, bool) or not isinstance(request.k, int) or not 1 <= request.k <= limits.max_points:
        raise UserError(f"the number of edits must be in [1, {limits.max_points}], got {request.k!r}")
    if request.unit == "shift" and any(m.auto for m in request.moves):
        raise UserError("auto ranges are where the classes lie, not changes: use --edit_unit absolute or relative "
                        "with auto")
    if request.grid and len(request.moves) != 2:
        raise UserError(f"a grid sweeps exactly two attributes, got {len(request.moves)}")
    if request.n_edits > limits.max_edits:
        raise UserError(f"{request.k} x {request.k} = {request.n_edits} edits per image is more than "
                        f"{limits.max_edits}; lower --edit_img_number (at most {math.isqrt(limits.max_edits)} "
                        "with --grid)")
    _check_names(request)
    _check_values(request)
    if request.region is not None:
        _check_region(request.region)
        if request.region.h == "none" and request.space == "h":
            raise UserError("--region_h none leaves h as it is: move z too (--edit_space both or z)")
    return request


def _check_region(region: Region) -> None:
    if not isinstance(region.spec, str) or not region.spec.strip() or len(region.spec) > 4096:
        raise UserError("--region takes a mask image, a box x0,y0,x1,y1 or a part's name")
    if region.h not in REGION_H:
        raise UserError(f"unknown --region_h {region.h!r} (choices: {', '.join(REGION_H)})")
    if region.method not in REGION_METHODS:
        raise UserError(f"unknown --region_method {region.method!r} (choices: {', '.join(REGION_METHODS)})")
    if region.method == "loco" and region.h != "none":
        raise UserError("--region_method loco keeps z's move off the outside's directions; h has none: "
                        "pass --region_h none")
    if isinstance(region.rank, bool) or not isinstance(region.rank, int) or not 1 <= region.rank <= MAX_REGION_RANK:
        raise UserError(f"--region_rank must be a whole number in [1, {MAX_REGION_RANK}], got {region.rank!r}")
    if isinstance(region.feather, bool) or not isinstance(region.feather, (int, float)) \
            or not 0 <= region.feather <= MAX_FEATHER:
        raise UserError(f"--feather must be in [0, {MAX_FEATHER:g}] pixels, got {region.feather!r}")


# ---------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Inverting:
    """How images reach t_0: the mixing step, the inversion grid's points, images per batch."""
    t_0: int
    n_inv_step: int
    batch_size: int = 8


@dataclass(frozen=True)
class SearchJob:
    """A boundary search (``--boundary_search``): ``attributes`` one name, ``a,b,c`` or ``all`` (or
    None with ``pos_dir``/``neg_dir``); the images and attribute file; the split; the SVM's C and
    class balancing; where the files go (``overwrite``: --ni); ``within``: a folder of discovered
    directions (``--discover``), each SVM then fitted on the latents' coordinates in the subspace
    they span (runners/engine/within.py); ``region``: the part of each image the SVMs are fitted on."""
    inverting: Inverting
    attributes: str | None
    data_dir: Path | None
    attr_file: Path | None
    pos_dir: Path | None
    neg_dir: Path | None
    n_train_img: int
    n_test_img: int
    svm_c: float
    balance: bool
    boundary_dir: Path
    seed: int
    overwrite: bool = False
    within: Path | None = None
    #: The names of the directions ``within`` is taken from (``<prefix>_NN``, as --discover wrote them).
    within_prefix: str = "pc"
    #: --region: fit on each image's region alone (``Region.spec``: a mask image, a box or a part's
    #: name), z on its pixels and h on its share of each bottleneck cell; None: the whole latents.
    region: str | None = None


@dataclass(frozen=True)
class EditJob:
    """Real images edited (``--edit_image_boundary``): a file, a folder or a glob; the edit; K
    sequences ``n_iter`` times each; face alignment (None: the config's); extra outputs."""
    inverting: Inverting
    images: Path
    request: EditRequest
    boundary_dir: Path
    align_face: bool | None = None
    n_iter: int = 1
    gif: bool = False
    save_tensors: bool = False


@dataclass(frozen=True)
class SampleJob:
    """Sampled latents edited (``--unconditional``): ``n_samples`` latents reached from noise in
    ``inverting.n_inv_step`` DDIM steps, seeded from ``seed``, then the edit."""
    inverting: Inverting
    request: EditRequest
    boundary_dir: Path
    n_samples: int = 1
    seed: int = 1234
    n_iter: int = 1
    gif: bool = False
    save_tensors: bool = False


@dataclass(frozen=True)
class RadiusJob:
    """The mixing-step analysis (``--radius``): ``n_images`` real images (``images``: a file,
    folder or glob; else the data folder) against as many noise samples, candidates every
    ``step`` timesteps, ``epsilon`` the relative radius difference counted as mixed. With
    ``attribute`` (``--edit_attr``) also the t_0 report (runners/engine/t0_report.py) at the same
    candidates: ``n_train_img`` + ``n_test_img`` labelled images of ``attr_file`` inverted at each,
    in ``n_inv_step`` points, SVMs at C ``svm_c``."""
    images: Path | None
    data_dir: Path | None
    n_images: int
    step: int
    epsilon: float
    batch_size: int
    seed: int
    attribute: str | None = None
    attr_file: Path | None = None
    n_train_img: int = 20
    n_test_img: int = 20
    n_inv_step: int = 40
    svm_c: float = 1.0


Job = SearchJob | EditJob | SampleJob | RadiusJob
