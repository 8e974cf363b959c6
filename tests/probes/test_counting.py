"""The byte-counting dispatch mode: exact, deterministic, and a CUDA-like OOM at the cap."""

from __future__ import annotations

import gc
import re
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from probes.devices.counting import CountingMode, out_of_memory_message
from probes.oom import is_out_of_memory


def exact(limit: int | None = None) -> CountingMode:
    return CountingMode(limit_bytes=limit, granularity_bytes=1)


def test_new_storages_are_counted_and_released_on_death() -> None:
    mode = exact()
    with mode:
        a = torch.ones(1000)
        assert mode.live_bytes == 4000
        b = a * 2
        assert mode.live_bytes == 8000
        del a
        assert mode.live_bytes == 4000
        del b
    assert mode.live_bytes == 0
    assert mode.peak_bytes == 8000
    assert mode.tracked_storages == 0


def test_views_are_not_new_memory_and_keep_their_storage_alive() -> None:
    mode = exact()
    with mode:
        a = torch.ones(10, 100)
        view = a[2:5].t()
        detached = a.detach()
        a += 1  # in place: no new memory
        assert mode.live_bytes == 4000
        del a, detached
        assert mode.live_bytes == 4000  # the view holds the storage
        del view
    assert mode.live_bytes == 0


def test_constants_enter_through_lift_fresh() -> None:
    mode = exact()
    with mode:
        constant = torch.tensor([1.0, 2.0, 3.0])
        assert mode.live_bytes == 12
        del constant
    assert mode.live_bytes == 0


def test_storage_growth_by_resize_and_out_arguments() -> None:
    mode = exact()
    with mode:
        out = torch.empty(0)
        assert mode.live_bytes == 0
        out.resize_(100)
        assert mode.live_bytes == 400
        source = torch.ones(10, 30)
        torch.mul(source, 2, out=out.resize_(0))
        assert mode.live_bytes == 1200 + 1200
        del out, source
    assert mode.live_bytes == 0


def test_registered_tensors_count_once() -> None:
    mode = exact()
    weight = torch.zeros(250)
    assert mode.register([weight, weight, weight[:10]]) == 1000
    assert mode.register([weight]) == 0
    assert mode.live_bytes == 1000
    del weight
    assert mode.live_bytes == 0


def test_granularity_rounds_every_storage_up() -> None:
    mode = CountingMode()  # CUDA allocator's 512-byte blocks
    with mode:
        small = torch.ones(1)  # 4 bytes
        assert mode.live_bytes == 512
        larger = torch.ones(129)  # 516 bytes
        assert mode.live_bytes == 512 + 1024
        empty = torch.empty(0)
        assert mode.live_bytes == 512 + 1024
        del small, larger, empty
    assert mode.live_bytes == 0


def test_reset_peak_starts_from_what_is_live() -> None:
    mode = exact()
    with mode:
        keep = torch.ones(100)
        transient = torch.ones(1000)
        del transient
        assert mode.peak_bytes == 4400
        mode.reset_peak()
        assert mode.peak_bytes == 400
        del keep


