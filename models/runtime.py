"""Running a network for inference: precision, memory layout, no autograd.

``InferenceNet(model, precision)`` has the common call ``out, h = net(x, t, h_override=None)``
and keeps the outside float32: inputs are cast to the compute dtype, outputs back to float32, so
the DDIM arithmetic (float64 in ``utils.core.diffusion``) and the stored latents do not change type.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import platform
from pathlib import Path

import torch
from torch import Tensor, nn

from utils.errors import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU features with bfloat16 arithmetic in hardware: Intel AMX, AVX-512 BF16, Arm's BF16 extension.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})

log = logging.getLogger(__name__)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (x86 ``flags``, Arm ``Features``);
    empty where the file does not exist (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache  # once per process
def warn_if_bf16_is_emulated() -> bool:
    """Log a warning when this CPU has no bfloat16 hardware (neither AMX nor avx512_bf16), where
    bf16 convolutions are emulated and may be slower than float32. Returns True if it warned."""
    flags = cpu_flags()
    if not flags or flags & NATIVE_BF16_FLAGS:
        return False
    log.warning("--precision bf16: this CPU has neither AMX nor avx512_bf16, so bfloat16 is emulated and "
                "may be slower than fp32 (see docs/performance.md)")
    return True


class InferenceNet:
    def __init__(self, model: nn.Module, precision: str = "fp32", channels_last: bool = True):
        """model: a network of ``models``, already on its device. precision: fp32, bf16 or fp16
        (fp16 on CUDA only). channels_last: NHWC layout for the convolutions (faster on the CPU in
        every precision, see docs/performance.md; CPU matrix units and tensor cores want it)."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}' (choices: {', '.join(PRECISIONS)})")
        device = next(model.parameters()).device
        if precision == "fp16" and device.type != "cuda":
            raise UserError("--precision fp16 needs a CUDA GPU; use bf16 on the CPU")
        self.precision, self.dtype = precision, PRECISIONS[precision]
        if precision == "bf16" and device.type == "cpu":
            warn_if_bf16_is_emulated()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().requires_grad_(False).to(dtype=self.dtype, memory_format=self.memory_format)

    def __call__(self, x: Tensor, t, h_override: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            x_in = x.to(self.dtype).contiguous(memory_format=self.memory_format)
            h_in = None if h_override is None else h_override.to(self.dtype)
            out, h = self.model(x_in, t, h_override=h_in)
            return out.float().contiguous(), h.float().contiguous()


def default_batch_size(device: torch.device, image_size: int) -> int:
    """Images per network call when the user names none.

    On the CPU, a 256-px UNet does not gain from batching: in ``scripts/benchmark.py`` an edit job
    at batch 4 was 6-18 % slower than at batch 1 (fp32 and bf16, DDPM and ADM, 2 cores) and needed
    nearly twice the memory, so the default is 1 there. Small models and GPUs gain from batching.
    """
    return 1 if device.type == "cpu" and image_size >= 128 else 8


def retain_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse large freed blocks instead of handing them back to the kernel.

    By default glibc serves each allocation of 32 MiB or more (one 128-channel 256x256 float32
    activation is exactly 32 MiB) with a fresh ``mmap`` and unmaps it on free, so every such tensor
    is page-faulted in and zeroed by the kernel again: about 800,000 page faults, roughly 0.6 s of
    a 2.4-2.8 s float32 call of the 256-px DDPM on 2 cores. Raising the mmap and trim thresholds
    keeps that memory in the heap. The price is a higher resident set, as the heap keeps its peak
    (+4 % peak RSS at batch 1 in ``scripts/benchmark.py``).

    Process-wide, so only entry points call it (``main.py``, the scripts), never an import.
    Returns True when applied, False where the C library is not glibc (macOS, musl, Windows).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(m_mmap_threshold, threshold_bytes)) and bool(libc.mallopt(m_trim_threshold, threshold_bytes))


def pick_device(name: str) -> torch.device:
    """The device a run computes on: ``auto`` (a CUDA GPU when there is one, else the CPU), or a
    torch device name (cpu, cuda, cuda:1, ...); UserError for an unknown one or a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available")
    return device
