"""`formwork worker` processes: several share a queue; SIGTERM is graceful."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from arq.jobs import Job
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from worker.client import FormworkClient
from worker.contract import BrowserJob, EventKind, JobStatus, WebhookTarget
from worker.envelope import envelope, loads
from worker.keys import ARQ_RESULT_PREFIX, Keys
from worker.settings import Settings

from .conftest import (
    CREDIT_INPUTS,
    ROOT,
    SCRIPTS,
    Site,
    own_redis,
    signing_in_as_the_agent,
    worker_env,
)
from .test_webhooks import SECRET as WEBHOOK_SECRET
from .test_webhooks import receiver


@contextmanager
def worker_process(
    settings: Settings, log: Path, *, verbose: bool = True, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *(["-v"] if verbose else []), "worker"],
            cwd=ROOT, env=worker_env(settings, **env), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def job(site: Site, job_id: str, reference: str) -> BrowserJob:
    return BrowserJob(
        job_id=job_id,
        script="billing/issue_credit",
        inputs={**CREDIT_INPUTS, "reference": reference},
        site_url=site.url,
    )


async def test_twenty_jobs_across_two_worker_processes_each_run_exactly_once(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"max_jobs": 2})
    with (
        worker_process(settings, tmp_path / "w1.log"),
        worker_process(settings, tmp_path / "w2.log"),
    ):
        handles = [await client.enqueue(job(billing, f"p-{i}", f"T-{i:03d}")) for i in range(20)]
        reports = await asyncio.wait_for(asyncio.gather(*(h.wait(240) for h in handles)), 260)

    assert [r.status for r in reports] == [JobStatus.succeeded] * 20
    credits = billing.credits()
    assert sorted(c["reference"] for c in credits) == [f"T-{i:03d}" for i in range(20)]
    for handle in handles:
        events = [e async for _, e in handle.events(follow=False)]
        starts = [e for e in events if e.kind == EventKind.job and e.status == "running"]
        assert len(starts) == 1, handle.job_id  # ran once, on one worker
    logs = [(tmp_path / name).read_text() for name in ("w1.log", "w2.log")]
    assert all("browser_job" in text for text in logs), "both workers took jobs"


async def test_sigterm_lets_the_running_job_finish(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    billing.faults(latency_ms=100)
    settings = settings.model_copy(update={"shutdown_grace_s": 60})
    with worker_process(settings, tmp_path / "w.log") as proc:
        handle = await client.enqueue(job(billing, "p-term", "T-1"))
        async for _, event in handle.events():
            if event.step is not None and event.step.id == "open_account":
                proc.send_signal(signal.SIGTERM)
                break
        report = await handle.wait(120)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    assert report.status == JobStatus.succeeded
    assert len(billing.credits()) == 1
    # Structured logs: one JSON object per line; every line about a step names it all.
    lines = (tmp_path / "w.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == len(lines) - 1  # all but the banner printed before logging starts
    steps = [r for r in records if r["logger"] == "formwork.executor"]
    assert {r["step_id"] for r in steps} >= {"login.open", "submit", "confirmation"}
    assert all(
        (r["job_id"], r["site"], r["script"]) == ("p-term", "billing", "billing/issue_credit")
        for r in steps
    )
    # arq's own lines for the job (taken, done) name it too: a search by job id finds them.
    arq = [r for r in records if r["logger"] == "arq.worker" and "p-term:browser_job" in r["msg"]]
    assert [r["msg"].split()[1] for r in arq] == ["→", "←"]
    assert all(r.get("job_id") == "p-term" for r in arq)


async def test_sigterm_past_the_grace_period_requeues_the_job_for_another_worker(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    billing.faults(latency_ms=400)  # each page takes long enough to outlast a 1 s grace
    settings = settings.model_copy(update={"shutdown_grace_s": 1})
    handle = await client.enqueue(job(billing, "p-requeue", "T-2"))
    with worker_process(settings, tmp_path / "w1.log") as first:
        async for _, event in handle.events():
            if event.step is not None and event.step.id == "login.username":
                first.send_signal(signal.SIGTERM)
                break
        await asyncio.to_thread(first.wait, 60)
    events = [e async for _, e in handle.events(follow=False)]
    assert events[-1].status == "queued" and "will run again" in (events[-1].message or "")
    assert billing.credits() == []

    billing.faults()  # back to normal speed
    with worker_process(settings, tmp_path / "w2.log"):
        report = await handle.wait(120)
    assert report.status == JobStatus.succeeded
    assert len(billing.credits()) == 1


@pytest.mark.timeout(240)
async def test_a_job_whose_every_run_is_cut_short_ends_with_a_report_not_queued_for_ever(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    # Three workers in a row stopped past their grace mid-job (a rolling deploy on a slow
    # site). arq gives a job three runs, then dropped it with a log line: the job said
    # `queued` ("it will run again") for ever, and a watcher waited for ever.
    billing.faults(latency_ms=400)
    settings = settings.model_copy(update={"shutdown_grace_s": 0})
    handle = await client.enqueue(job(billing, "p-cut", "T-11"))
    last = "0-0"
    for run in (1, 2, 3):
        with worker_process(settings, tmp_path / f"w{run}.log") as proc:
            async for _, event in handle.events(after=last):
                if event.step is not None and event.step.status == "succeeded":
                    proc.send_signal(signal.SIGTERM)
                    break
            await asyncio.to_thread(proc.wait, 60)
        events = [e async for _, e in handle.events(after=last, follow=False)]
        assert events[-1].status == "queued", run
        last = await handle.last_event_id()

    with worker_process(settings, tmp_path / "w4.log"):
        report = await handle.wait(60)
    assert report.status == JobStatus.failed
    assert report.error is not None and "3 runs was cut short" in report.error.message
    assert billing.credits() == []
    # The steps the runs did are on record, and each takeover.
    assert [i.run for i in report.interruptions] == [2, 3, 4]
    assert any(s.status == "succeeded" for s in report.steps)
    assert await handle.status() == JobStatus.failed


@pytest.mark.timeout(240)
async def test_worker_killed_mid_commit_never_submits_twice(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    # The commit reaches the site (the credit is created) and its answer never comes back;
    # the worker is killed -9 while it waits. arq hands the job to the next worker once the
    # dead one's in-progress key expires (job timeout + 10 s).
    billing.faults(commit_drop={"create": True, "mode": "hang", "hang_ms": 60_000})
    # Short, so the takeover comes soon: the second run needs ~3 s of its 10 (15 less margin).
    settings = settings.model_copy(update={"job_timeout_s": 15})
    handle = await client.enqueue(job(billing, "p-kill", "T-9"))
    with worker_process(settings, tmp_path / "w1.log") as first:
        async for _, event in handle.events():
            if event.step is not None and event.step.id == "submit":
                break  # the commit is being sent
        await asyncio.wait_for(_until_created(billing), 30)
        first.kill()
        await asyncio.to_thread(first.wait, 30)

    with worker_process(settings, tmp_path / "w2.log"):
        report = await handle.wait(120)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1  # not sent again
    interrupted = [r for r in report.rules_fired if r.action == "verify_effect"]
    assert interrupted and interrupted[0].step_id == "submit"
    submit = next(s for s in report.steps if s.id == "submit")
    assert submit.verified == "probe"
    assert report.outputs["confirmation_number"] == billing.credits()[0]["confirmation"]
    # The second run went on from the first one's checkpoint, in its restored session.
    assert [(i.run, i.last_checkpoint, i.resumed_at) for i in report.interruptions] == [
        (2, "confirm_amount", "submit")
    ]
    steps = {s.id: s for s in report.steps}
    assert steps["amount"].attempts == 1 and steps["login.submit"].attempts == 1
    assert billing.state()["logins"] == 1


@pytest.mark.timeout(240)
async def test_worker_killed_after_a_commit_step_resumes_from_its_checkpoint(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    # After the credit is issued and confirmed, the script goes on to another page; the
    # worker dies on the way there. The next worker goes on from there: nothing before the
    # checkpoint is redone, the commit is neither resent nor probed.
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    (scripts / "billing" / "issue_credit_and_look.yaml").write_text(
        (SCRIPTS / "billing" / "issue_credit.yaml")
        .read_text()
        .replace("name: billing/issue_credit", "name: billing/issue_credit_and_look")
        .replace(
            "\nalternates:",
            '\n  - {id: look, goto: "/accounts/search?account_id={{ inputs.account_id }}", '
            "expect: {visible: account.credits}}\n\nalternates:",
        )
    )
    # Only that last page hangs, so the first worker is killed inside step `look`.
    billing.faults(latency_ms=60_000, latency_path_contains="/accounts/search")
    settings = settings.model_copy(update={"job_timeout_s": 15, "scripts_dir": scripts})
    look = job(billing, "p-after", "T-10").model_copy(
        update={"script": "billing/issue_credit_and_look"}
    )
    handle = await client.enqueue(look)
    with worker_process(settings, tmp_path / "w1.log") as first:
        async for _, event in handle.events():
            if event.step is not None and event.step.id == "look":
                break
        first.kill()
        await asyncio.to_thread(first.wait, 30)
    assert len(billing.credits()) == 1

    billing.faults()
    with worker_process(settings, tmp_path / "w2.log"):
        report = await handle.wait(120)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1
    assert report.outputs["confirmation_number"] == billing.credits()[0]["confirmation"]
    [interruption] = report.interruptions
    assert (interruption.last_checkpoint, interruption.resumed_at) == ("confirmation", "look")
    assert interruption.redone == []
    steps = {s.id: s for s in report.steps}
    assert all(steps[i].attempts == 1 for i in ("login.submit", "amount", "submit"))
    assert steps["look"].status == "succeeded"
    assert not [r for r in report.rules_fired if r.action in ("verify_effect", "relogin")]
    assert billing.state()["logins"] == 1  # the restored session was still good
    claim = next(c for c in report.claims if c.name == "confirmation_number")
    assert claim.verified  # read on the confirmed page by the first run, kept by the second


@pytest.mark.timeout(240)
async def test_a_killed_worker_s_job_is_taken_over_long_before_its_mark_expires(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    # arq hands a dead worker's job on only once its in-progress mark expires: the job
    # timeout + 10 s, 10 minutes by default, the job's record at `running` all the while.
    # The dead worker's lease runs out in 20 s, and a live worker takes its jobs over.
    billing.faults(latency_ms=200)
    settings = settings.model_copy(update={"job_timeout_s": 900})
    handle = await client.enqueue(job(billing, "p-gone", "T-14"))
    with worker_process(settings, tmp_path / "w1.log") as first:
        async for _, event in handle.events():
            if event.step is not None and event.step.id == "amount":
                break
        with worker_process(settings, tmp_path / "w2.log") as second:
            first.kill()
            await asyncio.to_thread(first.wait, 30)
            # Far inside the mark's 910 s: only a takeover gets the job run again.
            report = await handle.wait(90)
            assert second.poll() is None
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1
    assert report.outputs["confirmation_number"] == billing.credits()[0]["confirmation"]
    [interruption] = report.interruptions
    assert interruption.run == 2 and interruption.last_checkpoint is not None
    assert billing.state()["logins"] == 1  # in the session the checkpoint kept
    said = [e.message async for _, e in handle.events(follow=False)]
    assert "its worker stopped answering mid-job; it will run again" in said


@pytest.mark.timeout(240)
async def test_the_webhook_hears_that_a_dead_worker_s_job_was_taken_over(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    # The live worker announces the dead one's job `queued` ("its worker stopped answering").
    # That event went to the job's stream only: its webhook heard the dead run's events, then
    # a `running` out of nowhere, one `seq` further on.
    billing.faults(latency_ms=200)
    settings = settings.model_copy(update={"job_timeout_s": 900})
    signed = {"FORMWORK_WEBHOOK_SECRET": WEBHOOK_SECRET}
    async with receiver(lambda event, attempt: (0.0, 204)) as hook:
        webhook = WebhookTarget(url=hook.url)
        handle = await client.enqueue(
            job(billing, "p-gone-hook", "T-16").model_copy(update={"webhook": webhook})
        )
        with worker_process(settings, tmp_path / "w1.log", **signed) as first:
            async for _, event in handle.events():
                if event.step is not None and event.step.id == "amount":
                    break
            with worker_process(settings, tmp_path / "w2.log", **signed):
                first.kill()
                await asyncio.to_thread(first.wait, 30)
                report = await handle.wait(90)
                assert report.status == JobStatus.succeeded, report.error
                async with asyncio.timeout(30):
                    while not (hook.delivered and hook.delivered[-1].get("report")):
                        hook.settled.clear()
                        await hook.settled.wait()

    assert len(billing.credits()) == 1
    said = [(e["status"], e.get("message")) for e in hook.delivered if e["kind"] == "job"]
    gone = ("queued", "its worker stopped answering mid-job; it will run again")
    assert said == [("running", None), gone, ("running", None), ("succeeded", None)]
    seqs = [e["seq"] for e in hook.delivered]
    assert seqs == sorted(set(seqs))  # in order, each once


@pytest.mark.timeout(240)
async def test_a_stalled_worker_whose_job_was_taken_over_stops_without_sending_it_again(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    # A worker frozen past its lease (a paused VM; SIGSTOP here) is taken for dead, and its
    # job goes on elsewhere. When it wakes, its run must stop: going on, it would send the
    # commit the other run sent, and write over the job's end.
    billing.faults(latency_ms=200)
    settings = settings.model_copy(update={"job_timeout_s": 900})
    handle = await client.enqueue(job(billing, "p-stall", "T-15"))
    log = tmp_path / "w1.log"
    with worker_process(settings, log) as first:
        async for _, event in handle.events():
            if event.step is not None and event.step.id == "amount":
                break
        first.send_signal(signal.SIGSTOP)
        try:
            with worker_process(settings, tmp_path / "w2.log"):
                report = await handle.wait(90)
                # Until arq has written the job's end: the run's bookkeeping after its report
                # (dropping what the ended job no longer needs) is done, not cut off.
                await _until_result(settings, handle.job_id)
        finally:
            first.send_signal(signal.SIGCONT)
        assert report.status == JobStatus.succeeded, report.error
        await _until_logged(log, "taken over by another worker; this run stops here")
        assert "lease lapsed" in log.read_text(errors="replace")
        assert first.poll() is None  # the worker itself goes on serving
        # Alone now, it runs this next job: by its end, whatever the stopped run still had
        # queued for Redis has long been written, or refused.
        after = await client.enqueue(job(billing, "p-stall-after", "T-16"))
        assert (await after.wait(60)).status == JobStatus.succeeded
    assert len(billing.credits()) == 2
    assert [i.run for i in report.interruptions] == [2]
    assert await client.handle(handle.job_id).status() == JobStatus.succeeded
    # The step it woke in wrote nothing over the other run's record: the settling event is
    # the job's last, no seq comes twice, and the ended job keeps no checkpoint (it held the
    # signed-in session) for the record's 7 days.
    keys = Keys(settings.key_prefix)
    async with Redis.from_url(settings.redis_url) as redis:
        stream = await redis.xrange(keys.events(handle.job_id))
        record = await redis.hgetall(keys.job(handle.job_id))
    events = [json.loads(fields[b"event"]) for _, fields in stream]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    assert (events[-1]["kind"], events[-1]["status"]) == ("job", "succeeded")
    assert int(record[b"seq"]) == seqs[-1]
    assert b"checkpoint" not in record


async def _until_result(settings: Settings, job_id: str) -> None:
    async with Redis.from_url(settings.redis_url) as redis:
        while not await redis.exists(ARQ_RESULT_PREFIX + job_id):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _until_created(billing: Site) -> None:
    # The site is another thread behind HTTP: its ground truth can only be polled.
    while not billing.credits():  # noqa: ASYNC110
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_a_worker_outlives_a_redis_restart(
    billing: Site, settings: Settings, tmp_path: Path
) -> None:
    # Redis goes away under an idle worker and comes back: the worker connects again and
    # serves the queue (it used to exit, leaving the queue unserved).
    async with own_redis(tmp_path) as server:
        own = settings.model_copy(update={"redis_url": server.url})
        log = tmp_path / "worker.log"
        async with FormworkClient(own.redis_url, key_prefix=own.key_prefix) as client:
            with worker_process(own, log) as proc:
                handle = await client.enqueue(job(billing, "p-before", "T-R1"))
                assert (await handle.wait(60)).status == JobStatus.succeeded
                await server.stop()
                await _until_logged(log, "lost Redis")
                await server.start()
                handle = await client.enqueue(job(billing, "p-after", "T-R2"))
                report = await handle.wait(90)
                assert proc.poll() is None  # the same process, still serving
    assert report.status == JobStatus.succeeded, report.error
    assert [c["reference"] for c in billing.credits()] == ["T-R1", "T-R2"]


@pytest.mark.timeout(180)
async def test_a_job_on_a_worker_whose_redis_restarted_is_handed_back_at_once(
    billing: Site, settings: Settings, tmp_path: Path
) -> None:
    # Redis restarted (with its data: an append-only file) under a running job. arq's mark
    # that the job is in progress came back with the data and held the job for the mark's
    # whole life, FORMWORK_JOB_TIMEOUT + 10 s (10 minutes by default), its record at
    # `running`. The worker that lost it now hands it back when it connects again.
    billing.faults(latency_ms=200)
    own = settings.model_copy(update={"job_timeout_s": 900})
    async with own_redis(tmp_path, persistent=True) as server:
        own = own.model_copy(update={"redis_url": server.url})
        log = tmp_path / "worker.log"
        with worker_process(own, log) as proc:
            async with FormworkClient(own.redis_url, key_prefix=own.key_prefix) as client:
                handle = await client.enqueue(job(billing, "p-restart", "T-R3"))
                async for _, event in handle.events():
                    if event.step is not None and event.step.id == "amount":
                        break
            await server.stop()
            await _until_logged(log, "lost Redis")
            await server.start()
            async with FormworkClient(own.redis_url, key_prefix=own.key_prefix) as client:
                # Far inside the mark's 910 s: only a hand-back gets the job run again.
                report = await client.handle(handle.job_id).wait(120)
            assert proc.poll() is None
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1
    assert report.outputs["confirmation_number"] == billing.credits()[0]["confirmation"]
    assert [i.run for i in report.interruptions] == [2]
    assert "handed back" in log.read_text(errors="replace")


def _drivers_under(root: int) -> int:
    """How many Playwright drivers (each with its Chromium) run as children of `root`."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue  # not a process, or one that has just ended
        count += parent == root and b"run-driver" in argv
    return count


