"""``gateway serve | keys | status``: every command reads the same config and environment as the
server (``GATEWAY_CONFIG``, ``GATEWAY_STORAGE_URL``, ``GATEWAY_REDIS_URL``, …)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    admin_token,
    config_path,
    load_config,
)
from gateway.errors import GatewayError, StatusUnavailable
from gateway.keys import create_key, key_secret, mask
from gateway.plugins import PluginError, load_partners, not_allowed_external
from gateway.replay import add_commands, export_command, replay_command
from gateway.retention import add_command as add_purge_command
from gateway.retention import purge_command
from gateway.scaffold import ScaffoldError, enable_in_config, render_partner
from gateway.status import COUNTERS, open_status
from gateway.storage import Storage, open_storage

T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--config", type=Path, help="config file (default: $GATEWAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")

    keys = sub.add_parser("keys", help="create, list and revoke partner API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; it is printed once, last")
    create.add_argument("partner")
    listing = keys_sub.add_parser("list", help="list keys (masked)")
    listing.add_argument("partner", nargs="?")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")

    sub.add_parser("status", help="connection status and counters per partner")
    sub.add_parser("plugins", help="loaded partners with their source and version")

    new = sub.add_parser("new-partner", help="render plugins/_template into a new partner")
    new.add_argument("name", help="partner name: the URL segment and config key")
    new.add_argument(
        "--external",
        type=Path,
        metavar="DIR",
        help="write DIR/gateway-NAME/, a distribution of its own, instead of plugins/NAME/",
    )
    new.add_argument("--enable", action="store_true", help="enable it in the config file")

    conformance = sub.add_parser("conformance", help="run the conformance kit on partners")
    conformance.add_argument("partners", nargs="*", help="partner names (default: all loaded)")

    add_commands(sub)  # replay, export
    add_purge_command(sub)  # purge (retention)

    args = parser.parse_args(argv)
    if args.config is not None:
        os.environ["GATEWAY_CONFIG"] = str(args.config)  # server workers read it too
    try:
        config = load_config()
        if args.command == "serve":
            return serve_command(config, args.host, args.port, args.workers)
        if args.command == "keys":
            return keys_command(config, args)
        if args.command == "plugins":
            return plugins_command(config)
        if args.command == "new-partner":
            return new_partner_command(args.name, args.external, args.enable)
        if args.command == "conformance":
            return conformance_command(args.partners)
        if args.command == "replay":
            return replay_command(config, args)
        if args.command == "export":
            return export_command(config, args)
        if args.command == "purge":
            return purge_command(config, args)
        return status_command(config)
    except (ConfigError, PluginError, ScaffoldError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:  # storage or status store unavailable
        print(f"gateway: {exc.reason}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gateway: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


#: The ASGI application ``serve`` runs (bench/ serves its bare endpoint through the same
#: settings by passing another factory).
APP = "gateway.app:create_app"


def serve_command(
    config: Config,
    host: str | None,
    port: int | None,
    workers: int | None,
    app: str = APP,
) -> int:
    import uvicorn

    from gateway.logs import LOG_CONFIG, setup_logging
    from gateway.metrics import prepare_multiprocess_dir

    # Fail here, once and readably, rather than with a traceback in every worker.
    load_partners()
    asyncio.run(_preflight(config))
    admin_token(config)  # create it once, before the workers race for it
    key_secret(config)  # the same
    workers = workers or config.server.workers
    prepare_multiprocess_dir(config.data_dir, workers)  # so /metrics adds up every worker
    setup_logging()
    host = host or config.server.host
    port = port if port is not None else config.server.port
    where = "GATEWAY_ADMIN_TOKEN" if config.admin_token else Path(config.data_dir) / "admin-token"
    print(
        f"gateway: starting on http://{host}:{port}  storage={_scheme(config.storage.url)}"
        f"  status={'redis' if config.status.redis_url else 'embedded'}  admin token: {where}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        factory=True,
        host=host,
        port=port,
        workers=workers or config.server.workers,
        access_log=False,
        log_config=LOG_CONFIG,
        server_header=False,
        timeout_graceful_shutdown=20,
        loop="uvloop",  # chosen by measurement (bench/RESULTS.md); uvicorn[standard] has it
        # httptools with header-size and slow-client limits (gateway/protocol.py); no
        # WebSocket upgrades (the gateway has no WebSocket route).
        http="gateway.protocol:GuardedHttpToolsProtocol",
        ws="none",
    )
    return 0


async def _preflight(config: Config) -> None:
    """Storage must open (its schema is made here); the status store is only bookkeeping, so
    an unreachable Redis is a warning: postbacks are still accepted and stored."""
    storage = open_storage(config.storage.url)
    await storage.open()
    await storage.close()
    status = open_status(config.status.redis_url, config.data_dir, config.status.key_prefix)
    await status.open()
    try:
        await status.ping()
    except StatusUnavailable as exc:
        print(f"gateway: warning: {exc.reason}; status will not be recorded", file=sys.stderr)
    finally:
        await status.close()


def _scheme(url: str) -> str:
    return url.split(":", 1)[0]


def _with_storage(config: Config, work: Callable[[Storage], Awaitable[T]]) -> T:
    async def run() -> T:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            return await work(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def keys_command(config: Config, args: argparse.Namespace) -> int:
    partners = load_partners()
    if args.keys_command == "create":
        if args.partner not in partners:
            known = ", ".join(sorted(partners)) or "none"
            print(f"gateway: unknown partner {args.partner!r} (known: {known})", file=sys.stderr)
            return 2
        secret = key_secret(config)
        record, key = _with_storage(config, lambda s: create_key(s, args.partner, secret))
        if not config.partner_enabled(args.partner):
            print(f"note: partner {args.partner!r} is disabled in config", file=sys.stderr)
        print(f"Created key {record.key_id} for {args.partner}.")
        print(f"Postback URL: /partners/{args.partner}/postback?api_key=<key>")
        print("The key is shown only this once; only its hash is stored:")
        print(key)
        return 0
    if args.keys_command == "list":
        if args.partner is not None and args.partner not in partners:
            print(f"gateway: unknown partner {args.partner!r}", file=sys.stderr)
            return 2
        records = _with_storage(config, lambda s: s.keys(args.partner))
        if records:
            print(f"{'partner':<12} {'key':<32} {'created, UTC':<17} {'last used, UTC':<17} state")
        for r in records:
            state = f"revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "active"
            created = f"{r.created_at:%Y-%m-%d %H:%M}"
            used = f"{r.last_used_at:%Y-%m-%d %H:%M}" if r.last_used_at else "never"
            print(f"{r.partner:<12} {mask(r.key_id, r.hint):<32} {created:<17} {used:<17} {state}")
        if not records:
            print("no keys")
        return 0
    revoked = _with_storage(config, lambda s: s.revoke_key(args.key_id, datetime.now(UTC)))
    if not revoked:
        print(f"gateway: no active key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"Revoked {args.key_id}.")
    return 0


def status_command(config: Config) -> int:
    partners = load_partners()

    async def run() -> int:
        store = open_status(config.status.redis_url, config.data_dir, config.status.key_prefix)
        await store.open()
        try:
            print(
                f"{'partner':<12} {'enabled':<8} {'connected':<10} {'last_success_at':<33} counters"
            )
            for name in sorted(partners):
                record = await store.get(name)
                last = _iso(record.last_success_at) if record.last_success_at else "-"
                counters = " ".join(f"{c}={getattr(record.counters, c)}" for c in COUNTERS)
                enabled = "yes" if config.partner_enabled(name) else "no"
                connected = "yes" if record.last_success_at else "no"
                print(f"{name:<12} {enabled:<8} {connected:<10} {last:<33} {counters}")
        finally:
            await store.close()
        return 0

    return asyncio.run(run())


def _iso(moment: datetime) -> str:
    """ISO-8601 in UTC with a Z, as the HTTP API writes it."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def plugins_command(config: Config) -> int:
    partners = load_partners()
    print(f"{'partner':<14} {'enabled':<8} {'methods':<10} {'source':<24} version")
    for name, loaded in sorted(partners.items()):
        enabled = "yes" if config.partner_enabled(name) else "no"
        methods = ",".join(loaded.spec.methods)
        print(f"{name:<14} {enabled:<8} {methods:<10} {loaded.source:<24} {loaded.version}")
    for name in not_allowed_external():
        print(f"{name:<14} installed, not loaded: add it to GATEWAY_PLUGINS to load it")
    return 0


