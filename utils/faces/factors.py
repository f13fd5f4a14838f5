"""The generative factors of the synthetic faces: what is drawn, how it is sampled, and the
CelebA-format attributes derived from it (docs/faces_data.md).

Every face is a ``FaceFactors`` record. ``sample_factors(rng)`` draws one with the designed
correlations of CelebA (grey hair with age, glasses and a moustache with age, bangs with light
hair, a smile with an open mouth and narrower eyes); ``attribute_table`` turns factors into
CelebA's +1 / -1 labels, with 0 (not labelled) in a margin around each threshold, as the digits'
``thick`` does, so the two classes of every attribute are separated.

Arrays in, arrays out; no files here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

#: Factors of the face itself, continuous in the ranges given, and binary ones (0 or 1).
SEMANTIC_CONTINUOUS = ("age", "smile", "mouth_open", "eye_open", "hair_tone", "hair_gray", "skin_tone")
SEMANTIC_BINARY = ("glasses", "moustache", "bangs", "hat")
#: Factors that are not about the face: background colour, lighting, where the face is and how turned.
NUISANCE = ("bg_r", "bg_g", "bg_b", "light_x", "light_y", "pos_x", "pos_y", "scale", "yaw")
#: Drawn but not predicted: the hat's colour (only visible with a hat).
UNPREDICTED = ("hat_hue",)


@dataclass(frozen=True)
class FaceFactors:
    """One face. Continuous factors and their ranges:

    age         [0, 1]   0 young .. 1 old: wrinkle and eye-bag contrast grows linearly with it
    smile       [-1, 1]  mouth-corner curvature: < 0 turned down, > 0 turned up
    mouth_open  [0, 1]   gap between the lips
    eye_open    [0, 1]   height of the eye opening (low = narrow eyes)
    hair_tone   [0, 1]   0 black .. 0.45 brown .. 1 blond
    hair_gray   [0, 1]   share of grey (at 1, 75 % grey over the tone)
    skin_tone   [0, 1]   0 pale .. 1 dark
    bg_r/g/b    [0, 1]   flat background colour
    light_x/y   [-0.35, 0.35]  shading gradient over the head (x to the right, y down)
    pos_x/y     [-1, 1]  head position around the aligned features: +-0.75 px each way at 32 px
    scale       [-1, 1]  head size, 0.95 .. 1.05 (the features keep theirs)
    yaw         [-1, 1]  head turn: the features sit up to 1.25 px to one side of the face's centre
    hat_hue     [0, 1)   hue of the hat

    Binary factors (0 / 1): glasses, moustache, bangs, hat.

    The eyes and the mouth are at the same pixels on every face, as alignment puts them in
    CelebA-HQ and FFHQ (utils/faces/render.py: ``EYES_X``, ``EYES_Y``, ``MOUTH_X``, ``MOUTH_Y``).
    """
    age: float
    smile: float
    mouth_open: float
    eye_open: float
    hair_tone: float
    hair_gray: float
    skin_tone: float
    glasses: int
    moustache: int
    bangs: int
    hat: int
    bg_r: float
    bg_g: float
    bg_b: float
    light_x: float
    light_y: float
    pos_x: float
    pos_y: float
    scale: float
    yaw: float
    hat_hue: float


FACTOR_NAMES = tuple(f.name for f in fields(FaceFactors))
#: What the factor predictor estimates: every factor but the hat's colour.
PREDICTED_CONTINUOUS = SEMANTIC_CONTINUOUS + NUISANCE
PREDICTED_BINARY = SEMANTIC_BINARY


def _clip(value: float, low: float = 0.0, high: float = 1.0) -> float:
    return float(min(high, max(low, value)))


#: Hair tone as a mixture of three modes (black, brown, blond): weight, mean, spread.
HAIR_MODES = ((0.40, 0.08, 0.05), (0.35, 0.45, 0.07), (0.25, 0.88, 0.05))


def sample_factors(rng: np.random.Generator) -> FaceFactors:
    """One face's factors, with CelebA's kind of correlations (the probabilities are the design;
    docs/faces_data.md gives the resulting correlation matrix):

    - hair_gray rises with age: clip(1.6 (age - 0.5) + N(0, 0.15));
    - glasses with probability 0.1 + 0.5 age, a moustache with 0.08 + 0.3 age;
    - bangs with probability 0.15 + 0.5 hair_tone (light hair has bangs more often);
    - mouth_open rises with a smile, eye_open falls with it (smiling narrows the eyes).
    The draw order is fixed, so one generator state gives one face.
    """
    age = float(rng.uniform(0.0, 1.0))
    smile = _clip(rng.normal(0.2, 0.45), -1.0, 1.0)
    mode = rng.choice(len(HAIR_MODES), p=[m[0] for m in HAIR_MODES])
    hair_tone = _clip(rng.normal(HAIR_MODES[mode][1], HAIR_MODES[mode][2]))
    hair_gray = _clip(1.6 * (age - 0.5) + rng.normal(0.0, 0.15))
    smiling = max(smile, 0.0)
    mouth_open = _clip(0.12 + 0.5 * smiling + rng.normal(0.0, 0.18))
    eye_open = _clip(0.62 - 0.3 * smiling + rng.normal(0.0, 0.2))
    skin_tone = float(rng.uniform(0.0, 1.0))
    glasses = int(rng.uniform() < 0.1 + 0.5 * age)
    moustache = int(rng.uniform() < 0.08 + 0.3 * age)
    bangs = int(rng.uniform() < 0.15 + 0.5 * hair_tone)
    hat = int(rng.uniform() < 0.15)
    bg = rng.uniform(0.1, 0.9, size=3)
    light_angle, light_strength = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.0, 0.35)
    pos = rng.uniform(-1.0, 1.0, size=2)
    scale, yaw, hat_hue = rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0), rng.uniform(0.0, 1.0)
    return FaceFactors(age=age, smile=smile, mouth_open=mouth_open, eye_open=eye_open, hair_tone=hair_tone,
                       hair_gray=hair_gray, skin_tone=skin_tone, glasses=glasses, moustache=moustache,
                       bangs=bangs, hat=hat, bg_r=float(bg[0]), bg_g=float(bg[1]), bg_b=float(bg[2]),
                       light_x=float(light_strength * np.cos(light_angle)),
                       light_y=float(light_strength * np.sin(light_angle)),
                       pos_x=float(pos[0]), pos_y=float(pos[1]), scale=float(scale), yaw=float(yaw),
                       hat_hue=float(hat_hue))


def factor_matrix(faces: list[FaceFactors], names: tuple[str, ...] = FACTOR_NAMES) -> np.ndarray:
    """(N, len(names)) float64: the named factors of each face, in order."""
    return np.array([[float(getattr(f, n)) for n in names] for f in faces], dtype=np.float64).reshape(len(faces), len(names))


def factors_from_row(row: dict[str, str | float]) -> FaceFactors:
    """A ``FaceFactors`` from a mapping of factor name to value (a row of ``factors.csv``)."""
    values = {}
    for f in fields(FaceFactors):
        value = float(row[f.name])
        values[f.name] = int(round(value)) if f.type in (int, "int") else value
    return FaceFactors(**values)


def as_dict(face: FaceFactors) -> dict[str, float]:
    return asdict(face)


#: The CelebA columns and their rules. ``(factor, positive_if, negative_if)`` with each a
#: predicate on the factor matrix; rows matching neither are 0 (the margin).
def _between(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return (x > low) & (x < high)


ATTRIBUTES = ("Smiling", "Mouth_Slightly_Open", "Narrow_Eyes", "Eyeglasses", "Mustache", "Bangs", "Wearing_Hat",
              "Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair", "Pale_Skin", "Young")

#: Where the renderer draws each attribute: the parts (``utils.faces.render.PARTS``) whose pixels its
#: factors change, on a face with the attribute and on one without it, for edits confined to them
#: (``--region``). The moustache lies inside the mouth's ellipse; bangs cover the forehead of a
#: face without them (its face part); age is drawn as lines on the face. The hat covers the
#: hair's place, and its brim reaches into the background, which is left out: a region that
#: held the background could not keep it.
ATTRIBUTE_PARTS = {
    "Smiling": ("mouth",), "Mouth_Slightly_Open": ("mouth",), "Mustache": ("mouth",),
    "Narrow_Eyes": ("eyes",), "Eyeglasses": ("eyes",),
    "Bangs": ("hair", "face"), "Wearing_Hat": ("hair",),
    "Black_Hair": ("hair",), "Brown_Hair": ("hair",), "Blond_Hair": ("hair",), "Gray_Hair": ("hair",),
    "Pale_Skin": ("face",), "Young": ("face",),
}

def attribute_part_names() -> dict[str, str]:
    """{attribute: the ``--region`` name of its parts} (``hair+face``: the union), what the data set's
    ``attribute_parts.json`` holds for ``--boundary_search --region auto``."""
    return {attribute: "+".join(parts) for attribute, parts in ATTRIBUTE_PARTS.items()}


#: Each attribute's thresholds, in words (docs/faces_data.md copies this table).
ATTRIBUTE_RULES = {
    "Smiling": "+1 if smile > 0.35, -1 if smile < 0.15",
    "Mouth_Slightly_Open": "+1 if mouth_open > 0.4, -1 if mouth_open < 0.25",
    "Narrow_Eyes": "+1 if eye_open < 0.3, -1 if eye_open > 0.45",
    "Eyeglasses": "+1 with glasses, -1 without",
    "Mustache": "+1 with a moustache, -1 without",
    "Bangs": "+1 with bangs, -1 without",
    "Wearing_Hat": "+1 with a hat, -1 without",
    "Black_Hair": "+1 if hair_tone < 0.2 and hair_gray < 0.3, -1 if hair_tone > 0.3 or hair_gray > 0.45",
    "Brown_Hair": "+1 if 0.3 < hair_tone < 0.6 and hair_gray < 0.3, -1 if hair_tone < 0.2, hair_tone > 0.72 "
                  "or hair_gray > 0.45",
    "Blond_Hair": "+1 if hair_tone > 0.75 and hair_gray < 0.3, -1 if hair_tone < 0.62 or hair_gray > 0.45",
    "Gray_Hair": "+1 if hair_gray > 0.6, -1 if hair_gray < 0.4",
    "Pale_Skin": "+1 if skin_tone < 0.2, -1 if skin_tone > 0.3",
    "Young": "+1 if age < 0.35, -1 if age > 0.5",
}


def attribute_table(factors: np.ndarray, names: tuple[str, ...] = FACTOR_NAMES) -> np.ndarray:
    """CelebA labels of N faces: factors (N, F) in the column order ``names`` -> (N, 13) int64 in
    {-1, 0, 1}, columns in the order of ``ATTRIBUTES`` (rules: ``ATTRIBUTE_RULES``)."""
    col = {n: np.asarray(factors, dtype=np.float64)[:, i] for i, n in enumerate(names)}
    tone, gray = col["hair_tone"], col["hair_gray"]

    def label(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
        assert not np.any(positive & negative), "an attribute rule labels a face both ways"
        return np.where(positive, 1, np.where(negative, -1, 0))

    def binary(name: str) -> np.ndarray:
        return label(col[name] > 0.5, col[name] <= 0.5)

    columns = {
        "Smiling": label(col["smile"] > 0.35, col["smile"] < 0.15),
        "Mouth_Slightly_Open": label(col["mouth_open"] > 0.4, col["mouth_open"] < 0.25),
        "Narrow_Eyes": label(col["eye_open"] < 0.3, col["eye_open"] > 0.45),
        "Eyeglasses": binary("glasses"),
        "Mustache": binary("moustache"),
        "Bangs": binary("bangs"),
        "Wearing_Hat": binary("hat"),
        "Black_Hair": label((tone < 0.2) & (gray < 0.3), (tone > 0.3) | (gray > 0.45)),
        "Brown_Hair": label(_between(tone, 0.3, 0.6) & (gray < 0.3), (tone < 0.2) | (tone > 0.72) | (gray > 0.45)),
        "Blond_Hair": label((tone > 0.75) & (gray < 0.3), (tone < 0.62) | (gray > 0.45)),
        "Gray_Hair": label(gray > 0.6, gray < 0.4),
        "Pale_Skin": label(col["skin_tone"] < 0.2, col["skin_tone"] > 0.3),
        "Young": label(col["age"] < 0.35, col["age"] > 0.5),
    }
    return np.stack([columns[a] for a in ATTRIBUTES], axis=1).astype(np.int64)


def attribute_scores(factors: np.ndarray, names: tuple[str, ...] = FACTOR_NAMES) -> np.ndarray:
    """Continuous CelebA scores of N faces: factors (N, F) in the column order ``names`` -> (N, 13)
    float64, columns in the order of ``ATTRIBUTES``, in the factors' own units.

    A score's sign is the attribute's class: positive wherever ``attribute_table`` says +1 and
    negative wherever it says -1 (inside a margin it has either sign). Each threshold is the middle
    of its rule's margin, e.g. Smiling = smile - 0.25 (the margin is 0.15 .. 0.35); a binary factor
    scores value - 0.5 (a probability of exactly 0.5 scores 0); the hair colours, whose rules join
    two or three conditions with "and", take the least of one term per condition:

        Black_Hair = min(0.25 - hair_tone, 0.375 - hair_gray)
        Brown_Hair = min(hair_tone - 0.25, 0.66 - hair_tone, 0.375 - hair_gray)
        Blond_Hair = min(hair_tone - 0.685, 0.375 - hair_gray)

    Use: whether an edit moved a face across an attribute's threshold, from measured factors.
    """
    values = np.asarray(factors, dtype=np.float64)
    col = {n: values[:, i] for i, n in enumerate(names)}
    tone, gray = col["hair_tone"], col["hair_gray"]
    not_gray = 0.375 - gray
    columns = {
        "Smiling": col["smile"] - 0.25,
        "Mouth_Slightly_Open": col["mouth_open"] - 0.325,
        "Narrow_Eyes": 0.375 - col["eye_open"],
        "Eyeglasses": col["glasses"] - 0.5,
        "Mustache": col["moustache"] - 0.5,
        "Bangs": col["bangs"] - 0.5,
        "Wearing_Hat": col["hat"] - 0.5,
        "Black_Hair": np.minimum(0.25 - tone, not_gray),
        "Brown_Hair": np.minimum.reduce([tone - 0.25, 0.66 - tone, not_gray]),
        "Blond_Hair": np.minimum(tone - 0.685, not_gray),
        "Gray_Hair": gray - 0.5,
        "Pale_Skin": 0.25 - col["skin_tone"],
        "Young": 0.425 - col["age"],
    }
    return np.stack([columns[a] for a in ATTRIBUTES], axis=1).astype(np.float64).reshape(len(values), len(ATTRIBUTES))


#: The perfect edit of each attribute, for the renderer: the factors its score reads set well inside
#: the class asked for (positive, negative), every other factor left as it is (``toggled``).
TOGGLES: dict[str, tuple[dict[str, float], dict[str, float]]] = {
    "Smiling": ({"smile": 0.6}, {"smile": -0.1}),
    "Mouth_Slightly_Open": ({"mouth_open": 0.6}, {"mouth_open": 0.1}),
    "Narrow_Eyes": ({"eye_open": 0.15}, {"eye_open": 0.7}),
    "Eyeglasses": ({"glasses": 1}, {"glasses": 0}),
    "Mustache": ({"moustache": 1}, {"moustache": 0}),
    "Bangs": ({"bangs": 1}, {"bangs": 0}),
    "Wearing_Hat": ({"hat": 1}, {"hat": 0}),
    "Black_Hair": ({"hair_tone": 0.1, "hair_gray": 0.0}, {"hair_tone": 0.9}),
    "Brown_Hair": ({"hair_tone": 0.45, "hair_gray": 0.0}, {"hair_tone": 0.1}),
    "Blond_Hair": ({"hair_tone": 0.9, "hair_gray": 0.0}, {"hair_tone": 0.1}),
    "Gray_Hair": ({"hair_gray": 0.9}, {"hair_gray": 0.1}),
    "Pale_Skin": ({"skin_tone": 0.1}, {"skin_tone": 0.5}),
    "Young": ({"age": 0.1}, {"age": 0.8}),
}


def toggled(face: FaceFactors, attribute: str, positive: bool) -> FaceFactors:
    """``face`` with ``attribute`` (an ``ATTRIBUTES`` name) moved into its positive (or negative)
    class and nothing else changed: what an ideal edit renders (``TOGGLES``)."""
    return replace(face, **TOGGLES[attribute][0 if positive else 1])
