"""Persistence: SQLite in WAL mode under the data directory, versioned by ``schema_version``."""

from app.store.sqlite import (
    JobRecord,
    NewJob,
    Reuse,
    RunDurations,
    Store,
    StoredEvent,
    StoredTrial,
    TrialRow,
)

__all__ = [
    "JobRecord",
    "NewJob",
    "Reuse",
    "RunDurations",
    "Store",
    "StoredEvent",
    "StoredTrial",
    "TrialRow",
]
