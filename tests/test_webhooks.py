"""Webhook delivery against real local receivers (aiohttp servers) that answer slowly, fail, or
stop: the event that settles a job, carrying its report, always reaches the receiver, in order,
and never holds up the worker."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from arq.jobs import Job
from redis.asyncio import Redis

from worker.browser import BrowserHost
from worker.client import FormworkClient
from worker.contract import (
    BrowserJob,
    EventKind,
    JobEvent,
    JobReport,
    JobStatus,
    StepReport,
    StepStatus,
)
from worker.errors import JobInvalid
from worker.keys import Keys
from worker.queue import loads, running_worker
from worker.settings import Settings
from worker.webhooks import (
    ATTEMPTS,
    SIGNATURE_HEADER,
    WebhookSender,
    check_target,
    drain,
    verify_signature,
)

from .conftest import CREDIT_INPUTS, Site

SECRET = "whsec-test-5150"
# Answer: the event as received and how many times this seq was seen -> (delay s, status).
Answer = Callable[[dict[str, Any], int], tuple[float, int]]


@dataclass
class Receiver:
    url: str
    hits: list[dict[str, Any]] = field(default_factory=list)  # every request, as it came
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # a settling event answered 2xx

    @property
    def delivered(self) -> list[dict[str, Any]]:
        return [h for h in self.hits if h["answered"] < 300]

    def attempts(self, seq: int) -> int:
        return sum(1 for h in self.hits if h["seq"] == seq)


@asynccontextmanager
async def receiver(answer: Answer) -> AsyncIterator[Receiver]:
    """A webhook receiver on a free local port that checks each signature and answers as
    `answer` says, after its delay."""
    got = Receiver(url="")

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER], body)
        event = json.loads(body)
        delay, status = answer(event, got.attempts(event["seq"]) + 1)
        await asyncio.sleep(delay)  # the receiver's own slowness, not a wait for anything
        got.hits.append({**event, "answered": status})
        if status < 300 and event["kind"] == "job" and JobStatus(event["status"]).settled:
            got.settled.set()
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook{rest:.*}", hook)  # a token in the path, too
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    got.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield got
    finally:
        await runner.cleanup()


def events(job_id: str, first_seq: int, steps: int, end: JobStatus) -> list[str]:
    """One run's events as a worker sends them: running, each step, then the settling event
    with the report."""
    now = datetime.now(UTC)
    out = [JobEvent(seq=first_seq, job_id=job_id, kind=EventKind.job, status="running", at=now)]
    for i in range(steps):
        step = StepReport(id=f"s{i}", action="fill", status=StepStatus.succeeded)
        seq = first_seq + 1 + i
        out.append(JobEvent(seq=seq, job_id=job_id, kind=EventKind.step, status="succeeded",
                            at=now, step=step))  # fmt: skip
    report = JobReport(job_id=job_id, status=end, script="billing/issue_credit")
    last = first_seq + 1 + steps
    out.append(JobEvent(seq=last, job_id=job_id, kind=EventKind.job, status=end, at=now,
                        report=report))  # fmt: skip
    return [e.model_dump_json(exclude_none=True) for e in out]


def seqs(hits: list[dict[str, Any]]) -> list[int]:
    return [h["seq"] for h in hits]


async def send_run(
    http: aiohttp.ClientSession, url: str, job_id: str, run: list[str], timeout_s: float
) -> WebhookSender:
    """Send a run's events as fast as a job would publish them, then settle it."""
    sender = WebhookSender(http, url, SECRET, job_id)
    for event in run:
        sender.send(event)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await sender.close(timeout_s)
    # Off the job's path: settling a run never waits for its receiver.
    assert loop.time() - started < 0.05
    return sender


