"""The edit modes and the mixing-step analysis: real images (a file, a folder or a glob), latents
sampled from noise, and the radius curves (docs/algorithm.md sections 5 to 7).

Each function takes the editor, the checked edit description and the job, writes into the run
folder it is given, and returns the summary; the runs' files are named by ``runners.engine.outputs``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from runners.engine.describe import EditDescription
from runners.engine.editor import Editor, ImageReader, folder_batches
from runners.engine.outputs import (SequenceWriter, edit_label, folder_names, write_contact_sheet, write_radius_table,
                                    write_summary)
from runners.engine.regions import part_folders, region_edits, region_masks
from runners.engine.requests import EditJob, RadiusJob, SampleJob
from runners.engine.t0_report import Labelled, labelled_for_report, t0_report
from utils.core.diffusion import Inversion, sampling_pairs
from utils.core.editing import RegionEdits
from utils.core.seeds import EDIT, RADIUS_NOISE, SAMPLE_EDIT, image_key, item_seed
from utils.distributed import ProcessContext, broadcast_from_main, gather_to_main, shard, unshard
from utils.errors import UserError
from utils.io.files import write_bytes, write_json
from utils.io.images import expand_image_paths, list_images
from utils.io.plots import radius_plot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sequences:
    """What ``edit_sequences`` writes for B latent pairs: how many times, with what extras; with a
    region, each image's ``RegionEdits`` and the masks its grid outlines."""
    n_iter: int = 1
    gif: bool = False
    save_tensors: bool = False
    seed_domain: int = EDIT
    summary: dict = field(default_factory=dict)  # fields every image's summary.json starts with
    region: RegionEdits | None = None
    outlines: Sequence | None = None


def edit_sequences(editor: Editor, description: EditDescription, folders: Sequence[Path], latents: Inversion,
                   first_images: Sequence[dict[str, Tensor]], seed_keys: Sequence[tuple[int, ...]],
                   extras: Sequence[dict], how: Sequences) -> tuple[list[dict], list[Tensor]]:
    """Make every edit of B latent pairs (``how.n_iter`` times), write each image's files and
    summary into its folder; returns the summaries and each image's contact-sheet row. seed_keys and
    ``how.seed_domain``: the seed rule's (``utils.core.seeds``)."""
    writer = SequenceWriter(folders, first_images, description, how.n_iter, how.gif, how.save_tensors,
                            outlines=how.outlines)
    seeds, timings = [], []
    for iteration in range(how.n_iter):
        start = time.perf_counter()
        for batch in editor.edits(latents, description, seed_keys, iteration, how.seed_domain, how.region):
            writer.add(batch, iteration)
        timings.append(time.perf_counter() - start)
        seeds.append(description.seeds(seed_keys, iteration, how.seed_domain))
    own = description.source_distances(latents)
    targets = [description.targets(k) for k in range(len(description))]
    summaries = []
    for b, folder in enumerate(folders):
        if how.save_tensors:
            writer.write_tensors(b, latents)
        summary = {**how.summary, "distances": description.distances(),
                   "targets": targets,  # edit k: {attribute: {space: v.n}}
                   "source_distances": own[b],  # where the unedited latents sit along each normal
                   "seeds": [rows[b] for rows in seeds], "edit_seconds": timings,
                   "images_edited_together": len(folders), **editor.model.identity.summary(),
                   "edit": description.describe(), **extras[b]}
        write_summary(folder, summary)
        summaries.append(summary)
    return summaries, writer.rows


@dataclass
class FolderRun:
    """A folder edit in progress on one rank: per image its (summary, contact-sheet row) or its error."""
    done: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    invert_seconds: float = 0.0
    group_seconds: list = field(default_factory=list)


def reconstruction_and_region(editor: Editor, description: EditDescription, latents: Inversion, masks, names,
                              batch_size: int | None) -> tuple[Tensor, RegionEdits | None]:
    """The reconstructions (B, C, H, W) and, for a region edit, its ``RegionEdits``: then the
    reconstructions are the last states of the runs the outside follows (the same bits)."""
    if description.region is None:
        return editor.reconstruct(latents, description, batch_size), None
    regions = region_edits(editor, description, latents, description.region, masks, names, batch_size)
    return torch.stack([states[-1] for states in regions.states]), regions


