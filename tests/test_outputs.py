"""summarize and encode_outputs: the summary schema, PNGs and per-label masks."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from worker.model import FACE_PARSING_LABELS
from worker.outputs import PALETTE, encode_outputs, summarize, summary_document

ID2LABEL = dict(enumerate(FACE_PARSING_LABELS))


def _mask() -> np.ndarray:
    mask = np.zeros((40, 60), np.uint8)  # background everywhere...
    mask[5:15, 10:30] = 1  # skin: rows 5..14, cols 10..29
    mask[20, 59] = 18  # one cloth pixel in the last column
    mask[39, 0] = 13  # one hair pixel in the last row
    return mask


def test_summary_counts_fractions_and_boxes() -> None:
    summary = summarize(_mask(), ID2LABEL)
    assert summary["image"] == {"width": 60, "height": 40}
    by_id = {entry["id"]: entry for entry in summary["labels"]}
    assert sorted(by_id) == [0, 1, 13, 18]  # only labels present, in id order
    assert by_id[1] == {"id": 1, "name": "skin", "pixels": 200, "fraction": round(200 / 2400, 6),
                        "bbox": [10, 5, 30, 15], "color": PALETTE[1].tolist()}
    assert by_id[18]["bbox"] == [59, 20, 60, 21] and by_id[18]["name"] == "cloth"
    assert by_id[13]["bbox"] == [0, 39, 1, 40]
    assert by_id[0]["bbox"] == [0, 0, 60, 40]
    assert sum(e["pixels"] for e in summary["labels"]) == 60 * 40
    assert "warning" not in summary


def test_summary_matches_a_per_label_computation_on_noise() -> None:
    mask = np.random.default_rng(1).integers(0, 19, (123, 77), dtype=np.uint8)
    mask[mask == 7] = 3  # one label absent
    summary = summarize(mask, ID2LABEL)
    assert 7 not in {e["id"] for e in summary["labels"]}
    for entry in summary["labels"]:
        ys, xs = np.nonzero(mask == entry["id"])
        assert entry["pixels"] == len(ys)
        assert entry["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert sum(e["pixels"] for e in summary["labels"]) == mask.size


def test_names_come_from_the_given_table() -> None:
    summary = summarize(_mask(), {0: "bg", 1: "face", 13: "hair", 18: "shirt"})
    assert [e["name"] for e in summary["labels"]] == ["bg", "face", "hair", "shirt"]


def test_random_weights_warning() -> None:
    assert summarize(_mask(), ID2LABEL, random_weights=True)["warning"] == "random weights: masks are noise"


def test_summarize_rejects_non_uint8() -> None:
    with pytest.raises(ValueError):
        summarize(_mask().astype(np.int64), ID2LABEL)


def test_encode_outputs() -> None:
    mask = _mask()
    image = Image.new("RGB", (60, 40), (10, 20, 30))
    document = summary_document(summarize(mask, ID2LABEL), job_id="job1", model="m")
    out = encode_outputs(image, mask, document, ["mask", "overlay", "summary", "masks"])
    assert set(out) == {"mask.png", "overlay.png", "summary.json", "masks/background.png",
                        "masks/skin.png", "masks/hair.png", "masks/cloth.png"}
    body, content_type = out["mask.png"]
    decoded = Image.open(io.BytesIO(body))
    assert content_type == "image/png" and decoded.mode == "L" and decoded.size == (60, 40)
    assert np.array_equal(np.asarray(decoded), mask)

    overlay = np.asarray(Image.open(io.BytesIO(out["overlay.png"][0])))
    assert overlay.shape == (40, 60, 3)
    assert tuple(overlay[0, 0]) == (10, 20, 30)  # background left as it is
    expected = (np.array([10, 20, 30]) + PALETTE[1].astype(int) + 1) // 2
    assert np.abs(overlay[6, 12].astype(int) - expected).max() <= 1  # half image, half skin colour

    skin = np.asarray(Image.open(io.BytesIO(out["masks/skin.png"][0])))
    assert set(np.unique(skin)) == {0, 255} and np.array_equal(skin == 255, mask == 1)

    summary_body, json_type = out["summary.json"]
    parsed = json.loads(summary_body)
    assert json_type == "application/json"
    assert parsed["job_id"] == "job1" and parsed["model"] == "m" and parsed["image"]["width"] == 60


def test_encode_only_what_is_wanted() -> None:
    mask = _mask()
    out = encode_outputs(Image.new("RGB", (60, 40)), mask, summarize(mask, ID2LABEL), ["mask", "summary"])
    assert set(out) == {"mask.png", "summary.json"}
    with pytest.raises(ValueError):
        encode_outputs(Image.new("RGB", (60, 40)), mask, summarize(mask, ID2LABEL), ["thumbnail"])


def test_overlay_refuses_a_mask_of_another_size() -> None:
    mask = _mask()
    with pytest.raises(ValueError):
        encode_outputs(Image.new("RGB", (61, 40)), mask, summarize(mask, ID2LABEL), ["overlay"])


def test_palette_is_fixed_and_distinct_for_the_labels() -> None:
    colours = {tuple(c) for c in PALETTE[:19]}
    assert len(colours) == 19
    assert tuple(PALETTE[1]) == (204, 0, 0)
