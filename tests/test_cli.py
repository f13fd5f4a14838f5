"""The four modes end to end through main.py on tiny random-weight models of both families,
and the one-line errors for bad input."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

import main as cli
from runners.engine.boundaries import AUTO_SCALE, auto_span
from tests.helpers import REPO, assert_one_error_line, write_labelled_set
from utils.io.boundary_files import BoundaryRecord, auto_range, load_boundary, save_boundary
from utils.core.diffusion import make_alphas_cumprod
from utils.core.seeds import RADIUS_NOISE, item_seed
from utils.io.images import load_image


def run(argv, capsys):
    """main.py on ``argv``; on the fast digits model unless ``argv`` names a config (the default is the faces)."""
    argv = [str(a) for a in argv]
    if "--config" not in argv:
        argv = ["--config", "digits.yml", *argv]
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture(scope="module")
def searched(tiny_setup, tmp_path_factory):
    """A finished boundary search on a generated labelled set: (common args, boundary paths, root)."""
    cfg_path, ckpt, config = tiny_setup
    root = tmp_path_factory.mktemp("cli")
    img_dir, attr = write_labelled_set(root, n=16)
    common = ["--config", cfg_path, "--model_path", ckpt, "--cache_dir", root / "cache"]
    code = cli.main([str(a) for a in ["--boundary_search", *common, "--exp", root / "run", "--data_dir", img_dir,
                                     "--attr_file", attr, "--edit_attr", "bright_LEFT", "--n_train_img", 10,
                                     "--n_test_img", 6, "--boundary_dir", root / "bd", "--bs_train", 4]])
    assert code == 0
    name = f"{config['name']}_bright_left_t300"
    return common, {"h": root / "bd" / f"{name}_h.npz", "z": root / "bd" / f"{name}_z.npz"}, root


def test_boundary_search_outputs(searched, tiny_setup):
    common, paths, root = searched
    summary = json.loads((root / "run" / "boundary_search" / "summary.json").read_text())
    assert summary["n_train"] == 10 and summary["n_test"] == 6
    assert set(summary["train_images"]).isdisjoint(summary["test_images"])
    for space, shape in (("h", (32, 8, 8)), ("z", (3, 16, 16))):
        with np.load(paths[space], allow_pickle=False) as data:
            assert str(data["space"]) == space
            assert tuple(data["shape"]) == shape
            assert data["normal"].dtype == np.float32 and data["normal"].shape == (int(np.prod(shape)),)
            assert abs(float(np.linalg.norm(data["normal"])) - 1) < 1e-5
            assert int(data["t_0"]) == 300 and int(data["n_inv_step"]) == 4
            assert str(data["attribute"]) == "bright_LEFT" and str(data["config_name"]) == tiny_setup[2]["name"]
            assert len(str(data["checkpoint_sha256"])) == 64
            for key in ("coef", "intercept", "train_acc", "test_acc", "n_pos", "n_neg"):
                assert key in data.files
            stored = float(data["train_acc"]), float(data["test_acc"])
        # The two classes differ by +150 grey levels over opposite halves of the image: separable
        # with a wide margin in z and, through a random network, in h, train and test alike.
        accuracy = summary["spaces"][space]
        assert (accuracy["train_acc"], accuracy["test_acc"]) == stored == (1.0, 1.0), (space, accuracy)


def test_boundary_search_resumes_from_cache_and_never_overwrites(searched, capsys):
    common, paths, root = searched
    before = {p: p.read_bytes() for p in paths.values()}
    img_dir, attr = root / "images", root / "attrs.txt"
    code, err = run(["--boundary_search", *common, "--exp", root / "run", "--data_dir", img_dir, "--attr_file", attr,
                     "--edit_attr", "bright_left", "--n_train_img", 10, "--n_test_img", 6,
                     "--boundary_dir", root / "bd", "--verbose", "info"], capsys)
    assert code == 0
    assert "16 from the cache" in err
    assert (root / "run" / "boundary_search-1" / "summary.json").is_file()
    assert all(p.read_bytes() == b for p, b in before.items()), "an earlier boundary file was overwritten"
    again = {s: p.with_name(p.stem + "-1.npz") for s, p in paths.items()}
    # Bit for bit by construction: the latents come back from the cache as stored, the split is
    # seeded, and the same SVM code runs on the same arrays.
    for space in ("h", "z"):  # same latents, same split -> the same boundary
        with np.load(paths[space]) as a, np.load(again[space]) as b:
            np.testing.assert_array_equal(a["normal"], b["normal"])


def test_edit_image_boundary_outputs(searched, capsys):
    common, paths, root = searched
    exp = root / "edit_run"
    code, err = run(["--edit_image_boundary", *common, "--exp", exp, "--img_path", root / "images" / "000003.png",
                     "--boundary_h", paths["h"], "--boundary_z", paths["z"], "--start_distance", -10,
                     "--end_distance", 10, "--edit_img_number", 3, "--save_tensors", "--seed", 7], capsys)
    assert code == 0, err
    out = exp / "edit"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["edit_00_d-10.00.png", "edit_01_d+0.00.png", "edit_02_d+10.00.png", "grid.png",
                     "original.png", "reconstruction.png", "summary.json", "tensors.pt"]
    for name in names:
        if name.endswith(".png"):
            with Image.open(out / name) as img:
                assert img.mode == "RGB"
    tensors = torch.load(out / "tensors.pt", weights_only=True)
    assert tensors["z"].shape == (1, 3, 16, 16) and tensors["h"].shape == (1, 32, 8, 8)
    assert tensors["recon"].shape == (1, 3, 16, 16) and tensors["edits"].shape == (3, 3, 16, 16)
    assert tensors["distances"].tolist() == [-10.0, 0.0, 10.0]
    assert tensors["edits"].abs().max() <= 1 and tensors["recon"].abs().max() <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distances"] == [-10.0, 0.0, 10.0] and len(summary["seeds"][0]) == 3
    assert set(summary["source_distances"]) == {"z", "h"}
    assert summary["arguments"]["job"]["request"]["denoising"]["eta"] == 1.0 and len(summary["checkpoint_sha256"]) == 64
    (h_boundary,) = summary["edit"]["spaces"]["h"]["boundaries"].values()
    assert h_boundary["space"] == "h" and h_boundary["path"] == str(paths["h"])


def test_edit_batch_size_does_not_change_results(searched, capsys):
    common, paths, root = searched
    results = []
    for bs in (1, 3):
        exp = root / f"bs{bs}"
        code, err = run(["--edit_image_boundary", *common, "--exp", exp, "--img_path", root / "images" / "000004.png",
                         "--boundary_h", paths["h"], "--boundary_z", paths["z"], "--edit_img_number", 3,
                         "--edit_batch_size", bs, "--save_tensors", "--eta", 1.0], capsys)
        assert code == 0, err
        results.append(torch.load(exp / "edit" / "tensors.pt", weights_only=True)["edits"])
    assert torch.allclose(results[0], results[1], atol=1e-5), (results[0] - results[1]).abs().max()


def test_unconditional_and_radius(searched, capsys):
    common, paths, root = searched
    code, err = run(["--unconditional", *common, "--exp", root / "unc", "--boundary_h", paths["h"],
                     "--boundary_z", paths["z"], "--n_inv_step", 5, "--save_tensors"], capsys)
    assert code == 0, err
    out = root / "unc" / "unconditional"
    assert {"grid.png", "summary.json", "tensors.pt"} <= {p.name for p in out.iterdir()}
    assert not (out / "original.png").exists()
    tensors = torch.load(out / "tensors.pt", weights_only=True)
    assert tensors["edits"].shape == (3, 3, 16, 16) and "recon" not in tensors

    code, err = run(["--radius", *common, "--exp", root / "rad", "--data_dir", root / "images", "--n_test_img", 4,
                     "--radius_step", 250, "--radius_eps", 0.9], capsys)
    assert code == 0, err
    out = root / "rad" / "radius"
    result = json.loads((out / "radius.json").read_text())
    ts = [0, 250, 500, 750, 999]
    assert result["t"] == ts and result["n_real"] == 4 and result["n_sampled"] == 4
    # The curves the runner wires up, checked against the images it read (the first 4 by name):
    real = torch.cat([load_image(root / "images" / f"{i:06d}.png", 16, 3) for i in range(4)]).double()
    d, mean_sq = 3 * 16 * 16, float(real.flatten(1).pow(2).sum(1).mean())
    ac = make_alphas_cumprod(0.0001, 0.02, 1000)
    for t, analytic in zip(ts, result["radius_analytic"]):
        a_t = float(ac[t])
        assert abs(analytic - np.sqrt(a_t * mean_sq + (1 - a_t) * d)) < 1e-9 * analytic, (t, analytic)
    # At t = 0 the inverted latents are the images themselves; at T - 1 the sampled ones are the
    # drawn standard normals, whose radius concentrates at sqrt(d) (4 draws: within 5 %).
    assert abs(result["radius_inverted"][0] - float(real.flatten(1).norm(dim=1).mean())) < 1e-5
    assert abs(result["radius_sampled"][-1] / np.sqrt(d) - 1) < 0.05, result["radius_sampled"]
    # (the curves and t_m against hand-derived values: test_radius_on_a_network_that_predicts_no_noise)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["t_m"] == result["t_m"] and summary["epsilon"] == 0.9
    csv = (out / "radius.csv").read_text().splitlines()
    assert csv[0].startswith("t,radius_sampled") and [int(row.split(",")[0]) for row in csv[1:]] == ts


def test_radius_on_a_network_that_predicts_no_noise(tiny_setup, tmp_path, capsys):
    """With eps = 0 every DDIM move (eta 0) from t to t' scales x by sqrt(a_t' / a_t), so by hand:
    r_inverted(t) = sqrt(a_t / a_0) mean ||x||, r_sampled(t) = sqrt(a_t / a_{T-1}) mean ||n||, and the
    relative difference is the same at every t: |1 - sqrt(a_{T-1} / a_0) mean ||x|| / mean ||n|||."""
    cfg_path, _, config = tiny_setup
    zero = tmp_path / "zero.pt"  # every weight 0: the output convolution predicts eps = 0 exactly
    torch.save({k: torch.zeros_like(v) for k, v in torch.load(tiny_setup[1], weights_only=True).items()}, zero)
    img_dir, _ = write_labelled_set(tmp_path, n=3)
    code, err = run(["--radius", "--config", cfg_path, "--model_path", zero, "--no_cache", "--exp", tmp_path / "r",
                     "--data_dir", img_dir, "--n_test_img", 3, "--radius_step", 400, "--radius_eps", 0.5], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "r" / "radius" / "radius.json").read_text())
    ts = [0, 400, 800, 999]
    assert result["t"] == ts
    betas = [0.0001 + s * (0.02 - 0.0001) / 999 for s in range(1000)]
    a = list(np.cumprod([1.0 - b for b in betas]))
    real = torch.cat([load_image(img_dir / f"{i:06d}.png", 16, 3) for i in range(3)]).double()
    # the noise: 3 draws of x_{T-1} from the documented seed rule's RADIUS_NOISE stream
    noise = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(item_seed(1234, domain=RADIUS_NOISE)))
    r_x, r_n = float(real.flatten(1).norm(dim=1).mean()), float(noise.double().flatten(1).norm(dim=1).mean())
    for t, inverted, sampled, diff in zip(ts, result["radius_inverted"], result["radius_sampled"],
                                          result["relative_difference"]):
        assert inverted == pytest.approx(np.sqrt(a[t] / a[0]) * r_x, rel=1e-6)
        assert sampled == pytest.approx(np.sqrt(a[t] / a[999]) * r_n, rel=1e-6)
        assert diff == pytest.approx(abs(1 - np.sqrt(a[999] / a[0]) * r_x / r_n), rel=1e-6)
    assert result["relative_difference"][0] > 0.9  # x is about 1/150 of n's size at T - 1: never within 0.5
    assert result["t_m"] is None and json.loads((tmp_path / "r" / "radius" / "summary.json").read_text())["t_m"] is None


def test_bad_inputs_give_one_line_errors(searched, tiny_setup, tmp_path, capsys):
    common, paths, root = searched
    edit = ["--edit_image_boundary", *common, "--exp", tmp_path / "e", "--boundary_h", paths["h"],
            "--boundary_z", paths["z"]]
    # missing image
    assert_one_error_line(*run([*edit, "--img_path", tmp_path / "nope.png"], capsys), "nope.png", "does not exist")
    # a checkpoint of another architecture
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    assert_one_error_line(*run(["--radius", "--config", common[1], "--model_path", wrong, "--exp", tmp_path / "r",
                                 "--data_dir", root / "images"], capsys), "does not fit", "missing")
    # boundary whose shape does not fit the model
    bad = save_boundary(tmp_path / "bad_h.npz", BoundaryRecord(
        normal=np.ones(7, np.float32) / np.sqrt(7), coef=np.ones(7, np.float32), intercept=0.0, shape=(7,),
        space="h", t_0=300, n_inv_step=4))
    assert_one_error_line(*run(["--edit_image_boundary", *common, "--exp", tmp_path / "e", "--boundary_h", bad,
                                 "--boundary_z", paths["z"], "--img_path", root / "images" / "000001.png"], capsys),
                           "shape (7,)")
    # a z boundary given as h
    assert_one_error_line(*run(["--edit_image_boundary", *common, "--exp", tmp_path / "e", "--boundary_h", paths["z"],
                                 "--boundary_z", paths["z"], "--img_path", root / "images" / "000001.png"], capsys),
                           "z space")
    search = ["--boundary_search", *common, "--exp", tmp_path / "s", "--data_dir", root / "images",
              "--attr_file", root / "attrs.txt", "--boundary_dir", tmp_path / "bd"]
    # unknown attribute (the message lists the names)
    assert_one_error_line(*run([*search, "--edit_attr", "Smiling"], capsys), "Smiling", "Bright_Left")
    # labels of one class only
    assert_one_error_line(*run([*search, "--edit_attr", "always"], capsys), "16 positive and 0 negative")
    # t_0 out of range
    assert_one_error_line(*run([*search, "--edit_attr", "bright_left", "--t_0", 1000], capsys), "--t_0")
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists() and not (tmp_path / "bd").exists(), \
        "a failed run left output behind"


def test_cli_process_exit_code_and_message(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--edit_image_boundary", "--img_path",
                           str(tmp_path / "missing.png"), "--model_path", str(tmp_path / "missing.pt"),
                           "--exp", str(tmp_path / "x")], capture_output=True, text=True, cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stderr)


def test_precision_bf16_runs_and_stays_close_to_fp32(searched, capsys):
    common, paths, root = searched
    edits = {}
    for precision in ("fp32", "bf16"):
        exp = root / f"prec_{precision}"
        code, err = run(["--edit_image_boundary", *common, "--exp", exp, "--img_path", root / "images" / "000002.png",
                         "--boundary_h", paths["h"], "--boundary_z", paths["z"], "--edit_img_number", 2, "--eta", 0,
                         "--precision", precision, "--save_tensors"], capsys)
        assert code == 0, err
        edits[precision] = torch.load(exp / "edit" / "tensors.pt", weights_only=True)["edits"]
    diff = (edits["fp32"] - edits["bf16"]).abs()
    assert 0 < diff.max() < 0.25, diff.max()  # bf16 really ran, and is not far off on a random tiny net


def test_precision_fp16_on_cpu_is_refused(searched, capsys):
    common, paths, root = searched
    code, err = run(["--radius", *common, "--exp", root / "fp16", "--data_dir", root / "images", "--device", "cpu",
                     "--precision", "fp16"], capsys)
    assert_one_error_line(code, err, "fp16 needs a CUDA GPU")


def test_edit_without_boundary_flags_uses_the_newest_matching_boundaries(searched, capsys):
    common, paths, root = searched
    code, err = run(["--unconditional", *common, "--exp", root / "auto", "--boundary_dir", root / "bd",
                     "--edit_attr", "bright_left", "--n_inv_step", 3], capsys)
    assert code == 0, err
    summary = json.loads((root / "auto" / "unconditional" / "summary.json").read_text())
    assert {s: [Path(b["path"]).parent for b in e["boundaries"].values()] for s, e in summary["edit"]["spaces"].items()} \
        == {"h": [root / "bd"], "z": [root / "bd"]}
    code, err = run(["--unconditional", *common, "--exp", root / "auto2", "--boundary_dir", root / "bd",
                     "--edit_attr", "smiling"], capsys)
    assert_one_error_line(code, err, "no boundary")


@pytest.mark.parametrize("mode", [["--edit_image_boundary", "--img_path", "imgs/digit_example.png"], ["--unconditional"]])
def test_discovery_without_edit_attr_refuses_to_mix_the_shipped_attributes(mode, tmp_path, capsys):
    """In a fresh clone every shipped boundary has the same file time: without --edit_attr, and with
    a config that names no default attribute (``edit.attribute``), the run must stop and list the
    attributes, never edit z along one and h along another."""
    config = yaml.safe_load((REPO / "configs" / "digits.yml").read_text())
    config["edit"].pop("attribute")
    (tmp_path / "digits.yml").write_text(yaml.safe_dump(config))
    code, err = run([*mode, "--config", tmp_path / "digits.yml", "--exp", tmp_path / "run", "--boundary_dir",
                     REPO / "boundary"], capsys)
    shipped = ", ".join([*(f"digit_{k}" for k in range(10)), "slant", "thick", "three_vs_eight"])
    assert_one_error_line(code, err, "several attributes", shipped, "--edit_attr")
    assert not (tmp_path / "run").exists()


def test_without_edit_attr_the_configs_attribute_is_edited(tmp_path, capsys):
    """digits.yml names ``thick`` (edit.attribute): the attribute an edit takes when none is named."""
    code, err = run(["--unconditional", "--exp", tmp_path, "--edit_img_number", 2, "--n_test_step", 3], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "unconditional" / "summary.json").read_text())
    assert summary["edit"]["attributes"] == ["thick"]


def test_auto_distances_span_each_spaces_classes(tmp_path, capsys):
    """--start_distance auto --end_distance auto: each moved space gets K distances across its
    boundary's classes (negative 5th to positive 95th percentile, widened), and the edits set them."""
    boundaries = {s: REPO / "boundary" / f"digits_thick_t200_{s}.npz" for s in ("z", "h")}
    code, err = run(["--edit_image_boundary", "--edit_attr", "thick", "--img_path", REPO / "imgs" / "digit_example.png",
                     "--start_distance", "auto", "--end_distance", "auto", "--edit_img_number", 4, "--n_inv_step", 10,
                     "--n_test_step", 10, "--save_tensors", "--no_cache", "--exp", tmp_path], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "edit" / "summary.json").read_text())
    records = {s: load_boundary(p) for s, p in boundaries.items()}
    want = {s: torch.linspace(*auto_span(r), 4, dtype=torch.float64).tolist() for s, r in records.items()}
    low, high = auto_range(records["z"])  # the classes' span, widened by AUTO_SCALE about its centre
    assert want["z"][0] == pytest.approx((low + high) / 2 - AUTO_SCALE * (high - low) / 2)
    assert summary["distances"] == want["z"]
    assert [t["thick"] for t in summary["targets"]] == [{"z": z, "h": h} for z, h in zip(want["z"], want["h"])]
    tensors = torch.load(tmp_path / "edit" / "tensors.pt", weights_only=True)
    for space, key in (("z", "edited_z"), ("h", "edited_h")):
        normal = torch.from_numpy(records[space].normal).double()
        reached = tensors[key].flatten(1).double() @ (normal / normal.norm())
        assert torch.allclose(reached, torch.tensor(want[space], dtype=torch.float64), atol=1e-4), (space, reached)


