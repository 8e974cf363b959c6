"""Trials on the simulated device with a tiny GPT-2: outcomes, peaks, determinism, clean-up."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from probes.devices import open_device
from probes.devices.simulated import SimulatedDevice
from probes.environment import collect_versions, maxbatch_version
from probes.errors import DeviceUnavailable, ProbeInputError
from probes.recipe import build as recipe_build
from probes.spec import ConfigTask, ModelSpec, Optimizer, Outcome, Precision, TrialRecord
from probes.trial import TrialSession

MiB = 2**20
TINY_GPT2 = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "vocab_size": 1000,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
SEQ_LEN = 64


def task(
    precision: Precision = Precision.FP32,
    checkpointing: bool = False,
    *,
    limit: int = 64 * MiB,
    headroom: int = 0,
    device: str = "simulated",
) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture="gpt2", config=TINY_GPT2),
        seq_len=SEQ_LEN,
        precision=precision,
        gradient_checkpointing=checkpointing,
        device=device,
        memory_limit_bytes=limit,
        headroom_bytes=headroom,
    )


@pytest.fixture
def session() -> Iterator[TrialSession]:
    with TrialSession(task()) as opened:
        yield opened


@pytest.fixture(scope="module")
def fp32_session() -> Iterator[TrialSession]:
    """One fp32 session shared by the tests that only run trials on it (a 12 MiB cap)."""
    with TrialSession(task(limit=12 * MiB)) as opened:
        yield opened


def run(session: TrialSession, batch_size: int, accumulation: int = 1, steps: int = 2) -> TrialRecord:
    return session.run(batch_size, accumulation_steps=accumulation, optimizer_steps=steps)


Config = tuple[Precision, bool]
CONFIGS: list[Config] = [
    (precision, checkpointing) for precision in Precision for checkpointing in (False, True)
]


@pytest.fixture(scope="module")
def matrix() -> dict[Config, tuple[TrialRecord, int]]:
    """Every config's trial at batch size 2, with the bytes of its weights (one session per config)."""
    results = {}
    for precision, checkpointing in CONFIGS:
        with TrialSession(task(precision, checkpointing)) as opened:
            record = run(opened, 2)
            results[precision, checkpointing] = (record, opened.device.mode.live_bytes)  # type: ignore[attr-defined]
    return results


def peak(record: TrialRecord) -> int:
    assert record.outcome is Outcome.FIT, record.message
    assert record.peak_reserved_bytes is not None
    return record.peak_reserved_bytes


@pytest.mark.parametrize(("precision", "checkpointing"), CONFIGS, ids=[f"{p.value}-{c}" for p, c in CONFIGS])
def test_every_precision_fits_at_a_small_size(
    matrix: dict[Config, tuple[TrialRecord, int]], precision: Precision, checkpointing: bool
) -> None:
    record, weights = matrix[precision, checkpointing]
    assert record.outcome is Outcome.FIT, record.message
    assert record.batch_size == 2
    assert record.accumulation_steps == 1
    assert record.optimizer_steps >= 2
    assert record.peak_reserved_bytes == record.peak_allocated_bytes  # no caching allocator to simulate
    assert peak(record) > 3 * weights  # weights, gradients, AdamW's two moments at least
    assert record.step_seconds is not None
    assert record.step_seconds > 0
    if precision is not Precision.FP16_MIXED:
        assert record.loss_flag is None
        assert record.optimizer_steps == 2


@pytest.mark.parametrize("precision", list(Precision))
def test_checkpointing_lowers_the_peak(
    matrix: dict[Config, tuple[TrialRecord, int]], precision: Precision
) -> None:
    assert peak(matrix[precision, True][0]) < peak(matrix[precision, False][0])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_true_peak_below_fp32(
    matrix: dict[Config, tuple[TrialRecord, int]], checkpointing: bool
) -> None:
    assert peak(matrix[Precision.BF16_TRUE, checkpointing][0]) < peak(
        matrix[Precision.FP32, checkpointing][0]
    )


