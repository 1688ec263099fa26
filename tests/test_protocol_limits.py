"""Protocol limits of ``gateway serve`` (gateway/protocol.py), against a live gateway over raw
sockets: oversized headers are refused (431) without being buffered, idle and slow requests are
cut off (408, or a close when nothing was sent), slow clients do not hold up others, and
malformed or hostile requests (header injection, smuggling, invalid UTF-8, NUL bytes, deep
nesting, huge numbers of keys) get a 4xx, never a 5xx or a stuck worker.

The gateway here runs with 2-second header and body timeouts (the defaults are 10 s), so that the
tests wait little; the bounds asserted on waits are those timeouts plus a generous margin for a
loaded CI machine: they catch a connection that is never cut off, not a slow one."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.config import ConfigError, load_config
from tests.fixtures import ADMIN_TOKEN, ROOT, LiveGateway, start_gateway, stop_gateway

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
BACKSTOP = BODY_TIMEOUT + 2.0  # gateway.protocol.BODY_BACKSTOP_GRACE_S
MAX_HEADER_BYTES = 65536
SLACK = 6.0  # what a loaded 2-core CI machine may add to a timeout


class Reply(msgspec.Struct):
    status: int  # 0: the connection closed without an answer
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the end of sending to the answer (or the close)

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    tmp = Path(tmp_path_factory.mktemp("protocol"))
    config = tmp / "gateway.toml"
    text = (ROOT / "config" / "gateway.toml").read_text(encoding="utf-8")
    text = text.replace("header_timeout_seconds = 10", f"header_timeout_seconds = {HEADER_TIMEOUT}")
    text = text.replace("body_timeout_seconds = 10", f"body_timeout_seconds = {BODY_TIMEOUT}")
    assert f"= {HEADER_TIMEOUT}" in text and f"body_timeout_seconds = {BODY_TIMEOUT}" in text
    config.write_text(text, encoding="utf-8")
    live = start_gateway(tmp, {"GATEWAY_CONFIG": str(config)})
    yield live
    stop_gateway(live)


@pytest.fixture(scope="module")
def key(gateway: LiveGateway) -> str:
    return gateway.create_key()


def address(gateway: LiveGateway) -> tuple[str, int]:
    host, port = gateway.base_url.removeprefix("http://").split(":")
    return host, int(port)


def read_reply(sock: socket.socket, started: float, timeout: float = 30) -> Reply:
    """One HTTP answer (by its Content-Length), or status 0 when the server closes first."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return Reply(0, {}, data, time.monotonic() - started)
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        return Reply(0, {}, data, time.monotonic() - started)
    return Reply(int(lines[0].split()[1]), headers, body, time.monotonic() - started)


def send(gateway: LiveGateway, raw: bytes) -> Reply:
    with socket.create_connection(address(gateway), timeout=30) as sock:
        sock.sendall(raw)
        return read_reply(sock, time.monotonic())


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (what it still sends is read and dropped)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def assert_error(reply: Reply, status: int, error: str) -> None:
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json"), reply
    body = reply.json()
    assert body["status"] == "error" and body["error"] == error and body["reason"], reply


def postback_head(key: str, body_headers: str) -> bytes:
    return (
        f"POST /partners/kochava/postback?api_key={key} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\n{body_headers}\r\n"
    ).encode()


IOS = (ROOT / "plugins" / "kochava" / "samples" / "install_ios_attributed.json").read_bytes()


def ios_body(transaction_id: str) -> bytes:
    return json.dumps(json.loads(IOS) | {"transaction_id": transaction_id}).encode()


# -- oversized headers ----------------------------------------------------------------------------


def test_thirty_megabyte_headers_are_refused_431_without_being_buffered(
    gateway: LiveGateway,
) -> None:
    """The trial: ten requests each with a 30 MB header, sent at once. Each is answered 431
    after about the limit, the gateway keeps its memory, and goes on serving."""
    pid = gateway.process.pid
    before = rss_mib(pid)
    total = 30 * 1024 * 1024
    chunk = b"a" * 65536

    def attack() -> tuple[Reply, int]:
        with socket.create_connection(address(gateway), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            try:
                while sent < total:
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable:  # the answer came: stop sending, as a client would
                        break
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return read_reply(sock, time.monotonic()), sent

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: attack(), range(10)))
    for reply, sent in results:
        assert_error(reply, 431, "request_header_fields_too_large")
        assert str(MAX_HEADER_BYTES) in str(reply.json()["reason"])
        assert sent < total / 4, sent  # refused early: it stopped reading, not 30 MB later
    grown = rss_mib(pid) - before
    assert grown < 40, f"the gateway grew by {grown:.0f} MiB"  # the trial saw +744 MiB
    assert httpx.get(gateway.base_url + "/healthz", timeout=10).status_code == 200


