"""Image bytes -> an RGB PIL image with EXIF orientation applied, or a typed error.

The pixel limit is checked from the header, before any pixel is decoded, so a decompression bomb
costs a header parse. Modes without a direct 8-bit RGB meaning are converted deliberately: alpha is
composited onto white (as transformers' `convert_to_rgb` does), 16-bit samples are scaled to 8 bits
(65535 -> 255, never clipped), CMYK goes through Pillow's conversion.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

from storage.errors import ImageTooLarge, InvalidImage, UnsupportedFormat

# Pillow format names we accept. MPO is what Pillow calls many phones' JPEGs.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF"})

# What a malformed file makes Pillow raise, from header parsing to the decoders.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode `data` into an RGB image (EXIF orientation applied).

    Raises InvalidImage (empty, truncated, corrupt or non-image bytes), UnsupportedFormat (an image
    format outside JPEG/PNG/WebP/BMP/TIFF/GIF) or ImageTooLarge (more than `max_pixels` pixels).
    """
    if not data:
        raise InvalidImage("the input is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image is too large to decode ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidImage("the input is not an image in any format this service reads") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"the input is not a readable image ({_reason(exc)})") from exc
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedFormat(
            f"{image.format or 'this'} images are not supported; send JPEG, PNG, WebP, BMP, TIFF or GIF"
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image has {width}x{height} = {width * height:,} pixels; "
                            f"the limit is {max_pixels:,}")
    try:
        image.seek(0)  # GIF, TIFF, MPO, APNG, animated WebP: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image is too large to decode ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"the image could not be decoded ({_reason(exc)})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha onto white, 16-bit scaled, palette and CMYK converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _scale_16bit(image)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        # Float images are usually 0..1; anything else is taken as already on the 0..255 scale.
        scale = 255.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_16bit(image: Image.Image) -> Image.Image:
    # Pillow's own I;16 -> L conversion clips at 255 (a 16-bit photo turns white); scale instead.
    values = np.asarray(image).astype(np.float64)
    gray = np.clip(np.floor(values / 257.0 + 0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
