"""`make demo`: the billing fixture, one real credit issued end to end, the report printed."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
import uuid
from pathlib import Path

from fixtures import start_fixture
from worker.artifacts import LocalArtifacts
from worker.browser import BrowserHost
from worker.cli import _Printer, print_summary
from worker.contract import BrowserJob, JobStatus
from worker.executor import Runtime, run_job
from worker.script import ScriptStore
from worker.secretstore import SecretStore
from worker.settings import Settings

DEMO_INPUTS = {
    "account_id": "AC-10231",
    "amount": "15.00",
    "reason": "damaged item",
    "reference": "T-88812",
}


async def demo() -> int:
    settings = Settings.from_env()
    secrets_file = settings.secrets_file or Path("fixtures/secrets.yaml")
    with start_fixture("billing") as site:
        print(f"billing fixture site: {site.url}")
        job = BrowserJob(
            job_id=f"demo-{uuid.uuid4().hex[:8]}",
            script="billing/issue_credit",
            inputs=DEMO_INPUTS,
            site_url=site.url,
            idempotency_key="T-88812",
        )
        runtime = Runtime(
            scripts=ScriptStore(settings.scripts_dir, settings.selectors_dir),
            browser=BrowserHost(settings.chromium),
            artifacts=LocalArtifacts(settings.artifacts_dir),
            secrets=SecretStore(secrets_file),
        )
        print(f"running {job.script} as job {job.job_id}")
        try:
            report = await run_job(job, runtime, _Printer(sys.stdout))
        finally:
            await runtime.browser.stop()
        print_summary(report, sys.stdout)
        credits = await asyncio.to_thread(_ground_truth, site.url)
        print(
            f"fixture ground truth: {len(credits)} credit(s): "
            + ", ".join(f"{c['confirmation']} {c['amount']} ref {c['reference']}" for c in credits)
        )
    return 0 if report.status == JobStatus.succeeded else 1


def _ground_truth(site_url: str) -> list[dict[str, str]]:
    """The credits the fixture site really holds (not what the worker says it did)."""
    with urllib.request.urlopen(f"{site_url}/_fixture/state", timeout=10) as response:
        credits: list[dict[str, str]] = json.loads(response.read())["credits"]
    return credits
