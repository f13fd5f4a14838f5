"""Improved-DDPM / ADM UNet (the layout of openai guided-diffusion's unconditional ``UNetModel``).

The module names (``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``
and the sub-module names inside the blocks) are chosen so that a real guided-diffusion checkpoint
such as the AFHQ-dog 256 P2-weighting model loads with ``strict=True``; the expected key list is
``tests/data/state_dict_iddpm_afhq_256.tsv``.

Numerics follow guided-diffusion: sinusoidal timestep embedding ``[cos, sin]``, GroupNorm computed
in float32, scale-shift conditioning, "legacy" QKV attention order, 1/sqrt(sqrt(d)) scaling of both
q and k, softmax in float32.

Only the unconditional model is implemented (no class embedding, no fp16 conversion, no gradient
checkpointing). The bottleneck latent ``h`` ("h-space") is the output of ``middle_block``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from models.common import StepEmbedding, as_timestep_batch, conv1x1, is_channels_last
from torch import Tensor, nn

__all__ = ["ADMUNet", "timestep_embedding"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding, as in guided-diffusion.

    Args:
        t: (B,) timesteps (any real dtype; converted to float32).
        dim: embedding width.
        max_period: controls the lowest frequency.

    Returns:
        (B, dim) float32 tensor ``cat[cos(t * freqs), sin(t * freqs)]`` with
        ``freqs = exp(-ln(max_period) * arange(half) / half)`` and ``half = dim // 2``;
        an odd ``dim`` gets one trailing zero column.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects a 1-d tensor of timesteps, got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that evaluates float16 inputs in float32 and casts back (as guided-diffusion does)."""

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, ...)
        # float16 is normalised in float32 (its range is too small for the statistics). bfloat16
        # has float32's range and PyTorch's kernel accumulates it in float32 anyway, so it runs
        # natively, sparing two conversions of the activations.
        compute = torch.float32 if x.dtype == torch.float16 else x.dtype
        weight = None if self.weight is None else self.weight.to(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        return F.group_norm(x.to(compute), self.num_groups, weight, bias, self.eps).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (key ``conv``).

    (B, C, H, W) -> (B, C, 2H, 2W).
    """

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class _Downsample(nn.Module):
    """2x downsampling: stride-2 3x3 conv (key ``op``) or 2x2 average pooling.

    (B, C, H, W) -> (B, C, H/2, W/2).
    """

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding, optionally resampling by 2.

    Input (B, C_in, H, W) and emb (B, E); output (B, C_out, H', W') with H' = 2H (``up``),
    H/2 (``down``) or H. With resampling, both the hidden path (after in_layers' norm + SiLU, before
    its conv) and the skip path are resampled without parameters (nearest / 2x2 average pool).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float,
        num_groups: int,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(num_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = _Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = _Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = _Downsample(channels, use_conv=False)
            self.x_upd = _Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(num_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: StepEmbedding) -> Tensor:
        if self.updown:
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            hidden = conv(self.h_upd(norm_act(x)))
            x = self.x_upd(x)
        else:
            hidden = self.in_layers(x)
        emb_out = emb.project(self.emb_layers).type(hidden.dtype)[:, :, None, None]  # (B, C', 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            hidden = self.out_layers[0](hidden) * (1 + scale) + shift
            hidden = self.out_layers[1:](hidden)
        else:
            hidden = self.out_layers(hidden + emb_out)
        skip = conv1x1(self.skip_connection, x) if isinstance(self.skip_connection, nn.Conv2d) else x
        return skip + hidden


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection.

    (B, C, H, W) -> (B, C, H, W). Uses guided-diffusion's "legacy" head layout: qkv (B, 3C, T) is
    reshaped to (B * heads, 3 * C / heads, T) and then split into q, k, v.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(num_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def _attention(self, qkv: Tensor) -> Tensor:
        """(B, 3C, T) -> (B, C, T), legacy QKV order."""
        batch, width, length = qkv.shape
        head_ch = width // (3 * self.num_heads)
        q, k, v = qkv.reshape(batch * self.num_heads, 3 * head_ch, length).split(head_ch, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(head_ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # (B*heads, T, T)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = torch.einsum("bts,bcs->bct", weight, v)  # (B*heads, head_ch, T)
        return out.reshape(batch, -1, length)

    def forward(self, x: Tensor, emb: StepEmbedding | None = None) -> Tensor:
        batch, channels, *spatial = x.shape
        flat = x.reshape(batch, channels, -1)  # (B, C, T)
        attended = self.proj_out(self._attention(self.qkv(self.norm(flat))))
        out = (flat + attended).reshape(batch, channels, *spatial)
        # Keep a channels-last input channels-last, so the convolutions after it need no conversion.
        return out.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else out


class _EmbSequential(nn.Sequential):
    """Sequential container that passes the time embedding to the ResBlocks it holds."""

    def forward(self, x: Tensor, emb: StepEmbedding) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


# --------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------

_REQUIRED_KEYS = (
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "num_head_channels",
    "resblock_updown",
    "use_scale_shift_norm",
)


def _pos_int(cfg: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(cfg: Mapping[str, Any], key: str, default: bool | None = None) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"model.{key} must be a boolean, got {value!r}")
    return value


def _int_list(cfg: Mapping[str, Any], key: str, allow_empty: bool) -> list[int]:
    value = cfg[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"model.{key} must be a list of positive integers, got {value!r}")
    items = list(value)
    if (not items and not allow_empty) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items
    ):
        raise ValueError(f"model.{key} must be a list of positive integers, got {value!r}")
    return items


# --------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------


class ADMUNet(nn.Module):
    """Unconditional ADM / improved-DDPM UNet (guided-diffusion ``UNetModel`` layout).

    Args:
        model_cfg: the ``model:`` block of a config (plain mapping). Keys:
            ``type`` ("adm", optional), ``in_channels``, ``out_ch`` (2 * in_channels when the
            variance is learned), ``ch``, ``ch_mult`` (list), ``num_res_blocks`` (>= 1),
            ``attn_resolutions`` (list of resolutions in pixels; each must occur in the encoder),
            ``dropout``, ``num_head_channels`` (channels per attention head; -1 means use
            ``num_heads`` instead, default 4), ``resblock_updown`` (resample inside ResBlocks),
            ``use_scale_shift_norm``, ``var_type`` (informational; "learned"/"learned_range"
            require out_ch == 2 * in_channels), optional ``num_groups`` (GroupNorm groups,
            default 32) and optional ``resamp_with_conv`` (default True; only used when
            ``resblock_updown`` is False: stand-alone up/down-sampling layers then carry a 3x3
            conv, as guided-diffusion's ``conv_resample``). Other keys are ignored.
        image_size: input height = width, divisible by 2 ** (len(ch_mult) - 1).

    Raises:
        ValueError: naming the offending key / value for invalid settings.

    Shapes: x (B, in_channels, S, S) -> out (B, out_ch, S, S); bottleneck
    h (B, ch * ch_mult[-1], S / 2**(L-1), S / 2**(L-1)), L = len(ch_mult).
    """

    def __init__(self, model_cfg: Mapping[str, Any], image_size: int) -> None:
        super().__init__()
        cfg = dict(model_cfg)
        model_type = cfg.get("type", "adm")
        if model_type != "adm":
            raise ValueError(f"model.type must be 'adm' for ADMUNet, got {model_type!r}")
        for key in _REQUIRED_KEYS:
            if key not in cfg:
                raise ValueError(f"model.{key} is required for ADMUNet")

        in_channels = _pos_int(cfg, "in_channels")
        out_ch = _pos_int(cfg, "out_ch")
        ch = _pos_int(cfg, "ch")
        ch_mult = _int_list(cfg, "ch_mult", allow_empty=False)
        num_res_blocks = _pos_int(cfg, "num_res_blocks")
        attn_resolutions = _int_list(cfg, "attn_resolutions", allow_empty=True)
        resblock_updown = _bool(cfg, "resblock_updown")
        use_scale_shift_norm = _bool(cfg, "use_scale_shift_norm")
        resamp_with_conv = _bool(cfg, "resamp_with_conv", default=True)
        num_groups = _pos_int(cfg, "num_groups") if "num_groups" in cfg else 32
        dropout = cfg["dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"model.dropout must be a number in [0, 1), got {dropout!r}")
        num_head_channels = cfg["num_head_channels"]
        if isinstance(num_head_channels, bool) or not isinstance(num_head_channels, int) or (
            num_head_channels < 1 and num_head_channels != -1
        ):
            raise ValueError(f"model.num_head_channels must be a positive integer or -1, got {num_head_channels!r}")
        num_heads = _pos_int(cfg, "num_heads") if "num_heads" in cfg else 4
        var_type = cfg.get("var_type")
        if var_type in ("learned", "learned_range") and out_ch != 2 * in_channels:
            raise ValueError(
                f"model.out_ch must be 2 * in_channels = {2 * in_channels} with var_type {var_type!r}, got {out_ch}"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size {image_size} must be divisible by 2**(len(ch_mult)-1) = {factor} (model.ch_mult={ch_mult})"
            )
        for width in {ch, *(ch * m for m in ch_mult)}:
            if width % num_groups:
                raise ValueError(
                    f"model.num_groups={num_groups} must divide every channel width; {width} "
                    f"(from model.ch={ch}, model.ch_mult={ch_mult}) is not divisible"
                )
        level_resolutions = [image_size // 2**level for level in range(len(ch_mult))]
        for res in attn_resolutions:
            if res not in level_resolutions:
                raise ValueError(
                    f"model.attn_resolutions entry {res} is not a resolution of this UNet "
                    f"(resolutions: {level_resolutions})"
                )

        def heads_for(channels: int) -> int:
            if num_head_channels == -1:
                if channels % num_heads:
                    raise ValueError(f"model.num_heads={num_heads} must divide attention width {channels}")
                return num_heads
            if channels % num_head_channels:
                raise ValueError(
                    f"model.num_head_channels={num_head_channels} must divide attention width {channels}"
                )
            return channels // num_head_channels

        self.image_size = image_size
        self.in_channels = in_channels
        self.out_ch = out_ch
        self.ch = ch
        self.var_type = var_type
        emb_ch = 4 * ch

        def res_block(c_in: int, c_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(c_in, emb_ch, c_out, dropout, num_groups, use_scale_shift_norm, up=up, down=down)

        # Time embedding MLP: (B, ch) -> (B, 4ch).
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        # Encoder. skip_chans records the channel count of every input block's output.
        self.input_blocks = nn.ModuleList([_EmbSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        cur = ch
        res = image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(cur, ch * mult)]
                cur = ch * mult
                if res in attn_resolutions:
                    layers.append(AttentionBlock(cur, heads_for(cur), num_groups))
                self.input_blocks.append(_EmbSequential(*layers))
                skip_chans.append(cur)
            if level != len(ch_mult) - 1:
                if resblock_updown:
                    self.input_blocks.append(_EmbSequential(res_block(cur, cur, down=True)))
                else:
                    self.input_blocks.append(_EmbSequential(_Downsample(cur, resamp_with_conv)))
                skip_chans.append(cur)
                res //= 2

        # Middle block: ResBlock, attention, ResBlock. Its output is h.
        self.middle_block = _EmbSequential(
            res_block(cur, cur),
            AttentionBlock(cur, heads_for(cur), num_groups),
            res_block(cur, cur),
        )
        self.h_channels = cur
        self.h_size = res

        # Decoder: each ResBlock takes cat[hidden, skip].
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(cur + skip_chans.pop(), ch * mult)]
                cur = ch * mult
                if res in attn_resolutions:
                    layers.append(AttentionBlock(cur, heads_for(cur), num_groups))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(res_block(cur, cur, up=True))
                    else:
                        layers.append(_Upsample(cur, resamp_with_conv))
                    res *= 2
                self.output_blocks.append(_EmbSequential(*layers))

        # Output head.
        self.out = nn.Sequential(
            GroupNorm32(num_groups, cur),
            nn.SiLU(),
            _zero(nn.Conv2d(cur, out_ch, 3, padding=1)),
        )

    def forward(
        self, x: Tensor, t: Tensor | int | float, h_override: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run the UNet.

        Args:
            x: (B, in_channels, S, S) noisy images.
            t: timestep(s): int / float, 0-d tensor or (B,) tensor.
            h_override: optional (B, C_mid, S_mid, S_mid) latent fed to the decoder instead of the
                middle block's output; the skip connections still come from the encoder on ``x``.

        Returns:
            ``(out, h)``: out (B, out_ch, S, S) network output; h (B, C_mid, S_mid, S_mid) the
            middle block's own output (never the override).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")

        # 1. time embedding, once per distinct timestep: (U, 4ch)
        timesteps = as_timestep_batch(t, x)
        emb = StepEmbedding.of(timesteps, lambda ts: self.time_embed(
            timestep_embedding(ts, self.ch).to(self.time_embed[0].weight.dtype)))

        # 2. encoder: keep every input block's output for the skip connections
        skips = []
        hidden = x
        for block in self.input_blocks:
            hidden = block(hidden, emb)
            skips.append(hidden)

        # 3. middle block -> h
        h = self.middle_block(hidden, emb)
        if h_override is not None:
            if h_override.shape != h.shape:
                raise ValueError(f"h_override must have shape {tuple(h.shape)}, got {tuple(h_override.shape)}")
            hidden = h_override.to(dtype=h.dtype, device=h.device)
        else:
            hidden = h

        # 4. decoder: concatenate the matching skip on the channel axis before each block
        for block in self.output_blocks:
            hidden = block(torch.cat([hidden, skips.pop()], dim=1), emb)

        # 5. output: (B, out_ch, S, S)
        out = self.out(hidden)
        return out, h
