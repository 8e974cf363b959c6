"""LoRA and QLoRA probes: what is built, what is counted, what is emitted, and where it can run.

Tiny GPT-2, Llama and Qwen2 shapes (2 layers, 64 wide, vocabulary 1000) built from configs. The
trials use ``probes.trial``'s step (forward, backward, clip, ``AdamW(foreach=True)``; 2 optimizer
steps of 2 micro-batches) through :class:`~probes.trial.TrialSession` with the finetuning builder.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from probes.devices import counting
from probes.devices.counting import CountingMode
from probes.errors import ProbeInputError
from probes.finetuning_spec import (
    ALL_LINEAR,
    FinetuningMethod,
    FinetuningSpec,
    kbit_preparation_kwargs,
    missing_packages,
    quantization_kwargs,
)
from probes.isolate import child_context
from probes.models import load_config
from probes.recipe import finetuning
from probes.recipe.finetuning import (
    build_finetuning_model,
    parameter_counts,
    peft_config_kwargs,
    resident_tensors,
    unavailable_reason,
)
from probes.recipe.optimizers import make_optimizer
from probes.spec import ConfigTask, ModelSpec, Optimizer, Outcome, Precision, TrialRecord
from probes.trial import TrialSession
from tests.probes.test_predict import TINY

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

MiB = 2**20
SEQ_LEN = 32
LIMIT = 64 * MiB
LORA = FinetuningSpec(method=FinetuningMethod.LORA)
QLORA = FinetuningSpec(method=FinetuningMethod.QLORA)
FULL = FinetuningSpec()
ARCHS = ("gpt2", "llama", "qwen2")


def task(
    arch: str,
    precision: Precision = Precision.FP32,
    checkpointing: bool = False,
    *,
    device: str = "simulated",
    limit: int = LIMIT,
) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture=arch, config=TINY[arch]),
        seq_len=SEQ_LEN,
        precision=precision,
        gradient_checkpointing=checkpointing,
        device=device,
        memory_limit_bytes=limit,
    )


def session(spec: FinetuningSpec, arch: str, *args: Any, **kwargs: Any) -> TrialSession:
    return TrialSession(task(arch, *args, **kwargs), build=finetuning.builder(spec))


def trial(session: TrialSession, batch_size: int = 2) -> TrialRecord:
    """probes.trial's step shape: 2 optimizer steps of 2 micro-batches each."""
    return session.run(batch_size, accumulation_steps=2, optimizer_steps=2)


def build(spec: FinetuningSpec, arch: str, precision: Precision = Precision.FP32, **kwargs: Any) -> nn.Module:
    config = load_config(ModelSpec(architecture=arch, config=TINY[arch]), allow_remote_code=False)
    defaults: dict[str, Any] = {"precision": precision, "gradient_checkpointing": False, "device": "cpu"}
    return build_finetuning_model(config, spec, **{**defaults, **kwargs})


def meta_model(arch: str) -> nn.Module:
    """The plain transformers model for ``arch`` on the meta device (no memory, no values)."""
    config = load_config(ModelSpec(architecture=arch, config=TINY[arch]), allow_remote_code=False)
    with torch.device("meta"):
        model: nn.Module = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return model


# The spec: defaults, bounds, names.


