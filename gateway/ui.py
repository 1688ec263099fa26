"""The partners page: a server-rendered admin page, one card per partner.

Routes (all HTML; :func:`ui_router` wires them into the app):

``GET  /login``                                   the sign-in form
``POST /login``                                   admin token → session cookie, then to ``/ui``
``POST /logout``                                  clears the session cookie
``GET  /ui``                                      the partners page
``GET  /ui/cards``                                the cards alone, for the page's own refresh
``POST /ui/partners/{partner}/keys``              create a key; the answer shows it once
``POST /ui/partners/{partner}/keys/{key}/revoke`` revoke a key
``POST /ui/partners/{partner}/enabled``           enable or disable a partner (config file)
``GET  /ui/assets/page.css``, ``page.js``         the page's style and progressive enhancement

Sessions are stateless, so every worker accepts them: the cookie holds an expiry, a random nonce
and an HMAC of both keyed from the admin token (changing the token signs everyone out), never
the token. The CSRF token every form carries is an HMAC of the session cookie, checked on each
POST. Times are written in UTC (labelled); ``page.js`` shows them in the viewer's timezone and
refreshes the cards every few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from gateway.config import ConfigError
from gateway.errors import Conflict, GatewayError, StatusUnavailable
from gateway.keys import KEY_PREFIX, create_key
from gateway.postback import Gateway
from gateway.status import COUNTERS, StatusRecord
from gateway.storage import KeyRecord

log = logging.getLogger("gateway.ui")

#: ``__Host-``: the browser keeps it only if Secure, Path=/ and without Domain.
SESSION_COOKIE = "__Host-gateway_session"
SESSION_SECONDS = 12 * 60 * 60
#: How often the page refreshes its cards when it has JavaScript.
REFRESH_MS = 5000
#: Longest the page waits for the status store before showing the cards without status.
STATUS_TIMEOUT_S = 2.0
#: Forms are tiny; anything larger is refused before it is read.
MAX_FORM_BYTES = 16 * 1024

COUNTER_LABELS: dict[str, str] = {
    "accepted": "Accepted",
    "duplicate": "Duplicates",
    "ignored_organic": "Ignored: organic",
    "ignored_restricted": "Ignored: restricted network",
    "rejected": "Rejected (400/408/413/415/422)",
    "unauthorized": "Refused key (401)",
    "rate_limited": "Rate limited (429)",
}

_KEY_ID = re.compile(r"key_[0-9a-f]{1,64}")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


# -- session and CSRF ---------------------------------------------------------------------------


def _secret(admin_token: str) -> bytes:
    return hmac.new(admin_token.encode(), b"gateway partners page session v1", "sha256").digest()


def _mac(secret: bytes, message: str) -> str:
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Session:
    value: str  # the cookie
    expires_at: int  # epoch seconds
    csrf: str  # what every form of this session carries


def new_session(admin_token: str, now: float | None = None) -> str:
    """A session cookie value valid for :data:`SESSION_SECONDS` from ``now``."""
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    payload = f"{expires}.{secrets.token_urlsafe(12)}"
    return f"{payload}.{_mac(_secret(admin_token), 'session.' + payload)}"


def read_session(admin_token: str, value: str | None, now: float | None = None) -> Session | None:
    """The session a cookie value stands for; None unless it is genuine and not expired."""
    if not value or not value.isascii():
        return None
    parts = value.split(".")
    if len(parts) != 3 or not parts[0].isdigit():
        return None
    secret = _secret(admin_token)
    payload = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(parts[2].encode(), _mac(secret, "session." + payload).encode()):
        return None
    expires = int(parts[0])
    if expires <= (time.time() if now is None else now):
        return None
    return Session(value=value, expires_at=expires, csrf=_mac(secret, "csrf." + value))


def _session(request: Request[Any, Any, Any]) -> Session | None:
    return read_session(request.app.state.admin_token, request.cookies.get(SESSION_COOKIE))


def _session_cookie(value: str, max_age: int) -> Cookie:
    return Cookie(
        key=SESSION_COOKIE,
        value=value,
        max_age=max_age,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )


# -- rendering ----------------------------------------------------------------------------------

#: Next to this module (not looked up through the ``gateway`` package, which a checkout on
#: PYTHONPATH may shadow): the templates, style, script and icon of the page.
TEMPLATES = Path(__file__).resolve().parent / "templates" / "ui"

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,  # every {{ value }} is HTML-escaped, whatever the template's name
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return _utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc_text(moment: datetime) -> str:
    return f"{_utc(moment):%Y-%m-%d %H:%M:%S} UTC"


_env.filters["iso"] = _iso
_env.filters["utc"] = _utc_text


def _asset(name: str) -> bytes:
    return (TEMPLATES / name).read_bytes()


ASSETS: dict[str, tuple[bytes, str]] = {
    "page.css": (_asset("page.css"), "text/css"),
    "page.js": (_asset("page.js"), "text/javascript"),
    "favicon.svg": (_asset("favicon.svg"), "image/svg+xml"),
}
#: Changes with the assets' content, so browsers never run a stale page.js.
ASSET_VERSION = hashlib.sha256(b"".join(body for body, _ in ASSETS.values())).hexdigest()[:12]

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # pages hold a new key or a CSRF token: never cached
}


def _prefix(request: Request[Any, Any, Any]) -> str:
    """The path the gateway is mounted under ("" at the root)."""
    return urlsplit(str(request.base_url)).path.rstrip("/")


def _render(
    request: Request[Any, Any, Any],
    template: str,
    status_code: int,
    context: Mapping[str, Any],
    cookies: list[Cookie] | None = None,
) -> Response[bytes]:
    html = _env.get_template(template).render(
        prefix=_prefix(request), asset_version=ASSET_VERSION, **context
    )
    return Response(
        content=html.encode(),
        status_code=status_code,
        media_type="text/html",
        headers=SECURITY_HEADERS,
        cookies=cookies,
    )


def _redirect(
    request: Request[Any, Any, Any], path: str, cookies: list[Cookie] | None = None
) -> Response[bytes]:
    return Response(
        content=b"",
        status_code=303,
        media_type="text/plain",  # no body; not the JSON Litestar would otherwise label it
        headers={**SECURITY_HEADERS, "Location": _prefix(request) + path},
        cookies=cookies,
    )


def _message(
    request: Request[Any, Any, Any], status_code: int, title: str, text: str
) -> Response[bytes]:
    context = {"session": None, "title": title, "text": text}
    return _render(request, "message.html", status_code, context)


# -- what a card shows --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    masked: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class Card:
    name: str
    display_name: str
    enabled: bool
    endpoint: str
    docs_url: str
    status: StatusRecord | None  # None: the status store did not answer
    counters: list[tuple[str, int]]
    keys: list[KeyRow] = field(default_factory=list)  # active, newest first
    revoked: list[KeyRow] = field(default_factory=list)  # newest revocation first

    @property
    def connected(self) -> bool:
        return self.status is not None and self.status.last_success_at is not None


def _row(record: KeyRecord) -> KeyRow:
    return KeyRow(
        key_id=record.key_id,
        masked=f"{KEY_PREFIX}…{record.hint}",
        created_at=record.created_at,
        last_used_at=record.last_used_at,
        revoked_at=record.revoked_at,
    )


async def _statuses(gw: Gateway) -> dict[str, StatusRecord] | None:
    async def read() -> dict[str, StatusRecord]:
        return {name: await gw.status.get(name) for name in gw.partners}

    try:
        return await asyncio.wait_for(read(), STATUS_TIMEOUT_S)
    except (StatusUnavailable, TimeoutError) as exc:
        log.warning("partners page without status: %s", getattr(exc, "reason", "timeout"))
        return None


async def _cards(request: Request[Any, Any, Any], gw: Gateway) -> tuple[list[Card], bool]:
    """The cards in name order, and whether the status store answered."""
    base = str(request.base_url).rstrip("/")
    statuses = await _statuses(gw)
    records = await gw.storage.keys()
    cards = []
    for name in sorted(gw.partners):
        spec = gw.partners[name].spec
        status = statuses.get(name) if statuses is not None else None
        mine = [r for r in records if r.partner == name]
        active = sorted((r for r in mine if r.revoked_at is None), key=lambda r: r.created_at)
        revoked = sorted(
            (r for r in mine if r.revoked_at is not None),
            key=lambda r: _utc(r.revoked_at or r.created_at),
        )
        counters = status.counters if status is not None else None
        docs = spec.docs_url if spec.docs_url.startswith(("https://", "http://")) else ""
        cards.append(
            Card(
                name=name,
                display_name=spec.display_name or name,
                enabled=gw.config.partner_enabled(name),
                endpoint=f"{base}/partners/{name}/postback?api_key=<YOUR KEY>",
                docs_url=docs,
                status=status,
                counters=[
                    (COUNTER_LABELS.get(c, c), getattr(counters, c) if counters else 0)
                    for c in COUNTERS
                ],
                keys=[_row(r) for r in reversed(active)],
                revoked=[_row(r) for r in reversed(revoked)],
            )
        )
    return cards, statuses is not None


async def _page(
    request: Request[Any, Any, Any],
    session: Session,
    status_code: int = 200,
    **extra: Any,
) -> Response[bytes]:
    gw: Gateway = request.app.state.gateway
    cards, status_ok = await _cards(request, gw)
    context = {
        "session": session,
        "partners": cards,
        "status_ok": status_ok,
        "refresh_ms": REFRESH_MS,
        "notice": None,
        "error": None,
        "new_key": None,
        **extra,
    }
    return _render(request, "partners.html", status_code, context)


# -- routes -------------------------------------------------------------------------------------


def _plain_http_elsewhere(request: Request[Any, Any, Any]) -> bool:
    """Plain HTTP to a host other than this machine: browsers drop a Secure cookie there."""
    host = (request.url.hostname or "").strip("[]")
    return request.url.scheme == "http" and host not in _LOCAL_HOSTS


@get("/login", status_code=200)
async def login_form(request: Request[Any, Any, Any]) -> Response[bytes]:
    if _session(request) is not None:
        return _redirect(request, "/ui")
    context = {"session": None, "error": None, "insecure": _plain_http_elsewhere(request)}
    return _render(request, "login.html", 200, context)


@post("/login", status_code=200)
async def login(request: Request[Any, Any, Any]) -> Response[bytes]:
    form = await request.form()
    token = form.get("token")
    expected: str = request.app.state.admin_token
    if not isinstance(token, str) or not hmac.compare_digest(
        token.strip().encode("utf-8", "surrogatepass"), expected.encode()
    ):
        log.warning("partners page: sign-in refused (wrong admin token)")
        context = {
            "session": None,
            "error": "That is not the admin token.",
            "insecure": _plain_http_elsewhere(request),
        }
        return _render(request, "login.html", 401, context)
    log.info("partners page: signed in")
    cookie = _session_cookie(new_session(expected), SESSION_SECONDS)
    return _redirect(request, "/ui", cookies=[cookie])


@post("/logout", status_code=200)
async def logout(request: Request[Any, Any, Any]) -> Response[bytes]:
    session = _session(request)
    if session is not None:
        refused = await _check_csrf(request, session)
        if refused is not None:
            return refused
    # An expired cookie, and max-age 0 makes the browser forget it.
    return _redirect(request, "/login", cookies=[_session_cookie("", 0)])


@get("/ui", status_code=200)
async def partners_page(request: Request[Any, Any, Any]) -> Response[bytes]:
    session = _session(request)
    if session is None:
        return _redirect(request, "/login")
    return await _page(request, session, notice=_notice(request))


@get("/ui/cards", status_code=200)
async def partner_cards(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The cards alone; 401 (not a redirect) without a session, for the page's script."""
    session = _session(request)
    if session is None:
        return _message(request, 401, "Signed out", "Your session has ended: sign in again.")
    gw: Gateway = request.app.state.gateway
    cards, status_ok = await _cards(request, gw)
    context = {"session": session, "partners": cards, "status_ok": status_ok}
    return _render(request, "cards.html", 200, context)


