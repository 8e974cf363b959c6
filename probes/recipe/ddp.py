"""DDP as HF Trainer wraps the model under ``torchrun``: through Accelerate, with Trainer's arguments.

transformers 5.24's ``Trainer._build_accelerator_args`` hands Accelerate a
``DistributedDataParallelKwargs`` whose only non-default value is ``find_unused_parameters``: the
``ddp_find_unused_parameters`` argument, else ``not gradient_checkpointing`` for a
``PreTrainedModel``. Accelerate 1.15's ``prepare_model`` then builds
``DistributedDataParallel(model, device_ids=..., **kwargs)`` with the dataclass's defaults:
``dim=0, broadcast_buffers=True, bucket_cap_mb=25, gradient_as_bucket_view=False,
static_graph=False``. (``broadcast_buffers=True`` is torch's default too, and torch 2.13 deprecates
the argument with a warning, so it is left to the default here.)

``gradient_as_bucket_view=False`` is what costs memory: the Reducer's flat buckets hold a second
copy of every gradient (allocated when DDP is built, rebuilt in the order gradients arrive at the
second iteration), beside the ``.grad`` tensors.

On ``predict`` the parameters are fake tensors, which the C++ Reducer cannot work on (it reads and
writes tensor data); :class:`ShapeReducer` stands in for it and allocates what it allocates.

Gradient accumulation as Accelerate does it for DDP: every micro-step but the last runs inside
``model.no_sync()``; gradients accumulate in ``.grad`` and the buckets are used on the last one.

On the fake process group DDP's start-up comparison of parameter shapes across ranks is skipped
(there are no other ranks, and it writes through data pointers that fake tensors lack), and the
all-reduce future carries no tensors, which the Reducer cannot use;
a communication hook stands in for it: it divides the bucket by the world size in place and
returns it (what averaging identical gradients leaves), allocating nothing. (Without a hook the
Reducer divides while copying into the bucket, with a scalar on the host; the buckets and
gradients are the same.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.parallel import DistributedDataParallel

from probes.devices.counting import labelled_allocations

BUCKET_CAP_MB = 25
"""``DistributedDataParallelKwargs.bucket_cap_mb``'s default (and torch's)."""

BUCKETS = "ddp: gradient buckets"
USED_MAP = "ddp: used-parameter map"
REBUILD_BROADCAST = "ddp: bucket rebuild broadcast"
REBUILT_BUCKETS = "ddp: rebuilt gradient buckets"
REDUCER_LABELS = (BUCKETS, USED_MAP, REBUILD_BROADCAST, REBUILT_BUCKETS)
"""What :class:`ShapeReducer`'s allocations are named in a recording (``labelled_allocations``): sized
by the whole model, they are what depth extrapolation takes from the full-depth model
(``probes.ddp_depth``)."""


def trainer_find_unused_parameters(gradient_checkpointing: bool) -> bool:
    """What Trainer passes when ``ddp_find_unused_parameters`` is not set (a ``PreTrainedModel``)."""
    return not gradient_checkpointing


def _average_in_place(world_size: int, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """The bucket (a ``dist.GradBucket``) averaged in place, as a completed future."""
    buffer = bucket.buffer()
    buffer.div_(world_size)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future


def wrap_ddp(
    model: torch.nn.Module, *, device: torch.device, find_unused_parameters: bool, fake_group: bool
) -> DistributedDataParallel:
    """``model`` in DDP with Accelerate's arguments; on a fake group, with the in-place averaging hook."""
    on_gpu = device.type == "cuda"
    fake_tensors = any(isinstance(p, FakeTensor) for p in model.parameters())
    with (
        _shapes_not_compared() if fake_group else nullcontext(),
        _shape_reducer() if fake_tensors else nullcontext(),
    ):
        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if on_gpu else None,
            output_device=device.index if on_gpu else None,
            dim=0,
            bucket_cap_mb=BUCKET_CAP_MB,
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=False,
            static_graph=False,
        )
    if fake_group and not fake_tensors:
        # DDP checks the hook's annotations against the classes; this module's are strings, a lambda's none.
        hook = lambda size, bucket: _average_in_place(size, bucket)  # noqa: E731, PLW0108
        wrapped.register_comm_hook(dist.get_world_size(), hook)
    return wrapped


