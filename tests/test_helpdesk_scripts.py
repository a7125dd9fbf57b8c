"""helpdesk/reply_and_resolve and helpdesk/ticket_context in real Chromium, against the
helpdesk fixture's ground truth."""

from __future__ import annotations

import logging

import pytest

from worker.contract import BrowserJob, FailureCode, JobStatus, Verification
from worker.executor import Runtime, run_job

from .conftest import Site

REPLY_INPUTS = {
    "ticket_id": "HD-2041",
    "message": "Your refund RF-500001 was issued today.",
    "reference": "T-7001",
}


def reply_job(site: Site) -> BrowserJob:
    return BrowserJob(
        job_id="reply-1",
        script="helpdesk/reply_and_resolve",
        inputs=REPLY_INPUTS,
        site_url=site.url,
    )


def our_replies(site: Site) -> list[dict[str, str]]:
    thread = site.ticket("HD-2041")["thread"]
    return [m for m in thread if m["kind"] == "public" and "T-7001" in m["body"]]


async def test_reply_and_resolve_replies_exactly_once_and_resolves(
    helpdesk: Site, runtime: Runtime
) -> None:
    report = await run_job(reply_job(helpdesk), runtime)

    assert report.status == JobStatus.succeeded, report.error
    (reply,) = our_replies(helpdesk)
    assert reply["body"] == "Your refund RF-500001 was issued today.\n\nRef: T-7001"
    assert helpdesk.ticket("HD-2041")["status"] == "resolved"
    send = next(s for s in report.steps if s.id == "send")
    assert (send.verified, send.attempts) == (Verification.postcondition, 1)
    effect = next(c for c in report.claims if c.kind == "effect")
    assert effect.verified


async def test_reply_lost_after_sending_is_found_by_the_probe(
    helpdesk: Site, runtime: Runtime
) -> None:
    helpdesk.faults(commit_drop={"create": True, "mode": "error", "path_contains": "/messages"})
    report = await run_job(reply_job(helpdesk), runtime)

    assert report.status == JobStatus.succeeded, report.error
    send = next(s for s in report.steps if s.id == "send")
    assert send.verified == Verification.probe
    assert len(our_replies(helpdesk)) == 1
    assert helpdesk.ticket("HD-2041")["status"] == "resolved"


async def test_ticket_context_extracts_the_fields(helpdesk: Site, runtime: Runtime) -> None:
    job = BrowserJob(
        job_id="context-1",
        script="helpdesk/ticket_context",
        inputs={"ticket_id": "HD-2042"},
        site_url=helpdesk.url,
    )
    before = helpdesk.state()["tickets"]
    report = await run_job(job, runtime)

    assert report.status == JobStatus.succeeded, report.error
    assert helpdesk.state()["tickets"] == before  # read-only: nothing changed
    truth = helpdesk.ticket("HD-2042")
    customer = [m for m in truth["thread"] if m["kind"] in ("customer", "public")]
    assert report.outputs == {
        "subject": truth["subject"],
        "requester": "Omar Haddad <omar.h@example.com>",
        "status": "Open",
        "priority": truth["priority"],
        "last_message": customer[-1]["body"],
    }
    assert all(c.verified for c in report.claims)  # read where a postcondition held
    assert not any(s.commit for s in report.steps)


async def test_a_page_that_got_no_answer_is_read_once_its_error_page_shows(
    helpdesk: Site, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    # page.goto fails as soon as the connection drops, but Chromium's error page commits only
    # after that: read at once, the page was torn down under the reader.
    # Every try of it (the worker retries a network error): the job ends on it.
    rule = {"path_contains": "/tickets/HD-", "method": "GET", "mode": "reset", "times": 10}
    helpdesk.faults(fail=[rule])
    with caplog.at_level(logging.WARNING, logger="formwork"):
        report = await run_job(reply_job(helpdesk), runtime)

    assert report.error is not None and report.error.code == FailureCode.network_error
    assert report.error.step_id == "open_ticket"
    unread = [r.getMessage() for r in caplog.records if "could not observe" in r.getMessage()]
    assert unread == []
    assert next(s for s in report.steps if s.id == "open_ticket").screenshot
    assert our_replies(helpdesk) == []
