"""Draw one synthetic face from its factors: RGB 32 x 32, and a coverage mask per part.

The face is drawn at ``SUPERSAMPLE`` (4) times the size, 128 x 128, with hard-edged shapes, then
each 4 x 4 block is averaged (a box filter, the exact antialiasing of area coverage). Everything is
numpy and Pillow's polygon fill on fixed coordinates, so the same factors give the same bytes on
every machine. Lengths below are in output pixels (a 32-px image): the features are drawn at fixed
places and size, as alignment puts them, and the head (outline, hair, ears, hat) around them at its own
position and size.

Parts (``PARTS``), each a coverage mask in [0, 1] at 32 x 32:
    mouth       an ellipse around the mouth, the same for every smile and opening
    eyes        an ellipse around each eye (glasses included) and the bridge between them
    hair        the hair visible in the image (not the hat)
    face        the face's oval
    background  what shows the flat background
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from utils.faces.factors import FaceFactors

SIZE = 32
SUPERSAMPLE = 4
CANVAS = SIZE * SUPERSAMPLE
PARTS = ("mouth", "eyes", "hair", "face", "background")

# Colours (linear RGB in [0, 1]) at the ends of each factor's range.
HAIR_TONES = np.array([[0.09, 0.07, 0.06], [0.42, 0.26, 0.13], [0.93, 0.80, 0.48]])  # black, brown, blond
HAIR_GRAY = np.array([0.80, 0.80, 0.82])
SKIN_TONES = np.array([[0.99, 0.88, 0.80], [0.86, 0.64, 0.50], [0.42, 0.28, 0.20]])  # pale, medium, dark
LIP = np.array([0.76, 0.26, 0.30])
MOUTH_INSIDE = np.array([0.26, 0.05, 0.07])
TEETH = np.array([0.94, 0.93, 0.88])
EYE_WHITE = np.array([0.96, 0.96, 0.95])
IRIS = np.array([0.16, 0.10, 0.08])
FRAME = np.array([0.07, 0.07, 0.10])


def _ramp(stops: np.ndarray, u: float) -> np.ndarray:
    """Piecewise-linear colour between evenly spaced ``stops`` (K, 3) at u in [0, 1]."""
    position = float(np.clip(u, 0.0, 1.0)) * (len(stops) - 1)
    i = min(int(position), len(stops) - 2)
    return stops[i] + (position - i) * (stops[i + 1] - stops[i])


def hair_colour(tone: float, gray: float) -> np.ndarray:
    return (1 - 0.75 * gray) * _ramp(HAIR_TONES, tone) + 0.75 * gray * HAIR_GRAY


def skin_colour(tone: float) -> np.ndarray:
    return _ramp(SKIN_TONES, tone)


#: Where alignment puts the features, in output pixels: the eyes' centres and the mouth's. As the
#: FFHQ and CelebA-HQ alignment fixes the eyes and the mouth, every face has its features at these
#: pixels and at one size; position, size and turn move the head's outline, hair and ears around them.
EYES_X = (12.4, 19.6)
EYES_Y = 15.0
MOUTH_X, MOUTH_Y = 16.0, 22.3
#: The features' size (the lengths of the feature drawings are multiples of it).
FEATURE_SIZE = 1.0


@dataclass(frozen=True)
class Layout:
    """Where the parts are, in output pixels. cx, cy: face centre; rx, ry: face radii; f: head size;
    shift: sideways offset of the features from the face centre (the head turn); ex, ey: eye centres;
    mx, my: mouth centre (the features are fixed: ``EYES_X``, ``EYES_Y``, ``MOUTH_X``, ``MOUTH_Y``)."""
    cx: float
    cy: float
    rx: float
    ry: float
    f: float
    shift: float
    ex: tuple[float, float]
    ey: float
    mx: float
    my: float


def layout(face: FaceFactors) -> Layout:
    """The head around the fixed features: pos_x moves it +-0.75 px sideways, pos_y +-0.75 px up
    and down, scale sizes it 0.95 .. 1.05, and yaw turns it, the features sitting up to 1.25 px to
    one side of the face's centre (the head moves the other way)."""
    f = 1.0 + 0.05 * face.scale
    shift = 1.25 * face.yaw
    cx, cy = MOUTH_X + 0.75 * face.pos_x - shift, 17.0 + 0.75 * face.pos_y
    return Layout(cx=cx, cy=cy, rx=8.4 * f * (1 - 0.06 * abs(face.yaw)), ry=10.2 * f, f=f, shift=shift,
                  ex=EYES_X, ey=EYES_Y, mx=MOUTH_X, my=MOUTH_Y)


