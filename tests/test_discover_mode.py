"""Directions without labels as a mode (runners/engine/discover.py, within.py, t0_report.py), end to
end on the tiny random model of tests/helpers.py: discovered directions written as boundary files
that load, edit by name (absolute, relative, auto), build an atlas and a contact sheet; naming
after constructed supervised normals; a few labels fitted inside the discovered subspace; the t_0
report and its rule. The tiny model's Jacobian has nearly equal singular values (tests/test_discovery.py),
so these tests check the mode's mechanics and contracts, not what the directions mean.

The tests marked ``integrated`` run through ``Engine.run`` and ``main.py`` once the engine
dispatches the new jobs (skipped before)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from runners.engine import BoundaryIndex, Denoising, EditRequest, Inverting, Move, auto_span, load_model, relative_scale
from runners.engine.describe import describe_edit
from runners.engine.discover import (DiscoverJob, Directions, direction_names, factor_matches, is_discovered_name,
                                     median_split, name_directions, orient, pair_h, plan_discover, run_discover,
                                     supervised_normals)
from runners.engine.editor import Editor, ImageReader
from runners.engine.t0_report import Labelled, balanced_split, recommend_t0, t0_report
from runners.engine.within import coordinates, fit_space_within, within_basis
from tests.helpers import make_edit_setup, write_labelled_set
from utils.core.boundary import hyperplane_distances
from utils.core.discovery import fit_within
from utils.errors import UserError
from utils.io.atlas import atlas_from_dir
from utils.io.boundary_files import BoundaryRecord, load_boundary, save_boundary
from utils.io.files import RunFolder

torch.set_num_threads(1)

T_0, N_INV = 300, 5


def _job(root: Path, images: Path, boundary_dir: Path, **kw) -> DiscoverJob:
    options = dict(n_images=6, n_directions=3, oversample=2, n_power_iter=2, sheet_images=2, sheet_points=3)
    options.update(kw)
    return DiscoverJob(Inverting(T_0, N_INV, 4), images, None, boundary_dir, Denoising(N_INV), **options)


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    """One discovery of 3 directions from 6 images into a folder holding two supervised attributes."""
    root = tmp_path_factory.mktemp("discover")
    setup = make_edit_setup(root, n_images=6, t_0=T_0)
    model = load_model(root / "tiny.yml", root / "w.pt")
    job = _job(root, setup["images"], root / "bd")
    plan = plan_discover(job, model.config)
    editor = Editor(model, T_0, N_INV, root / "cache", show_progress=False)
    index = BoundaryIndex.of(root / "bd", model.config.name, model.shapes)
    folder = RunFolder(root / "exp", "discover")
    with folder as run_dir:
        summary = run_discover(editor, job, plan, index, folder, run_dir, {"arguments": {}})
    return {"root": root, "setup": setup, "model": model, "editor": editor, "job": job, "summary": summary,
            "run_dir": folder.final, "names": plan.names}


# ------------------------------------------------------------------------------ the files

def test_discovered_files_load_as_boundaries(discovered):
    model, summary = discovered["model"], discovered["summary"]
    assert discovered["names"] == ("pc_00", "pc_01", "pc_02")
    normals = {"z": [], "h": []}
    for name in discovered["names"]:
        for space in ("z", "h"):
            path = Path(summary["written"][name][space])
            assert path.name == f"tiny_ed_{name}_t{T_0}_{space}.npz"
            record = load_boundary(path, dict(model.shapes))
            assert (record.attribute, record.space, record.t_0, record.n_inv_step) == (name, space, T_0, N_INV)
            assert record.config_name == "tiny_ed" and record.checkpoint_sha256 == model.checkpoint_sha256
            assert record.intercept == 0.0 and np.array_equal(record.normal, record.coef)
            assert record.n_train == 6 and record.n_test == 0 and (record.n_pos, record.n_neg) == (3, 3)
            train = record.class_summary["train"]
            assert train["neg"]["p50"] < train["pos"]["p50"] and train["neg"]["p95"] <= train["pos"]["p5"]
            assert all(np.isnan(v) for v in record.class_summary["test"]["pos"].values())
            normals[space].append(record.normal.astype(np.float64))
    for space, rows in normals.items():  # each space's directions are orthonormal (float32 storage)
        V = np.stack(rows)
        np.testing.assert_allclose(V @ V.T, np.eye(3), atol=1e-6)


def test_class_summary_is_the_median_split_of_the_projections(discovered):
    editor, summary = discovered["editor"], discovered["summary"]
    reader = ImageReader.for_config(editor.config, align_face=False)
    images = torch.stack([reader.read(p) for p in summary["images"]])
    latents, hits = editor.invert(images, 4)
    assert hits == len(images)  # the discovery's inversions came from the cache
    record = load_boundary(summary["written"]["pc_01"]["h"])
    projections = latents.h.double().reshape(len(images), -1).numpy() @ record.normal.astype(np.float64)
    y = median_split(projections)
    assert y.sum() == 3 and projections[y == 1].min() > projections[y == 0].max()
    np.testing.assert_allclose(record.class_summary["train"]["pos"]["p50"], np.median(projections[y == 1]), rtol=1e-9)
    np.testing.assert_allclose(record.class_summary["train"]["neg"]["mean"], projections[y == 0].mean(), rtol=1e-9)


def test_edits_name_the_directions_by_attribute_and_auto_and_relative_work(discovered):
    model, root = discovered["model"], discovered["root"]
    index = BoundaryIndex.of(root / "bd", model.config.name, model.shapes)
    assert {"pc_00", "pc_01", "pc_02", "bright", "slanted"} <= set(index.attributes(T_0))
    auto = describe_edit(EditRequest((Move("pc_02", auto=True),), Denoising(N_INV), k=3), index, model.identity,
                         T_0, N_INV)
    for space, edit in auto.spaces.items():
        low, high = auto_span(edit.records[0])
        np.testing.assert_allclose(edit.targets[:, 0], [low, (low + high) / 2, high])
        assert np.isfinite(edit.targets).all() and low < high
    relative = describe_edit(EditRequest((Move("pc_02", -1, 1),), Denoising(N_INV), k=2, unit="relative"), index,
                             model.identity, T_0, N_INV)
    for space, edit in relative.spaces.items():
        train = edit.records[0].class_summary["train"]
        np.testing.assert_allclose(edit.targets[:, 0], [train["neg"]["p50"], train["pos"]["p50"]], rtol=1e-9)
        assert relative_scale(edit.records[0]) is not None
    # moved together with a supervised attribute, and edited
    both = describe_edit(EditRequest((Move("pc_00", -2, 2), Move("bright", 0, 0)), Denoising(N_INV), k=2), index,
                         model.identity, T_0, N_INV)
    editor = discovered["editor"]
    latents, _ = editor.invert(torch.zeros(2, 3, 16, 16), 4)
    out = editor.edit_all(latents, both, [(1,), (2,)])
    assert out.shape == (2, 2, 3, 16, 16) and torch.isfinite(out).all()


def test_the_atlas_takes_the_directions(discovered):
    atlas = atlas_from_dir(discovered["root"] / "bd")
    assert set(atlas["attributes"]) == {"bright", "slanted", "pc_00", "pc_01", "pc_02"}
    i, j = atlas["attributes"].index("pc_00"), atlas["attributes"].index("pc_01")
    assert abs(atlas["cosines"]["z"][i][j]) < 1e-6 and atlas["cosines"]["z"][i][i] == pytest.approx(1)


def test_the_app_offers_the_directions_as_sliders(discovered):
    """The web app's attribute table (runners/app_state.py) takes them as it takes any boundary:
    offered, and with a relative unit in both spaces, so each gets a slider."""
    from runners.app_state import AttributeTable
    from runners.engine import Engine, EngineOptions

    model, root = discovered["model"], discovered["root"]
    engine = Engine(model, EngineOptions(show_progress=False))
    table = AttributeTable(engine, BoundaryIndex.of(root / "bd", model.config.name, model.shapes), N_INV, T_0)
    sliders = {a.name for a in table.sliders()}
    assert {"pc_00", "pc_01", "pc_02"} <= sliders
    assert table.get("pc_01").scale("h") == relative_scale(load_boundary(discovered["summary"]["written"]["pc_01"]["h"]))


def test_summary_and_contact_sheet(discovered):
    run_dir, summary = discovered["run_dir"], discovered["summary"]
    written = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "contact_sheet.png").is_file() and written["contact_sheet"] == "contact_sheet.png"
    assert written["mode"] == "discover" and written["n_directions"] == 3 and written["sheet_values"] == [-3, 0, 3]
    assert len(written["names"]) == 3 and set(written["directions"]) == {"pc_00", "pc_01", "pc_02"}
    assert set(summary["written"]) == set(written["directions"])  # the returned summary names the files written
    assert len(written["jacobian"]["last_step_angles"]) == 6
    for found in written["directions"].values():
        assert 0 <= found["z_h_correlation"] <= 1 and found["h"]["component"] in (0, 1, 2)
    # supervised boundaries were there: every direction got a Hungarian partner per space
    assert set(written["captured_share"]) == {"bright", "slanted"}
    from PIL import Image
    width, height = Image.open(run_dir / "contact_sheet.png").size
    assert height > width  # 3 directions x 2 spaces x 2 images rows, 1 + 3 columns


def test_a_second_discovery_without_ni_writes_new_current_files(discovered, tmp_path):
    """Without --ni the files take the next free numbered names and become the current ones."""
    root, model = discovered["root"], discovered["model"]
    bd = tmp_path / "bd"
    shutil.copytree(root / "bd", bd)
    job = _job(root, discovered["setup"]["images"], bd, n_directions=2, sheet_images=0)
    folder = RunFolder(tmp_path / "exp", "discover")
    index = BoundaryIndex.of(bd, model.config.name, model.shapes)
    with folder as run_dir:
        summary = run_discover(discovered["editor"], job, plan_discover(job, model.config), index, folder, run_dir, {})
    assert Path(summary["written"]["pc_00"]["z"]).name == f"tiny_ed_pc_00_t{T_0}_z-1.npz"
    again = BoundaryIndex.of(bd, model.config.name, model.shapes)
    assert again.find("pc_00", T_0)[2]["z"].name.endswith("-1.npz")
    assert summary["contact_sheet"] is None and not (folder.final / "contact_sheet.png").exists()


def test_plan_refuses_before_any_work(discovered, tmp_path):
    model, images = discovered["model"], discovered["setup"]["images"]
    for kw, words in ((dict(n_directions=6), "at least 7 images"), (dict(n_directions=0), "--n_directions"),
                      (dict(prefix="a=b"), "--discover_prefix"), (dict(sheet_points=0), "points"),
                      (dict(n_directions=700, n_images=800), "--n_directions")):
        with pytest.raises(UserError, match=words):
            plan_discover(_job(tmp_path, images, tmp_path / "bd", **kw), model.config)
    with pytest.raises(UserError, match="does not exist|no image"):
        plan_discover(_job(tmp_path, tmp_path / "nothing*.png", tmp_path / "bd"), model.config)


# ------------------------------------------------------------------------------ naming

def _orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def test_naming_on_constructed_files(tmp_path):
    """Supervised normals built from known directions: named one to one, signs turned toward them,
    files of the discovery's own prefix left out, weak partners not printed."""
    shapes = {"z": (1, 4, 4), "h": (2, 2, 2)}
    Q = {"z": _orthogonal(16, 1), "h": _orthogonal(8, 2)}
    smiling = {"z": -0.8 * Q["z"][1] + 0.6 * Q["z"][9], "h": 0.9 * Q["h"][1] + np.sqrt(0.19) * Q["h"][6]}
    young = {"z": 0.7 * Q["z"][0] + np.sqrt(0.51) * Q["z"][12], "h": 0.2 * Q["h"][0] + np.sqrt(0.96) * Q["h"][7]}
    for name, normals in (("Smiling", smiling), ("Young", young), ("pc_07", {"z": Q["z"][2], "h": Q["h"][2]})):
        for space, n in normals.items():
            save_boundary(tmp_path / f"cfg_{name.lower()}_t400_{space}.npz",
                          BoundaryRecord(normal=n.astype(np.float32), coef=n.astype(np.float32), intercept=0.0,
                                         shape=shapes[space], space=space, t_0=400, n_inv_step=10, attribute=name,
                                         config_name="cfg", checkpoint_sha256="ab" * 32))
    save_boundary(tmp_path / "cfg_other_t400_z.npz",  # another checkpoint: not a name
                  BoundaryRecord(normal=Q["z"][2].astype(np.float32), coef=Q["z"][2].astype(np.float32), intercept=0.0,
                                 shape=shapes["z"], space="z", t_0=400, n_inv_step=10, attribute="Other",
                                 config_name="cfg", checkpoint_sha256="cd" * 32))
    index = BoundaryIndex.of(tmp_path, "cfg", shapes)
    supervised = supervised_normals(index, 400, "ab" * 32, "pc", shapes)
    assert set(supervised["z"]) == {"Smiling", "Young"} and set(supervised["h"]) == {"Smiling", "Young"}
    names = direction_names("pc", 3)
    bases = {"z": Q["z"][:3], "h": Q["h"][:3]}
    directions = Directions(bases, np.ones(3), np.ones(3), np.arange(3), np.ones(3), {})
    naming = name_directions(bases, names, supervised)
    assert naming["matches"]["pc_01"]["z"] == {"attribute": "Smiling", "cosine": pytest.approx(-0.8)}
    assert naming["matches"]["pc_00"]["z"]["attribute"] == "Young"
    assert naming["lines"][1] == "pc_01 \u2248 -Smiling (cos -0.80 in z); \u2248 Smiling (cos 0.90 in h)"
    assert naming["lines"][0] == "pc_00 \u2248 Young (cos 0.70 in z)"  # 0.2 in h: below the threshold
    assert naming["lines"][2] == "pc_02: no supervised boundary at |cos| >= 0.3"
    np.testing.assert_allclose(naming["captured"]["Smiling"]["z"], 0.64)
    turned = orient(directions, names, supervised)
    np.testing.assert_array_equal(turned.bases["z"][1], -Q["z"][1])  # toward Smiling in z ...
    np.testing.assert_array_equal(turned.bases["h"][1], -Q["h"][1])  # ... and its h partner with it
    np.testing.assert_array_equal(turned.bases["z"][0], Q["z"][0])
    again = name_directions(turned.bases, names, supervised)
    assert again["lines"][1] == "pc_01 \u2248 Smiling (cos 0.80 in z); \u2248 -Smiling (cos -0.90 in h)"
    assert is_discovered_name("PC_07", "pc") and not is_discovered_name("pc_07b", "pc")


