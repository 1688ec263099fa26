"""The server's log handler and the short cut the postback route takes through it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid

import pytest

from gateway.logs import JsonFormatter, LoopBufferedHandler, info_line

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


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_short_cut_writes_the_line_logging_would(
    server_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = server_logger

    async def both() -> None:
        logger.info("postback", extra=EXTRAS)
        info_line(logger, "postback", EXTRAS)

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


def test_short_cut_lines_keep_their_order_within_a_turn(
    server_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = server_logger

    async def mixed() -> None:
        for n in range(6):
            if n % 2:
                info_line(logger, f"line {n}", {"n": n})
            else:
                logger.info(f"line {n}", extra={"n": n})
        assert stream.getvalue() == ""  # written when the turn ends, not before
        await asyncio.sleep(0)

    asyncio.run(mixed())
    assert [line["n"] for line in lines(stream)] == list(range(6))


def test_a_filter_or_a_second_handler_sees_every_record(
    server_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """Where something else would see the record (a test capturing logs, a filter), the short
    cut is not taken: the record goes through logging."""
    logger, stream = server_logger
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