def _notice(request: Request[Any, Any, Any]) -> str | None:
    """The line shown after a redirect from an action (a fixed text per action)."""
    gw: Gateway = request.app.state.gateway
    what = request.query_params.get("done")
    name = request.query_params.get("partner") or ""
    if name not in gw.partners:
        return None
    display = gw.partners[name].spec.display_name or name
    if what == "enabled":
        return f"{display} enabled: its postbacks are accepted (every worker within a second)."
    if what == "disabled":
        return f"{display} disabled: its postbacks are answered 403 (every worker within a second)."
    key_id = request.query_params.get("key") or ""
    if what == "revoked" and _KEY_ID.fullmatch(key_id):
        return f"Key {key_id} of {display} revoked: requests with it are refused with 401."
    return None


async def _check_csrf(request: Request[Any, Any, Any], session: Session) -> Response[bytes] | None:
    """None when the form carries this session's CSRF token, else the 403 page."""
    form = await request.form()
    sent = form.get("csrf")
    if isinstance(sent, str) and hmac.compare_digest(sent.encode(), session.csrf.encode()):
        return None
    return _message(
        request,
        403,
        "Form refused",
        "The form did not carry this session's security token (it may be from an older page "
        "or another site). Reload the page and try again.",
    )


async def _action(
    request: Request[Any, Any, Any], partner: str
) -> tuple[Session, Gateway] | Response[bytes]:
    """The session and gateway for a form post about ``partner``, or the answer that ends it."""
    session = _session(request)
    if session is None:
        return _redirect(request, "/login")
    refused = await _check_csrf(request, session)
    if refused is not None:
        return refused
    gw: Gateway = request.app.state.gateway
    if partner not in gw.partners:
        return _message(request, 404, "Unknown partner", f"There is no partner {partner!r}.")
    return session, gw


