"""diffusers ``UNet2DModel`` folders as this project's DDPM (docs/diffusers.md).

The DDPM UNets on the Hugging Face Hub (``google/ddpm-ema-celebahq-256``, ``-church-256``,
``-bedroom-256``) are the same networks as ``models.ddpm.DDPMUNet`` under other names. Two pure
functions make them loadable without importing diffusers:

- ``check_diffusers_config(diffusers_config, config)``: the folder's ``config.json`` must describe
  the architecture the YAML config builds, and use the DDPM conventions our forward pass hard-codes
  (time embedding ``[sin, cos]`` with frequencies 10000^(-i/(half-1)), i.e. ``flip_sin_to_cos``
  false and ``freq_shift`` 1; GroupNorm eps 1e-6; stride-2 downsampling conv on an input padded
  right/bottom, i.e. ``downsample_padding`` 0; single-head attention). A mismatch is a UserError
  naming the field and both values.
- ``diffusers_to_ddpm(state, n_levels)``: renames the keys; the attention's linear
  ``to_q/to_k/to_v/to_out.0`` weights (C, C) become the 1x1 convolution kernels ``q/k/v/proj_out``
  (C, C, 1, 1); ``up_blocks.j`` is ``up.{n_levels - 1 - j}``. No tensor is copied.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor

from utils.config import Config
from utils.errors import UserError

# UNet2DModel's defaults, which apply to the fields a config.json leaves out (diffusers 0.42 docs).
_DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None,
}
# The conventions of models.ddpm that no YAML field changes.
_DDPM_CONVENTIONS = {
    "center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 0,
    "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}


def expected_diffusers_config(config: Config) -> dict[str, tuple[Any, str]]:
    """For each config.json field: the value the YAML config implies, and where it comes from."""
    m, size = config.model, config.data.image_size
    if m.type != "ddpm":
        raise UserError(f"a diffusers UNet2DModel folder holds a DDPM; config {config.name} has model.type {m.type}")
    if not m.resamp_with_conv:
        raise UserError("a diffusers UNet2DModel resamples with convolutions; the YAML has model.resamp_with_conv false")
    attention = [size // 2 ** level in m.attn_resolutions for level in range(len(m.ch_mult))]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    attn_note = f"model.attn_resolutions {list(m.attn_resolutions)} at data.image_size {size}"
    expected = {
        "sample_size": (size, f"data.image_size {size}"),
        "in_channels": (m.in_channels, f"model.in_channels {m.in_channels}"),
        "out_channels": (m.out_ch, f"model.out_ch {m.out_ch}"),
        "block_out_channels": ([m.ch * k for k in m.ch_mult], f"model.ch {m.ch} x model.ch_mult {list(m.ch_mult)}"),
        "layers_per_block": (m.num_res_blocks, f"model.num_res_blocks {m.num_res_blocks}"),
        "down_block_types": (down, attn_note),
        "up_block_types": (up, attn_note),
        "norm_num_groups": (m.num_groups, f"model.num_groups {m.num_groups}"),
    }
    expected.update({k: (v, "the DDPM convention of models/ddpm.py") for k, v in _DDPM_CONVENTIONS.items()})
    return expected


def _same(ours: Any, theirs: Any) -> bool:
    if ours is None or isinstance(ours, bool):
        return theirs is ours
    if isinstance(ours, float):
        return isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and math.isclose(ours, theirs, rel_tol=1e-9)
    if isinstance(ours, list):
        return isinstance(theirs, (list, tuple)) and list(theirs) == ours
    return not isinstance(theirs, bool) and ours == theirs


def check_diffusers_config(diffusers_config: Mapping, config: Config, source: str = "config.json") -> None:
    """Raise UserError unless ``diffusers_config`` (a parsed config.json) describes the network the
    YAML ``config`` builds, with our DDPM's forward conventions. ``source`` names the file."""
    class_name = diffusers_config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise UserError(f"{source}: _class_name is {class_name!r}, expected 'UNet2DModel'")
    expected = expected_diffusers_config(config)
    for field, (ours, origin) in expected.items():
        theirs = diffusers_config.get(field, _DIFFUSERS_DEFAULTS[field])
        if field == "sample_size" and theirs is None:
            continue  # not recorded: nothing to compare
        if field == "sample_size" and isinstance(theirs, (list, tuple)) and len(set(theirs)) == 1:
            theirs = theirs[0]
        if not _same(ours, theirs):
            raise UserError(f"{source} does not match config {config.name}: {field} is {theirs!r} there, "
                            f"{ours!r} expected ({origin})")
    m = config.model
    mid_channels = m.ch * m.ch_mult[-1]
    time_dim = diffusers_config.get("time_embedding_dim", _DIFFUSERS_DEFAULTS["time_embedding_dim"])
    if time_dim not in (None, 4 * m.ch):
        raise UserError(f"{source} does not match config {config.name}: time_embedding_dim is {time_dim!r} there, "
                        f"{4 * m.ch} expected (4 x model.ch {m.ch})")
    attn_groups = diffusers_config.get("attn_norm_num_groups", _DIFFUSERS_DEFAULTS["attn_norm_num_groups"])
    if attn_groups not in (None, m.num_groups):
        raise UserError(f"{source} does not match config {config.name}: attn_norm_num_groups is {attn_groups!r} there, "
                        f"{m.num_groups} expected (model.num_groups)")
    # Our attention has one head: diffusers' head size (attention_head_dim, None = all channels)
    # must equal the channel count at every attention level and in the middle block.
    size = config.data.image_size
    attn_channels = {m.ch * k for level, k in enumerate(m.ch_mult) if size // 2 ** level in m.attn_resolutions}
    head_dim = diffusers_config.get("attention_head_dim", _DIFFUSERS_DEFAULTS["attention_head_dim"])
    if head_dim is not None and any(head_dim != c for c in attn_channels | {mid_channels}):
        raise UserError(f"{source} does not match config {config.name}: attention_head_dim is {head_dim!r} there, "
                        f"null expected (single-head attention over {sorted(attn_channels | {mid_channels})} channels)")


_RESNET = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2", "conv2": "conv2",
           "conv_shortcut": "nin_shortcut"}
