"""Shared fixtures: tiny models of the real architectures with random weights, saved as
state-dict files with their configs, and a small labelled image set generated on the fly.
The helpers they are built from are in ``tests/helpers.py``."""
from __future__ import annotations

import pytest

import main as cli
from tests.helpers import write_labelled_set, write_tiny_model


@pytest.fixture(scope="session", params=["ddpm", "adm"])
def tiny_setup(request, tmp_path_factory):
    """(config path, checkpoint path, config dict) for a tiny model of each family."""
    kind = request.param
    return write_tiny_model(tmp_path_factory.mktemp(f"tiny_{kind}"), kind)


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """A tiny DDPM (config + weights), a labelled set and a fitted pair of boundaries."""
    root = tmp_path_factory.mktemp("rel")
    cfg_path, weights, _ = write_tiny_model(root, "ddpm", name="tiny_rel", seed=1)
    img_dir, attr = write_labelled_set(root, n=12)
    common = ["--config", str(cfg_path), "--model_path", str(weights), "--cache_dir", str(root / "cache")]
    assert cli.main(["--boundary_search", *common, "--exp", str(root / "run"), "--data_dir", str(img_dir),
                     "--attr_file", str(attr), "--edit_attr", "bright_left", "--n_train_img", "8",
                     "--n_test_img", "4", "--boundary_dir", str(root / "bd")]) == 0
    return {"root": root, "common": common, "img": img_dir / "000000.png", "images": img_dir, "attr": attr,
            "h": root / "bd" / "tiny_rel_bright_left_t300_h.npz", "z": root / "bd" / "tiny_rel_bright_left_t300_z.npz"}
