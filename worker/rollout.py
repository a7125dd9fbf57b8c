"""Canary rollout: which version of a script an unpinned job runs, and when a canary goes back.

A rollout file beside the script is the desired configuration —
`scripts/billing/issue_credit.rollout.yaml`:

    stable: 1          # the version unpinned jobs run
    canary: 2          # optional: the version being tried out
    percent: 10        # the share of unpinned jobs that run the canary
    margin: 0.05       # roll back when the canary's system-failure rate exceeds stable's by this
    min_sample: 20     # ... once the canary has at least this many outcomes

A job pinned to a version (`billing/issue_credit@2`) runs that version. An unpinned job is
routed by a hash of its job id, so the same job always lands in the same arm; the queue also
keeps the chosen route in the job's record, so a retried or resumed job runs the version it
started on even when the rollout changed meanwhile. Without a rollout file the highest version
is the stable one.

Outcomes are counted per script version in Redis. A **system failure** — the browser, the
page or the script did not do what was expected (`SYSTEM_FAILURES`) — counts against the
version; a **business outcome** (the site refused a value, an approver said no, the job was
cancelled, expired or rejected at intake) says nothing about the version and is counted apart.
Rate = system failures / (successes + system failures).

When the canary's rate exceeds stable's by more than `margin` over at least `min_sample`
canary outcomes, the worker that counted the deciding outcome rolls the canary back: a rollout
state in Redis (`Keys.rollout`) that overrides the file for that canary version — unpinned jobs
all go to stable — until an operator promotes the canary or resets the rollout; a `rollout`
event goes onto the global events stream. `formwork rollout status|promote|rollback|reset`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import cast

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator
from redis.asyncio import Redis

from worker.contract import (
    BrowserJob,
    EventKind,
    FailureCode,
    JobEvent,
    JobReport,
    JobStatus,
    RolloutAction,
    RolloutChange,
    Routing,
)
from worker.errors import ScriptInvalid, ScriptNotFound
from worker.events import announce
from worker.keys import Keys
from worker.script import ROLLOUT_SUFFIX, ScriptStore
from worker.yamlfile import At, line_of, load_model, read_text, read_yaml

# What counts against a script version: the worker, the browser or the page did not do what
# the script expected. Every other code is a business outcome or a refusal at intake (see
# NOT_AGAINST_THE_VERSION); a test keeps the two sets a partition of FailureCode.
SYSTEM_FAILURES = frozenset(
    {
        FailureCode.timeout,
        FailureCode.network_error,
        FailureCode.server_error,
        FailureCode.browser_crashed,
        FailureCode.selector_not_found,
        FailureCode.expectation_failed,
        FailureCode.navigation_failed,
        FailureCode.navigation_blocked,
        FailureCode.auth_expired,
        FailureCode.unexpected_page,
        FailureCode.outcome_unknown,
        FailureCode.script_error,
    }
)
NOT_AGAINST_THE_VERSION = frozenset(
    {
        # Business outcomes: the script did its job; the answer was no, or not yet.
        FailureCode.validation_rejected,
        FailureCode.approval_required,
        FailureCode.rejected_by_approver,
        FailureCode.cancelled,
        # Refused at intake, before any version ran.
        FailureCode.job_invalid,
        FailureCode.script_invalid,
        FailureCode.script_not_found,
        FailureCode.input_invalid,
        FailureCode.secret_missing,
        # The artifact store failed; the job's outcome stands.
        FailureCode.storage_error,
        # The site refused the worker's credentials: a secret to fix, whatever the version.
        FailureCode.credentials_rejected,
    }
)
# Settled, but by a person, the customer or the clock — never a verdict on the version.
_BUSINESS_STATUSES = frozenset(
    {
        JobStatus.rejected,
        JobStatus.cancelled,
        JobStatus.needs_customer_input,
        JobStatus.rejected_by_approver,
        JobStatus.expired,
    }
)


class Verdict(StrEnum):
    succeeded = "succeeded"
    system_failure = "system_failure"
    business = "business"


def verdict(report: JobReport) -> Verdict | None:
    """What a settled report says about the version that ran; None while there is no verdict
    yet (running, or waiting at an approval gate)."""
    if report.status == JobStatus.succeeded:
        return Verdict.succeeded
    if not report.status.settled or report.status == JobStatus.awaiting_approval:
        return None
    if report.status in _BUSINESS_STATUSES:
        return Verdict.business
    code = report.error.code if report.error is not None else None
    return Verdict.system_failure if code in SYSTEM_FAILURES else Verdict.business


# ---------------------------------------------------------------- configuration


class RolloutConfig(BaseModel):
    """A script's rollout file: the desired split between its stable and canary versions."""

    # YAML reads `.nan` and `.inf` as floats: a NaN share passed every range check's message
    # as "should be <= 100" and would split nothing sensibly.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Strict, like a script's `version:`: `stable: "1"` is refused in both places.
    stable: StrictInt = Field(ge=1, description="The version unpinned jobs run.")
    canary: StrictInt | None = Field(default=None, ge=1, description="The version being tried out.")
    percent: StrictFloat = Field(
        default=0, ge=0, le=100, description="Share of unpinned jobs that run the canary."
    )
    margin: StrictFloat = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Roll back when the canary's system-failure rate exceeds stable's by more.",
    )
    min_sample: StrictInt = Field(
        default=20, ge=1, description="Canary outcomes needed before a rollback can fire."
    )

    @model_validator(mode="after")
    def _canary(self) -> RolloutConfig:
        # Said at the field's own line (At), as every other error in the file is.
        if self.canary == self.stable:
            raise At(("canary",), "must differ from 'stable'")
        if self.canary is None and self.percent:
            raise At(("percent",), "needs a 'canary'")
        if self.canary is not None and not self.percent:
            field = "percent" if "percent" in self.model_fields_set else "canary"
            raise At((field,), "'canary' needs a 'percent' above 0: without one no job runs it")
        return self