async def test_a_slow_receiver_still_gets_the_settling_event_and_its_report() -> None:
    run = events("wh-slow", 2, 26, JobStatus.succeeded)  # 28 events, seq 2..29
    async with receiver(lambda e, n: (0.4, 200)) as got, aiohttp.ClientSession() as http:
        sender = await send_run(http, got.url, "wh-slow", run, timeout_s=2.0)
        await asyncio.wait_for(sender.wait(), 30)

    received = seqs(got.delivered)
    assert received == sorted(set(received))  # in order, none twice
    assert received[0] == 2  # the job's start went out before the run settled
    last = got.delivered[-1]
    assert (last["seq"], last["status"]) == (29, "succeeded")
    assert JobReport.model_validate(last["report"]).status == JobStatus.succeeded
    # Not everything fitted in the time: what was skipped was never sent, nothing failed.
    assert len(received) < len(run) and got.hits == got.delivered
    assert (sender.delivered, sender.skipped, sender.dropped) == (
        len(received), len(run) - len(received), 0,
    )  # fmt: skip


async def test_a_healthy_receiver_gets_every_event_in_order() -> None:
    run = events("wh-fast", 2, 26, JobStatus.succeeded)
    async with receiver(lambda e, n: (0.0, 204)) as got, aiohttp.ClientSession() as http:
        sender = await send_run(http, got.url, "wh-fast", run, timeout_s=10.0)
        await asyncio.wait_for(sender.wait(), 30)
    assert seqs(got.hits) == list(range(2, 30))
    assert (sender.delivered, sender.skipped, sender.dropped) == (28, 0, 0)


async def test_a_receiver_that_is_down_gets_every_attempt_at_the_settling_event() -> None:
    run = events("wh-down", 2, 8, JobStatus.failed)  # seq 2..11

    def down(event: dict[str, Any], n: int) -> tuple[float, int]:
        return 0.0, 503

    async with receiver(down) as got, aiohttp.ClientSession() as http:
        sender = await send_run(http, got.url, "wh-down", run, timeout_s=1.0)
        await asyncio.wait_for(sender.wait(), 60)
    # The early events were tried; once the rest could not all go in time, steps were skipped;
    # the settling event was attempted, with every retry, after all of them.
    assert got.attempts(11) == ATTEMPTS
    attempted = seqs(got.hits)
    assert attempted == sorted(attempted) and attempted[-1] == 11
    assert sender.delivered == 0
    assert sender.dropped + sender.skipped == len(run) and sender.skipped > 0


async def test_failed_deliveries_are_logged_without_the_receivers_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A webhook URL often is the receiver's credential (a token in its path or query): the
    # warnings about a receiver that is down printed it whole into the worker's logs.
    caplog.set_level(logging.WARNING, logger="formwork.webhooks")
    run = events("wh-token", 2, 8, JobStatus.failed)
    async with receiver(lambda e, n: (0.0, 503)) as got, aiohttp.ClientSession() as http:
        origin = got.url.removesuffix("/hook")
        url = f"{origin}/hook/T0K3N-path-42?token=T0K3N-query-42"
        sender = await send_run(http, url, "wh-token", run, timeout_s=0.5)
        await asyncio.wait_for(sender.wait(), 60)
    assert got.hits, "the receiver was called with the full URL"
    assert f"webhook delivery to {origin}/… failed" in caplog.text
    assert "T0K3N" not in caplog.text


async def test_the_settling_event_is_retried_until_a_receiver_coming_back_takes_it() -> None:
    run = events("wh-back", 2, 8, JobStatus.paused_for_handoff)  # seq 2..11

    def back_at_the_end(event: dict[str, Any], n: int) -> tuple[float, int]:
        # Down for every event, and for the first two attempts at the last one.
        return 0.0, 200 if event["seq"] == 11 and n >= 3 else 502

    async with receiver(back_at_the_end) as got, aiohttp.ClientSession() as http:
        sender = await send_run(http, got.url, "wh-back", run, timeout_s=1.0)
        await asyncio.wait_for(sender.wait(), 60)
    assert got.attempts(11) == 3
    assert seqs(got.delivered) == [11]
    assert got.delivered[0]["report"]["status"] == "paused_for_handoff"
    assert sender.delivered == 1


async def test_a_later_run_of_the_job_is_delivered_after_the_earlier_one() -> None:
    # A job paused and decided at once: the decision's run starts while the pause's events
    # are still going out to a slow receiver. Its events must not overtake them.
    paused = events("wh-runs", 2, 4, JobStatus.awaiting_approval)  # seq 2..7
    decided = events("wh-runs", 8, 3, JobStatus.succeeded)  # seq 8..12
    async with receiver(lambda e, n: (0.2, 200)) as got, aiohttp.ClientSession() as http:
        first = await send_run(http, got.url, "wh-runs", paused, timeout_s=10.0)
        second = await send_run(http, got.url, "wh-runs", decided, timeout_s=10.0)
        await asyncio.wait_for(asyncio.gather(first.wait(), second.wait()), 30)
    assert seqs(got.hits) == list(range(2, 13))


