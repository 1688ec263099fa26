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
import time
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import encode_basestring
from math import modf
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


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


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _float(value: float) -> str:
    text = float.__repr__(value)
    return _NON_FINITE.get(text, text)  # json.dumps writes these as JavaScript does


#: How json.dumps writes a value of exactly these types, character for character, without its
#: per-call set-up (a new encoder for every call, as ``default`` is given). Anything else
#: (containers, subclasses, other objects) goes through :func:`_dumps`.
_SCALARS: dict[type, Callable[[Any], str]] = {
    str: encode_basestring,
    int: int.__repr__,
    float: _float,
    bool: {True: "true", False: "false"}.__getitem__,
    type(None): lambda _: "null",
}

#: The keys the formatter writes itself. An extra of the same name takes that key's place, as
#: in a dict update: the line is then made from a dict.
_OWN_KEYS = frozenset({"ts", "level", "logger", "msg", "exc"})

#: The end of every timestamp, by millisecond.
_MILLIS = [f".{ms:03d}+00:00" for ms in range(1000)]
#: The last second a timestamp was written for, and its date and time of day.
_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def _timestamp(created: float) -> str:
    """``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``, with the
    date and time of day worked out once per second instead of for every line."""
    global _second
    # Rounded to the microsecond, half to even, as datetime.fromtimestamp does: a time a hair
    # before the next millisecond (or second) is written as that one, as before.
    fraction, whole = modf(created)
    micros = round(fraction * 1e6)
    second = int(whole)
    if not 0 <= micros < 1_000_000:
        second, micros = second + micros // 1_000_000, micros % 1_000_000
    cached, prefix = _second
    if second != cached:
        prefix = datetime.fromtimestamp(second, UTC).replace(tzinfo=None).isoformat()
        _second = (second, prefix)
    return prefix + _MILLIS[micros // 1000]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, the record's extras,
    then ``exc``, written as ``json.dumps(..., default=str, ensure_ascii=False)`` would.

    A line is written for every postback: it is put together from its pieces, which costs half
    as much as a dict and json.dumps. The spacing stays json.dumps's (``"status": 202``, not
    compact ``"status":202``): searches of the log, the tests' among them, look for it.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = vars(record)
        extras = [key for key in fields if key not in _STANDARD]
        if not _OWN_KEYS.isdisjoint(extras):
            return self._format_via_dict(record, extras)
        exc = scrub(self.formatException(record.exc_info)) if record.exc_info else None
        return self.line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            {key: fields[key] for key in extras},
            exc,
        )

    @staticmethod
    def line(
        created: float,
        levelname: str,
        name: str | None,
        message: str,
        extras: dict[str, Any],
        exc: str | None = None,
    ) -> str:
        """The line of a record with these values (``extras`` must not use the keys above)."""
        parts = [
            '{"ts": "',
            _timestamp(created),
            '", "level": ',
            encode_basestring(levelname.lower()),
            ', "logger": ',
            _SCALARS.get(type(name), _dumps)(name),  # None in a makeLogRecord({})
            ', "msg": ',
            encode_basestring(scrub(message)),
        ]
        for key, value in extras.items():
            parts += (", ", encode_basestring(key), ": ", _SCALARS.get(type(value), _dumps)(value))
        if exc is not None:
            parts += (', "exc": ', encode_basestring(exc))
        parts.append("}")
        return "".join(parts)

    def _format_via_dict(self, record: logging.LogRecord, extras: list[str]) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        fields = vars(record)
        out.update((key, fields[key]) for key in extras)
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return _dumps(out)


class LoopBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the postback lines (:meth:`emit_line`, one per request, from
    the event loop) once per turn of the loop: the lines of every request handled in that turn
    in one write.

    A write to stderr lets go of the interpreter lock, and on a busy gateway the event loop then
    waits for a storage thread to hand it back, for every line: measured, a tenth of a
    millisecond each. A record that goes through logging (start-up, shutdown, warnings: rare) is
    written at once, after the lines still waiting, so lines stay in order and nothing is left
    waiting when a process ends after its last record (a worker process ends without running
    exit handlers). Waiting lines are also written by :meth:`flush`.
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
        self._write_pending()  # under the handler's lock, taken by Handler.handle()
        super().emit(record)

    def emit_line(self, line: str) -> None:
        """Write a line already formatted, on the thread running the event loop."""
        loop = asyncio.get_running_loop()
        with self.lock or contextlib.nullcontext():
            self._lines.append(line)
            if self._scheduled is not loop:
                if self._scheduled is not None:
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
        # The terminators go in here, not one by one: a copy of every line fewer.
        text = self.terminator.join(self._lines) + self.terminator
        self._lines = []
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "log lines lost"}))

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._write_pending()
        super().flush()


def info_line(logger: logging.Logger, message: str, extras: dict[str, Any]) -> None:
    """``logger.info(message, extra=extras)`` from a coroutine, the same line, made without a
    LogRecord when it goes straight to the server's own handler.

    The postback route writes a line for every request, and the logging machinery around a
    record (the record itself, the walk to the handlers, their locks) costs more than the line.
    The short cut is taken only when nothing else would see the record: the logger and its
    ancestors have no filters, the only handler on the way is one :class:`LoopBufferedHandler`
    with a :class:`JsonFormatter` and no filters (as :data:`LOG_CONFIG` sets it up). Otherwise
    (tests capturing logs, another set-up) the record goes through logging as usual.
    """
    handler = _sole_handler(logger)
    if handler is None:
        logger.info(message, extra=extras)
        return
    handler.emit_line(JsonFormatter.line(time.time(), "INFO", logger.name, message, extras))


def _sole_handler(logger: logging.Logger) -> LoopBufferedHandler | None:
    if logger.disabled or not logger.isEnabledFor(logging.INFO):
        return None
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or handler.filters or handler.level > logging.INFO:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if type(found) is not LoopBufferedHandler or type(found.formatter) is not JsonFormatter:
        return None
    return found


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