def rollout_path(scripts_dir: Path, name: str) -> Path:
    site, _, short = name.partition("/")
    return scripts_dir / site / f"{short}{ROLLOUT_SUFFIX}"


# Parsed rollout files by path, with the text they were parsed from: every unpinned job is
# routed by its script's file (and every outcome judged by it), and parsing the YAML each time
# was most of routing's cost. Keyed by content, not modification time: two edits within one
# tick of the file system's clock must not leave the first in force.
_parsed: dict[Path, tuple[str, RolloutConfig]] = {}


def load_rollout(scripts: ScriptStore, name: str) -> RolloutConfig | None:
    """The script's rollout file, checked against the versions that exist; None without one."""
    path = rollout_path(scripts.scripts_dir, name)
    if not path.is_file():
        return None
    text = read_text(path)
    cached = _parsed.get(path)
    if cached is not None and cached[0] == text:
        config = cached[1]
    else:
        config = load_model(path, RolloutConfig, text)
        _parsed[path] = (text, config)
    versions = scripts.versions(name)
    for role, version in (("stable", config.stable), ("canary", config.canary)):
        if version is not None and version not in versions:
            known = ", ".join(str(v) for v in sorted(versions)) or "none"
            line = line_of(read_yaml(path, text)[1], (role,))
            raise ScriptInvalid(
                f"{path}:{line}: {role}: {name} has no version {version} (available: {known})"
            )
    return config


def refuse_subflow(path: Path, name: str, subflows: dict[str, str]) -> None:
    """A rollout file only routes jobs that name its script. A sub-flow runs inside other
    scripts, where `use:` (and a registry's login_flow) take its highest version or the
    pinned one: its canary would never run there, and nothing would say so."""
    why = subflows.get(name)
    if why is not None:
        raise ScriptInvalid(
            f"{path}: {name} is a sub-flow ({why}), which runs its highest or pinned version, "
            "never the rollout's: roll out the scripts that use it (pin it with `use: "
            f"{name}@N` in a new version of each)"
        )


