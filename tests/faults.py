"""Helpers for the fault-injection tests: a redis-server of the test's own (to stop and start),
a ``gateway serve`` process whose output is drained through a pipe (so a file-size limit set on
it does not cut its log), and readers of the Prometheus text format."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import ADMIN_TOKEN, ROOT, free_port

#: How long a process may take to start or stop before a test gives up on it. Generous: a
#: loaded 2-core CI machine; the tests do not measure it.
START_TIMEOUT_S = 30.0


class RedisServer:
    """``redis-server`` on a free port with its files in ``folder``. Every write is appended to
    the AOF and synced before Redis answers (``appendfsync always``), so what Redis said it wrote
    is there again after a stop, even a SIGKILL, and a start on the same folder and port."""

    def __init__(self, folder: Path, *options: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def start(self) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--logfile",
                str(self.folder / "redis.log"),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited at start:\n{log}")
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        self.process.send_signal(sig)
        self.process.wait(timeout=START_TIMEOUT_S)
        self.process = None


class Serve:
    """``gateway serve`` on ``port`` (a free one by default) in its own session, so a kill of
    its process group takes its workers too. Its output goes through a pipe into ``log_path``:
    a pipe is not subject to the file-size limit a test may set on the process."""

    def __init__(
        self,
        tmp_path: Path,
        extra_env: dict[str, str] | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cwd = tmp_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.env.update(
            {
                "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
                "GATEWAY_DATA_DIR": str(tmp_path / "data"),
                "GATEWAY_STORAGE_URL": f"sqlite:///{tmp_path}/data/gateway.db",
                "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            }
        )
        self.env.update(extra_env or {})
        self.args = list(args)
        self.log_path = tmp_path / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None

    def start(self) -> None:
        assert self.process is None, "already running"
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(self.port), *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.process = process
        self._drain = threading.Thread(target=self._copy_output, args=(process,), daemon=True)
        self._drain.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._drain.join(5)
                raise RuntimeError(f"gateway exited at start:\n{self.log_text()}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"gateway did not start:\n{self.log_text()}")

    def _copy_output(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        with self.log_path.open("ab") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server's process group (the server and its workers)."""
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    def wait(self, timeout: float = START_TIMEOUT_S) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout)
        if self._drain is not None:
            self._drain.join(5)
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.signal(signal.SIGKILL)
            self.wait()

    def stop(self) -> int:
        """SIGTERM, and the exit status once it is gone."""
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def create_key(self, partner: str = "kochava") -> str:
        done = self.cli("keys", "create", partner)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text``; KeyError when it is absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(f"no sample {name} {labels} in the scrape")