def test_auto_distances_need_both_ends_and_a_boundary_with_class_summaries(tmp_path, capsys):
    common = ["--edit_image_boundary", "--img_path", REPO / "imgs" / "digit_example.png", "--exp", tmp_path / "a"]
    code, err = run([*common, "--edit_attr", "thick", "--start_distance", "auto"], capsys)
    assert_one_error_line(code, err, "both ends")
    record = load_boundary(REPO / "boundary" / "digits_thick_t200_z.npz")
    old = save_boundary(tmp_path / "old_z", dataclasses.replace(record, class_summary=None))
    code, err = run([*common, "--boundary_z", old, "--edit_space", "z", "--start_distance", "auto",
                     "--end_distance", "auto"], capsys)
    assert_one_error_line(code, err, "no class summary", "--boundary_search")


def test_an_empty_or_listed_edit_attr_is_one_line_not_the_configs_attribute(tmp_path, capsys):
    """Before: --edit_attr '' (an unset shell variable) edited the config's own attribute without a
    word, and an edit given a,b was told that no boundary named 'a,b' exists."""
    edit = ["--edit_image_boundary", "--img_path", REPO / "imgs" / "digit_example.png", "--exp", tmp_path / "e"]
    for value in ("", "  "):
        assert_one_error_line(*run([*edit, "--edit_attr", value], capsys), "--edit_attr", "needs an attribute name")
    assert_one_error_line(*run([*edit, "--edit_attr", "thick,slant"], capsys), "one attribute here",
                          "--edit A=START:END")
    assert not (tmp_path / "e").exists()
