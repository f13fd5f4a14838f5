"""The boundary search: labelled images inverted once, one SVM per attribute and space, the files
written as a set (docs/algorithm.md section 4, docs/modes.md).

``plan_search`` checks every label and name before any image is read; ``run_search`` inverts (each
process of a torchrun job its shard), fits every attribute from one Gram matrix per space and
writes the boundary files, the report or the atlas, and the summary.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from runners.engine.boundaries import stage_boundary_set
from runners.engine.editor import Editor, ImageReader
from runners.engine.regions import part_folders, region_mask_sets, space_weights
from runners.engine.requests import SearchJob
from runners.engine.within import fit_space_within, within_basis
from utils.core.atlas import phi_matrix
from utils.core.batching import batch_slices
from utils.core.boundary import MIN_CLASS_COUNT, class_counts, class_summary, fit_attributes, split_indices
from utils.core.gram import FitError, OneSided
from utils.core.region import confined_rows
from utils.core.spaces import SPACES
from utils.distributed import ProcessContext, broadcast_from_main, gather_to_main, gram_across_ranks, shard, unshard
from utils.errors import UserError
from utils.io.atlas import atlas_from_records, write_atlas
from utils.io.boundary_files import BoundaryRecord, check_attribute_names
from utils.io.datasets import attribute_table, check_two_classes, labelled_set, search_attributes
from utils.io.files import RunFolder, check_writable_dir, write_json
from utils.io.latent_cache import entry_rows
from utils.io.plots import boundary_report
from utils.io.region import AUTO_REGION, attribute_parts, read_attribute_parts

log = logging.getLogger(__name__)

#: What ``--balance`` does (utils.core.boundary.BALANCES; the choice is measured in docs/modes.md).
SEARCH_BALANCE = "equal"
#: Images read and inverted at a time by each process (its latents go to the cache before the next).
READ_CHUNK = 256


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


def _labelled(job: SearchJob, data_dir, attr_file) -> tuple[Sequence[Path], tuple[str, ...], np.ndarray, bool]:
    """(paths, attribute names, labels (N, A) in {-1, 0, 1}, whether several attributes were asked)."""
    wanted = () if job.pos_dir or job.neg_dir else search_attributes(job.attributes)
    if wanted == ():
        data, attribute = labelled_set(job.attributes, data_dir, attr_file, job.pos_dir, job.neg_dir)
        check_two_classes(data.labels, "labelled set")
        return data.paths, (attribute,), (2 * data.labels - 1)[:, None], False
    if not data_dir or not attr_file:
        raise UserError("the config names no data folder; pass --data_dir and --attr_file")
    table = attribute_table(data_dir, attr_file, wanted)
    if not len(table):
        raise UserError(f"no image in {data_dir} has a row in {attr_file} (matched by file name)")
    return table.paths, table.names, table.labels, True


def plan_search(job: SearchJob, data_dir: Path | None, attr_file: Path | None) -> SearchSet:
    """The boundary search's images, labels and split, every label and name check done (UserError in
    one line). One attribute: the images labelled for it, as ever. Several (``all`` or ``a,b,c``):
    every image with a row in the attribute file, split once; each attribute is then fitted on the
    images of that split labelled for it. Attribute names that would share a file name, or that no
    file can hold, are refused here (``check_attribute_names``)."""
    paths, names, labels, several = _labelled(job, data_dir, attr_file)
    check_attribute_names(names)
    n_train = min(job.n_train_img, len(paths) - min(job.n_test_img, len(paths) // 2))
    n_test = min(job.n_test_img, len(paths) - n_train)
    train, test = split_indices(len(paths), n_train, n_test, np.random.default_rng(job.seed))
    if not several:
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


@dataclass(frozen=True)
class LatentRows:
    """The search's latents as row readers {space: read(start, stop) -> (rows, D) float32} in the
    order of the images (on rank 0; on every rank when all rows are cached, ``shared``), and how
    the images were spread over the processes."""
    readers: dict
    shared: bool
    sharding: dict


def latent_rows(editor: Editor, paths: Sequence[Path], reader: ImageReader, batch_size: int,
                process: ProcessContext) -> LatentRows:
    """Each rank reads and inverts its shard (images r, r + W, ...) a chunk at a time. An image
    whose latents are in the latent cache is a key, read back block by block, so no process holds
    n x D values; one whose latents could not be cached stays in memory and goes to rank 0."""
    rank, world_size = process.rank, process.world_size
    desc = "inverting" if world_size == 1 else f"inverting (rank {rank}/{world_size})"
    share, mine, hits = shard(list(paths), rank, world_size), [], 0
    for chunk in batch_slices(len(share), batch_size * max(1, READ_CHUNK // batch_size)):
        entries, cached = editor.latent_entries(torch.stack([reader.read(p) for p in share[chunk]]), batch_size,
                                                desc)
        mine += entries
        hits += cached
    parts = gather_to_main((mine, hits), process)
    entries = None if parts is None else unshard([p[0] for p in parts])
    keys = broadcast_from_main(entries if entries and all(isinstance(e, str) for e in entries) else None, process)
    entries = keys if keys is not None else entries
    sharding = {} if parts is None else {"world_size": world_size, "images_per_rank": [len(p[0]) for p in parts],
                                         "cache_hits_per_rank": [p[1] for p in parts]}
    if entries is None:
        return LatentRows({}, False, sharding)
    return LatentRows({s: entry_rows(editor.cache, entries, s, editor.shapes[s]) for s in SPACES},
                      keys is not None, sharding)


def _fit_space(space: str, rows: LatentRows, job: SearchJob, plan: SearchSet, dim: int, gram, device):
    """Every attribute's fit in one space (``fit_attributes``: one Gram matrix, one solve each)."""
    read, n_train = rows.readers[space], len(plan.train)
    try:
        return fit_attributes((read, n_train, dim), plan.labels[plan.train],
                              (lambda a, b, read=read: read(n_train + a, n_train + b), len(plan.test), dim),
                              plan.labels[plan.test], C=job.svm_c, device=device, gram=gram,
                              balance=SEARCH_BALANCE if job.balance else "none", seed=job.seed, names=plan.names)
    except FitError as exc:
        hint = ("raise --svm_c: so small a C gives the hinge loss no weight against the intercept"
                if isinstance(exc, OneSided) else
                "lower --svm_c: the classes overlap, and a large C keeps libsvm taking tiny steps")
        raise UserError(f"the {space} boundary cannot be fitted at --svm_c {job.svm_c:g}: {exc}; {hint}") from None


