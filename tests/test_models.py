"""Model factory: real layouts key for key, and the shared (out, h) / h_override interface."""
from __future__ import annotations

import pytest
import torch

from models import build_model, latent_shapes
from tests.conftest import random_model, read_state_dict_tsv, tiny_config
from utils.config import load_config



@pytest.mark.parametrize("config_name, tsv, h_shape", [
    ("celeba.yml", "state_dict_ddpm_256.tsv", (512, 8, 8)),
    ("church.yml", "state_dict_ddpm_256.tsv", (512, 8, 8)),
    ("bedroom.yml", "state_dict_ddpm_256.tsv", (512, 8, 8)),
    ("afhq.yml", "state_dict_iddpm_afhq_256.tsv", (512, 8, 8)),
])
def test_real_configs_match_reference_state_dicts(config_name, tsv, h_shape):
    expected = read_state_dict_tsv(tsv)
    with torch.device("meta"):
        model = build_model(load_config(config_name))
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    wrong = [(k, actual[k], expected[k]) for k in expected if k in actual and actual[k] != expected[k]]
    assert not missing and not extra and not wrong, f"missing {missing[:5]}, unexpected {extra[:5]}, shapes {wrong[:5]}"
    assert len(actual) == len(expected)
    assert latent_shapes(load_config(config_name)) == {"z": (3, 256, 256), "h": h_shape}


@pytest.mark.parametrize("kind", ["ddpm", "adm"])
def test_tiny_model_interface(kind):
    config = tiny_config(kind)
    model = random_model(config, seed=3)
    shapes = latent_shapes(config)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 500.0, 999.0])
    with torch.no_grad():
        out, h = model(x, t)
        assert out.shape == (3, config["model"]["out_ch"], 16, 16)
        assert h.shape == (3, *shapes["h"])
        same, h2 = model(x, t, h_override=h)
        assert torch.equal(same, out) and torch.equal(h2, h)
        changed, h3 = model(x, t, h_override=h + 1.0)
        assert (changed - out).abs().max() > 1e-4
        assert torch.equal(h3, h), "the returned h must be the middle block's own output"
        singles = torch.cat([model(x[i:i + 1], t[i:i + 1])[0] for i in range(3)])
        assert torch.allclose(singles, out, atol=1e-5), (singles - out).abs().max()
        scalar_t = model(x, 500)[0]
        assert torch.allclose(scalar_t, model(x, torch.full((3,), 500.0))[0])


@pytest.mark.parametrize("kind", ["ddpm", "adm"])
def test_state_dict_round_trip_is_strict_and_exact(kind, tmp_path):
    config = tiny_config(kind)
    model = random_model(config, seed=4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = build_model(config)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x, 7)[0], model(x, 7)[0])


def test_ddpm_rejects_bad_architecture():
    config = tiny_config("ddpm")
    config["data"]["image_size"] = 15
    with pytest.raises(ValueError, match="image_size"):
        build_model(config)
