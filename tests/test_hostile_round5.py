"""Hostile inputs, round five (issue 33): names that collide or cannot be read back, work and memory
that grow without bound from accepted input, output names built from every target, and files of the
wrong shape. Each ends in one ``error:`` line and exit 1 with nothing earlier lost, or works; the web
app's cases are in tests/test_app.py. docs/reliability.md names each guarantee and its test."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as cli
from runners.engine import BoundaryIndex
from tests.helpers import REPO, assert_one_error_line, make_edit_setup, write_labelled_set, write_tiny_model
from utils.io.atlas import load_atlas
from utils.io.boundary_files import (BoundaryRecord, current_file, load_boundary, save_boundary,
                                     save_number)
from utils.io.plots import atlas_picture

FAST = ["--config", "digits.yml", "--img_path", str(REPO / "imgs" / "digit_example.png"), "--n_inv_step", "6",
        "--n_test_step", "4", "--no_cache", "--edit_image_boundary"]


def run(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("r5")
    cfg, weights, _ = write_tiny_model(root, "ddpm", name="tiny_r5", seed=2)
    return {"root": root, "common": ["--config", str(cfg), "--model_path", str(weights), "--cache_dir",
                                     str(root / "cache"), "--t_0", "300", "--n_inv_step", "3"]}


def _attribute_file(root: Path, names: list[str], n: int = 24) -> tuple[Path, Path]:
    """A labelled set of ``n`` images with the columns ``names`` (each alternating +1 / -1)."""
    images, _ = write_labelled_set(root, n=n)
    rows = [f"{i:06d}.jpg " + " ".join("1" if (i + k) % 2 else "-1" for k in range(len(names))) for i in range(n)]
    attr = root / "names.txt"
    attr.write_text(f"{n}\n{' '.join(names)}\n" + "\n".join(rows) + "\n")
    return images, attr


# ------------------------------------------------------------------ 1. names

@pytest.mark.parametrize("names", [["a.b", "a,b", "a_b"], ["Smile!", "smile?"]])
def test_columns_with_one_file_name_are_refused_before_any_work(tiny, tmp_path, capsys, names):
    """Before: a.b, a,b and a_b overwrote one another under --ni: exit 0, two attributes' files lost."""
    images, attr = _attribute_file(tmp_path, names)
    code, err = run(["--boundary_search", *tiny["common"], "--data_dir", images, "--attr_file", attr,
                     "--edit_attr", "all", "--n_train_img", "16", "--n_test_img", "8", "--exp", tmp_path / "run",
                     "--boundary_dir", tmp_path / "bd", "--ni"], capsys)
    assert_one_error_line(code, err, "would share the boundary file name", "rename one of the columns")
    assert "inverting" not in err and not (tmp_path / "bd").exists()


def test_a_name_too_long_for_a_boundary_file_is_refused(tiny, tmp_path, capsys):
    """Before: written into files that never loaded again, and then ignored for ever."""
    images, attr = _attribute_file(tmp_path, ["x" * 1500, "short"])
    code, err = run(["--boundary_search", *tiny["common"], "--data_dir", images, "--attr_file", attr,
                     "--edit_attr", "all", "--n_train_img", "16", "--n_test_img", "8", "--exp", tmp_path / "run",
                     "--boundary_dir", tmp_path / "bd"], capsys)
    assert_one_error_line(code, err, "1500 characters", "rename the column")


def test_a_refit_with_ni_replaces_the_file_the_edits_read(tiny, tmp_path, capsys):
    """Before: after thick.npz and thick-1.npz, --ni replaced thick.npz while edits kept reading the
    older thick-1.npz."""
    images, attr = write_labelled_set(tmp_path, n=12)
    search = ["--boundary_search", *tiny["common"], "--data_dir", images, "--attr_file", attr,
              "--edit_attr", "Bright_Left", "--n_train_img", "8", "--n_test_img", "4", "--boundary_dir", tmp_path / "bd"]
    for exp, extra in (("a", []), ("b", []), ("c", ["--ni", "--svm_c", "0.01"])):
        assert run([*search, "--exp", tmp_path / exp, *extra], capsys)[0] == 0
    files = sorted(p.name for p in (tmp_path / "bd").glob("*_z*.npz"))
    assert files == ["tiny_r5_bright_left_t300_z-1.npz", "tiny_r5_bright_left_t300_z.npz"]
    newest = load_boundary(tmp_path / "bd" / "tiny_r5_bright_left_t300_z-1.npz")
    summary = json.loads((tmp_path / "c" / "boundary_search" / "summary.json").read_text())
    assert summary["spaces"]["z"]["path"].endswith("z-1.npz")  # --ni replaced the current file
    index = BoundaryIndex.of(tmp_path / "bd", "tiny_r5", {"z": (3, 16, 16), "h": (32, 8, 8)})
    assert index.find("bright_left", 300)[2]["z"].name == "tiny_r5_bright_left_t300_z-1.npz"
    assert newest.train_acc == summary["spaces"]["z"]["train_acc"]


