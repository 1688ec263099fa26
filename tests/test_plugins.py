"""Plugin loading: built-ins register like any plugin; mistakes fail at start-up, named."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator

import pytest

from gateway import AttributionEvent, PartnerSpec, hookimpl
from gateway.plugins import PluginError, load_partners


def _module(name: str, **attrs: object) -> str:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return name


@pytest.fixture
def temp_modules() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


def _mapper(payload: object) -> AttributionEvent:
    return AttributionEvent(kind="install", attributed=True)


def _registering(*specs: PartnerSpec) -> Callable[..., None]:
    @hookimpl
    def register_partners(register: Callable[[PartnerSpec], None]) -> None:
        for spec in specs:
            register(spec)

    return register_partners


BUILT_IN = {"adjust", "appsflyer", "branch", "kochava", "singular", "tune"}


def test_builtin_partners_are_loaded_as_plugins() -> None:
    partners = load_partners(allow=())
    assert set(partners) >= BUILT_IN  # and any partner you added to plugins/
    assert {p.source for p in partners.values()} == {"built-in"}
    kochava = partners["kochava"]
    assert kochava.source == "built-in"
    assert kochava.spec.display_name == "Kochava"
    assert kochava.spec.methods == ("GET", "POST")


def test_misspelt_hook_fails_naming_the_plugin(temp_modules: list[str]) -> None:
    @hookimpl
    def register_partner(register: Callable[[PartnerSpec], None]) -> None:  # missing "s"
        raise AssertionError("never called")

    temp_modules.append(_module("acme_misspelt", register_partner=register_partner))
    with pytest.raises(PluginError, match=r"'acme_misspelt'.*register_partner"):
        load_partners(builtins=("plugins.kochava", "acme_misspelt"), allow=())


def test_two_plugins_with_the_same_partner_name_fail(temp_modules: list[str]) -> None:
    spec = PartnerSpec(name="kochava", map=_mapper)
    temp_modules.append(_module("acme_clash", register_partners=_registering(spec)))
    with pytest.raises(PluginError, match="registered twice"):
        load_partners(builtins=("plugins.kochava", "acme_clash"), allow=())


@pytest.mark.parametrize("name", ["", "Acme", "acme/x", "../x", "a" * 80])
def test_invalid_partner_names_fail(temp_modules: list[str], name: str) -> None:
    spec = PartnerSpec(name=name, map=_mapper)
    temp_modules.append(_module("acme_badname", register_partners=_registering(spec)))
    with pytest.raises(PluginError, match="invalid partner name"):
        load_partners(builtins=("acme_badname",), allow=())


def test_hook_register_partners(temp_modules: list[str]) -> None:
    specs = [PartnerSpec(name=n, map=_mapper) for n in ("acme", "acme-eu")]
    temp_modules.append(_module("acme_multi", register_partners=_registering(*specs)))
    partners = load_partners(builtins=("acme_multi",), allow=())
    assert set(partners) == {"acme", "acme-eu"}
    assert partners["acme"].source == "built-in"


def test_external_plugins_need_the_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PLUGINS", "")
    assert {p.source for p in load_partners().values()} == {"built-in"}


def test_a_builtin_that_fails_to_import_is_named(temp_modules: list[str]) -> None:
    with pytest.raises(PluginError, match=r"built-in plugin 'no_such_partner_module' failed"):
        load_partners(builtins=("no_such_partner_module",), allow=())


def test_register_partners_raising_is_named(temp_modules: list[str]) -> None:
    @hookimpl
    def register_partners(register: Callable[[PartnerSpec], None]) -> None:
        raise KeyError("boom")

    temp_modules.append(_module("acme_raises", register_partners=register_partners))
    with pytest.raises(PluginError, match=r"acme_raises.*register_partners failed: KeyError"):
        load_partners(builtins=("acme_raises",), allow=())


@pytest.mark.parametrize("methods", [(), ("get",), ("PUT",)])
def test_partner_methods_must_be_get_or_post(
    temp_modules: list[str], methods: tuple[str, ...]
) -> None:
    spec = PartnerSpec(name="acme", map=_mapper, methods=methods)
    temp_modules.append(_module("acme_methods", register_partners=_registering(spec)))
    with pytest.raises(PluginError, match="methods must be GET and/or POST"):
        load_partners(builtins=("acme_methods",), allow=())
