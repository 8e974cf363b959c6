"""The anchors: Lightning's and Accelerate's batch-size finders, run on our model under our memory cap.

``run_job(job)`` runs one finder once, in the calling process, and is meant to be called in a fresh
process per (case, finder) by :mod:`bench.compare_finders`. It builds the same model the probe builds
(:func:`probes.models.build_model`, from the same :class:`~probes.spec.ConfigTask`), opens the same
device (:func:`probes.devices.open_device`: on ``simulated`` a :class:`~probes.devices.counting.CountingMode`
capped at the task's memory limit, with the parameters registered as a trial registers them; on
``cuda`` the caching allocator under ``set_per_process_memory_fraction``) and runs the finder inside
the device's step context, so every tensor the finder allocates is charged against the cap and the
counting mode raises the CUDA-worded ``torch.OutOfMemoryError`` that both libraries recognise
(:func:`oom_recognised` checks it against their own matchers).

The training step each finder runs is as close to ours (``probes.trial``) as its API allows:
AdamW (``foreach=True``, lr 0), the same precision through autocast, activation checkpointing on the
model, every row at the full ``seq_len`` with labels = inputs, gradient accumulation 2 and gradient
clipping at 1.0. What differs is listed in ``bench/RESULTS.md``.

This module imports torch, transformers, Lightning and Accelerate (the last two lazily, so a missing
one only skips its finder).
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

import torch
import transformers

from probes.devices import TrialDevice, open_device
from probes.devices.counting import CountingMode
from probes.models import build_model, load_config, vocab_size
from probes.recipe.optimizers import make_optimizer
from probes.spec import ConfigTask, Optimizer, Precision
from probes.trial import MAX_GRAD_NORM

Finder = Literal["lightning-power", "lightning-binsearch", "accelerate"]

ACCELERATE_DEFAULT_START = 128
"""``find_executable_batch_size``'s default ``starting_batch_size``."""

_DATASET_LENGTH = 1 << 30
"""Rows in the random-token dataset: larger than any batch Lightning tries (its ``max_val`` is 8192)."""

_ACCELERATE_PRECISION = {
    Precision.FP32: "no",
    Precision.BF16_MIXED: "bf16",
    Precision.FP16_MIXED: "fp16",
    Precision.BF16_TRUE: "no",  # the weights are built in bf16; no autocast
}


@dataclass(frozen=True)
class AnchorJob:
    """One finder on one case; everything a fresh process needs (picklable)."""

    finder: Finder
    task_json: str
    #: Accelerate's ``starting_batch_size`` (``None``: its default, 128); unused by Lightning
    start: int | None = None
    accumulation_steps: int = 2
    #: optimizer steps per Accelerate attempt (Lightning uses its own default, 3)
    optimizer_steps: int = 2


@dataclass
class AnchorTrial:
    """One batch size a finder tried."""

    batch_size: int
    outcome: str = "oom"  # "fit" once the attempt finished
    seconds: float = 0.0


@dataclass
class AnchorResult:
    finder: str
    found: int | None = None
    trials: list[AnchorTrial] = field(default_factory=list)
    #: the finder call alone (model already built, trainer or accelerator already made)
    seconds: float = 0.0
    #: building the model and the trainer or accelerator
    setup_seconds: float = 0.0
    #: whether the library's own OOM matcher accepts the counting mode's error (``None`` on cuda)
    oom_recognised: bool | None = None
    error: str | None = None


class RandomTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Rows of random token ids at the full sequence length; labels are the inputs, no padding."""

    def __init__(self, seq_len: int, vocab: int, length: int = _DATASET_LENGTH) -> None:
        self.seq_len = seq_len
        self.vocab = vocab
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.seq_len,))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _counting_oom() -> torch.OutOfMemoryError:
    """The exact error the simulated device raises, produced by a real over-cap allocation."""
    mode = CountingMode(limit_bytes=1024)
    try:
        with mode:
            torch.empty(4096, dtype=torch.uint8)
    except torch.OutOfMemoryError as exc:
        return exc
    raise AssertionError("the counting mode did not raise past its cap")


def oom_recognised(finder: Finder) -> bool:
    """Whether ``finder``'s library takes the counting mode's error for an out-of-memory error."""
    exc = _counting_oom()
    if finder.startswith("lightning"):
        from lightning.pytorch.utilities.memory import is_oom_error

        return bool(is_oom_error(exc))
    from accelerate.utils.memory import should_reduce_batch_size  # type: ignore[import-untyped]

    return bool(should_reduce_batch_size(exc))


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _build(task: ConfigTask) -> tuple[TrialDevice, torch.nn.Module, int]:
    """The task's device and model, the parameters charged to the device as a trial charges them."""
    device = open_device(task)
    config = load_config(task.model, allow_remote_code=False)
    with device.build_context():
        model = build_model(
            config,
            precision=task.precision,
            gradient_checkpointing=task.gradient_checkpointing,
            device=device.torch_device,
        )
    device.adopt([*model.parameters(), *model.buffers()])
    return device, model, vocab_size(config)


