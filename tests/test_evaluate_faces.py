"""The faces evaluation (scripts/evaluation/faces.py): its measures on constructed inputs (success and
crossing, leak per unit of score, the nuisance thresholds, the Fréchet distance against hand-computed
values, attribute frequencies), and a tiny end-to-end run on a tiny random 32-px model with a randomly
initialised factor predictor, whose numbers match direct engine calls."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from runners.engine import (BoundaryRecord, Denoising, EditRequest, Engine, EngineOptions, Move, latent_shapes,
                            load_config, load_model, save_boundary)
from scripts import evaluate_edits as ev
from scripts.evaluation import faces as faces_eval
from scripts.evaluation import faces_measures as fm
from scripts.evaluation.faces_runs import eight_bit
from tests.helpers import random_model, tiny_config
from utils.core.boundary import SUMMARY_STATS
from utils.core.seeds import image_key
from utils.faces.factors import ATTRIBUTES, FACTOR_NAMES, PREDICTED_CONTINUOUS, attribute_scores, factor_matrix, \
    sample_factors
from utils.faces.predictor import PREDICTED_NAMES, FactorPredictor, prediction_matrix
from utils.faces.render import PARTS, render_face
from utils.io.boundary_files import summary_dict

F = len(PREDICTED_NAMES)


def factors(**values) -> np.ndarray:
    """One row of measured factors (PREDICTED_NAMES order): 0.5 everywhere but ``values``."""
    row = np.full(F, 0.5)
    for name, value in values.items():
        row[PREDICTED_NAMES.index(name)] = value
    return row


# --------------------------------------------------------------------------------- measures

def test_success_needs_a_move_toward_the_other_side_and_a_crossing():
    side = np.array([-1, -1, -1, 1, 1, 1])
    before = np.array([-0.2, -0.2, 0.1, 0.3, 0.3, -0.1])   # the last of each side: the reconstruction already across
    after = np.array([0.1, -0.1, 0.05, -0.2, 0.2, -0.05])
    masks = fm.success_masks(side, before, after)
    assert masks["moved"].tolist() == [True, True, False, True, True, False]
    assert masks["crossed"].tolist() == [True, False, True, True, False, True]
    assert masks["success"].tolist() == [True, False, False, True, False, False]
    assert masks["already_across"].tolist() == [False, False, True, False, False, True]
    assert fm.moved_beyond_noise(side, before, after, 0.15).tolist() == [True, False, False, True, False, False]


def test_the_judged_edit_is_the_end_of_the_range_the_face_is_edited_toward():
    edits = np.stack([np.stack([factors(smile=v) for v in (0.0, 0.2, 0.4)])] * 2)  # (2, K=3, F)
    sweep = fm.Sweep("Smiling", np.array([5, 7]), np.array([-1, 1]), np.array([-1.0, 0.0, 1.0]),
                     np.stack([factors(smile=0.1), factors(smile=0.4)]), edits)
    smile = PREDICTED_NAMES.index("smile")
    assert sweep.end()[:, smile].tolist() == [0.4, 0.0]
    reversed_range = fm.Sweep(*[getattr(sweep, f) for f in ("attribute", "rows", "side")], np.array([1.0, 0.0, -1.0]),
                              sweep.reference, sweep.edits)
    assert reversed_range.end()[:, smile].tolist() == [0.0, 0.4]


def test_leak_is_the_change_per_unit_of_the_targets_score_in_spreads():
    reference = np.stack([factors(smile=0.1, age=0.2), factors(smile=0.0, age=0.2)])
    edited = np.stack([factors(smile=0.3, age=0.3), factors(smile=0.4, age=0.2)])   # score +0.2, +0.4; age +0.1, 0
    sd = np.ones(F)
    sd[PREDICTED_NAMES.index("age")] = 0.5
    found = fm.leak_per_factor(reference, edited, ATTRIBUTES.index("Smiling"), sd, 1.0, skip=("smile",))
    assert "smile" not in found
    # pooled: (0.1 / 0.5 + 0) / (0.2 + 0.4); per edit: 0.2 / 0.2 = 1 and 0
    assert found["age"]["pooled"] == pytest.approx(0.2 / 0.6)
    assert found["age"]["median"] == pytest.approx(0.5)
    assert found["age"]["mean_change"] == pytest.approx(0.05)
    assert found["bg_r"]["pooled"] == 0.0


def test_nuisance_is_kept_below_the_threshold_of_each_factor():
    rmse = np.full(F, 0.01)
    reference = np.stack([factors()] * 3)
    edited = np.stack([factors(bg_r=0.529), factors(bg_r=0.531), factors(pos_x=0.4, smile=0.9)])
    every, per_factor = fm.kept(reference, edited, 3 * rmse, ("bg_r", "pos_x"))
    assert every.tolist() == [True, False, False]
    assert per_factor == {"bg_r": pytest.approx(2 / 3), "pos_x": pytest.approx(2 / 3)}


def test_each_score_reads_its_own_factors_and_the_nuisance_leaves_them_out():
    truth = factor_matrix([sample_factors(np.random.default_rng([7, i])) for i in range(300)], PREDICTED_NAMES)
    own = fm.score_factors(truth)
    assert own["Smiling"] == ("smile",) and own["Eyeglasses"] == ("glasses",) and own["Young"] == ("age",)
    assert own["Black_Hair"] == ("hair_tone", "hair_gray") and own["Pale_Skin"] == ("skin_tone",)
    scale = fm.Scale(np.ones(F), np.ones(F), np.ones(13), np.ones(13), own)
    assert "skin_tone" not in scale.nuisance("Pale_Skin") and "skin_tone" in scale.nuisance("Smiling")


def test_frechet_distance_matches_hand_computed_values():
    d = 5
    mu = np.arange(d, dtype=float)
    # N(0, I) against N(mu, 4 I): |mu|^2 + d (1 + 4 - 2 * 2)
    assert fm.frechet_from_moments(np.zeros(d), np.eye(d), mu, 4 * np.eye(d)) == pytest.approx(mu @ mu + d)
    # covariances that do not commute: tr sqrt(AB) of a 2 x 2 with positive eigenvalues is sqrt(tr + 2 sqrt(det))
    a, b = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 3.0])
    assert fm.frechet_from_moments(np.zeros(2), a, np.zeros(2), b) == pytest.approx(8 - 2 * np.sqrt(14))
    # sample moments: means 1 and 3, variances (ddof 1) 2 and 8: 4 + 2 + 8 - 2 * 4
    assert fm.frechet_distance(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])) == pytest.approx(6.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20000, 3)), rng.normal(mu[:3], 2.0, size=(20000, 3))
    assert fm.frechet_distance(x, y) == pytest.approx(mu[:3] @ mu[:3] + 3, abs=0.15)
    few = rng.normal(size=(10, 40))   # fewer images than features: singular covariances, still finite and ~0 to itself
    assert abs(fm.frechet_distance(few, few)) < 1e-4    # the trace is about 40: rounding under sqrt only


def test_frequencies_and_their_differences_in_points():
    samples = np.array([[0.1, -1.0], [0.2, -0.5], [-0.1, 0.3], [0.4, -0.2]])
    test = np.array([[-0.1, -1.0], [0.2, 0.5]])
    table = fm.frequency_table(samples, test, ("A", "B"))
    assert table["A"] == {"samples": 0.75, "test": 0.5, "difference_points": pytest.approx(25.0)}
    assert table["B"] == {"samples": 0.25, "test": 0.5, "difference_points": pytest.approx(-25.0)}


def test_background_changed_counts_background_pixels_beyond_the_feather():
    background = np.zeros((1, 8, 8), np.float32)
    background[0, :, :4] = 1.0                        # columns 0..3 background, 4..7 head
    level = 1 / 127.5                                 # one level of 8 bits (images in [-1, 1])
    reference = torch.full((1, 3, 8, 8), 0.5 * level)  # exactly level 128
    edit = reference.clone()
    edit[0, 0, 0, 0] += 3 * level                     # background, 4 px from the head: counted
    edit[0, 1, 1, 3] += 9 * level                     # background next to the head (1 px): not counted
    edit[0, 2, 2, 6] += 9 * level                     # the head: not counted
    edit[0, 0, 3, 1] += 2 * level                     # 2 levels: within the tolerance
    found = fm.background_changed(edit, reference, background)
    assert found == pytest.approx([1 / 24])           # columns 0..2 (at least 2 px from column 4): 24 pixels


def test_the_background_kept_by_the_pixels_joins_success():
    distances = np.array([-1.0, 1.0])
    reference = np.stack([factors(smile=0.1)] * 3)
    edits = np.stack([np.stack([factors(smile=0.6)] * 2)] * 3)
    scale = fm.Scale(np.ones(F), np.full(F, 0.01), np.ones(13), np.full(13, 0.01),
                     {a: () for a in ATTRIBUTES} | {"Smiling": ("smile",)})
    sweep = fm.Sweep("Smiling", np.arange(3), np.array([-1, -1, -1]), distances, reference, edits,
                     np.array([0.0, 0.009, 0.5]))
    found = fm.sweep_measures(sweep, scale)
    assert found["both"]["background_kept"] == pytest.approx(2 / 3)
    assert found["both"]["success_and_background_kept"] == pytest.approx(2 / 3)
    assert found["to_positive"]["background_kept"] == pytest.approx(2 / 3)
    assert found["faces"]["background_changed"] == [0.0, 0.009, 0.5]
    assert fm.sweep_measures(sweep.subset(np.array([2])), scale)["both"]["background_kept"] == 0.0


def test_each_attribute_is_edited_in_the_parts_the_renderer_draws_it_in():
    from scripts.evaluation.faces_runs import attribute_region
    from utils.faces.factors import ATTRIBUTE_PARTS

    assert set(ATTRIBUTE_PARTS) == set(ATTRIBUTES)
    assert all(set(parts) <= set(PARTS) - {"background"} for parts in ATTRIBUTE_PARTS.values())
    masks = {p: np.zeros((2, 4, 4), np.float32) for p in PARTS}
    masks["hair"][:, 0] = 1.0
    masks["face"][:, 1:3] = 0.5
    masks["face"][:, 0, 0] = 0.25                     # a pixel shared with the hair: the larger coverage
    bangs = attribute_region(masks, "bangs")          # any case, as boundary files name attributes
    np.testing.assert_array_equal(bangs, np.maximum(masks["hair"], masks["face"]))
    np.testing.assert_array_equal(attribute_region(masks, "Blond_Hair"), masks["hair"])


def test_part_masks_are_found_by_name(tmp_path):
    from runners.engine import UserError
    from scripts.evaluation.faces_runs import read_part_masks

    masks = np.arange(3 * len(PARTS) * 4, dtype=np.uint8).reshape(3, len(PARTS), 2, 2)
    np.savez_compressed(tmp_path / "masks_test.npz", names=np.array(["a.png", "b.png", "c.png"]),
                        parts=np.array(PARTS), masks=masks)
    found = read_part_masks(tmp_path, "test", ["c.png", "a.png"])
    np.testing.assert_allclose(found["eyes"], masks[[2, 0], PARTS.index("eyes")] / 255.0)
    with pytest.raises(UserError, match="no masks of 1 test faces"):
        read_part_masks(tmp_path, "test", ["a.png", "d.png"])
    with pytest.raises(UserError, match="masks_train.npz is missing"):
        read_part_masks(tmp_path, "train", ["a.png"])


def test_sweep_measures_per_direction():
    distances = np.array([-1.0, 0.0, 1.0])
    smile = [(0.1, 0.6), (0.1, 0.2), (0.5, -0.1), (0.5, 0.45)]       # (reference, judged edit): ok, short, ok, short
    reference = np.stack([factors(smile=r) for r, _ in smile])
    edits = np.stack([np.stack([factors(smile=e)] * 3) for _, e in smile])
    edits[1, 2, PREDICTED_NAMES.index("bg_r")] = 0.9                # face 1 loses its background colour
    scale = fm.Scale(np.ones(F), np.full(F, 0.01), np.ones(13), np.full(13, 0.01),
                     {a: () for a in ATTRIBUTES} | {"Smiling": ("smile",)})
    found = fm.sweep_measures(fm.Sweep("Smiling", np.arange(4), np.array([-1, -1, 1, 1]), distances, reference, edits),
                              scale)
    assert found["to_positive"]["n"] == 2 and found["to_positive"]["success"] == 0.5
    assert found["to_positive"]["kept"] == 0.5 and found["to_positive"]["kept_per_factor"]["bg_r"] == 0.5
    assert found["to_negative"]["success"] == 0.5 and found["to_negative"]["kept"] == 1.0
    assert found["both"]["success_and_kept"] == 0.5 and found["both"]["moved_beyond_noise"] == 1.0
    assert found["to_positive"]["positive_per_distance"] == [0.5, 0.5, 0.5]
    assert found["faces"]["success"] == [True, False, True, False]


# --------------------------------------------------------------------------------- a tiny run

T_0, OTHER_T_0, STEPS = 300, 200, 3


def _summary(neg: float, pos: float) -> dict:
    stats = np.array([[[neg] * len(SUMMARY_STATS), [pos] * len(SUMMARY_STATS)]] * 2, dtype=np.float64)
    return summary_dict(stats)


def _write_faces(root, n_test: int = 6, n_train: int = 4) -> None:
    """root/faces: rendered faces with their factors and part masks, as scripts/make_faces.py writes
    them (the masks in the reverse order of the faces: they are found by name)."""
    rows = []
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 100)):
        (root / "faces" / "images" / split).mkdir(parents=True)
        names, masks = [], []
        for i in range(n):
            face = sample_factors(np.random.default_rng([11, offset + i]))
            image, parts = render_face(face)
            Image.fromarray(image).save(root / "faces" / "images" / split / f"{offset + i:05d}.png")
            rows.append({"name": f"{offset + i:05d}.png", "split": split,
                         **{f: getattr(face, f) for f in FACTOR_NAMES}})
            names.append(f"{offset + i:05d}.png")
            masks.append(parts)
        np.savez_compressed(root / "faces" / f"masks_{split}.npz", names=np.array(names[::-1]), parts=np.array(PARTS),
                            masks=np.stack(masks[::-1]))
    with open(root / "faces" / "factors.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["name", "split", *FACTOR_NAMES])
        writer.writeheader()
        writer.writerows(rows)


def _write_boundaries(root, shapes) -> None:
    """Random normals of Smiling, Mouth_Slightly_Open (cos 0.6 with Smiling) and Young at t_0 300,
    Smiling and Young at 200, with class summaries (for the relative unit and the t_0 shift)."""
    for t_0, names in ((T_0, ("Smiling", "Mouth_Slightly_Open", "Young")), (OTHER_T_0, ("Smiling", "Young"))):
        for space, shape in shapes.items():
            rng = np.random.default_rng(t_0 + len(space))
            base = {n: rng.normal(size=int(np.prod(shape))) for n in ("Smiling", "other", "Young")}
            base = {n: v / np.linalg.norm(v) for n, v in base.items()}
            other = base["other"] - (base["other"] @ base["Smiling"]) * base["Smiling"]
            base["Mouth_Slightly_Open"] = 0.6 * base["Smiling"] + 0.8 * other / np.linalg.norm(other)
            for name in names:
                normal = base[name].astype(np.float32)
                save_boundary(root / "bd" / f"tiny_faces_{name.lower()}_t{t_0}_{space}.npz",
                              BoundaryRecord(normal=normal, coef=normal, intercept=0.0, shape=shape, space=space,
                                             t_0=t_0, n_inv_step=STEPS, attribute=name, config_name="tiny_faces",
                                             class_summary=_summary(-1.0, 1.0)))


@pytest.fixture(scope="module")
def faces_setup(tmp_path_factory):
    """A tiny 32-px RGB DDPM whose config names the faces data set, 6 test and 4 train rendered faces,
    boundaries, and a randomly initialised factor predictor whose outputs straddle the thresholds."""
    root = tmp_path_factory.mktemp("faces_eval")
    raw = tiny_config("ddpm", name="tiny_faces")
    raw["data"].update(dataset="faces", image_size=32, channels=3)
    raw["edit"].update(t_0=T_0, n_inv_step=STEPS, n_test_step=STEPS, start_distance=-2, end_distance=2,
                       edit_img_number=3)
    (root / "tiny.yml").write_text(yaml.safe_dump(raw))
    torch.save(random_model(raw, seed=5).state_dict(), root / "w.pt")
    _write_faces(root)
    _write_boundaries(root, latent_shapes(load_config(root / "tiny.yml")))
    torch.manual_seed(0)
    predictor = FactorPredictor().eval()
    # its raw outputs barely differ between faces: standardise them on the test faces so that each
    # continuous factor spreads (sd 0.3) about its attribute's threshold, and faces lie on both sides
    paths = sorted((root / "faces" / "images" / "test").glob("*.png"))
    test = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                        for p in paths])
    with torch.no_grad():
        raw = predictor(test)[0].double()
    thresholds = {"age": 0.425, "smile": 0.25, "mouth_open": 0.325, "eye_open": 0.375, "hair_tone": 0.45,
                  "hair_gray": 0.375, "skin_tone": 0.25}
    std = 0.3 / raw.std(0)
    predictor.set_standardisation(torch.tensor([thresholds.get(n, 0.5) for n in PREDICTED_CONTINUOUS]) -
                                  raw.median(0).values * std, std)
    torch.save(predictor.state_dict(), root / "predictor.pt")
    args = ["--config", str(root / "tiny.yml"), "--model_path", str(root / "w.pt"), "--data_dir", str(root / "faces"),
            "--boundary_dir", str(root / "bd"), "--predictor", str(root / "predictor.pt"), "--n_test", "6",
            "--per_side", "2", "--threads", "1", "--batch_size", "8"]
    return {"root": root, "args": args, "predictor": predictor}


def test_a_tiny_run_measures_every_edit_through_the_engine(faces_setup):
    root = faces_setup["root"]
    out = {name: root / name for name in ("report.json", "report.md", "grid.png", "samples.png")}
    assert ev.main([*faces_setup["args"], "--quality", "--n_samples", "4", "--sample_steps", "3",
                    "--samples_png", str(out["samples.png"]), "--entanglement", "--entanglement_n", "2",
                    "--ablations", "--ablation_per_side", "1", "--json", str(out["report.json"]),
                    "--table", str(out["report.md"]), "--grid", str(out["grid.png"])]) == 0
    report = json.loads(out["report.json"].read_text())
    assert report["attributes"] == ["Smiling", "Mouth_Slightly_Open", "Young"]
    assert report["setting"] == {"name": "default", "t_0": T_0, "start": -2.0, "end": 2.0, "k": 3, "space": "both",
                                 "unit": "absolute", "eta": 1.0, "h_policy": "lagged", "n_test_step": STEPS,
                                 "region": False}
    assert {"cpu", "threads", "torch"} <= set(report["hardware"]) and report["seconds"] > 0
    assert set(report["quality"]["frequencies"]) == set(ATTRIBUTES)
    assert np.isfinite(report["quality"]["frechet"]["samples_vs_test"])
    pairs = report["entanglement"]["pairs"]
    assert [(p["moved"], p["other"]) for p in pairs] == [("Smiling", "Mouth_Slightly_Open")]
    assert pairs[0]["cosines"]["cos_z"] == pytest.approx(0.6, abs=1e-6) and pairs[0]["hold_ratio"]["z"] == \
        pytest.approx(1.25, abs=1e-6)    # 1 / sqrt(1 - 0.6^2)
    spaces = {(r["t_0"], r["space"]) for r in report["ablations"]["results"]}
    assert spaces == {(t, s) for t in (T_0, OTHER_T_0) for s in ("both", "z", "h")}
    assert "| attribute |" in out["report.md"].read_text()
    with Image.open(out["grid.png"]) as grid:
        assert grid.height >= 96 and grid.width >= 5 * 96     # original, reconstruction, 3 edits
    _check_against_the_engine(faces_setup, report["edits"]["Smiling"])


def _check_against_the_engine(faces_setup, found: dict) -> None:
    """The scores of the judged edits of one attribute, made by hand with the engine."""
    root = faces_setup["root"]
    model = load_model(root / "tiny.yml", root / "w.pt")
    engine = Engine(model, EngineOptions(cache_root=None, show_progress=False))
    paths = sorted((root / "faces" / "images" / "test").glob("*.png"))
    images = torch.stack([engine.reader(False).read(p) for p in paths])
    rows = found["faces"]["rows"]
    request = EditRequest((Move("Smiling", -2.0, 2.0),), Denoising(STEPS, 1.0, "lagged", 1234, 8), k=3)
    description = engine.describe(request, T_0, STEPS, engine.boundary_index(root / "bd"))
    with engine.session(T_0, STEPS) as editor:
        latents, _ = editor.invert(images, 8)
        reference = editor.reconstruct(latents, description)
        chosen = type(latents)(latents.z[rows], latents.h[rows])
        edits = editor.edit_all(chosen, description, [(image_key(images[r]),) for r in rows])
    side = np.array(found["faces"]["side"])
    ends = edits[np.arange(len(rows)), np.where(side < 0, 2, 0)]
    smiling = ATTRIBUTES.index("Smiling")

    def scores(x):
        return attribute_scores(prediction_matrix(faces_setup["predictor"].predict(eight_bit(x))),
                                PREDICTED_NAMES)[:, smiling]
    # the predictor's outputs are scaled up some 10^4 times (faces_setup): float32 rounding of other batches shows
    np.testing.assert_allclose(found["faces"]["score_end"], scores(ends), atol=2e-3)
    np.testing.assert_allclose(found["faces"]["score_reference"], scores(reference[rows]), atol=2e-3)
    # the background read off the pixels: its pixels at least 2 px from the head that moved > 2 levels
    with np.load(root / "faces" / "masks_test.npz") as parts:
        order = [str(n) for n in parts["names"]]
        background = parts["masks"][:, list(parts["parts"]).index("background")]
    expected = []
    for b, r in enumerate(rows):
        coverage = background[order.index(paths[r].name)]
        head = np.argwhere(coverage < 255)
        yy, xx = np.mgrid[:32, :32]
        distance = np.sqrt(((yy[..., None] - head[:, 0]) ** 2 + (xx[..., None] - head[:, 1]) ** 2).min(-1))
        counted = (coverage == 255) & (distance >= 2)
        levels = [np.rint((x.clamp(-1, 1).numpy() + 1) * 127.5) for x in (ends[b], reference[r])]
        expected.append(float((np.abs(levels[0] - levels[1]) > 2).any(0)[counted].mean()))
    np.testing.assert_allclose(found["faces"]["background_changed"], expected, atol=1e-12)
    assert max(expected) > 0    # this random network's edits do move the background


def test_region_parts_keep_every_background_pixel(faces_setup):
    out = faces_setup["root"] / "region.json"
    assert ev.main([*faces_setup["args"], "--attributes", "Smiling,Young", "--region_parts", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["setting"]["region"] is True and report["setting"]["name"] == "region"
    for attribute in ("Smiling", "Young"):    # mouth and face: confined edits leave the background's bits
        found = report["edits"][attribute]
        assert found["faces"]["background_changed"] == [0.0] * found["both"]["n"]
        assert found["both"]["background_kept"] == 1.0


def test_region_parts_need_the_masks_and_the_attribute_runs_only(faces_setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ev.main([*faces_setup["args"], "--region_parts", "--entanglement"])
    assert "--region_parts measures the attribute runs only" in capsys.readouterr().err
    data = tmp_path / "faces"
    shutil.copytree(faces_setup["root"] / "faces", data)
    (data / "masks_test.npz").unlink()
    args = [*faces_setup["args"], "--data_dir", str(data)]
    assert ev.main([*args, "--region_parts"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "masks_test.npz is missing" in err[0]
    out = tmp_path / "whole.json"
    assert ev.main([*args, "--attributes", "Young", "--json", str(out)]) == 0   # without masks: no pixel measure
    assert "background_kept" not in json.loads(out.read_text())["edits"]["Young"]["both"]


@pytest.mark.parametrize("unit", ["absolute", "relative"])
def test_joint_with_the_own_position_makes_the_held_edit(faces_setup, unit):
    out = faces_setup["root"] / f"joint_{unit}.json"
    assert ev.main([*faces_setup["args"], "--attributes", "Smiling,Mouth_Slightly_Open", "--per_side", "1",
                    "--unit", unit, "--entanglement", "--entanglement_space", "z", "--entanglement_n", "2",
                    "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["setting"]["start"], report["setting"]["end"]) == ((-2.0, 2.0) if unit == "absolute" else
                                                                      (-3.0, 3.0))
    pair = report["entanglement"]["pairs"][0]
    assert set(pair["variants"]) == {"single", "held", "joint"}
    # the engine's joint move to each face's own position (in the run's unit) is the hold
    assert pair["joint_minus_held_max_abs"] < 1e-4


def test_a_missing_predictor_or_attribute_is_one_line(faces_setup, capsys):
    assert ev.main([*faces_setup["args"], "--predictor", str(faces_setup["root"] / "none.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no factor predictor")
    assert ev.main([*faces_setup["args"], "--attributes", "Wearing_Hat"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Wearing_Hat" in err[0]


def test_normal_diagnostics_on_constructed_latents():
    """faces_normals: the class-mean difference of two clouds shifted along e_0 is e_0 with the
    threshold halfway; separation and d' along it; the share of a normal on a part's pixels."""
    from scripts.evaluation.faces_normals import mean_difference, part_share, separation

    rng = np.random.default_rng(3)
    noise = rng.standard_normal((4000, 12)) * 0.1
    shift = np.zeros(12)
    shift[0] = 2.0
    positive, negative = noise[:2000] + shift + 1.0, noise[2000:] + 1.0
    n, threshold = mean_difference(positive, negative)
    assert abs(n[0]) > 0.999 and n[0] > 0
    assert threshold == pytest.approx(n @ (positive.mean(0) + negative.mean(0)) / 2)
    gap, d_prime = separation(n, positive, negative)
    assert gap == pytest.approx(2.0, abs=0.02) and d_prime == pytest.approx(20.0, rel=0.05)
    normal = np.zeros((3, 2, 2))
    normal[:, 0, 0], normal[:, 1, 1] = 1.0, np.sqrt(3.0)  # a quarter of the energy on pixel (0, 0)
    masks = np.zeros((2, 2, 2))
    masks[0, 0, 0], masks[1, 0, 0], masks[1, 1, 1] = 1.0, 1.0, 1.0  # the second face's part also holds (1, 1)
    assert part_share(normal.ravel(), masks) == pytest.approx((0.25 + 1.0) / 2)


def test_mean_difference_files_hold_the_halfway_hyperplane_of_the_class_means():
    """faces_normals --write_mean_difference: the shipped header with the unit class-mean difference,
    the threshold halfway between the class means' projections as -intercept, and accuracies and
    class summaries of the labelled rows along it (unlabelled rows, 0, left out); midpoint_accuracy
    scores the same rule."""
    from scripts.evaluation.faces_normals import mean_difference, mean_difference_record, midpoint_accuracy
    from utils.io.boundary_files import BoundaryRecord, hyperplane_offset

    rng = np.random.default_rng(5)
    shift = np.zeros(6)
    shift[2] = 3.0
    train = np.concatenate([rng.standard_normal((40, 6)) + shift, rng.standard_normal((60, 6))])
    labels_train = np.array([1] * 40 + [-1] * 60)
    test = np.concatenate([rng.standard_normal((10, 6)) + shift, rng.standard_normal((10, 6)), np.zeros((5, 6))])
    labels_test = np.array([1] * 10 + [-1] * 10 + [0] * 5)
    shipped = BoundaryRecord(normal=np.full(6, 6 ** -0.5, np.float32), coef=np.ones((6,), np.float32), intercept=0.5,
                             shape=(6,), space="z", t_0=400, n_inv_step=40, attribute="a", config_name="faces")
    pos, neg = train[labels_train > 0], train[labels_train < 0]
    normal, threshold = mean_difference(pos, neg)
    record = mean_difference_record(shipped, normal, threshold, train, labels_train, test, labels_test)
    np.testing.assert_allclose(record.normal, normal, rtol=1e-6)
    assert record.intercept == pytest.approx(-(pos.mean(0) + neg.mean(0)) @ normal / 2)
    assert record.attribute == "a" and record.t_0 == 400 and record.normal.dtype == np.float32
    distances = test[:20] @ normal - threshold
    assert record.test_acc == pytest.approx(np.mean(np.sign(distances) == labels_test[:20]))
    assert record.test_acc == pytest.approx(midpoint_accuracy(normal, pos, neg, test, labels_test))
    assert record.class_summary["train"]["pos"]["p50"] == pytest.approx(np.median(pos @ normal - threshold))
    assert hyperplane_offset(record) == pytest.approx(threshold, rel=1e-6)


def test_move_consistency_on_constructed_moves():
    """faces_oracle_directions: identical moves share all their energy with their mean; orthogonal
    moves of equal length share 1/N; components along the mean direction and lengths as constructed."""
    from scripts.evaluation.faces_oracle_directions import move_consistency

    same = move_consistency(np.tile([3.0, 4.0, 0.0], (5, 1)))
    assert same["consistency"] == pytest.approx(1.0) and same["mean_norm"] == pytest.approx(5.0)
    assert same["along_mean"] == pytest.approx(5.0) and same["along_mean_sd"] == pytest.approx(0.0, abs=1e-12)
    orthogonal = move_consistency(2.0 * np.eye(4))
    assert orthogonal["consistency"] == pytest.approx(0.25) and orthogonal["move_norm"] == pytest.approx(2.0)
    assert orthogonal["mean_norm"] == pytest.approx(1.0) and orthogonal["along_mean"] == pytest.approx(1.0)
    mixed = move_consistency(np.array([[1.0, 1.0], [1.0, -1.0]]))  # mean (1, 0): half of each move's energy
    assert mixed["consistency"] == pytest.approx(0.5) and mixed["along_mean_sd"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("extra, expected", [([], (-20.0, 20.0)), (["--region_parts"], (-10.0, 10.0)),
                                             (["--region_parts", "--start", "-8"], (-8.0, 10.0))])
def test_the_evaluations_default_range_is_the_command_lines_region_range_included(extra, expected):
    """faces.yml's edit.region_distance (10): --region_parts without distances evaluates -10..10, as
    main.py's --region edits do; a distance given wins."""
    setting = faces_eval.default_setting(faces_eval.parse(["--config", "faces.yml", *extra]), load_config("faces.yml"))
    assert (setting.start, setting.end) == expected
