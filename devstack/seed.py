"""Seed a demo zone through the operator-token directory routes (idempotent: every call is a PUT).

    await seed_demo_zone("http://127.0.0.1:4000", operator_token)

or from a shell, against a running API:

    .venv/bin/python -m devstack.seed --base-url http://127.0.0.1:4000 [--token T] [--zone demo]

(the token defaults to $CARACAL_COORDINATOR_TOKEN, then to `.data/operator-token`).

What it creates in zone `zone_id`:
- applications `demo-app`, `peer-app` (managed) and `dcr-app` (dcr, expires in 30 days);
- resources `res-docs` (`resource://docs`: docs:read, docs:write) and `res-calendar`
  (`resource://calendar`: calendar:read);
- authority records `ar-demo` (application session of demo-app) and `ar-peer` (of peer-app),
  both expiring in 365 days.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

__all__ = ["seed_demo_zone", "SeedError", "demo_directory"]


class SeedError(RuntimeError):
    """A directory call of the seed failed."""


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def demo_directory(now: datetime | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """The demo directory as (collection, id, PUT body) triples, in the order they are written."""
    now = now or datetime.now(timezone.utc)
    year = _iso(now + timedelta(days=365))
    return [
        ("applications", "demo-app", {"registration_method": "managed", "expires_at": None}),
        ("applications", "peer-app", {"registration_method": "managed", "expires_at": None}),
        ("applications", "dcr-app", {"registration_method": "dcr", "expires_at": _iso(now + timedelta(days=30))}),
        ("resources", "res-docs", {"identifier": "resource://docs", "scopes": ["docs:read", "docs:write"]}),
        ("resources", "res-calendar", {"identifier": "resource://calendar", "scopes": ["calendar:read"]}),
        ("authority-records", "ar-demo", {"session_type": "application", "subject_id": "demo-app", "expires_at": year}),
        ("authority-records", "ar-peer", {"session_type": "application", "subject_id": "peer-app", "expires_at": year}),
    ]


async def seed_demo_zone(base_url: str, operator_token: str, zone_id: str = "demo", *,
                         client: httpx.AsyncClient | None = None) -> dict:
    """PUT the demo directory into `zone_id`. Returns
    `{"zone_id": ..., "applications": {id: body}, "resources": {...}, "authority_records": {...}}`
    with the JSON each PUT answered. Raises `SeedError` naming the failing call.
    `client` may be passed to seed an in-process app (httpx ASGITransport)."""
    if not operator_token:
        raise SeedError("seed_demo_zone needs the operator token (CARACAL_COORDINATOR_TOKEN)")
    result: dict[str, Any] = {"zone_id": zone_id, "applications": {}, "resources": {}, "authority_records": {}}
    headers = {"Authorization": f"Bearer {operator_token}"}
    own = client is None
    http = client or httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=10.0)
    try:
        for collection, entity_id, body in demo_directory():
            path = f"/zones/{zone_id}/{collection}/{entity_id}"
            try:
                resp = await http.put(path, json=body, headers=headers)
            except httpx.HTTPError as exc:
                raise SeedError(f"seed: PUT {base_url.rstrip('/')}{path} failed: {exc!r}") from exc
            if resp.status_code not in (200, 201):
                raise SeedError(
                    f"seed: PUT {base_url.rstrip('/')}{path} answered {resp.status_code}: {resp.text[:500]}"
                )
            try:
                answer = resp.json()
            except ValueError:
                answer = None
            result[collection.replace("-", "_")][entity_id] = answer
    finally:
        if own:
            await http.aclose()
    return result


def _default_token() -> str:
    token = os.environ.get("CARACAL_COORDINATOR_TOKEN", "")
    if token:
        return token
    path = Path(__file__).resolve().parent.parent / ".data" / "operator-token"
    return path.read_text().strip() if path.exists() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.seed", description="Seed the demo zone.")
    parser.add_argument("--base-url", default=f"http://127.0.0.1:{os.environ.get('PORT', '4000')}")
    parser.add_argument("--token", default=None, help="operator token (default: $CARACAL_COORDINATOR_TOKEN "
                        "or .data/operator-token)")
    parser.add_argument("--zone", default="demo")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(seed_demo_zone(args.base_url, args.token or _default_token(), args.zone))
    except SeedError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
