"""Pictures that explain a run: labelled edit grids, back-and-forth GIFs, the radius plot of the
mixing-step analysis and the boundary report.

Grids and GIFs are drawn with Pillow. The two plots use matplotlib where it is installed (an
optional extra) and otherwise a small Pillow renderer of the same content (lines, step
histograms, vertical markers, titles, legends), so the pictures never depend on it. Every file is
written atomically through ``utils.io.files.atomic_path``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from utils.core.spaces import SPACES
from utils.io.images import to_uint8
from utils.io.files import atomic_path, write_bytes

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd")


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or built without FreeType
        return ImageFont.load_default()


#: The smallest side of an image in a grid or a GIF: 16-px digits and 32-px faces are enlarged by an
#: integer factor (nearest neighbour) to at least this, in the picture only (the images' own files
#: keep their size), so that a grid can be read.
MIN_TILE = 96


def _tiles(images: torch.Tensor, min_tile: int) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] as RGB PIL images, enlarged by an integer factor (nearest
    neighbour) to at least ``min_tile`` pixels."""
    factor = max(1, -(-min_tile // images.shape[-1]))
    out = []
    for x in images:
        tile = Image.fromarray(to_uint8(x)).convert("RGB")
        out.append(tile.resize((tile.width * factor, tile.height * factor), Image.Resampling.NEAREST))
    return out


def labelled_grid(images: torch.Tensor, path: str | Path, column_labels: Sequence[str] = (),
                  row_labels: Sequence[str] = (), ncol: int | None = None, pad: int = 4,
                  min_tile: int = MIN_TILE) -> None:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid, row-major, ``ncol`` per row, with a
    label above each column (e.g. "original", "reconstruction", "d=+1.50") and, if given, one at
    the left of each row (e.g. the image's name)."""
    tiles = _tiles(images, min_tile)
    ncol = ncol or len(tiles)
    nrow = -(-len(tiles) // ncol)
    font = _font(12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tw, th = tiles[0].size
    label_h = (font.getbbox("Ag")[3] + 6) if column_labels else 0
    # A column as wide as its longest label, so that labels never overlap.
    col_w = max([tw] + [int(draw.textlength(str(t), font=font)) + 4 for t in column_labels])
    left = max([0] + [int(draw.textlength(str(t), font=font)) + 8 for t in row_labels])
    canvas = Image.new("RGB", (left + ncol * (col_w + pad) + pad, label_h + nrow * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(column_labels[:ncol]):
        x = left + pad + c * (col_w + pad) + col_w // 2
        draw.text((x, 3), str(text), fill="black", font=font, anchor="ma")
    for r, text in enumerate(row_labels[:nrow]):
        draw.text((4, label_h + pad + r * (th + pad) + th // 2), str(text), fill="black", font=font, anchor="lm")
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        canvas.paste(tile, (left + pad + c * (col_w + pad) + (col_w - tw) // 2, label_h + pad + r * (th + pad)))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def back_and_forth_gif(images: torch.Tensor, path: str | Path, frame_ms: int = 150,
                       min_tile: int = MIN_TILE) -> None:
    """Write (K, C, H, W) images in [-1, 1] as an endlessly looping GIF that plays the sequence
    forward and then backward (1, 2, ..., K, K-1, ..., 2), without repeating the end frames."""
    frames = _tiles(images, min_tile)
    frames = frames + frames[-2:0:-1]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------- plots

@dataclass
class Panel:
    """One plot panel, independent of the renderer: lines (x, y, label), step histograms (counts
    over bin edges, label), vertical markers (x, label) and a horizontal dashed level (y, label)."""
    title: str
    xlabel: str = ""
    ylabel: str = ""
    lines: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    histograms: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    vlines: list[tuple[float, str]] = field(default_factory=list)


def _backend(backend: str) -> str:
    if backend not in ("auto", "matplotlib", "pillow"):
        raise ValueError(f"unknown plot backend '{backend}' (choices: auto, matplotlib, pillow)")
    if backend == "pillow":
        return backend
    try:
        import matplotlib  # noqa: F401  (optional extra)
    except ImportError:
        if backend == "matplotlib":
            raise
        return "pillow"
    return "matplotlib"


def draw_panels(panels: Sequence[Panel], path: str | Path, ncol: int, title: str = "", backend: str = "auto") -> str:
    """Write ``panels`` as one PNG, ``ncol`` per row; returns the renderer used (matplotlib where
    installed, else pillow)."""
    used = _backend(backend)
    png = _matplotlib_png(panels, ncol, title) if used == "matplotlib" else _pillow_png(panels, ncol, title)
    write_bytes(path, png)
    return used


def _matplotlib_png(panels: Sequence[Panel], ncol: int, title: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    nrow = -(-len(panels) // ncol)
    fig = Figure(figsize=(5 * ncol, 3.6 * nrow), dpi=100, layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).reshape(-1)
    for ax, panel in zip(axes, panels):
        for i, (x, y, label) in enumerate(panel.lines):
            ax.plot(x, y, label=label, color=PALETTE[i % len(PALETTE)], marker="." if len(x) < 40 else None)
        for i, (counts, edges, label) in enumerate(panel.histograms):
            ax.stairs(counts, edges, label=label, color=PALETTE[i % len(PALETTE)], linewidth=1.5)
        for x, label in panel.vlines:
            ax.axvline(x, color="black", linestyle="--", linewidth=1, label=label)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _pillow_png(panels: Sequence[Panel], ncol: int, title: str, size: tuple[int, int] = (480, 340)) -> bytes:
    nrow = -(-len(panels) // ncol)
    top = 28 if title else 0
    canvas = Image.new("RGB", (ncol * size[0], top + nrow * size[1]), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((canvas.width // 2, 6), title, fill="black", font=_font(14), anchor="ma")
    for i, panel in enumerate(panels):
        r, c = divmod(i, ncol)
        _pillow_panel(draw, panel, (c * size[0], top + r * size[1], (c + 1) * size[0], top + (r + 1) * size[1]))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _pillow_panel(draw: ImageDraw.ImageDraw, panel: Panel, box: tuple[int, int, int, int]) -> None:
    font, small = _font(12), _font(10)
    x0, y0, x1, y1 = box[0] + 62, box[1] + 26, box[2] - 14, box[3] - 40  # the plotting area
    xs = [np.asarray(x, float) for x, _, _ in panel.lines] + [np.asarray(e, float) for _, e, _ in panel.histograms]
    xs += [np.asarray([x], float) for x, _ in panel.vlines]
    ys = [np.asarray(y, float) for _, y, _ in panel.lines] + [np.asarray(cnt, float) for cnt, _, _ in panel.histograms]
    ys += [np.zeros(1)] if panel.histograms else []
    x_lo, x_hi = _span(np.concatenate(xs))
    y_lo, y_hi = _span(np.concatenate(ys))

    def to_px(x, y):
        return (x0 + (np.asarray(x, float) - x_lo) / (x_hi - x_lo) * (x1 - x0),
                y1 - (np.asarray(y, float) - y_lo) / (y_hi - y_lo) * (y1 - y0))

    draw.text(((box[0] + box[2]) // 2, box[1] + 6), panel.title, fill="black", font=font, anchor="ma")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for value in np.linspace(x_lo, x_hi, 5):
        px = float(to_px(value, y_lo)[0])
        draw.line((px, y1, px, y1 + 4), fill="black")
        draw.text((px, y1 + 6), f"{value:.3g}", fill="black", font=small, anchor="ma")
    for value in np.linspace(y_lo, y_hi, 5):
        py = float(to_px(x_lo, value)[1])
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.text((x0 - 6, py), f"{value:.3g}", fill="black", font=small, anchor="rm")
    draw.text(((x0 + x1) // 2, y1 + 22), panel.xlabel, fill="black", font=small, anchor="ma")
    draw.text((box[0] + 4, y0 - 14), panel.ylabel, fill="black", font=small)
    legend = []
    for i, (x, y, label) in enumerate(panel.lines):
        px, py = to_px(x, y)
        color = PALETTE[i % len(PALETTE)]
        draw.line(list(zip(px.tolist(), py.tolist())), fill=color, width=2)
        legend.append((label, color))
    for i, (counts, edges, label) in enumerate(panel.histograms):
        color = PALETTE[i % len(PALETTE)]
        px, py = to_px(np.repeat(np.asarray(edges, float), 2)[1:-1], np.repeat(np.asarray(counts, float), 2))
        points = list(zip(px.tolist(), py.tolist()))  # a step outline: each bin's top edge
        base = float(to_px(0, 0)[1])
        draw.line([(points[0][0], base), *points, (points[-1][0], base)], fill=color, width=2)
        legend.append((label, color))
    for x, label in panel.vlines:
        px = float(to_px(x, 0)[0])
        for start in np.arange(y0, y1, 8):  # dashed
            draw.line((px, start, px, min(start + 4, y1)), fill="black")
        legend.append((label, "black"))
    for j, (label, color) in enumerate(legend):
        ly = y0 + 6 + 14 * j
        draw.line((x1 - 150, ly + 5, x1 - 132, ly + 5), fill=color, width=3)
        draw.text((x1 - 128, ly), label, fill="black", font=small)


def _span(values: np.ndarray) -> tuple[float, float]:
    """Axis limits around finite ``values`` with a 5 % margin (a unit span for constant data)."""
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    margin = (hi - lo) * 0.05 or 0.5
    return lo - margin, hi + margin


def radius_plot(result: dict, epsilon: float, path: str | Path, backend: str = "auto") -> str:
    """The mixing-step analysis as a picture: mean radius ||x_t|| over t of sampled, inverted and
    analytic latents, and their relative difference against epsilon, with t_m marked."""
    t = np.asarray(result["t"], float)
    marks = [] if result.get("t_m") is None else [(float(result["t_m"]), f"t_m = {result['t_m']}")]
    radius = Panel("mean radius ||x_t||", "timestep t", "radius", vlines=marks,
                   lines=[(t, np.asarray(result["radius_sampled"]), "sampled (T-1 -> t)"),
                          (t, np.asarray(result["radius_inverted"]), "inverted (0 -> t)"),
                          (t, np.asarray(result["radius_analytic"]), "analytic")])
    difference = Panel("relative difference sampled vs inverted", "timestep t", "relative difference", vlines=marks,
                       lines=[(t, np.asarray(result["relative_difference"]), "|sampled - inverted| / inverted"),
                              (t, np.full(len(t), epsilon), f"epsilon = {epsilon:g}")])
    return draw_panels([radius, difference], path, ncol=2, title="mixing step", backend=backend)


def boundary_report(spaces: dict[str, dict], path: str | Path, title: str = "", backend: str = "auto",
                    bins: int = 20) -> str:
    """Per space, histograms of the signed distances to the hyperplane of train and test latents
    by class, with the hyperplane (distance 0) and the accuracies.

    spaces: {space: {"train": (distances (N,), labels (N,) in {0, 1}), "test": (...),
    "train_acc": float, "test_acc": float}}.
    """
    panels = []
    for space, data in spaces.items():
        for split in ("train", "test"):
            distances, labels = (np.asarray(a) for a in data[split])
            acc = data[f"{split}_acc"]
            panel = Panel(f"{space} space, {split}: accuracy {acc:.3f} (n = {len(distances)})",
                          "signed distance to the hyperplane", "latents", vlines=[(0.0, "hyperplane")])
            if len(distances):
                edges = np.histogram_bin_edges(distances, bins=bins)
                for cls, name in ((1, "positive"), (0, "negative")):
                    counts, _ = np.histogram(distances[labels == cls], bins=edges)
                    panel.histograms.append((counts, edges, f"{name} ({int((labels == cls).sum())})"))
            panels.append(panel)
    return draw_panels(panels, path, ncol=2, title=title, backend=backend)


def _cos_colour(value: float | None) -> tuple[int, int, int]:
    """A diverging colour: -1 blue, 0 white, +1 red; grey for a missing value."""
    if value is None or not np.isfinite(value):
        return (200, 200, 200)
    v = float(np.clip(value, -1.0, 1.0))
    fade = int(round(255 * (1 - abs(v))))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def _vertical_text(text: str, font: ImageFont.ImageFont) -> Image.Image:
    """``text`` drawn bottom-to-top (for column labels), black on white."""
    width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)) + 4
    height = font.getbbox("Ag")[3] + 4
    label = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(label).text((2, 1), text, fill="black", font=font)
    return label.rotate(90, expand=True)


#: Bounds of the atlas picture, whatever the number of attributes and the length of their names: the
#: heatmaps' side (cells shrink to fit, down to one pixel), the characters of a name drawn, and the
#: rows of the table (atlas.json holds every attribute).
ATLAS_MAP_SIDE = 1200
ATLAS_NAME_CHARS = 32
ATLAS_TABLE_ROWS = 60


def _cut(text: str, chars: int = ATLAS_NAME_CHARS) -> str:
    return text if len(text) <= chars else text[:chars - 3] + "..."


def _atlas_table(atlas: dict, names: list[str]) -> list[list[str]]:
    """The picture's table: a header, a row per attribute (at most ``ATLAS_TABLE_ROWS``), the skipped ones."""
    rows = [["attribute", "z train", "z test", "h train", "h test", "pos", "neg",
             f"hold (|cos| >= {atlas['hold_threshold']:g})"]]
    for name in names[:ATLAS_TABLE_ROWS]:
        a = atlas["per_attribute"][name]
        accs = [a[f"{split}_acc"][space] for space in SPACES for split in ("train", "test")]
        holds = ", ".join(_cut(h) for h in a["holds"][:4]) + (", ..." if len(a["holds"]) > 4 else "")
        rows.append([_cut(name), *("-" if v is None or not np.isfinite(v) else f"{v:.3f}" for v in accs),
                     str(a["n_pos"]), str(a["n_neg"]), holds or "-"])
    skipped = list(atlas.get("skipped", {}).items())
    for name, counts in skipped[:max(0, ATLAS_TABLE_ROWS - len(names))]:
        rows.append([f"{_cut(name)} (skipped)", "", "", "", "", f"{counts['train']['pos']} train",
                     f"{counts['train']['neg']} train", "too few of a class"])
    hidden = max(0, len(names) - ATLAS_TABLE_ROWS) + max(0, len(skipped) - max(0, ATLAS_TABLE_ROWS - len(names)))
    if hidden:
        rows.append([f"... and {hidden} more (atlas.json holds them all)", "", "", "", "", "", "", ""])
    return rows


def _atlas_map(canvas, draw, matrix, names, where, font, small, measure, line_h) -> None:
    """One space's heatmap at ``where`` = (x0, top, label width, cell), labelled with ``names`` (None: no labels)."""
    x0, top, label_w, cell = where
    n = len(matrix)
    for j, name in enumerate(names or ()):
        label = _vertical_text(_cut(name), font)
        canvas.paste(label, (x0 + label_w + j * cell + (cell - label.width) // 2, top - label.height - 2))
    for i in range(n):
        y = top + i * cell
        if names:
            text = _cut(names[i])
            draw.text((x0 + label_w - 4 - int(measure.textlength(text, font=font)), y + (cell - line_h) // 2 + 2),
                      text, fill="black", font=font)
    colours = np.array([[_cos_colour(v) for v in row] for row in matrix], dtype=np.uint8).reshape(n, n, 3)
    cells = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    if cell >= 4:  # a light grid between cells
        cells[cell - 1::cell, :] = cells[:, cell - 1::cell] = 235
    canvas.paste(Image.fromarray(cells), (x0 + label_w, top))
    for i in range(n if n <= 24 else 0):  # values written in small maps
        for j in range(n):
            value = matrix[i][j]
            if value is None:
                continue
            text = f"{value:.2f}".replace("0.", ".")
            tw = measure.textlength(text, font=small)
            draw.text((x0 + label_w + j * cell + (cell - tw) / 2, top + i * cell + cell / 2 - 6), text, font=small,
                      fill="white" if abs(value) > 0.6 else "black")


def atlas_picture(atlas: dict, path: str | Path, cell: int = 30) -> None:
    """The atlas (utils/io/atlas.py) as one PNG: per space a heatmap of the A x A cosines of the unit
    normals (red +1, white 0, blue -1, each cell's value written while A <= 24), the attributes
    named along both sides while a cell is at least 10 px; then a table of each attribute's train /
    test accuracy in z and h, its positive / negative counts and the attributes it suggests holding;
    and the skipped attributes with their counts. Drawn with Pillow. Its size is bounded whatever the
    atlas (``ATLAS_MAP_SIDE``, ``ATLAS_NAME_CHARS``, ``ATLAS_TABLE_ROWS``): 1,000 attributes with long
    names draw a picture of a few megapixels."""
    names = list(atlas["attributes"])
    n = len(names)
    cell = max(1, min(cell, ATLAS_MAP_SIDE // max(1, n)))
    labelled = cell >= 10
    font, small = _font(12), _font(max(8, min(11, cell // 3)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(_cut(name), font=font)) for name in names) + 8 if labelled else 0
    line_h = font.getbbox("Ag")[3] + 6
    spaces = [space for space in SPACES if space in atlas["cosines"]]
    map_w = label_w + n * cell
    top = line_h * 2 + label_w  # title, space name, rotated column labels
    rows = _atlas_table(atlas, names)
    col_w = [max(int(measure.textlength(r[c], font=font)) for r in rows) + 14 for c in range(len(rows[0]))]
    width = max(len(spaces) * (map_w + 20) + 20, sum(col_w) + 40)
    height = top + n * cell + 20 + line_h * (len(rows) + 1) + 10
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title = f"attribute atlas: {_cut(str(atlas.get('config_name', '')))} at t_0 {atlas.get('t_0', '')}, cosines of the unit normals (red +1, white 0, blue -1)"
    draw.text((10, 4), title, fill="black", font=font)
    for k, space in enumerate(spaces):
        x0 = 10 + k * (map_w + 20)
        draw.text((x0 + label_w, line_h + 2), f"{space} space", fill="black", font=font)
        _atlas_map(canvas, draw, atlas["cosines"][space], names if labelled else None, (x0, top, label_w, cell),
                   font, small, measure, line_h)
    y = top + n * cell + 20
    for r, row in enumerate(rows):
        x = 10
        for c, text in enumerate(row):
            draw.text((x, y), text, fill="black" if r else (60, 60, 60), font=font)
            x += col_w[c]
        y += line_h
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
