"""Monitoring: Prometheus /metrics scraped over HTTP, `formwork stats` and `formwork insights`
agree with the jobs that really ran (real worker, Chromium, Redis and the billing site)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from arq import Worker
from arq.jobs import Job
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from worker.browser import BrowserHost
from worker.client import FormworkClient
from worker.contract import (
    BrowserJob,
    Decision,
    DecisionRecord,
    FailureCode,
    JobReport,
    JobStatus,
    RuleFired,
)
from worker.executor import Runtime, run_job
from worker.keys import Keys
from worker.metrics import Monitor
from worker.outcome import UNKNOWN_SCRIPT, outcome_of
from worker.queue import WorkerState, loads, running_worker
from worker.settings import Settings
from worker.stats import JobStats

from .conftest import CREDIT_INPUTS, ROOT, Site

T0 = datetime(2025, 1, 31, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rule(step: str, code: FailureCode, action: str, seconds: float) -> RuleFired:
    return RuleFired(step_id=step, code=code, action=action, reason="-", at=at(seconds))


def report(status: JobStatus, rules: list[RuleFired], **extra: Any) -> JobReport:
    return JobReport(
        job_id="j-1",
        status=status,
        script="billing/issue_credit",
        script_version=1,
        rules_fired=rules,
        **extra,
    )


# ---------------------------------------------------------------- pure: what a settling adds


def test_outcome_unknown_resolutions_are_read_from_the_rules_fired() -> None:
    unknown = FailureCode.outcome_unknown
    redone_then_present = report(
        JobStatus.succeeded,
        [
            rule("submit", unknown, "verify_effect", 1),
            rule("submit", unknown, "retry_from", 2),
            rule("submit", unknown, "verify_effect", 3),
        ],
    )
    assert outcome_of(redone_then_present).unknown == ["probe_absent", "probe_present"]

    inconclusive = report(
        JobStatus.paused_for_handoff,
        [rule("submit", unknown, "verify_effect", 1), rule("submit", unknown, "handoff", 2)],
    )
    assert outcome_of(inconclusive).unknown == ["handoff"]


def test_a_resumed_job_counts_only_what_happened_after_its_pause() -> None:
    unknown = FailureCode.outcome_unknown
    done_by_hand = report(
        JobStatus.succeeded,
        [
            rule("review", FailureCode.server_error, "retry", 1),
            rule("submit", unknown, "verify_effect", 2),
            rule("submit", unknown, "handoff", 3),
        ],
        decisions=[
            DecisionRecord(decision=Decision.mark_done, step_id="submit", by="ops", at=at(60))
        ],
    )
    first = outcome_of(done_by_hand)
    assert first.rules[0] == ("retry", "server_error")
    later = outcome_of(done_by_hand, since=at(10))
    assert later.rules == [] and later.unknown == ["mark_done"]
    assert later.status == JobStatus.succeeded and not later.started


def test_a_step_redone_after_a_pause_adds_only_its_new_attempts_to_the_durations() -> None:
    from worker.contract import Attempt, StepReport, StepStatus

    # A step's duration_ms sums all its attempts, those of the run before the pause too: the
    # resumed run observed the earlier run's time again, which was counted at the pause.
    redone = StepReport(
        id="open_account", action="goto", status=StepStatus.succeeded, attempts=2,
        started_at=at(1), ended_at=at(61), duration_ms=800.0,
        attempt_log=[
            Attempt(number=1, started_at=at(1), duration_ms=200.0),
            Attempt(number=2, started_at=at(60), duration_ms=600.0),
        ],
    )  # fmt: skip
    resumed = report(JobStatus.succeeded, [], steps=[redone], ended_at=at(70))
    assert outcome_of(resumed).step_times == [("goto", 0.8)]
    assert outcome_of(resumed, since=at(10)).step_times == [("goto", 0.6)]


def test_the_stats_header_dates_both_ends_of_a_window_over_days() -> None:
    from worker.stats import Stats, render

    # "jobs settled 2025-01-24 09:00 - 10:47 UTC" read as under two hours, for a week.
    week = Stats(since=at(0) - timedelta(days=7), until=at(6420))
    assert render(week) == "no jobs settled in 2025-01-24 09:00 - 2025-01-31 10:47 UTC"
    hour = Stats(since=at(0), until=at(6420))
    assert render(hour) == "no jobs settled in 2025-01-31 09:00 - 10:47 UTC"


def test_a_rejection_naming_an_unknown_script_gets_no_label_of_its_own() -> None:
    from worker.contract import Failure

    bogus = JobReport(
        job_id="j-2",
        status=JobStatus.rejected,
        script="billing/does_not_exist_9f3",
        error=Failure(code=FailureCode.script_not_found, message="no such script"),
    )
    assert (outcome_of(bogus).site, outcome_of(bogus).script) == (UNKNOWN_SCRIPT, UNKNOWN_SCRIPT)


async def test_a_rejection_of_a_script_that_exists_is_labelled_with_it(
    runtime: Runtime, settings: Settings, fixture_secrets: dict[str, str]
) -> None:
    # Refused at intake, each for its inputs or its payload, by a script that exists: counted
    # under that script. Only a script that does not exist is "(unknown)".
    def job(job_id: str, script: str = "billing/issue_credit", **changes: Any) -> BrowserJob:
        inputs = {**CREDIT_INPUTS, **changes.pop("inputs", {})}
        return BrowserJob(job_id=job_id, script=script, inputs=inputs, **changes)

    jobs = [
        job("rj-amount", inputs={"amount": "-3"}),
        job("rj-site", site_url="http://billing.example.net"),
        job("rj-secret", inputs={"reason": fixture_secrets["billing_password"]}),
        job("rj-version", script="billing/issue_credit@9"),
        job("rj-nope", script="billing/no_such_script_9f3"),
    ]
    reports = [await run_job(j, runtime) for j in jobs]
    assert [(r.status, r.error and r.error.code) for r in reports] == [
        (JobStatus.rejected, FailureCode.input_invalid),
        (JobStatus.rejected, FailureCode.job_invalid),
        (JobStatus.rejected, FailureCode.job_invalid),
        (JobStatus.rejected, FailureCode.script_not_found),
        (JobStatus.rejected, FailureCode.script_not_found),
    ]

    redis = Redis.from_url(settings.redis_url)
    try:
        monitor = Monitor(redis, Keys(settings.key_prefix), scripts=runtime.scripts)
        for r in reports:
            await monitor.settled(r)
        scraped = samples((await monitor.metrics.exposition()).decode())
        stats = await JobStats(redis, Keys(settings.key_prefix)).read(timedelta(hours=1))
    finally:
        await redis.aclose()
    # Routed, a job is refused by the version it was routed to, and counted under it; a pin
    # to a version no file has (@9) is not: its label would be the payload's to choose.
    # The one carrying a secret is refused before it is routed.
    assert [r.script_version for r in reports] == [1, 1, None, None, None]
    credit = {"site": "billing", "script": "billing/issue_credit", "status": "rejected"}
    assert value(scraped, "formwork_jobs_total", **credit, version="1") == 2
    assert value(scraped, "formwork_jobs_total", **credit, version="") == 2
    unknown = {"site": UNKNOWN_SCRIPT, "script": UNKNOWN_SCRIPT}
    assert value(scraped, "formwork_jobs_total", **unknown, status="rejected") == 1
    assert value(scraped, "formwork_metrics_errors_total") == 0
    assert {scope: one.jobs for scope, one in stats.scripts.items()} == {
        "billing/issue_credit@1": {"rejected": 2},
        "billing/issue_credit": {"rejected": 2},
        UNKNOWN_SCRIPT: {"rejected": 1},
    }


async def test_a_settling_is_counted_once_however_often_its_report_is_delivered(
    settings: Settings,
) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        monitor = Monitor(redis, Keys(settings.key_prefix))
        paused = report(JobStatus.needs_customer_input, [], ended_at=at(5))
        for _ in range(3):  # a re-enqueue, an expiry a decision beat: the same settling
            await monitor.settled(paused)
        ended = paused.model_copy(update={"status": JobStatus.succeeded, "ended_at": at(50)})
        await monitor.settled(ended)
        stats = await JobStats(redis, Keys(settings.key_prefix)).read(
            timedelta(hours=1), now=at(60)
        )
    finally:
        await redis.aclose()
    assert stats.scripts["billing/issue_credit@1"].jobs == {
        "needs_customer_input": 1,
        "succeeded": 1,
    }


async def test_a_metrics_failure_never_fails_the_job(settings: Settings) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        monitor = Monitor(dead, Keys(settings.key_prefix))
        await monitor.settled(report(JobStatus.succeeded, [], ended_at=at(5)))  # no exception
    finally:
        await dead.aclose()
    assert monitor.metrics.registry.get_sample_value("formwork_metrics_errors_total") == 1


async def test_counts_go_on_in_the_metrics_of_a_worker_built_again(settings: Settings) -> None:
    # `formwork worker` builds a new worker, with a new Redis connection and a new Chromium,
    # each time it connects again after losing Redis: its counters started again at 0 (a
    # process restart, to Prometheus) and the last Chromium's restarts were forgotten.
    # (Reading these needs no Redis: the clients are never connected.)
    keys = Keys(settings.key_prefix)
    first = Redis.from_url("redis://127.0.0.1:1/0")
    crashed = SimpleNamespace(launches=4, recycles=1)  # 2 restarts after a crash, 1 recycle
    monitor = Monitor(first, keys, cast("BrowserHost", crashed))
    monitor.metrics.observe(outcome_of(report(JobStatus.succeeded, [], ended_at=at(5))))
    again = Redis.from_url("redis://127.0.0.1:1/0")
    fresh = SimpleNamespace(launches=1, recycles=0)
    monitor = Monitor(again, keys, cast("BrowserHost", fresh), metrics=monitor.metrics)
    monitor.metrics.observe(outcome_of(report(JobStatus.succeeded, [], ended_at=at(6))))
    get = monitor.metrics.registry.get_sample_value
    labels = {"site": "billing", "script": "billing/issue_credit", "version": "1"}
    assert get("formwork_jobs_total", {**labels, "status": "succeeded"}) == 2
    assert get("formwork_browser_restarts_total") == 2
    assert get("formwork_browser_recycles_total") == 1
    fresh.launches = 2  # the new Chromium crashed once
    assert get("formwork_browser_restarts_total") == 3
    monitor.metrics.attach(again, keys, cast("BrowserHost", fresh))  # the same one: once
    assert get("formwork_browser_restarts_total") == 3
    await first.aclose()
    await again.aclose()


async def test_a_scrape_while_redis_is_down_still_serves_what_the_worker_counted(
    settings: Settings,
) -> None:
    # The queue gauges are read from Redis at scrape time: a failed read made the whole
    # scrape a 500, so during an outage Prometheus lost every count the worker keeps itself.
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        monitor = Monitor(dead, Keys(settings.key_prefix))
        monitor.metrics.observe(outcome_of(report(JobStatus.succeeded, [], ended_at=at(5))))
        text = (await monitor.metrics.exposition()).decode()
    finally:
        await dead.aclose()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [sample] = [s for s in families["formwork_jobs"].samples if s.name == "formwork_jobs_total"]
    assert sample.labels["status"] == "succeeded" and sample.value == 1
    assert "formwork_worker_memory_bytes" in families
    # Unknown, not a stale or made-up number: absent until Redis answers again.
    assert "formwork_queue_depth" not in families and "formwork_jobs_waiting" not in families


async def test_a_queue_entry_that_is_not_utf8_is_counted_and_the_scrape_is_served(
    settings: Settings,
) -> None:
    # A queue entry written by hand with an id that is not UTF-8 (one the worker takes off
    # the queue when it next polls, which a worker with every slot busy does not) made every
    # scrape a 500 while it was there: the backlog decoded each id to name its in-progress key.
    redis = Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    try:
        await redis.zadd(keys.queue, {b"\xff\xfenot-utf8": 1, b"fine": 2})
        monitor = Monitor(redis, keys)
        text = (await monitor.metrics.exposition()).decode()
    finally:
        await redis.aclose()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["formwork_queue_depth"].samples[0].value == 2
    assert families["formwork_jobs_waiting"].samples[0].value == 0


# ---------------------------------------------------------------- real jobs through a worker


@dataclass
class Metered:
    worker: Worker
    redis: Redis
    keys: Keys

    @property
    def port(self) -> int:
        """The /metrics port the worker bound (known once it has started: after a job ran)."""
        state: WorkerState = self.worker.ctx["formwork"]
        assert state.monitor.port is not None
        return state.monitor.port


@pytest.fixture
async def metered(settings: Settings, browser_host: BrowserHost) -> AsyncIterator[Metered]:
    """A worker serving /metrics on a free port."""
    metered_settings = settings.model_copy(update={"metrics_port": 0})
    redis = Redis.from_url(settings.redis_url)
    async with running_worker(metered_settings, browser_host) as worker:
        yield Metered(worker, redis, Keys(settings.key_prefix))
    await redis.aclose()


async def run(
    client: FormworkClient, m: Metered, site: Site, job_id: str, **faults: Any
) -> JobReport:
    """Enqueue one credit job with `faults` on the site; return once the worker is done with it
    (its arq result is stored: the settling has been counted)."""
    site.reset()
    inputs = dict(CREDIT_INPUTS)
    if faults.pop("bad_input", False):
        inputs["account_id"] = "AC-1"
    if faults:
        site.faults(**faults)
    job = BrowserJob(job_id=job_id, script="billing/issue_credit", inputs=inputs, site_url=site.url)
    handle = await client.enqueue(job)
    report = await handle.wait(60)
    arq_job = Job(job_id, m.redis, _queue_name=m.keys.queue, _deserializer=loads)
    await arq_job.result(timeout=30, poll_delay=0.02)
    return report


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scraped.items() if n == name and want <= ls)


async def formwork(settings: Settings, *args: str) -> str:
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "FORMWORK_KEY_PREFIX": settings.key_prefix,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_metrics_stats_and_insights_match_the_jobs_run(
    billing: Site,
    client: FormworkClient,
    metered: Metered,
    settings: Settings,
    browser_host: BrowserHost,
) -> None:
    ok = await run(client, metered, billing, "m-ok")
    rejected_value = {"field": "amount", "value": "15.00", "message": "Too much for one credit"}
    asked = await run(client, metered, billing, "m-ask", reject_value=[rejected_value])
    drifted = await run(client, metered, billing, "m-drift", skin="v2")
    # One job for both: a 502 on the review (retried), then the commit's answer lost (probed).
    retried = await run(
        client, metered, billing, "m-retry",
        fail=[{"path_contains": "/credits/review", "method": "POST", "status": 502}],
        commit_drop={"create": True, "mode": "error", "status": 502},
    )  # fmt: skip
    refused = await run(client, metered, billing, "m-refused", bad_input=True)
    reports = [ok, asked, drifted, retried, refused]
    assert [r.status for r in reports] == [
        JobStatus.succeeded, JobStatus.needs_customer_input, JobStatus.succeeded,
        JobStatus.succeeded, JobStatus.rejected,
    ]  # fmt: skip
    version = str(ok.script_version)
    drift_steps = [s for s in drifted.steps if s.drift is not None]
    assert drift_steps

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{metered.port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        scraped = samples(await response.text())

    job = {"site": "billing", "script": "billing/issue_credit"}
    # Activity.
    assert value(scraped, "formwork_jobs_total", **job, status="succeeded", version=version) == 3
    assert value(scraped, "formwork_jobs_total", **job, status="needs_customer_input") == 1
    assert value(scraped, "formwork_jobs_total", **job, status="rejected", version=version) == 1
    assert value(scraped, "formwork_jobs_total") == 5
    assert value(scraped, "formwork_jobs_started_total", **job, version=version) == 4
    fired = [(r.step_id, r.code, r.action) for r in retried.rules_fired]
    assert value(scraped, "formwork_rules_fired_total", action="retry", code="server_error") == 1, (
        fired
    )
    assert value(scraped, "formwork_rules_fired_total", action="ask_customer") == 1
    assert value(scraped, "formwork_rules_fired_total", action="alternate") == 0
    assert value(scraped, "formwork_rules_fired_total", action="relogin") == 0
    timed = [s for r in reports for s in r.steps if s.duration_ms is not None]
    assert value(scraped, "formwork_step_duration_seconds_count", **job) == len(timed)
    clicks = [s for s in timed if s.action == "click"]
    assert value(scraped, "formwork_step_duration_seconds_count", action="click") == len(clicks)
    assert value(scraped, "formwork_queue_depth") == 0
    assert value(scraped, "formwork_browser_restarts_total") == max(browser_host.launches - 1, 0)
    assert value(scraped, "formwork_worker_memory_bytes") > 50 * 2**20
    # Quality.
    claims = Counter(
        (c.how.value, str(c.verified).lower())
        for r in reports
        if r.status.terminal
        for c in r.claims
    )
    assert claims[("probe", "true")] >= 1 and claims[("postcondition", "true")] >= 1
    for (how, verified), n in claims.items():
        assert value(scraped, "formwork_claims_total", how=how, verified=verified) == n
    assert value(scraped, "formwork_selector_drift_total", **job) == len(drift_steps)
    amount = value(scraped, "formwork_selector_drift_total", element="credit.amount")
    assert amount == 1
    assert value(scraped, "formwork_handoffs_total", **job, status="needs_customer_input",
                 code="validation_rejected") == 1  # fmt: skip
    assert value(scraped, "formwork_handoffs_total") == 1
    assert value(scraped, "formwork_outcome_unknown_total", resolution="probe_present") == 1
    assert value(scraped, "formwork_outcome_unknown_total") == 1
    assert value(scraped, "formwork_metrics_errors_total") == 0

    # The same summary from Redis, without Prometheus.
    stats = json.loads(await formwork(settings, "stats", "--last", "1h", "--json"))
    one = stats["scripts"][f"billing/issue_credit@{version}"]
    assert one["jobs"] == {"succeeded": 3, "needs_customer_input": 1, "rejected": 1}
    assert one["started"] == 4
    assert one["rules"] == {"ask_customer": 1, "retry": 1, "verify_effect": 1}
    assert sum(one["drift"].values()) == len(drift_steps)
    assert one["handoffs"] == {"validation_rejected": 1}
    assert one["outcome_unknown"] == {"probe_present": 1}
    by_how = Counter[str]()
    for (how, verified), n in claims.items():
        by_how[how if verified == "true" else "unverified"] += n
    assert one["claims"] == dict(by_how)
    assert "billing/issue_credit" not in stats["scripts"]  # the refused one is under its version
    table = await formwork(settings, "stats")
    assert "ACTIVITY" in table and "QUALITY" in table
    assert table.index("ACTIVITY") < table.index("QUALITY")
    row = next(line.split() for line in table.splitlines() if line.strip().startswith(
        f"billing/issue_credit@{version}"))  # fmt: skip
    # started succeeded failed rejected paused expired cancelled retries alternates relogins
    assert row[1:11] == ["4", "3", "0", "1", "1", "0", "0", "1", "0", "0"]
    assert "outcome_unknown:    probe_present 1" in table

    # Insights for script maintainers.
    found = json.loads(
        await formwork(settings, "insights", "--last", "1d", "--site", "billing", "--json")
    )
    assert found["jobs"] == 5
    failing = {(f["step_id"]): f for f in found["failing_steps"]}
    review = failing["review"]
    assert review["codes"] == {"validation_rejected": 1, "server_error": 1}
    assert review["failed_attempts"] == 2 and review["jobs_failed"] == 1
    assert failing["submit"]["codes"] == {"outcome_unknown": 1}
    assert failing["(intake)"]["codes"] == {"input_invalid": 1}
    example = Path(review["example"])
    assert example.name == "audit.json" and await asyncio.to_thread(example.is_file)
    spots = {d["element"]: d for d in found["drift"]}
    assert spots["credit.amount"]["used"] == "label=Credit amount"
    assert spots["credit.amount"]["expected"] == "label=Amount"
    assert f"/{drifted.job_id}/" in spots["credit.amount"]["example"]
    assert [(h["step_id"], h["code"], h["resolutions"]) for h in found["handoffs"]] == [
        ("review", "validation_rejected", {"pending": 1})
    ]
    times = {t["step_id"]: t for t in found["step_times"]}
    submits = sorted(
        s.duration_ms for r in reports for s in r.steps
        if s.id == "submit" and s.status == "succeeded" and s.duration_ms is not None
    )  # fmt: skip
    assert times["submit"]["runs"] == len(submits) == 3
    assert submits[0] <= times["submit"]["median_ms"] <= times["submit"]["p95_ms"] == submits[-1]
    text = await formwork(settings, "insights", "--script", "issue_credit")
    for title in ("STEPS THAT FAIL MOST", "SELECTOR DRIFT HOTSPOTS", "HANDOFFS", "TIME PER STEP"):
        assert title in text
    assert "label=Credit amount" in text and "validation_rejected" in text
    assert "no jobs settled" in await formwork(settings, "insights", "--site", "orders")
