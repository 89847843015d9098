"""The three pipeline stages, each alone, and model loading."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from storage.errors import ModelUnavailable
from worker import pipeline
from worker.model import (
    FACE_PARSING_LABELS,
    default_max_batch,
    load_parser,
    random_model_config,
    resolve_device,
    resolve_dtype,
)
from worker.pipeline import FaceParser, upsample_argmax

SAMPLES = Path(__file__).resolve().parents[1] / "faceparse" / "samples"


def _images() -> list[Image.Image]:
    face = Image.open(SAMPLES / "astronaut.png").convert("RGB")
    return [face, face.resize((333, 517)), face.resize((37, 29))]


# --- preprocess -----------------------------------------------------------------------------
def test_preprocess_is_bit_identical_to_the_image_processor(tiny_model_dir: Path,
                                                             tiny_parser: FaceParser) -> None:
    from transformers import SegformerImageProcessor

    processor = SegformerImageProcessor.from_pretrained(tiny_model_dir)
    images = _images()
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    got = tiny_parser.preprocess(images)
    assert got.dtype == torch.float32 and got.shape == (3, 3, 512, 512)
    assert torch.equal(got, expected)


# --- forward --------------------------------------------------------------------------------
def test_forward_matches_the_models_own_decode_head(tiny_parser: FaceParser) -> None:
    pixels = tiny_parser.preprocess(_images()[:2])
    with torch.inference_mode():
        expected = tiny_parser.model(pixel_values=pixels).logits
    got = tiny_parser.forward(pixels)
    assert got.shape == expected.shape == (2, 19, 128, 128)
    assert got.device == tiny_parser.device and got.dtype == torch.float32
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9999


# --- postprocess ----------------------------------------------------------------------------
def _smooth_logits(seed: int, labels: int = 19, size: int = 128) -> torch.Tensor:
    """Blobby logits (like a trained model's: regions with boundaries), not per-pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, labels, size // 16, size // 16, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]


def _reference_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(0).to(torch.uint8)


@pytest.mark.parametrize("size", [(512, 512), (517, 333), (29, 37), (1700, 1600), (128, 128), (1, 300)])
@pytest.mark.parametrize("kind", ["smooth", "noise"])
def test_upsample_argmax_equals_interpolate_then_argmax(size: tuple[int, int], kind: str) -> None:
    logits = _smooth_logits(1) if kind == "smooth" else torch.randn(19, 128, 128,
                                                                     generator=torch.Generator().manual_seed(2))
    got = upsample_argmax(logits, size)
    expected = _reference_argmax(logits, size)
    assert got.dtype == torch.uint8 and tuple(got.shape) == size
    # Equal up to float-rounding ties.
    assert float((got == expected).float().mean()) >= 0.99999


def test_upsample_argmax_in_small_chunks_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = _smooth_logits(3)
    whole = upsample_argmax(logits, (700, 500))
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 19 * 500 * 7)  # 7 rows a chunk, 100 chunks
    assert torch.equal(upsample_argmax(logits, (700, 500)), whole)
    monkeypatch.setattr(pipeline, "DENSE_FRACTION", 2.0)  # force the boundary-only path everywhere
    assert torch.equal(upsample_argmax(logits, (700, 500)), whole)
    monkeypatch.setattr(pipeline, "DENSE_FRACTION", -1.0)  # force the dense path everywhere
    assert torch.equal(upsample_argmax(logits, (700, 500)), whole)


