"""The SQLModel store: records, keys, task state, datasets, adapters, shadow pairs, cache rows."""

from gateway.store.db import Database, create_database
from gateway.store.models import (
    Adapter,
    ApiKey,
    CacheEntry,
    DatasetSnapshot,
    Record,
    ShadowPair,
    Task,
    TaskTransition,
    TrainingLock,
    TrainingRun,
)

__all__ = [
    "Adapter",
    "ApiKey",
    "CacheEntry",
    "Database",
    "DatasetSnapshot",
    "Record",
    "ShadowPair",
    "Task",
    "TaskTransition",
    "TrainingLock",
    "TrainingRun",
    "create_database",
]
