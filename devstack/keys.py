"""The local mandate signing key: an ES256 (P-256) key and the JWKS that publishes it.

`make dev` and the `token` command use `ensure_signing_key(dir)`, which creates the key once and
reuses it afterwards, so tokens minted earlier stay valid across restarts. The Coordinator trusts the
key through `JWKS_FILE=<dir>/jwks.json` (reference-behaviour §3.1 step 6, sdk-wire-contract §7.3).
Tests use `generate_signing_key()` (memory only) and `write_jwks()`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["SigningKey", "generate_signing_key", "ensure_signing_key", "write_jwks", "public_jwk",
           "PRIVATE_KEY_FILE", "JWKS_FILE"]

PRIVATE_KEY_FILE = "signing-key.pem"
JWKS_FILE = "jwks.json"


@dataclass(frozen=True)
class SigningKey:
    private_key: ec.EllipticCurvePrivateKey
    kid: str
    jwks: dict[str, Any]
    jwks_path: Path | None = None

    @property
    def public_jwk(self) -> dict[str, Any]:
        return self.jwks["keys"][0]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _coordinates(private_key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    numbers = private_key.public_key().public_numbers()
    return _b64url(numbers.x.to_bytes(32, "big")), _b64url(numbers.y.to_bytes(32, "big"))


def thumbprint(private_key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638 JWK thumbprint: a stable kid, so a reused key always publishes the same kid."""
    x, y = _coordinates(private_key)
    canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def public_jwk(private_key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    x, y = _coordinates(private_key)
    return {"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid, "x": x, "y": y}


def _signing_key(private_key: ec.EllipticCurvePrivateKey, kid: str | None, jwks_path: Path | None) -> SigningKey:
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or private_key.curve.name != "secp256r1":
        raise ValueError("the signing key must be an EC P-256 private key")
    kid = kid or thumbprint(private_key)
    return SigningKey(private_key=private_key, kid=kid, jwks={"keys": [public_jwk(private_key, kid)]},
                      jwks_path=jwks_path)


def generate_signing_key(kid: str | None = None) -> SigningKey:
    """A fresh in-memory key (nothing written); kid defaults to the key's thumbprint."""
    return _signing_key(ec.generate_private_key(ec.SECP256R1()), kid, None)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    # Write-then-rename so a reader (the JWKS_FILE reloader) never sees a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_jwks(key: SigningKey, path: Path | str) -> Path:
    """Publish the key's JWKS at `path` (world-readable: it holds only the public key)."""
    path = Path(path)
    _atomic_write(path, (json.dumps(key.jwks, indent=2) + "\n").encode("utf-8"), 0o644)
    return path


def _load_private_key(pem_path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pem_path} does not hold an EC private key")
    return key


def _create_private_key(pem_path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL with mode 0600 from the start: the secret is never readable by others, and two
    # concurrent first runs cannot both create a key (the loser reuses the winner's).
    try:
        fd = os.open(pem_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load_private_key(pem_path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return key


def ensure_signing_key(directory: Path | str) -> SigningKey:
    """Load `<directory>/signing-key.pem`, creating it on first use; keep `jwks.json` in step with it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pem_path = directory / PRIVATE_KEY_FILE
    private_key = _load_private_key(pem_path) if pem_path.exists() else _create_private_key(pem_path)
    key = _signing_key(private_key, None, directory / JWKS_FILE)
    assert key.jwks_path is not None
    if _read_json(key.jwks_path) != key.jwks:
        write_jwks(key, key.jwks_path)
    return key


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
