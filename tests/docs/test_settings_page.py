"""docs/settings.md is generated from ``Settings``: the page and the fields must agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings

from app import settings_doc
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / settings_doc.DEFAULT_PATH


def test_the_settings_page_matches_the_settings_fields() -> None:
    assert PAGE.read_text(encoding="utf-8") == settings_doc.render(), (
        "docs/settings.md does not match app.settings.Settings (a setting was added, removed or "
        "described anew): run scripts/gen-settings-doc and commit the page"
    )


def test_every_setting_has_a_row_with_its_variable_and_default() -> None:
    page = PAGE.read_text(encoding="utf-8")
    for name, field in Settings.model_fields.items():
        assert f"| `MAXBATCH_{name.upper()}` | {settings_doc.default_text(field)} |" in page, name


def test_defaults_are_shown_as_an_operator_writes_them() -> None:
    fields = Settings.model_fields
    assert settings_doc.default_text(fields["data_dir"]) == "`./data`"
    assert settings_doc.default_text(fields["api_token"]) == "unset"
    assert settings_doc.default_text(fields["allow_remote_code"]) == "`false`"
    assert settings_doc.default_text(fields["job_timeout_seconds"]) == "`14400`"
    # the interpreter's path is the machine's, not the page's
    assert sys.executable not in settings_doc.render()
    assert settings_doc.default_text(fields["probe_command"]) == '`["<python>", "-m", "probes"]`'


def test_the_allowed_values_of_a_choice_are_listed() -> None:
    row = next(line for line in settings_doc.render().splitlines() if "MAXBATCH_LOG_LEVEL" in line)
    assert "One of `critical`, `error`, `warning`, `info`, `debug`." in row


def test_a_setting_without_a_description_is_refused() -> None:
    class Bare(BaseSettings):
        knob: int = Field(default=1)

    with pytest.raises(ValueError, match=r"Settings\.knob has no description"):
        settings_doc.row("knob", Bare.model_fields["knob"])


def test_check_mode_tells_to_regenerate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "settings.md"
    stale.write_text("# Settings\n", encoding="utf-8")
    assert settings_doc.main([str(stale), "--check"]) == 1
    assert "run scripts/gen-settings-doc" in capsys.readouterr().err
    assert settings_doc.main([str(stale)]) == 0
    assert settings_doc.main([str(stale), "--check"]) == 0
    assert stale.read_text(encoding="utf-8") == settings_doc.render()
