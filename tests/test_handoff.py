"""Paused jobs: a person's decision resumes them at the step, on any worker, in a new context."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from arq import Worker
from arq.jobs import Job
from pydantic import ValidationError

from worker.artifacts import LocalArtifacts
from worker.audit_ui import export_html
from worker.browser import BrowserHost
from worker.client import FormworkClient, JobHandle
from worker.contract import (
    BrowserJob,
    EventKind,
    HandoffKind,
    JobReport,
    JobStatus,
    ResumeDecision,
    StepStatus,
)
from worker.keys import message_id
from worker.queue import (
    DECISION_FIELD,
    PauseClaim,
    claim_pause,
    loads,
    read_pause,
    running_worker,
)
from worker.settings import Settings

from .conftest import CREDIT_INPUTS, SCRIPTS, Site, signing_in_as_the_agent
from .test_cli import formwork
from .test_worker_process import worker_process


async def paused_job(billing: Site, client: FormworkClient, job_id: str) -> JobReport:
    """A credit the site refuses (amount 15.00 needs approval): the job asks the customer."""
    rule = {"field": "amount", "value": "15.00", "message": "Credits over 10.00 need approval"}
    billing.faults(reject_value=[rule])
    job = BrowserJob(
        job_id=job_id, script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    report = await (await client.enqueue(job)).wait(60)
    assert report.status == JobStatus.needs_customer_input
    return report


async def test_pause_holds_no_browser_and_retry_with_inputs_resumes_at_the_step(
    billing: Site, client: FormworkClient, worker: Worker, browser_host: BrowserHost
) -> None:
    assert browser_host.browser is not None
    await browser_host.settled()  # contexts of earlier tests, still being closed
    contexts = len(browser_host.browser.contexts)
    await paused_job(billing, client, "h-retry")
    await browser_host.settled()  # the job's context is closed after its report goes out
    assert len(browser_host.browser.contexts) == contexts  # released while it waits
    assert [job_id for job_id, _, _ in await client.paused()] == ["h-retry"]

    decision = ResumeDecision(decision="retry_with_inputs", inputs={"amount": "9.00"}, by="agent")
    handle = client.handle("h-retry")
    last = await handle.last_event_id()
    assert await client.resume("h-retry", decision)
    report = await handle.wait(60, after=last)

    assert report.status == JobStatus.succeeded, report.error
    credits = billing.credits()
    assert len(credits) == 1 and credits[0]["amount"] == "9.00"
    assert [d.decision for d in report.decisions] == ["retry_with_inputs"]
    assert report.decisions[0].by == "agent" and report.decisions[0].inputs_changed == ["amount"]
    steps = {s.id: s for s in report.steps}
    assert steps["review"].attempts == 2  # the refused try, then the corrected one
    assert steps["amount"].attempts == 2  # the form was filled again with the new value
    assert steps["login.submit"].attempts == 1  # done before the pause: not redone
    # The checkpoint's sealed session was restored: no second sign-in.
    assert not any("relogin" in s.id for s in report.steps)
    assert billing.state()["logins"] == 1
    assert report.inputs["amount"] == "9.00"
    assert await client.paused() == []


async def test_abort_ends_a_paused_job_without_touching_the_site(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    paused = await paused_job(billing, client, "h-abort")
    requests = billing.state()["requests"]

    async def deadlines() -> list[bytes]:
        queued = await client.redis.zrange(client.keys.queue, 0, -1)
        return [m for m in queued if m.startswith(b"h-abort.expire")]

    async def deadline_queued() -> None:
        # Queued by the worker just after it announced the pause: polled, bounded below.
        while not await deadlines():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(deadline_queued(), 10)  # for when it falls due, a day from now
    assert len(await deadlines()) == 1
    last = await client.handle("h-abort").last_event_id()
    assert await client.resume("h-abort", ResumeDecision(decision="abort", by="ops"))
    report = await client.handle("h-abort").wait(30, after=last)
    assert report.status == JobStatus.cancelled
    # The worker's time on the job is still there (the wait for the decision is not in it).
    assert paused.duration_ms and report.duration_ms
    assert paused.duration_ms <= report.duration_ms < paused.duration_ms + 1000
    assert report.decisions[0].decision == "abort"
    assert billing.credits() == [] and billing.state()["requests"] == requests
    assert await deadlines() == []  # decided: nothing left on the queue for it
    # The request the person answered stays on record, though the job no longer waits: the
    # audit trail shows what they were shown when they decided.
    assert report.handoff is None and report.decisions[0].request == paused.handoff
    store = LocalArtifacts(settings.artifacts_dir)
    assert report.artifacts is not None and report.artifacts.audit is not None
    record = store.audit(report.artifacts.audit.removesuffix("/audit.json"))
    assert record.report.decisions[0].request == paused.handoff
    page = export_html(store, record)
    assert "The request answered" in page and "Credits over 10.00 need approval" in page


async def test_disallowed_or_invalid_decisions_leave_the_job_paused(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    paused = await paused_job(billing, client, "h-done")
    # mark_done is not among the decisions a validation rejection allows.
    assert not await client.resume("h-done", ResumeDecision(decision="mark_done"))
    corrected = ResumeDecision(decision="retry_with_inputs", inputs={"amount": "-5"}, by="agent")
    last = await client.handle("h-done").last_event_id()
    assert await client.resume("h-done", corrected)
    report = await client.handle("h-done").wait(30, after=last)
    # Refused by the script's input schema: still waiting, with the refusal on record.
    assert report.status == JobStatus.needs_customer_input
    assert "refused" in (report.decisions[-1].note or "")
    # Nothing happened to the job: it is not counted as settling (pausing) a second time.
    assert report.ended_at == paused.ended_at
    assert billing.credits() == []
    assert {s.status for s in report.steps if s.id == "submit"} == {StepStatus.skipped}


async def test_two_decisions_at_once_only_one_is_carried_out(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    paused = await paused_job(billing, client, "h-race")
    handle = client.handle("h-race")
    last = await handle.last_event_id()
    decisions = [
        ResumeDecision(decision="retry_with_inputs", inputs={"amount": amount}, by=who)
        for amount, who in (("9.00", "agent-a"), ("8.00", "agent-b"))
    ]
    outcomes = await asyncio.gather(*(client.decide("h-race", d) for d in decisions))
    assert outcomes.count(PauseClaim.claimed) == 1
    winner = decisions[outcomes.index(PauseClaim.claimed)]
    # The other one is told the pause is taken: decided, or (once a worker has it) running.
    assert set(outcomes) - {PauseClaim.claimed} <= {PauseClaim.decided, PauseClaim.not_paused}
    assert not await client.resume("h-race", decisions[0])  # and so is a third
    report = await handle.wait(60, after=last)

    assert report.status == JobStatus.succeeded, report.error
    # Ground truth: one credit, of the decision that was taken.
    assert [c["amount"] for c in billing.credits()] == [winner.inputs["amount"]]
    assert [(d.decision, d.by) for d in report.decisions] == [("retry_with_inputs", winner.by)]
    events = [e async for _, e in handle.events(after=last, follow=False)]
    assert [e.status for e in events if e.kind == EventKind.job] == ["running", "succeeded"]
    assert paused.handoff is not None and report.handoff is None


@pytest.mark.parametrize("kind", ["customer_input", "approval"])
async def test_abort_of_a_paused_job_ends_it_at_once(
    billing: Site, client: FormworkClient, worker: Worker, kind: str
) -> None:
    job_id = f"h-abort-{kind}"
    if kind == "approval":
        paused = await awaiting_approval(billing, client, job_id)
    else:
        paused = await paused_job(billing, client, job_id)
    requests = billing.state()["requests"]
    handle = client.handle(job_id)
    last = await handle.last_event_id()
    assert [j for j, _, _ in await client.paused()] == [job_id]

    assert await client.abort(job_id, "customer withdrew the request", by="ops")
    report = await handle.wait(30, after=last)

    assert report.status == JobStatus.cancelled
    assert report.error is not None and report.error.code == "cancelled"
    assert "customer withdrew the request" in report.error.message
    assert [(d.decision, d.by) for d in report.decisions] == [("abort", "ops")]
    # The steps done before the pause are still in the report; nothing was sent since.
    assert [(s.id, s.status) for s in report.steps] == [(s.id, s.status) for s in paused.steps]
    assert report.handoff is None and await client.paused() == []
    assert billing.credits() == [] and billing.state()["requests"] == requests
    # Ended: nothing left to decide or abort.
    assert await client.decide(job_id, ResumeDecision(decision="abort")) == PauseClaim.not_paused
    assert not await client.abort(job_id)


async def test_an_abort_asked_while_the_job_runs_is_carried_out_if_it_pauses_first(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    rule = {"field": "amount", "value": "15.00", "message": "Credits over 10.00 need approval"}
    billing.faults(reject_value=[rule], latency_ms=150)  # the refused review takes a while
    job = BrowserJob(
        job_id="h-abort-late", script="billing/issue_credit", inputs=CREDIT_INPUTS,
        site_url=billing.url,
    )  # fmt: skip
    handle = await client.enqueue(job)
    async for _, event in handle.events():
        if event.step is not None and event.step.id == "review" and event.status == "running":
            # Past its last look at the abort flag: the job pauses before it would see one.
            assert await client.abort("h-abort-late", "customer withdrew the request")
            break
    report = await handle.wait(60, after=await handle.last_event_id())
    if report.status.paused:  # the pause came first: follow what the abort brings
        report = await handle.wait(30, after=await handle.last_event_id())

    assert report.status == JobStatus.cancelled
    assert report.error is not None and "customer withdrew the request" in report.error.message
    assert await client.paused() == []
    assert not await client.resume("h-abort-late", ResumeDecision(decision="abort"))
    assert billing.credits() == []


async def test_a_stale_abort_flag_never_overturns_a_later_decision(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    await awaiting_approval(billing, client, "h-stale")
    # The run that paused is over (arq has its result): nothing of it looks at the flag now.
    run = Job("h-stale", client.redis, _queue_name=client.keys.queue, _deserializer=loads)
    await run.result(timeout=10, poll_delay=0.01)
    # What an earlier worker left behind: a flag on a job that is waiting for a person.
    await client.redis.set(client.keys.abort("h-stale"), "aborted long ago")
    handle = client.handle("h-stale")
    last = await handle.last_event_id()
    assert await client.resume("h-stale", ResumeDecision(decision="approve", by="lead@billing"))
    report = await handle.wait(60, after=last)

    assert report.status == JobStatus.succeeded, report.error
    assert [c["amount"] for c in billing.credits()] == ["150.00"]
    assert [d.decision for d in report.decisions] == ["approve"]


async def test_a_decision_carrying_a_secret_is_refused_and_the_job_still_waits(
    billing: Site,
    client: FormworkClient,
    worker: Worker,
    settings: Settings,
    fixture_secrets: dict[str, str],
) -> None:
    secret = fixture_secrets["billing_password"]
    paused = await paused_job(billing, client, "h-secret")
    handle = client.handle("h-secret")
    last = await handle.last_event_id()
    leaky = ResumeDecision(
        decision="retry_with_inputs", inputs={"reason": f"pw {secret}"}, by="agent"
    )
    assert await client.resume("h-secret", leaky)
    report = await handle.wait(30, after=last)

    # Refused like any value the script refuses: still waiting, the refusal on record.
    assert report.status == JobStatus.needs_customer_input
    assert report.handoff is not None and report.handoff == paused.handoff
    note = report.decisions[-1].note or ""
    assert note.startswith("refused") and "inputs.reason carries the value of a configured" in note
    assert [(s.id, s.status, s.attempts) for s in report.steps] == [
        (s.id, s.status, s.attempts) for s in paused.steps
    ]
    assert report.ended_at == paused.ended_at
    assert [j for j, _, _ in await client.paused()] == ["h-secret"]
    # The secret is nowhere the job wrote: report, report.json, events.
    assert report.artifacts is not None
    on_disk = JobReport.model_validate_json(
        (settings.artifacts_dir / report.artifacts.report).read_text()
    )
    assert on_disk.status == JobStatus.needs_customer_input and on_disk.steps == report.steps
    events = [e async for _, e in handle.events(follow=False)]
    dumps = [r.model_dump_json() for r in (report, on_disk, *events)]
    for text in dumps:
        assert secret not in text
    assert billing.credits() == []

    # The pause is free for the next decision.
    last = await handle.last_event_id()
    fixed = ResumeDecision(decision="retry_with_inputs", inputs={"amount": "9.00"}, by="agent")
    assert await client.resume("h-secret", fixed)
    done = await handle.wait(60, after=last)
    assert done.status == JobStatus.succeeded, done.error
    assert [c["amount"] for c in billing.credits()] == ["9.00"]


async def test_decisions_sent_around_the_client_are_refused_and_free_the_pause(
    billing: Site, client: FormworkClient, worker: Worker, fixture_secrets: dict[str, str]
) -> None:
    # The wire protocol, as README shows it: claim the pause and queue the message in one
    # script, with no client to check the decision first. Each used to fail in the worker
    # and keep its claim: the job then refused every later decision, for ever.
    secret = fixture_secrets["billing_password"]
    await paused_job(billing, client, "h-raw")
    handle = client.handle("h-raw")
    sent = [
        ({"decision": "maybe"}, "invalid decision: decision: Input should be"),
        ({"decision": "abort", "bogus": 1}, "invalid decision: bogus: Extra inputs"),
        ({"decision": "approve"}, "approve is not a decision this pause takes"),
        (
            {"decision": "retry_with_inputs", "inputs": {"amount": "9.00"}, "note": f"pw {secret}"},
            "its note carries the value of a",
        ),
        (
            {"decision": "retry_with_inputs", "inputs": {"amount": "9.00"}, "by": secret},
            "its by carries the value of a configured",
        ),
    ]
    for decision, why in sent:
        pause = await read_pause(client.redis, client.keys, "h-raw")
        last = await handle.last_event_id()
        token = message_id("h-raw", "resume", pause.seq)
        body = {"resume": "h-raw", "pause": pause.seq, "decision": decision}
        claimed = await claim_pause(client.redis, client.keys, "h-raw", pause.seq, token, body)
        assert claimed == PauseClaim.claimed, decision
        report = await handle.wait(30, after=last)
        # Still waiting, announced again: the next decision is free to come.
        assert report.status == JobStatus.needs_customer_input, decision
        assert (await read_pause(client.redis, client.keys, "h-raw")).waiting, decision
        if decision["decision"] != "maybe":
            assert (report.decisions[-1].note or "").startswith(f"refused: {why}"), decision
    assert [d.decision for d in report.decisions] == [
        "abort", "approve", *["retry_with_inputs"] * 2
    ]  # fmt: skip
    # Only what carries the secret is withheld: the name beside a note that held it stays.
    assert [d.by for d in report.decisions][2:] == [
        ResumeDecision(decision="abort").by,
        "(withheld)",
    ]

    # An abort is carried out whatever its note says; the note is not kept.
    last = await handle.last_event_id()
    leaky = ResumeDecision(decision="abort", by="agent", note=f"customer said pw is {secret}")
    assert await client.resume("h-raw", leaky)
    done = await handle.wait(30, after=last)
    assert done.status == JobStatus.cancelled
    assert done.error is not None and "(withheld: it carries the value" in done.error.message
    assert done.decisions[-1].by == "agent", done.decisions[-1]
    assert billing.credits() == []
    events = [e async for _, e in handle.events(follow=False)]
    for text in [done.model_dump_json(), *(e.model_dump_json() for e in events)]:
        assert secret not in text


@pytest.mark.parametrize("sent", ["retry_step", None, ["retry_step"]], ids=["name", "null", "list"])
async def test_a_decision_that_is_not_an_object_is_refused_and_the_pause_announced_again(
    billing: Site, client: FormworkClient, worker: Worker, sent: object
) -> None:
    # A client of the wire protocol claims the pause and sends `"decision": "retry_step"`, the
    # decision's name where its object belongs. The message was refused before it was read:
    # its claim dropped in silence, no event, and the orchestrator waited for a job that was
    # waiting for it.
    job_id = f"h-bare-{type(sent).__name__}"
    await paused_job(billing, client, job_id)
    handle = client.handle(job_id)
    pause = await read_pause(client.redis, client.keys, job_id)
    last = await handle.last_event_id()
    token = message_id(job_id, "resume", pause.seq)
    body = {"resume": job_id, "pause": pause.seq, "decision": sent}
    claimed = await claim_pause(client.redis, client.keys, job_id, pause.seq, token, body)
    assert claimed == PauseClaim.claimed

    report = await handle.wait(30, after=last)
    assert report.status == JobStatus.needs_customer_input
    again = await read_pause(client.redis, client.keys, job_id)
    assert again.waiting and again.seq > pause.seq  # announced again, free for the next one
    if isinstance(sent, str):
        [record] = report.decisions
        assert record.decision == sent
        assert (record.note or "").startswith("refused: invalid decision: decision: Input should")
    assert billing.credits() == []


async def test_a_secret_input_pasted_into_a_decision_is_redacted_everywhere(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path,
    fixture_secrets: dict[str, str],
) -> None:  # fmt: skip
    # The job signs in with the agent's own name and password, inputs declared secret; the
    # approver pastes them into `formwork resume`'s note, reason and name. Only configured
    # secrets were checked there: the note went into the report, its events, the audit
    # record and the rejection's error in the clear.
    settings = signing_in_as_the_agent(settings, tmp_path)
    user, password = fixture_secrets["billing_username"], fixture_secrets["billing_password"]
    inputs = {**CREDIT_INPUTS, "amount": "150.00", "agent_user": user, "agent_pw": password}
    env = {**settings.to_env(), "FORMWORK_SECRETS_FILE": str(settings.secrets_file)}
    said: list[str] = []
    with worker_process(settings, tmp_path / "worker.log"):
        handles = {}
        for job_id in ("s-approve", "s-reject"):
            job = BrowserJob(
                job_id=job_id, script="billing/credit_as", inputs=inputs, site_url=billing.url
            )
            handles[job_id] = await client.enqueue(job)
            paused = await handles[job_id].wait(90)
            assert paused.status == JobStatus.awaiting_approval, paused.error
        last = {job_id: await handle.last_event_id() for job_id, handle in handles.items()}
        for job_id, decision, note in (
            ("s-approve", "approve", f"checked with {user}, pw {password}"),
            ("s-reject", "reject", f"the customer typed {password} into the reason"),
        ):
            sent = await asyncio.to_thread(
                formwork, "resume", job_id, decision, "--note", note, "--by", f"{user} (lead)",
                "--watch", tmp_path=tmp_path, env=env,
            )  # fmt: skip
            said += [sent.stdout, sent.stderr]
            assert f"{decision} sent for {job_id}" in sent.stdout, sent.stderr
        approved = await handles["s-approve"].wait(90, after=last["s-approve"])
        rejected = await handles["s-reject"].wait(90, after=last["s-reject"])
    assert approved.status == JobStatus.succeeded, approved.error
    assert rejected.status == JobStatus.rejected_by_approver, rejected.error
    assert len(billing.credits()) == 1
    # Kept, as every other recorded text is: redacted, not refused.
    assert [(d.by, d.note) for d in approved.decisions] == [
        ("*** (lead)", "checked with ***, pw ***")
    ]
    assert [(d.by, d.note) for d in rejected.decisions] == [
        ("*** (lead)", "the customer typed *** into the reason")
    ]
    assert rejected.error is not None
    assert rejected.error.message == "reject by *** (lead): the customer typed *** into the reason"
    texts = [*said, (tmp_path / "worker.log").read_text()]
    for report in (approved, rejected):
        handle = handles[report.job_id]
        texts += [report.model_dump_json()]
        texts += [e.model_dump_json() async for _, e in handle.events(follow=False)]
        assert report.artifacts is not None and report.artifacts.audit is not None
        audit = (settings.artifacts_dir / report.artifacts.audit).read_text()
        assert "*** (lead)" in audit  # the decision is in the audit record, redacted
        texts += [audit, (settings.artifacts_dir / report.artifacts.report).read_text()]
    for text in texts:
        assert password not in text and user not in text


async def test_a_secret_input_in_the_reason_of_an_abort_is_redacted(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path,
    browser_host: BrowserHost, fixture_secrets: dict[str, str],
) -> None:  # fmt: skip
    # `formwork abort --reason` on a running job: the reason became the job's error as it was.
    settings = signing_in_as_the_agent(settings, tmp_path)
    user, password = fixture_secrets["billing_username"], fixture_secrets["billing_password"]
    inputs = {**CREDIT_INPUTS, "agent_user": user, "agent_pw": password}
    billing.faults(latency_ms=150)  # slow enough that the abort lands mid-job
    job = BrowserJob(
        job_id="s-abort", script="billing/credit_as", inputs=inputs, site_url=billing.url
    )
    async with running_worker(settings, browser_host):
        handle = await client.enqueue(job)
        async for _, event in handle.events():
            if event.step is not None and event.step.id == "open_account":
                reason = f"the customer read out {password} on the phone"
                assert await client.abort("s-abort", reason, by="agent")
                break
        report = await handle.wait(60)
    assert report.status == JobStatus.cancelled
    assert report.error is not None
    assert report.error.message == "aborted: the customer read out *** on the phone"
    assert billing.credits() == []
    assert report.artifacts is not None and report.artifacts.audit is not None
    texts = [
        report.model_dump_json(),
        (settings.artifacts_dir / report.artifacts.audit).read_text(),
        (settings.artifacts_dir / report.artifacts.report).read_text(),
        *[e.model_dump_json() async for _, e in handle.events(follow=False)],
    ]
    for text in texts:
        assert password not in text


@pytest.mark.parametrize(
    "claimed_by", [None, "resume", "expire"], ids=["no-decision", "claim-only", "expiry-cut-short"]
)
async def test_a_pause_without_a_decision_expires(
    billing: Site, client: FormworkClient, worker: Worker, claimed_by: str | None
) -> None:
    rule = {"field": "amount", "value": "15.00", "message": "Credits over 10.00 need approval"}
    billing.faults(reject_value=[rule])
    job = BrowserJob(
        job_id="h-expire", script="billing/issue_credit", inputs=CREDIT_INPUTS,
        site_url=billing.url, pause_timeout_s=2,
    )  # fmt: skip
    handle = await client.enqueue(job)
    paused = await handle.wait(60)
    assert paused.status == JobStatus.needs_customer_input
    assert paused.handoff is not None and paused.handoff.expires_at is not None
    pause = await read_pause(client.redis, client.keys, "h-expire")
    if claimed_by == "resume":
        # A wire-protocol client claims the pause and stops before queueing its message: the
        # claim would hold the job past its deadline for ever.
        token = message_id("h-expire", "resume", pause.seq)
        await client.redis.hset(client.keys.job("h-expire"), DECISION_FIELD, f"{pause.seq}|{token}")
    elif claimed_by == "expire":
        # The expiry's own earlier run claimed the pause and died before ending the job: its
        # next run stood aside for the claim it had taken itself, and the job waited for ever.
        due = int(paused.handoff.expires_at.timestamp() * 1000)
        token = message_id("h-expire", "expire", due)
        await client.redis.hset(client.keys.job("h-expire"), DECISION_FIELD, f"{pause.seq}|{token}")

    expired = await handle.wait(30, after=await handle.last_event_id())
    assert expired.status == JobStatus.expired
    assert expired.error is not None and "pause deadline" in expired.error.message
    assert await client.paused() == []
    assert not await client.resume("h-expire", ResumeDecision(decision="abort"))
    assert billing.credits() == []


async def test_resume_after_the_site_session_expired_signs_in_again(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    await paused_job(billing, client, "h-expired-session")
    # While the job waited, the site ended its session: the next request it makes with the
    # restored cookie lands on the login page.
    billing.faults(session_expiry_after=1, session_expiry_times=1)
    decision = ResumeDecision(decision="retry_with_inputs", inputs={"amount": "9.00"}, by="agent")
    handle = client.handle("h-expired-session")
    last = await handle.last_event_id()
    assert await client.resume("h-expired-session", decision)
    report = await handle.wait(60, after=last)

    assert report.status == JobStatus.succeeded, report.error
    assert [c["amount"] for c in billing.credits()] == ["9.00"]
    assert billing.state()["logins"] == 2  # the first run's, and the one after expiry
    relogins = [r for r in report.rules_fired if r.action == "relogin"]
    assert relogins and relogins[0].code == "auth_expired"


# ---------------------------------------------------------------- approval gates


def large_credit(billing: Site, job_id: str) -> BrowserJob:
    inputs = {**CREDIT_INPUTS, "amount": "150.00", "reference": f"T-{job_id}"}
    return BrowserJob(
        job_id=job_id, script="billing/issue_credit", inputs=inputs, site_url=billing.url
    )


async def awaiting_approval(billing: Site, client: FormworkClient, job_id: str) -> JobReport:
    report = await (await client.enqueue(large_credit(billing, job_id))).wait(60)
    assert report.status == JobStatus.awaiting_approval, report.error
    return report


async def test_an_approval_gate_pauses_with_the_filled_form_and_approve_commits_once(
    billing: Site,
    client: FormworkClient,
    worker: Worker,
    browser_host: BrowserHost,
    settings: Settings,
) -> None:
    assert browser_host.browser is not None
    await browser_host.settled()
    contexts = len(browser_host.browser.contexts)
    paused = await awaiting_approval(billing, client, "a-approve")

    assert billing.credits() == []  # nothing sent while it waits
    await browser_host.settled()
    assert len(browser_host.browser.contexts) == contexts
    request = paused.handoff
    assert request is not None and request.kind == HandoffKind.approval
    assert request.step_id == "submit" and request.role == "billing"
    assert request.allowed_decisions == ["approve", "reject", "abort"]
    assert request.proposed_values == {
        "credit.amount": "150.00",
        "credit.reason": "damaged item",
        "credit.reference": "T-a-approve",
    }  # the sign-in fields are not what the form sends
    assert "150.00" in request.summary and "Nothing has been sent" in request.summary
    assert request.risk and "100.00" in request.risk
    # The evidence is the filled review page, as a person would check it.
    assert request.evidence.screenshot is not None
    shot = settings.artifacts_dir / request.evidence.screenshot
    assert shot.is_file() and shot.stat().st_size > 5_000
    assert request.evidence.url and request.evidence.url.endswith("/credits/review")
    assert [j for j, _, _ in await client.paused()] == ["a-approve"]

    handle = client.handle("a-approve")
    last = await handle.last_event_id()
    assert not await client.resume("a-approve", ResumeDecision(decision="retry_step"))
    assert await client.resume("a-approve", ResumeDecision(decision="approve", by="lead@billing"))
    report = await handle.wait(60, after=last)

    assert report.status == JobStatus.succeeded, report.error
    credits = billing.credits()
    assert len(credits) == 1 and credits[0]["amount"] == "150.00"
    assert report.outputs["confirmation_number"] == credits[0]["confirmation"]
    assert [(d.decision, d.by, d.step_id) for d in report.decisions] == [
        ("approve", "lead@billing", "submit")
    ]
    submit = next(s for s in report.steps if s.id == "submit")
    assert submit.status == StepStatus.succeeded and submit.attempts == 1
    assert [r.code for r in report.rules_fired] == ["approval_required"]  # asked once
    assert await client.paused() == []


async def test_reject_at_an_approval_gate_creates_nothing(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    await awaiting_approval(billing, client, "a-reject")
    requests = billing.state()["requests"]
    handle = client.handle("a-reject")
    last = await handle.last_event_id()
    with pytest.raises(ValidationError, match="needs a reason"):
        ResumeDecision(decision="reject", by="lead@billing")
    reject = ResumeDecision(decision="reject", by="lead@billing", note="customer already refunded")
    assert await client.resume("a-reject", reject)
    report = await handle.wait(30, after=last)

    assert report.status == JobStatus.rejected_by_approver
    assert report.error is not None and report.error.code == "rejected_by_approver"
    assert "customer already refunded" in report.error.message
    assert billing.credits() == [] and billing.state()["requests"] == requests
    assert report.decisions[0].note == "customer already refunded"


async def test_an_approval_sends_only_the_values_the_approver_saw(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    # Inputs riding on any decision but retry_with_inputs were merged into the job: an
    # approve of a 150.00 credit carrying amount=450.00 issued 450.00.
    await awaiting_approval(billing, client, "a-values")
    with pytest.raises(ValidationError, match="approve takes no inputs"):
        ResumeDecision(decision="approve", inputs={"amount": "450.00"}, by="lead@billing")
    with pytest.raises(ValidationError, match="approve takes no outputs"):
        ResumeDecision(decision="approve", outputs={"confirmation_number": "CN-1"})
    # The wire protocol, around the client: refused by the worker, the job still waits.
    handle = client.handle("a-values")
    pause = await read_pause(client.redis, client.keys, "a-values")
    last = await handle.last_event_id()
    token = message_id("a-values", "resume", pause.seq)
    body = {"resume": "a-values", "pause": pause.seq,
            "decision": {"decision": "approve", "inputs": {"amount": "450.00"}}}  # fmt: skip
    claimed = await claim_pause(client.redis, client.keys, "a-values", pause.seq, token, body)
    assert claimed == PauseClaim.claimed
    report = await handle.wait(30, after=last)
    assert report.status == JobStatus.awaiting_approval
    assert billing.credits() == []
    # The refusal is on the record the orchestrator reads, not only in the worker's log.
    refused = report.decisions[-1]
    assert refused.decision == "approve" and refused.by == "unknown"
    assert (refused.note or "").startswith("refused: invalid decision: ")
    assert "approve takes no inputs" in (refused.note or "")

    last = await handle.last_event_id()
    assert await client.resume("a-values", ResumeDecision(decision="approve", by="lead@billing"))
    report = await handle.wait(60, after=last)
    assert report.status == JobStatus.succeeded, report.error
    assert [c["amount"] for c in billing.credits()] == ["150.00"]


async def test_small_amounts_pass_the_approval_gate_without_pausing(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    job = BrowserJob(
        job_id="a-small", script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    report = await (await client.enqueue(job)).wait(60)
    assert report.status == JobStatus.succeeded and report.decisions == []
    assert len(billing.credits()) == 1


# ---------------------------------------------------------------- manual completion


async def test_inconclusive_probe_hands_off_and_mark_done_records_manual_completion(
    billing: Site, client: FormworkClient, browser_host: BrowserHost, settings: Settings,
    tmp_path: Path,
) -> None:  # fmt: skip
    # A probe that cannot look (its page is gone) cannot tell whether the dropped commit
    # took: a person checks by hand and says so.
    scripts = copy_scripts(tmp_path)
    script = scripts / "billing" / "issue_credit.yaml"
    script.write_text(
        script.read_text().replace(
            'goto: "/accounts/{{ inputs.account_id }}", expect: {visible: account.credits}',
            'goto: "/accounts/{{ inputs.account_id }}/gone", expect: {visible: account.credits}',
        )
    )
    settings = settings.model_copy(update={"scripts_dir": scripts})
    billing.faults(commit_drop={"create": True, "mode": "error", "status": 502})
    job = BrowserJob(
        job_id="m-done", script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    async with running_worker(settings, browser_host):
        handle = await client.enqueue(job)
        paused = await handle.wait(60)
        assert paused.status == JobStatus.paused_for_handoff, paused.error
        assert paused.handoff is not None and paused.handoff.code == "outcome_unknown"
        assert "mark_done" in paused.handoff.allowed_decisions
        done = ResumeDecision(
            decision="mark_done", outputs={"confirmation_number": "CN-100001"},
            note="credit seen in the portal", by="ops@billing",
        )  # fmt: skip
        last = await handle.last_event_id()
        assert await client.resume("m-done", done)
        report = await handle.wait(30, after=last)

    assert report.status == JobStatus.succeeded
    assert len(billing.credits()) == 1  # the one the dropped commit made; nothing resent
    assert report.outputs["confirmation_number"] == "CN-100001"
    effect = next(c for c in report.claims if c.kind == "effect")
    assert effect.verified and effect.how == "manual"
    # Told with what the person supplied, not left as the script's template.
    assert effect.value == "credit of 15.00 issued to AC-10231, confirmation CN-100001"
    before = next(c for c in paused.claims if c.kind == "effect")
    assert before.value == "credit of 15.00 issued to AC-10231, confirmation (not read)"
    given = next(c for c in report.claims if c.kind == "output")
    assert (given.name, given.value, given.how) == ("confirmation_number", "CN-100001", "manual")
    assert given.source == "given by ops@billing"
    assert report.decisions[0].decision == "mark_done" and report.decisions[0].by == "ops@billing"


async def test_skip_step_goes_on_from_the_next_step_without_redoing_the_skipped_one(
    billing: Site, client: FormworkClient, browser_host: BrowserHost, settings: Settings,
    tmp_path: Path,
) -> None:  # fmt: skip
    # The account page opens but never shows what the script expects: a person looks, says
    # the page is right, and skips the step. The job goes on from the next step, on that page.
    async with paused_at_the_account(
        billing, client, browser_host, settings, tmp_path, "s-skip"
    ) as (
        handle,
        paused,
    ):
        assert paused.handoff is not None and paused.handoff.step_id == "open_account"
        assert "account.header" in (paused.handoff.detail or "")
        tries = next(s.attempts for s in paused.steps if s.id == "open_account")
        last = await handle.last_event_id()
        skip = ResumeDecision(decision="skip_step", note="account checked by hand", by="ops")
        assert await client.resume("s-skip", skip)
        report = await handle.wait(60, after=last)

    assert report.status == JobStatus.succeeded, report.error
    steps = {s.id: s for s in report.steps}
    assert steps["open_account"].status == StepStatus.skipped
    assert steps["open_account"].recovered_by == "skip_step decision"
    assert steps["open_account"].attempts == tries  # not run again to rebuild the page
    assert steps["open_form"].status == StepStatus.succeeded
    assert len(billing.credits()) == 1


async def test_a_pause_before_the_commit_claims_no_effect_until_a_person_marks_it_done(
    billing: Site, client: FormworkClient, browser_host: BrowserHost, settings: Settings,
    tmp_path: Path,
) -> None:  # fmt: skip
    # The job stops at the account page, long before its commit: nothing was sent, so the
    # report claims no effect (an unverified "credit … issued" would read as if it had been).
    # A person issues the credit by hand and says so: then the effect is claimed, as theirs.
    async with paused_at_the_account(
        billing, client, browser_host, settings, tmp_path, "m-early"
    ) as (
        handle,
        paused,
    ):
        assert paused.handoff is not None and "mark_done" in paused.handoff.allowed_decisions
        assert [c for c in paused.claims if c.kind == "effect"] == []
        last = await handle.last_event_id()
        done = ResumeDecision(
            decision="mark_done", outputs={"confirmation_number": "CN-4242"},
            note="issued in the portal by hand", by="ops@billing",
        )  # fmt: skip
        assert await client.resume("m-early", done)
        report = await handle.wait(30, after=last)

    assert report.status == JobStatus.succeeded, report.error
    assert billing.credits() == []  # the worker sent nothing; the person did it elsewhere
    (effect,) = [c for c in report.claims if c.kind == "effect"]
    assert (effect.verified, effect.how) == (True, "manual")
    assert effect.value == "credit of 15.00 issued to AC-10231, confirmation CN-4242"


async def test_outputs_a_person_supplies_must_be_values_the_script_could_extract(
    billing: Site, client: FormworkClient, browser_host: BrowserHost, settings: Settings,
    tmp_path: Path,
) -> None:  # fmt: skip
    # mark_done and skip_step outputs were checked by name only: a confirmation number
    # without its `CN-` (which the script's pattern never keeps) was claimed and handed on.
    async with paused_at_the_account(
        billing, client, browser_host, settings, tmp_path, "m-shape"
    ) as (
        handle,
        _,
    ):
        for decision, value, why in [
            ("mark_done", "4242", "'4242' is not what pattern 'CN-[0-9]+' keeps"),
            ("skip_step", "CN-4242x", "'CN-4242x' is not what pattern 'CN-[0-9]+' keeps"),
            ("mark_done", "CN-4242\n", "'CN-4242\\n' has white space an extracted text never"),
        ]:
            last = await handle.last_event_id()
            wrong = ResumeDecision(
                decision=decision, outputs={"confirmation_number": value}, by="ops"
            )
            assert await client.resume("m-shape", wrong)
            still = await handle.wait(30, after=last)
            assert still.status == JobStatus.paused_for_handoff
            assert (still.decisions[-1].note or "").startswith(
                f"refused: output 'confirmation_number': {why}"
            ), still.decisions[-1].note
            assert (await read_pause(client.redis, client.keys, "m-shape")).waiting
        # Nothing was lost: a value the site would show is taken.
        last = await handle.last_event_id()
        done = ResumeDecision(
            decision="mark_done", outputs={"confirmation_number": "CN-4242"}, by="ops"
        )
        assert await client.resume("m-shape", done)
        report = await handle.wait(30, after=last)

    assert report.status == JobStatus.succeeded, report.error
    assert report.outputs == {"confirmation_number": "CN-4242"}
    assert billing.credits() == []


def stuck_at_the_account(tmp_path: Path) -> Path:
    """The scripts, with billing/issue_credit's account page never showing what it expects:
    every job stops there, long before its commit, and hands off."""
    scripts = copy_scripts(tmp_path)
    script = scripts / "billing" / "issue_credit.yaml"
    script.write_text(
        script.read_text().replace(
            'goto: "/accounts/{{ inputs.account_id }}", expect: {visible: account.header}}',
            'goto: "/accounts/{{ inputs.account_id }}", expect: {hidden: account.header}, '
            "timeout_ms: 1000}",
        )
    )
    return scripts


@asynccontextmanager
async def paused_at_the_account(
    billing: Site, client: FormworkClient, browser_host: BrowserHost, settings: Settings,
    tmp_path: Path, job_id: str,
) -> AsyncIterator[tuple[JobHandle, JobReport]]:  # fmt: skip
    """A credit job paused for a person at the account page (its script copied under
    `tmp_path`, `stuck_at_the_account`), and a worker running to carry out what is decided."""
    settings = settings.model_copy(update={"scripts_dir": stuck_at_the_account(tmp_path)})
    job = BrowserJob(
        job_id=job_id, script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    async with running_worker(settings, browser_host):
        handle = await client.enqueue(job)
        paused = await handle.wait(60)
        assert paused.status == JobStatus.paused_for_handoff, paused.error
        yield handle, paused


def copy_scripts(tmp_path: Path) -> Path:
    target = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, target)
    return target
