"""The engine package (issue 29): what used to be decided by each front end, or silently, now decided
once in ``runners.engine`` -- checked here through the command line and the engine's own calls.
Each test names the defect it catches."""
from __future__ import annotations

import ast
import dataclasses
import json

import numpy as np
import pytest
import torch

import main as cli
import utils.io.boundary_files as boundary_files
from runners.engine import Denoising, EditRequest, Engine, Move, latent_cache_root
from runners.engine.describe import MAX_HOLD_RATIO, hold_ratios
from runners.engine.editor import Editor
from tests.helpers import REPO, assert_one_error_line, float_tolerance, loaded_tiny_model, make_edit_setup, max_abs
from utils.config import latent_shapes
from utils.io.boundary_files import BoundaryRecord, load_boundary, save_boundary


def run(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_edit_setup(tmp_path_factory.mktemp("engine"), attributes=("bright", "slanted"))


def edit(setup, tmp_path, *argv):
    return ["--edit_image_boundary", *setup["common"], "--img_path", setup["images"] / "img0.png", "--exp",
            tmp_path / "run", *argv]


# ------------------------------------------------------------------ no silent fallbacks

def test_the_relative_unit_without_a_class_summary_is_an_error_naming_the_fix(setup, tmp_path, capsys):
    """Before: the values were taken as absolute distances after a log line, and the space labelled
    'absolute'."""
    code, err = run(edit(setup, tmp_path, "--edit_attr", "bright", "--edit_unit", "relative"), capsys)
    assert_one_error_line(code, err, "no usable class summary", "--edit_unit absolute", "--boundary_search")
    assert not (tmp_path / "run").exists()


def test_z_and_h_files_of_two_attributes_are_not_one_edit(setup, tmp_path, capsys):
    """Before: --boundary_z bright_z --boundary_h slanted_h moved z along one and h along the other,
    and the outputs called it all by one name."""
    b = setup["boundaries"]
    code, err = run(edit(setup, tmp_path, "--boundary_z", b["bright"]["z"], "--boundary_h", b["slanted"]["h"]), capsys)
    assert_one_error_line(code, err, "different attributes", "bright", "slanted", "--force")
    code, err = run(edit(setup, tmp_path, "--boundary_z", b["bright"]["z"], "--boundary_h", b["slanted"]["h"],
                         "--force"), capsys)
    assert code == 0, err


def test_condition_auto_with_a_single_attribute_holds_nothing(tmp_path, capsys):
    """Before: 'an atlas needs at least two attributes with z and h boundaries'."""
    one = make_edit_setup(tmp_path / "one", attributes=("bright",))
    code, err = run(["--edit_image_boundary", *one["common"], "--img_path", one["images"] / "img0.png",
                     "--exp", tmp_path / "run", "--edit_attr", "bright", "--condition_attr", "auto"], capsys)
    assert code == 0, err
    assert "none (no other attribute's normal is that close)" in err
    summary = json.loads((tmp_path / "run" / "edit" / "summary.json").read_text())
    assert summary["edit"]["held"] == []


def _normal_pair(shape, cos: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two unit normals of ``shape`` with cosine ``cos`` (float32)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, int(np.prod(shape))))
    a /= np.linalg.norm(a)
    b -= (b @ a) * a
    b /= np.linalg.norm(b)
    return a.astype(np.float32), (cos * a + np.sqrt(1 - cos ** 2) * b).astype(np.float32)


def test_a_hold_that_lengthens_the_move_past_the_bound_is_refused_and_the_ratio_recorded(setup, tmp_path, capsys):
    """Before: holding an attribute at |cos| 0.9 made a 10-unit edit move the latent 2.3 times as far,
    with no word."""
    folder = tmp_path / "bd"
    shapes = latent_shapes(setup["config"])
    for cos, tag in ((0.9, "near"), (0.5, "far")):
        for space, shape in shapes.items():
            a, b = _normal_pair(shape, cos, seed=len(space))
            for name, normal in ((f"moved_{tag}", a), (f"held_{tag}", b)):
                save_boundary(folder / f"tiny_ed_{name}_t300_{space}.npz",
                              BoundaryRecord(normal=normal, coef=normal, intercept=0.0, shape=shape, space=space,
                                             t_0=300, n_inv_step=5, attribute=name, config_name="tiny_ed"))
    common = [a if a != str(setup["common"][setup["common"].index("--boundary_dir") + 1]) else str(folder)
              for a in setup["common"]]
    argv = ["--edit_image_boundary", *common, "--img_path", setup["images"] / "img0.png"]
    code, err = run([*argv, "--exp", tmp_path / "a", "--edit_attr", "moved_near", "--condition_attr", "held_near"],
                    capsys)
    assert_one_error_line(code, err, "lengthens", "2.29 times", f"more than {MAX_HOLD_RATIO:g}", "--force")
    code, err = run([*argv, "--exp", tmp_path / "b", "--edit_attr", "moved_far", "--condition_attr", "held_far"],
                    capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "b" / "edit" / "summary.json").read_text())
    for space in ("z", "h"):
        assert summary["edit"]["spaces"][space]["hold_ratios"]["moved_far"] == pytest.approx(1 / np.sqrt(0.75), abs=1e-4)
    assert "holding lengthens the z move by 1.15x (moved_far)" in err


