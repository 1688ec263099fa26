"""Loading partner plugins: the built-in partners, then allowed third-party distributions.

Built-in partners are plugins like any other: every package in the ``plugins`` folder whose
name does not start with ``_`` (so ``plugins/_template`` is not one), found by
:func:`builtin_plugins`.
Third-party distributions add partners through the ``gateway_partners`` entry-point group; only
the entry points named in ``GATEWAY_PLUGINS`` (comma-separated; empty means none) are loaded, so a
stray installed package never changes what the gateway accepts.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import re
from collections.abc import Iterable, Mapping
from importlib import metadata

import msgspec
import pluggy

from gateway import hookspecs
from gateway.hookspecs import PartnerSpec

ENTRY_POINT_GROUP = "gateway_partners"
ALLOW_ENV = "GATEWAY_PLUGINS"

PARTNER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")  # \Z: "$" would let "acme\n" through


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


class LoadedPartner(msgspec.Struct, frozen=True):
    spec: PartnerSpec
    source: str  # "built-in" or the distribution that provides it
    version: str
    origin: str = ""  # for messages: the distribution, or "built-in (plugins.<name>)"


def not_allowed_external(allow: Iterable[str] | None = None) -> list[str]:
    """Installed third-party partner plugins that the allow-list leaves out."""
    wanted = allowed_external() if allow is None else frozenset(allow)
    return sorted(set(metadata.entry_points(group=ENTRY_POINT_GROUP).names) - wanted)


def allowed_external(env: Mapping[str, str] | None = None) -> frozenset[str]:
    raw = (os.environ if env is None else env).get(ALLOW_ENV, "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


def builtin_plugins() -> tuple[str, ...]:
    """Module paths of the partner packages shipped in the ``plugins`` folder."""
    import plugins

    return tuple(
        f"plugins.{info.name}"
        for info in sorted(pkgutil.iter_modules(plugins.__path__), key=lambda i: i.name)
        if info.ispkg and not info.name.startswith("_")
    )


def load_partners(
    builtins: Iterable[str] | None = None,
    allow: Iterable[str] | None = None,
) -> dict[str, LoadedPartner]:
    """Load every plugin and return the partners they register, by name.

    ``allow`` lists the entry-point names of third-party plugins to load; None reads
    ``GATEWAY_PLUGINS``. Raises :class:`PluginError` for an unknown hook, a bad or repeated name.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, tuple[str, str]] = {}
    own_version = _version("attribution-gateway")

    for module_path in builtin_plugins() if builtins is None else builtins:
        try:
            module = importlib.import_module(module_path)
        except Exception as exc:
            where = f" ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
            raise PluginError(
                f"built-in plugin {module_path!r} failed to import{where}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        pm.register(module, name=module_path)
        sources[module_path] = ("built-in", own_version)

    wanted = allowed_external() if allow is None else frozenset(allow)
    available = metadata.entry_points(group=ENTRY_POINT_GROUP)
    for missing in sorted(wanted - set(available.names)):
        logging.getLogger("gateway.plugins").warning(
            "%s names %r, but no installed distribution provides that partner plugin",
            ALLOW_ENV,
            missing,
        )
    for ep in available:
        if ep.name not in wanted or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        pm.register(plugin, name=ep.name)
        dist = ep.dist
        sources[ep.name] = (
            dist.metadata["Name"] if dist else ep.name,
            dist.version if dist else "unknown",
        )

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {pm.get_name(exc.plugin)!r} implements a hook the gateway does not define "
            f"(misspelt?): {exc}"
        ) from exc

    partners: dict[str, LoadedPartner] = {}
    for impl in pm.hook.register_partners.get_hookimpls():
        source, version = sources.get(impl.plugin_name, (impl.plugin_name, "unknown"))

        where = f"{source} ({impl.plugin_name})" if source == "built-in" else source

        def register(
            spec: PartnerSpec, _src: str = source, _ver: str = version, where: str = where
        ) -> None:
            if not isinstance(spec, PartnerSpec):
                raise PluginError(f"{where}: register() takes a PartnerSpec, got {spec!r}")
            if not PARTNER_NAME.match(spec.name):
                raise PluginError(f"{where}: invalid partner name {spec.name!r}")
            if not spec.methods or not set(spec.methods) <= {"GET", "POST"}:
                raise PluginError(
                    f"{where}: partner {spec.name!r} methods must be GET and/or POST, "
                    f"got {spec.methods!r}"
                )
            if spec.name in partners:
                other = partners[spec.name]
                raise PluginError(
                    f"partner {spec.name!r} registered twice ({other.origin}, {where})"
                )
            partners[spec.name] = LoadedPartner(spec=spec, source=_src, version=_ver, origin=where)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{where}: register_partners failed: {type(exc).__name__}: {exc}"
            ) from exc
    return partners


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
