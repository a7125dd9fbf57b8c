"""Jobs per minute at concurrency 1, 2, 4, 8: Formwork against plain Playwright.

  a  Formwork: an in-process arq worker with max_jobs = concurrency (one per level, each on
     its own queue, all started before measuring and sharing one BrowserHost); a batch is
     enqueued with FormworkClient and every handle waited on (first enqueue -> last report)
  b  the naive design: plain Playwright, a fresh Chromium launched per job (same flow,
     same screenshots; the Playwright driver is shared)
  c  plain Playwright, one browser, a fresh context per job (the practical upper bound)

Each (round, concurrency) runs a, b, c back to back, so machine noise hits all three alike.
A batch is `concurrency` jobs by default (`--batch N` for more). Beside the rates, the CPU
time each variant's batches used (this process tree, from /proc) is shown per job: on 2 cores
the jobs are CPU-bound, so CPU per job is what sets the ceiling.
The billing registry caps the site at 4 concurrent jobs; by default the worker gets a copy of
the registries without `limits`, so concurrency 8 means 8 (`--site-limits` keeps the cap).

Goal, at the best concurrency: a >= 0.9x c and a >= 2x b.

    python bench/throughput.py [--rounds N] [--batch N] [--concurrency 1,2,4,8] [--site-limits]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import harness as h
from playwright.async_api import async_playwright

from worker.browser import BrowserHost
from worker.client import FormworkClient
from worker.contract import JobStatus
from worker.queue import running_worker

GOAL_VS_UPPER = 0.9
GOAL_VS_NAIVE = 2.0


def batch_size(concurrency: int, batch: int | None) -> int:
    """Jobs per batch: by default one job per slot, so the file runs in about three minutes
    on 2 cores (where one job alone keeps 1.5 cores busy); `--batch 16` is steadier."""
    return batch if batch is not None else concurrency


async def measure(args: argparse.Namespace, report: h.Report) -> None:
    credentials = h.fixture_secrets()
    prefix = h.run_prefix("throughput")
    ids = h.JobIds(prefix)
    levels = [int(c) for c in args.concurrency.split(",")]
    names = ["a", "b", "c"]
    rates = {(n, c): h.Samples() for n in names for c in levels}
    # CPU seconds per job of this process tree (Python: benchmark, worker and fixture site;
    # the Playwright drivers; Chromium), per variant, over every batch.
    cpu = {(n, g): h.Samples() for n in names for g in ("total", "python", "browser")}
    with (
        tempfile.TemporaryDirectory(prefix="formwork-bench-") as tmp,
        h.billing_site() as site,
    ):
        root = Path(tmp)
        selectors = h.selectors_dir(root, site_limits=args.site_limits)
        host = BrowserHost(keep_warm=True)
        await host.start()
        # One worker per concurrency level (max_jobs = level), each on a queue of its own and
        # all sharing one Chromium, started before any measurement and kept running.
        prefixes = {c: f"{prefix}-c{c}" for c in levels}
        try:
            async with contextlib.AsyncExitStack() as stack:
                playwright = await stack.enter_async_context(async_playwright())
                clients: dict[int, FormworkClient] = {}
                for c in levels:
                    settings = h.make_settings(
                        prefixes[c], root / "artifacts", max_jobs=c, selectors=selectors
                    )
                    clients[c] = await stack.enter_async_context(
                        FormworkClient(settings.redis_url, key_prefix=prefixes[c])
                    )
                    await h.wait_ready(
                        await stack.enter_async_context(running_worker(settings, host))
                    )
                upper = await h.launch_plain(playwright)

                async def formwork(concurrency: int, jobs: int) -> float:
                    client = clients[concurrency]
                    job_ids = [f"{prefixes[concurrency]}-{ids('a')}" for _ in range(jobs)]
                    start = time.perf_counter()
                    handles = [await client.enqueue(h.credit_job(j, site.url)) for j in job_ids]
                    results = await asyncio.gather(*(x.wait(timeout_s=600) for x in handles))
                    elapsed = time.perf_counter() - start
                    for result in results:
                        if result.status != JobStatus.succeeded:
                            raise RuntimeError(f"job ended {result.status}: {result.error}")
                    return elapsed

                async def pooled(
                    concurrency: int, jobs: int, one: Callable[[Path], Awaitable[str]], tag: str
                ) -> float:
                    slots = asyncio.Semaphore(concurrency)

                    async def job() -> None:
                        async with slots:
                            await one(root / "plain" / ids(tag))

                    start = time.perf_counter()
                    await asyncio.gather(*(job() for _ in range(jobs)))
                    return time.perf_counter() - start

                async def naive(concurrency: int, jobs: int) -> float:
                    async def one(folder: Path) -> str:
                        return await h.plain_flow_fresh_browser(
                            playwright, site.url, credentials, screenshots=folder
                        )

                    return await pooled(concurrency, jobs, one, "b")

                async def shared(concurrency: int, jobs: int) -> float:
                    async def one(folder: Path) -> str:
                        return await h.plain_flow(upper, site.url, credentials, screenshots=folder)

                    return await pooled(concurrency, jobs, one, "c")

                variants = {"a": formwork, "b": naive, "c": shared}
                # Warm-up, unmeasured: every path once.
                for run in variants.values():
                    await site.reset()
                    await run(levels[0], 1)
                for round_ in range(1, args.rounds + 1):
                    for concurrency in levels:
                        jobs = batch_size(concurrency, args.batch)
                        for name, run in variants.items():
                            await site.reset()
                            with h.CpuMeter(os.getpid()) as meter:
                                elapsed = await run(concurrency, jobs)
                            used = meter.used()
                            cpu[name, "total"].add(sum(used.values()) / jobs * 1000)
                            cpu[name, "python"].add(used.get("python", 0.0) / jobs * 1000)
                            cpu[name, "browser"].add(
                                (used.get("driver", 0.0) + used.get("chromium", 0.0)) / jobs * 1000
                            )
                            rate = jobs / elapsed * 60
                            rates[name, concurrency].add(rate)
                            print(
                                f"  round {round_}/{args.rounds} c={concurrency} {name}: "
                                f"{jobs} jobs in {elapsed:.1f} s = {rate:.0f}/min",
                                flush=True,
                            )
                await upper.close()
        finally:
            await host.stop()
            for level_prefix in prefixes.values():
                await h.forget_keys(level_prefix)

    report.add(
        f"Jobs per minute (median of {args.rounds} rounds [min-max]; batch per level: "
        + ", ".join(f"c={c}: {batch_size(c, args.batch)}" for c in levels)
        + "; "
        + ("site limits kept" if args.site_limits else "billing's site cap of 4 lifted")
        + "):"
    )
    report.add()

    def cell(name: str, c: int) -> str:
        s = rates[name, c]
        return f"{s.median:.1f} [{s.low:.1f}-{s.high:.1f}]"

    rows = []
    for c in levels:
        a, b, up = (rates[n, c].median for n in names)
        rows.append(
            [c, cell("a", c), cell("b", c), cell("c", c), f"{a / up:.2f}x", f"{a / b:.2f}x"]
        )
    report.add(
        h.table(
            [
                "concurrency",
                "a Formwork",
                "b fresh Chromium per job",
                "c shared browser",
                "a/c",
                "a/b",
            ],
            rows,
        )
    )
    report.add()
    report.add(
        "CPU per job, ms (this process tree, median over all batches; at saturation on "
        f"{os.cpu_count()} cores the rate is bounded by cores / CPU per job):"
    )
    report.add()
    labels = {"a": "a Formwork", "b": "b fresh Chromium per job", "c": "c shared browser"}
    report.add(
        h.table(
            ["variant", "total", "python", "driver + chromium"],
            [
                [labels[n], *(cpu[n, g].median for g in ("total", "python", "browser"))]
                for n in names
            ],
        )
    )
    report.add()
    best = max(levels, key=lambda c: rates["a", c].median)
    a_best = rates["a", best].median
    c_best = max(rates["c", c].median for c in levels)
    b_best = max(rates["b", c].median for c in levels)
    vs_upper = a_best / c_best
    vs_naive = a_best / b_best
    report.add(
        f"Best Formwork rate: {a_best:.1f}/min at concurrency {best}; best of c: "
        f"{c_best:.1f}/min; best of b: {b_best:.1f}/min."
    )
    report.add()
    report.add(
        h.table(
            ["ratio (best vs best)", "value", "goal", "verdict"],
            [
                [
                    "a/c",
                    f"{vs_upper:.2f}x",
                    f">= {GOAL_VS_UPPER:.1f}x",
                    h.verdict(vs_upper >= GOAL_VS_UPPER),
                ],
                [
                    "a/b",
                    f"{vs_naive:.2f}x",
                    f">= {GOAL_VS_NAIVE:.1f}x",
                    h.verdict(vs_naive >= GOAL_VS_NAIVE),
                ],
            ],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (default 2)")
    parser.add_argument("--batch", type=int, help="jobs per batch (default: c)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="levels, comma-separated")
    parser.add_argument(
        "--site-limits", action="store_true", help="keep the site registry's concurrency cap"
    )
    args = parser.parse_args()
    report = h.Report("throughput: billing/issue_credit jobs per minute", sys.argv)
    asyncio.run(measure(args, report))
    report.save()


if __name__ == "__main__":
    main()
