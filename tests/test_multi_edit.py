"""Several attributes at once on the embedded digits model and its shipped boundaries: --edit moves
every attribute to its own target (each edited latent projects onto each normal at its target),
--condition_attr holds one where the image has it, --grid sweeps two over K x K points, the relative
unit places -1 and +1 at the class medians, and bad requests end in one line before any work."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main as cli
from runners.engine.boundaries import relative_scale
from runners.engine.describe import EditDescription, SpaceEdit
from runners.engine.requests import Denoising
from runners.engine.outputs import edit_file_names
from tests.helpers import assert_one_error_line
from utils.io.boundary_files import load_boundary

REPO = Path(__file__).resolve().parents[1]
FAST = ["--config", "digits.yml", "--img_path", str(REPO / "imgs" / "digit_example.png"), "--n_inv_step", "10", "--n_test_step", "10",
        "--no_cache", "--edit_image_boundary"]


def unit_normal(attribute: str, space: str) -> torch.Tensor:
    normal = torch.from_numpy(load_boundary(REPO / "boundary" / f"digits_{attribute}_t200_{space}.npz").normal)
    normal = normal.double().reshape(-1)
    return normal / normal.norm()


def projections(tensors: dict, space: str, attribute: str, key: str | None = None) -> list[float]:
    return (tensors[key or f"edited_{space}"].flatten(1).double() @ unit_normal(attribute, space)).tolist()


def run(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def edit_tensors(argv, exp: Path, capsys) -> tuple[dict, str]:
    """A successful --save_tensors edit of the example digit into ``exp``: its tensors.pt and stderr."""
    code, err = run([*FAST, *argv, "--save_tensors", "--exp", exp], capsys)
    assert code == 0, err
    return torch.load(exp / "edit" / "tensors.pt", weights_only=True), err


def test_two_attributes_move_together_each_to_its_target(tmp_path, capsys):
    tensors, err = edit_tensors(["--edit", "thick=-5:0", "--edit", "slant=2:-2", "--edit_img_number", 3], tmp_path,
                                capsys)
    out = tmp_path / "edit"
    want = {"thick": [-5.0, -2.5, 0.0], "slant": [2.0, 0.0, -2.0]}
    for space in ("z", "h"):
        assert tensors[f"targets_{space}"].tolist() == [list(t) for t in zip(want["thick"], want["slant"])]
        for attribute, targets in want.items():
            assert projections(tensors, space, attribute) == pytest.approx(targets, abs=1e-3), (space, attribute)
    names = sorted(p.name for p in out.glob("edit_*.png"))
    assert names == ["edit_00_thick-5.00_slant+2.00.png", "edit_01_thick-2.50_slant+0.00.png",
                     "edit_02_thick+0.00_slant-2.00.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"][0] == {"thick": {"z": -5.0, "h": -5.0}, "slant": {"z": 2.0, "h": 2.0}}
    cosines = summary["edit"]["spaces"]["h"]["cosines"]
    assert cosines["names"] == ["thick", "slant"]
    assert cosines["matrix"][0][1] == pytest.approx(float(unit_normal("thick", "h") @ unit_normal("slant", "h")))
    assert "cosines of the z normals (thick, slant)" in err


def test_a_held_attribute_stays_at_the_inverted_latents_projection(tmp_path, capsys):
    tensors, _ = edit_tensors(["--edit", "thick=-5:0", "--condition_attr", "slant", "--edit_img_number", 3], tmp_path,
                              capsys)
    for space in ("z", "h"):
        assert projections(tensors, space, "thick") == pytest.approx([-5.0, -2.5, 0.0], abs=1e-3)
        own = projections(tensors, space, "slant", key=space)[0]
        assert projections(tensors, space, "slant") == pytest.approx([own] * 3, abs=1e-3)
    # and without holding it, slant moves with thick in h (cos 0.084 there)
    free, _ = edit_tensors(["--edit", "thick=-5:0", "--edit_img_number", 3], tmp_path / "free", capsys)
    own = projections(free, "h", "slant", key="h")[0]
    assert max(abs(p - own) for p in projections(free, "h", "slant")) > 0.05


def test_condition_auto_holds_what_the_atlas_of_the_boundary_folder_suggests(tmp_path, capsys):
    """The shipped three_vs_eight normal lies within |cos| 0.3 of digit_3's and digit_8's (the atlas's
    threshold), thick's of none."""
    from utils.io.atlas import atlas_from_dir

    atlas = atlas_from_dir(REPO / "boundary", "digits", 200)
    cos = {s: np.array(atlas["cosines"][s]) for s in ("z", "h")}
    names = atlas["attributes"]
    want = sorted(n for n in names if n != "three_vs_eight" and max(
        abs(cos[s][names.index("three_vs_eight"), names.index(n)]) for s in cos) >= 0.3)
    assert want == ["digit_3", "digit_8"]
    tensors, _ = edit_tensors(["--edit_attr", "three_vs_eight", "--condition_attr", "auto", "--edit_img_number", 2],
                              tmp_path, capsys)
    summary = json.loads((tmp_path / "edit" / "summary.json").read_text())
    assert sorted(summary["edit"]["held"]) == want
    for space in ("z", "h"):
        for held in want:
            own = projections(tensors, space, held, key=space)[0]
            assert projections(tensors, space, held) == pytest.approx([own] * 2, abs=1e-3), (space, held)
    code, err = run([*FAST, "--edit_attr", "thick", "--condition_attr", "auto", "--edit_img_number", 2,
                     "--exp", tmp_path / "thick"], capsys)
    assert code == 0 and "holding the attributes whose normals are close to the edited ones (|cos| >= 0.3): none" in err


