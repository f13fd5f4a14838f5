"""Batches that give the same numbers whatever their size (docs/algorithm.md section 5)."""
from __future__ import annotations

from torch import Tensor


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` items covering range(n).

    NOTE: for a batch of exactly one, oneDNN picks other convolution kernels for some shapes, whose
    rounding differs from larger batches; callers run a lone remainder of a larger batch size as a
    pair (the item twice) so that every batch size of 2 or more gives bit-identical results.
    """
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def pair_lone(x: Tensor, batch_size: int) -> Tensor:
    """x (1, ...) twice along the batch when it is a lone remainder of batches of ``batch_size`` > 1
    (see ``batch_slices``); otherwise x unchanged. Callers keep the first ``len(x)`` results."""
    return x.repeat(2, *[1] * (x.ndim - 1)) if len(x) == 1 and batch_size > 1 else x


def batch_regime(batch_size: int) -> str:
    """The rounding regime of inverting at ``batch_size``, part of the latent cache's key: 'single'
    for batches of one, 'batched' for 2 or more (a lone remainder runs as a pair, see
    ``batch_slices``), so that latents computed at batch 1 are never served to a batched run or
    the other way round."""
    return "single" if batch_size == 1 else "batched"
