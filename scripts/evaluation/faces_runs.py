"""What the faces evaluation (``scripts/evaluation/faces.py``) edits and measures with: the faces of
a split, the factor predictor as an instrument with its error on rendered faces, the edit
settings and their requests, the engine runner of the evaluated faces as the instrument sees
them, and the progress lines. Every edit is made by the engine (``EngineRunner``)."""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from runners.engine import Denoising, EditDescription, EditRequest, Move, Region, UserError
from scripts.evaluation.common import EngineRunner
from scripts.evaluation.faces_measures import Scale, Sweep, background_changed, canonical, rmse, score_factors
from utils.faces.factors import ATTRIBUTE_PARTS, ATTRIBUTES, FACTOR_NAMES, attribute_scores, attribute_table, \
    factor_matrix, factors_from_row
from utils.io.images import dequantize, quantize
from utils.faces.predictor import (DEFAULT_PATH, PREDICTED_NAMES, PREDICTOR_SHA256, FactorPredictor,
                                   evaluate_predictor, load_predictor, prediction_matrix, sha256_of)


# --------------------------------------------------------------------------------- data and instrument

@dataclass(frozen=True)
class FaceSplit:
    """Faces of one split: file names, images (N, 3, 32, 32) in [-1, 1] and true factors
    (N, len(FACTOR_NAMES)) in ``FACTOR_NAMES`` order."""
    names: list[str]
    images: torch.Tensor
    factors: np.ndarray


