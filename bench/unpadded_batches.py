"""Does the search's trial cover a job whose batches carry no padding at all?

Every trial micro-batch has one masked position (``probes/trial.py``, step 2): a padded batch makes
transformers' attention build a ``b x 1 x s x s`` mask. A job whose batches carry no padding at all
(packed sequences, as the ``run_clm.py`` example's ``group_texts`` makes them; an all-ones
``attention_mask``) takes other attention paths, and for ``sdpa`` with grouped key/value heads where
no fused CUDA kernel takes them, a larger one: there the trial adds one packed micro-batch
(``Recipe.measures_packed_batch``). This runs, per shape and batch size on the simulated device, a
trial of padded micro-batches only, one of packed micro-batches only (both without that extra
micro-batch), and the search's own trial, and prints the three peaks. Not part of CI; a few minutes
on two cores::

    .venv/bin/python -m bench.unpadded_batches
"""

from __future__ import annotations

import argparse
from typing import Any

import probes.trial as trial_module
from probes.padding import unpadded_micro_batch
from probes.spec import ConfigTask, Precision, ProbeSpec

TINY_MODELS: dict[str, dict[str, Any]] = {
    "llama": {
        "architecture": "llama",
        "config": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 1000,
        },
    },
    "gpt2": {"architecture": "gpt2", "config": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}},
}


def peak(task: ConfigTask, batch_size: int, *, packed_micro_batch: bool = True) -> int:
    """One trial's peak; ``packed_micro_batch=False``: without the trial's packed micro-batch."""
    with trial_module.TrialSession(task) as session:
        session.recipe.measures_packed_batch &= packed_micro_batch
        record = session.run(batch_size, accumulation_steps=2, optimizer_steps=2)
    if record.peak_allocated_bytes is None:
        raise RuntimeError(f"no peak at batch size {batch_size}: {record.outcome} {record.message}")
    return record.peak_allocated_bytes


def _change(value: int, base: int) -> str:
    return f"{value - base:+,} ({(value - base) / base:+.1%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args(argv)
    print(
        "model | seq_len | precision | checkpointing | batch | padded only B | packed only B "
        "| packed - padded | trial B | trial covers both"
    )
    for name, model in TINY_MODELS.items():
        for seq_len in args.seq_len:
            for precision in (Precision.FP32, Precision.BF16_TRUE):
                for checkpointing in (False, True):
                    spec = ProbeSpec.model_validate(
                        {
                            "model": model,
                            "seq_len": seq_len,
                            "precisions": [precision.value],
                            "gradient_checkpointing": [checkpointing],
                            "target_effective_batch_size": 64,
                            "device": "simulated",
                            "memory_limit_bytes": 8 * 1024**3,
                        }
                    )
                    task = ConfigTask.for_config(spec, precision, checkpointing)
                    for batch_size in args.batch_size:
                        padded = peak(task, batch_size, packed_micro_batch=False)
                        with unpadded_micro_batch():  # every micro-batch packed
                            packed = peak(task, batch_size, packed_micro_batch=False)
                        trial = peak(task, batch_size)
                        print(
                            f"{name} | {seq_len} | {precision.value} | {checkpointing} | {batch_size} | "
                            f"{padded:,} | {packed:,} | {_change(packed, padded)} | {trial:,} | "
                            f"{'yes' if trial >= max(padded, packed) else 'NO'}",
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