def within_bases(job: SearchJob, editor: Editor) -> dict | None:
    """With --within: {space: (basis (r, D), its files)}, the directions of that folder at the run's
    t_0 (``within_basis``), checked before any image is read; None without --within. UserError with
    a region too (a fit in the directions is a fit on the whole latent)."""
    if job.within is None:
        return None
    if job.region is not None:
        raise UserError("--region and --within do not combine: --within fits in the discovered directions, which "
                        "span the whole latent")
    if Path(job.within).resolve() == Path(job.boundary_dir).resolve():
        raise UserError(f"--within {job.within} is also --boundary_dir: the new boundary would join the directions "
                        "it is fitted in; write it to another folder")
    return {space: within_basis(Path(job.within), editor.config.name, editor.shapes, editor.t_0, space,
                                editor.model.checkpoint_sha256, job.within_prefix) for space in SPACES}


@dataclass(frozen=True)
class FitRegion:
    """A region the search fits on: what it is (``RegionSpec.source``, recorded in the files), each
    image's weights in each space {space: (N, S) float32, S = H * W of its latent; z: the mask,
    h: the mask's share of each bottleneck cell}, in the order the latents are read, and how much
    of the images it covers (for the summary)."""
    source: str
    weights: dict
    coverage: dict

    def confine(self, rows: LatentRows) -> LatentRows:
        """The row readers with every latent multiplied by its image's weights (``confined_rows``)."""
        def confined(read, weights):
            return lambda start, stop: confined_rows(read(start, stop), weights[start:stop])
        return dataclasses.replace(rows, readers={space: confined(read, self.weights[space])
                                                  for space, read in rows.readers.items()})


def _fit_region(editor: Editor, masks: Sequence) -> FitRegion:
    coverage = np.array([m.coverage for m in masks])
    return FitRegion(masks[0].source(), space_weights([m.mask for m in masks], editor.shapes["h"][-1]),
                     {"mean": float(coverage.mean()), "min": float(coverage.min()), "max": float(coverage.max())})


