"""The factor predictor: a small CNN that measures every factor of a synthetic face image.

It is trained on rendered faces only (``scripts/train_predictor.py``), never on a diffusion
model's outputs, so it is an independent instrument for what an edit changed: the 16 continuous
factors of ``PREDICTED_CONTINUOUS`` in their own units and the 4 binary ones of
``PREDICTED_BINARY`` as probabilities. ``attribute_scores`` (utils/faces/factors.py) turns its
measurements into CelebA scores, and ``features`` gives the penultimate activations for a Fréchet
distance between two sets of images.

Images in are (B, 3, 32, 32) float in [-1, 1], the diffusion model's pixel convention
(``images_to_tensor`` converts rendered uint8 images). The shipped weights are
``checkpoints/faces_predictor.pt``, checked against ``PREDICTOR_SHA256`` when loaded.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.io.files import sha256_file
from utils.errors import UserError
from utils.faces.factors import ATTRIBUTES, FACTOR_NAMES, PREDICTED_BINARY, PREDICTED_CONTINUOUS, attribute_scores

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO / "checkpoints" / "faces_predictor.pt"
#: SHA-256 of the shipped weights; ``scripts/train_predictor.py`` prints the digest of what it writes.
PREDICTOR_SHA256 = "cd12c8f964654d9902d7eaade99312e9ed570a811ebef739f09c522518cb2dbf"
#: The command that writes ``DEFAULT_PATH`` (named in the errors of ``load_predictor``).
TRAIN_COMMAND = "python -m scripts.train_predictor --data_dir data/faces"
#: What ``predict`` returns, in the order of the network's outputs.
PREDICTED_NAMES = PREDICTED_CONTINUOUS + PREDICTED_BINARY


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3 x 3 convolution, batch norm (a fixed affine map in eval mode), SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.SiLU())


class FactorPredictor(nn.Module):
    """Seven 3 x 3 convolutions (two at full resolution for the sub-pixel shapes of lips, eyelids and
    age lines, then 32 px -> 4 px and 32 -> 128 channels), the 4 x 4 map flattened (so where things
    are stays known: position, turn, light direction), one hidden layer of ``width`` features, then
    16 standardised regressions and 4 logits. 0.96 M parameters (3.9 MB in float32).

    Continuous outputs are standardised: factor = mean + std * output, with ``mean`` and ``std`` (16,)
    buffers set from the training factors (``set_standardisation``) and saved with the weights.
    Batch norm makes ``forward`` depend on the mode: measure in eval mode (``predict``,
    ``features`` and ``load_predictor`` see to it).
    """

    def __init__(self, width: int = 256):
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, 32), _conv(32, 32),                # 32 x 32
            _conv(32, 64, stride=2), _conv(64, 64),     # 16 x 16
            _conv(64, 128, stride=2), _conv(128, 128),  # 8 x 8
            _conv(128, 128, stride=2),                  # 4 x 4
            nn.Flatten(), nn.Linear(128 * 4 * 4, width), nn.SiLU())
        self.continuous = nn.Linear(width, len(PREDICTED_CONTINUOUS))
        self.binary = nn.Linear(width, len(PREDICTED_BINARY))
        self.register_buffer("mean", torch.zeros(len(PREDICTED_CONTINUOUS)))
        self.register_buffer("std", torch.ones(len(PREDICTED_CONTINUOUS)))

    def set_standardisation(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        """Fix the per-factor mean and standard deviation (16,) of the continuous outputs."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(self.mean.shape)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(self.std.shape)
        if not bool((std > 0).all()):
            raise ValueError("every factor's standard deviation must be positive")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, 32, 32) in [-1, 1] -> (standardised continuous (B, 16), binary logits (B, 4))."""
        h = self.body(x)
        return self.continuous(h), self.binary(h)

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """The penultimate features of images x (B, 3, 32, 32) in [-1, 1] (any device), measured in
        eval mode on the model's device -> (B, width) float32 on the CPU."""
        with _eval_mode(self):
            parts = [self.body(_checked(chunk, self.mean.device)).cpu() for chunk in _chunks(x, batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.continuous.in_features)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
        """Every factor of images x (B, 3, 32, 32) in [-1, 1] (any device), measured in eval mode on the
        model's device: name -> (B,) float32 on the CPU, in ``PREDICTED_NAMES`` order; continuous
        factors in their own units (``FaceFactors``), binary ones as P(present) in [0, 1]."""
        values = []
        with _eval_mode(self):
            for chunk in _chunks(x, batch_size):
                continuous, logits = self(_checked(chunk, self.mean.device))
                values.append(torch.cat([self.mean + self.std * continuous, torch.sigmoid(logits)], dim=1).cpu())
        table = torch.cat(values) if values else torch.zeros(0, len(PREDICTED_NAMES))
        return {name: table[:, i] for i, name in enumerate(PREDICTED_NAMES)}


@contextmanager
def _eval_mode(module: nn.Module):
    """The module in eval mode inside the block, its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _chunks(x: torch.Tensor, size: int):
    for start in range(0, len(x), size):
        yield x[start:start + size]


def _checked(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x as float32 on ``device``, once its shape is (B, 3, 32, 32)."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
        raise ValueError(f"the factor predictor takes images of shape (B, 3, 32, 32), got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Rendered images (N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float32 in [-1, 1] (the model's input)."""
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {array.shape} {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2))).float() / 127.5 - 1.0


