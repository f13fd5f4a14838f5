"""Training step speed of a config's DDPM in fp32 against bf16 autocast, on this machine's CPU.

    python -m scripts.benchmark_train --config faces.yml --batch_size 64 --steps 20 --threads 2

Times ``--steps`` full optimiser steps (forward, backward, Adam, the same ``training_loss`` as
``scripts/train.py``) per precision after ``--warmup`` untimed ones, on random images (the speed does
not depend on the pixels), alternating the precisions in rounds so that a change in the machine's
load affects both. Prints seconds per step and the bf16 speed-up; the CPU's bf16 flags beside them.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from models import build_model
from models.runtime import cpu_flags
from scripts.train import training_loss
from utils.config import load_config
from utils.core.diffusion import make_alphas_cumprod

PRECISIONS = ("fp32", "bf16")


def time_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple, alphas_cumprod: torch.Tensor,
               precision: str, steps: int) -> float:
    """Seconds per optimiser step over ``steps`` steps of ``batch`` = (x0, t, noise)."""
    started = time.perf_counter()
    for _ in range(steps):
        loss = training_loss(model, *batch, alphas_cumprod, precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per precision and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per precision")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both precisions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config)
    size, channels = config.data.image_size, config.data.channels
    alphas_cumprod = make_alphas_cumprod(config.diffusion.beta_start, config.diffusion.beta_end,
                                         config.diffusion.num_diffusion_timesteps).float()
    batch = (torch.rand(args.batch_size, channels, size, size) * 2 - 1,
             torch.randint(len(alphas_cumprod), (args.batch_size,)), torch.randn(args.batch_size, channels, size, size))
    model = build_model(config).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for precision in PRECISIONS:
        time_steps(model, opt, batch, alphas_cumprod, precision, args.warmup)
    seconds = {p: [] for p in PRECISIONS}
    for _ in range(args.rounds):
        for precision in PRECISIONS:
            seconds[precision].append(time_steps(model, opt, batch, alphas_cumprod, precision, args.steps))
    flags = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx"))
    print(f"{config.name}: batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, "
          f"CPU bf16 flags: {', '.join(flags) or 'none'}")
    best = {p: min(s) for p, s in seconds.items()}
    for precision in PRECISIONS:
        print(f"{precision}: {best[precision]:.3f} s/step (best of {args.rounds} rounds of {args.steps}; "
              f"all: {', '.join(f'{s:.3f}' for s in seconds[precision])})")
    print(f"bf16 speed-up: {best['fp32'] / best['bf16']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
