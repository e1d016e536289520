"""Structured (JSON lines) logging with the request id of the request being served."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vkmmu_request_id", default=None
)

# Attributes every LogRecord has; anything else was passed through `extra=` and is logged.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


# Logger trees the service's own level applies to; everything else logs WARNING and up.
_OWN_LOGGERS = ("vkmmu", "app", "alembic", "uvicorn")
# uvicorn installs its own plain-text handlers on these unless told not to: ours replace them.
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def configure_logging(level: str = "INFO") -> None:
    """Idempotent: one JSON handler on the root logger, so every logger (the service's
    `vkmmu.*` and `app.*`, libraries, the server) writes JSON lines with the request id."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in _OWN_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.propagate = True
        for h in list(logger.handlers):
            if isinstance(h, _StderrHandler):  # installed here by an older configuration
                logger.removeHandler(h)
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.propagate = True
        # A server configured in this process before (its own dictConfig) may have set a
        # level or disabled the logger: the level of the `uvicorn` tree applies again.
        if name not in _OWN_LOGGERS:
            logger.setLevel(logging.NOTSET)
        logger.disabled = False
