"""The whole HTTP app (create_app over real SQLite and the embedded status store, run by
Litestar's TestClient) fed hypothesis-generated requests straight through its ASGI callable, as
uvicorn would deliver them: any method, paths with any text, raw query strings (invalid UTF-8
included), any headers and content types, bodies of any bytes (invalid UTF-8, NUL bytes, deep
nesting, huge numbers of keys), the partners' samples with fields replaced, keys right, wrong,
blank, in every place. Never a 5xx, and always a JSON body with a ``status``."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.plugins import load_partners
from tests.fixtures import ADMIN_TOKEN, make_config, new_key
from tests.hostile import any_text, examples, header_text, json_objects, json_values
from tests.test_hostile_body import content_types, hostile_bytes
from tests.test_hostile_mappings import mutated_sample, sample_payloads

PARTNERS = load_partners()
NAMES = sorted(PARTNERS)


class Sent(msgspec.Struct):
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    chunks: list[bytes]


class Answer(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture(scope="module")
def app_and_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    config = make_config(Path(tmp_path_factory.mktemp("hostile-http")) / "data")
    keys = {name: new_key(config, name) for name in NAMES}
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        yield client, keys


def call(client: TestClient[Any], sent: Sent) -> Answer:
    """One request into the running app's ASGI callable; the body arrives in ``chunks``."""

    async def run() -> Answer:
        messages: list[dict[str, Any]] = []
        pending = list(sent.chunks) or [b""]

        async def receive() -> dict[str, Any]:
            if pending:
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": sent.method,
            "scheme": "http",
            "path": sent.path,
            "raw_path": quote(sent.path, safe="/%").encode("ascii"),
            "query_string": sent.query,
            "root_path": "",
            "headers": [(b"host", b"testserver"), *sent.headers],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {},
        }
        await client.app(scope, receive, send)  # type: ignore[arg-type]
        start = next(m for m in messages if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start["headers"]}
        return Answer(int(start["status"]), headers, body)

    return client.blocking_portal.call(run)


# -- what is sent ---------------------------------------------------------------------------------


