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


# Decoding cost is bounded by what the header implies, before anything is decoded:
# * an image far wider than tall (or the reverse) is no photograph, and resampling 1 x 40,000,000
#   pixels to a square allocates filter tables of gigabytes;
MAX_ASPECT_RATIO = 100
# * a file that declares far more pixels than its bytes could describe (a 34-byte WebP with a
#   40-megapixel canvas) costs seconds and a gigabyte for nothing: solid-colour PNG, GIF and lossy
#   WebP stay under about 1,400 pixels per byte, JPEG under 70; only lossless WebP of flat content
#   goes beyond. Images up to RATIO_FREE_PIXELS are never refused for it;
MAX_PIXELS_PER_BYTE = 2048
RATIO_FREE_PIXELS = 4_000_000
# * what the decoded image and one conversion of it take in memory (bytes per pixel of the decoded
#   mode, plus an RGBA copy), estimated from the header.
MAX_DECODE_BYTES = 512 * 1024 * 1024
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2,
                    "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}


def check_decode_cost(width: int, height: int, mode: str, encoded_bytes: int) -> None:
    """Refuse, before decoding, an image whose decode would cost far more than an image's worth."""
    pixels = width * height
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageTooComplexError(f"the image is {width}x{height}: an aspect ratio beyond {MAX_ASPECT_RATIO}:1 "
                                   "is not a photograph")
    if pixels > RATIO_FREE_PIXELS and pixels > MAX_PIXELS_PER_BYTE * encoded_bytes:
        raise ImageTooComplexError(f"the image declares {pixels} pixels in {encoded_bytes} bytes (more than "
                                   f"{MAX_PIXELS_PER_BYTE} pixels per byte): refused before decoding")
    estimate = pixels * (_BYTES_PER_PIXEL.get(mode, 4) + 4)
    if estimate > MAX_DECODE_BYTES:
        raise ImageTooLargeError(f"decoding the {width}x{height} {mode} image would take about {estimate >> 20} MiB; "
                                 f"the limit is {MAX_DECODE_BYTES >> 20} MiB")


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers in a JPEG: exact, since entropy-coded data escapes every 0xFF byte."""
    return data.count(b"\xff\xda")


_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 (Huffman tables), C8, CC are not frame headers
MAX_HEADER_SEGMENTS = 256  # segments before the frame header; real files have a handful


def is_progressive_jpeg(data: bytes) -> bool:
    """The frame header's kind, read by walking the segments before it (a few reads, not a scan of the data).

    True for a progressive (or hierarchical) JPEG, and for anything whose header cannot be walked this
    simply: the caller then leaves it to the full decoder in a thread. A byte search for the SOF2
    marker instead scans the whole file, and 0xFF bytes are common in entropy-coded data, so it cost
    about 0.16 ms of the event loop per 640x480 photo (py-spy, docs/performance.md).
    """
    pos, n = 2, len(data)
    for _ in range(MAX_HEADER_SEGMENTS):
        while pos + 1 < n and data[pos] == 0xFF and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 4 > n or data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker in _SOF:
            return marker in _PROGRESSIVE_SOF
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header: not a file to decode inline
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return True


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
    """Any Pillow mode -> RGB at ``size`` x ``size``; transparency is composited on white.

    Resized first, then composited: the full-size image is never copied more than once (a mode
    conversion), and the compositing works on the small image. Pillow resizes RGBA with
    premultiplied alpha, so compositing after resizing gives what compositing before would.
    ``reducing_gap`` box-reduces by an integer factor first: the resampling filter's tables then
    stay small whatever the input's size.
    """
    if im.mode in HIGH_BIT_DEPTH_MODES:
        return _resized(_high_bit_depth_to_rgb(im, size), size)
    has_alpha = im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        small = _resized(im if im.mode in ("RGBA", "LA") else im.convert("RGBA"), size)
        rgba = small.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "RGB":  # the common case: no conversion copy (convert() copies even RGB -> RGB)
        return _resized(im, size)
    if im.mode == "L":
        return _resized(im, size).convert("RGB")
    return _resized(im.convert("RGB"), size)


def _resized(im: Image.Image, size: int) -> Image.Image:
    if im.size == (size, size):
        return im
    return im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


def load_image(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode an encoded image into the model's uint8 ``[size, size, 3]`` RGB array.

    Steps: read the header only and check its declared size against ``max_pixels``
    (a decompression bomb never gets decoded) and what decoding it would cost
    (``check_decode_cost``: aspect ratio, pixels per encoded byte, memory); for JPEG ask for
    DCT-domain scaling toward ``size`` (draft mode: much faster on large photos); decode the
    first frame; apply the EXIF orientation; resize; convert to RGB (alpha on white). JPEGs with
    more scans than any real encoder writes are refused before decoding (``MAX_JPEG_SCANS``).
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
    check_decode_cost(width, height, im.mode, len(data))
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
        arr = np.asarray(_to_rgb(im, size), dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # truncated data, bad EXIF, decoder errors
        raise InvalidImageError(f"the image could not be decoded: {type(exc).__name__}") from exc
    if arr.shape != (size, size, 3):  # defensive: a decoder quirk must not reach the model
        raise InvalidImageError("the image decoded to an unexpected shape")
    return np.ascontiguousarray(arr)