def test_hold_ratio_is_the_length_of_the_joint_move_over_the_free_one():
    """The ratio against measured move lengths: the joint move with holds, over the same shift alone."""
    rng = np.random.default_rng(3)
    normals = torch.from_numpy(np.linalg.qr(rng.normal(size=(64, 3)))[0].T.copy())
    mix = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0.3, 0.4, np.sqrt(0.75)]], dtype=torch.float64)
    normals = mix @ normals  # unit rows with cosines 0.6, 0.3, 0.5
    cosines = (normals @ normals.T).numpy()
    from utils.core.boundary import joint_move
    v = torch.zeros(1, 64, dtype=torch.float64)
    held = joint_move(v, normals[:1], torch.tensor([[1.0]]), normals[1:])[0, 0]
    free = joint_move(v, normals[:1], torch.tensor([[1.0]]))[0, 0]
    assert hold_ratios(cosines, 1)[0] == pytest.approx(float(held.norm() / free.norm()), rel=1e-12)


# ------------------------------------------------------------------ errors before the model loads

@pytest.fixture
def no_model(monkeypatch):
    """Fail any test that loads a model: these errors must come first."""
    import runners.boundary_diffusion

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(runners.boundary_diffusion, "load_model", refuse)


def test_unknown_attribute_and_t_0_say_what_exists(no_model, tmp_path, capsys):
    code, err = run(["--edit_image_boundary", "--config", "digits.yml", "--img_path", "imgs/digit_example.png",
                     "--exp", tmp_path, "--edit_attr", "nosuchattr"], capsys)
    assert_one_error_line(code, err, "no boundary for 'nosuchattr'", "attributes: digit_0", "three_vs_eight")
    code, err = run(["--edit_image_boundary", "--config", "digits.yml", "--img_path", "imgs/digit_example.png",
                     "--exp", tmp_path, "--edit_attr", "thick", "--t_0", "250"], capsys)
    assert_one_error_line(code, err, "at t_0 250", "fitted at t_0 200, 300, 400", "--t_0")


def test_a_missing_image_is_reported_before_the_model_loads(no_model, tmp_path, capsys):
    code, err = run(["--edit_image_boundary", "--config", "digits.yml", "--img_path", tmp_path / "missing.png",
                     "--exp", tmp_path, "--edit_attr", "thick"], capsys)
    assert_one_error_line(code, err, "missing.png does not exist")


