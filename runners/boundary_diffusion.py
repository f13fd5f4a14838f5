"""The command-line modes: settings in, a run folder out. Each mode wires the editing engine
(``runners.editor``), the writer (``runners.outputs``) and, under torchrun, the sharding of its
images (``utils.distributed``); the numbers are computed in the engine and the core."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from models.checkpoints import default_cache_dir
from models.loading import LoadedModel
from runners.edit_description import BoundaryIndex, EditDescription, describe_edit
from runners.editor import Editor, ImageReader, folder_batches
from runners.outputs import SequenceWriter, edit_label, folder_names, write_contact_sheet, write_radius_table, write_summary
from runners.settings import Settings
from utils.core.batching import batch_slices
from utils.core.atlas import phi_matrix
from utils.core.boundary import MIN_CLASS_COUNT, class_counts, class_summary, fit_attributes, split_indices
from utils.core.gram import FitError, OneSided
from utils.core.diffusion import Inversion, sampling_pairs
from utils.core.seeds import EDIT, RADIUS_NOISE, SAMPLE_EDIT, image_key, item_seed
from utils.distributed import (SINGLE, ProcessContext, broadcast_from_main, gather_to_main, gram_across_ranks, shard,
                               unshard)
from utils.errors import UserError
from utils.io.atlas import atlas_from_records, write_atlas
from utils.io.boundary_files import BoundaryRecord, boundary_name, boundary_path, boundary_writer
from utils.io.datasets import attribute_table, check_two_classes, labelled_set, search_attributes
from utils.io.files import RunFolder, StagedFiles, check_writable_dir, write_json
from utils.io.images import expand_image_paths, list_images
from utils.io.latent_cache import entry_rows
from utils.io.plots import boundary_report, radius_plot

log = logging.getLogger(__name__)

#: Each mode's subfolder of --exp.
SUBFOLDERS = {"boundary_search": "boundary_search", "edit_image_boundary": "edit", "unconditional": "unconditional",
              "radius": "radius"}


#: What ``--balance`` does (utils.core.boundary.BALANCES; the choice is measured in docs/modes.md).
SEARCH_BALANCE = "weight"


@dataclass(frozen=True)
class SearchSet:
    """The images a boundary search inverts and what each attribute is fitted on.

    paths: N images; names: the A attributes fitted; labels: (N, A) int64 in {-1, 0, 1} (0: not
    labelled for it); train, test: indices into paths (the seeded split); skipped: {attribute:
    {"train": {"neg", "pos"}, "test": {...}}} for the attributes of a multi-attribute search with
    fewer than ``MIN_CLASS_COUNT`` training images of a class."""
    paths: tuple[Path, ...]
    names: tuple[str, ...]
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray
    skipped: dict


def search_set(s: Settings) -> SearchSet:
    """The boundary search's images, labels and split, every label check done (UserError in one
    line). One attribute: the images labelled for it, as ever. Several (``--edit_attr all`` or
    ``a,b,c``): every image with a row in the attribute file, split once; each attribute is then
    fitted on the images of that split labelled for it."""
    config = s.config
    data_dir, attr_file = s.data_dir or config.data.data_dir, s.attr_file or config.data.attr_file
    wanted = () if s.pos_dir or s.neg_dir else search_attributes(s.edit_attr)
    if wanted == ():
        data, attribute = labelled_set(s.edit_attr, data_dir, attr_file, s.pos_dir, s.neg_dir)
        check_two_classes(data.labels, "labelled set")
        paths, names, labels = data.paths, (attribute,), (2 * data.labels - 1)[:, None]
    else:
        if not data_dir or not attr_file:
            raise UserError("the config names no data folder; pass --data_dir and --attr_file")
        table = attribute_table(data_dir, attr_file, wanted)
        if not len(table):
            raise UserError(f"no image in {data_dir} has a row in {attr_file} (matched by file name)")
        paths, names, labels = table.paths, table.names, table.labels
    n_train = min(s.n_train_img, len(paths) - min(s.n_test_img, len(paths) // 2))
    n_test = min(s.n_test_img, len(paths) - n_train)
    train, test = split_indices(len(paths), n_train, n_test, np.random.default_rng(s.seed))
    if wanted == ():
        check_two_classes((labels[train, 0] > 0).astype(np.int64), "training split", minimum=1)
        return SearchSet(tuple(paths), names, labels, train, test, {})
    counts = {split: class_counts(labels[idx]) for split, idx in (("train", train), ("test", test))}
    described = {name: {split: {"neg": int(c[a, 0]), "pos": int(c[a, 1])} for split, c in counts.items()}
                 for a, name in enumerate(names)}
    keep = [a for a in range(len(names)) if counts["train"][a].min() >= MIN_CLASS_COUNT]
    skipped = {names[a]: described[names[a]] for a in range(len(names)) if a not in keep}
    for name, c in skipped.items():
        log.warning("skipping '%s': %d positive and %d negative training images, fewer than %d of a class",
                    name, c["train"]["pos"], c["train"]["neg"], MIN_CLASS_COUNT)
    if not keep:
        shown = ", ".join(f"{n} {c['train']['pos']}/{c['train']['neg']}" for n, c in list(skipped.items())[:5])
        raise UserError(f"no attribute has {MIN_CLASS_COUNT} training images of each class among the {n_train} "
                        f"of the split (positive/negative: {shown}{', ...' if len(skipped) > 5 else ''})")
    return SearchSet(tuple(paths), tuple(names[a] for a in keep), labels[:, keep], train, test, skipped)


class BoundaryDiffusion:
    #: Modes that split their images across the processes of a torchrun job (utils/distributed.py).
    SHARDED_MODES = ("boundary_search", "edit_image_boundary")

    def __init__(self, settings: Settings, model: LoadedModel, process: ProcessContext = SINGLE):
        """process: this process among those of a torchrun job; rank 0 alone writes run folders and results."""
        self.settings, self.process = settings, process
        cache_root = None if settings.no_cache else Path(settings.cache_dir or default_cache_dir()) / "latents"
        self.editor = Editor(model, settings.t_0, settings.n_inv_step, cache_root, settings.precision,
                             show_progress=process.is_main)
        log.info("model %s from %s (sha256 %s...), %s", settings.config.name, model.checkpoint,
                 model.checkpoint_sha256[:12], settings.precision)

    def run(self) -> dict:
        """Run the mode; its run folder appears under its final name only if the mode succeeds
        (utils.io.files.RunFolder), else it and the files the run wrote outside it are removed."""
        s = self.settings
        folder = RunFolder(s.exp, SUBFOLDERS[s.mode], overwrite=s.ni, inputs=self._inputs()) \
            if self.process.is_main else None
        with folder if folder is not None else contextlib.nullcontext() as run_dir:
            if run_dir is not None:
                log.info("writing into %s", run_dir)
            result = getattr(self, s.mode)(folder, run_dir)
        if folder is not None:
            print(f"results in {folder.final}")
        return result

    def _inputs(self) -> list[Path]:
        """Every path the run reads (or writes outside its folder): none may be replaced by it."""
        s, cache = self.settings, self.editor.cache
        paths = [s.img_path, s.data_dir, s.attr_file, s.pos_dir, s.neg_dir, *s.boundary_files(), s.boundary_dir,
                 self.editor.model.checkpoint, cache.root if cache else None]
        return [Path(p) for p in paths if p]

    def _latent_rows(self, paths: Sequence[Path], reader: ImageReader) -> tuple[dict, bool, dict]:
        """The latents of the images at ``paths`` as row readers {space: read(start, stop) -> (rows, D)
        float32} in the order of ``paths``, each rank reading and inverting its shard (images r, r + W,
        ...) a chunk at a time. An image whose latents are in the latent cache is a key, read back
        block by block, so no process holds n x D values; one whose latents could not be cached (no
        cache, or it cannot be written) stays in memory and goes to rank 0. Returns the readers (on
        rank 0; on every rank when all rows are cached, which the ranks' shared Gram needs), whether
        they are on every rank, and {"world_size", "images_per_rank", "cache_hits_per_rank"}."""
        rank, world_size, editor = self.process.rank, self.process.world_size, self.editor
        desc = "inverting" if world_size == 1 else f"inverting (rank {rank}/{world_size})"
        share, mine, hits = shard(list(paths), rank, world_size), [], 0
        for chunk in batch_slices(len(share), self.settings.bs_train * max(1, 256 // self.settings.bs_train)):
            images = torch.stack([reader.read(p) for p in share[chunk]])
            latents, cached = editor.invert(images, self.settings.bs_train, desc)
            hits += cached
            if editor.cache is not None and editor.cache.writable:
                mine += [editor.cache_key(image, self.settings.bs_train) for image in images]
            else:
                mine += [{"z": latents.z[j].flatten().numpy(), "h": latents.h[j].flatten().numpy()}
                         for j in range(len(images))]
        parts = gather_to_main((mine, hits), self.process)
        entries = None if parts is None else unshard([p[0] for p in parts])
        keys = broadcast_from_main(entries if entries and all(isinstance(e, str) for e in entries) else None,
                                   self.process)
        entries = keys if keys is not None else entries
        sharding = {} if parts is None else {"world_size": world_size, "images_per_rank": [len(p[0]) for p in parts],
                                             "cache_hits_per_rank": [p[1] for p in parts]}
        if entries is None:
            return {}, False, sharding
        return {s: entry_rows(editor.cache, entries, s, editor.shapes[s]) for s in ("h", "z")}, keys is not None, \
            sharding

    def _description(self) -> EditDescription:
        """The edit of the settings' request, checked against the model (before any image is read)."""
        s = self.settings
        index = BoundaryIndex(s.boundary_dir, s.config.name, self.editor.shapes)
        return describe_edit(self.editor, s.edit, index, s.force)

    def _edit_sequences(self, folders: Sequence[Path], latents: Inversion, description: EditDescription,
                        first_images: Sequence[dict[str, Tensor]], seed_keys: Sequence[tuple[int, ...]],
                        extras: Sequence[dict], seed_domain: int = EDIT) -> tuple[list[dict], list[Tensor]]:
        """Make every edit of B latent pairs (n_iter times), write each image's files and summary
        into its folder; returns the summaries and each image's contact-sheet row. seed_keys and
        seed_domain: the seed rule's (``utils.core.seeds``)."""
        s = self.settings
        writer = SequenceWriter(folders, first_images, description, s.n_iter, s.gif, s.save_tensors)
        seeds, timings = [], []
        for iteration in range(s.n_iter):
            start = time.perf_counter()
            for batch in self.editor.edits(latents, description, seed_keys, iteration, seed_domain):
                writer.add(batch, iteration)
            timings.append(time.perf_counter() - start)
            seeds.append(description.seeds(seed_keys, iteration, seed_domain))
        own = description.source_distances(latents)
        targets = [description.targets(k) for k in range(len(description))]
        summaries = []
        for b, folder in enumerate(folders):
            if s.save_tensors:
                writer.write_tensors(b, latents)
            summary = {"mode": s.mode, "arguments": s.to_dict(), "distances": description.distances(),
                       "targets": targets,  # edit k: {attribute: {space: v.n}}
                       "source_distances": own[b],  # where the unedited latents sit along each normal
                       "seeds": [rows[b] for rows in seeds], "edit_seconds": timings,
                       "images_edited_together": len(folders), **self.editor.identity(),
                       "edit": description.describe(), **extras[b]}
            write_summary(folder, summary)
            summaries.append(summary)
        return summaries, writer.rows

    # ------------------------------------------------------------------ modes
    def boundary_search(self, folder: RunFolder | None, run_dir: Path | None) -> dict:
        """Invert labelled images to t_0 and fit one SVM per space, for one attribute or for several
        (``--edit_attr all`` or ``a,b,c``: one set of images inverted once, every attribute fitted from
        one Gram matrix per space); the boundary files are written as a set, with an atlas of how the
        attributes' normals align when there are several (docs/algorithm.md section 4, docs/modes.md)."""
        s, config = self.settings, self.settings.config
        job = search_set(s)  # every label check before any image is inverted
        n_train = len(job.train)
        if folder is not None:  # before the long inversion: the boundaries can be written
            folder.created_dirs(check_writable_dir(Path(s.boundary_dir)))
        start = time.perf_counter()
        order = np.concatenate([job.train, job.test])
        rows, shared, sharding = self._latent_rows([job.paths[i] for i in order],
                                                   ImageReader.for_config(config, align_face=False))
        invert_seconds = time.perf_counter() - start
        dims = {space: int(np.prod(self.editor.shapes[space])) for space in ("h", "z")}
        # Under torchrun every rank computes its share of each Gram matrix, rank 0 gets them (a single
        # process computes the same tiles in fit_attributes: the same K).
        grams = {space: gram_across_ranks(rows[space], n_train, dims[space], self.process, self.editor.device)
                 for space in ("h", "z")} if self.process.world_size > 1 and shared else {}
        if folder is None:  # rank 0 fits and writes everything
            return {}
        start = time.perf_counter()
        labels_train, labels_test = job.labels[job.train], job.labels[job.test]
        records, report = {name: {} for name in job.names}, {}
        for space in ("h", "z"):
            read, dim = rows[space], dims[space]
            try:
                fits = fit_attributes((read, n_train, dim), labels_train,
                                      (lambda a, b, read=read: read(n_train + a, n_train + b), len(job.test), dim),
                                      labels_test, C=s.svm_c, device=self.editor.device, gram=grams.get(space),
                                      balance=SEARCH_BALANCE if s.balance else "none", seed=s.seed, names=job.names)
            except FitError as exc:
                hint = ("raise --svm_c: so small a C gives the hinge loss no weight against the intercept"
                        if isinstance(exc, OneSided) else
                        "lower --svm_c: the classes overlap, and a large C keeps libsvm taking tiny steps")
                raise UserError(f"the {space} boundary cannot be fitted at --svm_c {s.svm_c:g}: {exc}; {hint}") \
                    from None
            for a, (name, fit) in enumerate(zip(job.names, fits)):
                y_train = (labels_train[fit.train_rows, a] > 0).astype(np.int64)
                y_test = (labels_test[fit.test_rows, a] > 0).astype(np.int64)
                labelled = job.labels[order, a]
                report[(name, space)] = {"train": (fit.train_distances, y_train), "test": (fit.test_distances, y_test),
                                         "train_acc": fit.boundary.train_acc, "test_acc": fit.boundary.test_acc}
                records[name][space] = BoundaryRecord.from_boundary(
                    fit.boundary, shape=self.editor.shapes[space], space=space, t_0=s.t_0, n_inv_step=s.n_inv_step,
                    attribute=name, n_train=len(fit.train_rows), n_test=len(fit.test_rows),
                    n_pos=int((labelled > 0).sum()), n_neg=int((labelled < 0).sum()), config_name=config.name,
                    checkpoint_sha256=self.editor.model.checkpoint_sha256,
                    class_summary={"train": class_summary(fit.train_distances, y_train),
                                   "test": class_summary(fit.test_distances, y_test)})
        fit_seconds = time.perf_counter() - start
        # The set is written as a set: every file complete under a temporary name first, all moved
        # into place together, the files they replace (--ni) kept until the run folder is in place.
        staged = StagedFiles()
        folder.attach(staged)
        for name in job.names:
            for space in ("h", "z"):
                staged.stage(boundary_path(s.boundary_dir, boundary_name(config.name, name, s.t_0, space)),
                             boundary_writer(records[name][space]))
        if len(job.names) == 1:
            name = job.names[0]
            boundary_report({space: report[(name, space)] for space in ("h", "z")}, run_dir / "report.png",
                            title=f"{config.name}: {name} at t_0 {s.t_0}")
        else:
            atlas = atlas_from_records(records, phi_matrix(job.labels[order]), job.skipped)
            write_atlas(run_dir, atlas)
        paths = iter(staged.publish(overwrite=s.ni))
        summary = {"mode": "boundary_search", "arguments": s.to_dict(), "n_train": n_train, "n_test": len(job.test),
                   "invert_seconds": invert_seconds, "fit_seconds": fit_seconds, **sharding,
                   "train_images": [str(job.paths[i]) for i in job.train],
                   "test_images": [str(job.paths[i]) for i in job.test], **self.editor.identity()}
        attributes = {}
        for name in job.names:
            spaces = {}
            for space in ("h", "z"):
                record, path = records[name][space], next(paths)
                spaces[space] = {"path": str(path), "train_acc": record.train_acc, "test_acc": record.test_acc,
                                 "n_train": record.n_train, "n_test": record.n_test}
                print(f"boundary {space}{'' if len(job.names) == 1 else ' ' + name}: {path}  "
                      f"train acc {record.train_acc:.3f}  test acc {record.test_acc:.3f}")
            attributes[name] = spaces
        if len(job.names) == 1:
            summary.update(attribute=job.names[0], spaces=attributes[job.names[0]])
        else:
            summary.update(attributes=attributes, skipped=job.skipped)
            print(f"atlas of {len(job.names)} attributes: atlas.json and atlas.png in the run folder"
                  + (f"; skipped (fewer than {MIN_CLASS_COUNT} training images of a class): "
                     f"{', '.join(job.skipped)}" if job.skipped else ""))
        write_json(run_dir / "summary.json", summary)
        return summary

    def edit_image_boundary(self, folder: RunFolder | None, run_dir: Path | None) -> dict:
        """Invert real images, edit each across the boundaries to K distances (docs/algorithm.md
        section 5). ``--img_path`` is a file (results in ``<exp>/edit/``) or a folder or glob
        (results in ``<exp>/edit/<folder name>/``, plus a summary and a contact sheet of all)."""
        s = self.settings
        description = self._description()
        reader = ImageReader.for_config(s.config, s.align_face)
        paths, collection = expand_image_paths(s.img_path)
        names = dict(zip(paths, folder_names(paths)))  # the tool's own names, fixed before any work
        # Under torchrun each rank edits its shard of the images into the run folder rank 0 made;
        # seeds depend on the pixels alone (image_key), so sharding changes no result.
        run_dir = broadcast_from_main(run_dir, self.process)
        if not run_dir.is_dir():
            raise UserError(f"rank {self.process.rank} cannot see the run folder {run_dir} that rank 0 made: "
                            "editing across machines needs --exp on a file system all machines share")
        mine = shard(paths, self.process.rank, self.process.world_size)
        batches = folder_batches(len(paths), s.bs_train, description.denoising.batch_size)
        done, errors, pending, invert_seconds, group_seconds = {}, {}, {}, 0.0, []
        for i, path in enumerate(mine):
            try:
                pending[path] = reader.read(path)
            except UserError as exc:
                if not collection:
                    raise
                errors[path] = str(exc)
                log.error("skipping %s: %s", path, exc)
            if pending and (len(pending) == batches.group or i == len(mine) - 1):
                start = time.perf_counter()
                # A lone image is inverted as a pair when --bs_train > 1 (utils.core.batching.pair_lone),
                # so its latents equal, bit for bit, those it gets in a folder run.
                latents, _ = self.editor.invert(torch.stack(list(pending.values())), s.bs_train)
                invert_seconds += time.perf_counter() - start
                recon = self.editor.reconstruct(latents, description, batches.reconstruction)
                extras = [{"image": str(p), "folder": names[p] if collection else ".",
                           "reconstruction_mse": float(((recon[b].clamp(-1, 1) - image) ** 2).mean())}
                          for b, (p, image) in enumerate(pending.items())]
                summaries, rows = self._edit_sequences(
                    [run_dir / names[p] if collection else run_dir for p in pending], latents, description,
                    [{"original": image, "reconstruction": recon[b]} for b, image in enumerate(pending.values())],
                    [(image_key(image),) for image in pending.values()], extras)
                done.update(zip(pending, zip(summaries, rows)))  # per image: (summary, contact-sheet row)
                group_seconds.append(summaries[0]["edit_seconds"])  # per iteration, shared by the group
                pending = {}
        parts = gather_to_main(([done.get(p, errors.get(p)) for p in mine], group_seconds), self.process)
        if parts is None:  # not rank 0: its images are written, rank 0 writes the rest
            return {}
        results = dict(zip(paths, unshard([part[0] for part in parts])))
        # per iteration, the seconds of every group of every rank (ranks run at once: compute, not wall time)
        edit_seconds = [sum(group[i] for part in parts for group in part[1]) for i in range(s.n_iter)]
        failed = {str(p): r for p, r in results.items() if isinstance(r, str)}
        edited = {p: r for p, r in results.items() if not isinstance(r, str)}
        if not edited:
            raise UserError(f"none of the {len(paths)} images in {s.img_path} can be read (first: "
                            f"{next(iter(failed.values()))})")
        first = next(iter(edited.values()))[0]
        if not collection:
            print(f"wrote {len(first['distances']) * s.n_iter} edits and grid.png")
            return first
        write_contact_sheet([row for _, row in edited.values()], [names[p] for p in edited],
                            ["original", "reconstruction", *(edit_label(description, k) for k in range(len(description)))],
                            run_dir / "contact_sheet.png")
        summary = {"mode": s.mode, "arguments": s.to_dict(), "invert_seconds": invert_seconds,
                   "edit_seconds": edit_seconds, **self.editor.identity(),
                   "images": [{"image": str(p), "folder": names[p],
                               **{k: r[k] for k in ("reconstruction_mse", "source_distances")}}
                              for p, (r, _) in edited.items()],
                   "failed": failed, "world_size": self.process.world_size,
                   "images_per_rank": [len(part[0]) for part in parts]}
        write_summary(run_dir, summary)
        print(f"edited {len(edited)} images into one folder each and wrote contact_sheet.png"
              + (f"; {len(failed)} failed: {', '.join(Path(f).name for f in failed)}" if failed else ""))
        return summary

    def unconditional(self, folder: RunFolder, run_dir: Path) -> dict:
        """Sample latents at t_0 from noise, then the same edit (docs/algorithm.md section 6)."""
        s = self.settings
        # Sample i's edits are keyed (i,) in a domain of their own (utils.core.seeds), so no two
        # samples share edit noise and none shares a real image's.
        description, summaries = self._description(), []
        for i in range(s.n_samples):
            latents = self.editor.sample_latents(s.seed, i)
            sampling = {"sample_index": i, "sampling_steps": len(sampling_pairs(
                s.config.diffusion.num_diffusion_timesteps, s.t_0, s.n_inv_step))}
            summaries += self._edit_sequences([run_dir if s.n_samples == 1 else run_dir / f"sample_{i:02d}"],
                                              latents, description, [{}], [(i,)], [sampling],
                                              seed_domain=SAMPLE_EDIT)[0]
        if s.n_samples > 1:
            write_summary(run_dir, {"mode": "unconditional", "samples": summaries})
        print(f"wrote {s.n_samples} edit sequence(s)")
        return summaries[0]

    def radius(self, folder: RunFolder, run_dir: Path) -> dict:
        """The mixing-step analysis (docs/algorithm.md section 7): radius of sampled vs inverted latents over t."""
        s, editor = self.settings, self.editor
        data_dir = s.data_dir or s.config.data.data_dir
        if s.img_path:  # a file, a folder or a glob, as for --edit_image_boundary
            paths = expand_image_paths(s.img_path)[0][: s.n_test_img]
        elif data_dir:
            paths = list_images(data_dir)[: s.n_test_img]
        else:
            raise UserError("--radius needs real images: --data_dir (or --img_path)")
        if not paths:
            raise UserError(f"no images in {data_dir}")
        reader = ImageReader.for_config(s.config, align_face=False)
        real = torch.stack([reader.read(p) for p in paths])
        generator = torch.Generator().manual_seed(item_seed(s.seed, domain=RADIUS_NOISE))
        noise = torch.randn((s.n_test_img, *editor.shapes["z"]), generator=generator)
        T = s.config.diffusion.num_diffusion_timesteps
        result = editor.radius_curves(real, noise, sorted(set(range(0, T, s.radius_step)) | {T - 1}), s.radius_eps,
                                      s.bs_test)
        write_json(run_dir / "radius.json", {**result, "n_real": len(real), "n_sampled": len(noise),
                                             "images": [str(p) for p in paths], **editor.identity()})
        print(write_radius_table(result, run_dir / "radius.csv"))
        write_summary(run_dir, {"mode": "radius", "t_m": result["t_m"], "epsilon": s.radius_eps,
                                "arguments": s.to_dict(), **editor.identity()})
        radius_plot(result, s.radius_eps, run_dir / "radius.png")
        print(f"mixing step t_m = {result['t_m']} (largest t with relative radius difference <= {s.radius_eps})")
        return result

