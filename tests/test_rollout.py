"""Script versions side by side and canary rollout: pinning, routing, counting, rollback.

Jobs run through a real worker on real Redis and Chromium against the billing fixture, from a
scripts tree holding version 1 of billing/issue_credit and a version 2 beside it.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import redis as redis_sync
from arq import Worker
from pydantic import ValidationError

from worker.cli import main
from worker.client import FormworkClient
from worker.contract import (
    BrowserJob,
    EventKind,
    FailureCode,
    JobEvent,
    JobReport,
    JobStatus,
    RolloutAction,
    Routing,
)
from worker.errors import ScriptInvalid
from worker.keys import Keys
from worker.rollout import (
    NOT_AGAINST_THE_VERSION,
    SYSTEM_FAILURES,
    Counts,
    RolloutConfig,
    Rollouts,
    Verdict,
    bucket,
    load_rollout,
    rollback_reason,
    verdict,
)
from worker.script import ScriptStore
from worker.settings import Settings

from .conftest import CREDIT_INPUTS, SCRIPTS, SELECTORS, Site

NAME = "billing/issue_credit"


# ---------------------------------------------------------------- pure rules


def test_every_failure_code_is_decided_for_or_not_against_the_version() -> None:
    assert SYSTEM_FAILURES.isdisjoint(NOT_AGAINST_THE_VERSION)
    assert set(FailureCode) == SYSTEM_FAILURES | NOT_AGAINST_THE_VERSION


def test_routing_is_a_stable_hash_of_the_job_id_near_the_configured_share() -> None:
    assert bucket(NAME, "job-1") == bucket(NAME, "job-1")
    share = sum(bucket(NAME, f"job-{i}") < 10 for i in range(4000)) / 4000
    assert 0.08 < share < 0.12


def test_rollback_needs_the_minimum_sample_and_more_than_the_margin() -> None:
    config = RolloutConfig(stable=1, canary=2, percent=10, margin=0.1, min_sample=10)
    stable = Counts(succeeded=95, system_failure=5)  # 5%
    assert rollback_reason(stable, Counts(succeeded=5, system_failure=4), config) is None
    assert rollback_reason(stable, Counts(succeeded=9, system_failure=1), config) is None  # 10%
    reason = rollback_reason(stable, Counts(succeeded=8, system_failure=2), config)  # 20%
    assert reason is not None and "20.0%" in reason and "5.0%" in reason
    # Business outcomes are outside the sample: they neither help nor hurt.
    assert Counts(succeeded=1, system_failure=1, business=50).rate == 0.5


def report(status: JobStatus, code: FailureCode | None = None) -> JobReport:
    error = {"code": code, "message": "x"} if code else None
    return JobReport.model_validate(
        {"job_id": "j", "status": status, "script": NAME, "error": error}
    )


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (JobStatus.succeeded, None, Verdict.succeeded),
        (JobStatus.failed, FailureCode.browser_crashed, Verdict.system_failure),
        (JobStatus.paused_for_handoff, FailureCode.selector_not_found, Verdict.system_failure),
        (JobStatus.needs_customer_input, FailureCode.validation_rejected, Verdict.business),
        (JobStatus.rejected_by_approver, FailureCode.rejected_by_approver, Verdict.business),
        (JobStatus.cancelled, FailureCode.cancelled, Verdict.business),
        (JobStatus.rejected, FailureCode.input_invalid, Verdict.business),
        (JobStatus.expired, FailureCode.timeout, Verdict.business),
        (JobStatus.awaiting_approval, FailureCode.approval_required, None),
        (JobStatus.running, None, None),
    ],
)
def test_what_a_report_says_about_its_version(
    status: JobStatus, code: FailureCode | None, expected: Verdict | None
) -> None:
    assert verdict(report(status, code)) == expected


# ---------------------------------------------------------------- through the queue


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Real scripts and selectors, with version 2 of issue_credit beside version 1."""
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    shutil.copytree(SELECTORS, tmp_path / "selectors")
    (tmp_path / "scripts" / "billing" / "issue_credit.rollout.yaml").unlink()  # each test's own
    write_v2(tmp_path)
    return tmp_path


def write_v2(tree: Path, old: str = "", new: str = "") -> None:
    v1 = (tree / "scripts" / "billing" / "issue_credit.yaml").read_text()
    v2 = v1.replace("version: 1", "version: 2").replace(old, new)
    (tree / "scripts" / "billing" / "issue_credit@2.yaml").write_text(v2)


def write_rollout(tree: Path, **config: object) -> None:
    text = "".join(f"{key}: {value}\n" for key, value in config.items())
    (tree / "scripts" / "billing" / "issue_credit.rollout.yaml").write_text(text)


# A version 2 whose account page check looks for an element that page does not have: every
# job on it fails `expectation_failed` (a system failure) a second after signing in.
BROKEN = (
    "expect: {visible: account.header}}",
    "expect: {visible: lookup.account}, timeout_ms: 1000}",
)


@pytest.fixture
def settings(settings: Settings, tree: Path) -> Settings:
    return settings.model_copy(
        update={"scripts_dir": tree / "scripts", "selectors_dir": tree / "selectors"}
    )


