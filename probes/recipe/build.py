"""One rank's training set-up for a config: what the trial's step loop calls, holds and steps.

The order is the job's, as HF Trainer and Accelerate run it under ``torchrun``:

1. **model** — built by the session's :data:`ModelBuilder`: :func:`build_for_task` (full
   fine-tuning: :func:`probes.models.build_model` with the request's ``attn_implementation``), or
   a fine-tuning method's builder (:func:`probes.recipe.finetuning.builder`: LoRA adapters, a 4-bit
   base) — the model's own gradient checkpointing for ``single`` and ``ddp``; the device adopts
   every tensor it keeps (:func:`~probes.recipe.finetuning.resident_tensors`);
2. **strategy wrapper** — ``single``: none; ``ddp``: :func:`probes.recipe.ddp.wrap_ddp`; ``fsdp``:
   :func:`probes.recipe.fsdp.wrap_fsdp` (checkpointing through Accelerate's checkpoint wrapper);
3. **optimizer** — :func:`probes.recipe.optimizers.make_optimizer` over the *trainable* parameters,
   fresh for every trial.

Where the memory is counted: DDP is built inside the device's step context, so its buckets (made
by the Reducer in C++, through the dispatcher) are counted as they are allocated. An FSDP model is
built off the device first (on the host for ``simulated`` and ``cuda``, as fake tensors for
``predict``), as Accelerate's FSDP2 path loads it on the CPU, and only what ``fully_shard`` puts on
the device is counted: the shards, then the buffers.

Around every trial's steps, :meth:`Recipe.step_context` adds what the device needs besides its own
context: the CUDA attention-kernel emulation (``simulated`` and ``predict``, ``sdpa``), and values
for a fake process group's reduce-scatter (devices that compute values).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import torch
from transformers import PretrainedConfig

from probes.devices import TrialDevice
from probes.models import build_model, text_config, weight_dtype
from probes.recipe.attention import CudaAttentionKernels, packed_batches_take_math, parse_capability
from probes.recipe.collectives import FakeReduceScatterValues
from probes.recipe.ddp import ddp_micro_step, trainer_find_unused_parameters, wrap_ddp
from probes.recipe.finetuning import builder, resident_tensors
from probes.recipe.fsdp import fsdp_micro_step, wrap_fsdp
from probes.recipe.optimizers import make_optimizer, optimizer_constants
from probes.recipe.world import World
from probes.spec import AttnImplementation, ConfigTask, Precision, Strategy

ModelBuilder = Callable[[PretrainedConfig, ConfigTask, torch.device], torch.nn.Module]
"""Builds the model a session's trials step, on the given device, inside the device's build context
(:func:`probes.recipe.finetuning.builder` makes one per fine-tuning method)."""


def build_for_task(config: PretrainedConfig, task: ConfigTask, device: torch.device) -> torch.nn.Module:
    """The default :data:`ModelBuilder`: the task's model, fully trained (``probes.models.build_model``)."""
    return build_model(
        config,
        precision=task.precision,
        gradient_checkpointing=task.gradient_checkpointing,
        device=device,
        allow_remote_code=task.allow_remote_code,
        attn_implementation=task.attn_implementation.value,
    )


def builder_for(task: ConfigTask) -> ModelBuilder:
    """The task's :data:`ModelBuilder`: :func:`build_for_task` for full fine-tuning, else the
    fine-tuning method's (LoRA adapters, a 4-bit base) from :func:`probes.recipe.finetuning.builder`."""
    if task.finetuning.uses_adapters:
        return builder(task.finetuning)
    return build_for_task


_AUTOCAST: dict[Precision, torch.dtype] = {
    Precision.FP16_MIXED: torch.float16,
    Precision.BF16_MIXED: torch.bfloat16,
}