def new_partner_command(name: str, external: Path | None, enable: bool) -> int:
    root = render_partner(name, external)
    print(f"Created partner {name!r} in {root}.")
    if external is None:
        module = name.replace("-", "_")
        print(
            f"Edit plugins/{module}/mapping.py and its samples; the README there walks through it."
        )
    else:
        print(f"Install it with `pip install -e {root}` and load it with GATEWAY_PLUGINS={name}.")
    if enable:
        path = config_path() or DEFAULT_CONFIG_PATH
        if enable_in_config(path, name):
            print(f"Enabled it in {path}.")
        else:
            print(f"{path} already has [partners.{name}]; left as it is.")
    else:
        print(f"Enable it with [partners.{name}] enabled = true in the config file.")
    print(f"Check it with `gateway conformance {name}`.")
    return 0


def conformance_command(names: Sequence[str]) -> int:
    from gateway.conformance import CHECKS, BrokenPromise

    partners = load_partners()
    unknown = [n for n in names if n not in partners]
    if unknown:
        print(f"gateway: unknown partner(s): {', '.join(unknown)}", file=sys.stderr)
        installed = set(not_allowed_external()) & set(unknown)
        if installed:
            print(f"  installed but not allowed: set GATEWAY_PLUGINS={','.join(sorted(installed))}",
                  file=sys.stderr)  # fmt: skip
        return 2
    failed = 0
    for name in names or sorted(partners):
        for promise, check in CHECKS.items():
            try:
                check(partners[name])
            except BrokenPromise as exc:
                failed += 1
                print(f"FAIL {name} {promise}: {exc}")
            else:
                print(f"ok   {name} {promise}")
    print(f"{failed} broken promise(s)" if failed else "all promises kept")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
