"""The editing engine: one loaded model with its latent cache and timestep grid, and the operations
every front end uses -- the command-line modes, ``scripts/evaluate_edits.py``, the benchmark and
the web app. No argparse and no file writing here; reading images and boundary files is allowed.

    editor = Editor(load_model("digits.yml"), t_0=200, n_inv_step=40)
    latents, _ = editor.invert(images)                       # (N, C, H, W) in [-1, 1]; cached
    description = describe_edit(editor, EditRequest((Move("thick", -3, 3),), Denoising(40), k=3), index)
    for batch in editor.edits(latents, description, seed_keys=[(image_key(img),) for img in images]):
        ...                                                  # batch.items[j] = (image b, edit k)

An image is inverted once (here and in the latent cache) and can then be edited any number of
times, one distance or many: edit k of iteration i of image b is denoised from its own generator,
seeded ``item_seed(seed, *seed_keys[b], i, k, domain=...)`` (``utils.core.seeds``: seed key
(image_key(image),) for a real image in the EDIT domain, (j,) for sampled latent j in SAMPLE_EDIT),
so that the pixels
depend on neither batch size, nor order, nor the other images edited with it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from models.loading import LoadedModel
from utils.config import Config
from utils.core.batching import batch_regime, batch_slices, pair_lone
from utils.core.diffusion import HPolicy, Inversion, generate, invert, sample_latents, sampling_pairs, timestep_grid
from utils.core.editing import EditBatch, iter_edits, reconstruct
from utils.core.mixing import radius_curves
from utils.core.seeds import EDIT, SAMPLE, item_seed
from utils.errors import UserError
from runners.edit_description import EditDescription
from utils.io.boundary_files import BoundaryRecord, load_boundary
from utils.io.face_align import INSTALL as FACE_INSTALL, FaceAligner, FaceExtraMissing
from utils.io.images import image_to_tensor, open_image
from utils.io.latent_cache import LatentCache

log = logging.getLogger(__name__)

#: About how many images of a folder edit are held (as images, latents and reconstructions) at once.
GROUP_IMAGES = 32


@dataclass(frozen=True)
class FolderBatches:
    """How a folder edit goes through the engine: ``group`` images at a time (inverted,
    reconstructed, edited and written before the next group is read), reconstructed in batches of
    ``reconstruction``."""
    group: int
    reconstruction: int


def folder_batches(n_images: int, invert_batch: int, edit_batch: int) -> FolderBatches:
    """The engine's batches for a folder of ``n_images`` (all processes together).

    Groups are a multiple of both batch sizes (about ``GROUP_IMAGES``), so that memory does not grow
    with the folder and every batch is the one an all-at-once run would form: the same results.
    Reconstructions run in the batches an all-at-once run over every image would form (a lone
    image alone, a lone remainder as a pair), never a shard's own size, so sharding changes no bit.
    """
    unit = math.lcm(invert_batch, edit_batch)
    return FolderBatches(unit * max(1, GROUP_IMAGES // unit), max(1, min(edit_batch, n_images)))


class RecentLatents:
    """The latest ``capacity`` inversions, kept in memory in front of the latent cache (least
    recently used dropped first; thread-safe), to be shared by the editors of one process: the web
    app keeps its sessions' images here, whether or not a disk cache is on. An entry is keyed by
    what decides its bits besides the model (t_0, the inversion steps, the batch regime) and the
    pixels."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, Inversion] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(image: Tensor, *setting) -> tuple:
        """image: (C, H, W) pixels; setting: what else decides the latents."""
        pixels = image.detach().cpu().float().contiguous()
        return (*setting, tuple(pixels.shape), hashlib.sha256(pixels.numpy().tobytes()).hexdigest())

    def get(self, key: tuple) -> Inversion | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple, latents: Inversion) -> None:
        with self._lock:
            self._entries[key] = latents
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


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
                 precision: str = "fp32", show_progress: bool = True, recent: RecentLatents | None = None):
        """cache_root: folder of the inverted-latent cache (None: no cache). precision: the
        network's compute precision, part of the cache key. recent: inversions kept in memory
        (``RecentLatents``, shared with other editors of the same model), looked up first."""
        T = model.config.diffusion.num_diffusion_timesteps
        if not 1 <= t_0 <= T - 1:
            raise UserError(f"t_0 must be in [1, {T - 1}], got {t_0}")
        self.model, self.config, self.t_0, self.n_inv_step = model, model.config, t_0, n_inv_step
        self.net = CallCounter(model.net, show=show_progress)
        self.device = next(model.net.model.parameters()).device
        self.shapes, self.alphas_cumprod = model.shapes, model.alphas_cumprod
        self.grid = timestep_grid(t_0, n_inv_step)
        self.recent = recent
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
        how many came from memory or the cache). The rest are inverted in batches (a lone remainder
        as a pair, ``utils.core.batching``) and cached image by image, so an interrupted run resumes."""
        regime = batch_regime(batch_size)
        memory = [RecentLatents.key(img, self.t_0, self.n_inv_step, regime) for img in images] \
            if self.recent is not None else [None] * len(images)
        found = [self.recent.get(k) if k is not None else None for k in memory]
        keys = [self.cache_key(img, batch_size) for img in images] if self.cache else [None] * len(images)
        found = [f if f is not None or not self.cache else self.cache.get(k) for f, k in zip(found, keys)]
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
        if self.recent is not None:
            for key, latents in zip(memory, found):
                self.recent.put(key, latents)
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
    def check_boundary(self, path: Path, space: str, label: str, force: bool = False) -> BoundaryRecord:
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

    # ------------------------------------------------------------------ generation
    def reconstruct(self, latents: Inversion, description: EditDescription, batch_size: int | None = None) -> Tensor:
        """The unedited images (B, C, H, W) on the CPU the edits are compared with: eta 0 from z,
        with the edits' h injection when the edit moves h (``utils.core.editing.reconstruct``);
        in batches of ``batch_size`` (default: the edits' batch size, or B when smaller: a lone
        image alone), a lone remainder of a larger batch size as a pair (``utils.core.batching``)."""
        inject_h = "h" in description.spaces
        grid = timestep_grid(self.t_0, description.denoising.n_test_step)
        n = len(latents.z)
        batch_size = batch_size or max(1, min(description.denoising.batch_size, n))
        parts = []
        with self.net.progress(-(-n // batch_size) * len(grid), "reconstructing"):
            for chunk in batch_slices(n, batch_size):
                part = Inversion(pair_lone(latents.z[chunk], batch_size).to(self.device),
                                 pair_lone(latents.h[chunk], batch_size).to(self.device))
                parts.append(reconstruct(self.net, part, self.alphas_cumprod, grid, inject_h=inject_h,
                                         h_policy=description.denoising.h_policy)[:chunk.stop - chunk.start].cpu())
        return torch.cat(parts) if parts else torch.empty((0, *self.shapes["z"]))

    def edits(self, latents: Inversion, description: EditDescription, seed_keys: Sequence[tuple[int, ...]],
              iteration: int = 0, seed_domain: int = EDIT) -> Iterator[EditBatch]:
        """Make the description's K edits of B latent pairs, yielding each denoised batch as soon as
        it is done (``utils.core.editing.iter_edits``): images on the CPU, (n, C, H, W) in [-1, 1]
        (not clipped), and the edited latents. seed_keys: B tuples, seed_domain: EDIT for real
        images, SAMPLE_EDIT for sampled latents (the seed rule above)."""
        denoising = description.denoising
        grid = timestep_grid(self.t_0, denoising.n_test_step)
        n_edits = len(latents.z) * len(description)
        if n_edits == 0:
            return
        on_device = Inversion(latents.z.to(self.device), latents.h.to(self.device))
        moves = {s: description.move(s) for s in ("z", "h")}
        calls = -(-n_edits // denoising.batch_size) * len(grid)  # one batch when fewer edits than its size
        with self.net.progress(calls, "editing" if iteration == 0 else f"editing, iteration {iteration + 1}"):
            for batch in iter_edits(self.net, on_device, self.alphas_cumprod, grid, moves["z"], moves["h"],
                                    description.seeds(seed_keys, iteration, seed_domain), eta=denoising.eta,
                                    h_policy=denoising.h_policy, batch_size=denoising.batch_size):
                yield EditBatch(batch.items, batch.images.cpu(), batch.z.cpu(),
                                None if batch.h is None else batch.h.cpu())

    def edit_all(self, latents: Inversion, description: EditDescription, seed_keys: Sequence[tuple[int, ...]],
                 iteration: int = 0, seed_domain: int = EDIT) -> Tensor:
        """Every edit at once: (B, K, C, H, W) in [-1, 1] (not clipped), on the CPU."""
        images = torch.cat([b.images for b in self.edits(latents, description, seed_keys, iteration, seed_domain)])
        return images.reshape(len(latents.z), len(description), *images.shape[1:])
