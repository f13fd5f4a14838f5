"""Networks. ``build_model(config)`` is the single factory for every model family.

Every network has the same call: ``out, h = model(x, t, h_override=None)``, where ``out`` is the
raw network output (B, out_ch, H, W) -- 6 channels for learned-variance models, of which the
first ``in_channels`` are the noise prediction -- and ``h`` the middle-block output.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from utils.config import Config, ConfigError, latent_shapes, parse_config  # latent_shapes: re-exported

__all__ = ["build_model", "latent_shapes"]


def build_model(config: Any) -> nn.Module:
    """The network described by ``config`` (a ``Config``, or the parsed YAML as a dict or namespace)."""
    config: Config = parse_config(config)
    model_cfg = config.model.__dict__
    try:  # the builders check the architecture a config describes: a bad one is the user's to fix
        if config.model.type == "ddpm":
            from models.ddpm import DDPMUNet
            return DDPMUNet(model_cfg, config.data.image_size)
        if config.model.type == "adm":
            from models.adm import ADMUNet
            return ADMUNet(model_cfg, config.data.image_size)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"config {config.name}: {exc}") from None
    raise ConfigError(f"unknown model.type '{config.model.type}' (choices: ddpm, adm)")
