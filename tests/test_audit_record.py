"""The audit record a queue worker writes is complete and agrees with the job's event stream."""

from __future__ import annotations

from arq import Worker

from worker.artifacts import LocalArtifacts
from worker.client import FormworkClient
from worker.contract import BrowserJob, EventKind, JobStatus, StepStatus
from worker.settings import Settings

from .conftest import CREDIT_INPUTS, Site


async def test_audit_record_matches_the_event_stream(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    job = BrowserJob(
        job_id="audit-stream",
        script="billing/issue_credit",
        inputs=CREDIT_INPUTS,
        site_url=billing.url,
        correlation={"conversation": "c-77"},
    )
    handle = await client.enqueue(job)
    events = [event async for _, event in handle.events()]
    final = events[-1]
    assert final.terminal and final.report is not None
    assert final.report.status == JobStatus.succeeded

    record = LocalArtifacts(settings.artifacts_dir).find_audit("audit-stream")
    # The record embeds exactly the report the orchestrator was given on the terminal event.
    assert record.report == final.report
    assert (record.status, record.site, record.script) == (
        JobStatus.succeeded,
        "billing",
        "billing/issue_credit",
    )
    assert record.script_digest == final.report.script_digest and record.script_digest
    assert record.report.correlation == {"conversation": "c-77"}
    # Every step's last event is the step as the record has it; no step is missing or extra.
    last = {e.step.id: e.step for e in events if e.kind == EventKind.step and e.step}
    assert set(last) == {s.id for s in record.report.steps}
    for step in record.report.steps:
        assert last[step.id].status == step.status == StepStatus.succeeded
        assert last[step.id].attempts == step.attempts == len(step.attempt_log)
        assert last[step.id].duration_ms == step.duration_ms
        # And every screenshot has its annotated evidence.
        assert step.screenshot in record.evidence
    assert record.duration_ms is not None and record.started_at is not None
    assert record.images is not None and not record.images.over_budget
