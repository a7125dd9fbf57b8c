"""Where Formwork's time per job goes: each part switched off in turn, measured in pairs.

bench/overhead.py says how much slower Formwork is than a hand-written script; this says why.
For each part below, billing/issue_credit runs in-process (run_job, as overhead.py's b) with
the part on and off, alternating on/off/on/off in one process on one Chromium, so machine
noise hits both alike; the table gives the median of the paired differences (on - off), in
wall time and in CPU of the whole process tree.

  allowlist guard   worker.guard: the context's proxy rules (off: every host bypasses the
                    proxy) and the request listener that writes down what they refused
  evidence early    evidence images encoded as each step ends (off: all at the end)
  detectors         the failure detectors read before a click that expects something
  measure           the acted element's and the dynamic regions' boxes for the annotations
  echo mask         the in-page observer that masks a secret the site itself shows
                    (worker.evidence.echo_mask_script), on every document of a secret job
  screenshots       every capture (off: none taken; the audit trail's whole cost)

Switching a part off is for measuring only: several are what make Formwork safe.

    python bench/ablation.py [--pairs N] [--parts guard,early,...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import harness as h
from playwright.async_api import ProxySettings

import worker.browser
import worker.executor
from worker.actions import PageActions
from worker.artifacts import ArtifactStore
from worker.browser import BrowserHost
from worker.contract import JobStatus
from worker.executor import run_job
from worker.guard import Guard, Sink, proxy_for


async def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _bypass_all(hosts: Any, sink: Sink) -> ProxySettings:
    return proxy_for(["*"], sink)  # every host bypasses the proxy


def _watch_nothing(self: Guard, context: Any) -> None:
    return None


def _no_guard() -> ExitStack:
    # The page made for the next job while the part is off is made the same way: both sides
    # of a pair alike.
    stack = ExitStack()
    stack.enter_context(mock.patch.object(worker.browser, "proxy_for", _bypass_all))
    stack.enter_context(mock.patch.object(Guard, "watch", _watch_nothing))
    return stack


async def _no_detectors(self: PageActions, step: Any) -> frozenset[str]:
    return frozenset()


def _not_early(self: ArtifactStore, source: str, mark: Any) -> None:
    return None  # record() encodes everything at the end instead


async def _no_boxes(*args: Any, **kwargs: Any) -> tuple[None, list[Any]]:
    return None, []


def _no_script(values: Any) -> None:
    return None  # no in-page observer for the secrets the site itself shows


# name -> (label, what to patch while the part is off)
PARTS: dict[str, tuple[str, Callable[[], Any]]] = {
    "guard": ("allowlist guard", _no_guard),
    "early": (
        "evidence early",
        lambda: mock.patch.object(ArtifactStore, "prepare", _not_early),
    ),
    "detectors": (
        "detectors",
        lambda: mock.patch.object(PageActions, "_showing_before", _no_detectors),
    ),
    "measure": ("measure", lambda: mock.patch.object(worker.executor, "measure", _no_boxes)),
    "echoes": (
        "echo mask",
        lambda: mock.patch.object(worker.executor, "echo_mask_script", _no_script),
    ),
    "screenshots": (
        "screenshots",
        lambda: mock.patch.object(worker.executor._Run, "screenshot", _nothing),
    ),
}


@contextmanager
def switched_off(part: str | None) -> Any:
    with ExitStack() as stack:
        if part is not None:
            stack.enter_context(PARTS[part][1]())
        yield


async def measure(pairs: int, parts: list[str], report: h.Report) -> None:
    ids = h.JobIds(h.run_prefix("ablation"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="formwork-bench-") as tmp, h.billing_site() as site:
        host = BrowserHost(keep_warm=True)
        await host.start()
        runtime = h.make_runtime(host, Path(tmp) / "artifacts")

        async def one(part: str | None) -> tuple[float, float]:
            await site.reset()
            with switched_off(part), h.CpuMeter(os.getpid()) as meter:
                start = time.perf_counter()
                result = await run_job(h.credit_job(ids("j"), site.url), runtime)
                elapsed = h.ms_since(start)
            if part is None and result.status != JobStatus.succeeded:
                raise RuntimeError(f"job ended {result.status}: {result.error}")
            return elapsed, sum(meter.used().values()) * 1000

        try:
            await one(None)  # warm-up, unmeasured
            for part in parts:
                wall, cpu, base = [], [], []
                for _ in range(pairs):
                    on_wall, on_cpu = await one(None)
                    off_wall, off_cpu = await one(part)
                    wall.append(on_wall - off_wall)
                    cpu.append(on_cpu - off_cpu)
                    base.append(on_wall)
                print(f"  {part}: {h.Samples(wall).median:+.0f} ms", flush=True)
                rows.append(
                    [
                        PARTS[part][0],
                        h.Samples(wall).median,
                        f"{h.Samples(wall).low:.0f} .. {h.Samples(wall).high:.0f}",
                        h.Samples(cpu).median,
                        f"{h.Samples(wall).median / h.Samples(base).median * 100:.1f}%",
                    ]
                )
        finally:
            await host.stop()
    report.add(
        f"billing/issue_credit in-process; {pairs} on/off pairs per part; the cost of each part "
        "is the median of (on - off) over the pairs:"
    )
    report.add()
    report.add(
        h.table(
            ["part", "wall ms", "min .. max", "CPU ms (tree)", "of the job"],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="on/off pairs per part")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS)
    )
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    report = h.Report("ablation: what each part of Formwork costs per job", sys.argv)
    asyncio.run(measure(args.pairs, parts, report))
    report.save()


if __name__ == "__main__":
    main()
