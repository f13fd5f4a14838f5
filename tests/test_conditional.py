"""Conditional editing (--condition_attr, --condition_z/_h): the held attributes are targets of zero
change in the joint move, so the edit sets the primary projection to each distance and leaves each
condition's projection where it was."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import main as cli
from tests.helpers import assert_one_error_line, make_edit_setup
from utils.core.boundary import latent_distance
from utils.io.boundary_files import load_boundary


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_edit_setup(tmp_path_factory.mktemp("cond"), attributes=("bright", "slanted", "round"), n_images=1)


def test_each_condition_projection_is_unchanged(setup, tmp_path, capsys):
    b = setup["boundaries"]
    code = cli.main([*setup["common"], "--edit_image_boundary", "--img_path", str(setup["images"] / "img0.png"),
                     "--exp", str(tmp_path), "--boundary_z", str(b["bright"]["z"]), "--boundary_h", str(b["bright"]["h"]),
                     "--condition_attr", "slanted,round", "--save_tensors", "--edit_img_number", "4"])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "edit"
    tensors = torch.load(out / "tensors.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    for space in ("z", "h"):
        edited, source = tensors[f"edited_{space}"], tensors[space]
        assert edited.shape == (4, *source.shape[1:])
        primary = torch.from_numpy(load_boundary(b["bright"][space]).normal)
        # the primary's own projection reaches every distance (the config's -20 .. 20, 4 points)
        reached = latent_distance(edited, primary)
        want = torch.linspace(-20, 20, 4, dtype=torch.float64)
        assert torch.allclose(reached, want, atol=1e-4, rtol=0), f"{space}: {reached} vs {want}"
        assert tensors[f"targets_{space}"][:, 0].tolist() == want.tolist()
        for attribute in ("slanted", "round"):
            normal = torch.from_numpy(load_boundary(b[attribute][space]).normal)
            change = latent_distance(edited, normal) - latent_distance(source, normal)
            assert change.abs().max() <= 1e-5, f"{space}/{attribute}: {change.abs().max()}"
        assert summary["edit"]["held"] == ["slanted", "round"]
        cosines = summary["edit"]["spaces"][space]["cosines"]
        assert cosines["names"] == ["bright", "slanted", "round"]
        expected = load_boundary(b["bright"][space]).normal.astype(np.float64) @ load_boundary(b["slanted"][space]).normal
        assert abs(cosines["matrix"][0][1] - expected) < 1e-6


def test_unconditioned_edit_moves_the_condition(setup, tmp_path, capsys):
    """The check above can fail: without the projection the random normals' overlap moves them."""
    b = setup["boundaries"]
    assert cli.main([*setup["common"], "--edit_image_boundary", "--img_path", str(setup["images"] / "img0.png"),
                     "--exp", str(tmp_path), "--boundary_z", str(b["bright"]["z"]), "--edit_space", "z",
                     "--save_tensors", "--edit_img_number", "2"]) == 0
    tensors = torch.load(tmp_path / "edit" / "tensors.pt", weights_only=True)
    assert "edited_h" not in tensors
    normal = torch.from_numpy(load_boundary(b["slanted"]["z"]).normal)
    assert (latent_distance(tensors["edited_z"], normal) - latent_distance(tensors["z"], normal)).abs().max() > 1e-3


def test_explicit_condition_files_and_errors(setup, tmp_path, capsys):
    b = setup["boundaries"]
    args = [*setup["common"], "--edit_image_boundary", "--img_path", str(setup["images"] / "img0.png"),
            "--boundary_z", str(b["bright"]["z"]), "--edit_space", "z", "--edit_img_number", "2"]
    assert cli.main([*args, "--exp", str(tmp_path / "a"), "--condition_z", str(b["round"]["z"])]) == 0
    summary = json.loads((tmp_path / "a" / "edit" / "summary.json").read_text())
    assert summary["edit"]["held"] == ["round"]
    capsys.readouterr()
    assert cli.main([*args, "--exp", str(tmp_path / "b"), "--condition_attr", "missing"]) == 1
    assert_one_error_line(1, capsys.readouterr().err, "no boundary for 'missing'")
    assert cli.main([*args, "--exp", str(tmp_path / "c"), "--condition_z", str(b["bright"]["z"])]) == 1
    assert_one_error_line(1, capsys.readouterr().err, "too close to move or hold together", "cos +1.0000")
    assert cli.main([*args, "--exp", str(tmp_path / "d"), "--condition_z", str(b["round"]["h"])]) == 1
    assert_one_error_line(1, capsys.readouterr().err, "h space")
