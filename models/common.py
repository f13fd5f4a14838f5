"""Pieces shared by every network family."""
from __future__ import annotations

import torch
from torch import Tensor


def as_timestep_batch(t, x: Tensor) -> Tensor:
    """Timesteps as the (B,) float tensor the networks expect (spec section 2).

    t: a number, a 0-d or (1,) tensor (broadcast to the batch) or a (B,) tensor; x: (B, ...) the network input.
    """
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 0 or t.shape == (1,):
        t = t.reshape(1).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps of shape {tuple(t.shape)} do not match a batch of {x.shape[0]}")
    return t
