"""What a loaded model is, in every way that can change the bits of its latents and edits.

``ModelIdentity`` is derived once from the loaded model (``models.loading.load_model``) and used by
everything that must not mix two models: the boundary checks (checkpoint and config), the latent
cache on disk and the in-memory store of recent inversions (all of it), and the summaries.

The kernel fields are there because the project has measured them changing bits: another precision,
another device type, another PyTorch release, or another CPU instruction set (AVX-512 with or without
bfloat16 or AMX, AVX2, Arm) picks other convolution and matrix kernels, with other rounding.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

#: CPU features that select other kernels (matrix units, bfloat16 and vector widths).
KERNEL_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma", "asimd", "sve", "bf16")


def processor(device: torch.device) -> str:
    """The compute unit's kind as it decides kernels: the GPU's name on CUDA; on the CPU, ATen's
    vector capability and the kernel-selecting CPU flags, e.g. ``cpu AVX512 +amx_bf16+avx512_bf16``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from models.runtime import cpu_flags  # (runtime imports nothing of this module)

    capability = torch.backends.cpu.get_cpu_capability()
    flags = "+".join(f for f in KERNEL_FLAGS if f in cpu_flags())
    return f"{device.type} {capability}" + (f" +{flags}" if flags else "")


@dataclass(frozen=True)
class ModelIdentity:
    """A loaded model and how it computes.

    config_name, checkpoint (the weights file read), checkpoint_sha256: which network;
    architecture: the config's model and diffusion sections (JSON text, keys sorted);
    shapes: ((space, shape), ...) of its latents; precision: fp32, bf16 or fp16;
    device_kind: cpu or cuda; processor: ``processor(device)``; torch_version.
    """
    config_name: str
    checkpoint: str
    checkpoint_sha256: str
    architecture: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    precision: str
    device_kind: str
    processor: str
    torch_version: str

    def key(self) -> str:
        """One hex digest of every field but ``checkpoint`` (where the weights were read from, not
        what they are: the SHA-256 says that): the part of a cache key that names the model."""
        fields = {k: v for k, v in asdict(self).items() if k != "checkpoint"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict:
        """What summaries and boundary-search reports record about the model."""
        return {"config_name": self.config_name, "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.checkpoint_sha256,
                "model_identity": {"precision": self.precision, "device_kind": self.device_kind,
                                   "processor": self.processor, "torch_version": self.torch_version}}


def model_identity(config, checkpoint, sha256: str, shapes: dict, precision: str, device: torch.device
                   ) -> ModelIdentity:
    """The identity of a model of ``config`` (a ``utils.config.Config``) loaded from ``checkpoint``."""
    plain = config.to_dict()
    return ModelIdentity(config_name=config.name, checkpoint=str(checkpoint), checkpoint_sha256=sha256,
                         architecture=json.dumps({"model": plain["model"], "diffusion": plain["diffusion"]},
                                                 sort_keys=True),
                         shapes=tuple((s, tuple(int(v) for v in shape)) for s, shape in shapes.items()),
                         precision=precision, device_kind=torch.device(device).type,
                         processor=processor(torch.device(device)), torch_version=torch.__version__)
