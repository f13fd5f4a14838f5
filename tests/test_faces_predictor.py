"""The factor predictor (utils/faces/predictor.py): its outputs' shapes and units, the guarded
loading of its weights, the R^2 and accuracy helpers, and the shipped weights' acceptance on
freshly rendered held-out faces."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, r2_score

from scripts import make_faces as mf
from scripts import train_predictor as tp
from scripts.make_faces import N_TEST, N_TRAIN, SEED, face_factors
from utils.errors import UserError
from utils.faces import predictor as fp
from utils.faces.factors import ATTRIBUTES, PREDICTED_BINARY, PREDICTED_CONTINUOUS, attribute_table, factor_matrix
from utils.faces.render import render_face

#: Held-out faces the acceptance test renders: every fifth test face, 400 in all.
ACCEPTANCE_INDICES = range(N_TRAIN, N_TRAIN + N_TEST, 5)


@pytest.fixture(scope="module")
def random_model() -> fp.FactorPredictor:
    torch.manual_seed(0)
    model = fp.FactorPredictor()
    model.set_standardisation(torch.linspace(-1.0, 1.0, 16), torch.linspace(0.1, 2.0, 16))
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, random_model) -> tuple:
    """The random model saved as the training script saves weights: (path, its SHA-256)."""
    path = tmp_path_factory.mktemp("predictor") / "predictor.pt"
    return path, tp.save_weights(random_model, path)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the network ------------------------------------------------------------------------------

def test_predict_gives_every_factor_in_its_units(random_model):
    x = _images(7)
    out = random_model.predict(x, batch_size=3)  # batched internally: 3 + 3 + 1
    assert tuple(out) == fp.PREDICTED_NAMES == PREDICTED_CONTINUOUS + PREDICTED_BINARY
    assert all(v.shape == (7,) and v.dtype == torch.float32 and not v.requires_grad for v in out.values())
    for name in PREDICTED_BINARY:
        assert ((out[name] >= 0) & (out[name] <= 1)).all(), name
    # Continuous factors: mean + std * the standardised output.
    z, logits = random_model(x)
    for i, name in enumerate(PREDICTED_CONTINUOUS):
        torch.testing.assert_close(out[name], random_model.mean[i] + random_model.std[i] * z[:, i].detach())
    torch.testing.assert_close(out["glasses"], torch.sigmoid(logits[:, 0]).detach())
    # The same images alone or in another batching give the same numbers (eval mode, no batch statistics).
    again = random_model.predict(x[4:5], batch_size=500)
    for name in fp.PREDICTED_NAMES:
        torch.testing.assert_close(again[name], out[name][4:5])
    matrix = fp.prediction_matrix(out)
    assert matrix.shape == (7, 20) and matrix.dtype == np.float64
    np.testing.assert_allclose(matrix[:, fp.PREDICTED_NAMES.index("yaw")], out["yaw"].double().numpy())


def test_predict_and_features_measure_in_eval_mode_and_restore_the_mode(random_model):
    x = _images(4, seed=1)
    reference = random_model.predict(x)["age"]
    random_model.train()
    try:
        torch.testing.assert_close(random_model.predict(x)["age"], reference)
        assert random_model.training
        features = random_model.features(x, batch_size=3)
        assert random_model.training
    finally:
        random_model.eval()
    assert features.shape == (4, 256) and features.dtype == torch.float32 and not features.requires_grad
    torch.testing.assert_close(features, random_model.features(x))


def test_empty_and_wrong_inputs(random_model):
    empty = random_model.predict(torch.zeros(0, 3, 32, 32))
    assert all(v.shape == (0,) for v in empty.values())
    assert random_model.features(torch.zeros(0, 3, 32, 32)).shape == (0, 256)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        random_model.predict(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="positive"):
        fp.FactorPredictor().set_standardisation(torch.zeros(16), torch.zeros(16))


def test_small_enough_to_ship(weights_file):
    path, _ = weights_file
    n_params = sum(p.numel() for p in fp.FactorPredictor().parameters())
    assert n_params < 2_000_000
    assert path.stat().st_size < 5 * 1024 * 1024


def test_images_to_tensor_maps_uint8_to_the_models_range():
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[0, 0, 0] = (0, 255, 128)
    x = fp.images_to_tensor(images)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    with pytest.raises(ValueError, match="uint8"):
        fp.images_to_tensor(images.astype(np.float32))


# --- loading ----------------------------------------------------------------------------------

def test_load_predictor_checks_the_file_and_loads_strictly(weights_file, random_model):
    path, digest = weights_file
    model = fp.load_predictor(path, sha256=digest)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = _images(3, seed=2)
    for name, value in model.predict(x).items():
        torch.testing.assert_close(value, random_model.predict(x)[name])
    torch.testing.assert_close(model.std, random_model.std)  # the standardisation travels with the weights


def test_load_predictor_refuses_a_file_with_another_hash(weights_file):
    path, digest = weights_file
    with pytest.raises(UserError) as info:
        fp.load_predictor(path, sha256="0" * 64)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and digest in message and "scripts.train_predictor" in message


def test_load_predictor_names_a_missing_file_and_how_to_train_it(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(UserError) as info:
        fp.load_predictor(missing)
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and "python -m scripts.train_predictor" in message


def test_load_predictor_is_strict(tmp_path, weights_file):
    path, _ = weights_file
    state = torch.load(path, weights_only=True)
    del state["mean"]
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(RuntimeError, match="mean"):
        fp.load_predictor(broken, sha256=None)


# --- the measures -------------------------------------------------------------------------------

def test_r2_scores_by_hand_and_against_sklearn():
    truth = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [4.0, 1.0]])
    pred = np.array([[1.0, 0.5], [2.0, 0.5], [4.0, 0.5], [3.0, 0.5]])
    # Column 0: residuals 0, 0, 1, 1 over a total of 5 -> 1 - 2/5; column 1: predicting the mean -> 0.
    np.testing.assert_allclose(fp.r2_scores(pred, truth), [0.6, 0.0])
    rng = np.random.default_rng(3)
    truth, pred = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    pred[:, 0] = truth[:, 0] + 0.1 * pred[:, 0]
    np.testing.assert_allclose(fp.r2_scores(pred, truth), r2_score(truth, pred, multioutput="raw_values"))
    np.testing.assert_allclose(fp.r2_scores(pred[:, 1], truth[:, 1]), [r2_score(truth[:, 1], pred[:, 1])])
    assert np.isnan(fp.r2_scores(np.ones((3, 1)), np.full((3, 1), 2.0))[0])  # a constant truth has no R^2
    with pytest.raises(ValueError, match="shape"):
        fp.r2_scores(np.zeros((3, 2)), np.zeros((3, 1)))


def test_accuracies_by_hand_and_against_sklearn():
    predicted = np.array([[1, 1], [0, 1], [1, 0], [0, 0]], dtype=bool)
    truth = np.array([[1, 0], [0, 0], [0, 0], [1, 0]], dtype=bool)
    np.testing.assert_allclose(fp.accuracies(predicted, truth), [0.5, 0.5])
    valid = np.array([[1, 0], [1, 0], [0, 0], [0, 1]], dtype=bool)
    # Column 0 counts rows 0 and 1 (both right); column 1 only row 3 (right).
    np.testing.assert_allclose(fp.accuracies(predicted, truth, valid), [1.0, 1.0])
    assert np.isnan(fp.accuracies(predicted, truth, np.zeros_like(valid))).all()
    rng = np.random.default_rng(4)
    p, t = rng.uniform(size=200) > 0.5, rng.uniform(size=200) > 0.3
    np.testing.assert_allclose(fp.accuracies(p, t), [accuracy_score(t, p)])


def test_evaluate_predictor_scores_every_factor_and_attribute(random_model):
    faces = [face_factors(SEED, i) for i in range(6)]
    images = fp.images_to_tensor(np.stack([render_face(f)[0] for f in faces]))
    factors = factor_matrix(faces)
    scores = fp.evaluate_predictor(random_model, images, factors, attribute_table(factors))
    assert list(scores) == ["r2", "accuracy", "attribute_accuracy"]
    assert tuple(scores["r2"]) == PREDICTED_CONTINUOUS and tuple(scores["accuracy"]) == PREDICTED_BINARY
    assert tuple(scores["attribute_accuracy"]) == ATTRIBUTES
    missed = fp.failures(scores)
    assert missed and all(" < " in line for line in missed)  # random weights measure nothing
    perfect = {"r2": {"age": 0.99}, "accuracy": {"hat": 1.0}, "attribute_accuracy": {"Young": 0.98}}
    assert fp.failures(perfect) == []
    assert fp.failures({"r2": {"age": float("nan")}}) == ["r2 age nan < 0.95"]


# --- the training script ------------------------------------------------------------------------

def test_training_script_is_deterministic_and_writes_loadable_weights(tmp_path, capsys, monkeypatch):
    # A 5-face test split has no face fitting the README example's description (1 in 2,000).
    monkeypatch.setattr(mf, "example_index", lambda factors, test_rows: int(test_rows[0]))
    data = mf.make_faces(tmp_path / "data", n_train=40, n_test=5)
    digests = []
    for name in ("a.pt", "b.pt"):
        out = tmp_path / "out" / name
        assert tp.main(["--data_dir", str(data), "--out", str(out), "--epochs", "2", "--batch_size", "16",
                        "--warmup", "2", "--threads", "1", "--report", str(tmp_path / "report.json")]) == 0
        digests.append(fp.sha256_of(out))
    printed = capsys.readouterr().out
    assert digests[0] == digests[1] and f"sha256 {digests[0]}" in printed  # same seed, same bytes, whatever the name
    assert "test faces: 5" in printed and "Young" in printed and "below target" in printed
    assert not list((tmp_path / "out").glob("*.tmp"))
    model = fp.load_predictor(tmp_path / "out" / "a.pt", sha256=digests[0])
    assert torch.all(model.std > 0) and not torch.allclose(model.std, torch.ones(16))  # standardised by the data
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sha256"] == digests[0] and set(report["scores"]) == {"r2", "accuracy", "attribute_accuracy"}


# --- the shipped weights ------------------------------------------------------------------------

@pytest.mark.skipif(not fp.DEFAULT_PATH.is_file(), reason=f"no shipped factor predictor at {fp.DEFAULT_PATH}")
def test_shipped_predictor_meets_the_acceptance_targets_on_fresh_held_out_faces():
    """The acceptance (R^2 >= 0.95 per continuous factor, accuracy >= 97 % per binary factor and per
    CelebA attribute) on 400 held-out faces rendered here, every fifth of the test split, so the data
    folder is not needed. With 400 faces an accuracy is measured to about +-0.8 % (one standard error
    at 97 %) and an attribute labels 300-400 of them, so accuracies are held to 96 %; R^2 keeps 0.95
    (its sampling error at 0.97 is about +-0.005)."""
    model = fp.load_predictor()
    faces = [face_factors(SEED, i) for i in ACCEPTANCE_INDICES]
    images = fp.images_to_tensor(np.stack([render_face(f)[0] for f in faces]))
    factors = factor_matrix(faces)
    scores = fp.evaluate_predictor(model, images, factors, attribute_table(factors))
    missed = fp.failures(scores, r2=fp.TARGET_R2, accuracy=0.96)
    assert not missed, "; ".join(missed)


def test_the_perfect_edit_passes_the_evaluation_criteria(tmp_path, monkeypatch):
    """faces_oracle: the renderer toggling one attribute, measured by the shipped predictor and judged
    by the evaluation's criteria, flips the binary attributes on every face and keeps the nuisance on
    nearly all: the criteria can be met, so a shortfall of the model's edits is the model's."""
    from scripts.evaluation import faces_oracle

    monkeypatch.setattr(mf, "example_index", lambda factors, test_rows: int(test_rows[0]))
    data = mf.make_faces(tmp_path / "data", n_train=2, n_test=40)
    assert faces_oracle.main(["--data_dir", str(data), "--n_test", "40", "--json", str(tmp_path / "o.json")]) == 0
    report = json.loads((tmp_path / "o.json").read_text())["attributes"]
    assert set(report) == set(ATTRIBUTES)
    for attribute in ("Eyeglasses", "Mustache", "Bangs", "Wearing_Hat"):
        assert report[attribute]["success"] == 1.0, attribute
    assert np.mean([r["kept"] for r in report.values()]) >= 0.8  # 0.97 on 200 faces, 0.88 on these 40