def test_peak_is_deterministic_across_sessions(matrix: dict[Config, tuple[TrialRecord, int]]) -> None:
    with TrialSession(task(Precision.BF16_MIXED, False)) as opened:
        again = run(opened, 2)
    assert peak(again) == peak(matrix[Precision.BF16_MIXED, False][0])


def test_accumulation_does_not_lower_the_peak(fp32_session: TrialSession) -> None:
    one = peak(run(fp32_session, 2, accumulation=1))
    two = run(fp32_session, 2, accumulation=2)
    assert two.accumulation_steps == 2
    assert peak(two) >= one


def test_peak_grows_with_the_batch(fp32_session: TrialSession) -> None:
    peaks = [peak(run(fp32_session, size)) for size in (1, 2, 4)]
    assert peaks[0] < peaks[1] < peaks[2]


def test_oom_above_a_small_cap_then_a_clean_retry(fp32_session: TrialSession) -> None:
    small = run(fp32_session, 1)
    big = run(fp32_session, 32)
    again = run(fp32_session, 1)
    assert small.outcome is Outcome.FIT
    assert big.outcome is Outcome.OOM
    assert big.message is not None
    assert big.message.startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate")
    assert "\n" not in big.message
    assert big.peak_reserved_bytes is None
    # the OOM left nothing behind: the same trial measures the same peak
    assert again.outcome is Outcome.FIT
    assert again.peak_reserved_bytes == small.peak_reserved_bytes


def test_memory_returns_to_the_weights_after_every_trial(fp32_session: TrialSession) -> None:
    assert fp32_session.prepare() is None
    mode = fp32_session.device.mode  # type: ignore[attr-defined]
    weights = mode.live_bytes
    run(fp32_session, 2)
    assert mode.live_bytes == weights
    assert run(fp32_session, 32).outcome is Outcome.OOM
    assert mode.live_bytes == weights
    assert fp32_session.model is not None
    assert all(p.grad is None for p in fp32_session.model.parameters())


def test_over_headroom_when_the_peak_leaves_too_little_free(
    matrix: dict[Config, tuple[TrialRecord, int]],
) -> None:
    fits = peak(matrix[Precision.FP32, False][0])
    with TrialSession(task(limit=fits + MiB, headroom=2 * MiB)) as opened:
        record = run(opened, 2)
    assert record.outcome is Outcome.OVER_HEADROOM
    assert record.peak_reserved_bytes == fits