class RolloutOverride(BaseModel):
    """Rollout state kept in Redis: overrides the file for one canary version until reset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: RolloutAction
    canary: int
    reason: str
    by: str
    at: datetime
    job_id: str | None = Field(default=None, description="The outcome that tipped a rollback.")


@dataclass(frozen=True)
class Split:
    """Where unpinned jobs go now: the file, with the Redis override applied."""

    stable: int
    canary: int | None
    percent: float


def effective(config: RolloutConfig, override: RolloutOverride | None) -> Split:
    if config.canary is None or override is None or override.canary != config.canary:
        return Split(config.stable, config.canary, config.percent if config.canary else 0)
    if override.action == RolloutAction.promoted:
        return Split(config.canary, None, 0)
    return Split(config.stable, None, 0)


# ---------------------------------------------------------------- routing (pure)


@dataclass(frozen=True)
class Route:
    version: int
    routing: Routing

    def encode(self) -> str:
        return f"{self.version}:{self.routing}"

    @classmethod
    def decode(cls, raw: str) -> Route:
        version, _, routing = raw.partition(":")
        return cls(int(version), Routing(routing))


def bucket(name: str, job_id: str) -> float:
    """Where a job falls in [0, 100): the same job id always falls in the same place."""
    digest = hashlib.sha256(f"{name}\n{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def choose(name: str, job_id: str, split: Split) -> Route:
    if split.canary is not None and bucket(name, job_id) < split.percent:
        return Route(split.canary, Routing.canary)
    return Route(split.stable, Routing.stable)


def stable_version(scripts: ScriptStore, name: str) -> int:
    """The version every unpinned job runs but a canary's share: the rollout file's stable,
    or without one the highest."""
    config = load_rollout(scripts, name)
    if config is not None:
        return config.stable
    versions = scripts.versions(name)
    if not versions:
        raise ScriptNotFound(f"no script {name!r} under {scripts.scripts_dir}", field="script")
    return max(versions)


def file_route(job: BrowserJob, scripts: ScriptStore, override: RolloutOverride | None) -> Route:
    """The route of `job` from its script's rollout file (and the override, if any)."""
    if job.script_version is not None:
        return Route(job.script_version, Routing.pinned)
    config = load_rollout(scripts, job.script_name)
    if config is None:
        versions = scripts.versions(job.script_name)
        if not versions:
            raise ScriptNotFound(
                f"no script {job.script_name!r} under {scripts.scripts_dir}", field="script"
            )
        return Route(max(versions), Routing.stable)
    return choose(job.script_name, job.job_id, effective(config, override))


async def route(
    job: BrowserJob,
    scripts: ScriptStore,
    rollouts: Rollouts | None,
    earlier: JobReport | None = None,
) -> Route:
    """The version `job` runs and how it was chosen. A job going on after a pause or an
    interruption keeps the version its report says it started on."""
    if earlier is not None and earlier.script_version is not None and earlier.routing:
        return Route(earlier.script_version, earlier.routing)
    if rollouts is not None:
        return await rollouts.route(job)
    return file_route(job, scripts, None)


# ---------------------------------------------------------------- rollback decision (pure)


@dataclass(frozen=True)
class Counts:
    succeeded: int = 0
    system_failure: int = 0
    business: int = 0

    @property
    def sample(self) -> int:
        return self.succeeded + self.system_failure

    @property
    def rate(self) -> float:
        return self.system_failure / self.sample if self.sample else 0.0

    @classmethod
    def of(cls, raw: dict[bytes, bytes]) -> Counts:
        def get(name: str) -> int:
            return int(raw.get(name.encode(), b"0"))

        return cls(get("succeeded"), get("system_failure"), get("business"))


def rollback_reason(stable: Counts, canary: Counts, config: RolloutConfig) -> str | None:
    """Why the canary must go back, or None while it holds up (or has too few outcomes)."""
    if canary.sample < config.min_sample:
        return None
    if canary.rate <= stable.rate + config.margin:
        return None
    return (
        f"canary v{config.canary} system-failure rate {canary.rate:.1%} "
        f"({canary.system_failure}/{canary.sample}) exceeds stable v{config.stable}'s "
        f"{stable.rate:.1%} ({stable.system_failure}/{stable.sample}) by more than "
        f"{config.margin:.1%}"
    )


# ---------------------------------------------------------------- the Redis shell


class RolloutStatus(BaseModel):
    """What `formwork rollout status` shows for one script."""

    script: str
    config: RolloutConfig | None
    override: RolloutOverride | None
    stable: int
    canary: int | None
    percent: float
    counts: dict[int, dict[str, int]] = Field(description="Version -> outcome counters.")


