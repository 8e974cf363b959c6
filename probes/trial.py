"""One trial: a few real training steps at one batch size, with the peak memory they needed.

A :class:`TrialSession` lives in one child process for one config (model, sequence length,
precision, checkpointing, strategy, optimizer, attention kernel, device). Its
:class:`~probes.recipe.build.Recipe` builds the model, wraps it for the strategy once and makes the
optimizer; the session runs any number of trials; a trial never raises for running out of memory or
for a failing training step: it returns the outcome. Under ``ddp`` and ``fsdp`` the process measures
rank 0 of a ``world_size``-rank job (see :mod:`probes.recipe.world`).

A trial, step by step (why: ``docs/architecture.md``, "A trial, step by step"), written to use what
HF ``Trainer`` with the emitted arguments uses:

1. ``torch.manual_seed(task.seed)``; a fresh optimizer as Trainer builds it for ``task.optimizer``
   (lr 0: memory is the same for any lr, and the weights stay as built, so every trial sees the same
   model); a fresh ``GradScaler`` for ``16-mixed``.
2. Per optimizer step, first the step's micro-batches, all at once (Trainer prefetches a whole
   accumulation window onto the device): each holds ``input_ids`` (random ids, every row at the full
   ``seq_len``), ``attention_mask`` and ``labels`` (a copy of the ids), int64. The worst case is a
   padded batch: every micro-batch, at every batch size including 1, has its last row's last
   position masked out (``attention_mask`` 0, ``labels`` -100), still at the full shape. A mask with
   a zero in it makes transformers' sdpa and eager attention materialise a ``b x 1 x s x s`` mask
   that an all-ones mask lets them skip; a real job's batches are padded (a padding collator pads
   every batch of two or more rows whose lengths differ; ``padding="max_length"`` pads every batch,
   a batch of one too), so the search measures with the mask. Batch size 1 carries it as well: a
   padding collator would leave a single row unpadded, but ``padding="max_length"`` would not, and
   the mask is the larger of the two (only a ``seq_len`` of 1 has no padded position: no token
   would be left). Where a batch with no padding at all (packed sequences) would take another,
   larger attention kernel (``sdpa`` with grouped key/value heads where no fused CUDA kernel takes
   them: :attr:`~probes.recipe.build.Recipe.measures_packed_batch`), one step adds a micro-batch
   with no padded position after its last, in the last one's accumulation context: the earliest
   step after the first in which the optimizer's state, if it keeps any, is in place (the second;
   later where the fp16 scaler skipped steps). The state, the gradients and the step's batches are
   alive then, as for the last micro-batch of a job whose batches are all packed. Its loss is not
   kept and its time not counted (step 6).
3. Per micro-batch, inside the strategy's accumulation context (``no_sync`` / no gradient sync on
   all but the last): forward under autocast (``16-mixed``: fp16, ``bf16-mixed``: bf16; none for
   ``32-true`` and ``bf16-true``, and none under FSDP2, whose mixed-precision policy casts instead);
   under autocast the float outputs are then copied to fp32, as Accelerate's mixed-precision wrapper
   does; ``loss / accumulation_steps``; backward (scaled for fp16).
4. Then ``unscale_`` (fp16), ``clip_grad_norm_(…, 1.0)`` over the trainable parameters,
   ``optimizer.step()`` (``scaler.step`` + ``scaler.update`` for fp16), ``zero_grad(set_to_none=True)``.
5. The peak covers every step. AdamW creates its state in its first ``step()``, so at least one
   optimizer step must run *with* that state (an optimizer that keeps none, momentum-less SGD,
   needs no such step): when the fp16 scaler skips steps (gradients overflow
   at the initial scale), extra steps run until one has (at most :data:`MAX_EXTRA_STEPS`; none when
   the loss itself is NaN or infinite, which no scale cures; the record's message then says so).
6. ``step_seconds``: mean wall time per optimizer step, the first excluded (the device synchronised),
   less the packed micro-batch's own (timed between two synchronisations);
   with ``lengths``, only the steps whose micro-batches are all at ``seq_len`` count, so throughput
   stays the worst case's.
   ``16-mixed`` reports ``loss_flag`` ``nan`` / ``inf`` / ``zero`` when a loss was NaN, infinite or 0.0.

With ``lengths`` (a confirmation under dynamic padding, ``probes.confirmation``), micro-batch ``k``
of the trial is padded to ``lengths[k]`` (``seq_len`` once the list ends) as a padding collator pads
a batch to its longest sequence: one row at that length, the others shorter (seeded), their padding
masked out in ``attention_mask`` and ignored in ``labels`` (-100); the last row's last position is
masked out as in every micro-batch. The record then carries the
lengths and how many micro-batches completed (a failure came in the next one, or in the optimizer
step after the last), and every record the ``PYTORCH_CUDA_ALLOC_CONF`` the process ran with.

Afterwards (fit or not) gradients are dropped, garbage collected and the device's cache emptied, so
the next trial in the process starts from the weights alone. An error that poisons the CUDA context
sets :attr:`TrialSession.poisoned`: the parent must discard the process.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from probes.confirmation import ALLOC_CONF_VARIABLE
from probes.devices import TrialDevice, open_device
from probes.devices.counting import CountingMode
from probes.errors import ProbeInputError
from probes.models import load_config, vocab_size
from probes.oom import classify, one_line, poisons_context
from probes.padding import has_padded_position, unpadded_micro_batch
from probes.recipe.build import ModelBuilder, Recipe
from probes.recipe.optimizers import keeps_state
from probes.spec import ConfigTask, DeviceInfo, Outcome, Precision, TrialRecord
from probes.timeline import Timeline
from probes.weights_fit import WeightsFloor, check_weights, finetuning_weights_floor

MAX_EXTRA_STEPS = 16
"""Extra optimizer steps allowed when the fp16 scaler skipped every step (2**16 halves to 1 in 16)."""

MAX_GRAD_NORM = 1.0
"""Gradient clipping norm, HF ``TrainingArguments.max_grad_norm``'s default."""

