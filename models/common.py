"""Pieces shared by every network family."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def as_timestep_batch(t, x: Tensor) -> Tensor:
    """Timesteps as the (B,) float tensor the networks expect (docs/algorithm.md section 2).

    t: a number, a 0-d or (1,) tensor (broadcast to the batch) or a (B,) tensor; x: (B, ...) the network input.
    """
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 0 or t.shape == (1,):
        t = t.reshape(1).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps of shape {tuple(t.shape)} do not match a batch of {x.shape[0]}")
    return t


def is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution; on a channels-last input, the equivalent matrix product over channels
    (PyTorch's CPU convolution falls back to a slow path for some 1x1 shapes in that layout)."""
    if is_channels_last(x):
        weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
        return F.linear(x.permute(0, 2, 3, 1), weight, conv.bias).permute(0, 3, 1, 2)
    return conv(x)


class StepEmbedding(NamedTuple):
    """The time embedding, computed once per distinct timestep of the batch.

    values: (U, E) for the U distinct timesteps; index: (B,) the row of each batch item.
    Projections run on the U rows and are then gathered, so an item's result does not depend on
    the batch it is in (a matrix product over B rows may round differently from one over 1 row).
    """
    values: Tensor
    index: Tensor

    @classmethod
    def of(cls, t: Tensor, embed: Callable[[Tensor], Tensor]) -> "StepEmbedding":
        """t: (B,) timesteps; embed: (U,) distinct timesteps -> (U, E)."""
        distinct, index = torch.unique(t, return_inverse=True)
        return cls(embed(distinct), index)

    def project(self, layer: Callable[[Tensor], Tensor]) -> Tensor:
        """layer applied to each distinct row, then gathered: (B, E')."""
        return layer(self.values)[self.index]