def test_spec_defaults_and_json_round_trip() -> None:
    spec = FinetuningSpec()
    assert spec.method is FinetuningMethod.FULL
    assert (spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.lora_target_modules) == (
        16,
        32,
        0.05,
        ALL_LINEAR,
    )
    assert not spec.uses_adapters
    assert QLORA.uses_adapters
    assert QLORA.quantized
    custom = FinetuningSpec(method="lora", lora_r=8, lora_target_modules=["q_proj", "v_proj", "q_proj"])
    assert custom.lora_target_modules == ("q_proj", "v_proj")
    assert FinetuningSpec.model_validate_json(custom.model_dump_json()) == custom


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_target_modules": []}, "at least one module"),
        ({"lora_target_modules": ["q_proj", " "]}, "empty module name"),
        ({"lora_target_modules": ["all-linear", "q_proj"]}, "cannot be combined"),
        ({"method": "dora"}, "method"),
        ({"lora_rank": 8}, "lora_rank"),
    ],
)
def test_spec_rejects_with_a_clear_message(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FinetuningSpec(**fields)


def test_spec_reads_the_cli_spellings() -> None:
    assert FinetuningSpec(lora_target_modules=" All-Linear ").lora_target_modules == ALL_LINEAR
    assert FinetuningSpec(lora_target_modules="q_proj, v_proj").lora_target_modules == ("q_proj", "v_proj")


def test_the_spec_module_imports_no_torch() -> None:
    code = "import sys, probes.finetuning_spec; sys.exit('torch' in sys.modules or 'peft' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# What is emitted constructs against the installed peft and transformers, without warnings.


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft reads it
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_config_kwargs_construct_and_match_peft_all_linear(arch: str) -> None:
    lora = build(LORA, arch)
    kwargs = peft_config_kwargs(LORA, lora)
    assert json.loads(json.dumps(kwargs)) == kwargs
    config = peft.LoraConfig(**kwargs)  # filterwarnings=error: a warning fails here
    assert config.r == 16
    assert config.lora_alpha == 32
    # the written-out names wrap exactly the modules peft's own "all-linear" wraps
    ours = {name for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    base = meta_model(arch)
    reference = peft.get_peft_model(
        base,
        peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", fan_in_fan_out=arch == "gpt2"),
    )
    theirs = {name for name, module in reference.named_modules() if hasattr(module, "lora_A")}
    assert ours == theirs
    assert ours
    # the same kwargs from the base before wrapping
    fresh = meta_model(arch)
    assert peft_config_kwargs(LORA, fresh) == kwargs


def test_gpt2_conv1d_targets_set_fan_in_fan_out_and_a_quantized_gpt2_does_not() -> None:
    assert peft_config_kwargs(LORA, build(LORA, "gpt2"))["fan_in_fan_out"] is True
    # QLoRA turns GPT-2's Conv1D layers into (transposed) 4-bit Linear layers, as transformers does
    assert "fan_in_fan_out" not in peft_config_kwargs(QLORA, build(QLORA, "gpt2"))


@pytest.mark.parametrize("precision", list(Precision))
def test_quantization_kwargs_construct_a_bits_and_bytes_config(precision: Precision) -> None:
    kwargs = quantization_kwargs(precision)
    assert json.loads(json.dumps(kwargs)) == kwargs
    config = BitsAndBytesConfig(**kwargs)  # type: ignore[no-untyped-call]
    assert config.load_in_4bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    expected = {
        Precision.FP32: torch.float32,
        Precision.FP16_MIXED: torch.float16,
        Precision.BF16_MIXED: torch.bfloat16,
        Precision.BF16_TRUE: torch.bfloat16,
    }[precision]
    assert config.bnb_4bit_compute_dtype == expected


def test_the_qlora_base_is_quantized_where_transformers_quantizes() -> None:
    """The same modules become 4-bit as transformers' bitsandbytes quantizer would convert."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    for arch in ARCHS:
        ours = {name for name, m in build(QLORA, arch).named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        ours = {name.removeprefix("base_model.model.").removesuffix(".base_layer") for name in ours}
        model = meta_model(arch)
        config = BitsAndBytesConfig(**quantization_kwargs(Precision.BF16_MIXED))  # type: ignore[no-untyped-call]
        replace_with_bnb_linear(model, get_keys_to_not_convert(model), quantization_config=config)
        theirs = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert ours == theirs, arch
        assert ours


def test_kbit_preparation_kwargs_are_accepted() -> None:
    model = build(FULL, "llama")
    finetuning.quantize_base(model, compute_dtype=torch.float32, device=torch.device("cpu"))
    prepared = peft.prepare_model_for_kbit_training(model, **kbit_preparation_kwargs())
    assert not any(p.requires_grad for p in prepared.parameters())


# The prepared model: frozen base, adapters only, 4-bit storage.


@pytest.mark.parametrize("spec", [LORA, QLORA], ids=["lora", "qlora"])
def test_only_adapters_train_and_get_gradients_and_optimizer_state(spec: FinetuningSpec) -> None:
    model = build(spec, "llama", Precision.BF16_MIXED)
    trainable = [p for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in trainable)  # peft's autocast_adapter_dtype
    optimizer = make_optimizer(Optimizer.ADAMW_TORCH, model)
    ids = torch.randint(0, 1000, (2, SEQ_LEN))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids)["loss"]
    loss.backward()
    optimizer.step()
    assert {id(p) for p in optimizer.state} == {id(p) for p in trainable}
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_parameter_counts() -> None:
    full, lora, qlora = (parameter_counts(build(spec, "llama")) for spec in (FULL, LORA, QLORA))
    assert full.frozen_parameters == 0
    assert lora.frozen_parameters == full.trainable_parameters
    assert qlora.frozen_parameters == full.trainable_parameters
    # r (in + out) per adapted layer: 7 linear layers per decoder layer, 2 layers
    h, i, kv = 64, 128, 32
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    assert lora.trainable_parameters == 2 * 16 * sum(a + b for a, b in shapes)
    assert qlora.trainable_parameters == lora.trainable_parameters
    assert qlora.quantized_parameters == 2 * sum(a * b for a, b in shapes)
    assert lora.trainable_bytes == 4 * lora.trainable_parameters
    assert qlora.frozen_bytes < lora.frozen_bytes


def test_qlora_weights_are_half_a_byte_per_parameter_plus_their_quantisation_state() -> None:
    """A 4096 x 1024 layer: 0.5 B/param packed, 1/64 B/param of 8-bit block scales, and the rest."""
    out_features, in_features = 4096, 1024
    numel = out_features * in_features
    layer = finetuning._quantized_linear(
        nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16),
        compute_dtype=torch.bfloat16,
        device=torch.device("cpu"),
    )
    counts = parameter_counts(layer)
    blocks = numel // 64
    expected = (
        numel // 2  # two NF4 values per byte
        + blocks  # one 8-bit scale per block of 64 (double quantisation)
        + 4 * -(-blocks // 256)  # one fp32 scale per 256 of those
        + 4 * 16  # the NF4 code table
        + 4 * 256  # the 8-bit code table of the scales
        + 4  # the scales' offset
    )
    assert counts.quantized_parameters == numel
    assert counts.frozen_bytes == expected
    assert 0.5 < counts.frozen_bytes / numel < 0.52
    # every one of those tensors is counted when the device adopts the layer
    mode = CountingMode(granularity_bytes=1)
    mode.register(resident_tensors(layer))
    assert mode.live_bytes == expected


@pytest.mark.parametrize("device", ["simulated", "predict"])
def test_a_4bit_layer_counts_its_dequantised_weight_in_forward_and_backward(device: str) -> None:
    """``gemm_4bit`` dequantises the whole weight inside one op; the count includes it."""
    out_features, in_features, rows = 2048, 512, 600
    fake = FakeTensorMode() if device == "predict" else None
    with fake or torch.device("cpu"):
        layer = finetuning._quantized_linear(
            nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16),
            compute_dtype=torch.bfloat16,
            device=torch.device("cpu"),
        )
        inputs = torch.randn(rows, in_features, dtype=torch.bfloat16, requires_grad=True)
    mode = CountingMode(granularity_bytes=1)
    mode.register([*resident_tensors(layer), inputs])
    live = mode.live_bytes
    with fake or torch.device("cpu"), mode:
        output = layer(inputs)
        forward = mode.peak_bytes - live
        weight, scales, result = (
            out_features * in_features * 2,
            out_features * in_features // 64 * 4,
            output.nbytes,
        )
        assert forward == result + weight + scales
        mode.reset_peak()
        after_forward = mode.live_bytes
        output.sum().backward()
    assert mode.peak_bytes - after_forward >= weight + inputs.nbytes


@pytest.mark.slow
def test_the_step_peak_includes_the_forward_transient() -> None:
    """One wide layer, few tokens: without counting inside gemm_4bit the peak would be lower."""
    wide = {"num_hidden_layers": 1, "hidden_size": 512, "intermediate_size": 2048, "vocab_size": 256}
    config = {**TINY["llama"], **wide}
    peaks = []
    for inside in (True, False):
        case = ConfigTask(
            model=ModelSpec(architecture="llama", config=config),
            seq_len=16,
            precision=Precision.BF16_MIXED,
            gradient_checkpointing=False,
            device="simulated",
            memory_limit_bytes=LIMIT,
        )
        with TrialSession(case, build=finetuning.builder(QLORA)) as qlora:
            assert qlora.prepare() is None
            saved = dict(counting._COUNTED_INSIDE)
            if not inside:
                counting._COUNTED_INSIDE.clear()
            try:
                peaks.append(trial(qlora, 1).peak_reserved_bytes)
            finally:
                counting._COUNTED_INSIDE.update(saved)
    assert peaks[0] is not None
    assert peaks[1] is not None
    assert peaks[0] > peaks[1]


# Counted like the CPU allocator; less than full fine-tuning.


def _lora_steps(model: nn.Module) -> None:
    """probes.trial's loop in fp32: batches prefetched, 2 x (2 micro-batches, clip, step, zero_grad)."""
    optimizer = make_optimizer(Optimizer.ADAMW_TORCH, model)
    for _ in range(2):
        batches = [torch.randint(0, 1000, (2, SEQ_LEN)) for _ in range(2)]
        for ids in batches:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())["loss"] / 2
            loss.backward()
            del loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del batches


@pytest.mark.slow
def test_lora_step_counted_like_the_cpu_allocator() -> None:
    """The profiler's memory timeline (allocator events) against the count, as test_counting does."""
    from torch.profiler import ProfilerActivity, profile

    model = build(LORA, "llama")
    mode = CountingMode(granularity_bytes=1)
    mode.register(resident_tensors(model))
    weights = mode.live_bytes
    torch.manual_seed(1)
    with mode:
        _lora_steps(model)
    counted_peak = mode.peak_bytes - weights
    gc.collect()

    torch.manual_seed(1)
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        _lora_steps(model)
    memory_profile: Any = getattr(prof, "_memory_profile", None)
    if memory_profile is None:
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


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_and_qlora_count_less_than_full_finetuning(arch: str) -> None:
    peaks: dict[FinetuningMethod, int] = {}
    for spec in (FULL, LORA, QLORA):
        with session(spec, arch) as probe:
            record = trial(probe)
        assert record.outcome is Outcome.FIT, record.message
        assert record.peak_reserved_bytes is not None
        peaks[spec.method] = record.peak_reserved_bytes
    assert peaks[FinetuningMethod.LORA] < peaks[FinetuningMethod.FULL]
    assert peaks[FinetuningMethod.QLORA] < peaks[FinetuningMethod.FULL]


# predict == simulated, to the byte.

EXACT_CASES = [
    (arch, method, precision, checkpointing)
    for arch, combos in {
        "gpt2": [(Precision.FP32, False), (Precision.BF16_MIXED, True)],
        "llama": [(Precision.FP16_MIXED, False), (Precision.BF16_TRUE, True)],
        "qwen2": [(Precision.BF16_MIXED, False), (Precision.FP32, True)],
    }.items()
    for precision, checkpointing in combos
    for method in ("lora", "qlora")
]
ExactCase = tuple[str, str, Precision, bool]


def measure(case: ExactCase) -> tuple[ExactCase, dict[str, Any]]:
    """One trial of ``case`` on simulated and on predict, and the built parameters. In a worker."""
    torch.set_num_threads(1)
    arch, method, precision, checkpointing = case
    spec = FinetuningSpec(method=method)
    seen: dict[str, Any] = {}
    for device in ("simulated", "predict"):
        with session(spec, arch, precision, checkpointing, device=device) as probe:
            assert probe.prepare() is None
            assert probe.model is not None
            parameters = [
                (n, str(p.dtype), tuple(p.shape), p.requires_grad) for n, p in probe.model.named_parameters()
            ]
            record = trial(probe)
        seen[device] = {
            "outcome": record.outcome.value,
            "peak": record.peak_reserved_bytes,
            "parameters": parameters,
        }
    return case, seen


@pytest.fixture(scope="module")
def exact() -> dict[ExactCase, dict[str, Any]]:
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=child_context()) as pool:
        return dict(pool.map(measure, EXACT_CASES))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "method", "precision", "checkpointing"),
    EXACT_CASES,
    ids=[f"{a}-{m}-{p.value}-{c}" for a, m, p, c in EXACT_CASES],
)
def test_predict_equals_simulated_to_the_byte(
    exact: dict[ExactCase, dict[str, Any]], arch: str, method: str, precision: Precision, checkpointing: bool
) -> None:
    seen = exact[arch, method, precision, checkpointing]
    simulated, predicted = seen["simulated"], seen["predict"]
    assert simulated["outcome"] == "fit"
    assert predicted["parameters"] == simulated["parameters"]
    assert predicted["peak"] == simulated["peak"]


