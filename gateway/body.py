"""Reading a postback: its key, its query string and its body, into plain payload dicts.

Partners send JSON objects, JSON arrays (batches), form-encoded bodies, everything in the query
string, and JSON with a wrong or missing Content-Type. Whatever arrives, the result is a list of
``dict[str, Any]`` payloads, the query string merged under each, with the ``api_key`` field
removed. Percent-decoding happens here, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

import msgspec

from gateway.errors import BadRequest, GatewayError, Unauthorized

KEY_FIELD = "api_key"

_json = msgspec.json.Decoder()

#: Deepest nesting of objects and arrays a JSON body (or a JSON text field) may have. Partners
#: nest two or three levels; deeper is refused (400) before any plugin walks it, so that no
#: mapping can exhaust Python's recursion limit on hostile input.
MAX_JSON_DEPTH = 32
_WHITESPACE = b" \t\r\n"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error = "payload_too_large"


class RequestTimeout(GatewayError):
    """The body did not arrive in time (``[server] body_timeout_seconds``): a slow or stalled
    client. The connection is closed after the answer."""

    status_code = 408
    error = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class UnsupportedMediaType(GatewayError):
    status_code = 415
    error = "unsupported_media_type"


def parse_query(raw: bytes | str) -> dict[str, str]:
    """Decode a query string (or form body) once; the first of repeated fields wins."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        pairs = [
            (_unquote(name), _unquote(value))
            for name, _, value in (part.partition("=") for part in text.split("&") if part)
        ]
    except UnicodeDecodeError:
        raise BadRequest("query string or form body is not valid UTF-8") from None
    except ValueError as exc:  # too many fields, etc.
        raise BadRequest(f"unreadable query string or form body: {exc}") from None
    out: dict[str, str] = {}
    for name, value in pairs:
        if name == KEY_FIELD and out.get(name, "").strip() and value.strip() != out[name].strip():
            raise Unauthorized("several different api_key values sent: send one key")
        if name not in out or (name == KEY_FIELD and not out[name].strip()):
            out[name] = value
    return out


#: The request headers a postback reads.
HEADERS = (b"authorization", b"x-api-key", b"content-type", b"content-encoding")


def postback_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers a postback reads, from the ASGI scope's list (names are lower case there);
    the first of repeated ones wins."""
    out: dict[str, str] = {}
    for name, value in raw:
        if name in HEADERS:
            out.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return out


def _unquote(text: str) -> str:
    """A query string field as ``parse_qsl`` decodes it ("+" is a space, %XX UTF-8 bytes), with
    invalid UTF-8 refused; most fields need neither step."""
    if "+" in text:
        text = text.replace("+", " ")
    if "%" in text:
        text = unquote(text, encoding="utf-8", errors="strict")
    return text


def key_from_request(query: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer``, ``X-Api-Key`` or ``?api_key=``.

    A key sent in more than one of these must be the same key in each: two different keys are
    refused (as two different ``?api_key=`` values are), not one of them picked. A key that is
    present but blank is refused as such, not taken for a missing key.
    """
    sent: list[tuple[str, str]] = []
    parts = headers.get("authorization", "").split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        sent.append((parts[1].strip(), "the Authorization header"))
    if "x-api-key" in headers:
        where = "the X-Api-Key header"
        sent.append((_present(headers["x-api-key"], where), where))
    if KEY_FIELD in query:
        where = "the api_key parameter"
        sent.append((_present(query[KEY_FIELD], where), where))
    if not sent:
        return None
    key = sent[0][0]
    if len(sent) > 1 and any(other != key for other, _ in sent):
        places = " and ".join(where for _, where in sent)
        raise Unauthorized(f"different keys sent in {places}: send one key")
    return key


def same_key_in_body(key: str, items: list[dict[str, Any]]) -> None:
    """A key sent in a header or the query string may also be in the body's ``api_key`` field
    (it is removed before storing), but only the same key."""
    for item in items:
        if KEY_FIELD in item and _key_text(item[KEY_FIELD]) not in (None, key):
            raise Unauthorized(
                "different keys sent in the api_key field and a header or parameter: send one key"
            )


def _present(value: str, where: str) -> str:
    if not value.strip():
        raise Unauthorized(f"{where} is empty")
    return value.strip()


def check_encoding(headers: Mapping[str, str]) -> None:
    """Compressed bodies are refused with a clear reason instead of being read as garbage."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed"
        )


def parse_body(body: bytes, content_type: str, max_items: int) -> list[dict[str, Any]]:
    """The body as a list of objects (one for a single postback); empty body → ``[]``."""
    body = body.removeprefix(b"\xef\xbb\xbf")
    stripped = body.lstrip(_WHITESPACE)
    if not stripped:
        return []
    media = content_type.split(";", 1)[0].strip().lower()
    if media.startswith("multipart/"):
        raise UnsupportedMediaType(
            "multipart bodies are not accepted: send JSON or application/x-www-form-urlencoded"
        )
    # Sniff rather than trust the header: partners send JSON labelled as anything.
    if stripped[:1] in (b"{", b"["):
        return _parse_json(stripped, max_items)
    if media == "application/json" or media.endswith("+json"):
        raise BadRequest("malformed JSON: body must be a JSON object or an array of objects")
    if b"=" not in stripped:
        raise BadRequest("unreadable body: expected a JSON object or form-encoded fields")
    return [dict(parse_query(stripped.rstrip(_WHITESPACE)))]


def is_batch(body: bytes) -> bool:
    """Whether the body is a JSON array: a batch, answered per item even when it holds one."""
    return body.removeprefix(b"\xef\xbb\xbf").lstrip(_WHITESPACE)[:1] == b"["


def _parse_json(body: bytes, max_items: int) -> list[dict[str, Any]]:
    try:
        data = _json.decode(body)
    except msgspec.ValidationError as exc:  # valid JSON that Python cannot hold
        raise BadRequest(f"unreadable JSON: {exc} (a number too large?)") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    # Fewer brackets than the limit cannot nest deeper than it: most bodies skip the walk.
    brackets = body.count(b"{") + body.count(b"[")
    if brackets > MAX_JSON_DEPTH and nested_deeper_than(data, MAX_JSON_DEPTH):
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise BadRequest("JSON body must be an object or an array of objects")
    if not data:
        raise BadRequest("empty batch: the JSON array holds no postbacks")
    if len(data) > max_items:
        raise PayloadTooLarge(f"batch of {len(data)} postbacks exceeds the limit of {max_items}")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise BadRequest(f"batch item {index} is not a JSON object")
    return data


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels deep (a scalar is
    0 levels, ``{"a": 1}`` one); walked without recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def key_from_body(items: list[dict[str, Any]]) -> str | None:
    """The key carried in the body's ``api_key`` field: every item of a batch carries the same."""
    found = {_key_text(item.get(KEY_FIELD)) for item in items}
    if len(found) > 1:
        raise Unauthorized(
            "every item of a batch must carry the same api_key (or send the key in a header)"
        )
    return found.pop() if found else None


def _key_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Unauthorized("the api_key field must be a string")
    return _present(value, "the api_key field")


def merge(query: Mapping[str, str], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each payload: the query string's fields, then the body's, without the key."""
    base = {k: v for k, v in query.items() if k != KEY_FIELD}
    if not items:
        return [base]
    return [{**base, **{k: v for k, v in item.items() if k != KEY_FIELD}} for item in items]