def test_postprocess_of_24_megapixels_stays_small(tmp_path: Path) -> None:
    """Full-size logits of a 6000x4000 photo would be 1.8 GB; chunking keeps the peak far below."""
    script = textwrap.dedent("""
        import resource, torch, torch.nn.functional as F
        from worker.pipeline import upsample_argmax
        coarse = torch.randn(1, 19, 8, 8, generator=torch.Generator().manual_seed(0))
        logits = F.interpolate(coarse, size=(128, 128), mode="bicubic")[0]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mask = upsample_argmax(logits, (4000, 6000))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024, tuple(mask.shape), mask.dtype)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    grown_mb, rest = result.stdout.split(maxsplit=1)
    assert "(4000, 6000)" in rest and "torch.uint8" in rest
    assert int(grown_mb) < 400, result.stdout


def test_postprocess_returns_uint8_masks_at_each_size(tiny_parser: FaceParser) -> None:
    logits = torch.randn(2, 19, 128, 128)
    masks = tiny_parser.postprocess(logits, [(50, 60), (300, 200)])
    assert [m.shape for m in masks] == [(50, 60), (300, 200)]
    assert all(isinstance(m, np.ndarray) and m.dtype == np.uint8 for m in masks)
    with pytest.raises(ValueError):
        tiny_parser.postprocess(logits, [(50, 60)])


def test_stages_run_concurrently_from_threads(tiny_parser: FaceParser) -> None:
    images = _images()
    serial = [tiny_parser.parse_batch([im])[0] for im in images]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = tiny_parser.parse_batch([images[i]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, mask in enumerate(serial):
        assert np.array_equal(results[i], mask)


def test_parse_batch_of_nothing(tiny_parser: FaceParser) -> None:
    assert tiny_parser.parse_batch([]) == []


# --- model loading --------------------------------------------------------------------------
def test_loaded_random_model_is_marked_and_summaries_say_so(tiny_parser: FaceParser,
                                                            tiny_model_dir: Path) -> None:
    assert tiny_parser.random_weights is True
    assert tiny_parser.id2label == dict(enumerate(FACE_PARSING_LABELS))
    assert tiny_parser.model_name == str(tiny_model_dir)
    summary = tiny_parser.summarize(tiny_parser.parse_batch(_images()[:1])[0])
    assert summary["warning"] == "random weights: masks are noise"
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["faceparse_random_weights"] is True
    assert len(config["id2label"]) == 19 and config["id2label"]["18"] == "cloth"


def test_loading_a_random_model_warns_loudly(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="worker.model")
    parser = load_parser(str(tiny_model_dir), device="cpu", dtype="bfloat16")  # a distinct cache entry
    assert parser.dtype == torch.bfloat16
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)


def test_parser_is_loaded_once_per_process(tiny_model_dir: Path, tiny_parser: FaceParser) -> None:
    assert load_parser(str(tiny_model_dir), device="cpu", dtype="float32") is tiny_parser


def test_b5_config_is_the_mit_b5_encoder() -> None:
    config = random_model_config("b5")
    assert config.depths == [3, 6, 40, 3]
    assert config.hidden_sizes == [64, 128, 320, 512]
    assert config.decoder_hidden_size == 768
    assert config.num_labels == 19 and config.id2label[13] == "hair"
    with pytest.raises(ValueError):
        random_model_config("b7")


def _broken_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{not json")
    return tmp_path


@pytest.mark.parametrize("make, why", [
    (lambda p: p / "missing", "no such directory"),
    (lambda p: p, "model.safetensors"),
    (_broken_dir, "not a valid JSON"),
])
def test_unavailable_model_is_one_clear_paragraph(tmp_path: Path, make, why: str) -> None:
    model = str(make(tmp_path))
    with pytest.raises(ModelUnavailable) as info:
        load_parser(model, device="cpu")
    message = info.value.message
    assert info.value.code == "model_unavailable"
    assert repr(model) in message and why in message and "Fix:" in message
    assert "\n" not in message and "Traceback" not in message


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match="not in the local cache"):
        load_parser("no-such-org/no-such-model", device="cpu")


def test_missing_image_processor_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ModelUnavailable, match="image-processor config"):
        load_parser(str(tmp_path), device="cpu")


# --- device and dtype -----------------------------------------------------------------------
def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("int8", "cpu")
    assert default_max_batch("cpu") == 2 and default_max_batch("cuda") > 2
