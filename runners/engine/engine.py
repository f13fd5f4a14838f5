"""The engine: one loaded model behind one typed call per mode.

    engine = Engine(load_model("faces.yml"), EngineOptions(cache_root=Path("~/.cache/bd/latents")))
    result = engine.run(EditJob(...), exp=Path("runs/demo"))          # a run folder, whole or not at all
    description = engine.describe(request, t_0=400, n_inv_step=40, boundary_dir=Path("boundary"))

Front ends (the command line, the web app, the evaluation, the benchmarks) build requests and show
results. Everything that decides batching, caching and keys, validation, units and distances,
output names, thresholds and reconstructions is decided inside this package, once.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from torch import Tensor

from models.loading import LoadedModel
from runners.engine.boundaries import BoundaryIndex
from runners.engine.describe import EditDescription, describe_edit
from models.checkpoints import default_cache_dir
from runners.engine.edit_modes import edit_images, edit_samples, radius, radius_images, reconstruction_and_region
from runners.engine.discover import DiscoverJob, plan_discover, run_discover
from runners.engine.edit_modes import radius_labelled
from runners.engine.editor import Editor, ImageReader, RecentLatents, RecentReconstructions
from runners.engine.regions import check_loco, check_masks, is_part, region_masks
from runners.engine.outputs import SequenceWriter, edit_file_names
from runners.engine.requests import (MAX_GRID_PIXELS, EditJob, EditRequest, Job, RadiusJob, SampleJob, SearchJob,
                                     check_steps, check_t_0)
from runners.engine.search import plan_search, run_search, within_bases, write_search_summary
from utils.core.diffusion import Inversion
from utils.core.seeds import image_key
from utils.distributed import SINGLE, ProcessContext
from utils.config import Config
from utils.errors import UserError
from utils.io.files import RunFolder
from utils.io.images import expand_image_paths
from utils.io.region import RegionSpec

def latent_cache_root(cache_dir: Path | None, no_cache: bool = False) -> Path | None:
    """Where inverted latents are cached: ``<cache_dir>/latents`` (default: $BOUNDARYDIFFUSION_CACHE
    or ~/.cache/boundarydiffusion), or None with ``no_cache``."""
    return None if no_cache else Path(cache_dir or default_cache_dir()) / "latents"


def check_job(job: Job, config: Config) -> None:
    """Every check of ``job`` that needs no model, run before one loads: the images exist, the data
    set and its labels (``plan_search``), with what to run when they are missing."""
    if isinstance(job, EditJob):
        expand_image_paths(job.images)
    elif isinstance(job, RadiusJob):
        radius_images(job)
        radius_labelled(job)
    elif isinstance(job, DiscoverJob):
        plan_discover(job, config)
    elif isinstance(job, SearchJob):
        data_dir = job.data_dir or (Path(config.data.data_dir) if config.data.data_dir else None)
        attr_file = job.attr_file or (Path(config.data.attr_file) if config.data.attr_file else None)
        missing = [p for p in (data_dir, attr_file) if p is not None and not Path(p).exists()]
        if missing and not (job.pos_dir or job.neg_dir):
            hint = (f"; run `bash data_download.sh {config.data.dataset}` first" if data_dir == Path(config.data.data_dir)
                    else "")
            raise UserError(f"{missing[0]} does not exist{hint}")
        plan_search(job, data_dir, attr_file)


#: Each mode's subfolder of --exp.
SUBFOLDERS = {SearchJob: "boundary_search", EditJob: "edit", SampleJob: "unconditional", RadiusJob: "radius",
              DiscoverJob: "discover"}


@dataclass(frozen=True)
class EngineOptions:
    """How an engine keeps what it computes. cache_root: the latent cache on disk (None: none);
    show_progress: progress bars; process: this process in a torchrun job; recent_images: inversions
    (and their reconstructions) kept in memory, ``per_owner`` of them per owner (a web session)."""
    cache_root: Path | None = None
    show_progress: bool = True
    process: ProcessContext = SINGLE
    recent_images: int = 0
    per_owner: int | None = None
    reconstructions_per_image: int = 2


@dataclass(frozen=True)
class OneEdit:
    """The files of one image's edit (``Engine.edit_one``) and where its latents sit along the moved
    normals; ``inverted_before``: the engine had its latents (this session's or another's)."""
    original: Path
    reconstruction: Path
    edits: list[Path]
    grid: Path | None
    gif: Path | None
    source_distances: dict
    inverted_before: bool
    region: dict | None = None  # where the region came from and its coverage (``RegionSpec.record``)


@dataclass(frozen=True)
class RunResult:
    """A finished run: its folder (None on the processes of a torchrun job other than rank 0) and
    its summary (what summary.json holds, plus what the front end shows)."""
    folder: Path | None
    summary: dict = field(default_factory=dict)


class Engine:
    """One loaded model, its latent stores and the mode calls. Thread-safe for concurrent jobs: each
    ``session`` gets its own editor (its own progress hook); the stores are shared."""

    def __init__(self, model: LoadedModel, options: EngineOptions = EngineOptions()):
        self.model, self.options = model, options
        self.recent = RecentLatents(options.recent_images, options.per_owner) if options.recent_images else None
        self.reconstructions = RecentReconstructions(max(1, options.recent_images), options.reconstructions_per_image)
        self._idle: dict[tuple[int, int], list[Editor]] = {}
        self._readers: dict[bool | None, ImageReader] = {}
        self._lock = threading.Lock()

    @property
    def identity(self):
        return self.model.identity

    # ---------------------------------------------------------------- editors
    def check_grid(self, t_0: int, n_inv_step: int) -> None:
        """That an inversion grid of ``n_inv_step`` points reaches ``t_0`` on this model."""
        check_t_0(t_0, self.model.config.diffusion.num_diffusion_timesteps)
        check_steps(n_inv_step, t_0, "--n_inv_step")

    def _new_editor(self, t_0: int, n_inv_step: int) -> Editor:
        self.check_grid(t_0, n_inv_step)
        return Editor(self.model, t_0, n_inv_step, self.options.cache_root, self.options.show_progress, self.recent)

    @contextlib.contextmanager
    def session(self, t_0: int, n_inv_step: int, on_call: Callable[[int, int], None] | None = None
                ) -> Iterator[Editor]:
        """An editor at (t_0, n_inv_step) for one job, its network calls reported to ``on_call(done,
        total)`` (which may raise to cancel the job); returned to a pool when the job ends."""
        with self._lock:
            idle = self._idle.setdefault((t_0, n_inv_step), [])
            editor = idle.pop() if idle else None
        editor = editor or self._new_editor(t_0, n_inv_step)
        editor.net.on_call = on_call
        try:
            yield editor
        finally:
            editor.net.on_call = None
            with self._lock:
                self._idle[(t_0, n_inv_step)].append(editor)

    # ---------------------------------------------------------------- edits
    def boundary_index(self, folder: Path) -> BoundaryIndex:
        """The boundary files in ``folder`` that fit this model's config and latents (headers read once)."""
        return BoundaryIndex.of(folder, self.model.config.name, self.model.shapes)

    def describe(self, request: EditRequest, t_0: int, n_inv_step: int, index: BoundaryIndex | None
                 ) -> EditDescription:
        """The checked description of ``request`` at ``t_0`` (``describe_edit``): also that its
        denoising grid fits t_0, that one image's grid picture stays within ``MAX_GRID_PIXELS`` and
        that a LOCO region fits the exact Jacobian (``check_loco``)."""
        self.check_grid(t_0, n_inv_step)
        check_steps(request.denoising.n_test_step, t_0)
        if request.region is not None:
            check_loco(request.region, self.model.shapes["z"])
        _, height, width = self.model.shapes["z"]
        if (request.n_edits + 2) * height * width > MAX_GRID_PIXELS:
            raise UserError(f"{request.n_edits} edits of {height} x {width} pixels make a grid picture of more "
                            f"than {MAX_GRID_PIXELS:,} pixels; ask for fewer edits")
        return describe_edit(request, index, self.identity, t_0, n_inv_step)

    def reconstruction(self, editor: Editor, image: Tensor, latents: Inversion, description: EditDescription,
                       batch_size: int) -> Tensor:
        """The unedited reconstruction (C, H, W) of one image (its latents (1, ...)) that the edits of
        ``description`` are compared with, kept for the image's next edits (``RecentReconstructions``)."""
        key = editor.image_key(image, batch_size)
        denoising = description.denoising
        setting = (denoising.n_test_step, "h" in description.spaces, denoising.h_policy)
        found = self.reconstructions.get(key, setting)
        if found is None:
            found = editor.reconstruct(latents, description)[0]
            self.reconstructions.put(key, setting, found)
        return found

    def reader(self, align_face: bool | None = None) -> ImageReader:
        """Reads image files as the model sees them (``ImageReader``); ``align_face`` None follows
        the config."""
        with self._lock:
            if align_face not in self._readers:
                self._readers[align_face] = ImageReader.for_config(self.model.config, align_face)
            return self._readers[align_face]

    def edit_one(self, editor: Editor, image: Tensor, description: EditDescription, folder: Path, batch_size: int,
                 owner: object = None, sweep: bool = False, on_stage: Callable[[str], None] | None = None) -> OneEdit:
        """Edit one image (C, H, W) as the command line does (its inversion batch, seeds, reconstruction
        and files) into ``folder``: original.png, reconstruction.png and the K edits; ``sweep`` adds
        the labelled grid and the GIF. ``owner``: whose inversion it is (``RecentLatents``). A region
        (``description.region``: a mask file or a box) confines the edit as on the command line.
        ``on_stage(name)`` hears of each stage as it starts (and may raise to stop the work)."""
        stage = on_stage or (lambda name: None)
        masks = None if description.region is None else region_masks(
            description.region, [None], self.model.config.data.image_size, [])
        stage("inverting")
        latents, hits = editor.invert(image[None], batch_size, owner=owner)
        stage("reconstructing")
        if masks is None:
            recon, regions = self.reconstruction(editor, image, latents, description, batch_size), None
        else:
            recons, regions = reconstruction_and_region(editor, description, latents, masks, ["the image"], None)
            recon = recons[0]
        stage("editing")
        writer = SequenceWriter([folder], [{"original": image, "reconstruction": recon}], description, gif=sweep,
                                grid=sweep, outlines=None if masks is None else [masks[0].mask])
        for batch in editor.edits(latents, description, [(image_key(image),)], region=regions):
            writer.add(batch, 0)
        return OneEdit(folder / "original.png", folder / "reconstruction.png",
                       [folder / name for name in edit_file_names(description)],
                       folder / "grid.png" if sweep else None, folder / "edits.gif" if sweep else None,
                       description.source_distances(latents)[0], hits > 0,
                       None if masks is None else masks[0].record())

    def edit_in_regions(self, editor: Editor, latents: Inversion, description: EditDescription,
                        masks: Sequence[np.ndarray], seed_keys: Sequence[tuple[int, ...]]) -> tuple[Tensor, Tensor]:
        """The reconstructions (B, C, H, W) and edits (B, K, C, H, W) of B inverted images, each edit
        confined to its image's mask ((H, W) in [0, 1], e.g. a part of a synthetic face) as the command
        line's ``--region`` confines it (``description.region`` says how: h, feather, method)."""
        specs = [RegionSpec(np.asarray(m, dtype=np.float32), "part", float(np.mean(m)), path="the masks given",
                            part=description.region.spec) for m in masks]
        recon, regions = reconstruction_and_region(editor, description, latents, specs,
                                                   [f"image {b}" for b in range(len(specs))], None)
        return recon, editor.edit_all(latents, description, seed_keys, region=regions)

    # ---------------------------------------------------------------- the modes
    def run(self, job: Job, exp: Path, overwrite: bool = False, arguments: dict | None = None) -> RunResult:
        """Run ``job`` into the subfolder of ``exp`` its mode writes (``SUBFOLDERS``): the folder
        appears under its final name only if the run succeeds (``RunFolder``), else it and every
        file the run wrote outside it are removed. ``arguments``: the front end's settings, recorded
        in summary.json. Under torchrun, rank 0 alone makes the folder and writes the summaries."""
        process = self.options.process
        prepare = {SearchJob: self._prepare_search, EditJob: self._prepare_edit, SampleJob: self._prepare_edit,
                   RadiusJob: self._prepare_radius, DiscoverJob: self._prepare_discover}[type(job)]
        editor, work = prepare(job)  # every check that needs the model, before the folder exists
        folder = RunFolder(exp, SUBFOLDERS[type(job)], overwrite=overwrite, inputs=self._inputs(job)) \
            if process.is_main else None
        summary = {"arguments": arguments or {}}
        with folder if folder is not None else contextlib.nullcontext() as run_dir:
            result = work(editor, folder, run_dir, summary)
        return RunResult(None if folder is None else folder.final, result)

    def _prepare_search(self, job: SearchJob):
        editor = self._new_editor(job.inverting.t_0, job.inverting.n_inv_step)
        data = self.model.config.data
        plan = plan_search(job, job.data_dir or (Path(data.data_dir) if data.data_dir else None),
                           job.attr_file or (Path(data.attr_file) if data.attr_file else None))
        bases = within_bases(job, editor)

        def work(editor, folder, run_dir, summary):
            result = run_search(editor, job, plan, folder, run_dir, self.options.process, bases)
            if run_dir is not None:
                result = {**summary, **result}
                write_search_summary(run_dir, result)
            return result
        return editor, work

    def _prepare_edit(self, job: EditJob | SampleJob):
        inverting = job.inverting
        editor = self._new_editor(inverting.t_0, inverting.n_inv_step)
        description = self.describe(job.request, inverting.t_0, inverting.n_inv_step,
                                    self.boundary_index(job.boundary_dir))
        if description.region is not None and not is_part(description.region.spec):  # one mask for every image
            masks = region_masks(description.region, [None], self.model.config.data.image_size, [])
            check_masks(description, masks, ["the images"], self.model.shapes["h"][-1])

        def work(editor, folder, run_dir, summary):
            if isinstance(job, EditJob):
                return edit_images(editor, description, job, run_dir, self.options.process, summary)
            return edit_samples(editor, description, job, run_dir, summary)
        return editor, work

    def _prepare_radius(self, job: RadiusJob):
        editor = self._new_editor(1, 2)  # the radius walks its own candidate timesteps, not an inversion grid
        return editor, lambda editor, folder, run_dir, summary: radius(editor, job, run_dir, summary)

    def _prepare_discover(self, job: DiscoverJob):
        editor = self._new_editor(job.inverting.t_0, job.inverting.n_inv_step)
        plan = plan_discover(job, self.model.config)
        index = self.boundary_index(job.boundary_dir)  # the supervised boundaries, before this run writes any

        def work(editor, folder, run_dir, summary):
            return run_discover(editor, job, plan, index, folder, run_dir, summary)
        return editor, work

    def _inputs(self, job: Job) -> list[Path]:
        """Every path the run reads (or writes outside its folder): none may be replaced by it."""
        named = []
        if isinstance(job, (EditJob, SampleJob)):
            named = [p for m in job.request.moves for p in (m.paths or {}).values()]
            named += [p for paths in job.request.held_paths.values() for p in paths]
        paths = [getattr(job, name, None) for name in ("images", "data_dir", "attr_file", "pos_dir", "neg_dir",
                                                       "boundary_dir", "within")]
        cache = self.options.cache_root
        return [Path(p) for p in [*paths, *named, self.model.checkpoint, cache] if p]
