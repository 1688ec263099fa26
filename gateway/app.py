"""The HTTP application: ``create_app()`` wires routes, exception handlers and the lifespan that
opens and closes storage and the status store."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get, head, route
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath

from gateway import openapi
from gateway.body import PayloadTooLarge, RequestTimeout, check_encoding, postback_headers
from gateway.config import Config, admin_token, config_path, load_config
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    NotFound,
    StatusUnavailable,
    StorageUnavailable,
    Unauthorized,
)
from gateway.events import event_encoder
from gateway.logs import info_line
from gateway.metrics import CONTENT_TYPE, UNKNOWN_PARTNER, Metrics, result_of
from gateway.plugins import LoadedPartner, load_partners
from gateway.postback import Gateway
from gateway.publish.relay import publishing
from gateway.ratelimit import rate_limiting
from gateway.reload import ConfigWatcher
from gateway.retention import retention_job
from gateway.status import open_status
from gateway.status.buffer import BufferedStatus
from gateway.storage import open_storage
from gateway.ui import ui_router

log = logging.getLogger("gateway.http")

MAX_EVENTS_LIMIT = 1000

TRANSIENT = {
    "plugin_failure": "the partner plugin failed on this payload; it is logged, retry later",
    "storage_unavailable": "storage unavailable; retry later",
    "status_unavailable": "status store (redis) unavailable; retry later",
}


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(
        content=event_encoder.encode(body),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def gateway_of(request: ASGIConnection[Any, Any, Any, Any]) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


# -- the postback route -------------------------------------------------------------------------


async def postback(request: Request[Any, Any, Any], partner: FromPath[str]) -> Response[bytes]:
    started = time.perf_counter()
    gw = gateway_of(request)
    outcome, status_code = "error", 500
    try:
        loaded = _partner_for(gw, partner, request.method)
        headers = postback_headers(request.scope["headers"])

        async def read_body() -> bytes:
            check_encoding(headers)
            timeout = gw.config.server.body_timeout_seconds
            try:  # a body trickled slowly is cut off (gateway/protocol.py does so for all routes)
                async with asyncio.timeout(timeout):  # no task per request, as wait_for makes
                    return await request.body()
            except TimeoutError:
                raise RequestTimeout(f"request body not received within {timeout:g} s") from None
            except RequestEntityTooLarge:
                limit = gw.config.limits.max_body_bytes
                raise PayloadTooLarge(f"body larger than {limit} bytes") from None
            except InternalServerException:  # the client went away mid-body
                raise BadRequest("client disconnected before sending the whole body") from None

        answer = await gw.postback(
            loaded, request.scope.get("query_string", b""), headers, read_body
        )
        outcome, status_code = answer.outcome, answer.status_code
        if outcome == "ignored":  # ignored_organic, ignored_restricted
            outcome = result_of(answer.body)
        return json_response(answer.body, answer.status_code)
    except GatewayError as exc:
        outcome, status_code = exc.error, exc.status_code
        raise
    finally:
        elapsed = time.perf_counter() - started
        label = partner if partner in gw.partners else UNKNOWN_PARTNER  # bounded label values
        gw.metrics.observe_postback(label, outcome, elapsed)
        info_line(
            log,
            "postback",
            {
                "partner": label,
                "method": request.method,
                "status": status_code,
                "outcome": outcome,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )


def _partner_for(gw: Gateway, name: str, method: str) -> LoadedPartner:
    loaded = gw.partners.get(name)
    if loaded is None:
        raise NotFound(f"unknown partner {name!r}")
    if not gw.config.partner_enabled(name):
        raise Forbidden(f"partner {name!r} is disabled in config")
    if method not in loaded.spec.methods:
        raise MethodNotAllowedForPartner(
            f"partner {name!r} sends postbacks with {', '.join(loaded.spec.methods)}"
        )
    return loaded


class MethodNotAllowedForPartner(GatewayError):
    status_code = 405
    error = "method_not_allowed"


# -- admin --------------------------------------------------------------------------------------


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    expected: str = connection.app.state.admin_token
    scheme, _sep, token = connection.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("admin endpoints need Authorization: Bearer <admin token>")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("invalid admin token")


async def partner_status(gw: Gateway, name: str) -> dict[str, Any]:
    record = await gw.status.get(name)
    return {
        "partner": name,
        "display_name": gw.partners[name].spec.display_name or name,
        "enabled": gw.config.partner_enabled(name),
        "connected": record.last_success_at is not None,
        "last_success_at": record.last_success_at,
        "endpoint": f"/partners/{name}/postback",
        "counters": record.counters,
    }


@get("/partners", guards=[admin_guard], operation_class=openapi.ListPartners)
async def list_partners(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw = gateway_of(request)
    partners = [await partner_status(gw, name) for name in sorted(gw.partners)]
    return json_response({"partners": partners})


@get(
    "/partners/{partner:str}/status",
    guards=[admin_guard],
    operation_class=openapi.PartnerStatus,
)
async def get_partner_status(
    request: Request[Any, Any, Any], partner: FromPath[str]
) -> Response[bytes]:
    gw = gateway_of(request)
    if partner not in gw.partners:
        raise NotFound(f"unknown partner {partner!r}")
    return json_response(await partner_status(gw, partner))


@get("/events", guards=[admin_guard], operation_class=openapi.ListEvents)
async def list_events(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw = gateway_of(request)
    partner = request.query_params.get("partner") or None
    raw_limit = request.query_params.get("limit") or "50"
    if partner is not None and partner not in gw.partners:
        raise NotFound(f"unknown partner {partner!r}")
    digits = raw_limit.isascii() and raw_limit.isdigit()  # "²".isdigit() is true as well
    if not digits or not 1 <= int(raw_limit) <= MAX_EVENTS_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_EVENTS_LIMIT}")
    events = await gw.storage.events(partner, int(raw_limit))
    return json_response({"events": events})


HEALTHY = event_encoder.encode({"status": "ok"})


@get("/healthz", operation_class=openapi.Healthz)
async def healthz() -> Response[bytes]:
    return Response(content=HEALTHY, status_code=200, media_type="application/json")


@head("/healthz", operation_class=openapi.HealthzHead)
async def healthz_head() -> Response[None]:
    """Load balancers probe with HEAD: the GET's headers, Content-Length included, no body."""
    return Response(
        content=None,
        status_code=200,
        media_type="application/json",
        headers={"content-length": str(len(HEALTHY))},
    )