INJECTED_OOM = "CUDA out of memory (injected by a test)"
"""The message of the out-of-memory error that ``oom_at_micro_step`` raises: the typed error the
devices raise, so the trial classifies it as every other ``oom``."""


@dataclass(frozen=True)
class _Steps:
    """What the step loop measured."""

    peak_reserved: int
    peak_allocated: int
    step_seconds: float | None
    optimizer_steps: int
    loss_flag: str | None
    note: str | None


class TrialSession:
    """Trials of one config in this process: ``run(batch_size, ...)`` as often as needed, then ``close()``.

    The constructor reads the config and opens the device (raising
    :class:`~probes.errors.ProbeInputError` subclasses for bad input or a missing device); the model
    is built by the first :meth:`run` (or :meth:`prepare`) with ``build`` (default: the task's,
    :func:`~probes.recipe.build.builder_for`), and a build that runs out of memory is that trial's
    outcome. The device adopts every tensor the built model keeps
    (:func:`~probes.recipe.finetuning.resident_tensors`); the :class:`~probes.recipe.build.Recipe`
    then wraps it for the task's strategy.
    Before building, the weights are counted on the meta device against ``weights_floor``
    (:mod:`probes.weights_fit`): weights alone too large for the device are the outcome at once.
    """

    def __init__(
        self,
        task: ConfigTask,
        *,
        build: ModelBuilder | None = None,
        weights_floor: WeightsFloor | None = None,
    ) -> None:
        self.task = task
        # the size check's bound (probes.weights_fit): the task's own build's, or the one passed with
        # another build; a build whose floor is not given is not checked (it might need less)
        if weights_floor is None and build is None:
            weights_floor = finetuning_weights_floor(task.finetuning)
        self._weights_floor = weights_floor
        self._config = load_config(task.model, allow_remote_code=task.allow_remote_code)
        self._vocab_size = vocab_size(self._config)
        self._device: TrialDevice = open_device(task)
        self._recipe = Recipe(task, self._config, self._device, build=build)
        self._model: torch.nn.Module | None = None
        self._build_failure: tuple[Outcome, str] | None = None
        self._build_need: int | None = None
        self._poisoned = False
        self._closed = False
        self._micro_steps_done = 0

    @property
    def device(self) -> TrialDevice:
        return self._device

    @property
    def model(self) -> torch.nn.Module | None:
        """The model as built (inside the strategy's wrapper; ``None`` before the first trial and after a
        failed build)."""
        return self._recipe.inner

    @property
    def recipe(self) -> Recipe:
        """How this config is set up: the wrapper, the optimizer, the attention emulation."""
        return self._recipe

    @property
    def poisoned(self) -> bool:
        """True once an error left the CUDA context unusable: discard this process."""
        return self._poisoned

    def device_info(self) -> DeviceInfo:
        return self._device.info()

    def prepare(self) -> tuple[Outcome, str] | None:
        """Build the model now; ``None`` when it is ready, else the build's outcome and message."""
        if self._model is None and self._build_failure is None:
            try:
                if self._weights_floor is not None:  # weights alone too large: an outcome, nothing built
                    info = self._device.info()
                    self._build_failure = check_weights(self._config, self.task, info, self._weights_floor)
                if self._build_failure is None:
                    self._model = self._build()
            except ProbeInputError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed build is the trial's outcome, not a crash
                outcome = classify(exc)
                self._build_failure = (outcome, "building the model: " + one_line(exc))
                self._build_need = self._device.needed_bytes(exc) if outcome is Outcome.OOM else None
                self._poisoned = self._poisoned or poisons_context(exc)
            if self._build_failure is not None:
                self._clean_up()
        return self._build_failure

    def _build(self) -> torch.nn.Module:
        self._recipe.build()
        assert self._recipe.model is not None
        return self._recipe.model

    def run(
        self,
        batch_size: int,
        *,
        accumulation_steps: int,
        optimizer_steps: int,
        lengths: Sequence[int] | None = None,
        oom_at_micro_step: int | None = None,
    ) -> TrialRecord:
        """One trial; the outcome is returned, never raised (except for bad arguments and bad input).

        An out-of-memory outcome carries ``needed_bytes``: the bytes in use plus the allocation that
        failed, a lower bound of what the batch size needs. ``lengths``: the padded length of each
        micro-batch, in order (dynamic padding; see the module docstring); ``None``: every
        micro-batch at ``seq_len``. ``oom_at_micro_step`` (a test seam, :data:`INJECTED_OOM`): raise the
        device's out-of-memory error before micro-batch ``k`` (0-based, counted over the whole trial).
        """
        if batch_size < 1 or accumulation_steps < 1 or optimizer_steps < 1:
            raise ValueError("batch_size, accumulation_steps and optimizer_steps must be at least 1")
        if lengths is not None and not all(1 <= n <= self.task.seq_len for n in lengths):
            raise ValueError(f"every length must be within 1..{self.task.seq_len}")
        if self._closed:
            raise RuntimeError("this TrialSession is closed")
        self._micro_steps_done = 0

        def record(
            outcome: Outcome, message: str | None, steps: _Steps | None = None, *, needed: int | None = None
        ) -> TrialRecord:
            return TrialRecord(
                batch_size=batch_size,
                outcome=outcome,
                peak_reserved_bytes=steps.peak_reserved if steps else None,
                peak_allocated_bytes=steps.peak_allocated if steps else None,
                step_seconds=steps.step_seconds if steps else None,
                accumulation_steps=accumulation_steps,
                optimizer_steps=steps.optimizer_steps if steps else 0,
                message=message,
                loss_flag=steps.loss_flag if steps else None,
                needed_bytes=needed,
                lengths=tuple(lengths) if lengths is not None else None,
                micro_steps_done=self._micro_steps_done if lengths is not None else None,
                cuda_alloc_conf=os.environ.get(ALLOC_CONF_VARIABLE),
            )

        if self._poisoned:
            return record(Outcome.ERROR, "an earlier error poisoned this process's CUDA context")
        precision = self.task.precision
        info = self._device.info()
        if precision.needs_bf16 and not info.bf16_supported:
            return record(
                Outcome.ERROR,
                f"{precision.value} needs native bf16 (compute capability >= 8.0); "
                f"{info.name} has {info.compute_capability}",
            )
        failure = self.prepare()
        if failure is not None:
            return record(failure[0], failure[1], needed=self._build_need)
        try:
            steps = self._steps(batch_size, accumulation_steps, optimizer_steps, lengths, oom_at_micro_step)
        except ProbeInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a trial reports every failure as its outcome
            # The exception (and the frames it holds: batches, outputs, optimizer) ends with this block.
            outcome = classify(exc)
            needed = self._device.needed_bytes(exc) if outcome is Outcome.OOM else None
            result = record(outcome, one_line(exc), needed=needed)
            self._poisoned = self._poisoned or poisons_context(exc)
        else:
            outcome = (
                Outcome.OVER_HEADROOM if steps.peak_reserved > self._device.capacity_bytes else Outcome.FIT
            )
            result = record(outcome, steps.note, steps)
        self._clean_up()
        return result

    def run_with_timeline(
        self, batch_size: int, *, accumulation_steps: int, optimizer_steps: int
    ) -> tuple[TrialRecord, Timeline | None]:
        """:meth:`run`, and the steps' memory timeline (``probes.timeline``) where the device counts bytes.

        The timeline covers what the peak covers and replays to it exactly. ``None`` on ``cuda``
        and for a trial that did not run to the end.
        """
        mode = getattr(self._device, "mode", None)
        if not isinstance(mode, CountingMode):
            return self.run(
                batch_size, accumulation_steps=accumulation_steps, optimizer_steps=optimizer_steps
            ), None
        with mode.recording() as recording:
            record = self.run(
                batch_size, accumulation_steps=accumulation_steps, optimizer_steps=optimizer_steps
            )
        ran = record.outcome in (Outcome.FIT, Outcome.OVER_HEADROOM)
        return record, recording.timeline(batch_size) if ran else None

    def _steps(
        self,
        batch_size: int,
        accumulation_steps: int,
        optimizer_steps: int,
        lengths: Sequence[int] | None = None,
        oom_at_micro_step: int | None = None,
    ) -> _Steps:
        model = self._model
        assert model is not None
        device = self._device
        recipe = self._recipe
        precision = self.task.precision
        fp16 = precision is Precision.FP16_MIXED
        model.train()
        model.zero_grad(set_to_none=True)
        optimizer = recipe.new_optimizer()
        parameters = recipe.trainable_parameters()
        device.reset_peak()
        torch.manual_seed(self.task.seed)
        seconds: list[float] = []
        losses: list[float] = []
        steps_done = steady_steps = 0
        packed_pending = lengths is None and recipe.measures_packed_batch
        stateless = not keeps_state(self.task.optimizer)
        with device.step_context(), recipe.step_context():
            scaler = device.grad_scaler() if fp16 else None
            while steps_done < optimizer_steps or (
                steady_steps == 0
                and steps_done < optimizer_steps + MAX_EXTRA_STEPS
                and self._losses_finite(losses)
            ):
                started = time.perf_counter()
                # the optimizer's state, if it keeps any, is in place for this whole step
                steady = stateless or bool(optimizer.state)
                step_losses: list[torch.Tensor] = []
                first = steps_done * accumulation_steps
                batches = [self._batch(batch_size, lengths, first + k) for k in range(accumulation_steps)]
                for index, batch in enumerate(batches):
                    if first + index == oom_at_micro_step:
                        raise torch.OutOfMemoryError(f"{INJECTED_OOM} before micro-batch {first + index}")
                    step_losses.append(self._micro_step(batch, index, accumulation_steps, scaler))
                    self._micro_steps_done += 1
                packed_seconds = 0.0
                if packed_pending and steady and steps_done > 0:
                    packed_seconds = self._packed_micro_step(batches, batch_size, accumulation_steps, scaler)
                    packed_pending = False
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del batch
                device.synchronize()
                worst_case = all(
                    self._length(lengths, first + k) == self.task.seq_len for k in range(accumulation_steps)
                )
                if steps_done > 0 and worst_case:  # the first step is never timed
                    seconds.append(time.perf_counter() - started - packed_seconds)
                # Read the step's losses now and let them go: tensors kept across steps would make
                # the peak depend on how many steps ran (the fp16 scaler can add some).
                losses.extend(self._values(step_losses))
                del step_losses
                steps_done += 1
                steady_steps += int(steady)
            del batches, scaler
        del optimizer, parameters
        reserved, allocated = device.peak()
        note = None
        if steady_steps == 0:
            note = (
                f"the fp16 gradient scaler skipped every one of {steps_done} optimizer steps "
                "(gradients overflowed): the peak lacks the AdamW state"
            )
        return _Steps(
            peak_reserved=reserved,
            peak_allocated=allocated,
            step_seconds=sum(seconds) / len(seconds) if seconds else None,
            optimizer_steps=steps_done,
            loss_flag=self._loss_flag(losses) if fp16 else None,
            note=note,
        )

    def _micro_step(
        self,
        batch: dict[str, torch.Tensor],
        index: int,
        accumulation_steps: int,
        scaler: torch.amp.GradScaler | None,
    ) -> torch.Tensor:
        """Forward and backward of micro-batch ``index`` of ``accumulation_steps``; its loss, detached."""
        model = self._model
        assert model is not None
        autocast_dtype = self._recipe.autocast_dtype
        with self._recipe.micro_step(index, accumulation_steps):
            with self._autocast(autocast_dtype):
                outputs = model(**batch)
            if autocast_dtype is not None:
                outputs = _float_outputs(outputs)
            loss: torch.Tensor = outputs["loss"] / accumulation_steps
            del outputs
            scaled: torch.Tensor = scaler.scale(loss) if scaler is not None else loss
            scaled.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward untyped
        return loss.detach()

    def _packed_micro_step(
        self,
        batches: list[dict[str, torch.Tensor]],
        batch_size: int,
        accumulation_steps: int,
        scaler: torch.amp.GradScaler | None,
    ) -> float:
        """One more micro-batch, with no padded position (a packed batch), at the end of a step that
        runs with the optimizer's state: that state, the step's gradients and its batches are alive,
        as they are for the last micro-batch of a job whose batches are all packed. Its loss is not kept (it
        would make the fp16 flag see a batch the job never pads); the seconds it took, device
        synchronised, are returned, so that the step's time stays the padded step's.
        (:attr:`probes.recipe.build.Recipe.measures_packed_batch` says when: see the module docstring.)"""
        self._device.synchronize()
        started = time.perf_counter()
        with unpadded_micro_batch():
            batches.append(self._batch(batch_size))
            self._micro_step(batches[-1], accumulation_steps - 1, accumulation_steps, scaler)
        self._device.synchronize()
        return time.perf_counter() - started

    def _length(self, lengths: Sequence[int] | None, index: int) -> int:
        """Micro-batch ``index``'s padded length: ``lengths[index]``, ``seq_len`` past the list's end."""
        return self.task.seq_len if lengths is None or index >= len(lengths) else lengths[index]

    def _batch(
        self, batch_size: int, lengths: Sequence[int] | None = None, index: int = 0
    ) -> dict[str, torch.Tensor]:
        padded = self._length(lengths, index)
        shape = (batch_size, padded)
        device = self._device.torch_device
        input_ids = torch.randint(0, self._vocab_size, shape, device=device)
        attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        labels = input_ids.clone()
        if lengths is not None:
            rows = random.Random(self.task.seed * 1_000_003 + index)
            for row in range(1, batch_size):  # row 0 is the longest: the batch is padded to it
                real = rows.randint(1, padded)
                attention_mask[row, real:] = 0
                labels[row, real:] = -100
        if has_padded_position(padded):
            # the worst case is a padded batch (probes.padding; the module docstring, step 2)
            attention_mask[-1, -1] = 0
            labels[-1, -1] = -100
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _autocast(self, dtype: torch.dtype | None) -> AbstractContextManager[object]:
        return self._device.autocast(dtype) if dtype is not None else nullcontext()

    def _values(self, losses: list[torch.Tensor]) -> list[float]:
        """The losses as numbers (none on a device without values)."""
        if not self._device.computes_values:
            return []
        return [float(loss.item()) for loss in losses]

    def _losses_finite(self, losses: list[float]) -> bool:
        """Whether more steps could help the scaler: not when the loss itself is NaN or infinite."""
        if not self._device.computes_values:
            return False
        return all(math.isfinite(value) for value in losses)

    def _loss_flag(self, values: list[float]) -> str | None:
        if not self._device.computes_values or not values:
            return None
        if any(math.isnan(v) for v in values):
            return "nan"
        if any(math.isinf(v) for v in values):
            return "inf"
        if any(v == 0.0 for v in values):
            return "zero"
        return None

    def _clean_up(self) -> None:
        """Drop gradients, then let the device collect garbage and empty its cache."""
        if self._model is not None:
            for parameter in self._model.parameters():
                parameter.grad = None
        self._device.release()

    def close(self) -> None:
        """Drop the model and give the device back; the session cannot run trials afterwards."""
        if self._closed:
            return
        self._closed = True
        self._model = None
        self._recipe.close()
        self._device.close()

    def __enter__(self) -> TrialSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _float_outputs(outputs: Any) -> dict[str, Any]:
    """The model's outputs with fp16/bf16 tensors copied to fp32 (Accelerate's ``convert_to_fp32``)."""
    return {key: _to_fp32(value) for key, value in _items(outputs)}


def _items(outputs: Any) -> Iterator[tuple[str, Any]]:
    yield from outputs.items()


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value
