"""The child side of a trial session: build one config, answer requests over a pipe.

Requests (dicts) and replies:

- ``{"op": "info"}`` → ``{"device", "versions", "model", "training_args"}`` — validates the model
  (input errors come back as ``{"error": {"code", "message", "known"}}``);
- ``{"op": "trial", "batch_size", "accumulation_steps", "optimizer_steps"}`` →
  ``{"trial": TrialRecord, "poisoned": bool}``;
- ``{"op": "stop"}`` → the process exits.

This module imports torch and transformers at import time on purpose: the forkserver preloads
it, so every forked child starts with both already imported.
"""

from __future__ import annotations

import gc
import importlib
import traceback
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import Any

import torch
import transformers

from probes.environment import collect_versions
from probes.errors import ProbeError
from probes.hf_support import training_arguments_support
from probes.models import inspect_model
from probes.spec import ConfigTask
from probes.trial import TrialSession


def _error_reply(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ProbeError):
        return {"error": {"code": exc.code, "message": exc.message, "known": exc.known}}
    line = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return {"error": {"code": "probe-error", "message": line, "trace": traceback.format_exc(limit=5)}}


def _info(task: ConfigTask, session: TrialSession) -> dict[str, Any]:
    facts = inspect_model(task.model, task.seq_len, allow_remote_code=task.allow_remote_code)
    return {
        "device": session.device_info().model_dump(mode="json"),
        "versions": collect_versions().model_dump(mode="json"),
        "model": facts.model_dump(mode="json"),
        "training_args": training_arguments_support().model_dump(mode="json"),
    }


def _answer(task: ConfigTask, session: TrialSession, message: dict[str, Any]) -> dict[str, Any]:
    op = message.get("op")
    if op == "info":
        return _info(task, session)
    if op == "trial":
        trial = session.run(
            int(message["batch_size"]),
            accumulation_steps=int(message["accumulation_steps"]),
            optimizer_steps=int(message["optimizer_steps"]),
        )
        return {"trial": trial.model_dump(mode="json"), "poisoned": session.poisoned}
    return {"error": {"code": "probe-error", "message": f"unknown request {op!r}"}}


def serve(conn: Connection, task_json: str) -> None:
    """Answer requests until ``stop`` or the parent goes away."""
    task = ConfigTask.model_validate_json(task_json)
    if not task.device.startswith("cuda"):
        # CPU-backed devices: one intra-op thread. Counted bytes do not depend on it, and OpenMP
        # workers that spin while other processes hold the cores made a tiny step 30x slower.
        torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    session: TrialSession | None = None
    try:
        while True:
            try:
                message: dict[str, Any] = conn.recv()
            except (EOFError, OSError):
                return
            if message.get("op") == "stop":
                return
            try:
                if session is None:
                    # Built on the first request, so that a bad config is a reply, not a dead child.
                    session = TrialSession(task)
                reply = _answer(task, session, message)
            except Exception as exc:  # noqa: BLE001 — every failure becomes a reply, never a dead pipe
                reply = _error_reply(exc)
            conn.send(reply)
    finally:
        if session is not None:
            session.close()


PRELOADED_MODULES = (
    "transformers.modeling_utils",
    "transformers.activations",
    "transformers.training_args",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2",
)
"""transformers loads these lazily, at ~2.5 s on the first model build: pay it once, in the
forkserver, rather than in every child. A module a later transformers lacks is skipped."""

for _name in PRELOADED_MODULES:
    with suppress(ImportError):
        importlib.import_module(_name)

# Everything imported so far lives as long as the process: keep it out of the collector's way, so
# the full collection between trials walks only what the trials allocated.
gc.freeze()
