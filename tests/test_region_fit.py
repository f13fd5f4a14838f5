"""Boundaries fitted on a region (``--boundary_search --region``, issue 31): every latent is multiplied
by its image's region before the linear SVM, so the normal is made of the region's values only and a
region edit along it need not push the few values inside harder. Checked against sklearn's SVC on
latents confined by hand, from the parts files read by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.svm import SVC

import main as cli
from runners.engine import load_model
from runners.engine.editor import Editor, ImageReader
from tests.helpers import assert_one_error_line, write_labelled_set, write_tiny_model
from utils.core.region import area_downsample, confined_rows
from utils.io.boundary_files import load_boundary
from utils.errors import UserError
from utils.io.region import read_attribute_parts, read_part_sets, read_parts

N_IMAGES, SIZE = 48, 16


def test_confined_rows_weigh_every_channel_of_a_pixel_by_its_weight():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(3, 2, 4, 5)).astype(np.float32)  # (n, C, H, W)
    weights = rng.uniform(size=(3, 4, 5)).astype(np.float32)
    weights[1] = 0
    got = confined_rows(latents.reshape(3, -1), weights.reshape(3, -1))
    want = np.empty_like(latents)
    for i in range(3):
        for c in range(2):
            want[i, c] = latents[i, c] * weights[i]
    np.testing.assert_array_equal(got, want.reshape(3, -1))
    with pytest.raises(ValueError, match="not 3 latents"):
        confined_rows(latents.reshape(3, -1)[:, :-1], weights.reshape(3, -1))


def _masks(i: int) -> np.ndarray:
    """Image i's parts (2, 16, 16) uint8: 'left', its left 6 + i % 3 columns with a half-covered
    column beside them, and 'top', its top 5 rows."""
    masks = np.zeros((2, SIZE, SIZE), dtype=np.uint8)
    width = 6 + i % 3
    masks[0, :, :width] = 255
    masks[0, :, width] = 128
    masks[1, :5] = 255
    return masks


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The tiny DDPM and 48 labelled images, each with its own parts file: Bright_Left (the images'
    real attribute) and Noise (random labels); the config's parts folder says where each is drawn."""
    root = tmp_path_factory.mktemp("region_fit")
    cfg, weights, config = write_tiny_model(root, "ddpm", name="tiny_fit", seed=2)
    (root / "parts").mkdir()
    (root / "parts" / "attribute_parts.json").write_text(json.dumps({"bright_left": "left", "Noise": "top"}))
    config["data"]["parts_dir"] = str(root / "parts")
    cfg.write_text(yaml.safe_dump(config))
    images, _ = write_labelled_set(root, n=N_IMAGES, size=SIZE)
    noise = np.random.default_rng(7).choice([-1, 1], size=N_IMAGES)
    rows = [f"{i:06d}.png {1 if i % 2 == 0 else -1} {noise[i]}" for i in range(N_IMAGES)]
    attr = root / "attrs2.txt"
    attr.write_text(f"{N_IMAGES}\nBright_Left Noise\n" + "\n".join(rows) + "\n")
    for i, path in enumerate(sorted(images.glob("*.png"))):
        np.savez(path.with_name(path.name + ".parts.npz"), names=np.array([path.name]),
                 parts=np.array(["left", "top"]), masks=_masks(i)[None])
    common = ["--config", cfg, "--model_path", weights, "--cache_dir", root / "cache", "--data_dir", images,
              "--attr_file", attr, "--n_train_img", "36", "--n_test_img", "12", "--bs_train", "8"]
    return {"root": root, "cfg": cfg, "weights": weights, "images": images, "common": [str(a) for a in common],
            "labels": {"Bright_Left": np.array([1 if i % 2 == 0 else -1 for i in range(N_IMAGES)]), "Noise": noise}}


def _search(labelled, name: str, *extra) -> tuple[int, str, dict]:
    exp, bd = labelled["root"] / name, labelled["root"] / f"bd_{name}"
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["--boundary_search", *labelled["common"], "--exp", str(exp), "--boundary_dir", str(bd),
                         *map(str, extra)])
    if code:
        return code, err.getvalue(), {}
    summary = json.loads((exp / "boundary_search" / "summary.json").read_text())
    return code, err.getvalue(), summary


