"""The process group a trial child measures one rank of.

One process measures one rank of an N-rank job: DDP and FSDP2 are built on torch's *fake* process
group (backend ``"fake"``, ``FakeStore``) of ``world_size`` ranks, with this process as rank 0. Its
collectives allocate nothing and send nothing, so every buffer the wrappers allocate — sharded and
unsharded parameters, all-gather and reduce-scatter buffers, DDP's gradient buckets — is allocated
as on a real rank, and nothing else is. (FSDP2 pads every shard to the same size, so rank 0 holds
what every rank holds.)

Where a process group already exists (``torchrun``, or a one-rank NCCL group that
``bench/gpu_check.py`` opens), it is used as it is and left open: that is how the tests compare a
fake-group rank with the ranks of a real multi-process run.

The group lives as long as the trial session: opened once per child, destroyed when the session
closes. The engine's parent process never imports this module (it imports no torch).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


class World:
    """The default process group for ``world_size`` ranks: opened here (fake), or the one that exists.

    :attr:`mesh` is the one-dimensional device mesh over it that FSDP2 shards on (what ``fully_shard``
    would build by default), made here once: building a mesh compares data across ranks, which fake
    tensors cannot, so it must not be built inside the predict device's fake mode.
    """

    def __init__(self, world_size: int, device_type: str = "cpu") -> None:
        if world_size < 1:
            raise ValueError("world_size must be at least 1")
        self.world_size = world_size
        if dist.is_initialized():
            if dist.get_world_size() != world_size:
                raise RuntimeError(
                    f"a process group of {dist.get_world_size()} ranks exists; this trial needs {world_size}"
                )
            self._owned = False
        else:
            from torch.testing._internal.distributed.fake_pg import FakeStore  # registers backend "fake"

            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
            self._owned = True
        self.fake = dist.get_backend() == "fake"
        self.mesh = init_device_mesh(device_type, (world_size,))
        self._closed = False

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def close(self) -> None:
        """Destroy the group if this object opened it (an existing group is left to its owner)."""
        if self._closed:
            return
        self._closed = True
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
