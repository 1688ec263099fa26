"""Structured logs: one JSON object per line on stderr.

Nothing here ever sees a key or a query string: the postback log line carries the partner,
method, status, outcome and duration only, and :func:`redact_query` strips query strings from any
URL before it is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def redact_query(url: str) -> str:
    parts = urlsplit(url)
    if not parts.query:
        return url
    return urlunsplit(parts._replace(query="[redacted]"))


# A safety net for messages and tracebacks written elsewhere (libraries, exceptions): a query
# string after a path or URL, a key given as ``api_key=…``/``X-Api-Key: …``, a bearer token.
_QUERY = re.compile(r"((?:https?://|/)[^\s?#\"'<>]*)\?[^\s#\"'<>]+")
_KEY = re.compile(r"(?i)\b(api[_-]?key[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")


def scrub(text: str) -> str:
    """``text`` without query strings, keys or bearer tokens."""
    if "?" in text:
        text = _QUERY.sub(r"\1?[redacted]", text)
    lowered = text.lower()
    if "key" in lowered:
        text = _KEY.sub(r"\1[redacted]", text)
    if "bearer" in lowered:
        text = _BEARER.sub(r"\1[redacted]", text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class LoopBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, on a thread running an event loop, writes once per turn of the
    loop: the lines of every request handled in that turn in one write.

    A write to stderr lets go of the interpreter lock, and on a busy gateway the event loop then
    waits for a storage thread to hand it back, for every line (a postback writes one): measured,
    a tenth of a millisecond each. Lines are written in order, at the latest when the loop has
    run the callbacks that were ready, and by :meth:`flush` (at exit too). Elsewhere (no running
    loop: the CLI, other threads) a line is written at once, as by ``logging.StreamHandler``.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None
        # The server's records need none of these, which logging gathers for every record
        # (the caller's frame, thread and process): off, as the logging HOWTO's "Optimization"
        # section shows. JsonFormatter never prints them.
        logging._srcfile = None
        logging.logThreads = False
        logging.logProcesses = False
        logging.logMultiprocessing = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending()
            super().emit(record)
            return
        try:
            self._lines.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if self._scheduled is not loop:
            if self._scheduled is not None:  # another loop's turn never came: write now
                self._write_pending()
            self._scheduled = loop
            loop.call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._write_pending()

    def _write_pending(self) -> None:
        self._scheduled = None
        if not self._lines:
            return
        text, self._lines = "".join(self._lines), []
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "log lines lost"}))

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._write_pending()
        super().flush()


#: Logging set-up for the server, as a dictConfig: uvicorn applies it in every worker process.
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JsonFormatter}},
    "handlers": {
        "stderr": {
            "class": "gateway.logs.LoopBufferedHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {
        "uvicorn": {"handlers": [], "propagate": True},
        "uvicorn.error": {"handlers": [], "propagate": True},
        # The server's own access log prints full URLs: query strings, and so keys.
        "uvicorn.access": {"handlers": [], "propagate": False, "level": "CRITICAL"},
    },
}


def setup_logging() -> None:
    logging.config.dictConfig(LOG_CONFIG)
