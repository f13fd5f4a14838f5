"""Shared fixtures: tiny models of the real architectures with random weights, saved as
state-dict files with their configs, and a small labelled image set generated on the fly."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main as cli
from models import build_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # facts the tests compare against, kept in the repository


def read_state_dict_tsv(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} from ``tests/data/<name>``: ``key<TAB>shape`` lines (shape like ``512x128``,
    empty for a scalar); ``#`` lines are comments."""
    shapes = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, shape = line.partition("\t")
        shape = shape.strip()
        shapes[key.strip()] = tuple(int(v) for v in shape.split("x")) if shape else ()
    return shapes


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return float((a.double() - b.double()).abs().max())


def float_tolerance(dtype: torch.dtype, magnitude: float = 1.0, ulps: float = 8.0) -> float:
    """An absolute tolerance for results that may differ by the rounding of a few operations:
    ``ulps`` units in the last place of ``dtype`` at ``magnitude`` (the size of the values
    compared). Used where another kernel (another BLAS or convolution path, another batch
    composition) may round the same mathematics differently."""
    return float(torch.finfo(dtype).eps) * max(abs(magnitude), 1.0) * ulps

TINY_MODELS = {
    "ddpm": {"type": "ddpm", "in_channels": 3, "out_ch": 3, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
             "attn_resolutions": [8], "dropout": 0.0, "var_type": "fixedsmall", "resamp_with_conv": True,
             "num_groups": 4},
    "adm": {"type": "adm", "in_channels": 3, "out_ch": 6, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
            "attn_resolutions": [8], "dropout": 0.0, "var_type": "learned_range", "num_head_channels": 8,
            "resblock_updown": True, "use_scale_shift_norm": True, "num_groups": 4},
}


def sinusoid_tolerance(args: list[float]) -> torch.Tensor:
    """Per-value bound for a float32 sinusoid of ``args``: the frequency and the product t w carry
    a relative error of about 12 ulps (exp of an argument up to ln 10000 ~ 9.2, then one product),
    which sin / cos turn into an absolute error of |t w| * 12 eps, plus a few ulps of their own."""
    eps = torch.finfo(torch.float32).eps
    return torch.tensor([(abs(a) * 12 + 4) * eps for a in args], dtype=torch.float64)


def tiny_config(kind: str, name: str | None = None) -> dict:
    return {
        "name": name or f"tiny_{kind}",
        "data": {"dataset": "synthetic", "image_size": 16, "channels": 3},
        "model": copy.deepcopy(TINY_MODELS[kind]),
        "diffusion": {"beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000},
        "edit": {"t_0": 300, "n_inv_step": 4, "n_test_step": 4, "start_distance": -20, "end_distance": 20,
                 "edit_img_number": 3},
    }


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.1^2) (zero-initialised layers included); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def random_model(config: dict, seed: int = 0) -> torch.nn.Module:
    """build_model with every parameter drawn at random (zero-initialised layers included)."""
    torch.manual_seed(seed)
    return randomize_(build_model(config), seed)


@pytest.fixture(scope="session", params=["ddpm", "adm"])
def tiny_setup(request, tmp_path_factory):
    """(config path, checkpoint path, config dict) for a tiny model of each family."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"tiny_{kind}")
    config = tiny_config(kind)
    cfg_path = root / f"tiny_{kind}.yml"
    cfg_path.write_text(yaml.safe_dump(config))
    ckpt = root / "weights.pt"
    torch.save(random_model(config).state_dict(), ckpt)
    return cfg_path, ckpt, config


def write_labelled_set(root: Path, n: int = 16, size: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """n images, half bright-left (attribute 'Bright_Left' = 1), half bright-right, plus a
    CelebA-format attribute file with that column and a constant one. Returns (image dir, attr file)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = 1 if i % 2 == 0 else -1
        arr = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
        half = slice(0, size // 2) if label == 1 else slice(size // 2, size)
        arr[:, half] += 150
        Image.fromarray(arr).save(img_dir / f"{i:06d}.png")
        rows.append(f"{i:06d}.jpg {label} 1")
    attr = root / "attrs.txt"
    attr.write_text(f"{n}\nBright_Left Always\n" + "\n".join(rows) + "\n")
    return img_dir, attr


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """A tiny DDPM (config + weights), a labelled set and a fitted pair of boundaries."""
    root = tmp_path_factory.mktemp("rel")
    config = tiny_config("ddpm", name="tiny_rel")
    (root / "tiny.yml").write_text(yaml.safe_dump(config))
    torch.save(random_model(config, seed=1).state_dict(), root / "w.pt")
    img_dir, attr = write_labelled_set(root, n=12)
    common = ["--config", str(root / "tiny.yml"), "--model_path", str(root / "w.pt"), "--cache_dir", str(root / "cache")]
    assert cli.main(["--boundary_search", *common, "--exp", str(root / "run"), "--data_dir", str(img_dir),
                     "--attr_file", str(attr), "--edit_attr", "bright_left", "--n_train_img", "8",
                     "--n_test_img", "4", "--boundary_dir", str(root / "bd")]) == 0
    return {"root": root, "common": common, "img": img_dir / "000000.png", "images": img_dir, "attr": attr,
            "h": root / "bd" / "tiny_rel_bright_left_t300_h.npz", "z": root / "bd" / "tiny_rel_bright_left_t300_z.npz"}
