"""Soak test: many postbacks through a real gateway while Redis is restarted and the gateway is
SIGKILLed; afterwards storage must hold exactly the events that were accepted.

    .venv/bin/python bench/soak.py                       # 200,000 postbacks, SQLite
    .venv/bin/python bench/soak.py --storage postgres    # over a fresh PostgreSQL database
    .venv/bin/python bench/soak.py --postbacks 3000      # the size the default test suite runs

It starts its own ``redis-server`` (append-only file, on a free port) and a
``gateway serve`` process over SQLite in a temporary folder (or a fresh PostgreSQL database,
dropped afterwards), creates a key per partner with the CLI, and sends the postbacks from
``--concurrency`` concurrent HTTP clients. The mix, drawn with a seeded random generator:

- 92% attributed postbacks: every partner in turn, each of its samples (``plugins/*/samples``,
  batches and restricted-network samples left out) with its id made unique;
- 5% organic installs (the partners' organic samples, also with unique ids): 200 ignored;
- 2% bad: malformed JSON (400), a wrong key (401), an unusable field (422);
- 1% duplicates: an accepted postback sent again as it was: 200 duplicate, same event id.

Faults, one each: after a third of the postbacks Redis is stopped (SIGTERM), kept down for
``--redis-down`` seconds and started again on the same files; after two thirds the gateway's
process group is SIGKILLed and the gateway started again on the same port. Each fault's *window*
runs from the signal until the server answers again. Clients behave like partners: a connection
error or a 5xx is retried (backoff from 0.1 s up to 2 s) until an answer comes, and a retry of an
event that had been stored before its answer was lost must come back duplicate.

Checks (exit status 1 if any fails): every postback got the answer its kind calls for; the
stored count equals the number of distinct accepted events, and the stored event ids are exactly
the ids the answers named; no 5xx and no connection error outside the windows; /readyz said
``status_store: unavailable`` while Redis was down; the pending status updates went back to 0;
the status store caught up with what was accepted while Redis was down, and the kill cost the
status counters at most the updates not yet written: those answered after the last status read
before the kill, and those of requests still in flight.

It prints progress, then the numbers, and writes them as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's gateway and plugins
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from gateway.config import load_config  # noqa: E402
from gateway.errors import MappingError  # noqa: E402
from gateway.plugins import load_partners  # noqa: E402
from gateway.postback import Gateway, map_payload  # noqa: E402
from gateway.storage import open_storage  # noqa: E402

#: Stands for the unique id in a rendered request.
MARK = "SOAKMARK"

#: A postback that gets no answer for this long is given up (and counted as unanswered).
GIVE_UP_S = 120.0

#: Longest a server may take to start.
START_S = 60.0

SHARES = {"duplicate": 0.01, "organic": 0.05, "bad": 0.02}  # the rest: attributed


# -- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One sample of one partner as a request with ``MARK`` where the unique id goes."""

    partner: str
    sample: str
    method: str
    query: str  # without api_key
    body: str | None
    expect: str  # accepted, organic, bad_request, unauthorized, invalid_payload

    def render(self, uid: str, key: str) -> tuple[str, str, bytes | None]:
        query = f"api_key={urllib.parse.quote(key, safe='')}"
        if self.query:
            query += "&" + self.query.replace(MARK, uid)
        body = self.body.replace(MARK, uid).encode() if self.body is not None else None
        return self.method, f"/partners/{self.partner}/postback?{query}", body


def _unique(spec: Any, payload: dict[str, Any], event: Any) -> dict[str, Any] | None:
    """``payload`` with MARK where its id goes: the field holding its dedupe key, else an extra
    field (the dedupe key is then a hash of the payload). None if that does not make it unique."""
    fields = [k for k, v in payload.items() if isinstance(v, str) and v and v == event.dedupe_key]
    marked = dict(payload)
    if fields:
        marked[fields[0]] = MARK
    else:
        marked["soak_seq"] = MARK
    keys = set()
    for uid in ("soakA1", "soakB2"):
        filled = json.loads(json.dumps(marked).replace(MARK, uid))
        (mapped,) = map_payload(spec, filled)
        if mapped.attributed != event.attributed:
            return None
        keys.add(mapped.dedupe_key)
    return marked if len(keys) == 2 else None


