"""The synthetic faces: the renderer is deterministic, the data set is reproducible face by face,
the CelebA labels follow their rules with margins, ``attribute_scores`` agrees with them, and the
part masks are what their names say. Fast: tens of faces rendered, never the 42,000."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import make_faces as mf
from utils.faces.factors import (ATTRIBUTES, FACTOR_NAMES, FaceFactors, attribute_scores, attribute_table,
                                 factor_matrix, factors_from_row, sample_factors)
from utils.faces.render import PARTS, render_face, render_face_hires

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "faces"  # the rendered data set, when present (not in the repository)

#: A plain face in the middle of every range, every attribute clear of its margin but Brown_Hair.
PLAIN = FaceFactors(age=0.2, smile=0.5, mouth_open=0.5, eye_open=0.6, hair_tone=0.45, hair_gray=0.0, skin_tone=0.5,
                    glasses=0, moustache=0, bangs=0, hat=0, bg_r=0.5, bg_g=0.5, bg_b=0.5, light_x=0.0, light_y=0.0,
                    pos_x=0.0, pos_y=0.0, scale=0.0, yaw=0.0, hat_hue=0.3)


def _labels(**changes) -> dict[str, int]:
    """``attribute_table`` of PLAIN with ``changes``: attribute -> label."""
    row = factor_matrix([dataclasses.replace(PLAIN, **changes)])
    return dict(zip(ATTRIBUTES, attribute_table(row)[0].tolist()))


def _sampled(n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return factor_matrix([sample_factors(rng) for _ in range(n)])


# --- determinism ------------------------------------------------------------------------------

def test_same_factors_give_the_same_bytes():
    face = mf.face_factors(mf.SEED, 40_000)
    (image_a, masks_a), (image_b, masks_b) = render_face(face), render_face(face)
    assert image_a.shape == (32, 32, 3) and image_a.dtype == np.uint8
    assert masks_a.shape == (len(PARTS), 32, 32) and masks_a.dtype == np.uint8
    assert image_a.tobytes() == image_b.tobytes() and masks_a.tobytes() == masks_b.tobytes()
    assert mf.png_bytes(image_a) == mf.png_bytes(image_b)
    assert mf.face_factors(mf.SEED, 40_000) == face


def test_png_bytes_round_trip_without_metadata(tmp_path):
    image, _ = render_face(mf.face_factors(mf.SEED, 3))
    path = tmp_path / "face.png"
    path.write_bytes(mf.png_bytes(image))
    with Image.open(path) as png:
        assert png.mode == "RGB" and png.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(png), image)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """The data set of 20 train + 5 test faces, written twice into two folders (the example face is
    the best of the 5 by ``example_index``'s penalty)."""
    return [mf.make_faces(tmp_path_factory.mktemp(name), n_train=20, n_test=5) for name in ("a", "b")]


def test_data_set_is_byte_identical_when_written_again(two_sets):
    a, b = two_sets
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) == 20 + 5 + 8  # images, factors.csv, the attribute file, 2 masks files, correlations,
    # the attributes' parts, the example and its parts
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not any(p.name.endswith(".tmp") for p in a.rglob("*"))


def test_a_face_is_the_same_alone_or_in_the_set(two_sets):
    root = two_sets[0]
    with open(root / "factors.csv", newline="") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    masks = {split: np.load(root / f"masks_{split}.npz") for split in ("train", "test")}
    for split, index, row in (("train", 0, 0), ("train", 13, 13), ("test", 22, 2)):
        face = mf.face_factors(mf.SEED, index)
        image, mask = render_face(face)
        name = mf.face_name(index)
        assert (root / "images" / split / name).read_bytes() == mf.png_bytes(image)
        assert masks[split]["names"][row] == name
        np.testing.assert_array_equal(masks[split]["masks"][row], mask)
        assert rows[name]["split"] == split
        np.testing.assert_allclose([float(rows[name][n]) for n in FACTOR_NAMES],
                                   factor_matrix([face])[0], atol=5e-7)
        written = factors_from_row(rows[name])
        assert (written.glasses, written.hat) == (face.glasses, face.hat)


