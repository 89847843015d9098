"""The `faceparse` command. Heavy parts (torch, the worker) are imported inside the verbs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from faceparse.settings import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic ValidationError: show it as a usage error
        raise click.UsageError(f"invalid FACEPARSE_* setting: {exc}") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="faceparse")
def main() -> None:
    """Face parsing at scale: SegFormer workers behind a Flask API, Celery on Redis, S3 storage."""


# --- the service --------------------------------------------------------------------------
@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--demo", is_flag=True, help="Parse the bundled sample photos through the API and "
              "queue once the stack is up; if the real model cannot be had, use a random "
              "stand-in and mark every result as noise.")
def up(host: str, port: int, demo: bool) -> None:
    """All-in-one local stack: Redis (embedded if none answers), the API and one worker."""
    from faceparse.stack import run_up

    sys.exit(run_up(_settings(), host=host, port=port, demo=demo))


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn processes")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API with gunicorn."""
    from faceparse.stack import run_api

    sys.exit(run_api(_settings(), host=host, port=port, workers=workers))


@main.command()
@click.option("--concurrency", default=1, show_default=True, type=int,
              help="worker processes, each loading the model once")
@click.option("--queues", default="faceparse.parse,faceparse.webhooks", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default: a unique one)")
def worker(concurrency: int, queues: str, hostname: str | None) -> None:
    """Start a Celery worker that parses faces."""
    from faceparse.stack import run_worker

    sys.exit(run_worker(_settings(), concurrency=concurrency, queues=queues, hostname=hostname))


# --- the client ---------------------------------------------------------------------------
@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--api-url", envvar="FACEPARSE_API_URL", default="http://127.0.0.1:8000",
              show_default=True)
@click.option("--api-key", envvar="FACEPARSE_API_KEY", default=None)
@click.option("--wait", is_flag=True, help="wait for the jobs to finish")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="download the outputs here (implies --wait)")
def submit(images: tuple[str, ...], api_url: str, api_key: str | None, wait: bool,
           out: Path | None) -> None:
    """Submit local files, s3:// keys or https:// URLs as jobs."""
    from faceparse.client import submit_command

    sys.exit(submit_command(list(images), api_url=api_url, api_key=api_key,
                            wait=wait or out is not None, out=out))


@main.command()
@click.argument("job_id")
@click.option("--api-url", envvar="FACEPARSE_API_URL", default="http://127.0.0.1:8000",
              show_default=True)
@click.option("--api-key", envvar="FACEPARSE_API_KEY", default=None)
def status(job_id: str, api_url: str, api_key: str | None) -> None:
    """Print a job."""
    from faceparse.client import status_command

    sys.exit(status_command(job_id, api_url=api_url, api_key=api_key))


# --- offline ------------------------------------------------------------------------------
@main.command()
@click.argument("images", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--batch-size", default=None, type=int, help="images per forward pass")
@click.option("--masks", is_flag=True, help="also write masks/<label>.png per label present")
def parse(images: tuple[Path, ...], out: Path, batch_size: int | None, masks: bool) -> None:
    """Parse images in this process (no queue) into OUT/<file name>/."""
    from faceparse.local import parse_command

    sys.exit(parse_command(_settings(), list(images), out=out, batch_size=batch_size,
                           masks=masks))


@main.group()
def model() -> None:
    """Model utilities."""


@model.command("init-random")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(["tiny", "b5"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
def init_random(directory: Path, arch: str, seed: int) -> None:
    """Write an UNTRAINED SegFormer with the face-parsing labels (tests and benchmarks only)."""
    from worker.model import init_random_model

    init_random_model(directory, arch=arch, seed=seed)


if __name__ == "__main__":
    main()