def prediction_matrix(prediction: dict[str, torch.Tensor], names: tuple[str, ...] = PREDICTED_NAMES) -> np.ndarray:
    """``predict``'s dict -> (N, len(names)) float64, the named factors in order (as ``factor_matrix``),
    ready for ``attribute_scores(matrix, names)``."""
    return np.stack([prediction[n].detach().cpu().double().numpy() for n in names], axis=1)


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (``utils.io.files.sha256_file``)."""
    return sha256_file(path)


def load_predictor(path: str | Path = DEFAULT_PATH, sha256: str | None = PREDICTOR_SHA256) -> FactorPredictor:
    """The predictor whose state dict is at ``path``, in eval mode with gradients off.

    The file's SHA-256 must equal ``sha256`` (default: the shipped weights' ``PREDICTOR_SHA256``;
    None skips the check, e.g. for weights just trained). Loaded with ``weights_only=True`` and
    ``strict=True``. UserError, naming the file and how to retrain, when it is missing or differs.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no factor predictor at {path}: train it with `{TRAIN_COMMAND} --out {path}`")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256:
            raise UserError(f"factor predictor {path} has SHA-256 {actual}, expected {sha256}: retrain it with "
                            f"`{TRAIN_COMMAND} --out {path}` (and set PREDICTOR_SHA256 in utils/faces/predictor.py "
                            f"to the digest it prints)")
    model = FactorPredictor()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval().requires_grad_(False)


def r2_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column: pred, truth (N, K) (or (N,)) -> (K,) float64,
    1 - sum((truth - pred)^2) / sum((truth - mean(truth))^2), as sklearn's ``r2_score`` with
    ``multioutput='raw_values'``: 1 is perfect, 0 is no better than the mean, it can be negative;
    nan for a constant truth column."""
    p = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    t = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
    if p.shape != t.shape:
        raise ValueError(f"predictions {p.shape} and truth {t.shape} differ in shape")
    residual = ((t - p) ** 2).sum(axis=0)
    total = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), np.nan)


def accuracies(predicted: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Share of right classes per column: predicted, truth (N, K) (or (N,)) bool (True = positive
    class) -> (K,) float64 in [0, 1], counting only rows where ``valid`` (N, K) bool is True (e.g.
    the faces an attribute file labels +1 or -1; default: every row); nan where no row counts."""
    p = np.asarray(predicted, dtype=bool).reshape(len(predicted), -1)
    t = np.asarray(truth, dtype=bool).reshape(len(truth), -1)
    v = np.ones_like(t) if valid is None else np.asarray(valid, dtype=bool).reshape(len(valid), -1)
    if not p.shape == t.shape == v.shape:
        raise ValueError(f"predicted {p.shape}, truth {t.shape} and valid {v.shape} differ in shape")
    counted = v.sum(axis=0)
    right = ((p == t) & v).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counted > 0, right / np.maximum(counted, 1), np.nan)


#: The acceptance targets on held-out faces: R^2 of every continuous factor, accuracy of every
#: binary factor and of every CelebA attribute (over the faces it labels +1 or -1).
TARGET_R2 = 0.95
TARGET_ACCURACY = 0.97


def evaluate_predictor(model: FactorPredictor, images: torch.Tensor, factors: np.ndarray,
                       labels: np.ndarray) -> dict[str, dict[str, float]]:
    """How well ``model`` measures N faces of known factors.

    images (N, 3, 32, 32) in [-1, 1]; factors (N, len(FACTOR_NAMES)) float in ``FACTOR_NAMES`` order
    (``factor_matrix``); labels (N, 13) in {-1, 0, 1}, ``ATTRIBUTES`` order (``attribute_table`` or
    the attribute file). Returns {"r2": {continuous factor: R^2}, "accuracy": {binary factor:
    accuracy at P = 0.5}, "attribute_accuracy": {attribute: accuracy of the sign of
    ``attribute_scores`` of the measured factors, over the faces labelled +1 or -1}}.
    """
    truth = np.asarray(factors, dtype=np.float64)
    labels = np.asarray(labels)
    if not len(images) == len(truth) == len(labels):
        raise ValueError(f"{len(images)} images, {len(truth)} factor rows and {len(labels)} label rows differ in number")
    measured = prediction_matrix(model.predict(images))
    column = [FACTOR_NAMES.index(n) for n in PREDICTED_NAMES]
    n_cont = len(PREDICTED_CONTINUOUS)
    r2 = r2_scores(measured[:, :n_cont], truth[:, column[:n_cont]])
    binary = accuracies(measured[:, n_cont:] > 0.5, truth[:, column[n_cont:]] > 0.5)
    attribute = accuracies(attribute_scores(measured, PREDICTED_NAMES) > 0, labels > 0, labels != 0)
    return {"r2": dict(zip(PREDICTED_CONTINUOUS, r2.tolist())),
            "accuracy": dict(zip(PREDICTED_BINARY, binary.tolist())),
            "attribute_accuracy": dict(zip(ATTRIBUTES, attribute.tolist()))}


def failures(scores: dict[str, dict[str, float]], r2: float = TARGET_R2, accuracy: float = TARGET_ACCURACY) -> list[str]:
    """The entries of ``evaluate_predictor``'s scores below their target, as 'kind name value < target'
    (empty when every target is met; a nan counts as a failure)."""
    out = []
    for kind, values in scores.items():
        target = r2 if kind == "r2" else accuracy
        out += [f"{kind} {name} {value:.4f} < {target}" for name, value in values.items() if not value >= target]
    return out
