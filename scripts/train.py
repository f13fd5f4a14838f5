"""Train the DDPM of any config on the TRAIN split of its image folder (the digits, the faces).

    bash data_download.sh faces .
    python -m scripts.train --config faces.yml --steps 12000 --batch_size 64 --precision bf16
    python -m scripts.train --config digits.yml --data_dir data/digits --steps 4000      # the digits model

Standard DDPM training (Ho et al. 2020): t ~ U{0..T-1}, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n,
loss = ||n - eps(x_t, t)||^2; Adam with a linear warm-up and a cosine decay, gradient clipping at 1,
and an exponential moving average (EMA) of the weights. The EMA weights are written as a plain
state dict (float32), loadable with ``torch.load(path, weights_only=True)`` and
``build_model(config).load_state_dict(..., strict=True)``; every file is written under a temporary
name and renamed, so an interrupted run never leaves half a file.

Resuming: every ``--save_every`` steps the whole training state (weights, EMA, optimiser, step,
random generator) goes to ``--state``; run the same command again and it continues from there, so a
run can span sessions. A resumed run gives the same weights as an uninterrupted one: the state
holds the generator of batches, timesteps and noise. The state also records the run's settings,
and a resume with other settings is refused (but for ``--steps``, which reshapes the rest of the
learning-rate decay).

``--precision bf16`` runs the network's forward pass under bfloat16 autocast (weights, optimiser
and EMA stay float32). It pays where the CPU has bfloat16 units (AVX512-BF16, AMX): measured in
docs/faces_report.md section 2.

Everything random (initialisation, batches, timesteps, noise) comes from ``--seed``: the same seed,
thread count and PyTorch version give the same weights.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import build_model
from utils.config import load_config
from utils.core.diffusion import make_alphas_cumprod

REPO = Path(__file__).resolve().parents[1]
#: The settings a resumed run must share with the run that wrote the state. ``--steps`` may change:
#: the cosine decay is then stretched or shortened from the step the run resumes at (the faces model
#: was shortened from 12,000 to 8,000 steps at step 1,000, docs/faces_report_first_model.md section 2).
RUN_SETTINGS = ("config", "batch_size", "lr", "warmup", "ema_decay", "seed", "precision")


def load_split(folder: Path, channels: int) -> torch.Tensor:
    """All PNGs of ``folder`` (sorted by name) as (N, channels, H, W) float32 in [-1, 1]."""
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no PNG images in {folder}; run `bash data_download.sh` for this data set first")
    mode = {1: "L", 3: "RGB"}[channels]
    pixels = np.stack([np.asarray(Image.open(p).convert(mode), dtype=np.float32) / 255.0 for p in paths])
    pixels = pixels.reshape(len(paths), *pixels.shape[1:3], channels).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(pixels * 2.0 - 1.0))


def learning_rate(step: int, base_lr: float, warmup: int, total: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from base_lr to final_fraction * base_lr."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_state_dict(module: torch.nn.Module, path: Path) -> str:
    """Write ``module``'s state dict (float32, contiguous CPU tensors) atomically; return its SHA-256."""
    _save_atomic({k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in module.state_dict().items()},
                 path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_loss(model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  alphas_cumprod: torch.Tensor, precision: str) -> torch.Tensor:
    """||n - eps(x_t, t)||^2 averaged over the batch; the forward pass under bf16 autocast if asked."""
    a_t = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        out, _ = model(x_t, t.float())
    return torch.mean((out.float() - noise) ** 2)


def _settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in RUN_SETTINGS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml", help="config name in configs/ or a path")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="folder of the training PNGs (default: the config's data.data_dir)")
    parser.add_argument("--out", type=Path, default=None, help="EMA checkpoint to write (default: the config's checkpoint.path)")
    parser.add_argument("--state", type=Path, default=None,
                        help="training state to resume from and save to (default: runs/train_<config>/state.pt)")
    parser.add_argument("--steps", type=int, default=4000, help="optimiser steps")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (Adam)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay (ramped up as min(decay, (1+n)/(10+n)))")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="precision of the forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch")
    parser.add_argument("--log_every", type=int, default=100, help="print progress every N steps")
    parser.add_argument("--save_every", type=int, default=1000, help="write the EMA checkpoint and the training state every N steps")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    ckpt_path = args.out or REPO / config.checkpoint.path
    state_path = args.state or Path("runs") / f"train_{config.name}" / "state.pt"
    folder = args.data_dir / "images" / "train" if args.data_dir else Path(config.data.data_dir)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # initialisation
    gen = torch.Generator().manual_seed(args.seed + 1)  # batches, timesteps, noise

    data = load_split(folder, config.data.channels)
    if data.shape[-1] != config.data.image_size or data.shape[1] != config.data.channels:
        raise ValueError(f"images of shape {tuple(data.shape[1:])} do not match the config "
                         f"({config.data.channels} x {config.data.image_size} x {config.data.image_size})")
    model = build_model(config).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    first = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        if {k: state["settings"].get(k) for k in RUN_SETTINGS} != _settings(args):
            raise SystemExit(f"error: {state_path} was written with other settings ({state['settings']}); "
                             f"run with those, or pass another --state")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        first = int(state["step"])
        print(f"resuming from {state_path} at step {first}", flush=True)
    alphas_cumprod = make_alphas_cumprod(config.diffusion.beta_start, config.diffusion.beta_end,
                                         config.diffusion.num_diffusion_timesteps).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {config.name}: {n_params / 1e6:.2f}M parameters, {len(data)} train images, "
          f"{args.steps} steps of {args.batch_size}, {args.precision}, {args.threads} threads", flush=True)

    start, running = time.time(), []
    for step in range(first, args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.warmup, args.steps)
        x0 = data[torch.randint(len(data), (args.batch_size,), generator=gen)]
        t = torch.randint(len(alphas_cumprod), (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = training_loss(model, x0, t, noise, alphas_cumprod, args.precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
        running.append(loss.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.time() - start
            rate = (done - first) / elapsed
            print(f"step {done:6d}/{args.steps}  loss {np.mean(running):.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{elapsed:7.1f}s  {rate:.2f} it/s  eta {(args.steps - done) / rate:6.0f}s", flush=True)
            running = []
        if done % args.save_every == 0 and done < args.steps:
            save_state_dict(ema, ckpt_path)
            _save_atomic({"settings": _settings(args), "step": done, "model": model.state_dict(),
                          "ema": ema.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state()},
                         state_path)
    digest = save_state_dict(ema, ckpt_path)
    print(f"done in {time.time() - start:.0f}s; wrote {ckpt_path} ({ckpt_path.stat().st_size / 1e6:.1f} MB) sha256 {digest}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
