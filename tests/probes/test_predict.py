"""The ``predict`` device: fake tensors counted like the simulated device, to the byte.

The heart is the exactness matrix: tiny GPT-2, Llama, Mistral and Qwen2 (2 layers, 64 wide,
vocabulary 1000, sequences of 32) in all 4 precisions x 2 checkpointing settings; the trial on
``predict`` must reach the same peak as the same trial on ``simulated``, to the byte, at two
batch sizes, and the engine must find the same batch sizes. Any transformers or torch upgrade
that changes what fake tensors run (the mask shim in ``probes.devices.predict`` among them)
fails here. A fake-tensor trial costs about three real tiny ones (fake dispatch is ~100 us an
op), so the matrix runs in two worker processes, one per core.
"""

from __future__ import annotations

import concurrent.futures
import gc
import resource
import threading
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from probes.devices import open_device
from probes.devices.predict import PredictDevice, PredictGradScaler, probe_batch_masks
from probes.engine import run_probe
from probes.errors import ProbeInputError, UnknownGpu
from probes.gpus import lookup_gpu
from probes.isolate import child_context
from probes.overhead import overhead_for
from probes.spec import (
    ConfigStatus,
    ConfigTask,
    ModelSpec,
    Outcome,
    Precision,
    ProbeResult,
    ProbeSpec,
    TrialRecord,
)
from probes.trial import TrialSession

MiB = 2**20
GiB = 2**30
SEQ_LEN = 32
LIMIT = 64 * MiB  # far above any tiny trial below: the matrix measures peaks, it does not cap them
DECODER: dict[str, object] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 64,
}
TINY: dict[str, dict[str, object]] = {
    "gpt2": {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 2,
        "vocab_size": 1000,
        "n_positions": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
}
CONFIGS = [(precision, checkpointing) for precision in Precision for checkpointing in (False, True)]
CASES = [(arch, precision, checkpointing) for arch in TINY for precision, checkpointing in CONFIGS]
BATCH_SIZES = (1, 3)
Case = tuple[str, Precision, bool]
Peaks = dict[str, list[tuple[str, int | None]]]


def task(
    arch: str,
    precision: Precision = Precision.FP32,
    checkpointing: bool = False,
    *,
    device: str = "predict",
    limit: int | None = LIMIT,
    gpu: str | None = None,
    headroom: int = 0,
) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture=arch, config=TINY[arch]),
        seq_len=SEQ_LEN,
        precision=precision,
        gradient_checkpointing=checkpointing,
        device=device,
        memory_limit_bytes=limit,
        gpu=gpu,
        headroom_bytes=headroom,
    )


def trial(session: TrialSession, batch_size: int) -> TrialRecord:
    """One trial of 2 optimizer steps (AdamW's state exists in the second), one micro-batch each.

    Accumulation is the same code for every architecture; the engine test below runs it (2 micro-
    batches per step, as every engine trial does) at half the cost of running it in the matrix.
    """
    return session.run(batch_size, accumulation_steps=1, optimizer_steps=2)


def measure(case: Case) -> tuple[Case, Peaks]:
    """``case`` on both devices: (outcome, peak) per batch size. Runs in a worker process."""
    torch.set_num_threads(1)
    gc.freeze()  # what is loaded now stays: keep the collection after each trial short
    arch, precision, checkpointing = case
    peaks: Peaks = {}
    for device in ("simulated", "predict"):
        with TrialSession(task(arch, precision, checkpointing, device=device)) as session:
            records = [trial(session, size) for size in BATCH_SIZES]
        peaks[device] = [(r.outcome.value, r.peak_reserved_bytes) for r in records]
    return case, peaks


