"""The evaluation front end (scripts/evaluate_edits.py, scripts/evaluation/) goes through the engine:
a tiny run on a tiny digits-shaped model reports exactly the numbers of direct engine calls, boundaries
are chosen by the engine's rule, the t_0 ablation moves the range by the boundary's centre, and the
dispatch by data set refuses what it cannot evaluate in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from runners.engine import (BoundaryRecord, Denoising, Editor, Engine, EngineOptions, EditRequest, Move,
                            latent_shapes, load_config, load_model, relative_scale, save_boundary)
from scripts import evaluate_edits as ev
from scripts.evaluation import common
from tests.helpers import random_model, tiny_config
from utils.core.boundary import SUMMARY_STATS
from utils.core.seeds import image_key
from utils.io.boundary_files import load_boundary, summary_dict

T_0, N_INV, N_TEST = 300, 4, 4


def _summary(neg: float, pos: float) -> dict:
    """A class summary whose hyperplane distances sit at ``neg`` and ``pos`` (every statistic)."""
    stats = np.array([[[neg] * len(SUMMARY_STATS), [pos] * len(SUMMARY_STATS)]] * 2, dtype=np.float64)
    return summary_dict(stats)


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    """A tiny one-channel DDPM whose config names the digits data set, a digits folder (images/train
    with 2 digits of classes 0 and 1 each, images/test with one, list_attr_digits.txt) and random
    ``thick`` boundaries at t_0 300 and 400 with class summaries."""
    root = tmp_path_factory.mktemp("eval")
    raw = tiny_config("ddpm", name="tiny_digits")
    raw["data"].update(dataset="digits", channels=1)
    raw["model"].update(in_channels=1, out_ch=1)
    raw["edit"].update(t_0=T_0, n_inv_step=N_INV, n_test_step=N_TEST, start_distance=-2, end_distance=2,
                       edit_img_number=3)
    (root / "tiny.yml").write_text(yaml.safe_dump(raw))
    torch.save(random_model(raw, seed=5).state_dict(), root / "w.pt")
    rng, rows = np.random.default_rng(0), []
    for split, per_class in (("train", 2), ("test", 1)):
        (root / "digits" / "images" / split).mkdir(parents=True)
        for c in (0, 1):
            for i in range(per_class):
                name = f"{split}{c}{i}.png"
                Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8)).save(root / "digits" / "images" /
                                                                                     split / name)
                rows.append(f"{name} " + " ".join("1" if d == c else "-1" for d in range(10)))
    (root / "digits" / "list_attr_digits.txt").write_text(
        f"{len(rows)}\n" + " ".join(f"digit_{d}" for d in range(10)) + "\n" + "\n".join(rows) + "\n")
    shapes = latent_shapes(load_config(root / "tiny.yml"))
    for t_0, (neg, pos) in ((T_0, (-1.0, 2.0)), (400, (-3.0, 3.0))):
        for space, shape in shapes.items():
            normal = np.random.default_rng(t_0 + len(space)).normal(size=int(np.prod(shape)))
            normal = (normal / np.linalg.norm(normal)).astype(np.float32)
            save_boundary(root / "bd" / f"tiny_digits_thick_t{t_0}_{space}.npz",
                          BoundaryRecord(normal=normal, coef=2 * normal, intercept=0.5, shape=shape, space=space,
                                         t_0=t_0, n_inv_step=N_INV, attribute="thick", config_name="tiny_digits",
                                         class_summary=_summary(neg, pos)))
    args = ["--config", str(root / "tiny.yml"), "--model_path", str(root / "w.pt"), "--data_dir", str(root / "digits"),
            "--boundary_dir", str(root / "bd"), "--n_test", "2", "--threads", "1", "--batch_size", "4"]
    return {"root": root, "args": args}


def test_a_tiny_run_reports_the_numbers_of_direct_engine_calls(digits_setup, monkeypatch):
    calls = {"edit_all": 0, "reconstruct": 0, "regenerate": 0, "describe": 0}
    for cls, name in ((Editor, "edit_all"), (Editor, "reconstruct"), (Editor, "regenerate"), (Engine, "describe")):
        original = getattr(cls, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            calls[_name] += 1
            return _original(self, *a, **kw)
        monkeypatch.setattr(cls, name, counted)
    out = digits_setup["root"] / "report.json"
    assert ev.main([*digits_setup["args"], "--json", str(out)]) == 0
    # one edit, its reference (reconstruct, which regenerates with the edit's h injection), the plain
    # regeneration of fidelity, and the descriptions (the edit's, and the probe placing the latents)
    assert calls == {"edit_all": 1, "reconstruct": 1, "regenerate": 2, "describe": 2}
    report = json.loads(out.read_text())
    monkeypatch.undo()

    # the same edit made by hand with the engine
    root = digits_setup["root"]
    model = load_model(root / "tiny.yml", root / "w.pt")
    engine = Engine(model, EngineOptions(cache_root=None, show_progress=False))
    paths = sorted((root / "digits" / "images" / "test").glob("*.png"))
    images = torch.stack([engine.reader(False).read(p) for p in paths])
    request = EditRequest((Move("thick", -2.0, 2.0),), Denoising(N_TEST, 1.0, "lagged", 1234, 4), k=3)
    description = engine.describe(request, T_0, N_INV, engine.boundary_index(root / "bd"))
    with engine.session(T_0, N_INV) as editor:
        latents, _ = editor.invert(images, 4)
        reference = editor.reconstruct(latents, description)
        edits = editor.edit_all(latents, description, [(image_key(image),) for image in images])
        plain = editor.regenerate(latents, Denoising(N_TEST, batch_size=4), inject_h=False)

    def unit(x):
        return ((x.float().clamp(-1, 1) + 1) / 2)
    run = report["runs"][0]
    assert report["test_digits"] == [p.name for p in paths]
    assert run["distances"] == description.distances() == pytest.approx([-2.0, 0.0, 2.0])
    ink_edit, ink_ref = unit(edits).flatten(2).sum(2).double(), unit(reference).flatten(1).sum(1).double()
    assert run["ink_ratio_per_distance"] == (ink_edit / ink_ref[:, None]).mean(0).tolist()
    assert run["pixel_change"] == float((unit(edits) - unit(reference)[:, None]).abs().mean())
    assert report["fidelity"][str(T_0)]["mse"] == float(((unit(plain) - unit(images)) ** 2).mean())
    assert report["boundaries"][str(T_0)]["z"]["path"] == str(root / "bd" / "tiny_digits_thick_t300_z.npz")
    z_values = [d["z"] for d in description.source_distances(latents)]
    assert report["boundaries"][str(T_0)]["z"]["projection_mean_std"][0] == pytest.approx(np.mean(z_values), abs=1e-12)


def test_the_t0_ablation_moves_the_range_by_the_change_of_the_boundarys_centre(digits_setup):
    root = digits_setup["root"]
    model = load_model(root / "tiny.yml", root / "w.pt")
    runner = common.EngineRunner(common.evaluation_engine(model, False), torch.zeros(1, 1, 16, 16), N_INV, 4,
                                 root / "bd")
    centre = {t: relative_scale(load_boundary(root / "bd" / f"tiny_digits_thick_t{t}_z.npz"))[0] for t in (T_0, 400)}
    # the centre is midway between the class medians in v.n: (-1 + 2) / 2 and (-3 + 3) / 2, plus -b/||w|| = -0.25
    assert centre[T_0] == pytest.approx(0.25) and centre[400] == pytest.approx(-0.25)
    shift = common.t_0_shift(runner, "thick", 400, T_0)
    assert shift == pytest.approx(centre[400] - centre[T_0])
    default = common.Setting("default", t_0=T_0, start=-2.0, end=2.0, k=3)
    settings = {s.name: s for s in common.ablations(default, [T_0, 400], [0.5], lambda t: shift)}
    assert list(settings) == ["z only", "h only", "h once", "eta 0", "t_0 400", "range x0.5"]
    assert (settings["t_0 400"].start, settings["t_0 400"].end) == (-2.5, 1.5)
    assert (settings["range x0.5"].start, settings["range x0.5"].end) == (-1.0, 1.0)


def test_z_distances_are_the_projections_on_the_unit_normal(digits_setup):
    root = digits_setup["root"]
    model = load_model(root / "tiny.yml", root / "w.pt")
    runner = common.EngineRunner(common.evaluation_engine(model, False), torch.zeros(1, 1, 16, 16), N_INV, 4,
                                 root / "bd")
    probe = runner.probe("thick", T_0, space="z")
    z = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    normal = torch.from_numpy(load_boundary(root / "bd" / "tiny_digits_thick_t300_z.npz").normal).double()
    expected = (z.flatten(1).double() @ (normal / normal.norm())).numpy()
    np.testing.assert_allclose(common.z_distances(probe, z), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="moves z only"):
        common.z_distances(runner.probe("thick", T_0), z)


def test_missing_boundaries_and_unknown_data_sets_are_one_line(digits_setup, tmp_path, capsys):
    args = list(digits_setup["args"])
    assert ev.main([*args, "--t_0", "200"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "fitted at t_0 300, 400" in err[0]
    raw = yaml.safe_load((digits_setup["root"] / "tiny.yml").read_text())
    raw["data"]["dataset"] = "synthetic"
    (tmp_path / "other.yml").write_text(yaml.safe_dump(raw))
    assert ev.main(["--config", str(tmp_path / "other.yml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no evaluation for data set 'synthetic'" in err[0] and "digits" in err[0]
