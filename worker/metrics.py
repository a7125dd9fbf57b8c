"""Each worker's Prometheus metrics, and the one call that counts a job when it settles.

Activity — how much happened — and quality — whether what happened can be trusted — are kept
apart in the names: `formwork_jobs_*`, `formwork_rules_fired_total`, `formwork_step_*`,
`formwork_queue_*`, `formwork_browser_*`, `formwork_worker_*` for activity;
`formwork_claims_total`, `formwork_selector_drift_total`, `formwork_handoffs_total`,
`formwork_outcome_unknown_total` for quality. Every worker has a registry of its own (tests run
several in one process); values that live elsewhere (queue depth, browser restarts, memory)
are read when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.backlog import backlog
from worker.browser import BrowserHost
from worker.contract import JobReport
from worker.errors import ScriptInvalid
from worker.keys import Keys
from worker.outcome import JobOutcome, outcome_of
from worker.stats import JobStats

if TYPE_CHECKING:
    from worker.script import ScriptStore

log = logging.getLogger("formwork.metrics")


class MetricsPortUnavailable(Exception):
    """The worker's /metrics port cannot be listened on (another process holds it, say).

    Not an `OSError`, on purpose: the worker command takes connection errors (`OSError`s) for
    a lost Redis and tries again, and waiting cannot free a port this worker's setting names."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        if cause.errno == errno.EADDRINUSE:
            why = "is in use (another process listens on it)"
        elif isinstance(cause, socket.gaierror) or cause.errno == errno.EADDRNOTAVAIL:
            # The host is what is wrong, not the port: name the setting a person changes.
            # asyncio's bind error repeats the address in its strerror; a lookup's errno is <0.
            code = cause.errno or 0
            said = os.strerror(code) if code > 0 else (cause.strerror or str(cause))
            why = (
                f"cannot be listened on: FORMWORK_METRICS_HOST={host!r} is no address of this "
                f"machine ({said})"
            )
        else:
            why = f"cannot be listened on: {cause.strerror or cause}"
        super().__init__(f"metrics port {port} on {host} {why}")
        self.port = port


