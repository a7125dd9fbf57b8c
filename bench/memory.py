"""Resident memory of a `formwork worker` process and its Chromium process tree.

A real `formwork worker` subprocess (FORMWORK_MAX_JOBS=8, environment as in tests/conftest.py
`worker_env`) is measured from /proc: the RSS of the worker and all its descendants (the
Playwright driver, Chromium's browser, GPU, network and renderer processes), summed, sampled
every 100 ms. RSS counts a shared page in every process that maps it, so the sum overstates
what the tree really holds; PSS (each shared page divided among the processes that map it) and
USS (private pages only), from /proc/PID/smaps_rollup once a second, are shown beside it.

  idle           after start-up (a warm page made), and after a first job
  concurrency    --jobs N (default 100; 500 for the full check) run as batches of 1, 4, 8, 1,
                 4, 8 … simultaneous jobs; per level, the peak during its batches and the
                 memory per job = (peak - idle before the batch) / concurrency
  growth         the idle memory before each batch: after the first cycle (13 jobs) it must
                 not keep growing

The billing site caps itself at 4 concurrent jobs; the worker gets a copy of the registries
without `limits` so that concurrency 8 means 8.

Goals: < 80 MB per concurrent job, judged on PSS (RSS counts each of Chromium's shared pages
once per process that maps it, so RSS per job overstates what a job costs several times over);
flat after 500 jobs: the idle PSS at the end within 10% of the idle PSS after the first cycle
(the least-squares trend is shown too). Judged on PSS for the same reason: the idle RSS of the
same tree jumps by ±10% from one idle moment to the next (Chromium's processes mapping shared
pages in and out), PSS by ±3%, so a first-to-last RSS comparison mostly measures that jitter.

The worker recycles its Playwright driver and Chromium every FORMWORK_BROWSER_RECYCLE_JOBS
jobs (1000 by default, so not within a 500-job run; `--recycle-jobs N` here, 0 for never).

    python bench/memory.py [--jobs N] [--recycle-jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import harness as h
from redis.asyncio import Redis

from worker.client import FormworkClient
from worker.contract import JobStatus
from worker.settings import Settings

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024
LEVELS = (1, 4, 8)
GOAL_PER_JOB_MB = 80
GOAL_GROWTH = 0.10


# ---------------------------------------------------------------- /proc


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


@dataclass
class Mem:
    """Bytes: resident (RSS), proportional share (PSS) and private (USS) memory."""

    rss: int = 0
    pss: int = 0
    uss: int = 0
    processes: int = 0

    def __add__(self, other: Mem) -> Mem:
        return Mem(
            self.rss + other.rss,
            self.pss + other.pss,
            self.uss + other.uss,
            self.processes + other.processes,
        )


_ROLLUP = re.compile(rb"^(Pss|Private_Clean|Private_Dirty):\s+(\d+) kB", re.MULTILINE)


def process_mem(pid: int, *, detail: bool) -> Mem:
    """RSS from statm (cheap); with `detail`, PSS and USS from smaps_rollup (the kernel walks
    the page tables: ~2 ms a process, too dear to do ten times a second)."""
    rss = rss_bytes(pid)
    if not detail or not rss:
        return Mem(rss=rss, processes=1)
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            fields = {k: int(v) * 1024 for k, v in _ROLLUP.findall(rollup.read())}
    except OSError:
        return Mem(rss=rss, processes=1)
    uss = fields.get(b"Private_Clean", 0) + fields.get(b"Private_Dirty", 0)
    return Mem(rss=rss, pss=fields.get(b"Pss", 0), uss=uss, processes=1)


def tree_mem(root: int, *, detail: bool) -> Mem:
    total = Mem()
    for pid in h.descendants(root):
        total = total + process_mem(pid, detail=detail)
    return total


def by_kind(root: int) -> dict[str, Mem]:
    kinds: dict[str, Mem] = {}
    for pid in h.descendants(root):
        kind = h.kind_of(pid)
        kinds[kind] = kinds.get(kind, Mem()) + process_mem(pid, detail=True)
    return kinds


def kinds_table(kinds: dict[str, Mem]) -> str:
    total = Mem()
    for mem in kinds.values():
        total = total + mem
    rows: list[list[object]] = [
        [kind, m.processes, mb(m.rss), mb(m.pss), mb(m.uss)] for kind, m in sorted(kinds.items())
    ]
    rows.append(["total", total.processes, mb(total.rss), mb(total.pss), mb(total.uss)])
    return h.table(["process", "count", "RSS", "PSS", "USS"], rows)


class Sampler:
    """In the background: the tree's RSS every 100 ms (peak kept), and PSS/USS by process
    kind once a second (the sample with the highest PSS kept)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.reset()

    def reset(self) -> None:
        self.peak = Mem()
        self.peak_detail = Mem()
        self.peak_kinds: dict[str, Mem] = {}

    async def run(self) -> None:
        count = 0
        while True:
            if count % 10 == 0:
                kinds = await asyncio.to_thread(by_kind, self.root)
                detail = Mem()
                for mem in kinds.values():
                    detail = detail + mem
                if detail.pss > self.peak_detail.pss:
                    self.peak_detail, self.peak_kinds = detail, kinds
                sample = detail
            else:
                sample = await asyncio.to_thread(tree_mem, self.root, detail=False)
            if sample.rss > self.peak.rss:
                self.peak = sample
            count += 1
            await asyncio.sleep(0.1)


