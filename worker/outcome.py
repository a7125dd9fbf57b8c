"""What one settling of a job adds to the counts: a pure function of its report.

A job settles once per run — it ends, or pauses for a person and later runs again from the
report it left. The report accumulates across runs (rules fired, decisions, steps), so a run's
share is what happened after the job last settled (`since`). Prometheus (`worker/metrics.py`)
and the hourly rollups (`worker/stats.py`) both count `JobOutcome`s, so they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from worker.contract import (
    SCRIPT_REF,
    FailureCode,
    JobReport,
    JobStatus,
    RuleFired,
    StepReport,
)

# A rejection may name a script that does not exist: such a name is never a label of its own,
# or any sender could mint metric series at will. Without a way to tell (`known`), the
# rejections that may name one are these.
_UNTRUSTED_NAME = {FailureCode.script_not_found, FailureCode.job_invalid}
UNKNOWN_SCRIPT = "(unknown)"


@dataclass
class JobOutcome:
    """One run's contribution to the activity and quality counts."""

    site: str
    script: str
    version: str  # "" when no script version was loaded (rejected at intake)
    status: JobStatus
    started: bool  # the run did browser work
    rules: list[tuple[str, str]] = field(default_factory=list)  # (action, failure code)
    step_times: list[tuple[str, float]] = field(default_factory=list)  # (action, seconds)
    drift: list[tuple[str, str]] = field(default_factory=list)  # (element, candidate used)
    handoff: str | None = None  # the failure code a pause is for
    claims: list[tuple[str, bool]] = field(default_factory=list)  # (how, verified)
    unknown: list[str] = field(default_factory=list)  # how each outcome_unknown was resolved

    @property
    def scope(self) -> str:
        return f"{self.script}@{self.version}" if self.version else self.script


def script_label(report: JobReport, known: Callable[[str], bool] | None = None) -> str:
    """The `script` label of `report`. A rejected job's is the script it names when `known`
    says that script exists (whatever it was refused for: inputs, site_url, a duplicate…),
    else `(unknown)`; without `known`, every rejection that may name a missing script is."""
    if report.status != JobStatus.rejected:
        return report.script or UNKNOWN_SCRIPT
    if known is None:
        untrusted = report.error is None or report.error.code in _UNTRUSTED_NAME
        return UNKNOWN_SCRIPT if untrusted else report.script or UNKNOWN_SCRIPT
    # Refused before it was parsed, a job's script is whatever the payload held (a version
    # pin included): only a well-formed name is looked up.
    ref = SCRIPT_REF.match(report.script)
    return ref["name"] if ref is not None and known(ref["name"]) else UNKNOWN_SCRIPT


def outcome_of(
    report: JobReport,
    since: datetime | None = None,
    *,
    known: Callable[[str], bool] | None = None,
) -> JobOutcome:
    """What `report` adds, counting only what happened after `since` (the job's last settling).
    `known(name)`: whether the script `name` exists (`script_label`)."""

    def new(at: datetime | None) -> bool:
        return since is None or (at is not None and at > since)

    script = script_label(report, known)
    site = script.split("/", 1)[0] if "/" in script else script
    rules = [r for r in report.rules_fired if new(r.at)]
    steps = [s for s in report.steps if new(s.ended_at)]
    return JobOutcome(
        site=site,
        script=script,
        version=str(report.script_version) if report.script_version is not None else "",
        status=report.status,
        started=any(new(a.started_at) for s in report.steps for a in s.attempt_log),
        rules=[(r.action, r.code.value) for r in rules],
        step_times=[(s.action, t) for s in steps if (t := _run_time(s, new)) is not None],
        drift=[(s.drift.element, s.drift.used) for s in steps if s.drift is not None],
        handoff=report.handoff.code.value
        if report.status.paused and report.handoff is not None
        else None,
        # Claims are settled only when the job is: a paused job's may still change.
        claims=[(c.how.value, c.verified) for c in report.claims] if report.status.terminal else [],
        unknown=list(_resolutions(report, rules, since)),
    )


def _run_time(step: StepReport, new: Callable[[datetime | None], bool]) -> float | None:
    """Seconds `step` took in this run: its attempts since the job last settled (a step redone
    after a pause keeps the earlier run's attempts, already counted then), waits included."""
    if step.duration_ms is None:
        return None
    attempts = [a for a in step.attempt_log if new(a.started_at)]
    if len(attempts) == len(step.attempt_log):
        return step.duration_ms / 1000
    return sum(a.duration_ms + (a.wait_ms or 0) for a in attempts) / 1000


def _resolutions(
    report: JobReport, rules: list[RuleFired], since: datetime | None
) -> Iterator[str]:
    """How each `outcome_unknown` of this run was resolved: `probe_present`, `probe_absent`
    (the commit was redone), `handoff`; and a person's decision about a job paused on one
    (`mark_done`, `retry_step`, `abort`…)."""
    unknown = [r for r in rules if r.code == FailureCode.outcome_unknown]
    consumed: set[int] = set()
    for i, rule in enumerate(unknown):
        if i in consumed:
            continue
        if rule.action == "verify_effect":
            after = next(
                (j for j in range(i + 1, len(unknown)) if unknown[j].step_id == rule.step_id),
                None,
            )
            then = unknown[after].action if after is not None else None
            if after is not None and then in ("retry_from", "handoff"):
                consumed.add(after)
            resolved = {"retry_from": "probe_absent", "handoff": "handoff"}
            yield resolved.get(then or "", "probe_present")
        elif rule.action == "handoff":
            yield "handoff"
    for decision in report.decisions:
        if since is not None and decision.at <= since:
            continue
        paused_on = [
            r
            for r in report.rules_fired
            if r.step_id == decision.step_id and r.action == "handoff" and r.at <= decision.at
        ]
        if paused_on and paused_on[-1].code == FailureCode.outcome_unknown:
            yield decision.decision.value
