"""Hostile inputs and correctness, round four (issue 26): the seed rule of sampled latents, cache
keys and entries of the wrong shape, boundary files of another model, reconstructions that must
not depend on the shard, class summaries that cannot give an auto range, YAML alias bombs, and
small defects (empty plans, radius inputs, progress totals, internal errors, timings)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import main as cli
import runners.engine.edit_modes
import runners.engine.editor
from tests.helpers import REPO, assert_one_error_line, make_edit_setup
from models import build_model
from runners.engine.boundaries import auto_span
from runners.engine.describe import describe_edit
from runners.engine.editor import Editor
from runners.engine.requests import Denoising, EditRequest, Move
from tests.helpers import loaded_tiny_model, tiny_config
from utils.core.diffusion import Inversion, _check_finite
from utils.core.seeds import SAMPLE_EDIT, item_seed
from utils.errors import UserError
from utils.io.boundary_files import auto_range, auto_range_problem, load_boundary, save_boundary
from utils.io.latent_cache import LatentCache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_edit_setup(tmp_path_factory.mktemp("round4"), attributes=("bright",), n_images=2)


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ item 2: sampled latents' seeds

def test_unconditional_samples_draw_their_own_edit_noise(setup, tmp_path, capsys):
    code, err = run(["--unconditional", *setup["common"], "--exp", tmp_path, "--n_samples", 2, "--eta", 1.0,
                     "--save_tensors"], capsys)
    assert code == 0, err
    seeds = [json.loads((tmp_path / "unconditional" / f"sample_{i:02d}" / "summary.json").read_text())["seeds"]
             for i in range(2)]
    # The documented rule: edit k of iteration 0 of sample i seeded item_seed(--seed, i, 0, k) in SAMPLE_EDIT.
    assert seeds == [[[item_seed(1234, i, 0, k, domain=SAMPLE_EDIT) for k in range(3)]] for i in range(2)]
    assert set(seeds[0][0]).isdisjoint(seeds[1][0])


# ------------------------------------------------------------------ item 14: absurd class summaries

def _with_summary(path: Path, out: Path, neg: tuple[float, float], pos: tuple[float, float]) -> Path:
    """The boundary at ``path`` saved to ``out`` with train and test summaries whose (p5, p95) are
    ``neg`` for the negative class and ``pos`` for the positive one."""
    record = load_boundary(path)
    stats = lambda p5, p95: {"mean": 0.0, "std": 1.0, "p5": p5, "p50": (p5 + p95) / 2, "p95": p95}
    summary = {split: {"neg": stats(*neg), "pos": stats(*pos)} for split in ("train", "test")}
    return save_boundary(out, dataclasses.replace(record, class_summary=summary))


@pytest.mark.parametrize("neg, pos, words", [
    ((-math.inf, 1.0), (2.0, 3.0), ("infinite", "neg")),
    ((-1.0, 1.0), (5.0, math.inf), ("infinite", "pos")),
    ((4.0, -4.0), (2.0, 3.0), ("p5 above p95",)),
    ((-1.7e308, 0.0), (0.0, 1.7e308), ("beyond",)),    # finite, but the scaled range would overflow
    ((-2e12, 0.0), (0.0, 1.0), ("beyond",)),
])
def test_absurd_class_summaries_get_one_clear_line(setup, tmp_path, capsys, neg, pos, words):
    paths = {space: _with_summary(setup["boundaries"]["bright"][space], tmp_path / f"b_{space}.npz", neg, pos)
             for space in ("z", "h")}
    problem = auto_range_problem(load_boundary(paths["z"]))
    assert problem is not None and all(w in problem for w in words), problem
    with pytest.raises(UserError) as caught:
        auto_range(load_boundary(paths["z"]))
    assert str(caught.value) == problem
    code, err = run(["--edit_image_boundary", *setup["common"], "--exp", tmp_path / "e", "--img_path",
                     setup["images"] / "img0.png", "--boundary_z", paths["z"], "--boundary_h", paths["h"],
                     "--start_distance", "auto", "--end_distance", "auto"], capsys)
    line = assert_one_error_line(code, err, *words, "class summary")
    assert "not finite" not in line and "both classes" not in line


def test_a_usable_class_summary_has_no_problem_and_a_finite_scaled_range(setup, tmp_path):
    record = load_boundary(_with_summary(setup["boundaries"]["bright"]["z"], tmp_path / "ok.npz", (-3.0, 1.0),
                                         (-1.0, 5.0)))
    assert auto_range_problem(record) is None
    assert auto_range(record) == (-3.0, 5.0)  # intercept 0: the summary's own ends
    assert auto_span(record, scale=2.0) == (-7.0, 9.0)  # centre 1, half-width 2 * 4
    with pytest.raises(UserError, match="not finite"):
        auto_span(record, scale=1e308)


# ------------------------------------------------------------------ item 5: boundaries of another model

def _renamed(path: Path, out: Path, **fields) -> Path:
    return save_boundary(out, dataclasses.replace(load_boundary(path), **fields))


def _edit(setup, tmp_path, z: Path, h: Path, *extra) -> list:
    return ["--edit_image_boundary", *setup["common"], "--exp", tmp_path / "e", "--img_path",
            setup["images"] / "img0.png", "--boundary_z", z, "--boundary_h", h, "--edit_img_number", 1, *extra]


def test_a_boundary_without_checkpoint_hash_of_another_config_is_refused(setup, tmp_path, capsys):
    """As `boundary_tools import-sav` writes them: a config name, no checkpoint hash."""
    b = setup["boundaries"]["bright"]
    z = _renamed(b["z"], tmp_path / "z.npz", config_name="celeba", checkpoint_sha256="")
    code, err = run(_edit(setup, tmp_path, z, b["h"]), capsys)
    assert_one_error_line(code, err, str(z), "config_name", "celeba", "tiny_ed", "--force")
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())
    code, err = run(_edit(setup, tmp_path, z, b["h"], "--force"), capsys)
    assert code == 0, err
    # the same weights under a renamed config: the checkpoint hash decides, and it matches
    sha = json.loads((tmp_path / "e" / "edit" / "summary.json").read_text())["checkpoint_sha256"]
    z = _renamed(b["z"], tmp_path / "z2.npz", config_name="renamed", checkpoint_sha256=sha)
    code, err = run(_edit(setup, tmp_path, z, b["h"]), capsys)
    assert code == 0, err


def test_a_boundary_naming_no_model_or_other_steps_is_used_with_a_warning(setup, tmp_path, capsys):
    b = setup["boundaries"]["bright"]
    z = _renamed(b["z"], tmp_path / "z.npz", config_name="", checkpoint_sha256="")
    h = _renamed(b["h"], tmp_path / "h.npz", n_inv_step=40)
    code, err = run(_edit(setup, tmp_path, z, h), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert any(str(z) in w and "checkpoint_sha256" in w and "config_name" in w for w in warnings), warnings
    assert any(str(h) in w and "n_inv_step" in w and "40" in w and "5" in w for w in warnings), warnings
    assert not any(str(b["z"]) in w or str(b["h"]) in w for w in warnings), warnings


# ------------------------------------------------------------------ items 4 and 13: the latent cache

def _cached_edit(setup, tmp_path, cache: Path, *extra) -> list:
    common = [a for a in setup["common"] if a != "--no_cache"]
    b = setup["boundaries"]["bright"]
    return ["--edit_image_boundary", *common, "--cache_dir", cache, "--exp", tmp_path / "e", "--img_path",
            setup["images"] / "img0.png", "--boundary_z", b["z"], "--boundary_h", b["h"], "--edit_img_number", 1,
            *extra]


def _from_cache(err: str) -> int:
    """How many images the run's inversion took from the cache (its log line)."""
    return int(err.split(" from the cache")[0].rsplit(", ", 1)[1])