def test_attribute_file_matches_the_factor_table(two_sets):
    root = two_sets[0]
    lines = (root / "list_attr_faces.txt").read_text().splitlines()
    assert lines[0] == "25" and tuple(lines[1].split()) == ATTRIBUTES
    table = np.array([[int(v) for v in line.split()[1:]] for line in lines[2:]])
    faces = [mf.face_factors(mf.SEED, i) for i in range(25)]
    np.testing.assert_array_equal(table, attribute_table(factor_matrix(faces)))


@pytest.mark.skipif(not (SHIPPED / "factors.csv").is_file(), reason="the faces data set is not rendered here")
def test_rendered_data_set_faces_render_again_alone():
    for split, index in (("train", 0), ("train", 39_999), ("test", 40_000), ("test", 41_999)):
        image, _ = render_face(mf.face_factors(mf.SEED, index))
        assert (SHIPPED / "images" / split / mf.face_name(index)).read_bytes() == mf.png_bytes(image)


def test_example_index_picks_a_test_face_that_fits_its_description():
    test_rows = np.arange(mf.N_TRAIN, mf.N_TRAIN + mf.N_TEST)
    factors = np.zeros((mf.N_TRAIN + mf.N_TEST, len(FACTOR_NAMES)))
    factors[test_rows] = factor_matrix([mf.face_factors(mf.SEED, int(i)) for i in test_rows])
    index = mf.example_index(factors, test_rows)
    face = dict(zip(FACTOR_NAMES, factors[index]))
    assert index in test_rows
    assert -0.35 < face["smile"] < 0.0 and face["mouth_open"] < 0.2 and face["age"] < 0.35
    assert face["hat"] == face["glasses"] == face["moustache"] == 0
    assert abs(face["yaw"]) < 0.2 and abs(face["pos_x"]) < 0.3 and abs(face["pos_y"]) < 0.3
    few = mf.example_index(factors, test_rows[:5])  # any split has one: the smallest penalty among those not smiling
    assert few in test_rows[:5] and factors[few, FACTOR_NAMES.index("smile")] < 0


# --- attribute labels and scores --------------------------------------------------------------

@pytest.mark.parametrize("changes, attribute, label", [
    ({"smile": 0.36}, "Smiling", 1), ({"smile": 0.34}, "Smiling", 0), ({"smile": 0.16}, "Smiling", 0),
    ({"smile": 0.14}, "Smiling", -1),
    ({"mouth_open": 0.41}, "Mouth_Slightly_Open", 1), ({"mouth_open": 0.3}, "Mouth_Slightly_Open", 0),
    ({"mouth_open": 0.24}, "Mouth_Slightly_Open", -1),
    ({"eye_open": 0.29}, "Narrow_Eyes", 1), ({"eye_open": 0.4}, "Narrow_Eyes", 0), ({"eye_open": 0.46}, "Narrow_Eyes", -1),
    ({"glasses": 1}, "Eyeglasses", 1), ({"glasses": 0}, "Eyeglasses", -1),
    ({"moustache": 1}, "Mustache", 1), ({"bangs": 1}, "Bangs", 1), ({"hat": 1}, "Wearing_Hat", 1),
    ({"hat": 0}, "Wearing_Hat", -1),
    ({"hair_tone": 0.1}, "Black_Hair", 1), ({"hair_tone": 0.1, "hair_gray": 0.35}, "Black_Hair", 0),
    ({"hair_tone": 0.1, "hair_gray": 0.5}, "Black_Hair", -1), ({"hair_tone": 0.25}, "Black_Hair", 0),
    ({"hair_tone": 0.31}, "Black_Hair", -1),
    ({"hair_tone": 0.45}, "Brown_Hair", 1), ({"hair_tone": 0.65}, "Brown_Hair", 0), ({"hair_tone": 0.25}, "Brown_Hair", 0),
    ({"hair_tone": 0.19}, "Brown_Hair", -1), ({"hair_tone": 0.73}, "Brown_Hair", -1),
    ({"hair_tone": 0.45, "hair_gray": 0.46}, "Brown_Hair", -1),
    ({"hair_tone": 0.9}, "Blond_Hair", 1), ({"hair_tone": 0.7}, "Blond_Hair", 0), ({"hair_tone": 0.6}, "Blond_Hair", -1),
    ({"hair_tone": 0.9, "hair_gray": 0.5}, "Blond_Hair", -1),
    ({"hair_gray": 0.61}, "Gray_Hair", 1), ({"hair_gray": 0.5}, "Gray_Hair", 0), ({"hair_gray": 0.39}, "Gray_Hair", -1),
    ({"skin_tone": 0.1}, "Pale_Skin", 1), ({"skin_tone": 0.25}, "Pale_Skin", 0), ({"skin_tone": 0.31}, "Pale_Skin", -1),
    ({"age": 0.34}, "Young", 1), ({"age": 0.42}, "Young", 0), ({"age": 0.51}, "Young", -1),
])
def test_attribute_table_follows_its_rules(changes, attribute, label):
    assert _labels(**changes)[attribute] == label


