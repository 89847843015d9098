"""decode_image: formats, orientation, modes, limits and typed errors."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from storage.errors import FaceparseError, ImageTooLarge, InvalidImage, UnsupportedFormat
from tests.test_parity import png16_rgb
from worker.decode import decode_image

LIMIT = 50_000_000


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1), "RGB")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(_encode(_gradient(), fmt), LIMIT)
    assert image.mode == "RGB" and image.size == (64, 48)
    # Lossless formats come back as they went in; lossy ones close to it.
    diff = np.abs(np.asarray(image, np.int16) - np.asarray(_gradient(), np.int16))
    assert diff.mean() < (12 if fmt in ("JPEG", "WEBP", "GIF") else 0.01)


def test_gif_takes_the_first_frame() -> None:
    red, blue = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 0, 255))
    data = _encode(red, "GIF", save_all=True, append_images=[blue])
    assert decode_image(data, LIMIT).getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("orientation, size, corner", [
    (1, (60, 40), (0, 0)),  # as stored: the red corner stays top-left
    (3, (60, 40), (59, 39)),  # 180°
    (6, (40, 60), (39, 0)),  # 90° clockwise: top-left moves to top-right
    (8, (40, 60), (0, 59)),  # 90° counter-clockwise: top-left moves to bottom-left
])
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int],
                                     corner: tuple[int, int]) -> None:
    stored = Image.new("RGB", (60, 40), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = decode_image(_encode(stored, "JPEG", quality=95, exif=exif), LIMIT)
    assert image.size == size
    r, g, b = image.getpixel(corner)
    assert r > 200 and g < 60 and b < 60


def test_grayscale_becomes_rgb() -> None:
    image = decode_image(_encode(Image.new("L", (8, 8), 77), "PNG"), LIMIT)
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (77, 77, 77)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_white(mode: str) -> None:
    colour = (0, 0, 0, 0) if mode == "RGBA" else (0, 0)
    half = (0, 0, 0, 128) if mode == "RGBA" else (0, 128)
    image = Image.new(mode, (4, 2), colour)
    image.putpixel((1, 0), half)
    out = decode_image(_encode(image, "PNG"), LIMIT)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white, not black
    assert all(120 <= v <= 135 for v in out.getpixel((1, 0)))


def test_palette_with_transparency() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 0)
    out = decode_image(_encode(image, "PNG", transparency=0), LIMIT)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (200, 10, 10)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_encode(cmyk, "JPEG", quality=95), LIMIT)
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 230 and g < 30 and b < 30


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(fmt: str) -> None:
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(values), fmt), LIMIT)
    assert [out.getpixel((i, 0))[0] for i in range(4)] == [0, 64, 128, 255]


def test_16_bit_rgb_png() -> None:
    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[0, 0] = (65535, 257 * 100, 0)
    out = decode_image(png16_rgb(rgb), LIMIT)
    assert out.getpixel((0, 0)) == (255, 100, 0)


@pytest.mark.parametrize("data, code", [
    (b"", "invalid_image"),
    (b"hello, this is text, not an image", "invalid_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "invalid_image"),
    (b"\xff\xd8\xff\xe0" + b"\x13" * 100, "invalid_image"),
])
def test_garbage_is_invalid_image(data: bytes, code: str) -> None:
    with pytest.raises(InvalidImage) as info:
        decode_image(data, LIMIT)
    assert info.value.code == code


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_invalid_image(fmt: str) -> None:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    data = _encode(noisy, fmt)
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], LIMIT)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PCX", "TGA"])
def test_other_image_formats_are_unsupported(fmt: str) -> None:
    with pytest.raises(UnsupportedFormat) as info:
        decode_image(_encode(_gradient(32, 32), fmt), LIMIT)
    assert info.value.code == "unsupported_format" and info.value.http_status == 415


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = _encode(_gradient(100, 50), "PNG")
    assert decode_image(data, 5000).size == (100, 50)
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, 4999)
    assert info.value.code == "image_too_large"


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_decompression_bomb_costs_nothing(fmt: str) -> None:
    """A 40000x40000 image of one colour: a small file, 4.8 GB decoded. Refused before decoding."""
    big = _encode(Image.new("L", (1, 1)), fmt)
    if fmt == "PNG":  # rewrite the header's size; the check must not need the pixels
        import struct
        import zlib

        header = b"IHDR" + struct.pack(">II", 40000, 40000) + big[24:29]
        big = big[:12] + header + struct.pack(">I", zlib.crc32(header)) + big[33:]
    else:
        big = big[:6] + (40000).to_bytes(2, "little") * 2 + big[10:]
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge):
        decode_image(big, LIMIT)
    assert time.perf_counter() - start < 0.5


def test_every_error_has_a_stable_code() -> None:
    for data in (b"", b"nope"):
        with pytest.raises(FaceparseError) as info:
            decode_image(data, LIMIT)
        assert info.value.to_dict()["code"] == "invalid_image"