# Where it can run, and why not.


@pytest.mark.parametrize("spec", [FULL, LORA, QLORA], ids=["full", "lora", "qlora"])
@pytest.mark.parametrize("device_kind", ["simulated", "predict"])
def test_every_method_runs_on_simulated_and_predict_here(spec: FinetuningSpec, device_kind: Any) -> None:
    assert unavailable_reason(spec, device_kind) is None
    assert missing_packages(spec) == []


def test_qlora_with_fsdp_is_refused_with_the_reason() -> None:
    reason = unavailable_reason(QLORA, "simulated", strategy="fsdp")
    assert reason is not None
    assert "fsdp" in reason
    assert unavailable_reason(LORA, "simulated", strategy="fsdp") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")
def test_qlora_on_cuda_without_a_gpu_says_what_failed() -> None:
    reason = unavailable_reason(QLORA, "cuda", torch_device=torch.device("cuda", 0))
    assert reason is not None
    assert reason.startswith(
        f"finetuning 'qlora': bitsandbytes {bnb.__version__} cannot run a 4-bit NF4 layer on cuda:0: "
    )


def _answers_without(package: str) -> dict[str, Any]:
    """What each method gets, in a fresh interpreter where importing ``package`` fails as if absent."""
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.modules[{package!r}] = None  # how Python marks a module that must not be imported
        from probes.finetuning_spec import FinetuningSpec, missing_packages
        from probes.recipe.finetuning import unavailable_reason
        answers = {{}}
        for method in ("full", "lora", "qlora"):
            spec = FinetuningSpec(method=method)
            answers[method] = {{
                "simulated": unavailable_reason(spec, "simulated"),
                "predict": unavailable_reason(spec, "predict"),
                "missing": missing_packages(spec),
            }}
        print(json.dumps(answers))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    answers: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answers


