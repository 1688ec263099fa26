"""Property-based tests of the body reader (gateway/body.py): whatever bytes arrive, the reader
returns payload dicts or raises a gateway error (answered 4xx), never anything else; what it
reads is read faithfully; the key never reaches a stored payload."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote_from_bytes, urlencode

import msgspec
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway import body as reader
from gateway.errors import BadRequest, GatewayError, MappingError, Unauthorized
from gateway.normalise import json_object
from tests.hostile import any_text, as_decoded, examples, header_text, json_objects, json_values

KEY = reader.KEY_FIELD
MAX_ITEMS = 50

content_types = st.one_of(
    st.sampled_from(
        [
            "",
            "application/json",
            "application/json; charset=utf-8",
            "application/vnd.api+json",
            "application/x-www-form-urlencoded",
            "application/x-www-form-urlencoded; charset=UTF-8",
            "text/plain",
            "multipart/form-data; boundary=x",
            "APPLICATION/JSON",
            "application/octet-stream",
            ";;;",
        ]
    ),
    header_text,
)

#: Bytes a hostile client sends: anything, and near misses of JSON and form bodies.
hostile_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b: b"{" + b, st.binary(max_size=100)),
    st.builds(lambda b: b"[" + b, st.binary(max_size=100)),
    st.builds(lambda b: b"\xef\xbb\xbf" + b, st.binary(max_size=100)),
    st.builds(lambda n: b"[" * n, st.integers(1, 5000)),
    st.builds(lambda n: b'{"a":' * n + b"1" + b"}" * n, st.integers(1, 3000)),
    st.builds(lambda b: b"a=" + b + b"&b=\x00\xff", st.binary(max_size=60)),
    st.builds(
        lambda values: json.dumps(values).encode(), st.lists(json_values, min_size=0, max_size=5)
    ),
)


def only_gateway_errors(call: Any, *args: Any) -> Any:
    """The call's result, or None when it raised a gateway error (a 4xx answer)."""
    try:
        return call(*args)
    except GatewayError as exc:
        assert 400 <= exc.status_code < 500, exc
        assert exc.reason
        return None


# -- parse_query ----------------------------------------------------------------------------------


@given(raw=st.one_of(st.binary(max_size=300), any_text))
@examples(1)
def test_parse_query_reads_anything_or_refuses_it(raw: bytes | str) -> None:
    out = only_gateway_errors(reader.parse_query, raw)
    if out is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


# Field names other than the key: it has rules of its own (tested below).
field_names = any_text.filter(lambda name: name != KEY)


@given(fields=st.dictionaries(field_names, any_text, max_size=15))
@examples(1)
def test_a_query_string_or_form_body_encoded_decodes_the_same(fields: dict[str, str]) -> None:
    encoded = urlencode(fields)
    assert reader.parse_query(encoded) == fields
    assert reader.parse_query(encoded.encode()) == fields
    # And decoded once only: a value that looks percent-encoded stays as sent.
    assert reader.parse_query(urlencode({"v": "%41%2B+"})) == {"v": "%41%2B+"}


@given(fields=st.dictionaries(field_names, any_text, min_size=1, max_size=15))
@examples(1)
def test_a_decoded_form_body_re_encoded_decodes_the_same(fields: dict[str, str]) -> None:
    body = urlencode(fields).encode()
    for ctype in ("application/x-www-form-urlencoded", "", "text/plain"):
        items = reader.parse_body(body, ctype, MAX_ITEMS)
        assert items == [fields]
        again = urlencode(items[0]).encode()
        assert reader.parse_body(again, ctype, MAX_ITEMS) == items


@given(
    first=st.text(min_size=1, max_size=10).filter(str.strip),
    second=st.text(min_size=1, max_size=10).filter(str.strip),
)
@examples(0.3)
def test_repeated_keys_must_agree(first: str, second: str) -> None:
    query = urlencode([(KEY, first), ("a", "1"), (KEY, second)])
    if first.strip() == second.strip():
        assert reader.parse_query(query)[KEY] == first
    else:
        with pytest.raises(Unauthorized):
            reader.parse_query(query)


