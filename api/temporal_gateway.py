"""The API's only handle on Temporal: no command waits on it (DESIGN.md, "Postgres decides,
Temporal follows"). `/ready` uses the client to report Temporal's state; commands reach the
workflows through the workflow outbox and the dispatcher."""

from __future__ import annotations

from temporalio.client import Client

from settings import Settings


class TemporalGateway:
    def __init__(self, client: Client | None, settings: Settings) -> None:
        self.client = client
        self.settings = settings
