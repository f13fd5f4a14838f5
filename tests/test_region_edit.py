"""Region edits through the command line (issue 31): the outside of the region equals the
reconstruction beyond the feather, bit for bit (it follows the unedited run while denoising), the
moves hit their targets, the outputs record and outline the region, and bad regions are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main as cli
from tests.helpers import REPO, assert_one_error_line, make_edit_setup
from utils.config import ConfigError, parse_config
from utils.io.boundary_files import load_boundary


def run(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_edit_setup(tmp_path_factory.mktemp("region"), attributes=("bright", "slanted"))


def edit(setup, exp, *argv):
    return ["--edit_image_boundary", *setup["common"], "--img_path", setup["images"] / "img0.png", "--exp", exp,
            "--save_tensors", *argv]


@pytest.mark.parametrize("extra", [[], ["--edit", "bright=-20:20", "--edit", "slanted=5:5", "--start_distance", None],
                                   ["--region_h", "none"], ["--eta", "0"]])
def test_the_outside_beyond_the_feather_is_the_reconstruction_bit_for_bit(setup, tmp_path, capsys, extra):
    argv = [a for a in extra if a is not None]
    if "--edit" in argv:
        base = [a for a in setup["common"] if a not in ("--start_distance", "--end_distance", "-20", "20")]
        argv_all = ["--edit_image_boundary", *base, "--img_path", setup["images"] / "img0.png", "--exp", tmp_path,
                    "--save_tensors", "--edit", "bright=-20:20", "--edit", "slanted=5:5"]
    else:
        argv_all = edit(setup, tmp_path, "--edit_attr", "bright", *argv)
    code, err = run([*argv_all, "--region", "0.25,0.25,0.75,0.75", "--feather", "2"], capsys)
    assert code == 0, err
    tensors = torch.load(tmp_path / "edit" / "tensors.pt", weights_only=True)
    edits, recon = tensors["edits"], tensors["recon"]
    kept = torch.ones(16, 16, dtype=torch.bool)
    kept[2:14, 2:14] = False  # the box is rows/columns 4..11; the feather reaches 2 pixels beyond it
    assert torch.equal(edits[:, :, kept], recon[:, :, kept].expand(len(edits), -1, -1))
    assert (edits[:, :, 4:12, 4:12] - recon[:, :, 4:12, 4:12]).abs().max() > 0.01  # and the inside is edited
    summary = json.loads((tmp_path / "edit" / "summary.json").read_text())
    assert summary["region"]["kind"] == "box" and summary["region"]["coverage"] == pytest.approx(0.25)
    assert summary["edit"]["region"] == {"spec": "0.25,0.25,0.75,0.75", "h": argv[argv.index("--region_h") + 1]
                                         if "--region_h" in argv else "cells", "feather": 2.0, "method": "blend",
                                         "rank": 32}


def test_the_confined_move_hits_the_targets_and_stays_inside(setup, tmp_path, capsys):
    code, err = run(edit(setup, tmp_path, "--edit_attr", "bright", "--region", "0.5,0,1,1", "--feather", "0"), capsys)
    assert code == 0, err
    tensors = torch.load(tmp_path / "edit" / "tensors.pt", weights_only=True)
    normal = torch.from_numpy(load_boundary(setup["boundaries"]["bright"]["z"]).normal).double()
    moved = tensors["edited_z"].double()
    assert (moved.flatten(1) @ normal).tolist() == pytest.approx(tensors["distances"].tolist(), abs=1e-4)
    assert torch.equal(moved[:, :, :, :8], tensors["z"].double().expand(len(moved), -1, -1, -1)[:, :, :, :8])


def test_the_grid_outlines_the_region(setup, tmp_path, capsys):
    assert run(edit(setup, tmp_path / "plain", "--edit_attr", "bright"), capsys)[0] == 0
    assert run(edit(setup, tmp_path / "region", "--edit_attr", "bright", "--region", "0.25,0.25,0.75,0.75"),
               capsys)[0] == 0
    plain = np.asarray(Image.open(tmp_path / "plain" / "edit" / "grid.png").convert("RGB")).astype(int)
    region = np.asarray(Image.open(tmp_path / "region" / "edit" / "grid.png").convert("RGB")).astype(int)
    first = slice(0, plain.shape[1] // 9)  # the original's cell: the same image in both grids
    yellow = (region[:, first, 0] == 255) & (region[:, first, 1] == 255) & (region[:, first, 2] == 0)
    changed = (region[:, first] != plain[:, first]).any(axis=2)
    assert yellow.sum() >= 28 and (changed <= yellow).all()  # the 28-pixel border of the box, and nothing else


def test_a_mask_image_of_any_size_names_the_region_and_its_hash(setup, tmp_path, capsys):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, err = run(edit(setup, tmp_path, "--edit_attr", "bright", "--region", tmp_path / "mask.png"), capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "edit" / "summary.json").read_text())
    assert summary["region"]["kind"] == "file" and len(summary["region"]["sha256"]) == 64
    assert summary["region"]["coverage"] == pytest.approx(0.5)


@pytest.mark.parametrize("spec, words", [
    ("0.5,0.5,0.5,0.9", ["x0 < x1"]),
    ("0,0,1,1", ["everything is editable"]),
    ("nosuchmask.png", ["no such mask image"]),
    ("mouth", ["no parts file names img0.png"]),
    ("0,0,0.01,0.01", ["under one pixel"]),
])
def test_bad_regions_are_one_line_before_any_work(setup, tmp_path, capsys, spec, words):
    code, err = run(edit(setup, tmp_path, "--edit_attr", "bright", "--region", spec), capsys)
    assert_one_error_line(code, err, *words)
    assert "inverting" not in err and not (tmp_path / "edit").exists()


def test_a_loco_edit_keeps_the_move_off_the_outside_and_a_rank_beyond_it_is_one_line(setup, tmp_path, capsys):
    """--region_method loco end to end on the tiny model; the box leaves the bottom row alone outside
    (16 pixels x 3 channels = 48 values), so a rank of 64 cannot be had. Before: an internal error."""
    loco = ["--edit_attr", "bright", "--region", "0,0,1,0.9", "--region_method", "loco", "--region_h", "none"]
    code, err = run(edit(setup, tmp_path / "ok", *loco, "--region_rank", "8"), capsys)
    assert code == 0, err
    tensors = torch.load(tmp_path / "ok" / "edit" / "tensors.pt", weights_only=True)
    assert (tensors["edits"] - tensors["recon"]).abs().max() > 0.01
    code, err = run(edit(setup, tmp_path / "bad", *loco, "--region_rank", "64"), capsys)
    assert_one_error_line(code, err, "--region_method loco", "k must lie in [1, 48]")


def test_an_unreadable_mask_is_one_line(setup, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code, err = run(edit(setup, tmp_path, "--edit_attr", "bright", "--region", tmp_path / "broken.png"), capsys)
    assert_one_error_line(code, err, "broken.png")


def test_a_part_comes_from_the_images_parts_file(setup, tmp_path, capsys):
    image = tmp_path / "face.png"
    image.write_bytes((setup["images"] / "img0.png").read_bytes())
    masks = np.zeros((1, 2, 16, 16), dtype=np.uint8)
    masks[0, 0, 8:, :] = 255  # "mouth": the lower half
    masks[0, 1, :8, :] = 255
    np.savez(tmp_path / "face.png.parts.npz", names=np.array(["face.png"]), parts=np.array(["mouth", "hair"]),
             masks=masks)
    argv = ["--edit_image_boundary", *setup["common"], "--img_path", image, "--exp", tmp_path / "run",
            "--save_tensors", "--edit_attr", "bright", "--region", "mouth", "--feather", "0"]
    code, err = run(argv, capsys)
    assert code == 0, err
    tensors = torch.load(tmp_path / "run" / "edit" / "tensors.pt", weights_only=True)
    assert torch.equal(tensors["edits"][:, :, :8], tensors["recon"][:, :, :8].expand(len(tensors["edits"]), -1, -1, -1))
    summary = json.loads((tmp_path / "run" / "edit" / "summary.json").read_text())
    assert summary["region"]["part"] == "mouth"
    code, err = run([*argv[:-4], "--region", "eyes"], capsys)
    assert_one_error_line(code, err, "has the parts mouth, hair")


@pytest.mark.parametrize("extra, expected", [(["--region", "mouth"], [-10.0, 0.0, 10.0]),
                                             ([], [-20.0, 0.0, 20.0]),
                                             (["--region", "mouth", "--start_distance", "-8"], [-8.0, 1.0, 10.0]),
                                             (["--region", "mouth", "--start_distance", "-2", "--end_distance", "4"],
                                              [-2.0, 1.0, 4.0])])
def test_a_region_edit_of_the_faces_takes_the_configs_region_range_unless_distances_are_named(tmp_path, capsys, extra,
                                                                                             expected):
    """faces.yml sets edit.region_distance 10: a --region edit naming no distances spans -10..10 (a
    whole-image edit the config's -20..20), and each end given on the command line wins."""
    argv = ["--edit_image_boundary", "--edit_attr", "Smiling", "--img_path", REPO / "imgs" / "face_example.png",
            "--exp", tmp_path, "--no_cache", "--edit_img_number", "3", "--n_inv_step", "10", "--n_test_step", "10",
            "--save_tensors", *extra]
    code, err = run(argv, capsys)
    assert code == 0, err
    tensors = torch.load(tmp_path / "edit" / "tensors.pt", weights_only=True)
    assert tensors["distances"].tolist() == pytest.approx(expected)


def test_the_region_range_of_a_config_is_checked_and_zero_means_the_whole_image_range():
    raw = yaml.safe_load((REPO / "configs" / "faces.yml").read_text())
    assert parse_config(raw).edit.default_range(region=True) == (-10.0, 10.0)
    raw["edit"]["region_distance"] = 0
    assert parse_config(raw).edit.default_range(region=True) == (-20, 20)
    raw["edit"]["region_distance"] = -1
    with pytest.raises(ConfigError, match="edit.region_distance"):
        parse_config(raw)
