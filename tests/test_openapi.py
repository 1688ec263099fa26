"""The OpenAPI document at /schema/openapi.json describes the real contract (README "Endpoint
contract"); tests/test_schemathesis.py checks the running gateway against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from litestar.testing import TestClient

from gateway.plugins import load_partners

POSTBACK = "/partners/{partner}/postback"


@pytest.fixture
def document(client: TestClient[Any]) -> dict[str, Any]:
    answer = client.get("/schema/openapi.json")
    assert answer.status_code == 200
    data: dict[str, Any] = answer.json()
    return data


def resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in item:
        node: Any = document
        for part in item["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        item = node
    return item


def without_nulls(value: Any) -> Any:
    """Litestar writes no null into the document: an example's null fields are left out."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def test_the_document_lists_the_api_and_not_the_html_pages(
    client: TestClient[Any], document: dict[str, Any]
) -> None:
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        POSTBACK,
        "/partners",
        "/partners/{partner}/status",
        "/events",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert set(document["paths"][POSTBACK]) == {"get", "post"}
    assert set(document["paths"]["/healthz"]) == {"get", "head"}
    assert client.get("/schema").json() == document  # the JSON at the root too
    assert client.get("/schema/openapi.yaml").status_code == 200


@pytest.mark.parametrize("method", ["get", "post"])
def test_the_postback_operation(document: dict[str, Any], method: str) -> None:
    operation = document["paths"][POSTBACK][method]
    params = {
        (p["in"], p["name"]): p for p in (resolve(document, raw) for raw in operation["parameters"])
    }
    assert set(params) == {
        ("path", "partner"),
        ("query", "api_key"),
        ("header", "X-Api-Key"),
        ("query", "fields"),
    }
    assert params[("path", "partner")]["schema"]["enum"] == sorted(load_partners())
    free_form = params[("query", "fields")]
    assert free_form["style"] == "form" and free_form["explode"] is True
    assert free_form["schema"]["additionalProperties"] is True
    assert operation["security"] == [{"partnerKey": []}, {}]  # or the key in the body
    assert set(operation["responses"]) == {
        "200",
        "202",
        "400",
        "401",
        "403",
        "404",
        "405",
        "408",
        "413",
        "415",
        "422",
        "429",
        "431",
        "503",
    }
    for status, raw in operation["responses"].items():
        response = resolve(document, raw)
        schema = response["content"]["application/json"]["schema"]
        if status.startswith("4") or status.startswith("5"):
            assert schema["required"] == ["status", "error", "reason"], status
            assert schema["properties"]["status"] == {"type": "string", "enum": ["error"]}
        else:
            assert {"accepted", "duplicate", "ignored"} == set(
                schema["oneOf"][0]["properties"]["status"]["enum"]
            )
    for status in ("429", "503"):
        assert "Retry-After" in resolve(document, operation["responses"][status])["headers"]
    if method == "get":  # the example fields are the query string samples of a partner
        assert "requestBody" not in operation
        partner = params[("path", "partner")]["example"]
        samples = Path(load_partners()[partner].spec.samples)
        assert {name: example["value"] for name, example in free_form["examples"].items()} == {
            f"{partner}_{path.stem}": dict(parse_qsl(path.read_text().strip()))
            for path in samples.glob("*.query")
        }
        return
    body = resolve(document, operation["requestBody"])
    assert body["required"] is False
    assert set(body["content"]) == {"application/json", "application/x-www-form-urlencoded"}
    json_schema = body["content"]["application/json"]["schema"]["oneOf"]
    assert [s["type"] for s in json_schema] == ["object", "array"]
    # The examples are the samples of the partner the path parameter's example names.
    partner = params[("path", "partner")]["example"]
    samples = Path(load_partners()[partner].spec.samples)
    examples = body["content"]["application/json"]["examples"]
    assert {name: example["value"] for name, example in examples.items()} == {
        f"{partner}_{path.stem}": without_nulls(json.loads(path.read_bytes()))
        for path in samples.glob("*.json")
    }


def test_admin_operations_need_the_bearer_token(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["adminToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["adminToken"]["description"],
    }
    for path in ("/partners", "/partners/{partner}/status", "/events"):
        operation = document["paths"][path]["get"]
        assert operation["security"] == [{"adminToken": []}], path
        assert "401" in operation["responses"], path
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in document["paths"][path]["get"], path
    assert set(document["paths"]["/readyz"]["get"]["responses"]) >= {"200", "503"}
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