def test_h_directions_are_paired_by_correlation():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 3))
    h = np.stack([0.1 * rng.normal(size=40) + z[:, 2], -z[:, 0] + 0.1 * rng.normal(size=40), z[:, 1]], axis=1)
    order, signs, corr = pair_h(z, h)
    assert order.tolist() == [1, 2, 0] and signs.tolist() == [-1, 1, 1] and (corr > 0.9).all()


def test_factor_matches_with_a_stand_in_predictor():
    """The faces naming: the factor whose measurement changes most along the sequence, its Spearman."""
    from utils.faces.predictor import PREDICTED_CONTINUOUS, PREDICTED_NAMES

    class Predictor:  # measures factor 3 as the mean brightness, factor 5 as its negative, the rest 0
        std = torch.ones(len(PREDICTED_CONTINUOUS))

        def predict(self, x):
            values = torch.zeros(len(x), len(PREDICTED_NAMES))
            values[:, 3] = x.mean(dim=(1, 2, 3))
            values[:, 5] = -0.5 * x.mean(dim=(1, 2, 3))
            return {n: values[:, i] for i, n in enumerate(PREDICTED_NAMES)}

    values = [-1.0, 0.0, 1.0, 2.0]
    brighter = torch.stack([torch.full((4, 3, 32, 32), v / 4) for v in range(2)])  # (B=2, K=4)
    brighter = brighter + torch.linspace(-0.5, 0.5, 4)[None, :, None, None, None]
    found = factor_matches({"pc_00 z": brighter}, values, predictor=Predictor())["pc_00 z"]
    assert found["factor"] == PREDICTED_NAMES[3] and found["spearman"] == pytest.approx(1.0)
    assert found["factors"][PREDICTED_NAMES[5]]["spearman"] == pytest.approx(-1.0)
    assert np.isnan(found["factors"][PREDICTED_NAMES[0]]["spearman"])


