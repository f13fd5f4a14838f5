"""One loaded model at one mixing step: its latent cache and timestep grid, and the operations every
mode of the engine is made of (``runners.engine.engine`` wires them). No file writing here; reading
images and the latent cache is allowed.

    editor = Editor(load_model("digits.yml"), t_0=200, n_inv_step=40)
    latents, _ = editor.invert(images)                       # (N, C, H, W) in [-1, 1]; cached
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
import copy
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
from runners.engine.describe import EditDescription
from runners.engine.requests import Denoising, check_t_0
from utils.config import Config
from utils.core.batching import batch_regime, batch_slices, pair_lone
from utils.core.diffusion import Inversion, generate, invert, sample_latents, sampling_pairs, timestep_grid
from utils.core.editing import EditBatch, RegionEdits, iter_edits, reconstruct
from utils.core.mixing import radius_curves
from utils.core.region import reference_trajectory
from utils.core.seeds import EDIT, EVALUATION_NOISE, SAMPLE, item_seed
from utils.core.spaces import SPACES
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
    everything that decides its bits: the model's identity (``models.identity``: checkpoint,
    architecture, precision, device and kernels), t_0, the inversion steps, the batch regime, and
    the pixels.

    Fairness: with ``per_owner``, each owner (a web session) holds at most that many entries; its
    own least recently used one is dropped first, so one owner's uploads never evict another's."""

    def __init__(self, capacity: int, per_owner: int | None = None):
        self.capacity, self.per_owner = capacity, per_owner
        self._entries: OrderedDict[tuple, Inversion] = OrderedDict()
        self._owners: dict[object, OrderedDict] = {}   # owner -> its keys, least recently used first
        self._lock = threading.Lock()

    @staticmethod
    def key(image: Tensor, *setting) -> tuple:
        """image: (C, H, W) pixels; setting: what else decides the latents (the model's identity
        key first)."""
        pixels = image.detach().cpu().float().contiguous()
        return (*setting, tuple(pixels.shape), hashlib.sha256(pixels.numpy().tobytes()).hexdigest())

    def get(self, key: tuple) -> Inversion | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple, latents: Inversion, owner: object = None) -> None:
        with self._lock:
            self._entries[key] = latents
            self._entries.move_to_end(key)
            if owner is not None and self.per_owner is not None:
                mine = self._owners.setdefault(owner, OrderedDict())
                mine[key] = None
                mine.move_to_end(key)
                while len(mine) > self.per_owner:
                    old, _ = mine.popitem(last=False)
                    if not any(old in keys for keys in self._owners.values()):
                        self._entries.pop(old, None)
            while len(self._entries) > self.capacity:
                old, _ = self._entries.popitem(last=False)
                for keys in self._owners.values():
                    keys.pop(old, None)

    def forget_owner(self, owner: object) -> None:
        """The owner is gone (a closed session): its entries no other owner holds are dropped."""
        with self._lock:
            for key in self._owners.pop(owner, {}):
                if not any(key in keys for keys in self._owners.values()):
                    self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class RecentReconstructions:
    """The unedited reconstructions of recently edited images, at most ``per_image`` settings
    (steps, h injection, h policy) per image and ``images`` images, least recently used dropped
    first (thread-safe): a slider's edit is shown beside its reconstruction without denoising it
    again, and memory does not grow with the settings a client sends."""

    def __init__(self, images: int, per_image: int = 2):
        self.images, self.per_image = images, per_image
        self._entries: OrderedDict[tuple, OrderedDict] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_key: tuple, setting: tuple) -> Tensor | None:
        with self._lock:
            kept = self._entries.get(image_key)
            if kept is None or setting not in kept:
                return None
            self._entries.move_to_end(image_key)
            kept.move_to_end(setting)
            return kept[setting]

    def put(self, image_key: tuple, setting: tuple, image: Tensor) -> None:
        with self._lock:
            kept = self._entries.setdefault(image_key, OrderedDict())
            kept[setting] = image
            kept.move_to_end(setting)
            self._entries.move_to_end(image_key)
            while len(kept) > self.per_image:
                kept.popitem(last=False)
            while len(self._entries) > self.images:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._entries.values())


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
                 show_progress: bool = True, recent: RecentLatents | None = None):
        """cache_root: folder of the inverted-latent cache (None: no cache). recent: inversions kept
        in memory (``RecentLatents``, shared with other editors), looked up first. Both key on the
        model's identity (``model.identity``), so editors of other models never share an entry."""
        check_t_0(t_0, model.config.diffusion.num_diffusion_timesteps)
        self.model, self.config, self.t_0, self.n_inv_step = model, model.config, t_0, n_inv_step
        self.net = CallCounter(model.net, show=show_progress)
        self.device = model.device
        self.shapes, self.alphas_cumprod = model.shapes, model.alphas_cumprod
        self.grid = timestep_grid(t_0, n_inv_step)
        self.recent = recent
        self._setting = (model.identity.key(), t_0, n_inv_step)
        # The key holds what changes the bits: the model's identity (weights, architecture,
        # precision, device, kernels), the grid and, per entry, the batch regime (``_keys``).
        self.cache = None if cache_root is None else LatentCache(
            Path(cache_root), {"model": model.identity.key(), "t_0": t_0, "n_inv_step": n_inv_step}, self.shapes)

    def image_key(self, image: Tensor, batch_size: int) -> tuple:
        """What names the latents of ``image`` (C, H, W) inverted in batches of ``batch_size`` on this
        model and grid (``RecentLatents.key``): the key of anything derived from them."""
        return RecentLatents.key(image, *self._setting, batch_regime(batch_size))

    def _keys(self, images: Tensor, batch_size: int) -> tuple[list, list]:
        """Each image's key in the in-memory store and in the latent cache (None where there is none)."""
        regime = batch_regime(batch_size)
        memory = [self.image_key(img, batch_size) if self.recent is not None else None for img in images]
        disk = [self.cache.key(img, regime) if self.cache else None for img in images]
        return memory, disk

    # ------------------------------------------------------------------ inversion
    def invert(self, images: Tensor, batch_size: int = 8, desc: str = "inverting", owner: object = None
               ) -> tuple[Inversion, int]:
        """Latents of images (N, C, H, W) in [-1, 1]: (Inversion z (N, ...), h (N, ...) on the CPU,
        how many came from memory or the cache). The rest are inverted in batches (a lone remainder
        as a pair, ``utils.core.batching``) and cached image by image, so an interrupted run resumes."""
        memory, keys = self._keys(images, batch_size)
        found = [self.recent.get(k) if k is not None else None for k in memory]
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
                self.recent.put(key, latents, owner)
        if not found:
            return Inversion(z=torch.empty((0, *self.shapes["z"])), h=torch.empty((0, *self.shapes["h"]))), 0
        return Inversion(z=torch.stack([f.z for f in found]), h=torch.stack([f.h for f in found])), \
            len(images) - len(todo)

    def latent_entries(self, images: Tensor, batch_size: int, desc: str = "inverting") -> tuple[list, int]:
        """Invert ``images`` (N, C, H, W) and give back, per image, its latent cache key when the
        cache holds it (read back row by row later: ``utils.io.latent_cache.entry_rows``), else its
        latents flattened, {space: (D,) float32}; and how many came from memory or the cache."""
        latents, cached = self.invert(images, batch_size, desc)
        keys = self._keys(images, batch_size)[1]
        # per image: one served from memory, or whose write failed, is not on disk
        return [key if key is not None and self.cache.holds(key) else
                {s: getattr(latents, s)[j].flatten().numpy() for s in SPACES} for j, key in enumerate(keys)], cached

    def sample_latents(self, seed: int, index: int) -> Inversion:
        """Latents at t_0 reached from noise (docs/algorithm.md section 6): x_T drawn from a generator
        seeded ``item_seed(seed, index, domain=SAMPLE)``, denoised with DDIM eta 0 in ``n_inv_step``
        steps; z (1, ...) and h (1, ...) on the CPU."""
        generator = torch.Generator().manual_seed(item_seed(seed, index, domain=SAMPLE))
        x_T = torch.randn((1, *self.shapes["z"]), generator=generator).to(self.device)
        pairs = sampling_pairs(self.config.diffusion.num_diffusion_timesteps, self.t_0, self.n_inv_step)
        with self.net.progress(len(pairs), f"sampling {index + 1}"):
            latent = sample_latents(self.net, x_T, self.alphas_cumprod, pairs, self.config.diffusion.clip_x0)
        return Inversion(latent.z.cpu(), latent.h.cpu())

    def sample_images(self, x_T: Tensor, n_steps: int, batch_size: int = 8, eta: float = 0.0, seed: int = 0
                      ) -> Tensor:
        """Images (N, C, H, W) in [-1, 1] (not clipped) denoised with DDIM from x_T (N, ...) at T - 1
        over an ``n_steps``-point grid (sample quality; not an edit); x0_hat clipped to [-1, 1] at
        each step when the config says (``diffusion.clip_x0``). eta > 0 adds fresh noise at every
        step (eta 1 over the full grid is DDPM's ancestral sampler), sample j's from a generator
        seeded ``item_seed(seed, j, domain=EVALUATION_NOISE)``, so a sample does not depend on the
        batch size."""
        grid = timestep_grid(self.config.diffusion.num_diffusion_timesteps - 1, n_steps)
        parts = []
        with self.net.progress(-(-len(x_T) // batch_size) * len(grid), "sampling"):
            for chunk in batch_slices(len(x_T), batch_size):
                x = pair_lone(x_T[chunk].to(self.device), batch_size)
                generators = None
                if eta > 0:  # a lone sample runs as a pair (pair_lone): its twin draws the same noise
                    rows = range(chunk.start, chunk.stop) if len(x) == chunk.stop - chunk.start else [chunk.start] * 2
                    generators = [torch.Generator().manual_seed(item_seed(seed, j, domain=EVALUATION_NOISE))
                                  for j in rows]
                parts.append(generate(self.net, x, self.alphas_cumprod, grid, eta=eta, generators=generators,
                                      clip_x0=self.config.diffusion.clip_x0)[:chunk.stop - chunk.start].cpu())
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

    # ------------------------------------------------------------------ generation
    def reconstruct(self, latents: Inversion, description: EditDescription, batch_size: int | None = None) -> Tensor:
        """The unedited images (B, C, H, W) on the CPU the edits of ``description`` are compared
        with: eta 0 from z, with the edits' h injection when the edit moves h
        (``utils.core.editing.reconstruct``); in batches of ``batch_size`` (default: the edits'
        batch size, or B when smaller: a lone image alone), a lone remainder of a larger batch size
        as a pair (``utils.core.batching``)."""
        return self.regenerate(latents, description.denoising, "h" in description.spaces, batch_size)

    def regenerate(self, latents: Inversion, denoising: Denoising, inject_h: bool,
                   batch_size: int | None = None) -> Tensor:
        """``reconstruct`` for given denoising settings: with ``inject_h`` False, the plain
        inversion + regeneration (eta 0, no h injection) that measures fidelity."""
        grid = timestep_grid(self.t_0, denoising.n_test_step)
        parts = [reconstruct(self.net, part, self.alphas_cumprod, grid, inject_h=inject_h,
                             h_policy=denoising.h_policy)[:n].cpu()
                 for n, part in self._chunks(latents, denoising, batch_size, len(grid))]
        return torch.cat(parts) if parts else torch.empty((0, *self.shapes["z"]))

    def trajectories(self, latents: Inversion, description: EditDescription, batch_size: int | None = None
                     ) -> list[dict[int, Tensor]]:
        """Each image's unedited run, {t: x_t (C, H, W)} on the CPU for t_0 and every timestep below it,
        in the batches of ``reconstruct`` (same ``batch_size``), so that its last state (t = -1) is the
        reconstruction bit for bit: the run a region edit's outside follows (``utils.core.region``)."""
        denoising = description.denoising
        grid = timestep_grid(self.t_0, denoising.n_test_step)
        runs = []
        for n, part in self._chunks(latents, denoising, batch_size, len(grid)):
            states = reference_trajectory(self.net, part.z, self.alphas_cumprod, grid,
                                          h_edit=part.h if "h" in description.spaces else None,
                                          h_policy=denoising.h_policy)
            runs += [{t: x[b].cpu() for t, x in states.items()} for b in range(n)]
        return runs

    def _chunks(self, latents: Inversion, denoising: Denoising, batch_size: int | None, calls: int):
        """(n, latents on the device) per batch of the reconstructions: ``batch_size`` (default: the
        edits' batch size, or B when smaller), a lone remainder of a larger batch as a pair."""
        n = len(latents.z)
        batch_size = batch_size or max(1, min(denoising.batch_size, n))
        with self.net.progress(-(-n // batch_size) * calls, "reconstructing"):
            for chunk in batch_slices(n, batch_size):
                yield chunk.stop - chunk.start, Inversion(pair_lone(latents.z[chunk], batch_size).to(self.device),
                                                          pair_lone(latents.h[chunk], batch_size).to(self.device))

    def edits(self, latents: Inversion, description: EditDescription, seed_keys: Sequence[tuple[int, ...]],
              iteration: int = 0, seed_domain: int = EDIT, region: RegionEdits | None = None) -> Iterator[EditBatch]:
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
        moves = {s: description.move(s) for s in SPACES}
        calls = -(-n_edits // denoising.batch_size) * len(grid)  # one batch when fewer edits than its size
        with self.net.progress(calls, "editing" if iteration == 0 else f"editing, iteration {iteration + 1}"):
            for batch in iter_edits(self.net, on_device, self.alphas_cumprod, grid, moves["z"], moves["h"],
                                    description.seeds(seed_keys, iteration, seed_domain), eta=denoising.eta,
                                    h_policy=denoising.h_policy, batch_size=denoising.batch_size, region=region):
                yield EditBatch(batch.items, batch.images.cpu(), batch.z.cpu(),
                                None if batch.h is None else batch.h.cpu())

    def edit_all(self, latents: Inversion, description: EditDescription, seed_keys: Sequence[tuple[int, ...]],
                 iteration: int = 0, seed_domain: int = EDIT, region: RegionEdits | None = None) -> Tensor:
        """Every edit at once: (B, K, C, H, W) in [-1, 1] (not clipped), on the CPU."""
        images = torch.cat([b.images for b in self.edits(latents, description, seed_keys, iteration, seed_domain,
                                                         region)])
        return images.reshape(len(latents.z), len(description), *images.shape[1:])


def differentiable_net(model: LoadedModel) -> torch.nn.Module:
    """The model's network as ``torch.func`` needs it: a float32 copy, in the contiguous layout, of
    the module inside ``model.net`` (an ``InferenceNet`` runs under inference_mode, which would make
    every derivative zero; its channels_last weights make the attention change layouts, which vmap
    does not support, and a copy leaves the model the editor uses as it is). Same contract:
    ``out, h = net(x, t, h_override=None)``."""
    module = copy.deepcopy(model.net.model)
    return module.to(dtype=torch.float32, memory_format=torch.contiguous_format).eval().requires_grad_(False)
