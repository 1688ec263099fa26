"""Structured logs: one JSON object per line on stderr.

Nothing here ever sees a key or a query string: the postback log line carries the partner,
method, status, outcome and duration only, and :func:`redact_query` strips query strings from any
URL before it is logged.
"""

from __future__ import annotations

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


#: Logging set-up for the server, as a dictConfig: uvicorn applies it in every worker process.
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JsonFormatter}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
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
