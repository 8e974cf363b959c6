"""Which probe micro-batches carry a padded position: the padded worst case, and one packed batch.

A real job's batches are padded (a padding collator, ``padding="max_length"``), and a mask with a
zero in it makes transformers' sdpa and eager attention materialise a ``b x 1 x s x s`` mask that
an all-ones mask lets them skip. So every probe micro-batch at length ``MIN_PADDED_LENGTH`` or more
masks out its last row's last position (:meth:`probes.trial.TrialSession`'s batches), batch size 1
included, and the predict device's mask shim (:func:`probes.devices.predict.probe_batch_masks`)
answers "is this mask all ones?" with the same rule.

A job whose batches carry no padding at all (packed sequences) can need more than that, on another
attention kernel (:func:`probes.recipe.attention.packed_batches_take_math`): a trial then runs one
micro-batch with no padded position too, built and run inside :func:`unpadded_micro_batch`, where
both the trial's batch and the predict device's shim see the rule answer "no padded position".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

MIN_PADDED_LENGTH = 2
"""The shortest micro-batch that carries a padded position: a row of length 1 padded by one would
have no token left to train on."""

_UNPADDED: ContextVar[bool] = ContextVar("probe_micro_batch_unpadded", default=False)


def has_padded_position(length: int) -> bool:
    """Whether a probe micro-batch padded to ``length`` has a position masked out."""
    return length >= MIN_PADDED_LENGTH and not _UNPADDED.get()


@contextmanager
def unpadded_micro_batch() -> Iterator[None]:
    """Inside this block the probe micro-batch being built and run has no padded position (packed)."""
    token = _UNPADDED.set(True)
    try:
        yield
    finally:
        _UNPADDED.reset(token)
