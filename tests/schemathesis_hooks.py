"""Schemathesis hooks for tests/test_schemathesis.py (loaded with SCHEMATHESIS_HOOKS): each
request carries the credentials its operation needs, so generated cases reach the code behind
the key check: a postback the key of the partner in its path (Authorization: Bearer, which the
gateway prefers over any api_key / X-Api-Key the case carries), an admin request the admin
token. Open endpoints get nothing. Keys and token come from the environment the test sets."""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis

PARTNER_KEYS: dict[str, str] = json.loads(os.environ.get("GATEWAY_TEST_PARTNER_KEYS", "{}"))
ADMIN_TOKEN = os.environ.get("GATEWAY_TEST_ADMIN_TOKEN", "")


@schemathesis.auth(refresh_interval=None, retry_on=[])
class GatewayCredentials:
    def get(self, case: Any, context: Any) -> bool:
        return True

    def set(self, case: Any, data: Any, context: Any) -> None:
        operation = context.operation
        if operation.path == "/partners/{partner}/postback":
            key = PARTNER_KEYS.get(str((case.path_parameters or {}).get("partner")))
            token = key
        elif "adminToken" in json.dumps(operation.definition.raw.get("security") or []):
            token = ADMIN_TOKEN
        else:
            token = None
        if token:
            case.headers = case.headers or {}
            case.headers["Authorization"] = f"Bearer {token}"
