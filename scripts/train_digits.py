"""Train the small DDPM of ``configs/digits.yml`` on the TRAIN split of the bundled digits.

    bash data_download.sh digits .
    python -m scripts.train_digits --data_dir data/digits --steps 4000

Standard DDPM training (Ho et al. 2020): t ~ U{0..T-1}, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n,
loss = ||n - eps(x_t, t)||^2; Adam with a linear warm-up and a cosine decay, gradient clipping at 1,
and an exponential moving average (EMA) of the weights. The EMA weights are written as a plain
state dict (float32), loadable with ``torch.load(path, weights_only=True)`` and
``build_model(config).load_state_dict(..., strict=True)``; the file is written under a temporary
name and renamed, so an interrupted run never leaves half a checkpoint.

Everything random (initialisation, batches, timesteps, noise) comes from ``--seed``: the same seed,
thread count and PyTorch version give the same weights.
"""
from __future__ import annotations

import argparse
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


def load_split(data_dir: Path, split: str) -> torch.Tensor:
    """All PNGs of ``data_dir/images/<split>`` (sorted by name) as (N, 1, H, W) float32 in [-1, 1]."""
    folder = data_dir / "images" / split
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no PNG images in {folder}; run `bash data_download.sh digits .` first")
    pixels = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in paths])
    return torch.from_numpy(pixels * 2.0 - 1.0)[:, None]


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


def save_state_dict(module: torch.nn.Module, path: Path) -> str:
    """Write ``module``'s state dict (float32, contiguous CPU tensors) atomically; return its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits.yml", help="config name in configs/ or a path")
    parser.add_argument("--data_dir", type=Path, default=Path("data/digits"),
                        help="folder written by make_digits (holds images/train)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint to write (default: the config's checkpoint.path)")
    parser.add_argument("--steps", type=int, default=4000, help="optimiser steps")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (Adam)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay (ramped up as min(decay, (1+n)/(10+n)))")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch")
    parser.add_argument("--log_every", type=int, default=100, help="print progress every N steps")
    parser.add_argument("--save_every", type=int, default=1000, help="also write the EMA checkpoint every N steps")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    ckpt_path = args.out or REPO / config.checkpoint.path
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # initialisation
    gen = torch.Generator().manual_seed(args.seed + 1)  # batches, timesteps, noise

    data = load_split(args.data_dir, "train")
    if data.shape[-1] != config.data.image_size or data.shape[1] != config.data.channels:
        raise ValueError(f"images of shape {tuple(data.shape[1:])} do not match the config "
                         f"({config.data.channels} x {config.data.image_size} x {config.data.image_size})")
    model = build_model(config).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    alphas_cumprod = make_alphas_cumprod(config.diffusion.beta_start, config.diffusion.beta_end,
                                         config.diffusion.num_diffusion_timesteps).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {config.name}: {n_params / 1e6:.2f}M parameters, {len(data)} train images, "
          f"{args.steps} steps of {args.batch_size}, {args.threads} threads", flush=True)

    start, running = time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.warmup, args.steps)
        x0 = data[torch.randint(len(data), (args.batch_size,), generator=gen)]
        t = torch.randint(len(alphas_cumprod), (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a_t = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        out, _ = model(x_t, t.float())
        loss = torch.mean((out - noise) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - start
            rate = (step + 1) / elapsed
            print(f"step {step + 1:6d}/{args.steps}  loss {np.mean(running):.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{elapsed:7.1f}s  {rate:.2f} it/s  eta {(args.steps - step - 1) / rate:6.0f}s", flush=True)
            running = []
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_state_dict(ema, ckpt_path)
    digest = save_state_dict(ema, ckpt_path)
    print(f"done in {time.time() - start:.0f}s; wrote {ckpt_path} ({ckpt_path.stat().st_size / 1e6:.1f} MB) sha256 {digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
