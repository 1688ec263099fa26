"""Every plugin hook is documented in docs/plugins.md with its exact signature, and tested."""

from __future__ import annotations

import inspect
import re

import pytest

from gateway import hookspecs
from tests.fixtures import ROOT

DOCS = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")


def hook_names() -> list[str]:
    return sorted(
        name
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, hookspecs.PROJECT + "_spec")
    )


def signature(name: str) -> str:
    """The hook's signature as written in hookspecs.py (annotations are kept as source text)."""
    sig = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


def test_there_are_hooks() -> None:
    assert hook_names() == ["register_partners"]


@pytest.mark.parametrize("name", hook_names())
def test_hook_is_documented_with_its_signature(name: str) -> None:
    section = re.search(rf"^## {name}\n(.*?)(?=^## |\Z)", DOCS, re.MULTILINE | re.DOTALL)
    assert section, f"docs/plugins.md has no '## {name}' section"
    assert f"```python\n{signature(name)}\n```" in section.group(1), (
        f"docs/plugins.md does not show the signature {signature(name)}"
    )


@pytest.mark.parametrize("name", hook_names())
def test_hook_has_a_test(name: str) -> None:
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    assert f"def test_hook_{name}(" in tests, f"no test named test_hook_{name} in tests/"


def test_the_documentation_check_catches_an_undocumented_hook(monkeypatch) -> None:
    @hookspecs.hookspec
    def undocumented_hook(x: int) -> None:
        """A hook nobody wrote up."""

    monkeypatch.setattr(hookspecs, "undocumented_hook", undocumented_hook, raising=False)
    assert "undocumented_hook" in hook_names()
    with pytest.raises(AssertionError, match="no '## undocumented_hook' section"):
        test_hook_is_documented_with_its_signature("undocumented_hook")
    with pytest.raises(AssertionError, match="no test named test_hook_undocumented_hook"):
        test_hook_has_a_test("undocumented_hook")
