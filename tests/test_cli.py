"""The `formwork` command as a user runs it: a real process, a real fixture site."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from arq import Worker

from worker.client import FormworkClient, JobHandle
from worker.contract import BrowserJob, JobReport, JobStatus
from worker.settings import Settings

from .conftest import ROOT, SECRETS_FILE, Site

RUN_INPUTS = [
    "--input", "account_id=AC-10231", "--input", "amount=15.00",
    "--input", "reason=damaged item", "--input", "reference=T-88812",
]  # fmt: skip


def formwork(
    *args: str, tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FORMWORK_SECRETS_FILE": str(SECRETS_FILE),
        "FORMWORK_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_run_prints_every_step_and_exits_zero(billing: Site, tmp_path: Path) -> None:
    result = formwork(
        "run",
        "scripts/billing/issue_credit.yaml",
        "--site-url",
        billing.url,
        *RUN_INPUTS,
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("login.open", "login.password", "open_account", "review", "submit"):
        assert f" {step} " in result.stdout
    assert "succeeded" in result.stdout
    credits = billing.credits()
    assert len(credits) == 1
    assert f"output confirmation_number = {credits[0]['confirmation']}" in result.stdout
    assert "report:" in result.stdout and "screenshots:" in result.stdout


def test_run_json_prints_the_report(billing: Site, tmp_path: Path) -> None:
    result = formwork(
        "run",
        "billing/issue_credit",
        "--site-url",
        billing.url,
        "--json",
        "--job-id",
        "cli-1",
        *RUN_INPUTS,
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = JobReport.model_validate_json(result.stdout)
    assert report.job_id == "cli-1" and report.status == JobStatus.succeeded
    assert report.artifacts is not None
    assert (tmp_path / "artifacts" / report.artifacts.report).is_file()
    assert report.artifacts.report.endswith("/cli-1/report.json")


def test_failed_step_is_named_and_exit_is_nonzero(billing: Site, tmp_path: Path) -> None:
    billing.faults(reject_value=[{"field": "amount", "value": "15.00", "message": "Too much"}])
    result = formwork(
        "run", "billing/issue_credit", "--site-url", billing.url, *RUN_INPUTS, tmp_path=tmp_path
    )
    assert result.returncode == 1
    assert "validation_rejected at step review" in result.stdout
    assert "Too much" in result.stdout
    assert billing.credits() == []


def test_bad_input_is_rejected_with_exit_two(billing: Site, tmp_path: Path) -> None:
    result = formwork(
        "run", "billing/issue_credit", "--site-url", billing.url,
        "--input", "account_id=AC-1", tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "rejected" in result.stdout and "input 'account_id'" in result.stdout
    assert billing.state()["requests"] == 0
    # A command line that cannot be carried out says so in a line, with the same code.
    for args, why in (
        (["run", "billing/issue_credit", "--input", "account_id"], "--input takes key=value"),
        (["run", "scripts/billing/nope.yaml"], "no script file scripts/billing/nope.yaml"),
        (["run", "billing/issue_credit", "--site-url", "127.0.0.1:1"], "invalid job: site_url"),
        (["schema", "--out", "README.md"], "--out README.md is a file"),
    ):
        wrong = formwork(*args, tmp_path=tmp_path)
        assert wrong.returncode == 2 and why in wrong.stderr, (args, wrong.stderr)
        assert "Traceback" not in wrong.stderr and "errors.pydantic.dev" not in wrong.stderr


def test_schema_exports_the_public_field_names(tmp_path: Path) -> None:
    result = formwork("schema", tmp_path=tmp_path)
    assert result.returncode == 0
    schemas = json.loads(result.stdout)
    report = schemas["JobReport"]["properties"]
    assert {"job_id", "status", "outputs", "steps", "artifacts", "error"} <= set(report)
    step = schemas["StepReport"]["properties"]
    assert {"id", "action", "status", "attempts", "duration_ms", "selector", "url",
            "screenshot", "failure"} <= set(step)  # fmt: skip
    assert {"job_id", "script", "inputs", "site_url", "idempotency_key", "deadline"} <= set(
        schemas["BrowserJob"]["properties"]
    )
    # What a decision about a paused job carries (the wire protocol's resume message).
    assert {"decision", "inputs", "outputs", "note", "by"} <= set(
        schemas["ResumeDecision"]["properties"]
    )


def test_validate_checks_every_script(tmp_path: Path) -> None:
    result = formwork("validate", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout
    assert "ok    billing/issue_credit@1" in result.stdout


async def test_enqueue_watch_and_status_through_the_queue(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    enqueue = await asyncio.to_thread(
        formwork, "enqueue", "billing/issue_credit", "--site-url", billing.url,
        "--job-id", "cli-q-1", *RUN_INPUTS, "--watch", tmp_path=tmp_path, env=env,
    )  # fmt: skip
    assert enqueue.returncode == 0, enqueue.stdout + enqueue.stderr
    lines = enqueue.stdout.splitlines()
    assert lines[0] == "cli-q-1"
    assert "   1 job queued" in lines and "  29 job succeeded" in lines
    again = await asyncio.to_thread(
        formwork, "enqueue", "billing/issue_credit", "--site-url", billing.url,
        "--job-id", "cli-q-1", *RUN_INPUTS, tmp_path=tmp_path, env=env,
    )  # fmt: skip
    assert "not queued again" in again.stderr
    status = await asyncio.to_thread(
        formwork, "status", "cli-q-1", "--json", tmp_path=tmp_path, env=env
    )
    assert JobReport.model_validate_json(status.stdout).status == JobStatus.succeeded
    watch = await asyncio.to_thread(formwork, "watch", "cli-q-1", tmp_path=tmp_path, env=env)
    assert watch.returncode == 0 and "job cli-q-1: succeeded" in watch.stdout
    assert len(billing.credits()) == 1
    # Rejected through the queue exits as `formwork run` does: 2.
    rejected = await asyncio.to_thread(
        formwork, "enqueue", "billing/issue_credit", "--site-url", billing.url,
        "--job-id", "cli-q-2", "--input", "acount_id=AC-10231", "--watch",
        tmp_path=tmp_path, env=env,
    )  # fmt: skip
    assert rejected.returncode == 2 and "job cli-q-2: rejected" in rejected.stdout


async def paused_for_the_customer(billing: Site, client: FormworkClient, job_id: str) -> JobHandle:
    """A billing job paused at needs_customer_input: the site refuses its amount."""
    billing.faults(reject_value=[{"field": "amount", "value": "15.00", "message": "Too much"}])
    job = BrowserJob(
        job_id=job_id, script="billing/issue_credit", site_url=billing.url,
        inputs={"account_id": "AC-10231", "amount": "15.00", "reason": "damaged item",
                "reference": "T-88812"},
    )  # fmt: skip
    handle = await client.enqueue(job)
    assert (await handle.wait(60)).status == JobStatus.needs_customer_input
    return handle


async def test_paused_jobs_are_listed_for_operators(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        await paused_for_the_customer(billing, client, "cli-paused")
        assert [job_id for job_id, _, _ in await client.paused()] == ["cli-paused"]
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    listing = await asyncio.to_thread(formwork, "handoffs", tmp_path=tmp_path, env=env)
    assert listing.returncode == 0
    assert "cli-paused" in listing.stdout and "needs_customer_input" in listing.stdout
    assert "Too much" in listing.stdout
    one = await asyncio.to_thread(formwork, "handoff", "cli-paused", tmp_path=tmp_path, env=env)
    assert one.returncode == 0
    assert "decisions: retry_with_inputs, abort" in one.stdout
    assert "evidence:" in one.stdout and ".jpg" in one.stdout
    # A decision that cannot be carried out says why.
    for decision, why in (
        (["mark_done"], "job cli-paused does not allow mark_done; it allows: retry_with_inputs"),
        (["reject"], "invalid decision: (all): a reject decision needs a reason (note)"),
    ):
        refused = await asyncio.to_thread(
            formwork, "resume", "cli-paused", *decision, tmp_path=tmp_path, env=env
        )
        assert refused.returncode != 0 and why in refused.stderr, refused.stderr
    resumed = await asyncio.to_thread(
        formwork, "resume", "cli-paused", "retry_with_inputs", "--input", "amount=9.00",
        "--by", "qa", "--watch", tmp_path=tmp_path, env=env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "job cli-paused: succeeded" in resumed.stdout
    assert [c["amount"] for c in billing.credits()] == ["9.00"]
    # Followed from its start, the job is shown through its pause to its end.
    watched = await asyncio.to_thread(formwork, "watch", "cli-paused", tmp_path=tmp_path, env=env)
    assert watched.returncode == 0, watched.stderr
    jobs = [line.split(maxsplit=2)[2] for line in watched.stdout.splitlines() if " job " in line]
    assert jobs[0] == "queued" and jobs[-1] == "succeeded", jobs  # the events, then the summary
    assert any(j.startswith("needs_customer_input") for j in jobs), jobs
    bogus = await asyncio.to_thread(
        formwork, "watch", "cli-paused", "--after", "bogus", tmp_path=tmp_path, env=env
    )
    assert bogus.returncode == 2 and "--after takes the number an event line" in bogus.stderr
    assert "Traceback" not in bogus.stderr
    # Following again after the number a line started with shows only what came after it.
    numbered = [line for line in watched.stdout.splitlines() if line[:4].strip().isdigit()]
    middle = int(numbered[len(numbered) // 2][:4])
    later = await asyncio.to_thread(
        formwork, "watch", "cli-paused", "--after", str(middle), tmp_path=tmp_path, env=env
    )
    assert later.returncode == 0, later.stderr
    seqs = [int(line[:4]) for line in later.stdout.splitlines() if line[:4].strip().isdigit()]
    assert seqs == [int(line[:4]) for line in numbered if int(line[:4]) > middle], later.stdout
    # A job that ended is a state conflict (1); a job id nobody knows is a wrong command
    # line (2), whichever command is given it, as `status` and `watch` answer it.
    cases = [
        (["resume", "cli-paused", "abort"], "cli-paused", 1, "is succeeded, not paused"),
        (["abort", "cli-paused"], "cli-paused", 1, "already ended, nothing to abort"),
        (["handoff", "cli-paused"], "cli-paused", 1, "is succeeded, not waiting for a decision"),
        (["resume", "cli-nope", "abort"], "cli-nope", 2, "no job cli-nope"),
        (["abort", "cli-nope"], "cli-nope", 2, "no job cli-nope"),
        (["handoff", "cli-nope"], "cli-nope", 2, "no job cli-nope"),
        (["status", "cli-nope"], "cli-nope", 2, "no job cli-nope"),
        (["watch", "cli-nope"], "cli-nope", 2, "no job cli-nope"),
    ]
    # At once: each is a process of its own, and none changes the job.
    results = await asyncio.gather(
        *(asyncio.to_thread(formwork, *c[0], tmp_path=tmp_path, env=env) for c in cases)
    )
    for (command, job_id, code, why), refused in zip(cases, results, strict=True):
        assert refused.returncode == code, (command, refused.returncode, refused.stderr)
        assert f"job {job_id}" in refused.stderr and why in refused.stderr, refused.stderr


def test_audit_prune_says_the_age_as_given_and_which_days_it_came_to(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    (root / "2020-01-01" / "old-job").mkdir(parents=True)
    (root / "2020-01-01" / "old-job" / "report.json").write_text("{}")
    (root / "2020-02-30").mkdir()  # named like a day, but none: left alone
    dry = formwork("audit", "prune", "--older-than", "1h", "--dry-run", tmp_path=tmp_path)
    assert dry.returncode == 0, dry.stderr
    today = datetime.now(UTC).date()
    assert dry.stdout.splitlines() == [
        "would remove 2020-01-01/old-job",
        f"would remove 1 job older than 1h (days before {today})",
    ]
    assert "skipping 2020-02-30" in dry.stderr and (root / "2020-02-30").is_dir()
    bad = formwork("audit", "prune", "--older-than", "1x", tmp_path=tmp_path)
    assert bad.returncode == 2 and "not '1x'" in bad.stderr


async def test_abort_of_a_paused_job_says_it_ends_now(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        handle = await paused_for_the_customer(billing, client, "cli-abort-paused")
        last = await handle.last_event_id()
        env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
        aborted = await asyncio.to_thread(
            formwork, "abort", "cli-abort-paused", tmp_path=tmp_path, env=env
        )
        assert aborted.returncode == 0, aborted.stderr
        assert aborted.stdout.strip() == (
            "cli-abort-paused was needs_customer_input: it ends cancelled now"
        )
        report = await handle.wait(30, after=last)
        assert report.status == JobStatus.cancelled
        assert [s.id for s in report.steps if s.status == "succeeded"][:1] == ["login.open"]
        assert await client.paused() == []
    assert billing.credits() == []


def test_wrong_command_lines_exit_two_with_one_line_and_no_traceback(
    tmp_path: Path, settings: Settings
) -> None:
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    huge = "x" * 70_000
    for args, why in (
        (["insights", "--top", "0"], "argument --top: at least 1, not 0"),
        (
            ["enqueue", "billing/issue_credit", "--input", f"reason={huge}"],
            "invalid job: job ",  # "... is 70... bytes; workers refuse more than 65536"
        ),
        (["audit", "export", "cli-nope"], "no audit record for job 'cli-nope'"),
        (["recording", "export", "cli-nope"], "no report for job cli-nope"),
    ):
        result = formwork(*args, tmp_path=tmp_path, env=env)
        assert result.returncode == 2, (args[:2], result.stderr)
        assert why in result.stderr and "Traceback" not in result.stderr, result.stderr