def read_split(read: Callable[[Path], torch.Tensor], data_dir: Path, split: str, limit: int | None = None
               ) -> FaceSplit:
    """The first ``limit`` faces (default: all) of ``split`` in ``factors.csv`` order, each image
    read by ``read`` (the engine's ``ImageReader.read``, as the command line reads it)."""
    table = Path(data_dir) / "factors.csv"
    if not table.is_file():
        raise UserError(f"no faces in {data_dir} ({table.name} is missing); run `bash data_download.sh faces .` "
                        "first (or pass --data_dir)")
    with open(table, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("split") == split][:limit]
    if not rows:
        raise UserError(f"{table} lists no {split} faces; render the data set again (python -m scripts.make_faces)")
    folder = Path(data_dir) / "images" / split
    missing = [r["name"] for r in rows if not (folder / r["name"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} {split} faces of {table.name} are not in {folder} (first: {missing[0]})")
    images = torch.stack([read(folder / r["name"]) for r in rows])
    return FaceSplit([r["name"] for r in rows], images, factor_matrix([factors_from_row(r) for r in rows]))


def read_part_masks(data_dir: Path, split: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The part masks of the faces ``names`` of ``split`` (the renderer's ``masks_<split>.npz``):
    {part: (N, H, W) float32 coverage in [0, 1]}, rows in the order of ``names``."""
    path = Path(data_dir) / f"masks_{split}.npz"
    if not path.is_file():
        raise UserError(f"no part masks in {data_dir} ({path.name} is missing); render the data set again "
                        "(bash data_download.sh faces)")
    with np.load(path, allow_pickle=False) as parts:
        row = {str(name): i for i, name in enumerate(parts["names"])}
        missing = [n for n in names if n not in row]
        if missing:
            raise UserError(f"{path} has no masks of {len(missing)} {split} faces (first: {missing[0]})")
        masks = parts["masks"][[row[n] for n in names]]
        return {str(p): masks[:, i].astype(np.float32) / 255.0 for i, p in enumerate(parts["parts"])}


def attribute_region(masks: dict[str, np.ndarray], attribute: str) -> np.ndarray:
    """(N, H, W) the part where each face draws ``attribute`` (``ATTRIBUTE_PARTS``; the union of
    its parts' coverage)."""
    return np.max(np.stack([masks[p] for p in ATTRIBUTE_PARTS[canonical(attribute)]]), axis=0)


def eight_bit(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] (not clipped) as the command line writes them: clipped and
    rounded to 8-bit levels (the writer's ``quantize``), back in [-1, 1]."""
    return dequantize(quantize(x))


@dataclass(frozen=True)
class Instrument:
    """The factor predictor, the scale of its measurements (``Scale``, from the test faces), what
    it measured on those faces (``test_measured`` (N, F)) and its report entry (``info``)."""
    predictor: FactorPredictor
    scale: Scale
    test_measured: np.ndarray
    info: dict

    def measure(self, images: torch.Tensor) -> np.ndarray:
        """The measured factors (N, F) float64 of images (N, 3, 32, 32) in [-1, 1] (as written)."""
        if len(images) == 0:
            return np.zeros((0, len(PREDICTED_NAMES)))
        return prediction_matrix(self.predictor.predict(eight_bit(images)))

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.predictor.features(eight_bit(images)).double().numpy()


def load_instrument(path: Path, test: FaceSplit, noise_multiple: float) -> Instrument:
    """The predictor at ``path`` (the shipped one checked against ``PREDICTOR_SHA256``, any other
    file loaded as it is) and its error and spread on the rendered test faces ``test``."""
    shipped = Path(path).resolve() == DEFAULT_PATH.resolve()
    predictor = load_predictor(path, PREDICTOR_SHA256 if shipped else None)
    truth = test.factors[:, [FACTOR_NAMES.index(n) for n in PREDICTED_NAMES]]
    measured = prediction_matrix(predictor.predict(test.images))
    scores, true_scores = attribute_scores(measured, PREDICTED_NAMES), attribute_scores(truth, PREDICTED_NAMES)
    scale = Scale(factor_sd=measured.std(axis=0), factor_rmse=rmse(measured, truth), score_sd=scores.std(axis=0),
                  score_rmse=rmse(scores, true_scores), own=score_factors(truth), noise_multiple=noise_multiple)
    checked = evaluate_predictor(predictor, test.images, test.factors, attribute_table(test.factors))
    info = {"path": str(path), "sha256": sha256_of(path), "checked_against_shipped_sha256": shipped,
            "n_test_faces": len(test.names), **checked,
            "factor_rmse": dict(zip(PREDICTED_NAMES, scale.factor_rmse.tolist())),
            "factor_sd": dict(zip(PREDICTED_NAMES, scale.factor_sd.tolist())),
            "score_rmse": dict(zip(ATTRIBUTES, scale.score_rmse.tolist())),
            "score_sd": dict(zip(ATTRIBUTES, scale.score_sd.tolist())),
            "score_factors": {a: list(v) for a, v in scale.own.items()}}
    return Instrument(predictor, scale, measured, info)


# --------------------------------------------------------------------------------- settings and edits

@dataclass(frozen=True)
class FaceSetting:
    """One evaluated edit setting (the command line's flags of the same names)."""
    name: str
    t_0: int
    start: float
    end: float
    k: int
    space: str = "both"
    unit: str = "absolute"
    eta: float = 1.0
    h_policy: str = "lagged"
    n_test_step: int = 40
    #: Confine each attribute's edit to its part of each face (``ATTRIBUTE_PARTS``), as the
    #: command line's ``--region <part>`` does (h in the part's cells, a 2-pixel feather).
    region: bool = False


def edit_request(setting: FaceSetting, moves: Sequence[Move], seed: int, batch_size: int, held: Sequence[str] = (),
                 force: bool = False) -> EditRequest:
    """The command line's request for ``moves`` under ``setting`` (``--condition_attr`` = held)."""
    return EditRequest(tuple(moves), Denoising(setting.n_test_step, setting.eta, setting.h_policy, seed, batch_size),
                       k=setting.k, held=tuple(held), space=setting.space, unit=setting.unit, force=force,
                       region=Region("part") if setting.region else None)


class FaceRunner:
    """The faces of an ``EngineRunner`` as the instrument measures them: the originals (and so each
    face's side of every attribute), the references (cached per reconstruction setting) and sweeps.
    ``masks``: the faces' part masks ({part: (N, H, W)}, ``read_part_masks``): for region settings,
    and to read each edit's background off the pixels (``Sweep.background_changed``)."""

    def __init__(self, runner: EngineRunner, instrument: Instrument, seed: int,
                 masks: dict[str, np.ndarray] | None = None):
        self.runner, self.instrument, self.seed, self.masks = runner, instrument, seed, masks
        self.original = instrument.measure(runner.images)
        self.original_scores = attribute_scores(self.original, PREDICTED_NAMES)
        self._references: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}

    def sides(self, attribute: str) -> np.ndarray:
        """(N,) -1 / +1 / 0: the side of each original face (0: exactly on the threshold)."""
        return np.sign(self.original_scores[:, ATTRIBUTES.index(canonical(attribute))]).astype(np.int64)

    def chosen(self, attribute: str, per_side: int) -> np.ndarray:
        """The first ``per_side`` faces on the negative side, then the first on the positive side."""
        side = self.sides(attribute)
        return np.concatenate([np.flatnonzero(side < 0)[:per_side], np.flatnonzero(side > 0)[:per_side]])

    def reference(self, description: EditDescription) -> tuple[torch.Tensor, np.ndarray]:
        """The engine's reference reconstructions of every face for the edits of ``description``
        (``EngineRunner.reference``) and their measured factors, once per reconstruction setting."""
        d = description.denoising
        key = (description.t_0, "h" in description.spaces, d.n_test_step, d.h_policy)
        if key not in self._references:
            images = self.runner.reference(description.t_0, description)
            self._references[key] = (images, self.instrument.measure(images))
        return self._references[key]

    def describe(self, setting: FaceSetting, attribute: str, batch_size: int) -> EditDescription:
        request = edit_request(setting, [Move(attribute, setting.start, setting.end)], self.seed, batch_size)
        return self.runner.describe(setting.t_0, request)

    def sweep(self, setting: FaceSetting, attribute: str, rows: np.ndarray, batch_size: int
              ) -> tuple[Sweep, torch.Tensor]:
        """One attribute's edits of the faces ``rows`` under ``setting``: (the measured ``Sweep``,
        the edits (n, K, C, H, W))."""
        description = self.describe(setting, attribute, batch_size)
        reference_images, reference = self.reference(description)
        if not len(rows):
            edits = torch.zeros((0, setting.k, *self.runner.images.shape[1:]))
        elif setting.region:
            edits = self.region_edits(setting, attribute, description, rows)
        else:
            edits = self.runner.edits(setting.t_0, description, rows.tolist())
        measured = self.instrument.measure(edits.flatten(0, 1)).reshape(len(rows), -1, len(PREDICTED_NAMES))
        sweep = Sweep(attribute, rows, self.sides(attribute)[rows], np.asarray(description.distances()),
                      reference[rows], measured)
        if self.masks is not None:
            judged = edits[torch.arange(len(rows)), torch.as_tensor(sweep.end_index())]
            sweep = replace(sweep, background_changed=background_changed(
                judged, reference_images[rows], self.masks["background"][rows]))
        return sweep, edits

    def region_edits(self, setting: FaceSetting, attribute: str, description: EditDescription, rows: np.ndarray
                     ) -> torch.Tensor:
        """The edits (n, K, C, H, W) of the faces ``rows``, each confined to its own part of
        ``attribute`` (``Engine.edit_in_regions``, the command line's region edit)."""
        if self.masks is None:
            raise UserError("a region setting needs the faces' part masks")
        sub = self.runner.subset(rows.tolist())
        with sub.session(setting.t_0) as editor:
            _, edits = sub.engine.edit_in_regions(editor, sub.inversion(setting.t_0), description,
                                                  attribute_region(self.masks, attribute)[rows], sub.seed_keys)
        return edits


# --------------------------------------------------------------------------------- progress

class Progress:
    """Progress lines with the elapsed time and an estimate of the time left, from the network
    calls (image x step) planned and done so far."""

    def __init__(self, planned: int):
        self.planned, self.done, self.started = max(1, planned), 0, time.perf_counter()

    def summary(self) -> dict:
        """The calls made (image x step, as counted here) and the seconds per call so far."""
        elapsed = time.perf_counter() - self.started
        return {"image_steps": self.done, "seconds": elapsed, "seconds_per_image_step": elapsed / max(self.done, 1)}

    def step(self, calls: int, text: str) -> None:
        self.done += calls
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(self.done, 1) * max(self.planned - self.done, 0)
        print(f"[{elapsed / 60:5.1f} min, {100 * min(self.done / self.planned, 1):3.0f} %, about {left / 60:.0f} min "
              f"left] {text}", flush=True)