def job_ids(prefix: str, arm: Routing, percent: float) -> itertools.chain[str]:
    """Job ids that the hash puts in `arm` at `percent`."""
    ids = (f"{prefix}-{i}" for i in itertools.count())
    canary = arm == Routing.canary
    return itertools.chain(i for i in ids if (bucket(NAME, i) < percent) == canary)


async def run(client: FormworkClient, site: Site, job_id: str, script: str = NAME) -> JobReport:
    job = BrowserJob(job_id=job_id, script=script, inputs=CREDIT_INPUTS, site_url=site.url)
    return await (await client.enqueue(job)).wait(timeout_s=60)


async def rollout_events(client: FormworkClient, settings: Settings) -> list[JobEvent]:
    entries = await client.redis.xrange(Keys(settings.key_prefix).all_events)
    events = [JobEvent.model_validate_json(fields[b"event"]) for _, fields in entries]
    return [e for e in events if e.kind == EventKind.rollout]


async def test_pinned_jobs_run_their_version_and_unpinned_ones_follow_the_rollout(
    billing: Site, client: FormworkClient, worker: Worker, tree: Path
) -> None:
    write_rollout(tree, stable=1, canary=2, percent=50)
    canary_id = next(job_ids("route", Routing.canary, 50))
    stable_id = next(job_ids("route", Routing.stable, 50))

    pinned = await run(client, billing, "route-pinned", f"{NAME}@2")
    canary = await run(client, billing, canary_id)
    stable = await run(client, billing, stable_id)

    assert (pinned.script_version, pinned.routing) == (2, Routing.pinned)
    assert (canary.script_version, canary.routing) == (2, Routing.canary)
    assert (stable.script_version, stable.routing) == (1, Routing.stable)
    assert canary.script_digest == pinned.script_digest != stable.script_digest
    assert all(r.status == JobStatus.succeeded for r in (pinned, canary, stable))
    assert len(billing.credits()) == 3  # the site's own record: each ran once


async def test_without_a_rollout_file_the_highest_version_is_stable(
    billing: Site, client: FormworkClient, worker: Worker
) -> None:
    done = await run(client, billing, "no-rollout")
    assert (done.script_version, done.routing, done.status) == (2, Routing.stable, "succeeded")


async def test_a_canary_with_a_broken_selector_is_rolled_back_to_stable(
    billing: Site, client: FormworkClient, worker: Worker, tree: Path, settings: Settings
) -> None:
    write_v2(tree, *BROKEN)
    write_rollout(tree, stable=1, canary=2, percent=50, margin=0.2, min_sample=2)
    canary_ids = job_ids("broken", Routing.canary, 50)

    first = await run(client, billing, next(canary_ids))
    assert (first.routing, first.error and first.error.code) == (
        Routing.canary, FailureCode.expectation_failed,
    )  # fmt: skip
    assert await rollout_events(client, settings) == []  # one outcome: below the sample
    second = await run(client, billing, next(canary_ids))
    assert second.routing == Routing.canary

    (event,) = await rollout_events(client, settings)
    assert event.rollout is not None and event.job_id == second.job_id
    assert (event.rollout.action, event.rollout.stable, event.rollout.canary) == (
        RolloutAction.rolled_back, 1, 2,
    )  # fmt: skip
    assert "100.0%" in event.rollout.reason
    # A job the hash puts in the canary arm now runs stable, and works.
    after = await run(client, billing, next(canary_ids))
    assert (after.script_version, after.routing, after.status) == (1, Routing.stable, "succeeded")
    assert len(billing.credits()) == 1


async def test_business_rejections_on_the_canary_do_not_roll_it_back(
    billing: Site, client: FormworkClient, worker: Worker, tree: Path, settings: Settings
) -> None:
    write_rollout(tree, stable=1, canary=2, percent=50, margin=0.0, min_sample=1)
    billing.faults(reject_value=[{"field": "amount", "value": "15.00", "message": "Too much"}])
    canary_ids = job_ids("business", Routing.canary, 50)
    for _ in range(2):
        rejected = await run(client, billing, next(canary_ids))
        assert (rejected.status, rejected.routing) == (JobStatus.needs_customer_input, "canary")

    assert await rollout_events(client, settings) == []
    counts = await client.redis.hgetall(Keys(settings.key_prefix).rollout_outcomes(NAME, 2))
    assert counts == {b"business": b"2"}
    assert billing.credits() == []
    billing.faults()  # the site accepts again: the canary still gets its share
    still = await run(client, billing, next(canary_ids))
    assert (still.script_version, still.routing, still.status) == (2, "canary", "succeeded")