def _latents(labelled, record, paths: list[str]):
    """The search's latents, inverted again here (through the same cache: the same values)."""
    model = load_model(labelled["cfg"], labelled["weights"])
    editor = Editor(model, record.t_0, record.n_inv_step, labelled["root"] / "cache", show_progress=False)
    reader = ImageReader.for_config(model.config, align_face=False)
    latents, _ = editor.invert(torch.stack([reader.read(p) for p in paths]), 8)
    return latents


def _svc(x: np.ndarray, labels: np.ndarray, n_train: int) -> np.ndarray:
    w = SVC(kernel="linear", C=1.0).fit(x[:n_train].astype(np.float64), labels[:n_train]).coef_[0]
    return w / np.linalg.norm(w)


def _hand_masks(kind: str, paths: list[str]) -> np.ndarray:
    """(N, 16, 16) each image's region, by hand: the box's left half, or from its parts file."""
    if kind == "box":
        masks = np.zeros((len(paths), SIZE, SIZE), np.float32)
        masks[:, :, :SIZE // 2] = 1
        return masks
    parts = {"left": [0], "top": [1], "left+top": [0, 1]}[kind]
    return np.stack([np.load(p + ".parts.npz")["masks"][0][parts].max(axis=0) / 255.0 for p in paths]).astype(np.float32)


@pytest.mark.parametrize("region, edit_attr, regions", [
    ("left+top", "Bright_Left", {"Bright_Left": "left+top"}),
    ("0,0,0.5,1", "Bright_Left", {"Bright_Left": "box"}),
    ("auto", "all", {"Bright_Left": "left", "Noise": "top"}),  # each from the data set's attribute_parts.json
])
def test_the_normal_is_the_svm_of_the_confined_latents_and_zero_outside(labelled, region, edit_attr, regions):
    code, err, summary = _search(labelled, region.replace(",", "_").replace("+", "_"), "--edit_attr", edit_attr,
                                 "--region", region)
    assert code == 0, err
    paths = summary["train_images"] + summary["test_images"]
    n_train = len(summary["train_images"])
    sources = {"box": "box 0,0,0.5,1"}
    assert {s: r["attributes"] for s, r in summary["region"].items()} == \
        {sources.get(k, f"part {k}"): [a for a, v in regions.items() if v == k] for k in regions.values()}
    rows = [int(Path(p).stem) for p in paths]
    for attribute, kind in regions.items():
        source = sources.get(kind, f"part {kind}")
        masks = _hand_masks(kind, paths)
        assert summary["region"][source]["coverage"]["mean"] == pytest.approx(masks.mean(), rel=1e-6)
        spaces = summary["spaces"] if "spaces" in summary else summary["attributes"][attribute]
        records = {s: load_boundary(spaces[s]["path"]) for s in ("z", "h")}
        latents = _latents(labelled, records["z"], paths)
        labels = (labelled["labels"][attribute][rows] > 0).astype(int)
        for space, record in records.items():
            assert record.fit_region == source
            shape = tuple(record.shape)
            weights = masks if space == "z" else np.stack([area_downsample(m, shape[-1]).numpy() for m in masks])
            x = getattr(latents, space).reshape(len(paths), *shape).numpy() * weights[:, None].astype(np.float32)
            want = _svc(x.reshape(len(paths), -1), labels, n_train)
            got = record.normal.astype(np.float64)
            assert float(got @ want) >= 1 - 1e-6, (attribute, space, float(got @ want))
            outside = np.broadcast_to((weights == 0).all(axis=0), shape).reshape(-1)
            assert outside.any() and np.all(got[outside] == 0)  # exactly: no image's latent has a value there


def test_a_whole_latent_fit_records_no_region_and_differs(labelled):
    code, err, summary = _search(labelled, "whole", "--edit_attr", "Bright_Left")
    assert code == 0, err
    assert "region" not in summary
    record = load_boundary(summary["spaces"]["z"]["path"])
    assert record.fit_region == "" and np.count_nonzero(record.normal) == record.normal.size


def test_the_parts_of_many_images_are_read_from_each_file_once(tmp_path, monkeypatch):
    names = [f"{i:05d}.png" for i in range(5)]
    masks = np.stack([_masks(i) for i in range(5)])
    np.savez(tmp_path / "masks_train.npz", names=np.array(names), parts=np.array(["left", "top"]), masks=masks)
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, **kw: opened.append(path) or real_load(path, **kw))
    specs = read_parts([tmp_path / "images" / n for n in names[::-1]], "left+top", SIZE, [tmp_path])
    assert len(opened) == 2  # the names once, the masks once
    for spec, i in zip(specs, range(4, -1, -1)):
        np.testing.assert_array_equal(spec.mask, masks[i].max(axis=0).astype(np.float32) / 255.0)
        assert spec.source() == "part left+top" and spec.kind == "part"
    with pytest.raises(Exception, match="has the parts left, top"):
        read_parts([tmp_path / "images" / names[0]], "left+mouth", SIZE, [tmp_path])
    with pytest.raises(Exception, match="an empty part name"):
        read_parts([tmp_path / "images" / names[0]], "left+", SIZE, [tmp_path])


