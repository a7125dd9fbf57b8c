"""Enqueue -> first browser action, one job at a time: Formwork's settings against arq's.

  formwork   poll_delay 0.02 s, BrowserHost(keep_warm=True) (a context and page made ahead)
  arq        arq's defaults: poll_delay 0.5 s, BrowserHost(keep_warm=False)

Each variant has its own in-process worker, queue and Chromium; jobs alternate between them
(A B A B …). The clock stops at the fixture site's ground truth: the arrival of the job's first
page request (`first_requests` in /_fixture/state: each job's fresh context is a new visitor).
The breakdown uses the report's timestamps (job started_at, first step started_at).

Once the first step has started the job is aborted (it stops between steps and ends
`cancelled`), so the benchmark spends its time on what it measures, not on 12 more steps.

Goal (formwork): p50 < 50 ms, p95 < 150 ms.

    python bench/latency.py [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import harness as h

from worker.browser import BrowserHost
from worker.client import FormworkClient
from worker.contract import EventKind, JobStatus, StepStatus
from worker.queue import running_worker
from worker.settings import Settings

GOAL_P50_MS = 50
GOAL_P95_MS = 150


@dataclass
class Variant:
    name: str
    poll_delay_s: float
    keep_warm: bool
    prefix: str = ""
    client: FormworkClient | None = None
    # enqueue -> the site saw the first request; and its parts
    total: h.Samples = field(default_factory=h.Samples)
    pickup: h.Samples = field(default_factory=h.Samples)  # enqueue -> job started_at
    prepare: h.Samples = field(default_factory=h.Samples)  # job start -> first step start
    request: h.Samples = field(default_factory=h.Samples)  # first step start -> site


@contextlib.asynccontextmanager
async def serving(variant: Variant, root: Path) -> AsyncIterator[None]:
    variant.prefix = h.run_prefix("latency")
    settings: Settings = h.make_settings(
        variant.prefix, root / variant.name, max_jobs=1, poll_delay_s=variant.poll_delay_s
    )
    host = BrowserHost(keep_warm=variant.keep_warm)
    await host.start()
    try:
        async with (
            FormworkClient(settings.redis_url, key_prefix=variant.prefix) as client,
            running_worker(settings, host) as worker,
        ):
            await h.wait_ready(worker)
            variant.client = client
            yield
    finally:
        await host.stop()
        await h.forget_keys(variant.prefix)


async def one_job(variant: Variant, site: h.Site, ids: h.JobIds, warmup: bool) -> None:
    assert variant.client is not None
    job = h.credit_job(ids(variant.name), site.url)
    enqueued = time.time()
    handle = await variant.client.enqueue(job)
    async with contextlib.aclosing(handle.events()) as events:
        async for _, event in events:
            # The first step is under way: let it finish, stop the job before the second.
            if event.kind == EventKind.step and event.status == StepStatus.running:
                await variant.client.abort(job.job_id, "benchmark: first step reached")
                break
    result = await handle.wait(timeout_s=120)
    if result.status not in (JobStatus.cancelled, JobStatus.succeeded):
        raise RuntimeError(f"job ended {result.status}: {result.error}")
    seen = [r["at"] for r in await site.first_requests() if r["at"] >= enqueued]
    if len(seen) != 1:
        raise RuntimeError(f"expected one new visitor after enqueue, the site saw {len(seen)}")
    if warmup:
        return
    first_step = result.steps[0].started_at
    assert first_step is not None
    variant.total.add((seen[0] - enqueued) * 1000)
    variant.pickup.add((result.started_at.timestamp() - enqueued) * 1000)
    variant.prepare.add((first_step - result.started_at).total_seconds() * 1000)
    variant.request.add((seen[0] - first_step.timestamp()) * 1000)


async def measure(jobs: int, report: h.Report) -> list[Variant]:
    variants = [
        Variant("formwork", poll_delay_s=0.02, keep_warm=True),
        Variant("arq-defaults", poll_delay_s=0.5, keep_warm=False),
    ]
    ids = h.JobIds(h.run_prefix("latency-jobs"))
    with tempfile.TemporaryDirectory(prefix="formwork-bench-") as tmp, h.billing_site() as site:
        root = Path(tmp)
        async with serving(variants[0], root), serving(variants[1], root):
            await site.reset()
            for index in range(jobs + 2):  # two warm-up jobs each, unmeasured
                for variant in variants:
                    await one_job(variant, site, ids, warmup=index < 2)
                if index >= 2 and (index - 1) % 10 == 0:
                    print(f"  {index - 1}/{jobs} jobs each", flush=True)
    report.add(
        f"Enqueue -> first page request at the site, ms ({jobs} jobs per variant, one at a "
        "time, interleaved):"
    )
    report.add()
    report.add(
        h.table(
            ["variant", "p50", "p95", "min", "max", "pickup p50", "prepare p50", "request p50"],
            [
                [
                    f"{v.name} (poll {v.poll_delay_s:g} s, keep_warm={v.keep_warm})",
                    v.total.p(50),
                    v.total.p(95),
                    v.total.low,
                    v.total.high,
                    v.pickup.p(50),
                    v.prepare.p(50),
                    v.request.p(50),
                ]
                for v in variants
            ],
        )
    )
    report.add()
    report.add(
        "pickup: enqueue -> the job's started_at (queue poll, arq, job record, events); "
        "prepare: -> the first step's started_at (intake, capacity slot, context and page); "
        "request: -> the site received GET /login (goto)."
    )
    report.add()
    fw = variants[0]
    report.add(
        h.table(
            ["goal (formwork)", "value", "goal", "verdict"],
            [
                [
                    "p50",
                    f"{fw.total.p(50):.1f} ms",
                    f"< {GOAL_P50_MS} ms",
                    h.verdict(fw.total.p(50) < GOAL_P50_MS),
                ],
                [
                    "p95",
                    f"{fw.total.p(95):.1f} ms",
                    f"< {GOAL_P95_MS} ms",
                    h.verdict(fw.total.p(95) < GOAL_P95_MS),
                ],
            ],
        )
    )
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40, help="measured jobs per variant")
    args = parser.parse_args()
    report = h.Report("latency: enqueue -> first browser action", sys.argv)
    asyncio.run(measure(args.jobs, report))
    report.save()


if __name__ == "__main__":
    main()
