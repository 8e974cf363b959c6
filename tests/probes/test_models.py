"""Configs, model facts and model building for tiny causal LMs; input errors raised fast."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from probes import models
from probes.errors import (
    ModelNotFound,
    ProbeInputError,
    RemoteCodeRefused,
    SequenceTooLong,
    UnknownArchitecture,
)
from probes.models import build_model, inspect_model, load_config
from probes.spec import ModelSpec, Precision

TINY: dict[str, dict[str, Any]] = {
    "gpt2": {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 2,
        "vocab_size": 1000,
        "n_positions": 128,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": None,
    },
    "mistral": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "qwen2": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}


def spec(architecture: str, **overrides: Any) -> ModelSpec:
    return ModelSpec(architecture=architecture, config={**TINY[architecture], **overrides})


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_tiny_architectures_build_train_mode_models(architecture: str) -> None:
    config = load_config(spec(architecture), allow_remote_code=False)
    assert config.model_type == architecture
    model = build_model(config, precision=Precision.FP32, gradient_checkpointing=True, device="cpu")
    assert model.training
    assert model.config.use_cache is False  # type: ignore[union-attr]
    assert model.is_activation_checkpointing
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # one real training step works
    ids = torch.randint(0, 1000, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_inspect_counts_parameters_without_real_weights(architecture: str) -> None:
    facts = inspect_model(spec(architecture), 64, allow_remote_code=False)
    config = load_config(spec(architecture), allow_remote_code=False)
    real = build_model(config, precision=Precision.FP32, gradient_checkpointing=False, device="cpu")
    assert facts.parameter_count == sum(p.numel() for p in real.parameters())
    assert facts.model_type == architecture
    assert facts.vocab_size == 1000
    assert facts.architecture_class == type(real).__name__


def test_bf16_true_builds_bf16_weights_without_casting() -> None:
    config = load_config(spec("llama"), allow_remote_code=False)
    model = build_model(config, precision=Precision.BF16_TRUE, gradient_checkpointing=False, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    mixed = build_model(config, precision=Precision.BF16_MIXED, gradient_checkpointing=False, device="cpu")
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}


def test_checkpointing_off_by_default_and_no_deprecation_warning() -> None:
    config = load_config(spec("gpt2"), allow_remote_code=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on = build_model(config, precision=Precision.FP32, gradient_checkpointing=True, device="cpu")
    off = build_model(config, precision=Precision.FP32, gradient_checkpointing=False, device="cpu")
    assert on.is_activation_checkpointing
    assert not off.is_activation_checkpointing


def test_build_model_does_not_touch_the_callers_config() -> None:
    config = load_config(spec("gpt2"), allow_remote_code=False)
    config.use_cache = True
    build_model(config, precision=Precision.FP32, gradient_checkpointing=False, device="cpu")
    assert config.use_cache is True


def test_overrides_apply_through_attribute_aliases() -> None:
    # gpt2 calls its width n_embd; hidden_size is its alias
    config = load_config(
        ModelSpec(architecture="gpt2", config={"hidden_size": 96, "n_head": 3}), allow_remote_code=False
    )
    assert config.n_embd == 96


def test_unknown_override_is_named() -> None:
    with pytest.raises(ProbeInputError, match="hidden_sise"):
        load_config(ModelSpec(architecture="llama", config={"hidden_sise": 64}), allow_remote_code=False)


def test_rejected_override_value_is_an_input_error() -> None:
    with pytest.raises(ProbeInputError):
        load_config(
            ModelSpec(architecture="llama", config={"rope_parameters": "nonsense"}), allow_remote_code=False
        )


def test_unknown_architecture_lists_the_causal_lm_types() -> None:
    with pytest.raises(UnknownArchitecture) as caught:
        load_config(ModelSpec(architecture="no-such-model"), allow_remote_code=False)
    known = caught.value.known
    assert known
    assert {"gpt2", "llama", "mistral", "qwen2"} <= set(known)
    assert known == sorted(known)


def test_encoder_only_architecture_is_unknown_as_a_causal_lm() -> None:
    with pytest.raises(UnknownArchitecture):
        load_config(ModelSpec(architecture="t5"), allow_remote_code=False)


def test_seq_len_beyond_positions_is_refused() -> None:
    with pytest.raises(SequenceTooLong, match="128"):
        inspect_model(spec("gpt2"), 129, allow_remote_code=False)
    assert inspect_model(spec("gpt2"), 128, allow_remote_code=False).max_positions == 128


def test_local_directory_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY["llama"]}))
    model = ModelSpec(name_or_path=str(tmp_path), config={"num_hidden_layers": 1, "hidden_size": 32})
    config = load_config(model, allow_remote_code=False)
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 1
    # the dependent field follows the override, as if config.json had been edited
    assert config.head_dim == 32 // 4
    facts = inspect_model(model, 64, allow_remote_code=False)
    assert facts.max_positions == 256


def test_local_directory_unknown_override(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY["gpt2"]}))
    with pytest.raises(ProbeInputError, match="'layers'"):
        load_config(ModelSpec(name_or_path=str(tmp_path), config={"layers": 3}), allow_remote_code=False)


def test_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"config\.json"):
        load_config(ModelSpec(name_or_path=str(tmp_path)), allow_remote_code=False)


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="local directory"):
        load_config(ModelSpec(name_or_path=str(tmp_path / "nope" / "deeper")), allow_remote_code=False)


def remote_code_dir(path: Path) -> Path:
    config = {
        "model_type": "my-remote-model",
        "auto_map": {
            "AutoConfig": "configuration_mine.MyConfig",
            "AutoModelForCausalLM": "modeling_mine.MyModel",
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    # Code that must never run: importing it would fail the test loudly.
    (path / "configuration_mine.py").write_text("raise SystemExit('remote code ran')\n")
    return path


def test_remote_code_requested_but_not_allowed(tmp_path: Path) -> None:
    model = ModelSpec(name_or_path=str(remote_code_dir(tmp_path)), trust_remote_code=True)
    with pytest.raises(RemoteCodeRefused, match="does not allow"):
        load_config(model, allow_remote_code=False)


def test_architecture_with_trust_remote_code_not_allowed() -> None:
    with pytest.raises(RemoteCodeRefused):
        load_config(ModelSpec(architecture="gpt2", trust_remote_code=True), allow_remote_code=False)


def test_config_that_needs_remote_code_without_the_request(tmp_path: Path) -> None:
    model = ModelSpec(name_or_path=str(remote_code_dir(tmp_path)))
    with pytest.raises(RemoteCodeRefused, match="trust_remote_code"):
        load_config(model, allow_remote_code=True)


def test_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelNotFound, match=r"local path|local directory") as caught:
        load_config(ModelSpec(name_or_path="example-org/not-a-real-model-xyz"), allow_remote_code=False)
    assert "architecture" in caught.value.message
    assert time.monotonic() - started < 10


def test_hub_id_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # A closed local port: the connection is refused at once, no network is touched.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    started = time.monotonic()
    with pytest.raises(ModelNotFound, match="cannot be reached"):
        load_config(ModelSpec(name_or_path="example-org/not-a-real-model-xyz"), allow_remote_code=False)
    assert time.monotonic() - started < 10


def test_hub_reachability_probe_says_no_for_a_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert not models.hub_reachable(timeout=1.0)


def test_name_that_is_no_hub_id() -> None:
    with pytest.raises(ModelNotFound):
        load_config(ModelSpec(name_or_path="not a model id!"), allow_remote_code=False)
