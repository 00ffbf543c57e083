"""The settings of one Graph source, as its kind reads them from the configuration (frozen, typed)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

PUBLIC_CLOUD_AUTHORITY = "https://login.microsoftonline.com"
PUBLIC_CLOUD_GRAPH = "https://graph.microsoft.com/v1.0"


@dataclass(frozen=True)
class GraphSettings:
    tenant_id: str
    client_id: str
    credential: str = "certificate"  # certificate (preferred: the PEM of key and certificate) or client_secret
    authority_host: str = PUBLIC_CLOUD_AUTHORITY
    graph_url: str = PUBLIC_CLOUD_GRAPH
    ca_bundle: str | None = None
    timeout: float = 60.0
    secret_expires: date | None = None  # a client secret's end date, as the app registration shows it
    poll_interval_seconds: float = 60.0  # delta polling while no notification path is up
    max_per_mailbox: int = 3  # concurrent requests per mailbox (Outlook allows 4; one stays free for others)
    page_size: int = 100  # Prefer: odata.maxpagesize
    # The window a delta token covers (frozen into the token): today - days_back .. today + days_ahead + slack.
    # When the sync window's end passes the token's, the token is "expired" and the room is imported afresh.
    days_back: int = 7
    days_ahead: int = 365
    slack_days: int = 7
    max_attempts: int = 5  # per request: 429/503 with Retry-After, other 5xx and connection failures
    max_retry_after: float = 120.0  # longest Retry-After honoured within one request; beyond, the room waits
    back_off: float = 0.5  # first back-off without Retry-After, doubling
    outage_retry_seconds: float = 5.0
    outage_max_retry_seconds: float = 60.0
    auth_retry_seconds: float = 300.0
    auth_max_retry_seconds: float = 3600.0

    @property
    def authority(self) -> str:
        return f"{self.authority_host.rstrip('/')}/{self.tenant_id}"

    @property
    def scope(self) -> str:
        """The .default scope of the Graph host (national clouds have their own)."""
        root = self.graph_url.split("/v1.0")[0].split("/beta")[0].rstrip("/")
        return f"{root}/.default"
