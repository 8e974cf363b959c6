"""Fixtures shared by the probe-side tests."""

from __future__ import annotations

import pytest
import typer

from probes.cli import probe


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    """A Typer app with ``probe`` as a named sub-command, as ``maxbatch`` mounts it."""
    cli = typer.Typer()
    cli.command("probe")(probe)

    @cli.command("noop")
    def noop() -> None:  # a second command keeps `probe` a named sub-command
        """Nothing."""

    return cli
