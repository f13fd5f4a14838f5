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


BLUE, RED, GREEN = (31, 119, 180), (214, 39, 40), (44, 160, 44)  # the palette's first three colours


def _pixels_of(rgb: np.ndarray, colour: tuple[int, int, int], within: int = 8) -> int:
    """How many pixels of ``rgb`` (H, W, 3) lie within ``within`` levels of ``colour`` in every
    channel (anti-aliasing blends only a line's edges into the background)."""
    return int((np.abs(rgb.astype(int) - np.asarray(colour)).max(axis=-1) <= within).sum())


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401  (optional extra)
    except ImportError:
        return False
    return True


def _panel_size(renderer: str, n_panels: int, title: bool) -> tuple[int, int]:
    """The size of a picture of ``n_panels`` panels two per row: matplotlib draws 5 x 3.6 inches
    per panel at 100 dpi; the Pillow renderer 480 x 340 px per panel under a 28-px title strip."""
    nrow = -(-n_panels // 2)
    return (1000, 360 * nrow) if renderer == "matplotlib" else (960, (28 if title else 0) + 340 * nrow)


def _panels(path, renderer: str, n_panels: int, title: bool) -> list[np.ndarray]:
    """The picture at ``path``, checked to be of its size, cut into its panels' cells (RGB arrays)."""
    with Image.open(path) as img:
        assert img.size == _panel_size(renderer, n_panels, title), (path, img.size)
        rgb = np.asarray(img.convert("RGB"))
    top = 28 if title and renderer == "pillow" else 0
    nrow = -(-n_panels // 2)
    cell_h, cell_w = (rgb.shape[0] - top) // nrow, rgb.shape[1] // 2
    return [rgb[top + r * cell_h: top + (r + 1) * cell_h, c * cell_w: (c + 1) * cell_w]
            for r, c in (divmod(i, 2) for i in range(n_panels))]


def _assert_drawn(path, renderer: str, n_panels: int, title: bool, colours_per_panel) -> None:
    """The picture has the size of its panels, and each panel holds black (axes, text) on a white
    background, its curves or histograms in each of its colours (over 20 pixels of each), and
    nothing in a colour it does not use."""
    for i, (cell, colours) in enumerate(zip(_panels(path, renderer, n_panels, title), colours_per_panel)):
        assert (cell[:4, :4] == 255).all(), f"{path} panel {i}: the background is not white"
        assert _pixels_of(cell, (0, 0, 0), within=40) > 200, f"{path} panel {i}: no axes or text"
        for colour in (BLUE, RED, GREEN):
            drawn = _pixels_of(cell, colour)
            if colour in colours:
                assert drawn > 20, f"{path} panel {i}: {colour} drawn in {drawn} pixels only"
            else:
                assert drawn == 0, f"{path} panel {i}: {colour} drawn in {drawn} pixels, not expected"


def test_labelled_grid_has_labels_above_columns(tmp_path):
    images = torch.zeros(3, 1, 16, 16)  # grey tiles
    labelled_grid(images, tmp_path / "plain.png")
    labelled_grid(images, tmp_path / "g.png", column_labels=["original", "reconstruction", "d=+1.50"],
                  row_labels=["img0"])
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "g.png") as grid:
        assert plain.size == (3 * (96 + 4) + 4, 96 + 2 * 4)  # three 96-px tiles, 4 px apart and around
        assert grid.height > plain.height and grid.width > plain.width  # a label strip and a row label
        strip = np.asarray(grid.convert("L"))[:12]
        assert (strip < 128).sum() > 20, "dark label text above the tiles"
        # Tiles of 16 px are enlarged to 96 px (nearest neighbour, MIN_TILE), grey = 128.
        assert 3 * 96 * 96 <= (np.asarray(grid.convert("L")) == 128).sum() < 3 * 96 * 96 + 100  # + anti-aliased text


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
    # The radius plot: three radius curves (blue, red, green) beside the relative difference and
    # epsilon (blue, red). The report: per space and split, the positive and negative histograms.
    _assert_drawn(tmp_path / "radius.png", expected, 2, True, [(BLUE, RED, GREEN), (BLUE, RED)])
    _assert_drawn(tmp_path / "report.png", expected, 4, True, [(BLUE, RED)] * 4)


def test_pillow_renderer_draws_each_series(tmp_path):
    assert radius_plot(RADIUS, 0.01, tmp_path / "r.png", backend="pillow") == "pillow"
    colours = _colours(tmp_path / "r.png")
    assert {BLUE, RED, GREEN, (0, 0, 0), (255, 255, 255)} <= colours
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
    renderer = "matplotlib" if _has_matplotlib() else "pillow"
    _assert_drawn(tmp_path / "r" / "radius" / "radius.png", renderer, 2, True, [(BLUE, RED, GREEN), (BLUE, RED)])
    img_dir, attr = write_labelled_set(tmp_path / "l", n=8)
    assert cli.main([*setup["common"][:5], "--boundary_search", "--data_dir", str(img_dir), "--attr_file", str(attr),
                     "--edit_attr", "bright_left", "--n_train_img", "6", "--n_test_img", "2", "--t_0", "300",
                     "--n_inv_step", "5", "--boundary_dir", str(tmp_path / "bd"), "--exp", str(tmp_path / "b")]) == 0
    # one panel per space (h, z) and split (train, test)
    _assert_drawn(tmp_path / "b" / "boundary_search" / "report.png", renderer, 4, True, [(BLUE, RED)] * 4)