async def idle(root: int, span_s: float = 1.0) -> Mem:
    """The quiet level: the lowest RSS seen over `span_s` (renderers of closed contexts take
    a moment to exit), then one detailed sample."""
    low: Mem | None = None
    deadline = time.monotonic() + span_s
    while time.monotonic() < deadline:
        sample = await asyncio.to_thread(tree_mem, root, detail=False)
        if low is None or sample.rss < low.rss:
            low = sample
        await asyncio.sleep(0.1)
    detail = await asyncio.to_thread(tree_mem, root, detail=True)
    if low is not None and low.rss < detail.rss:
        detail.rss = low.rss
    return detail


def mb(value: float) -> float:
    return value / MB


# ---------------------------------------------------------------- the worker process


@contextlib.asynccontextmanager
async def worker_process(settings: Settings, log: Path) -> AsyncIterator[int]:
    """A `formwork worker` subprocess; yields its pid once it polls the queue."""
    env = {**os.environ, **settings.to_env()}
    formwork = Path(sys.executable).with_name("formwork")
    with open_log(log) as out:
        process = await asyncio.create_subprocess_exec(
            str(formwork), "worker", env=env, stdout=out, stderr=subprocess.STDOUT, cwd=h.ROOT
        )
    redis = Redis.from_url(settings.redis_url)
    try:
        # arq records its health-check key on its first poll, after the startup hook.
        health = f"{settings.key_prefix}:queue:health-check"

        async def ready() -> bool:
            if process.returncode is not None:
                raise RuntimeError(f"worker exited {process.returncode}: {read_log(log)}")
            return bool(await redis.exists(health))

        await h.wait_until(ready, timeout_s=60, every_s=0.05)
        yield process.pid
    finally:
        await redis.aclose()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


def open_log(path: Path) -> BinaryIO:
    return path.open("wb")


