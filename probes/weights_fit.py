"""Can the weights alone fit on the device? Decided before a trial allocates anything.

A trial's peak includes every weight the model keeps on the device, so when the weights alone
need more than the device has for tensors, no batch size can train there: the trial is ``oom``
at once, with the reason (“the weights alone need 2.64 GiB, more than the 64.00 MiB this device
has for tensors”), and nothing is built. When they fit in the device but not under the capacity a
passing trial may reach (the memory less the headroom), the outcome is ``over_headroom``.

The bytes come from :func:`probes.models.count_weights`: the model built on the meta device
(shapes, no storage), so a config with a width of 10**6 or 10**9 positions costs milliseconds and
no memory to refuse.

The check must never refuse a job that could fit: :func:`weights_floor_bytes` is a *lower bound*
of what one process keeps on the device for its weights, and that is where the strategies and
fine-tuning methods refine it as they arrive (see its docstring).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from probes.models import WeightCount, count_weights, weight_dtype
from probes.spec import ConfigTask, DeviceInfo, Outcome
from probes.units import format_bytes


def weights_floor_bytes(count: WeightCount, task: ConfigTask) -> int:
    """A lower bound of the bytes one process's model keeps on the device before any step of ``task``.

    Today the engine builds one setup: full fine-tuning in one process, every parameter in the
    dtype :func:`~probes.models.weight_dtype` gives and every buffer on the device, which is
    exactly what the build allocates (``count`` counted in that dtype). How the setups in progress
    refine it, each still a lower bound:

    - ``ddp``: the same (every rank holds the whole model; the Reducer's buckets come on top).
    - ``fsdp`` over ``N`` ranks: parameters ``ceil(parameter_bytes / N)`` per rank (FSDP2 shards
      every parameter dimension-0 across ranks; the unsharded copy a layer gathers for its forward
      comes on top), buffers whole (not sharded).
    - ``lora``: the same as full (the frozen base is built in the same dtype; adapters come on top).
    - ``qlora``: the linear layers' weights at 4 bits (``parameter_count / 2`` bytes for those, the
      quantisation constants on top) and the rest (embeddings, norms, output head) in the compute
      dtype; a bound that needs no per-layer split: ``parameters / 2`` bytes plus the buffers.

    The recipe that builds a setup is the place that knows it: it should offer its floor, and the
    trial should take the recipe's floor instead of this one.
    """
    del task  # one setup so far; see the docstring for how the others refine the floor
    return count.total_bytes


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
    config: PretrainedConfig, task: ConfigTask, device: DeviceInfo
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
    return weights_verdict(weights_floor_bytes(count, task), count, device)