class Canvas:
    """The 128-px drawing surface: a colour image and the coordinate grids in output pixels."""

    def __init__(self, background: np.ndarray):
        centres = (np.arange(CANVAS) + 0.5) / SUPERSAMPLE
        self.y, self.x = np.meshgrid(centres, centres, indexing="ij")
        self.rgb = np.broadcast_to(background, (CANVAS, CANVAS, 3)).copy()

    def paint(self, region: np.ndarray, colour: np.ndarray | float) -> None:
        self.rgb[region] = colour

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def polygon(self, points: list[tuple[float, float]]) -> np.ndarray:
        return _draw(lambda d: d.polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points], fill=255))

    def line(self, points: list[tuple[float, float]], width: float) -> np.ndarray:
        return _draw(lambda d: d.line([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points], fill=255,
                                      width=max(1, int(round(width * SUPERSAMPLE))), joint="curve"))


def _draw(instructions) -> np.ndarray:
    image = Image.new("L", (CANVAS, CANVAS), 0)
    instructions(ImageDraw.Draw(image))
    return np.asarray(image) > 127


def _curve(x0: float, x1: float, y_of_u, n: int = 13) -> list[tuple[float, float]]:
    """Points (x, y(u)) for u in [-1, 1] from x0 to x1."""
    u = np.linspace(-1.0, 1.0, n)
    return [(float(x0 + (x1 - x0) * (v + 1) / 2), float(y_of_u(v))) for v in u]


def _mouth(canvas: Canvas, face: FaceFactors, lo: Layout, skin: np.ndarray) -> None:
    """Lips bent by the smile and parted by the opening; teeth in the upper part of the gap."""
    f = FEATURE_SIZE
    w = 3.1 * f

    def bend(u):
        return lo.my - face.smile * 1.3 * f * (u * u - 0.3)

    def gap(u):
        return face.mouth_open * 1.9 * f * (1 - u * u) ** 0.8

    def upper(u):
        return bend(u) - gap(u) / 2

    def lower(u):
        return bend(u) + gap(u) / 2

    outer = (_curve(lo.mx - w, lo.mx + w, lambda u: upper(u) - 0.55 * f * (1 - u * u) ** 0.5 - 0.2 * f)
             + _curve(lo.mx + w, lo.mx - w, lambda u: lower(-u) + 0.75 * f * (1 - u * u) ** 0.5 + 0.2 * f))
    canvas.paint(canvas.polygon(outer), 0.4 * skin + 0.6 * LIP)
    if face.mouth_open > 0.02:
        inside = canvas.polygon(_curve(lo.mx - w, lo.mx + w, upper) + _curve(lo.mx + w, lo.mx - w, lambda u: lower(-u)))
        canvas.paint(inside, MOUTH_INSIDE)
        teeth = canvas.polygon(_curve(lo.mx - 0.7 * w, lo.mx + 0.7 * w, lambda u: upper(0.7 * u))
                               + _curve(lo.mx + 0.7 * w, lo.mx - 0.7 * w, lambda u: upper(-0.7 * u) + min(gap(-0.7 * u), 0.7 * f)))
        canvas.paint(teeth & inside, TEETH)


def _wrinkles(canvas: Canvas, face: FaceFactors, lo: Layout, skin: np.ndarray, on_face: np.ndarray) -> None:
    """Forehead lines, lines from the nose to the mouth corners, and eye bags, darker with age."""
    f, dark = FEATURE_SIZE, skin * (1.0 - 0.5 * face.age)
    lines = []
    for dy in (3.7, 4.5):  # above the brows
        lines.append(canvas.line(_curve(lo.mx - 3.8 * f, lo.mx + 3.8 * f,
                                        lambda u, dy=dy: lo.ey - dy * f + 0.4 * f * u * u), 0.45 * f))
    for side in (-1, 1):
        lines.append(canvas.line([(lo.mx + side * 1.7 * f, lo.ey + 3.4 * f), (lo.mx + side * 3.9 * f, lo.my + 0.2 * f)],
                                 0.5 * f))
        ex = lo.ex[0] if side < 0 else lo.ex[1]
        lines.append(canvas.line(_curve(ex - 1.4 * f, ex + 1.4 * f, lambda u: lo.ey + 1.8 * f + 0.3 * f * (1 - u * u)),
                                 0.45 * f))
    canvas.paint(np.logical_or.reduce(lines) & on_face, dark)