@pytest.fixture(scope="module")
def matrix() -> dict[Case, Peaks]:
    """Every case measured on both devices, in two worker processes (forked from the preloaded server)."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=child_context()) as pool:
        return dict(pool.map(measure, CASES))


@pytest.mark.parametrize(
    ("arch", "precision", "checkpointing"), CASES, ids=[f"{a}-{p.value}-{c}" for a, p, c in CASES]
)
def test_predicted_peak_equals_simulated_peak_to_the_byte(
    matrix: dict[Case, Peaks], arch: str, precision: Precision, checkpointing: bool
) -> None:
    peaks = matrix[arch, precision, checkpointing]
    simulated, predicted = peaks["simulated"], peaks["predict"]
    assert [outcome for outcome, _ in simulated] == ["fit"] * len(BATCH_SIZES)
    assert predicted == simulated
    # Not a trivial equality: the peak grows with the batch.
    assert simulated[0][1] is not None
    assert simulated[1][1] is not None
    assert simulated[1][1] > simulated[0][1]


@pytest.mark.parametrize("arch", list(TINY))
def test_checkpointing_and_bf16_move_the_predicted_peak(matrix: dict[Case, Peaks], arch: str) -> None:
    def peak(precision: Precision, checkpointing: bool) -> int:
        value = matrix[arch, precision, checkpointing]["predict"][1][1]
        assert value is not None
        return value

    for precision in Precision:
        assert peak(precision, True) < peak(precision, False)
    assert peak(Precision.BF16_TRUE, False) < peak(Precision.FP32, False)


# The cap and the headroom, at the byte.


def test_the_cap_bites_at_the_same_byte(matrix: dict[Case, Peaks]) -> None:
    arch, precision, checkpointing = "qwen2", Precision.FP16_MIXED, True
    peak = matrix[arch, precision, checkpointing]["simulated"][0][1]
    assert peak is not None
    with TrialSession(task(arch, precision, checkpointing, limit=peak)) as session:
        at_the_peak = trial(session, BATCH_SIZES[0])
    with TrialSession(task(arch, precision, checkpointing, limit=peak - 1)) as session:
        one_byte_short = trial(session, BATCH_SIZES[0])
    with TrialSession(task(arch, precision, checkpointing, limit=peak, headroom=1)) as session:
        no_headroom_left = trial(session, BATCH_SIZES[0])
    assert at_the_peak.outcome is Outcome.FIT
    assert at_the_peak.peak_reserved_bytes == peak
    assert one_byte_short.outcome is Outcome.OOM
    assert one_byte_short.message is not None
    assert "CUDA out of memory" in one_byte_short.message
    assert no_headroom_left.outcome is Outcome.OVER_HEADROOM
    assert no_headroom_left.peak_reserved_bytes == peak


# The engine on both devices: the same searches, the same answers.


def _comparable(result: ProbeResult) -> list[dict[str, object]]:
    """The searches, without timings and without the confirmation: predict runs none (fake tensors
    give the same bytes every time), so its ``confirmed`` and ``confirmation`` honestly differ, and
    without predict's own ``depth_extrapolation`` (how predict measured; simulated has none); the
    simulated confirmation's own trial repeats the answer and is dropped too, and its confirming
    trials' ``lengths`` and ``micro_steps_done`` (their peaks and outcomes stay compared)."""
    configs = []
    for config in result.model_dump(mode="json")["configs"]:
        for key in ("samples_per_second", "tokens_per_second"):
            config.pop(key)
        config.pop("confirmed")
        config.pop("confirmation")
        config.pop("depth_extrapolation")
        sizes = [t["batch_size"] for t in config["trials"]]
        if sizes and sizes[-1] in sizes[:-1]:  # a separate confirmation repeats a size
            config["trials"] = config["trials"][:-1]
        for record in config["trials"]:
            record.pop("step_seconds")
            record.pop("optimizer_steps")  # the real fp16 scaler may add make-up steps; the peak is the same
            # a confirming trial's varied lengths and micro-batch count: predict confirms nothing
            record.pop("lengths")
            record.pop("micro_steps_done")
        configs.append(config)
    return configs


