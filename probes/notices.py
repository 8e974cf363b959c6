"""Notices from optional packages that must not reach a user's terminal, dropped at their logger.

transformers imports peft when it is installed (``transformers.trainer_utils``, so every process that
loads ``TrainingArguments``: the forkserver that preloads :mod:`probes.worker`, every trial child),
and peft imports bitsandbytes. On a CPU with AVX512-BF16, bitsandbytes 0.50 then tries to fetch an
optional CPU kernel from the Hugging Face hub (``kernels-community``), fails without the ``kernels``
package, and logs a warning with no handler configured — so Python's last-resort handler wrote it
to the CLI's stderr, above the one-line error of a bad request. bitsandbytes falls back to its own
CPU kernel, which is what the probe counts (``probes.recipe.finetuning``). Only that notice is
dropped; every other bitsandbytes message still shows.
"""

from __future__ import annotations

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropHubKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HUB_KERNEL_NOTICE)


def drop_optional_kernel_notices() -> None:
    """Install the filter (idempotent); call it before bitsandbytes is imported."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropHubKernelNotice) for f in logger.filters):
        logger.addFilter(_DropHubKernelNotice())
