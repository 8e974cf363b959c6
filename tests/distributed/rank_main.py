"""One rank of a real multi-process run under ``torchrun`` (gloo, CPU), counting its memory.

Run by ``tests/distributed/test_torchrun.py`` as ``torchrun --nproc-per-node N rank_main.py JOB OUT``.
``JOB`` is a JSON list of runs; each rank writes ``OUT/rank<r>.json``: one result per run, in order.
Every run counts this rank's memory with the simulated device's counting mode (the same instrument
the probe uses), under the run's cap, while standing for a GPU as the simulated device does:
AdamW and SGD default to ``foreach`` (CUDA's default) and ``scaled_dot_product_attention`` keeps
what CUDA's kernel keeps (``probes.recipe.attention``).

Kinds of run:

``trial``
    maxbatch's own :class:`~probes.trial.TrialSession` on this real process group: the rank-0 peak
    is compared with the same trial measured in one process on the fake group.
``trainer``
    HF ``Trainer`` with the ``training_arguments`` maxbatch recommended (DDP: Trainer wraps the model
    in ``DistributedDataParallel`` through Accelerate, as on GPUs).
``fsdp_by_hand``
    FSDP2 on CPU. With ``use_cpu=True``, transformers 5.24 / Accelerate 1.15 wrap the model in DDP
    even when ``fsdp`` and ``fsdp_config`` are set, so Trainer cannot run FSDP2 here. This run
    applies Accelerate's own FSDP2 preparation (``accelerate.utils.fsdp_utils.fsdp2_prepare_model``)
    with the plugin Trainer builds from the recommended ``training_arguments``
    (``FullyShardedDataParallelPlugin(**TrainingArguments(...).fsdp_plugin_args)``: the wrap class,
    ``reshard_after_forward`` and checkpointing the recommendation names; its ``bf16``/``fp16`` as the
    mixed-precision policy) and then Trainer's loop by hand: the whole accumulation
    window prefetched, ``set_requires_gradient_sync(False)`` on every micro-step but the last (what
    ``Accelerator.no_sync`` does for FSDP2; none with the recommendation's ``accelerator_config``
    ``gradient_accumulation_kwargs.sync_each_batch``, as Trainer does), loss / accumulation,
    backward, ``clip_grad_norm_(1.0)``, AdamW step, ``zero_grad``.

A run with ``peft_config`` (LoRA) builds its adapters as a user's script does,
``get_peft_model(model, LoraConfig(**peft_config))``, before Trainer or the FSDP2 preparation; the
optimizer then steps the trainable parameters only (what Trainer builds).

The runs of a launch share the process group; the ones expected to run out of memory come last
(every rank runs out at the same allocation: the ranks of these jobs hold the same memory).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

warnings.simplefilter("ignore")  # library warnings on stderr would drown the result lines

from probes.devices.counting import CountingMode  # noqa: E402
from probes.recipe.attention import CudaAttentionKernels  # noqa: E402
from probes.spec import ConfigTask  # noqa: E402
from probes.trial import TrialSession  # noqa: E402

SIMULATED_CAPABILITY = (8, 0)


@contextlib.contextmanager
def as_on_a_gpu() -> Iterator[None]:
    """``foreach`` optimizers (CUDA's default; the CPU would loop per tensor) and CUDA's attention kernels."""
    saved = torch.optim.AdamW.__init__, torch.optim.SGD.__init__

    def foreach_by_default(init: Any) -> Any:
        @functools.wraps(init)
        def wrapped(self: Any, params: Any, *args: Any, **kwargs: Any) -> None:
            if not kwargs.get("fused"):
                kwargs.setdefault("foreach", True)
            init(self, params, *args, **kwargs)

        return wrapped

    torch.optim.AdamW.__init__ = foreach_by_default(saved[0])  # type: ignore[method-assign]
    torch.optim.SGD.__init__ = foreach_by_default(saved[1])  # type: ignore[method-assign]
    try:
        with CudaAttentionKernels(SIMULATED_CAPABILITY):
            yield
    finally:
        torch.optim.AdamW.__init__, torch.optim.SGD.__init__ = saved  # type: ignore[method-assign]


def build_model(run: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(run["architecture"], **run["config"])
    config.use_cache = False
    torch.manual_seed(0)
    model: torch.nn.Module = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    if run.get("peft_config"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**run["peft_config"]))
    return model


def vocab_of(model: torch.nn.Module) -> int:
    vocab: int = model.config.vocab_size  # type: ignore[union-attr, assignment]
    return vocab


class RandomTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random ids at the full sequence length, no padding, labels = inputs (a probe's batch)."""

    def __init__(self, size: int, seq_len: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (size, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def counted(run: dict[str, Any], mode: CountingMode, body: Any) -> dict[str, Any]:
    """Run ``body()`` under ``mode``; the outcome and the peak."""
    outcome, message = "fit", None
    try:
        with mode, as_on_a_gpu():
            body()
    except torch.OutOfMemoryError as exc:
        outcome, message = "oom", str(exc).splitlines()[0][:200]
    gc.collect()
    return {"name": run["name"], "outcome": outcome, "peak": mode.peak_bytes, "message": message}


def run_trial(run: dict[str, Any]) -> dict[str, Any]:
    task = ConfigTask.model_validate(run["task"])
    with TrialSession(task) as session:
        record = session.run(
            run["batch_size"],
            accumulation_steps=run["accumulation_steps"],
            optimizer_steps=run["optimizer_steps"],
        )
    return {
        "name": run["name"],
        "outcome": record.outcome.value,
        "peak": record.peak_bytes,
        "message": record.message,
    }


def run_trainer(run: dict[str, Any]) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    model = build_model(run)
    mode = CountingMode(limit_bytes=run["cap"])
    mode.register(list(model.parameters()) + list(model.buffers()))
    micro = run["per_device_train_batch_size"]
    accumulation = run["gradient_accumulation_steps"]
    steps = run["optimizer_steps"]
    arguments = {
        **run["training_arguments"],
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
    }
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            **arguments,
            output_dir=output_dir,
            use_cpu=True,
            max_steps=steps,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            seed=0,
        )
        world = dist.get_world_size()
        dataset = RandomTokens(micro * accumulation * steps * world, run["seq_len"], vocab_of(model))
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        result = counted(run, mode, trainer.train)
        result["wrapped_in"] = type(trainer.model_wrapped).__name__
        del trainer, model
    return result


def recommended_fsdp(training_arguments: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """The FSDP plugin, mixed precision and gradient-accumulation kwargs that Trainer would hand
    Accelerate for the recommended ``training_arguments``: built the way Trainer builds them
    (``FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)``), so a wrong wrap class, reshard or
    checkpointing setting in the recommendation is what this job runs."""
    from accelerate.utils import FullyShardedDataParallelPlugin  # type: ignore[import-untyped]
    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(**training_arguments, output_dir=output_dir, use_cpu=True, report_to="none")
    assert args.fsdp_plugin_args is not None, "the recommendation carries no FSDP settings"
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    mixed = "bf16" if args.bf16 else ("fp16" if args.fp16 else "no")
    accelerator_config: Any = args.accelerator_config  # an AcceleratorConfig once constructed
    accumulation_kwargs = dict(accelerator_config.gradient_accumulation_kwargs or {})
    return plugin, mixed, accumulation_kwargs


def run_fsdp_by_hand(run: dict[str, Any]) -> dict[str, Any]:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model  # type: ignore[import-untyped]

    model = build_model(run)
    plugin, mixed, accumulation_kwargs = recommended_fsdp(run["training_arguments"])
    checkpointing = bool(plugin.activation_checkpointing)
    if mixed != "no":
        plugin.set_mixed_precision(mixed)
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=mixed,
        is_main_process=dist.get_rank() == 0,
        device=torch.device("cpu"),
        torch_device_mesh=None,
        parallelism_config=None,
    )
    # Accelerate loads the model on the host and shards it onto the device: count from the shards on.
    mode = CountingMode(limit_bytes=run["cap"])
    micro, accumulation, steps = run["per_device_train_batch_size"], run["gradient_accumulation_steps"], 3
    sync_each_batch = bool(accumulation_kwargs.get("sync_each_batch", False))
    dataset = RandomTokens(micro * accumulation * steps, run["seq_len"], vocab_of(model))

    def batch(index: int) -> dict[str, torch.Tensor]:
        ids = dataset.ids[index * micro : (index + 1) * micro].clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def train() -> None:
        if checkpointing:
            from accelerate.utils.fsdp_utils import fsdp2_apply_ac

            fsdp2_apply_ac(accelerator, model)
        prepared = fsdp2_prepare_model(accelerator, model)
        mode.register(list(prepared.buffers()))
        trainable = [p for p in prepared.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=0.0)
        for step in range(steps):
            batches = [batch(step * accumulation + i) for i in range(accumulation)]  # the window, prefetched
            for index, batch_ in enumerate(batches):
                last = index == len(batches) - 1
                prepared.set_requires_gradient_sync(last or sync_each_batch)
                loss = prepared(**batch_).loss / accumulation
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return counted(run, mode, train)


RUNS = {"trial": run_trial, "trainer": run_trainer, "fsdp_by_hand": run_fsdp_by_hand}


def main() -> int:
    job_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    results = []
    for run in json.loads(job_path.read_text(encoding="utf-8")):
        results.append(RUNS[run["kind"]](run))
        (out_dir / f"rank{rank}.json").write_text(json.dumps(results), encoding="utf-8")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
