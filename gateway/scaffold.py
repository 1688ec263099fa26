"""``gateway new-partner NAME``: render ``plugins/_template`` into a new partner.

The template is a working partner named ``example`` ("Example Partner") in the package
``plugins._template``. Rendering copies it with those names replaced, in file contents and
paths, either into ``plugins/<name>/`` (a built-in partner, loaded at once) or into
``<dir>/gateway-<name>/`` as its own distribution with the ``gateway_partners`` entry point.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from gateway.config import set_partner_enabled
from gateway.plugins import PARTNER_NAME

TEMPLATE_PACKAGE = "plugins._template"
TEMPLATE_NAME = "example"
TEMPLATE_DISPLAY = "Example Partner"
FRAGMENT = "pyproject.fragment.toml"
# What only the template needs (how to copy it) is left out of a rendered partner.
_TEMPLATE_ONLY = re.compile(
    r"<!-- template-only -->.*?<!-- /template-only -->\n*|^# template-only:[^\n]*\n\n?",
    re.DOTALL | re.MULTILINE,
)
_SKIP = {"__pycache__", ".pytest_cache", ".mypy_cache"}


class ScaffoldError(Exception):
    pass


def template_dir() -> Path:
    import plugins

    return Path(plugins.__path__[0]) / "_template"


def render_partner(name: str, external: Path | None = None) -> Path:
    """Render the template for partner ``name``; returns the folder written."""
    if not PARTNER_NAME.match(name):
        raise ScaffoldError(
            f"invalid partner name {name!r}: lower case letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    module = name.replace("-", "_")
    if not module.isidentifier() or module.startswith("_"):
        raise ScaffoldError(
            f"invalid partner name {name!r} for a plugin: it must start with a letter, so that "
            f"plugins/{module} is a Python package"
        )
    display = " ".join(part.capitalize() for part in re.split(r"[-_]", name))
    source = template_dir()
    if external is None:
        package = f"plugins.{module}"
        target = source.parent / module
        root = target
    else:
        package = f"gateway_{module}"
        root = external / f"gateway-{name}"
        target = root / package
    if root.exists():
        raise ScaffoldError(f"{root} already exists")

    replacements = [
        (TEMPLATE_PACKAGE, package),
        (
            "plugins/_template",
            f"plugins/{module}" if external is None else f"{root.name}/{package}",
        ),
        (TEMPLATE_DISPLAY, display),
        (f"gateway-{TEMPLATE_NAME}", f"gateway-{name}"),
    ]

    def render(text: str) -> str:
        text = _TEMPLATE_ONLY.sub("", text)
        for old, new in replacements:
            text = text.replace(old, new)
        return re.sub(rf"\b{TEMPLATE_NAME}\b", name, text)

    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir() or _SKIP.intersection(rel.parts) or path.suffix == ".pyc":
            continue
        if rel.name == FRAGMENT:
            if external is None:
                continue  # a built-in partner ships inside the gateway's own distribution
            dest = root / "pyproject.toml"
        else:
            dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
    if external is not None:
        shutil.copyfile(target / "README.md", root / "README.md")
    return root


def enable_in_config(config_file: Path, name: str) -> bool:
    """Enable the new partner in the config file; False if the file already names it."""
    text = config_file.read_text(encoding="utf-8") if config_file.exists() else ""
    if re.search(rf"^\[partners\.{re.escape(name)}\]", text, re.MULTILINE):
        return False
    set_partner_enabled(config_file, name, True)
    return True
