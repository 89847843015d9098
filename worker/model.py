"""Model loading: the face-parsing SegFormer from the hub or a local directory, once per process.

`load_parser` is the only way the worker and the `faceparse` command get a model. It goes through
transformers' own `from_pretrained` for both the weights and the image-processor config, so a local
directory written by `init_random_model` and the hub model `jonathandinu/face-parsing` take the same
path. A model that cannot be had raises `ModelUnavailable` with one paragraph that says what, why and
how to fix it; nothing ever falls back to random weights.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.errors import ModelUnavailable

if TYPE_CHECKING:
    import torch

    from worker.pipeline import FaceParser

log = logging.getLogger(__name__)

DEFAULT_MODEL = "jonathandinu/face-parsing"
RANDOM_WEIGHTS_ATTR = "faceparse_random_weights"
RANDOM_WEIGHTS_WARNING = "random weights: masks are noise"

# The model card's table (CelebAMask-HQ labels). Only `init_random_model` uses this copy: a loaded
# model's names always come from its own config.id2label.
FACE_PARSING_LABELS: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)

# Encoder/decoder shapes. b5 is the mit-b5 encoder of the real model; tiny keeps the same four-stage
# structure (so every code path runs) at a size that loads and runs in milliseconds for tests.
ARCHS: dict[str, dict[str, object]] = {
    "tiny": {
        "depths": [1, 1, 1, 1],
        "hidden_sizes": [8, 16, 32, 64],
        "num_attention_heads": [1, 1, 2, 4],
        "decoder_hidden_size": 32,
    },
    "b5": {
        "depths": [3, 6, 40, 3],
        "hidden_sizes": [64, 128, 320, 512],
        "num_attention_heads": [1, 2, 5, 8],
        "decoder_hidden_size": 768,
    },
}

_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}

_cache: dict[tuple[str, str, str], FaceParser] = {}
_cache_lock = threading.Lock()


def resolve_device(spec: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is passed to torch.device as given."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec != "auto":
        device = torch.device(spec)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelUnavailable(f"FACEPARSE_DEVICE={spec} asks for CUDA, but torch sees no CUDA device. "
                                   "Set FACEPARSE_DEVICE=auto or cpu, or install a CUDA build of torch.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(spec: str, device: torch.device | str) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 elsewhere (bf16 on a CPU is ~100x slower here)."""
    import torch

    device = torch.device(device)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise ValueError(f"unknown dtype {spec!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[spec])


def default_max_batch(device: torch.device | str) -> int:
    """Images per forward pass when FACEPARSE_MAX_BATCH is unset."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return 16
    if kind == "mps":
        return 4
    # On a CPU batch 2 is faster per image than batch 1; larger batches only add latency.
    return 2


def default_batch_wait_ms(device: torch.device | str) -> int:
    """How long a forward pass waits for its batch to fill when FACEPARSE_BATCH_WAIT_MS is unset.

    A small share of one forward pass: on a GPU (tens of milliseconds a batch) 10 ms; on a CPU,
    where a b5 batch takes seconds, 100 ms, enough for the next job of a burst to be claimed,
    fetched and decoded (about 30 ms here) instead of the first image running alone.
    """
    import torch

    return 100 if torch.device(device).type == "cpu" else 10


def random_model_config(arch: str = "tiny") -> Any:
    """The SegformerConfig of a random stand-in: the face-parsing labels, marked as random weights."""
    from transformers import SegformerConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    id2label = dict(enumerate(FACE_PARSING_LABELS))
    config = SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        sr_ratios=[8, 4, 2, 1],
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        mlp_ratios=[4, 4, 4, 4],
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        semantic_loss_ignore_index=255,
        **ARCHS[arch],
    )
    setattr(config, RANDOM_WEIGHTS_ATTR, True)
    return config


def init_random_model(directory: Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Write an UNTRAINED SegFormer with the face-parsing labels and its image-processor config.

    For offline tests and benchmarks only: its masks are noise. The config carries
    `faceparse_random_weights: true`, so every load of it warns and every summary says so.
    """
    import torch
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil

    config = random_model_config(arch)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(directory)
    # The hub model's preprocessor_config.json: 512x512 bilinear, 1/255, ImageNet mean/std.
    SegformerImageProcessorPil(size={"height": 512, "width": 512}).save_pretrained(directory)
    log.warning(
        "WROTE A RANDOM-WEIGHT SegFormer (%s) to %s: its masks are NOISE. Use it for tests and "
        "benchmarks only, never to parse faces.", arch, directory,
    )
    return directory


def _unavailable(model: str, why: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"Cannot load the face-parsing model {model!r}: {why}. "
        "Fix: set FACEPARSE_MODEL to a directory that holds config.json, the weights and "
        "preprocessor_config.json (e.g. one saved with `huggingface-cli download "
        f"{DEFAULT_MODEL} --local-dir DIR` on a machine with internet), or give this machine access "
        "to the Hugging Face hub (unset HF_HUB_OFFLINE) so the model can be downloaded and cached; "
        "for offline tests only, `faceparse model init-random DIR` writes a random stand-in."
    )


def _why(exc: BaseException) -> str:
    # The first line of transformers' messages carries the cause; the rest is advice we replace.
    text = str(exc).strip().splitlines()
    first = text[0].rstrip(". ") if text else type(exc).__name__
    return f"{type(exc).__name__}: {first}"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine gets an answer in seconds, not after
    huggingface_hub's retries (half a minute of 'Retrying...' lines)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def load_parser(model: str, device: str = "auto", dtype: str = "auto") -> FaceParser:
    """The FaceParser for `model` (hub id or local directory), loaded once per process and cached.

    Raises ModelUnavailable when the model cannot be had (offline and not cached, wrong id, broken
    directory, missing image-processor config).
    """
    key = (model, device, dtype)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(model, device, dtype)
        return _cache[key]


def _load(model: str, device_spec: str, dtype_spec: str) -> FaceParser:
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil

    from worker.pipeline import FaceParser

    device = resolve_device(device_spec)
    dtype = resolve_dtype(dtype_spec, device)
    local = Path(model).expanduser()
    if (model.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
        raise _unavailable(model, "no such directory")
    source = str(local) if local.is_dir() else model
    # A hub id: use the local cache when it has the model, and only go online when the hub answers.
    offline = not local.is_dir() and not _hub_reachable()
    # Only the failures from_pretrained documents for a missing, unreachable or malformed model;
    # anything else is a bug and should show its traceback.
    expected = (OSError, ValueError, json.JSONDecodeError, KeyError)
    try:
        net = SegformerForSemanticSegmentation.from_pretrained(source, dtype=dtype, local_files_only=offline)
    except expected as exc:
        if offline:
            raise _unavailable(model, "the Hugging Face hub cannot be reached from here (or HF_HUB_OFFLINE "
                                      "is set) and the model is not in the local cache") from exc
        raise _unavailable(model, _why(exc)) from exc
    try:
        processor = SegformerImageProcessorPil.from_pretrained(source, local_files_only=offline)
    except expected as exc:
        raise _unavailable(model, f"its image-processor config could not be read ({_why(exc)})") from exc
    if not getattr(net.config, "id2label", None) or len(net.config.id2label) != net.config.num_labels:
        raise _unavailable(model, "its config has no id2label table for its labels")
    net = net.to(device).eval()
    try:
        parser = FaceParser(net, processor, model_name=model, device=device, dtype=dtype)
    except ValueError as exc:  # a SegFormer this pipeline cannot reproduce exactly
        raise _unavailable(model, str(exc)) from exc
    if parser.random_weights:
        log.warning(
            "MODEL %s HAS RANDOM WEIGHTS (a stand-in from `faceparse model init-random`): every mask "
            "it produces is NOISE and every summary says so.", model,
        )
    log.info("loaded model %s on %s (%s)", model, device, str(dtype).removeprefix("torch."))
    return parser