def templates(config: Any, partners: dict[str, Any]) -> tuple[list[Template], list[Template]]:
    """(attributed, organic) templates from every enabled partner's samples."""
    gw = Gateway(config, partners, None, None)  # type: ignore[arg-type]  # for restricted()
    attributed: list[Template] = []
    organic: list[Template] = []
    for name in sorted(partners):
        if not config.partner_enabled(name):
            continue
        spec = partners[name].spec
        folder = ROOT / "plugins" / name / "samples"
        for path in sorted(folder.glob("*")):
            if path.suffix == ".json":
                payload = json.loads(path.read_bytes())
                if not isinstance(payload, dict):
                    continue  # a batch: one postback, several events
            elif path.suffix == ".query":
                payload = dict(urllib.parse.parse_qsl(path.read_text().strip()))
            else:
                continue
            events = map_payload(spec, payload)
            if len(events) != 1 or gw.restricted(events[0].source):
                continue
            marked = _unique(spec, payload, events[0])
            if marked is None:
                continue
            if path.suffix == ".json" and "POST" in spec.methods:
                t = Template(name, path.name, "POST", "", json.dumps(marked), "")
            else:
                t = Template(name, path.name, "GET", urllib.parse.urlencode(marked), None, "")
            if events[0].attributed:
                attributed.append(Template(**{**asdict(t), "expect": "accepted"}))
            else:
                organic.append(Template(**{**asdict(t), "expect": "organic"}))
    return attributed, organic


def bad_templates(partners: dict[str, Any], attributed: list[Template]) -> list[Template]:
    """Postbacks that must be refused with a 4xx: malformed JSON, an unusable field, a wrong
    key (the last is made when rendering)."""
    kochava = next(t for t in attributed if t.partner == "kochava" and t.method == "POST")
    payload = json.loads(kochava.body or "{}")
    payload["install_time"] = "not a time"
    try:
        map_payload(partners["kochava"].spec, json.loads(json.dumps(payload).replace(MARK, "x")))
    except MappingError:
        pass
    else:  # pragma: no cover - a change in the Kochava mapping
        raise SystemExit("soak: the unusable Kochava sample maps; pick another field")
    return [
        Template("kochava", "malformed", "POST", "", '{"transaction_id": "' + MARK, "bad_request"),
        Template("kochava", "unusable", "POST", "", json.dumps(payload), "invalid_payload"),
        Template(kochava.partner, "wrong_key", "POST", "", kochava.body, "unauthorized"),
    ]


EXPECTED_CODE = {"bad_request": 400, "invalid_payload": 422, "unauthorized": 401}


@dataclass
class Postback:
    seq: int
    kind: str  # attributed, organic, bad, duplicate
    method: str
    url: str
    body: bytes | None
    expect: str
    original_id: str | None = None  # for a duplicate: the event id first answered