def test_no_face_is_labelled_both_ways_and_margins_are_unlabelled():
    factors = _sampled(3000)
    table = attribute_table(factors)  # raises if a rule labels a face both ways
    assert table.shape == (3000, len(ATTRIBUTES)) and table.dtype == np.int64
    assert np.isin(table, (-1, 0, 1)).all()
    col = dict(zip(FACTOR_NAMES, factors.T))
    smile = table[:, ATTRIBUTES.index("Smiling")]
    assert (smile[(col["smile"] >= 0.15) & (col["smile"] <= 0.35)] == 0).all()
    for attribute in ("Eyeglasses", "Mustache", "Bangs", "Wearing_Hat"):
        assert (table[:, ATTRIBUTES.index(attribute)] != 0).all(), attribute
    for a, attribute in enumerate(ATTRIBUTES):  # both classes present in a sample of this size
        assert (table[:, a] == 1).sum() > 30 and (table[:, a] == -1).sum() > 30, attribute


def test_attribute_scores_sign_agrees_with_the_table():
    rng = np.random.default_rng(11)
    uniform = _sampled(300)[rng.integers(0, 300, 4000)]  # realistic rows, then every continuous factor redrawn
    for i, name in enumerate(FACTOR_NAMES):           # over its range, to reach every margin's edges
        if name in ("age", "mouth_open", "eye_open", "hair_tone", "hair_gray", "skin_tone"):
            uniform[:, i] = rng.uniform(0.0, 1.0, len(uniform))
        elif name == "smile":
            uniform[:, i] = rng.uniform(-1.0, 1.0, len(uniform))
    for factors in (_sampled(3000), uniform):
        table, scores = attribute_table(factors), attribute_scores(factors)
        assert scores.shape == table.shape and scores.dtype == np.float64
        assert (scores[table == 1] > 0).all() and (scores[table == -1] < 0).all()


def test_attribute_scores_on_hand_computed_rows():
    rows = factor_matrix([dataclasses.replace(PLAIN, hair_tone=0.1, hair_gray=0.5, smile=-0.25, age=0.9, glasses=1),
                          dataclasses.replace(PLAIN, hair_tone=0.5, hair_gray=0.1, skin_tone=0.05, eye_open=0.2)])
    scores = dict(zip(ATTRIBUTES, attribute_scores(rows).T))
    np.testing.assert_allclose(scores["Black_Hair"], [min(0.15, -0.125), min(-0.25, 0.275)])
    np.testing.assert_allclose(scores["Brown_Hair"], [min(-0.15, 0.56, -0.125), min(0.25, 0.16, 0.275)])
    np.testing.assert_allclose(scores["Blond_Hair"], [min(-0.585, -0.125), min(-0.185, 0.275)])
    np.testing.assert_allclose(scores["Smiling"], [-0.5, 0.25])
    np.testing.assert_allclose(scores["Young"], [-0.475, 0.225])
    np.testing.assert_allclose(scores["Eyeglasses"], [0.5, -0.5])
    np.testing.assert_allclose(scores["Pale_Skin"], [-0.25, 0.2])
    np.testing.assert_allclose(scores["Narrow_Eyes"], [-0.225, 0.175])
    np.testing.assert_allclose(scores["Gray_Hair"], [0.0, -0.4])
    # The column order of ``names`` is honoured: the same rows with their columns reversed.
    np.testing.assert_allclose(attribute_scores(rows[:, ::-1], FACTOR_NAMES[::-1]), attribute_scores(rows))


# --- masks --------------------------------------------------------------------------------------

