"""Config changes without a restart.

Each gateway process watches its config file (and re-reads it at once on SIGHUP). A file that
does not parse or validate is refused with a logged reason and the running config is kept.
Partners (enabled or not), restricted networks, the batch limit, the rate limit and retention
take effect at once; the settings that shape processes and connections (storage, Redis,
publishing, data folder, server, body size, admin token, key secret) are read at start only, and
a change to them is logged as needing a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import msgspec

from gateway.config import Config, ConfigError, load_config

log = logging.getLogger("gateway.config")

#: How often the config file is checked for changes, in seconds.
WATCH_INTERVAL = 1.0


def live_part(running: Config, new: Config) -> Config:
    """The running config with the settings that apply live taken from ``new``."""
    restart_only = {
        "storage.url": (running.storage.url, new.storage.url),
        "status": (running.status, new.status),
        "data_dir": (running.data_dir, new.data_dir),
        "server": (running.server, new.server),
        "limits.max_body_bytes": (running.limits.max_body_bytes, new.limits.max_body_bytes),
        "admin_token": (running.admin_token, new.admin_token),
        "key_secret": (running.key_secret, new.key_secret),
        "publish": (running.publish, new.publish),
    }
    for name, (old, changed) in restart_only.items():
        if old != changed:
            log.warning("config: %s changed; it takes effect after a restart", name)
    return msgspec.structs.replace(
        running,
        partners=new.partners,
        restricted_networks=new.restricted_networks,
        limits=msgspec.structs.replace(
            running.limits,
            max_batch_events=new.limits.max_batch_events,
            rate_per_key=new.limits.rate_per_key,
            rate_window_seconds=new.limits.rate_window_seconds,
        ),
        retention=new.retention,
    )


class ConfigWatcher:
    """Polls one config file; hands each valid new version to ``apply``."""

    def __init__(
        self, path: Path, apply: Callable[[Config], None], interval: float = WATCH_INTERVAL
    ) -> None:
        self.path = path
        self.apply = apply
        self.interval = interval
        self._seen = self._stamp()
        self._wake = asyncio.Event()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload_now(self) -> None:
        """Re-read the file at the next turn of the loop (SIGHUP, the partners page)."""
        self._seen = None
        self._wake.set()

    def check(self) -> bool:
        """Re-read the file if it changed; True when a new config was applied."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            log.error("config: %s; keeping the running config", exc)
            return False
        self.apply(new)
        log.info("config: reloaded %s", self.path)
        return True

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            self.check()