# -- servers -------------------------------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None] | None:
    """For Popen's ``preexec_fn`` on Linux: the child gets SIGTERM when the thread that started
    it dies, so a soak run that is killed (a test runner's timeout) leaves no gateway behind
    (the gateway runs in a session of its own, out of reach of a kill of our process group)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


DIE_WITH_PARENT = _parent_death_signal()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *("redis-server", "--bind", "127.0.0.1", "--port", str(self.port)),
                *("--dir", str(self.folder), "--save", "", "--appendonly", "yes"),
                # Stopped with SIGTERM, Redis writes and syncs its AOF before it exits, so
                # "everysec" loses nothing here and leaves the disk's syncs to storage.
                *("--appendfsync", "everysec", "--logfile", str(self.folder / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=DIE_WITH_PARENT,
        )
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"soak: redis-server exited; see {self.folder / 'redis.log'}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            time.sleep(0.05)
        raise SystemExit("soak: redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=START_S)
            self.process = None


class GatewayProcess:
    def __init__(self, workdir: Path, env: dict[str, str], workers: int) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = env
        self.workers = workers
        self.log_path = workdir / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=START_S,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"soak: gateway {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "gateway", "serve"),
                    *("--port", str(self.port), "--workers", str(self.workers)),
                ],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the kill takes the workers
                preexec_fn=DIE_WITH_PARENT,
            )
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"soak: the gateway exited at start; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise SystemExit("soak: the gateway did not start")

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=START_S)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Window:
    name: str
    start: float
    end: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def overlaps(self, t0: float, t1: float) -> bool:
        return t0 <= self.end and t1 >= self.start


@dataclass
class Tally:
    sent: int = 0  # postbacks taken by a client
    done: int = 0  # postbacks answered for good (or given up)
    attempts: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)  # "<kind> <code> <status>"
    failures: list[tuple[float, float, str]] = field(default_factory=list)  # t0, t1, what
    accepted_ids: set[str] = field(default_factory=set)  # event ids answered 202
    recovered_ids: set[str] = field(default_factory=set)  # duplicates after a lost answer
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    mismatch_count: int = 0
    unanswered: int = 0
    latencies: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, storage_url: str) -> None:
        self.args = args
        self.workdir = workdir
        self.storage_url = storage_url
        self.rng = random.Random(args.seed)
        self.run_id = secrets.token_hex(3)
        self.redis = Redis(workdir / "redis")
        self.admin_token = secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            {
                "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
                "GATEWAY_DATA_DIR": str(workdir / "data"),
                "GATEWAY_STORAGE_URL": storage_url,
                "GATEWAY_REDIS_URL": self.redis.url,
                "GATEWAY_ADMIN_TOKEN": self.admin_token,
            }
        )
        self.gateway = GatewayProcess(workdir, env, args.workers)
        self.tally = Tally()
        self.windows: list[Window] = []
        self.recent: deque[tuple[str, str, bytes | None, str]] = deque(maxlen=10_000)
        self.keys: dict[str, str] = {}
        self.load_at_start = os.getloadavg()  # other work on the machine shows here
        self.status_before_kill = 0  # the status store's accepted counter just before the kill
        self.accepted_before_kill = 0  # postbacks answered 202 by the kill

    # the postbacks, drawn one at a time
    def draw(self, seq: int) -> Postback:
        r = self.rng.random()
        kind = "attributed"
        if r < SHARES["duplicate"]:
            kind = "duplicate" if self.recent else "attributed"
        elif r < SHARES["duplicate"] + SHARES["organic"]:
            kind = "organic"
        elif r < SHARES["duplicate"] + SHARES["organic"] + SHARES["bad"]:
            kind = "bad"
        if kind == "duplicate":
            method, url, body, event_id = self.rng.choice(self.recent)
            return Postback(seq, kind, method, url, body, "duplicate", event_id)
        uid = f"soak{self.run_id}x{seq}"
        if kind == "organic":
            t = self.organic[seq % len(self.organic)]
        elif kind == "bad":
            t = self.bad[seq % len(self.bad)]
        else:
            t = self.attributed[seq % len(self.attributed)]
        key = self.keys[t.partner] if t.sample != "wrong_key" else "gwk_wrong" + uid
        method, url, body = t.render(uid, key)
        return Postback(seq, kind, method, url, body, t.expect)

    def check(self, pb: Postback, code: int, body: dict[str, Any], retried: bool) -> None:
        t = self.tally
        status = body.get("status")
        t.answers[f"{pb.kind} {code} {status}"] += 1
        ok = False
        if pb.expect == "accepted":
            if code == 202 and status == "accepted":
                t.accepted_ids.add(body["event_id"])
                self.recent.append((pb.method, pb.url, pb.body, body["event_id"]))
                ok = True
            elif code == 200 and status == "duplicate" and retried:
                t.recovered_ids.add(body["event_id"])  # stored, but its answer was lost
                ok = True
        elif pb.expect == "organic":
            ok = code == 200 and body.get("reason") == "organic"
        elif pb.expect == "duplicate":
            ok = code == 200 and status == "duplicate" and body.get("event_id") == pb.original_id
        else:
            ok = code == EXPECTED_CODE[pb.expect] and body.get("error") == pb.expect
        if not ok:
            t.mismatch_count += 1
            if len(t.mismatches) < 20:
                t.mismatches.append(
                    {"kind": pb.kind, "url": pb.url.split("?")[0], "code": code, "body": body}
                )

    async def send(self, http: httpx.AsyncClient, pb: Postback) -> None:
        first = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            self.tally.attempts += 1
            t0 = time.monotonic()
            try:
                response = await http.request(pb.method, pb.url, content=pb.body)
            except httpx.TransportError as exc:
                what = f"connection error ({type(exc).__name__})"
            else:
                t1 = time.monotonic()
                if response.status_code < 500:
                    self.tally.latencies.append(t1 - t0)
                    self.check(pb, response.status_code, response.json(), attempt > 1)
                    return
                what = f"{response.status_code}"
            t1 = time.monotonic()
            self.tally.failures.append((t0, t1, what))
            if t1 - first > GIVE_UP_S:
                self.tally.unanswered += 1
                return
            await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 2.0))

    async def client(self, http: httpx.AsyncClient) -> None:
        while self.tally.sent < self.args.postbacks:
            pb = self.draw(self.tally.sent)
            self.tally.sent += 1
            self.tally.by_kind[pb.kind] += 1
            await self.send(http, pb)
            self.tally.done += 1

    async def faults(self, http: httpx.AsyncClient) -> None:
        n = self.args.postbacks
        await self.until(lambda: self.tally.sent >= n // 3)
        w = Window("redis restart", time.monotonic())
        self.windows.append(w)
        await asyncio.to_thread(self.redis.stop)
        await asyncio.sleep(min(0.5, self.args.redis_down / 2))
        ready = await http.get("/readyz")
        w.notes["readyz_while_down"] = {"code": ready.status_code, "body": ready.json()}
        await asyncio.sleep(max(0.0, self.args.redis_down - (time.monotonic() - w.start)))
        accepted_before = len(self.tally.accepted_ids)  # all noted before Redis came back
        await asyncio.to_thread(self.redis.start)
        await self.until_ready(http)
        w.end = time.monotonic()
        # The two faults are kept apart: the gateway must first write the status it held while
        # Redis was down, or the kill would take that backlog with it.
        caught_up = await self.status_reaches(http, accepted_before, timeout=30.0)
        w.notes["status_caught_up_after_s"] = (
            None if caught_up is None else round(caught_up - w.end, 2)
        )

        await self.until(lambda: self.tally.sent >= 2 * n // 3)
        # What the status store holds just before the kill (the read writes this worker's
        # pending updates first); the kill may lose only what was answered from then on, and
        # the updates of requests still in flight.
        answered_before_read = len(self.tally.accepted_ids)
        self.status_before_kill = await self.status_accepted(http)
        w = Window("gateway SIGKILL", time.monotonic())
        self.windows.append(w)
        await asyncio.to_thread(self.gateway.kill)
        self.accepted_before_kill = len(self.tally.accepted_ids)
        w.notes["accepted_answered_from_status_read_to_kill"] = (
            self.accepted_before_kill - answered_before_read
        )
        await asyncio.to_thread(self.gateway.start)  # same port, same files
        w.end = time.monotonic()

    async def until_ready(self, http: httpx.AsyncClient) -> None:
        """Until /readyz answers 200: the gateway reaches its stores again."""
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.05)

    async def status_accepted(self, http: httpx.AsyncClient) -> int:
        """The status store's accepted counters, summed over the partners (the worker that
        answers writes its pending updates first)."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        partners = (await http.get("/partners", headers=headers)).json()["partners"]
        return sum(int(p["counters"]["accepted"]) for p in partners)

    async def status_reaches(
        self, http: httpx.AsyncClient, accepted: int, timeout: float
    ) -> float | None:
        """When the status store's accepted counter first reached ``accepted`` (None: not within
        ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.status_accepted(http) >= accepted:
                return time.monotonic()
            await asyncio.sleep(0.1)
        return None

    async def until(self, condition: Any) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def progress(self, started: float) -> None:
        last = 0
        while True:
            await asyncio.sleep(self.args.progress_every)
            done = self.tally.done
            elapsed = time.monotonic() - started
            rate = (done - last) / self.args.progress_every
            last = done
            print(f"soak: {elapsed:7.1f}s {done:>8} answered  {rate:7.0f}/s", flush=True)

    async def wait_no_pending(self, http: httpx.AsyncClient) -> float | None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = (await http.get("/metrics")).text
            for line in text.splitlines():
                if line.startswith("gateway_status_pending "):
                    value = float(line.split()[1])
                    if value == 0:
                        return value
            await asyncio.sleep(0.2)
        return None

    async def main(self) -> dict[str, Any]:
        config = load_config(ROOT / "config" / "gateway.toml", env={})
        partners = load_partners()
        self.attributed, self.organic = templates(config, partners)
        self.bad = bad_templates(partners, self.attributed)
        self.redis.start()
        self.gateway.start()
        for partner in sorted({t.partner for t in self.attributed + self.organic}):
            self.keys[partner] = self.gateway.cli("keys", "create", partner).split()[-1]

        # Idle connections are dropped after 2 s, before the server's keep-alive timeout (5 s)
        # closes them: a request sent on a connection the server is closing at that moment fails
        # without having reached the gateway (a race of HTTP/1.1 keep-alive, not a fault).
        limits = httpx.Limits(
            max_connections=self.args.concurrency,
            max_keepalive_connections=self.args.concurrency,
            keepalive_expiry=2.0,
        )
        async with httpx.AsyncClient(
            base_url=self.gateway.base_url, timeout=30, limits=limits
        ) as http:
            started = time.monotonic()
            progress = asyncio.create_task(self.progress(started))
            faults = asyncio.create_task(self.faults(http))
            await asyncio.gather(*(self.client(http) for _ in range(self.args.concurrency)))
            elapsed = time.monotonic() - started
            progress.cancel()
            await faults
            pending = await self.wait_no_pending(http)
            status_accepted = await self.status_accepted(http)
        self.gateway.stop()
        self.redis.stop()
        stored_ids, stored_count = await self.stored()
        return self.report(started, elapsed, pending, status_accepted, stored_ids, stored_count)

    async def stored(self) -> tuple[set[str], int]:
        storage = open_storage(self.storage_url)
        await storage.open()
        try:
            ids: set[str] = set()
            after = None
            while True:
                page = await storage.scan(after=after, limit=5000)
                if not page:
                    break
                ids.update(e.event_id for e in page)
                after = page[-1].event_id
            return ids, await storage.count()
        finally:
            await storage.close()

    def report(
        self,
        started: float,
        elapsed: float,
        pending: float | None,
        status_accepted: int,
        stored_ids: set[str],
        stored_count: int,
    ) -> dict[str, Any]:
        t = self.tally
        expected_ids = t.accepted_ids | t.recovered_ids
        in_window: dict[str, Counter[str]] = {w.name: Counter() for w in self.windows}
        outside: Counter[str] = Counter()
        for t0, t1, what in t.failures:
            w = next((w for w in self.windows if w.overlaps(t0, t1)), None)
            (in_window[w.name] if w else outside)[what] += 1
        outside_examples = [
            {"at_s": round(t0 - started, 2), "took_s": round(t1 - t0, 2), "what": what}
            for t0, t1, what in t.failures
            if not any(w.overlaps(t0, t1) for w in self.windows)
        ][:20]
        fivexx_outside = sum(n for what, n in outside.items() if what[0].isdigit())
        errors_outside = sum(n for what, n in outside.items() if not what[0].isdigit())
        redis_window = next(w for w in self.windows if w.name == "redis restart")
        readyz = redis_window.notes.get("readyz_while_down", {})
        latencies = sorted(t.latencies)

        def pct(q: float) -> float:
            return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

        checks = {
            "every postback answered as its kind calls for": t.mismatch_count == 0
            and t.unanswered == 0,
            "stored count == distinct accepted events": stored_count == len(expected_ids),
            "stored event ids == ids answered": stored_ids == expected_ids,
            "no 5xx outside the fault windows": fivexx_outside == 0,
            "no connection errors outside the fault windows": errors_outside == 0,
            "readyz said status_store unavailable while Redis was down": readyz.get("code") == 503
            and readyz.get("body", {}).get("status_store") == "unavailable",
            "pending status updates back to 0": pending == 0,
            "status caught up after Redis came back": redis_window.notes.get(
                "status_caught_up_after_s"
            )
            is not None,
            "status lost at most the updates not yet written at the kill": 0
            <= len(expected_ids) - status_accepted
            <= self.accepted_before_kill - self.status_before_kill + self.args.concurrency,
        }
        return {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average_at_start": [round(x, 2) for x in self.load_at_start],
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "settings": {
                "postbacks": self.args.postbacks,
                "storage": self.args.storage,
                "workers": self.args.workers,
                "concurrency": self.args.concurrency,
                "redis_down_s": self.args.redis_down,
                "seed": self.args.seed,
                "shares": SHARES,
            },
            "postbacks": dict(t.by_kind),
            "attempts": t.attempts,
            "answers": dict(sorted(t.answers.items())),
            "accepted_answered_202": len(t.accepted_ids),
            "accepted_answer_lost_then_duplicate": len(t.recovered_ids),
            "distinct_accepted_events": len(expected_ids),
            "stored_events": stored_count,
            "mismatches": t.mismatch_count,
            "mismatch_examples": t.mismatches,
            "unanswered": t.unanswered,
            "failures_in_windows": {name: dict(c) for name, c in in_window.items()},
            "failures_outside_windows": dict(outside),
            "failures_outside_windows_examples": outside_examples,
            "5xx_outside_windows": fivexx_outside,
            "windows": [
                {
                    "name": w.name,
                    "at_s": round(w.start - started, 2),
                    "duration_s": round(w.end - w.start, 2),
                    **w.notes,
                }
                for w in self.windows
            ],
            "status_accepted_counter": status_accepted,
            "status_lost_at_kill": len(expected_ids) - status_accepted,
            "status_not_written_at_kill_at_most": self.accepted_before_kill
            - self.status_before_kill
            + self.args.concurrency,
            "status_pending_at_end": pending,
            "elapsed_s": round(elapsed, 1),
            "throughput_per_s": round(self.args.postbacks / elapsed, 1),
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
            "checks": checks,
            "ok": all(checks.values()),
        }


def print_report(result: dict[str, Any]) -> None:
    print()
    print(f"postbacks         {result['settings']['postbacks']}  {result['postbacks']}")
    print(f"attempts          {result['attempts']}")
    print(
        f"accepted          {result['distinct_accepted_events']} distinct"
        f" ({result['accepted_answered_202']} answered 202,"
        f" {result['accepted_answer_lost_then_duplicate']} duplicate after a lost answer)"
    )
    print(f"stored            {result['stored_events']}")
    for w in result["windows"]:
        failed = result["failures_in_windows"][w["name"]] or "none"
        print(f"window            {w['name']}: at {w['at_s']}s for {w['duration_s']}s;")
        print(f"                    failed attempts: {failed}")
    print(f"failures, outside {result['failures_outside_windows']}")
    print(f"5xx outside       {result['5xx_outside_windows']}")
    print(
        f"status accepted   {result['status_accepted_counter']}; lost at the kill"
        f" {result['status_lost_at_kill']} (at most {result['status_not_written_at_kill_at_most']})"
    )
    print(
        f"throughput        {result['throughput_per_s']}/s over {result['elapsed_s']}s;"
        f" latency ms {result['latency_ms']}"
    )
    for name, ok in result["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")


def postgres_database(admin_url: str) -> tuple[str, str]:
    name = f"gwsoak_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urllib.parse.urlsplit(admin_url)
    return name, urllib.parse.urlunsplit(parts._replace(path="/" + name))


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postbacks", type=int, default=200_000)
    parser.add_argument("--storage", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="server on which a fresh database is created (and dropped afterwards)",
    )
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--redis-down", type=float, default=3.0, help="seconds Redis stays down")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    parser.add_argument("--workdir", type=Path, help="keep the run's files here (default: temp)")
    parser.add_argument("--progress-every", type=float, default=10.0, help="seconds")
    args = parser.parse_args(argv)
    if args.postbacks < 300:
        parser.error("--postbacks must be at least 300")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    database = None
    if args.storage == "postgres":
        database, storage_url = postgres_database(args.postgres_url)
    else:
        storage_url = f"sqlite:///{workdir / 'data' / 'gateway.db'}"
    soak = Soak(args, workdir, storage_url)
    print(f"soak: {args.postbacks} postbacks, {args.storage}, files in {workdir}", flush=True)
    try:
        result = asyncio.run(soak.main())
    finally:
        soak.gateway.stop()
        soak.redis.stop()
        if database is not None:
            drop_database(args.postgres_url, database)
    result["workdir"] = str(workdir)
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    if result["ok"] and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
