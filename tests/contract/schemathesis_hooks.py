"""Schemathesis hooks for tests/test_openapi_contract.py (loaded through SCHEMATHESIS_HOOKS).

`positive_data_acceptance` is configured to accept 400, because the reference answers 400 for
rules a JSON schema cannot state (a cursor must be an id of the list, a delegation needs an expiry
from one of three fields and must not be a self-delegation, a service session's DELETE needs its
lease generation, ...). This check keeps the strict half of it: data valid per the documented
schema must never fail *validation*, so a positive case may not be answered 400 with one of the
validation codes (invalid_params, invalid_query, invalid_body) nor with malformed-JSON's
internal_error. Every other 400 carries a rule's own code.
"""

from __future__ import annotations

import json

import schemathesis

VALIDATION_CODES = frozenset({"invalid_params", "invalid_query", "invalid_body", "internal_error"})


@schemathesis.check
def schema_valid_data_passes_validation(ctx, response, case):  # noqa: ANN001, ANN201
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        from schemathesis.specs.openapi.checks import is_unexpected_http_status_case

        if is_unexpected_http_status_case(case):
            return None
    except ImportError:  # pragma: no cover - internal helper moved
        pass
    try:
        code = json.loads(response.content).get("error")
    except (ValueError, AttributeError):
        code = None
    if code in VALIDATION_CODES:
        raise AssertionError(f"Schema-valid data refused with 400 {code}: {response.content[:500]!r}")
    return None


@schemathesis.hook
def filter_path_parameters(context, path_parameters):  # noqa: ANN001, ANN201
    """Drop generated path values holding a percent sign followed by two hex digits: schemathesis
    sends them unescaped, so the server reads them percent-decoded ("a%3Ab" is the valid id "a:b")
    and a case meant to be invalid is a valid request on the wire. Ids never contain "%"; a lone
    "%" (not an escape) is still generated and refused."""
    import re

    return not any(isinstance(v, str) and re.search(r"%[0-9A-Fa-f]{2}", v) for v in (path_parameters or {}).values())
