"""The artifact store: the same layout and audit record on a local disk and on a real
S3-compatible server (moto's, over HTTP), and retention that removes only old jobs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import ClientSession
from moto.server import ThreadedMotoServer

from worker.artifacts import ArtifactStore, LocalArtifacts, S3Artifacts, safe_id
from worker.browser import BrowserHost
from worker.cli import main
from worker.client import FormworkClient
from worker.contract import BrowserJob, JobStatus
from worker.executor import Runtime, run_job
from worker.queue import running_worker
from worker.recording import load
from worker.script import ScriptStore
from worker.secretstore import SecretStore
from worker.settings import Settings

from .conftest import CREDIT_INPUTS, SCRIPTS, SECRETS_FILE, SELECTORS, Site
from .test_audit_ui import serve_ui


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="formwork-test",
        aws_secret_access_key="formwork-test",
    )
    client.create_bucket(Bucket="evidence")
    yield client
    keys = [o["Key"] for p in client.get_paginator("list_objects_v2").paginate(Bucket="evidence")
            for o in p.get("Contents", [])]  # fmt: skip
    if keys:
        client.delete_objects(Bucket="evidence", Delete={"Objects": [{"Key": k} for k in keys]})
    client.delete_bucket(Bucket="evidence")


def runtime_with(store: ArtifactStore, browser: BrowserHost) -> Runtime:
    return Runtime(
        scripts=ScriptStore(SCRIPTS, SELECTORS),
        browser=browser,
        artifacts=store,
        secrets=SecretStore(SECRETS_FILE, environ={}),
    )


async def test_a_job_lands_in_s3_in_the_same_layout_as_on_disk(
    billing: Site, browser_host: BrowserHost, s3_client: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    store = S3Artifacts("evidence", spool, prefix="prod/eu", client=s3_client)
    job = BrowserJob(
        job_id="s3-1", script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    report = await run_job(job, runtime_with(store, browser_host))
    assert report.status == JobStatus.succeeded
    assert report.artifacts is not None and report.artifacts.root == "s3://evidence/prod/eu/"
    day = datetime.now(UTC).date().isoformat()
    assert report.artifacts.path == f"{day}/s3-1"

    # Straight from the server, not through the store: everything is there, under the prefix.
    listed = s3_client.list_objects_v2(Bucket="evidence", Prefix="prod/eu/")
    keys = {o["Key"].removeprefix("prod/eu/") for o in listed["Contents"]}
    assert {f"{day}/s3-1/report.json", f"{day}/s3-1/audit.json", "jobs/s3-1"} <= keys
    assert all(s.screenshot in keys for s in report.steps)
    record = store.find_audit("s3-1")
    assert record.status == JobStatus.succeeded and record.report == report
    for evidence in record.evidence.values():
        assert evidence.image in keys and evidence.thumbnail in keys
        body = s3_client.get_object(Bucket="evidence", Key="prod/eu/" + evidence.image)
        data = body["Body"].read()
        # Content-addressed: the name is the SHA-256 of the bytes.
        assert Path(evidence.image).stem == hashlib.sha256(data).hexdigest()
        assert body["ContentType"] == "image/jpeg"
    # The worker's disk keeps nothing once the job has settled.
    assert [p for p in spool.rglob("*") if p.is_file()] == []
    # A worker on another machine finds the job's folder (to resume it) from the store alone.
    elsewhere = S3Artifacts("evidence", tmp_path / "other", prefix="prod/eu", client=s3_client)
    assert elsewhere.describe("s3-1").path == f"{day}/s3-1"
    assert [a.job_id for a in elsewhere.audits()] == ["s3-1"]


async def test_a_recording_exports_from_a_bucket_with_every_screenshot(
    billing: Site,
    browser_host: BrowserHost,
    s3_endpoint: str,
    s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The export read the report's root as a directory: from s3://… it found no file, wrote a
    # bundle without a screenshot or its HAR, and said it had made the recording. Replayed, that
    # golden checked nothing visual at all.
    for name, value in {"AWS_ACCESS_KEY_ID": "formwork-test", "AWS_SECRET_ACCESS_KEY":
                        "formwork-test", "AWS_DEFAULT_REGION": "us-east-1",
                        "FORMWORK_S3_ENDPOINT": s3_endpoint}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    store = S3Artifacts("evidence", tmp_path / "spool", prefix="prod", client=s3_client)
    job = BrowserJob(job_id="s3-rec", script="billing/issue_credit", inputs=CREDIT_INPUTS,
                     site_url=billing.url, har=True)  # fmt: skip
    report = await run_job(job, runtime_with(store, browser_host))
    assert report.status == JobStatus.succeeded and report.artifacts is not None
    saved = tmp_path / "report.json"
    saved.write_text(report.model_dump_json())
    export = ["recording", "export", "s3-rec", "--report", str(saved), "--scripts-dir",
              str(SCRIPTS), "--selectors-dir", str(SELECTORS), "--out"]  # fmt: skip

    bundle = tmp_path / "bundle"
    assert await asyncio.to_thread(main, [*export, str(bundle)]) == 0
    recorded = load(bundle)
    assert recorded.har is not None and (bundle / recorded.har).is_file()
    for step, ran in zip(recorded.steps, report.steps, strict=True):
        assert step.screenshot is not None and ran.screenshot is not None, step.id
        assert (bundle / step.screenshot).read_bytes() == store.get(ran.screenshot)

    # A screenshot gone from the bucket: said, and no golden that checks less is written.
    lost = report.steps[6].screenshot
    assert lost is not None
    s3_client.delete_object(Bucket="evidence", Key=f"prod/{lost}")
    capsys.readouterr()
    assert await asyncio.to_thread(main, [*export, str(tmp_path / "partial")]) == 2
    err = capsys.readouterr().err  # moto's own request log is on it too
    [said] = [line for line in err.splitlines() if line.startswith("formwork:")]
    assert said.startswith(
        f"formwork: cannot copy step {report.steps[6].id}'s screenshot from s3://evidence/prod/ "
        f"(no artifact '{lost}' in s3://evidence/prod/: "
    )
    assert said.endswith("no bundle written, since a golden without it would check less than "
                         "the job did")  # fmt: skip
    assert not (tmp_path / "partial").exists()


async def test_handoff_names_evidence_in_a_bucket_by_its_url(
    billing: Site,
    browser_host: BrowserHost,
    settings: Settings,
    s3_endpoint: str,
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The evidence line went through a Path, which made s3://evidence/... s3:/evidence/...
    creds = {"AWS_ACCESS_KEY_ID": "formwork-test", "AWS_SECRET_ACCESS_KEY": "formwork-test",
             "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for name, value in creds.items():
        monkeypatch.setenv(name, value)
    settings = settings.model_copy(
        update={"artifacts_url": "s3://evidence/prod", "s3_endpoint_url": s3_endpoint}
    )
    billing.faults(reject_value=[{"field": "amount", "value": "15.00", "message": "Too much"}])
    job = BrowserJob(
        job_id="s3-ask", script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    async with (
        running_worker(settings, browser_host),
        FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as client,
    ):
        report = await (await client.enqueue(job)).wait(60)
    assert report.status == JobStatus.needs_customer_input and report.handoff is not None
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "FORMWORK_KEY_PREFIX": settings.key_prefix,
    }
    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "worker.cli", "handoff", "s3-ask"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    evidence = f"  evidence:  s3://evidence/prod/{report.handoff.evidence.screenshot}"
    assert evidence in shown.stdout.splitlines(), shown.stdout


def seed(store: ArtifactStore, days_ago: dict[str, int], today: datetime) -> None:
    for job_id, ago in days_ago.items():
        day = (today - timedelta(days=ago)).date().isoformat()
        store.put(f"{day}/{job_id}/report.json", b"{}")
        store.put(f"{day}/{job_id}/images/abc.jpg", b"jpeg")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_prune_removes_only_jobs_older_than_the_cutoff(
    kind: str, tmp_path: Path, s3_client: Any
) -> None:
    store: ArtifactStore = (
        LocalArtifacts(tmp_path / "a")
        if kind == "local"
        else S3Artifacts("evidence", tmp_path / "spool", client=s3_client)
    )
    now = datetime.now(UTC)
    seed(store, {"fresh": 0, "recent": 29, "old": 31, "ancient": 400}, now)
    removed = store.prune(timedelta(days=30), now=now)
    assert sorted(p.split("/")[1] for p in removed) == ["ancient", "old"]
    stored = store.keys("")
    left = {k.split("/")[1] for k in stored if k.count("/") >= 2}
    assert left == {"fresh", "recent"}


def test_prune_never_removes_a_job_younger_than_the_age(tmp_path: Path) -> None:
    # An age that is not whole days lost its hours: at 01:00, --older-than 36h removed the
    # day before yesterday (jobs from 25 hours ago) and 12h removed yesterday (from 1 hour ago).
    store = LocalArtifacts(tmp_path / "a")
    now = datetime(2026, 3, 10, 1, 0, tzinfo=UTC)
    for day in ("2026-03-09", "2026-03-08", "2026-03-07"):
        store.put(f"{day}/late-{day}/report.json", b"{}")  # as if written at 23:59 that day
    assert store.prune(timedelta(hours=12), now=now, dry_run=True) == [
        "2026-03-07/late-2026-03-07", "2026-03-08/late-2026-03-08",
    ]  # fmt: skip
    assert store.prune(timedelta(hours=36), now=now) == ["2026-03-07/late-2026-03-07"]
    assert sorted(p.name for p in store.root.iterdir()) == ["2026-03-08", "2026-03-09"]
    # Whole days are as before: 1d at 01:00 keeps yesterday, whose last jobs are 1 hour old.
    assert store.prune(timedelta(days=1), now=now) == ["2026-03-08/late-2026-03-08"]


def test_formwork_audit_prune_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalArtifacts(tmp_path / "artifacts")
    now = datetime.now(UTC)
    seed(store, {"keep": 3, "drop": 45}, now)
    code = main(["audit", "prune", "--older-than", "30d", "--artifacts", str(store.root)])
    assert code == 0
    out = capsys.readouterr().out
    assert "drop" in out and "1 job" in out
    assert [p.name for p in store.root.glob("*/*")] == ["keep"]
    # A dry run says what would go and removes nothing.
    seed(store, {"drop2": 45}, now)
    assert main(["audit", "prune", "--older-than", "30d", "--artifacts", str(store.root),
                 "--dry-run"]) == 0  # fmt: skip
    assert "drop2" in capsys.readouterr().out
    assert sorted(p.name for p in store.root.glob("*/*")) == ["drop2", "keep"]


def test_prune_skips_a_folder_named_like_a_day_that_is_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalArtifacts(tmp_path / "artifacts")
    now = datetime.now(UTC)
    seed(store, {"keep": 3, "drop": 45}, now)
    store.put("2020-02-30/someone/notes.txt", b"not ours")
    removed = store.prune(timedelta(days=30), now=now)
    assert [p.split("/")[1] for p in removed] == ["drop"]
    assert "2020-02-30" in caplog.text  # the warning names the folder it left alone
    assert (store.root / "2020-02-30" / "someone" / "notes.txt").is_file()
    # The command, too: a dry run lists the rest and exits cleanly.
    seed(store, {"drop2": 45}, now)
    assert main(["audit", "prune", "--older-than", "30d", "--artifacts", str(store.root),
                 "--dry-run"]) == 0  # fmt: skip
    assert "would remove 1 job" in capsys.readouterr().out


async def test_ids_that_differ_only_in_unsafe_characters_keep_separate_records(
    billing: Site, runtime: Runtime, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `:` is allowed in a job id and not in a folder name: `coll:T` must not land in `coll_T`.
    store = runtime.artifacts
    reports = {}
    for job_id, reference in (("coll:T", "T-COLON"), ("coll_T", "T-UNDERSCORE")):
        inputs = {**CREDIT_INPUTS, "reference": reference}
        job = BrowserJob(job_id=job_id, script="billing/issue_credit", inputs=inputs,
                         site_url=billing.url)  # fmt: skip
        reports[job_id] = await run_job(job, runtime)
        assert reports[job_id].status == JobStatus.succeeded
    # Ground truth: the site holds both credits, each with its own reference.
    assert sorted(c["reference"] for c in billing.credits()) == ["T-COLON", "T-UNDERSCORE"]

    colon, underscore = reports["coll:T"].artifacts, reports["coll_T"].artifacts
    assert colon is not None and underscore is not None
    assert colon.path != underscore.path
    assert underscore.path.endswith("/coll_T")  # an id that is already a safe name is kept
    for job_id, reference in (("coll:T", "T-COLON"), ("coll_T", "T-UNDERSCORE")):
        record = store.find_audit(job_id)
        assert (record.job_id, record.report.inputs["reference"]) == (job_id, reference)
        assert record.report == reports[job_id]
        on_disk = json.loads(store.get(f"{record.path}/report.json"))
        assert on_disk["job_id"] == job_id
        assert all(e.source.startswith(f"{record.path}/") for e in record.evidence.values())
    assert sorted(r.job_id for r in store.audits()) == ["coll:T", "coll_T"]

    # The command finds each job's own record too.
    out = tmp_path / "colon.html"
    root = str(store.location)
    assert main(["audit", "export", "coll:T", "--artifacts", root, "--out", str(out)]) == 0
    assert "T-COLON" in out.read_text() and "T-UNDERSCORE" not in out.read_text()
    capsys.readouterr()


def test_a_folder_name_is_kept_apart_for_every_id() -> None:
    ids = ["coll:T", "coll_T", "coll.T", "a:b:c", "a_b:c", "a:b_c", "x" * 128, "x" * 127 + ":"]
    names = [safe_id(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert safe_id("coll_T") == "coll_T" and safe_id("run-42.a") == "run-42.a"
    for name in names:
        assert len(name) <= 128 and not name.startswith(".") and "/" not in name
    # A malformed payload's id still names a folder of its own, never a hidden or parent one.
    for bad in ("", ".", "..", "../x", ".hidden"):
        assert safe_id(bad) not in ("", ".", "..") and not safe_id(bad).startswith(".")


def test_a_record_written_before_ids_were_kept_apart_is_still_found(tmp_path: Path) -> None:
    # A job whose id held a `:` was filed under the id with `_` for it: still found, but only
    # when the record there is its own (the folder may be one two jobs shared).
    store = LocalArtifacts(tmp_path / "artifacts")
    store.put("2025-01-30/old_1/report.json", b'{"job_id": "old:1"}')
    assert store.find_job("old:1") == "2025-01-30/old_1"
    assert store.find_job("old_1") == "2025-01-30/old_1"  # a safe id: its own name
    store.put("2025-01-30/shared_2/report.json", b'{"job_id": "shared_2"}')
    assert store.find_job("shared:2") is None


async def test_prune_removes_a_pruned_jobs_whole_folder_and_its_emptied_day(
    billing: Site, runtime: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    store = runtime.artifacts
    assert isinstance(store, LocalArtifacts)
    job = BrowserJob(job_id="old-job", script="billing/issue_credit", inputs=CREDIT_INPUTS,
                     site_url=billing.url)  # fmt: skip
    report = await run_job(job, runtime)
    assert report.status == JobStatus.succeeded and report.artifacts is not None
    folder = store.root / report.artifacts.path
    # A job leaves folders that may hold no file: its downloads/ (none were made here).
    assert (folder / "downloads").is_dir() and not any((folder / "downloads").iterdir())
    day = report.artifacts.path.split("/")[0]

    # Forty days on, the command removes the job and its day entirely.
    later = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(days=40)
    assert store.prune(timedelta(days=30), now=later) == [report.artifacts.path]
    assert not folder.exists()
    assert list(store.root.iterdir()) == []

    # A job folder holding nothing but empty folders goes too, and is named.
    (store.root / "2020-01-01" / "empty-job" / "downloads").mkdir(parents=True)
    assert main(["audit", "prune", "--older-than", "30d", "--artifacts", str(store.root)]) == 0
    assert "removed 2020-01-01/empty-job" in capsys.readouterr().out
    assert list(store.root.iterdir()) == []


async def test_prune_keeps_a_job_still_waiting_for_a_decision(
    billing: Site, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    # A job paused with a long deadline lost its evidence, the screenshot its request points
    # the person deciding to, to a prune of its day.
    store = runtime.artifacts
    job = BrowserJob(job_id="still-waiting", script="billing/issue_credit", site_url=billing.url,
                     inputs={**CREDIT_INPUTS, "amount": "150.00"})  # fmt: skip
    report = await run_job(job, runtime)
    assert report.status == JobStatus.awaiting_approval and report.handoff is not None
    assert report.artifacts is not None
    day = report.artifacts.path.split("/")[0]
    store.put(f"{day}/done-job/report.json", b"{}")
    later = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(days=40)

    assert store.prune(timedelta(days=30), now=later) == [f"{day}/done-job"]
    assert f"keeping {report.artifacts.path}, which is awaiting_approval" in caplog.text
    assert store.keys(f"{day}/done-job/") == []
    evidence = report.handoff.evidence.screenshot
    assert evidence is not None and store.get(evidence)
    assert store.find_audit("still-waiting").status == JobStatus.awaiting_approval


async def test_prune_keeps_a_waiting_job_whose_audit_record_cannot_be_read(
    billing: Site, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    # A paused job whose audit.json was cut short, or never written (the store failed as the
    # job paused), was taken for one that no longer waits: its report, which says it does,
    # went with the day, and the evidence the person deciding looks at with it.
    store = runtime.artifacts
    assert isinstance(store, LocalArtifacts)
    job = BrowserJob(job_id="waits-cut", script="billing/issue_credit", site_url=billing.url,
                     inputs={**CREDIT_INPUTS, "amount": "150.00"})  # fmt: skip
    report = await run_job(job, runtime)
    assert report.status == JobStatus.awaiting_approval and report.artifacts is not None
    cut = store.root / report.artifacts.path
    day = report.artifacts.path.split("/")[0]
    lost = store.root / day / "waits-lost"
    await asyncio.to_thread(shutil.copytree, cut, lost)
    (lost / "audit.json").unlink()
    record = (cut / "audit.json").read_text()
    (cut / "audit.json").write_text(record[: len(record) // 2])
    store.put(f"{day}/done-job/report.json", b"{}")
    later = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(days=40)

    assert store.prune(timedelta(days=30), now=later) == [f"{day}/done-job"]
    for kept in (cut, lost):
        assert f"keeping {day}/{kept.name}, which is awaiting_approval" in caplog.text
        assert (kept / "report.json").is_file()
    assert report.handoff is not None and report.handoff.evidence.screenshot is not None
    assert store.get(report.handoff.evidence.screenshot)


async def test_a_store_that_cannot_be_read_is_said_in_one_line_not_a_traceback(
    s3_endpoint: str,
    s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # prune and export with a bucket they cannot list, or a --store that is no store, ended in
    # tracebacks; the review UI answered a bare 500.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "formwork-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "formwork-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    where = ["--store", "s3://no-such-bucket/p", "--s3-endpoint", s3_endpoint,
             "--artifacts", str(tmp_path / "spool")]  # fmt: skip
    assert main(["audit", "prune", "--older-than", "30d", *where]) == 1
    err = capsys.readouterr().err  # moto's own request log is on it too
    said = [line for line in err.splitlines() if line.startswith("formwork:")]
    assert "Traceback" not in err and len(said) == 1
    assert said[0].startswith("formwork: could not list s3://no-such-bucket/p/: ")
    assert "NoSuchBucket" in said[0]
    assert main(["audit", "prune", "--older-than", "30d", "--store", "ftp://evidence"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "formwork: --store='ftp://evidence': an object store is named s3://bucket or "
        "s3://bucket/prefix\n"
    )

    store = S3Artifacts("no-such-bucket", tmp_path / "spool", client=s3_client)
    runner, host, port = await serve_ui(store)
    try:
        async with ClientSession() as session, session.get(f"http://{host}:{port}/") as answer:
            text = await answer.text()
    finally:
        await runner.cleanup()
    assert answer.status == 503
    assert text.startswith("cannot list the jobs: could not list s3://no-such-bucket/")


async def test_a_jobs_folders_and_files_are_the_owners_alone(
    billing: Site, browser_host: BrowserHost, tmp_path: Path
) -> None:
    # Every folder the store creates is 0700, the root and the day included (they came out
    # 0755: anyone on the machine could list the job ids), every file 0600.
    root = tmp_path / "fresh" / "artifacts"
    runtime = runtime_with(LocalArtifacts(root), browser_host)
    job = BrowserJob(
        job_id="perm-1", script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    report = await run_job(job, runtime)
    assert report.status == JobStatus.succeeded, report.error
    made = [root.parent, root, *root.rglob("*")]
    folders = [p for p in made if p.is_dir()]
    files = [p for p in made if p.is_file()]
    assert len(folders) >= 4 and len(files) >= 10  # fresh, artifacts, the day, the job …
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in folders} == {
        p.relative_to(tmp_path).as_posix(): "0o700" for p in folders
    }
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