def read_log(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


# ---------------------------------------------------------------- the benchmark


async def run_batch(client: FormworkClient, ids: h.JobIds, site: h.Site, jobs: int) -> None:
    handles = [await client.enqueue(h.credit_job(ids(), site.url)) for _ in range(jobs)]
    results = await asyncio.gather(*(x.wait(timeout_s=600) for x in handles))
    for result in results:
        if result.status != JobStatus.succeeded:
            raise RuntimeError(f"job ended {result.status}: {result.error}")


@dataclass
class Level:
    peak_rss: h.Samples = field(default_factory=h.Samples)
    peak_pss: h.Samples = field(default_factory=h.Samples)
    processes: h.Samples = field(default_factory=h.Samples)
    rss_per_job: h.Samples = field(default_factory=h.Samples)
    pss_per_job: h.Samples = field(default_factory=h.Samples)
    uss_per_job: h.Samples = field(default_factory=h.Samples)
    kinds: dict[str, Mem] = field(default_factory=dict)


async def measure(args: argparse.Namespace, report: h.Report) -> None:
    prefix = h.run_prefix("memory")
    ids = h.JobIds(prefix)
    levels = {c: Level() for c in LEVELS}
    checkpoints: list[tuple[int, Mem]] = []
    with tempfile.TemporaryDirectory(prefix="formwork-bench-") as tmp, h.billing_site() as site:
        root = Path(tmp)
        settings = h.make_settings(
            prefix,
            root / "artifacts",
            max_jobs=max(LEVELS),
            selectors=h.selectors_dir(root, site_limits=False),
        )
        if args.recycle_jobs is not None:
            settings = settings.model_copy(update={"browser_recycle_jobs": args.recycle_jobs})
        try:
            async with (
                worker_process(settings, root / "worker.log") as pid,
                FormworkClient(settings.redis_url, key_prefix=prefix) as client,
            ):
                await site.reset()
                start_idle = await idle(pid)
                await run_batch(client, ids, site, 1)
                warm_idle = await idle(pid)
                warm_kinds = await asyncio.to_thread(by_kind, pid)

                # The jobs run as batches of 1, 4, 8, 1, 4, 8 … simultaneous jobs: each batch
                # gives a peak for its level, and the idle level before each batch is a
                # checkpoint of the growth check.
                sampler = Sampler(pid)
                task = asyncio.create_task(sampler.run())
                done = 0
                try:
                    cycle = 0
                    while done < args.jobs:
                        c = LEVELS[cycle % len(LEVELS)]
                        cycle += 1
                        c = min(c, args.jobs - done)
                        await site.reset()
                        before = await idle(pid, span_s=0.5)
                        if done:
                            checkpoints.append((done, before))
                        sampler.reset()
                        await run_batch(client, ids, site, c)
                        done += c
                        if c in levels:
                            level = levels[c]
                            peak, detail = sampler.peak, sampler.peak_detail
                            level.peak_rss.add(mb(peak.rss))
                            level.peak_pss.add(mb(detail.pss))
                            level.processes.add(peak.processes)
                            level.rss_per_job.add(mb(peak.rss - before.rss) / c)
                            level.pss_per_job.add(mb(detail.pss - before.pss) / c)
                            level.uss_per_job.add(mb(detail.uss - before.uss) / c)
                            if detail.pss:
                                level.kinds = sampler.peak_kinds
                        if cycle % 6 == 0 or done >= args.jobs:
                            print(
                                f"  {done}/{args.jobs} jobs: idle before the last batch "
                                f"{mb(before.rss):.0f} MB RSS; c=8 peak median "
                                f"{levels[8].peak_rss.median:.0f} MB",
                                flush=True,
                            )
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                checkpoints.append((done, await idle(pid)))
                final_kinds = await asyncio.to_thread(by_kind, pid)
        finally:
            await h.forget_keys(prefix)

    report.add(
        f"The worker recycles its driver and Chromium every {settings.browser_recycle_jobs} "
        "jobs (0: never)."
    )
    report.add()
    report.add(
        f"Idle, MB: after start-up {mb(start_idle.rss):.0f} RSS / {mb(start_idle.pss):.0f} PSS "
        f"({start_idle.processes} processes); after a first job {mb(warm_idle.rss):.0f} RSS / "
        f"{mb(warm_idle.pss):.0f} PSS ({warm_idle.processes} processes). By process, after "
        "the first job:"
    )
    report.add()
    report.add(kinds_table(warm_kinds))
    report.add()
    report.add(
        "Peak during a batch of c simultaneous jobs, MB (median over the batches of that "
        "size [min-max]; per job = (peak - idle before the batch) / c; PSS/USS sampled once a "
        "second, RSS ten times):"
    )
    report.add()
    report.add(
        h.table(
            ["concurrency", "peak RSS", "peak PSS", "processes", "RSS/job", "PSS/job", "USS/job"],
            [
                [
                    c,
                    f"{v.peak_rss.median:.0f} [{v.peak_rss.low:.0f}-{v.peak_rss.high:.0f}]",
                    f"{v.peak_pss.median:.0f}",
                    f"{v.processes.median:.0f}",
                    f"{v.rss_per_job.median:.0f} [{v.rss_per_job.low:.0f}-"
                    f"{v.rss_per_job.high:.0f}]",
                    f"{v.pss_per_job.median:.0f}",
                    f"{v.uss_per_job.median:.0f}",
                ]
                for c, v in levels.items()
            ],
        )
    )
    report.add()
    top = max(LEVELS)
    report.add(f"By process at the peak (highest-PSS sample) of the last c={top} batch, MB:")
    report.add()
    report.add(kinds_table(levels[top].kinds))
    report.add()

    # The baseline: the first checkpoint after a whole cycle of batches (everything warm).
    base = next((i for i, (n, _) in enumerate(checkpoints) if n >= sum(LEVELS)), 0)
    checkpoints = checkpoints[base:]
    first, last = checkpoints[0][1], checkpoints[-1][1]
    growth = (last.pss - first.pss) / first.pss
    rss_growth = (last.rss - first.rss) / first.rss
    slope = trend_mb_per_100(checkpoints)
    shown = checkpoints[:: max(1, len(checkpoints) // 10)]
    if shown[-1] is not checkpoints[-1]:
        shown.append(checkpoints[-1])
    report.add("Idle (lowest RSS over 0.5 s before the next batch) as the jobs add up, MB:")
    report.add()
    report.add(
        h.table(
            ["jobs done", "RSS", "PSS", "USS", "processes"],
            [[n, mb(m.rss), mb(m.pss), mb(m.uss), m.processes] for n, m in shown],
        )
    )
    report.add()
    report.add("By process after the last batch, MB:")
    report.add()
    report.add(kinds_table(final_kinds))
    report.add()
    worst_rss = max(v.rss_per_job.median for v in levels.values())
    worst = max(v.pss_per_job.median for v in levels.values())
    partial = "" if args.jobs >= 500 else f" (only {args.jobs} jobs; --jobs 500 for the check)"
    report.add(
        h.table(
            ["goal", "value", "goal", "verdict"],
            [
                [
                    "PSS per concurrent job (worst level)",
                    f"{worst:.0f} MB (RSS {worst_rss:.0f} MB)",
                    f"< {GOAL_PER_JOB_MB} MB",
                    h.verdict(worst < GOAL_PER_JOB_MB),
                ],
                [
                    f"idle PSS growth, {checkpoints[0][0]} -> {checkpoints[-1][0]} jobs",
                    f"{growth * 100:+.1f}% ({mb(last.pss - first.pss):+.0f} MB; trend "
                    f"{slope:+.1f} MB/100 jobs; RSS {rss_growth * 100:+.1f}%)",
                    f"<= {GOAL_GROWTH * 100:.0f}%",
                    h.verdict(growth <= GOAL_GROWTH) + partial,
                ],
            ],
        )
    )


def trend_mb_per_100(checkpoints: list[tuple[int, Mem]]) -> float:
    """Least-squares slope of idle PSS over jobs done, in MB per 100 jobs."""
    if len(checkpoints) < 2:
        return 0.0
    xs = [float(n) for n, _ in checkpoints]
    ys = [mb(s.pss) for _, s in checkpoints]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return cov / var * 100 if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs for the growth check")
    parser.add_argument(
        "--recycle-jobs",
        type=int,
        default=None,
        help="FORMWORK_BROWSER_RECYCLE_JOBS for the worker (default: the worker's own, 1000)",
    )
    args = parser.parse_args()
    report = h.Report("memory: worker process + Chromium tree", sys.argv)
    asyncio.run(measure(args, report))
    report.save()


if __name__ == "__main__":
    main()
