"""The benchmark in one command: the gateway and the bare endpoint side by side, on the same
server settings and concurrency, then a count of what was stored.

    python bench/run.py                              # SQLite, 32 connections, 20 s each
    python bench/run.py --storage postgres --workers 1,2
    python bench/run.py --targets gateway --requests 1000000 --rss-mark 100000

For each target and worker count it starts a server (``gateway serve``, or ``bench/serve_bare.py``
for the bare endpoint: the same server code with another app), warms it up, runs the load
(bench/load.py), samples the resident memory of the server's whole process tree, then kills the
server with SIGKILL (nothing is written after the last answer) and counts the stored events: every
event answered 202 must be there, and nothing else. Prints a summary and writes
``bench/results/<time>-<label>.json`` and ``.txt``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from bench import load  # noqa: E402

RESULTS = ROOT / "bench" / "results"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


# -- the server's process tree ----------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn's supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/statm") as fh:
            total += int(fh.read().split()[1]) * PAGE
    return total


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds used so far by these processes (all their threads)."""
    user = system = 0
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
            user += int(fields[11])
            system += int(fields[12])
    return user / TICKS, system / TICKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        mem = int(fh.readline().split()[1]) // 1024
    versions = {}
    for dist in ("litestar", "uvicorn", "uvloop", "httptools", "msgspec", "psycopg"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


# -- one server ----------------------------------------------------------------------------------


@dataclass
class Setup:
    storage: str  # sqlite | postgres
    redis_url: str  # "" = the embedded status store
    postgres_admin_url: str
    workdir: Path
    cleanups: list[Any] = field(default_factory=list)


def _config_text(prefix: str) -> str:
    text = (ROOT / "config" / "gateway.toml").read_text(encoding="utf-8")
    line = 'key_prefix = "gateway:"'
    if line not in text:
        raise SystemExit(f"config/gateway.toml has no {line!r} line to give the bench its own")
    return text.replace(line, f'key_prefix = "{prefix}"')


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    import psycopg
    from psycopg import sql

    name = f"gwbench_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        parts = urllib.parse.urlsplit(admin_url)
        yield urllib.parse.urlunsplit(parts._replace(path="/" + name))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def gateway_env(workdir: Path, storage_url: str, redis_url: str, prefix: str) -> dict[str, str]:
    config = workdir / "gateway.toml"
    config.write_text(_config_text(prefix), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS_"))}
    env.update(
        {
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_DATA_DIR": str(workdir / "data"),
            "GATEWAY_STORAGE_URL": storage_url,
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_ADMIN_TOKEN": secrets.token_urlsafe(32),
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def create_keys(env: dict[str, str], cwd: Path) -> dict[str, str]:
    """One key per partner, made by ``gateway keys create`` (all six at once)."""
    procs = {
        partner: subprocess.Popen(
            [sys.executable, "-m", "gateway", "keys", "create", partner],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for partner in load.PARTNERS
    }
    keys = {}
    for partner, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"gateway keys create {partner} failed:\n{err}")
        keys[partner] = out.strip().splitlines()[-1]
    return keys


@contextlib.contextmanager
def server(
    target: str, env: dict[str, str], cwd: Path, workers: int
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    if target == "bare":
        cmd = [sys.executable, str(ROOT / "bench" / "serve_bare.py")]
    else:
        cmd = [sys.executable, "-m", "gateway", "serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    log = (cwd / f"{target}-{workers}.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{target} server exited at start; see {log.name} in {cwd}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{target} server did not start within 60 s") from None
                time.sleep(0.1)
        time.sleep(0.5 if workers == 1 else 1.5)  # every worker up
        yield proc, port
    finally:
        # SIGKILL, to the whole group: nothing is written after the last answer, so what is
        # counted afterwards is what was durable when it was answered.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


async def read_stored(storage_url: str) -> tuple[dict[str, int], list[str]]:
    """Stored events per partner (and "total"), and every stored event id."""
    from gateway.storage import open_storage

    storage = open_storage(storage_url)
    await storage.open()
    try:
        counts = {p: await storage.count(p) for p in load.PARTNERS}
        counts["total"] = await storage.count()
        ids: list[str] = []
        after = None
        while page := await storage.scan(after=after, limit=5000):
            ids += [e.event_id for e in page]
            after = page[-1].event_id
    finally:
        await storage.close()
    return counts, ids


def start_profiler(
    args: argparse.Namespace, pid: int, target: str, workers: int
) -> subprocess.Popen[bytes] | None:
    """py-spy on the server's processes while the load runs (``--profile``), written as a
    speedscope file next to the results."""
    if not args.profile:
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"profile-{args.label or 'run'}-{target}-{workers}.speedscope.json"
    cmd = [py_spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "250"]
    cmd += ["--format", "speedscope", "--output", str(out), "--nonblocking"]
    cmd += ["--idle"] if args.profile_idle else []
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Sampler:
    """Samples the server tree's RSS (and the client's progress) every ``every`` seconds."""

    root_pid: int
    progress: load.Tally
    every: float = 0.2
    report_every: float = 0.0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (requests done, bytes)

    async def run(self) -> None:
        started = last_report = time.monotonic()
        while True:
            pids = tree(self.root_pid)
            self.samples.append((self.progress.requests, rss_bytes(pids)))
            now = time.monotonic()
            if self.report_every and now - last_report >= self.report_every:
                last_report = now
                done = self.progress.requests
                print(
                    f"  … {done} requests in {now - started:.0f} s,"
                    f" RSS {self.samples[-1][1] / 2**20:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(self.every)

    def peak(self, up_to: int | None = None) -> int:
        return max((rss for done, rss in self.samples if up_to is None or done <= up_to), default=0)


@contextlib.asynccontextmanager
async def sampling(sampler: Sampler) -> AsyncIterator[Sampler]:
    task = asyncio.create_task(sampler.run())
    try:
        yield sampler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def one_run(args: argparse.Namespace, target: str, workers: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"gwbench-{target}-"))
    prefix = f"gwbench:{secrets.token_hex(4)}:"
    with contextlib.ExitStack() as stack:
        if args.storage == "postgres":
            storage_url = stack.enter_context(postgres_database(args.postgres_admin_url))
        else:
            storage_url = f"sqlite:///{workdir}/data/gateway.db"
        if args.redis:
            stack.callback(_drop_redis_prefix, args.redis, prefix)
        env = gateway_env(workdir, storage_url, args.redis, prefix)
        keys = (
            create_keys(env, workdir)
            if target == "gateway"
            else dict.fromkeys(load.PARTNERS, "bench")
        )
        templates = load.templates(keys)
        with server(target, env, workdir, workers) as (proc, port):
            # Warm-up: not timed, but its events are stored and counted like the others.
            warm, _ = await load.run_load(
                "127.0.0.1", port, templates, args.connections, args.warmup, run_id="warm"
            )
            print(
                f"{target} workers={workers}: warmed up ({warm.requests} requests)", file=sys.stderr
            )
            tally = load.Tally()
            sampler = Sampler(proc.pid, tally, report_every=10.0 if args.requests else 0.0)
            cpu0 = cpu_seconds(tree(proc.pid))
            client0 = resource.getrusage(resource.RUSAGE_SELF)
            profiler = start_profiler(args, proc.pid, target, workers)
            async with sampling(sampler):
                tally, seconds = await load.run_load(
                    "127.0.0.1",
                    port,
                    templates,
                    args.connections,
                    args.duration,
                    requests=args.requests,
                    run_id="run",
                    tally=tally,
                )
            pids = tree(proc.pid)
            cpu1 = cpu_seconds(pids)
            server_user, server_system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its output and exits
                profiler.wait(timeout=60)
            client1 = resource.getrusage(resource.RUSAGE_SELF)
            processes = len(pids)
        client_cpu = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
        # The server is gone (SIGKILL): count what it made durable before answering.
        stored, stored_ids = await read_stored(storage_url) if target == "gateway" else (None, [])
    shutil.rmtree(workdir, ignore_errors=True)

    latencies = sorted(tally.latencies_ns)
    accepted = warm.accepted_events + tally.accepted_events
    result: dict[str, Any] = {
        "target": target,
        "workers": workers,
        "server_processes": processes,
        "storage": args.storage if target == "gateway" else None,
        "status_store": ("redis" if args.redis else "embedded") if target == "gateway" else None,
        "connections": args.connections,
        "requests": tally.requests,
        "seconds": round(seconds, 3),
        "throughput_rps": round(tally.requests / seconds, 1),
        "p50_ms": round(load.percentile(latencies, 50) / 1e6, 2),
        "p99_ms": round(load.percentile(latencies, 99) / 1e6, 2),
        "max_ms": round(latencies[-1] / 1e6, 2) if latencies else None,
        "peak_rss_mib": round(sampler.peak() / 2**20, 1),
        "server_cpu_us_per_request": round(
            (server_user + server_system) / max(tally.requests, 1) * 1e6, 1
        ),
        "server_cpu_system_share": round(server_system / max(server_user + server_system, 1e-9), 2),
        "server_cpu_cores": round((server_user + server_system) / seconds, 2),
        "client_cpu_share": round(client_cpu / seconds, 2),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "errors": dict(tally.errors),
        "warmup_requests": warm.requests,
        "accepted_events": accepted,
        "duplicates_answered": warm.duplicates + tally.duplicates,
    }
    if args.rss_mark:
        result["peak_rss_mib_up_to"] = {
            str(mark): round(sampler.peak(mark) / 2**20, 1) for mark in args.rss_mark
        }
    if stored is not None:
        result["stored_events"] = stored["total"]
        result["stored_by_partner"] = {p: stored[p] for p in load.PARTNERS}
        by_partner = warm.accepted_by_partner + tally.accepted_by_partner
        result["accepted_by_partner"] = {p: by_partner[p] for p in load.PARTNERS}
        result["lost_events"] = max(0, accepted - stored["total"])
        result["unanswered_stored_events"] = max(0, stored["total"] - accepted)
        answered_ids = warm.accepted_ids | tally.accepted_ids
        stored_set = set(stored_ids)
        # Each id answered accepted is stored, once; nothing is stored that was not answered so.
        result["ids_answered_not_stored"] = len(answered_ids - stored_set)
        result["ids_stored_not_answered"] = len(stored_set - answered_ids)
        result["ids_stored_twice"] = len(stored_ids) - len(stored_set)
        result["every_accepted_stored"] = (
            all(stored[p] == by_partner[p] for p in load.PARTNERS)
            and stored["total"] == accepted == len(answered_ids) == len(stored_ids)
            and stored_set == answered_ids
        )
    return result


def _drop_redis_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
    finally:
        client.close()


# -- the command ---------------------------------------------------------------------------------


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"bench {report['started_at']}  {report['command']}",
        f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores,"
        f" {report['machine']['memory_mb']} MiB, Python {report['machine']['python']};"
        f" load average before: {report['load_average_before']}",
        "",
        f"{'target':<8} {'workers':>7} {'storage':<8} {'requests':>9} {'req/s':>8} {'p50 ms':>7}"
        f" {'p99 ms':>7} {'peak RSS MiB':>12} {'CPU µs/req':>10}  stored",
    ]
    for r in report["runs"]:
        stored = ""
        if "stored_events" in r:
            ok = "ok" if r["every_accepted_stored"] else "MISMATCH"
            stored = f"{r['stored_events']}/{r['accepted_events']} accepted {ok}"
        lines.append(
            f"{r['target']:<8} {r['workers']:>7} {r['storage'] or '-':<8} {r['requests']:>9}"
            f" {r['throughput_rps']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
            f" {r['peak_rss_mib']:>12.1f} {r['server_cpu_us_per_request']:>10.0f}  {stored}"
        )
        if r.get("errors") or set(r["statuses"]) - {"200", "202"}:
            lines.append(f"         statuses {r['statuses']} errors {r['errors']}")
        if "peak_rss_mib_up_to" in r:
            marks = ", ".join(f"≤{k}: {v} MiB" for k, v in r["peak_rss_mib_up_to"].items())
            lines.append(f"         peak RSS by requests done: {marks}")
    for key, ratio in report["ratios"].items():
        lines.append(f"ratio {key}: {ratio}")
    return "\n".join(lines)


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    by = {(r["target"], r["workers"]): r for r in runs}
    for (target, workers), r in by.items():
        bare = by.get(("bare", workers))
        if target == "gateway" and bare is not None:
            out[f"gateway/bare throughput, workers={workers}"] = round(
                r["throughput_rps"] / bare["throughput_rps"], 3
            )
    gw = sorted((w, r) for (t, w), r in by.items() if t == "gateway")
    for (w1, r1), (w2, r2) in itertools.pairwise(gw):
        out[f"gateway throughput workers={w2} / workers={w1}"] = round(
            r2["throughput_rps"] / r1["throughput_rps"], 3
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--targets", default="bare,gateway", help="bare,gateway (default both)")
    parser.add_argument("--workers", default="1", help="worker counts to run, e.g. 1,2")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per run")
    parser.add_argument("--requests", type=int, help="a number of requests instead of a duration")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of untimed load first")
    parser.add_argument("--storage", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--redis", default="", help="redis:// URL for status (default embedded)")
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument(
        "--rss-mark", type=int, action="append", help="also report peak RSS up to N requests"
    )
    parser.add_argument(
        "--profile", action="store_true", help="record the server with py-spy (speedscope)"
    )
    parser.add_argument(
        "--profile-idle",
        action="store_true",
        help="with --profile: keep the samples of threads waiting (py-spy --idle)",
    )
    parser.add_argument("--label", default="", help="added to the result file names")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/run.py", *argv]),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "runs": [],
    }
    for workers in [int(w) for w in args.workers.split(",")]:
        for target in args.targets.split(","):
            result = await one_run(args, target, workers)
            report["runs"].append(result)
            print(summary({**report, "ratios": {}}).splitlines()[-1], file=sys.stderr)
    report["ratios"] = ratios(report["runs"])
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        import uvloop

        report = uvloop.run(main_async(args, argv))
    except ImportError:
        report = asyncio.run(main_async(args, argv))
    text = summary(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{args.label}" if args.label else stamp
    (args.out / f"{name}.json").write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    (args.out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    print(f"written: {args.out / name}.json and .txt")
    bad = [r for r in report["runs"] if r.get("every_accepted_stored") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