async def test_a_job_keeps_its_arm_when_the_rollout_changes_under_it(
    client: FormworkClient, tree: Path, settings: Settings
) -> None:
    write_rollout(tree, stable=1, canary=2, percent=50)
    job_id = next(job_ids("kept", Routing.canary, 50))
    scripts = ScriptStore(tree / "scripts", tree / "selectors")
    rollouts = Rollouts(client.redis, Keys(settings.key_prefix), scripts)
    job = BrowserJob(job_id=job_id, script=NAME, inputs=CREDIT_INPUTS)
    assert (await rollouts.route(job)).routing == Routing.canary
    await rollouts.rollback(NAME, "test", "a retry must not move")
    # The same job, run again (a retry after its worker died), stays on the canary …
    assert (await rollouts.route(job)).routing == Routing.canary
    # … while a new job in the canary's share goes to stable.
    fresh = job.model_copy(update={"job_id": next(job_ids("kept-new", Routing.canary, 50))})
    assert (await rollouts.route(fresh)).routing == Routing.stable


def test_rollout_cli_promotes_rolls_back_and_resets(
    tree: Path,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_rollout(tree, stable=1, canary=2, percent=10)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("FORMWORK_KEY_PREFIX", settings.key_prefix)
    dirs = ["--scripts-dir", str(tree / "scripts"), "--selectors-dir", str(tree / "selectors")]

    def formwork(*args: str) -> str:
        assert main(["rollout", *args, *dirs]) == 0
        return capsys.readouterr().out

    assert "routing:  stable v1, canary v2 at 10%" in formwork("status", NAME)
    assert "billing/issue_credit: promoted (canary v2); unpinned jobs: stable v2\n" in formwork(
        "promote", NAME, "--by", "ops", "--reason", "looks good"
    )
    shown = formwork("status", NAME)
    assert "state:    v2 promoted by ops" in shown and "routing:  stable v2" in shown
    formwork("rollback", NAME, "--by", "ops")
    assert "routing:  stable v1\n" in formwork("status", NAME)
    # Back to the file: its canary share again, not "v1" alone.
    assert "reset (canary v2); unpinned jobs: stable v1, canary v2 at 10%" in formwork(
        "reset", NAME
    )
    (status,) = json.loads(formwork("status", "--json"))
    assert (status["stable"], status["canary"], status["override"]) == (1, 2, None)

    client = redis_sync.Redis.from_url(settings.redis_url)
    entries = client.xrange(Keys(settings.key_prefix).all_events)
    client.close()
    events = [JobEvent.model_validate_json(fields[b"event"]) for _, fields in entries]
    assert [(e.kind, e.status, e.rollout and e.rollout.by) for e in events] == [
        (EventKind.rollout, "promoted", "ops"),
        (EventKind.rollout, "rolled_back", "ops"),
        (EventKind.rollout, "reset", "cli"),
    ]
    assert main(["rollout", "promote", "billing/login", *dirs]) == 2
    assert "has no rollout file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # The canary never ran, and nothing said so.
        ({"stable": 1, "canary": 2}, "'canary' needs a 'percent' above 0"),
        ({"stable": 1, "canary": 2, "percent": 0}, "'canary' needs a 'percent' above 0"),
        # As a script's `version: "1"` is refused.
        ({"stable": "1"}, "stable\n  Input should be a valid integer"),
        ({"stable": 1, "canary": "2", "percent": 5}, "canary\n  Input should be a valid integer"),
        # YAML's `.nan` was refused as "should be less than or equal to 100".
        (
            {"stable": 1, "canary": 2, "percent": float("nan")},
            "percent\n  Input should be a finite",
        ),
        (
            {"stable": 1, "canary": 2, "percent": 5, "margin": float("inf")},
            "margin\n  Input should be a finite",
        ),
    ],
)
def test_a_rollout_that_cannot_mean_what_it_says_is_refused(
    config: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        RolloutConfig.model_validate(config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"stable": 1, "canary": 1, "percent": 10}, ":2: canary: must differ from 'stable'"),
        ({"stable": 1, "percent": 10}, ":2: percent: needs a 'canary'"),
        ({"stable": 1, "canary": 2}, ":2: canary: 'canary' needs a 'percent' above 0"),
        ({"stable": 1, "canary": 2, "percent": 0}, ":3: percent: 'canary' needs a 'percent'"),
    ],
)
def test_a_rollout_whose_fields_disagree_says_at_the_field_s_line(
    tree: Path, config: dict[str, object], message: str
) -> None:
    # These named line 1, whichever line the field was on.
    write_rollout(tree, **config)
    path = tree / "scripts" / "billing" / "issue_credit.rollout.yaml"
    with pytest.raises(ScriptInvalid) as refused:
        load_rollout(ScriptStore(tree / "scripts", tree / "selectors"), NAME)
    assert refused.value.message.startswith(f"{path}{message}")


def test_a_rollout_naming_a_version_that_does_not_exist_says_on_which_line(tree: Path) -> None:
    # Every other rollout error names its line; this one named only the file.
    write_rollout(tree, stable=1, canary=3, percent=10)
    path = tree / "scripts" / "billing" / "issue_credit.rollout.yaml"
    with pytest.raises(ScriptInvalid) as refused:
        load_rollout(ScriptStore(tree / "scripts", tree / "selectors"), NAME)
    assert refused.value.message == (
        f"{path}:2: canary: billing/issue_credit has no version 3 (available: 1, 2)"
    )
