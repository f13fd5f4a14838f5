"""Image files <-> tensors in [-1, 1]."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from utils.errors import UserError
from utils.io.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS_ENV = "BOUNDARYDIFFUSION_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: about 0.5 GB while decoding and converting


def max_pixels() -> int:
    """The largest image (width x height) read: $BOUNDARYDIFFUSION_MAX_PIXELS, else 40 megapixels."""
    text = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        value = int(text) if text else DEFAULT_MAX_PIXELS
    except ValueError:
        raise UserError(f"{MAX_PIXELS_ENV} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise UserError(f"{MAX_PIXELS_ENV} must be a positive integer, got {text!r}")
    return value


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _png_rows_bytes(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    """Bytes of decompressed PNG image data that a header declares (filter bytes included)."""
    bits = depth * _PNG_CHANNELS.get(colour, 4)
    passes = [((height - y0 + dy - 1) // dy, (width - x0 + dx - 1) // dx)
              for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                                     (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))] if interlaced else [(height, width)]
    return sum(rows * (1 + (cols * bits + 7) // 8) for rows, cols in passes if rows > 0 and cols > 0)


def _check_png_complete(path: Path) -> None:
    """A PNG whose image data holds fewer rows than its header declares is an error (Pillow fills
    the missing rows with black when the compressed stream itself is complete). Streams the data
    through zlib without keeping it."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return
        inflate, produced, declared = zlib.decompressobj(), 0, None
        while True:
            head = fh.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IHDR":
                width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", fh.read(13))
                declared = _png_rows_bytes(width, height, depth, colour, bool(interlace))
                fh.seek(length - 13 + 4, 1)
            elif kind == b"IDAT":
                chunk = fh.read(length)
                fh.seek(4, 1)
                while chunk and produced <= (declared or 0):
                    produced += len(inflate.decompress(chunk, 1 << 20))
                    chunk = inflate.unconsumed_tail
            elif kind == b"IEND":
                break
            else:
                fh.seek(length + 4, 1)
    if declared is not None and produced < declared:
        raise UserError(f"image {path} is truncated: its data holds fewer rows than its header declares")


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (palette, RGBA, 16-bit, grayscale, CMYK) as 'RGB' or 'L'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Fixed scales, never the image's own maximum: 16-bit data spans 0..65535; 32-bit integer
        # images holding 8-bit values (as some writers produce) 0..255; float images 0..1.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255):
            top = 65535.0
        else:
            top = 1.0 if img.mode == "F" else 255.0
        arr = np.nan_to_num(arr / top, nan=0.0, posinf=1.0, neginf=0.0)
        img = Image.fromarray(np.round(np.clip(arr, 0, 1) * 255.0).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)  # transparent pixels become white
    return img.convert("RGB" if channels == 3 else "L")


def load_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """Read an image as (1, C, size, size) float32 in [-1, 1].

    Non-square images are centre-cropped, then resized with a Lanczos filter. Raises UserError
    for a missing, empty, truncated or unreadable file.
    """
    return image_to_tensor(open_image(path, channels), size)


def open_image(path: str | Path, channels: int) -> Image.Image:
    """Decode an image file as an 'RGB' (channels 3) or 'L' image, EXIF orientation applied.
    Raises UserError for a missing, empty, truncated or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"image {path} is empty (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never black rows
    limit = max_pixels()
    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > limit:
                raise UserError(f"image {path} has {img.size[0]} x {img.size[1]} pixels, more than the limit of "
                                f"{limit} (raise it with {MAX_PIXELS_ENV})")
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_mode(img, channels)
    except UserError:
        raise
    except Exception as exc:  # Pillow's decoders fail on damaged files with many error types
        raise UserError(f"image {path} cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    _check_png_complete(path)
    return img


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """An 'RGB' or 'L' image as (1, C, size, size) float32 in [-1, 1]: centre-cropped to a square
    if it is not one, then resized with a Lanczos filter."""
    side = min(img.size)
    img = ImageOps.fit(img, (side, side), method=Image.Resampling.BICUBIC) if img.size[0] != img.size[1] else img
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr * 2.0 - 1.0)[None]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (any shape) -> uint8 of the same shape, clipped and rounded as written to files."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``quantize``: uint8 -> float32 in [-1, 1]; ``quantize(dequantize(u))`` is ``u``."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) or (H, W) uint8, clipped and rounded."""
    arr = quantize(x).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def save_image(x: torch.Tensor, path: str | Path) -> None:
    """Write one image (C, H, W) in [-1, 1] as PNG (atomically)."""
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(x)).save(tmp, format="PNG")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def expand_image_paths(spec: str | Path) -> tuple[list[Path], bool]:
    """The images ``--img_path`` names: (paths, is_collection). A file is itself (not a
    collection); a folder gives its images (``list_images``); anything else is read as a glob
    pattern (``imgs/*.png``) and gives the matching image files, sorted. Raises UserError when
    nothing matches."""
    path = Path(spec)
    if path.is_file():
        return [path], False
    if path.is_dir():
        paths = list_images(path)
    elif any(c in str(spec) for c in "*?["):
        anchor = Path(path.anchor) if path.is_absolute() else Path(".")
        pattern = str(path.relative_to(anchor)) if path.is_absolute() else str(spec)
        paths = sorted(p for p in anchor.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise UserError(f"image {path} does not exist")
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) match {spec}")
    return paths, True