def run_job(job: AnchorJob) -> AnchorResult:
    """Run one finder once in this process (see the module docstring)."""
    _quiet()
    task = ConfigTask.model_validate_json(job.task_json)
    if not task.device.startswith("cuda"):
        torch.set_num_threads(1)  # as the probe's trial children do on CPU devices
    result = AnchorResult(finder=job.finder)
    try:
        if task.device == "simulated":
            result.oom_recognised = oom_recognised(job.finder)
        started = time.perf_counter()
        device, model, vocab = _build(task)
        if job.finder.startswith("lightning"):
            _run_lightning(job, task, device, model, vocab, result, started)
        else:
            _run_accelerate(job, task, device, model, vocab, result, started)
    except Exception as exc:  # noqa: BLE001 - any failure is reported in the result, not raised
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return result


def _run_lightning(
    job: AnchorJob,
    task: ConfigTask,
    device: TrialDevice,
    model: torch.nn.Module,
    vocab: int,
    result: AnchorResult,
    started: float,
) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner.tuning import Tuner

    trials = result.trials
    starts: list[float] = []
    seq_len = task.seq_len

    class FinderModule(pl.LightningModule):
        """The HF model as a LightningModule with a ``batch_size`` attribute for the tuner."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.batch_size = 2

        def train_dataloader(self) -> torch.utils.data.DataLoader[dict[str, torch.Tensor]]:
            return torch.utils.data.DataLoader(
                RandomTokens(seq_len, vocab), batch_size=self.batch_size, shuffle=False, num_workers=0
            )

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss: torch.Tensor = self.model(**batch).loss
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(Optimizer.ADAMW_TORCH, self.model)

        def on_train_start(self) -> None:
            # A trial is one run of the fit loop; one that never reaches on_train_end ran out of memory
            # (Lightning re-raises any other error, which ends the whole search).
            trials.append(AnchorTrial(batch_size=int(self.batch_size)))
            starts.append(time.perf_counter())

        def on_train_end(self) -> None:
            trials[-1].outcome = "fit"

    cuda = task.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="bench-lightning-") as root:
        trainer = pl.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=[int(task.device.split(":")[1])] if cuda else 1,
            precision=task.precision.value,  # Lightning's names are ours
            accumulate_grad_batches=job.accumulation_steps,
            gradient_clip_val=MAX_GRAD_NORM,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        module = FinderModule()
        mode = "binsearch" if job.finder == "lightning-binsearch" else "power"
        result.setup_seconds = time.perf_counter() - started
        began = time.perf_counter()
        try:
            with device.step_context():
                found = Tuner(trainer).scale_batch_size(module, mode=mode)
        finally:
            ended = time.perf_counter()
            result.seconds = ended - began
            # A trial lasts until the next one starts (Lightning's own work between trials included).
            for trial, begin, end in zip(trials, starts, [*starts[1:], ended], strict=True):
                trial.seconds = end - begin
    result.found = found


def _random_batch(batch_size: int, seq_len: int, vocab: int, where: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=where)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _run_accelerate(
    job: AnchorJob,
    task: ConfigTask,
    device: TrialDevice,
    model: torch.nn.Module,
    vocab: int,
    result: AnchorResult,
    started: float,
) -> None:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.utils import find_executable_batch_size  # type: ignore[import-untyped]

    cuda = task.device.startswith("cuda")
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=_ACCELERATE_PRECISION[task.precision],
        gradient_accumulation_steps=job.accumulation_steps,
    )
    where = device.torch_device
    trials = result.trials
    micro_steps = job.optimizer_steps * job.accumulation_steps

    def attempt(batch_size: int) -> int:
        """One attempt as HF Trainer's retry loop makes it: free, fresh optimizer, prepare, train."""
        trial = AnchorTrial(batch_size=batch_size)
        trials.append(trial)
        began = time.perf_counter()
        try:
            accelerator.free_memory()
            prepared, optimizer = accelerator.prepare(model, make_optimizer(Optimizer.ADAMW_TORCH, model))
            for _ in range(micro_steps):
                batch = _random_batch(batch_size, task.seq_len, vocab, where)
                with accelerator.accumulate(prepared):
                    loss = prepared(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(prepared.parameters(), MAX_GRAD_NORM)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                del batch, loss
            trial.outcome = "fit"
        finally:
            trial.seconds = time.perf_counter() - began
        return batch_size

    start = job.start if job.start is not None else ACCELERATE_DEFAULT_START
    finder = find_executable_batch_size(attempt, starting_batch_size=start)
    result.setup_seconds = time.perf_counter() - started
    began = time.perf_counter()
    with device.step_context():
        found = finder()
    result.seconds = time.perf_counter() - began
    result.found = int(found)


PRELOADED_MODULES = ("lightning.pytorch", "lightning.pytorch.tuner", "accelerate", "accelerate.utils.memory")
"""Imported by :func:`preload` (where installed) so that processes forked afterwards start with them."""


def preload() -> dict[str, bool]:
    """Import the finders' libraries (and the probe worker's preloads) now; which ones are installed.

    Only imports: no tensor op runs, so a process forked afterwards starts clean.
    """
    importlib.import_module("probes.worker")
    found: dict[str, bool] = {}
    for name in PRELOADED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            found[name.split(".")[0]] = False
        else:
            found.setdefault(name.split(".")[0], True)
    return found


def child_main(job: AnchorJob, conn: Connection, log_path: str | None) -> None:
    """Entry point of a fresh anchor process: run the job, send the result, exit.

    The libraries' console output goes to ``log_path`` (appended), keeping the benchmark's stdout clean.
    """
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        conn.send(run_job(job))
    finally:
        conn.close()
