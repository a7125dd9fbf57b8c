"""What Formwork costs per job over a hand-written Playwright script doing the same thing.

billing/issue_credit (13 steps, login included), one job at a time, four ways, interleaved:

  a'  plain Playwright, no screenshots (one browser, a fresh context per run)
  a   plain Playwright with Formwork's screenshots (after every step, JPEG q80, 1280x800,
      the filled username/password and every password input masked)
  b   Formwork in-process: worker.executor.run_job on a Runtime sharing one BrowserHost
  c   the queue: FormworkClient.enqueue -> handle.wait(), an in-process arq worker;
      measured from enqueue to the final report

The BrowserHost keeps a warm page, as a deployed worker's does: a and a' pay for their fresh
context and page inside the measured time, b and c find theirs made ahead. A second table
compares the steps one by one (the per-step times exclude context creation on every side); a
third, the CPU each variant's job used, by process (this process tree, from /proc: Python with
the in-process worker and fixture site, the Playwright driver, Chromium by process type), which
is where a' and a differ.

Goals: b/a and c/a <= 1.10; a/a' <= 1.30.

    python bench/overhead.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import harness as h

from worker.browser import BrowserHost
from worker.client import FormworkClient
from worker.contract import JobStatus
from worker.executor import run_job
from worker.queue import running_worker

GOAL_FORMWORK = 1.10
GOAL_SCREENSHOTS = 1.30


async def measure(runs: int, report: h.Report) -> None:
    credentials = h.fixture_secrets()
    prefix = h.run_prefix("overhead")
    ids = h.JobIds(prefix)
    names = ["a'", "a", "b", "c"]
    samples = {name: h.Samples() for name in names}
    steps: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="formwork-bench-") as tmp, h.billing_site() as site:
        root = Path(tmp)
        settings = h.make_settings(prefix, root / "queue-artifacts", max_jobs=1)
        host = BrowserHost(keep_warm=True)
        await host.start()
        runtime = h.make_runtime(host, root / "artifacts")
        try:
            async with (
                h.plain_browser() as plain,
                FormworkClient(settings.redis_url, key_prefix=prefix) as client,
                running_worker(settings, host) as worker,
            ):
                await h.wait_ready(worker)

                async def plain_no_shots() -> None:
                    await h.plain_flow(
                        plain, site.url, credentials, screenshots=None, timings=steps["a'"]
                    )

                async def plain_shots() -> None:
                    await h.plain_flow(
                        plain,
                        site.url,
                        credentials,
                        screenshots=root / "plain" / ids("p"),
                        timings=steps["a"],
                    )

                async def in_process() -> None:
                    result = await run_job(h.credit_job(ids("b"), site.url), runtime)
                    check(result.status, result.error)
                    for step in result.steps:
                        steps["b"].setdefault(step.id, []).append(step.duration_ms or 0)

                async def queued() -> None:
                    handle = await client.enqueue(h.credit_job(ids("c"), site.url))
                    result = await handle.wait(timeout_s=120)
                    check(result.status, result.error)
                    for step in result.steps:
                        steps["c"].setdefault(step.id, []).append(step.duration_ms or 0)

                variants: dict[str, Callable[[], Awaitable[None]]] = {
                    "a'": plain_no_shots,
                    "a": plain_shots,
                    "b": in_process,
                    "c": queued,
                }
                for round_ in range(runs + 1):  # round 0 warms every path up, unmeasured
                    for name, run in variants.items():
                        await site.reset()
                        # Each variant starts on a quiet machine: the page the last Formwork
                        # job's end started making for the next job is made first. Otherwise
                        # a' runs beside that work, and c (enqueued as b ends) waits for it:
                        # back to back, which throughput.py measures, not one job's overhead.
                        await host.settled()
                        with h.CpuMeter(os.getpid(), group=h.cpu_process) as meter:
                            start = time.perf_counter()
                            await run()
                            elapsed = h.ms_since(start)
                        if round_ > 0:
                            samples[name].add(elapsed)
                            cpu[name].append({g: s * 1000 for g, s in meter.used().items()})
                    if round_ > 0:
                        print(
                            f"  round {round_}/{runs}: "
                            + "  ".join(f"{n} {samples[n].values[-1]:.0f}" for n in names),
                            flush=True,
                        )
                    else:
                        for timing in steps.values():
                            timing.clear()
        finally:
            await host.stop()
            await h.forget_keys(prefix)

    labels = {
        "a'": "a' plain Playwright, no screenshots",
        "a": "a  plain Playwright + screenshots",
        "b": "b  Formwork run_job (in-process)",
        "c": "c  Formwork queue (enqueue -> report)",
    }
    base = samples["a"].median
    report.add(f"Per job, ms ({runs} runs each, interleaved a' a b c):")
    report.add()
    report.add(
        h.table(
            ["variant", "median", "min", "max", "vs a"],
            [
                [labels[n], s.median, s.low, s.high, f"{h.ratio(s.median, base):.2f}x"]
                for n, s in samples.items()
            ],
        )
    )
    report.add()
    report.add("Per step, median ms (a'/a: action + screenshot as timed by the script; b/c: the")
    report.add("step's duration_ms in the report, which includes its screenshot):")
    report.add()
    report.add(
        h.table(
            ["step", "a'", "a", "b", "c", "b - a"],
            [
                [
                    step,
                    *(h.Samples(steps[n].get(step, [])).median for n in names),
                    h.Samples(steps["b"].get(step, [])).median
                    - h.Samples(steps["a"].get(step, [])).median,
                ]
                for step in h.STEP_IDS
            ]
            + [
                [
                    "sum of step medians",
                    *(
                        sum(h.Samples(v).median for v in steps[n].values()) if steps[n] else 0.0
                        for n in names
                    ),
                    sum(h.Samples(v).median for v in steps["b"].values())
                    - sum(h.Samples(v).median for v in steps["a"].values()),
                ]
            ],
        )
    )
    report.add()
    report.add("CPU per job by process, ms (median over the runs; a - a' is the audit trail's")
    report.add("cost; a process seen only after it exited is counted as 'exited unseen'):")
    report.add()
    groups = sorted({g for per in cpu.values() for used in per for g in used})

    def cpu_median(name: str, group: str) -> float:
        return h.Samples([used.get(group, 0.0) for used in cpu[name]]).median

    def cpu_total(name: str) -> float:
        return h.Samples([sum(used.values()) for used in cpu[name]]).median

    report.add(
        h.table(
            ["process", "a'", "a", "b", "c", "a - a'"],
            [
                [g, *(cpu_median(n, g) for n in names), cpu_median("a", g) - cpu_median("a'", g)]
                for g in groups
            ]
            + [["total", *(cpu_total(n) for n in names), cpu_total("a") - cpu_total("a'")]],
        )
    )
    report.add()
    b_a = h.ratio(samples["b"].median, base)
    c_a = h.ratio(samples["c"].median, base)
    a_a0 = h.ratio(base, samples["a'"].median)
    report.add(
        h.table(
            ["ratio", "value", "goal", "verdict"],
            [
                ["b/a", f"{b_a:.2f}x", f"<= {GOAL_FORMWORK:.2f}x", h.verdict(b_a <= GOAL_FORMWORK)],
                ["c/a", f"{c_a:.2f}x", f"<= {GOAL_FORMWORK:.2f}x", h.verdict(c_a <= GOAL_FORMWORK)],
                [
                    "a/a'",
                    f"{a_a0:.2f}x",
                    f"<= {GOAL_SCREENSHOTS:.2f}x",
                    h.verdict(a_a0 <= GOAL_SCREENSHOTS),
                ],
            ],
        )
    )


def check(status: JobStatus, error: object) -> None:
    if status != JobStatus.succeeded:
        raise RuntimeError(f"job ended {status}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per variant")
    args = parser.parse_args()
    report = h.Report("overhead: billing/issue_credit, one job at a time", sys.argv)
    asyncio.run(measure(args.runs, report))
    report.save()


if __name__ == "__main__":
    main()
