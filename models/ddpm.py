"""The DDPM UNet of Ho et al. (2020), in the layout of the CelebA-HQ / LSUN checkpoints.

State-dict keys follow the PyTorch port used by SDEdit and DiffusionCLIP (``temb.dense.*``,
``down.{level}.block.{i}.*``, ``mid.block_1`` / ``attn_1`` / ``block_2``, ``up.*``,
``norm_out``, ``conv_out``), so a real checkpoint loads with ``strict=True``.

The h latent (docs/algorithm.md section 3) is the output of ``mid.block_2``: (B, 512, 8, 8) at 256 px.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import StepEmbedding, as_timestep_batch, conv1x1, is_channels_last


def ddpm_timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of DDPM: ``[sin(t w_i), cos(t w_i)]`` with w_i = 10000^(-i/(half-1)).

    t: (B,) float. Returns (B, dim) float32. Odd ``dim`` is zero-padded by one column.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def swish(x: Tensor) -> Tensor:
    return F.silu(x)  # x * sigmoid(x), one fused kernel


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv when ``with_conv``."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv on an input padded right/bottom by one, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            # Asymmetric padding, as in the original TensorFlow "SAME" stride-2 convolution.
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: Tensor, temb: StepEmbedding) -> Tensor:
        hidden = self.conv1(swish(self.norm1(x)))
        hidden = hidden + temb.project(lambda e: self.temb_proj(swish(e)))[:, :, None, None]
        hidden = self.conv2(self.dropout(swish(self.norm2(hidden))))
        if hasattr(self, "nin_shortcut"):
            x = conv1x1(self.nin_shortcut, x)
        return x + hidden


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        normed = self.norm(x)
        q = conv1x1(self.q, normed).reshape(b, c, height * width).permute(0, 2, 1)  # (B, HW, C)
        k = conv1x1(self.k, normed).reshape(b, c, height * width)  # (B, C, HW)
        v = conv1x1(self.v, normed).reshape(b, c, height * width)  # (B, C, HW)
        weights = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)  # (B, HW_q, HW_k)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)
        if is_channels_last(x):
            out = out.contiguous(memory_format=torch.channels_last)
        return x + conv1x1(self.proj_out, out)


class DDPMUNet(nn.Module):
    """DDPM UNet configured by the ``model:`` block of a config (type ``ddpm``).

    Keys used: ``in_channels``, ``out_ch``, ``ch``, ``ch_mult``, ``num_res_blocks``,
    ``attn_resolutions`` (pixels), ``dropout``, ``resamp_with_conv``, ``num_groups`` (32 for the
    real checkpoints; smaller for tiny test models).
    """

    def __init__(self, model_cfg: Mapping, image_size: int):
        super().__init__()
        ch, ch_mult = int(model_cfg["ch"]), tuple(int(m) for m in model_cfg["ch_mult"])
        num_res_blocks = int(model_cfg["num_res_blocks"])
        attn_resolutions = {int(r) for r in model_cfg["attn_resolutions"]}
        dropout = float(model_cfg.get("dropout", 0.0))
        with_conv = bool(model_cfg.get("resamp_with_conv", True))
        groups = int(model_cfg.get("num_groups", 32))
        n_levels = len(ch_mult)
        if image_size % (2 ** (n_levels - 1)) != 0:
            raise ValueError(f"image_size {image_size} is not divisible by 2**(len(ch_mult)-1) = {2 ** (n_levels - 1)}")
        if any((ch * m) % groups for m in ch_mult) or ch % groups:
            raise ValueError(f"model.ch {ch} times every ch_mult {list(ch_mult)} must be divisible by num_groups {groups}")
        self.ch, self.num_res_blocks = ch, num_res_blocks
        temb_ch = 4 * ch

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(int(model_cfg["in_channels"]), ch, 3, stride=1, padding=1)

        res, in_mult = image_size, (1,) + ch_mult
        self.down = nn.ModuleList()
        for level in range(n_levels):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * ch_mult[level]
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, temb_ch, dropout, groups))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != n_levels - 1:
                stage.downsample = Downsample(block_in, with_conv)
                res //= 2
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout, groups)

        up_stages = []
        for level in reversed(range(n_levels)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for i_block in range(num_res_blocks + 1):
                # The last block of a level consumes the skip saved before that level's first block.
                skip_in = ch * (in_mult[level] if i_block == num_res_blocks else ch_mult[level])
                stage.block.append(ResnetBlock(block_in + skip_in, block_out, temb_ch, dropout, groups))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                stage.upsample = Upsample(block_in, with_conv)
                res *= 2
            up_stages.insert(0, stage)  # up[0] is the full-resolution level, as in the checkpoints
        self.up = nn.ModuleList(up_stages)

        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, int(model_cfg["out_ch"]), 3, stride=1, padding=1)

    def forward(self, x: Tensor, t, h_override: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Network output and bottleneck.

        x: (B, in_channels, H, W); t: int, 0-d or (B,) tensor of timesteps.
        h_override: None or (B, C_mid, H_mid, W_mid), used by the decoder instead of the middle
        block's output (skips still come from the encoder run on x).
        Returns (out (B, out_ch, H, W), h (B, C_mid, H_mid, W_mid)); h is the middle block's own output.
        """
        t = as_timestep_batch(t, x)
        # 1. time embedding
        dense = self.temb.dense
        temb = StepEmbedding.of(t, lambda ts: dense[1](swish(dense[0](
            ddpm_timestep_embedding(ts, self.ch).to(dense[0].weight.dtype)))))
        # 2. encoder, keeping every intermediate activation as a skip
        skips = [self.conv_in(x)]
        for stage in self.down:
            for i_block, block in enumerate(stage.block):
                hidden = block(skips[-1], temb)
                if len(stage.attn) > 0:
                    hidden = stage.attn[i_block](hidden)
                skips.append(hidden)
            if hasattr(stage, "downsample"):
                skips.append(stage.downsample(skips[-1]))
        # 3. middle block -> h
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(skips[-1], temb)), temb)
        # 4. decoder, from h or from the override
        if h_override is not None and h_override.shape != h.shape:
            raise ValueError(f"h_override must have shape {tuple(h.shape)}, got {tuple(h_override.shape)}")
        hidden = h if h_override is None else h_override.to(dtype=h.dtype, device=h.device)
        for stage in reversed(self.up):
            for i_block, block in enumerate(stage.block):
                hidden = block(torch.cat([hidden, skips.pop()], dim=1), temb)
                if len(stage.attn) > 0:
                    hidden = stage.attn[i_block](hidden)
            if hasattr(stage, "upsample"):
                hidden = stage.upsample(hidden)
        # 5. output
        return self.conv_out(swish(self.norm_out(hidden))), h
