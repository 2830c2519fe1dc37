"""Idempotency receipts (reference §7), used inside the transaction of the mutation they guard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from rules.errors import CoordinatorError
from rules.idempotency import key_digest
from rules.ids import new_id
from settings import Settings
from storage.db import XACT_LOCK_SQL, Conn, one

SESSION_START = "session.start.v2"
DELEGATION_CREATE = "delegation.create.v2"
INVOCATION_CREATE = "invocation.create.v2"
BULK_REVOCATION = "delegation.bulk_revoke.v1"


@dataclass(frozen=True)
class CreateResult:
    """What every create answers: the status and body, and whether they were replayed from a receipt."""

    status: int
    body: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True)
class IdempotencyRequest:
    operation: str
    zone_id: str
    scope_id: str
    key: str
    request_digest: bytes
    generated: bool = False  # `Idempotency-Key-Kind: generated` → shorter retention


@dataclass(frozen=True)
class Receipt:
    resource_type: str
    resource_id: str
    response_status: int
    response_json: dict[str, Any]


def _digests(settings: Settings, key: str) -> list[bytes]:
    digests = [key_digest(key, settings.idempotency_key_bytes)]
    previous = settings.idempotency_previous_key_bytes
    if previous:
        digests.append(key_digest(key, previous))
    return digests


async def find_receipt(conn: Conn, settings: Settings, req: IdempotencyRequest) -> Receipt | None:
    """The live receipt for this key, None when the request is new.

    Serialises concurrent users of one key with a transaction advisory lock, drops an expired
    receipt, enforces the per-scope quota for new keys, and answers 409 on a changed request.
    """
    digests = _digests(settings, req.key)
    await conn.execute(XACT_LOCK_SQL, (f"{req.operation}:{req.zone_id}:{req.scope_id}:{digests[0].hex()}",))
    await conn.execute(
        """DELETE FROM coordinator_idempotency_receipts
           WHERE operation = %s AND zone_id = %s AND scope_id = %s AND key_digest = ANY(%s) AND expires_at <= now()""",
        (req.operation, req.zone_id, req.scope_id, digests),
    )
    cur = await conn.execute(
        """SELECT request_digest, resource_type, resource_id, response_status, response_json
           FROM coordinator_idempotency_receipts
           WHERE operation = %s AND zone_id = %s AND scope_id = %s AND key_digest = ANY(%s)
           FOR UPDATE""",
        (req.operation, req.zone_id, req.scope_id, digests),
    )
    row = await cur.fetchone()
    if row is None:
        await conn.execute(XACT_LOCK_SQL, (f"idempotency-quota:{req.operation}:{req.zone_id}:{req.scope_id}",))
        cur = await conn.execute(
            """SELECT count(*) AS n FROM coordinator_idempotency_receipts
               WHERE operation = %s AND zone_id = %s AND scope_id = %s AND expires_at > now()""",
            (req.operation, req.zone_id, req.scope_id),
        )
        if one(await cur.fetchone())["n"] >= settings.IDEMPOTENCY_MAX_RECEIPTS_PER_SCOPE:
            raise CoordinatorError(429, "idempotency_receipt_limit_exceeded")
        return None
    if bytes(row["request_digest"]) != req.request_digest:
        raise CoordinatorError(409, "idempotency_key_conflict",
                               message="Idempotency-Key was already used with a different request")
    return Receipt(row["resource_type"], row["resource_id"], int(row["response_status"]), row["response_json"])


def inactive_result() -> CoordinatorError:
    return CoordinatorError(409, "idempotency_result_inactive",
                            message="the resource created under this Idempotency-Key is no longer active")


async def store_receipt(conn: Conn, settings: Settings, req: IdempotencyRequest, *, resource_type: str,
                        resource_id: str, status: int, body: dict[str, Any]) -> None:
    retention = (settings.GENERATED_IDEMPOTENCY_RETENTION_SECONDS if req.generated
                 else settings.IDEMPOTENCY_RETENTION_SECONDS)
    await conn.execute(
        """INSERT INTO coordinator_idempotency_receipts
           (id, operation, zone_id, scope_id, key_digest, request_digest, resource_type, resource_id,
            response_status, response_json, created_at, expires_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now(), now() + make_interval(secs => %s))""",
        (new_id(), req.operation, req.zone_id, req.scope_id, _digests(settings, req.key)[0],
         req.request_digest, resource_type, resource_id, status, Jsonb(body), retention),
    )
