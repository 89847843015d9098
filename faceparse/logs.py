"""Structured logs: one JSON object per line, with the job id on every line of a job's processing.

`configure_logging(service)` sets up structlog *and* the stdlib root logger with one renderer, so
the `logging.getLogger(__name__)` calls in `worker/` and the `structlog.get_logger` calls in `api/`
come out alike. Context bound with `structlog.contextvars.bind_contextvars(job_id=...)` is merged
into every line of the same thread or task, whichever logging API wrote it.

In a worker, `configure_logging(service="worker")` also binds `job_id` and `task_id` around each
faceparse task (Celery's `task_prerun` / `task_postrun`), so the worker code needs no logging
plumbing of its own, and it keeps Celery from replacing these handlers with its own.

The API runs under gunicorn: `GunicornLogger` (`gunicorn --logger-class faceparse.logs.GunicornLogger`)
applies the same configuration in the gunicorn master before it forks and writes the access log as
JSON with method, path, status and duration fields.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, TYPE_CHECKING, Any

import structlog
from gunicorn.glogging import Logger as _GunicornBaseLogger

if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger

    from faceparse.settings import Settings

LOG_FORMATS = ("json", "console")
# Only these tasks take the job id as their first argument (see worker.tasks).
_JOB_TASKS = frozenset({"faceparse.parse", "faceparse.deliver_webhook"})
_celery_hooks_installed = False


def _add_process(service: str) -> Processor:
    def add(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
        event.setdefault("service", service)
        event.setdefault("pid", os.getpid())
        return event

    return add


def _shared_processors(service: str) -> list[Processor]:
    """What every line gets, whether it came from structlog or from the stdlib `logging` module."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_process(service),
    ]


def build_formatter(service: str, fmt: str = "json") -> structlog.stdlib.ProcessorFormatter:
    """The stdlib `logging.Formatter` that renders a record (and its bound context) as one line."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {fmt!r}")
    renderer: Processor = (
        # Non-ASCII stays readable (file and label names); odd values fall back to repr.
        structlog.processors.JSONRenderer(ensure_ascii=False) if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    tail: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        # The console renderer prints tracebacks itself; JSON wants them as a string field.
        tail.append(structlog.processors.format_exc_info)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(service), structlog.stdlib.PositionalArgumentsFormatter()],
        processors=[*tail, renderer],
    )


def configure_logging(service: str, *, level: str | int = "INFO", fmt: str = "json",
                      stream: IO[str] | None = None) -> None:
    """Send every log line of this process, stdlib or structlog, to `stream` (stderr) as `fmt`.

    `service` ("api", "worker", "up", …) is added to each line. Safe to call again: the root
    handlers are replaced, not added to.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(build_formatter(service, fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    structlog.configure(
        processors=[
            *_shared_processors(service),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a second configure_logging (tests, gunicorn's re-setup on HUP) must take effect.
        cache_logger_on_first_use=False,
    )
    if service == "worker":
        _install_celery_hooks()


def configure_from_settings(settings: Settings, service: str) -> None:
    """`configure_logging` with the level and format of `FACEPARSE_LOG_LEVEL` / `FACEPARSE_LOG_FORMAT`."""
    configure_logging(service, level=settings.log_level.upper(), fmt=settings.log_format.lower())


# --- Celery: keep our handlers, bind the job id around each task -------------------------------
def _install_celery_hooks() -> None:
    global _celery_hooks_installed
    if _celery_hooks_installed:
        return
    from celery.signals import setup_logging, task_postrun, task_prerun

    # Any receiver of setup_logging tells Celery not to touch logging (no root hijack, no
    # stdout redirect), so the handlers configured above stay in charge.
    setup_logging.connect(_keep_our_logging, weak=False)
    task_prerun.connect(bind_task_context, weak=False)
    task_postrun.connect(clear_task_context, weak=False)
    _celery_hooks_installed = True


def _keep_our_logging(**_: Any) -> None:
    """Celery's `setup_logging` receiver: logging is already configured."""


def bind_task_context(task_id: str | None = None, task: Any = None, args: Any = None,
                      **_: Any) -> None:
    """Celery `task_prerun` receiver: bind `task_id` and, for faceparse tasks, `job_id`."""
    structlog.contextvars.clear_contextvars()
    name = getattr(task, "name", None)
    context: dict[str, Any] = {"task_id": task_id, "task": name}
    if name in _JOB_TASKS and args:
        context["job_id"] = args[0]
    structlog.contextvars.bind_contextvars(**context)


def clear_task_context(**_: Any) -> None:
    """Celery `task_postrun` receiver: nothing of one task leaks into the next one's lines."""
    structlog.contextvars.clear_contextvars()


# --- gunicorn -----------------------------------------------------------------------------------
class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's logger, rendering its error and access logs through `configure_logging("api")`."""

    def setup(self, cfg: Any) -> None:
        """Apply gunicorn's settings, then route its loggers through the JSON root handler."""
        super().setup(cfg)
        from faceparse.settings import Settings

        configure_from_settings(Settings(), "api")
        for logger in (self.error_log, self.access_log):
            logger.handlers.clear()
            logger.propagate = True

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        """One structured line per request (when an access log is asked for)."""
        if not (self.cfg.accesslog or self.cfg.logconfig or self.cfg.logconfig_dict or self.cfg.syslog):
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        duration_ms = round(request_time.total_seconds() * 1000.0, 2)
        self.access_log.info(
            "%s %s %s", req.method, req.path, status,
            extra={"method": req.method, "path": req.path, "status": int(status),
                   "duration_ms": duration_ms, "remote": environ.get("REMOTE_ADDR")},
        )
