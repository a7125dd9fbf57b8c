"""`formwork insights`: finished jobs turned into work items for whoever maintains the scripts.

Where the scripts break (the steps that fail most, and with which codes), where the sites
changed under them (selector drift: which element, which fallback saved it), where people had
to step in and what they decided, and where the time goes — each with the audit trail of a
recent example to open. `summarize` is a pure function of the reports; `load_reports` reads
the window's reports through the finished index (`JobStats.finished_since`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis

from worker.contract import JobReport, JobStatus, StepStatus
from worker.keys import Keys
from worker.stats import JobStats

log = logging.getLogger("formwork.insights")

PAUSE_ACTIONS = {"handoff", "ask_customer", "approval"}
INTAKE = "(intake)"  # a job rejected before any step ran


class FailingStep(BaseModel):
    script: str
    step_id: str
    failed_attempts: int = 0
    jobs_failed: int = Field(default=0, description="Jobs this step ended failed in.")
    codes: dict[str, int] = Field(default_factory=dict)
    example: str | None = Field(default=None, description="Audit trail of a recent job.")


class DriftHotspot(BaseModel):
    site: str
    element: str
    expected: str
    used: str
    count: int = 0
    example: str | None = None


class HandoffReason(BaseModel):
    script: str
    step_id: str
    code: str
    count: int = 0
    resolutions: dict[str, int] = Field(
        default_factory=dict,
        description="The decision taken, or `pending` (still waiting), `expired`, `none`.",
    )
    example: str | None = None


class StepTime(BaseModel):
    script: str
    step_id: str
    action: str
    runs: int
    median_ms: float
    p95_ms: float


class Insights(BaseModel):
    """`formwork insights --json`."""

    since: datetime
    until: datetime
    jobs: int
    statuses: dict[str, int]
    failing_steps: list[FailingStep]
    drift: list[DriftHotspot]
    handoffs: list[HandoffReason]
    step_times: list[StepTime]


def audit_trail(report: JobReport) -> str | None:
    """The path of a job's audit record (its report when there is none)."""
    artifacts = report.artifacts
    if artifacts is None:
        return None
    return str(Path(artifacts.root) / (artifacts.audit or artifacts.report))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def summarize(reports: list[JobReport], since: datetime, until: datetime) -> Insights:
    """Improvement signals from `reports` (newest first: examples are the most recent)."""
    failing: dict[tuple[str, str], FailingStep] = {}
    drift: dict[tuple[str, str, str], DriftHotspot] = {}
    handoffs: dict[tuple[str, str, str], HandoffReason] = {}
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for report in reports:
        example = audit_trail(report)
        script = report.script or "(unknown)"
        if report.status == JobStatus.rejected and report.error is not None:
            row = failing.setdefault((script, INTAKE), FailingStep(script=script, step_id=INTAKE))
            row.failed_attempts += 1
            row.jobs_failed += 1
            row.codes[report.error.code] = row.codes.get(report.error.code, 0) + 1
            row.example = row.example or example
        for step in report.steps:
            codes = [a.failure.code.value for a in step.attempt_log if a.failure is not None]
            if codes:
                row = failing.setdefault(
                    (script, step.id), FailingStep(script=script, step_id=step.id)
                )
                row.failed_attempts += len(codes)
                row.jobs_failed += step.status == StepStatus.failed
                for code in codes:
                    row.codes[code] = row.codes.get(code, 0) + 1
                row.example = row.example or example
            if step.drift is not None:
                site = script.split("/", 1)[0]
                key = (site, step.drift.element, step.drift.used)
                spot = drift.setdefault(
                    key,
                    DriftHotspot(
                        site=site,
                        element=step.drift.element,
                        expected=step.drift.expected,
                        used=step.drift.used,
                    ),
                )
                spot.count += 1
                spot.example = spot.example or example
            if step.status == StepStatus.succeeded and step.duration_ms is not None:
                times[(script, step.id, step.action)].append(step.duration_ms)
        for key, resolution in _pauses(report):
            reason = handoffs.setdefault(
                key, HandoffReason(script=key[0], step_id=key[1], code=key[2])
            )
            reason.count += 1
            reason.resolutions[resolution] = reason.resolutions.get(resolution, 0) + 1
            reason.example = reason.example or example
    return Insights(
        since=since,
        until=until,
        jobs=len(reports),
        statuses=dict(Counter(r.status.value for r in reports).most_common()),
        failing_steps=sorted(
            failing.values(), key=lambda f: (-f.failed_attempts, -f.jobs_failed, f.step_id)
        ),
        drift=sorted(drift.values(), key=lambda d: (-d.count, d.site, d.element)),
        handoffs=sorted(handoffs.values(), key=lambda h: (-h.count, h.script, h.step_id)),
        step_times=sorted(
            (
                StepTime(
                    script=script,
                    step_id=step_id,
                    action=action,
                    runs=len(ms),
                    median_ms=round(percentile(ms, 50), 1),
                    p95_ms=round(percentile(ms, 95), 1),
                )
                for (script, step_id, action), ms in times.items()
            ),
            key=lambda t: (-t.p95_ms, t.script, t.step_id),
        ),
    )


