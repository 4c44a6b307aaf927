"""Preprocessing shared by training and serving: numpy + Pillow + tokenizers, no torch.

Training, evaluation, export parity checks and the service all call these two
functions, so a model never sees pixels or ids prepared differently from how it was
trained.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
EMPTY_TOKEN = "[EMPTY]"  # stands in for an empty caption so the LSTM always reads one real step
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, EMPTY_TOKEN)  # ids 0, 1, 2 in this order

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


@dataclass(frozen=True)
class EncodedText:
    ids: list[int]  # at least one id, never longer than max_len
    tokens: list[str]  # the token strings of ``ids``, for attention display


class TextEncoder:
    """Wraps a trained HuggingFace ``tokenizers`` WordLevel tokenizer (tokenizer.json)."""

    def __init__(self, tokenizer: object, max_len: int) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError("expected a tokenizers.Tokenizer")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_len)
        vocab = self.tokenizer.get_vocab()
        for i, tok in enumerate(SPECIAL_TOKENS):
            if vocab.get(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i}")
        self.pad_id = 0
        self.unk_id = 1
        self.empty_id = 2
        self.vocab_size = self.tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path: str | Path, max_len: int) -> TextEncoder:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), max_len)

    def encode(self, text: str) -> EncodedText:
        enc = self.tokenizer.encode(text)
        if not enc.ids:
            return EncodedText([self.empty_id], [EMPTY_TOKEN])
        return EncodedText(list(enc.ids), list(enc.tokens))

    def encode_batch(self, texts: Sequence[str]) -> list[EncodedText]:
        out = []
        for enc in self.tokenizer.encode_batch(list(texts)):
            out.append(EncodedText(list(enc.ids), list(enc.tokens)) if enc.ids else EncodedText([self.empty_id], [EMPTY_TOKEN]))
        return out

    def pad(self, encoded: Sequence[EncodedText], length: int | None = None) -> np.ndarray:
        """Right-pad ids into an int64 ``[N, L]`` array (L = longest, or ``length``)."""
        width = length or max(len(e.ids) for e in encoded)
        arr = np.full((len(encoded), width), self.pad_id, dtype=np.int64)
        for row, e in enumerate(encoded):
            arr[row, : len(e.ids)] = e.ids
        return arr


def train_tokenizer(captions: Iterable[str], vocab_size: int = 5000, min_frequency: int = 2) -> object:
    """A WordLevel tokenizer from the training captions only (NFKC + lowercase)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    tok.train_from_iterator(captions, trainer=trainer)
    return tok
