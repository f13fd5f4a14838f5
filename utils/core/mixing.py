"""The mixing-step analysis (docs/algorithm.md section 7): where do sampled and inverted latents meet?

For candidate timesteps t, compare the mean radius ||x_t|| of latents reached by DDIM sampling
(eta 0, from T - 1 down to t) with that of real images DDIM-inverted up to t. The mixing step t_m
reported is the largest t at which their relative difference |r_s - r_i| / r_s is at most epsilon.
The analytic reference sqrt(a_t E||x0||^2 + (1 - a_t) d) is the radius a forward-diffused real
image would have.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from utils.core.batching import batch_slices
from utils.core.diffusion import Net, alpha_bar, ddim_trajectory


def _radii_along(net: Net, x: Tensor, alphas_cumprod: Tensor, pairs: list[tuple[int, int]], batch_size: int) -> dict[int, Tensor]:
    """{t: (N,) radii of x_t} for the start of ``pairs`` and every timestep they reach."""
    per_t: dict[int, list[Tensor]] = {pairs[0][0]: [], **{t_next: [] for _, t_next in pairs}}
    for chunk in batch_slices(len(x), batch_size):
        batch = x[chunk]
        per_t[pairs[0][0]].append(batch.flatten(1).double().norm(dim=1).cpu())
        for step in ddim_trajectory(net, batch, alphas_cumprod, pairs):
            per_t[step.t].append(step.x.flatten(1).double().norm(dim=1).cpu())
    return {t: torch.cat(v) for t, v in per_t.items()}


def radius_curves(net: Net, images: Tensor, noise: Tensor, alphas_cumprod: Tensor, candidates: Sequence[int],
                  epsilon: float, batch_size: int = 8) -> dict:
    """Radius curves over ``candidates`` (ascending, from 0 to T - 1) and the mixing step.

    images: (N, C, H, W) real images in [-1, 1]; noise: (M, C, H, W) standard normal x_{T-1}.
    Returns a dict of lists keyed t, radius_sampled, radius_inverted, radius_analytic,
    relative_difference (each ordered like ``candidates``), plus t_m (None if no t qualifies).
    """
    ts = list(candidates)
    up = list(zip(ts[:-1], ts[1:]))
    down = [(b, a) for a, b in reversed(up)]
    inverted = _radii_along(net, images, alphas_cumprod, up, batch_size)
    sampled = _radii_along(net, noise, alphas_cumprod, down, batch_size)
    d = images[0].numel()
    mean_sq = float(images.flatten(1).double().pow(2).sum(1).mean())
    out = {"t": ts, "radius_sampled": [], "radius_inverted": [], "radius_analytic": [], "relative_difference": []}
    for t in ts:
        a_t = float(alpha_bar(alphas_cumprod, t))
        r_s, r_i = float(sampled[t].mean()), float(inverted[t].mean())
        out["radius_sampled"].append(r_s)
        out["radius_inverted"].append(r_i)
        out["radius_analytic"].append((a_t * mean_sq + (1 - a_t) * d) ** 0.5)
        out["relative_difference"].append(abs(r_s - r_i) / r_s)
    within = [t for t, diff in zip(ts, out["relative_difference"]) if diff <= epsilon]
    out["t_m"] = max(within) if within else None
    return out
