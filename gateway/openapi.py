"""The gateway's OpenAPI document: served at ``/schema/openapi.json`` (and ``/schema``).

It describes the real contract (README "Endpoint contract"), written out here rather than
inferred, because the routes read raw bytes and answer with prepared JSON: the postback
operation (GET and POST, its key in the query string, a header or the body, free-form fields,
JSON object / array / form bodies, every status it answers with the JSON error shape), the admin
endpoints behind the admin token, and ``/healthz``, ``/readyz`` and ``/metrics``. The partners
page (``/ui``, ``/login``…) is HTML and left out.

Each route handler names its operation class (``operation_class=openapi.ListPartners`` …);
Litestar builds the operation and the class fills in what this module says. Shared pieces are
inline schemas or ``components.responses`` / ``components.parameters`` (Litestar rebuilds
``components.schemas`` from Python types, so nothing is put there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgspec
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, Operation, Server

from gateway.body import parse_query
from gateway.errors import GatewayError
from gateway.events import ID_FIELDS, TEXT_FIELDS, TIME_FIELDS
from gateway.plugins import LoadedPartner

#: Where the document is served: /schema/openapi.json (also /schema and /schema/openapi.yaml).
SCHEMA_PATH = "/schema"

_TEXT = {"type": "string"}
_COUNT = {"type": "integer", "minimum": 0}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error: a code, a reason a person can act on, and the field at fault.",
    "required": ["status", "error", "reason"],
    "properties": {
        "status": {"type": "string", "enum": ["error"]},
        "error": {
            "type": "string",
            "description": "bad_request, unauthorized, forbidden, not_found, "
            "method_not_allowed, request_timeout, payload_too_large, unsupported_media_type, "
            "invalid_payload, rate_limited, request_header_fields_too_large, "
            "storage_unavailable, status_unavailable, …",
        },
        "reason": _TEXT,
        "field": {"type": "string", "description": "the payload field at fault (422)"},
    },
    "additionalProperties": False,
}

RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "What became of one postback (or one batch item).",
    "required": ["status"],
    "properties": {
        "status": {"type": "string", "enum": ["accepted", "duplicate", "ignored"]},
        "event_id": {
            "type": "string",
            "description": "the stored event (the first one, for a duplicate)",
        },
        "kind": {"type": "string", "enum": ["install", "reinstall", "reengagement", "event"]},
        "reason": {"type": "string", "enum": ["organic", "restricted_network", "no_events"]},
    },
    "additionalProperties": False,
}

BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A JSON array body: counts, and one result per event.",
    "required": ["status", "accepted", "duplicate", "ignored", "results"],
    "properties": {
        "status": {"type": "string", "enum": ["accepted", "duplicate", "ignored"]},
        "accepted": _COUNT,
        "duplicate": _COUNT,
        "ignored": _COUNT,
        "results": {"type": "array", "items": RESULT_SCHEMA},
    },
    "additionalProperties": False,
}

PARTNER_STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["partner", "enabled", "connected", "last_success_at", "endpoint", "counters"],
    "properties": {
        "partner": _TEXT,
        "display_name": _TEXT,
        "enabled": {"type": "boolean"},
        "connected": {"type": "boolean", "description": "an attributed install was accepted"},
        "last_success_at": {"type": ["string", "null"], "format": "date-time"},
        "endpoint": _TEXT,
        "counters": {"type": "object", "additionalProperties": _COUNT},
    },
}

_NULLABLE_TEXT = {"type": ["string", "null"]}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A stored attribution event (DESIGN.md §4).",
    "required": ["event_id", "partner", "kind", "attributed", "dedupe_key", "raw"],
    "properties": {
        "event_id": _TEXT,
        "partner": _TEXT,
        "kind": RESULT_SCHEMA["properties"]["kind"],
        "event_name": _TEXT,
        "attributed": {"type": "boolean"},
        **{
            name: _NULLABLE_TEXT
            for name in (*TEXT_FIELDS, *ID_FIELDS, "platform", "currency", "country")
            if name != "event_name"
        },
        **{name: _NULLABLE_TIME for name in TIME_FIELDS},
        "revenue": {"type": ["number", "null"]},
        "dedupe_key": _TEXT,
        "raw": {"type": "object", "description": "the payload as received, without its key"},
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": _json(ERROR_SCHEMA)}
    if headers:
        out["headers"] = headers
    return out


_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}},
}

#: ``components.responses``: the error answers every operation may give.
RESPONSES: dict[str, Any] = {
    "BadRequest": _error("The request cannot be read: malformed body, bad encoding or parameter."),
    "Unauthorized": _error("Missing, blank or wrong key (or admin token)."),
    "NotFound": _error("Unknown partner or path."),
    "MethodNotAllowed": _error("Method not used by this route or partner."),
    "RequestTimeout": _error("Headers or body not received in time (slow client)."),
    "TooLarge": _error("Body over limits.max_body_bytes, or batch over max_batch_events."),
    "HeadersTooLarge": _error("Request line and headers over server.max_header_bytes."),
    "Unavailable": _error("Storage unavailable: retry later.", _RETRY_AFTER),
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


#: Answers any route may give before or around its handler (the protocol's limits, Litestar's
#: routing).
_COMMON = {
    "400": _ref("BadRequest"),
    "405": _ref("MethodNotAllowed"),
    "408": _ref("RequestTimeout"),
    "431": _ref("HeadersTooLarge"),
}

_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


@dataclass
class _Described(Operation):
    """An operation whose parameters, body, answers and security come from this module."""

    def __post_init__(self) -> None:
        spec = self.describe()
        self.operation_id = spec.get("operationId", self.operation_id)
        self.summary = spec.get("summary", self.summary)
        self.description = spec.get("description")
        self.tags = spec.get("tags")
        self.parameters = cast(Any, spec.get("parameters"))
        self.request_body = cast(Any, spec.get("requestBody"))
        self.responses = cast(Any, {**_COMMON, **spec["responses"]})
        self.security = spec.get("security")

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


_POSTBACK_ANSWER = _json({"oneOf": [RESULT_SCHEMA, BATCH_SCHEMA]})


@dataclass
class Postback(_Described):
    def describe(self) -> dict[str, Any]:
        post = self.operation_id == "postbackPost"
        method = "Post" if post else "Get"
        out: dict[str, Any] = {
            "summary": f"Receive a postback ({'POST' if post else 'GET'})",
            "description": "The partner's postback: key checked, payload mapped, organic and "
            "restricted networks ignored, the event stored exactly once. 2xx only once the event "
            "is durable or deliberately ignored; 4xx will never be accepted as sent; 5xx is "
            "transient (retry).",
            "tags": ["postback"],
            "parameters": [
                {"$ref": f"#/components/parameters/partner{method}"},
                {
                    "name": "api_key",
                    "in": "query",
                    "required": False,
                    "description": "the partner's key (or Authorization: Bearer, X-Api-Key, or "
                    "an api_key body field; sent in several, the same key in each)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "X-Api-Key",
                    "in": "header",
                    "required": False,
                    "description": "the partner's key",
                    "schema": {"type": "string"},
                },
                {"$ref": f"#/components/parameters/fields{method}"},
            ],
            "security": [{"partnerKey": []}, {}],
            "responses": {
                "200": {
                    "description": "Duplicate of a stored event, or ignored (organic, "
                    "restricted network, no events); a batch with nothing new.",
                    "content": _POSTBACK_ANSWER,
                },
                "202": {
                    "description": "Stored (a batch: at least one event stored).",
                    "content": _POSTBACK_ANSWER,
                },
                "401": _ref("Unauthorized"),
                "403": _error("The partner is disabled in config."),
                "404": _ref("NotFound"),
                "413": _ref("TooLarge"),
                "415": _error("Compressed (Content-Encoding) or multipart body."),
                "422": _error("The payload cannot be mapped: `field` names what to fix."),
                "429": _error("The key's rate limit is used up.", _RETRY_AFTER),
                "503": _ref("Unavailable"),
            },
        }
        if post:
            out["requestBody"] = {"$ref": "#/components/requestBodies/postback"}
        return out


@dataclass
class ListPartners(_Described):
    def describe(self) -> dict[str, Any]:
        return {
            "operationId": "listPartners",
            "summary": "Every partner with its status and counters",
            "tags": ["admin"],
            "security": _ADMIN,
            "responses": {
                "200": {
                    "description": "Partners in name order.",
                    "content": _json(
                        {
                            "type": "object",
                            "required": ["partners"],
                            "properties": {
                                "partners": {"type": "array", "items": PARTNER_STATUS_SCHEMA}
                            },
                        }
                    ),
                },
                "401": _ref("Unauthorized"),
            },
        }


@dataclass
class PartnerStatus(_Described):
    def describe(self) -> dict[str, Any]:
        return {
            "operationId": "partnerStatus",
            "summary": "One partner's status and counters",
            "tags": ["admin"],
            "security": _ADMIN,
            "parameters": [{"$ref": "#/components/parameters/partner"}],
            "responses": {
                "200": {"description": "The partner.", "content": _json(PARTNER_STATUS_SCHEMA)},
                "401": _ref("Unauthorized"),
                "404": _ref("NotFound"),
            },
        }


@dataclass
class ListEvents(_Described):
    def describe(self) -> dict[str, Any]:
        return {
            "operationId": "listEvents",
            "summary": "Stored events, newest first",
            "tags": ["admin"],
            "security": _ADMIN,
            "parameters": [
                {"$ref": "#/components/parameters/partnerFilter"},
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "description": "how many, newest first (empty: the default, 50)",
                    "schema": {
                        "anyOf": [
                            {"type": "integer", "minimum": 1, "maximum": 1000},
                            {"type": "string", "enum": [""]},
                        ],
                        "default": 50,
                    },
                },
            ],
            "responses": {
                "200": {
                    "description": "The events.",
                    "content": _json(
                        {
                            "type": "object",
                            "required": ["events"],
                            "properties": {"events": {"type": "array", "items": EVENT_SCHEMA}},
                        }
                    ),
                },
                "401": _ref("Unauthorized"),
                "404": _ref("NotFound"),
            },
        }


@dataclass
class Healthz(_Described):
    def describe(self) -> dict[str, Any]:
        ok = {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["ok"]}},
            "additionalProperties": False,
        }
        return {
            "operationId": "healthz",
            "summary": "Liveness",
            "tags": ["health"],
            "responses": {
                "200": {"description": "The process serves requests.", "content": _json(ok)}
            },
        }


@dataclass
class HealthzHead(_Described):
    def describe(self) -> dict[str, Any]:
        return {
            "operationId": "healthzHead",
            "summary": "Liveness, for load balancers",
            "tags": ["health"],
            "responses": {"200": {"description": "The process serves requests."}},
        }


@dataclass
class Readyz(_Described):
    def describe(self) -> dict[str, Any]:
        ready = {
            "type": "object",
            "required": ["status", "storage", "status_store"],
            "properties": {
                "status": {"type": "string", "enum": ["ready", "not_ready"]},
                "storage": {"type": "string", "enum": ["ok", "unavailable"]},
                "status_store": {"type": "string", "enum": ["ok", "unavailable"]},
            },
        }
        return {
            "operationId": "readyz",
            "summary": "Readiness: storage and the status store answer",
            "tags": ["health"],
            "responses": {
                "200": {"description": "Both answer.", "content": _json(ready)},
                "503": {
                    "description": "One does not (marked unavailable).",
                    "content": _json(ready),
                },
            },
        }


@dataclass
class Metrics(_Described):
    def describe(self) -> dict[str, Any]:
        return {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "tags": ["health"],
            "responses": {
                "200": {
                    "description": "Prometheus text format 0.0.4.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }


def postback_operation_id(handler: Any, method: Any, path: Any) -> str:
    """``postbackGet`` / ``postbackPost``: one handler serves both methods."""
    return "postback" + str(getattr(method, "value", method)).title()


def _samples(partner: LoadedPartner, suffix: str) -> dict[str, Any]:
    """The partner's samples ending in ``suffix`` as OpenAPI examples: JSON bodies as sent,
    query strings as their fields."""
    folder = Path(partner.spec.samples) if partner.spec.samples else None
    if folder is None or not folder.is_dir():
        return {}
    out: dict[str, Any] = {}
    for path in sorted(folder.glob(f"*{suffix}")):
        try:
            raw = path.read_bytes()
            value = msgspec.json.decode(raw) if suffix == ".json" else parse_query(raw.strip())
        except (OSError, msgspec.DecodeError, GatewayError):
            continue
        out[f"{partner.spec.name}_{path.stem}"] = {
            "summary": f"{partner.spec.display_name or partner.spec.name}: {path.stem}",
            "value": value,
        }
    return out


def _postback_parts(partners: Mapping[str, LoadedPartner]) -> dict[str, dict[str, Any]]:
    """The postback's partner parameter, free-form fields and body, per method, with the first
    partner (by name) that has samples for it as the example: JSON samples for POST, query
    string samples for GET."""
    names = sorted(partners)
    body: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    examples = {"Post": names[0] if names else None, "Get": names[0] if names else None}
    for name in names:
        if not body and (found := _samples(partners[name], ".json")):
            body, examples["Post"] = found, name
        if not fields and (found := _samples(partners[name], ".query")):
            fields, examples["Get"] = found, name
    parameters: dict[str, Any] = {}
    for method, example in examples.items():
        parameters[f"partner{method}"] = {
            "name": "partner",
            "in": "path",
            "required": True,
            "description": "the partner's name; any other is 404",
            "schema": {"type": "string", "enum": names},
            "example": example,
        }
        parameters[f"fields{method}"] = {
            "name": "fields",
            "in": "query",
            "required": False,
            "description": "the postback's fields, any names and values (every value is text "
            "on the wire; a repeated name: the first wins; the body's fields win over them)",
            "style": "form",
            "explode": True,
            "schema": {"type": "object", "additionalProperties": True},
            **({"examples": fields} if method == "Get" and fields else {}),
        }
    json_body: dict[str, Any] = {
        "schema": {
            "oneOf": [
                {"type": "object", "additionalProperties": True},
                {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "additionalProperties": True},
                },
            ]
        }
    }
    if body:
        json_body["examples"] = body
    request_body = {
        "required": False,
        "description": "One postback as a JSON object, a batch as a JSON array of objects (at "
        "most limits.max_batch_events), or form fields; JSON is recognised whatever the "
        "Content-Type. At most limits.max_body_bytes (64 KiB). An api_key field is taken as the "
        "key and not stored.",
        "content": {
            "application/json": json_body,
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "additionalProperties": {"type": "string"}}
            },
        },
    }
    return {"parameters": parameters, "requestBodies": {"postback": request_body}}


def openapi_config(partners: Mapping[str, LoadedPartner]) -> OpenAPIConfig:
    """The OpenAPI config for an app serving ``partners``: their names are the path parameter's
    values, their samples the postback's examples."""
    names = sorted(partners)
    postback = _postback_parts(partners)
    components = Components(
        responses=cast(Any, RESPONSES),
        request_bodies=cast(Any, postback["requestBodies"]),
        parameters=cast(
            Any,
            {
                **postback["parameters"],
                "partner": {
                    "name": "partner",
                    "in": "path",
                    "required": True,
                    "description": "the partner's name; any other is 404",
                    "schema": {"type": "string", "enum": names},
                },
                "partnerFilter": {
                    "name": "partner",
                    "in": "query",
                    "required": False,
                    "description": "only this partner's events (empty: every partner's); any "
                    "other name is 404",
                    "schema": {"type": "string", "enum": [*names, ""]},
                },
            },
        ),
        security_schemes=cast(
            Any,
            {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the admin token: GATEWAY_ADMIN_TOKEN or data/admin-token",
                },
                "partnerKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "one of the partner's active keys (`gateway keys create`)",
                },
            },
        ),
    )
    return OpenAPIConfig(
        title="Attribution gateway",
        version="1",
        description="Receives attribution postbacks from mobile measurement partners.",
        path=SCHEMA_PATH,
        render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"]), YamlRenderPlugin()],
        components=components,
        servers=[Server(url="/")],
    )
