"""Webhooks from the reference hub: every stored event, POSTed to the customer's URL, signed the Standard Webhooks
way (https://www.standardwebhooks.com/), in order, at least once.

Per request::

    POST <url>
    content-type: application/json
    webhook-id: <the CloudEvent's id>          stable across retries: receivers drop what they have seen
    webhook-timestamp: <unix seconds>          of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}" with the secret's key>

    <the CloudEvent, JSON>

The secret is ``whsec_`` + base64 of 24 random bytes; the HMAC key is those bytes. A 2xx answer delivers the event
and moves the customer's durable cursor past it; anything else (a timeout, a TLS failure, a redirect, 4xx, 5xx)
is retried with exponential back-off (full jitter, capped) and the next events wait: order is kept. The server's
certificate is always verified.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from tenacity import RetryCallState

from gateway import __version__
from gateway.errors import ConfigError
from gateway.hub.store import HubStore, StoredEvent, Webhook
from gateway.retry import Backoff, retrying

log = structlog.get_logger(__name__)

SECRET_PREFIX: Final = "whsec_"
BATCH: Final = 100
IDLE_POLL_SECONDS: Final = 30.0
Db = Callable[..., Awaitable[Any]]


# -- signing -----------------------------------------------------------------------------------------------------
def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    return base64.b64decode(secret[len(SECRET_PREFIX):])


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 signature>``."""
    payload = body.encode() if isinstance(body, str) else body
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + payload, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver does: the timestamp is recent and one of the space-separated v1 signatures matches."""
    msg_id, stamp, given = (headers.get("webhook-id"), headers.get("webhook-timestamp"),
                            headers.get("webhook-signature"))
    if not msg_id or not stamp or not given:
        return False
    try:
        timestamp = int(stamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in given.split(" ")
               if candidate.startswith("v1,"))


class DeliveryFailed(Exception):
    pass


# -- delivery ----------------------------------------------------------------------------------------------------
class WebhookDispatcher:
    """One worker task per customer with a webhook: delivers the stored events after its cursor, in order."""

    def __init__(self, store: HubStore, read: Db, write: Db, *, ca_file: Path | None = None,
                 retry_base: float = 1.0, retry_max: float = 300.0, timeout: float = 10.0,
                 rng: random.Random | None = None, on_attempt: Callable[[str], None] | None = None) -> None:
        self.store = store
        self._on_attempt = on_attempt or (lambda outcome: None)  # "delivered" or "failed", for metrics
        self._read = read
        self._write = write
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.timeout = timeout
        self._rng = rng or random.Random()
        try:
            self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"the webhook CA bundle {ca_file} cannot be used: {e}", key="webhook_ca_unreadable",
                              remedy="point the hub's webhook CA setting at a readable PEM file") from None
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False,
                                           connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64))
        for hook in await self._read(self.store.webhooks):
            self._start(hook.customer)

    async def close(self) -> None:
        workers = list(self._workers.values())
        self._workers.clear()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def notify(self, customer: str) -> None:
        wake = self._wakes.get(customer)
        if wake is not None:
            wake.set()

    async def reconfigure(self, customer: str) -> None:
        """The customer's webhook was set, changed or removed: restart its worker from the stored settings."""
        task = self._workers.pop(customer, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if await self._read(self.store.webhook, customer) is not None:
            self._start(customer)

    def _start(self, customer: str) -> None:
        self._wakes.setdefault(customer, asyncio.Event())
        self._workers[customer] = asyncio.create_task(self._run(customer), name=f"webhook-{customer}")

    async def _run(self, customer: str) -> None:
        wake = self._wakes[customer]
        try:
            while True:
                hook: Webhook | None = await self._read(self.store.webhook, customer)
                if hook is None:
                    return
                wake.clear()  # before reading: an event stored after this read sets it again
                events: list[StoredEvent] = await self._read(self.store.events_after, customer, hook.cursor, BATCH)
                if not events:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(IDLE_POLL_SECONDS):
                            await wake.wait()
                    continue
                for event in events:
                    await self._deliver_until_done(hook, event)
                    await self._write(self.store.webhook_delivered, customer, event.seq)
        except asyncio.CancelledError:
            raise
        except Exception:  # a worker must not die silently: say so; reconfigure() or a restart starts it again
            log.exception("webhook.worker_crashed", customer=customer)

    async def _deliver_until_done(self, hook: Webhook, event: StoredEvent) -> None:
        """Deliver one event, retrying (capped exponential back-off, full jitter) until the endpoint takes it: the
        customer's later events wait, so order is kept."""
        backoff = Backoff(self.retry_base, self.retry_max, rng=self._rng)

        async def failed(state: RetryCallState) -> None:
            self._on_attempt("failed")
            error = state.outcome.exception() if state.outcome is not None else None
            if state.attempt_number == 1:
                log.warning("webhook.failing", customer=hook.customer, url=hook.url, seq=event.seq, error=str(error))
                await self._write(self.store.webhook_failed, hook.customer, str(error))
            else:
                log.debug("webhook.retry", customer=hook.customer, seq=event.seq, attempt=state.attempt_number,
                          error=str(error))

        attempts = 0
        async for attempt in retrying(backoff, on=DeliveryFailed, before_sleep=failed):
            with attempt:
                attempts += 1
                await self._deliver(hook, event)
        self._on_attempt("delivered")
        if attempts > 1:
            log.info("webhook.recovered", customer=hook.customer, url=hook.url, after_attempts=attempts - 1)

    async def _deliver(self, hook: Webhook, event: StoredEvent) -> None:
        assert self._http is not None, "start() first"
        body = event.body.encode()
        stamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": event.event_id,
                   "webhook-timestamp": str(stamp), "webhook-signature": sign(hook.secret, event.event_id, stamp, body),
                   "user-agent": f"exchange-gateway-hub/{__version__}"}
        try:
            async with self._http.post(hook.url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise DeliveryFailed(f"the endpoint answered {resp.status} {resp.reason or ''}".strip())
        except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as e:
            raise DeliveryFailed(f"{e.__class__.__name__}: {e}") from None
