"""Issue 11's flat-floor case, searched for real on the simulated device, with and without the floor.

``python -m bench.floor_search``

GPT-2 shape (2 layers, 256 wide, 4 heads, vocabulary 32000, 1024 positions), seq 64, ``32-true``,
no checkpointing, 400 MiB simulated. One :class:`probes.trial.TrialSession` in this process runs
every trial the search asks for (2 optimizer steps x accumulation 2, the engine's search trial),
three times: as the search ran before this issue (no floor, out-of-memory trials without their
lower bound), with the lower bounds only, and with the floor (weights + gradients + AdamW state
from the parameter count) and the bounds. The engine's speculative confirmation (fresh children,
4 optimizer steps) is not part of this: the sizes tried and the outcomes are the search's.
"""

from __future__ import annotations

import sys
import time

MiB = 2**20
CONFIG = {
    "n_layer": 2,
    "n_embd": 256,
    "n_head": 4,
    "vocab_size": 32000,
    "n_positions": 1024,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def main() -> int:
    import torch

    from probes.models import inspect_model
    from probes.search import LadderSearch, training_state_bytes
    from probes.spec import ConfigTask, ModelSpec, Outcome, Precision
    from probes.trial import TrialSession

    torch.set_num_threads(1)
    model = ModelSpec(architecture="gpt2", config=CONFIG)
    facts = inspect_model(model, 64, allow_remote_code=False)
    floor = training_state_bytes(facts.parameter_count, Precision.FP32)
    task = ConfigTask(
        model=model,
        seq_len=64,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device="simulated",
        memory_limit_bytes=400 * MiB,
    )
    print(f"parameters {facts.parameter_count:,}; floor {floor:,} B; capacity {400 * MiB:,} B")
    with TrialSession(task) as session:
        for label, use_floor, use_bounds in (
            ("before (no floor, no bounds)", False, False),
            ("lower bounds only", False, True),
            ("floor + lower bounds", True, True),
        ):
            search = LadderSearch(capacity_bytes=400 * MiB, floor_bytes=floor if use_floor else None)
            started = time.perf_counter()
            while (size := search.next_size()) is not None:
                record = session.run(size, accumulation_steps=2, optimizer_steps=2)
                if not use_bounds:
                    record = record.model_copy(update={"needed_bytes": None})
                search.record(record)
            seconds = time.perf_counter() - started
            sizes = [t.batch_size for t in search.trials]
            ooms = sum(t.outcome is Outcome.OOM for t in search.trials)
            print(
                f"{label:<30} sizes {sizes}  trials {len(sizes)}  OOM {ooms}  answer "
                f"{search.max_batch_size} (first failing {search.first_failing_batch_size})  {seconds:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
