"""The numerical core: schedule, timestep grid, DDIM move, and the loops built on it.

Notation (code name -> paper symbol), docs/algorithm.md section 2:

    alphas_cumprod[t]  a_t = prod_{s<=t} (1 - beta_s), t = 0..T-1; a_{-1} = 1 ("clean")
    x                  x_t, pixels scaled to [-1, 1] at t = -1
    eps                the network's noise prediction e(x_t, t)
    z                  x_{t_0}, the noisy image at the mixing step
    h                  the UNet's middle-block output (Asyrp's h-space)
    grid               g = [int(v) for v in linspace(0, 1, S) * t_0]

Every loop takes a network ``net(x, t, h_override=None) -> (out, h)`` and walks explicit
``(t, t_next)`` pairs, evaluating the network at the FIRST timestep of each pair: the lower one
when inverting (upward pairs), the upper one when generating (downward pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.errors import UserError

Net = Callable[..., tuple[Tensor, Tensor]]
HPolicy = Literal["lagged", "once"]
H_POLICIES = ("lagged", "once")


def make_alphas_cumprod(beta_start: float, beta_end: float, num_timesteps: int) -> Tensor:
    """a_t for a linear beta schedule: (T,) float64 (docs/algorithm.md section 2; cast only at use)."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if not (torch.isfinite(alphas_cumprod).all() and (alphas_cumprod > 0).all() and (betas >= 0).all()):
        raise ValueError(f"the beta schedule {beta_start}..{beta_end} over {num_timesteps} steps is not a valid "
                         "schedule (betas must lie in [0, 1), the cumulative product above 0)")
    return alphas_cumprod


def alpha_bar(alphas_cumprod: Tensor, t: int) -> Tensor:
    """a_t as a 0-d float64 tensor, with a_{-1} = 1."""
    if t == -1:
        return torch.ones((), dtype=torch.float64)
    if not 0 <= t < len(alphas_cumprod):
        raise ValueError(f"timestep {t} is outside [-1, {len(alphas_cumprod) - 1}]")
    return alphas_cumprod[t]


def timestep_grid(t_0: int, n_steps: int) -> list[int]:
    """The S-point grid from 0 to t_0: [int(v) for v in linspace(0, 1, S) * t_0].

    Float64 linspace then truncation toward zero, so spacing is uneven:
    timestep_grid(500, 40) = [0, 12, 25, 38, ..., 474, 487, 500].
    """
    if n_steps < 2:
        raise ValueError(f"a timestep grid needs at least 2 points, got {n_steps}")
    return [int(v) for v in np.linspace(0, 1, n_steps) * t_0]


def inversion_pairs(grid: Sequence[int]) -> list[tuple[int, int]]:
    """Upward pairs (g[0], g[1]), ..., (g[S-2], g[S-1]): S - 1 moves, image -> x_{t_0}."""
    return list(zip(grid[:-1], grid[1:]))


def generation_pairs(grid: Sequence[int]) -> list[tuple[int, int]]:
    """Downward pairs (g[S-1], g[S-2]), ..., (g[1], g[0]), (g[0], -1): S moves, x_{t_0} -> image."""
    down = list(grid[::-1]) + [-1]
    return list(zip(down[:-1], down[1:]))


def sampling_pairs(num_timesteps: int, t_0: int, n_steps: int) -> list[tuple[int, int]]:
    """Downward pairs from T - 1 to t_0 over ``n_steps`` points (unconditional mode, docs/algorithm.md section 6).

    The points are [int(v) for v in linspace(t_0, T - 1, n_steps)], deduplicated, walked downward.
    With n_steps = T - t_0 this visits every integer timestep, as the reference code does.
    """
    if n_steps < 2:
        raise ValueError(f"sampling needs at least 2 points, got {n_steps}")
    points = sorted({int(v) for v in np.linspace(t_0, num_timesteps - 1, n_steps)}, reverse=True)
    return list(zip(points[:-1], points[1:]))


