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


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greyscale: scale to 8 bits instead of Pillow's clipping convert
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" or arr.max() > 255 else 255.0
        arr8 = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
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
    apply the EXIF orientation; convert to RGB (alpha on white); resize.
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
    try:
        if im.format in ("JPEG", "MPO"):
            # draft keeps the result >= the requested size, so quality stays on a par
            im.draft("RGB", (size, size))
        im.seek(0)  # GIF/TIFF/WebP: the first frame
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: the default copies every image
        rgb = _to_rgb(im)
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