# -- readiness and metrics ----------------------------------------------------------------------

#: Longest /readyz waits for each store before calling it unavailable.
READY_TIMEOUT_S = 2.0


async def _reachable(what: str, ping: Callable[[], Awaitable[None]]) -> bool:
    """Whether ``ping`` succeeds in time; why not goes to the log, never to the answer."""
    try:
        await asyncio.wait_for(ping(), READY_TIMEOUT_S)
    except GatewayError as exc:
        log.warning("readyz: %s unavailable: %s", what, exc.reason)
        return False
    except TimeoutError:
        log.warning("readyz: %s did not answer within %ss", what, READY_TIMEOUT_S)
        return False
    except Exception:
        log.exception("readyz: %s check failed", what)
        return False
    return True


@get("/readyz", operation_class=openapi.Readyz)
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """200 when storage and the status store both answer, else 503 naming which does not."""
    gw = gateway_of(request)
    storage_ok, status_ok = await asyncio.gather(
        _reachable("storage", gw.storage.ping), _reachable("status store", gw.status.ping)
    )
    body = {
        "status": "ready" if storage_ok and status_ok else "not_ready",
        "storage": "ok" if storage_ok else "unavailable",
        "status_store": "ok" if status_ok else "unavailable",
    }
    return json_response(body, 200 if storage_ok and status_ok else 503)