def test_cap_raises_a_typed_cuda_style_oom_and_frees_the_outputs() -> None:
    mode = exact(limit=10_000)
    with mode:
        kept = torch.ones(1000)
        with pytest.raises(torch.OutOfMemoryError) as caught:
            torch.ones(2000)
        # the failed op's output was dropped: nothing new is live, and a handler can allocate again
        assert mode.live_bytes == 4000
        assert mode.tracked_storages == 1
        again = torch.ones(1000)
        assert mode.live_bytes == 8000
        del kept, again
    message = str(caught.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 7.81 KiB. GPU 0 has a total capacity of")
    assert "of which 5.86 KiB is free" in message
    assert is_out_of_memory(caught.value)
    assert mode.peak_bytes == 8000  # the failed allocation never counted


def test_exactly_at_the_cap_fits() -> None:
    mode = exact(limit=4000)
    with mode:
        full = torch.ones(1000)
        assert mode.live_bytes == 4000
        with pytest.raises(torch.OutOfMemoryError):
            torch.ones(1)
        del full


def test_register_past_the_cap_raises_and_counts_nothing() -> None:
    mode = exact(limit=1000)
    with pytest.raises(torch.OutOfMemoryError, match=re.escape("Tried to allocate 3.91 KiB")):
        mode.register([torch.zeros(1000)])
    assert mode.live_bytes == 0


def test_a_host_allocation_failure_beyond_the_cap_is_a_simulated_oom() -> None:
    mode = exact(limit=2**30)
    with mode, pytest.raises(torch.OutOfMemoryError, match=re.escape("Tried to allocate 1024.00 TiB")):
        torch.empty(2**50, dtype=torch.uint8)  # no host has a pebibyte: the CPU allocator refuses
    assert mode.live_bytes == 0


def test_a_host_allocation_failure_below_the_cap_stays_a_host_error() -> None:
    mode = exact(limit=2**60)
    with mode, pytest.raises(RuntimeError, match="DefaultCPUAllocator") as caught:
        torch.empty(2**50, dtype=torch.uint8)
    assert not isinstance(caught.value, torch.OutOfMemoryError)


def test_oom_inside_backward_stays_typed() -> None:
    weight = torch.randn(64, 64, requires_grad=True)
    mode = exact()
    mode.register([weight])
    with mode:
        loss = (torch.ones(8, 64) @ weight).relu().pow(2).sum()
    mode.limit_bytes = mode.live_bytes + 1024  # room for small tensors, not for the 16 KiB gradient
    with mode, pytest.raises(torch.OutOfMemoryError):
        loss.backward()  # type: ignore[no-untyped-call]


def test_message_wording() -> None:
    message = out_of_memory_message(20 * 2**20, 300 * 2**20, 320 * 2**20, device_label="GPU 3")
    assert message.startswith(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 3 has a total capacity of 320.00 MiB "
        "of which 20.00 MiB is free. Of the allocated memory 300.00 MiB is allocated by PyTorch"
    )


def test_counts_fake_tensors_by_size() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = exact()
    with FakeTensorMode(), mode:
        x = torch.empty(100, 100, requires_grad=True)
        y = (x @ x).relu().sum()
        y.backward()  # type: ignore[no-untyped-call]
        assert x.grad is not None
        assert mode.live_bytes == 40000 + 40000 + 4  # x, its gradient, the loss
        del x, y
    assert mode.live_bytes == 0


# A tiny GPT-2 training step: the counted bytes against independent measures.


def tiny_gpt2() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "gpt2",
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.train()
    return model  # type: ignore[no-any-return]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    ids = torch.randint(0, 1000, (4, 32))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ids


def unique_storage_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def test_live_bytes_equal_every_live_tensor_after_training_steps() -> None:
    model = tiny_gpt2()
    mode = exact()
    mode.register([*model.parameters(), *model.buffers()])
    weights = mode.live_bytes
    assert weights == unique_storage_bytes([*model.parameters(), *model.buffers()])
    with mode:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, foreach=True)
        train_step(model, optimizer)
        ids = train_step(model, optimizer)
    gc.collect()
    # Quiescent: weights, AdamW's state (created inside the mode) and the last batch are all that lives.
    state = state_tensors(optimizer)
    assert len(state) == 3 * len(list(model.parameters()))
    assert mode.live_bytes == weights + unique_storage_bytes([*state, ids])
    # the peak held at least weights + gradients + AdamW's two moments
    params = sum(p.nbytes for p in model.parameters())
    assert mode.peak_bytes >= weights + params + 2 * params
    del optimizer, state, ids
    gc.collect()
    assert mode.live_bytes == weights


def test_peak_is_deterministic_to_the_byte() -> None:
    peaks = []
    for _ in range(2):
        model = tiny_gpt2()
        mode = CountingMode()
        mode.register([*model.parameters(), *model.buffers()])
        with mode:
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, foreach=True)
            train_step(model, optimizer)
            train_step(model, optimizer)
        peaks.append((mode.peak_bytes, mode.live_bytes))
        del model, optimizer
    assert peaks[0] == peaks[1]


def test_peak_agrees_with_the_cpu_allocator_seen_by_the_profiler() -> None:
    """The profiler's memory timeline (allocator events) is an independent count of the same steps."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_gpt2()
    mode = exact()
    mode.register([*model.parameters(), *model.buffers()])
    weights = mode.live_bytes
    torch.manual_seed(1)
    with mode:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, foreach=True)
        train_step(model, optimizer)
        train_step(model, optimizer)
    counted_peak = mode.peak_bytes - weights
    del optimizer
    gc.collect()

    torch.manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, foreach=True)
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        train_step(model, optimizer)
        train_step(model, optimizer)
    memory_profile: Any = getattr(prof, "_memory_profile", None)
    if memory_profile is None:  # a private profiler helper; skip where this torch lacks it
        pytest.skip("this torch's profiler has no _memory_profile()")
    from torch.profiler._memory_profiler import Action

    live = allocator_peak = 0
    for _, action, _, size in memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        allocator_peak = max(allocator_peak, live)
    assert counted_peak == pytest.approx(allocator_peak, rel=0.006)
