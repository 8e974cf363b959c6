"""Which active job answers a request body already seen: identical POSTs answered from memory.

A submission's answer depends on its body, the headers and query the route reads, and the store.
Where the headers and query are absent (no ``Idempotency-Key``, no ``Cache-Control``, no query) and
the body names neither a GPU, a GPU type nor a local model directory (whose placement and admission
depend on the machine and its files at the time of asking), the answer is a function of the body
bytes and the store alone. While the job a body created or joined stays queued or running, it is
the one active job with that cache key (``Store.submit`` creates no second one), so a later
identical body is *coalesced* into it: :class:`app.middleware.RepeatedSubmissions` answers that
from this memo and the row the store holds (:meth:`Store.cached`), without parsing, validating,
routing or a worker thread. Anything else, or a row the store does not hold right now, goes to
the route, which answers as always and refreshes the memo.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from app.schemas import ACTIVE_STATUSES
from app.store import JobRecord, Store

MAX_REMEMBERED = 1024
"""Bodies remembered at most; the memo starts afresh when full (a miss only costs the route)."""


def body_digest(body: bytes) -> bytes:
    """The memo's key for a request body."""
    return hashlib.sha256(body).digest()


@dataclass(frozen=True, slots=True)
class _Joined:
    job_id: str
    cache_key: str


class SubmitMemo:
    """Body digest → the active job the route answered that body with."""

    def __init__(self, store: Store, capacity: int = MAX_REMEMBERED) -> None:
        self._store = store
        self._capacity = capacity
        self._joined: dict[bytes, _Joined] = {}

    def remember(self, digest: bytes, record: JobRecord) -> None:
        """The route answered the body with ``digest`` by ``record`` (created or coalesced)."""
        if record.status not in ACTIVE_STATUSES:
            return
        if len(self._joined) >= self._capacity:
            self._joined = {}
        self._joined[digest] = _Joined(record.id, record.cache_key)

    def knows(self, digest: bytes) -> bool:
        return digest in self._joined

    def held(self, digest: bytes) -> JobRecord | None:
        """The active job a body with ``digest`` joins, from the row the store holds; ``None`` when
        it holds none (ask :meth:`read`) or the job is over. No lock, no SQL: safe on the event loop."""
        joined = self._joined.get(digest)
        return None if joined is None else self._active(joined, self._store.cached(joined.job_id))

    def read(self, digest: bytes) -> JobRecord | None:
        """:meth:`held`, reading the row from the store (blocking: a worker thread's call)."""
        joined = self._joined.get(digest)
        return None if joined is None else self._active(joined, self._store.get(joined.job_id))

    @staticmethod
    def _active(joined: _Joined, record: JobRecord | None) -> JobRecord | None:
        if record is None or record.status not in ACTIVE_STATUSES or record.cache_key != joined.cache_key:
            return None
        return record
