"""The runner: loads the model once and wires the core functions into the command-line modes."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models import build_model, latent_shapes
from models.runtime import InferenceNet
from utils.boundary import fit_boundary, latent_distance, split_indices
from utils.boundary_files import BoundaryRecord, load_boundary, save_boundary
from utils.checkpoints import default_cache_dir, load_weights, resolve_checkpoint, sha256_file
from utils.config import Config
from utils.datasets import check_two_classes, from_attr_file, from_folders
from utils.distributed import SINGLE, ProcessContext, gather_to_main, shard, unshard_rows
from utils.diffusion import Inversion, invert, make_alphas_cumprod, sample_latents, sampling_pairs, timestep_grid
from utils.editing import batch_slices, edit_sequence, item_seed, pair_lone, reconstruct
from utils.errors import UserError
from utils.images import list_images, load_image, save_grid, save_image
from utils.io import atomic_path, free_path, prepare_run_dir, write_json
from utils.latent_cache import LatentCache
from utils.mixing import radius_curves

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
    #: Modes that split their images across the processes of a torchrun job (utils/distributed.py).
    SHARDED_MODES = ("boundary_search",)

    def __init__(self, args: argparse.Namespace, config: Config, device: torch.device,
                 process: ProcessContext = SINGLE):
        """process: this process among those of a torchrun job; rank 0 alone writes run folders and results."""
        self.args, self.config, self.device, self.process = args, config, device, process
        self.checkpoint = resolve_checkpoint(config, args.model_path, args.cache_dir)
        self.checkpoint_sha256 = sha256_file(self.checkpoint)
        model = build_model(config)
        load_weights(model, self.checkpoint)
        self.net = CallCounter(InferenceNet(model.to(device), args.precision), show=process.is_main)
        self.shapes = latent_shapes(config)
        d = config.diffusion
        self.alphas_cumprod = make_alphas_cumprod(d.beta_start, d.beta_end, d.num_diffusion_timesteps)
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

    def _run_dir(self, mode: str) -> Path:
        run_dir = prepare_run_dir(Path(self.args.exp) / mode, overwrite=self.args.ni)
        log.info("writing into %s", run_dir)
        return run_dir

    def _load(self, path: Path) -> Tensor:
        return load_image(path, self.config.data.image_size, self.config.data.channels)

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
        """The boundaries the edit uses, checked against this model, t_0 and --edit_space."""
        args, wanted = self.args, {"both": ("z", "h"), "z": ("z",), "h": ("h",)}[self.args.edit_space]
        records = {}
        for space in ("z", "h"):
            path = getattr(args, f"boundary_{space}")
            if space not in wanted:
                records[space] = None
                continue
            if path is None:
                raise UserError(f"--edit_space {args.edit_space} needs --boundary_{space}")
            record = load_boundary(path)
            if record.space != space:
                raise UserError(f"{path} is a boundary of the {record.space} space, given as --boundary_{space}")
            if tuple(record.shape) != self.shapes[space]:
                raise UserError(f"{path} is a boundary for {space} latents of shape {tuple(record.shape)}, "
                                f"but this model's are {self.shapes[space]}")
            if record.checkpoint_sha256 and record.checkpoint_sha256 != self.checkpoint_sha256 and not args.force:
                raise UserError(f"{path} was fitted on another checkpoint (sha256 {record.checkpoint_sha256[:12]}...); "
                                "pass --force to use it anyway")
            if record.t_0 != args.t_0 and not args.force:
                raise UserError(f"{path} was fitted at t_0 {record.t_0}, this run uses t_0 {args.t_0}; "
                                "pass --force to use it anyway")
            records[space] = record
        return records

    def _edit_and_write(self, out_dir: Path, inversion: Inversion, records: dict, extra: dict,
                        first_images: dict[str, Tensor]) -> dict:
        """Edit one latent pair to every distance (n_iter times) and write images, grid, tensors.

        first_images: named images shown before the edits in the grid (original, reconstruction).
        """
        args = self.args
        distances = torch.linspace(args.start_distance, args.end_distance, args.edit_img_number, dtype=torch.float64)
        normals = {s: None if r is None else torch.from_numpy(r.normal) for s, r in records.items()}
        for name, image in first_images.items():
            save_image(image, out_dir / f"{name}.png")
        all_edits, seeds_used, timings = [], [], []
        for it in range(args.n_iter):
            seeds = [item_seed(args.seed, it, k) for k in range(len(distances))]
            start = time.perf_counter()
            calls = -(-len(distances) // args.edit_batch_size) * len(self.test_grid)
            with self.net.progress(calls, f"edit {it + 1}/{args.n_iter}"):
                edits = edit_sequence(self.net, Inversion(inversion.z.to(self.device), inversion.h.to(self.device)),
                                      self.alphas_cumprod, self.test_grid, distances, normals["z"], normals["h"],
                                      seeds, eta=args.eta, h_policy=args.h_policy,
                                      batch_size=args.edit_batch_size)
            timings.append(time.perf_counter() - start)
            prefix = "" if args.n_iter == 1 else f"iter{it}_"
            for k, (d, image) in enumerate(zip(distances.tolist(), edits)):
                save_image(image, out_dir / f"{prefix}edit_{k:02d}_d{d:+.2f}.png")
            save_grid(torch.cat([*(v[None].cpu() for v in first_images.values()), edits.cpu()]),
                      out_dir / f"{prefix}grid.png")
            all_edits.append(edits.cpu())
            seeds_used.append(seeds)
        if args.save_tensors:
            # Images clipped to [-1, 1] as written, before quantisation to 8 bits.
            tensors = {"z": inversion.z.cpu(), "h": inversion.h.cpu(), "edits": torch.cat(all_edits).clamp(-1, 1),
                       "distances": distances.repeat(args.n_iter)}
            if "reconstruction" in first_images:
                tensors["recon"] = first_images["reconstruction"][None].cpu().clamp(-1, 1)
            with atomic_path(out_dir / "tensors.pt") as tmp:
                torch.save(tensors, tmp)
        own = {s: float(latent_distance(getattr(inversion, s), n)[0]) for s, n in normals.items() if n is not None}
        summary = {"mode": args.mode, "arguments": _plain_args(args), "distances": distances.tolist(),
                   "source_distances": own,  # where the unedited latents sit along each normal
                   "seeds": seeds_used, "edit_seconds": timings, **self._identity(),
                   "boundaries": {s: None if r is None else {"path": str(getattr(args, f"boundary_{s}")), **r.describe()}
                                  for s, r in records.items()}, **extra}
        write_json(out_dir / "summary.json", summary)
        return summary

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
        run_dir = self._run_dir("boundary_search") if self.process.is_main else None
        start = time.perf_counter()
        latents, sharding = self._invert_sharded([data.paths[i] for i in np.concatenate([train_idx, test_idx])],
                                                 args.bs_train, "inverting")
        invert_seconds = time.perf_counter() - start
        if not self.process.is_main:  # rank 0 fits and writes everything
            return {}
        y_train, y_test = data.labels[train_idx], data.labels[test_idx]
        summary = {"mode": "boundary_search", "attribute": attribute, "arguments": _plain_args(args),
                   "n_train": len(train_idx), "n_test": len(test_idx), "invert_seconds": invert_seconds, **sharding,
                   "train_images": [str(data.paths[i]) for i in train_idx],
                   "test_images": [str(data.paths[i]) for i in test_idx], **self._identity(), "spaces": {}}
        boundary_dir = Path(args.boundary_dir) if args.boundary_dir else run_dir
        for space in ("h", "z"):
            flat = getattr(latents, space).reshape(len(latents.z), -1).double().numpy()
            boundary = fit_boundary(flat[:len(train_idx)], y_train, flat[len(train_idx):], y_test)
            record = BoundaryRecord.from_boundary(
                boundary, shape=self.shapes[space], space=space, t_0=args.t_0, n_inv_step=args.n_inv_step,
                attribute=attribute, n_train=len(train_idx), n_test=len(test_idx),
                n_pos=int(data.labels[np.concatenate([train_idx, test_idx])].sum()),
                n_neg=int((data.labels[np.concatenate([train_idx, test_idx])] == 0).sum()),
                config_name=self.config.name, checkpoint_sha256=self.checkpoint_sha256)
            name = f"{self.config.name}_{_slug(attribute)}_t{args.t_0}_{space}"
            target = boundary_dir / f"{name}.npz"
            path = save_boundary(target if args.ni else free_path(target), record)
            summary["spaces"][space] = {"path": str(path), "train_acc": boundary.train_acc, "test_acc": boundary.test_acc}
            print(f"boundary {space}: {path}  train acc {boundary.train_acc:.3f}  test acc {boundary.test_acc:.3f}")
        write_json(run_dir / "summary.json", summary)
        return summary

    def edit_image_boundary(self) -> dict:
        """Invert one real image, edit it across the boundaries to K distances (docs/algorithm.md section 5)."""
        args = self.args
        records = self._boundaries()
        image = self._load(Path(args.img_path))
        run_dir = self._run_dir("edit")
        inversion = self._invert_images([Path(args.img_path)], 1, "inverting")
        with self.net.progress(len(self.test_grid), "reconstructing"):
            recon = reconstruct(self.net, Inversion(inversion.z.to(self.device), inversion.h.to(self.device)),
                                self.alphas_cumprod, self.test_grid, inject_h=records["h"] is not None,
                                h_policy=args.h_policy)[0].cpu()
        fidelity = {"reconstruction_mse": float(((recon.clamp(-1, 1) - image[0]) ** 2).mean())}
        summary = self._edit_and_write(run_dir, inversion, records, {"image": str(args.img_path), **fidelity},
                                       {"original": image[0], "reconstruction": recon})
        print(f"wrote {len(summary['distances']) * args.n_iter} edits and {run_dir / 'grid.png'}")
        return summary

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
            summaries.append(self._edit_and_write(out_dir, Inversion(latent.z.cpu(), latent.h.cpu()), records,
                                                  {"sample_index": i, "sampling_steps": len(pairs)}, {}))
        if args.n_samples > 1:
            write_json(run_dir / "summary.json", {"mode": "unconditional", "samples": summaries})
        print(f"wrote {args.n_samples} edit sequence(s) into {run_dir}")
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
        print("\n".join(rows))
        print(f"mixing step t_m = {result['t_m']} (largest t with relative radius difference <= {args.radius_eps})")
        return result


def _plain_args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text.lower())[:60] or "attribute"
