"""Formwork on Debian's two headless Chromium builds, side by side: which one should a worker run?

  full   /usr/bin/chromium (FORMWORK_CHROMIUM, else the system Chromium): the full browser run
         headless (Chromium's "new headless"), Formwork's default
  shell  /usr/lib/chromium/chromium-headless-shell (package chromium-headless-shell): the
         "old headless" shell, the build Playwright itself uses for headless Chromium

Both run the same Formwork worker through the queue (enqueue -> report) on
billing/issue_credit, each with its own in-process arq worker, queue and BrowserHost, all
started before measuring. Each (round, concurrency) runs full, then shell, back to back, so
machine noise hits both alike. Every job must succeed and the fixture must hold one credit per
job (its ground truth), or the run stops.

Printed: jobs per minute and CPU per job at each concurrency; at concurrency 1 also the median
job time (enqueue -> report). No goal: the issue's goals are ratios against plain Playwright on
the same browser (bench/overhead.py, bench/throughput.py, both of which take FORMWORK_CHROMIUM);
this says what the choice of build is worth in jobs cleared per machine.

    python bench/browsers.py [--rounds N] [--concurrency 1,4] [--shell PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness as h

from worker.browser import BrowserHost, find_chromium
from worker.client import FormworkClient, JobHandle
from worker.contract import JobStatus
from worker.queue import running_worker

SHELL = "/usr/lib/chromium/chromium-headless-shell"


@dataclass
class Build:
    name: str
    executable: str
    rates: dict[int, h.Samples] = field(default_factory=dict)  # concurrency -> jobs/min
    cpu: dict[int, h.Samples] = field(default_factory=dict)  # concurrency -> CPU ms per job
    job_ms: h.Samples = field(default_factory=h.Samples)  # concurrency 1: enqueue -> report
    clients: dict[int, FormworkClient] = field(default_factory=dict)
    prefixes: dict[int, str] = field(default_factory=dict)


async def measure(args: argparse.Namespace, report: h.Report) -> None:
    builds = [Build("full", args.full), Build("shell", args.shell)]
    for build in builds:
        report.add(f"- {build.name}: {h.chromium_version(build.executable)}")
    report.add()
    levels = [int(c) for c in args.concurrency.split(",")]
    ids = h.JobIds(h.run_prefix("browsers"))
    with tempfile.TemporaryDirectory(prefix="formwork-bench-") as tmp, h.billing_site() as site:
        root = Path(tmp)
        selectors = h.selectors_dir(root, site_limits=False)
        hosts = [BrowserHost(b.executable, keep_warm=True) for b in builds]
        try:
            async with contextlib.AsyncExitStack() as stack:
                for build, host in zip(builds, hosts, strict=True):
                    await host.start()
                    for c in levels:
                        prefix = build.prefixes[c] = f"{ids.prefix}-{build.name}-c{c}"
                        settings = h.make_settings(
                            prefix, root / "artifacts", max_jobs=c, selectors=selectors
                        )
                        build.clients[c] = await stack.enter_async_context(
                            FormworkClient(settings.redis_url, key_prefix=prefix)
                        )
                        await h.wait_ready(
                            await stack.enter_async_context(running_worker(settings, host))
                        )

                async def batch(build: Build, concurrency: int, jobs: int) -> float:
                    await site.reset()
                    client = build.clients[concurrency]
                    start = time.perf_counter()
                    handles = [
                        await client.enqueue(h.credit_job(ids(build.name), site.url))
                        for _ in range(jobs)
                    ]

                    async def settled(handle: JobHandle) -> float:
                        result = await handle.wait(timeout_s=600)
                        if result.status != JobStatus.succeeded:
                            raise RuntimeError(f"{build.name}: job ended {result.status}")
                        return time.perf_counter() - start

                    ends = await asyncio.gather(*(settled(x) for x in handles))
                    credits = (await site.state())["credits"]
                    if len(credits) != jobs:  # the site's ground truth, not the reports
                        raise RuntimeError(f"{build.name}: {len(credits)} credits for {jobs} jobs")
                    if concurrency == 1:
                        build.job_ms.add(ends[0] * 1000)
                    return max(ends)

                for build in builds:  # warm-up, unmeasured
                    await batch(build, levels[0], 1)
                for round_ in range(1, args.rounds + 1):
                    for c in levels:
                        jobs = max(c, args.batch)
                        for build in builds:
                            with h.CpuMeter(os.getpid()) as meter:
                                elapsed = await batch(build, c, jobs)
                            rate = jobs / elapsed * 60
                            build.rates.setdefault(c, h.Samples()).add(rate)
                            used = sum(meter.used().values())
                            build.cpu.setdefault(c, h.Samples()).add(used / jobs * 1000)
                            print(
                                f"  round {round_}/{args.rounds} c={c} {build.name}: "
                                f"{jobs} jobs in {elapsed:.1f} s = {rate:.0f}/min",
                                flush=True,
                            )
        finally:
            for host in hosts:
                await host.stop()
            for build in builds:
                for prefix in build.prefixes.values():
                    await h.forget_keys(prefix)

    full_build, shell_build = builds
    report.add(
        f"Formwork through the queue, billing/issue_credit (median of {args.rounds} rounds "
        "[min-max]; CPU: this process tree, both builds' processes, per job):"
    )
    report.add()
    rows = []
    for c in levels:
        a, b = full_build.rates[c], shell_build.rates[c]
        rows.append(
            [
                c,
                f"{a.median:.1f} [{a.low:.1f}-{a.high:.1f}]",
                f"{b.median:.1f} [{b.low:.1f}-{b.high:.1f}]",
                f"{b.median / a.median:.2f}x",
                full_build.cpu[c].median,
                shell_build.cpu[c].median,
            ]
        )
    report.add(
        h.table(
            [
                "concurrency",
                "full: jobs/min",
                "shell: jobs/min",
                "shell/full",
                "full: CPU ms/job",
                "shell: CPU ms/job",
            ],
            rows,
        )
    )
    if 1 in levels:
        a_ms, b_ms = full_build.job_ms.median, shell_build.job_ms.median
        report.add()
        report.add(
            f"One job alone, enqueue -> report: full {a_ms:.0f} ms, shell {b_ms:.0f} ms "
            f"(shell/full {b_ms / a_ms:.2f}x)."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--concurrency", default="1,4", help="levels, comma-separated")
    parser.add_argument("--batch", type=int, default=4, help="jobs per batch, at least c")
    parser.add_argument("--shell", default=SHELL, help=f"the headless shell (default {SHELL})")
    args = parser.parse_args()
    args.full = find_chromium()
    if args.full is None:
        raise SystemExit("no system Chromium: run 'make setup' (or set FORMWORK_CHROMIUM)")
    if not Path(args.shell).is_file():
        raise SystemExit(f"{args.shell} is missing: apt-get install chromium-headless-shell")
    report = h.Report("browsers: Debian's chromium against chromium-headless-shell", sys.argv)
    asyncio.run(measure(args, report))
    report.save()


if __name__ == "__main__":
    main()
