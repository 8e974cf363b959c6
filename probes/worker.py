"""The child side of a trial session: build one config, answer requests over a pipe.

Requests and replies are the trial server's messages in :mod:`probes.protocol`, one JSON
document per pipe message:

- ``InfoRequest`` → ``InfoReply`` (device, versions, model, transformers' API, what the recipe
  can run here) — validates the model (an input error comes back as an ``ErrorReply``);
- ``TrialRequest`` → ``TrialReply`` (the trial record, and whether the CUDA context is poisoned);
- ``CurveRequest`` → ``CurveReply`` (``probes.curve.measure_curve`` on the task: the ladder bracket
  for the device's capacity and the curve itself; it builds its own models and keeps none);
- ``StopRequest`` → the process exits.

A request that fails, or cannot be read, is answered with an ``ErrorReply``, never a dead pipe.
When a trial or a request failed because the host refused an allocation (the process reached its
host-memory ceiling, :mod:`probes.hostmem`), the message says so and names the ceiling.

This module imports torch and transformers at import time on purpose: the forkserver preloads
it, so every forked child starts with both already imported.
"""

from __future__ import annotations

import gc
import importlib
import os
from contextlib import suppress
from multiprocessing.connection import Connection

import torch
import transformers

from probes.confirmation import ALLOC_CONF_VARIABLE
from probes.curve import measure_curve
from probes.environment import collect_versions
from probes.hf_support import training_arguments_support
from probes.hostmem import explain_host_failure
from probes.models import inspect_model, load_config
from probes.protocol import (
    CurveReply,
    CurveRequest,
    ErrorInfo,
    ErrorReply,
    InfoReply,
    InfoRequest,
    StopRequest,
    TrialReply,
    TrialRequest,
    TrialServerReply,
    parse_trial_request,
)
from probes.recipe.detect import detect_support, model_attention_refusal
from probes.recipe.finetuning import describe
from probes.spec import ConfigTask
from probes.trial import TrialSession


def _info(task: ConfigTask, session: TrialSession) -> InfoReply:
    facts = inspect_model(task.model, task.seq_len, allow_remote_code=task.allow_remote_code)
    support = detect_support(
        session.device_info().kind,
        optimizer=task.optimizer,
        attn_implementation=task.attn_implementation,
        finetuning=task.finetuning,
        torch_device=session.device.torch_device,
    )
    config = load_config(task.model, allow_remote_code=task.allow_remote_code)
    support = support.model_copy(
        update={"attention": model_attention_refusal(config, task.attn_implementation)}
    )
    finetuning = None
    if task.finetuning.uses_adapters and support.finetuning is None:
        finetuning = describe(config, task.finetuning, allow_remote_code=task.allow_remote_code)
    return InfoReply(
        device=session.device_info(),
        versions=collect_versions(),
        model=facts,
        training_args=training_arguments_support(),
        recipe=support,
        finetuning=finetuning,
    )


def _answer(task: ConfigTask, session: TrialSession, request: InfoRequest | TrialRequest) -> TrialServerReply:
    if isinstance(request, InfoRequest):
        return _info(task, session)
    trial = session.run(
        request.batch_size,
        accumulation_steps=request.accumulation_steps,
        optimizer_steps=request.optimizer_steps,
        lengths=request.lengths,
        oom_at_micro_step=request.oom_at_micro_step,
    )
    if trial.message is not None:
        trial = trial.model_copy(update={"message": explain_host_failure(trial.message)})
    return TrialReply(trial=trial, poisoned=session.poisoned)


def _curve(task: ConfigTask, request: CurveRequest) -> CurveReply:
    outcome = measure_curve(
        task,
        accumulation_steps=request.accumulation_steps,
        optimizer_steps=request.optimizer_steps,
        upper_limit=request.upper_limit,
        require_depth_extrapolation=request.require_depth_extrapolation,
    )
    largest, failing = outcome.bracket if outcome.bracket is not None else (None, None)
    return CurveReply(
        max_batch_size=largest,
        first_failing_batch_size=failing,
        nothing_fits=outcome.nothing_fits,
        capacity_bytes=outcome.capacity_bytes,
        reason=outcome.reason,
        trials=outcome.trials,
        seconds=outcome.seconds,
        depths=outcome.depths,
        curve=outcome.curve.to_wire() if outcome.curve is not None else None,
        trial_records=tuple(outcome.records),
        layers=outcome.layers,
    )


def use_allocator_settings(task: ConfigTask) -> None:
    """Run this child with the job's ``PYTORCH_CUDA_ALLOC_CONF`` (``task.cuda_alloc_conf``), before CUDA.

    The variable is set on every device (only CUDA's caching allocator reads it; the trial records
    report it); empty removes it (torch's defaults); ``None`` leaves the environment as inherited.
    On ``cuda`` the allocator is also told directly: torch may have read the variable when the
    forkserver imported it, before this child existed.
    """
    conf = task.cuda_alloc_conf
    if conf is None:
        return
    if conf:
        os.environ[ALLOC_CONF_VARIABLE] = conf
    else:
        os.environ.pop(ALLOC_CONF_VARIABLE, None)
    if conf and task.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.memory._set_allocator_settings(conf)


def serve(conn: Connection, task_json: str) -> None:
    """Answer requests until ``stop`` or the parent goes away."""
    task = ConfigTask.model_validate_json(task_json)
    use_allocator_settings(task)
    if not task.device.startswith("cuda"):
        # CPU-backed devices: one intra-op thread. Counted bytes do not depend on it, and OpenMP
        # workers that spin while other processes hold the cores made a tiny step 30x slower.
        torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    session: TrialSession | None = None
    try:
        while True:
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return
            reply: TrialServerReply
            try:
                request = parse_trial_request(raw)
                if isinstance(request, StopRequest):
                    return
                if isinstance(request, CurveRequest):
                    conn.send_bytes(_curve(task, request).model_dump_json().encode())
                    continue
                if session is None:
                    # Built on the first request, so that a bad config is a reply, not a dead child.
                    session = TrialSession(task)
                reply = _answer(task, session, request)
            except Exception as exc:  # noqa: BLE001 — every failure becomes a reply, never a dead pipe
                error = ErrorInfo.from_exception(exc)
                reply = ErrorReply(
                    error=error.model_copy(update={"message": explain_host_failure(error.message)})
                )
            conn.send_bytes(reply.model_dump_json().encode())
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
    "torch.distributed.fsdp",
    "torch.nn.parallel.distributed",
    "torch.testing._internal.distributed.fake_pg",
    "probes.recipe.build",
)
"""transformers loads these lazily, at ~2.5 s on the first model build: pay it once, in the
forkserver, rather than in every child. A module a later transformers lacks is skipped."""

for _name in PRELOADED_MODULES:
    with suppress(ImportError):
        importlib.import_module(_name)

# Everything imported so far lives as long as the process: keep it out of the collector's way, so
# the full collection between trials walks only what the trials allocated.
gc.freeze()