def _counted(port: int) -> dict[str, float]:
    """What the worker's /metrics says it has counted: jobs started and succeeded, and
    Chromium restarts."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {"started": 0.0, "succeeded": 0.0, "restarts": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "formwork_jobs_started_total":
                found["started"] += sample.value
            elif sample.name == "formwork_jobs_total" and sample.labels["status"] == "succeeded":
                found["succeeded"] += sample.value
            elif sample.name == "formwork_browser_restarts_total":
                found["restarts"] += sample.value
    return found


async def _seen_through(client: FormworkClient, job_id: str) -> None:
    """Once arq has written the job's result: its settling is counted, and its run is done."""
    run = Job(job_id, client.redis, _queue_name=client.keys.queue, _deserializer=loads)
    await run.result(timeout=30, poll_delay=0.02)


def _scrape(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        status: int = response.status
        return status


@pytest.mark.timeout(180)
async def test_a_job_whose_renderer_is_killed_goes_on_in_a_fresh_run(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path
) -> None:
    # The page's renderer killed mid-job (the OOM killer's favourite): every retry of the step
    # hit the same dead page ("Target crashed") and the job ended failed, for a transient
    # failure its rule says to retry.
    billing.faults(latency_ms=200)
    handle = await client.enqueue(job(billing, "p-crash", "T-12"))
    killed: list[int] = []
    with worker_process(settings, tmp_path / "w.log") as proc:
        async for _, event in handle.events():
            if event.step is not None and (event.step.id, event.step.status) == (
                "amount",
                "succeeded",
            ):
                killed = _renderers_of(proc.pid)
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
                break
        assert killed
        report = await handle.wait(120)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1
    assert report.outputs["confirmation_number"] == billing.credits()[0]["confirmation"]
    [interruption] = report.interruptions  # the fresh run went on from the checkpoint
    assert interruption.run == 2 and interruption.last_checkpoint is not None
    assert billing.state()["logins"] == 1  # in the session the checkpoint kept


@pytest.mark.timeout(120)
async def test_a_job_whose_redis_connection_drops_mid_write_goes_on_in_a_fresh_run(
    billing: Site, settings: Settings, tmp_path: Path
) -> None:
    # Redis dropped the connection a job was writing on (a failover, a proxy's cut): the run
    # raised ConnectionError and the job ended `failed` ("internal error in the worker"),
    # though neither it nor the site had anything wrong.
    billing.faults(latency_ms=200)
    async with own_redis(tmp_path) as server:
        own = settings.model_copy(update={"redis_url": server.url})
        admin = Redis(port=server.port)
        async with FormworkClient(own.redis_url, key_prefix=own.key_prefix) as client:
            with worker_process(own, tmp_path / "w.log"):
                handle = await client.enqueue(job(billing, "p-drop", "T-13"))
                async for _, event in handle.events():
                    if event.step is not None and event.step.id == "amount":
                        break
                # Writes wait while Redis is paused: the job's next one is in flight when its
                # connection is cut.
                await admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
                blocked = await until_blocked(admin)
                await admin.client_kill_filter(_id=blocked["id"])
                await admin.execute_command("CLIENT", "UNPAUSE")
                report = await handle.wait(90)
        await admin.aclose()
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1
    assert [i.run for i in report.interruptions] == [2]


@pytest.mark.timeout(120)
async def test_a_worker_serving_metrics_outlives_a_redis_restart_with_one_browser_counting_on(
    billing: Site, settings: Settings, tmp_path: Path
) -> None:
    # arq's close gives up at its first Redis call, before the worker's shutdown hook: the
    # next attempt found its own metrics port still held and exited (a worker with metrics
    # did not survive a Redis restart), and each attempt left a Chromium behind. Then its
    # counters started again at 0 in the same process, which Prometheus reads as a restart
    # (what was counted since the last scrape is lost to `rate()`).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with own_redis(tmp_path) as server:
        own = settings.model_copy(update={"redis_url": server.url, "metrics_port": port})
        log = tmp_path / "worker.log"
        async with FormworkClient(own.redis_url, key_prefix=own.key_prefix) as client:
            with worker_process(own, log) as proc:
                handle = await client.enqueue(job(billing, "m-before", "T-M1"))
                assert (await handle.wait(60)).status == JobStatus.succeeded
                await _seen_through(client, "m-before")  # its end is written: none to hand on
                before = await asyncio.to_thread(_counted, port)
                assert before == {"started": 1, "succeeded": 1, "restarts": 0}
                await server.stop()
                await _until_logged(log, "lost Redis")
                await server.start()
                handle = await client.enqueue(job(billing, "m-after", "T-M2"))
                report = await handle.wait(90)
                await _seen_through(client, "m-after")
                assert proc.poll() is None, log.read_text()  # the same process, still serving
                assert await asyncio.to_thread(_scrape, port) == 200
                # Counted on, not from 0: the counts restart with the process only.
                after = await asyncio.to_thread(_counted, port)
                assert after == {"started": 2, "succeeded": 2, "restarts": 0}
                assert _drivers_under(proc.pid) == 1
    assert report.status == JobStatus.succeeded, report.error
    assert "is in use" not in log.read_text()
    # Said as a JSON log line with its level, like the rest of a worker's log (it was bare text).
    lines = [json.loads(line) for line in log.read_text().splitlines() if "lost Redis" in line]
    [lost, *_] = [line for line in lines if line["logger"] == "formwork.worker"]
    assert lost["level"] == "error", lost
    # Whether m-before, stopped right after it ended, is handed on depends on whether Redis
    # went while the worker still awaited the reply to its last word (then it cannot know the
    # word landed, and handing on is the safe side): a race, left to the deterministic
    # test_a_job_that_ended_and_then_lost_redis_keeps_its_ending.


async def test_a_worker_serving_metrics_on_any_free_port_says_which(
    settings: Settings, tmp_path: Path
) -> None:
    # FORMWORK_METRICS_PORT=0: the first line said "metrics on http://127.0.0.1:0/metrics" and
    # the bound port was logged at INFO only, which a worker run without -v does not print.
    own = settings.model_copy(update={"metrics_port": 0})
    log = tmp_path / "worker.log"
    with worker_process(own, log, verbose=False):
        await _until_logged(log, '/metrics"')
        text = log.read_text()
        assert ":0/metrics" not in text, text
        [line] = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        port = int(line["msg"].rsplit(":", 1)[1].removesuffix("/metrics"))
        assert await asyncio.to_thread(_scrape, port) == 200


async def until_blocked(admin: Redis) -> dict[str, str]:
    """A connection of the job's that waits on a paused Redis to write (not the site slot's
    lease renewal, a script that tolerates a lost connection). Another process's connection:
    it can only be polled."""
    async with asyncio.timeout(30):
        while True:
            clients = await admin.client_list()
            blocked = [c for c in clients if "b" in c["flags"] and _a_job_write(c)]
            if blocked:
                return blocked[0]
            await asyncio.sleep(0.05)


def _a_job_write(client: dict[str, str]) -> bool:
    # A run's writes go out as one script too (fenced on its arq mark), carrying an event or a
    # checkpoint: far more than the few names and numbers a lease's renewal sends.
    return client["cmd"] != "evalsha" or int(client.get("argv-mem", 0)) > 1000


def _processes() -> dict[int, tuple[int, bytes]]:
    """Every process: pid -> (parent pid, command line)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            found[int(stat.parent.name)] = (parent, (stat.parent / "cmdline").read_bytes())
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def _renderers_of(pid: int) -> list[int]:
    """The Chromium renderer processes under `pid` (never another session's)."""
    table = _processes()
    tree, grew = {pid}, True
    while grew:
        more = {p for p, (parent, _) in table.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return [p for p in tree if b"--type=renderer" in table[p][1]]


async def _until_logged(log: Path, text: str) -> None:
    # Another process's output: it can only be polled.
    async with asyncio.timeout(30):
        while True:
            if text in await asyncio.to_thread(log.read_text, errors="replace"):
                return
            await asyncio.sleep(0.05)


async def test_secret_inputs_never_reach_the_workers_log(
    billing: Site, client: FormworkClient, settings: Settings, tmp_path: Path,
    fixture_secrets: dict[str, str],
) -> None:  # fmt: skip
    # An orchestrator in another language writes the envelope itself, inputs first: arq's
    # line for the job's start (`-v`) showed its first 80 characters, the agent's password
    # among them, which the log's redactor (configured secrets only) did not know.
    settings = signing_in_as_the_agent(settings, tmp_path)
    user, password = fixture_secrets["billing_username"], fixture_secrets["billing_password"]
    payload = {
        "inputs": {"agent_pw": password, "agent_user": user, **CREDIT_INPUTS},
        "job_id": "p-own",
        "script": "billing/credit_as",
        "site_url": billing.url,
    }
    log = tmp_path / "w.log"
    with worker_process(settings, log):
        async with Redis.from_url(settings.redis_url) as redis:
            await redis.set("arq:job:p-own", envelope(payload))
            await redis.zadd(Keys(settings.key_prefix).queue, {"p-own": 1})
            report = await client.handle("p-own").wait(90)
            # arq drops the payload (which carries the password) once it is done with the job;
            # the worker is killed when this block ends, so not before that.
            async with asyncio.timeout(30):
                while True:  # another process's write: it can only be polled
                    if not await redis.exists("arq:job:p-own"):
                        break
                    await asyncio.sleep(0.05)

    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1
    text = log.read_text()
    assert "p-own:browser_job" in text  # the line is there, naming the job
    assert password[:6] not in text and user not in text
