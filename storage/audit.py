"""Admin audit records: one hash chain per zone (reference §11.1), with an O(1) head.

Each record's `content_sha256` is the hex SHA-256 of its fields (id, request_id, actor_id,
actor_name, actor_scope, action, method, path, zone_id, entity_type, entity_id, status_code,
payload JSON or "", occurred_at as ISO with milliseconds), each value (null → "") followed by
U+001F, after removing NUL characters. `prev_content_sha256` is the previous record's hash in the
chain (null for the first), `chain_seq` counts from 1, and `chain_hmac` is hex
HMAC-SHA256(AUDIT_HMAC_KEY, content_sha256 + "|" + (prev_content_sha256 or "")), null without a key.

Chains: a zone's records (`chain_key` "zone:<zone id>") and the zone-less ones (v1 façade calls,
`admin-audit::global`). The head of every chain is one row of `admin_audit_heads`; an append is
one statement (`admin_audit_append`, migration 0006) that locks that row, advances it and inserts
the record, either on its own or as the last statement of a command's transaction (with its
COMMIT). Concurrent appends to a chain serialize on the row for the statement's duration only
(instead of the reference's advisory lock plus a scan for the greatest chain_seq), and appends to
different chains never wait for each other. The HMAC is computed by Postgres from padded keys
(sha256 only, no extension needed).

`verify_chain` walks a chain and names the first broken link; `devstack/audit_verify.py` is its
command line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rules.ids import new_id
from rules.timefmt import iso_ms
from storage.db import CommitRows, Conn, Database, Jsonb, at_commit

GLOBAL_CHAIN = "admin-audit::global"
SEPARATOR = "\x1f"
CONTENT_FIELDS = ("id", "request_id", "actor_id", "actor_name", "actor_scope", "action", "method", "path",
                  "zone_id", "entity_type", "entity_id", "status_code", "payload_json", "occurred_at")


def chain_key(zone_id: str | None) -> str:
    return f"zone:{zone_id}" if zone_id else GLOBAL_CHAIN


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return iso_ms(value) or ""
    return str(value).replace("\x00", "")


def content_sha256(record: dict[str, Any]) -> str:
    parts = []
    for name in CONTENT_FIELDS:
        value = record.get(name)
        if name == "payload_json":
            value = "" if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        parts.append(_text(value) + SEPARATOR)
    return hashlib.sha256("".join(parts).encode("utf-8")).hexdigest()


def chain_hmac(key: bytes | None, content: str, prev: str | None) -> str | None:
    if not key:
        return None
    return hmac.new(key, f"{content}|{prev or ''}".encode(), hashlib.sha256).hexdigest()


def now_ms() -> datetime:
    """Now, truncated to milliseconds: what is stored is exactly what was hashed."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class AuditEntry:
    request_id: str | None
    actor_id: str | None
    actor_name: str | None
    actor_scope: str | None
    method: str
    path: str
    zone_id: str | None
    entity_type: str | None
    entity_id: str | None
    status_code: int
    payload: Any = None

    def record(self) -> dict[str, Any]:
        clean = {k: (v.replace("\x00", "") if isinstance(v, str) else v) for k, v in self.__dict__.items()}
        return {
            "id": new_id(), "request_id": clean["request_id"], "actor_id": clean["actor_id"],
            "actor_name": clean["actor_name"], "actor_scope": clean["actor_scope"],
            "action": f"{clean['method']} {clean['path']}", "method": clean["method"], "path": clean["path"],
            "zone_id": clean["zone_id"], "entity_type": clean["entity_type"], "entity_id": clean["entity_id"],
            "status_code": int(self.status_code), "payload_json": self.payload, "occurred_at": now_ms(),
        }


def hmac_pads(key: bytes | None) -> tuple[bytes | None, bytes | None]:
    """HMAC-SHA256's inner and outer padded keys, so that Postgres can compute the HMAC with
    sha256() alone: HMAC(K, m) = sha256(K^opad || sha256(K^ipad || m))."""
    if not key:
        return None, None
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\x00")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


# The append is one function (migration 0006): create the chain's head on first use, lock it,
# advance it, insert the record linked to the old head. It runs as one statement (never holding
# the head across a client round trip) and answers NULLs, having written nothing, when the insert
# fails, so that a command's transaction that carries it still commits.
_APPEND = "SELECT * FROM admin_audit_append(%s, %s, %s, %s)"


class AuditUnavailable(RuntimeError):
    """The audit record was not written (the chain is as it was)."""


def _append_params(entry: AuditEntry, hmac_key: bytes | None) -> tuple[dict[str, Any], tuple[Any, ...]]:
    record = entry.record()
    record["content_sha256"] = content_sha256(record)
    ipad, opad = hmac_pads(hmac_key)
    document = dict(record, occurred_at=record["occurred_at"].isoformat())
    return record, (chain_key(record["zone_id"]), Jsonb(document), ipad, opad)


