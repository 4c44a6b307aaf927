from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from classifier_core.images import (
    MAX_PIXELS_PER_BYTE,
    ImageError,
    ImageTooComplexError,
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedImageError,
    load_image,
)
from classifier_core.text import EMPTY_TOKEN, TextEncoder, train_tokenizer

S = 32




def test_rgb_jpeg_shape_and_dtype() -> None:
    arr = load_image(encode(Image.new("RGB", (120, 80), (200, 20, 20)), "JPEG"), S)
    assert arr.shape == (S, S, 3) and arr.dtype == np.uint8
    assert abs(int(arr[..., 0].mean()) - 200) < 8 and arr[..., 1].mean() < 40


def test_grayscale_becomes_three_equal_channels() -> None:
    arr = load_image(encode(Image.new("L", (50, 50), 77), "PNG"), S)
    assert (arr == 77).all()


def test_rgba_transparency_is_composited_on_white() -> None:
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    arr = load_image(encode(im, "PNG"), S)
    assert (arr == 255).all()
    half = load_image(encode(Image.new("RGBA", (20, 20), (0, 0, 0, 128)), "PNG"), S)
    assert 120 <= int(half.mean()) <= 135


def test_palette_with_transparency() -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    arr = load_image(encode(im, "PNG"), S)
    assert (arr[..., 2] == 255).all() and (arr[..., 0] == 0).all()
    im.info["transparency"] = 0
    arr_t = load_image(encode(im, "PNG", transparency=0), S)
    assert (arr_t == 255).all()


