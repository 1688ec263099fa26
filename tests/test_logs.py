"""The server's log handler and the short cut the postback route takes through it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from pathlib import Path

import httpx
import pytest

from gateway.logs import JsonFormatter, LoopBufferedHandler, info_line
from tests.fixtures import kochava_samples, start_gateway, stop_gateway

EXTRAS = {"partner": "kochava", "method": "POST", "status": 202, "duration_ms": 1.25, "x": None}


@pytest.fixture
def server_logger() -> tuple[logging.Logger, io.StringIO]:
    """A logger set up as the server's: one LoopBufferedHandler with a JsonFormatter."""
    stream = io.StringIO()
    handler = LoopBufferedHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"tests.logs.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def alone(logger: logging.Logger) -> logging.Logger:
    """The logger with its own handler only: pytest adds capturing handlers while a test runs,
    and with them the short cut rightly steps aside."""
    logger.handlers = [h for h in logger.handlers if type(h) is LoopBufferedHandler]
    return logger


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_short_cut_writes_the_line_logging_would(
    server_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = server_logger
    alone(logger)

    async def both() -> None:
        logger.info("postback", extra=EXTRAS)
        info_line(logger, "postback", EXTRAS)
        assert len(lines(stream)) == 1  # the short cut's line waits for the end of the turn

    asyncio.run(both())
    raw = stream.getvalue().splitlines()
    assert len(raw) == 2
    via_logging, direct = (json.loads(line) for line in raw)
    assert via_logging.pop("ts") and direct.pop("ts")
    assert (
        direct
        == via_logging
        == {"level": "info", "logger": logger.name, "msg": "postback"} | EXTRAS
    )
    # Byte for byte apart from the time: the same spacing and key order.
    assert raw[0].split('", ', 1)[1] == raw[1].split('", ', 1)[1]


def test_postback_lines_wait_for_the_turn_and_records_keep_their_order(
    server_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """Postback lines are written when the turn of the loop ends; a record through logging is
    written at once, after the lines waiting before it."""
    logger, stream = server_logger
    alone(logger)

    async def mixed() -> None:
        info_line(logger, "line 0", {"n": 0})
        info_line(logger, "line 1", {"n": 1})
        assert stream.getvalue() == ""  # waiting for the end of the turn
        logger.info("line 2", extra={"n": 2})
        assert [line["n"] for line in lines(stream)] == [0, 1, 2]  # at once, in order
        info_line(logger, "line 3", {"n": 3})
        assert len(lines(stream)) == 3
        await asyncio.sleep(0)

    asyncio.run(mixed())
    assert [line["n"] for line in lines(stream)] == [0, 1, 2, 3]


def test_every_worker_writes_its_last_lines_when_stopped(tmp_path: Path) -> None:
    """A worker process ends without exit handlers: what it logs up to its end is written."""
    gateway = start_gateway(tmp_path, workers=2)
    try:
        key = gateway.create_key()
        url = f"{gateway.base_url}/partners/kochava/postback?api_key={key}"
        sent = [httpx.post(url, content=body) for body in kochava_samples().values()]
        assert {answer.status_code for answer in sent} <= {200, 202}
    finally:
        stop_gateway(gateway)
    assert gateway.process.returncode == 0
    log = gateway.log_text()
    assert log.count('"msg": "postback"') == len(sent)
    assert log.count("Application shutdown complete.") == 2
    assert log.count("Finished server process") == 2


def test_a_filter_or_a_second_handler_sees_every_record(
    server_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """Where something else would see the record (a test capturing logs, a filter), the short
    cut is not taken: the record goes through logging."""
    logger, stream = server_logger
    alone(logger)
    seen: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    def drop_all(record: logging.LogRecord) -> bool:
        seen.append(record)
        return False

    async def log_once() -> None:
        info_line(logger, "postback", EXTRAS)

    logger.addHandler(capture := Capture())
    asyncio.run(log_once())
    assert [record.getMessage() for record in seen] == ["postback"]
    assert seen[0].__dict__["partner"] == "kochava"
    assert len(lines(stream)) == 1
    logger.removeHandler(capture)

    logger.addFilter(drop_all)
    asyncio.run(log_once())
    assert len(seen) == 2 and len(lines(stream)) == 1  # the filter dropped it
    logger.removeFilter(drop_all)

    logger.setLevel(logging.WARNING)
    asyncio.run(log_once())
    assert len(lines(stream)) == 1  # below the level: nothing written
