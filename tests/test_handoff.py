"""Paused jobs: a person's decision resumes them at the step, on any worker, in a new context."""

from __future__ import annotations

from arq import Worker

from worker.browser import BrowserHost
from worker.client import FormworkClient
from worker.contract import BrowserJob, JobReport, JobStatus, ResumeDecision, StepStatus

from .conftest import CREDIT_INPUTS, Site


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
    contexts = len(browser_host.browser.contexts)
    await paused_job(billing, client, "h-retry")
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
    assert any(s.id.endswith("resume_login.relogin.submit") for s in report.steps)
    assert report.inputs["amount"] == "9.00"
    assert await client.paused() == []


async def test_abort_ends_a_paused_job_without_touching_the_site(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    await paused_job(billing, client, "h-abort")
    requests = billing.state()["requests"]
    last = await client.handle("h-abort").last_event_id()
    assert await client.resume("h-abort", ResumeDecision(decision="abort", by="ops"))
    report = await client.handle("h-abort").wait(30, after=last)
    assert report.status == JobStatus.cancelled
    assert report.decisions[0].decision == "abort"
    assert billing.credits() == [] and billing.state()["requests"] == requests


async def test_disallowed_or_invalid_decisions_leave_the_job_paused(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    await paused_job(billing, client, "h-done")
    # mark_done is not among the decisions a validation rejection allows.
    assert not await client.resume("h-done", ResumeDecision(decision="mark_done"))
    corrected = ResumeDecision(decision="retry_with_inputs", inputs={"amount": "-5"}, by="agent")
    last = await client.handle("h-done").last_event_id()
    assert await client.resume("h-done", corrected)
    report = await client.handle("h-done").wait(30, after=last)
    # Refused by the script's input schema: still waiting, with the refusal on record.
    assert report.status == JobStatus.needs_customer_input
    assert "refused" in (report.decisions[-1].note or "")
    assert billing.credits() == []
    assert {s.status for s in report.steps if s.id == "submit"} == {StepStatus.skipped}


async def test_a_pause_without_a_decision_expires(
    billing: Site, client: FormworkClient, worker: Worker
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

    expired = await handle.wait(30, after=await handle.last_event_id())
    assert expired.status == JobStatus.expired
    assert expired.error is not None and "pause deadline" in expired.error.message
    assert await client.paused() == []
    assert not await client.resume("h-expire", ResumeDecision(decision="abort"))
    assert billing.credits() == []