def _eyes(canvas: Canvas, face: FaceFactors, lo: Layout, hair: np.ndarray) -> None:
    f = FEATURE_SIZE
    half_height = 0.3 * f + 1.15 * f * face.eye_open
    for ex in lo.ex:
        brow = canvas.line([(ex - 1.7 * f, lo.ey - 2.2 * f), (ex + 1.7 * f, lo.ey - 2.45 * f)], 0.7 * f)
        canvas.paint(brow, 0.6 * hair)
        white = canvas.ellipse(ex, lo.ey, 1.8 * f, half_height)
        canvas.paint(white, EYE_WHITE)
        canvas.paint(white & canvas.ellipse(ex + 0.5 * face.yaw * f, lo.ey, 0.95 * f, 0.95 * f), IRIS)
        lid = canvas.line(_curve(ex - 1.8 * f, ex + 1.8 * f, lambda u: lo.ey - half_height * (1 - u * u) ** 0.5), 0.35 * f)
        canvas.paint(lid, IRIS)


def _glasses(canvas: Canvas, lo: Layout) -> None:
    f, r = FEATURE_SIZE, 2.5 * FEATURE_SIZE
    rings = [canvas.ellipse(ex, lo.ey, r + 0.3 * f, r + 0.3 * f) & ~canvas.ellipse(ex, lo.ey, r - 0.3 * f, r - 0.3 * f)
             for ex in lo.ex]
    bridge = canvas.line([(lo.ex[0] + r, lo.ey - 0.3 * f), (lo.ex[1] - r, lo.ey - 0.3 * f)], 0.6 * f)
    temples = canvas.line([(lo.ex[0] - r, lo.ey), (lo.cx - lo.rx, lo.ey - 0.3 * f)], 0.5 * f) | \
        canvas.line([(lo.ex[1] + r, lo.ey), (lo.cx + lo.rx, lo.ey - 0.3 * f)], 0.5 * f)
    canvas.paint(rings[0] | rings[1] | bridge | temples, FRAME)


def _hat(canvas: Canvas, face: FaceFactors, lo: Layout) -> np.ndarray:
    f = lo.f
    crown = canvas.ellipse(lo.cx - 0.3 * lo.shift, lo.cy - 8.4 * f, lo.rx + 1.6 * f, 5.4 * f) & (canvas.y < lo.cy - 6.4 * f)
    brim = canvas.ellipse(lo.cx, lo.cy - 6.6 * f, lo.rx + 3.8 * f, 1.1 * f)
    colour = np.array(colorsys.hsv_to_rgb(face.hat_hue, 0.65, 0.72))
    canvas.paint(crown, colour)
    canvas.paint(crown & (canvas.y > lo.cy - 8.2 * f), 0.7 * colour)  # the band
    canvas.paint(brim, 0.85 * colour)
    return crown | brim


