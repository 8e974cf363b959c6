"""The service's settings: environment variables with the ``MAXBATCH_`` prefix (or a ``.env`` file).

Read them through :func:`get_settings` or pass a :class:`Settings` to ``create_app``; nothing in
``app/`` keeps a module-global settings object.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from probes.hostmem import DEFAULT_ALLOWANCE_BYTES, DEFAULT_INSPECTOR_BYTES, HostMemoryPolicy

GIB = 1024**3


MIN_TOKEN_LENGTH = 16
"""Shortest MAXBATCH_API_TOKEN accepted: 16 random characters are ~96 bits from a URL-safe alphabet."""

TOKEN_HINT = "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be the service's bearer token, or ``None`` when it can."""
    if not token.strip():
        return "is only whitespace; unset it to run without a token, or set a real one"
    if any(c.isspace() for c in token):
        return "contains whitespace, which an Authorization header cannot carry intact; remove it"
    if not all("!" <= c <= "~" for c in token):
        return f"must be visible ASCII characters only (what an HTTP header carries); {TOKEN_HINT}"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"is {len(token)} characters; use at least {MIN_TOKEN_LENGTH} ({TOKEN_HINT})"
    return None


def settings_error(exc: ValidationError) -> str:
    """One line per invalid setting, named as its environment variable: for start-up errors."""
    lines = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error.get("loc", ())).upper()
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"MAXBATCH_{name} {message}" if name else message)
    return "; ".join(lines)


def _default_probe_command() -> list[str]:
    return [sys.executable, "-m", "probes"]