@post("/ui/partners/{partner:str}/keys", status_code=200)
async def create_partner_key(
    request: Request[Any, Any, Any], partner: FromPath[str]
) -> Response[bytes]:
    checked = await _action(request, partner)
    if isinstance(checked, Response):
        return checked
    session, gw = checked
    record, key = await create_key(gw.storage, partner, gw.key_secret)
    log.info(
        "key created from the partners page", extra={"partner": partner, "key_id": record.key_id}
    )
    spec = gw.partners[partner].spec
    base = str(request.base_url).rstrip("/")
    new_key = {
        "partner": partner,
        "display_name": spec.display_name or partner,
        "key_id": record.key_id,
        "key": key,
        "url": f"{base}/partners/{partner}/postback?{urlencode({'api_key': key})}",
    }
    return await _page(request, session, new_key=new_key)


@post("/ui/partners/{partner:str}/keys/{key_id:str}/revoke", status_code=200)
async def revoke_partner_key(
    request: Request[Any, Any, Any], partner: FromPath[str], key_id: FromPath[str]
) -> Response[bytes]:
    checked = await _action(request, partner)
    if isinstance(checked, Response):
        return checked
    session, gw = checked
    record = next((r for r in await gw.storage.keys(partner) if r.key_id == key_id), None)
    if record is None:
        return await _page(request, session, 404, error=f"{partner} has no key {key_id!r}.")
    if not await gw.storage.revoke_key(key_id, datetime.now(UTC)):
        return await _page(request, session, 409, error=f"Key {key_id} was already revoked.")
    log.info("key revoked from the partners page", extra={"partner": partner, "key_id": key_id})
    return _redirect(
        request, "/ui?" + urlencode({"done": "revoked", "partner": partner, "key": key_id})
    )


