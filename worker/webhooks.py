"""Optional per-job webhooks: each event POSTed as JSON, signed, retried, never fatal.

Signature (Stripe-style, so receivers know the pattern): header
`X-Formwork-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
Receivers recompute it with the shared secret and refuse timestamps outside a replay window —
`verify_signature` does both. A delivery that keeps failing is logged and dropped: the job's
outcome never depends on a webhook.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from urllib.parse import urlsplit

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from worker.errors import JobInvalid

log = logging.getLogger("formwork.webhooks")

SIGNATURE_HEADER = "X-Formwork-Signature"
REPLAY_WINDOW_S = 300
ATTEMPTS = 4
REQUEST_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 10.0


class DeliveryFailed(Exception):
    """The receiver answered with a status worth retrying."""


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: int = REPLAY_WINDOW_S,
    now: float | None = None,
) -> bool:
    """True when `header` signs `body` with `secret` and is no older than `tolerance_s`."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


def check_target(url: str, secret: str | None, allowed_hosts: list[str] | None) -> None:
    """Refuse a job whose webhook this worker cannot sign or may not call."""
    if not secret:
        raise JobInvalid(
            "the job asks for a webhook but this worker has no FORMWORK_WEBHOOK_SECRET",
            field="webhook",
        )
    host = urlsplit(url).hostname or ""
    if allowed_hosts is not None and host not in allowed_hosts:
        raise JobInvalid(f"webhook host {host!r} is not in FORMWORK_WEBHOOK_HOSTS", field="webhook")


class WebhookSender:
    """Delivers one job's events in order, in the background, so a slow receiver never slows
    the browser work."""

    def __init__(self, session: aiohttp.ClientSession, url: str, secret: str, job_id: str) -> None:
        self.session = session
        self.url = url
        self.secret = secret
        self.job_id = job_id
        self.delivered = 0
        self.dropped = 0
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._deliver_all(), name=f"webhook:{job_id}")

    def send(self, event_json: str) -> None:
        self._queue.put_nowait(event_json)

    async def close(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Deliver what is queued (within `timeout_s`), then stop."""
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            log.warning("job %s: webhook deliveries still pending at close dropped", self.job_id)

    async def _deliver_all(self) -> None:
        while (body := await self._queue.get()) is not None:
            try:
                await self._deliver(body.encode())
                self.delivered += 1
            except (RetryError, DeliveryFailed, aiohttp.ClientError, TimeoutError) as exc:
                self.dropped += 1
                log.warning("job %s: webhook delivery to %s failed: %r", self.job_id, self.url, exc)

    async def _deliver(self, body: bytes) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS),
            wait=wait_exponential_jitter(multiplier=0.2, max=2.0, jitter=0.2),
            retry=retry_if_exception_type((DeliveryFailed, aiohttp.ClientError, TimeoutError)),
            reraise=True,
        ):
            with attempt:
                headers = {
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(self.secret, body),
                }
                timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
                async with self.session.post(
                    self.url, data=body, headers=headers, timeout=timeout
                ) as response:
                    if response.status >= 500 or response.status == 429:
                        raise DeliveryFailed(f"HTTP {response.status}")
                    if response.status >= 400:
                        # A 4xx will not get better by retrying; log it and move on.
                        log.warning("job %s: webhook answered %s", self.job_id, response.status)
