"""Configuration from the environment, with the reference's variable names (reference-behaviour §12).

One `Settings` object is built per process (`get_settings()`); tests build their own and pass it in.
`*_FILE` indirection is supported for the secrets, as in the reference.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_FILE_VARS = (
    "DATABASE_URL",
    "REDIS_URL",
    "STREAMS_HMAC_KEY",
    "AUDIT_HMAC_KEY",
    "IDEMPOTENCY_HMAC_KEY",
    "IDEMPOTENCY_HMAC_KEY_PREVIOUS",
    "CARACAL_COORDINATOR_TOKEN",
    "METRICS_BEARER",
)

# Fallback idempotency key outside published modes (the reference does the same).
DEV_IDEMPOTENCY_HMAC_KEY = "caracal-coordinator-development-idempotency-key".encode().hex()


def _resolve_file_vars() -> None:
    for name in _FILE_VARS:
        path = os.environ.get(f"{name}_FILE")
        if path and not os.environ.get(name):
            value = open(path, encoding="utf-8").read().rstrip()
            if not value:
                raise ValueError(f"{name}_FILE points at an empty file")
            os.environ[name] = value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True)

    # --- processes ---
    PORT: int = 4000
    HOST: str = "127.0.0.1"
    # API processes on PORT (`python -m api`); 0: one per core.
    API_PROCESSES: int = Field(0, ge=0)
    DATABASE_URL: str = "postgresql://postgres@127.0.0.1:54329/coordinator"
    TEMPORAL_ADDRESS: str = "127.0.0.1:7233"
    TEMPORAL_NAMESPACE: str = "default"
    TEMPORAL_TASK_QUEUE: str = "coordinator"
    # The Temporal Web UI the inspector (`/ui`) links each session's workflow to; "" = no links.
    TEMPORAL_UI_URL: str = "http://127.0.0.1:8233"
    STICKY_QUEUE_TIMEOUT_SECONDS: float = Field(2.0, gt=0)
    # The sandbox re-imports a workflow's modules for every new workflow run (~20 ms of worker CPU
    # each, the worker's largest cost per session). Our workflow modules import only temporalio,
    # the standard library, workflows/models.py and rules/workflow_contract.py; the test suite runs
    # them sandboxed and the replay tests guard determinism.
    WORKFLOW_SANDBOX: bool = False
    # The build id the worker reports to Temporal; "" = a digest of the workflow code, the same in
    # every process of one deployment. The dispatcher starts each workflow with the `BuildIds`
    # search attribute the worker's first task will report (rules/workflow_contract.build_ids), so
    # the server has no visibility record to rewrite then. Set it alike for workers and dispatchers.
    WORKER_BUILD_ID: str = ""
    # host:port where the worker serves the Temporal SDK's Prometheus metrics ("" = off).
    WORKER_METRICS_ADDRESS: str = ""
    # Workflows the worker keeps in memory between their tasks (the SDK's sticky cache): one beyond
    # it is evicted and replays its history at its next task.
    WORKER_MAX_CACHED_WORKFLOWS: int = Field(1000, ge=0)
    CARACAL_MODE: str = "dev"
    DB_POOL_MAX: int = Field(20, ge=1)
    DB_STATEMENT_TIMEOUT_MS: int = Field(10000, ge=0)
    DB_CONNECTION_TIMEOUT_MS: int = Field(5000, ge=1)

    # --- authentication (reference-behaviour §3) ---
    ISSUER_URL: str = "http://127.0.0.1:4000/sts"
    # JWKS location: a URL template (may contain {zone_id}) or a file. STS_URL is the reference's
    # base (`${STS_URL}/.well-known/jwks.json?zone_id=<zone>`), used when JWKS_URL is not set.
    JWKS_URL: str = ""
    JWKS_FILE: str = ""
    STS_URL: str = ""
    AGENT_COORDINATOR_SCOPE: str = "agent:lifecycle"
    CARACAL_COORDINATOR_TOKEN: str = ""
    METRICS_BEARER: str = ""
    JWKS_CACHE_MAX: int = Field(256, ge=1)
    # An identity (application + authority record) found live is trusted this long without a query,
    # while the API process listens to directory changes (any change empties its cache at once). 0: a
    # query on every request, as the reference does.
    IDENTITY_CACHE_SECONDS: float = Field(5, ge=0)

    # --- capacity (configurable, reference defaults) ---
    MAX_AGENTS_PER_ZONE: int = Field(50, ge=0)
    MAX_AGENTS_PER_APP: int = Field(200, ge=0)
    MAX_SESSION_DEPTH: int = Field(10, ge=0)
    MAX_CHILDREN: int = Field(10, ge=0)
    SERVICE_AGENT_LEASE_SECONDS: int = Field(120, ge=1)

    # --- idempotency (§7) ---
    IDEMPOTENCY_HMAC_KEY: str = ""
    IDEMPOTENCY_HMAC_KEY_PREVIOUS: str = ""
    IDEMPOTENCY_RETENTION_SECONDS: int = Field(604800, ge=3600)
    GENERATED_IDEMPOTENCY_RETENTION_SECONDS: int = Field(86400, ge=3600)
    IDEMPOTENCY_MAX_RECEIPTS_PER_SCOPE: int = Field(10000, ge=100)

    # --- HTTP ---
    COORDINATOR_BODY_LIMIT_BYTES: int = Field(262144, ge=1024)
    TRUST_PROXY: bool = False

    # --- rate limits per minute, for the whole deployment (0 disables) (§10; api/ratelimit.py) ---
    COORDINATOR_RATE_LIMIT_PER_MIN: int = Field(600, ge=0)
    READY_RATE_LIMIT_PER_MIN: int = Field(120, ge=0)
    V1_RATE_LIMIT_PER_MIN: int = Field(300, ge=0)
    VERIFY_RATE_LIMIT_PER_MIN: int = Field(60, ge=0)
    INVOCATION_RATE_LIMIT_PER_MIN: int = Field(120, ge=0)

    # --- retention and maintenance (§9) ---
    DELEGATION_RETENTION_DAYS: int = Field(90, ge=0)  # also the status history's window (`at=`)
    # The most edges one bulk revocation may revoke (matched and downstream); above it: 422.
    BULK_REVOKE_MAX_EDGES: int = Field(10000, ge=1)
    OUTBOX_RETENTION_DAYS: int = Field(7, ge=0)
    RETENTION_CLEANUP_BATCH_SIZE: int = Field(500, ge=1)
    MAINTENANCE_INTERVAL_SECONDS: int = Field(5, ge=1)
    # The reconciler (in the maintenance run): how often it compares live rows with running
    # workflows, and how old a row must be before a missing workflow counts as missing.
    RECONCILE_INTERVAL_SECONDS: float = Field(30, ge=0)
    RECONCILE_GRACE_SECONDS: float = Field(30, ge=0)
    # It stays quiet while the workflows are behind (a notice has waited longer than
    # FOLLOW_LAG_TARGET_SECONDS, or more workflow tasks are queued than DISPATCH_MAX_TEMPORAL_BACKLOG),
    # and starts at most this many workflows per run.
    RECONCILE_MAX_STARTS: int = Field(1000, ge=1)
    # How long a notice may wait before the workflows count as behind (/ready says "behind").
    FOLLOW_LAG_TARGET_SECONDS: float = Field(5, gt=0)

    # --- events / audit ---
    REDIS_URL: str = ""
    STREAMS_HMAC_KEY: str = ""
    STREAMS_MAXLEN: int = Field(100000, ge=1)
    OUTBOX_INTERVAL_MS: int = Field(1000, ge=1)
    OUTBOX_BATCH_SIZE: int = Field(50, ge=1)
    OUTBOX_MAX_ATTEMPTS: int = Field(10, ge=1)
    AUDIT_HMAC_KEY: str = ""

    # Workflow outbox dispatcher (notices/): workflows claimed per batch, signal-with-start RPCs
    # in flight, rows of one workflow per batch, poll fallback to LISTEN/NOTIFY (also how soon a
    # deferred row is retried), cap of a row's retry backoff, deadline of one RPC.
    DISPATCH_BATCH_SIZE: int = Field(200, ge=1)
    DISPATCH_CONCURRENCY: int = Field(64, ge=1)
    DISPATCH_PER_WORKFLOW: int = Field(20, ge=1)
    DISPATCH_POLL_INTERVAL_MS: int = Field(1000, ge=10)
    DISPATCH_MAX_BACKOFF_SECONDS: float = Field(30, gt=0)
    DISPATCH_RPC_TIMEOUT_SECONDS: float = Field(5, gt=0)
    # Backpressure: while Temporal has more workflow tasks than this waiting on the task queue, only
    # rows whose deadline is near are delivered (the rest wait in the outbox, where they are
    # ordered by urgency, not in Temporal's first-come queue where they would delay timers). 0: off.
    DISPATCH_MAX_TEMPORAL_BACKLOG: int = Field(200, ge=0)
    # A workflow signalled less than this long ago waits that long for its next rows, so a workflow
    # that hears of many changes in a row (a session giving delegation after delegation) gets them
    # in one `notices` signal instead of one signal each. 0: every row is delivered at once.
    DISPATCH_LINGER_MS: int = Field(100, ge=0)
    # A file the dispatcher touches while its batches complete (container healthchecks); "" = none.
    DISPATCH_HEALTH_FILE: str = ""
    # Dispatchers run inside the worker process (`python worker.py`), on the worker's own Temporal
    # client: a workflow's first notices then start it eagerly, its first workflow task coming back
    # in the start's answer instead of through matching (README, "Capacity model"). 0: none; run
    # `python -m notices` processes instead (or as well).
    WORKER_DISPATCHERS: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.CARACAL_MODE not in ("dev", "rc", "stable"):
            raise ValueError("CARACAL_MODE must be dev, rc or stable")
        for name in ("IDEMPOTENCY_HMAC_KEY", "IDEMPOTENCY_HMAC_KEY_PREVIOUS", "AUDIT_HMAC_KEY", "STREAMS_HMAC_KEY"):
            value = getattr(self, name)
            if value:
                try:
                    raw = bytes.fromhex(value)
                except ValueError as exc:
                    raise ValueError(f"{name} must be hex") from exc
                if len(raw) < 32:
                    raise ValueError(f"{name} must be at least 32 bytes")
        if self.CARACAL_MODE in ("rc", "stable") and not self.IDEMPOTENCY_HMAC_KEY:
            raise ValueError("IDEMPOTENCY_HMAC_KEY is required when CARACAL_MODE is rc or stable")
        return self

    @property
    def idempotency_key_bytes(self) -> bytes:
        return bytes.fromhex(self.IDEMPOTENCY_HMAC_KEY or DEV_IDEMPOTENCY_HMAC_KEY)

    @property
    def idempotency_previous_key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.IDEMPOTENCY_HMAC_KEY_PREVIOUS) if self.IDEMPOTENCY_HMAC_KEY_PREVIOUS else None

    @property
    def audit_key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.AUDIT_HMAC_KEY) if self.AUDIT_HMAC_KEY else None

    @property
    def worker_build_id(self) -> str:
        return self.WORKER_BUILD_ID or workflow_code_digest()


@lru_cache
def workflow_code_digest() -> str:
    """A digest of the code that decides what a workflow does: workflows/ and the contract."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted((root / "workflows").glob("*.py")) + [root / "rules" / "workflow_contract.py"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:32]


def load_settings(**overrides) -> Settings:
    _resolve_file_vars()
    return Settings(**overrides)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
