"""Hourly rollups of finished jobs in Redis, and the `formwork stats` summary read from them.

Every time a job settles (ends, or pauses for a person) the worker that settled it adds its
`JobOutcome` to the hash of that hour (`<prefix>:stats:<YYYYMMDDHH>`, kept 8 days) and records
the job in the finished index (`<prefix>:finished`, job id scored by when it settled). The
index makes the counting exactly-once per settling: a report delivered again (a re-enqueue, an
expiry that a decision beat) has the same end time, and is not counted twice.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from worker.contract import JobStatus
from worker.keys import RECORD_TTL_S, STATS_TTL_S, Keys
from worker.outcome import JobOutcome

HOUR = "%Y%m%d%H"
PAUSED = {s.value for s in JobStatus if s.paused}


def rollup_fields(outcome: JobOutcome) -> Counter[str]:
    """The hash fields (`<metric>|<script@version>|<label>`) an outcome increments."""
    scope, fields = outcome.scope, Counter[str]()
    fields[f"jobs|{scope}|{outcome.status.value}"] += 1
    if outcome.started:
        fields[f"started|{scope}|"] += 1
    for action, _code in outcome.rules:
        fields[f"rule|{scope}|{action}"] += 1
    for action, seconds in outcome.step_times:
        fields[f"steps|{scope}|{action}"] += 1
        fields[f"step_ms|{scope}|{action}"] += round(seconds * 1000)
    for element, _used in outcome.drift:
        fields[f"drift|{scope}|{element}"] += 1
    if outcome.handoff is not None:
        fields[f"handoff|{scope}|{outcome.handoff}"] += 1
    for how, verified in outcome.claims:
        fields[f"claim|{scope}|{how if verified else 'unverified'}"] += 1
    for resolution in outcome.unknown:
        fields[f"unknown|{scope}|{resolution}"] += 1
    return fields


class ScriptStats(BaseModel):
    """One script version's counts over the window."""

    jobs: dict[str, int] = Field(default_factory=dict, description="Settlings by status.")
    started: int = 0
    rules: dict[str, int] = Field(default_factory=dict, description="Rules fired by action.")
    steps: dict[str, int] = Field(default_factory=dict, description="Steps run by action.")
    step_ms: dict[str, int] = Field(default_factory=dict, description="Their total ms by action.")
    drift: dict[str, int] = Field(default_factory=dict, description="Fallbacks used by element.")
    handoffs: dict[str, int] = Field(default_factory=dict, description="Pauses by failure code.")
    claims: dict[str, int] = Field(
        default_factory=dict, description="Claims by how verified (or `unverified`)."
    )
    outcome_unknown: dict[str, int] = Field(
        default_factory=dict, description="outcome_unknown resolutions by how."
    )

    @property
    def settled(self) -> int:
        return sum(self.jobs.values())

    @property
    def paused(self) -> int:
        return sum(n for s, n in self.jobs.items() if s in PAUSED)


class Stats(BaseModel):
    """`formwork stats --json`: the summary of the hourly buckets covering a window."""

    since: datetime = Field(description="Start of the first hourly bucket read.")
    until: datetime
    scripts: dict[str, ScriptStats] = Field(default_factory=dict)

    def total(self) -> ScriptStats:
        total = ScriptStats()
        for one in self.scripts.values():
            for name in ScriptStats.model_fields:
                mine, theirs = getattr(total, name), getattr(one, name)
                if isinstance(mine, dict):
                    for key, n in theirs.items():
                        mine[key] = mine.get(key, 0) + n
                else:
                    setattr(total, name, mine + theirs)
        return total


_SECTION = {
    "jobs": "jobs",
    "rule": "rules",
    "steps": "steps",
    "step_ms": "step_ms",
    "drift": "drift",
    "handoff": "handoffs",
    "claim": "claims",
    "unknown": "outcome_unknown",
}


def summarize(buckets: list[dict[bytes, bytes]], since: datetime, until: datetime) -> Stats:
    stats = Stats(since=since, until=until)
    for bucket in buckets:
        for raw, value in bucket.items():
            metric, scope, label = raw.decode().split("|", 2)
            one = stats.scripts.setdefault(scope, ScriptStats())
            if metric == "started":
                one.started += int(value)
            elif metric in _SECTION:
                counts: dict[str, int] = getattr(one, _SECTION[metric])
                counts[label] = counts.get(label, 0) + int(value)
    return stats


