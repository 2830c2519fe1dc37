"""Placeholder until the rate limiter lands: the invocation limiter admits everything."""


def check_invocation_rate(app_state, zone_id: str, client_key: str) -> None:
    return None