def test_a_save_number_of_other_digits_is_not_an_internal_error(tmp_path, capsys):
    """Before: a file named ``..._z-².npz`` in the boundary folder stopped the command line with an
    internal error (int('²'))."""
    assert save_number(Path("digits_thick_t200_z-².npz")) == 0 and save_number(Path("a-12.npz")) == 12
    assert current_file([Path("a-².npz"), Path("a-1.npz"), Path("a.npz")]) == Path("a-1.npz")
    folder = tmp_path / "bd"
    folder.mkdir()
    for path in (REPO / "boundary").glob("digits_thick_t200_*.npz"):
        (folder / path.name).write_bytes(path.read_bytes())
        (folder / path.name.replace(".npz", "-².npz")).write_bytes(path.read_bytes())
    code, err = run([*FAST, "--edit_attr", "thick", "--boundary_dir", folder, "--edit_img_number", 2, "--exp",
                     tmp_path / "run"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------ 2. work and memory

def test_a_grid_that_squares_k_past_the_bound_is_refused_before_any_work(tmp_path, capsys):
    """Before: --edit_img_number 1000 --grid was taken as 1,000,000 edits (a 36 GB grid picture)."""
    code, err = run([*FAST, "--edit", "thick=-1:1", "--edit", "slant=-1:1", "--grid", "--edit_img_number", 1000,
                     "--exp", tmp_path], capsys)
    assert_one_error_line(code, err, "1000000 edits per image", "--edit_img_number")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--end_distance", "--start_distance"])
def test_a_distance_beyond_any_latent_is_refused_before_the_inversion(flag, tmp_path, capsys):
    """Before: 1e308 was refused only after the inversion had run."""
    code, err = run([*FAST, "--edit_attr", "thick", flag, "1e308", "--exp", tmp_path], capsys)
    assert_one_error_line(code, err, "finite number within")
    assert "inverting" not in err


def _atlas(n: int, name_length: int = 8) -> dict:
    names = [f"{i:0{name_length}d}" for i in range(n)]
    matrix = np.eye(n).tolist()
    return {"format_version": 1, "config_name": "c", "t_0": 1, "attributes": names,
            "cosines": {"z": matrix, "h": matrix}, "phi": None, "hold_threshold": 0.3, "skipped": {},
            "per_attribute": {n_: {"train_acc": {"z": 1.0, "h": 1.0}, "test_acc": {"z": 1.0, "h": 1.0},
                                   "n_train": 1, "n_test": 1, "n_pos": 1, "n_neg": 1, "holds": names[:9]}
                              for n_ in names}}


@pytest.mark.parametrize("n, name_length", [(1000, 8), (3, 60_000)])
def test_the_atlas_picture_stays_small_whatever_the_attributes(n, name_length, tmp_path):
    """Before: 1,000 columns passed 8 GB, one 60,000-character name 6 GB."""
    start = time.perf_counter()
    atlas_picture(_atlas(n, name_length), tmp_path / "atlas.png")
    with Image.open(tmp_path / "atlas.png") as picture:
        assert picture.width * picture.height < 12_000_000, picture.size
    assert time.perf_counter() - start < 120


# ------------------------------------------------------------------ 3. output names

def test_twelve_attributes_in_the_relative_unit_get_short_file_names(tmp_path, capsys):
    """Before: each edit's name passed the file system's limit and the run failed after all the work."""
    names = ["thick", "slant", *(f"digit_{d}" for d in range(10))]
    argv = [a for name in names for a in ("--edit", f"{name}=0.1:0.2")]
    code, err = run([*FAST, *argv, "--edit_unit", "relative", "--edit_img_number", 2, "--edit_space", "z",
                     "--exp", tmp_path], capsys)
    assert code == 0, err
    out = tmp_path / "edit"
    assert sorted(p.name for p in out.glob("edit_*")) == ["edit_00.png", "edit_01.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["targets"][0]) == set(names)  # the full targets are in the summary


# ------------------------------------------------------------------ 4. files of the wrong shape

@pytest.mark.parametrize("forged", [{"format_version": 1e400}, {"format_version": True},
                                    {"attributes": [["a"], "b"]}, {"per_attribute": {"a": []}},
                                    {"cosines": {"z": [[1, "x"], [0, 1]]}}, {"hold_threshold": "high"}])
def test_a_forged_atlas_is_one_line(forged, tmp_path):
    atlas = {**_atlas(2), **forged}
    (tmp_path / "atlas.json").write_text(json.dumps(atlas).replace("Infinity", "1e400"))
    with pytest.raises(Exception) as info:
        load_atlas(tmp_path)
    assert type(info.value).__name__ == "UserError" and "cannot be read" in str(info.value), info.value


def test_auto_holds_pass_over_boundaries_of_another_latent_shape(tmp_path, capsys):
    """Before: --condition_attr auto beside a boundary of another latent shape failed in numpy."""
    setup = make_edit_setup(tmp_path, attributes=("bright", "slanted"))
    odd = np.ones(7, dtype=np.float32) / np.sqrt(7)
    for space in ("z", "h"):
        save_boundary(tmp_path / "bd" / f"tiny_ed_odd_t300_{space}.npz",
                      BoundaryRecord(normal=odd, coef=odd, intercept=0.0, shape=(7,), space=space, t_0=300,
                                     n_inv_step=5, attribute="odd", config_name="tiny_ed"))
    code, err = run(["--edit_image_boundary", *setup["common"], "--img_path", setup["images"] / "img0.png",
                     "--edit_attr", "bright", "--condition_attr", "auto", "--exp", tmp_path / "run"], capsys)
    assert code == 0, err


def test_save_tensors_with_many_iterations_is_bounded(tmp_path, capsys):
    """--save_tensors keeps every edit of every iteration in memory until tensors.pt is written."""
    code, err = run([*FAST, "--edit_attr", "thick", "--save_tensors", "--n_iter", 101, "--edit_img_number", 10,
                     "--exp", tmp_path], capsys)
    assert_one_error_line(code, err, "--save_tensors", "--n_iter")