def fit_regions(editor: Editor, spec: str | None, names: Sequence[str], paths: Sequence[Path]
                ) -> dict[str, FitRegion] | None:
    """With --region: {attribute: FitRegion}, every image's region read before any image is inverted
    (UserError in one line); None without. ``spec`` a mask image, a box or a part's name
    (``region_masks``) for every attribute, or ``auto``: each attribute's own part, as its data set
    names it (``read_attribute_parts``), every part read in one pass. Attributes with one region
    share one ``FitRegion``."""
    if spec is None:
        return None
    specs = dict.fromkeys(names, spec) if spec != AUTO_REGION else \
        attribute_parts(read_attribute_parts(part_folders(editor.config)), names)
    masks = region_mask_sets(list(specs.values()), paths, editor.config.data.image_size, part_folders(editor.config),
                             asked=spec)
    read = {s: _fit_region(editor, masks[s]) for s in masks}
    return {name: read[specs[name]] for name in names}


def _fits(space: str, rows: LatentRows, job: SearchJob, plan: SearchSet, dim: int, gram, device,
          bases: dict | None, regions: dict | None) -> list:
    """Every attribute's fit in one space, in the order of ``plan.names``: on the whole latents, in
    --within's basis (``bases``), or, with ``regions``, each set of attributes that share a region
    on the latents confined to it (one Gram matrix per region)."""
    if bases is not None:
        return fit_space_within(rows.readers[space], len(plan.train), len(plan.test), plan.labels[plan.train],
                                plan.labels[plan.test], bases[space][0], job.svm_c,
                                SEARCH_BALANCE if job.balance else "none", job.seed, plan.names, space)
    if regions is None:
        return _fit_space(space, rows, job, plan, dim, gram, device)
    fits = [None] * len(plan.names)
    groups: dict[str, list[int]] = {}
    for a, name in enumerate(plan.names):
        groups.setdefault(regions[name].source, []).append(a)
    for members in groups.values():
        subset = dataclasses.replace(plan, names=tuple(plan.names[a] for a in members), labels=plan.labels[:, members])
        confined = regions[plan.names[members[0]]].confine(rows)
        for a, fit in zip(members, _fit_space(space, confined, job, subset, dim, None, device)):
            fits[a] = fit
    return fits


def _records(editor: Editor, job: SearchJob, plan: SearchSet, rows: LatentRows, grams: dict,
             bases: dict | None = None, regions: dict | None = None) -> tuple[dict, dict]:
    """{attribute: {space: BoundaryRecord}} and the report's distances {(attribute, space): ...}
    (``_fits``: whole, --within or each attribute's region, recorded in its files)."""
    records, report = {name: {} for name in plan.names}, {}
    order = np.concatenate([plan.train, plan.test])
    labels_train, labels_test = plan.labels[plan.train], plan.labels[plan.test]
    for space in SPACES:
        dim = int(np.prod(editor.shapes[space]))
        fits = _fits(space, rows, job, plan, dim, grams.get(space), editor.device, bases, regions)
        for a, (name, fit) in enumerate(zip(plan.names, fits)):
            y_train = (labels_train[fit.train_rows, a] > 0).astype(np.int64)
            y_test = (labels_test[fit.test_rows, a] > 0).astype(np.int64)
            labelled = plan.labels[order, a]
            report[(name, space)] = {"train": (fit.train_distances, y_train), "test": (fit.test_distances, y_test),
                                     "train_acc": fit.boundary.train_acc, "test_acc": fit.boundary.test_acc}
            records[name][space] = BoundaryRecord.from_boundary(
                fit.boundary, shape=editor.shapes[space], space=space, t_0=editor.t_0, n_inv_step=editor.n_inv_step,
                attribute=name, n_train=len(fit.train_rows), n_test=len(fit.test_rows),
                n_pos=int((labelled > 0).sum()), n_neg=int((labelled < 0).sum()), config_name=editor.config.name,
                checkpoint_sha256=editor.model.checkpoint_sha256,
                fit_region="" if regions is None else regions[name].source,
                class_summary={"train": class_summary(fit.train_distances, y_train),
                               "test": class_summary(fit.test_distances, y_test)})
    return records, report


