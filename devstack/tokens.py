"""Mint Coordinator mandates (ES256 JWTs) the way the Caracal STS does (sdk-wire-contract §7.3).

    python -m devstack.tokens --zone Z --app A [--sid AR] [--scope S ...] [--ttl N]
                              [--key-dir .data/keys] [--issuer URL]

prints just the token, so it can be captured with `TOKEN=$(python -m devstack.tokens ...)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt

from devstack.keys import SigningKey, ensure_signing_key

__all__ = ["mint_token", "main", "DEFAULT_KEY_DIR"]

DEFAULT_KEY_DIR = ".data/keys"
DEFAULT_SCOPES: tuple[str, ...] = ("agent:lifecycle",)


def mint_token(
    key: SigningKey,
    *,
    issuer: str,
    zone_id: str,
    client_id: str,
    sid: str | None,
    scopes: Sequence[str] | str = DEFAULT_SCOPES,
    ttl_seconds: int = 900,
    sub: str | None = None,
    use: str = "session",
    sub_type: str = "application",
    extra: dict[str, Any] | None = None,
    now: int | None = None,
) -> str:
    """An ES256 mandate. `extra` is merged last; a None value in `extra` removes that claim,
    which is how tests build tokens that lack a required claim."""
    iat = int(time.time()) if now is None else int(now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": [issuer],
        "sub": client_id if sub is None else sub,
        "iat": iat,
        "exp": iat + int(ttl_seconds),
        "jti": str(uuid.uuid4()),
        "zone_id": zone_id,
        "client_id": client_id,
        "scope": scopes if isinstance(scopes, str) else " ".join(scopes),
        "use": use,
        "sub_type": sub_type,
    }
    if sid is not None:
        claims["sid"] = sid
        claims["root_sid"] = sid
    for name, value in (extra or {}).items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid, "typ": "JWT"})


def _default_issuer() -> str:
    # Read the environment directly (not load_settings) so minting never trips over unrelated settings.
    from settings import Settings

    return os.environ.get("ISSUER_URL") or str(Settings.model_fields["ISSUER_URL"].default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack.tokens", description="Mint a Coordinator mandate.")
    parser.add_argument("--zone", required=True, help="zone_id claim")
    parser.add_argument("--app", required=True, help="client_id (and default sub) claim")
    parser.add_argument("--sid", default=None, help="authority record id (sid and root_sid claims)")
    parser.add_argument("--scope", action="append", default=None,
                        help="scope to grant; repeat for several (default: agent:lifecycle)")
    parser.add_argument("--ttl", type=int, default=900, help="lifetime in seconds (default 900)")
    parser.add_argument("--key-dir", default=DEFAULT_KEY_DIR, help=f"signing key directory (default {DEFAULT_KEY_DIR})")
    parser.add_argument("--issuer", default=None, help="iss/aud (default: $ISSUER_URL or the settings default)")
    parser.add_argument("--sub", default=None, help="sub claim (default: the app)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    key = ensure_signing_key(Path(args.key_dir))
    token = mint_token(
        key,
        issuer=args.issuer or _default_issuer(),
        zone_id=args.zone,
        client_id=args.app,
        sid=args.sid,
        scopes=args.scope or list(DEFAULT_SCOPES),
        ttl_seconds=args.ttl,
        sub=args.sub,
    )
    sys.stdout.write(token + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