class Rollouts:
    """Routes unpinned jobs, counts outcomes per version, rolls canaries back — on Redis."""

    def __init__(self, redis: Redis, keys: Keys, scripts: ScriptStore) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts

    async def override(self, name: str, config: RolloutConfig | None) -> RolloutOverride | None:
        if config is None or config.canary is None:
            return None
        raw = await cast(
            "Awaitable[bytes | None]", self.redis.hget(self.keys.rollout(name), str(config.canary))
        )
        return RolloutOverride.model_validate_json(raw) if raw is not None else None

    async def route(self, job: BrowserJob) -> Route:
        if job.script_version is not None:
            return Route(job.script_version, Routing.pinned)
        record = self.keys.job(job.job_id)
        kept = await cast("Awaitable[bytes | None]", self.redis.hget(record, "route"))
        if kept is not None:
            return Route.decode(kept.decode())
        config = load_rollout(self.scripts, job.script_name)
        chosen = file_route(job, self.scripts, await self.override(job.script_name, config))
        await cast("Awaitable[int]", self.redis.hset(record, "route", chosen.encode()))
        return chosen

    async def counts(self, name: str, version: int) -> dict[str, int]:
        raw = await cast(
            "Awaitable[dict[bytes, bytes]]",
            self.redis.hgetall(self.keys.rollout_outcomes(name, version)),
        )
        return {k.decode(): int(v) for k, v in sorted(raw.items())}

    async def record(self, report: JobReport) -> RolloutChange | None:
        """Count a settled job's outcome against the version it ran (once per job); roll the
        canary back when this outcome tips it. Returns the rollback, if this caused one."""
        name, version = report.script, report.script_version
        record = self.keys.job(report.job_id)
        if report.routing is None or version is None:
            # A report the worker wrote without the run's (the job timeout): the route the job
            # was given, if it got that far.
            kept = await cast("Awaitable[bytes | None]", self.redis.hget(record, "route"))
            if kept is None:
                return None
            version = Route.decode(kept.decode()).version
        found = verdict(report)
        if found is None:
            return None
        if not await cast("Awaitable[int]", self.redis.hsetnx(record, "counted", str(found))):
            return None  # counted when it first settled (a pause), not again at its end
        async with self.redis.pipeline(transaction=True) as pipe:
            outcomes = self.keys.rollout_outcomes(name, version)
            pipe.hincrby(outcomes, str(found), 1)
            if found == Verdict.system_failure and report.error is not None:
                pipe.hincrby(outcomes, f"code:{report.error.code}", 1)
            await pipe.execute()
        return await self._check(name, report.job_id)

    async def _check(self, name: str, job_id: str) -> RolloutChange | None:
        try:
            config = load_rollout(self.scripts, name)
        except ScriptInvalid:
            return None  # a broken rollout file routes nothing (intake rejects); nothing to judge
        if config is None or config.canary is None:
            return None
        if await self.override(name, config) is not None:
            return None
        stable = Counts.of(await self._raw(name, config.stable))
        canary = Counts.of(await self._raw(name, config.canary))
        reason = rollback_reason(stable, canary, config)
        if reason is None:
            return None
        return await self._set(
            name, config, RolloutAction.rolled_back, reason, "worker", job_id=job_id, first=True
        )

    async def _raw(self, name: str, version: int) -> dict[bytes, bytes]:
        key = self.keys.rollout_outcomes(name, version)
        return await cast("Awaitable[dict[bytes, bytes]]", self.redis.hgetall(key))

    async def _set(
        self,
        name: str,
        config: RolloutConfig,
        action: RolloutAction,
        reason: str,
        by: str,
        *,
        job_id: str | None = None,
        first: bool = False,
    ) -> RolloutChange | None:
        assert config.canary is not None
        override = RolloutOverride(
            action=action, canary=config.canary, reason=reason, by=by, at=datetime.now(UTC),
            job_id=job_id,
        )  # fmt: skip
        key, field, value = self.keys.rollout(name), str(config.canary), override.model_dump_json()
        if first:
            # Several workers may count the deciding outcome at once: one rolls back, once.
            if not await cast("Awaitable[int]", self.redis.hsetnx(key, field, value)):
                return None
        else:
            await cast("Awaitable[int]", self.redis.hset(key, field, value))
        split = effective(config, override)
        change = RolloutChange(
            script=name, action=action, stable=split.stable, canary=config.canary, reason=reason,
            by=by,
        )  # fmt: skip
        await self._announce(change, job_id)
        return change

    async def _announce(self, change: RolloutChange, job_id: str | None) -> None:
        event = JobEvent(
            seq=0, job_id=job_id or "-", kind=EventKind.rollout, status=change.action,
            at=datetime.now(UTC), message=f"{change.script}: {change.action}: {change.reason}",
            rollout=change,
        )  # fmt: skip
        await announce(self.redis, self.keys, event)

    def _config(self, name: str) -> RolloutConfig:
        config = load_rollout(self.scripts, name)
        if config is None:
            raise ScriptNotFound(f"{name} has no rollout file ({ROLLOUT_SUFFIX})", field="script")
        return config

    async def status(self, name: str) -> RolloutStatus:
        config = load_rollout(self.scripts, name)
        override = await self.override(name, config)
        if config is None:
            versions = self.scripts.versions(name)
            if not versions:
                raise ScriptNotFound(f"no script {name!r}", field="script")
            split = Split(max(versions), None, 0)
        else:
            split = effective(config, override)
        shown = {split.stable} | ({config.stable, config.canary} if config else set())
        counts = {v: await self.counts(name, v) for v in sorted(x for x in shown if x)}
        return RolloutStatus(
            script=name, config=config, override=override, stable=split.stable,
            canary=split.canary, percent=split.percent, counts=counts,
        )  # fmt: skip

    async def promote(self, name: str, by: str, reason: str) -> RolloutChange:
        """The canary becomes stable for every unpinned job (until the file says otherwise)."""
        return await self._operator(name, RolloutAction.promoted, by, reason)

    async def rollback(self, name: str, by: str, reason: str) -> RolloutChange:
        """Every unpinned job goes to stable; the canary gets none until reset."""
        return await self._operator(name, RolloutAction.rolled_back, by, reason)

    async def _operator(
        self, name: str, action: RolloutAction, by: str, reason: str
    ) -> RolloutChange:
        config = self._config(name)
        if config.canary is None:
            verb = "promote" if action == RolloutAction.promoted else "roll back"
            raise ScriptInvalid(f"{name}: the rollout file names no canary to {verb}")
        change = await self._set(name, config, action, reason, by)
        assert change is not None
        return change

    async def reset(self, name: str, by: str) -> RolloutChange:
        """Back to the rollout file, with fresh outcome counters for its versions."""
        config = self._config(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.rollout(name))
            for version in (config.stable, config.canary):
                if version is not None:
                    pipe.delete(self.keys.rollout_outcomes(name, version))
            await pipe.execute()
        change = RolloutChange(
            script=name, action=RolloutAction.reset, stable=config.stable, canary=config.canary,
            reason="back to the rollout file; outcome counters cleared", by=by,
        )  # fmt: skip
        await self._announce(change, None)
        return change