# ------------------------------------------------------------------------------ a few labels

@pytest.fixture(scope="module")
def labelled(discovered):
    root = discovered["root"]
    images, attrs = write_labelled_set(root / "labelled", n=16)
    reader = ImageReader.for_config(discovered["model"].config, align_face=False)
    paths = sorted(images.glob("*.png"))
    latents, _ = discovered["editor"].invert(torch.stack([reader.read(p) for p in paths]), 4)
    labels = np.array([1 if i % 2 == 0 else -1 for i in range(16)])
    return {"paths": paths, "latents": latents, "labels": labels, "images": images, "attrs": attrs}


def test_within_takes_the_directions_beside_supervised_boundaries(discovered):
    """The folder --discover wrote into also holds the supervised boundaries it named them after:
    with the prefix, --within takes the directions only (the same basis as a folder of them alone);
    without it, or with a prefix that names none, the non-orthonormal set is refused."""
    model, folder = discovered["model"], discovered["root"] / "bd"
    V, files = within_basis(folder, "tiny_ed", model.shapes, T_0, "z", model.checkpoint_sha256, "pc")
    assert [f.name for f in files] == [f"tiny_ed_pc_0{k}_t{T_0}_z.npz" for k in range(3)]
    expected = np.stack([np.load(discovered["summary"]["written"][n]["z"])["normal"] for n in discovered["names"]])
    np.testing.assert_array_equal(V, expected.astype(np.float64))
    for prefix in (None, "dir"):
        with pytest.raises(UserError, match="not orthonormal"):
            within_basis(folder, "tiny_ed", model.shapes, T_0, "z", model.checkpoint_sha256, prefix)
    with pytest.raises(UserError, match="no z direction"):
        within_basis(folder, "tiny_ed", model.shapes, 200, "z", model.checkpoint_sha256, "pc")


