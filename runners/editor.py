"""The editing engine: one loaded model with its latent cache and timestep grid, and the operations
every front end uses -- the command-line modes, ``scripts/evaluate_edits.py``, the benchmark and
the web app. No argparse and no file writing here; reading images and boundary files is allowed.

    editor = Editor(load_model("digits.yml"), t_0=200, n_inv_step=40)
    latents, _ = editor.invert(images)                       # (N, C, H, W) in [-1, 1]; cached
    directions = editor.directions(BoundaryChoice(z=..., h=...))
    plan = EditPlan(distances=(-3.0, 0.0, 3.0), n_test_step=40)
    for batch in editor.edits(latents, directions, plan, seed_keys=[(image_key(img),) for img in images]):
        ...                                                  # batch.items[j] = (image b, distance k)

An image is inverted once (here and in the latent cache) and can then be edited any number of
times, one distance or many: edit k of iteration i of image b is denoised from its own generator,
seeded ``item_seed(plan.seed, *seed_keys[b], i, k, domain=plan.seed_domain)`` (``utils.core.seeds``:
seed key (image_key(image),) for a real image, (j,) for sampled latent j), so that the pixels
depend on neither batch size, nor order, nor the other images edited with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from models.loading import LoadedModel
from utils.config import Config
from utils.core.batching import batch_regime, batch_slices, pair_lone
from utils.core.boundary import latent_distance
from utils.core.diffusion import HPolicy, Inversion, generate, invert, sample_latents, sampling_pairs, timestep_grid
from utils.core.editing import EditBatch, condition_normal, iter_edits, reconstruct
from utils.core.mixing import radius_curves
from utils.core.seeds import EDIT, SAMPLE, item_seed
from utils.errors import UserError
from utils.io.boundary_files import BoundaryRecord, auto_range, load_boundary
from utils.io.face_align import INSTALL as FACE_INSTALL, FaceAligner, FaceExtraMissing
from utils.io.images import image_to_tensor, open_image
from utils.io.latent_cache import LatentCache

log = logging.getLogger(__name__)

Space = Literal["z", "h"]
EditSpace = Literal["both", "z", "h"]
MOVED: dict[str, tuple[Space, ...]] = {"both": ("z", "h"), "z": ("z",), "h": ("h",)}  # --edit_space -> spaces


class CallCounter:
    """Wraps the network so that progress advances with every call (observation only, except that
    ``on_call`` may raise to cancel the work in progress: the web app's stop button).

    Inside ``progress(total, desc)`` each call counts, shown or not, and ``on_call(done, total)``
    hears of it."""

    def __init__(self, net: Callable, show: bool = True):
        self.net, self.show = net, show
        self.bar: tqdm | None = None
        self.done = 0
        self.on_call: Callable[[int, int], None] | None = None

    def __call__(self, x: Tensor, t, h_override: Tensor | None = None):
        out = self.net(x, t, h_override=h_override)
        if self.bar is not None:
            self.done += 1
            self.bar.update(1)
            if self.on_call is not None:
                self.on_call(self.done, self.bar.total)
        return out

    @contextlib.contextmanager
    def progress(self, total: int, desc: str) -> Iterator[None]:
        """A bar of ``total`` network calls for the work inside the block."""
        self.done = 0
        self.bar = tqdm(total=total, desc=desc, unit="call", leave=False, dynamic_ncols=True,
                        disable=not self.show or total == 0)
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None


@dataclass(frozen=True)
class EditPlan:
    """How to edit: the K target distances d_k (the signed projection v.n each edit sets) and the
    denoising from t_0: ``n_test_step`` grid points, DDIM ``eta``, the h policy, the seed, and how
    many edits are denoised together (``batch_size``; results do not depend on it)."""
    distances: tuple[float, ...]
    n_test_step: int
    eta: float = 1.0
    h_policy: HPolicy = "lagged"
    seed: int = 1234
    batch_size: int = 8
    #: the h space's own K distances (an ``auto`` range); None: h takes ``distances`` too
    h_distances: tuple[float, ...] | None = None
    #: the seed rule's domain (``utils.core.seeds``): EDIT for real images, SAMPLE_EDIT for sampled latents
    seed_domain: int = EDIT

    @staticmethod
    def spaced(start: float, end: float, k: int) -> tuple[float, ...]:
        """K distances evenly spaced from ``start`` to ``end`` (float64, as the CLI spaces them)."""
        return tuple(torch.linspace(start, end, k, dtype=torch.float64).tolist())

    def distance_tensor(self, space: Space = "z") -> Tensor:
        """The K distances of ``space``, float64."""
        chosen = self.h_distances if space == "h" and self.h_distances is not None else self.distances
        return torch.tensor(chosen, dtype=torch.float64)

    def seeds(self, seed_keys: Sequence[tuple[int, ...]], iteration: int = 0) -> list[list[int]]:
        """B rows of K seeds: edit k of image b in this iteration (the documented rule)."""
        return [[item_seed(self.seed, *key, iteration, k, domain=self.seed_domain) for k in range(len(self.distances))]
                for key in seed_keys]


@dataclass(frozen=True)
class BoundaryChoice:
    """The boundary files an edit uses, before they are checked against the model: the primary
    boundary of each space (None: that space is not moved) and the boundaries held fixed."""
    z: Path | None = None
    h: Path | None = None
    conditions_z: tuple[Path, ...] = ()
    conditions_h: tuple[Path, ...] = ()

    def primary(self, space: Space) -> Path | None:
        return self.z if space == "z" else self.h

    def conditions(self, space: Space) -> tuple[Path, ...]:
        return self.conditions_z if space == "z" else self.conditions_h


@dataclass(frozen=True)
class Directions:
    """The checked edit directions: per space the boundary record, whose ``normal`` is the
    primary normal projected orthogonal to the conditions (None: the space is not moved)."""
    records: Mapping[str, BoundaryRecord | None]
    paths: Mapping[str, Path | None]
    conditions: Mapping[str, list[dict]] = field(default_factory=dict)

    def normal(self, space: Space) -> Tensor | None:
        record = self.records[space]
        return None if record is None else torch.from_numpy(record.normal)

    def describe(self) -> dict:
        """The boundaries and conditions, for summaries."""
        return {"boundaries": {s: None if r is None else {"path": str(self.paths[s]), **r.describe()}
                               for s, r in self.records.items()},
                "conditions": dict(self.conditions)}


@dataclass(frozen=True)
class ImageReader:
    """Reads an image file as the model sees it, (C, size, size) float32 in [-1, 1], with the same
    checks everywhere (pixel cap, decoding, modes; utils.io.images) and face alignment when on."""
    size: int
    channels: int
    aligner: FaceAligner | None = None

    @classmethod
    def for_config(cls, config: Config, align_face: bool | None = None) -> "ImageReader":
        """Alignment: ``align_face`` True (the face extra must be installed) or False; None follows
        the config's data.align_face (without the extra: a warning and the unaligned image)."""
        aligner = None
        if align_face if align_face is not None else config.data.align_face:
            try:
                aligner = FaceAligner()
            except FaceExtraMissing:
                if align_face:
                    raise
                log.warning("config %s aligns faces, but the face extra is not installed (%s); editing the "
                            "unaligned image", config.name, FACE_INSTALL)
        return cls(config.data.image_size, config.data.channels, aligner)

    def read(self, path: str | Path) -> Tensor:
        if self.aligner is not None:
            return self.aligner.load(path, self.size, self.channels)[0]
        return image_to_tensor(open_image(path, self.channels), self.size)[0]


class Editor:
    """A frozen model ready to invert and edit: network, schedule, latent shapes, the inversion
    grid up to t_0 and the latent cache, built once."""

    def __init__(self, model: LoadedModel, t_0: int, n_inv_step: int, cache_root: Path | None = None,
                 precision: str = "fp32", show_progress: bool = True):
        """cache_root: folder of the inverted-latent cache (None: no cache). precision: the
        network's compute precision, part of the cache key."""
        T = model.config.diffusion.num_diffusion_timesteps
        if not 1 <= t_0 <= T - 1:
            raise UserError(f"t_0 must be in [1, {T - 1}], got {t_0}")
        self.model, self.config, self.t_0, self.n_inv_step = model, model.config, t_0, n_inv_step
        self.net = CallCounter(model.net, show=show_progress)
        self.device = next(model.net.model.parameters()).device
        self.shapes, self.alphas_cumprod = model.shapes, model.alphas_cumprod
        self.grid = timestep_grid(t_0, n_inv_step)
        # The key holds what changes the bits: besides the model and grid, the precision, the device
        # type (other kernels) and, per entry, the batch regime (``cache_key``).
        self.cache = None if cache_root is None else LatentCache(
            Path(cache_root), {"config": self.config.name, "checkpoint": model.checkpoint_sha256,
                               "model": self.config.to_dict()["model"], "diffusion": self.config.to_dict()["diffusion"],
                               "t_0": t_0, "n_inv_step": n_inv_step, "precision": precision,
                               "device": self.device.type}, self.shapes)

    def cache_key(self, image: Tensor, batch_size: int) -> str:
        """The latent cache's key of ``image`` (C, H, W) inverted in batches of ``batch_size``."""
        return self.cache.key(image, batch_regime(batch_size))

    def identity(self) -> dict:
        """What names the model in summaries and boundary files."""
        return {"config_name": self.config.name, "checkpoint": str(self.model.checkpoint),
                "checkpoint_sha256": self.model.checkpoint_sha256}

    # ------------------------------------------------------------------ inversion
    def invert(self, images: Tensor, batch_size: int = 8, desc: str = "inverting") -> tuple[Inversion, int]:
        """Latents of images (N, C, H, W) in [-1, 1]: (Inversion z (N, ...), h (N, ...) on the CPU,
        how many came from the cache). The rest are inverted in batches (a lone remainder as a
        pair, ``utils.core.batching``) and cached image by image, so an interrupted run resumes."""
        keys = [self.cache_key(img, batch_size) for img in images] if self.cache else [None] * len(images)
        found = [self.cache.get(k) if self.cache else None for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        log.info("%s: %d images, %d from the cache", desc, len(images), len(images) - len(todo))
        with self.net.progress(-(-len(todo) // batch_size) * (len(self.grid) - 1), desc):
            for chunk in batch_slices(len(todo), batch_size):
                batch = todo[chunk]
                x0 = pair_lone(images[batch].to(self.device), batch_size)
                inv = invert(self.net, x0, self.alphas_cumprod, self.grid)
                for j, i in enumerate(batch):
                    found[i] = Inversion(z=inv.z[j].cpu(), h=inv.h[j].cpu())
                    if self.cache:
                        self.cache.put(keys[i], found[i].z, found[i].h)
        if not found:
            return Inversion(z=torch.empty((0, *self.shapes["z"])), h=torch.empty((0, *self.shapes["h"]))), 0
        return Inversion(z=torch.stack([f.z for f in found]), h=torch.stack([f.h for f in found])), \
            len(images) - len(todo)

    def sample_latents(self, seed: int, index: int) -> Inversion:
        """Latents at t_0 reached from noise (docs/algorithm.md section 6): x_T drawn from a generator
        seeded ``item_seed(seed, index, domain=SAMPLE)``, denoised with DDIM eta 0 in ``n_inv_step``
        steps; z (1, ...) and h (1, ...) on the CPU."""
        generator = torch.Generator().manual_seed(item_seed(seed, index, domain=SAMPLE))
        x_T = torch.randn((1, *self.shapes["z"]), generator=generator).to(self.device)
        pairs = sampling_pairs(self.config.diffusion.num_diffusion_timesteps, self.t_0, self.n_inv_step)
        with self.net.progress(len(pairs), f"sampling {index + 1}"):
            latent = sample_latents(self.net, x_T, self.alphas_cumprod, pairs)
        return Inversion(latent.z.cpu(), latent.h.cpu())

    def sample_images(self, x_T: Tensor, n_steps: int, batch_size: int = 8) -> Tensor:
        """Images (N, C, H, W) in [-1, 1] (not clipped) denoised with DDIM eta 0 from x_T (N, ...)
        at T - 1 over an ``n_steps``-point grid (sample quality; not an edit)."""
        grid = timestep_grid(self.config.diffusion.num_diffusion_timesteps - 1, n_steps)
        parts = []
        with self.net.progress(-(-len(x_T) // batch_size) * len(grid), "sampling"):
            for chunk in batch_slices(len(x_T), batch_size):
                x = pair_lone(x_T[chunk].to(self.device), batch_size)
                parts.append(generate(self.net, x, self.alphas_cumprod, grid)[:chunk.stop - chunk.start].cpu())
        return torch.cat(parts)

    def radius_curves(self, images: Tensor, noise: Tensor, candidates: Sequence[int], epsilon: float,
                      batch_size: int = 8) -> dict:
        """The mixing-step analysis (``utils.core.mixing.radius_curves``) on this model: real images
        (N, C, H, W) in [-1, 1] inverted and noise (M, C, H, W) sampled along ``candidates``."""
        # each batch of images walks up, each batch of noise walks down: one call per pair of candidates
        calls = (-(-len(images) // batch_size) + -(-len(noise) // batch_size)) * (len(candidates) - 1)
        with self.net.progress(calls, "radius"):
            return radius_curves(self.net, images.to(self.device), noise.to(self.device), self.alphas_cumprod,
                                 candidates, epsilon, batch_size)

    # ------------------------------------------------------------------ boundaries
    def check_boundary(self, path: Path, space: Space, label: str, force: bool = False) -> BoundaryRecord:
        """A boundary file of ``space`` that fits this model's latents, model and t_0 (the last two
        may be overridden by ``force``). label: how the user named it (for messages).

        The model: the file's ``checkpoint_sha256`` when it has one (then its ``config_name`` may
        differ: the same weights under a renamed config); else its ``config_name`` (files
        imported from the original's ``.sav`` have no hash); a file with neither is used with a
        warning. Another ``n_inv_step`` is a warning, not a refusal: the inversion grid moves the
        latents by little next to the classes' spread, and a direction fitted on one grid still
        separates latents of another (docs/reliability.md, "Boundary checks")."""
        record = load_boundary(path, self.shapes)  # the normal's size checked from its header first
        if record.space != space:
            raise UserError(f"{path} is a boundary of the {record.space} space, given as {label}")
        sha = self.model.checkpoint_sha256
        if record.checkpoint_sha256 and record.checkpoint_sha256 != sha and not force:
            raise UserError(f"{path} was fitted on another checkpoint (sha256 {record.checkpoint_sha256[:12]}...); "
                            "pass --force to use it anyway")
        if not record.checkpoint_sha256 and record.config_name and record.config_name != self.config.name \
                and not force:
            raise UserError(f"{path} was fitted for the model of config '{record.config_name[:40]}' (field "
                            f"config_name; it has no checkpoint_sha256), this run uses '{self.config.name}'; "
                            "pass --force to use it anyway")
        if not record.checkpoint_sha256 and not record.config_name:
            log.warning("%s names no model (fields checkpoint_sha256 and config_name are empty): it cannot be "
                        "checked against %s; using it", path, self.config.name)
        if record.n_inv_step != self.n_inv_step:
            log.warning("%s was fitted on latents inverted in %d steps (field n_inv_step); this run's --n_inv_step "
                        "is %d", path, record.n_inv_step, self.n_inv_step)
        if record.t_0 != self.t_0 and not force:
            raise UserError(f"{path} was fitted at t_0 {record.t_0}, this run uses t_0 {self.t_0}; "
                            "pass --force to use it anyway")
        return record

    def directions(self, choice: BoundaryChoice, force: bool = False) -> Directions:
        """The checked edit directions of ``choice``; a space's normal held orthogonal to the
        normals of that space's conditions (docs/algorithm.md section 9)."""
        records, conditions = {}, {}
        for space in MOVED["both"]:
            path = choice.primary(space)
            records[space] = None if path is None else self.check_boundary(path, space, f"--boundary_{space}", force)
            held_paths = choice.conditions(space)
            if records[space] is None or not held_paths:
                continue
            held = [self.check_boundary(p, space, f"--condition_{space}", force) for p in held_paths]
            try:
                normal, angles = condition_normal(records[space].normal, [c.normal for c in held])
            except ValueError as exc:
                raise UserError(f"cannot condition the {space} edit: {exc}") from None
            records[space] = dataclasses.replace(records[space], normal=normal)
            conditions[space] = [{"path": str(p), "attribute": c.attribute, "angle_degrees": a}
                                 for p, c, a in zip(held_paths, held, angles)]
            log.info("%s edit held orthogonal to %s (angles %s degrees)", space,
                     ", ".join(c.attribute or str(p) for p, c in zip(held_paths, held)),
                     ", ".join(f"{a:.1f}" for a in angles))
        if all(r is None for r in records.values()):
            raise UserError("no boundary to edit along")
        return Directions(records, {s: choice.primary(s) for s in MOVED["both"]}, conditions)

    @staticmethod
    def source_distances(latents: Inversion, directions: Directions) -> list[dict[str, float]]:
        """Where each unedited latent sits along each moved normal: B dicts {space: v.n}."""
        per_space = {s: latent_distance(getattr(latents, s), directions.normal(s)).tolist()
                     for s in MOVED["both"] if directions.records[s] is not None}
        return [{s: v[b] for s, v in per_space.items()} for b in range(len(latents.z))]

    # ------------------------------------------------------------------ generation
    def reconstruct(self, latents: Inversion, plan: EditPlan, directions: Directions | None = None,
                    batch_size: int | None = None) -> Tensor:
        """The unedited images (B, C, H, W) on the CPU the edits are compared with: eta 0 from z,
        with the edits' h injection when ``directions`` moves h (``utils.core.editing.reconstruct``);
        in batches of ``batch_size`` (default: ``plan.batch_size``, or B when smaller: a lone image
        alone), a lone remainder of a larger batch size as a pair (``utils.core.batching``)."""
        inject_h = directions is not None and directions.records["h"] is not None
        grid = timestep_grid(self.t_0, plan.n_test_step)
        n = len(latents.z)
        batch_size = batch_size or min(plan.batch_size, n)
        parts = []
        with self.net.progress(-(-n // batch_size) * len(grid), "reconstructing"):
            for chunk in batch_slices(n, batch_size):
                part = Inversion(pair_lone(latents.z[chunk], batch_size).to(self.device),
                                 pair_lone(latents.h[chunk], batch_size).to(self.device))
                parts.append(reconstruct(self.net, part, self.alphas_cumprod, grid, inject_h=inject_h,
                                         h_policy=plan.h_policy)[:chunk.stop - chunk.start].cpu())
        return torch.cat(parts)

    def edits(self, latents: Inversion, directions: Directions, plan: EditPlan,
              seed_keys: Sequence[tuple[int, ...]], iteration: int = 0) -> Iterator[EditBatch]:
        """Edit B latent pairs to the plan's K distances, yielding each denoised batch as soon as it
        is done (``utils.core.editing.iter_edits``): images on the CPU, (n, C, H, W) in [-1, 1]
        (not clipped), and the edited latents. seed_keys: B tuples (the seed rule above)."""
        grid = timestep_grid(self.t_0, plan.n_test_step)
        n_edits = len(latents.z) * len(plan.distances)
        on_device = Inversion(latents.z.to(self.device), latents.h.to(self.device))
        calls = -(-n_edits // plan.batch_size) * len(grid)  # one batch when fewer edits than its size; none for none
        with self.net.progress(calls, "editing" if iteration == 0 else f"editing, iteration {iteration + 1}"):
            for batch in iter_edits(self.net, on_device, self.alphas_cumprod, grid, plan.distance_tensor(),
                                    directions.normal("z"), directions.normal("h"), plan.seeds(seed_keys, iteration),
                                    eta=plan.eta, h_policy=plan.h_policy, batch_size=plan.batch_size,
                                    h_distances=plan.distance_tensor("h")):
                yield EditBatch(batch.items, batch.images.cpu(), batch.z.cpu(),
                                None if batch.h is None else batch.h.cpu())

    def edit_all(self, latents: Inversion, directions: Directions, plan: EditPlan,
                 seed_keys: Sequence[tuple[int, ...]], iteration: int = 0) -> Tensor:
        """Every edit at once: (B, K, C, H, W) in [-1, 1] (not clipped), on the CPU."""
        images = torch.cat([b.images for b in self.edits(latents, directions, plan, seed_keys, iteration)])
        return images.reshape(len(latents.z), len(plan.distances), *images.shape[1:])


#: How far the ``auto`` range reaches: the span where the classes lie ([negative 5th, positive 95th]
#: percentile) scaled about its centre by this factor. Chosen with scripts/evaluate_edits.py on the
#: digits model (docs/digits_report.md): with the span itself, eta-1 edits at its ends do not yet
#: flip the attribute reliably (the fresh noise pulls them back toward the data); at 2 the edits
#: control the attribute better than the hand-set range, at 0.7 points of identity.
AUTO_SCALE = 2.0


def auto_span(record: BoundaryRecord, scale: float = AUTO_SCALE) -> tuple[float, float]:
    """The ``auto`` range of one boundary, in the edit's units v.n: the span from the negative
    class's 5th percentile to the positive class's 95th over the training latents
    (``utils.io.boundary_files.auto_range``) scaled about its centre by ``scale``. Both ends are
    finite (UserError otherwise: a damaged summary, or a ``scale`` that overflows)."""
    low, high = auto_range(record)
    centre, half = low / 2 + high / 2, scale * (high / 2 - low / 2)
    ends = (centre - half, centre + half)
    if not all(math.isfinite(v) for v in ends):
        raise UserError(f"the auto range of the {record.space} boundary for '{record.attribute}' is not finite "
                        f"({low:g} .. {high:g} scaled by {scale:g}); give --start_distance and --end_distance")
    return ends


def auto_distances(directions: Directions, k: int, scale: float = AUTO_SCALE
                   ) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
    """K distances for each moved space across where its boundary's classes lie (``auto_span``).
    Returns (the distances of z, or of h when only h moves; h's own distances when both
    move, else None). With conditions the range is the primary boundary's, a close guide: the
    projection off the conditions moves each latent's v.n only by its part along them."""
    spaced = {}
    for space, record in directions.records.items():
        if record is None:
            continue
        low, high = auto_span(record, scale)
        spaced[space] = EditPlan.spaced(low, high, k)
        log.info("auto distances in %s: %+.2f .. %+.2f (%d)", space, low, high, k)
    if "z" in spaced:
        return spaced["z"], spaced.get("h")
    return spaced["h"], None


def restrict(choice: BoundaryChoice, space: EditSpace) -> BoundaryChoice:
    """``choice`` with the spaces that ``--edit_space`` does not move dropped."""
    kept = MOVED[space]
    return dataclasses.replace(choice, z=choice.z if "z" in kept else None, h=choice.h if "h" in kept else None,
                               conditions_z=choice.conditions_z if "z" in kept else (),
                               conditions_h=choice.conditions_h if "h" in kept else ())