def _pauses(report: JobReport) -> list[tuple[tuple[str, str, str], str]]:
    """Each pause in the job's history — (script, step, code) — and how it was resolved."""
    script = report.script or "(unknown)"
    pauses = [r for r in report.rules_fired if r.action in PAUSE_ACTIONS]
    found: list[tuple[tuple[str, str, str], str]] = []
    for i, rule in enumerate(pauses):
        later = [p.at for p in pauses[i + 1 :] if p.step_id == rule.step_id]
        decision = next(
            (
                d
                for d in report.decisions
                if d.step_id == rule.step_id and d.at >= rule.at and (not later or d.at < later[0])
            ),
            None,
        )
        if decision is not None:
            resolution = decision.decision.value
        elif report.status.paused and not later:
            resolution = "pending"
        elif report.status == JobStatus.expired and not later:
            resolution = "expired"
        else:
            resolution = "none"
        found.append(((script, rule.step_id, rule.code.value), resolution))
    return found


async def load_reports(
    redis: Redis,
    keys: Keys,
    since: datetime,
    *,
    site: str | None = None,
    script: str | None = None,
    limit: int = 5000,
) -> list[JobReport]:
    """The reports of jobs settled since `since` (newest first), optionally of one site/script.
    A job whose record expired meanwhile is skipped."""
    ids = await JobStats(redis, keys).finished_since(since, limit)
    reports: list[JobReport] = []
    for start in range(0, len(ids), 500):
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids[start : start + 500]:
                pipe.hget(keys.job(job_id), "report")
            raws: list[Any] = await pipe.execute()
        for job_id, raw in zip(ids[start : start + 500], raws, strict=True):
            if raw is None:
                continue
            try:
                report = JobReport.model_validate_json(raw)
            except ValidationError:
                log.warning("job %s: stored report does not parse; skipped", job_id)
                continue
            name = report.script or ""
            if site is not None and name.split("/", 1)[0] != site:
                continue
            if script is not None and script not in (name, name.split("/", 1)[-1]):
                continue
            reports.append(report)
    return reports


# ---------------------------------------------------------------- text


def _table(heads: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + line.format(*heads).rstrip()] + ["  " + line.format(*r).rstrip() for r in rows]


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def render(insights: Insights, top: int = 10) -> str:
    span = f"{insights.since:%Y-%m-%d %H:%M} - {insights.until:%Y-%m-%d %H:%M} UTC"
    if not insights.jobs:
        return f"no jobs settled in {span}"
    out = [f"{insights.jobs} jobs settled {span}: {_pairs(insights.statuses)}"]

    def section(title: str, heads: list[str], rows: list[list[str]]) -> None:
        out.extend(["", title])
        out.extend(_table(heads, rows[:top]) if rows else ["  none"])

    section(
        "STEPS THAT FAIL MOST",
        ["script", "step", "failed attempts", "jobs failed", "codes", "example"],
        [
            [f.script, f.step_id, str(f.failed_attempts), str(f.jobs_failed), _pairs(f.codes),
             f.example or "-"]
            for f in insights.failing_steps
        ],
    )  # fmt: skip
    section(
        "SELECTOR DRIFT HOTSPOTS (the primary candidate no longer matches)",
        ["site", "element", "expected", "fallback used", "count", "example"],
        [
            [d.site, d.element, d.expected, d.used, str(d.count), d.example or "-"]
            for d in insights.drift
        ],
    )
    section(
        "HANDOFFS (why people were asked, and what they decided)",
        ["script", "step", "code", "count", "resolved by", "example"],
        [
            [h.script, h.step_id, h.code, str(h.count), _pairs(h.resolutions), h.example or "-"]
            for h in insights.handoffs
        ],
    )
    section(
        "TIME PER STEP (succeeded steps, slowest p95 first)",
        ["script", "step", "action", "runs", "median", "p95"],
        [
            [t.script, t.step_id, t.action, str(t.runs), f"{t.median_ms:.0f} ms",
             f"{t.p95_ms:.0f} ms"]
            for t in insights.step_times
        ],
    )  # fmt: skip
    return "\n".join(out)
