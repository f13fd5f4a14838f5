"""Tests for the ADM / improved-DDPM UNet (models/adm.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from models.adm import ADMUNet, timestep_embedding
from tests.helpers import randomize_, read_state_dict_tsv, sinusoid_tolerance


AFHQ_CFG = {
    "type": "adm",
    "in_channels": 3,
    "out_ch": 6,
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_resolutions": [16],
    "dropout": 0.0,
    "num_head_channels": 64,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "var_type": "learned_range",
}

TINY_CFG = {
    "type": "adm",
    "in_channels": 3,
    "out_ch": 6,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
    "num_head_channels": 16,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "var_type": "learned_range",
    "num_groups": 8,
}
TINY_SIZE = 16



def _tiny_model(seed: int = 0) -> ADMUNet:
    """Tiny model in eval mode with every parameter random (no zero-initialised layers left)."""
    torch.manual_seed(seed)
    return randomize_(ADMUNet(TINY_CFG, TINY_SIZE), seed + 1)


def _inputs(batch: int = 2, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, TINY_SIZE, TINY_SIZE, generator=gen)


def test_afhq_state_dict_matches_reference():
    expected = read_state_dict_tsv("state_dict_iddpm_afhq_256.tsv")
    assert len(expected) == 362
    with torch.device("meta"):
        model = ADMUNet(AFHQ_CFG, 256)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    assert not missing and not unexpected, (
        f"missing keys (first 10): {missing[:10]}; unexpected keys (first 10): {unexpected[:10]}"
    )
    assert len(actual) == len(expected)
    wrong = [(k, actual[k], expected[k]) for k in expected if actual[k] != expected[k]]
    assert not wrong, f"shape mismatches (key, ours, reference), first 10: {wrong[:10]}"
    assert sum(math.prod(s) for s in actual.values()) == 93_563_910
    assert (model.h_channels, model.h_size) == (512, 8)


def test_tiny_forward_shapes_and_h_override():
    model = _tiny_model()
    x = _inputs()
    with torch.no_grad():
        out, h = model(x, 10)
        assert out.shape == (2, 6, TINY_SIZE, TINY_SIZE)
        assert h.shape == (2, 64, 8, 8)
        assert out.abs().max() > 1e-3  # not trivially zero

        # Exact by construction: the same inputs at the same batch size run the same kernels.
        out_same, h_same = model(x, 10, h_override=h.clone())
        assert torch.equal(out_same, out)
        assert torch.equal(h_same, h)

        other = h + torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
        out_other, h_returned = model(x, 10, h_override=other)
        assert not torch.allclose(out_other, out)
        assert torch.equal(h_returned, h)  # the model's own h, not the override

        with pytest.raises(ValueError):
            model(x, 10, h_override=h[:, :, :4])


def test_tiny_batch_equals_single_items():
    model = _tiny_model()
    x = _inputs()
    t = torch.tensor([3, 700])
    with torch.no_grad():
        out, h = model(x, t)
        for i in range(2):
            out_i, h_i = model(x[i : i + 1], t[i : i + 1])
            torch.testing.assert_close(out_i, out[i : i + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h_i, h[i : i + 1], rtol=1e-5, atol=1e-5)


def test_tiny_timestep_forms_agree():
    model = _tiny_model()
    x = _inputs()
    with torch.no_grad():
        ref, _ = model(x, 250)
        for t in (250.0, torch.tensor(250), torch.tensor([250, 250]), torch.tensor([250.0])):
            out, _ = model(x, t)
            # every form becomes the same float32 (2,) timesteps, the rest is the same computation
            assert torch.equal(out, ref), f"t={t!r}"
        with pytest.raises(ValueError):
            model(x, torch.tensor([1, 2, 3]))


def test_tiny_state_dict_roundtrip():
    model = _tiny_model()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = ADMUNet(TINY_CFG, TINY_SIZE).eval()
    fresh.load_state_dict(state, strict=True)
    x = _inputs()
    with torch.no_grad():
        out_a, h_a = model(x, 42)
        out_b, h_b = fresh(x, 42)
    # equal weights, input and batch size: the same kernels, so exact
    assert torch.equal(out_a, out_b)
    assert torch.equal(h_a, h_b)


def test_timestep_embedding_golden():
    dim, half = 8, 4
    ts = [0.0, 1.0, 999.0]
    got = timestep_embedding(torch.tensor([0, 1, 999]), dim)
    assert got.shape == (3, dim) and got.dtype == torch.float32
    for row, t in enumerate(ts):
        freqs = [math.exp(-math.log(10000.0) * i / half) for i in range(half)]
        want = [math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs]
        args = [t * f for f in freqs]
        err = (got[row].double() - torch.tensor(want, dtype=torch.float64)).abs()
        assert bool((err <= sinusoid_tolerance(args + args)).all()), f"t={t}: max err {float(err.max())}"
    # t = 0: cos part all ones, sin part all zeros (cos 0 = 1 and sin 0 = 0 exactly in every libm)
    assert torch.equal(got[0], torch.tensor([1.0] * 4 + [0.0] * 4))


@pytest.mark.parametrize(
    ("change", "image_size", "needle"),
    [
        ({}, 17, "image_size"),
        ({"ch": 20}, TINY_SIZE, "num_groups"),
        ({"num_head_channels": 24}, TINY_SIZE, "num_head_channels"),
        ({"attn_resolutions": [4]}, TINY_SIZE, "attn_resolutions"),
        ({"ch_mult": []}, TINY_SIZE, "ch_mult"),
        ({"out_ch": 3}, TINY_SIZE, "out_ch"),
        ({"type": "ddpm"}, TINY_SIZE, "type"),
        ({"resblock_updown": None}, TINY_SIZE, "resblock_updown"),
    ],
)
def test_invalid_config_raises(change, image_size, needle):
    cfg = copy.deepcopy(TINY_CFG)
    cfg.update(change)
    with pytest.raises(ValueError, match=needle):
        ADMUNet(cfg, image_size)


def test_missing_key_raises():
    cfg = copy.deepcopy(TINY_CFG)
    del cfg["ch_mult"]
    with pytest.raises(ValueError, match="ch_mult"):
        ADMUNet(cfg, TINY_SIZE)


def test_plain_resampling_variant_runs():
    """resblock_updown False uses stand-alone (conv) resampling layers."""
    cfg = dict(TINY_CFG, resblock_updown=False, use_scale_shift_norm=False)
    model = ADMUNet(cfg, TINY_SIZE).eval()
    keys = model.state_dict().keys()
    assert "input_blocks.2.0.op.weight" in keys and "output_blocks.1.2.conv.weight" in keys
    with torch.no_grad():
        out, h = model(_inputs(), 5)
    assert out.shape == (2, 6, TINY_SIZE, TINY_SIZE) and h.shape == (2, 64, 8, 8)
