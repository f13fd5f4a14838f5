"""The embedded default end to end: boundary search and an edit on the shipped digits model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import main as cli
from scripts import make_digits as md
from tests.helpers import REPO


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return md.make_digits(tmp_path_factory.mktemp("dest"))


def test_boundary_search_on_the_shipped_model(digits, tmp_path):
    argv = ["--boundary_search", "--config", "digits.yml", "--data_dir", str(digits / "images" / "train"),
            "--attr_file", str(digits / "list_attr_digits.txt"), "--edit_attr", "thick", "--n_train_img", "80",
            "--n_test_img", "40", "--n_inv_step", "10", "--bs_train", "40", "--exp", str(tmp_path / "run"),
            "--boundary_dir", str(tmp_path / "bd"), "--cache_dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "run" / "boundary_search" / "summary.json").read_text())
    # thick vs thin is nearly linearly separable in z already on 80 digits and 10 inversion steps
    assert summary["spaces"]["z"]["test_acc"] >= 0.8, summary["spaces"]


def test_shipped_thick_edit_controls_ink_and_reconstructs(tmp_path):
    argv = ["--edit_image_boundary", "--config", "digits.yml", "--edit_attr", "thick", "--img_path",
            str(REPO / "imgs" / "digit_example.png"), "--boundary_dir", str(REPO / "boundary"), "--exp",
            str(tmp_path / "e"), "--cache_dir", str(tmp_path / "cache"), "--save_tensors", "--eta", "0"]
    assert cli.main(argv) == 0
    out = torch.load(tmp_path / "e" / "edit" / "tensors.pt", weights_only=True)
    ink = ((out["edits"] + 1) / 2).sum(dim=(1, 2, 3)).numpy()
    distances = out["distances"].numpy()
    rank = np.corrcoef(np.argsort(np.argsort(distances)), np.argsort(np.argsort(ink)))[0, 1]
    assert rank >= 0.8, (distances, ink)  # more ink further along the thickness normal
    original = json.loads((tmp_path / "e" / "edit" / "summary.json").read_text())
    assert original["reconstruction_mse"] < 0.01, original["reconstruction_mse"]  # pixels in [-1, 1]
