"""Image preprocessing shared by training and serving: numpy + Pillow, no torch.

Training, evaluation, export parity checks and the service all call ``load_image``, so a
model never sees pixels prepared differently from how it was trained.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})

# Pillow refuses (or warns about) images above its own bomb limit before we can give a
# clean error; we check the declared size ourselves, so its guard is lifted here once.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """Base of image preprocessing errors; ``code`` is the service's error code."""

    code = "invalid_image"


class InvalidImageError(ImageError):
    code = "invalid_image"


class UnsupportedImageError(ImageError):
    code = "unsupported_image_format"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# progressive JPEGs from real encoders have about 10 scans (libjpeg: 10, mozjpeg: up to ~20); each
# scan is another pass over every coefficient, so a file that repeats refinement scans hundreds of
# times costs minutes of decoding for a few hundred kB. More than this is refused before decoding.
MAX_JPEG_SCANS = 64


class ImageTooComplexError(ImageError):
    code = "image_too_complex"


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers in a JPEG: exact, since entropy-coded data escapes every 0xFF byte."""
    return data.count(b"\xff\xda")


def is_progressive_jpeg(data: bytes) -> bool:
    return b"\xff\xc2" in data or b"\xff\xc6" in data or b"\xff\xca" in data or b"\xff\xce" in data


def _high_bit_depth_to_rgb(im: Image.Image, size: int) -> Image.Image:
    """16-bit, 32-bit and float greyscale -> 8-bit RGB, scaled (not clipped as Pillow's convert does).

    Large images are subsampled to about twice the model's size *before* any arithmetic, so
    the cost is one integer copy of the decoded image, never float64 copies of all of it.
    """
    arr = np.asarray(im)
    step = max(1, min(arr.shape[0], arr.shape[1]) // (2 * size))
    small = arr[::step, ::step]
    if im.mode == "F":
        top = 65535.0 if float(small.max(initial=0.0)) > 255 else 255.0
        arr8 = np.clip(small.astype(np.float32) * (255.0 / top), 0, 255).round().astype(np.uint8)
    else:
        # I;16*: 0..65535; I (32-bit): clip into that range first
        wide = np.clip(small, 0, 65535).astype(np.uint32)
        arr8 = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(arr8, mode="L").convert("RGB")


def _to_rgb(im: Image.Image, size: int) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white."""
    if im.mode in HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_rgb(im, size)
    has_alpha = im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def load_image(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode an encoded image into the model's uint8 ``[size, size, 3]`` RGB array.

    Steps: read the header only and check its declared size against ``max_pixels``
    (a decompression bomb never gets decoded); for JPEG ask for DCT-domain scaling
    toward ``size`` (draft mode: much faster on large photos); decode the first frame;
    apply the EXIF orientation; convert to RGB (alpha on white); resize. JPEGs with more
    scans than any real encoder writes are refused before decoding (``MAX_JPEG_SCANS``).
    """
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InvalidImageError("the file is not a recognised image") from exc
    except Exception as exc:  # Pillow raises many types on corrupt headers
        raise InvalidImageError(f"the image header could not be read: {type(exc).__name__}") from exc
    if im.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(
            f"image format {im.format} is not supported; send JPEG, PNG, WebP, BMP, GIF or TIFF"
        )
    width, height = im.size
    if width < 1 or height < 1:
        raise InvalidImageError("the image has no pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if im.format in ("JPEG", "MPO") and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        raise ImageTooComplexError(f"the JPEG has {scans} scans; real encoders write at most a few dozen "
                                   f"(the limit is {MAX_JPEG_SCANS})")
    try:
        if im.format in ("JPEG", "MPO"):
            # draft keeps the result >= the requested size, so quality stays on a par
            im.draft("RGB", (size, size))
        im.seek(0)  # GIF/TIFF/WebP: the first frame
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: the default copies every image
        rgb = _to_rgb(im, size)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # truncated data, bad EXIF, decoder errors
        raise InvalidImageError(f"the image could not be decoded: {type(exc).__name__}") from exc
    if arr.shape != (size, size, 3):  # defensive: a decoder quirk must not reach the model
        raise InvalidImageError("the image decoded to an unexpected shape")
    return np.ascontiguousarray(arr)
