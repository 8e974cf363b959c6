"""The worst-case batch is a padded batch: which probe micro-batches carry a padded position.

A real job's batches are padded (a padding collator, ``padding="max_length"``), and a mask with a
zero in it makes transformers' sdpa and eager attention materialise a ``b x 1 x s x s`` mask that
an all-ones mask lets them skip. So every probe micro-batch at length ``MIN_PADDED_LENGTH`` or more
masks out its last row's last position (:meth:`probes.trial.TrialSession`'s batches), batch size 1
included, and the predict device's mask shim (:func:`probes.devices.predict.probe_batch_masks`)
answers "is this mask all ones?" with the same rule.
"""

from __future__ import annotations

MIN_PADDED_LENGTH = 2
"""The shortest micro-batch that carries a padded position: a row of length 1 padded by one would
have no token left to train on."""


def has_padded_position(length: int) -> bool:
    """Whether a probe micro-batch padded to ``length`` has a position masked out."""
    return length >= MIN_PADDED_LENGTH
