"""Write ``docs/settings.md`` from :class:`app.settings.Settings`: one table row per field.

``python -m app.settings_doc [PATH]`` (or ``scripts/gen-settings-doc``) writes the page;
``--check`` only compares and exits 1 when the page is stale. The row's meaning is the field's
``description``; its default is rendered from the field, with the interpreter's path shown as
``<python>`` so that the page does not depend on the machine that wrote it.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path, PurePath
from typing import Any, Literal

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from app.settings import Settings

DEFAULT_PATH = Path("docs/settings.md")
REGENERATE = "scripts/gen-settings-doc"

INTRO = f"""\
# Settings

<!-- Generated from app.settings.Settings by {REGENERATE}; edit the fields, not this page. -->

Every setting is an environment variable (or a line in `.env` in the working directory). Flags of
`maxbatch serve` (`--host`, `--port`, `--data-dir`, `--log-level`) override them.

| Variable | Default | Meaning |
|---|---|---|
"""


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable that sets the field (the prefix plus the name, or its alias)."""
    alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return alias.upper() if alias else f"{prefix}{name}".upper()


def _value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, PurePath):
        text = str(value)
        return f"`{text if value.is_absolute() or text.startswith('.') else './' + text}`"
    if isinstance(value, Enum):
        return f"`{value.value}`"
    if isinstance(value, list | dict | tuple):
        shown = [("<python>" if item == sys.executable else item) for item in value]
        return f"`{json.dumps(shown if not isinstance(value, dict) else value)}`"
    return f"`{value}`"


def default_text(field: FieldInfo) -> str:
    """The default as the page shows it."""
    if field.default_factory is not None:
        return _value(field.default_factory())  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return "required"
    return _value(field.default)


def choices(annotation: Any) -> list[str]:
    """The values a ``Literal`` (or an optional ``Literal``) field accepts, else nothing."""
    if typing.get_origin(annotation) is Literal:
        return [str(arg) for arg in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in choices(arg)]
    return []


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def row(name: str, field: FieldInfo) -> str:
    if not field.description:
        raise ValueError(f"Settings.{name} has no description: give it one, it is the settings page's text")
    meaning = field.description
    allowed = choices(field.annotation)
    if allowed and not all(f"`{value}`" in meaning for value in allowed):
        meaning += " One of " + ", ".join(f"`{value}`" for value in allowed) + "."
    return f"| `{env_name(name, field)}` | {_cell(default_text(field))} | {_cell(meaning)} |"


def render() -> str:
    """The whole page."""
    return INTRO + "".join(row(name, field) + "\n" for name, field in Settings.model_fields.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.settings_doc", description=__doc__)
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is not up to date")
    args = parser.parse_args(argv)
    page = render()
    path: Path = args.path
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != page:
            sys.stderr.write(f"{path} does not match app.settings.Settings: run {REGENERATE}\n")
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
