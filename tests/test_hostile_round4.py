"""Hostile inputs and correctness, round four (issue 26): the seed rule of sampled latents, cache
keys and entries of the wrong shape, boundary files of another model, reconstructions that must
not depend on the shard, class summaries that cannot give an auto range, YAML alias bombs, and
small defects (empty plans, radius inputs, progress totals, internal errors, timings)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import main as cli
from tests.helpers import assert_one_error_line, make_edit_setup
from runners.editor import auto_span
from utils.core.seeds import SAMPLE_EDIT, item_seed
from utils.errors import UserError
from utils.io.boundary_files import auto_range, auto_range_problem, load_boundary, save_boundary


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
