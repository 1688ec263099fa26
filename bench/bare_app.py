"""The fastest thing the gateway could be: the same route on the same framework, which only reads
the body, decodes it with a prepared msgspec decoder (or the query string, for partners that send
their fields there) and answers 202. No key check, no mapping, no storage, no status, no log.

Served by ``bench/run.py`` through ``gateway serve``'s own server settings, so the two differ
only in what the application does.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import msgspec
from litestar import Litestar, Request, Response, route
from litestar.params import FromPath

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


async def postback(request: Request[Any, Any, Any], partner: FromPath[str]) -> Response[bytes]:
    body = await request.body()
    if body:
        payload = _decode(body)
    else:
        payload = dict(parse_qsl(request.scope["query_string"].decode()))
    events = len(payload) if isinstance(payload, list) else 1
    answer: dict[str, Any] = {"status": "accepted", "partner": partner}
    if isinstance(payload, list):
        answer["accepted"] = events
    return Response(content=_encode(answer), status_code=202, media_type="application/json")


def create_app() -> Litestar:
    return Litestar(
        route_handlers=[
            route(
                "/partners/{partner:str}/postback",
                http_method=["GET", "POST"],
                status_code=202,
                request_max_body_size=64 * 1024,
            )(postback)
        ],
        logging_config=None,
        openapi_config=None,
    )
