"""A job's audit record: `audit.json`, everything a reviewer needs about one job in one file.

The record embeds the job's `JobReport` (steps, attempts, rules fired, handoff request and
decisions, claims, timings — redacted as the report is) and adds what the report does not
carry: the annotated evidence image for every screenshot, the traces, the image budget. It is
written whenever the report is (a job ends, pauses, or a person decides), so it is never staler
than what the orchestrator was told.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.annotate import Mark
from worker.contract import Box, FailureCode, JobReport, JobStatus, StepReport

AUDIT_VERSION: Literal[1] = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Evidence(_Model):
    """The annotated evidence image made from one screenshot of the report."""

    source: str = Field(description="The screenshot as captured, relative to the store root.")
    image: str = Field(description="Annotated and re-encoded, content-addressed.")
    thumbnail: str
    width: int
    height: int
    box: Box | None = Field(default=None, description="The acted element as drawn (image px).")
    label: str | None = None
    failure: FailureCode | None = None


class ImageBudget(_Model):
    """How the job's evidence images were fitted into its size budget."""

    format: Literal["webp", "jpeg"]
    budget_bytes: int
    used_bytes: int
    quality: int
    scale: float
    over_budget: bool


class AuditRecord(_Model):
    """One job's audit trail (`<date>/<job_id>/audit.json`)."""

    audit_version: Literal[1] = AUDIT_VERSION
    job_id: str
    status: JobStatus
    site: str
    script: str
    script_version: int | None = None
    script_digest: str | None = None
    path: str = Field(description="The job's directory, relative to the store root.")
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: float | None = None
    written_at: datetime
    report: JobReport
    evidence: dict[str, Evidence] = Field(
        default_factory=dict, description="Screenshot path (as in the report) -> evidence."
    )
    traces: list[str] = Field(default_factory=list, description="Playwright trace zips.")
    images: ImageBudget | None = None

    @property
    def failed_steps(self) -> list[StepReport]:
        return [s for s in self.report.steps if s.failure is not None]

    @property
    def references(self) -> list[str]:
        """What a reviewer may search for: ids the orchestrator and the customer know."""
        values = [self.job_id, *self.report.correlation.values()]
        values += [str(v) for v in self.report.inputs.values() if v != "***"]
        return values


def stand_in_record(report: JobReport, path: str) -> AuditRecord:
    """The audit record shown for a job whose `audit.json` was never written (the store
    failed between the report and the record, or rendering the evidence did): the report as
    the orchestrator was given it, with no annotated evidence — its screenshots are shown as
    captured. Never written anywhere: it stands in for the record on a page only."""
    written_at = report.ended_at or report.started_at or datetime.fromtimestamp(0, UTC)
    return record_of(report, path, written_at=written_at)


def record_of(report: JobReport, path: str, *, written_at: datetime, **more: Any) -> AuditRecord:
    """An audit record with what the job's report says of it; `more`: the other fields (the
    evidence, the traces, the image budget) where the store has them."""
    return AuditRecord(
        job_id=report.job_id,
        status=report.status,
        site=report.script.split("/", 1)[0],
        script=report.script,
        script_version=report.script_version,
        script_digest=report.script_digest,
        path=path,
        started_at=report.started_at,
        ended_at=report.ended_at,
        duration_ms=report.duration_ms,
        written_at=written_at,
        report=report,
        **more,
    )


def label_of(step: StepReport) -> str | None:
    if step.selector is None:
        return None
    return f"{step.selector.element} · {step.selector.candidate}"


def step_mark(step: StepReport) -> Mark:
    """What to draw on the step's own screenshot (its last attempt's)."""
    code = step.failure.code if step.failure else None
    box = step.selector.box if step.selector else None
    if code == FailureCode.selector_not_found:
        box = None
    return Mark(box=box, label=label_of(step), failure=code)


def screenshot_marks(report: JobReport) -> dict[str, Mark]:
    """Every screenshot the report names, with what to draw on it.

    The element's box belongs to the step's last attempt (the matched selector is the last
    one's); earlier attempts get their failure frame only. A box is not drawn when the last
    attempt failed to find its element: the selector then still holds an older match.
    """
    marks: dict[str, Mark] = {}
    for step in report.steps:
        for attempt in step.attempt_log:
            if attempt.screenshot:
                code = attempt.failure.code if attempt.failure else None
                marks[attempt.screenshot] = Mark(failure=code)
        if step.screenshot:
            marks[step.screenshot] = step_mark(step)
    extra = [
        report.would_submit.screenshot if report.would_submit else None,
        report.handoff.evidence.screenshot if report.handoff else None,
        *(c.screenshot for c in report.claims),
    ]
    for shot in extra:
        if shot and shot not in marks:
            marks[shot] = Mark()
    return marks