def _edit_group(editor: Editor, description: EditDescription, job: EditJob, run_dir: Path, names: dict,
                collection: bool, pending: dict, state: FolderRun, summary: dict, reconstruction_batch: int) -> None:
    """Invert, reconstruct and edit one group of images (``folder_batches``) and write them. pending:
    {path: (image, its region mask or None)}."""
    start = time.perf_counter()
    images = [image for image, _ in pending.values()]
    masks = [mask for _, mask in pending.values()]
    # A lone image is inverted as a pair when --bs_train > 1 (utils.core.batching.pair_lone),
    # so its latents equal, bit for bit, those it gets in a folder run.
    latents, _ = editor.invert(torch.stack(images), job.inverting.batch_size)
    state.invert_seconds += time.perf_counter() - start
    recon, regions = reconstruction_and_region(editor, description, latents, masks, [p.name for p in pending],
                                               reconstruction_batch)
    extras = [{"image": str(p), "folder": names[p] if collection else ".",
               "reconstruction_mse": float(((recon[b].clamp(-1, 1) - image) ** 2).mean()),
               **({} if masks[b] is None else {"region": masks[b].record()})}
              for b, (p, image) in enumerate(zip(pending, images))]
    summaries, rows = edit_sequences(
        editor, description, [run_dir / names[p] if collection else run_dir for p in pending], latents,
        [{"original": image, "reconstruction": recon[b]} for b, image in enumerate(images)],
        [(image_key(image),) for image in images], extras,
        Sequences(job.n_iter, job.gif, job.save_tensors, EDIT, summary, regions,
                  None if regions is None else [m.mask for m in masks]))
    state.done.update(zip(pending, zip(summaries, rows)))
    state.group_seconds.append(summaries[0]["edit_seconds"])  # per iteration, shared by the group


def _edit_shard(editor: Editor, description: EditDescription, job: EditJob, run_dir: Path, paths: list[Path],
                names: dict, collection: bool, process: ProcessContext, summary: dict) -> FolderRun:
    """This rank's images, read and edited a group at a time (memory does not grow with the folder);
    in a folder, an image that cannot be read is recorded and skipped."""
    reader = ImageReader.for_config(editor.config, job.align_face)
    mine = shard(paths, process.rank, process.world_size)
    batches = folder_batches(len(paths), job.inverting.batch_size, description.denoising.batch_size)
    state, pending = FolderRun(), {}
    for i, path in enumerate(mine):
        try:
            mask = None if description.region is None else region_masks(
                description.region, [path], editor.config.data.image_size, part_folders(editor.config))[0]
            pending[path] = (reader.read(path), mask)
        except UserError as exc:
            if not collection:
                raise
            state.errors[path] = str(exc)
            log.error("skipping %s: %s", path, exc)
        if pending and (len(pending) == batches.group or i == len(mine) - 1):
            _edit_group(editor, description, job, run_dir, names, collection, pending, state, summary,
                        batches.reconstruction)
            pending = {}
    return state


def edit_images(editor: Editor, description: EditDescription, job: EditJob, run_dir: Path | None,
                process: ProcessContext, summary: dict) -> dict:
    """Invert real images and edit each to the description's K targets. ``job.images`` is a file
    (results in the run folder itself) or a folder or glob (one subfolder per image, named by
    ``folder_names``, plus a summary and a contact sheet of all). Under torchrun each rank edits its
    shard into the folder rank 0 made; seeds depend on the pixels alone (``image_key``), so sharding
    changes no result. Returns the summary (empty on other ranks); ``summary["failed"]`` lists the
    images of a folder that could not be read."""
    paths, collection = expand_image_paths(job.images)
    names = dict(zip(paths, folder_names(paths)))  # the tool's own names, fixed before any work
    run_dir = broadcast_from_main(run_dir, process)
    if not run_dir.is_dir():
        raise UserError(f"rank {process.rank} cannot see the run folder {run_dir} that rank 0 made: "
                        "editing across machines needs --exp on a file system all machines share")
    state = _edit_shard(editor, description, job, run_dir, paths, names, collection, process,
                        {"mode": "edit_image_boundary", **summary})
    mine = shard(paths, process.rank, process.world_size)
    parts = gather_to_main(([state.done.get(p, state.errors.get(p)) for p in mine], state.group_seconds), process)
    if parts is None:  # not rank 0: its images are written, rank 0 writes the rest
        return {}
    results = dict(zip(paths, unshard([part[0] for part in parts])))
    failed = {str(p): r for p, r in results.items() if isinstance(r, str)}
    edited = {p: r for p, r in results.items() if not isinstance(r, str)}
    if not edited:
        raise UserError(f"none of the {len(paths)} images in {job.images} can be read (first: "
                        f"{next(iter(failed.values()))})")
    if not collection:
        return {**next(iter(edited.values()))[0], "n_written": len(description) * job.n_iter}
    # per iteration, the seconds of every group of every rank (ranks run at once: compute, not wall time)
    edit_seconds = [sum(group[i] for part in parts for group in part[1]) for i in range(job.n_iter)]
    write_contact_sheet([row for _, row in edited.values()], [names[p] for p in edited],
                        ["original", "reconstruction", *(edit_label(description, k) for k in range(len(description)))],
                        run_dir / "contact_sheet.png")
    folder_summary = {"mode": "edit_image_boundary", **summary, "invert_seconds": state.invert_seconds,
                      "edit_seconds": edit_seconds, **editor.model.identity.summary(),
                      "images": [{"image": str(p), "folder": names[p],
                                  **{k: r[k] for k in ("reconstruction_mse", "source_distances")}}
                                 for p, (r, _) in edited.items()],
                      "failed": failed, "world_size": process.world_size,
                      "images_per_rank": [len(part[0]) for part in parts]}
    write_summary(run_dir, folder_summary)
    return {**folder_summary, "n_edited": len(edited)}


