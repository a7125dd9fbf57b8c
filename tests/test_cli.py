"""The `formwork` command as a user runs it: a real process, a real fixture site."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from arq import Worker
from playwright.async_api import expect

from worker.artifacts import LocalArtifacts
from worker.audit_ui import export_html
from worker.browser import BrowserHost
from worker.client import FormworkClient, JobHandle
from worker.contract import BrowserJob, JobReport, JobStatus, ResumeDecision
from worker.demo import DEMO_PREFIX
from worker.keys import ARQ_JOB_PREFIX, Keys
from worker.queue import WITHHELD, read_pause, running_worker
from worker.settings import Settings

from .conftest import (
    CREDIT_INPUTS,
    ROOT,
    SECRETS_FILE,
    Site,
    _leaks_in_redis,
    own_redis,
    worker_env,
)

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


async def test_watch_follows_a_job_across_a_dropped_redis_connection(
    billing: Site, settings: Settings, browser_host: BrowserHost, tmp_path: Path
) -> None:
    # Redis dropped the watcher's connection (a restart, a failover): `watch` ended with a
    # traceback and exit 1, the code that says the job failed, while the job went on.
    async with own_redis(tmp_path) as server:
        own = settings.model_copy(update={"redis_url": server.url})
        env = {"REDIS_URL": own.redis_url, "FORMWORK_KEY_PREFIX": own.key_prefix}
        async with FormworkClient(own.redis_url, key_prefix=own.key_prefix) as client:
            job = BrowserJob(
                job_id="cli-drop", script="billing/issue_credit", inputs=CREDIT_INPUTS,
                site_url=billing.url,
            )  # fmt: skip
            handle = await client.enqueue(job)
            watch = asyncio.create_task(
                asyncio.to_thread(formwork, "watch", "cli-drop", tmp_path=tmp_path, env=env)
            )
            async with asyncio.timeout(30):  # another process's connection: only polled
                while not [c for c in await client.redis.client_list() if c["cmd"] == "xread"]:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await client.redis.client_kill_filter(_type="normal", skipme=True)
            async with running_worker(own, browser_host):
                await handle.wait(60)
            result = await watch
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost Redis" in result.stderr
    assert "job cli-drop: succeeded" in result.stdout
    assert result.stdout.splitlines().count("   1 job queued") == 1  # followed on, not again
    assert len(billing.credits()) == 1


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
    first_kept = (datetime.now(UTC) - timedelta(hours=1)).date()
    assert dry.stdout.splitlines() == [
        "would remove 2020-01-01/old-job",
        f"would remove 1 job older than 1h (days before {first_kept})",
    ]
    assert "skipping 2020-02-30" in dry.stderr and (root / "2020-02-30").is_dir()
    bad = formwork("audit", "prune", "--older-than", "1x", tmp_path=tmp_path)
    assert bad.returncode == 2 and "not '1x'" in bad.stderr


def test_recording_export_to_a_place_that_cannot_be_written_is_one_line(
    billing: Site, tmp_path: Path
) -> None:
    # Under a file (or anywhere read-only), the export ended in a traceback.
    ran = formwork(
        "run", "billing/issue_credit", "--site-url", billing.url, "--job-id", "cli-rec-out",
        *RUN_INPUTS, tmp_path=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    (tmp_path / "a-file").write_text("kept")
    blocked = tmp_path / "a-file" / "bundle"
    result = formwork("recording", "export", "cli-rec-out", "--out", str(blocked),
                      tmp_path=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"formwork: cannot write recording to {blocked}: Not a directory\n"
    assert (tmp_path / "a-file").read_text() == "kept"


def test_windows_and_ages_are_written_in_ascii_digits(tmp_path: Path, settings: Settings) -> None:
    # A superscript 2 was refused in Python's words (invalid literal for int()), and an
    # Arabic-Indic or a fullwidth 1 read as 1h and 1d: a window nobody typed.
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    for args in (["stats", "--last"], ["insights", "--last"], ["audit", "prune", "--older-than"]):
        for given in ("\u00b2h", "\u0661h", "\uff11d"):
            result = formwork(*args, given, tmp_path=tmp_path, env=env)
            assert result.returncode == 2, (args, given, result.stdout)
            said = f"a window looks like 30m, 1h, 7d or 2w, not {given!r}"
            assert result.stderr.endswith(f"{said}\n"), result.stderr


def test_audit_prune_refuses_an_age_in_minutes_or_beyond_the_calendar(tmp_path: Path) -> None:
    # `--older-than 2m`, meant as two months, was two minutes: every day before today's went.
    # An age past year 1 ended in a traceback (OverflowError), and removed nothing.
    root = tmp_path / "artifacts"
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    for day in ("2020-01-01", yesterday):
        (root / day / "a-job").mkdir(parents=True)
        (root / day / "a-job" / "report.json").write_text("{}")
    for age, why in (
        ("2m", "an age is in hours, days or weeks (36h, 30d, 2w), not '2m': m would be "
               "minutes, not months"),
        ("99999999d", "'99999999d' is longer than any span"),
        ("9999999999d", "'9999999999d' is longer than any span"),
    ):  # fmt: skip
        pruned = formwork("audit", "prune", "--older-than", age, tmp_path=tmp_path)
        assert pruned.returncode == 2, pruned.stdout + pruned.stderr
        [said] = [line for line in pruned.stderr.splitlines() if ": error: " in line]
        assert said == f"formwork audit prune: error: argument --older-than: {why}"
        assert "Traceback" not in pruned.stderr
        assert (root / "2020-01-01" / "a-job" / "report.json").is_file()
        assert (root / yesterday / "a-job" / "report.json").is_file()
    kept = formwork("audit", "prune", "--older-than", "36h", tmp_path=tmp_path)
    assert kept.returncode == 0 and "removed 2020-01-01/a-job" in kept.stdout
    assert (root / yesterday / "a-job" / "report.json").is_file()


def test_windows_past_any_date_are_said_in_one_line(tmp_path: Path, settings: Settings) -> None:
    # Each ended in an OverflowError traceback: a number too large for a timedelta. (An age
    # past the calendar for `audit prune` is refused: see the test above.)
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    for args, said in (
        (["stats", "--last", "99999999999999w"], "at most 8d, not '99999999999999w'"),
        (["insights", "--last", "99999999999d"], "at most 7d, not '99999999999d'"),
    ):
        result = formwork(*args, tmp_path=tmp_path, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr, result.stderr


async def test_abort_of_a_paused_job_says_a_worker_ends_it_and_a_worker_does(
    billing: Site, tmp_path: Path, settings: Settings, browser_host: BrowserHost
) -> None:
    # It said "it ends cancelled now" while the abort was only a decision queued for a worker:
    # with none up, the job stayed paused, and the operator had been told it had ended.
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        async with running_worker(settings, browser_host):
            handle = await paused_for_the_customer(billing, client, "cli-abort-paused")
        last = await handle.last_event_id()
        env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
        aborted = await asyncio.to_thread(
            formwork, "abort", "cli-abort-paused", tmp_path=tmp_path, env=env
        )
        assert aborted.returncode == 0, aborted.stderr
        assert aborted.stdout.strip() == (
            "cli-abort-paused was needs_customer_input: abort sent; it ends cancelled when a "
            "worker carries it out (formwork watch cli-abort-paused follows it)"
        )
        assert await handle.status() == JobStatus.needs_customer_input  # no worker is up
        async with running_worker(settings, browser_host):
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


def test_a_setting_with_a_bad_value_is_named_in_one_line_without_a_traceback(
    tmp_path: Path, settings: Settings
) -> None:
    # Every command read the environment through pydantic and printed its traceback, the
    # value of a secret setting included.
    base = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    for variable, value, said in (
        ("FORMWORK_MAX_JOBS", "abc", "FORMWORK_MAX_JOBS='abc': Input should be a valid integer"),
        ("FORMWORK_POLL_DELAY", "0", "FORMWORK_POLL_DELAY='0': Input should be greater than 0"),
        ("FORMWORK_KEY_PREFIX", "a b", "FORMWORK_KEY_PREFIX='a b': String should match"),
        ("FORMWORK_STATE_KEY", "cli-short-key", "FORMWORK_STATE_KEY: String should have at least"),
        ("REDIS_URL", "foo://:cli-pw-63@h/0", "REDIS_URL='foo://:***@h/0': a Redis URL starts"),
        ("FORMWORK_LOG_FORMAT", "xml", "FORMWORK_LOG_FORMAT='xml': should be json or text"),
        # Read by nothing, it left every command on the default Redis without a word.
        ("FORMWORK_REDIS_URL", "redis://h/3", "FORMWORK_REDIS_URL is not read: the queue's"),
    ):
        result = formwork("stats", tmp_path=tmp_path, env={**base, variable: value})
        assert result.returncode == 2, (variable, result.stderr)
        assert result.stderr.startswith(f"formwork: {said}"), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "cli-short-key" not in result.stderr and "cli-pw-63" not in result.stderr
    result = formwork("worker", "--max-jobs", "0", tmp_path=tmp_path, env=base)
    assert result.returncode == 2
    assert result.stderr == "formwork: --max-jobs=0: Input should be greater than or equal to 1\n"


def test_a_redis_url_that_cannot_be_read_is_named_in_one_line_by_commands_and_workers(
    tmp_path: Path, settings: Settings
) -> None:
    # Each ended every command (and the worker) in a traceback from urllib, redis-py or arq;
    # a database that is not a number was database 0 to the commands but stopped the worker.
    for url, shown, why in (
        ("redis://:cli-pw-88@127.0.0.1:abc/12", "redis://:***@127.0.0.1:abc/12",
         "the port is a number from 0 to 65535"),
        ("redis://127.0.0.1:99999/12", "redis://127.0.0.1:99999/12",
         "the port is a number from 0 to 65535"),
        ("redis://127.0.0.1:6379/abc", "redis://127.0.0.1:6379/abc",
         "the database is a number (redis://host:6379/0), not 'abc'"),
        ("redis://127.0.0.1:6379/12?colour=red", "redis://127.0.0.1:6379/12?colour=red",
         "colour in its query is no Redis setting"),
        ("redis://127.0.0.1:6379/12?socket_timeout=soon",
         "redis://127.0.0.1:6379/12?socket_timeout=soon",
         "invalid value for 'socket_timeout' in connection URL"),
        ("redis://:cli-pw-88@[::1/12", "redis://:***@[::1/12", "not a URL: invalid IPv6 URL"),
    ):  # fmt: skip
        said = f"formwork: REDIS_URL={shown!r}: {why}\n"
        for args in (["stats"], ["status", "cli-x"], ["worker", "--burst"]):
            result = formwork(*args, tmp_path=tmp_path, env=worker_env(settings, REDIS_URL=url))
            assert result.returncode == 2, (url, args, result.stderr)
            assert result.stderr == said, (args, result.stderr)
            assert "cli-pw-88" not in result.stdout + result.stderr


def test_commands_say_in_one_line_that_redis_cannot_be_reached(tmp_path: Path) -> None:
    # Every command that reads Redis printed redis-py's traceback when nothing answered.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = {"REDIS_URL": f"redis://:cli-pw-17@127.0.0.1:{closed}/12"}
    for args in (["stats"], ["status", "cli-x"], ["handoffs"], ["rollout", "status"]):
        result = formwork(*args, tmp_path=tmp_path, env=env)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith(
            f"formwork: Redis at redis://:***@127.0.0.1:{closed}/12: Error 111 connecting"
        ), result.stderr
        assert result.stderr.count("\n") == 1 and "cli-pw-17" not in result.stderr


def test_replay_takes_a_threshold_from_0_to_1_only(tmp_path: Path) -> None:
    # NaN, or 5 meant as 5%, passed every screenshot however much it changed; a negative
    # one failed every step. Each turned the QA gate's verdict into noise, silently.
    bundle = str(ROOT / "fixtures" / "recordings" / "billing-issue_credit")
    for given in ("nan", "5", "-0.1", "1%"):
        result = formwork("replay", bundle, "--from-har", "--threshold", given, tmp_path=tmp_path)
        assert result.returncode == 2, (given, result.stderr)
        assert "argument --threshold: a share from 0 to 1" in result.stderr, result.stderr


def test_a_chromium_that_cannot_be_launched_is_said_in_one_line(
    billing: Site, tmp_path: Path, settings: Settings
) -> None:
    # `run` and `worker` printed Playwright's traceback for a mistyped FORMWORK_CHROMIUM.
    missing = str(tmp_path / "no-chromium")
    said = (
        "formwork: Chromium: BrowserType.launch: Failed to launch chromium because executable "
        f"doesn't exist at {missing}\n"
    )
    ran = formwork(
        "run", "billing/issue_credit", "--site-url", billing.url, *RUN_INPUTS,
        tmp_path=tmp_path, env={"FORMWORK_CHROMIUM": missing},
    )  # fmt: skip
    assert ran.returncode == 1 and ran.stderr == said, ran.stderr
    worker = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker"], cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=False, env=worker_env(settings, FORMWORK_CHROMIUM=missing),
    )  # fmt: skip
    assert worker.returncode == 1 and worker.stderr == said, worker.stderr


def test_a_secrets_file_that_is_not_yaml_is_one_line_without_its_values(
    tmp_path: Path, settings: Settings
) -> None:
    # The worker printed a traceback whose chained YAML error quoted the broken line: a
    # password, in the worker's output.
    broken = tmp_path / "secrets.yaml"
    broken.write_text("billing_username: cli-bot\nbilling_password: cli-Pa55: word\n")
    said = f"formwork: secrets file {broken} cannot be read as YAML (line 2, column 27)\n"
    worker = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker"], cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=False,
        env=worker_env(settings, FORMWORK_SECRETS_FILE=str(broken)),
    )  # fmt: skip
    assert worker.returncode == 2 and worker.stderr == said, worker.stderr
    assert "cli-Pa55" not in worker.stdout + worker.stderr
    bundle = str(ROOT / "fixtures" / "recordings" / "billing-issue_credit")
    replay = formwork(
        "replay", bundle, "--from-har", "--out", str(tmp_path / "replay"), tmp_path=tmp_path,
        env={"FORMWORK_SECRETS_FILE": str(broken)},
    )  # fmt: skip
    assert replay.returncode == 2 and replay.stderr == said, replay.stderr


def test_a_worker_whose_metrics_port_is_taken_says_so_and_exits(
    tmp_path: Path, settings: Settings
) -> None:
    # Waiting cannot free a port another process holds: it used to be taken for a lost Redis
    # and tried again for ever.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "worker", "--metrics-port", str(port)],
            cwd=ROOT, env=worker_env(settings), capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"formwork: metrics port {port} on 127.0.0.1 is in use" in result.stderr
    assert "lost Redis" not in result.stderr and "Traceback" not in result.stderr


def test_a_metrics_host_that_is_no_address_here_is_named_as_the_setting(
    tmp_path: Path, settings: Settings
) -> None:
    # It said "metrics port N on 192.0.2.1 cannot be listened on: error while attempting to
    # bind on address ('192.0.2.1', N): cannot assign requested address", naming no setting.
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker", "--metrics-port", "0"], cwd=ROOT,
        env=worker_env(settings, FORMWORK_METRICS_HOST="192.0.2.1"), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith(
        "formwork: metrics port 0 on 192.0.2.1 cannot be listened on: "
        "FORMWORK_METRICS_HOST='192.0.2.1' is no address of this machine "
        "(Cannot assign requested address)\n"
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_never_prints_the_redis_password(tmp_path: Path, settings: Settings) -> None:
    # Its first line names the queue and the Redis it serves: it printed REDIS_URL whole,
    # password and all, into whatever collects the worker's output.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens: the worker keeps trying, printing
    url = f"redis://:cli-redis-pass-71@127.0.0.1:{closed}/12"
    with subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=worker_env(settings, REDIS_URL=url),
    ) as worker:  # fmt: skip
        try:
            assert worker.stdout is not None
            lines = [worker.stdout.readline() for _ in range(3)]
        finally:
            worker.kill()
    assert f"on redis://:***@127.0.0.1:{closed}/12" in lines[0], lines
    assert not [line for line in lines if "cli-redis-pass-71" in line], lines


def test_files_and_ports_that_cannot_be_used_are_said_in_one_line(
    billing: Site, tmp_path: Path
) -> None:
    ran = formwork(
        "run", "billing/issue_credit", "--site-url", billing.url, "--job-id", "cli-files",
        *RUN_INPUTS, tmp_path=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    # A `formwork run` job is in no queue: its recording is made from its report on disk.
    exported = formwork("recording", "export", "cli-files", "--out", str(tmp_path / "rec"),
                        tmp_path=tmp_path)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "rec" / "recording.json").read_text())["job_id"] == "cli-files"
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "a-file").write_text("")
    missing = tmp_path / "nowhere" / "x.html"
    port = billing.url.rsplit(":", 1)[1].rstrip("/")  # held by the running fixture site
    cases = [
        (["audit", "export", "cli-files", "--out", str(missing)], 1,
         f"formwork: cannot write audit export {missing}: No such file or directory"),
        (["recording", "export", "x", "--report", str(tmp_path / "none.json")], 1,
         f"formwork: cannot read report {tmp_path / 'none.json'}: No such file or directory"),
        (["recording", "export", "x", "--report", str(tmp_path / "bad.json")], 1,
         f"formwork: report {tmp_path / 'bad.json'} is not a job report: (all): Invalid JSON"),
        (["schema", "--out", str(tmp_path / "a-file" / "x")], 1,
         f"formwork: cannot write schemas to {tmp_path / 'a-file' / 'x'}: Not a directory"),
        (["fixtures", "serve", "nosuch"], 2,
         "formwork: unknown fixture site 'nosuch'; known sites: billing, helpdesk, orders"),
        (["fixtures", "serve", "billing", "--port", port], 1,
         f"formwork: cannot listen on 127.0.0.1:{port}: the port is in use"),
        (["audit", "serve", "--port", port], 1,
         f"formwork: cannot listen on 127.0.0.1:{port}: the port is in use"),
        (["fixtures", "serve", "billing", "--port", "99999"], 2,
         "argument --port: a port is 0 to 65535, not 99999"),
        (["worker", "--metrics-port", "-1"], 2, "argument --metrics-port: a port is 0 to 65535"),
    ]  # fmt: skip
    for args, code, why in cases:
        result = formwork(*args, tmp_path=tmp_path)
        assert result.returncode == code, (args, result.returncode, result.stderr)
        assert why in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not missing.parent.exists()


def test_a_script_file_must_sit_in_the_scripts_layout(tmp_path: Path) -> None:
    copy = tmp_path / "copy.yaml"
    shutil.copy(ROOT / "scripts" / "billing" / "issue_credit.yaml", copy)
    (tmp_path / "broken.yaml").write_text("name: [bad\n")
    for outside in (copy, tmp_path / "broken.yaml"):
        result = formwork("run", str(outside), tmp_path=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"script file {outside} must sit at <scripts dir>/<site>/<name>.yaml" in (
            result.stderr
        )
        assert "must look like 'site/name'" not in result.stderr
    # Inside the layout, a broken file is reported as what it is, like `formwork validate`.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "selectors", tree / "selectors")
    (tree / "scripts" / "billing").mkdir(parents=True)
    shutil.copy(tmp_path / "broken.yaml", tree / "scripts" / "billing" / "broken.yaml")
    broken = formwork("run", str(tree / "scripts" / "billing" / "broken.yaml"), tmp_path=tmp_path)
    assert broken.returncode == 2
    assert "broken.yaml:2: not valid YAML" in broken.stdout, broken.stdout + broken.stderr


def test_a_secrets_file_that_is_not_there_is_said_to_be_missing(tmp_path: Path) -> None:
    absent = tmp_path / "secrets.yaml"
    result = formwork(
        "run", "billing/issue_credit", "--secrets-file", str(absent), tmp_path=tmp_path
    )
    assert result.returncode == 2
    assert f"formwork: secrets file {absent} does not exist" in result.stderr, result.stderr


def test_stats_refuses_a_window_longer_than_the_rollups_are_kept(
    tmp_path: Path, settings: Settings
) -> None:
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    longer = formwork("stats", "--last", "30d", tmp_path=tmp_path, env=env)
    assert longer.returncode == 2, longer.stdout
    assert "hourly rollups are kept 8 days: at most 8d, not '30d'" in longer.stderr
    kept = formwork("stats", "--last", "8d", tmp_path=tmp_path, env=env)
    assert kept.returncode == 0, kept.stderr


def test_insights_refuses_a_window_longer_than_the_job_records_are_kept(
    tmp_path: Path, settings: Settings
) -> None:
    # Its header claimed the whole span ("jobs settled 2026-08-26 - …" for 100d) while the
    # index it reads keeps a week.
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    longer = formwork("insights", "--last", "100d", tmp_path=tmp_path, env=env)
    assert longer.returncode == 2, longer.stdout
    assert "job records are kept 7 days: at most 7d, not '100d'" in longer.stderr
    kept = formwork("insights", "--last", "7d", tmp_path=tmp_path, env=env)
    assert kept.returncode == 0, kept.stderr


async def test_resume_refuses_inputs_the_jobs_script_refuses_before_sending(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        handle = await paused_for_the_customer(billing, client, "cli-inputs")
        for pair, why in (
            ("nosuch=1", "input 'nosuch' is not declared by billing/issue_credit@1; it takes: "
             "account_id, amount, reason, reference"),
            ("amount=lots", "inputs refused by billing/issue_credit@1: input 'amount': "),
            ("amount=900", "input 'amount': "),
        ):  # fmt: skip
            refused = await asyncio.to_thread(
                formwork, "resume", "cli-inputs", "retry_with_inputs", "--input", pair,
                tmp_path=tmp_path, env=env,
            )  # fmt: skip
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert why in refused.stderr and "nothing was sent" in refused.stderr
            assert "sent for" not in refused.stdout
        # Nothing was sent: the pause still waits for its one decision.
        assert [job_id for job_id, _, _ in await client.paused()] == ["cli-inputs"]
        report = await handle.report()
        assert report is not None and report.decisions == []
        # Where the script cannot be loaded, the inputs go unchecked and that is said.
        elsewhere = {**env, "FORMWORK_SCRIPTS_DIR": str(tmp_path / "no-scripts")}
        sent = await asyncio.to_thread(
            formwork, "resume", "cli-inputs", "retry_with_inputs", "--input", "amount=9.00",
            "--watch", tmp_path=tmp_path, env=elsewhere,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "values not checked here" in sent.stderr and "the worker checks them" in sent.stderr
    assert [c["amount"] for c in billing.credits()] == ["9.00"]


async def test_handoff_shows_its_deadline_and_each_done_step_once(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        # The site never answers the commit: its probe looks twice and finds no credit.
        billing.faults(commit_drop={"create": False, "mode": "error", "status": 502, "times": 5})
        job = BrowserJob(
            job_id="cli-twice", script="billing/issue_credit", site_url=billing.url,
            inputs=CREDIT_INPUTS,
        )  # fmt: skip
        report = await (await client.enqueue(job)).wait(90)
        assert report.status == JobStatus.paused_for_handoff and report.handoff is not None
        assert report.handoff.expires_at is not None
        done = report.handoff.context.completed_steps
        assert len(done) > len(set(done))  # the record lists each run of a step
    shown = await asyncio.to_thread(formwork, "handoff", "cli-twice", tmp_path=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    expires = f"{report.handoff.expires_at:%Y-%m-%d %H:%M:%S} UTC, in "
    assert any(line.startswith(f"  expires:   {expires}") for line in lines), shown.stdout
    [listed] = [line.removeprefix("  done:      ") for line in lines if "done:" in line]
    assert listed.split(", ") == list(dict.fromkeys(done))
    listing = await asyncio.to_thread(formwork, "handoffs", tmp_path=tmp_path, env=env)
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["job", "age", "site", "status", "summary"]
    assert [row.split()[0] for row in rows] == ["cli-twice"]


async def test_handoff_says_when_a_job_no_longer_waits_for_a_decision(
    billing: Site, tmp_path: Path, settings: Settings, browser_host: BrowserHost
) -> None:
    # An expired job keeps the request it waited with, and a pause whose decision is taken
    # stays paused until a worker carries it out: both were shown as open questions.
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        async with running_worker(settings, browser_host):
            rule = {"field": "amount", "value": "15.00", "message": "Too much"}
            billing.faults(reject_value=[rule])
            job = BrowserJob(
                job_id="cli-late", script="billing/issue_credit", site_url=billing.url,
                inputs=CREDIT_INPUTS, pause_timeout_s=1,
            )  # fmt: skip
            handle = await client.enqueue(job)
            paused = await handle.wait(60)
            assert paused.status == JobStatus.needs_customer_input
            expired = await handle.wait(30, after=await handle.last_event_id())
            assert expired.status == JobStatus.expired and expired.handoff is not None
            await paused_for_the_customer(billing, client, "cli-decided")
        # No worker now: the decision is taken and waits.
        assert await client.resume("cli-decided", ResumeDecision(decision="abort", by="qa"))

    late = await asyncio.to_thread(formwork, "handoff", "cli-late", tmp_path=tmp_path, env=env)
    assert late.returncode == 1 and late.stdout == ""
    assert "job cli-late is expired, not waiting for a decision" in late.stderr
    decided = await asyncio.to_thread(
        formwork, "handoff", "cli-decided", tmp_path=tmp_path, env=env
    )
    assert decided.returncode == 0, decided.stderr
    assert decided.stdout.splitlines()[1].startswith("  DECIDED:   a decision is taken")

    # The review page of the expired job shows its request as closed, not as a question.
    record = LocalArtifacts(settings.artifacts_dir).find_audit("cli-late")
    page_file = tmp_path / "late.html"
    page_file.write_text(export_html(LocalArtifacts(settings.artifacts_dir), record))
    context = await browser_host.new_context()
    try:
        page = await context.new_page()
        await page.goto(page_file.as_uri())
        card = page.locator("#handoff")
        await expect(card.locator("h2")).to_have_text(
            "Handoff closed: no decision came before its deadline"
        )
        await expect(card.locator("details")).not_to_have_attribute("open", "")
        await expect(page.locator("#job-status")).to_have_text("expired")
    finally:
        await context.close()


async def test_control_characters_from_the_site_never_reach_the_terminal(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    # The site's error text went to the operator's terminal as it was: an escape sequence
    # in it recoloured, moved the cursor or retitled the window; CR overwrote the line.
    said = "Refused \x1b[2J\x1b]0;pwned\x07 \r\u202eevil\u202c \x9b1m\nnext line"
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        billing.faults(reject_value=[{"field": "amount", "value": "15.00", "message": said}])
        job = BrowserJob(
            job_id="cli-esc", script="billing/issue_credit", site_url=billing.url,
            inputs=CREDIT_INPUTS,
        )  # fmt: skip
        report = await (await client.enqueue(job)).wait(60)
    assert report.status == JobStatus.needs_customer_input
    assert report.handoff is not None and "\x1b[2J" in (report.handoff.evidence.page_text or "")
    commands = [
        ["handoffs"], ["handoff", "cli-esc"], ["status", "cli-esc"], ["watch", "cli-esc"],
        ["handoff", "cli-esc", "--json"],
    ]  # fmt: skip
    runs = await asyncio.gather(
        *(asyncio.to_thread(formwork, *command, tmp_path=tmp_path, env=env) for command in commands)
    )
    for shown in runs:
        text = shown.stdout + shown.stderr
        assert "cli-esc" in text or "Refused" in text, text
        for raw in ("\x1b", "\x07", "\r", "\u202e", "\x9b"):
            assert raw not in text, (shown.args, raw)
    assert "Refused \\u001b[2J\\u001b]0;pwned\\u0007" in runs[1].stdout
    # A line break in the site's text does not break the list's columns: one row per job.
    [row] = [line for line in runs[0].stdout.splitlines() if line.startswith("cli-esc")]
    assert row.endswith('next line"'), runs[0].stdout
    # --json is still JSON, and means the same text.
    assert json.loads(runs[4].stdout)["evidence"]["page_text"] == report.handoff.evidence.page_text


async def test_outputs_a_person_supplies_must_be_ones_the_script_extracts(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    # mark_done with a misspelt output was carried out: the job succeeded with a claim of
    # `confirmation_nmber` and none of the confirmation_number the orchestrator reads.
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        billing.faults(commit_drop={"create": False, "mode": "error", "status": 502, "times": 5})
        job = BrowserJob(
            job_id="cli-typo", script="billing/issue_credit", site_url=billing.url,
            inputs=CREDIT_INPUTS,
        )  # fmt: skip
        handle = await client.enqueue(job)
        paused = await handle.wait(90)
        assert paused.status == JobStatus.paused_for_handoff and paused.handoff is not None
        assert "mark_done" in paused.handoff.allowed_decisions

        typo = ["resume", "cli-typo", "mark_done", "--output", "confirmation_nmber=CN-7"]
        refused = await asyncio.to_thread(formwork, *typo, tmp_path=tmp_path, env=env)
        assert refused.returncode == 2, refused.stderr
        assert (
            "output 'confirmation_nmber' is not one billing/issue_credit@1 extracts (did you "
            "mean 'confirmation_number'?); it extracts: confirmation_number; nothing was sent"
        ) in refused.stderr
        assert (await read_pause(client.redis, client.keys, "cli-typo")).waiting
        # So is a value the script's pattern would never keep.
        bare = ["resume", "cli-typo", "mark_done", "--output", "confirmation_number=7"]
        refused = await asyncio.to_thread(formwork, *bare, tmp_path=tmp_path, env=env)
        assert refused.returncode == 2, refused.stderr
        assert (
            "output 'confirmation_number': '7' is not what pattern 'CN-[0-9]+' keeps: "
            "billing/issue_credit@1 would never extract it; nothing was sent"
        ) in refused.stderr

        # Sent around the command, the worker refuses it; the job still waits.
        last = await handle.last_event_id()
        around = ResumeDecision(decision="mark_done", outputs={"confirmation_nmber": "CN-7"})
        assert await client.resume("cli-typo", around)
        still = await handle.wait(30, after=last)
        assert still.status == JobStatus.paused_for_handoff
        assert (still.decisions[-1].note or "").startswith("refused: output 'confirmation_nmber'")

        done = ["resume", "cli-typo", "mark_done", "--output", "confirmation_number=CN-7"]
        sent = await asyncio.to_thread(formwork, *done, "--watch", tmp_path=tmp_path, env=env)
        assert sent.returncode == 0, sent.stderr
        report = await handle.report()
    assert report is not None and report.status == JobStatus.succeeded
    assert report.outputs == {"confirmation_number": "CN-7"}


async def test_handoff_shows_the_values_a_decision_would_correct(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    # It asked to "check account_id, amount, reason, reference" without showing them: the
    # operator had to read `status --json` to see what the customer should correct.
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        await paused_for_the_customer(billing, client, "cli-values")
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    shown = await asyncio.to_thread(formwork, "handoff", "cli-values", tmp_path=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert (
        "  inputs:    account_id = AC-10231, amount = 15.00, reason = damaged item, "
        "reference = T-88812"
    ) in shown.stdout.splitlines()


async def test_handoffs_keeps_its_columns_and_says_ages_as_people_read_them(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    # Ages were seconds only (a day-old pause: 86400s), and an id longer than 24 characters
    # pushed its row's columns out from under the header.
    long_id = "zendesk-ticket-4471902-credit-request-2"
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        await paused_for_the_customer(billing, client, long_id)
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    listing = await asyncio.to_thread(formwork, "handoffs", tmp_path=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()
    assert row.startswith(long_id + " ")
    for column, value in (("site", "billing"), ("status", "needs_customer_input")):
        assert row.index(value) == header.index(column), (header, row)
    age = row[len(long_id) :].split()[0]
    assert re.fullmatch(r"\d+m\d\ds", age), age
    assert header.index("age") + len("age") == row.index(age) + len(age)  # right-aligned


async def test_operator_commands_say_in_one_line_when_redis_does_not_answer(
    tmp_path: Path,
) -> None:
    # Each ended in a redis ConnectionError traceback.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens once it is closed
    env = {"REDIS_URL": f"redis://:not-shown-pw@127.0.0.1:{port}/0"}
    commands = [["handoffs"], ["handoff", "j"], ["resume", "j", "abort"], ["abort", "j"],
                ["status", "j"], ["watch", "j"]]  # fmt: skip
    runs = await asyncio.gather(
        *(asyncio.to_thread(formwork, *command, tmp_path=tmp_path, env=env) for command in commands)
    )
    for command, run in zip(commands, runs, strict=True):
        assert run.returncode == 1, (command, run.stderr)
        assert run.stderr.startswith("formwork: Redis at "), (command, run.stderr)
        assert f"127.0.0.1:{port}" in run.stderr and len(run.stderr.splitlines()) == 1
        assert "not-shown-pw" not in run.stderr


async def test_operator_commands_give_up_on_a_redis_that_takes_the_connection_but_never_answers(
    tmp_path: Path, settings: Settings
) -> None:
    # A listener that never answers (a stopped server, a port forwarded nowhere) and TLS
    # spoken to a plain Redis (rediss://) each held every command for ever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        tls = settings.redis_url.replace("redis://", "rediss://", 1)
        urls = {
            f"redis://:not-shown-pw@127.0.0.1:{port}/12": f"Timeout reading from 127.0.0.1:{port}",
            tls: "Timeout connecting to server",
        }
        commands = [["status", "j"], ["handoffs"], ["stats"], ["watch", "j"]]

        def command(url: str, args: list[str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "worker.cli", *args], cwd=ROOT, capture_output=True,
                text=True, timeout=45, check=False, env={**os.environ, "REDIS_URL": url},
            )  # fmt: skip

        runs = await asyncio.gather(
            *(asyncio.to_thread(command, url, args) for url in urls for args in commands)
        )
    said = [(url, why) for url, why in urls.items() for _ in commands]
    for (url, why), run in zip(said, runs, strict=True):
        assert run.returncode == 1, (url, run.args, run.stderr)
        shown = url.replace(":not-shown-pw@", ":***@")
        assert run.stderr == f"formwork: Redis at {shown}: {why}\n", run.stderr


async def test_a_job_record_this_version_cannot_read_is_said_in_one_line(
    tmp_path: Path, settings: Settings, client: FormworkClient
) -> None:
    # A report with a field this version does not know (a newer worker's, in a rolling
    # upgrade), or a status it does not know, ended every command on that job in pydantic's
    # traceback.
    newer = JobReport(job_id="cli-newer", status=JobStatus.succeeded, script="billing/issue_credit")
    report = {**json.loads(newer.model_dump_json()), "carbon_grams": 3}
    await client.redis.hset(
        client.keys.job("cli-newer"), mapping={"status": "succeeded", "report": json.dumps(report)}
    )
    await client.redis.hset(client.keys.job("cli-odd"), mapping={"status": "hibernating"})
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    commands = [["status", "cli-newer"], ["status", "cli-newer", "--json"], ["watch", "cli-newer"],
                ["handoff", "cli-newer"], ["abort", "cli-newer"], ["resume", "cli-newer", "abort"],
                ["status", "cli-odd"]]  # fmt: skip
    runs = await asyncio.gather(
        *(asyncio.to_thread(formwork, *args, tmp_path=tmp_path, env=env) for args in commands)
    )
    for args, run in zip(commands, runs, strict=True):
        assert run.returncode == 1, (args, run.stderr)
        why = (
            "status: Input should be 'queued', 'running'"
            if args[1] == "cli-odd"
            else "JobReport: carbon_grams: Extra inputs are not permitted"
        )
        assert run.stderr.startswith(
            f"formwork: job {args[1]}'s record in Redis cannot be read ({why}"
        ), (args, run.stderr)
        assert run.stderr.endswith("was it written by another version of Formwork?\n")
        assert len(run.stderr.splitlines()) == 1, run.stderr


async def test_a_decision_sent_without_by_names_the_login_it_came_from(
    billing: Site, tmp_path: Path, settings: Settings, worker: Worker
) -> None:
    # Without --by the audit trail said the decision was "by cli": no person at all.
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        handle = await paused_for_the_customer(billing, client, "cli-who")
        last = await handle.last_event_id()
        sent = await asyncio.to_thread(formwork, "resume", "cli-who", "abort", tmp_path=tmp_path,
                                       env=env)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        report = await handle.wait(30, after=last)
    assert report.status == JobStatus.cancelled
    assert [d.by for d in report.decisions] == [f"{getpass.getuser()} (cli)"]


def test_audit_serve_beyond_this_machine_warns_that_it_has_no_sign_in(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The port is held, so the command stops right after its warning.
        exposed = formwork("audit", "serve", "--host", "0.0.0.0", "--port", str(port),
                           tmp_path=tmp_path)  # fmt: skip
        local = formwork("audit", "serve", "--port", str(port), tmp_path=tmp_path)
    assert exposed.returncode == 1, exposed.stderr
    assert exposed.stderr.splitlines()[0] == (
        f"formwork audit: warning: the review UI has no sign-in; anyone who can reach "
        f"0.0.0.0:{port} can read every job's evidence"
    )
    assert "no sign-in" not in local.stderr


def test_audit_serve_names_the_url_it_listens_on_once_it_does(tmp_path: Path) -> None:
    # It printed its URL before it listened: `--port 0` (any free port) gave
    # http://127.0.0.1:0/, which nobody can open, and a port in use printed a URL (another
    # server's) above the error saying it could not listen there.
    with subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "audit", "serve", "--port", "0",
         "--artifacts", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    ) as server:  # fmt: skip
        try:
            assert server.stdout is not None
            line = server.stdout.readline()  # blocks until it is said
            url = re.search(r"^formwork audit: (http://127\.0\.0\.1:(\d+)/) ", line)
            assert url is not None and url[2] != "0", line
            with urllib.request.urlopen(url[1], timeout=30) as page:
                assert page.status == 200
        finally:
            server.terminate()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = formwork("audit", "serve", "--port", str(port), tmp_path=tmp_path)
    assert refused.returncode == 1, refused.stderr
    assert refused.stdout == "", refused.stdout


async def test_watch_says_so_when_the_jobs_record_is_gone(
    billing: Site, tmp_path: Path, settings: Settings
) -> None:
    # A Redis that came back without its data (no snapshot) or a record deleted by hand: the
    # stream ends with no report, and `watch` exited 1 without a word, as if the job failed.
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        job = BrowserJob(
            job_id="cli-gone", script="billing/issue_credit", inputs=CREDIT_INPUTS,
            site_url=billing.url,
        )  # fmt: skip
        await client.enqueue(job)  # no worker: it stays queued
        watch = asyncio.create_task(
            asyncio.to_thread(formwork, "watch", "cli-gone", tmp_path=tmp_path, env=env)
        )
        db = str(client.redis.connection_pool.connection_kwargs.get("db", 0))

        async def watching() -> bool:  # the watch's XREAD, on our database (others share Redis)
            clients = await client.redis.client_list()
            return any(c["cmd"] == "xread" and c["db"] == db for c in clients)

        async with asyncio.timeout(30):  # another process's connection: only polled
            while not await watching():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        keys = client.keys
        await client.redis.zrem(keys.queue, "cli-gone")
        await client.redis.delete(
            ARQ_JOB_PREFIX + "cli-gone", keys.job("cli-gone"), keys.events("cli-gone")
        )
        result = await watch
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "formwork: job cli-gone has no record any more (it expired, or Redis lost its data): "
        "how it ended is not known here"
    ]


def test_a_worker_started_from_settings_gets_every_one_of_them() -> None:
    # `Settings.to_env()` starts `formwork worker` processes (tests, benchmarks); it left the
    # webhook secret and hosts out, so such a worker refused every job with a webhook.
    every = Settings(
        redis_url="redis://127.0.0.1:6379/7", max_jobs=3, artifacts_dir=Path("/tmp/a"),
        artifacts_url="s3://bucket/p", s3_endpoint_url="http://127.0.0.1:9000",
        scripts_dir=Path("/tmp/s"), selectors_dir=Path("/tmp/r"), uploads_dir=Path("/tmp/u"),
        secrets_file=Path("/tmp/secrets.yaml"), chromium="/usr/bin/chromium",
        poll_delay_s=0.5, shutdown_grace_s=7, job_timeout_s=99, key_prefix="p-1",
        webhook_secret="hook-secret-1", webhook_hosts=["hooks.example", "127.0.0.1"],
        state_key="k" * 32, metrics_port=9101, metrics_host="0.0.0.0", browser_recycle_jobs=5,
    )  # fmt: skip
    assert set(every.model_dump(exclude_defaults=True)) == set(Settings.model_fields)
    assert Settings.from_env(every.to_env()) == every


def test_make_setup_s_redis_check_says_a_bad_url_or_refused_password_in_one_line() -> None:
    # `python -m worker.localredis` (make setup) ended a malformed URL in a traceback, and for a
    # local URL with a password the local Redis refused, started a second redis-server that
    # could not bind, waited 10 s and said nothing answers.
    url = os.environ.get("FORMWORK_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    with_password = url.replace("redis://", "redis://:not-the-password@", 1)
    for given, said in (
        ("redis://127.0.0.1:abc/0", "REDIS_URL='redis://127.0.0.1:abc/0': the port is a number"),
        ("http://127.0.0.1:6379/0", "a Redis URL starts with redis://, rediss:// or unix://"),
        (with_password, "but refuses this connection: AUTH <password> called without"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "worker.localredis", given],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 1, (given, result.stdout, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "not-the-password" not in result.stderr
        assert "started" not in result.stdout + result.stderr


async def test_commands_never_write_a_configured_secret_into_redis(
    billing: Site,
    tmp_path: Path,
    settings: Settings,
    browser_host: BrowserHost,
    fixture_secrets: dict[str, str],
) -> None:
    # A value carrying a secret the worker would refuse (an input) or withhold (an abort's
    # reason, a decision's note) was written first: it sat in the job's envelope, the abort
    # flag or the decision's message, in the clear, until a worker took it — a day, a week,
    # while every worker was busy or down.
    password = fixture_secrets["billing_password"]
    env = {"REDIS_URL": settings.redis_url, "FORMWORK_KEY_PREFIX": settings.key_prefix}
    inputs = [*RUN_INPUTS[:4], "--input", "reference=T-88812"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return formwork(*args, tmp_path=tmp_path, env=env)

    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client:
        async with running_worker(settings, browser_host):
            paused = await paused_for_the_customer(billing, client, "cli-secret-paused")
        # No worker from here on: what the commands write stays in Redis as they wrote it.
        refused = await asyncio.to_thread(
            cli, "enqueue", "billing/issue_credit", "--job-id", "cli-secret-sent",
            "--site-url", billing.url, *inputs, "--input", f"reason=pw {password}",
        )  # fmt: skip
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "inputs.reason carries the value of a configured secret" in refused.stderr
        assert "nothing was sent" in refused.stderr
        assert await client.handle("cli-secret-sent").status() is None

        queued = await asyncio.to_thread(
            cli, "enqueue", "billing/issue_credit", "--job-id", "cli-secret-queued",
            "--site-url", billing.url, *inputs, "--input", "reason=damaged item",
        )  # fmt: skip
        assert queued.returncode == 0, queued.stderr
        aborted = await asyncio.to_thread(
            cli, "abort", "cli-secret-queued", "--reason", f"customer said {password}"
        )
        assert aborted.returncode == 0, aborted.stderr
        assert "its reason carries the value of a configured secret: withheld" in aborted.stderr
        flag = await client.redis.get(client.keys.abort("cli-secret-queued"))
        assert flag == WITHHELD.encode()

        # A decision other than abort is refused, nothing sent; an abort goes, note withheld.
        retried = await asyncio.to_thread(
            cli, "resume", "cli-secret-paused", "retry_step", "--note", f"try {password}"
        )
        assert retried.returncode == 2, retried.stdout + retried.stderr
        assert "its note carries the value of a configured secret; nothing was sent" in (
            retried.stderr
        )
        assert not (await read_pause(client.redis, client.keys, "cli-secret-paused")).decided
        last = await paused.last_event_id()
        ended = await asyncio.to_thread(
            cli, "resume", "cli-secret-paused", "abort", "--note", f"pw was {password}"
        )
        assert ended.returncode == 0, ended.stderr
        assert (await read_pause(client.redis, client.keys, "cli-secret-paused")).decided

        assert _leaks_in_redis(settings.redis_url, [password]) == []
        # Workers carry both aborts out, with the reason and the note withheld.
        async with running_worker(settings, browser_host):
            report = await paused.wait(60, after=last)
            cancelled = await client.handle("cli-secret-queued").wait(60)
    assert report.status == JobStatus.cancelled
    assert report.decisions[-1].note == WITHHELD
    assert cancelled.status == JobStatus.cancelled and cancelled.error is not None
    assert cancelled.error.message == f"aborted: {WITHHELD}"


def test_make_setup_makes_again_a_venv_left_without_pip(tmp_path: Path) -> None:
    # Debian's `python3 -m venv` without python3-venv leaves a venv with a python and no pip.
    # `make setup` took any venv with a python for a made one: after python3-venv was
    # installed, every run failed on "No module named pip" until `make clean`.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    result = subprocess.run(
        ["make", "--no-print-directory", "venv", f"VENV={venv}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout, result.stderr)
    pip = subprocess.run([venv / "bin" / "python", "-m", "pip", "--version"], capture_output=True)
    assert pip.returncode == 0, pip.stderr


def test_make_setup_refuses_a_formwork_chromium_that_is_not_there(tmp_path: Path) -> None:
    # A FORMWORK_CHROMIUM set made `make setup` skip its Chromium check whatever it named: a
    # typo passed setup, and `make demo` went on to a worker that could not start.
    missing = tmp_path / "chromium"
    result = subprocess.run(
        ["make", "--no-print-directory", "system"],
        cwd=ROOT, env={**os.environ, "FORMWORK_CHROMIUM": str(missing)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert f"FORMWORK_CHROMIUM={missing} is not an executable file" in result.stdout


def test_help_says_the_defaults_and_the_settings_an_option_overrides(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `run --artifacts` said "default ./artifacts" where FORMWORK_ARTIFACTS_DIR applies, the
    # servers' --port and --host said no default, and `validate` said it checks scripts only.
    from worker.cli import main

    for args, said in (
        (["--help"], "load and check every selector registry, script and rollout file"),
        (["run", "--help"], "(FORMWORK_ARTIFACTS_DIR, else ./artifacts)"),
        (["run", "--help"], "YAML file of secret name: value (FORMWORK_SECRETS_FILE)"),
        (["worker", "--help"], "(FORMWORK_ARTIFACTS_DIR, else ./artifacts)"),
        (["worker", "--help"], "YAML file of secret name: value (FORMWORK_SECRETS_FILE)"),
        (["fixtures", "serve", "--help"], "default 8811; 0: any free one"),
        (["audit", "serve", "--help"], "default 8840; 0: any free one"),
        (["audit", "serve", "--help"], "default 127.0.0.1 (this machine only)"),
    ):
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0
        shown = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps it
        assert said in shown, (args, shown)


def _localredis(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.localredis", url],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_make_setup_s_redis_check_starts_no_redis_that_could_not_answer_and_says_why() -> None:
    # A port held by a server that is not Redis, or a rediss:// URL (a redis-server started
    # here speaks no TLS), or a unix socket: `make setup` started a redis-server anyway (on
    # TCP, or one that could not bind), waited 10 s and said it "started redis-server but
    # nothing answers", blaming itself for another server. A URL with a password got a
    # server without one, was refused by it, and left it running.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()  # takes connections (the kernel's backlog), never answers
        port = other.getsockname()[1]
        url = os.environ.get("FORMWORK_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
        for given, said in (
            (
                f"redis://127.0.0.1:{port}/0",
                f"something listens on 127.0.0.1:{port} but does not answer as Redis",
            ),
            (
                url.replace("redis://", "rediss://", 1),
                "(a plain Redis there? then redis://); only redis:// URLs get a local "
                "redis-server: it would not speak TLS",
            ),
            ("unix:///nowhere/redis.sock", "redis-server: start the one on that socket yourself"),
            (
                f"redis://:hidden-pw@127.0.0.1:{_free_port()}/0",
                "only a URL without a user or password gets a local redis-server",
            ),
        ):
            result = _localredis(given)
            assert result.returncode == 1, (given, result.stdout, result.stderr)
            assert said in result.stderr, result.stderr
            assert "started" not in result.stdout + result.stderr, result.stderr
            assert "hidden-pw" not in result.stderr


def test_make_setup_starts_a_local_redis_where_an_ipv6_loopback_url_looks_for_it() -> None:
    # redis://[::1]:N/0 started a redis-server bound to 127.0.0.1 only: nothing answered at
    # ::1, and the server was left running after the command gave up.
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        port = probe.getsockname()[1]
    result = _localredis(f"redis://[::1]:{port}/0")
    started = redis.Redis(host="::1", port=port)
    try:
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert f"started a local redis-server on port {port}" in result.stdout
        assert started.ping()
    finally:
        with contextlib.suppress(redis.ConnectionError):
            started.shutdown(nosave=True)


def test_make_demo_says_at_once_that_its_worker_exited_and_leaves_no_job_behind(
    redis_url: str, tmp_path: Path
) -> None:
    # A worker that cannot start (a Chromium that is not there) left `make demo` waiting 120 s
    # for events that never came, then ending in two tracebacks; its job stayed queued for the
    # next demo's worker, aimed at a fixture site long gone.
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "FORMWORK_CHROMIUM": str(tmp_path / "no-chromium-here"),
        "FORMWORK_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "no report: the demo's worker exited (code 1) before the job ended" in result.stdout
    assert "no-chromium-here" in result.stderr  # the worker's own reason, said above
    assert "Traceback" not in result.stderr, result.stderr
    job_id = re.search(r"as job (demo-[0-9a-f]+)", result.stdout)
    assert job_id is not None, result.stdout
    flags = redis.Redis.from_url(redis_url)
    try:
        # The next demo's worker cancels it instead of running it.
        assert flags.exists(Keys(DEMO_PREFIX).abort(job_id[1]))
    finally:
        flags.close()