def _stored(record: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None or row["id"] is None:
        raise AuditUnavailable(f"audit record {record['id']} not written (see the Postgres log)")
    return dict(record, chain_seq=row["chain_seq"], prev_content_sha256=row["prev_content_sha256"],
                chain_hmac=row["chain_hmac"])


async def append(db: Database, entry: AuditEntry, hmac_key: bytes | None) -> dict[str, Any]:
    """Append one record to its chain (one autocommit statement); returns the stored record.
    Raises AuditUnavailable when it was not written."""
    record, params = _append_params(entry, hmac_key)
    return _stored(record, await db.fetchrow(_APPEND, params))


@dataclass
class PendingAppend:
    """An append travelling with a transaction's COMMIT: `stored()` once it has committed."""

    record: dict[str, Any]
    result: CommitRows

    def stored(self) -> dict[str, Any]:
        """The stored record; raises AuditUnavailable when the append was not written."""
        rows = self.result.rows
        return _stored(self.record, rows[0] if rows else None)


async def append_at_commit(conn: Conn, entry: AuditEntry, hmac_key: bytes | None) -> PendingAppend:
    """Append one record with the COMMIT of the transaction holding `conn` (as its last statement,
    so the chain head is locked only while Postgres runs it). A failed append leaves the
    transaction to commit without it: `stored()` then raises AuditUnavailable."""
    record, params = _append_params(entry, hmac_key)
    return PendingAppend(record, await at_commit(conn, _APPEND, params))


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainReport:
    chain_key: str
    records: int
    broken_seq: int | None = None
    broken_id: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def describe(self) -> str:
        if self.ok:
            return f"OK {self.chain_key}: {self.records} records, chain intact"
        where = f"chain_seq {self.broken_seq}" if self.broken_seq is not None else "head"
        ident = f" (id {self.broken_id})" if self.broken_id else ""
        return f"BROKEN {self.chain_key} at {where}{ident}: {self.reason}"


class ChainVerifier:
    """Checks a chain's records fed in chain_seq order, then its head row; stops at the first break."""

    def __init__(self, key: str, hmac_key: bytes | None) -> None:
        self.key = key
        self.hmac_key = hmac_key
        self.count = 0
        self.prev: str | None = None

    def check(self, row: dict[str, Any]) -> ChainReport | None:
        self.count += 1
        seq, rid = row["chain_seq"], row["id"]

        def broken(reason: str) -> ChainReport:
            return ChainReport(self.key, self.count, seq, rid, reason)

        if seq != self.count:
            return broken(f"chain_seq is {seq}, expected {self.count} (a record is missing or duplicated)")
        if content_sha256(row) != row["content_sha256"]:
            return broken("content_sha256 does not match the record's fields (record altered)")
        if row["prev_content_sha256"] != self.prev:
            return broken("prev_content_sha256 does not match the previous record's hash")
        if self.hmac_key is not None:
            expected = chain_hmac(self.hmac_key, row["content_sha256"], self.prev) or ""
            if row["chain_hmac"] is None or not hmac.compare_digest(row["chain_hmac"], expected):
                return broken("chain_hmac does not verify under AUDIT_HMAC_KEY")
        self.prev = row["content_sha256"]
        return None

    def finish(self, head: dict[str, Any] | None) -> ChainReport:
        if head is None:
            if self.count:
                return ChainReport(self.key, self.count, None, None, "the chain has records but no head row")
            return ChainReport(self.key, 0)
        if head["chain_seq"] != self.count or (self.count and head["content_sha256"] != self.prev):
            return ChainReport(self.key, self.count, None, None,
                               f"the head is at chain_seq {head['chain_seq']} but the records end at {self.count} "
                               "with another hash (records removed from the end?)")
        return ChainReport(self.key, self.count)


_ROWS_SQL = ("SELECT id, request_id, actor_id, actor_name, actor_scope, action, method, path, zone_id, entity_type, "
             "entity_id, status_code, payload_json, occurred_at, content_sha256, prev_content_sha256, chain_hmac, "
             "chain_seq FROM admin_audit_events WHERE {where} ORDER BY chain_seq, id")


async def verify_chain(db: Database, zone_id: str | None, hmac_key: bytes | None) -> ChainReport:
    """Verify the zone's chain (the zone-less chain for None) in one consistent snapshot."""
    key = chain_key(zone_id)
    verifier = ChainVerifier(key, hmac_key)
    where, params = ("zone_id = %s", (zone_id,)) if zone_id else ("zone_id IS NULL", ())
    async with db.connection() as conn:
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = await conn.execute("SELECT chain_seq, content_sha256 FROM admin_audit_heads WHERE chain_key = %s",
                                     (key,))
            head = await cur.fetchone()
            rows = conn.cursor(name="audit_verify")
            await rows.execute(_ROWS_SQL.format(where=where), params)
            while batch := await rows.fetchmany(1000):
                for row in batch:
                    report = verifier.check(row)
                    if report is not None:
                        return report
            await rows.close()
    return verifier.finish(head)
