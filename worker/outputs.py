"""A label mask -> the job's outputs: mask.png, overlay.png, summary.json, masks/<label>.png.

Names always come from the model's `config.id2label` (passed in), never from a copy here.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from worker.model import RANDOM_WEIGHTS_WARNING

# One fixed colour per label id (the CelebAMask-HQ visualisation colours); ids past the table get
# deterministic colours from a fixed generator. Background (0) is left unblended in the overlay.
_BASE_COLOURS = [
    (0, 0, 0), (204, 0, 0), (76, 153, 0), (204, 204, 0), (51, 51, 255), (204, 0, 204), (0, 255, 255),
    (255, 204, 204), (102, 51, 0), (255, 0, 0), (102, 204, 0), (255, 255, 0), (0, 0, 153), (0, 0, 204),
    (255, 51, 153), (0, 204, 204), (0, 51, 0), (255, 153, 51), (0, 204, 0),
]
PALETTE = np.zeros((256, 3), dtype=np.uint8)
PALETTE[: len(_BASE_COLOURS)] = _BASE_COLOURS
PALETTE[len(_BASE_COLOURS):] = np.random.default_rng(19).integers(
    0, 256, size=(256 - len(_BASE_COLOURS), 3), dtype=np.uint8)

OVERLAY_ALPHA = 0.5
# zlib level 1: masks are runs of a few values and compress nearly as well as at 6, several times faster.
PNG_COMPRESS_LEVEL = 1
_ROWS_PER_CHUNK = 1024
_FOREGROUND_LUT = [0] + [255] * 255  # label 0 (background) keeps the image, every other label blends
CONTENT_TYPES = {"png": "image/png", "json": "application/json"}


def summarize(mask: np.ndarray, id2label: dict[int, str], *, random_weights: bool = False) -> dict[str, Any]:
    """Pixels, fraction of the image and bounding box of every label present in `mask`.

    bbox is [x0, y0, x1, y1] with x1/y1 exclusive (Pillow's getbbox convention); color is the
    label's [r, g, b] in the overlay. With `random_weights` the summary carries the noise warning.
    """
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 mask, got {mask.shape} {mask.dtype}")
    height, width = mask.shape
    area = height * width
    counts = np.bincount(mask.ravel(), minlength=256)
    rows, cols = _presence(mask)
    labels = []
    for label in np.flatnonzero(counts):
        label = int(label)
        ys = np.flatnonzero(rows & (1 << label)) if label < 64 else np.flatnonzero((mask == label).any(1))
        xs = np.flatnonzero(cols & (1 << label)) if label < 64 else np.flatnonzero((mask == label).any(0))
        labels.append({
            "id": label,
            "name": id2label.get(label, f"label_{label}"),
            "pixels": int(counts[label]),
            "fraction": round(float(counts[label]) / area, 6),
            "bbox": [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1],
            # The overlay's colour for this label, so a viewer can draw a matching legend.
            "color": [int(c) for c in PALETTE[label]],
        })
    summary: dict[str, Any] = {"image": {"width": width, "height": height}, "labels": labels}
    if random_weights:
        summary["warning"] = RANDOM_WEIGHTS_WARNING
    return summary


def _presence(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row and per column, one bit per label (< 64) occurring there; chunked, no HxW int64."""
    height, width = mask.shape
    rows = np.zeros(height, dtype=np.uint64)
    cols = np.zeros(width, dtype=np.uint64)
    one = np.uint64(1)
    for start in range(0, height, _ROWS_PER_CHUNK):
        bits = np.left_shift(one, np.minimum(mask[start:start + _ROWS_PER_CHUNK], 63).astype(np.uint64))
        rows[start:start + bits.shape[0]] = np.bitwise_or.reduce(bits, axis=1)
        cols |= np.bitwise_or.reduce(bits, axis=0)
    return rows, cols


def summary_document(summary: dict[str, Any], *, job_id: str | None, model: str) -> dict[str, Any]:
    """What summary.json holds: the summary plus job_id and model."""
    return {"job_id": job_id, "model": model, **summary}


def overlay_image(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image blended half-and-half with each label's colour; background pixels are left as they are."""
    image = image.convert("RGB")
    if (image.height, image.width) != mask.shape:
        raise ValueError(f"image {image.height}x{image.width} and mask {mask.shape} differ in size")
    # Pillow's C loops (palette expansion, blend, composite): a fraction of numpy's time per pixel.
    labels = Image.fromarray(mask, "L")
    colours = labels.convert("P")
    colours.putpalette(PALETTE.tobytes())
    blended = Image.blend(image, colours.convert("RGB"), OVERLAY_ALPHA)
    foreground = labels.point(_FOREGROUND_LUT)
    return Image.composite(blended, image, foreground)


def label_mask_image(mask: np.ndarray, label: int) -> Image.Image:
    """One label as a 0/255 L image (the model card's Transformers.js mask shape)."""
    return Image.fromarray(np.where(mask == label, 255, 0).astype(np.uint8), "L")


def encode_outputs(image: Image.Image, mask: np.ndarray, summary: dict[str, Any],
                   wanted: Iterable[str]) -> dict[str, tuple[bytes, str]]:
    """Encode the outputs asked for in `wanted` (kinds: mask, overlay, summary, masks).

    Keys: "mask.png", "overlay.png", "summary.json", "masks/<label name>.png"; values are
    (bytes, content type). `summary` is written to summary.json as given: pass it through
    `summary_document` first to add job_id and model.
    """
    wanted = set(wanted)
    unknown = wanted - {"mask", "overlay", "summary", "masks"}
    if unknown:
        raise ValueError(f"unknown output kinds: {sorted(unknown)}")
    out: dict[str, tuple[bytes, str]] = {}
    if "mask" in wanted:
        out["mask.png"] = (_png(Image.fromarray(mask, "L")), CONTENT_TYPES["png"])
    if "overlay" in wanted:
        out["overlay.png"] = (_png(overlay_image(image, mask)), CONTENT_TYPES["png"])
    if "summary" in wanted:
        body = json.dumps(summary, indent=2, sort_keys=False).encode()
        out["summary.json"] = (body, CONTENT_TYPES["json"])
    if "masks" in wanted:
        for entry in summary["labels"]:
            name = f"masks/{safe_label_name(entry['name'])}.png"
            out[name] = (_png(label_mask_image(mask, int(entry["id"]))), CONTENT_TYPES["png"])
    return out


def safe_label_name(name: str) -> str:
    """A label name usable as a file name (the model card's names already are)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return cleaned or "label"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Z_RLE: smaller and faster than the default strategy on masks and on PNG-filtered photos.
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=zlib.Z_RLE)
    return buf.getvalue()
