"""How the job is set up: the one place that builds what ``probes.trial`` steps.

A trial measures one rank of the job a scheduler will launch. What that rank holds depends on more
than the model: the strategy wrapper (DDP's gradient buckets, FSDP2's shards and all-gather
buffers), the optimizer's state, the attention kernel the GPU picks. The modules here build each
piece the way HF Trainer and Accelerate build it, so that the trial's step loop stays the same for
every combination:

- :mod:`probes.recipe.build` — :class:`~probes.recipe.build.Recipe`: model (a builder: full, or a
  fine-tuning method's from :mod:`probes.recipe.finetuning`) → strategy wrapper → optimizer over
  the trainable parameters;
- :mod:`probes.recipe.finetuning` — LoRA and QLoRA models, built as a user's script builds them;
- :mod:`probes.recipe.world` — the process group one trial child measures a rank of (torch's fake
  process group of ``world_size`` ranks; an existing group, such as torchrun's, is used as it is);
- :mod:`probes.recipe.ddp`, :mod:`probes.recipe.fsdp` — the wrappers, with Trainer's and
  Accelerate's arguments;
- :mod:`probes.recipe.optimizers` — HF ``optim`` names to the classes and options Trainer builds;
- :mod:`probes.recipe.attention` — the CUDA SDPA kernel choice, emulated where the CPU stands in;
- :mod:`probes.recipe.collectives` — values for a fake process group's reduce-scatter;
- :mod:`probes.recipe.support` — the torch-free rules that skip a config with a sentence, and
  :mod:`probes.recipe.detect` — what this machine can run, found in a trial child.

This package's ``__init__`` imports nothing, so the torch-free engine can import
:mod:`probes.recipe.support`.
"""