def test_weights_too_big_for_the_cap_are_an_oom_outcome_without_building(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was built")

    monkeypatch.setattr(recipe_build, "build_model", never)  # what the default builder calls
    with TrialSession(task(limit=256 * 1024)) as opened:
        first = run(opened, 1)
        second = run(opened, 1)
        assert opened.model is None
    assert first.outcome is Outcome.OOM
    assert first.message == (
        "the weights alone need 657.00 KiB, more than the 256.00 KiB this device has for tensors; "
        "nothing was allocated"
    )
    assert second == first


def test_weights_that_fit_only_unrounded_still_fail_in_the_build() -> None:
    """The size check counts raw bytes (a lower bound); the device's 512-byte rounding decides the rest."""
    with TrialSession(task()) as opened:
        assert opened.prepare() is None
        assert opened.model is not None
        raw = sum(t.nbytes for t in (*opened.model.parameters(), *opened.model.buffers()))
    with TrialSession(task(limit=raw)) as opened:
        record = run(opened, 1)
    assert record.outcome is Outcome.OOM
    assert record.message is not None
    assert record.message.startswith("building the model: OutOfMemoryError: CUDA out of memory.")


def test_training_error_is_an_error_outcome_and_the_session_survives(
    session: TrialSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert session.prepare() is None
    model = session.model
    assert model is not None
    original = model.forward

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Expected a tensor with contiguous memory format")

    monkeypatch.setattr(model, "forward", broken)
    record = run(session, 2)
    assert record.outcome is Outcome.ERROR
    assert record.message == "RuntimeError: Expected a tensor with contiguous memory format"
    assert not session.poisoned
    monkeypatch.setattr(model, "forward", original)
    assert run(session, 2).outcome is Outcome.FIT


def test_poisoning_error_marks_the_session(session: TrialSession, monkeypatch: pytest.MonkeyPatch) -> None:
    assert session.prepare() is None
    assert session.model is not None

    def illegal(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(session.model, "forward", illegal)
    record = run(session, 2)
    assert record.outcome is Outcome.ERROR
    assert session.poisoned
    after = run(session, 2)
    assert after.outcome is Outcome.ERROR
    assert after.message is not None
    assert "poisoned" in after.message


def test_fp16_nan_loss_is_flagged_and_the_partial_peak_reported() -> None:
    with TrialSession(task(Precision.FP16_MIXED)) as opened:
        assert opened.prepare() is None
        model = opened.model
        assert model is not None
        head: torch.nn.Module = model.lm_head  # type: ignore[assignment]
        head.register_forward_hook(lambda module, args, output: output * float("inf"))
        record = run(opened, 1)
    assert record.outcome is Outcome.FIT
    assert record.loss_flag == "nan"
    # the scaler skipped every step; no scale cures a NaN loss, so no extra steps ran
    assert record.optimizer_steps == 2
    assert record.message is not None
    assert "skipped every one of 2 optimizer steps" in record.message


def test_fp16_steps_skipped_by_the_scaler_are_made_up() -> None:
    """Overflowing gradients on the first 3 backward passes: the steps continue until AdamW's state exists."""
    with TrialSession(task(Precision.FP16_MIXED)) as opened:
        assert opened.prepare() is None
        model = opened.model
        assert model is not None
        head: torch.nn.Module = model.lm_head  # type: ignore[assignment]
        overflowing = iter(range(3))

        def overflow_gradient(gradient: torch.Tensor) -> torch.Tensor:
            return gradient * float("inf") if next(overflowing, None) is not None else gradient

        head.register_forward_hook(
            lambda module, args, output: output.register_hook(overflow_gradient) and None
        )
        record = run(opened, 1)
    assert record.outcome is Outcome.FIT
    assert record.loss_flag is None
    # steps 1-3 skipped, step 4 creates the state, step 5 runs with it
    assert record.optimizer_steps == 5
    assert record.message is None


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16_MIXED])
def test_an_optimizer_without_state_runs_the_steps_asked_for(precision: Precision) -> None:
    """Momentum-less SGD never creates state: there is none to wait for, and no note says so."""
    sgd = task(precision).model_copy(update={"optimizer": Optimizer.SGD})
    with TrialSession(sgd) as opened:
        record = run(opened, 1)
    assert record.outcome is Outcome.FIT
    assert record.optimizer_steps == 2
    assert record.message is None


def test_bad_arguments_raise() -> None:
    with TrialSession(task()) as opened, pytest.raises(ValueError, match="at least 1"):
        opened.run(0, accumulation_steps=1, optimizer_steps=2)


def test_closed_session_refuses_to_run() -> None:
    opened = TrialSession(task())
    opened.close()
    opened.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        run(opened, 1)


def test_simulated_device_info() -> None:
    with TrialSession(task(limit=320 * MiB, headroom=MiB)) as opened:
        info = opened.device_info()
        assert opened.device.capacity_bytes == 319 * MiB
    assert info.kind == "simulated"
    assert info.name == "simulated (320.00 MiB)"
    assert info.total_memory_bytes == 320 * MiB
    assert info.memory_limit_bytes == 320 * MiB
    assert info.bf16_supported
    assert info.compute_capability == "8.0"
    assert not info.timings_are_gpu_times


def test_open_device_dispatch() -> None:
    assert isinstance(open_device(task()), SimulatedDevice)
    assert open_device(task(device="predict")).info().kind == "predict"  # tests/probes/test_predict.py
    no_limit = task().model_copy(update={"memory_limit_bytes": None})
    with pytest.raises(ProbeInputError, match="memory_limit_bytes"):
        open_device(no_limit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_unavailable() -> None:
    with pytest.raises(DeviceUnavailable, match="cuda:0"):
        open_device(task(device="cuda:0"))


def test_versions() -> None:
    versions = collect_versions()
    assert versions.maxbatch == maxbatch_version()
    assert versions.maxbatch != "unknown"
    assert versions.python == platform.python_version()
    assert versions.torch == torch.__version__
    assert versions.transformers is not None
    assert versions.cuda == torch.version.cuda


class FakeNvml:
    """Stands in for pynvml: records calls, answers or fails as told."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, driver: bytes | str | None) -> None:
        self.driver = driver
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.driver is None:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlSystemGetDriverVersion(self) -> bytes | str:
        self.calls.append("version")
        assert self.driver is not None
        return self.driver

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")


@pytest.mark.parametrize(
    ("driver", "expected"), [(b"550.54.15", "550.54.15"), ("560.1", "560.1"), (None, None)]
)
def test_driver_version_through_nvml(
    monkeypatch: pytest.MonkeyPatch, driver: bytes | str | None, expected: str | None
) -> None:
    import sys

    from probes.environment import nvidia_driver_version

    fake = FakeNvml(driver=driver)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvidia_driver_version() == expected
    assert fake.calls == (["init"] if driver is None else ["init", "version", "shutdown"])


# -- dynamic padding (a confirmation that varies the length) -----------------------------------


def test_a_padded_batch_masks_and_ignores_the_padding_of_every_row_but_the_longest(
    session: TrialSession,
) -> None:
    assert session.prepare() is None
    batch = session._batch(4, [48], 0)
    assert batch["input_ids"].shape == (4, 48)
    assert bool(batch["attention_mask"][0].all())
    padded = batch["attention_mask"] == 0
    assert bool((batch["labels"][padded] == -100).all())
    assert bool((batch["labels"][~padded] == batch["input_ids"][~padded]).all())
    assert session._batch(4, [48], 1)["input_ids"].shape == (4, SEQ_LEN)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_worst_case_batch_is_padded_at_its_last_position_only(
    session: TrialSession, batch_size: int
) -> None:
    assert session.prepare() is None
    batch = session._batch(batch_size)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (batch_size, SEQ_LEN)
    padded = (batch["attention_mask"] == 0).nonzero().tolist()
    assert padded == [[batch_size - 1, SEQ_LEN - 1]]  # one padded position, batch size 1 included
    assert batch["labels"][-1, -1].item() == -100
    assert bool((batch["labels"][:, :-1] == batch["input_ids"][:, :-1]).all())


def test_a_trial_under_dynamic_padding_runs_its_steps_at_the_lengths_given(session: TrialSession) -> None:
    lengths = [SEQ_LEN, SEQ_LEN, 8, 40, 24, 64, 16, SEQ_LEN]
    record = session.run(2, accumulation_steps=2, optimizer_steps=4, lengths=lengths)
    assert record.outcome is Outcome.FIT
    assert record.optimizer_steps == 4
    assert record.peak_bytes is not None
    assert record.lengths == tuple(lengths)
    assert record.micro_steps_done == len(lengths)
    # step 2 ([24, 64]) holds a shorter micro-batch, so only step 3 ([64, 64]) is timed: throughput
    # stays the worst case's
    timed = session.run(
        2, accumulation_steps=2, optimizer_steps=3, lengths=[SEQ_LEN] * 2 + [24] + [SEQ_LEN] * 3
    )
    assert timed.step_seconds is not None
    varied = session.run(2, accumulation_steps=2, optimizer_steps=2, lengths=[SEQ_LEN, SEQ_LEN, 8, SEQ_LEN])
    assert varied.step_seconds is None  # the first step is never timed, the second was not the worst case
    injected = session.run(2, accumulation_steps=2, optimizer_steps=2, lengths=lengths, oom_at_micro_step=3)
    assert injected.outcome is Outcome.OOM
    assert injected.micro_steps_done == 3
    with pytest.raises(ValueError, match=r"within 1\.\.64"):
        session.run(2, accumulation_steps=2, optimizer_steps=2, lengths=[SEQ_LEN + 1])