# Current names, then the deprecated ones that older diffusers files (the google/ddpm-* uploads) use.
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
              "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_TOP = {"time_embedding.linear_1": "temb.dense.0", "time_embedding.linear_2": "temb.dense.1",
        "conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
_RESAMPLE = {"downsamplers": "downsample", "upsamplers": "upsample"}
_MID = {"resnets.0": "mid.block_1", "attentions.0": "mid.attn_1", "resnets.1": "mid.block_2"}


def ddpm_key(key: str, n_levels: int) -> str | None:
    """The DDPM-layout name of the diffusers parameter ``key`` (e.g.
    ``up_blocks.1.attentions.0.to_q.weight`` -> ``up.4.attn.0.q.weight`` for 6 levels), or None
    when it has no counterpart."""
    module, _, param = key.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{param}"
    parts = module.split(".")
    if parts[0] == "mid_block" and len(parts) >= 4:
        prefix, rest = _MID.get(".".join(parts[1:3])), ".".join(parts[3:])
        sub = _RESNET.get(rest) if parts[1] == "resnets" else _ATTENTION.get(rest)
        return f"{prefix}.{sub}.{param}" if prefix and sub else None
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 4 or not parts[1].isdigit():
        return None
    j = int(parts[1])
    level = j if parts[0] == "down_blocks" else n_levels - 1 - j
    stage = f"{'down' if parts[0] == 'down_blocks' else 'up'}.{level}"
    kind, index, rest = parts[2], parts[3], ".".join(parts[4:])
    if kind == "resnets" and rest in _RESNET:
        return f"{stage}.block.{index}.{_RESNET[rest]}.{param}"
    if kind == "attentions" and rest in _ATTENTION:
        return f"{stage}.attn.{index}.{_ATTENTION[rest]}.{param}"
    if kind in ("downsamplers", "upsamplers") and index == "0" and rest == "conv":
        return f"{stage}.{_RESAMPLE[kind]}.conv.{param}"
    return None


def diffusers_to_ddpm(state: Mapping[str, Tensor], n_levels: int) -> dict[str, Tensor]:
    """A diffusers ``UNet2DModel`` state dict renamed into the DDPM layout of ``models.ddpm``.

    Linear attention projections (C, C) become 1x1 kernels (C, C, 1, 1) (views, no copy). Keys
    without a counterpart keep their name, so a strict load reports them as unexpected.
    """
    renamed = {}
    for key, value in state.items():
        new = ddpm_key(key, n_levels)
        if new is None:
            renamed[key] = value
            continue
        if value.ndim == 2 and new.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out"):
            value = value[:, :, None, None]
        renamed[new] = value
    return renamed