def test_the_cache_key_holds_the_batch_regime_and_the_device(setup, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, err = run(_cached_edit(setup, tmp_path, cache, "--bs_train", 1), capsys)
    assert code == 0 and _from_cache(err) == 0, err
    code, err = run(_cached_edit(setup, tmp_path, cache, "--bs_train", 1), capsys)
    assert code == 0 and _from_cache(err) == 1, err
    # latents inverted alone (batch 1 kernels) are not served to a batched run, nor the other way round
    code, err = run(_cached_edit(setup, tmp_path, cache, "--bs_train", 4), capsys)
    assert code == 0 and _from_cache(err) == 0, err
    # every batch size of 2 or more rounds alike (a lone image runs as a pair): one entry serves them
    code, err = run(_cached_edit(setup, tmp_path, cache, "--bs_train", 2), capsys)
    assert code == 0 and _from_cache(err) == 1, err
    assert len(list(cache.rglob("*.pt"))) == 2
    image = torch.zeros(3, 16, 16)
    identity = {"config": "c", "device": "cpu"}
    assert LatentCache(tmp_path, identity).key(image) != LatentCache(tmp_path, {**identity, "device": "cuda"}).key(image)


def _entry(cache: Path) -> Path:
    (path,) = cache.rglob("*.pt")
    return path


@pytest.mark.parametrize("damage", ["z_other_shape", "h_other_shape", "swapped", "huge_other_shape", "non_finite"])
def test_a_cache_entry_of_the_wrong_shape_is_recomputed_without_being_read(setup, tmp_path, capsys, monkeypatch,
                                                                          damage):
    cache = tmp_path / "cache"
    code, err = run(_cached_edit(setup, tmp_path, cache, "--save_tensors"), capsys)
    assert code == 0, err
    first = torch.load(tmp_path / "e" / "edit" / "tensors.pt", weights_only=True)["edits"]
    path = _entry(cache)
    good = torch.load(path, weights_only=True)
    z, h = good["z"], good["h"]
    damaged = {"z_other_shape": {"z": z[:, :8], "h": h}, "h_other_shape": {"z": z, "h": h[:16]},
               "swapped": {"z": h, "h": z}, "huge_other_shape": {"z": torch.zeros(8, 1024, 1024), "h": h},
               "non_finite": {"z": torch.full_like(z, float("inf")), "h": h}}[damage]
    torch.save(damaged, path)
    full_reads = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        if not kwargs.get("mmap") and Path(f) == path:
            full_reads.append(f)
        return real_load(f, *args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    code, err = run(_cached_edit(setup, tmp_path, cache, "--save_tensors", "--ni"), capsys)
    assert code == 0, err
    assert _from_cache(err) == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("WARNING") and "cache entry" in line]
    assert len(warnings) == 1 and str(path) in warnings[0] and "recomputing" in warnings[0], warnings
    # the header told: only a well-shaped (here non-finite) entry is read in full
    assert full_reads == ([path] if damage == "non_finite" else []), full_reads
    monkeypatch.undo()
    second = torch.load(tmp_path / "e" / "edit" / "tensors.pt", weights_only=True)["edits"]
    assert torch.equal(first, second)  # recomputed from the same pixels with the same kernels
    assert torch.equal(torch.load(path, weights_only=True)["z"], z)  # and cached again


# ------------------------------------------------------------------ item 6: reconstructions of a shard

def test_a_shard_of_one_image_reconstructs_as_in_the_whole_run(setup, tmp_path, capsys, monkeypatch):
    b = setup["boundaries"]["bright"]
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("img0.png", "img1.png"):
        (folder / name).write_bytes((setup["images"] / name).read_bytes())
    argv = ["--edit_image_boundary", *setup["common"], "--img_path", folder, "--boundary_z", b["z"],
            "--boundary_h", b["h"], "--edit_img_number", 1, "--save_tensors"]
    batches = []
    real = runners.engine.editor.reconstruct
    monkeypatch.setattr(runners.engine.editor, "reconstruct", lambda net, part, *a, **k: batches.append(len(part.z))
                        or real(net, part, *a, **k))
    code, err = run([*argv, "--exp", tmp_path / "whole"], capsys)
    assert code == 0, err
    assert batches == [2]
    # rank 0 of 2 processes: its shard is img0 alone
    monkeypatch.setattr(runners.engine.edit_modes, "shard", lambda items, rank, world_size: list(items[:1]))
    batches.clear()
    code, err = run([*argv, "--exp", tmp_path / "rank0"], capsys)
    assert code == 0, err
    assert batches == [2]  # the whole run's batch of 2 (the lone image as a pair), not a batch of 1
    whole, alone = (torch.load(tmp_path / run_ / "edit" / "img0" / "tensors.pt", weights_only=True)["recon"]
                    for run_ in ("whole", "rank0"))
    # bit for bit by construction: a batch of the same size runs the same kernels, and no layer mixes
    # the items of a batch, so img0's bits do not depend on its partner
    assert torch.equal(whole, alone)


# ------------------------------------------------------------------ item 7: small defects

def _editor() -> Editor:
    """The tiny DDPM as the engine holds it, without a checkpoint file (no cache)."""
    return Editor(loaded_tiny_model("ddpm", name="tiny_ed"), t_0=300, n_inv_step=4, show_progress=False)


def test_an_empty_plan_edits_nothing_without_dividing_by_zero(setup):
    editor = _editor()
    request = EditRequest((Move("bright", 1.0, 2.0, paths={"z": setup["boundaries"]["bright"]["z"]}),), Denoising(3),
                          k=2, space="z")
    description = describe_edit(dataclasses.replace(request, force=True), None, editor.model.identity, editor.t_0,
                                editor.n_inv_step)
    none = Inversion(z=torch.zeros(0, 3, 16, 16), h=torch.zeros(0, 32, 8, 8))
    assert list(editor.edits(none, description, seed_keys=[])) == []
    assert len(editor.reconstruct(none, description)) == 0


def test_the_radius_progress_total_is_the_number_of_network_calls():
    editor = _editor()
    seen = []
    editor.net.on_call = lambda done, total: seen.append((done, total))
    images, noise = torch.zeros(3, 3, 16, 16), torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    editor.radius_curves(images, noise, [0, 500, 999], 0.1, batch_size=2)
    # 3 images in batches of 2 walk up 2 candidate pairs, 5 noises in batches of 2 walk down them:
    # (2 + 3) batches x 2 calls = 10 calls (the old total, 2 x 2 x ceil(5 / 2) = 12, never finished)
    assert seen[-1] == (10, 10) and len(seen) == 10


def test_radius_img_path_takes_a_folder_or_a_glob(setup, tmp_path, capsys):
    for i, pattern in enumerate([setup["images"], setup["images"] / "img*.png"]):
        code, err = run(["--radius", *setup["common"], "--exp", tmp_path / str(i), "--img_path", pattern,
                         "--n_test_img", 4, "--radius_step", 500], capsys)
        assert code == 0, err
        result = json.loads((tmp_path / str(i) / "radius" / "radius.json").read_text())
        assert result["images"] == [str(setup["images"] / f"img{j}.png") for j in range(2)]
        assert result["n_real"] == 2


def test_a_value_error_from_a_bug_is_an_internal_error(setup, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug's message")
    monkeypatch.setattr(runners.engine.edit_modes, "write_radius_table", broken)
    code, err = run(["--radius", *setup["common"], "--exp", tmp_path, "--img_path", setup["images"],
                     "--n_test_img", 2, "--radius_step", 500], capsys)
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: internal error: ValueError: a bug's message (rerun with --verbose debug for the traceback)"]


def test_user_errors_once_raised_as_value_errors_stay_user_errors(tmp_path):
    raw = tiny_config("ddpm")
    raw["model"]["num_groups"] = 5  # ch 16 is not divisible by 5: the builder's check
    with pytest.raises(UserError, match="num_groups"):
        build_model(raw)
    with pytest.raises(UserError, match="not finite"):
        _check_finite(torch.tensor([float("nan")]), "the network's output at timestep 7")


def test_a_folder_summary_counts_every_groups_edit_seconds(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runners.engine.editor, "GROUP_IMAGES", 1)  # each image a group of its own
    b = setup["boundaries"]["bright"]
    code, err = run(["--edit_image_boundary", *setup["common"], "--exp", tmp_path, "--img_path", setup["images"],
                     "--boundary_z", b["z"], "--boundary_h", b["h"], "--bs_train", 1, "--edit_batch_size", 1,
                     "--n_iter", 2], capsys)
    assert code == 0, err
    run_dir = tmp_path / "edit"
    per_image = [json.loads((run_dir / f"img{i}" / "summary.json").read_text())["edit_seconds"] for i in range(2)]
    assert per_image[0] != per_image[1]  # two groups, timed apart
    folder = json.loads((run_dir / "summary.json").read_text())["edit_seconds"]
    assert folder == pytest.approx([per_image[0][i] + per_image[1][i] for i in range(2)], rel=1e-12)


# ------------------------------------------------------------------ item 15: YAML aliases

def _laughs(levels: int = 9) -> list[str]:
    """A "billion laughs": anchor i is a list of 9 aliases of anchor i - 1 (9**9 strings expanded)."""
    lines = ['l0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return lines


def _config_with(tmp_path: Path, extra: str, data: dict | None = None) -> Path:
    raw = tiny_config("ddpm")
    if data is not None:
        raw["data"].update(data)
    path = tmp_path / "aliases.yml"
    path.write_text(yaml.safe_dump(raw) + extra)
    return path


LOAD_CAPPED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space for the whole process
from utils.config import load_config
from utils.errors import UserError
try:
    load_config(sys.argv[1])
except UserError as exc:
    print(exc)
"""


@pytest.mark.parametrize("where", ["ignored_section", "known_key", "mapping"])
def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path, where):
    if where == "ignored_section":  # a section the config ignores: expanded all the same before
        extra = "training:\n" + "".join(f"  {line}\n" for line in _laughs())
    elif where == "known_key":
        extra = "sampling:\n" + "".join(f"  {line}\n" for line in _laughs(6)) + "edit:\n  t_0: [*a5, *a5, *a5]\n"
    else:  # nested mappings of aliases, the kind a plain copy of the config expands
        extra = "optim:\n  m0: &m0 {a: lol, b: lol, c: lol, d: lol}\n" + "".join(
            f"  m{i}: &m{i} {{a: *m{i - 1}, b: *m{i - 1}, c: *m{i - 1}, d: *m{i - 1}}}\n" for i in range(1, 14))
    path = _config_with(tmp_path, extra)
    assert path.stat().st_size < 4096
    proc = subprocess.run([sys.executable, "-c", LOAD_CAPPED, str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.splitlines()
    assert str(path) in line and "aliases are expanded" in line and len(line) < 300, line
    assert {"ignored_section": "training.", "known_key": "sampling.", "mapping": "optim."}[where] in line


def test_a_self_referencing_alias_gets_one_line_naming_file_and_field(tmp_path, capsys):
    path = _config_with(tmp_path, "sampling: &s {steps: 3, again: *s}\n")
    code, err = run(["--radius", "--config", path, "--exp", tmp_path / "r"], capsys)
    assert_one_error_line(code, err, str(path), "sampling.again", "refers to a value that holds it")


def test_messages_quote_a_short_prefix_of_a_value(tmp_path, capsys):
    long_text = "x" * 5000
    listed = "sampling:\n  big: &big [" + ", ".join([f'"{"y" * 90}"'] * 200) + "]\n"  # 18 KB: within the budget
    for extra, data in (("", {"dataset": ["a" * 3000] * 3}), ("", {"category": {"k": long_text}}),
                        (listed, None)):
        path = _config_with(tmp_path, extra + ("data:\n  dataset: *big\n  image_size: 16\n" if data is None else ""),
                            data)
        if data is None:  # the data section given after the aliases (the YAML dump wrote one before)
            text = path.read_text()
            path.write_text(text.replace("data:\n  channels: 3\n  dataset: synthetic\n  image_size: 16\n", ""))
        code, err = run(["--radius", "--config", path, "--exp", tmp_path / "r"], capsys)
        line = assert_one_error_line(code, err, str(path), "data.")
        assert len(line) < len(str(path)) + 250, line