def render_face_hires(face: FaceFactors) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The face at 128 x 128: (128, 128, 3) float64 in [0, 1] and a boolean mask per part."""
    lo, f = layout(face), layout(face).f
    background = np.array([face.bg_r, face.bg_g, face.bg_b])
    skin, hair = skin_colour(face.skin_tone), hair_colour(face.hair_tone, face.hair_gray)
    canvas = Canvas(background)

    # 1. Behind the face: neck, hair falling to the jaw, ears.
    neck = (np.abs(canvas.x - lo.cx - 0.3 * lo.shift) < 3.3 * f) & (canvas.y > lo.cy + 5.0 * f)
    canvas.paint(neck, 0.82 * skin)
    hair_back = canvas.ellipse(lo.cx - 0.3 * lo.shift, lo.cy - 1.8 * f, lo.rx + 2.0 * f, lo.ry + 1.3 * f) & \
        (canvas.y < lo.cy + 4.6 * f)
    canvas.paint(hair_back, hair)
    for side in (-1, 1):
        canvas.paint(canvas.ellipse(lo.cx + side * (lo.rx + 0.2 * f) - 0.4 * lo.shift, lo.cy - 0.5 * f, 1.1 * f, 1.8 * f),
                     0.92 * skin)
    # 2. The face, with its age lines.
    face_oval = canvas.ellipse(lo.cx, lo.cy, lo.rx, lo.ry)
    canvas.paint(face_oval, skin)
    _wrinkles(canvas, face, lo, skin, face_oval)
    # 3. Hair over the forehead: a hairline high on the forehead, or bangs down to the brows.
    across = (canvas.x - lo.cx - 0.5 * lo.shift) / lo.rx
    if face.bangs:
        hairline = lo.ey - 2.7 * f + 0.35 * f * np.sin(canvas.x * 2.2) + 1.2 * f * across ** 2
    else:
        hairline = lo.cy - 7.4 * f + 3.2 * f * across ** 2
    hair_cap = (face_oval | hair_back) & (canvas.y < hairline)
    canvas.paint(hair_cap, hair)
    # 4. Features.
    _eyes(canvas, face, lo, hair)
    g = FEATURE_SIZE
    nose = canvas.line([(lo.mx + 0.2 * lo.shift, lo.ey + 1.2 * g), (lo.mx + 0.3 * lo.shift + 0.4 * g, lo.ey + 4.3 * g),
                        (lo.mx + 0.2 * lo.shift - 0.6 * g, lo.ey + 4.7 * g)], 0.5 * g)
    canvas.paint(nose, 0.78 * skin)
    _mouth(canvas, face, lo, skin)
    if face.moustache:
        top = _curve(lo.mx - 3.0 * g, lo.mx + 3.0 * g, lambda u: lo.my - 1.9 * g - face.smile * 0.5 * g * (u * u - 0.3)
                     - 0.4 * g * (1 - u * u))
        bottom = _curve(lo.mx + 3.2 * g, lo.mx - 3.2 * g, lambda u: lo.my - 0.75 * g - face.smile * 1.2 * g * (u * u - 0.3)
                        - face.mouth_open * 0.9 * g * (1 - u * u))
        canvas.paint(canvas.polygon(top + bottom), 0.8 * hair)
    if face.glasses:
        _glasses(canvas, lo)
    hat = _hat(canvas, face, lo) if face.hat else np.zeros_like(face_oval)
    # 5. Light falls across the head (not the flat background).
    head = neck | hair_back | hair_cap | face_oval | hat | (canvas.rgb != background).any(axis=2)
    shade = 1.0 + face.light_x * (canvas.x - lo.cx) / lo.rx + face.light_y * (canvas.y - lo.cy) / lo.ry
    canvas.rgb[head] *= np.clip(shade[head], 0.5, 1.5)[:, None]

    eyes = canvas.ellipse(lo.ex[0], lo.ey, 3.2 * g, 2.9 * g) | canvas.ellipse(lo.ex[1], lo.ey, 3.2 * g, 2.9 * g) | \
        ((np.abs(canvas.x - (lo.ex[0] + lo.ex[1]) / 2) < 1.2 * g) & (np.abs(canvas.y - lo.ey) < 1.0 * g))
    masks = {"mouth": canvas.ellipse(lo.mx, lo.my, 4.6 * g, 2.9 * g), "eyes": eyes,
             "hair": ((hair_back & ~face_oval) | hair_cap) & ~hat, "face": face_oval, "background": ~head}
    return np.clip(canvas.rgb, 0.0, 1.0), masks


def box_downsample(array: np.ndarray, factor: int = SUPERSAMPLE) -> np.ndarray:
    """Mean of each factor x factor block: (H, W, ...) -> (H / factor, W / factor, ...)."""
    h, w = array.shape[:2]
    return array.reshape(h // factor, factor, w // factor, factor, *array.shape[2:]).mean(axis=(1, 3))


def render_face(face: FaceFactors) -> tuple[np.ndarray, np.ndarray]:
    """The face at 32 x 32: image (32, 32, 3) uint8 and masks (len(PARTS), 32, 32) uint8, 255 = all
    of the pixel's area is that part (``PARTS`` order)."""
    rgb, masks = render_face_hires(face)
    image = np.rint(box_downsample(rgb) * 255.0).astype(np.uint8)
    coverage = np.stack([box_downsample(masks[p].astype(np.float64)) for p in PARTS])
    return image, np.rint(coverage * 255.0).astype(np.uint8)