@pytest.mark.parametrize("space", ["z", "h"])
def test_within_fits_the_svm_on_the_coordinates(discovered, labelled, tmp_path, space):
    model, summary = discovered["model"], discovered["summary"]
    dirs = tmp_path / "dirs"
    dirs.mkdir()
    for name in discovered["names"]:
        for s in ("z", "h"):
            shutil.copy(summary["written"][name][s], dirs)
    V, files = within_basis(dirs, "tiny_ed", model.shapes, T_0, space, model.checkpoint_sha256)
    assert V.shape[0] == 3 and [f.name for f in files] == [f"tiny_ed_pc_0{k}_t{T_0}_{space}.npz" for k in range(3)]
    X = getattr(labelled["latents"], space).reshape(16, -1).numpy()
    y = labelled["labels"]
    n_train = 10
    read = lambda a, b: X[a:b]  # noqa: E731 -- the search's row reader, training rows first
    np.testing.assert_allclose(coordinates(read, 0, 16, V), X.astype(np.float64) @ V.T)
    [fit] = fit_space_within(read, n_train, 6, y[:n_train, None], y[n_train:, None], V, C=1.0, balance="none",
                             seed=0, names=("Bright_Left",), space=space)
    want = fit_within(X[:n_train], y[:n_train] > 0, V, X[n_train:], y[n_train:] > 0, C=1.0)
    np.testing.assert_allclose(fit.boundary.normal, want.normal, atol=1e-6)
    np.testing.assert_allclose(fit.boundary.coef, want.coef, rtol=1e-5, atol=1e-7)
    assert fit.boundary.intercept == pytest.approx(want.intercept)
    assert (fit.boundary.train_acc, fit.boundary.test_acc) == (want.train_acc, want.test_acc)
    normal = fit.boundary.normal.astype(np.float64)
    np.testing.assert_allclose(V.T @ (V @ normal), normal, atol=1e-6)  # in the subspace
    np.testing.assert_allclose(fit.train_distances, hyperplane_distances(X[:n_train], want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.test_distances, hyperplane_distances(X[n_train:], want), rtol=1e-5, atol=1e-6)
    assert fit.train_rows.tolist() == list(range(n_train)) and fit.test_rows.tolist() == list(range(6))


# ------------------------------------------------------------------------------ which t_0

def test_t0_report_on_two_timesteps(discovered, labelled):
    paths, y = labelled["paths"], (labelled["labels"] > 0).astype(np.int64)
    train, test = balanced_split(y, 8, 8, seed=0)
    assert set(y[train]) == {0, 1} and set(y[test]) == {0, 1} and not set(train) & set(test)
    report = t0_report(discovered["model"], [100, 300], 5, labelled=Labelled("Bright_Left", tuple(paths), y, train,
                                                                              test), t_m=250, n_linearity=2)
    assert [r["t"] for r in report["rows"]] == [100, 300] and report["rows"][0]["n_inv_step"] == 5
    for row in report["rows"]:
        assert set(row["test_acc"]) == {"z", "h"} and 0 <= row["test_acc"]["z"] <= 1
        assert -1 <= row["linearity"] <= 1 and row["step"] > 0
    assert report["recommended"]["t_0"] in (100, 300) and "t_m 250" in report["recommended"]["versus_t_m"]
    assert report["table"].splitlines()[0].startswith("t,n_inv_step,test_acc_z")
    direction = t0_report(discovered["model"], [2, 300], 20, direction=Path(discovered["summary"]["written"]["pc_00"]["z"]),
                          images=paths[:3], n_linearity=2)
    assert [r["n_inv_step"] for r in direction["rows"]] == [3, 20] and "test_acc" not in direction["rows"][0]
    with pytest.raises(UserError, match="linearity is measured in z"):
        t0_report(discovered["model"], [300], 5, direction=Path(discovered["summary"]["written"]["pc_00"]["h"]),
                  images=paths[:3])


def test_the_t0_rule():
    def row(t, z, h, lin):
        return {"t": t, "n_inv_step": 10, "test_acc": {"z": z, "h": h}, "linearity": lin}
    rows = [row(100, 0.90, 0.92, 0.99), row(200, 0.95, 0.95, 0.97), row(300, 0.945, 0.95, 0.93),
            row(400, 0.96, 0.95, 0.80), row(500, 0.70, 0.80, 0.95)]
    got = recommend_t0(rows, n_test=200, t_m=400)
    assert got["t_0"] == 300 and got["versus_t_m"] == "t_0 300 is below the mixing step t_m 400 (-100)"
    assert got["tolerance"] == pytest.approx(np.sqrt(0.955 * 0.045 / 200))  # one standard error of the best
    assert recommend_t0(rows, n_test=20)["tolerance"] == 0.05  # one test image of 20 (above sqrt(.955 .045 / 20))
    # one standard error of the best (0.86 on 100 images: 0.0347): 0.83 is as accurate, 0.82 is not
    noisy = [row(200, 0.86, 0.86, 0.97), row(300, 0.83, 0.83, 0.95), row(400, 0.82, 0.82, 0.92)]
    got = recommend_t0(noisy, n_test=100)
    assert got["tolerance"] == pytest.approx(np.sqrt(0.86 * 0.14 / 100)) and got["t_0"] == 300
    assert recommend_t0([row(100, 0.9, 0.9, 0.5), row(200, 0.9, 0.9, 0.7)], n_test=100)["t_0"] == 200
    unlabelled = [{"t": t, "linearity": lin} for t, lin in ((100, 0.99), (300, 0.95), (500, 0.6))]
    assert recommend_t0(unlabelled)["t_0"] == 300 and "no labels" in recommend_t0(unlabelled)["rule"]


# ------------------------------------------------------------------------------ through the engine and main.py

def _engine_runs_discover() -> bool:
    from runners.engine import engine

    return any(getattr(job, "__name__", "") == "DiscoverJob" for job in engine.SUBFOLDERS)


def _search_has_within() -> bool:
    from runners.engine import SearchJob

    return "within" in SearchJob.__dataclass_fields__


integrated = pytest.mark.skipif(not (_engine_runs_discover() and _search_has_within()),
                                reason="the engine does not dispatch DiscoverJob / SearchJob.within yet")


@integrated
def test_main_discover_then_edit_then_within(tmp_path):
    from main import main

    setup = make_edit_setup(tmp_path, n_images=6, t_0=T_0)
    common = ["--config", str(tmp_path / "tiny.yml"), "--model_path", str(tmp_path / "w.pt"), "--cache_dir",
              str(tmp_path / "cache"), "--boundary_dir", str(tmp_path / "bd"), "--t_0", str(T_0), "--n_inv_step",
              str(N_INV), "--n_test_step", str(N_INV)]
    assert main(["--discover", *common, "--img_path", str(setup["images"]), "--n_directions", "3",
                 "--n_discover_img", "6", "--oversample", "2", "--n_power_iter", "2", "--exp", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "discover" / "summary.json").read_text())
    assert set(summary["directions"]) == {"pc_00", "pc_01", "pc_02"}
    assert (tmp_path / "run" / "discover" / "contact_sheet.png").is_file()
    assert main(["--edit_image_boundary", *common, "--img_path", str(setup["images"] / "img0.png"), "--edit",
                 "pc_01=auto", "--edit_img_number", "3", "--exp", str(tmp_path / "edit")]) == 0
    dirs = tmp_path / "dirs"
    assert main(["--discover", *common, "--img_path", str(setup["images"]), "--n_directions", "2",
                 "--n_discover_img", "6", "--oversample", "1", "--n_power_iter", "1", "--boundary_dir", str(dirs),
                 "--exp", str(tmp_path / "run2")]) == 0
    images, attrs = write_labelled_set(tmp_path / "labelled", n=16)
    assert main(["--boundary_search", *common, "--boundary_dir", str(tmp_path / "few"), "--within", str(dirs),
                 "--edit_attr", "Bright_Left", "--data_dir", str(images), "--attr_file", str(attrs), "--n_train_img",
                 "10", "--n_test_img", "6", "--exp", str(tmp_path / "search")]) == 0
    model = load_model(tmp_path / "tiny.yml", tmp_path / "w.pt")
    record = load_boundary(tmp_path / "few" / f"tiny_ed_bright_left_t{T_0}_z.npz", dict(model.shapes))
    V, _ = within_basis(dirs, "tiny_ed", model.shapes, T_0, "z")
    normal = record.normal.astype(np.float64)
    np.testing.assert_allclose(V.T @ (V @ normal), normal, atol=1e-6)
