"""Parity with the model card: SegformerImageProcessor -> model -> bilinear upsample -> argmax.

Both sides see the same decoded (EXIF-transposed, RGB) image and the same weights (the tiny random
SegFormer, fp32 on the CPU). Random weights make the argmax sensitive, so agreement is a strict test
of preprocessing and upsampling; a negative control shows the bar catches a wrong preprocessing.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.decode import decode_image
from worker.pipeline import FaceParser, reference_masks

SAMPLES = Path(__file__).resolve().parents[1] / "faceparse" / "samples"
AGREEMENT_BAR = 0.995


def _astronaut() -> Image.Image:
    return Image.open(SAMPLES / "astronaut.png").convert("RGB")


def _save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit-per-sample RGB PNG (Pillow cannot write one)."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    return _save(_astronaut().resize((400, 300)), "JPEG", quality=92, exif=exif)


def _rgba() -> bytes:
    image = _astronaut().convert("RGBA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[:, :128] = np.linspace(0, 255, 128, dtype=np.uint8)[None, :]
    image.putalpha(Image.fromarray(alpha))
    return _save(image, "PNG")


def _sixteen_bit() -> bytes:
    rgb = np.asarray(_astronaut().resize((300, 260))).astype(np.uint16) * 257
    return png16_rgb(rgb)


CORPUS = {
    "astronaut.png": lambda: (SAMPLES / "astronaut.png").read_bytes(),
    "astronaut-exif6.jpg": _exif_rotated,
    "cmyk.jpg": lambda: _save(_astronaut().convert("CMYK"), "JPEG", quality=90),
    "rgba.png": _rgba,
    "palette.gif": lambda: _save(_astronaut().convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
    "rgb16.png": _sixteen_bit,
    "odd-333x517.webp": lambda: _save(_astronaut().resize((333, 517)), "WEBP", quality=90),
    "tiny-40x50.bmp": lambda: _save(_astronaut().resize((40, 50)), "BMP"),
    "large-1600x1700.jpg": lambda: _save(_astronaut().resize((1600, 1700)), "JPEG", quality=90),
    "gray.tiff": lambda: _save(_astronaut().convert("L").resize((700, 500)), "TIFF"),
}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """The model card's objects: the processor and the model, loaded by transformers directly."""
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    processor = SegformerImageProcessor.from_pretrained(tiny_model_dir)
    model = SegformerForSemanticSegmentation.from_pretrained(tiny_model_dir).eval()
    return model, processor


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_pipeline_agrees_with_model_card(name: str, tiny_parser: FaceParser, reference) -> None:
    model, processor = reference
    image = decode_image(CORPUS[name](), max_pixels=50_000_000)
    [expected] = reference_masks(model, processor, [image])
    [mask] = tiny_parser.parse_batch([image])
    assert mask.shape == (image.height, image.width)
    # The reference must not be trivially constant, or agreement would mean nothing.
    assert len(np.unique(expected)) >= 3
    assert agreement(mask, expected) >= AGREEMENT_BAR, name


def test_batched_equals_single(tiny_parser: FaceParser) -> None:
    images = [decode_image(CORPUS[n](), 50_000_000) for n in ("astronaut.png", "odd-333x517.webp",
                                                               "tiny-40x50.bmp")]
    together = tiny_parser.parse_batch(images)
    for image, mask in zip(images, together, strict=True):
        [alone] = tiny_parser.parse_batch([image])
        assert agreement(mask, alone) >= 0.9999


class _WrongPreprocessing(FaceParser):
    """Negative control: channels fed BGR (a classic OpenCV slip); everything else unchanged."""

    def preprocess(self, images):  # type: ignore[override]
        return super().preprocess(images).flip(1)


@pytest.mark.parametrize("name", ["astronaut.png", "large-1600x1700.jpg"])
def test_bar_catches_wrong_preprocessing(name: str, tiny_parser: FaceParser, reference) -> None:
    model, processor = reference
    wrong = _WrongPreprocessing.__new__(_WrongPreprocessing)
    wrong.__dict__.update(tiny_parser.__dict__)
    image = decode_image(CORPUS[name](), 50_000_000)
    [expected] = reference_masks(model, processor, [image])
    [mask] = wrong.parse_batch([image])
    assert agreement(mask, expected) < AGREEMENT_BAR
