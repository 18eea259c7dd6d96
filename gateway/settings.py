"""Process settings: one typed class filled from a YAML file and ``DISTILLGATE_*`` environment variables.

Routing behaviour (teacher, student, prices, per-task rules) lives in the policy file instead
(``router/policy.py``), because that file is hot-reloaded and these settings are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gateway.overlay import overlay


class AuthSettings(BaseModel):
    """How callers prove who they are."""

    required: bool = True
    """Require a gateway API key on ``/v1`` routes. ``false`` is for local use only."""
    admin_key: SecretStr | None = None
    """The admin credential (``Authorization: Bearer <admin_key>``) for ``/admin`` routes.
    Set it through ``DISTILLGATE_AUTH__ADMIN_KEY``; keys created with ``keys create --admin`` work too."""


class RecorderSettings(BaseModel):
    """The batched writer that stores one record per request off the request path."""

    queue_size: int = 50_000
    """Records waiting in memory. The request path never writes to disk: past this many, while
    neither the database nor the spool takes records, new records are dropped and counted
    (``recorder_dropped_total{reason="queue_full"}``, one WARNING line per episode)."""
    batch_size: int = 500
    """Most records written in one transaction."""
    flush_interval_s: float = 0.02
    """Longest a record waits in memory before its batch is written. Short: many small batches
    stall requests less than a few big ones (measured: docs/ARCHITECTURE.md, "Measured choices")."""
    spool_dir: Path = Path("./spool")
    """Where records go (JSONL) while the database is unreachable; replayed when it is back."""
    retry_interval_s: float = 2.0
    """How often a down database, or an unwritable spool, is tried again."""
    stall_s: float = 2.0
    """Longest a database write may take: past it the connection is cut and its records go to the
    spool (a stalled database, connection open and nothing answered, never fails on its own)."""


class RetentionSettings(BaseModel):
    """How long records live (``gateway.retention``; each task's body retention is in the policy)."""

    records_months: int | None = Field(None, ge=1)
    """Whole months of records kept, the current one included: older months are dropped (on
    PostgreSQL one partition each; on SQLite deleted in bounded batches). None keeps all. This is
    also the ledger's horizon: the report cannot look further back."""
    prune_every_s: float | None = 3600.0
    """How often the gateway runs the prune (one replica at a time on PostgreSQL); None: never
    (run ``distillgate db prune`` from cron or the Helm chart's CronJob instead)."""
    batch_size: int = Field(5000, ge=1)
    """Rows changed per statement: no prune holds locks on many rows at once."""


class UpstreamSettings(BaseModel):
    """Timeouts and retries for calls to the teacher and the student."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    """Longest silence between two bytes of an upstream answer."""
    max_retries: int = 2
    """Retries on timeouts, connection failures and 5xx, only before any byte reached the client."""
    retry_budget_ratio: float = 0.2
    """Retries shared by all requests to one upstream, as a share of its requests: a teacher
    that fails every call gets about 1.2 calls per request, not ``1 + max_retries``."""
    retry_budget_reserve: float = 10.0
    """Retries that may be spent at once (a burst after a quiet period); the budget refills to it."""
    backoff_s: float = 0.2
    """First retry delay; doubles each retry, with jitter."""
    max_connections: int = 1000
    """Connection pool size per upstream."""
    trust_env: bool = True
    """Reach the teacher and the student through the proxy that ``HTTPS_PROXY``/``HTTP_PROXY``
    name (``NO_PROXY`` exempts hosts), as the OpenAI SDK and httpx do. ``false`` ignores them."""


class TaskLimitSettings(BaseModel):
    """How many tasks clients may name: every task costs memory, a row, routing state and metric
    series, and any key holder can name a new one per request (``gateway/task_limits.py``)."""

    max_new_per_key: int = 200
    """New task names one API key may introduce (since this process started); past it, its
    requests with new names fold into the ``_overflow`` task."""
    max_tasks: int = 1000
    """Tasks this process routes, stored ones included; past it, new names fold into ``_overflow``."""
    max_task_labels: int = 200
    """Tasks with their own ``task`` label in ``/metrics``; the rest are summed under ``_other``."""


class Settings(BaseSettings):
    """Everything a gateway process needs to start. Field docs are the config reference."""

    model_config = SettingsConfigDict(
        env_prefix="DISTILLGATE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = 8000
    ops_port: int | None = None
    """A second listener (same app) for probes and ``/metrics`` scrapes: under a flood of new
    connections on ``port`` they are still accepted at once (point liveness/readiness probes and
    Prometheus here). None: one listener."""
    workers: int = 1
    """Server worker processes. Metrics stay correct across them (multiprocess mode)."""
    database_url: str = "sqlite:///./distillgate.db"
    """SQLAlchemy URL: ``sqlite:///path.db`` or ``postgresql+psycopg://user@host/db``."""
    policy_file: Path | None = None
    """The routing policy YAML (teacher, student, prices, tasks); watched and hot-reloaded."""
    adapters_dir: Path = Path("./adapters")
    """Where trained adapters are written; must be visible to the student server at the same path."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body accepted; larger ones get 413."""
    max_in_flight: int = 2048
    """Requests served at once before new ones are shed with 503 (load shedding)."""
    shed_loop_lag_s: float = 0.1
    """Event-loop lag (smoothed) above which new API requests are shed with 503: every request is
    already waiting this long for the CPU. Training runs in a child process, so it does not count
    here (why 0.1 s: docs/ARCHITECTURE.md, "Measured choices")."""
    gil_switch_interval_s: float | None = 0.001
    """CPython's thread switch interval for the gateway process (``sys.setswitchinterval``; None
    keeps CPython's 5 ms): it bounds how long a request waits behind the recorder's writer thread
    (measured: docs/ARCHITECTURE.md, "Measured choices")."""
    shutdown_grace_s: float = 25.0
    """On SIGTERM: stop accepting, give in-flight requests and streams this long, then flush the recorder."""
    log_level: str = "INFO"
    """Level of every logger in the process (the gateway's own and uvicorn's)."""
    log_format: Literal["text", "json"] = "text"
    """``text``: ``<UTC time> <LEVEL> <logger>: <message>``; ``json``: one object a line."""
    run_scheduler: bool = True
    """Run the training scheduler inside the gateway process (one machine). Off when a
    separate ``distillgate worker`` does it."""
    scheduler_interval_s: float = 10.0
    """How often the scheduler looks for tasks due to train."""
    scheduler_parallel: int = Field(1, ge=1)
    """Tasks trained at once, each in its own process (``trainer.scheduler.Scheduler.parallel``):
    more than one where trainings are CPU-bound on a machine with cores to spare (with
    ``train.cpu_threads: auto`` each takes the cores the others leave), or several GPUs."""
    worker_port: int = 9100
    """``distillgate worker`` serves ``/metrics`` and ``/healthz`` here."""
    migrate_on_start: bool = True
    """Apply database migrations when the gateway starts."""
    auth: AuthSettings = Field(default_factory=AuthSettings)
    recorder: RecorderSettings = Field(default_factory=RecorderSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    tasks: TaskLimitSettings = Field(default_factory=TaskLimitSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (the YAML file's content) win over the environment,
        # so ``load_settings`` can put the environment on top itself.
        return (init_settings, env_settings, file_secret_settings)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read ``config_file`` (YAML), then let ``DISTILLGATE_*`` variables and ``overrides`` win."""
    data: dict[str, Any] = {}
    if config_file is not None:
        text = Path(config_file).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: the settings file must be a YAML mapping")
        data = loaded
        if data.get("policy_file") is not None:
            policy = Path(data["policy_file"])
            if not policy.is_absolute():
                data["policy_file"] = Path(config_file).parent / policy
    from_env = Settings()  # only the environment; exclude_unset keeps just what it set
    merged = overlay(data, from_env.model_dump(exclude_unset=True))
    merged = overlay(merged, overrides)
    return Settings(**merged)
