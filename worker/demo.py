"""`make demo`: the whole path a real deployment takes, on this machine.

The billing fixture site, a `formwork worker` process on Redis, an orchestrator (this process)
that enqueues "issue a $15 credit to AC-10231" with the client, prints every event as it
arrives, then the report, the audit trail's location and the site's own ground truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import urllib.request
import uuid
from pathlib import Path

from fixtures import start_fixture
from worker.cli import format_event, print_summary
from worker.client import FormworkClient, JobHandle
from worker.contract import BrowserJob, JobStatus
from worker.localredis import ensure
from worker.settings import Settings

DEMO_PREFIX = "formwork-demo"
FOLLOW_TIMEOUT_S = 120.0
DEMO_INPUTS = {
    "account_id": "AC-10231",
    "amount": "15.00",
    "reason": "damaged item",
    "reference": "T-88812",
}


async def demo() -> int:
    settings = Settings.from_env()
    print(ensure(settings.redis_url))
    secrets_file = settings.secrets_file or Path("fixtures/secrets.yaml")
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "FORMWORK_KEY_PREFIX": DEMO_PREFIX,
        "FORMWORK_SECRETS_FILE": str(secrets_file),
        # The demo's one worker seals its checkpoints with a key of its own, made up now.
        "FORMWORK_STATE_KEY": settings.state_key or secrets.token_urlsafe(32),
    }
    with start_fixture("billing") as site:
        print(f"billing fixture site: {site.url}")
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.cli", "worker", env=env
        )
        try:
            job = BrowserJob(
                job_id=f"demo-{uuid.uuid4().hex[:8]}",
                script="billing/issue_credit",
                inputs=DEMO_INPUTS,
                site_url=site.url,
                correlation={"ticket": "T-88812", "agent_run": "demo"},
            )
            async with FormworkClient(settings.redis_url, key_prefix=DEMO_PREFIX) as client:
                handle = await client.enqueue(job)
                print(f"enqueued {job.script} as job {handle.job_id}; events as they arrive:")
                why_not = await _follow(handle, worker)
                if why_not is not None:
                    # Nothing runs it now; the next demo's worker would otherwise take it,
                    # for a fixture site that is gone.
                    await client.abort(handle.job_id, "the demo gave up on it", by="demo")
                    print(f"no report: {why_not}")
                    return 1
                report = await handle.report()
        finally:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
            await asyncio.wait_for(worker.wait(), 60)
        if report is None:
            print("no report: the job did not finish")
            return 1
        print()
        print_summary(report, sys.stdout)
        credits = await asyncio.to_thread(_ground_truth, site.url)
        print(
            f"  fixture ground truth: {len(credits)} credit(s): "
            + ", ".join(f"{c['confirmation']} ${c['amount']} ref {c['reference']}" for c in credits)
        )
        print(f"  review it:   formwork audit serve   (or: formwork audit export {report.job_id})")
    return 0 if report.status == JobStatus.succeeded else 1


async def _follow(handle: JobHandle, worker: asyncio.subprocess.Process) -> str | None:
    """Print the job's events until it settles; or why it will not (its worker exited: a
    Chromium that does not start, a setting it refuses, its error printed above)."""

    async def events() -> None:
        async for event_id, event in handle.events():
            print(format_event(event_id, event), flush=True)

    following = asyncio.create_task(events())
    exited = asyncio.create_task(worker.wait())
    done, _ = await asyncio.wait(
        {following, exited}, timeout=FOLLOW_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    for task in {following, exited} - done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if following in done:
        following.result()  # a Redis error is the command's to say
        return None
    if exited in done:
        return f"the demo's worker exited (code {exited.result()}) before the job ended"
    return f"the job did not end within {FOLLOW_TIMEOUT_S:.0f} s"


def _ground_truth(site_url: str) -> list[dict[str, str]]:
    """The credits the fixture site really holds (not what the worker says it did)."""
    with urllib.request.urlopen(f"{site_url}/_fixture/state", timeout=10) as response:
        credits: list[dict[str, str]] = json.loads(response.read())["credits"]
    return credits
