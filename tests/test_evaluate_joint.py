"""The multi-attribute evaluation's wiring (scripts/evaluate_edits.py --joint, scripts/evaluation/digits_joint.py):
which attributes each of its edits moves and holds, and its measures on constructed edits whose
answers are known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts import evaluate_edits as ev
from scripts.evaluation import digits_joint as ej
from tests.test_morphometry import annulus


def test_joint_requests_move_and_hold_what_their_names_say():
    # every attribute is named: the engine finds its files (BoundaryIndex.find), none is given by path
    requests = ej.joint_requests(ej.JointSetting(k=3), ("digit_3",), seed=5, batch_size=16)
    assert set(requests) == set(ej.JOINT_EDITS)
    moved = {name: [m.attribute for m in r.moves] for name, r in requests.items()}
    assert moved == {"grid": ["thick", "slant"], "single": ["thick"], "held": ["thick"], "other_held": ["slant"]}
    assert all(m.paths is None and not m.auto for r in requests.values() for m in r.moves)
    held = {name: r.held for name, r in requests.items()}
    assert held == {"grid": ("digit_3",), "single": ("digit_3",), "held": ("slant", "digit_3"),
                    "other_held": ("thick", "digit_3")}
    assert all(not r.held_paths for r in requests.values())
    assert requests["grid"].grid and not any(requests[n].grid for n in ("single", "held", "other_held"))
    assert all(r.k == 3 and r.unit == "relative" and r.denoising.seed == 5 and r.denoising.eta == 0.0
               and r.denoising.batch_size == 16 for r in requests.values())
    only_z = ej.joint_requests(ej.JointSetting(space="z"), (), 1, 8)
    assert only_z["held"].space == "z" and only_z["held"].held == ("slant",)


def says_three(images: torch.Tensor) -> np.ndarray:
    """A classifier that says every image is class 3."""
    return np.full(len(images), 3)


def test_joint_measures_of_edits_that_only_thicken():
    # Two digits, K = 2: every edit is a ring whose stroke width follows the thick target index i
    # (2 px, then 3 px) whatever the slant target; a ring has no slant (mu11 = 0 by symmetry), and
    # moving slant changes nothing. Hand-derived: thickness gain on the grid 1 (measured ranks tied
    # exactly as the targets are: (1.5, 1.5, 3.5, 3.5) both), slant gain undefined (no order), no
    # leak, an exactly additive pixel change, and class 3 kept by digit 0 only.
    k, ring = 2, {w: torch.from_numpy(2 * annulus(16, w) - 1).float()[None] for w in (2.0, 3.0)}
    widths = (2.0, 3.0)
    reference = torch.stack([ring[2.0]] * 2)
    grid = torch.stack([torch.stack([ring[widths[i]] for i in range(k) for _ in range(k)])] * 2)
    sweep = torch.stack([torch.stack([ring[w] for w in widths])] * 2)
    edits = {"grid": grid, "single": sweep, "held": sweep, "other_held": torch.stack([reference] * k, dim=1)}
    targets = np.array([[-3.0, -1.0], [-3.0, 1.0], [0.5, -1.0], [0.5, 1.0]])
    got = ej.joint_measures(reference, edits, targets, {"thickness": 0.75, "slant": 0.1}, np.array([3, 4]),
                            says_three)
    assert got["gain"]["thickness"]["mean"] == pytest.approx(1.0)
    assert got["gain"]["slant"]["undefined"] == 2
    for name in ("single", "held", "joint"):
        assert got["leak"][name]["median"] == pytest.approx(0.0, abs=1e-9)
        assert got["thickness_gain"][name]["mean"] == pytest.approx(1.0)
        assert got["class_kept"][name]["mean"] == pytest.approx(0.5)
    assert got["additivity"]["mean_abs"]["mean"] == pytest.approx(0.0, abs=1e-12)


def test_joint_without_scikit_image_stops_with_the_install_line(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "skimage.morphology", None)  # its import now fails
    assert ev.main(["--joint"]) == 1  # before any model is loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install scikit-image" in err[0]
