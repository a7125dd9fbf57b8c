"""Optional per-job webhooks: each event POSTed as JSON, signed, retried, never fatal.

Signature (Stripe-style, so receivers know the pattern): header
`X-Formwork-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
Receivers recompute it with the shared secret and refuse timestamps outside a replay window —
`verify_signature` does both.

Delivery policy. A job's events go out one at a time, in order (`seq` only ever grows), in the
background: the browser work never waits for a receiver, and no delivery, failed or not, changes
the job's outcome. Each is retried (ATTEMPTS, with backoff) on a network error, a timeout, a
5xx or a 429; a 4xx is not retried.

When the run settles (`close`), what is still queued gets DRAIN_TIMEOUT_S more to go out,
without holding up the worker. A receiver too slow (or too far down) to take it all in that
time does not lose the end of the job: intermediate events are skipped, oldest first, so that
the last job-status event — the settling one, carrying the report — goes out within the
time left, and that one is always attempted, with all its retries, whatever the time. So a
receiver sees every event, or a gap in `seq` followed by the settling event; the skipped
events are in the job's stream (`<prefix>:events:<job_id>`) for whoever needs them.

A job's later run (after a decision) delivers after its earlier one on this worker has
finished, so its events never overtake the earlier ones. A stopping worker gives pending
deliveries DRAIN_TIMEOUT_S (`drain`) before it closes its HTTP session.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from worker.contract import EventKind
from worker.errors import JobInvalid

log = logging.getLogger("formwork.webhooks")

SIGNATURE_HEADER = "X-Formwork-Signature"
REPLAY_WINDOW_S = 300
ATTEMPTS = 4
REQUEST_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 10.0


class DeliveryFailed(Exception):
    """The receiver answered with a status worth retrying."""


class _Stopped(Exception):
    """The worker is stopping: its HTTP session is closed, nothing more can be sent."""


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


@dataclass(frozen=True, eq=False)  # each event is itself: compared by identity
class _Queued:
    body: bytes
    job: bool  # a job-status event (the settling one is the last), not a step's


class WebhookSender:
    """Delivers one run's events of a job in order, in the background (see the module's
    delivery policy), so a slow receiver never slows the browser work."""

    def __init__(self, session: aiohttp.ClientSession, url: str, secret: str, job_id: str) -> None:
        self.session = session
        self.url = url
        # A webhook URL is often the receiver's credential (a token in its path or query):
        # logs name only its origin.
        parts = urlsplit(url)
        self.shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"
        self.secret = secret
        self.job_id = job_id
        self.delivered = 0
        self.dropped = 0  # failed every attempt (or the worker stopped)
        self.skipped = 0  # never attempted: the receiver was too far behind at the end
        self._pending: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        self._deadline: float | None = None  # loop time by which the backlog should be out
        self._busy_s = 0.0  # time spent on deliveries so far, and how many
        self._done = 0
        self._loop = asyncio.get_running_loop()
        earlier = _RUNNING.get(job_id)
        self._task = asyncio.create_task(self._deliver_all(earlier), name=f"webhook:{job_id}")
        _RUNNING[job_id] = self._task
        _SENDING.add(self._task)
        self._task.add_done_callback(self._finished)

    def send(self, event_json: str) -> None:
        kind = json.loads(event_json).get("kind")
        self._pending.append(_Queued(event_json.encode(), kind == EventKind.job))
        self._wake.set()

    async def close(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """The run has settled: deliver what is queued in the background, skipping what the
        receiver cannot take within `timeout_s` but never the settling event. Returns at
        once; `wait` waits for the deliveries."""
        if self._deadline is None:
            self._deadline = self._loop.time() + timeout_s
        self._wake.set()

    async def wait(self) -> None:
        """Until this sender has nothing left to deliver (after `close`)."""
        await asyncio.shield(self._task)

    def _finished(self, task: asyncio.Task[None]) -> None:
        _SENDING.discard(task)
        if _RUNNING.get(self.job_id) is task:
            del _RUNNING[self.job_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s: webhook sender failed", self.job_id, exc_info=task.exception())

    async def _deliver_all(self, earlier: asyncio.Task[None] | None) -> None:
        if earlier is not None and earlier.get_loop() is self._loop:
            # The job's earlier run, on this worker: its events go first.
            await asyncio.wait([earlier])
        while self._pending or self._deadline is None:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._skip_what_cannot_go()
            event = self._pending.popleft()
            started = self._loop.time()
            try:
                await self._deliver(event)
                self.delivered += 1
            except _Stopped:
                self.dropped += 1 + len(self._pending)
                self._pending.clear()
                log.warning("job %s: webhook deliveries dropped: the worker stopped", self.job_id)
                return
            except (RetryError, DeliveryFailed, aiohttp.ClientError, TimeoutError) as exc:
                self.dropped += 1
                log.warning(
                    "job %s: webhook delivery to %s failed: %r", self.job_id, self.shown, exc
                )
            self._busy_s += self._loop.time() - started
            self._done += 1

    def _behind(self, queued: int) -> bool:
        """After `close`: `queued` more deliveries would not be done by the deadline, going
        by the time each one has taken so far."""
        if self._deadline is None:
            return False
        each = self._busy_s / self._done if self._done else 0.0
        return self._loop.time() + each * queued > self._deadline

    def _skip_what_cannot_go(self) -> None:
        """Skip queued events, oldest first, until the rest can go by the deadline; never the
        last job-status event (the settling one)."""
        keep = next((e for e in reversed(self._pending) if e.job), None)
        skipped = 0
        for event in list(self._pending):
            if not self._behind(len(self._pending)):
                break
            if event is not keep:
                self._pending.remove(event)
                skipped += 1
        if skipped:
            self.skipped += skipped
            log.warning(
                "job %s: webhook receiver %s is behind: %d event(s) skipped to deliver the "
                "job's latest status in time (the job's stream holds them all)",
                self.job_id,
                self.shown,
                skipped,
            )

    async def _deliver(self, event: _Queued) -> None:
        def stop(state: RetryCallState) -> bool:
            if state.attempt_number >= ATTEMPTS:
                return True
            # An intermediate event (a step's, or a status a later one supersedes) is not
            # retried once the rest would miss the deadline; the settling one has every attempt.
            intermediate = not event.job or any(e.job for e in self._pending)
            return intermediate and self._behind(len(self._pending) + 1)

        async for attempt in AsyncRetrying(
            stop=stop,
            wait=wait_exponential_jitter(multiplier=0.2, max=2.0, jitter=0.2),
            retry=retry_if_exception_type((DeliveryFailed, aiohttp.ClientError, TimeoutError)),
            reraise=True,
        ):
            with attempt:
                if self.session.closed:
                    raise _Stopped("the worker's HTTP session is closed (the worker stopped)")
                headers = {
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(self.secret, event.body),
                }
                timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
                # Never followed: a redirect (a 307 keeps the POST, its body and signature)
                # would send the job's reports to a host FORMWORK_WEBHOOK_HOSTS does not list.
                async with self.session.post(
                    self.url, data=event.body, headers=headers, timeout=timeout,
                    allow_redirects=False,
                ) as response:  # fmt: skip
                    if response.status >= 500 or response.status == 429:
                        raise DeliveryFailed(f"HTTP {response.status}")
                    if response.status >= 300:
                        # A 3xx or 4xx will not get better by retrying; log it and move on.
                        log.warning("job %s: webhook answered %s", self.job_id, response.status)


# Every sender still delivering on this worker (the loop keeps only weak references to tasks),
# and the latest of each job, which a later run's sender waits for.
_SENDING: set[asyncio.Task[None]] = set()
_RUNNING: dict[str, asyncio.Task[None]] = {}


async def drain(timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Give every pending delivery up to `timeout_s` to finish, then stop the rest (a worker
    shutting down, before it closes the HTTP session the deliveries use)."""
    pending = [t for t in _SENDING if t.get_loop() is asyncio.get_running_loop()]
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=timeout_s)
    for task in late:
        task.cancel()
    if late:
        log.warning("%d job(s)' webhook deliveries still pending at shutdown dropped", len(late))
