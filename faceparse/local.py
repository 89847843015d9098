"""`faceparse parse`: parse local images in this process, no queue, no Redis.

Decoding and encoding of one batch overlap the forward pass of the next in a small thread pool, so
the model stays busy while PIL and zlib work.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import click

from storage.errors import FaceparseError, ModelUnavailable

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from faceparse.settings import Settings
    from worker.pipeline import FaceParser

log = logging.getLogger(__name__)


def parse_command(settings: Settings, images: list[Path], out: Path, batch_size: int | None = None,
                  masks: bool = False) -> int:
    """Parse `images` into OUT/<file name>/{mask.png, overlay.png, summary.json}; the exit status.

    A file that cannot be read or decoded prints one line with its error code and the rest go on;
    the status is 1 when any failed (or the model cannot be loaded), else 0.
    """
    from tqdm import tqdm

    from worker.allocator import tune_malloc
    from worker.model import default_max_batch, load_parser

    tune_malloc()  # as a worker process does (see worker.allocator)
    try:
        parser = load_parser(settings.model, device=settings.device, dtype=settings.dtype)
    except ModelUnavailable as exc:
        click.echo(f"error: {exc.message}", err=True)
        return 1
    size = batch_size or settings.max_batch or default_max_batch(parser.device)
    if size < 1:
        click.echo("error: --batch-size must be at least 1", err=True)
        return 2
    out = Path(out)
    wanted = ("mask", "overlay", "summary", "masks") if masks else ("mask", "overlay", "summary")
    targets = output_dirs(images, out)
    failed = 0
    with ThreadPoolExecutor(max_workers=2) as pool, \
            tqdm(total=len(images), unit="image", desc="parsing", disable=None) as progress:
        writes: list[Future[None]] = []
        for batch in _decoded_batches(pool, images, size, settings.max_pixels):
            good: list[tuple[Path, Image.Image]] = []
            for path, result in batch:
                if isinstance(result, FaceparseError):
                    failed += 1
                    progress.write(f"{path}: {result.code}: {result.message}", file=sys.stderr)
                    progress.update(1)
                else:
                    good.append((path, result))
            if not good:
                continue
            masks_out = parser.parse_batch([image for _, image in good])
            for (path, image), mask in zip(good, masks_out, strict=True):
                writes.append(pool.submit(_write_outputs, parser, path, image, mask, targets[path],
                                          wanted))
            # Keep at most one batch of writes in flight so memory stays bounded.
            while len(writes) > size:
                writes.pop(0).result()
                progress.update(1)
        for write in writes:
            write.result()
            progress.update(1)
    if failed:
        click.echo(f"{failed} of {len(images)} images failed", err=True)
    return 1 if failed else 0


def output_dirs(images: Sequence[Path], out: Path) -> dict[Path, Path]:
    """OUT/<file name> per input; a name seen before (x/a.jpg, y/a.jpg) gets a -2, -3... suffix."""
    taken: set[str] = set()
    targets: dict[Path, Path] = {}
    for path in images:
        if path in targets:
            continue
        name, n = path.name, 1
        while name in taken:
            n += 1
            name = f"{path.name}-{n}"
        taken.add(name)
        targets[path] = out / name
    return targets


def _decoded_batches(pool: ThreadPoolExecutor, images: Sequence[Path], size: int, max_pixels: int
                     ) -> Iterator[list[tuple[Path, Image.Image | FaceparseError]]]:
    """Batches of (path, image or typed error); the next batch decodes while the caller runs this one."""
    batches = [list(images[i:i + size]) for i in range(0, len(images), size)]
    pending = pool.submit(_decode_all, batches[0], max_pixels) if batches else None
    for index in range(len(batches)):
        assert pending is not None
        current = pending.result()
        if index + 1 < len(batches):
            pending = pool.submit(_decode_all, batches[index + 1], max_pixels)
        yield current


def _decode_all(paths: list[Path], max_pixels: int) -> list[tuple[Path, Image.Image | FaceparseError]]:
    from storage.errors import InputNotFound, InvalidImage
    from worker.decode import decode_image

    results: list[tuple[Path, Image.Image | FaceparseError]] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            results.append((path, InputNotFound(f"no such file: {path}")))
            continue
        except OSError as exc:  # a directory, no permission, an I/O error
            results.append((path, InvalidImage(f"cannot read {path}: {exc.strerror or exc}")))
            continue
        try:
            results.append((path, decode_image(data, max_pixels)))
        except FaceparseError as exc:
            results.append((path, exc))
    return results


def _write_outputs(parser: FaceParser, path: Path, image: Image.Image, mask: np.ndarray, target: Path,
                   wanted: Sequence[str]) -> None:
    from worker.outputs import encode_outputs, summary_document

    summary = parser.summarize(mask)
    document = summary_document(summary, job_id=None, model=parser.model_name)
    for name, (body, _content_type) in encode_outputs(image, mask, document, wanted).items():
        file = target / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(body)
    log.debug("wrote %s", json.dumps({"input": str(path), "labels": len(summary["labels"])}))