def test_several_parts_are_read_in_one_pass_and_equal_each_part_read_alone(tmp_path, monkeypatch):
    """--region auto asks for every part: one read of the names and one of the masks, whatever the
    number of parts; each part's masks as read_parts gives them one at a time."""
    names = [f"{i:05d}.png" for i in range(4)]
    masks = np.stack([_masks(i) for i in range(4)])
    np.savez(tmp_path / "masks_train.npz", names=np.array(names), parts=np.array(["left", "top"]), masks=masks)
    images = [tmp_path / "images" / n for n in names[::-1]]
    alone = {part: read_parts(images, part, SIZE, [tmp_path]) for part in ("left", "top", "left+top")}
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, **kw: opened.append(path) or real_load(path, **kw))
    together = read_part_sets(images, ["left", "top", "left+top", "left"], SIZE, [tmp_path])
    assert len(opened) == 2 and list(together) == ["left", "top", "left+top"]
    for part, specs in together.items():
        for got, want in zip(specs, alone[part], strict=True):
            np.testing.assert_array_equal(got.mask, want.mask)
            assert got.source() == want.source() == f"part {part}"
    with pytest.raises(UserError, match=r"--region mouth: .*masks_train.npz has the parts left, top"):
        read_part_sets(images, ["left", "mouth"], SIZE, [tmp_path], asked="auto")
    with pytest.raises(UserError, match="--region auto: no parts file names x.png"):
        read_part_sets([tmp_path / "images" / "x.png"], ["left", "top"], SIZE, [tmp_path], asked="auto")


def test_a_parts_file_over_the_size_bound_is_named(tmp_path, monkeypatch):
    """Before: it was skipped, and the error said that no parts file named the image."""
    import utils.io.region as region_io

    np.savez(tmp_path / "masks_train.npz", names=np.array(["00000.png"]), parts=np.array(["left", "top"]),
             masks=np.stack([_masks(0)]))
    monkeypatch.setattr(region_io, "MAX_PARTS_FILE", 100)
    with pytest.raises(UserError, match=r"masks_train.npz is \d+ bytes, more than a parts file may be \(100\)"):
        read_parts([tmp_path / "images" / "00000.png"], "left", SIZE, [tmp_path])


@pytest.mark.parametrize("extra, words", [
    (["--region", "mouth"], ["--region mouth", "has the parts left, top"]),
    (["--region", "0,0,1,1"], ["everything is editable"]),
    (["--region", "left", "--feather", "3"], ["are for edits"]),
    (["--region", "left", "--within", "somewhere"], ["do not combine"]),
])
def test_bad_fit_regions_are_one_line_before_any_inversion(labelled, tmp_path, capsys, extra, words):
    argv = [a if a != labelled["common"][5] else str(tmp_path / "cache") for a in labelled["common"]]
    extra = extra if "--edit_attr" in extra else [*extra, "--edit_attr", "Bright_Left"]
    code = cli.main(["--boundary_search", *argv, "--exp", str(tmp_path / "r"), "--boundary_dir", str(tmp_path / "bd"),
                     *extra])
    assert_one_error_line(code, capsys.readouterr().err, *words)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bd").exists()