def sometimes(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in ``one_in`` draws (hypothesis favours the ends of integer ranges)."""
    return draw(st.sampled_from(range(one_in))) == one_in // 2


methods = st.sampled_from(["POST", "GET", "POST"])
odd_methods = st.sampled_from(
    ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "PROPFIND", "get", "TRACE", "X" * 40]
)

known = st.sampled_from(NAMES)
unknown = st.one_of(any_text, st.sampled_from(["", "..", "%2e", "kochava/", "KOCHAVA"]))


@st.composite
def paths(draw: st.DrawFn) -> str:
    kind = "postback"
    if sometimes(draw, 4):
        kind = draw(st.sampled_from(["status", "admin", "health", "other"]))
    partner_names = unknown if sometimes(draw, 5) else known
    if kind == "postback":
        return f"/partners/{draw(partner_names)}/postback"
    if kind == "status":
        return f"/partners/{draw(partner_names)}/status"
    if kind == "admin":
        return draw(st.sampled_from(["/partners", "/events"]))
    if kind == "health":
        return draw(st.sampled_from(["/healthz", "/readyz"]))
    return "/" + draw(any_text)


@st.composite
def bodies(draw: st.DrawFn, partner: str | None) -> bytes:
    """Bytes of any kind, or (for a real partner) its samples mutated, as JSON, batch or form."""
    kind = draw(st.sampled_from(["sample", "sample", "batch", "form"]))
    if partner not in PARTNERS or sometimes(draw, 2):
        kind = draw(st.sampled_from(["hostile", "object", "nested", "keys"]))
    if kind == "hostile":
        return draw(hostile_bytes)
    if kind == "object":
        return msgspec.json.encode(draw(json_objects))
    if kind == "nested":
        depth = draw(st.integers(1, 5000))
        return b'{"a":' * depth + msgspec.json.encode(draw(json_values)) + b"}" * depth
    if kind == "keys":
        count = draw(st.integers(100, 5000))
        return json.dumps({f"k{n}": n for n in range(count)}).encode()
    assert partner is not None
    loaded = PARTNERS[partner]
    if kind == "sample":
        return msgspec.json.encode(draw(mutated_sample(loaded)))
    if kind == "batch":
        items = draw(st.lists(mutated_sample(loaded), min_size=1, max_size=4))
        return msgspec.json.encode(items)
    payload = draw(st.sampled_from(sample_payloads(loaded)))
    return urlencode({k: str(v) for k, v in payload.items()}).encode()


def chunked(draw: st.DrawFn, body: bytes) -> list[bytes]:
    if not body or not draw(st.booleans()):
        return [body]
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    edges = [0, *cuts, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


@st.composite
def requests(draw: st.DrawFn, keys: dict[str, str]) -> Sent:
    method = draw(odd_methods if sometimes(draw, 8) else methods)
    path = draw(paths())
    segment = path.split("/")[2] if path.startswith("/partners/") and path.count("/") >= 3 else None
    partner = segment if segment in PARTNERS else None
    key = keys.get(partner or "", "")
    if sometimes(draw, 3):  # another partner's, the admin token, blank, garbage
        others = [*keys.values(), "", " ", "gwk_wrong", ADMIN_TOKEN]
        key = draw(st.one_of(st.sampled_from(others), any_text))
    where = draw(st.sampled_from(["query", "header", "bearer", "body"]))
    if sometimes(draw, 6):
        where = draw(st.sampled_from(["none", "several"]))
    query_fields: list[tuple[str, str]] = []
    headers: list[tuple[bytes, bytes]] = []
    body = draw(bodies(partner))
    if where in ("query", "several"):
        query_fields.append(("api_key", key))
    if where in ("header", "several"):
        headers.append((b"x-api-key", key.encode("utf-8")))
    if where in ("bearer", "several") or path in ("/partners", "/events") or "/status" in path:
        token = draw(st.sampled_from([key, ADMIN_TOKEN]))
        headers.append((b"authorization", b"Bearer " + token.encode("utf-8")))
    if where == "body" and body[:1] == b"{":
        body = b'{"api_key": ' + json.dumps(key).encode() + b"," + body[1:]
    query_fields += draw(st.lists(st.tuples(any_text, any_text), max_size=5))
    query = urlencode(query_fields).encode()
    if sometimes(draw, 4):  # raw bytes, as an HTTP client would not send them
        query += b"&" + draw(st.binary(max_size=30))
    ctype = draw(content_types)
    if ctype:
        headers.append((b"content-type", ctype.encode("latin-1")))
    if sometimes(draw, 10):
        encoding = draw(st.sampled_from([b"gzip", b"identity", b"br", b"", b"\xff"]))
        headers.append((b"content-encoding", encoding))
    for name, value in draw(st.lists(st.tuples(header_text, header_text), max_size=6)):
        token = "".join(c for c in name.lower() if c.isalnum() or c == "-") or "x"
        headers.append((token.encode("latin-1"), value.encode("latin-1")))
    if sometimes(draw, 20):  # a flood of headers
        headers += [(f"x-h{n}".encode(), b"v") for n in range(draw(st.integers(100, 2000)))]
    return Sent(method, path, query, headers, chunked(draw, body))


# -- the property ---------------------------------------------------------------------------------


def check(sent: Sent, answer: Answer) -> None:
    assert answer.status < 500, (sent, answer)
    if answer.status == 204:  # OPTIONS
        assert answer.body == b"", (sent, answer)
        return
    if sent.method == "HEAD" and answer.status < 300:  # the server sends no body for HEAD
        return
    assert answer.headers.get("content-type", "").startswith("application/json"), (sent, answer)
    data = msgspec.json.decode(answer.body)
    assert isinstance(data, dict), (sent, answer)
    admin = sent.path in ("/partners", "/events") or sent.path.endswith("/status")
    if not (admin and answer.status == 200):  # admin answers are their documents
        assert isinstance(data.get("status"), str), (sent, answer)
    if answer.status >= 400:
        assert data["status"] == "error" and data["error"] and data["reason"], (sent, answer)


def test_no_request_is_answered_with_a_5xx_or_without_a_json_status(
    app_and_keys: tuple[TestClient[Any], dict[str, str]],
) -> None:
    client, keys = app_and_keys
    seen: Counter[int] = Counter()

    @given(sent=requests(keys))
    @examples(4)
    def run(sent: Sent) -> None:
        answer = call(client, sent)
        seen[answer.status] += 1
        check(sent, answer)

    run()
    print(dict(seen))
    # The generated requests reach every stage: refused at routing, at the key, at reading,
    # at mapping, and stored or ignored.
    assert {404, 401, 400, 422} <= set(seen), seen
    assert seen[202] + seen[200] > 0, seen


def test_the_app_still_serves_normally_afterwards(
    app_and_keys: tuple[TestClient[Any], dict[str, str]],
) -> None:
    client, keys = app_and_keys
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    kochava = json.dumps(sample_payloads(PARTNERS["kochava"])[0] | {"transaction_id": "after"})
    answer = client.post(
        "/partners/kochava/postback",
        content=kochava,
        headers={"X-Api-Key": keys["kochava"], "Content-Type": "application/json"},
    )
    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize("name", [n for n in NAMES if "POST" in PARTNERS[n].spec.methods])
def test_deeply_nested_json_is_400_for_every_partner_not_a_plugin_crash(
    app_and_keys: tuple[TestClient[Any], dict[str, str]], name: str
) -> None:
    """Found by the property above: Branch's mapping walked nested objects recursively and a
    payload 500 levels deep (well within 64 KiB) crashed it (a 500). The reader now refuses
    JSON nested past gateway.body.MAX_JSON_DEPTH for every partner."""
    client, keys = app_and_keys
    body = b'{"a":' * 500 + b"1" + b"}" * 500
    answer = client.post(
        f"/partners/{name}/postback",
        content=body,
        headers={"X-Api-Key": keys[name], "Content-Type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert "nested deeper than 32 levels" in answer.json()["reason"]
