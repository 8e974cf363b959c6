"""Values for the one collective of torch's fake process group that leaves its output unwritten.

The fake process group allocates nothing and sends nothing, which is what a rank's memory needs.
Its all-gather copies the local shard into every chunk of the output, but its reduce-scatter leaves
the output as ``torch.empty`` made it: whatever the allocator held. FSDP2's sharded gradients are
that output, so on devices that compute values (``simulated``, ``cuda``) the gradients, the fp16
gradient scaler's overflow check, the optimizer step and the next loss would read garbage, and the
outcome of a trial would depend on what the allocator last freed.

:class:`FakeReduceScatterValues` writes, after each fake reduce-scatter, this rank's chunk of the
input into the output: what a real reduce-scatter averaging identical inputs on every rank
leaves. It is an in-place copy into memory already allocated, so it changes no counted byte.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_REDUCE_SCATTER = torch.ops.c10d._reduce_scatter_base_.default


class FakeReduceScatterValues(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it untyped
    """After each reduce-scatter (on a fake process group), copy this rank's input chunk to the output."""

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if func is _REDUCE_SCATTER:
            output, source = args[0], args[1]
            size = output.numel()
            rank = dist.get_rank()
            with torch.no_grad():
                output.view(-1).copy_(source.view(-1).narrow(0, rank * size, size))
        return result