def rollout_files(scripts_dir: Path) -> list[Path]:
    """Every script's rollout file (one named for a version is `misplaced`: nothing reads it)."""
    return sorted(p for p in scripts_dir.glob(f"*/*{ROLLOUT_SUFFIX}") if "@" not in p.name)


def script_of(path: Path) -> str:
    """`billing/issue_credit` for `scripts/billing/issue_credit.rollout.yaml`."""
    return f"{path.parent.name}/{path.name.removesuffix(ROLLOUT_SUFFIX)}"


def describe(status: RolloutStatus) -> list[str]:
    """Lines for `formwork rollout status`."""
    lines = [f"{status.script}"]
    config = status.config
    if config is None:
        lines.append(f"  no rollout file: every unpinned job runs v{status.stable}")
    else:
        canary = f", canary v{config.canary} at {config.percent:g}%" if config.canary else ""
        lines.append(
            f"  file:     stable v{config.stable}{canary} "
            f"(rollback margin {config.margin:.1%}, min sample {config.min_sample})"
        )
    if status.override is not None:
        o = status.override
        lines.append(
            f"  state:    v{o.canary} {o.action} by {o.by} at {o.at:%Y-%m-%d %H:%M:%S}Z: {o.reason}"
        )
    now = f"stable v{status.stable}"
    if status.canary is not None:
        now += f", canary v{status.canary} at {status.percent:g}%"
    lines.append(f"  routing:  {now}")
    for version, counts in status.counts.items():
        c = Counts.of({k.encode(): str(v).encode() for k, v in counts.items()})
        codes = ", ".join(f"{k[5:]} {v}" for k, v in counts.items() if k.startswith("code:"))
        lines.append(
            f"  v{version}: {c.succeeded} succeeded, {c.system_failure} system failures "
            f"({c.rate:.1%}), {c.business} business outcomes" + (f" [{codes}]" if codes else "")
        )
    return lines