def test_cmyk_jpeg() -> None:
    im = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    arr = load_image(encode(im, "JPEG"), S)
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    arr = load_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95), S)
    # after rotation the white half is on top
    assert arr[: S // 2 - 2].mean() > 200 and arr[S // 2 + 2 :].mean() < 50


@pytest.mark.parametrize("size", [(1, 1), (5000, 50), (50, 5000), (3, 300)])
def test_tiny_and_elongated_images_decode(size: tuple[int, int]) -> None:
    arr = load_image(encode(Image.new("RGB", size, (9, 99, 199)), "PNG"), S)
    assert arr.shape == (S, S, 3)
    assert tuple(int(x) for x in arr[S // 2, S // 2]) == (9, 99, 199)


@pytest.mark.parametrize("size", [(20000, 5), (1, 400), (101, 1)])
def test_an_aspect_ratio_no_photograph_has_is_refused_before_decoding(size: tuple[int, int]) -> None:
    with pytest.raises(ImageTooComplexError, match="aspect ratio"):
        load_image(encode(Image.new("RGB", size, (9, 99, 199)), "PNG"), S)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    im = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert im.mode.startswith("I;16")
    arr = load_image(encode(im, "PNG"), S)
    assert 125 <= int(arr.mean()) <= 130


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "GIF", "TIFF"])
def test_other_formats(fmt: str) -> None:
    arr = load_image(encode(Image.new("RGB", (30, 30), (0, 250, 0)), fmt), S)
    assert arr[..., 1].mean() > 200


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    arr = load_image(buf.getvalue(), S)
    assert arr[..., 0].mean() > 200 and arr[..., 2].mean() < 50


def test_large_jpeg_uses_draft_and_matches_shape() -> None:
    data = encode(Image.new("RGB", (4000, 3000), (10, 20, 30)), "JPEG")
    assert load_image(data, S).shape == (S, S, 3)


def test_bomb_is_refused_from_the_header() -> None:
    # a real 30000x30000 PNG header and a tiny body: refused before any pixel is decoded
    data = encode(Image.new("1", (30000, 30000)), "PNG")
    assert len(data) < 200_000
    with pytest.raises(ImageTooLargeError):
        load_image(data, S, max_pixels=40_000_000)


@pytest.mark.parametrize("data,err", [
    (b"", InvalidImageError),
    (b"hello world, not an image", InvalidImageError),
    (b"%PDF-1.4\n1 0 obj<<>>endobj\n", InvalidImageError),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', InvalidImageError),
])
def test_not_images(data: bytes, err: type[Exception]) -> None:
    with pytest.raises(err):
        load_image(data, S)


def test_truncated_jpeg() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(InvalidImageError):
        load_image(data[: len(data) // 3], S)


def test_unsupported_format() -> None:
    data = encode(Image.new("RGB", (8, 8)), "PPM")
    with pytest.raises(UnsupportedImageError):
        load_image(data, S)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_any_bytes_give_an_image_or_a_typed_error(data: bytes) -> None:
    try:
        arr = load_image(data, S, max_pixels=1_000_000)
    except ImageError:
        return
    assert arr.shape == (S, S, 3) and arr.dtype == np.uint8


# --- text ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text() -> TextEncoder:
    tok = train_tokenizer(["a red tomato", "a red apple", "the cherry tomato", "tomato tomato apple"], min_frequency=1)
    return TextEncoder(tok, max_len=6)


def test_special_ids(text: TextEncoder) -> None:
    assert (text.pad_id, text.unk_id, text.empty_id) == (0, 1, 2)


def test_unknown_words_map_to_unk(text: TextEncoder) -> None:
    enc = text.encode("a purple zucchini")
    assert enc.ids[1:] == [text.unk_id, text.unk_id] and enc.ids[0] > 2


def test_empty_caption_yields_one_real_token(text: TextEncoder) -> None:
    for caption in ("", "   ", "\n\t"):
        enc = text.encode(caption)
        assert enc.ids == [text.empty_id] and enc.tokens == [EMPTY_TOKEN]


def test_long_caption_is_truncated(text: TextEncoder) -> None:
    assert len(text.encode("tomato " * 1000).ids) == 6


def test_normalisation_nfkc_and_lowercase(text: TextEncoder) -> None:
    assert text.encode("ＴＯＭＡＴＯ").ids == text.encode("tomato").ids  # full-width forms
    assert text.encode("Red APPLE").ids == text.encode("red apple").ids
    enc = text.encode("томат 🍅 طماطم")
    assert all(0 < i < text.vocab_size for i in enc.ids)


def test_pad_right_pads(text: TextEncoder) -> None:
    arr = text.pad([text.encode("a red tomato"), text.encode("apple")])
    assert arr.dtype == np.int64 and arr.shape == (2, 3) and list(arr[1, 1:]) == [0, 0]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_string_gives_ids_in_vocab(text: TextEncoder, s: str) -> None:
    enc = text.encode(s)
    assert 1 <= len(enc.ids) <= text.max_len
    assert all(1 <= i < text.vocab_size for i in enc.ids)
    assert len(enc.tokens) == len(enc.ids)


def _peak_rss_mb(image: bytes) -> tuple[float, float, str]:
    """Peak resident memory (MB) of a fresh process before and after ``load_image(image)``, and its outcome."""
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(image)
        f.flush()
        code = ("import resource, sys, time\n"
                "from classifier_core.images import load_image, ImageError\n"
                "data = open(sys.argv[1], 'rb').read()\n"
                "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "t = time.perf_counter()\n"
                "try:\n    load_image(data, 224, 40_000_000); out = 'ok'\n"
                "except ImageError as e:\n    out = e.code\n"
                "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "print(before / 1024, after / 1024, out, time.perf_counter() - t)\n")
        res = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True, text=True, timeout=120, check=True)
    before, after, outcome, _ = res.stdout.split()
    return float(before), float(after), outcome


def test_images_whose_decode_costs_far_more_than_their_bytes_are_refused_before_allocating() -> None:
    # a strip within the pixel limit (1 x 4,000,000) and a flat lossless WebP with a 25-megapixel canvas
    # in a few hundred bytes: before these bounds, +1 GB and seconds each
    strip = encode(Image.new("RGB", (1, 4_000_000), (9, 99, 199)), "PNG")
    canvas = encode(Image.new("RGB", (5000, 5000), (9, 99, 199)), "WEBP", lossless=True)
    assert len(canvas) < 25_000_000 // MAX_PIXELS_PER_BYTE
    for image, code in ((strip, "image_too_complex"), (canvas, "image_too_complex")):
        before, after, outcome = _peak_rss_mb(image)
        assert outcome == code
        assert after - before < 20, f"{after - before:.0f} MB allocated before refusing"


def test_a_large_transparent_image_is_composited_after_resizing() -> None:
    # 4000 x 3000 RGBA: 48 MB decoded. Compositing at full size took four more copies of it
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (3000, 4000, 4), dtype=np.uint8)
    before, after, outcome = _peak_rss_mb(encode(Image.fromarray(arr, "RGBA"), "PNG", compress_level=1))
    assert outcome == "ok"
    assert after - before < 48 * 1.5, f"peak +{after - before:.0f} MB for a 48 MB image"


def test_alpha_is_composited_on_white_as_before() -> None:
    im = Image.new("RGBA", (900, 600), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 450, 600))
    arr = load_image(encode(im, "PNG"), S)
    assert tuple(int(x) for x in arr[S // 2, 2]) == (0, 0, 255)
    assert tuple(int(x) for x in arr[S // 2, S - 3]) == (255, 255, 255)


def test_progressive_jpegs_are_told_from_their_frame_header() -> None:
    # the inline-decode check walks the header segments; it must agree with what Pillow wrote
    from classifier_core.images import is_progressive_jpeg

    im = Image.effect_noise((320, 240), 60).convert("RGB")
    for kw, progressive in (({}, False), ({"progressive": True}, True), ({"optimize": True}, False),
                            ({"progressive": True, "quality": 30}, True)):
        data = encode(im, "JPEG", **kw)
        assert is_progressive_jpeg(data) is progressive, kw
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a long APP1 segment before the frame header
    assert is_progressive_jpeg(encode(im, "JPEG", exif=exif.tobytes())) is False
    assert is_progressive_jpeg(encode(im, "JPEG", exif=exif.tobytes(), progressive=True)) is True
    # anything the walk cannot follow is left to the decoder in a thread (True), never decoded inline
    for broken in (b"\xff\xd8", b"\xff\xd8\xff", b"\xff\xd8\x00\x00\x00\x00", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8" + b"\xff" * 100):
        assert is_progressive_jpeg(broken) is True
