"""Conditional editing: the primary normal is projected orthogonal to the condition normals, so
the edit leaves each condition's projection where it was."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import main as cli
from tests.helpers import make_edit_setup
from utils.core.boundary import latent_distance
from utils.io.boundary_files import load_boundary
from utils.core.editing import condition_normal


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
        moved = latent_distance(edited, primary) - latent_distance(source, primary)
        assert moved.abs().max() > 1.0, "the edit moves along the primary boundary"
        for attribute in ("slanted", "round"):
            normal = torch.from_numpy(load_boundary(b[attribute][space]).normal)
            change = latent_distance(edited, normal) - latent_distance(source, normal)
            assert change.abs().max() <= 1e-5, f"{space}/{attribute}: {change.abs().max()}"
        recorded = summary["conditions"][space]
        assert [c["attribute"] for c in recorded] == ["slanted", "round"]
        expected = np.degrees(np.arccos(load_boundary(b["bright"][space]).normal.astype(np.float64)
                                        @ load_boundary(b["slanted"][space]).normal))
        assert abs(recorded[0]["angle_degrees"] - expected) < 1e-3


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
    assert [c["attribute"] for c in summary["conditions"]["z"]] == ["round"]
    capsys.readouterr()
    assert cli.main([*args, "--exp", str(tmp_path / "b"), "--condition_attr", "missing"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--condition_attr missing" in err[0]
    assert cli.main([*args, "--exp", str(tmp_path / "c"), "--condition_z", str(b["bright"]["z"])]) == 1
    assert "span" in capsys.readouterr().err
    assert cli.main([*args, "--exp", str(tmp_path / "d"), "--condition_z", str(b["round"]["h"])]) == 1
    assert "h space" in capsys.readouterr().err


def test_condition_normal_is_orthogonal_unit_and_reports_angles():
    rng = np.random.default_rng(0)
    p, c1, c2 = (rng.normal(size=50) for _ in range(3))
    c1 /= np.linalg.norm(c1)
    normal, angles = condition_normal(p, [c1, c2])
    assert abs(np.linalg.norm(normal) - 1) < 1e-6
    assert abs(normal @ c1) < 1e-6 and abs(normal @ c2) < 1e-5
    expected = np.degrees(np.arccos(p @ c1 / np.linalg.norm(p)))
    assert abs(angles[0] - expected) < 1e-9
    assert condition_normal(p, [])[1] == []