def edit_samples(editor: Editor, description: EditDescription, job: SampleJob, run_dir: Path, summary: dict) -> dict:
    """Sample latents at t_0 from noise, then the same edit (docs/algorithm.md section 6). Sample
    i's edits are keyed (i,) in a domain of their own (``utils.core.seeds``), so no two samples share
    edit noise and none shares a real image's."""
    summaries = []
    steps = len(sampling_pairs(editor.config.diffusion.num_diffusion_timesteps, editor.t_0, editor.n_inv_step))
    how = Sequences(job.n_iter, job.gif, job.save_tensors, SAMPLE_EDIT, {"mode": "unconditional", **summary})
    masks = None if description.region is None else region_masks(description.region, [None],
                                                                   editor.config.data.image_size, [])
    for i in range(job.n_samples):
        latents = editor.sample_latents(job.seed, i)
        folder = run_dir if job.n_samples == 1 else run_dir / f"sample_{i:02d}"
        extras = {"sample_index": i, "sampling_steps": steps}
        if masks is not None:
            _, regions = reconstruction_and_region(editor, description, latents, masks, [f"sample {i}"], None)
            how = replace(how, region=regions, outlines=[masks[0].mask])
            extras["region"] = masks[0].record()
        summaries += edit_sequences(editor, description, [folder], latents, [{}], [(i,)], [extras], how)[0]
    if job.n_samples > 1:
        write_summary(run_dir, {"mode": "unconditional", "samples": summaries})
    return summaries[0]


def radius_images(job: RadiusJob) -> list[Path]:
    """The real images of a radius analysis: ``job.images`` (a file, folder or glob) or the data
    folder, the first ``job.n_images``."""
    if job.images:
        paths = expand_image_paths(job.images)[0][: job.n_images]
    elif job.data_dir:
        paths = list_images(job.data_dir)[: job.n_images]
    else:
        raise UserError("--radius needs real images: --data_dir (or --img_path)")
    if not paths:
        raise UserError(f"no images in {job.data_dir}")
    return paths


def radius_labelled(job: RadiusJob) -> Labelled | None:
    """The labelled images of the t_0 report (``--radius --edit_attr A``), split; None without an attribute."""
    if not job.attribute:
        return None
    if not job.data_dir or not job.attr_file:
        raise UserError("--radius --edit_attr needs --data_dir and --attr_file (the config names none)")
    return labelled_for_report(job.attribute, job.data_dir, job.attr_file, job.n_train_img, job.n_test_img, job.seed)


def radius(editor: Editor, job: RadiusJob, run_dir: Path, summary: dict) -> dict:
    """The mixing-step analysis (docs/algorithm.md section 7): the radius of sampled vs inverted
    latents over t, written as radius.json, radius.csv and radius.png; returns the curves with
    ``table`` (the CSV text). With ``job.attribute`` also the t_0 report at the same candidates
    (t0_report.json, t0_report.csv; its recommendation in summary.json as ``t0``)."""
    paths = radius_images(job)
    labelled = radius_labelled(job)
    reader = ImageReader.for_config(editor.config, align_face=False)
    real = torch.stack([reader.read(p) for p in paths])
    generator = torch.Generator().manual_seed(item_seed(job.seed, domain=RADIUS_NOISE))
    noise = torch.randn((job.n_images, *editor.shapes["z"]), generator=generator)
    T = editor.config.diffusion.num_diffusion_timesteps
    candidates = sorted(set(range(0, T, job.step)) | {T - 1})
    result = editor.radius_curves(real, noise, candidates, job.epsilon, job.batch_size)
    identity = editor.model.identity.summary()
    t0 = None
    if labelled is not None:
        t0 = t0_report(editor.model, [t for t in candidates if t >= 1], job.n_inv_step, labelled=labelled,
                       t_m=result["t_m"], svm_c=job.svm_c, batch_size=job.batch_size,
                       cache_root=editor.cache.root if editor.cache else None, show_progress=editor.net.show)
        write_json(run_dir / "t0_report.json", {**t0, "n_train": len(labelled.train), "n_test": len(labelled.test),
                                                **identity})
        write_bytes(run_dir / "t0_report.csv", (t0["table"] + "\n").encode())
    write_json(run_dir / "radius.json", {**result, "n_real": len(real), "n_sampled": len(noise),
                                         "images": [str(p) for p in paths], **identity})
    table = write_radius_table(result, run_dir / "radius.csv")
    write_summary(run_dir, {"mode": "radius", "t_m": result["t_m"], "epsilon": job.epsilon, **summary, **identity,
                            **({"t0": t0["recommended"], "t0_attribute": t0["attribute"]} if t0 else {})})
    radius_plot(result, job.epsilon, run_dir / "radius.png")
    return {**result, "table": table, "t0": t0}
