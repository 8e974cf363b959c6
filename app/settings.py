"""The service's settings: environment variables with the ``MAXBATCH_`` prefix (or a ``.env`` file).

Read them through :func:`get_settings` or pass a :class:`Settings` to ``create_app``; nothing in
``app/`` keeps a module-global settings object.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3


def _default_probe_command() -> list[str]:
    return [sys.executable, "-m", "probes"]


class Settings(BaseSettings):
    """Every knob of the service; the README's settings table documents each one."""

    model_config = SettingsConfigDict(
        env_prefix="MAXBATCH_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    host: str = Field(default="127.0.0.1", description="address `maxbatch serve` binds")
    port: int = Field(default=8000, ge=0, le=65535, description="port `maxbatch serve` binds")
    data_dir: Path = Field(default=Path("data"), description="SQLite store and per-job work files")
    api_token: SecretStr | None = Field(
        default=None, description="bearer token that POST endpoints require; unset: loopback only"
    )
    model_root: Path | None = Field(
        default=None, description="local model directories must lie under it; unset: no local paths"
    )
    allow_remote_code: bool = Field(default=False, description="allow model.trust_remote_code")
    max_body_bytes: int = Field(default=64 * 1024, gt=0, description="larger request bodies get 413")
    max_queued_jobs: int = Field(default=100, gt=0, description="more queued jobs than this get 429")
    simulated_memory_bytes: int = Field(
        default=GIB, gt=0, description="size of the simulated device; caps its memory_limit_bytes"
    )
    job_timeout_seconds: float = Field(default=4 * 3600, gt=0, description="a probe running longer is killed")
    inspect_models: bool = Field(
        default=True, description="check each request's model in the inspector child before queueing it"
    )
    inspect_timeout_seconds: float = Field(default=120, gt=0, description="limit for one model check")
    probe_command: list[str] = Field(
        default_factory=_default_probe_command,
        min_length=1,
        description="the probe engine's entry point (JSON list); `run` and `inspect-server` are appended",
    )
    nvml: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto: use NVML when present; on: required (readyz); off: never"
    )
    busy_memory_bytes: int = Field(
        default=256 * 1024**2,
        ge=0,
        description="a GPU whose other processes hold more than this is busy (409)",
    )
    poll_interval_seconds: int = Field(default=2, gt=0, description="Retry-After sent with 202")
    queue_full_retry_after_seconds: int = Field(default=30, gt=0, description="Retry-After sent with 429")
    max_wait_seconds: float = Field(default=60, gt=0, description="upper bound of ?wait= on GET")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def database_path(self) -> Path:
        return self.data_dir / "maxbatch.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None


def get_settings(**overrides: Any) -> Settings:
    """Settings read afresh from the environment (and ``.env``); ``overrides`` win over both."""
    return Settings(**overrides)


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
