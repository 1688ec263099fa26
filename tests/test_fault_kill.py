"""The gateway killed under load (issue 6), a real ``gateway serve`` process over SQLite and
concurrent HTTP clients that behave like partners (a postback that gets no answer is sent again
until it gets one):

- SIGKILL: every event answered 202 is in storage after a restart, and a retry of an event that
  had been stored before the kill is answered duplicate with that event's id.
- SIGTERM: the server drains. It stops accepting connections, finishes every request it had
  started (including ones whose body was still arriving), then closes storage (the lifespan runs
  only after the requests finished: ``timeout_graceful_shutdown`` in gateway/cli.py) and exits.
  A request that got a connection error was never started: its event is not in storage, and its
  retry after the restart is accepted as new.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from gateway.storage import open_storage
from tests.faults import START_TIMEOUT_S, Serve
from tests.test_status import POSTBACK, sample

INSTALL = "install_ios_attributed.json"
CLIENTS = 16

#: The load runs this long before the signal, and answers must have come in meanwhile.
LOAD_BEFORE_S = 1.0


class Partner:
    """Postbacks with unique ids, each sent until it is answered (as partners retry), with
    every attempt recorded."""

    def __init__(self, base_url: str, key: str, prefix: str) -> None:
        self.url = base_url + POSTBACK
        self.key = key
        self.ids = (f"{prefix}-{n}" for n in itertools.count())
        self.attempts: dict[str, list[Any]] = {}  # id → errors (names), then (status, body)
        self.stop = asyncio.Event()
        self.answered_at: dict[str, float] = {}

    async def run(self, http: httpx.AsyncClient, retry_for: float) -> None:
        """Send new postbacks until ``stop``; keep retrying one that failed for ``retry_for``
        seconds after its first failure (the time a restart may take)."""
        while not self.stop.is_set():
            tid = next(self.ids)
            attempts = self.attempts[tid] = []
            first_error = None
            while True:
                try:
                    response = await http.post(
                        self.url,
                        params={"api_key": self.key},
                        content=sample(INSTALL, transaction_id=tid),
                    )
                except httpx.TransportError as exc:
                    attempts.append(type(exc).__name__)
                    first_error = first_error or time.monotonic()
                    if time.monotonic() - first_error > retry_for:
                        return
                    await asyncio.sleep(0.05)
                    continue
                attempts.append((response.status_code, response.json()))
                self.answered_at[tid] = time.monotonic()
                break

    def final(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """The answer each postback finally got."""
        return {tid: a[-1] for tid, a in self.attempts.items() if a and isinstance(a[-1], tuple)}

    def failed_first(self) -> set[str]:
        return {tid for tid, a in self.attempts.items() if a and isinstance(a[0], str)}


def stored_events(tmp_path: Path) -> dict[str, str]:
    """dedupe key → event_id of every stored event, read from the SQLite file."""

    async def run() -> dict[str, str]:
        storage = open_storage(f"sqlite:///{tmp_path}/data/gateway.db")
        await storage.open()
        try:
            return {e.dedupe_key: e.event_id for e in await storage.scan(limit=1_000_000)}
        finally:
            await storage.close()

    return asyncio.run(run())


def http_client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    return httpx.AsyncClient(timeout=30, limits=limits)


async def until_answers(partner: Partner, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(partner.answered_at) < count:
        assert time.monotonic() < deadline, "the load got no answers"
        await asyncio.sleep(0.02)


def test_sigkill_under_load_loses_no_accepted_event(tmp_path: Path) -> None:
    gateway = Serve(tmp_path)
    gateway.start()
    key = gateway.create_key()
    partner = Partner(gateway.base_url, key, "kill")

    async def run() -> float:
        async with http_client() as http:
            clients = [
                asyncio.create_task(partner.run(http, START_TIMEOUT_S)) for _ in range(CLIENTS)
            ]
            await asyncio.sleep(LOAD_BEFORE_S)
            await until_answers(partner, 50)
            killed_at = time.monotonic()
            await asyncio.to_thread(gateway.kill)  # SIGKILL: no drain, no lifespan
            await asyncio.sleep(0.3)  # the clients see the gateway gone and keep retrying
            await asyncio.to_thread(gateway.start)  # same port, same files
            await asyncio.sleep(0.5)
            partner.stop.set()
            await asyncio.gather(*clients)
        return killed_at

    try:
        killed_at = asyncio.run(run())
    finally:
        gateway.stop()
    final = partner.final()
    assert set(final) == set(partner.attempts), "a postback was never answered"
    codes = Counter(code for code, _ in final.values())
    assert set(codes) <= {200, 202}, codes

    stored = stored_events(tmp_path)
    # Every 202 is in storage, under the event id that was answered.
    for tid, (code, body) in final.items():
        if code == 202:
            assert stored[tid] == body["event_id"], tid
        else:  # a retry of an event stored before the kill, whose answer was lost
            assert body["status"] == "duplicate"
            assert tid in partner.failed_first()
            assert stored[tid] == body["event_id"], tid
    assert set(stored) == set(final)  # nothing else stored, nothing twice
    assert partner.failed_first(), "the kill interrupted no request"
    assert any(t < killed_at for t in partner.answered_at.values())
    assert any(t > killed_at for t in partner.answered_at.values())


def slow_postback(port: int, key: str, tid: str) -> tuple[socket.socket, bytes]:
    """A postback whose headers and first half of the body are sent now; the rest is returned,
    to be sent later. The request has begun: the server is reading its body."""
    body = sample(INSTALL, transaction_id=tid)
    half = len(body) // 2
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {POSTBACK}?api_key={key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[:half])
    return sock, body[half:]


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the answer"
        body += chunk
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    gateway = Serve(tmp_path)
    gateway.start()
    key = gateway.create_key()
    partner = Partner(gateway.base_url, key, "term")
    slow_answers: list[tuple[int, dict[str, Any]]] = []

    async def run() -> tuple[float, int]:
        async with http_client() as http:
            clients = [asyncio.create_task(partner.run(http, 0)) for _ in range(CLIENTS)]
            await asyncio.sleep(LOAD_BEFORE_S)
            await until_answers(partner, 50)
            slow = [slow_postback(gateway.port, key, f"slow-{n}") for n in range(3)]
            await asyncio.sleep(0.3)  # the server has the headers: these requests have begun
            term_at = time.monotonic()
            gateway.signal(signal.SIGTERM)
            await asyncio.sleep(1.0)  # draining: the bodies are still on their way
            for sock, rest in slow:
                sock.sendall(rest)
            for sock, _ in slow:
                slow_answers.append(await asyncio.to_thread(read_answer, sock))
                sock.close()
            code = await asyncio.to_thread(gateway.wait)
            partner.stop.set()
            await asyncio.gather(*clients)
        return term_at, code

    try:
        term_at, code = asyncio.run(run())
    finally:
        gateway.kill()
    assert code in (0, -signal.SIGTERM), code  # uvicorn re-raises the signal once it is done
    # The lifespan ran to its end: SQLite removes a write-ahead log when its last connection
    # closes, so storage and the status store were closed (after the requests, see below).
    assert not (tmp_path / "data" / "gateway.db-wal").exists()
    assert not (tmp_path / "data" / "status.db-wal").exists()

    # The requests in flight were answered, and stored before storage was closed.
    assert [c for c, _ in slow_answers] == [202, 202, 202], slow_answers
    stored = stored_events(tmp_path)
    for n, (_, body) in enumerate(slow_answers):
        assert stored[f"slow-{n}"] == body["event_id"]

    final = partner.final()
    assert all(code == 202 for code, _ in final.values())
    for tid, (_, body) in final.items():
        assert stored[tid] == body["event_id"]
    # Those that got a connection error had not been started: nothing of them is stored...
    failed = partner.failed_first()
    assert failed, "no client noticed the shutdown"
    assert not failed & set(stored)
    assert set(stored) == set(final) | {f"slow-{n}" for n in range(3)}
    assert any(t < term_at for t in partner.answered_at.values())

    # ...and their retries, once the gateway is back, are accepted as new events.
    gateway.start()
    try:
        with httpx.Client(timeout=30) as http:
            for tid in sorted(failed):
                response = http.post(
                    gateway.base_url + POSTBACK,
                    params={"api_key": key},
                    content=sample(INSTALL, transaction_id=tid),
                )
                assert (response.status_code, response.json()["status"]) == (202, "accepted")
    finally:
        gateway.stop()