def test_a_grid_sweeps_two_attributes_over_k_by_k_points(tmp_path, capsys):
    code, err = run([*FAST, "--edit", "thick=-5:0", "--edit", "slant=2:-2", "--edit_img_number", 3, "--grid",
                     "--exp", tmp_path], capsys)
    assert code == 0, err
    out = tmp_path / "edit"
    names = sorted(p.name for p in out.glob("edit_*.png"))
    assert len(names) == 9
    assert names[1] == "edit_01_thick-5.00_slant+0.00.png" and names[3] == "edit_03_thick-2.50_slant+2.00.png"
    with Image.open(out / "grid.png") as grid, Image.open(out / names[0]) as tile:
        # 3 x 3 tiles (each shown at least 96 px), plus a label row above and a label column at the left
        assert grid.height > 3 * max(96, tile.height) and grid.width > 3 * max(96, tile.width) + 40
        pixels = np.asarray(grid.convert("L"))
    left = pixels[:, :30]  # the row labels ("thick -5.00", ...) are drawn in black there
    assert (left < 100).sum() > 50


def test_relative_unit_places_minus_and_plus_one_at_the_class_medians(tmp_path, capsys):
    tensors, _ = edit_tensors(["--edit", "thick=-1:1", "--edit_unit", "relative", "--edit_img_number", 2], tmp_path,
                              capsys)
    for space in ("z", "h"):
        record = load_boundary(REPO / "boundary" / f"digits_thick_t200_{space}.npz")
        stats = record.class_summary["train"]
        shift = record.intercept / np.linalg.norm(record.coef.astype(np.float64))  # hyperplane -> v.n
        medians = [stats["neg"]["p50"] - shift, stats["pos"]["p50"] - shift]
        assert tensors[f"targets_{space}"][:, 0].tolist() == pytest.approx(medians, abs=1e-9)
        assert projections(tensors, space, "thick") == pytest.approx(medians, abs=1e-3)
        centre, half = relative_scale(record)
        assert centre - half == pytest.approx(medians[0]) and centre + half == pytest.approx(medians[1])


@pytest.mark.parametrize("argv, words", [
    (["--edit", "thick=-5:0", "--edit_attr", "thick"], ["--edit names each attribute", "--edit_attr"]),
    (["--edit", "thick"], ["ATTR=START:END"]),
    (["--edit", "thick=a:b"], ["START:END, auto or one finite number"]),
    (["--edit", "thick=1:2:3"], ["START:END"]),
    (["--edit", "thick=-5:0", "--grid"], ["a grid sweeps exactly two attributes, got 1"]),
    (["--edit", "thick=-5:0", "--edit", "thick=1"], ["thick is moved twice"]),
    (["--edit", "thick=-5:0", "--condition_attr", "thick"], ["thick cannot be moved and held at once"]),
    (["--edit", "thick=-5:0", "--edit", "nosuch=1"], ["no boundary for 'nosuch'", "attributes: digit_0", "thick"]),
    (["--edi", "thick=-5:0"], ["unrecognized arguments: --edi"]),
    (["--edit_at", "thick"], ["unrecognized arguments: --edit_at"]),
])
def test_bad_requests_end_in_one_line_before_any_work(argv, words, tmp_path, capsys):
    code, err = run([*FAST, *argv, "--exp", tmp_path / "x"], capsys)
    assert_one_error_line(code, err, *words)
    assert "inverting" not in err and not (tmp_path / "x").exists()


def _description(targets: np.ndarray, attributes: tuple[str, ...]) -> EditDescription:
    edits = {s: SpaceEdit(s, attributes, (), (), torch.zeros(len(attributes), 1), targets) for s in ("z", "h")}
    return EditDescription(200, edits, Denoising(10))


def test_edit_file_names_sort_in_edit_order_for_any_k():
    one = _description(np.linspace(-1, 1, 101)[:, None], ("thick",))
    names = edit_file_names(one)
    assert names[0] == "edit_000_d-1.00.png" and names[100] == "edit_100_d+1.00.png"
    assert sorted(names) == names
    few = _description(np.array([[-3.0], [3.0]]), ("thick",))
    assert edit_file_names(few) == ["edit_00_d-3.00.png", "edit_01_d+3.00.png"]
    odd = _description(np.array([[1.0, 2.0]]), ("a b/c", "slant"))
    assert edit_file_names(odd, "iter1_")[0] == "iter1_edit_00_a_b_c+1.00_slant+2.00.png"
