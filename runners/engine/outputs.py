"""What an edit run writes: each edit as its batch is denoised, each sequence's grid and GIF as soon as
it is complete, tensors, summaries, and a folder run's contact sheet. Memory stays bounded: a
sequence keeps its 8-bit pixels only until its grid is written, and the contact sheet keeps rows
of at most ``THUMBNAIL`` pixels a side, whatever the number of images."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from runners.engine.describe import EditDescription
from utils.core.diffusion import Inversion
from utils.core.editing import EditBatch
from utils.core.spaces import SPACES
from utils.io.files import atomic_path, write_json
from utils.io.images import dequantize, quantize, save_image
from utils.io.plots import back_and_forth_gif, labelled_grid

#: Names a folder run writes beside the images' folders; no image folder may take them.
RUN_OUTPUTS = ("summary.json", "contact_sheet.png")
THUMBNAIL = 64  # largest side of a contact-sheet tile (the grid of each image keeps full size)
_MAX_NAME = 100
#: The longest file name an edit gets (in UTF-8 bytes; file systems allow 255): beyond it the
#: targets are left out of the names (``edit_03.png``), and summary.json's ``targets`` hold them.
MAX_FILE_NAME = 160


def folder_names(paths: Sequence[Path]) -> list[str]:
    """A folder name for each image of a folder run, derived from its file name but the tool's own:
    no path separators, control or format characters, no leading dot (so never ``.`` or ``..``
    nor hidden), at most 100 characters, no name of the run's own outputs, and unique ignoring
    case (a clash takes ``-2``, ``-3``, ...). Deterministic: the same paths give the same names."""
    taken = {name.lower() for name in RUN_OUTPUTS}
    names = []
    for path in paths:
        stem = "".join("_" if unicodedata.category(c)[0] in "CZ" and c != " " else c for c in path.stem)
        stem = re.sub(r"[/\\:]", "_", stem).strip(" .")[:_MAX_NAME] or "image"
        name, n = stem, 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.lower())
        names.append(name)
    return names


def outline(row: Tensor, mask) -> Tensor:
    """8-bit images (N, C, H, W) with the border of a region drawn on them: the pixels of the region
    (mask > 0.5) that touch a pixel outside it, in yellow (white for one channel)."""
    inside = torch.as_tensor(mask) > 0.5
    padded = F.pad(inside[None, None].float(), (1, 1, 1, 1), value=1.0)[0, 0] > 0.5
    neighbours_out = ~padded[:-2, 1:-1] | ~padded[2:, 1:-1] | ~padded[1:-1, :-2] | ~padded[1:-1, 2:]
    border = inside & neighbours_out
    colour = torch.tensor([255, 255, 0][: row.shape[1]] if row.shape[1] == 3 else [255] * row.shape[1],
                          dtype=row.dtype)
    drawn = row.clone()
    drawn[:, :, border] = colour[:, None]
    return drawn


def thumbnail(row: Tensor, size: int = THUMBNAIL) -> Tensor:
    """8-bit images (N, C, H, W) scaled down (area average) to at most ``size`` pixels a side."""
    if max(row.shape[-2:]) <= size:
        return row
    scale = size / max(row.shape[-2:])
    small = F.interpolate(dequantize(row), scale_factor=scale, mode="area")
    return quantize(small)


def _name_part(attribute: str) -> str:
    """An attribute name as it may stand in a file name (letters, digits, ``-`` and ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", attribute)[:40] or "attribute"


def _attribute_text(attribute: str | None, per_space: dict[str, float], for_file: bool) -> str:
    """One attribute's targets (``attribute`` None: the only attribute, shown as ``d``): one value
    when every space has the same (``d-3.00``, ``thick-5.00``; labels ``d=-3.00``, ``thick -5.00``),
    else each space's (``z-6.35_h-11.94``, ``thick_z-6.35_h-11.94``; labels with spaces)."""
    sep = "_" if for_file else " "
    name = None if attribute is None else (_name_part(attribute) if for_file else attribute)
    values = set(per_space.values())
    if len(values) == 1:
        value = f"{values.pop():+.2f}"
        if name is None:
            return ("d" if for_file else "d=") + value
        return name + ("" if for_file else " ") + value
    spaces = sep.join(f"{s}{v:+.2f}" for s, v in per_space.items())
    return spaces if name is None else f"{name}{sep}{spaces}"


def _targets_text(description: EditDescription, k: int, for_file: bool) -> str:
    """Edit k's targets, every attribute in every space (``_attribute_text``), in a file name or a label."""
    single = len(description.attributes) == 1
    return ("_" if for_file else " ").join(_attribute_text(None if single else a, per_space, for_file)
                                           for a, per_space in description.targets(k).items())


def edit_file_names(description: EditDescription, prefix: str = "") -> list[str]:
    """The file names of the K edits (the writer's and the web app's): ``edit_03_d-3.00.png`` and the
    like (``_targets_text``); the index zero-padded to the width of K - 1 (at least 2), so names
    sort in edit order. When the targets of many attributes would make a name longer than
    ``MAX_FILE_NAME`` bytes, every edit is named by its index alone (``edit_03.png``)."""
    width = max(2, len(str(len(description) - 1)))
    texts = [_targets_text(description, k, for_file=True) for k in range(len(description))]
    if len(prefix.encode()) + width + len("edit__.png") + max(len(t.encode()) for t in texts) > MAX_FILE_NAME:
        return [f"{prefix}edit_{k:0{width}d}.png" for k in range(len(texts))]
    return [f"{prefix}edit_{k:0{width}d}_{text}.png" for k, text in enumerate(texts)]


def edit_label(description: EditDescription, k: int) -> str:
    """The grid label of edit k: ``d=-3.00`` for one attribute, ``thick -5.00 slant +2.00`` for several."""
    return _targets_text(description, k, for_file=False)


class SequenceWriter:
    """Writes the edit sequences of B images (or sampled latents), one folder each, as
    ``Editor.edits`` yields them; each sequence's labelled ``grid.png`` unless ``grid`` is False
    (the web app's one-edit strips).

    folders: B output folders; first_images: B dicts of named images (N, C, H, W) shown before the
    edits in each grid (e.g. original, reconstruction); description: the K edits. A 2-D sweep
    (``description.grid``) writes its grid as K_a rows by K_b columns, both axes labelled.
    """

    def __init__(self, folders: Sequence[Path], first_images: Sequence[dict[str, Tensor]],
                 description: EditDescription, n_iter: int = 1, gif: bool = False, save_tensors: bool = False,
                 grid: bool = True, outlines: Sequence | None = None):
        """outlines: per folder the region mask (H, W) in [0, 1] its grid outlines, or None."""
        self.folders, self.first_images, self.description = list(folders), list(first_images), description
        self.n_iter, self.gif, self.save_tensors, self.grid = n_iter, gif, save_tensors, grid
        self.outlines = list(outlines) if outlines is not None else [None] * len(self.folders)
        self.n_edits = len(description)
        self._names: dict[str, list[str]] = {}  # per file-name prefix (an iteration's)
        self.column_labels = [*self.first_images[0], *(edit_label(description, k) for k in range(self.n_edits))]
        self._shown: list[list[Tensor]] = [[] for _ in self.folders]  # 8-bit edits of the open sequence
        self._kept = [self._empty() for _ in self.folders]  # floats, --save_tensors only
        #: each image's first sequence as a contact-sheet row (``thumbnail``), filled as sequences end
        self.rows: list[Tensor | None] = [None] * len(self.folders)
        for folder, named in zip(self.folders, self.first_images):
            for name, image in named.items():
                save_image(image, folder / f"{name}.png")

    @staticmethod
    def _empty() -> dict[str, list]:
        return {"edits": [], **{space: [] for space in SPACES}}

    def add(self, batch: EditBatch, iteration: int) -> None:
        """Write the edits of one denoised batch; a sequence's grid (and GIF) once its last edit is in."""
        prefix = "" if self.n_iter == 1 else f"iter{iteration}_"
        k_last = self.n_edits - 1
        for j, (b, k) in enumerate(batch.items):
            image = batch.images[j]
            if prefix not in self._names:
                self._names[prefix] = edit_file_names(self.description, prefix)
            save_image(image, self.folders[b] / self._names[prefix][k])
            self._shown[b].append(quantize(image))
            if self.save_tensors:
                self._kept[b]["edits"].append(image.clamp(-1, 1))
                self._kept[b]["z"].append(batch.z[j])
                self._kept[b]["h"].append(None if batch.h is None else batch.h[j])
            if k == k_last:
                self._close_sequence(b, prefix, iteration)

    def _close_sequence(self, b: int, prefix: str, iteration: int) -> None:
        firsts = [quantize(v) for v in self.first_images[b].values()]
        row = torch.stack([*firsts, *self._shown[b]])
        self._shown[b] = []
        if self.outlines[b] is not None:  # the grid outlines the region (the edits' own files do not)
            row = outline(row, self.outlines[b])
        if self.grid and self.description.grid is None:
            labelled_grid(dequantize(row), self.folders[b] / f"{prefix}grid.png", self.column_labels)
        elif self.grid:
            self._write_sweep(row[len(firsts):], self.folders[b] / f"{prefix}grid.png")
        if self.gif:
            back_and_forth_gif(dequantize(row[len(firsts):]), self.folders[b] / f"{prefix}edits.gif")
        if iteration == 0:
            self.rows[b] = thumbnail(row)

    def _write_sweep(self, edits: Tensor, path: Path) -> None:
        """A 2-D sweep's grid: row i at the first attribute's i-th value, column j at the second's."""
        rows, cols = self.description.grid
        first, second = self.description.attributes
        targets = self.description.targets
        labelled_grid(dequantize(edits), path, ncol=cols,
                      column_labels=[_attribute_text(second, targets(j)[second], False) for j in range(cols)],
                      row_labels=[_attribute_text(first, targets(i * cols)[first], False) for i in range(rows)])

    def write_tensors(self, b: int, latents: Inversion) -> None:
        """tensors.pt of image b (with --save_tensors): its latents (1, ...), the edits clipped to
        [-1, 1] as written, the edited latents (one row per edit), the first attribute's
        distances (repeated per iteration), every space's targets ``targets_<space>`` (K * n_iter,
        M; columns in the order of summary.json's ``edit.attributes``), and the reconstruction
        when there is one."""
        kept = self._kept[b]
        description = self.description
        tensors = {"z": latents.z[b:b + 1], "h": latents.h[b:b + 1], "edits": torch.stack(kept["edits"]),
                   "distances": torch.tensor(description.distances(), dtype=torch.float64).repeat(self.n_iter),
                   "edited_z": torch.stack(kept["z"])}
        if kept["h"][0] is not None:
            tensors["edited_h"] = torch.stack(kept["h"])
        if "reconstruction" in self.first_images[b]:
            tensors["recon"] = self.first_images[b]["reconstruction"][None].clamp(-1, 1)
        for space, edit in description.spaces.items():
            tensors[f"targets_{space}"] = torch.from_numpy(edit.targets).repeat(self.n_iter, 1)
        with atomic_path(self.folders[b] / "tensors.pt") as tmp:
            torch.save(tensors, tmp)
        self._kept[b] = self._empty()


def write_contact_sheet(rows: Sequence[Tensor], labels: Sequence[str], column_labels: Sequence[str],
                        path: Path) -> None:
    """One row per image: 8-bit thumbnails (N, C, H, W) each, labelled with the image's folder."""
    labelled_grid(dequantize(torch.cat(list(rows))), path, ncol=len(rows[0]), column_labels=column_labels,
                  row_labels=labels)


def write_summary(folder: Path, summary: dict) -> None:
    write_json(folder / "summary.json", summary)


def write_radius_table(result: dict, path: Path) -> str:
    """The mixing-step curves (``utils.core.mixing.radius_curves``) as a CSV file; returns its text."""
    rows = ["t,radius_sampled,radius_inverted,radius_analytic,relative_difference"]
    rows += [f"{t},{a:.4f},{b:.4f},{c:.4f},{d:.5f}" for t, a, b, c, d in zip(
        result["t"], result["radius_sampled"], result["radius_inverted"], result["radius_analytic"],
        result["relative_difference"])]
    text = "\n".join(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return text