def test_headers_at_the_limit_pass_and_past_it_are_refused_in_one_write(
    gateway: LiveGateway,
) -> None:
    fill = MAX_HEADER_BYTES - 200
    # A GET postback carries its fields in the query string: long ones fit.
    fits = send(gateway, b"GET /healthz?x=" + b"a" * fill + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert fits.status == 200, fits
    many = b"".join(b"X-H%d: v\r\n" % n for n in range(4000))  # ~40 KB of short headers
    assert send(gateway, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").status == 200
    # Past the limit, whether the head arrives in one write or several, in the URL or headers.
    over = b"GET /healthz?x=" + b"a" * (MAX_HEADER_BYTES + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_error(send(gateway, over), 431, "request_header_fields_too_large")
    many = b"".join(b"X-H%d: v\r\n" % n for n in range(8000))  # ~90 KB
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"
    assert_error(send(gateway, head), 431, "request_header_fields_too_large")


# -- slow clients ---------------------------------------------------------------------------------


def trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    """Send ``data`` a byte at a time until the server closes or ``stop`` is set."""
    for byte in data:
        if stop.wait(every):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def test_slow_clients_are_cut_off_and_do_not_hold_up_others(gateway: LiveGateway, key: str) -> None:
    """50 slow-loris connections of every kind at once: each is cut off within its timeout,
    and meanwhile a normal client's postbacks are answered 202 at once."""
    stop = threading.Event()
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
    slow_body = postback_head(key, "Content-Length: 500\r\n")
    chunked = postback_head(key, "Transfer-Encoding: chunked\r\n")
    other = (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    )
    other += b"Content-Length: 500\r\n\r\n"
    kinds = {
        # kind: (sent at once, then trickled, what it must end with)
        "idle": (b"", b"", "close"),
        "head": (b"", head, 408),
        "body": (slow_body, b"{" + b" " * 400, 408),
        "chunked": (chunked, b"1\r\n{\r\n" * 100, 408),
        "other route": (other, b"token=" + b"x" * 400, 408),
        # answered at once without reading the body (405); the rest is not waited for
        "unread body": (
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n",
            b"x" * 400,
            405,
        ),
    }
    plan = [kind for n in range(9) for kind in kinds][:50]  # 50 connections

    def slow(kind: str) -> tuple[str, Reply]:
        first, rest, _ = kinds[kind]
        sock = socket.create_connection(address(gateway), timeout=30)
        with sock:
            sock.sendall(first)
            started = time.monotonic()
            feeder = threading.Thread(target=trickle, args=(sock, rest, 0.2, stop), daemon=True)
            feeder.start()
            reply = read_reply(sock, started, timeout=BACKSTOP + SLACK + 5)
            if reply.status:
                reply.seconds = max(reply.seconds, closed_within(sock, 10) + reply.seconds)
            return kind, reply

    latencies: list[float] = []
    with ThreadPoolExecutor(len(plan)) as pool:
        futures = [pool.submit(slow, kind) for kind in plan]
        time.sleep(0.5)  # every slow connection is open
        with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
            for n in range(20):
                started = time.monotonic()
                answer = http.post(
                    "/partners/kochava/postback",
                    content=ios_body(f"while-slow-{n}"),
                    headers={"X-Api-Key": key, "Content-Type": "application/json"},
                )
                latencies.append(time.monotonic() - started)
                assert answer.status_code == 202, answer.text
        results = [future.result() for future in futures]
    stop.set()
    # Served at once while the slow ones hang on (2 s: a stuck worker takes the timeouts).
    assert max(latencies) < 2.0, latencies
    for kind, reply in results:
        expected = kinds[kind][2]
        if expected == "close":
            assert reply.status == 0 and reply.body == b"", (kind, reply)
            assert HEADER_TIMEOUT - 0.5 < reply.seconds < HEADER_TIMEOUT + SLACK, (kind, reply)
        elif expected == 405:
            assert_error(reply, 405, "method_not_allowed")
            assert reply.seconds < BACKSTOP + SLACK, (kind, reply)  # answered, then closed
        else:
            assert_error(reply, 408, "request_timeout")
            limit = BACKSTOP if kind == "other route" else HEADER_TIMEOUT
            assert reply.seconds < limit + SLACK, (kind, reply)


def test_a_trickled_postback_body_is_answered_408_by_the_app_and_logged(
    gateway: LiveGateway, key: str
) -> None:
    with socket.create_connection(address(gateway), timeout=30) as sock:
        sock.sendall(postback_head(key, "Content-Length: 100\r\n") + b'{"network_name": ')
        reply = read_reply(sock, time.monotonic())
        assert_error(reply, 408, "request_timeout")
        assert reply.json()["reason"] == f"request body not received within {BODY_TIMEOUT:g} s"
        assert reply.headers.get("connection") == "close"
        assert BODY_TIMEOUT - 0.5 < reply.seconds < BODY_TIMEOUT + SLACK
        assert closed_within(sock, 5) < 5
    lines = [json.loads(line) for line in gateway.log_text().splitlines() if '"postback"' in line]
    assert any(entry.get("outcome") == "request_timeout" for entry in lines)


def test_an_idle_keep_alive_connection_trickling_blank_lines_is_closed(
    gateway: LiveGateway,
) -> None:
    with socket.create_connection(address(gateway), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_reply(sock, time.monotonic()).status == 200
        started = time.monotonic()
        stop = threading.Event()
        threading.Thread(target=trickle, args=(sock, b"\r\n" * 200, 0.2, stop), daemon=True).start()
        waited = closed_within(sock, HEADER_TIMEOUT + SLACK + 5)
        stop.set()
        assert time.monotonic() - started < HEADER_TIMEOUT + SLACK, waited


# -- malformed and hostile requests ---------------------------------------------------------------


def with_body(head: bytes, body: bytes | dict[str, object], ctype: str = "") -> bytes:
    """``head`` (ending in its headers, without the blank line) with ``body`` and its length."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    extra = f"Content-Type: {ctype}\r\n".encode() if ctype else b""
    return head + extra + b"Content-Length: %d\r\n\r\n" % len(raw) + raw


def hostile_requests(key: str) -> dict[str, bytes]:
    post = postback_head(key, "").removesuffix(b"\r\n")
    keys = b"&".join(b"k%d=%d" % (n, n) for n in range(6000))
    return {
        # header injection attempts: CR or LF alone, NUL, folding, bad names
        "CR in a header value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\rSet-Cookie: y\r\n\r\n",
        "LF in a header value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\nSet-Cookie: y\r\n\r\n",
        "NUL in a header value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        "folded header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\r\n Set-Cookie: y\r\n\r\n",
        "space before colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX : a\r\n\r\n",
        "bad header name": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX(y): a\r\n\r\n",
        "bare LF lines": b"GET /healthz HTTP/1.1\nHost: x\n\n",
        # request smuggling
        "Content-Length and chunked": post + b"Content-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "two Content-Lengths": post + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        "negative Content-Length": post + b"Content-Length: -1\r\n\r\n",
        "bad chunk size": post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        "chunked, identity": post + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "bad method": b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "CONNECT": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        # invalid UTF-8 and injection through the URL
        "invalid UTF-8 in the path": b"GET /partners/\xff\xfe/postback HTTP/1.1\r\nHost: x\r\n\r\n",
        "invalid UTF-8 in the query": b"GET /partners/kochava/postback?api_key="
        + key.encode()
        + b"&campaign_name=caf\xe9 HTTP/1.1\r\nHost: x\r\n\r\n",
        "CRLF encoded in the path": b"GET /partners/kochava%0d%0aSet-Cookie:%20y/postback"
        b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "CRLF encoded in a field": b"GET /partners/kochava/postback?api_key="
        + key.encode()
        + b"&network_name=a%0d%0aSet-Cookie:%20y HTTP/1.1\r\nHost: x\r\n\r\n",
        # bodies
        "Content-Length too large": post + b"Content-Length: 99999999999\r\n\r\n{",
        "invalid UTF-8 in JSON": with_body(post, b'{"a":"\xff\xfe"}'),
        "NUL bytes after JSON": with_body(post, b'{"a":"b"}\x00\x00'),
        "raw NUL in a JSON string": with_body(post, b'{"network_name":"a\x00b"}'),
        "escaped NUL in a field": with_body(post, json.loads(IOS) | {"network_name": "a\x00b"}),
        "deep nesting": with_body(post, b"[" * 30000),
        "deep nesting within the limit": with_body(post, b'{"a":' * 40 + b"1" + b"}" * 40),
        "huge number of keys": with_body(post, keys, "application/x-www-form-urlencoded"),
        "huge number of JSON keys": with_body(post, {f"k{n}": n for n in range(5000)}),
        "gzip body": post + b"Content-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}",
    }


def test_malformed_and_hostile_requests_get_a_4xx_never_a_5xx(
    gateway: LiveGateway, key: str
) -> None:
    for name, raw in hostile_requests(key).items():
        reply = send(gateway, raw)
        assert 400 <= reply.status < 500, (name, reply)
        assert reply.headers["content-type"].startswith("application/json"), (name, reply)
        assert reply.json()["status"] == "error", (name, reply)
        assert "set-cookie" not in reply.headers, (name, reply)  # nothing injected
        assert reply.seconds < 5, (name, reply)  # answered, not left to a timeout
    # Still serving, promptly.
    with httpx.Client(base_url=gateway.base_url, timeout=10) as http:
        answer = http.post(
            "/partners/kochava/postback",
            content=ios_body("after-hostile"),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert answer.status_code == 202, answer.text
        stored = http.get("/events", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert stored.json()["events"][0]["dedupe_key"] == "after-hostile"
    errors = [line for line in gateway.log_text().splitlines() if '"level": "error"' in line]
    assert errors == [], "\n".join(errors)


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_header_bytes = 100", "server.max_header_bytes must be between 1024 and 1048576"),
        ("header_timeout_seconds = 0", "server.header_timeout_seconds must be between 0.1 and 600"),
        ("body_timeout_seconds = 9999", "server.body_timeout_seconds must be between 0.1 and 600"),
    ],
)
def test_protocol_limits_out_of_range_are_refused(
    tmp_path: Path, setting: str, message: str
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[server]\n{setting}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path, env={})
