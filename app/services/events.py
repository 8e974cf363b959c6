"""Fan-out of job events to live subscribers (SSE streams, long polls) on the event loop.

Dispatcher threads publish; subscribers are ``asyncio.Queue`` objects read on the loop the
service runs on. The history lives in the store; this only carries what happens from now on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from app.store import StoredEvent


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue[StoredEvent]]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver on ``loop`` (the server's); called once the loop runs."""
        self._loop = loop

    def publish(self, job_id: str, event: StoredEvent) -> None:
        """Hand ``event`` to every subscriber of ``job_id``; safe from any thread."""
        with self._lock:
            queues = list(self._subscribers.get(job_id, ()))
        loop = self._loop
        if not queues or loop is None or loop.is_closed():
            return
        for queue in queues:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop closed between the check and the call
                return

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Queue[StoredEvent]]:
        queue: asyncio.Queue[StoredEvent] = asyncio.Queue()
        with self._lock:
            self._subscribers.setdefault(job_id, set()).add(queue)
        try:
            yield queue
        finally:
            with self._lock:
                subscribers = self._subscribers.get(job_id)
                if subscribers is not None:
                    subscribers.discard(queue)
                    if not subscribers:
                        del self._subscribers[job_id]