@given(raw=st.binary(min_size=1, max_size=40))
@examples(0.5)
def test_percent_encoded_bytes_decode_only_when_utf8(raw: bytes) -> None:
    query = "name=" + quote_from_bytes(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(BadRequest, match="UTF-8"):
            reader.parse_query(query)
    else:
        assert reader.parse_query(query) == {"name": text}


# -- parse_body -----------------------------------------------------------------------------------


@given(body=hostile_bytes, ctype=content_types)
@examples(3)
def test_parse_body_reads_anything_or_refuses_it(body: bytes, ctype: str) -> None:
    items = only_gateway_errors(reader.parse_body, body, ctype, MAX_ITEMS)
    if items is not None:
        assert isinstance(items, list)
        assert len(items) <= MAX_ITEMS
        assert all(isinstance(item, dict) for item in items)
        assert all(isinstance(key, str) for item in items for key in item)
        assert reader.is_batch(body) or len(items) <= 1


@given(
    obj=json_objects,
    ctype=content_types,
    bom=st.booleans(),
    pad=st.sampled_from(["", " ", "\r\n\t"]),
)
@examples(1)
def test_a_json_object_reads_as_sent_whatever_the_content_type(
    obj: dict[str, Any], ctype: str, bom: bool, pad: str
) -> None:
    assume(not ctype.strip().lower().startswith("multipart/"))
    body = ("\ufeff" * bom + pad + json.dumps(obj, ensure_ascii=False) + pad).encode()
    assert reader.parse_body(body, ctype, MAX_ITEMS) == [as_decoded(obj)]
    assert not reader.is_batch(body)


@given(items=st.lists(json_objects, min_size=1, max_size=MAX_ITEMS + 5))
@examples(0.2)
def test_a_json_array_is_a_batch_within_the_limit(items: list[dict[str, Any]]) -> None:
    body = msgspec.json.encode(items)
    assert reader.is_batch(body)
    if len(items) > MAX_ITEMS:
        with pytest.raises(reader.PayloadTooLarge):
            reader.parse_body(body, "application/json", MAX_ITEMS)
    else:
        assert reader.parse_body(body, "application/json", MAX_ITEMS) == as_decoded(items)


@given(depth=st.integers(1, 20_000), opener=st.sampled_from([b"[", b'{"a":', b'[{"a":[']))
@examples(0.3)
def test_deep_nesting_is_read_or_refused_never_a_crash(depth: int, opener: bytes) -> None:
    closer = {b"[": b"]", b'{"a":': b"}", b'[{"a":[': b"]}]"}[opener]
    for body in (opener * depth, opener * depth + b"1" + closer * depth):
        only_gateway_errors(reader.parse_body, body, "application/json", MAX_ITEMS)


@given(count=st.integers(1, 20_000), form=st.booleans())
@examples(0.2)
def test_huge_numbers_of_keys_are_read(count: int, form: bool) -> None:
    fields = {f"k{n}": str(n) for n in range(count)}
    body = urlencode(fields).encode() if form else json.dumps(fields).encode()
    [item] = reader.parse_body(body, "", MAX_ITEMS)
    assert item == fields


# -- the key -------------------------------------------------------------------------------------

key_values = st.one_of(any_text, st.sampled_from(["", "  ", "gwk_abc", " gwk_abc ", "\x00"]))
headers = st.fixed_dictionaries(
    {},
    optional={
        "authorization": st.one_of(
            header_text, st.builds(lambda k: "Bearer " + k, header_text), st.just("Bearer")
        ),
        "x-api-key": header_text,
    },
)


@given(query=st.dictionaries(st.one_of(st.just(KEY), any_text), key_values), headers=headers)
@examples(1)
def test_key_from_request_is_a_stripped_key_none_or_401(
    query: dict[str, str], headers: dict[str, str]
) -> None:
    bearer = headers.get("authorization", "").split(None, 1)
    bearer_sent = len(bearer) == 2 and bearer[0].lower() == "bearer"
    sent = bearer_sent or "x-api-key" in headers or KEY in query
    try:
        key = reader.key_from_request(query, headers)
    except Unauthorized:  # a key was sent, but blank
        assert sent
        return
    if key is None:
        assert not sent
    else:
        assert key == key.strip() and key
        assert (bearer_sent and key == bearer[1].strip()) or key in {
            headers.get("x-api-key", "").strip(),
            query.get(KEY, "").strip(),
        }


@given(
    items=st.lists(
        st.dictionaries(
            st.one_of(st.just(KEY), any_text), st.one_of(key_values, json_values), max_size=5
        ),
        max_size=5,
    )
)
@examples(1)
def test_key_from_body_is_one_stripped_string_or_401(items: list[dict[str, Any]]) -> None:
    key = only_gateway_errors(reader.key_from_body, items)
    if key is not None:
        assert isinstance(key, str)
        assert key == key.strip() and key
        assert all(
            isinstance(item.get(KEY), str) and item[KEY].strip() == key
            for item in items
            if item.get(KEY) is not None
        )


# -- merge ----------------------------------------------------------------------------------------


@given(
    query=st.dictionaries(st.one_of(st.just(KEY), any_text), any_text, max_size=8),
    items=st.lists(
        st.dictionaries(st.one_of(st.just(KEY), any_text), json_values, max_size=8), max_size=6
    ),
)
@examples(1)
def test_api_key_never_survives_merge_and_body_fields_win(
    query: dict[str, str], items: list[dict[str, Any]]
) -> None:
    merged = reader.merge(query, items)
    assert len(merged) == max(1, len(items))
    for n, payload in enumerate(merged):
        assert KEY not in payload
        body = items[n] if items else {}
        for name, value in query.items():
            if name != KEY:
                assert payload[name] == body.get(name, value)
        for name, value in body.items():
            if name != KEY:
                assert payload[name] == value
        assert set(payload) == (set(query) | set(body)) - {KEY}


def test_json_nested_past_the_limit_is_refused_before_any_plugin_sees_it() -> None:
    limit = reader.MAX_JSON_DEPTH
    at_limit = b'{"a":' * limit + b"1" + b"}" * limit
    assert reader.parse_body(at_limit, "application/json", MAX_ITEMS)
    past = b'{"a":' * (limit + 1) + b"1" + b"}" * (limit + 1)
    with pytest.raises(BadRequest, match=f"nested deeper than {limit} levels"):
        reader.parse_body(past, "application/json", MAX_ITEMS)
    # A batch counts its array as a level.
    batch = b"[" + b'{"a":' * limit + b"1" + b"}" * limit + b"]"
    with pytest.raises(BadRequest, match="nested deeper"):
        reader.parse_body(batch, "application/json", MAX_ITEMS)
    # The same inside a field holding JSON text (a GET postback's identity_link…).
    with pytest.raises(MappingError) as refused:
        json_object(past.decode(), "identity_link")
    assert refused.value.field == "identity_link"
    assert json_object(at_limit.decode(), "identity_link") == json.loads(at_limit)