class Recipe:
    """Builds (:meth:`build`) and holds one rank's model, wrapper and optimizer factory for a task."""

    def __init__(
        self,
        task: ConfigTask,
        config: PretrainedConfig,
        device: TrialDevice,
        *,
        build: ModelBuilder | None = None,
    ) -> None:
        self.task = task
        self._build_model = build or builder_for(task)
        self._config = config
        self._device = device
        info = device.info()
        self._kind = info.kind
        self._world: World | None = None
        #: the module the step loop calls (the wrapper, or the model itself)
        self.model: torch.nn.Module | None = None
        #: the model inside the wrapper (its parameters are what the optimizer steps)
        self.inner: torch.nn.Module | None = None
        self._attention: CudaAttentionKernels | None = None
        capability = parse_capability(info.compute_capability)
        if self._kind != "cuda" and task.attn_implementation is AttnImplementation.SDPA:
            self._attention = CudaAttentionKernels(capability)
        #: whether each trial also runs one micro-batch with no padded position (a packed batch)
        self.measures_packed_batch = (
            task.attn_implementation is AttnImplementation.SDPA
            and packed_batches_take_math(text_config(config), self.attention_dtype, task.seq_len, capability)
        )

    @property
    def strategy(self) -> Strategy:
        return self.task.strategy

    @property
    def attention(self) -> CudaAttentionKernels | None:
        """The attention emulation (``None`` on a real GPU and for other kernels)."""
        return self._attention

    @property
    def attention_dtype(self) -> torch.dtype:
        """The dtype attention computes in: a mixed precision's low one (by autocast, or under FSDP2 by
        its policy), the weights' otherwise."""
        return _AUTOCAST.get(self.task.precision) or weight_dtype(self.task.precision)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Autocast around the forward: Accelerate's, except under FSDP2 (its policy casts instead)."""
        if self.strategy is Strategy.FSDP:
            return None
        return _AUTOCAST.get(self.task.precision)

    def build(self) -> None:
        """Build, prepare and wrap the model; raises what building raises (an OOM among them)."""
        task = self.task
        device = self._device
        if self.strategy is not Strategy.SINGLE and self._world is None:
            self._world = World(task.world_size, device.torch_device.type)
        sharded = self.strategy is Strategy.FSDP
        on_host = sharded and self._kind == "cuda"
        build_context = nullcontext() if on_host else device.build_context()
        # Under FSDP, checkpointing is Accelerate's wrapper around each layer, not the model's switch.
        as_built = task.model_copy(update={"gradient_checkpointing": False}) if sharded else task
        with build_context:
            model = self._build_model(
                self._config, as_built, torch.device("cpu") if on_host else device.torch_device
            )
        if not sharded:
            device.adopt(resident_tensors(model))
        with device.step_context():
            if self.strategy is Strategy.DDP:
                assert self._world is not None
                wrapped: torch.nn.Module = wrap_ddp(
                    model,
                    device=device.torch_device,
                    find_unused_parameters=trainer_find_unused_parameters(task.gradient_checkpointing),
                    fake_group=self._world.fake,
                )
            elif sharded:
                assert self._world is not None
                wrap_fsdp(
                    model,
                    precision=task.precision,
                    checkpointing=task.gradient_checkpointing,
                    mesh=self._world.mesh,
                )
                wrapped = model
            else:
                wrapped = model
        if sharded:
            device.adopt(resident_tensors(model))
        self.inner = model
        self.model = wrapped

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        assert self.inner is not None
        return [p for p in self.inner.parameters() if p.requires_grad]

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer as Trainer builds it; what it keeps from its construction is counted."""
        assert self.inner is not None
        optimizer = make_optimizer(self.task.optimizer, self.inner)
        constants = optimizer_constants(optimizer)
        if constants:
            self._device.adopt(constants)
        return optimizer

    def micro_step(self, index: int, count: int) -> AbstractContextManager[Any]:
        """Accelerate's gradient accumulation: no gradient sync on every micro-step but the last
        (under FSDP with ``sync_each_batch``, a sync on every micro-step)."""
        model = self.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return ddp_micro_step(model, index, count)
        if self.strategy is Strategy.FSDP and model is not None and not self.task.sync_each_batch:
            return fsdp_micro_step(model, index, count)
        return nullcontext()

    def step_context(self) -> AbstractContextManager[Any]:
        """What the steps run in besides the device's own context (outermost first)."""
        stack = ExitStack()
        if self._attention is not None:
            stack.enter_context(self._attention)
        if self._world is not None and self._world.fake and self._device.computes_values:
            stack.enter_context(FakeReduceScatterValues())  # type: ignore[no-untyped-call]
        return stack

    def close(self) -> None:
        """Drop the model and close the process group this recipe opened."""
        self.model = None
        self.inner = None
        if self._world is not None:
            self._world.close()
            self._world = None
