"""The embedded default, the synthetic-faces model, end to end: its shipped weights load strictly and
match the SHA-256 its config records, its shipped boundaries cover every attribute at the config's
t_0 with their atlas, and the README's first command makes the bundled face smile, as the factor
predictor (trained on rendered faces only) measures it."""
from __future__ import annotations

import json

import numpy as np
import torch

import main as cli
from models import build_model
from runners.engine import load_config
from tests.helpers import REPO
from utils.faces.factors import ATTRIBUTES, attribute_part_names, attribute_scores
from utils.faces.predictor import load_predictor, prediction_matrix, PREDICTED_NAMES
from utils.io.boundary_files import load_boundary
from utils.io.files import sha256_file


def test_the_shipped_weights_load_strictly_and_match_the_config():
    config = load_config("faces.yml")
    path = REPO / config.checkpoint.path
    assert path.stat().st_size <= 25e6, path.stat().st_size
    assert sha256_file(path) == config.checkpoint.sha256
    state = torch.load(path, map_location="cpu", weights_only=True)
    build_model(config).load_state_dict(state, strict=True)


def test_every_attribute_has_both_boundaries_at_the_configs_t_0_and_an_atlas():
    config = load_config("faces.yml")
    for attribute in ATTRIBUTES:
        for space in ("z", "h"):
            record = load_boundary(REPO / "boundary" / f"faces_{attribute.lower()}_t{config.edit.t_0}_{space}.npz")
            assert record.attribute == attribute and record.class_summary is not None
            assert record.checkpoint_sha256 == config.checkpoint.sha256
    atlas = json.loads((REPO / "boundary" / "faces_atlas.json").read_text())
    assert set(atlas["attributes"]) == set(ATTRIBUTES) and atlas["t_0"] == config.edit.t_0


def test_the_part_fitted_boundaries_cover_every_attribute_on_its_own_part():
    """boundary/faces_parts: the search of the shipped files again (the same faces and split), each
    attribute fitted on its part of every face (``--region auto``), so every normal is exactly 0
    wherever no face's part reaches (the mouth's and eyes' normals on about four fifths of z)."""
    config = load_config("faces.yml")
    parts = attribute_part_names()
    for attribute in ATTRIBUTES:
        for space in ("z", "h"):
            name = f"faces_{attribute.lower()}_t{config.edit.t_0}_{space}.npz"
            record, whole = load_boundary(REPO / "boundary" / "faces_parts" / name), load_boundary(REPO / "boundary" / name)
            assert record.fit_region == f"part {parts[attribute]}" and whole.fit_region == ""
            assert (record.attribute, record.n_train, record.n_test, record.n_pos, record.n_neg) == \
                (whole.attribute, whole.n_train, whole.n_test, whole.n_pos, whole.n_neg)
            assert record.checkpoint_sha256 == config.checkpoint.sha256 and record.class_summary is not None
            zeros = float(np.mean(record.normal == 0))
            assert zeros >= (0.7 if parts[attribute] in ("mouth", "eyes") else 0.1), (attribute, space, zeros)


def test_the_readme_command_makes_the_bundled_face_smile(tmp_path):
    """The README's first command, shortened (3 edits, 20 steps): the predicted Smiling score rises
    along the edits and the last edit is on the smiling side of the class threshold."""
    argv = ["--edit_image_boundary", "--edit_attr", "Smiling", "--img_path", str(REPO / "imgs" / "face_example.png"),
            "--exp", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--edit_img_number", "3",
            "--n_test_step", "20", "--save_tensors"]
    assert cli.main(argv) == 0
    tensors = torch.load(tmp_path / "edit" / "tensors.pt", weights_only=True)
    predicted = load_predictor().predict(tensors["edits"])
    scores = attribute_scores(prediction_matrix(predicted, PREDICTED_NAMES), PREDICTED_NAMES)[:, ATTRIBUTES.index("Smiling")]
    assert np.all(np.diff(scores) > 0) and scores[-1] > 0, scores
    assert (tmp_path / "edit" / "grid.png").is_file()