class Settings(BaseSettings):
    """Every knob of the service.

    ``docs/settings.md`` is generated from these fields (``scripts/gen-settings-doc``): each
    description is that page's sentence about the setting, so keep it whole and true.
    """

    model_config = SettingsConfigDict(
        env_prefix="MAXBATCH_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    host: str = Field(
        default="127.0.0.1",
        description="Address `maxbatch serve` binds. A non-loopback address is refused unless "
        "`MAXBATCH_API_TOKEN` is set.",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="Port `maxbatch serve` binds.")
    data_dir: Path = Field(
        default=Path("data"),
        description="Holds the SQLite store (`maxbatch.sqlite3`, WAL), per-job files "
        "(`jobs/<id>/spec.json`, `result.json`, `stderr.log`) and `inspector.log`. One service per "
        "directory (lock file).",
    )
    # --- access (docs/hardening.md) -----------------------------------------------------------
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token (`Authorization: Bearer <token>`) that every `/v1` request and "
        "`/metrics` need, checked before the body is read; at least "
        f"{MIN_TOKEN_LENGTH} visible ASCII characters, no whitespace (refused at start-up otherwise). "
        "Unset or empty: no token, and the service only listens on loopback and says so at start-up.",
    )
    reads_need_token: bool = Field(
        default=True,
        description="With a token set, `GET` requests (jobs, events, trials, devices, metrics) need it "
        "too; `false` lets anyone who reaches the port read them. `/healthz`, `/readyz`, the "
        "dashboard's files, `/docs` and `/openapi.json` never need it.",
    )
    model_root: Path | None = Field(
        default=None,
        description="Local model directories (`model.name_or_path` that is a path) must resolve inside "
        "it, symlinks included (403 otherwise). Unset: local paths are refused. Relative paths are "
        "taken from it.",
    )
    allow_remote_code: bool = Field(
        default=False, description="Allow `model.trust_remote_code` (403 otherwise)."
    )
    max_body_bytes: int = Field(default=64 * 1024, gt=0, description="Larger request bodies get 413.")
    max_queued_jobs: int = Field(
        default=100, gt=0, description="With this many jobs queued, new ones get 429 with `Retry-After`."
    )
    simulated_memory_bytes: int = Field(
        default=GIB,
        gt=0,
        description="Size of the `simulated` device; the largest `memory_limit_bytes` it accepts "
        "(protects host RAM).",
    )
    job_timeout_seconds: float = Field(
        default=4 * 3600, gt=0, description="A probe running longer is killed; the job fails as `timeout`."
    )
    inspect_models: bool = Field(
        default=True,
        description="Check each new request's model (architecture, `seq_len` vs positions, hub id, "
        "remote code) in the inspector child before queueing it.",
    )

    # --- probe processes: model inspection and host-memory ceilings (docs/hardening-processes.md) ---
    inspect_timeout_seconds: float = Field(
        default=20,
        gt=0,
        description="Limit for one model check by a ready inspector (its start is not counted); past it "
        "the request gets 422 `model-inspection-timeout` and a fresh inspector replaces that one.",
    )
    inspect_workers: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Inspector children kept ready: this many model checks run at once, each in its own "
        "child.",
    )
    inspect_queue_seconds: float = Field(
        default=5,
        ge=0,
        description="How long a request waits for a free inspector before it gets 503 with `Retry-After`.",
    )
    inspector_host_memory_bytes: int = Field(
        default=DEFAULT_INSPECTOR_BYTES,
        gt=0,
        description="Host-memory ceiling (`RLIMIT_DATA`) of each inspector child.",
    )
    probe_host_memory_ceilings: bool = Field(
        default=True,
        description="Put every probe and inspector process under a host-memory ceiling (`RLIMIT_DATA`, "
        "Linux).",
    )
    probe_host_allowance_bytes: int = Field(
        default=DEFAULT_ALLOWANCE_BYTES,
        gt=0,
        description="Host memory a probe process may use besides its tensors: a `simulated` trial's "
        "ceiling is 1.5 × `memory_limit_bytes` plus this; a `predict` trial's, the probe child's and its "
        "forkserver's is this.",
    )
    probe_cuda_host_memory_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Host-memory ceiling of a `cuda` trial process. Unset: none (not yet verified on a GPU).",
    )
    probe_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Local probe children, and every process they start, run this many steps below the "
        "service's CPU priority (`nice -n`, and their session's scheduler autogroup where the kernel "
        "has them), so that requests come first on shared cores; 0: the same priority. A probe still "
        "uses every core nothing else wants.",
    )
    probe_command: list[str] = Field(
        default_factory=_default_probe_command,
        min_length=1,
        description="The probe engine's entry point, as a JSON list; `run …` and `inspect-server` are "
        "appended.",
    )
    nvml: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="`auto`: use NVML when present. `on`: required (`/readyz` fails without it). "
        "`off`: never touch NVML.",
    )
    busy_memory_bytes: int = Field(
        default=256 * 1024**2,
        ge=0,
        description="A GPU whose other processes hold more than this is busy (409 unless "
        "`allow_busy_device=true`).",
    )
    poll_interval_seconds: int = Field(
        default=2, gt=0, description="`Retry-After` sent with 202 and with unfinished jobs."
    )
    queue_full_retry_after_seconds: int = Field(default=30, gt=0, description="`Retry-After` sent with 429.")
    max_wait_seconds: float = Field(
        default=60, gt=0, description="Upper bound for `GET /v1/probes/{id}?wait=`."
    )
    queue_deadline_seconds: float | None = Field(
        default=None,
        gt=0,
        description="A job that has not started this long after it was queued fails (code `queue-timeout`, "
        "with the reason it waited); both dispatchers. Unset (or `0`, `none`, `off`): wait forever. On a "
        "fleet, set it so that a job for a GPU type whose every card is busy fails instead of waiting "
        "indefinitely.",
    )
    dispatcher: Literal["local", "ray"] = Field(
        default="local",
        description="`local`: probes run on this machine. `ray`: on a Ray cluster, placed by GPU type "
        "(`pip install 'maxbatch[ray]'`; see docs/fleet.md).",
    )
    ray_address: str = Field(
        default="auto",
        description="The Ray cluster: `auto` (the `ray start` of this machine, or `RAY_ADDRESS`) or "
        "`host:port` of the head.",
    )
    ray_namespace: str = Field(
        default="maxbatch", min_length=1, description="Ray namespace of the probe actors."
    )
    ray_probe_cpus: float = Field(default=1, gt=0, description="CPUs each probe reserves on its Ray node.")
    ray_workdir: str | None = Field(
        default=None,
        description="Per-job work files on the Ray node, removed after each run. Unset: "
        "`<tmp>/maxbatch-jobs` there.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="How much the service logs (any case)."
    )

    @field_validator("api_token")
    @classmethod
    def _usable_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        problem = token_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("queue_deadline_seconds", mode="before")
    @classmethod
    def _deadline_off(cls, value: object) -> object:
        """``0``, ``none``, ``off`` and an empty value switch the queue deadline off."""
        if isinstance(value, str) and value.strip().lower() in {"", "0", "none", "off", "null"}:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            return None
        return value

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
    def host_memory_policy(self) -> HostMemoryPolicy:
        """The ceilings probe processes get (:mod:`probes.hostmem`)."""
        if not self.probe_host_memory_ceilings:
            return HostMemoryPolicy(allowance_bytes=None)
        return HostMemoryPolicy(
            allowance_bytes=self.probe_host_allowance_bytes, cuda_bytes=self.probe_cuda_host_memory_bytes
        )

    @property
    def inspector_ceiling_bytes(self) -> int | None:
        return self.inspector_host_memory_bytes if self.probe_host_memory_ceilings else None

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
