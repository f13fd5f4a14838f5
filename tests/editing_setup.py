"""A tiny random-weight DDPM, a folder of generated images and random boundary files (any number
of attributes), written once per test module: the setting of the folder, conditional and
picture tests. Boundaries are random unit normals, so no boundary search is needed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from models import latent_shapes
from tests.conftest import random_model, tiny_config
from utils.io.boundary_files import BoundaryRecord, save_boundary
from utils.config import parse_config


def make_edit_setup(root: Path, attributes=("bright", "slanted"), n_images: int = 4, t_0: int = 300) -> dict:
    """Writes root/tiny.yml, root/w.pt, root/images/img{i}.png, root/bd/tiny_ed_<attr>_t<t_0>_<space>.npz.

    Returns {"common": CLI args naming model, weights and boundary dir, "images": folder,
    "boundaries": {attr: {space: path}}, "config": Config}."""
    config = tiny_config("ddpm", name="tiny_ed")
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.yml").write_text(yaml.safe_dump(config))
    torch.save(random_model(config, seed=3).state_dict(), root / "w.pt")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)).save(images / f"img{i}.png")
    parsed = parse_config(config, name="tiny_ed")
    shapes = latent_shapes(parsed)
    boundaries = {}
    for a, attribute in enumerate(attributes):
        boundaries[attribute] = {}
        for space, shape in shapes.items():
            normal = np.random.default_rng(100 + 10 * a + len(space)).normal(size=int(np.prod(shape)))
            normal = (normal / np.linalg.norm(normal)).astype(np.float32)
            record = BoundaryRecord(normal=normal, coef=normal, intercept=0.0, shape=shape, space=space, t_0=t_0,
                                    n_inv_step=5, attribute=attribute, config_name="tiny_ed")
            boundaries[attribute][space] = save_boundary(root / "bd" / f"tiny_ed_{attribute}_t{t_0}_{space}.npz",
                                                         record)
    common = ["--config", str(root / "tiny.yml"), "--model_path", str(root / "w.pt"), "--no_cache",
              "--boundary_dir", str(root / "bd"), "--t_0", str(t_0), "--n_inv_step", "5", "--n_test_step", "5",
              "--start_distance", "-20", "--end_distance", "20", "--edit_img_number", "3"]
    return {"common": common, "images": images, "boundaries": boundaries, "config": parsed}