class JobStats:
    """The finished index and the hourly rollups of one deployment (key prefix)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def settle_once(self, job_id: str, at: datetime) -> tuple[bool, datetime | None]:
        """Record that `job_id` settled at `at`. (first time for this settling?, when the job
        settled before: only what happened after that is this settling's to count)."""
        at_ms = int(at.timestamp() * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zscore(self.keys.finished, job_id)
            pipe.zadd(self.keys.finished, {job_id: at_ms}, gt=True, ch=True)
            cutoff = at_ms - RECORD_TTL_S * 1000
            pipe.zremrangebyscore(self.keys.finished, "-inf", f"({cutoff}")
            before, changed, _ = await pipe.execute()
        since = datetime.fromtimestamp(before / 1000, UTC) if before is not None else None
        return bool(changed), since

    async def add(self, outcome: JobOutcome, at: datetime) -> None:
        key = self.keys.stats_hour(at.astimezone(UTC).strftime(HOUR))
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, n in rollup_fields(outcome).items():
                pipe.hincrby(key, name, n)
            pipe.expire(key, STATS_TTL_S)
            await pipe.execute()

    async def read(self, last: timedelta, now: datetime | None = None) -> Stats:
        """The buckets of every hour that overlaps the last `last` (so up to an hour more)."""
        until = now or datetime.now(UTC)
        first = (until - last).replace(minute=0, second=0, microsecond=0)
        hours: list[str] = []
        hour = first
        while hour <= until:
            hours.append(hour.strftime(HOUR))
            hour += timedelta(hours=1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in hours:
                pipe.hgetall(self.keys.stats_hour(name))
            buckets = cast("list[dict[bytes, bytes]]", await pipe.execute())
        return summarize(buckets, first, until)

    async def finished_since(self, since: datetime, limit: int = 5000) -> list[str]:
        """Ids of jobs that settled after `since`, newest first, at most `limit`."""
        ids = await cast(
            "Any",
            self.redis.zrevrangebyscore(
                self.keys.finished, "+inf", int(since.timestamp() * 1000), start=0, num=limit
            ),
        )
        return [i.decode() for i in ids]


# ---------------------------------------------------------------- the table


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def _grid(heads: list[str], rows: list[list[str]]) -> list[str]:
    """The first column left-aligned, the numbers right-aligned, each column as wide as it needs."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]

    def line(cells: list[str]) -> str:
        first, rest = cells[0], cells[1:]
        return "  " + "  ".join(
            [first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        )

    return [line(heads)] + [line(r) for r in rows]


def render(stats: Stats) -> str:
    """Activity and quality, one row per script version and a total."""
    # The end's date too when the window spans days: "09:00 - 10:47" alone reads as hours.
    end = "%H:%M" if stats.since.date() == stats.until.date() else "%Y-%m-%d %H:%M"
    span = f"{stats.since:%Y-%m-%d %H:%M} - {stats.until.strftime(end)} UTC"
    if not stats.scripts:
        return f"no jobs settled in {span}"
    rows = sorted(stats.scripts.items())
    if len(rows) > 1:
        rows.append(("total", stats.total()))
    activity, quality = [], []
    for scope, one in rows:
        steps, ms = sum(one.steps.values()), sum(one.step_ms.values())
        counts = [
            one.started,
            one.jobs.get("succeeded", 0),
            one.jobs.get("failed", 0),
            one.jobs.get("rejected", 0) + one.jobs.get("rejected_by_approver", 0),
            one.paused,
            one.jobs.get("expired", 0),
            one.jobs.get("cancelled", 0),
            one.rules.get("retry", 0),
            one.rules.get("alternate", 0),
            one.rules.get("relogin", 0),
            steps,
        ]
        avg = f"{ms / steps / 1000:.2f}s" if steps else "-"
        activity.append([scope, *map(str, counts), avg])
        verified = sum(n for how, n in one.claims.items() if how != "unverified")
        handoffs = sum(one.handoffs.values())
        rate = f"{handoffs / one.settled:.0%}" if one.settled else "-"
        counts = [verified, one.claims.get("unverified", 0), sum(one.drift.values()), handoffs]
        quality.append([scope, *map(str, counts), rate])
    out = [f"jobs settled {span}", "", "ACTIVITY"]
    out += _grid(
        ["script", "started", "succeeded", "failed", "rejected", "paused", "expired",
         "cancelled", "retries", "alternates", "relogins", "steps", "avg step"],
        activity,
    )  # fmt: skip
    out += ["", "QUALITY"]
    out += _grid(["script", "verified", "unverified", "drift", "handoffs", "handoff rate"], quality)
    for scope, one in rows:
        if scope == "total" or not (one.claims or one.drift or one.handoffs or one.outcome_unknown):
            continue
        out += ["", f"  {scope}"]
        out.append(f"    claims verified by: {_pairs(one.claims)}")
        out.append(f"    drift by element:   {_pairs(one.drift)}")
        out.append(f"    handoffs by code:   {_pairs(one.handoffs)}")
        out.append(f"    outcome_unknown:    {_pairs(one.outcome_unknown)}")
    return "\n".join(out)


def parse_window(text: str) -> timedelta:
    """`30m`, `1h`, `7d`, `2w` -> a timedelta."""
    units = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    number, unit = text.strip()[:-1], text.strip()[-1:]
    # ASCII digits only: str.isdigit() passes a superscript two (int() then fails in Python's
    # own words) and an Arabic-Indic or fullwidth one (read as 1): a window nobody typed.
    if unit not in units or not (number.isascii() and number.isdigit()) or int(number) <= 0:
        raise ValueError(f"a window looks like 30m, 1h, 7d or 2w, not {text!r}")
    try:
        return timedelta(**{units[unit]: int(number)})
    except OverflowError:
        # Longer than any span a date can hold: callers bound a window (or an age) themselves,
        # and say so; this one is past every bound.
        return timedelta.max