def test_the_engine_finds_the_same_batch_sizes_on_both_devices() -> None:
    base = {
        "model": ModelSpec(architecture="llama", config=TINY["llama"]),
        "seq_len": SEQ_LEN,
        "precisions": ["16-mixed", "bf16-true"],
        "gradient_checkpointing": [True],
        "target_effective_batch_size": 64,
        "memory_limit_bytes": 5 * MiB,
        "confirm_optimizer_steps": 2,
        "predict_seeding": False,  # the ordinary search on both devices (seeding: test_engine.py)
        # the default varied confirmation on simulated: every trial's batch is padded
        # (probes.padding), so the confirmation's padded batches need nothing the search did not
    }
    specs = {
        device: ProbeSpec.model_validate({**base, "device": device}) for device in ("simulated", "predict")
    }
    results: dict[str, ProbeResult] = {}

    def probe(device: str) -> None:
        results[device] = run_probe(specs[device])

    threads = [threading.Thread(target=probe, args=(device,)) for device in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    simulated, predicted = results["simulated"], results["predict"]
    assert _comparable(predicted) == _comparable(simulated)
    answers = [(c.max_batch_size, c.first_failing_batch_size) for c in predicted.configs]
    assert all(best is not None and best >= 2 for best, _ in answers), answers
    assert len(set(answers)) > 1  # the configs differ, so the comparison is not of one number
    assert all(t.accumulation_steps == 2 for c in predicted.configs for t in c.trials)
    assert all(c.confirmed for c in simulated.configs)
    assert not any(c.confirmed for c in predicted.configs)
    assert all(c.depth_extrapolation is None for c in simulated.configs)
    for config in predicted.configs:  # the tiny model is no deeper than the base depths: full depth
        assert config.depth_extrapolation is not None
        assert not config.depth_extrapolation.extrapolated
    for config in simulated.configs:  # the varied steps ran and confirmed the search's own answer
        confirmation = config.confirmation
        assert confirmation is not None
        assert confirmation.varied_optimizer_steps > 0
        assert confirmation.all_fit
        assert confirmation.batch_size == config.max_batch_size
        assert not confirmation.failed_sizes
    assert predicted.device.kind == "predict"
    assert predicted.device.predicted
    assert predicted.device.overhead_bytes == 0
    assert predicted.device.total_memory_bytes == simulated.device.total_memory_bytes == 5 * MiB
    assert predicted.recommendation == simulated.recommendation


def test_a_named_gpu_through_the_engine() -> None:
    spec = ProbeSpec(
        model=ModelSpec(architecture="gpt2", config=TINY["gpt2"]),
        seq_len=SEQ_LEN,
        precisions=("bf16-true", "32-true"),
        gradient_checkpointing=(True,),
        target_effective_batch_size=8,
        device="predict",
        gpu="t4-16gb",
        max_batch_size_limit=2,
    )
    result = run_probe(spec)
    t4 = lookup_gpu("T4-16GB")
    assert result.device.name == "predict: T4-16GB"
    assert result.device.total_memory_bytes == t4.memory_bytes
    assert result.device.overhead_bytes == overhead_for(t4.memory_bytes).total_bytes
    assert result.device.compute_capability == "7.5"
    assert not result.device.bf16_supported
    bf16, fp32 = result.configs
    assert bf16.status is ConfigStatus.SKIPPED
    assert bf16.reason is not None
    assert "bf16" in bf16.reason
    assert not bf16.trials
    assert fp32.status is ConfigStatus.OK
    assert fp32.max_batch_size == 2
    assert not fp32.confirmed  # predict: deterministic, no re-run in a fresh process
    assert result.timing_note is not None


# The device itself.


def test_memory_limit_means_memory_for_tensors() -> None:
    device = PredictDevice(memory_limit_bytes=320 * MiB, headroom_bytes=MiB)
    info = device.info()
    assert info.kind == "predict"
    assert info.predicted
    assert not info.timings_are_gpu_times
    assert info.name == "predict (320.00 MiB)"
    assert info.total_memory_bytes == info.memory_limit_bytes == 320 * MiB
    assert info.overhead_bytes == 0
    assert info.compute_capability == "8.0"
    assert info.bf16_supported
    assert device.capacity_bytes == 319 * MiB
    assert device.mode.limit_bytes == 320 * MiB
    assert not device.computes_values


def test_a_gpu_means_the_whole_card_less_the_overhead() -> None:
    h100 = lookup_gpu("H100-80GB")
    device = PredictDevice(gpu=h100, headroom_bytes=GiB)
    info = device.info()
    overhead = overhead_for(h100.memory_bytes).total_bytes
    assert info.name == "predict: H100-80GB"
    assert info.total_memory_bytes == h100.memory_bytes
    assert info.memory_limit_bytes is None
    assert info.overhead_bytes == overhead > GiB
    assert info.compute_capability == "9.0"
    assert device.mode.limit_bytes == h100.memory_bytes - overhead
    # What the engine computes from the device info, and what the trial checks against.
    limit = info.memory_limit_bytes or info.total_memory_bytes
    assert device.capacity_bytes == limit - GiB - info.overhead_bytes


def test_a_gpu_and_a_limit_mean_that_much_for_tensors_on_that_card() -> None:
    t4 = lookup_gpu("T4-16GB")
    device = PredictDevice(gpu=t4, memory_limit_bytes=8 * GiB)
    info = device.info()
    assert info.name == "predict: T4-16GB (8.00 GiB for tensors)"
    assert info.total_memory_bytes == t4.memory_bytes
    assert info.memory_limit_bytes == 8 * GiB
    assert info.overhead_bytes == 0
    assert not info.bf16_supported
    assert device.capacity_bytes == 8 * GiB
    with pytest.raises(ProbeInputError, match="exceeds"):
        PredictDevice(gpu=t4, memory_limit_bytes=32 * GiB)


def test_open_device_builds_predict_and_checks_the_gpu_name() -> None:
    assert isinstance(open_device(task("gpt2")), PredictDevice)
    assert isinstance(open_device(task("gpt2", limit=None, gpu="A100-80GB")), PredictDevice)
    with pytest.raises(UnknownGpu) as caught:
        open_device(task("gpt2", limit=None, gpu="B300-288GB"))
    assert "H100-80GB" in caught.value.known
    with pytest.raises(ProbeInputError, match="memory_limit_bytes or gpu"):
        open_device(task("gpt2", limit=None))


def test_bf16_on_a_card_without_it_is_refused_before_building() -> None:
    with TrialSession(task("gpt2", Precision.BF16_MIXED, limit=None, gpu="V100-32GB")) as session:
        record = trial(session, 1)
        assert session.model is None
    assert record.outcome is Outcome.ERROR
    assert record.message is not None
    assert "7.0" in record.message


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not hasattr(resource, "getpagesize"), reason="needs /proc")
def test_the_model_is_fake_and_costs_no_memory() -> None:
    # 2 layers of Llama-7B's width: 1.6 GiB of real fp32 weights; fake ones take next to nothing.
    wide = ConfigTask(
        model=ModelSpec(architecture="llama", config={"num_hidden_layers": 2}),
        seq_len=SEQ_LEN,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device="predict",
        gpu="H100-80GB",
    )
    before = _rss_bytes()
    with TrialSession(wide) as session:
        assert session.prepare() is None
        model = session.model
        assert model is not None
        parameters = list(model.parameters())
        assert all(isinstance(p, FakeTensor) for p in parameters)
        weights = sum(p.numel() * p.element_size() for p in parameters)
        assert weights > GiB
        assert session.device.mode.live_bytes >= weights  # type: ignore[attr-defined]
        assert _rss_bytes() - before < 200 * MiB
        del model, parameters