async def test_a_stopping_worker_lets_pending_deliveries_finish_then_drops_the_rest() -> None:
    run = events("wh-stop", 2, 4, JobStatus.succeeded)  # seq 2..7
    async with receiver(lambda e, n: (0.2, 200)) as got:
        http = aiohttp.ClientSession()
        sender = await send_run(http, got.url, "wh-stop", run, timeout_s=10.0)
        await drain(30)  # what a stopping worker does before it closes its HTTP session
        assert seqs(got.hits) == list(range(2, 8)) and sender.delivered == 6
        await http.close()
        # A run settling once the session is closed: nothing can go; nothing raises either.
        late = await send_run(http, got.url, "wh-stop-2", run, timeout_s=10.0)
        await asyncio.wait_for(late.wait(), 10)
        assert (late.delivered, late.dropped) == (0, len(run))


async def test_a_real_job_ends_at_a_slow_receiver_without_waiting_for_it(
    billing: Site, client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    # QA's receiver: healthy, but 1.5 s an answer. A credit job sends it some 28 events.
    async with receiver(lambda e, n: (1.5, 200)) as got:
        signed = settings.model_copy(update={"webhook_secret": SECRET})
        async with running_worker(signed, browser_host):
            job = BrowserJob(
                job_id="wh-real", script="billing/issue_credit", inputs=CREDIT_INPUTS,
                site_url=billing.url, webhook={"url": got.url},
            )  # fmt: skip
            report = await (await client.enqueue(job)).wait(60)
            assert report.status == JobStatus.succeeded
            # The worker is done with the job (its arq result is stored) while the receiver
            # is still far behind: delivery is off the job's path.
            redis = Redis.from_url(settings.redis_url)
            try:
                arq_job = Job("wh-real", redis, _queue_name=Keys(settings.key_prefix).queue,
                              _deserializer=loads)  # fmt: skip
                await arq_job.result(timeout=30, poll_delay=0.02)
            finally:
                await redis.aclose()
            assert not got.settled.is_set()
            await asyncio.wait_for(got.settled.wait(), 60)
    received = seqs(got.hits)
    assert received == sorted(set(received)) and received[0] == 2
    last = got.hits[-1]
    assert last["status"] == "succeeded"
    assert JobReport.model_validate(last["report"]) == report
    # Ground truth from the site: the credit was issued once.
    assert len(billing.credits()) == 1


async def test_a_receiver_that_redirects_is_never_followed_elsewhere() -> None:
    # FORMWORK_WEBHOOK_HOSTS names the receiver; a 307 from it (an open redirect on that host)
    # sent every event — reports, signature and all — on to whatever it named.
    stolen: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        if request.path.startswith("/stolen"):
            stolen.append(request.path)
            return web.Response(status=200)
        port = request.url.port
        raise web.HTTPTemporaryRedirect(f"http://localhost:{port}/stolen")

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        async with aiohttp.ClientSession() as http:
            sender = await send_run(
                http, url, "redirected", events("redirected", 1, 1, JobStatus.succeeded), 5
            )
            await sender.wait()
    finally:
        await runner.cleanup()
    assert stolen == []


def test_webhook_hosts_are_compared_in_any_case() -> None:
    # A URL's host is read in lower case: `Hooks.Example.com` in FORMWORK_WEBHOOK_HOSTS never
    # matched it, and every job with a webhook there was refused.
    settings = Settings.from_env({"FORMWORK_WEBHOOK_HOSTS": " Hooks.Example.com ,127.0.0.1"})
    assert settings.webhook_hosts == ["hooks.example.com", "127.0.0.1"]
    check_target("https://HOOKS.example.com/in", "secret", settings.webhook_hosts)
    with pytest.raises(JobInvalid, match=r"'other\.example' is not in FORMWORK_WEBHOOK_HOSTS"):
        check_target("https://other.example/in", "secret", settings.webhook_hosts)
