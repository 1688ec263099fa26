"""Hypothesis profiles and strategies for the hostile-input tests (test_hostile_*.py).

Example counts: the default profile keeps the default suite quick and reproducible (derandomized:
the same examples every run); ``HYPOTHESIS_PROFILE=ci`` runs 10 times as many and
``HYPOTHESIS_PROFILE=deep`` 100 times as many, both with fresh random examples each run:

    HYPOTHESIS_PROFILE=deep .venv/bin/pytest tests/test_hostile_*.py tests/test_schemathesis.py

Each test states its examples as a multiple of the profile's ``max_examples`` (``examples(n)``), so
the ratio between tests stays the same whatever the profile.
"""

from __future__ import annotations

import os
import string
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: The default profile's examples per unit; the others multiply it.
BASE_EXAMPLES = 50
SCALE = {"default": 1, "ci": 10, "deep": 100}

_COMMON = {
    "deadline": None,  # a shared 2-core CI machine: time is not the property
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile(
    "default", max_examples=BASE_EXAMPLES, derandomize=True, database=None, **_COMMON
)
settings.register_profile("ci", max_examples=BASE_EXAMPLES * SCALE["ci"], **_COMMON)
settings.register_profile("deep", max_examples=BASE_EXAMPLES * SCALE["deep"], **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)


def examples(fraction: float) -> settings:
    """Settings for a test running ``fraction`` of the profile's examples (at least 10)."""
    return settings(max_examples=max(10, int(settings().max_examples * fraction)))


def scale() -> int:
    """How many times the default profile's examples the active profile runs."""
    return SCALE.get(PROFILE, 1)


# -- values ---------------------------------------------------------------------------------------

#: Any text UTF-8 can carry (no lone surrogates), NUL and control characters included.
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)

#: Text that looks like what partners send in ids and times, so mappings get past the first check.
plausible = st.sampled_from(
    [
        "",
        " ",
        "0",
        "1",
        "-1",
        "true",
        "FALSE",
        "yes",
        "null",
        "None",
        "{idfa}",
        "{{campaign}}",
        "[IDFA]",
        "%IDFA%",
        "00000000-0000-0000-0000-000000000000",
        "0000-0000",
        "2024-05-01 12:00:00",
        "2024-05-01T12:00:00+0530",
        "2024-05-01T12:00:00.123456-08:00",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+14:00",
        "1714564800",
        "1714564800000",
        "1714564800000000",
        "1e308",
        "-0",
        "NaN",
        "inf",
        "4.99",
        "1" * 40,
        "x" * 5000,
        "a\x00b",
        "\u200bFacebook",
        "Facebook Ads",
        "🎉 夏 café",
        "%FF",
        "{",
        "[]",
        '{"braze_id": {"nested": [1, 2]}}',
    ]
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # msgspec decodes integers of any size
    st.floats(allow_nan=False, allow_infinity=False),
    any_text,
    plausible,
)

#: Any value a JSON body can decode to (floats finite, as JSON has no NaN or infinity).
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)
    ),
    max_leaves=12,
)


def _nest(value: Any, depth: int, kind: str) -> Any:
    for _ in range(depth):
        value = {"a": value} if kind == "object" else [value]
    return value


#: A value nested up to a little past the reader's depth limit (gateway.body.MAX_JSON_DEPTH).
deep_values = st.builds(
    _nest,
    json_scalars,
    st.integers(1, 40),
    st.sampled_from(["object", "array"]),
)

json_objects = st.dictionaries(st.one_of(any_text, plausible), json_values, max_size=12)


def as_decoded(value: Any) -> Any:
    """``value`` as the gateway would hold it after decoding JSON (tuples become lists…)."""
    return msgspec.json.decode(msgspec.json.encode(value))


#: Header-safe text (what llhttp lets through in a header value: visible ASCII, space, tab and
#: bytes 0x80-0xFF read as latin-1).
header_text = st.text(
    st.sampled_from(string.ascii_letters + string.digits + string.punctuation + " \t\x80é\xff"),
    max_size=60,
)