def test_the_scaler_steps_without_reading_found_inf() -> None:
    device = PredictDevice(memory_limit_bytes=GiB)
    with device.build_context():
        weight = torch.nn.Parameter(torch.ones(8, 8))
    device.adopt([weight])
    with device.step_context():
        optimizer = torch.optim.AdamW([weight], lr=0.0, foreach=True)
        scaler = device.grad_scaler()
        assert isinstance(scaler, PredictGradScaler)
        loss = (weight * 2).sum()
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        assert optimizer.state[weight]  # the step ran: AdamW made its state
        assert isinstance(optimizer.state[weight]["exp_avg"], FakeTensor)


def test_the_mask_shim_is_narrow_and_restored() -> None:
    import transformers.masking_utils

    masking_utils: Any = transformers.masking_utils
    with PredictDevice(memory_limit_bytes=GiB).build_context():
        fake = torch.ones(2, 8, dtype=torch.bool)
        fake_of_one = torch.ones(2, 1, dtype=torch.bool)
    real = torch.ones(2, 8, dtype=torch.bool)
    originals = (masking_utils.is_tracing, masking_utils.fast_all)
    assert masking_utils.is_tracing(fake)  # what transformers does with a fake mask, unpatched
    with probe_batch_masks():
        assert not masking_utils.is_tracing(fake)
        # a probe batch of length >= 2 is padded (probes.padding): its mask is not all ones
        assert masking_utils.fast_all(fake) is False
        assert masking_utils.fast_all(fake_of_one) is True  # length 1: nothing to pad
        assert isinstance(masking_utils.fast_all(real), torch.Tensor)  # real masks: the real answer
        assert not masking_utils.fast_all(torch.zeros(2, 8, dtype=torch.bool))
    assert (masking_utils.is_tracing, masking_utils.fast_all) == originals