JOB = ["site", "script", "version"]
# Form steps take tens of milliseconds to a few seconds; a commit waiting on a slow back
# office can take most of a minute.
STEP_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class WorkerMetrics:
    """The Prometheus side: counters fed by `observe`, live values read at scrape time.

    One per worker process: a Prometheus counter starts again at 0 only when its process does
    (`rate()` takes any drop for a restart, and loses what was counted since the last scrape).
    `formwork worker` builds a new arq worker each time it connects again after losing Redis,
    and hands it the same metrics (`attach`), so the counts go on."""

    def __init__(self, redis: Redis, keys: Keys, browser: BrowserHost | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.live = _Live(redis, keys, browser)
        self.registry.register(self.live)
        r = self.registry
        self.started = Counter(
            "formwork_jobs_started", "Job runs that began browser work.", JOB, registry=r
        )
        self.jobs = Counter(
            "formwork_jobs",
            "Job runs settled, by status: succeeded, failed, rejected, cancelled, expired, "
            "rejected_by_approver, or paused (paused_for_handoff, needs_customer_input, "
            "awaiting_approval).",
            [*JOB, "status"],
            registry=r,
        )
        self.rules = Counter(
            "formwork_rules_fired",
            "Failure rules that changed a job's course: retry, alternate, relogin, handoff, "
            "ask_customer, verify_effect, retry_from, fail…",
            [*JOB, "action", "code"],
            registry=r,
        )
        self.steps = Histogram(
            "formwork_step_duration_seconds",
            "Step duration, all attempts and waits included.",
            ["site", "script", "action"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.claims = Counter(
            "formwork_claims",
            "Claims of ended jobs by how they were verified (postcondition, probe, manual) "
            "or not (verified=false).",
            [*JOB, "how", "verified"],
            registry=r,
        )
        self.drift = Counter(
            "formwork_selector_drift",
            "Steps whose element matched only through a fallback candidate.",
            ["site", "script", "element"],
            registry=r,
        )
        self.handoffs = Counter(
            "formwork_handoffs",
            "Jobs paused for a person or the customer, by the failure code behind the pause.",
            [*JOB, "status", "code"],
            registry=r,
        )
        self.unknown = Counter(
            "formwork_outcome_unknown",
            "outcome_unknown resolutions: probe_present, probe_absent, handoff, or the person's "
            "decision (mark_done, retry_step, abort…).",
            [*JOB, "resolution"],
            registry=r,
        )
        self.errors = Counter(
            "formwork_metrics_errors",
            "Job settlings that could not be counted (the job's outcome is unaffected).",
            registry=r,
        )

    def attach(self, redis: Redis, keys: Keys, browser: BrowserHost | None) -> None:
        """Read the live values through this connection and browser from now on: those of a
        worker built again after losing Redis. Every count goes on from where it was."""
        self.live.attach(redis, keys, browser)

    def observe(self, o: JobOutcome) -> None:
        job = (o.site, o.script, o.version)
        if o.started:
            self.started.labels(*job).inc()
        self.jobs.labels(*job, o.status.value).inc()
        for action, code in o.rules:
            self.rules.labels(*job, action, code).inc()
        for action, seconds in o.step_times:
            self.steps.labels(o.site, o.script, action).observe(seconds)
        for how, verified in o.claims:
            self.claims.labels(*job, how, str(verified).lower()).inc()
        for element, _used in o.drift:
            self.drift.labels(o.site, o.script, element).inc()
        if o.handoff is not None:
            self.handoffs.labels(*job, o.status.value, o.handoff).inc()
        for resolution in o.unknown:
            self.unknown.labels(*job, resolution).inc()

    async def exposition(self) -> bytes:
        await self.live.refresh()
        return generate_latest(self.registry)


class _Live(Collector):
    """Values owned by something else, read once per scrape (by `refresh`, on the loop)."""

    def __init__(self, redis: Redis, keys: Keys, browser: BrowserHost | None) -> None:
        self.redis, self.keys, self.browser = redis, keys, browser
        self.rss = 0
        self.ready: int | None = 0  # None: Redis did not answer this scrape
        self.waiting: int | None = 0
        # Restarts and recycles of the Chromiums this process had before `browser`.
        self.restarts_before = self.recycles_before = 0

    def attach(self, redis: Redis, keys: Keys, browser: BrowserHost | None) -> None:
        if browser is not self.browser:  # a new Chromium: the old one's counts stay counted
            restarts, recycles = self._browser_counts()
            self.restarts_before += restarts
            self.recycles_before += recycles
        self.redis, self.keys, self.browser = redis, keys, browser

    def _browser_counts(self) -> tuple[int, int]:
        """The current browser's restarts and recycles."""
        if self.browser is None:
            return 0, 0
        recycles = self.browser.recycles
        return max(self.browser.launches - 1 - recycles, 0), recycles

    async def refresh(self) -> None:
        self.rss = await asyncio.to_thread(tree_rss, os.getpid())
        try:
            self.ready = await backlog(self.redis, self.keys)
            self.waiting = await self.redis.zcard(self.keys.paused)
        except RedisError as exc:
            # The scrape goes on without them: a 500 would hide every count this worker
            # keeps itself, in the very outage they are wanted for.
            self.ready = self.waiting = None
            log.warning("metrics: queue depth not read, Redis did not answer: %s", exc)

    def collect(self) -> Iterable[Metric]:
        if self.ready is not None and self.waiting is not None:
            yield GaugeMetricFamily(
                "formwork_queue_depth", "Jobs due on the queue, not yet taken.", value=self.ready
            )
            yield GaugeMetricFamily(
                "formwork_jobs_waiting",
                "Jobs paused for a person or the customer (all workers).",
                value=self.waiting,
            )
        restarts, recycles = self._browser_counts()
        yield CounterMetricFamily(
            "formwork_browser_restarts",
            "Chromium relaunches after the first launch (a crash or a lost connection; "
            "planned recycles are counted apart).",
            value=self.restarts_before + restarts,
        )
        yield CounterMetricFamily(
            "formwork_browser_recycles",
            "Planned switches to a new Playwright driver and Chromium "
            "(FORMWORK_BROWSER_RECYCLE_JOBS).",
            value=self.recycles_before + recycles,
        )
        yield GaugeMetricFamily(
            "formwork_worker_memory_bytes",
            "Resident memory (RSS) of the worker process and its children (Chromium, the "
            "Playwright driver); pages shared between them count once per process.",
            value=self.rss,
        )

    def describe(self) -> Iterable[Metric]:
        return []


def tree_rss(root: int) -> int:
    """RSS in bytes of `root` and every descendant, from /proc (0 where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                # The command name may hold spaces and parentheses: split after the last ')'.
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    page, total, todo = os.sysconf("SC_PAGE_SIZE"), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def _exists_in(scripts: ScriptStore) -> Callable[[str], bool]:
    """Whether a script of that name is in `scripts`, in any version."""

    def exists(name: str) -> bool:
        # A glob and a stat per version file (versions are cached by mtime), for rejected
        # jobs only: intake looked the same files up a moment before, on the loop too.
        try:
            return bool(scripts.versions(name))
        except ScriptInvalid:
            return True  # its files are there, only broken
        except OSError:
            return False

    return exists


class Monitor:
    """Counts every settling of a job once: Prometheus (this worker) and the hourly rollups
    (all workers). Never raises: a metrics failure must not fail or delay a job.

    With `scripts` (the worker's), a job refused at intake is counted under the script it
    names when that script exists; without, under `(unknown)` whenever it may not exist."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        browser: BrowserHost | None = None,
        *,
        scripts: ScriptStore | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.stats = JobStats(redis, keys)
        if metrics is None:
            metrics = WorkerMetrics(redis, keys, browser)
        else:  # this process's, from before it lost Redis: its counts go on
            metrics.attach(redis, keys, browser)
        self.metrics = metrics
        self.known = _exists_in(scripts) if scripts is not None else None
        self._server: web.AppRunner | None = None
        self.port: int | None = None

    async def settled(self, report: JobReport | None) -> None:
        """Count `report` if this is the first time its settling is seen."""
        if report is None or not report.status.settled or report.ended_at is None:
            return
        try:
            first, since = await self.stats.settle_once(report.job_id, report.ended_at)
            if not first:
                return
            outcome = outcome_of(report, since, known=self.known)
            self.metrics.observe(outcome)
            await self.stats.add(outcome, report.ended_at)
        except Exception:
            self.metrics.errors.inc()
            log.exception("job %s: could not count it in the metrics", report.job_id)

    async def serve(self, host: str, port: int) -> int:
        """Serve /metrics (port 0: any free one); the bound port."""

        async def scrape(request: web.Request) -> web.Response:
            body = await self.metrics.exposition()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        self._server = web.AppRunner(app, access_log=None)
        await self._server.setup()
        site = web.TCPSite(self._server, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self.close()
            raise MetricsPortUnavailable(host, port, exc) from exc
        sockets = cast("Any", site._server).sockets  # aiohttp has no public bound-port accessor
        self.port = int(sockets[0].getsockname()[1])
        # Asked for any free port, the operator learns which only from this line: said at a
        # level a worker run without -v prints.
        said = log.warning if port == 0 else log.info
        said("metrics on http://%s:%s/metrics", host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            await self._server.cleanup()
            self._server = None
