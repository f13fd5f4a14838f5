"""Render the synthetic faces data set: every image drawn by this project, every factor known.

    python -m scripts.make_faces DEST        (or: bash data_download.sh faces DEST)

writes, under ``DEST/faces/`` (docs/faces_data.md):

    images/train/NNNNN.png   40,000 training faces, RGB 32 x 32
    images/test/NNNNN.png    2,000 held-out faces
    factors.csv              name, split and every generative factor of every face
    list_attr_faces.txt      CelebA-format attributes (13 CelebA columns, 0 = in the margin)
    masks_train.npz, masks_test.npz   names (N,) and masks (N, 5, 32, 32) uint8: the coverage
                             of mouth, eyes, hair, face and background in each pixel
    correlations.json        the correlation matrix of the factors and of the attributes
    attribute_parts.json     the part each attribute is drawn on (``--boundary_search --region auto``)
    example.png              the README's test face: not smiling, facing the camera, no hat
    example.png.parts.npz    its part masks (``--region mouth`` reads them; shipped as imgs/face_example.png)

Face ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so any face can be rendered
again alone, and the same seed gives the same bytes in any order and on any machine.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from utils.faces.factors import (ATTRIBUTES, FACTOR_NAMES, FaceFactors, attribute_part_names, attribute_table,
                                 factor_matrix, sample_factors)
from utils.faces.render import PARTS, render_face
from utils.io.region import ATTRIBUTE_PARTS_FILE

N_TRAIN = 40_000
N_TEST = 2_000
SEED = 2023


def face_factors(seed: int, index: int) -> FaceFactors:
    """The factors of face ``index`` of the data set of ``seed``."""
    return sample_factors(np.random.default_rng([seed, index]))


def face_name(index: int) -> str:
    return f"{index:05d}.png"


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of an (H, W, 3) uint8 image, with no time stamp or other metadata (same pixels, same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def example_index(factors: np.ndarray, test_rows: np.ndarray) -> int:
    """The test face the README edits: not smiling (smile below the Smiling label's margin) and,
    as far as the test split allows, with the mouth shut, no hat, glasses or moustache, young,
    facing the camera and centred, and the other factors mid-range: the face of ``test_rows`` with
    the smallest penalty, so that any split has one."""
    col = {n: factors[:, i] for i, n in enumerate(FACTOR_NAMES)}
    candidates = test_rows[col["smile"][test_rows] < 0.0]
    if len(candidates) == 0:
        candidates = test_rows
    penalty = (10.0 * (col["hat"] + col["glasses"] + col["moustache"])
               + 4.0 * (np.maximum(col["mouth_open"] - 0.2, 0) + np.maximum(col["age"] - 0.35, 0))
               + 2.0 * (np.abs(col["yaw"]) + np.abs(col["pos_x"]) + np.abs(col["pos_y"]))
               + np.abs(col["smile"] + 0.15) + np.abs(col["eye_open"] - 0.6) + np.abs(col["skin_tone"] - 0.4)
               + np.abs(col["scale"]))
    return int(candidates[np.argmin(penalty[candidates])])


def correlations(factors: np.ndarray, attributes: np.ndarray) -> dict:
    """Pearson correlations of the factors (all faces) and of the attributes (over the faces that
    both attributes label), rounded to 3 decimals."""
    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        if a.std() == 0 or b.std() == 0:
            return 0.0
        return float(np.corrcoef(a, b)[0, 1])

    factor_corr = [[round(pearson(factors[:, i], factors[:, j]), 3) for j in range(len(FACTOR_NAMES))]
                   for i in range(len(FACTOR_NAMES))]
    attr_corr = []
    for i in range(len(ATTRIBUTES)):
        row = []
        for j in range(len(ATTRIBUTES)):
            both = (attributes[:, i] != 0) & (attributes[:, j] != 0)
            row.append(round(pearson(attributes[both, i].astype(float), attributes[both, j].astype(float)), 3))
        attr_corr.append(row)
    return {"factors": list(FACTOR_NAMES), "factor_correlation": factor_corr,
            "attributes": list(ATTRIBUTES), "attribute_correlation": attr_corr}


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_faces(dest: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = SEED) -> Path:
    """Write the data set under ``dest/faces`` and return that folder."""
    root = Path(dest) / "faces"
    splits = {"train": range(0, n_train), "test": range(n_train, n_train + n_test)}
    faces = [face_factors(seed, i) for i in range(n_train + n_test)]
    for split, indices in splits.items():
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        masks = np.zeros((len(indices), len(PARTS), 32, 32), dtype=np.uint8)
        for row, i in enumerate(indices):
            image, masks[row] = render_face(faces[i])
            _write_bytes(folder / face_name(i), png_bytes(image))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, names=np.array([face_name(i) for i in indices]), parts=np.array(PARTS), masks=masks)
        _write_bytes(root / f"masks_{split}.npz", buffer.getvalue())

    factors = factor_matrix(faces)
    attributes = attribute_table(factors)
    names = [face_name(i) for i in range(len(faces))]
    split_of = ["train"] * n_train + ["test"] * n_test
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("name", "split") + FACTOR_NAMES)
    for name, split, row in zip(names, split_of, factors):
        writer.writerow([name, split] + [f"{v:.6f}" for v in row])
    _write_bytes(root / "factors.csv", text.getvalue().encode())
    lines = [str(len(names)), " ".join(ATTRIBUTES)]
    lines += [name + " " + " ".join(f"{int(v):2d}" for v in row) for name, row in zip(names, attributes)]
    _write_bytes(root / "list_attr_faces.txt", ("\n".join(lines) + "\n").encode())
    _write_bytes(root / "correlations.json", (json.dumps(correlations(factors, attributes), indent=1) + "\n").encode())
    _write_bytes(root / ATTRIBUTE_PARTS_FILE, (json.dumps(attribute_part_names(), indent=1) + "\n").encode())
    example = example_index(factors, np.arange(n_train, n_train + n_test))
    _write_bytes(root / "example.png", (root / "images" / "test" / face_name(example)).read_bytes())
    _write_bytes(root / "example.png.parts.npz", parts_file("example.png", render_face(faces[example])[1]))
    return root


def parts_file(name: str, masks: np.ndarray) -> bytes:
    """A parts file of one image (``<image>.parts.npz``, utils/io/region.py): its name, the part names
    and the masks (1, len(PARTS), 32, 32) uint8."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, names=np.array([name]), parts=np.array(PARTS), masks=masks[None])
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, nargs="?", default=Path("."), help="folder that receives faces/")
    parser.add_argument("--n_train", type=int, default=N_TRAIN, help="training faces")
    parser.add_argument("--n_test", type=int, default=N_TEST, help="held-out faces")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the whole data set")
    args = parser.parse_args(argv)
    if args.n_train < 1 or args.n_test < 1:
        parser.error("--n_train and --n_test must be at least 1")
    root = make_faces(args.dest, args.n_train, args.n_test, args.seed)
    print(f"wrote {args.n_train} train + {args.n_test} test faces (32x32 RGB), their factors, attributes and part "
          f"masks to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