def ddim_step(x: Tensor, eps: Tensor, a_t: Tensor, a_next: Tensor, eta: float = 0.0,
              noise: Tensor | None = None, clip_x0: bool = False) -> Tensor:
    """One DDIM move from x_t to x_{t'} (docs/algorithm.md section 2).

    x, eps: (B, C, H, W); a_t, a_next: a_t and a_{t'}, 0-d or broadcastable to x (e.g. (B, 1, 1, 1)).
    x0_hat = (x_t - sqrt(1 - a_t) e) / sqrt(a_t), no clipping (``clip_x0``: clipped to [-1, 1] and e
    recomputed from it, DDPM's ``clip_denoised``; only for sampling from noise, never for edits);
    eta = 0: x_{t'} = sqrt(a_{t'}) x0_hat + sqrt(1 - a_{t'}) e;
    eta > 0 (denoising only): c1 = eta sqrt((1 - a_t/a_{t'}) (1 - a_{t'}) / (1 - a_t)),
    c2 = sqrt(1 - a_{t'} - c1^2), x_{t'} = sqrt(a_{t'}) x0_hat + c2 e + c1 n.
    The arithmetic runs in float64 and the result has x's dtype.
    """
    a_t = torch.as_tensor(a_t, dtype=torch.float64, device=x.device)
    a_next = torch.as_tensor(a_next, dtype=torch.float64, device=x.device)
    xd, ed = x.double(), eps.double()
    x0_hat = (xd - (1 - a_t).sqrt() * ed) / a_t.sqrt()
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
        ed = (xd - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
    if eta == 0:
        return (a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * ed).to(x.dtype)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if torch.any(a_next < a_t):
        raise ValueError("eta > 0 is only defined when denoising (a_next >= a_t); inversion uses eta = 0")
    if noise is None:
        raise ValueError("eta > 0 needs the noise tensor n")
    c1 = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
    c2 = (1 - a_next - c1 ** 2).clamp(min=0).sqrt()
    return (a_next.sqrt() * x0_hat + c2 * ed + c1 * noise.double()).to(x.dtype)


def _noise_like(x: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One standard-normal draw per batch item, each from its own generator (on the CPU, so
    results do not depend on the device or the batch composition)."""
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(x.device)


class NonFiniteError(UserError, ValueError):
    """A NaN or an infinity where the arithmetic needs finite numbers: broken weights or input, or a
    distance too large, so the user's to fix (a UserError)."""


def _check_finite(x: Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{what} is not finite (NaN or infinity); the input or the weights are broken "
                             "or a distance is too large")


def blend(x_edit: Tensor, x_reference: Tensor, keep: Tensor) -> Tensor:
    """keep (.) x_reference + (1 - keep) (.) x_edit, in x_edit's dtype: x_reference bit for bit
    where keep = 1 (only a -0.0 may come back as +0.0), x_edit bit for bit where keep = 0.
    x_edit, x_reference: (B, C, H, W); keep: (1, 1, H, W) or (B, 1, H, W) in [0, 1]."""
    keep = keep.to(device=x_edit.device, dtype=x_edit.dtype)
    return keep * x_reference.to(x_edit.dtype) + (1 - keep) * x_edit


@dataclass(frozen=True)
class Keep:
    """Pixels held on a reference run while denoising (utils/core/region.py): after each move to t',
    x <- blend(x, states[t'], weights). weights: (1, 1, H, W) or (B, 1, H, W) in [0, 1], 1 = kept;
    states: {t: x_t (B, C, H, W)} of the reference run (``region.reference_trajectory``)."""
    weights: Tensor
    states: Mapping[int, Tensor]


@dataclass(frozen=True)
class Step:
    """State after one move: the timestep reached, x there, and the bottleneck of the call that made it."""
    t: int
    x: Tensor
    h: Tensor


def ddim_trajectory(net: Net, x: Tensor, alphas_cumprod: Tensor, pairs: Sequence[tuple[int, int]],
                    eta: float = 0.0, generators: Sequence[torch.Generator] | None = None,
                    h_edit: Tensor | None = None, h_policy: HPolicy = "lagged",
                    keep: Keep | None = None, clip_x0: bool = False) -> Iterator[Step]:
    """Walk ``pairs`` with DDIM, yielding a ``Step`` after each move.

    The network is evaluated at the first timestep of each pair. With ``h_edit`` (B, C_mid, H_mid,
    W_mid) the first call's decoder uses it; later calls use, by ``h_policy`` (docs/algorithm.md section 5):
    "lagged" -- the previous call's own (un-overridden) bottleneck, as the reference code does;
    "once" -- nothing (the network's own h), as the paper describes.
    ``generators``: one per batch item, needed when eta > 0. ``keep``: after each move to t', the
    kept pixels are set back on the reference run, x <- blend(x, keep.states[t'], keep.weights)
    (a region edit: the outside follows the unedited trajectory). ``clip_x0``: as ``ddim_step``'s.
    """
    if h_policy not in H_POLICIES:
        raise ValueError(f"unknown h_policy '{h_policy}' (choices: {', '.join(H_POLICIES)})")
    if eta > 0 and generators is None:
        raise ValueError("eta > 0 needs one generator per batch item")
    override = h_edit
    for t, t_next in pairs:
        out, h = net(x, t, h_override=override)
        _check_finite(out, f"the network's output at timestep {t}")
        eps = out[:, : x.shape[1]]  # learned-variance models: the rest are variance channels
        noise = _noise_like(x, generators) if eta > 0 else None
        x = ddim_step(x, eps, alpha_bar(alphas_cumprod, t), alpha_bar(alphas_cumprod, t_next), eta, noise, clip_x0)
        _check_finite(x, f"the DDIM step from timestep {t} to {t_next}")
        if keep is not None:
            x = blend(x, keep.states[t_next], keep.weights)
        override = h if (h_edit is not None and h_policy == "lagged") else None
        yield Step(t_next, x, h)


@dataclass(frozen=True)
class Inversion:
    """z: (B, C, H, W) = x_{t_0}; h: (B, C_mid, H_mid, W_mid), the last call's bottleneck."""
    z: Tensor
    h: Tensor


def _last(steps: Iterator[Step]) -> Step:
    last = None
    for last in steps:
        pass
    if last is None:
        raise ValueError("no timestep pairs to walk")
    return last


def invert(net: Net, x0: Tensor, alphas_cumprod: Tensor, grid: Sequence[int]) -> Inversion:
    """DDIM inversion (eta 0) of images x0 (B, C, H, W) in [-1, 1] up to grid[-1] = t_0.

    S - 1 upward moves; the network sees x_{g[i]} at timestep g[i] (the lower end), so h comes
    from the call at g[S-2], not at t_0 (docs/algorithm.md section 2).
    """
    last = _last(ddim_trajectory(net, x0, alphas_cumprod, inversion_pairs(grid)))
    return Inversion(z=last.x, h=last.h)


def generate(net: Net, z: Tensor, alphas_cumprod: Tensor, grid: Sequence[int], h_edit: Tensor | None = None,
             h_policy: HPolicy = "lagged", eta: float = 0.0,
             generators: Sequence[torch.Generator] | None = None, keep: Keep | None = None,
             clip_x0: bool = False) -> Tensor:
    """Denoise z = x_{t_0} (B, C, H, W) to images in [-1, 1] (not clipped) over S downward moves.

    The first call is at t_0; ``h_edit``, ``h_policy``, ``keep`` and ``clip_x0`` as in ``ddim_trajectory``.
    """
    pairs = generation_pairs(grid)
    return _last(ddim_trajectory(net, z, alphas_cumprod, pairs, eta, generators, h_edit, h_policy, keep,
                                 clip_x0)).x


def sample_latents(net: Net, x_T: Tensor, alphas_cumprod: Tensor, pairs: Sequence[tuple[int, int]],
                   clip_x0: bool = False) -> Inversion:
    """Denoise sampled noise x_T (B, C, H, W) with DDIM eta 0 along downward ``pairs`` ending at t_0;
    returns x_{t_0} and the bottleneck of the last call (docs/algorithm.md section 6)."""
    last = _last(ddim_trajectory(net, x_T, alphas_cumprod, pairs, clip_x0=clip_x0))
    return Inversion(z=last.x, h=last.h)