def test_auto_names_the_attributes_the_data_set_gives_no_part(labelled, tmp_path, capsys):
    config = yaml.safe_load(labelled["cfg"].read_text())
    (tmp_path / "attribute_parts.json").write_text(json.dumps({"Bright_Left": "left"}))
    config["data"]["parts_dir"] = str(tmp_path)
    (tmp_path / "tiny.yml").write_text(yaml.safe_dump(config))
    argv = [str(tmp_path / "tiny.yml") if a == str(labelled["cfg"]) else a for a in labelled["common"]]
    argv = [str(tmp_path / "cache") if a == labelled["common"][5] else a for a in argv]
    code = cli.main(["--boundary_search", *argv, "--exp", str(tmp_path / "r"), "--boundary_dir", str(tmp_path / "bd"),
                     "--edit_attr", "all", "--region", "auto"])
    assert_one_error_line(code, capsys.readouterr().err, "attribute_parts.json names no part for Noise")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bd").exists()


def test_region_is_refused_by_the_modes_that_do_not_use_it(labelled, tmp_path, capsys):
    code = cli.main(["--radius", "--config", str(labelled["cfg"]), "--model_path", str(labelled["weights"]),
                     "--img_path", str(labelled["images"]), "--exp", str(tmp_path / "r"), "--region", "left"])
    assert_one_error_line(code, capsys.readouterr().err, "--region is for the edit modes, --boundary_search and --discover")


@pytest.mark.parametrize("damage", ["bytes", "rows", "dtype", "no_masks"])
def test_a_damaged_parts_file_is_one_line(tmp_path, damage):
    path = tmp_path / "masks_train.npz"
    masks = np.stack([_masks(i) for i in range(3)])
    arrays = {"names": np.array(["a.png", "b.png", "c.png"]), "parts": np.array(["left", "top"]), "masks": masks}
    if damage == "bytes":
        path.write_bytes(b"PK\x03\x04 not a zip archive")
    else:
        if damage == "rows":
            arrays["masks"] = masks[:2]
        elif damage == "dtype":
            arrays["masks"] = masks.astype(np.float64)
        else:
            del arrays["masks"]
        np.savez(path, **arrays)
    with pytest.raises(UserError, match="parts file") as caught:
        read_parts([tmp_path / "images" / "a.png"], "left", SIZE, [tmp_path])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text, words", [("[1, 2]", "must map each attribute"), ("{\"a\": 3}", "must map each attribute"),
                                         ("{not json", "not valid JSON")])
def test_a_damaged_attribute_parts_file_is_one_line(tmp_path, text, words):
    (tmp_path / "attribute_parts.json").write_text(text)
    with pytest.raises(UserError, match=words):
        read_attribute_parts([tmp_path])
    with pytest.raises(UserError, match="no attribute_parts.json"):
        read_attribute_parts([tmp_path / "elsewhere"])


def test_discovery_in_a_region_finds_moves_of_the_region_and_records_it(labelled, tmp_path):
    """--discover --region: h's principal directions of the confined h are 0 on the cells the region
    never covers (the box's right half), z's are the Jacobian's top moves of the region's pixels
    (checked against the exact SVD in tests/test_discovery.py); every file records the region."""
    argv = ["--discover", "--config", str(labelled["cfg"]), "--model_path", str(labelled["weights"]), "--cache_dir",
            str(tmp_path / "cache"), "--boundary_dir", str(tmp_path / "bd"), "--img_path", str(labelled["images"]),
            "--n_directions", "3", "--n_discover_img", "8", "--oversample", "2", "--n_power_iter", "2",
            "--sheet_images", "0", "--region", "0,0,0.5,1", "--exp", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "run" / "discover" / "summary.json").read_text())
    for name in ("pc_00", "pc_01", "pc_02"):
        records = {s: load_boundary(summary["directions"][name][s]["path"]) for s in ("z", "h")}
        assert {r.fit_region for r in records.values()} == {"box 0,0,0.5,1"}
        h = records["h"].normal.reshape(records["h"].shape)
        side = h.shape[-1]
        assert np.abs(h[..., side // 2:]).max() <= 1e-6 and np.abs(h[..., :side // 2]).max() > 0.01