@pytest.mark.slow
def test_a_missing_package_is_the_reason() -> None:
    no_peft = "needs peft, which is not installed (pip install 'maxbatch[lora]')"
    no_bnb = "needs bitsandbytes, which is not installed (pip install 'maxbatch[qlora]')"
    expected = {
        "peft": {
            "full": None,
            "lora": f"finetuning 'lora' {no_peft}",
            "qlora": f"finetuning 'qlora' {no_peft}",
        },
        "bitsandbytes": {"full": None, "lora": None, "qlora": f"finetuning 'qlora' {no_bnb}"},
    }
    for package, reasons in expected.items():
        answers = _answers_without(package)
        for method, reason in reasons.items():
            assert answers[method]["simulated"] == reason, (package, method)
            assert answers[method]["predict"] == reason, (package, method)
            assert answers[method]["missing"] == ([] if reason is None else [package]), (package, method)


def test_target_modules_that_name_nothing_are_bad_input() -> None:
    spec = FinetuningSpec(method="lora", lora_target_modules=["q_proj", "query_key_value"])
    with pytest.raises(
        ProbeInputError, match="'query_key_value' names no module of LlamaForCausalLM; its linear"
    ):
        build(spec, "llama")
    not_linear = FinetuningSpec(method="lora", lora_target_modules=["self_attn"])
    with pytest.raises(ProbeInputError, match="lora_target_modules"):
        build(not_linear, "llama")
    with session(spec, "llama") as probe, pytest.raises(ProbeInputError):
        trial(probe)


def test_named_targets_are_emitted_as_given() -> None:
    spec = FinetuningSpec(method="lora", lora_target_modules=["q_proj", "v_proj"])
    model = build(spec, "qwen2")
    assert peft_config_kwargs(spec, model)["target_modules"] == ["q_proj", "v_proj"]
    assert {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")} == {
        "q_proj",
        "v_proj",
    }
