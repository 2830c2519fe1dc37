"""Bearer authentication (reference-behaviour §3.1) and mandate verification for /v1/verify (§4.25.1).

`Authenticator.authenticate` runs the §3.1 steps in the reference's order, because the order is
observable: e.g. a token lacking the scope on another zone's URL answers `missing_scope`, not
`zone_mismatch`, and a token without `client_id` on another zone answers `zone_mismatch`.

Keys come from `JwksCache`: `JWKS_FILE` (reloaded when it changes), else `JWKS_URL` (may contain
`{zone_id}`), else the reference's `${STS_URL}/.well-known/jwks.json?zone_id=<zone>`.

The modules:

- `routes`: public paths and the operator token's route allowlist (§3.1 steps 1, 3, 4);
- `jwks`: the per-zone signing keys (§3.1 step 6);
- `bearer`: the Authorization header, the unverified JWT and the shape of claim values;
- `identity`: the authenticated caller;
- `authenticator`: the §3.1 steps in order, and signature verification for both routes;
- `mandate`: the claim rules and the answer of /v1/verify (§4.25.1).
"""

from __future__ import annotations

from api.auth.authenticator import Authenticator
from rules.identity import ADMIN_SCOPE, OPERATOR, Identity
from api.auth.jwks import JwksCache, JwksError
from api.auth.routes import OPERATOR_GLOBAL, PUBLIC_PATHS, operator_route_zone, split_path
from rules.ids import ID_PATTERN

__all__ = [
    "ADMIN_SCOPE",
    "Authenticator",
    "Identity",
    "ID_PATTERN",
    "JwksCache",
    "JwksError",
    "OPERATOR",
    "OPERATOR_GLOBAL",
    "PUBLIC_PATHS",
    "operator_route_zone",
    "split_path",
]
