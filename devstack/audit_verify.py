"""Verify an admin audit hash chain: `python -m devstack.audit_verify --zone Z` (or `--global` for
the zone-less chain of v1 façade calls).

Reads DATABASE_URL and AUDIT_HMAC_KEY (or their *_FILE forms) from the environment; `--database-url`
overrides the first. Prints `OK …` and exits 0 when every record's hash, link, sequence number and
(with a key) HMAC verify and the chain head matches the last record; otherwise prints the first
broken link (`BROKEN <chain> at chain_seq N (id …): reason`) and exits 1. Exit 2: could not check.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from storage.audit import ChainReport, verify_chain
from storage.db import Database


async def check(database_url: str, zone_id: str | None, hmac_key: bytes | None) -> ChainReport:
    db = Database(database_url, max_size=1, min_size=1)
    await db.open()
    try:
        return await verify_chain(db, zone_id, hmac_key)
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.audit_verify", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--zone", help="zone id whose chain to verify")
    target.add_argument("--global", dest="global_chain", action="store_true", help="verify the zone-less chain")
    parser.add_argument("--database-url", default=None, help="defaults to DATABASE_URL")
    args = parser.parse_args(argv)

    from settings import load_settings

    overrides = {"DATABASE_URL": args.database_url} if args.database_url else {}
    try:
        settings = load_settings(**overrides)
    except Exception as exc:
        print(f"cannot load settings: {exc}", file=sys.stderr)
        return 2
    key = settings.audit_key_bytes
    try:
        report = asyncio.run(check(settings.DATABASE_URL, None if args.global_chain else args.zone, key))
    except Exception as exc:
        print(f"cannot verify: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report.describe() + ("" if key else " (AUDIT_HMAC_KEY not set: HMACs not checked)"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