def test_a_search_without_its_data_names_the_command_that_makes_it(no_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here
    code, err = run(["--boundary_search", "--config", str(REPO / "configs" / "digits.yml"), "--edit_attr", "thick",
                     "--exp", tmp_path / "run", "--boundary_dir", tmp_path / "bd"], capsys)
    assert_one_error_line(code, err, "does not exist", "bash data_download.sh digits")


def test_serve_refuses_the_flags_the_app_does_not_use(capsys):
    """Before: --seed, --eta, --edit_space, --condition_attr and --edit_unit were accepted and ignored."""
    for flag in (["--eta", "0.5"], ["--seed", "7"], ["--edit_space", "z"], ["--condition_attr", "slant"],
                 ["--edit_unit", "relative"]):
        code, err = run(["--serve", "--config", "digits.yml", *flag], capsys)
        assert_one_error_line(code, err, f"--serve does not use {flag[0]}")


# ------------------------------------------------------------------ keys and identity

def test_the_latent_cache_key_names_precision_device_kernels_and_torch(tmp_path):
    """Before: the disk key lacked the torch version and the CPU or GPU kind."""
    model = loaded_tiny_model()
    image = torch.zeros(3, 16, 16)
    keys = set()
    for change in ({}, {"torch_version": "0.0"}, {"processor": "cpu DEFAULT"}, {"precision": "bf16"},
                   {"device_kind": "cuda"}):
        other = dataclasses.replace(model, identity=dataclasses.replace(model.identity, **change))
        keys.add(Editor(other, 300, 4, tmp_path, show_progress=False).cache.key(image))
    assert len(keys) == 5
    moved = dataclasses.replace(model, identity=dataclasses.replace(model.identity, checkpoint="elsewhere.pt"))
    assert Editor(moved, 300, 4, tmp_path, show_progress=False).cache.key(image) in keys  # where it was read from: no


def test_the_cache_root_is_decided_in_one_place(tmp_path):
    assert latent_cache_root(tmp_path) == tmp_path / "latents"
    assert latent_cache_root(tmp_path, no_cache=True) is None


def test_a_folder_scan_reads_each_header_once(tmp_path, monkeypatch):
    """Before: BoundaryIndex.find loaded every .npz of the folder once per attribute (96 loads for a
    three-attribute edit over 32 files)."""
    make_edit_setup(tmp_path, attributes=tuple(f"a{i}" for i in range(16)))
    reads = []
    real = boundary_files._read_fields
    monkeypatch.setattr(boundary_files, "_read_fields", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    engine = Engine(loaded_tiny_model(name="tiny_ed"))
    request = EditRequest((Move("a0", -1, 1), Move("a1", 0, 0), Move("a2", 1, 1)), Denoising(3), k=2,
                          held=("a3",))
    engine.describe(request, 300, 5, engine.boundary_index(tmp_path / "bd"))
    assert len(reads) == 32 + 8  # every header once, then the four attributes' files in full


# ------------------------------------------------------------------ samples from noise

def test_ancestral_samples_draw_each_samples_noise_from_its_own_seed_whatever_the_batch():
    """``Editor.sample_images`` with eta > 0 (the faces evaluation's ``--sample_eta``): sample j equals
    the trajectory of x_T[j] alone with its noise from ``item_seed(seed, j, EVALUATION_NOISE)``, at any
    batch size (a lone remainder runs as a pair); another seed or eta 0 gives other images."""
    from utils.core.diffusion import generate, timestep_grid
    from utils.core.seeds import EVALUATION_NOISE, item_seed

    model = loaded_tiny_model()
    editor = Editor(model, 300, 4, None, show_progress=False)
    x_T = torch.randn((3, *model.shapes["z"]), generator=torch.Generator().manual_seed(0))
    grid = timestep_grid(model.config.diffusion.num_diffusion_timesteps - 1, 6)
    alone = torch.cat([generate(editor.net, x_T[j:j + 1], model.alphas_cumprod, grid, eta=1.0,
                                generators=[torch.Generator().manual_seed(item_seed(7, j, domain=EVALUATION_NOISE))])
                       for j in range(3)])
    tolerance = float_tolerance(torch.float32, float(alone.abs().max()), ulps=64)  # batch composition's rounding
    for batch_size in (1, 2, 3):
        samples = editor.sample_images(x_T, 6, batch_size, eta=1.0, seed=7)
        assert max_abs(samples, alone) <= tolerance, batch_size
    assert max_abs(editor.sample_images(x_T, 6, 3, eta=1.0, seed=8), alone) > 0.01
    assert max_abs(editor.sample_images(x_T, 6, 3), alone) > 0.01


# ------------------------------------------------------------------ size

def test_no_function_of_the_engine_the_front_ends_or_the_evaluation_is_over_60_lines():
    files = [REPO / "main.py", *(REPO / "runners").rglob("*.py"), REPO / "scripts" / "evaluate_edits.py",
             *(REPO / "scripts" / "evaluation").glob("*.py")]
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_the_shift_unit_moves_each_space_from_where_the_image_is(tmp_path, capsys):
    """--edit_unit shift: an edit of u changes the projection by u relative units in z and in h from
    the image's own, so a nudge is a nudge in both spaces (the web app's sliders edit this way)."""
    from runners.engine import relative_scale
    from tests.test_multi_edit import FAST, projections

    code, err = run([*FAST, "--config", "digits.yml", "--edit", "thick=0.25:0.5", "--edit_unit", "shift",
                     "--edit_img_number", 2, "--save_tensors", "--exp", tmp_path], capsys)
    assert code == 0, err
    tensors = torch.load(tmp_path / "edit" / "tensors.pt", weights_only=True)
    for space in ("z", "h"):
        half = relative_scale(load_boundary(REPO / "boundary" / f"digits_thick_t200_{space}.npz"))[1]
        own = projections(tensors, space, "thick", key=space)[0]
        assert projections(tensors, space, "thick") == pytest.approx([own + 0.25 * half, own + 0.5 * half], abs=1e-4)
    code, err = run([*FAST, "--config", "digits.yml", "--edit", "thick=auto", "--edit_unit", "shift", "--exp",
                     tmp_path / "auto"], capsys)
    assert_one_error_line(code, err, "auto ranges are where the classes lie")
