"""The runner: loads the model once and wires the core functions into the command-line modes."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models.loading import load_model
from models.runtime import InferenceNet
from utils.core.boundary import class_summary, fit_boundary_rows, latent_distance, split_indices
from utils.io.boundary_files import BoundaryRecord, boundary_path, load_boundary, save_boundary
from models.checkpoints import default_cache_dir
from utils.config import Config
from utils.io.datasets import check_two_classes, from_attr_file, from_folders
from utils.distributed import (SINGLE, ProcessContext, broadcast_from_main, gather_to_main, gram_across_ranks, shard,
                               unshard, unshard_rows)
from utils.core.diffusion import Inversion, invert, sample_latents, sampling_pairs, timestep_grid
from utils.core.editing import batch_slices, condition_normal, image_key, item_seed, iter_edits, pair_lone, reconstruct
from utils.errors import UserError
from utils.io.face_align import INSTALL as FACE_INSTALL, FaceAligner, FaceExtraMissing
from utils.io.images import dequantize, expand_image_paths, list_images, load_image, quantize, save_image
from utils.io.files import RunFolder, atomic_path, check_writable_dir, write_json
from utils.io.latent_cache import LatentCache
from utils.core.mixing import radius_curves
from utils.io.plots import back_and_forth_gif, boundary_report, labelled_grid, radius_plot

log = logging.getLogger(__name__)


class CallCounter:
    """Wraps the network so that a tqdm bar advances with every call (observation only)."""

    def __init__(self, net: InferenceNet, show: bool = True):
        self.net, self.bar, self.show = net, None, show

    def __call__(self, x: Tensor, t, h_override: Tensor | None = None):
        out = self.net(x, t, h_override=h_override)
        if self.bar is not None:
            self.bar.update(1)
        return out

    def progress(self, total: int, desc: str) -> "CallCounter":
        self.bar = tqdm(total=total, desc=desc, unit="call", leave=False, dynamic_ncols=True, disable=not self.show)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        self.bar = None


class BoundaryDiffusion:
    aligner: FaceAligner | None = None  # set by --edit_image_boundary when faces are aligned
    #: Modes that split their images across the processes of a torchrun job (utils/distributed.py).
    SHARDED_MODES = ("boundary_search", "edit_image_boundary")

    def __init__(self, args: argparse.Namespace, config: Config, device: torch.device,
                 process: ProcessContext = SINGLE):
        """process: this process among those of a torchrun job; rank 0 alone writes run folders and results."""
        self.args, self.config, self.device, self.process = args, config, device, process
        loaded = load_model(config, args.model_path, args.cache_dir, device, args.precision)
        self.checkpoint, self.checkpoint_sha256 = loaded.checkpoint, loaded.checkpoint_sha256
        self.net = CallCounter(loaded.net, show=process.is_main)
        self.shapes, self.alphas_cumprod = loaded.shapes, loaded.alphas_cumprod
        self.grid = timestep_grid(args.t_0, args.n_inv_step)
        self.test_grid = timestep_grid(args.t_0, args.n_test_step)
        self.cache = None if args.no_cache else LatentCache(
            Path(args.cache_dir or default_cache_dir()) / "latents",
            {"config": config.name, "checkpoint": self.checkpoint_sha256, "model": config.to_dict()["model"],
             "diffusion": config.to_dict()["diffusion"], "t_0": args.t_0, "n_inv_step": args.n_inv_step,
             "precision": args.precision})
        log.info("model %s from %s (sha256 %s...) on %s, %s", config.name, self.checkpoint,
                 self.checkpoint_sha256[:12], device, args.precision)

    # ------------------------------------------------------------------ shared steps
    def _identity(self) -> dict:
        return {"config_name": self.config.name, "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": self.checkpoint_sha256}

    def run(self) -> dict:
        """Run ``args.mode``; its run folder appears under its final name only if the mode succeeds
        (utils.io.files.RunFolder), else it and the files the run wrote outside it are removed."""
        with contextlib.ExitStack() as stack:
            self._stack, self._folder = stack, None
            result = getattr(self, self.args.mode)()
        if self._folder is not None:
            print(f"results in {self._folder.final}")
        return result

    def _inputs(self) -> list[Path]:
        """Every path the run reads (or writes outside its folder): none may be replaced by it."""
        args = self.args
        paths = [getattr(args, name, None) for name in ("img_path", "data_dir", "attr_file", "pos_dir", "neg_dir",
                                                        "boundary_h", "boundary_z", "boundary_dir")]
        return [Path(p) for p in [*paths, self.checkpoint, self.cache.root if self.cache else None] if p]

    def _run_dir(self, mode: str) -> Path:
        """The hidden folder this run writes into, renamed to ``<exp>/<mode>[-N]`` when ``run`` succeeds."""
        self._folder = RunFolder(self.args.exp, mode, overwrite=self.args.ni, inputs=self._inputs())
        run_dir = self._stack.enter_context(self._folder)
        log.info("writing into %s", run_dir)
        return run_dir

    def _shared_run_dir(self, mode: str) -> Path:
        """``_run_dir`` made by rank 0 and handed to every rank of a torchrun job, which all write
        into it (so several machines need ``--exp`` on a shared file system)."""
        run_dir = broadcast_from_main(self._run_dir(mode) if self.process.is_main else None, self.process)
        if not run_dir.is_dir():
            raise UserError(f"rank {self.process.rank} cannot see the run folder {run_dir} that rank 0 made: "
                            "editing across machines needs --exp on a file system all machines share")
        return run_dir

    def _load(self, path: Path) -> Tensor:
        if self.aligner is not None:
            return self.aligner.load(path, self.config.data.image_size, self.config.data.channels)
        return load_image(path, self.config.data.image_size, self.config.data.channels)

    def _face_aligner(self) -> FaceAligner | None:
        """The face aligner when alignment is on: --align_face 1 (the extra must be installed), or
        the config's data.align_face (without the extra: a warning and the unaligned image)."""
        flag = self.args.align_face
        if not (flag if flag is not None else self.config.data.align_face):
            return None
        try:
            return FaceAligner()
        except FaceExtraMissing:
            if flag:
                raise
            log.warning("config %s aligns faces, but the face extra is not installed (%s); editing the "
                        "unaligned image", self.config.name, FACE_INSTALL)
            return None

    def _invert_images(self, paths: Sequence[Path], batch_size: int, desc: str) -> Inversion:
        """Latents of every image, (N, ...) each: from the cache where present, else inverted in
        batches and cached image by image (so an interrupted run resumes)."""
        return self._invert_counted(paths, batch_size, desc)[0]

    def _invert_counted(self, paths: Sequence[Path], batch_size: int, desc: str) -> tuple[Inversion, int]:
        """``_invert_images`` and how many of the images came from the cache."""
        images = [self._load(p)[0] for p in paths]
        keys = [self.cache.key(img) for img in images] if self.cache else [None] * len(images)
        found = [self.cache.get(k) if self.cache else None for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        log.info("%s: %d images, %d from the cache", desc, len(images), len(images) - len(todo))
        calls = -(-len(todo) // batch_size) * (len(self.grid) - 1)
        with self.net.progress(calls, desc):
            for chunk in batch_slices(len(todo), batch_size):
                batch = todo[chunk]
                x0 = pair_lone(torch.stack([images[i] for i in batch]).to(self.device), batch_size)
                inv = invert(self.net, x0, self.alphas_cumprod, self.grid)
                for j, i in enumerate(batch):
                    found[i] = Inversion(z=inv.z[j].cpu(), h=inv.h[j].cpu())
                    if self.cache:
                        self.cache.put(keys[i], found[i].z, found[i].h)
        return Inversion(z=torch.stack([f.z for f in found]), h=torch.stack([f.h for f in found])), \
            len(images) - len(todo)

    def _invert_sharded(self, paths: Sequence[Path], batch_size: int, desc: str) -> tuple[Inversion | None, dict]:
        """``_invert_images`` split across the job's processes: each rank inverts (and caches) its
        shard; rank 0 gets every latent in the order of ``paths``, the other ranks None.

        Returns (latents, {"world_size", "images_per_rank", "cache_hits_per_rank"}); the counts
        are complete on rank 0 only."""
        rank, world_size = self.process.rank, self.process.world_size
        share = shard(paths, rank, world_size)
        if share:
            mine, hits = self._invert_counted(share, batch_size,
                                              desc if world_size == 1 else f"{desc} (rank {rank}/{world_size})")
        else:  # fewer images than processes
            mine, hits = Inversion(z=torch.empty((0, *self.shapes["z"])), h=torch.empty((0, *self.shapes["h"]))), 0
        parts = gather_to_main((mine, hits), self.process)
        if parts is None:
            return None, {}
        latents = Inversion(z=unshard_rows([p[0].z for p in parts]), h=unshard_rows([p[0].h for p in parts]))
        return latents, {"world_size": world_size, "images_per_rank": [len(p[0].z) for p in parts],
                         "cache_hits_per_rank": [p[1] for p in parts]}

    def _boundaries(self) -> dict[str, BoundaryRecord | None]:
        """The boundaries the edit uses, checked against this model, t_0 and --edit_space. With
        conditions (--condition_z/--condition_h), a space's normal is the primary one projected
        orthogonal to that space's condition normals; ``self.conditions`` then describes them."""
        args, wanted = self.args, {"both": ("z", "h"), "z": ("z",), "h": ("h",)}[self.args.edit_space]
        records, self.conditions = {}, {}
        for space in ("z", "h"):
            path = getattr(args, f"boundary_{space}")
            if space not in wanted:
                records[space] = None
                continue
            if path is None:
                raise UserError(f"--edit_space {args.edit_space} needs --boundary_{space}")
            records[space] = self._check_boundary(path, space, f"--boundary_{space}")
            condition_paths = getattr(args, f"condition_{space}", None) or []
            if condition_paths:
                held = [self._check_boundary(p, space, f"--condition_{space}") for p in condition_paths]
                try:
                    normal, angles = condition_normal(records[space].normal, [c.normal for c in held])
                except ValueError as exc:
                    raise UserError(f"cannot condition the {space} edit: {exc}") from None
                records[space] = dataclasses.replace(records[space], normal=normal)
                self.conditions[space] = [{"path": str(p), "attribute": c.attribute, "angle_degrees": a}
                                          for p, c, a in zip(condition_paths, held, angles)]
                log.info("%s edit held orthogonal to %s (angles %s degrees)", space,
                         ", ".join(c.attribute or str(p) for p, c in zip(condition_paths, held)),
                         ", ".join(f"{a:.1f}" for a in angles))
        return records

    def _check_boundary(self, path: Path, space: str, flag: str) -> BoundaryRecord:
        """A boundary file of ``space`` that fits this model, checkpoint and t_0 (or --force)."""
        args = self.args
        record = load_boundary(path, self.shapes)  # the normal's size checked from its header first
        if record.space != space:
            raise UserError(f"{path} is a boundary of the {record.space} space, given as {flag}")
        if tuple(record.shape) != self.shapes[space]:
            raise UserError(f"{path} is a boundary for {space} latents of shape {tuple(record.shape)}, "
                            f"but this model's are {self.shapes[space]}")
        if record.checkpoint_sha256 and record.checkpoint_sha256 != self.checkpoint_sha256 and not args.force:
            raise UserError(f"{path} was fitted on another checkpoint (sha256 {record.checkpoint_sha256[:12]}...); "
                            "pass --force to use it anyway")
        if record.t_0 != args.t_0 and not args.force:
            raise UserError(f"{path} was fitted at t_0 {record.t_0}, this run uses t_0 {args.t_0}; "
                            "pass --force to use it anyway")
        return record

    def _edit_and_write(self, out_dirs: Sequence[Path], inversion: Inversion, records: dict, extras: Sequence[dict],
                        first_images: Sequence[dict[str, Tensor]], seed_keys: Sequence[tuple[int, ...]],
                        thumbnails: list | None = None) -> list[dict]:
        """Edit B latent pairs to every distance (n_iter times), batched across images and
        distances; write each edit as soon as its batch is denoised, and each image's grid (and
        GIF) as soon as its last edit is, so memory does not grow with the number of edits
        (except the floats --save_tensors keeps for tensors.pt).

        out_dirs, extras (summary fields), first_images (named images shown before the edits in
        the grid: original, reconstruction) and seed_keys (edit k of iteration i of image b uses
        ``item_seed(--seed, *seed_keys[b], i, k)``): one per image. thumbnails: when given, gets
        each image's first-iteration row (first images, then edits) for a contact sheet, as uint8
        (``utils.io.images.quantize``).
        """
        args = self.args
        distances = torch.linspace(args.start_distance, args.end_distance, args.edit_img_number, dtype=torch.float64)
        normals = {s: None if r is None else torch.from_numpy(r.normal) for s, r in records.items()}
        for out_dir, named in zip(out_dirs, first_images):
            for name, image in named.items():
                save_image(image, out_dir / f"{name}.png")
        n_images, k_total = len(out_dirs), len(distances)
        column_labels = [*first_images[0], *(f"d={d:+.2f}" for d in distances.tolist())]
        # Each edit is written as its batch completes. Until an image's sequence is complete only its
        # written 8-bit pixels are kept (for the grid and GIF), and floats only with --save_tensors.
        shown = [[] for _ in range(n_images)]
        kept = [{"edits": [], "z": [], "h": []} for _ in range(n_images)]
        seeds_used, timings = [[] for _ in range(n_images)], []
        device_inversion = Inversion(inversion.z.to(self.device), inversion.h.to(self.device))
        for it in range(args.n_iter):
            seeds = [[item_seed(args.seed, *key, it, k) for k in range(k_total)] for key in seed_keys]
            start = time.perf_counter()
            calls = -(-n_images * k_total // args.edit_batch_size) * len(self.test_grid)
            prefix = "" if args.n_iter == 1 else f"iter{it}_"
            with self.net.progress(calls, f"edit {it + 1}/{args.n_iter}"):
                for batch in iter_edits(self.net, device_inversion, self.alphas_cumprod, self.test_grid, distances,
                                        normals["z"], normals["h"], seeds, eta=args.eta, h_policy=args.h_policy,
                                        batch_size=args.edit_batch_size):
                    images = batch.images.cpu()
                    for j, (b, k) in enumerate(batch.items):
                        save_image(images[j], out_dirs[b] / f"{prefix}edit_{k:02d}_d{distances[k].item():+.2f}.png")
                        shown[b].append(quantize(images[j]))
                        if args.save_tensors:
                            kept[b]["edits"].append(images[j].clamp(-1, 1))
                            kept[b]["z"].append(batch.z[j].cpu())
                            kept[b]["h"].append(None if batch.h is None else batch.h[j].cpu())
                        if k == k_total - 1:  # image b's sequence is complete; its row in 8 bits, as shown
                            row = torch.stack([*(quantize(v) for v in first_images[b].values()), *shown[b]])
                            shown[b] = []
                            labelled_grid(dequantize(row), out_dirs[b] / f"{prefix}grid.png", column_labels)
                            if args.gif:
                                back_and_forth_gif(dequantize(row[len(first_images[b]):]),
                                                   out_dirs[b] / f"{prefix}edits.gif")
                            if thumbnails is not None and it == 0:
                                thumbnails.append(row)
            timings.append(time.perf_counter() - start)
            for b in range(n_images):
                seeds_used[b].append(seeds[b])
        summaries = []
        for b, out_dir in enumerate(out_dirs):
            z, h = inversion.z[b:b + 1], inversion.h[b:b + 1]
            if args.save_tensors:
                # Images clipped to [-1, 1] as written, before quantisation to 8 bits.
                tensors = {"z": z.cpu(), "h": h.cpu(), "edits": torch.stack(kept[b]["edits"]),
                           "distances": distances.repeat(args.n_iter), "edited_z": torch.stack(kept[b]["z"])}
                if kept[b]["h"][0] is not None:
                    tensors["edited_h"] = torch.stack(kept[b]["h"])
                if "reconstruction" in first_images[b]:
                    tensors["recon"] = first_images[b]["reconstruction"][None].cpu().clamp(-1, 1)
                with atomic_path(out_dir / "tensors.pt") as tmp:
                    torch.save(tensors, tmp)
            own = {s: float(latent_distance({"z": z, "h": h}[s], n)[0]) for s, n in normals.items() if n is not None}
            summary = {"mode": args.mode, "arguments": _plain_args(args), "distances": distances.tolist(),
                       "source_distances": own,  # where the unedited latents sit along each normal
                       "seeds": seeds_used[b], "edit_seconds": timings, "images_edited_together": n_images,
                       **self._identity(),
                       "boundaries": {s: None if r is None else {"path": str(getattr(args, f"boundary_{s}")),
                                                                 **r.describe()} for s, r in records.items()},
                       "conditions": getattr(self, "conditions", {}), **extras[b]}
            write_json(out_dir / "summary.json", summary)
            summaries.append(summary)
        return summaries

    # ------------------------------------------------------------------ modes
    def boundary_search(self) -> dict:
        """Invert labelled images to t_0, fit one SVM per space, save both boundaries (docs/algorithm.md section 4)."""
        args = self.args
        if args.pos_dir or args.neg_dir:
            if not (args.pos_dir and args.neg_dir):
                raise UserError("--pos_dir and --neg_dir go together")
            data, attribute = from_folders(args.pos_dir, args.neg_dir), args.edit_attr or Path(args.pos_dir).name
        else:
            if not args.edit_attr:
                raise UserError("--boundary_search needs --edit_attr (with --data_dir/--attr_file) or --pos_dir/--neg_dir")
            data_dir, attr_file = args.data_dir or self.config.data.data_dir, args.attr_file or self.config.data.attr_file
            if not data_dir or not attr_file:
                raise UserError(f"config {self.config.name} names no data folder; pass --data_dir and --attr_file")
            data, attribute = from_attr_file(data_dir, attr_file, args.edit_attr), args.edit_attr
        check_two_classes(data.labels, "labelled set")
        n_train = min(args.n_train_img, len(data) - min(args.n_test_img, len(data) // 2))
        n_test = min(args.n_test_img, len(data) - n_train)
        train_idx, test_idx = split_indices(len(data), n_train, n_test, np.random.default_rng(args.seed))
        check_two_classes(data.labels[train_idx], "training split", minimum=1)
        paths = [data.paths[i] for i in np.concatenate([train_idx, test_idx])]
        boundary_dir = Path(args.boundary_dir)
        run_dir = None
        if self.process.is_main:
            run_dir = self._run_dir("boundary_search")
            # Before the long inversion (which reads every image first): the boundaries can be written.
            self._folder.created_dirs(check_writable_dir(boundary_dir))
        start = time.perf_counter()
        if self.cache is None:  # nothing to stream from: rank 0 holds every latent (n x D)
            latents, sharding = self._invert_sharded(paths, args.bs_train, "inverting")
            rows = None if latents is None else {s: lambda a, b, s=s: getattr(latents, s)[a:b] for s in ("h", "z")}
            keys = None
        else:
            # Each rank inverts its shard into the cache a chunk at a time and keeps only the keys:
            # the fit reads the latents back from the cache block by block, so no process ever
            # holds n x D values (utils/core/gram.py, utils/distributed.py).
            share, keys, hits = shard(paths, self.process.rank, self.process.world_size), [], 0
            chunk = args.bs_train * max(1, 256 // args.bs_train)
            for part in (share[i:i + chunk] for i in range(0, len(share), chunk)):
                keys += [self.cache.key(self._load(p)[0]) for p in part]
                hits += self._invert_counted(part, args.bs_train, "inverting" if self.process.world_size == 1 else
                                             f"inverting (rank {self.process.rank}/{self.process.world_size})")[1]
            parts = gather_to_main((keys, hits), self.process)
            keys = broadcast_from_main(None if parts is None else unshard([p[0] for p in parts]), self.process)
            sharding = {} if parts is None else {"world_size": self.process.world_size,
                                                 "images_per_rank": [len(p[0]) for p in parts],
                                                 "cache_hits_per_rank": [p[1] for p in parts]}
            rows = {s: self.cache.rows(keys, s, self.shapes[s])[0] for s in ("h", "z")}
        invert_seconds = time.perf_counter() - start
        grams = {}
        for space in ("h", "z") if keys is not None and self.process.world_size > 1 else ():
            # Every rank computes its share of the Gram matrices, rank 0 gets them (a single process
            # computes one space's at a time in fit_boundary_rows: the same tiles, the same K).
            grams[space] = gram_across_ranks(rows[space], n_train, int(np.prod(self.shapes[space])), self.process,
                                             self.device)
        if not self.process.is_main:  # rank 0 fits and writes everything
            return {}
        y_train, y_test = data.labels[train_idx], data.labels[test_idx]
        summary = {"mode": "boundary_search", "attribute": attribute, "arguments": _plain_args(args),
                   "n_train": len(train_idx), "n_test": len(test_idx), "invert_seconds": invert_seconds, **sharding,
                   "train_images": [str(data.paths[i]) for i in train_idx],
                   "test_images": [str(data.paths[i]) for i in test_idx], **self._identity(), "spaces": {}}
        records, report = {}, {}
        for space in ("h", "z"):
            dim, read = int(np.prod(self.shapes[space])), rows[space]
            fit = fit_boundary_rows((read, n_train, dim), y_train,
                                    (lambda a, b, read=read: read(n_train + a, n_train + b), len(test_idx), dim), y_test,
                                    C=args.svm_c, device=self.device, gram=grams.get(space))
            boundary = fit.boundary
            report[space] = {"train": (fit.train_distances, y_train), "test": (fit.test_distances, y_test),
                             "train_acc": boundary.train_acc, "test_acc": boundary.test_acc}
            records[space] = BoundaryRecord.from_boundary(
                boundary, shape=self.shapes[space], space=space, t_0=args.t_0, n_inv_step=args.n_inv_step,
                attribute=attribute, n_train=len(train_idx), n_test=len(test_idx),
                n_pos=int(data.labels[np.concatenate([train_idx, test_idx])].sum()),
                n_neg=int((data.labels[np.concatenate([train_idx, test_idx])] == 0).sum()),
                config_name=self.config.name, checkpoint_sha256=self.checkpoint_sha256,
                class_summary={"train": class_summary(fit.train_distances, y_train),
                               "test": class_summary(fit.test_distances, y_test)})
        for space, record in records.items():  # written last, and removed again if the run fails after all
            name = f"{self.config.name}_{_slug(attribute)}_t{args.t_0}_{space}"
            path = save_boundary(boundary_path(boundary_dir, name), record, overwrite=args.ni)
            self._folder.undo(path)
            summary["spaces"][space] = {"path": str(path), "train_acc": record.train_acc, "test_acc": record.test_acc}
            print(f"boundary {space}: {path}  train acc {record.train_acc:.3f}  test acc {record.test_acc:.3f}")
        boundary_report(report, run_dir / "report.png", title=f"{self.config.name}: {attribute} at t_0 {args.t_0}")
        write_json(run_dir / "summary.json", summary)
        return summary

    def edit_image_boundary(self) -> dict:
        """Invert real images, edit each across the boundaries to K distances (docs/algorithm.md
        section 5). ``--img_path`` is a file (results in ``<exp>/edit/``) or a folder or glob
        (results in ``<exp>/edit/<image stem>/``, plus a summary and a contact sheet of all)."""
        args = self.args
        records = self._boundaries()
        self.aligner = self._face_aligner()
        paths, collection = expand_image_paths(args.img_path)
        stems = [p.stem for p in paths]
        if len(set(stems)) < len(stems):
            twice = sorted({s for s in stems if stems.count(s) > 1})
            raise UserError(f"--img_path holds several images named {twice[0]} (e.g. .png and .jpg); "
                            "each image needs its own stem for its folder <exp>/edit/<stem>/")
        # Under torchrun each rank edits its shard of the images into the run folder rank 0 made;
        # seeds depend on the pixels alone (image_key), so sharding changes no result.
        rank, world_size = self.process.rank, self.process.world_size
        run_dir = self._shared_run_dir("edit")
        mine = shard(paths, rank, world_size)
        images, errors = {}, {}
        for path in mine:
            try:
                images[path] = self._load(path)[0]
            except UserError as exc:
                if not collection:
                    raise
                errors[path] = str(exc)
                log.error("skipping %s: %s", path, exc)
        good = list(images)
        summaries, rows, invert_seconds = [], [], 0.0
        if good:
            start = time.perf_counter()
            # A lone image is inverted as a pair when --bs_train > 1 (utils.core.editing.pair_lone), so its latents
            # equal, bit for bit, those it gets in a folder run.
            inversion = self._invert_images(good, args.bs_train, "inverting")
            invert_seconds = time.perf_counter() - start
            recon = self._reconstruct(inversion, inject_h=records["h"] is not None)
            out_dirs = [run_dir / p.stem if collection else run_dir for p in good]
            extras = [{"image": str(p), "reconstruction_mse": float(((recon[b].clamp(-1, 1) - images[p]) ** 2).mean())}
                      for b, p in enumerate(good)]
            summaries = self._edit_and_write(out_dirs, inversion, records, extras,
                                             [{"original": images[p], "reconstruction": recon[b]}
                                              for b, p in enumerate(good)],
                                             [(image_key(images[p]),) for p in good], thumbnails=rows)
        # One entry per image of this shard, in shard order: (summary, contact-sheet row as uint8) or the error.
        done = dict(zip(good, zip(summaries, rows)))
        parts = gather_to_main([done.get(p, errors.get(p)) for p in mine], self.process)
        if parts is None:  # not rank 0: its images are written, rank 0 writes the rest
            return {}
        results = dict(zip(paths, unshard(parts)))
        failed = {str(p): r for p, r in results.items() if isinstance(r, str)}
        edited = {p: r for p, r in results.items() if not isinstance(r, str)}
        if not edited:
            raise UserError(f"none of the {len(paths)} images in {args.img_path} can be read (first: "
                            f"{next(iter(failed.values()))})")
        first = next(iter(edited.values()))[0]
        if not collection:
            print(f"wrote {len(first['distances']) * args.n_iter} edits and grid.png")
            return first
        labelled_grid(torch.cat([dequantize(row) for _, row in edited.values()]),
                      run_dir / "contact_sheet.png", ncol=len(next(iter(edited.values()))[1]),
                      column_labels=["original", "reconstruction", *(f"d={d:+.2f}" for d in first["distances"])],
                      row_labels=[p.stem for p in edited])
        summary = {"mode": args.mode, "arguments": _plain_args(args), "invert_seconds": invert_seconds,
                   "edit_seconds": first["edit_seconds"], **self._identity(),
                   "images": [{"image": str(p), "folder": p.stem,
                               **{k: s[k] for k in ("reconstruction_mse", "source_distances")}}
                              for p, (s, _) in edited.items()],
                   "failed": failed, "world_size": world_size,
                   "images_per_rank": [len(part) for part in parts]}
        write_json(run_dir / "summary.json", summary)
        print(f"edited {len(edited)} images into <image stem>/ folders and wrote contact_sheet.png"
              + (f"; {len(failed)} failed: {', '.join(Path(f).name for f in failed)}" if failed else ""))
        return summary

    def _reconstruct(self, inversion: Inversion, inject_h: bool) -> Tensor:
        """Each latent pair regenerated without edit, (B, C, H, W), in batches of --edit_batch_size."""
        n = len(inversion.z)
        batch_size = min(self.args.edit_batch_size, n)
        parts = []
        with self.net.progress(-(-n // batch_size) * len(self.test_grid), "reconstructing"):
            for chunk in batch_slices(n, batch_size):
                part = Inversion(pair_lone(inversion.z[chunk], batch_size).to(self.device),
                                 pair_lone(inversion.h[chunk], batch_size).to(self.device))
                parts.append(reconstruct(self.net, part, self.alphas_cumprod, self.test_grid, inject_h=inject_h,
                                         h_policy=self.args.h_policy)[:chunk.stop - chunk.start].cpu())
        return torch.cat(parts)

    def unconditional(self) -> dict:
        """Sample latents at t_0 from noise, then the same edit (docs/algorithm.md section 6)."""
        args = self.args
        records = self._boundaries()
        run_dir = self._run_dir("unconditional")
        pairs = sampling_pairs(self.config.diffusion.num_diffusion_timesteps, args.t_0, args.n_inv_step)
        summaries = []
        for i in range(args.n_samples):
            generator = torch.Generator().manual_seed(item_seed(args.seed, 10_000 + i))
            x_T = torch.randn((1, *self.shapes["z"]), generator=generator).to(self.device)
            with self.net.progress(len(pairs), f"sampling {i + 1}/{args.n_samples}"):
                latent = sample_latents(self.net, x_T, self.alphas_cumprod, pairs)
            out_dir = run_dir if args.n_samples == 1 else run_dir / f"sample_{i:02d}"
            summaries += self._edit_and_write([out_dir], Inversion(latent.z.cpu(), latent.h.cpu()), records,
                                              [{"sample_index": i, "sampling_steps": len(pairs)}], [{}], [()])
        if args.n_samples > 1:
            write_json(run_dir / "summary.json", {"mode": "unconditional", "samples": summaries})
        print(f"wrote {args.n_samples} edit sequence(s)")
        return summaries[0]

    def radius(self) -> dict:
        """The mixing-step analysis (docs/algorithm.md section 7): radius of sampled vs inverted latents over t."""
        args = self.args
        data_dir = args.data_dir or self.config.data.data_dir
        if args.img_path:
            paths = [Path(args.img_path)]
        elif data_dir:
            paths = list_images(data_dir)[: args.n_test_img]
        else:
            raise UserError("--radius needs real images: --data_dir (or --img_path)")
        if not paths:
            raise UserError(f"no images in {data_dir}")
        run_dir = self._run_dir("radius")
        real = torch.cat([self._load(p) for p in paths]).to(self.device)
        generator = torch.Generator().manual_seed(item_seed(args.seed, 20_000))
        noise = torch.randn((args.n_test_img, *self.shapes["z"]), generator=generator).to(self.device)
        T = self.config.diffusion.num_diffusion_timesteps
        candidates = sorted(set(range(0, T, args.radius_step)) | {T - 1})
        calls = 2 * (len(candidates) - 1) * -(-max(len(real), len(noise)) // args.bs_test)
        with self.net.progress(calls, "radius"):
            result = radius_curves(self.net, real, noise, self.alphas_cumprod, candidates, args.radius_eps,
                                   args.bs_test)
        write_json(run_dir / "radius.json", {**result, "n_real": len(real), "n_sampled": len(noise),
                                             "images": [str(p) for p in paths], **self._identity()})
        rows = ["t,radius_sampled,radius_inverted,radius_analytic,relative_difference"]
        rows += [f"{t},{s:.4f},{r:.4f},{a:.4f},{d:.5f}" for t, s, r, a, d in zip(
            result["t"], result["radius_sampled"], result["radius_inverted"], result["radius_analytic"],
            result["relative_difference"])]
        with atomic_path(run_dir / "radius.csv") as tmp:
            tmp.write_text("\n".join(rows) + "\n")
        write_json(run_dir / "summary.json", {"mode": "radius", "t_m": result["t_m"], "epsilon": args.radius_eps,
                                              "arguments": _plain_args(args), **self._identity()})
        radius_plot(result, args.radius_eps, run_dir / "radius.png")
        print("\n".join(rows))
        print(f"mixing step t_m = {result['t_m']} (largest t with relative radius difference <= {args.radius_eps})")
        return result


def _plain_args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text.lower())[:60] or "attribute"
