"""Images from outside: which files count as images, decoding one to the model's size, and reading an
untrusted one (a path or uploaded bytes) with every refusal named. Imports no torch, so the commands
that declare options from here start quickly.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageRejected

# The one list: dataset folders, `predict FOLDER` and the cache all accept these (anything PIL decodes
# without plugins beyond its defaults).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Full-size ISIC 2020 photographs are up to 6000 x 6000 (36 MP); anything far beyond is refused undecoded.
DEFAULT_MAX_PIXELS = 64_000_000


def max_pixels_option(megapixels: float, flag: str = "--max-megapixels") -> int:
    """The pixel limit a user gave in megapixels, checked: above Pillow's own limit (twice
    Image.MAX_IMAGE_PIXELS, about 179 MP) Pillow refuses the image whatever ours says."""
    ceiling = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    pixels = int(megapixels * 1e6)
    if pixels < 1 or (ceiling and pixels > ceiling):
        raise ConfigError(f"{flag} {megapixels:g}: must be above 0 and at most {ceiling // 10**6} (Pillow refuses "
                          "larger images as a possible decompression bomb)")
    return pixels


def decode_image(path: str | Path | io.BytesIO, size: int) -> tuple[np.ndarray, list[str]]:
    """RGB uint8 array of size x size, and the conversions it needed. Raises on unreadable files."""
    notes: list[str] = []
    with Image.open(path) as image:
        if image.format == "JPEG":
            # Decode large JPEGs at a reduced scale: full-resolution ISIC images are ~6000x4000.
            image.draft("RGB", (size, size))
        image.load()
        if image.mode != "RGB":
            notes.append(f"mode {image.mode}")
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGB", rgba.size, (255, 255, 255))
                background.paste(rgba, mask=rgba.split()[-1])
                image = background
            else:
                image = image.convert("RGB")
        if image.size != (size, size):
            notes.append("resized")
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8), notes


def _header_size(handle, max_pixels: int) -> tuple[int, int]:
    try:
        with Image.open(handle) as image:
            return image.size
    except Image.DecompressionBombError as exc:  # Pillow's own, larger limit, met before ours can be checked
        raise ImageRejected(f"image dimensions exceed the limit of {max_pixels} pixels (Pillow: {exc})", 413) from exc
    except FileNotFoundError as exc:
        raise ImageRejected("file does not exist", 404) from exc
    except IsADirectoryError as exc:
        raise ImageRejected("is a folder, not an image file", 400) from exc
    except Image.UnidentifiedImageError as exc:
        if _starts_like_an_image(handle):
            raise ImageRejected("corrupt image (it starts as a known image format, but cannot be read)", 400) from exc
        raise ImageRejected("not an image (no known image format)", 415) from exc
    except Exception as exc:  # OSError mostly; some format plugins raise ValueError and the like on bad headers
        raise ImageRejected(f"cannot be read ({type(exc).__name__}: {exc})", 400) from exc


# The first bytes of the formats in IMAGE_EXTENSIONS: a file that starts with one but does not open is a damaged
# image (400), not another kind of file (415), whether or not this Pillow version can identify what is left of it.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _starts_like_an_image(handle) -> bool:
    if isinstance(handle, io.BytesIO):
        return handle.getvalue()[:8].startswith(IMAGE_SIGNATURES)
    with open(handle, "rb") as f:
        return f.read(8).startswith(IMAGE_SIGNATURES)


@dataclass(frozen=True)
class ImageChecks:
    """What an image must be before it is scored: `min_side` pixels on its shorter side (of the original),
    and a grey-level standard deviation of at least `min_std` (0-255)."""

    min_side: int
    min_std: float


def read_image(source: str | Path | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               checks: Optional[ImageChecks] = None) -> np.ndarray:
    """size x size x 3 uint8 from a path or bytes; ImageRejected (with the reason) for anything unusable:
    unreadable, larger than max_pixels, or (with `checks`) too small or too flat to be a photo."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    width, height = _header_size(handle, max_pixels)
    # Checked from the header before decoding, so a small file claiming huge dimensions costs nothing.
    if width * height > max_pixels:
        raise ImageRejected(f"image dimensions {width} x {height} exceed the limit of {max_pixels} pixels", 413)
    if checks is not None and min(width, height) < checks.min_side:
        raise ImageRejected(f"the image is {width}x{height} pixels; a dermoscopic photo needs at least "
                            f"{checks.min_side} pixels on its shorter side", 422)
    if isinstance(handle, io.BytesIO):
        handle.seek(0)
    try:
        pixels, _ = decode_image(handle, size)
    except Exception as exc:  # PIL raises many types for truncated or corrupt data
        raise ImageRejected(f"corrupt image ({type(exc).__name__}: {exc})", 400) from exc
    if checks is not None:
        from .familiarity import image_problems

        # The flatness check on the decoded image at the model's size: what the model would be shown.
        problems = image_problems(pixels, min_side=1, min_std=checks.min_std)
        if problems:
            # Said of the resized image: fine noise or texture in a large photo can average out to one colour.
            raise ImageRejected(f"resized to the model's {size}x{size} pixels, {problems[0]}", 422)
    return pixels


def _listed_paths(listing: Path) -> list[Path]:
    import pandas as pd

    try:
        table = pd.read_csv(listing, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many kinds here
        raise ConfigError(f"{listing}: cannot be read as a CSV list of image paths: {exc}") from exc
    if table.empty:
        raise ConfigError(f"{listing}: the CSV lists no image paths")
    column = "path" if "path" in table.columns else table.columns[0]
    return [p if p.is_absolute() else listing.parent / p for p in map(Path, table[column]) if str(p)]


def expand_inputs(items: Sequence[Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files; a .csv lists paths (column `path`)."""
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                          and not p.name.startswith("."))
        elif item.suffix.lower() == ".csv" and item.is_file():
            out += _listed_paths(item)
        else:
            out.append(item)
    return out
