"""FFHQ-style face alignment (optional extra, installed in CI): the geometry of the crop square,
the aligned astronaut photo (scikit-image, public domain), and the behaviour without the extra."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import skimage.data
import yaml
from PIL import Image

import main as cli
from tests.helpers import assert_one_error_line, make_edit_setup
from utils.errors import UserError
from utils.io.face_align import FaceAligner, FaceExtraMissing, crop_quad, ffhq_quad
from utils.io.images import image_to_tensor, load_image


def _synthetic_landmarks(angle_deg: float, eye_distance: float = 40.0, centre=(100.0, 90.0)) -> np.ndarray:
    """68 points: eyes at +-eye_distance/2 around ``centre``, mouth corners one eye distance below,
    the whole face rotated by ``angle_deg``; the other points at the centre."""
    lm = np.zeros((68, 2))
    half = eye_distance / 2
    lm[36:42] = [-half, 0]
    lm[42:48] = [half, 0]
    lm[48], lm[54] = [-half * 0.8, eye_distance], [half * 0.8, eye_distance]
    a = np.radians(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return lm @ rotation.T + centre


@pytest.mark.parametrize("angle", [0.0, 25.0, -40.0])
def test_quad_is_a_square_turned_with_the_face(angle):
    quad = ffhq_quad(_synthetic_landmarks(angle))
    top = quad[3] - quad[0]  # top-left -> top-right
    side = quad[1] - quad[0]  # top-left -> bottom-left
    assert abs(np.degrees(np.arctan2(top[1], top[0])) - angle) < 1e-9
    assert abs(np.hypot(*top) - np.hypot(*side)) < 1e-9 and abs(top @ side) < 1e-6
    # Side = 2 * max(2 * eye distance, 1.8 * eye-to-mouth) = 2 * max(80, 72); centre 0.1 * eye-to-mouth below the eyes.
    assert abs(np.hypot(*top) - 160.0) < 1e-9
    eye_mid = _synthetic_landmarks(angle)[36:48].mean(axis=0)
    centre = quad.mean(axis=0)
    assert abs(np.hypot(*(centre - eye_mid)) - 0.1 * 40.0) < 1e-9


def test_crop_quad_maps_the_square_onto_the_output():
    arr = np.zeros((200, 200, 3), np.uint8)
    arr[50:150, 50:100] = 255  # left half of the square [50, 150) is white
    out = np.asarray(crop_quad(Image.fromarray(arr), np.array([[50, 50], [50, 150], [150, 150], [150, 50]]), 64))
    assert out[:, :28].min() > 200 and out[:, 36:].max() < 50


@pytest.fixture(scope="module")
def aligner():
    return FaceAligner()


def test_astronaut_is_aligned(aligner):
    aligned = aligner.align(Image.fromarray(skimage.data.astronaut()), 256)
    assert aligned.size == (256, 256)
    lm = aligner.landmarks(aligned)  # detected again on the crop
    eye_left, eye_right = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    d = eye_right - eye_left
    assert abs(np.degrees(np.arctan2(d[1], d[0]))) < 1.5, "eye line level"
    assert abs((eye_left[0] + eye_right[0]) / 2 - 128) < 0.03 * 256, "eyes' midpoint horizontally centred"
    assert 0.2 < np.hypot(*d) / 256 < 0.3, "inter-ocular distance about a quarter of the width"
    # The unaligned photo is neither: its face is small and off centre.
    raw = aligner.landmarks(Image.fromarray(skimage.data.astronaut()))
    assert np.hypot(*(raw[42:48].mean(0) - raw[36:42].mean(0))) / 512 < 0.15


def test_no_face_is_one_clear_error(aligner):
    with pytest.raises(UserError, match="no face"):
        aligner.align(Image.new("RGB", (200, 200), "gray"), 64)


def _face_setup(tmp_path, align_default: bool):
    setup = make_edit_setup(tmp_path / "s", attributes=("bright",), n_images=1)
    config = yaml.safe_load((tmp_path / "s" / "tiny.yml").read_text())
    config["data"]["align_face"] = align_default
    (tmp_path / "s" / "tiny.yml").write_text(yaml.safe_dump(config))
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    return setup, photo


def test_cli_writes_the_aligned_crop_as_original(tmp_path, capsys, aligner):
    setup, photo = _face_setup(tmp_path, align_default=False)
    args = [*setup["common"], "--edit_image_boundary", "--img_path", str(photo), "--edit_img_number", "1"]
    assert cli.main([*args, "--exp", str(tmp_path / "a"), "--align_face", "1"]) == 0
    expected = image_to_tensor(aligner.align(Image.fromarray(skimage.data.astronaut()), 16), 16)
    written = load_image(tmp_path / "a" / "edit" / "original.png", 16, 3)
    assert (written - expected).abs().max() < 1.5 / 127.5  # 8-bit rounding
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), "gray").save(blank)
    capsys.readouterr()
    code = cli.main([*setup["common"], "--edit_image_boundary", "--img_path", str(blank), "--align_face", "1",
                     "--exp", str(tmp_path / "b")])
    assert_one_error_line(code, capsys.readouterr().err, "no face")


def test_without_the_extra(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
    with pytest.raises(FaceExtraMissing, match="pip install -r requirements-face.txt"):
        FaceAligner()
    setup, photo = _face_setup(tmp_path, align_default=True)
    args = [*setup["common"], "--edit_image_boundary", "--img_path", str(photo), "--edit_img_number", "1"]
    # Asked for on the command line: one line saying how to install it, exit 1.
    code = cli.main([*args, "--exp", str(tmp_path / "a"), "--align_face", "1"])
    assert_one_error_line(code, capsys.readouterr().err, "pip install -r requirements-face.txt")
    # Only the config's default: a warning, and the unaligned image is edited.
    assert cli.main([*args, "--exp", str(tmp_path / "b")]) == 0
    assert "face extra is not installed" in capsys.readouterr().err
    written = load_image(tmp_path / "b" / "edit" / "original.png", 16, 3)
    assert (written - load_image(photo, 16, 3)).abs().max() < 1.5 / 127.5