@get("/metrics", operation_class=openapi.Metrics)
async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus text format; open like /healthz (keep it off the public listener)."""
    return Response(
        content=gateway_of(request).metrics.render(), status_code=200, media_type=CONTENT_TYPE
    )


# -- errors -------------------------------------------------------------------------------------


def on_gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    if isinstance(exc, StorageUnavailable):
        gateway_of(request).metrics.storage_errors.inc()
    elif isinstance(exc, StatusUnavailable):
        gateway_of(request).metrics.status_errors.inc()
    if exc.status_code >= 500:
        # Hosts, databases and index names stay in our log, not in the partner's answer.
        log.warning("%s: %s", exc.error, exc.reason)
        body = {"status": "error", "error": exc.error, "reason": TRANSIENT[exc.error]}
        return json_response(body, exc.status_code, {"Retry-After": "30"})
    return json_response(exc.body(), exc.status_code, exc.headers())  # 429: Retry-After


def on_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    error = {
        400: "bad_request",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
    }
    body = {
        "status": "error",
        "error": error.get(exc.status_code, "http_error"),
        "reason": str(exc.detail),
    }
    return json_response(body, exc.status_code, exc.headers)


def on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error("unexpected error", exc_info=exc)
    body = {"status": "error", "error": "internal", "reason": "internal error; retry later"}
    return json_response(body, 500)


@asynccontextmanager
async def watching(config_file: Path | None, gw: Gateway) -> AsyncIterator[None]:
    """Watch the config file while the app runs; SIGHUP re-reads it at once."""
    if config_file is None:
        yield
        return
    watcher = ConfigWatcher(config_file, gw.apply_config)
    gw.config_watcher = watcher
    task = asyncio.create_task(watcher.run(), name="config-watcher")
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, watcher.reload_now)
        hup = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
        hup = False
    try:
        yield
    finally:
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the factory --------------------------------------------------------------------------------


def create_app(
    config: Config | None = None,
    partners: dict[str, LoadedPartner] | None = None,
    config_file: Path | None = None,
) -> Litestar:
    """The gateway as an ASGI app. With no arguments, config and plugins come from the
    environment (``GATEWAY_CONFIG`` and friends, ``GATEWAY_PLUGINS``) and the config file is
    watched for changes; a config given as an argument is watched only if ``config_file`` is."""
    if config is None:
        config_file = config_path()
        config = load_config(config_file)
    partners = partners if partners is not None else load_partners()
    metrics = Metrics()  # per app: apps in one process (tests) never share counts
    for name in config.partners:
        if name not in partners:
            logging.getLogger("gateway").warning(
                "config names partner %r but no plugin provides it", name
            )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        storage = open_storage(config.storage.url)
        status = BufferedStatus(  # keeps what Redis could not take, writes it when it can
            open_status(config.status.redis_url, config.data_dir, config.status.key_prefix),
            metrics,
        )
        await storage.open()
        try:
            await status.open()
            try:
                gw = Gateway(config, partners, storage, status, metrics)
                app.state.gateway = gw
                app.state.admin_token = admin_token(config)
                _ = gw.key_secret  # read (or made) now: a problem shows at start
                async with (
                    watching(config_file, gw),
                    rate_limiting(gw),
                    retention_job(gw),
                    publishing(config, metrics),  # the outbox is installed before serving
                ):
                    yield
            finally:
                await status.close()
        finally:
            await storage.close()

    postback_route = route(
        "/partners/{partner:str}/postback",
        http_method=["GET", "POST"],
        status_code=200,
        request_max_body_size=config.limits.max_body_bytes,
        operation_class=openapi.Postback,
        operation_id=openapi.postback_operation_id,
    )(postback)

    return Litestar(
        route_handlers=[
            postback_route,
            list_partners,
            get_partner_status,
            list_events,
            healthz,
            healthz_head,
            readyz,
            metrics_endpoint,
            ui_router(),  # the partners page: /login, /logout, /ui…
        ],
        lifespan=[lifespan],
        exception_handlers={
            GatewayError: on_gateway_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
        logging_config=None,
        openapi_config=openapi.openapi_config(partners),  # /schema/openapi.json
    )