@post("/ui/partners/{partner:str}/enabled", status_code=200)
async def toggle_partner(
    request: Request[Any, Any, Any], partner: FromPath[str]
) -> Response[bytes]:
    checked = await _action(request, partner)
    if isinstance(checked, Response):
        return checked
    session, gw = checked
    wanted = (await request.form()).get("enabled")
    if wanted not in ("true", "false"):
        return await _page(request, session, 400, error="enabled must be true or false.")
    enabled = wanted == "true"
    try:
        gw.set_partner_enabled(partner, enabled)
    except Conflict as exc:
        return await _page(request, session, 409, error=f"Not changed: {exc.reason}.")
    except ConfigError as exc:
        return await _page(request, session, 409, error=f"Not changed: {exc}")
    except OSError as exc:
        log.warning("partners page could not write the config file: %s", exc)
        reason = f"{exc.strerror or exc}: {exc.filename or 'config file'}"
        return await _page(request, session, 500, error=f"Not changed: {reason}.")
    done = "enabled" if enabled else "disabled"
    log.info("partner %s from the partners page", done, extra={"partner": partner})
    return _redirect(request, "/ui?" + urlencode({"done": done, "partner": partner}))


@get("/ui/assets/{name:str}", status_code=200)
async def ui_asset(name: FromPath[str]) -> Response[bytes]:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no asset {name!r}")
    body, media_type = ASSETS[name]
    headers = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
    return Response(content=body, status_code=200, media_type=media_type, headers=headers)


# -- errors on these routes are pages, not the API's JSON ---------------------------------------


def _on_gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    if exc.status_code >= 500:
        log.warning("partners page: %s: %s", exc.error, exc.reason)
        text = "Storage or the status store is unavailable; try again in a moment."
        return _message(request, exc.status_code, "Unavailable", text)
    return _message(request, exc.status_code, "Refused", exc.reason)


def _on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    return _message(request, exc.status_code, "Refused", str(exc.detail))


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error("partners page: unexpected error", exc_info=exc)
    return _message(request, 500, "Error", "Something went wrong here; try again in a moment.")


def ui_router() -> Router:
    """The partners page's routes, with their own (HTML) error pages."""
    return Router(
        path="/",
        route_handlers=[
            login_form,
            login,
            logout,
            partners_page,
            partner_cards,
            create_partner_key,
            revoke_partner_key,
            toggle_partner,
            ui_asset,
        ],
        exception_handlers={
            GatewayError: _on_gateway_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected,
        },
        request_max_body_size=MAX_FORM_BYTES,
        include_in_schema=False,  # HTML pages: not part of the API's OpenAPI document
    )
