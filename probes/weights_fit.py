"""Can the weights alone fit on the device? Decided before a trial allocates anything.

A trial's peak includes every weight the model keeps on the device, so when the weights alone
need more than the device has for tensors, no batch size can train there: the trial is ``oom``
at once, with the reason (“the weights alone need 2.64 GiB, more than the 64.00 MiB this device
has for tensors”), and nothing is built. When they fit in the device but not under the capacity a
passing trial may reach (the memory less the headroom), the outcome is ``over_headroom``.

The bytes come from :func:`probes.models.count_weights`: the model built on the meta device
(shapes, no storage), so a config with a width of 10**6 or 10**9 positions costs milliseconds and
no memory to refuse.

The check must never refuse a job that could fit: a :data:`WeightsFloor` is a *lower bound* of
what one process keeps on the device for its weights. :func:`weights_floor_bytes` is the floor of
the setup the engine builds by default, per strategy (an FSDP rank holds its share of the
parameters); :func:`finetuning_weights_floor` gives the floor of a fine-tuning method, to pass to
:class:`~probes.trial.TrialSession` with its builder.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from transformers import PretrainedConfig

from probes.finetuning_spec import FinetuningSpec
from probes.models import WeightCount, count_weights, weight_dtype
from probes.spec import ConfigTask, DeviceInfo, Outcome, Strategy
from probes.units import format_bytes

WeightsFloor = Callable[[WeightCount, ConfigTask], int]
"""A lower bound of the bytes a setup keeps on the device for its weights, from the meta count
(taken in :func:`~probes.models.weight_dtype` of the task's precision)."""


def weights_floor_bytes(count: WeightCount, task: ConfigTask) -> int:
    """A lower bound of the bytes one process's model keeps on the device before any step of ``task``.

    ``count`` is counted in the dtype :func:`~probes.models.weight_dtype` gives, which is what the
    build allocates for every parameter and buffer. By strategy, each still a lower bound:

    - ``single`` and ``ddp``: every parameter and buffer (every DDP rank holds the whole model; the
      Reducer's buckets come on top).
    - ``fsdp`` over ``world_size`` ranks: parameters ``ceil(parameter_bytes / world_size)`` per rank
      (FSDP2 shards every parameter dimension-0 across ranks; the unsharded copy a layer gathers
      for its forward comes on top), buffers whole (not sharded).
    - ``lora``, ``qlora``: :func:`finetuning_weights_floor`, passed with their builder.
    """
    if task.strategy is Strategy.FSDP and task.world_size > 1:
        return math.ceil(count.parameter_bytes / task.world_size) + count.buffer_bytes
    return count.total_bytes


def finetuning_weights_floor(spec: FinetuningSpec) -> WeightsFloor:
    """The floor of a fine-tuning method (:mod:`probes.recipe.finetuning` builds it).

    ``full`` and ``lora``: :func:`weights_floor_bytes` (the base is built in the precision's weight
    dtype; the adapters come on top). ``qlora``: half a byte a parameter: the linear layers' weights
    are 4-bit (their quantisation constants come on top), every other weight is kept in 2 or 4
    bytes; the buffers are left out, since the base is built in the compute dtype, which may be
    narrower than the dtype they were counted in.
    """
    if not spec.quantized:
        return weights_floor_bytes

    def four_bit(count: WeightCount, task: ConfigTask) -> int:
        del task
        return math.ceil(count.parameters / 2)

    return four_bit


def tensor_memory_bytes(device: DeviceInfo) -> int:
    """The memory the device has for tensors: the limit (else the total) less predicted overhead."""
    limit = device.memory_limit_bytes if device.memory_limit_bytes is not None else device.total_memory_bytes
    return limit - device.overhead_bytes


def weights_verdict(need: int, count: WeightCount, device: DeviceInfo) -> tuple[Outcome, str] | None:
    """``(oom or over_headroom, why)`` when weights of at least ``need`` bytes cannot fit, else ``None``."""
    memory = tensor_memory_bytes(device)
    at_least = "" if count.exact else "at least "
    how = f" ({count.describe()})" if count.describe() else ""
    needs = f"the weights alone need {at_least}{format_bytes(need)}{how}"
    if need > memory:
        return (
            Outcome.OOM,
            f"{needs}, more than the {format_bytes(memory)} this device has for tensors; "
            "nothing was allocated",
        )
    capacity = device.capacity_bytes
    if capacity is not None and need > capacity:
        return (
            Outcome.OVER_HEADROOM,
            f"{needs}, more than the {format_bytes(capacity)} a trial may use "
            f"({format_bytes(memory)} less the headroom); nothing was allocated",
        )
    return None


def check_weights(
    config: PretrainedConfig,
    task: ConfigTask,
    device: DeviceInfo,
    floor: WeightsFloor = weights_floor_bytes,
) -> tuple[Outcome, str] | None:
    """The outcome every trial of ``task`` would have because of its weights alone, or ``None``.

    Counts on the meta device only as far as it must: when the first layers already exceed the
    device's memory for tensors, the rest are not built (:func:`~probes.models.count_weights`).
    """
    count = count_weights(
        config,
        dtype=weight_dtype(task.precision),
        allow_remote_code=task.allow_remote_code,
        enough_bytes=tensor_memory_bytes(device),
    )
    return weights_verdict(floor(count, task), count, device)
