"""``maxbatch``: ``serve`` runs the HTTP service; ``probe`` runs one probe here (probes.cli); ``plan``
asks a running service for a launch script's plan (app.launcher)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from typer.exceptions import TyperException

import probes.cli
from app.dispatch import require_dispatcher
from app.launcher import plan
from app.settings import Settings, get_settings, is_loopback, settings_error
from probes.protocol import ExitCode

cli = typer.Typer(
    name="maxbatch",
    help="Find the largest batch size a training job can use on a GPU, before it launches.",
    add_completion=False,
)
cli.command("probe")(probes.cli.probe)
cli.command("plan")(plan)

log = logging.getLogger("maxbatch")


def check_exposure(settings: Settings) -> str:
    """Refuse a non-loopback address without a token; return the start-up line about access."""
    if settings.token is None:
        if not is_loopback(settings.host):
            raise ValueError(
                f"refusing to listen on {settings.host}: without MAXBATCH_API_TOKEN anyone who reaches "
                "it could start probes. Set MAXBATCH_API_TOKEN, or listen on 127.0.0.1"
            )
        return (
            f"no MAXBATCH_API_TOKEN: listening on {settings.host} only (this machine); requests need no token"
        )
    guarded = "every /v1 request and /metrics" if settings.reads_need_token else "every /v1 write"
    return f"listening on {settings.host}; {guarded} requires 'Authorization: Bearer <MAXBATCH_API_TOKEN>'"


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind [MAXBATCH_HOST, 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind [MAXBATCH_PORT, 8000]")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="store and job files [MAXBATCH_DATA_DIR, ./data]")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="critical … debug [MAXBATCH_LOG_LEVEL, info]")] = None,
) -> None:
    """Run the HTTP service (SQLite store, one worker per device, simulated device without a GPU)."""
    import uvicorn

    from app.main import KEEP_ALIVE_SECONDS, create_app

    overrides: dict[str, Any] = {
        key: value
        for key, value in {"host": host, "port": port, "data_dir": data_dir, "log_level": log_level}.items()
        if value is not None
    }
    try:
        settings = get_settings(**overrides)
        access = check_exposure(settings)
        require_dispatcher(settings)
    except (ValueError, RuntimeError) as exc:
        message = settings_error(exc) if isinstance(exc, ValidationError) else str(exc)
        typer.echo(f"maxbatch: error: {message}", err=True)
        raise typer.Exit(ExitCode.INPUT) from exc
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.token is None:
        log.warning(access)
    else:
        log.info(access)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: a usage error is one line on stderr and exit code 2."""
    try:
        code = cli(args=argv, prog_name="maxbatch", standalone_mode=False)
    except TyperException as exc:  # typer's own click: usage errors, bad parameters
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        sys.stderr.write(f"maxbatch: error: {message} (see 'maxbatch --help')\n")
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    except typer.Abort:
        sys.stderr.write("maxbatch: aborted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
