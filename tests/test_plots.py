"""The pictures: labelled grids, back-and-forth GIFs, the radius plot and the boundary report, drawn
by matplotlib where installed and by Pillow otherwise (the fallback is tested by hiding matplotlib),
and written by the CLI modes."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main as cli
from tests.helpers import make_edit_setup, write_labelled_set
from utils.io.plots import back_and_forth_gif, boundary_report, labelled_grid, radius_plot

RADIUS = {"t": [0, 250, 500, 750, 999], "radius_sampled": [30.0, 28.0, 27.5, 27.7, 27.7],
          "radius_inverted": [25.0, 26.5, 27.4, 27.7, 27.7], "radius_analytic": [25.0, 26.0, 27.0, 27.6, 27.7],
          "relative_difference": [0.2, 0.057, 0.004, 0.0, 0.0], "t_m": 500}


def _report_data():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    return {space: {"train": (rng.normal(size=40) + 2 * labels - 1, labels),
                    "test": (rng.normal(size=10) + 2 * labels[:10] - 1, labels[:10]),
                    "train_acc": 0.95, "test_acc": 0.9} for space in ("h", "z")}


def _colours(path):
    with Image.open(path) as img:
        return {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}


def test_labelled_grid_has_labels_above_columns(tmp_path):
    images = torch.zeros(3, 1, 16, 16)  # grey tiles
    labelled_grid(images, tmp_path / "plain.png")
    labelled_grid(images, tmp_path / "g.png", column_labels=["original", "reconstruction", "d=+1.50"],
                  row_labels=["img0"])
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "g.png") as grid:
        assert grid.height > plain.height and grid.width > plain.width  # a label strip and a row label
        strip = np.asarray(grid.convert("L"))[:12]
        assert (strip < 128).sum() > 20, "dark label text above the tiles"
        # Tiles of 16 px are enlarged to 64 px (nearest neighbour), grey = 128.
        assert 3 * 64 * 64 <= (np.asarray(grid.convert("L")) == 128).sum() < 3 * 64 * 64 + 100  # + anti-aliased text


def test_gif_goes_back_and_forth(tmp_path):
    edits = torch.linspace(-1, 1, 4)[:, None, None, None].expand(4, 1, 16, 16)
    back_and_forth_gif(edits, tmp_path / "e.gif")
    with Image.open(tmp_path / "e.gif") as gif:
        assert gif.info.get("loop") == 0
        levels = []
        for i in range(gif.n_frames):
            gif.seek(i)
            levels.append(int(np.asarray(gif.convert("L"))[0, 0]))
    assert gif.n_frames == 6
    assert levels == [0, 85, 170, 255, 170, 85]


@pytest.mark.parametrize("hide_matplotlib", [False, True])
def test_plots_draw_with_either_renderer(tmp_path, monkeypatch, hide_matplotlib):
    if hide_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
        expected = "pillow"
    else:
        pytest.importorskip("matplotlib")
        expected = "matplotlib"
    assert radius_plot(RADIUS, 0.01, tmp_path / "radius.png") == expected
    assert boundary_report(_report_data(), tmp_path / "report.png", title="t") == expected
    for name in ("radius.png", "report.png"):
        colours = _colours(tmp_path / name)
        # Curves and histograms in the palette's first colours (blue, red) besides black on white.
        assert {(31, 119, 180), (214, 39, 40)} <= colours or len(colours) > 50, name


def test_pillow_renderer_draws_each_series(tmp_path):
    assert radius_plot(RADIUS, 0.01, tmp_path / "r.png", backend="pillow") == "pillow"
    colours = _colours(tmp_path / "r.png")
    assert {(31, 119, 180), (214, 39, 40), (44, 160, 44), (0, 0, 0), (255, 255, 255)} <= colours
    assert boundary_report(_report_data(), tmp_path / "b.png", backend="pillow") == "pillow"
    with Image.open(tmp_path / "b.png") as img:
        assert img.size == (960, 2 * 340)  # 2 x 2 panels, no title
    with pytest.raises(ValueError, match="backend"):
        radius_plot(RADIUS, 0.01, tmp_path / "x.png", backend="svg")


def test_cli_writes_the_pictures(tmp_path, capsys):
    setup = make_edit_setup(tmp_path / "s", attributes=("bright",), n_images=2)
    b = setup["boundaries"]["bright"]
    assert cli.main([*setup["common"], "--edit_image_boundary", "--img_path", str(setup["images"] / "img0.png"),
                     "--exp", str(tmp_path / "e"), "--boundary_z", str(b["z"]), "--boundary_h", str(b["h"]), "--gif"]) == 0
    with Image.open(tmp_path / "e" / "edit" / "edits.gif") as gif:
        assert gif.n_frames == 4  # 3 distances forward, 1 back
    assert (tmp_path / "e" / "edit" / "grid.png").is_file()
    assert cli.main([*setup["common"], "--radius", "--data_dir", str(setup["images"]), "--n_test_img", "2",
                     "--radius_step", "400", "--exp", str(tmp_path / "r")]) == 0
    assert Image.open(tmp_path / "r" / "radius" / "radius.png").size[0] > 500
    img_dir, attr = write_labelled_set(tmp_path / "l", n=8)
    assert cli.main([*setup["common"][:5], "--boundary_search", "--data_dir", str(img_dir), "--attr_file", str(attr),
                     "--edit_attr", "bright_left", "--n_train_img", "6", "--n_test_img", "2", "--t_0", "300",
                     "--n_inv_step", "5", "--boundary_dir", str(tmp_path / "bd"), "--exp", str(tmp_path / "b")]) == 0
    assert Image.open(tmp_path / "b" / "boundary_search" / "report.png").size[0] > 500