class ShapeReducer:
    """Stands in for torch's C++ ``Reducer`` where the parameters are fake tensors (``predict``).

    The C++ Reducer reads and writes tensor data (bucket indices through accessors, the used-parameter
    map through ``item()``), which fake tensors do not have. Its *memory* is what this class
    reproduces, allocation for allocation, as torch 2.13's ``reducer.cpp`` makes it (and as the
    simulated device counts the real one: ``tests/probes/test_recipe_ddp.py`` compares the two to
    the byte):

    - at construction, one flat gradient bucket per group of ``bucket_indices`` (``at::empty`` of the
      group's element count, in the parameters' dtype), and with ``find_unused_parameters`` the
      used-parameter map (int32 per parameter) on the host and on the device;
    - the first forward after the first synchronised backward (when not finding unused parameters)
      rebuilds the buckets in the order the gradients became ready: the index and bucket-size
      tensors it broadcasts (host and device copies, freed at once), then the old buckets are freed
      and the new ones allocated;
    - in the backward nothing: gradients are copied into the buckets and back in place.

    DDP's own Python code (output clones of ``_DDPSink``, buffer broadcasts) runs unchanged around it.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        bucket_indices: list[list[int]],
        per_bucket_size_limits: list[int],
        process_group: object,
        expect_sparse_gradient: list[bool],
        bucket_bytes_cap: int,
        find_unused_parameters: bool,
        gradient_as_bucket_view: bool,
        param_to_name_mapping: object,
        first_bucket_bytes_cap: int,
        *_: object,
    ) -> None:
        self._params = list(params)
        self._expect_sparse = list(expect_sparse_gradient)
        self._limits = [first_bucket_bytes_cap, bucket_bytes_cap]
        self._find_unused = find_unused_parameters
        with labelled_allocations(BUCKETS):
            self._buckets = self._allocate(bucket_indices)
        self._used: list[torch.Tensor] = []
        if find_unused_parameters:
            count = len(self._params)
            with labelled_allocations(USED_MAP):
                self._used = [
                    torch.zeros(count, dtype=torch.int32, device="cpu"),
                    torch.empty(count, dtype=torch.int32, device=self._params[0].device),
                ]
        self._has_rebuilt = False
        self._expect_hooks = False
        self._ready_order: list[int] = []
        #: the parameters (indices) in the order the rebuild put them in, once it ran
        self.rebuilt_order: list[int] | None = None
        self._hooks = [
            param.register_post_accumulate_grad_hook(self._hook(index))  # type: ignore[no-untyped-call]
            for index, param in enumerate(self._params)
        ]

    def _allocate(self, bucket_indices: list[list[int]]) -> list[torch.Tensor]:
        buckets = []
        for indices in bucket_indices:
            first = self._params[indices[0]]
            count = sum(self._params[i].numel() for i in indices)
            buckets.append(torch.empty(count, dtype=first.dtype, device=first.device))
        return buckets

    def _should_rebuild(self) -> bool:
        return not self._find_unused and not self._has_rebuilt

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def ready(_: torch.Tensor) -> None:
            if self._expect_hooks and self._should_rebuild():
                self._ready_order.append(index)

        return ready

    # -- what DistributedDataParallel calls ----------------------------------------------------

    def set_logger(self, logger: object) -> None:
        return None

    def prepare_for_forward(self) -> None:
        return None

    def prepare_for_backward(self, outputs: object) -> None:
        self._expect_hooks = True

    def _rebuild_buckets(self) -> bool:
        self._expect_hooks = False
        if not self._should_rebuild() or not self._ready_order:
            return False
        self.rebuild_in_order(self._ready_order)
        return True

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The parameters DDP handed over, in its order (what bucket and order indices refer to)."""
        return list(self._params)

    def rebuild_in_order(self, order: list[int]) -> None:
        """Rebuild the buckets for the gradients ready in ``order`` (parameter indices), as the
        Reducer does at the first forward after the first synchronised backward."""
        tensors = [self._params[i] for i in order]
        sparse = self._expect_sparse or [False] * len(self._params)
        assign = getattr(dist, "_compute_bucket_assignment_by_size")  # noqa: B009 - private, unexported
        indices, _ = assign(tensors, self._limits, sparse, list(order))
        device = self._params[0].device
        with labelled_allocations(REBUILD_BROADCAST):
            broadcast = [
                torch.empty(len(order) + 1, dtype=torch.int32, device="cpu"),
                torch.empty(len(order) + 1, dtype=torch.int32, device=device),
                torch.empty(len(indices), dtype=torch.int32, device="cpu"),
                torch.empty(len(indices), dtype=torch.int32, device=device),
            ]
        del broadcast
        self._has_rebuilt = True
        self.rebuilt_order = list(order)
        self._ready_order = []
        self._buckets = []
        with labelled_allocations(REBUILT_BUCKETS):
            self._buckets = self._allocate(indices)

    def _remove_autograd_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


class _QuietLogger:
    """Stands in for the C++ DDP ``Logger``, which needs the C++ Reducer: records nothing."""

    def __init__(self, reducer: object) -> None:
        self.reducer = reducer

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextmanager
def _shape_reducer() -> Iterator[None]:
    """While DDP is built on fake parameters: :class:`ShapeReducer` for the C++ Reducer and Logger."""
    saved = {name: getattr(dist, name) for name in ("Reducer", "Logger")}
    setattr(dist, "Reducer", ShapeReducer)  # noqa: B010 - unexported torch names
    setattr(dist, "Logger", _QuietLogger)  # noqa: B010
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


@contextmanager
def _shapes_not_compared() -> Iterator[None]:
    """Skip DDP's check that every rank holds parameters of the same shapes (there are no other ranks).

    The check writes the shapes into a small tensor through its data pointer, which fake tensors do
    not have; on a real rank it allocates a few bytes per parameter and frees them at once.
    """
    module = torch.nn.parallel.distributed
    name = "_verify_param_shape_across_processes"
    original = getattr(module, name)
    setattr(module, name, lambda *_: None)
    try:
        yield
    finally:
        setattr(module, name, original)


def ddp_micro_step(model: DistributedDataParallel, index: int, count: int) -> AbstractContextManager[object]:
    """``no_sync()`` on every micro-step but the last (Accelerate's ``no_sync`` for DDP)."""
    return model.no_sync() if index < count - 1 else nullcontext()
