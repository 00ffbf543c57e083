"""How the hub runs: its settings, checked before it starts (TLS required, except on a loopback address)."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from gateway.errors import ConfigError
from gateway.security.secret import Secret

MIN_ADMIN_TOKEN: Final = 16
LOOPBACK_NAMES: Final = ("localhost",)
GRAPH_RATE: Final = 20.0
GRAPH_BURST: Final = 200


@dataclass(frozen=True, slots=True)
class HubSettings:
    """How the hub runs. TLS is required, except on a loopback address with ``insecure_http`` (development)."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    cert_file: Path | None = None  # PEM server certificate (chain)
    key_file: Path | None = None  # PEM private key
    insecure_http: bool = False
    admin_token: Secret | None = None  # None: the admin HTTP API is off (the CLI still works on the data dir)
    public_url: str | None = None  # https://hub.vendor.example; default: the address each request came to
    command_timeout: float = 60.0  # longer than the gateway's own attendant timeout (30 s by default)
    token_ttl: float = 3600.0  # enrollment tokens, when the request names no ttl
    webhook_ca_file: Path | None = None  # CAs to trust for webhook endpoints (default: the system store)
    heartbeat: float = 20.0  # WebSocket ping interval; a peer silent for that long after a ping is dropped
    hello_timeout: float = 10.0
    revocation_check: float = 5.0  # how often live sessions are checked against the store (a CLI revoke)
    sse_keepalive: float = 15.0
    webhook_retry_base: float = 1.0
    webhook_retry_max: float = 300.0
    webhook_timeout: float = 10.0
    synchronous: str = "NORMAL"  # SQLite; FULL survives power loss too, at some throughput cost
    retention_days: int = 30  # stored events older than this are deleted (undelivered webhook ones kept); 0: never
    # Graph change notifications posted to a gateway's route (graph_notifications.py): a token bucket per route, so
    # a flood of forged posts cannot flood the tunnel (Graph retries what is refused with 429)
    graph_rate: float = GRAPH_RATE  # posts per second, sustained
    graph_burst: int = GRAPH_BURST

    def validate(self) -> None:
        if not self.insecure_http:
            if self.cert_file is None or self.key_file is None:
                raise ConfigError("the hub serves TLS only, and no certificate and key were given",
                                  key="hub_tls_required",
                                  remedy="pass --cert FILE --key FILE (PEM); for a development hub on a loopback "
                                         "address only, --insecure-http")
            for option, path in (("--cert", self.cert_file), ("--key", self.key_file)):
                if not Path(path).is_file():
                    raise ConfigError(f"the TLS file {path} ({option}) does not exist", key="hub_tls_unreadable",
                                      remedy=f"check the path given with {option}")
        elif not _is_loopback(self.host):
            raise ConfigError(f"--insecure-http is for development on a loopback address, not {self.host}",
                              key="hub_tls_required",
                              remedy="listen on 127.0.0.1 (or ::1), or serve TLS with --cert and --key")
        if self.public_url is not None:
            scheme = urlsplit(self.public_url).scheme
            if scheme not in (("http", "https") if self.insecure_http else ("https",)):
                raise ConfigError(f"the public URL {self.public_url!r} must start with https://",
                                  key="invalid_public_url", remedy="give the address gateways reach the hub at, "
                                                                   "e.g. https://hub.vendor.example")
        if self.webhook_ca_file is not None and not Path(self.webhook_ca_file).is_file():
            raise ConfigError(f"the webhook CA bundle {self.webhook_ca_file} does not exist",
                              key="webhook_ca_unreadable",
                              remedy="check the path given with --webhook-ca (a PEM file of CA certificates)")
        if self.admin_token is not None and len(self.admin_token.reveal()) < MIN_ADMIN_TOKEN:
            raise ConfigError(f"the admin token is shorter than {MIN_ADMIN_TOKEN} characters", key="weak_admin_token",
                              remedy="use a long random value, e.g. `openssl rand -base64 32`")
        if type(self.retention_days) is not int or self.retention_days < 0:
            raise ConfigError(f"the hub setting retention_days must be a whole number of days >= 0, not "
                              f"{self.retention_days!r}", key="invalid_hub_setting",
                              remedy="give --retention-days N (0 keeps events for ever)")
        if type(self.graph_burst) is not int or self.graph_burst < 1:
            raise ConfigError(f"the hub setting graph_burst must be a whole number >= 1, not {self.graph_burst!r}",
                              key="invalid_hub_setting", remedy="give --graph-burst N")
        for name in ("command_timeout", "token_ttl", "heartbeat", "hello_timeout", "revocation_check",
                     "sse_keepalive", "webhook_retry_base", "webhook_retry_max", "webhook_timeout", "graph_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"the hub setting {name} must be positive", key="invalid_hub_setting")

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.insecure_http:
            return None
        assert self.cert_file is not None and self.key_file is not None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"the TLS certificate {self.cert_file} or key {self.key_file} cannot be used: {e}",
                              key="hub_tls_unreadable",
                              remedy="give a PEM certificate (chain) and its matching PEM private key") from None
        return ctx


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
