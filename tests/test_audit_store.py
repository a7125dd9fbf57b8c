"""The artifact store: the same layout and audit record on a local disk and on a real
S3-compatible server (moto's, over HTTP), and retention that removes only old jobs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from worker.artifacts import ArtifactStore, LocalArtifacts, S3Artifacts
from worker.browser import BrowserHost
from worker.cli import main
from worker.contract import BrowserJob, JobStatus
from worker.executor import Runtime, run_job
from worker.script import ScriptStore
from worker.secretstore import SecretStore

from .conftest import CREDIT_INPUTS, SCRIPTS, SECRETS_FILE, SELECTORS, Site


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
    removed = store.prune(timedelta(days=30), today=now.date())
    assert sorted(p.split("/")[1] for p in removed) == ["ancient", "old"]
    stored = store.keys("")
    left = {k.split("/")[1] for k in stored if k.count("/") >= 2}
    assert left == {"fresh", "recent"}


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
    removed = store.prune(timedelta(days=30), today=now.date())
    assert [p.split("/")[1] for p in removed] == ["drop"]
    assert "2020-02-30" in caplog.text  # the warning names the folder it left alone
    assert (store.root / "2020-02-30" / "someone" / "notes.txt").is_file()
    # The command, too: a dry run lists the rest and exits cleanly.
    seed(store, {"drop2": 45}, now)
    assert main(["audit", "prune", "--older-than", "30d", "--artifacts", str(store.root),
                 "--dry-run"]) == 0  # fmt: skip
    assert "would remove 1 job" in capsys.readouterr().out