def _publish(job: SearchJob, folder: RunFolder, run_dir: Path, plan: SearchSet, records: dict, report: dict,
             config_name: str, t_0: int) -> dict:
    """Write the boundary files as a set (every file complete under a temporary name first, all moved
    into place together; with --ni each replaces the current file of its name, ``current_target``,
    the files they replace kept until the run folder is in place), the report or the atlas.
    Returns {attribute: {space: path}}."""
    publish = stage_boundary_set(folder, job.boundary_dir, job.overwrite, {name: records[name] for name in plan.names},
                                 config_name, t_0)
    if len(plan.names) == 1:
        name = plan.names[0]
        boundary_report({space: report[(name, space)] for space in SPACES}, run_dir / "report.png",
                        title=f"{config_name}: {name} at t_0 {t_0}")
    else:
        order = np.concatenate([plan.train, plan.test])
        write_atlas(run_dir, atlas_from_records(records, phi_matrix(plan.labels[order]), plan.skipped))
    return publish()


def run_search(editor: Editor, job: SearchJob, plan: SearchSet, folder: RunFolder | None, run_dir: Path | None,
               process: ProcessContext, bases: dict | None = None) -> dict:
    """Invert, fit and write (rank 0 writes; the others invert their shares and help with the Gram
    matrices). ``bases``: ``within_bases`` (--within). With ``job.region`` every latent is confined
    to its image's region before the fit (``FitRegion``). Returns the summary (empty on other ranks)."""
    if folder is not None:  # before the long inversion: the boundaries can be written
        folder.created_dirs(check_writable_dir(Path(job.boundary_dir)))
    start = time.perf_counter()
    order = np.concatenate([plan.train, plan.test])
    paths = [plan.paths[i] for i in order]
    regions = fit_regions(editor, job.region, plan.names, paths)
    reader = ImageReader.for_config(editor.config, align_face=False)
    rows = latent_rows(editor, paths, reader, job.inverting.batch_size, process)
    invert_seconds = time.perf_counter() - start
    # Under torchrun every rank computes its share of each Gram matrix, rank 0 gets them (a single
    # process computes the same tiles in fit_attributes: the same K). With --region rank 0 computes
    # them alone: each region confines the rows, so each has Gram matrices of its own. --within fits
    # in the directions' coordinates and needs none.
    shared_grams = process.world_size > 1 and rows.shared and regions is None and bases is None
    grams = {space: gram_across_ranks(rows.readers[space], len(plan.train), int(np.prod(editor.shapes[space])),
                                      process, editor.device)
             for space in SPACES} if shared_grams else {}
    if folder is None:
        return {}
    start = time.perf_counter()
    records, report = _records(editor, job, plan, rows, grams, bases, regions)
    fit_seconds = time.perf_counter() - start
    written = _publish(job, folder, run_dir, plan, records, report, editor.config.name, editor.t_0)
    attributes = {name: {space: {"path": str(written[name][space]), "train_acc": records[name][space].train_acc,
                                 "test_acc": records[name][space].test_acc, "n_train": records[name][space].n_train,
                                 "n_test": records[name][space].n_test} for space in SPACES}
                  for name in plan.names}
    summary = {"mode": "boundary_search", "n_train": len(plan.train), "n_test": len(plan.test),
               "invert_seconds": invert_seconds, "fit_seconds": fit_seconds, **rows.sharding,
               "train_images": [str(plan.paths[i]) for i in plan.train],
               "test_images": [str(plan.paths[i]) for i in plan.test], **editor.model.identity.summary()}
    if regions is not None:  # {region: its attributes and coverage}
        summary["region"] = {}
        for name in plan.names:
            entry = summary["region"].setdefault(regions[name].source, {"attributes": [],
                                                                        "coverage": regions[name].coverage})
            entry["attributes"].append(name)
    if bases is not None:
        summary["within"] = {"folder": str(job.within), "dimensions": len(bases["z"][1]),
                             "files": {space: [str(p) for p in bases[space][1]] for space in SPACES}}
    if len(plan.names) == 1:
        summary.update(attribute=plan.names[0], spaces=attributes[plan.names[0]])
    else:
        summary.update(attributes=attributes, skipped=plan.skipped, atlas=["atlas.json", "atlas.png"])
    return summary


def write_search_summary(run_dir: Path, summary: dict) -> None:
    write_json(run_dir / "summary.json", summary)
