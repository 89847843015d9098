"""Benchmark: the model card's reference code against faceparse's pipeline, stage by stage.

Both sides parse the same JPEG bytes in one run, on the same weights (by default a random mit-b5
SegFormer written by `faceparse model init-random --arch b5`: the real model's shape and cost).

    python -m bench.pipeline --sizes 512x512,1600x1200 --images 3
    python -m bench.pipeline --device cuda --batch-sizes 1,8,32 --images 32   # on a GPU
    python -m bench.pipeline --parity --device cuda                          # bf16/fp32 agreement

Stages, in seconds per image: decode (bytes -> RGB image), preprocess (-> pixel values), forward
(-> logits), postprocess (-> uint8 mask at the input size), encode (mask.png, overlay.png, summary).
The reference is the model card's code: PIL decode, SegformerImageProcessor, the model at batch 1,
F.interpolate(bilinear) + argmax; for encode (the card has none) the straightforward version:
Pillow's default PNG settings, Image.blend for the overlay, one numpy pass per label for the summary.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "faceparse" / "samples"
STAGES = ("decode", "preprocess", "forward", "postprocess", "encode")
log = logging.getLogger("bench.pipeline")


def make_inputs(size: tuple[int, int], count: int) -> list[bytes]:
    """`count` different JPEGs of the sample portrait at (width, height)."""
    face = Image.open(SAMPLES / "astronaut.png").convert("RGB")
    out = []
    for i in range(count):
        variant = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else face
        variant = variant.rotate(i * 7, resample=Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        variant.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Timer:
    """Accumulates seconds per stage; synchronises CUDA so asynchronous kernels are charged right."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def __call__(self, stage: str, fn: Callable[[], Any]) -> Any:
        self._sync()
        start = time.perf_counter()
        result = fn()
        self._sync()
        self.seconds[stage] += time.perf_counter() - start
        return result

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --- the reference: the model card's code ---------------------------------------------------
def reference_encode(image: Image.Image, mask: np.ndarray, id2label: dict[int, str]) -> dict[str, bytes]:
    """The straightforward encoding: default PNG settings, Image.blend, one pass per label."""
    from worker.outputs import PALETTE

    outputs = {}
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, "PNG")
    outputs["mask.png"] = buf.getvalue()
    colours = Image.fromarray(PALETTE[mask], "RGB")
    blended = Image.blend(image, colours, 0.5)
    blended.paste(image, mask=Image.fromarray(((mask == 0) * 255).astype(np.uint8), "L"))
    buf = io.BytesIO()
    blended.save(buf, "PNG")
    outputs["overlay.png"] = buf.getvalue()
    labels = []
    for label in np.unique(mask):
        ys, xs = np.nonzero(mask == label)
        labels.append({"id": int(label), "name": id2label[int(label)], "pixels": len(ys),
                       "fraction": len(ys) / mask.size,
                       "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]})
    summary = {"image": {"width": image.width, "height": image.height}, "labels": labels}
    outputs["summary.json"] = json.dumps(summary).encode()
    return outputs


def run_reference(model: Any, processor: Any, inputs: list[bytes], device: torch.device) -> dict[str, float]:
    timer = Timer(device)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    for data in inputs:
        image = timer("decode", lambda data=data: Image.open(io.BytesIO(data)).convert("RGB"))
        pixels = timer("preprocess", lambda image=image: processor(images=image, return_tensors="pt"))
        with torch.inference_mode():
            logits = timer("forward", lambda pixels=pixels: model(
                pixel_values=pixels["pixel_values"].to(device, model.dtype)).logits)

            def post(logits: torch.Tensor = logits, image: Image.Image = image) -> np.ndarray:
                up = F.interpolate(logits.float(), size=(image.height, image.width), mode="bilinear",
                                   align_corners=False)
                return up[0].argmax(0).to(torch.uint8).cpu().numpy()

            mask = timer("postprocess", post)
        timer("encode", lambda image=image, mask=mask: reference_encode(image, mask, id2label))
    return {k: v / len(inputs) for k, v in timer.seconds.items()}


# --- this pipeline ----------------------------------------------------------------------------
def run_pipeline(parser: Any, inputs: list[bytes], batch_size: int) -> dict[str, float]:
    from worker.decode import decode_image
    from worker.outputs import encode_outputs, summary_document

    timer = Timer(parser.device)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        images = timer("decode", lambda chunk=chunk: [decode_image(d, 100_000_000) for d in chunk])
        pixels = timer("preprocess", lambda images=images: parser.preprocess(images))
        logits = timer("forward", lambda pixels=pixels: parser.forward(pixels))
        masks = timer("postprocess", lambda logits=logits, images=images: parser.postprocess(
            logits, [(im.height, im.width) for im in images]))

        def encode(images: list[Image.Image] = images, masks: list[np.ndarray] = masks) -> None:
            for image, mask in zip(images, masks, strict=True):
                document = summary_document(parser.summarize(mask), job_id=None, model=parser.model_name)
                encode_outputs(image, mask, document, ("mask", "overlay", "summary"))

        timer("encode", encode)
    return {k: v / len(inputs) for k, v in timer.seconds.items()}


def _non_forward(stages: dict[str, float]) -> float:
    return sum(v for k, v in stages.items() if k != "forward")


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from worker.model import load_parser

    parser = load_parser(args.model, device=args.device, dtype=args.dtype)
    device = parser.device
    model = SegformerForSemanticSegmentation.from_pretrained(args.model, dtype=parser.dtype).to(device).eval()
    processor = SegformerImageProcessor.from_pretrained(args.model)
    results: dict[str, Any] = {"model": args.model, "device": str(device), "dtype": str(parser.dtype),
                               "threads": torch.get_num_threads(), "images_per_size": args.images,
                               "repeats": args.repeats,
                               "sizes": {}}
    for size in args.sizes:
        inputs = make_inputs(size, args.images)
        # Warm up both paths once (allocator, kernels, first-call overheads) before timing.
        run_reference(model, processor, inputs[:1], device)
        run_pipeline(parser, inputs[:1], 1)
        # Other processes share this CPU: repeat both paths, interleaved, and keep each stage's best.
        runs: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            runs.setdefault("reference", []).append(run_reference(model, processor, inputs, device))
            for batch in args.batch_sizes:
                runs.setdefault(f"pipeline_b{batch}", []).append(run_pipeline(parser, inputs, batch))
        entry: dict[str, Any] = {name: {k: min(r[k] for r in rs) for k in STAGES}
                                 for name, rs in runs.items()}
        ref = entry["reference"]
        for batch in args.batch_sizes:
            mine = entry[f"pipeline_b{batch}"]
            entry[f"ratios_b{batch}"] = {
                "non_forward": _non_forward(mine) / _non_forward(ref),
                "forward": mine["forward"] / ref["forward"],
                "whole": sum(mine.values()) / sum(ref.values()),
            }
        results["sizes"][f"{size[0]}x{size[1]}"] = entry
        print(format_size(f"{size[0]}x{size[1]}", entry, args.batch_sizes), flush=True)
    return results


def format_size(name: str, entry: dict[str, Any], batch_sizes: list[int]) -> str:
    """A Markdown table of one input size: seconds per image per stage, and the ratios."""
    rows = ["reference"] + [f"pipeline_b{b}" for b in batch_sizes]
    lines = [f"### {name}", "", "| path | " + " | ".join(STAGES) + " | non-forward | total |",
             "|---" * (len(STAGES) + 3) + "|"]
    for row in rows:
        s = entry[row]
        cells = " | ".join(f"{s[k]:.3f}" for k in STAGES)
        lines.append(f"| {row} | {cells} | {_non_forward(s):.3f} | {sum(s.values()):.3f} |")
    lines.append("")
    for b in batch_sizes:
        r = entry[f"ratios_b{b}"]
        lines.append(f"- batch {b}: non-forward {r['non_forward']:.3f} of the reference's, forward "
                     f"{r['forward']:.3f}, whole image {r['whole']:.3f}")
    return "\n".join(lines) + "\n"


# --- parity on a device (fp32 and the device's low precision) ---------------------------------
def parity(args: argparse.Namespace) -> dict[str, Any]:
    """Agreement of this pipeline on `--device` (fp32 and bf16) with the model card on the CPU in fp32."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from tests.test_parity import CORPUS
    from worker.decode import decode_image
    from worker.model import load_parser
    from worker.pipeline import reference_masks

    model = SegformerForSemanticSegmentation.from_pretrained(args.model).eval()
    processor = SegformerImageProcessor.from_pretrained(args.model)
    images = {name: decode_image(make(), 100_000_000) for name, make in sorted(CORPUS.items())}
    expected = {name: reference_masks(model, processor, [im])[0] for name, im in images.items()}
    report: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        parser = load_parser(args.model, device=args.device, dtype=dtype)
        report[dtype] = {name: float((parser.parse_batch([im])[0] == expected[name]).mean())
                         for name, im in images.items()}
        worst = min(report[dtype].values())
        print(f"{args.device} {dtype}: worst agreement {worst:.5f}  " + json.dumps(report[dtype]), flush=True)
    return report


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or the parity report) and print Markdown tables; --json saves the figures."""
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or hub id (default: a fresh random b5)")
    ap.add_argument("--arch", default="b5", choices=["tiny", "b5"], help="arch of the default random model")
    ap.add_argument("--sizes", default="512x512,1600x1200", help="input sizes, WIDTHxHEIGHT, comma-separated")
    ap.add_argument("--images", type=int, default=3, help="images per size")
    ap.add_argument("--batch-sizes", default="2", help="this pipeline's batch sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=2, help="runs per path; each stage keeps its best")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--parity", action="store_true", help="report fp32/bf16 agreement on --device instead")
    args = ap.parse_args(argv)
    args.sizes = [_size(s) for s in args.sizes.split(",") if s]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="faceparse-bench-") as tmp:
        if args.model is None:
            from worker.model import init_random_model

            args.model = str(init_random_model(Path(tmp) / args.arch, arch=args.arch))
        result = parity(args) if args.parity else benchmark(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
