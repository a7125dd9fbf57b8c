"""The queue-driven worker: real Redis, real Chromium, the real billing fixture site."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from arq import Worker
from arq.jobs import Job
from pydantic import ValidationError
from redis.asyncio import Redis

from worker import queue as queue_module
from worker.browser import BrowserHost
from worker.client import FormworkClient
from worker.contract import (
    BrowserJob,
    EventKind,
    FailureCode,
    JobEvent,
    JobStatus,
    ResumeDecision,
    StepStatus,
)
from worker.keys import ARQ_JOB_PREFIX, JOB_FUNCTION, RECORD_TTL_S, Keys, job_of, message_id
from worker.queue import (
    DECISION_FIELD,
    PauseClaim,
    claim_pause,
    enqueue_message,
    loads,
    redis_settings,
    resume_message,
    running_worker,
)
from worker.settings import Settings
from worker.webhooks import SIGNATURE_HEADER, verify_signature

from .conftest import CREDIT_INPUTS, SCRIPTS, SELECTORS, Site, own_redis
from .test_webhooks import SECRET as WEBHOOK_SECRET
from .test_webhooks import Receiver, receiver
from .test_worker_process import until_blocked


@asynccontextmanager
async def hooked_worker(settings: Settings, browser_host: BrowserHost) -> AsyncIterator[Receiver]:
    """A worker that signs webhooks, and a receiver that takes every delivery at once."""
    signed = settings.model_copy(update={"webhook_secret": WEBHOOK_SECRET})
    async with (
        receiver(lambda event, attempt: (0.0, 204)) as hook,
        running_worker(signed, browser_host),
    ):
        yield hook


def credit_job(site: Site, job_id: str, **overrides: Any) -> BrowserJob:
    inputs = {**CREDIT_INPUTS, **overrides.pop("inputs", {})}
    return BrowserJob(
        job_id=job_id, script="billing/issue_credit", inputs=inputs, site_url=site.url,
        **overrides,
    )  # fmt: skip


async def collect(client: FormworkClient, job_id: str, after: str = "0-0") -> list[JobEvent]:
    return [event async for _, event in client.handle(job_id).events(after=after)]


async def test_enqueue_streams_every_transition_in_order_then_the_report(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    handle = await client.enqueue(credit_job(billing, "q-order"))
    assert handle.created
    events = await asyncio.wait_for(collect(client, handle.job_id), 60)

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [(e.kind, e.status) for e in events[:2]] == [
        (EventKind.job, "queued"),
        (EventKind.job, "running"),
    ]
    assert (events[-1].kind, events[-1].status) == (EventKind.job, "succeeded")
    step_events = [e for e in events if e.kind == EventKind.step]
    # Each step: one "running" event, then one final event, in plan order.
    assert all(e.step is not None for e in step_events)
    pairs = [(e.step.id, e.status) for e in step_events if e.step is not None]
    ids = [step_id for step_id, status in pairs if status == "running"]
    assert pairs == [p for step_id in ids for p in ((step_id, "running"), (step_id, "succeeded"))]
    assert ids[0] == "login.open" and ids[-1] == "confirmation"

    report = await handle.report()
    assert report is not None and report.status == JobStatus.succeeded
    assert events[-1].report == report
    assert await handle.status() == JobStatus.succeeded
    credits = billing.credits()
    assert len(credits) == 1
    assert report.outputs["confirmation_number"] == credits[0]["confirmation"]


async def test_duplicate_enqueue_runs_once_even_after_arq_forgets_the_job(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    first = await client.enqueue(credit_job(billing, "q-dup", idempotency_key="T-88812"))
    again = await client.enqueue(credit_job(billing, "q-dup"))
    other_id = await client.enqueue(credit_job(billing, "q-dup-2", idempotency_key="T-88812"))
    assert first.created and not again.created and not other_id.created
    assert again.job_id == other_id.job_id == "q-dup"
    report = await first.wait(60)
    assert report.status == JobStatus.succeeded

    # arq's own records expire (its result after an hour); ours outlive them. The report is
    # published from inside the job, so arq may not have finished it yet: wait until it has
    # (its result is written in the same transaction that takes the job off the queue).
    redis = Redis.from_url(settings.redis_url)
    try:
        arq_job = Job("q-dup", redis, _queue_name=client.keys.queue, _deserializer=loads)
        await arq_job.result(timeout=10, poll_delay=0.01)
        assert await client.queue_depth() == 0
        await redis.delete("arq:result:q-dup", ARQ_JOB_PREFIX + "q-dup")
    finally:
        await redis.aclose()
    late = await client.enqueue(credit_job(billing, "q-dup"))
    assert not late.created
    assert await client.queue_depth() == 0
    assert len(billing.credits()) == 1


async def test_queue_depth_counts_jobs_no_worker_has_taken(
    billing: Site, client: FormworkClient
) -> None:
    assert await client.queue_depth() == 0
    await client.enqueue(credit_job(billing, "q-wait-1"))
    await client.enqueue(credit_job(billing, "q-wait-2"))
    assert await client.queue_depth() == 2


async def raw_enqueue(
    settings: Settings, job_id: str, envelope: bytes, score: float | None = None
) -> None:
    """What an orchestrator in another language does: two plain Redis commands."""
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.set(ARQ_JOB_PREFIX + job_id, envelope)
        at = int(time.time() * 1000) if score is None else score
        await redis.zadd(f"{settings.key_prefix}:queue", {job_id: at})
    finally:
        await redis.aclose()


def raw_envelope(payload: Any) -> bytes:
    body = {"t": 1, "f": JOB_FUNCTION, "a": [payload], "k": {}, "et": int(time.time() * 1000)}
    return json.dumps(body).encode()


def envelope_with(payload: dict[str, Any], job_id: str, **fields: Any) -> bytes:
    body = {"t": 1, "f": JOB_FUNCTION, "a": [{**payload, "job_id": job_id}], "k": {}, "et": 0}
    return json.dumps({**body, **fields}).encode()


def deep_envelope(payload: dict[str, Any], job_id: str, levels: int) -> bytes:
    """A job whose `correlation` is nested `levels` deep: a few kilobytes, too deep to parse
    (written by hand: Python's own json refuses to write it)."""
    job = json.dumps({**payload, "job_id": job_id})[:-1]
    nested = "[" * levels + "]" * levels
    body = f'{job},"correlation":{nested}}}'
    return f'{{"t":1,"f":"{JOB_FUNCTION}","a":[{body}],"k":{{}},"et":0}}'.encode()


async def test_plain_redis_enqueue_without_arq_runs(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    payload = credit_job(billing, "q-raw").model_dump(mode="json", exclude_none=True)
    await raw_enqueue(settings, "q-raw", raw_envelope(payload))
    events = await asyncio.wait_for(collect(client, "q-raw"), 60)
    assert events[-1].status == "succeeded"
    assert len(billing.credits()) == 1


async def test_queue_entries_arq_cannot_read_neither_kill_nor_strand_the_worker(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    # A ZADD written by hand: -inf killed the worker (every worker, while it stayed queued);
    # a job scored 0 was never run, and said `queued` for ever.
    for job_id, score in (("q-minus-inf", float("-inf")), ("q-zero", 0.0)):
        job = credit_job(billing, job_id, inputs={"reference": job_id})
        await raw_enqueue(settings, job_id, raw_envelope(job.model_dump(mode="json")), score)
    # An id that is not UTF-8 killed every worker at once, for as long as it stayed queued.
    redis = Redis.from_url(settings.redis_url)
    try:
        queue = f"{settings.key_prefix}:queue"
        await redis.zadd(queue, {b"q-\xff\xfe": int(time.time() * 1000)})
        # Keys arq reads first, of a type it cannot read: the worker restarted each time.
        await redis.hset(ARQ_JOB_PREFIX + "q-hash", "a", "b")
        await redis.zadd(queue, {"q-hash": int(time.time() * 1000)})
        await redis.set("arq:retry:q-retry", "many")
        job = credit_job(billing, "q-retry", inputs={"reference": "q-retry"})
        await raw_enqueue(settings, "q-retry", raw_envelope(job.model_dump(mode="json")))
    finally:
        await redis.aclose()
    await client.enqueue(credit_job(billing, "q-after-scores"))
    for job_id in ("q-minus-inf", "q-zero", "q-retry", "q-after-scores"):
        report = await client.handle(job_id).wait(60)
        assert report.status == JobStatus.succeeded, (job_id, report.error)
    assert sorted(c["reference"] for c in billing.credits()) == sorted(
        ["q-minus-inf", "q-zero", "q-retry", CREDIT_INPUTS["reference"]]
    )
    # The unreadable entries went too. arq writes a job's end just after its report, and a
    # job whose try count was reset waits for the next poll: the depth is waited for.
    async with asyncio.timeout(10):
        while await client.queue_depth():  # noqa: ASYNC110 - another task's writes
            await asyncio.sleep(0.05)


async def test_a_job_whose_artifacts_folder_cannot_be_made_ends_with_a_storage_error(
    billing: Site,
    client: FormworkClient,
    settings: Settings,
    browser_host: BrowserHost,
    tmp_path: Path,
) -> None:
    # A file where the artifacts folder should be (as a full or read-only disk would do): the
    # job raised at its first write, again at its report, and stayed `running` for ever.
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the artifacts folder should be")
    own = settings.model_copy(update={"artifacts_dir": blocked})
    async with running_worker(own, browser_host):
        handle = await client.enqueue(credit_job(billing, "q-store"))
        report = await handle.wait(60)
    assert report.status == JobStatus.failed
    assert report.error is not None and report.error.code == FailureCode.storage_error
    assert "could not make the job's folder" in report.error.message
    assert report.artifacts is None  # nothing was kept, and the report says so
    assert billing.credits() == []


@pytest.mark.timeout(120)
async def test_a_job_that_ended_and_then_lost_redis_keeps_its_ending(
    billing: Site,
    settings: Settings,
    browser_host: BrowserHost,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Redis drops the connection a job's bookkeeping writes on, just after the job said it
    # succeeded. It was handed on as interrupted: a `queued` event after its last word, and
    # a second delivery. (Only the moment is chosen here; the drop is Redis's own.)
    forget = queue_module._forget_kept

    async def cut_short(state: Any, job_id: str) -> None:
        await admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        write = asyncio.ensure_future(forget(state, job_id))
        try:
            blocked = await until_blocked(admin)
            await admin.client_kill_filter(_id=blocked["id"])
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        await write

    monkeypatch.setattr(queue_module, "_forget_kept", cut_short)
    async with own_redis(tmp_path) as server:
        admin = Redis(port=server.port)
        own = settings.model_copy(update={"redis_url": server.url})
        async with (
            FormworkClient(own.redis_url, key_prefix=own.key_prefix) as client,
            running_worker(own, browser_host),
        ):
            handle = await client.enqueue(credit_job(billing, "q-ended"))
            report = await handle.wait(60)
        # The whole stream, also what follows the last word (a watcher stops reading there).
        stream = await admin.xrange(Keys(own.key_prefix).events(handle.job_id))
        await admin.aclose()
    events = [JobEvent.model_validate_json(fields[b"event"]) for _, fields in stream]
    assert report.status == JobStatus.succeeded, report.error
    assert (events[-1].kind, events[-1].status) == (EventKind.job, "succeeded")
    assert [e.status for e in events if e.kind == EventKind.job].count("queued") == 1
    assert report.interruptions == []
    assert len(billing.credits()) == 1


async def test_malformed_payloads_are_rejected_and_the_worker_keeps_serving(
    billing: Site,
    client: FormworkClient,
    worker: Worker,
    settings: Settings,
    fixture_secrets: dict[str, str],
) -> None:
    good = credit_job(billing, "x").model_dump(mode="json", exclude_none=True)
    bad: dict[str, tuple[bytes, str, str]] = {
        "q-notjson": (b"{not json", "job_invalid", "not JSON"),
        "q-envelope": (b'{"hello": 1}', "job_invalid", "not an arq job envelope"),
        "q-func": (
            json.dumps({"t": 1, "f": "os.system", "a": [good], "k": {}, "et": 0}).encode(),
            "job_invalid", "unknown job function 'os.system'",
        ),
        "q-noscript": (
            raw_envelope({"job_id": "q-noscript", "inputs": {}}),
            "job_invalid", "script: Field required",
        ),
        "q-unknown": (
            raw_envelope({**good, "job_id": "q-unknown", "script": "billing/nope"}),
            "script_not_found", "no script 'billing/nope'",
        ),
        "q-version": (
            raw_envelope({**good, "job_id": "q-version", "script": "billing/issue_credit@9"}),
            "script_not_found", "no version 9",
        ),
        "q-inputs": (
            raw_envelope({**good, "job_id": "q-inputs", "inputs": {"amount": "lots"}}),
            "input_invalid", "input 'amount'",
        ),
        "q-mismatch": (raw_envelope({**good, "job_id": "other"}), "job_invalid", "differs"),
        "q-huge": (
            raw_envelope({**good, "job_id": "q-huge", "correlation": {"x": "y" * 70_000}}),
            "job_invalid", "the limit is 65536",
        ),
        "q-secret": (
            raw_envelope({**good, "job_id": "q-secret", "inputs": {
                **good["inputs"], "reason": f"pw {fixture_secrets['billing_password']}"}}),
            "job_invalid", "inputs.reason carries the value of a configured secret",
        ),
        # Anywhere else a job carries text that is stored and shown: a correlation's names,
        # the site's address (its query, or a user name before the host).
        "q-secret-name": (
            raw_envelope({**good, "job_id": "q-secret-name",
                          "correlation": {fixture_secrets["billing_password"]: "x"}}),
            "job_invalid", "a name in correlation carries the value of a configured secret",
        ),
        "q-secret-site": (
            raw_envelope({**good, "job_id": "q-secret-site",
                          "site_url": f"{billing.url}/?pw={fixture_secrets['billing_password']}"}),
            "job_invalid", "site_url carries the value of a configured secret",
        ),
        "q-userinfo": (
            raw_envelope({**good, "job_id": "q-userinfo",
                          "site_url": billing.url.replace("//", "//evil.example@")}),
            "job_invalid", "site_url: Value error, must not carry a user name or password",
        ),
        "q-offsite": (
            raw_envelope({**good, "job_id": "q-offsite", "site_url": "http://127.0.0.2:9"}),
            "job_invalid", "site_url host '127.0.0.2' is not one of site billing's allowed",
        ),
        # arq reads `t` and `et` outside its own error handling: a wrong type there killed
        # the worker (and every restart of it), a `t` over its tries dropped the job unseen.
        "q-t-text": (envelope_with(good, "q-t-text", t="1"), "job_invalid", "'t' is invalid"),
        "q-t-big": (envelope_with(good, "q-t-big", t=9), "job_invalid", "'t' is invalid"),
        "q-et-text": (
            envelope_with(good, "q-et-text", et="yesterday"), "job_invalid", "'et' is invalid"
        ),
        "q-et-null": (envelope_with(good, "q-et-null", et=None), "job_invalid", "'et' is invalid"),
        "q-et-big": (envelope_with(good, "q-et-big", et=10**22), "job_invalid", "'et' is invalid"),
        "q-k-list": (envelope_with(good, "q-k-list", k=[]), "job_invalid", "'k' is invalid"),
        "q-result": (b'{"s":true,"r":{},"t":1}', "job_invalid", "not an arq job envelope"),
        "q-deep": (deep_envelope(good, "q-deep", 5_000), "job_invalid", "nests too deeply"),
        # A job is a job whatever it carries: never taken for a decision or an expiry.
        "q-resume": (
            raw_envelope({**good, "job_id": "q-resume", "resume": "q-raw"}),
            "job_invalid", "resume: Extra inputs are not permitted",
        ),
        "q-expire": (
            raw_envelope({**good, "job_id": "q-expire", "expire": "zzz"}),
            "job_invalid", "expire: Extra inputs are not permitted",
        ),
        "L" * 300: (raw_envelope({**good, "job_id": "L" * 300}), "job_invalid", "job_id"),
    }  # fmt: skip
    for job_id, (envelope, _, _) in bad.items():
        await raw_enqueue(settings, job_id, envelope)
    await client.enqueue(credit_job(billing, "q-after-bad"))

    for job_id, (_, code, text) in bad.items():
        events = await asyncio.wait_for(collect(client, job_id), 30)
        assert events[-1].status == "rejected", job_id
        report = events[-1].report
        assert report is not None and report.error is not None
        assert report.error.code == code, job_id
        assert text in report.error.message, (job_id, report.error.message)
        assert fixture_secrets["billing_password"] not in report.model_dump_json()
    after = await client.handle("q-after-bad").wait(60)
    assert after.status == JobStatus.succeeded
    assert len(billing.credits()) == 1  # only the good job touched the site


async def test_a_job_whose_id_carries_a_secret_is_refused_before_it_runs(
    billing: Site,
    client: FormworkClient,
    settings: Settings,
    browser_host: BrowserHost,
    tmp_path: Path,
) -> None:
    # A secret of this test's own (the suite's end scans everything for the fixtures' ones,
    # and the refused id still names the job's record and events: the orchestrator chose it,
    # and follows the job by it).
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("api_token: zebra-quartz-hollow-58\n")  # refused before sign-in
    own = settings.model_copy(update={"secrets_file": secrets})
    async with running_worker(own, browser_host):
        handle = await client.enqueue(credit_job(billing, "q-zebra-quartz-hollow-58-credit"))
        report = await handle.wait(30)
    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.field == "job_id"
    assert report.error.message.startswith("job_id carries the value of a configured secret")
    assert all(step.started_at is None for step in report.steps)
    assert billing.credits() == []


async def test_abort_stops_the_job_between_steps(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    billing.faults(latency_ms=150)  # slow enough that abort lands mid-job
    handle = await client.enqueue(credit_job(billing, "q-abort"))
    async for _, event in handle.events():
        if event.step is not None and event.step.id == "open_account":
            # Taken and running: still in arq's queue (until it finishes), not in the backlog.
            assert await client.redis.zcard(client.keys.queue) == 1
            assert await client.queue_depth() == 0
            assert await client.abort(handle.job_id, "customer withdrew the request")
            break
    report = await handle.wait(60)
    assert report.status == JobStatus.cancelled
    assert report.error is not None and "customer withdrew" in report.error.message
    status = {s.id: s.status for s in report.steps}
    assert status["login.submit"] == StepStatus.succeeded
    assert status["submit"] == StepStatus.skipped
    assert billing.credits() == []
    assert not await client.abort(handle.job_id)  # already ended


async def test_a_decision_runs_once_however_many_messages_carry_it(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    rule = {"field": "amount", "value": "15.00", "message": "Credits over 10.00 need approval"}
    billing.faults(reject_value=[rule])
    handle = await client.enqueue(credit_job(billing, "q-twice"))
    paused = await handle.wait(60)
    assert paused.status == JobStatus.needs_customer_input
    last = await handle.last_event_id()
    pause = int(await client.redis.hget(client.keys.job("q-twice"), "seq") or 0)
    decision = ResumeDecision(decision="retry_with_inputs", inputs={"amount": "9.00"})
    # Decisions queued around the client, so claimed by no one: for this pause, and for the
    # one before it.
    copies = {message_id("q-twice", "resume", 9000 + i): pause - i for i in range(2)}
    for copy, about in copies.items():
        body = resume_message("q-twice", about, decision)
        await enqueue_message(client.redis, client.keys, copy, body, int(time.time() * 1000))
    for copy in copies:
        run = Job(copy, client.redis, _queue_name=client.keys.queue, _deserializer=loads)
        await run.result(timeout=30, poll_delay=0.01)
    assert await handle.status() == JobStatus.needs_customer_input  # they changed nothing
    assert await handle.last_event_id() == last

    assert await client.resume("q-twice", decision)
    report = await handle.wait(60, after=last)
    assert report.status == JobStatus.succeeded, report.error
    assert [c["amount"] for c in billing.credits()] == ["9.00"]
    assert len(report.decisions) == 1
    events = await collect(client, "q-twice", after=last)
    assert [e.status for e in events if e.kind == EventKind.job] == ["running", "succeeded"]


async def test_a_reconnecting_watcher_misses_nothing(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    handle = await client.enqueue(credit_job(billing, "q-resume"))
    seen: list[JobEvent] = []
    last_id = "0-0"
    async for event_id, event in handle.events():
        seen.append(event)
        last_id = event_id
        if len(seen) == 5:
            break  # the orchestrator disconnects here
    async for _, event in handle.events(after=last_id):
        seen.append(event)
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].status == "succeeded"
    assert seen == await collect(client, handle.job_id)


async def test_site_cap_is_never_exceeded(
    billing: Site,
    client: FormworkClient,
    settings: Settings,
    browser_host: BrowserHost,
    tmp_path: Path,
) -> None:
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    shutil.copytree(SELECTORS, tmp_path / "selectors")
    registry = tmp_path / "selectors" / "billing.yaml"
    registry.write_text(
        registry.read_text().replace("max_concurrent_jobs: 4", "max_concurrent_jobs: 2")
    )
    capped = settings.model_copy(
        update={"selectors_dir": tmp_path / "selectors", "scripts_dir": tmp_path / "scripts"}
    )
    billing.faults(latency_ms=60)  # overlapping requests, so a breach would be seen
    async with running_worker(capped, browser_host):
        handles = [
            await client.enqueue(credit_job(billing, f"q-cap-{i}", inputs={"reference": f"T-{i}"}))
            for i in range(5)
        ]
        reports = await asyncio.wait_for(asyncio.gather(*(h.wait(120) for h in handles)), 150)
    assert all(r.status == JobStatus.succeeded for r in reports)
    assert len(billing.credits()) == 5
    # Ground truth from the site: never more than two browsers on it at the same moment —
    # though four worker slots were free — and the cap was actually reached.
    assert billing.state()["max_concurrent_visitors"] == 2


async def test_a_job_for_a_script_yaml_cannot_read_is_rejected_and_the_next_runs(
    billing: Site,
    client: FormworkClient,
    settings: Settings,
    browser_host: BrowserHost,
    tmp_path: Path,
) -> None:
    # A NUL in the script file (a bad paste): the job stayed `queued` for ever, with no
    # event, while arq kept a traceback nobody reads.
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    broken = tmp_path / "scripts" / "billing" / "issue_credit.yaml"
    broken.write_text(broken.read_text().replace("Issue a goodwill", "Issue a\x00goodwill"))
    own = settings.model_copy(update={"scripts_dir": tmp_path / "scripts"})
    async with running_worker(own, browser_host):
        refused = await (await client.enqueue(credit_job(billing, "q-nul"))).wait(60)
        assert refused.status == JobStatus.rejected
        assert refused.error is not None and refused.error.code == "script_invalid"
        assert "issue_credit.yaml:1: not valid YAML: character U+0000" in refused.error.message
        broken.write_text(broken.read_text().replace("\x00", " "))
        done = await (await client.enqueue(credit_job(billing, "q-after-nul"))).wait(60)
    assert done.status == JobStatus.succeeded, done.error
    assert len(billing.credits()) == 1


async def test_webhook_events_are_signed_and_verifiable(
    billing: Site, client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    secret = "whsec-test-7731"
    received: list[tuple[str, bytes]] = []
    done = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((request.headers[SIGNATURE_HEADER], body))
        if json.loads(body).get("status") == "succeeded":
            done.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    signed = settings.model_copy(update={"webhook_secret": secret})
    try:
        async with running_worker(signed, browser_host):
            job = credit_job(billing, "q-hook", webhook={"url": f"http://127.0.0.1:{port}/hook"})
            await (await client.enqueue(job)).wait(60)
            await asyncio.wait_for(done.wait(), 30)
    finally:
        await runner.cleanup()

    # Every event after "queued" (the worker's), in order, each signed with the shared secret.
    seqs = [json.loads(body)["seq"] for _, body in received]
    assert seqs == list(range(2, len(seqs) + 2))
    for header, body in received:
        assert verify_signature(secret, header, body)
        assert not verify_signature("wrong-secret", header, body)
        assert not verify_signature(secret, header, body + b" ")
        assert not verify_signature(secret, header, body, now=time.time() + 3600)


async def test_webhook_failure_never_changes_the_outcome(
    billing: Site, client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    signed = settings.model_copy(update={"webhook_secret": "s3"})
    async with running_worker(signed, browser_host):
        # Nothing listens on port 9: every delivery fails.
        job = credit_job(billing, "q-hook-down", webhook={"url": "http://127.0.0.1:9/hook"})
        report = await (await client.enqueue(job)).wait(90)
    assert report.status == JobStatus.succeeded
    assert len(billing.credits()) == 1


async def test_webhook_without_a_worker_secret_is_rejected(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    job = credit_job(billing, "q-hook-nosecret", webhook={"url": "http://127.0.0.1:9/x"})
    report = await (await client.enqueue(job)).wait(30)
    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.field == "webhook"
    assert billing.state()["requests"] == 0


async def test_selector_drift_is_counted_per_site_and_element(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    billing.faults(skin="v2")
    report = await (await client.enqueue(credit_job(billing, "q-drift"))).wait(60)
    assert report.status == JobStatus.succeeded
    redis = Redis.from_url(settings.redis_url)
    try:
        counts = await redis.hgetall(Keys(settings.key_prefix).drift("billing"))
    finally:
        await redis.aclose()
    drifted = {s.drift.element for s in report.steps if s.drift is not None}
    assert {k.decode(): int(v) for k, v in counts.items()} == dict.fromkeys(drifted, 1)
    assert "credit.amount" in drifted


def test_a_message_id_names_the_job_it_is_about() -> None:
    # Job ids may hold dots; only the suffix a message adds is taken off.
    assert job_of(message_id("job.v2-1", "resume", 3)) == "job.v2-1"
    assert job_of(message_id("job-1", "expire", 1764000000000)) == "job-1"
    assert job_of("job.resume-notes") == "job.resume-notes"


async def test_a_raw_enqueue_with_a_taken_idempotency_key_is_refused_not_run(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    # Two jobs sent the wire protocol's raw way (no client to take the key) with one key: the
    # worker takes it for the first, and the second is refused as its duplicate — one credit.
    for job_id in ("q-idem-a", "q-idem-b"):
        job = credit_job(billing, job_id, idempotency_key="K-RAW-1")
        payload = job.model_dump(mode="json", exclude_none=True)
        await raw_enqueue(settings, job_id, raw_envelope(payload))
        await client.handle(job_id).wait(60)
    first = await client.handle("q-idem-a").report()
    second = await client.handle("q-idem-b").report()
    assert first is not None and first.status == JobStatus.succeeded
    assert second is not None and second.status == JobStatus.rejected
    assert second.error is not None and second.error.field == "idempotency_key"
    assert "belongs to job q-idem-a" in second.error.message
    assert len(billing.credits()) == 1
    # A client enqueue with the key, after: the existing job, nothing queued.
    again = await client.enqueue(credit_job(billing, "q-idem-c", idempotency_key="K-RAW-1"))
    assert (again.job_id, again.created) == ("q-idem-a", False)


async def test_a_payload_refused_before_it_is_read_is_refused_to_its_webhook_too(
    billing: Site, client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    # An orchestrator in another language misspells a field, or sends a string for a boolean:
    # the job is refused as it should be, but only on its stream. One that follows its jobs
    # by webhook heard nothing, and waited for ever for a job that would never run.
    sent = {
        "q-bad-typo": ({"input": CREDIT_INPUTS}, "input"),
        "q-bad-type": ({"inputs": CREDIT_INPUTS, "dry_run": "yes"}, "dry_run"),
        "q-bad-id": ({"inputs": CREDIT_INPUTS, "job_id": "q-bad-other"}, "job_id"),
    }
    async with hooked_worker(settings, browser_host) as hook:
        for job_id, (fields, _) in sent.items():
            payload = {"job_id": job_id, "script": "billing/issue_credit", **fields}
            payload["webhook"] = {"url": f"{hook.url}/{job_id}"}
            await raw_enqueue(settings, job_id, raw_envelope(payload))
        async with asyncio.timeout(30):
            while {e["job_id"] for e in hook.hits} != set(sent):
                hook.settled.clear()
                await hook.settled.wait()

    for job_id, (_, field) in sent.items():
        [event] = [e for e in hook.hits if e["job_id"] == job_id]
        assert (event["seq"], event["status"]) == (1, "rejected"), job_id
        assert event["report"]["error"]["field"] == field, job_id
    assert billing.state()["requests"] == 0


async def test_a_raw_duplicate_is_refused_to_its_own_webhook_too(
    billing: Site, client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    # An orchestrator that follows its jobs by webhook sends a second job with a key the
    # first holds. Its refusal was written to the stream only: the webhook heard nothing,
    # and the orchestrator waited for ever for a job that would never run.
    async with hooked_worker(settings, browser_host) as hook:
        for job_id in ("q-idem-hook-a", "q-idem-hook-b"):
            job = credit_job(
                billing,
                job_id,
                idempotency_key="K-RAW-HOOK",
                webhook={"url": f"{hook.url}/{job_id}"},
            )
            await raw_enqueue(settings, job_id, raw_envelope(job.model_dump(mode="json")))
            await client.handle(job_id).wait(60)
        both = {"q-idem-hook-a", "q-idem-hook-b"}
        async with asyncio.timeout(30):
            while {e["job_id"] for e in hook.hits if e.get("report")} != both:
                hook.settled.clear()
                await hook.settled.wait()

    refused = [e for e in hook.hits if e["job_id"] == "q-idem-hook-b"]
    assert [(e["seq"], e["status"]) for e in refused] == [(1, "rejected")]
    assert refused[0]["report"]["error"]["field"] == "idempotency_key"
    assert "belongs to job q-idem-hook-a" in refused[0]["report"]["error"]["message"]
    assert len(billing.credits()) == 1  # ground truth: the duplicate did nothing


async def test_a_rejected_job_gives_its_idempotency_key_back_for_the_corrected_job(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    # A job refused before any browser work did nothing on the site for its key to guard. The
    # key stayed the refused job's for 7 days: the corrected job, sent with the same key, came
    # back as that refused job, and was never run. (Stripe's keys behave the same way: a
    # request that fails validation saves no result under its key.)
    refused = {
        "q-bad-amount": credit_job(billing, "q-bad-amount", inputs={"amount": "900.00"}),
        "q-bad-script": credit_job(billing, "q-bad-script").model_copy(
            update={"script": "billing/no_such_script"}
        ),
    }
    for job_id, job in refused.items():
        handle = await client.enqueue(job.model_copy(update={"idempotency_key": "K-FIX-1"}))
        assert (await handle.wait(30)).status == JobStatus.rejected, job_id
    fixed = await client.enqueue(credit_job(billing, "q-fixed", idempotency_key="K-FIX-1"))
    assert (fixed.job_id, fixed.created) == ("q-fixed", True)
    assert (await fixed.wait(60)).status == JobStatus.succeeded
    # The key now guards the job that ran.
    again = await client.enqueue(credit_job(billing, "q-again", idempotency_key="K-FIX-1"))
    assert (again.job_id, again.created) == ("q-fixed", False)
    assert len(billing.credits()) == 1
    # Sent the raw way, a duplicate is refused, and that refusal leaves the key where it is.
    job = credit_job(billing, "q-raw-dup", idempotency_key="K-FIX-1")
    await raw_enqueue(settings, "q-raw-dup", raw_envelope(job.model_dump(mode="json")))
    duplicate = await client.handle("q-raw-dup").wait(30)
    assert duplicate.error is not None and duplicate.error.field == "idempotency_key"
    again = await client.enqueue(credit_job(billing, "q-again-2", idempotency_key="K-FIX-1"))
    assert (again.job_id, again.created) == ("q-fixed", False)
    assert len(billing.credits()) == 1


async def test_a_blank_idempotency_key_is_refused_and_holds_nothing_against_later_jobs(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    # "" is a missing key in many orchestrators' languages. The worker took it as a key, so
    # every later job sent with it was refused as a duplicate of the first, for 7 days.
    for job_id in ("q-blank-a", "q-blank-b"):
        payload = credit_job(billing, job_id).model_dump(mode="json", exclude_none=True)
        await raw_enqueue(settings, job_id, raw_envelope({**payload, "idempotency_key": ""}))
        report = await client.handle(job_id).wait(60)
        assert report.status == JobStatus.rejected
        assert report.error is not None and report.error.field == "idempotency_key"
        assert "must not be blank: leave it out" in report.error.message
    assert billing.credits() == []
    assert not await client.redis.exists(Keys(settings.key_prefix).idempotency(""))
    # The client cannot send one either: the job does not validate.
    with pytest.raises(ValidationError, match="must not be blank"):
        credit_job(billing, "q-blank-c", idempotency_key=" ")


async def test_a_secret_in_the_correlation_or_the_idempotency_key_is_refused_and_not_kept(
    billing: Site,
    client: FormworkClient,
    worker: Worker,
    settings: Settings,
    fixture_secrets: dict[str, str],
) -> None:
    password = fixture_secrets["billing_password"]
    cases = {
        "q-carry-corr": ({"correlation": {"note": password}}, "correlation.note"),
        "q-carry-idem": ({"idempotency_key": password}, "idempotency_key"),
    }
    for job_id, (fields, field) in cases.items():
        handle = await client.enqueue(credit_job(billing, job_id, **fields))
        report = await handle.wait(30)
        assert report.status == JobStatus.rejected
        assert report.error is not None and report.error.field == field
        assert password not in report.model_dump_json()
    redis: Redis = client.redis
    keys = Keys(settings.key_prefix)
    assert await redis.exists(keys.idempotency(password)) == 0  # its name held the secret
    assert billing.state()["requests"] == 0


async def test_webhook_follows_the_job_through_a_decision_to_its_end(
    billing: Site, client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    # A large credit waits for approval; the approval is carried out by whichever worker takes
    # it. The webhook hears every event, the pause's and the decision's, to the report.
    async with hooked_worker(settings, browser_host) as hook:
        job = credit_job(
            billing, "q-hook-decided", inputs={"amount": "150.00"}, webhook={"url": hook.url}
        )
        handle = await client.enqueue(job)
        paused = await handle.wait(60)
        assert paused.status == JobStatus.awaiting_approval
        last = await handle.last_event_id()
        assert await client.resume("q-hook-decided", ResumeDecision(decision="approve"))
        report = await handle.wait(60, after=last)
        # Each settling event delivered sets `settled` (the pause's too): until the last one.
        async with asyncio.timeout(30):
            while not (hook.delivered and hook.delivered[-1]["status"] == "succeeded"):
                hook.settled.clear()
                await hook.settled.wait()

    assert report.status == JobStatus.succeeded
    seqs = [event["seq"] for event in hook.delivered]
    assert seqs == list(range(2, len(seqs) + 2))  # in order, none missing
    assert "awaiting_approval" in [e["status"] for e in hook.delivered if e["kind"] == "job"]
    assert hook.delivered[-1]["status"] == "succeeded" and hook.delivered[-1]["report"]
    assert len(billing.credits()) == 1


async def test_a_decision_queued_under_another_id_gives_its_pause_back(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    # A client of the wire protocol claims the pause, then queues its message under an id of
    # its own. The worker does not carry it out, and the claim must not keep the job waiting
    # for it for ever: the pause is free again for a decision.
    handle = await client.enqueue(credit_job(billing, "q-misq", inputs={"amount": "150.00"}))
    assert (await handle.wait(60)).status == JobStatus.awaiting_approval
    record = client.keys.job("q-misq")
    pause = int(await client.redis.hget(record, "seq") or 0)  # type: ignore[misc]
    await client.redis.hset(record, DECISION_FIELD, f"{pause}|q-misq-approve")  # type: ignore[misc]
    body = resume_message("q-misq", pause, ResumeDecision(decision="approve"))
    await enqueue_message(
        client.redis, client.keys, "q-misq-approve", body, int(time.time() * 1000)
    )
    run = Job("q-misq-approve", client.redis, _queue_name=client.keys.queue, _deserializer=loads)
    with pytest.raises(Exception, match="not queued as one"):
        await run.result(timeout=30, poll_delay=0.01)
    assert await client.redis.hget(record, DECISION_FIELD) is None  # type: ignore[misc]
    assert await handle.status() == JobStatus.awaiting_approval

    last = await handle.last_event_id()
    assert await client.resume("q-misq", ResumeDecision(decision="approve", by="lead"))
    report = await handle.wait(60, after=last)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1


@pytest.mark.parametrize("about", ["q-other-b", None, 7], ids=["another", "null", "number"])
async def test_a_decision_whose_message_names_another_job_gives_its_pause_back(
    billing: Site, client: FormworkClient, worker: Worker, about: object
) -> None:
    # A client of the wire protocol claims job A's pause and queues the message under A's
    # message id, as README says, but its body names job B (or no job). The worker refused
    # the message and looked for the claim on B: A kept it, deaf to every decision sent
    # again (`decided`) until its deadline expired the job.
    job_a = f"q-other-a-{type(about).__name__}"
    handle = await client.enqueue(credit_job(billing, job_a, inputs={"amount": "150.00"}))
    assert (await handle.wait(60)).status == JobStatus.awaiting_approval
    pause = int(await client.redis.hget(client.keys.job(job_a), "seq") or 0)  # type: ignore[misc]
    token = message_id(job_a, "resume", pause)
    body = {"resume": about, "pause": pause, "decision": {"decision": "approve"}}
    claimed = await claim_pause(client.redis, client.keys, job_a, pause, token, body)
    assert claimed == PauseClaim.claimed
    run = Job(token, client.redis, _queue_name=client.keys.queue, _deserializer=loads)
    with pytest.raises(Exception, match=r"not queued as one|rejected"):
        await run.result(timeout=30, poll_delay=0.01)
    record = client.keys.job(job_a)
    assert await client.redis.hget(record, DECISION_FIELD) is None  # type: ignore[misc]
    assert await handle.status() == JobStatus.awaiting_approval
    assert billing.credits() == []

    last = await handle.last_event_id()
    assert await client.decide(job_a, ResumeDecision(decision="approve", by="lead")) == (
        PauseClaim.claimed
    )
    report = await handle.wait(60, after=last)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1


async def test_a_decision_whose_envelope_cannot_be_read_gives_its_pause_back(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    # A client of the wire protocol claims the pause as README says and queues its message in
    # an envelope without `et`. The worker took it for a job named after the message (and
    # refused it): the claim stayed, the job deaf to every decision sent again (`decided`).
    job_id = "q-bad-envelope"
    handle = await client.enqueue(credit_job(billing, job_id, inputs={"amount": "150.00"}))
    assert (await handle.wait(60)).status == JobStatus.awaiting_approval
    record = client.keys.job(job_id)
    pause = int(await client.redis.hget(record, "seq") or 0)  # type: ignore[misc]
    token = message_id(job_id, "resume", pause)
    body = resume_message(job_id, pause, ResumeDecision(decision="approve"))
    unreadable = {"t": 1, "f": JOB_FUNCTION, "a": [body], "k": {}}  # no `et`
    await client.redis.hset(record, DECISION_FIELD, f"{pause}|{token}")  # type: ignore[misc]
    await raw_enqueue_as(client, token, json.dumps(unreadable).encode())
    refused = await client.handle(token).wait(30)  # refused, as the job it is not
    assert refused.error is not None and "missing ['et']" in refused.error.message
    assert await client.redis.hget(record, DECISION_FIELD) is None  # type: ignore[misc]
    assert await handle.status() == JobStatus.awaiting_approval

    last = await handle.last_event_id()
    decision = ResumeDecision(decision="approve", by="lead")
    assert await client.decide(job_id, decision) == PauseClaim.claimed
    report = await handle.wait(60, after=last)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1


async def raw_enqueue_as(client: FormworkClient, arq_id: str, data: bytes) -> None:
    await client.redis.set(ARQ_JOB_PREFIX + arq_id, data)
    await client.redis.zadd(client.keys.queue, {arq_id: int(time.time() * 1000)})


@pytest.mark.parametrize(
    ("name", "sent"),
    [
        ("null", {"pause": None, "decision": {"decision": "approve"}}),
        ("missing", {"decision": {"decision": "approve"}}),
        ("text", {"pause": "the last one", "decision": {"decision": "approve"}}),
        ("bare", {"pause": None, "decision": "approve"}),
        ("other", {"pause": 1, "decision": {"decision": "approve"}}),
    ],
)
async def test_a_decision_message_that_does_not_say_its_pause_gives_the_pause_back(
    billing: Site, client: FormworkClient, worker: Worker, name: str, sent: dict[str, Any]
) -> None:
    # A client of the wire protocol claims the pause as README says, under the right id, and
    # queues a message without a readable `pause`. The worker cannot carry it out; the claim
    # it held kept the job deaf to every other decision and, its message having run, to its
    # own deadline: paused for ever.
    job_id = f"q-nopause-{name}"
    handle = await client.enqueue(credit_job(billing, job_id, inputs={"amount": "150.00"}))
    assert (await handle.wait(60)).status == JobStatus.awaiting_approval
    record = client.keys.job(job_id)
    pause = int(await client.redis.hget(record, "seq") or 0)  # type: ignore[misc]
    token = message_id(job_id, "resume", pause)
    body = {"resume": job_id, **sent}
    claimed = await claim_pause(client.redis, client.keys, job_id, pause, token, body)
    assert claimed == PauseClaim.claimed
    run = Job(token, client.redis, _queue_name=client.keys.queue, _deserializer=loads)
    with contextlib.suppress(Exception):  # refused as unreadable, or ignored
        await run.result(timeout=30, poll_delay=0.01)
    assert await client.redis.hget(record, DECISION_FIELD) is None  # type: ignore[misc]
    assert await handle.status() == JobStatus.awaiting_approval

    last = await handle.last_event_id()
    assert await client.resume(job_id, ResumeDecision(decision="approve", by="lead"))
    report = await handle.wait(60, after=last)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1


async def test_an_abort_flag_set_by_hand_for_no_running_job_expires(
    client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    # The wire protocol's `SET formwork:abort:<id> <reason>`, for a job that ended or never
    # was (a mistyped id): read by nothing, it stayed in Redis for ever.
    redis: Redis = client.redis
    keys = client.keys
    await redis.set(keys.abort("q-no-such-job"), "wrong account")
    await redis.set(keys.abort("q-own-expiry"), "customer withdrew", ex=100)
    elsewhere = Keys(settings.key_prefix + "x").abort("q-no-such-job")  # another deployment's
    await redis.set(elsewhere, "theirs")
    try:
        async with running_worker(settings, browser_host):
            async with asyncio.timeout(30):
                while await redis.ttl(keys.abort("q-no-such-job")) < 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # the worker's sweep, at its start
        assert RECORD_TTL_S - 60 < await redis.ttl(keys.abort("q-no-such-job")) <= RECORD_TTL_S
        assert 0 < await redis.ttl(keys.abort("q-own-expiry")) <= 100  # kept its own
        assert await redis.ttl(elsewhere) == -1  # not this worker's prefix
    finally:
        await redis.delete(elsewhere)
    # A prefix's glob characters match only themselves.
    assert Keys("a*b[1]").aborts == "a\\*b\\[1\\]:abort:*"


async def test_a_job_queued_the_raw_way_is_seen_and_aborted_before_a_worker_takes_it(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    payload = credit_job(billing, "q-raw-later").model_dump(mode="json", exclude_none=True)
    redis: Redis = client.redis
    await redis.set(ARQ_JOB_PREFIX + "q-raw-later", raw_envelope(payload))
    later = int(time.time() * 1000) + 3_600_000  # not due yet: no worker has taken it
    await redis.zadd(client.keys.queue, {"q-raw-later": later})
    handle = client.handle("q-raw-later")
    assert await handle.status() == JobStatus.queued
    assert await client.abort("q-raw-later", "wrong account", by="agent")

    await redis.zadd(client.keys.queue, {"q-raw-later": int(time.time() * 1000)})  # due now
    report = await handle.wait(60)
    assert report.status == JobStatus.cancelled
    assert billing.state()["requests"] == 0
    # The request goes too, once the worker is done with the job (just after its last event).
    run = Job("q-raw-later", redis, _queue_name=client.keys.queue, _deserializer=loads)
    await run.result(timeout=30, poll_delay=0.01)
    assert await redis.exists(client.keys.abort("q-raw-later")) == 0


async def test_an_abort_reason_set_by_hand_is_kept_as_long_as_a_note_not_whole(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    # `SET formwork:abort:<id> <reason>` holds whatever its setter wrote. A 1 MB reason went
    # whole into the report's error, the event's message (so twice per event), the job's
    # record and both event streams.
    payload = credit_job(billing, "q-abort-long").model_dump(mode="json", exclude_none=True)
    later = int(time.time() * 1000) + 3_600_000
    await raw_enqueue(settings, "q-abort-long", raw_envelope(payload), score=later)
    reason = "wrong account " + "x" * 1_000_000
    await client.redis.set(client.keys.abort("q-abort-long"), reason, ex=RECORD_TTL_S)
    await client.redis.zadd(client.keys.queue, {"q-abort-long": int(time.time() * 1000)})

    report = await client.handle("q-abort-long").wait(60)
    assert report.status == JobStatus.cancelled
    assert report.error is not None
    message = report.error.message
    assert message.startswith("aborted: wrong account xxx") and message.endswith("…")
    assert len(message) == len("aborted: ") + 2000
    [(_, fields)] = await client.redis.xrange(client.keys.events("q-abort-long"))
    assert len(fields[b"event"]) < 10_000
    assert billing.state()["requests"] == 0


@pytest.mark.timeout(90)
async def test_a_job_over_its_timeout_on_a_hanging_page_ends_failed_with_its_steps(
    billing: Site, client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    # The review page never answers. The job ends at its timeout (less the margin) with a
    # report that keeps the steps it did — not left "queued" for a rerun that never comes.
    billing.faults(latency_ms=40_000, latency_path_contains="/review")
    short = settings.model_copy(update={"job_timeout_s": 12})
    async with running_worker(short, browser_host):
        handle = await client.enqueue(credit_job(billing, "q-timeout"))
        report = await handle.wait(40)
    assert report.status == JobStatus.failed
    assert report.error is not None and report.error.code == "timeout"
    assert report.error.step_id == "review"
    steps = {s.id: s.status for s in report.steps}
    assert steps["reference"] == StepStatus.succeeded and steps["review"] == StepStatus.failed
    assert steps["submit"] == StepStatus.skipped
    events = await collect(client, "q-timeout")
    assert events[-1].status == "failed"
    assert billing.credits() == []


@pytest.mark.timeout(90)
async def test_a_job_over_its_timeout_after_its_commit_was_sent_waits_for_a_person(
    billing: Site, client: FormworkClient, settings: Settings, browser_host: BrowserHost
) -> None:
    # The credit is created, its answer never comes, and the job's time runs out: whether it
    # took effect is not known, so a person looks — never a bare `failed` an orchestrator
    # would retry into a second credit.
    billing.faults(commit_drop={"create": True, "mode": "hang", "hang_ms": 30_000})
    # 20 s: the commit is reached in ~3 s, and still before the timeout on a loaded machine
    # (with 12 s, a suite run beside another one's reached it too late, once). Its steps wait
    # longer than that, so the job's timeout, not the step's, is what ends the hang.
    short = settings.model_copy(update={"job_timeout_s": 20})
    job = credit_job(billing, "q-timeout-sent", step_timeout_ms=60_000)
    async with running_worker(short, browser_host):
        handle = await client.enqueue(job)
        report = await handle.wait(50)
    assert report.status == JobStatus.paused_for_handoff
    assert report.error is not None and report.error.code == "outcome_unknown"
    assert report.error.step_id == "submit" and "timeout" in report.error.message
    assert report.handoff is not None and "mark_done" in report.handoff.allowed_decisions
    assert {s.id: s.status for s in report.steps}["confirm_amount"] == StepStatus.succeeded
    assert len(billing.credits()) == 1


async def test_an_abort_after_the_commit_was_sent_lets_the_job_finish(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    # Asked to stop while its commit is under way: too late. Ended there, the job would say
    # "cancelled" over a credit the site made; it reads the confirmation and says why.
    billing.faults(latency_ms=3_000, latency_path_contains="/credits/CN-")
    handle = await client.enqueue(credit_job(billing, "q-late-abort"))
    async for _, event in handle.events():
        if event.step is not None and event.step.id == "submit":
            assert await client.abort("q-late-abort", "customer changed their mind")
            break
    report = await handle.wait(60)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1
    assert report.outputs["confirmation_number"] == billing.credits()[0]["confirmation"]
    late = [r for r in report.rules_fired if r.action == "continue"]
    assert len(late) == 1 and "after a commit was sent" in late[0].reason


async def test_a_decision_about_a_job_that_does_not_exist_is_ignored_without_an_error(
    client: FormworkClient, worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    # Sent the wire protocol's way about a job with no record (never queued, or expired): it
    # ended as an error of the worker's, with a traceback in its log.
    token = message_id("q-nobody", "resume", 2)
    body = {"resume": "q-nobody", "pause": 2, "decision": {"decision": "approve"}}
    redis: Redis = client.redis
    await redis.set(ARQ_JOB_PREFIX + token, raw_envelope(body))
    await redis.zadd(client.keys.queue, {token: int(time.time() * 1000)})
    run = Job(token, redis, _queue_name=client.keys.queue, _deserializer=loads)
    assert await run.result(timeout=30, poll_delay=0.01) == {}
    assert "decision q-nobody.resume2 about unknown job 'q-nobody': ignored" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_worker_connects_with_the_redis_url_s_settings_as_the_commands_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # arq's from_dsn reads `db` alone: `rediss://…?ssl_cert_reqs=none` (a managed Redis with
    # its own CA) worked for every command and was refused by every worker.
    url = (
        "rediss://:pw@redis.example:6380/3?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem"
        "&ssl_check_hostname=false&socket_connect_timeout=2.5&health_check_interval=30"
    )
    # A password in the query, as redis-py takes it too, was dropped: no AUTH at all.
    assert redis_settings("redis://h:6379/0?password=q-secret").password == "q-secret"
    with caplog.at_level(logging.WARNING, logger="formwork.queue"):
        given = redis_settings(url)
    assert (given.host, given.port, given.database, given.ssl, given.password) == (
        "redis.example", 6380, 3, True, "pw",
    )  # fmt: skip
    assert (given.ssl_cert_reqs, given.ssl_ca_certs, given.ssl_check_hostname) == (
        "none", "/etc/ca.pem", False,
    )  # fmt: skip
    assert given.conn_timeout == 3
    assert "health_check_interval= is not used by workers" in caplog.text
    assert "pw" not in caplog.text