def test_masks_are_coverages_and_the_parts_sit_where_they_should():
    faces = [mf.face_factors(mf.SEED, i) for i in range(12)]
    faces += [dataclasses.replace(faces[0], yaw=yaw, scale=scale) for yaw in (-1.0, 1.0) for scale in (-1.0, 1.0)]
    part = {p: i for i, p in enumerate(PARTS)}
    for face in faces:
        _, masks = render_face(face)
        coverage = masks.astype(np.int64)
        assert masks.dtype == np.uint8 and coverage.min() >= 0 and coverage.max() <= 255
        assert coverage[part["face"]].max() == 255 and coverage[part["mouth"]].max() == 255
        # Face and background never share a drawing pixel: their 32-px coverages add up to at most
        # 255 (256 where two halves both round up).
        assert (coverage[part["face"]] + coverage[part["background"]]).max() <= 256
        # The mouth region lies in the face oval; at a full head turn at most 3 of the 16 drawing
        # pixels of an output pixel stray past the oval's edge.
        assert (coverage[part["mouth"]] - coverage[part["face"]]).max() <= 255 * 3 / 16 + 1
        _, hires = render_face_hires(face)
        assert not (hires["face"] & hires["background"]).any()
        assert (hires["mouth"] & ~hires["face"]).sum() <= 3


def test_mouth_mask_is_the_same_for_every_smile_and_opening():
    base = mf.face_factors(mf.SEED, 5)
    mouth = PARTS.index("mouth")
    reference = render_face(base)[1][mouth]
    for smile, mouth_open in ((-1.0, 0.0), (1.0, 1.0), (0.3, 0.5)):
        np.testing.assert_array_equal(render_face(dataclasses.replace(base, smile=smile, mouth_open=mouth_open))[1][mouth],
                                      reference)


def test_the_features_are_aligned_and_the_head_moves_around_them():
    """As in aligned CelebA-HQ, the eyes and the mouth sit at the same pixels on every face: their
    masks do not move with the head's position, size or turn, while the face's oval does."""
    base = mf.face_factors(mf.SEED, 5)
    eyes, mouth, face = PARTS.index("eyes"), PARTS.index("mouth"), PARTS.index("face")
    reference = render_face(base)[1]
    for pos_x, pos_y, scale, yaw in ((-1.0, 1.0, -1.0, 1.0), (1.0, -1.0, 1.0, -1.0), (0.4, 0.0, 0.0, 0.0)):
        moved = render_face(dataclasses.replace(base, pos_x=pos_x, pos_y=pos_y, scale=scale, yaw=yaw))[1]
        np.testing.assert_array_equal(moved[eyes], reference[eyes])
        np.testing.assert_array_equal(moved[mouth], reference[mouth])
        assert not np.array_equal(moved[face], reference[face])


def test_the_bundled_example_face_is_test_face_41444_with_its_parts():
    """imgs/face_example.png (the README's first command edits it) is rendered face 41444, and its
    parts file holds that face's masks (``--region mouth`` reads it)."""
    image, masks = render_face(mf.face_factors(mf.SEED, 41444))
    assert (REPO / "imgs" / "face_example.png").read_bytes() == mf.png_bytes(image)
    with np.load(REPO / "imgs" / "face_example.png.parts.npz", allow_pickle=False) as parts:
        assert list(parts["names"]) == ["face_example.png"] and list(parts["parts"]) == list(PARTS)
        np.testing.assert_array_equal(parts["masks"][0], masks)


def test_toggled_faces_change_class_and_nothing_the_score_does_not_read():
    """Every attribute toggled either way on sampled faces: the attribute table gives the class asked
    for, and every factor outside the attribute's toggle keeps its value (the nuisance above all)."""
    import dataclasses

    from utils.faces.factors import ATTRIBUTES, TOGGLES, attribute_table, factor_matrix, sample_factors, toggled

    rng = np.random.default_rng(5)
    faces = [sample_factors(rng) for _ in range(200)]
    assert set(TOGGLES) == set(ATTRIBUTES)
    for a, attribute in enumerate(ATTRIBUTES):
        for positive in (True, False):
            moved = [toggled(f, attribute, positive) for f in faces]
            assert (attribute_table(factor_matrix(moved))[:, a] == (1 if positive else -1)).all(), attribute
            touched = set(TOGGLES[attribute][0 if positive else 1])
            for before, after in zip(faces, moved):
                for field in dataclasses.fields(before):
                    if field.name not in touched:
                        assert getattr(before, field.name) == getattr(after, field.name), (attribute, field.name)
