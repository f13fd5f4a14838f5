"""One way to load a frozen model: ``load_model(config, model_path, ...)``.

It resolves the checkpoint (``models.checkpoints``: a file, a diffusers folder, ``hf:<id>``, or the
config's mirrors), hashes the weights file, reads it memory-mapped where the format allows,
renames diffusers keys (``models.diffusers_map``), builds the network on the meta device (no
random initialisation: 1.4 s of every run for the 256-px DDPM), takes the loaded tensors as its
parameters (``load_state_dict(assign=True)``), wraps it for inference (``models.runtime``) and
builds the noise schedule. The runner, the evaluation and benchmark scripts all call it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models import build_model
from models.diffusers_map import check_diffusers_config, diffusers_to_ddpm
from models.identity import ModelIdentity, model_identity
from models.runtime import InferenceNet
from models.checkpoints import load_weights, locate_weights, read_state_dict, resolve_checkpoint, sha256_file
from utils.config import Config, latent_shapes, load_config, parse_config
from utils.core.diffusion import make_alphas_cumprod


@dataclass(frozen=True)
class LoadedModel:
    """A frozen network ready for inference, and what identifies it.

    checkpoint: the weights file read (inside the folder for a diffusers model);
    checkpoint_sha256: its SHA-256 (in boundary files);
    net: ``out, h = net(x, t, h_override=None)``, float32 outside (``InferenceNet``);
    alphas_cumprod: (T,) float64; shapes: ``latent_shapes(config)``;
    identity: everything that names the model and decides its bits (``models.identity``), derived
    once here: the boundary checks, the latent cache and the in-memory latents key on it.
    """
    config: Config
    checkpoint: Path
    checkpoint_sha256: str
    net: InferenceNet
    alphas_cumprod: Tensor
    shapes: dict[str, tuple[int, ...]]
    identity: ModelIdentity

    @property
    def device(self) -> torch.device:
        return next(self.net.model.parameters()).device


def load_model(config: Config | str | Path | Any, model_path: str | Path | None = None,
               cache_dir: str | Path | None = None, device: torch.device | str = "cpu",
               precision: str = "fp32", channels_last: bool = True) -> LoadedModel:
    """The model of ``config`` (a ``Config``, a file name in configs/ or a path, or a parsed YAML
    mapping) with the weights of ``model_path`` (a weights file, a diffusers folder or ``hf:<repo
    id>``; default: the config's checkpoint). Raises UserError for a checkpoint that cannot be had
    or does not fit the config."""
    config = load_config(config) if isinstance(config, (str, Path)) else parse_config(config)
    files = locate_weights(resolve_checkpoint(config, model_path, cache_dir))
    sha256 = sha256_file(files.weights)
    state = read_state_dict(files.weights, mmap=True)
    if files.diffusers_config is not None:
        check_diffusers_config(files.diffusers_config, config, str(files.config_file))
        state = diffusers_to_ddpm(state, len(config.model.ch_mult))
    with torch.device("meta"):
        model = build_model(config)
    load_weights(model, state, assign=True, label=files.weights)
    unloaded = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unloaded:  # a tensor that no checkpoint provides (none today): it would have no value
        raise RuntimeError(f"{type(model).__name__} has tensors outside its state dict: {', '.join(unloaded[:3])}")
    net = InferenceNet(model.to(device), precision, channels_last)
    d = config.diffusion
    shapes = latent_shapes(config)
    return LoadedModel(config=config, checkpoint=files.weights, checkpoint_sha256=sha256, net=net,
                       alphas_cumprod=make_alphas_cumprod(d.beta_start, d.beta_end, d.num_diffusion_timesteps),
                       shapes=shapes, identity=model_identity(config, files.weights, sha256, shapes, precision,
                                                              device))
