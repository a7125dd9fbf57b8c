"""What the benchmarks share: the fixture site, worker settings, the hand-written Playwright
flow they are compared against, statistics, tables and `bench/RESULTS.md`.

Every benchmark measures its variants side by side in one run, interleaved (A B C A B C …), so
the noise of a busy machine falls on all of them alike; claims are ratios of medians.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # `python bench/x.py` puts bench/ on sys.path, not the repo root.
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from playwright.async_api import (  # noqa: E402
    Browser,
    CDPSession,
    Page,
    Playwright,
    async_playwright,
    expect,
)
from redis.asyncio import Redis  # noqa: E402

from fixtures import FixtureServer, start_fixture  # noqa: E402
from worker.artifacts import LocalArtifacts  # noqa: E402
from worker.browser import CHROMIUM_ARGS, VIEWPORT, BrowserHost, find_chromium  # noqa: E402
from worker.contract import BrowserJob  # noqa: E402
from worker.evidence import JPEG_QUALITY, MASK_SCRIPT, mark_secret  # noqa: E402
from worker.executor import Runtime  # noqa: E402
from worker.script import ScriptStore  # noqa: E402
from worker.secretstore import SecretStore  # noqa: E402
from worker.settings import Settings  # noqa: E402

SCRIPTS = ROOT / "scripts"
SELECTORS = ROOT / "selectors"
SECRETS_FILE = ROOT / "fixtures" / "secrets.yaml"
RESULTS = ROOT / "bench" / "RESULTS.md"
BENCH_REDIS_URL = os.environ.get("FORMWORK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")

SCRIPT = "billing/issue_credit"
CREDIT_INPUTS = {
    "account_id": "AC-10231",
    "amount": "15.00",
    "reason": "damaged item",
    "reference": "T-88812",
}


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Samples:
    """Measurements of one variant."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def high(self) -> float:
        return max(self.values) if self.values else math.nan

    def p(self, q: float) -> float:
        return percentile(self.values, q)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ---------------------------------------------------------------- tables and RESULTS.md


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with aligned columns (readable on a terminal and in RESULTS.md)."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]

    def line(row: list[str]) -> str:
        parts = [
            cell.rjust(width) if num else cell.ljust(width)
            for cell, width, num in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if num else "-" * (w + 2)
        for w, num in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(cells[0]), rule + "|", *[line(row) for row in cells[1:]]])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x%"))
    except ValueError:
        return text == "-"
    return True


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # The results file itself does not make the tree dirty (each benchmark appends to it).
    dirty = git("status", "--porcelain", "--", ".", ":(exclude)bench/RESULTS.md")
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def chromium_version(path: str | None = None) -> str:
    """`path` and its version; by default the browser every variant uses (FORMWORK_CHROMIUM,
    else the system Chromium)."""
    path = path if path is not None else find_chromium()
    if path is None:
        return "Playwright's bundled Chromium"
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        version = "version unknown"
    return f"{path} ({version})"


def machine() -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"nproc {os.cpu_count()}, {cpu_model()}, load average at start {load}"


class Report:
    """Collects a benchmark's header, tables and verdicts; prints them as they come and
    appends everything to bench/RESULTS.md at the end."""

    def __init__(self, title: str, argv: Sequence[str]) -> None:
        self.lines = [
            f"## {title} — {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            "",
            f"- command: `python {' '.join(argv)}`",
            f"- machine: {machine()}",
            f"- commit: {git_commit()}",
            f"- chromium: {chromium_version()}",
            "",
        ]
        print("\n".join(self.lines), flush=True)

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self) -> None:
        if os.environ.get("FORMWORK_BENCH_NO_SAVE"):
            return  # trial runs
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        fresh = not RESULTS.exists()
        with RESULTS.open("a", encoding="utf-8") as out:
            if fresh:
                out.write("# Benchmark results\n\nAppended by `bench/*.py`; newest last.\n\n")
            out.write("\n".join(self.lines).rstrip() + "\n\n")
        print(f"(appended to {RESULTS.relative_to(ROOT)})", flush=True)


# ---------------------------------------------------------------- the fixture site


class Site:
    """The billing fixture in a background thread, and its ground truth."""

    def __init__(self, server: FixtureServer) -> None:
        self.server = server
        self.url = server.url

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    async def reset(self) -> None:
        """Forget credits and sessions: the account page must not grow run after run."""
        await asyncio.to_thread(self._call, "POST", "/_fixture/reset")

    async def state(self) -> dict[str, Any]:
        result: dict[str, Any] = await asyncio.to_thread(self._call, "GET", "/_fixture/state")
        return result

    async def first_requests(self) -> list[dict[str, Any]]:
        """(visitor, method, path, at) of each new visitor's first page request."""
        first: list[dict[str, Any]] = (await self.state())["first_requests"]
        return first


@contextlib.contextmanager
def billing_site() -> Iterator[Site]:
    with start_fixture("billing") as server:
        yield Site(server)


def fixture_secrets() -> dict[str, str]:
    values: dict[str, str] = yaml.safe_load(SECRETS_FILE.read_text())
    return values


def selectors_dir(root: Path, *, site_limits: bool) -> Path:
    """The selector registries to use. Without `site_limits`, a copy with each site's
    `limits` removed, so the worker's own concurrency is measured, not the site's policy
    (billing caps itself at 4 concurrent jobs)."""
    if site_limits:
        return SELECTORS
    target = root / "selectors"
    target.mkdir(parents=True, exist_ok=True)
    for path in SELECTORS.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        data.pop("limits", None)
        (target / path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return target


# ---------------------------------------------------------------- Formwork


def run_prefix(kind: str) -> str:
    """A key prefix (and job-id prefix) of this run's own."""
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


def make_settings(
    prefix: str,
    artifacts: Path,
    *,
    max_jobs: int = 2,
    poll_delay_s: float | None = None,
    selectors: Path = SELECTORS,
    redis_url: str = BENCH_REDIS_URL,
) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": prefix,
        "artifacts_dir": artifacts,
        "scripts_dir": SCRIPTS,
        "selectors_dir": selectors,
        "secrets_file": SECRETS_FILE,
        "max_jobs": max_jobs,
        "shutdown_grace_s": 0,
        # As a deployed worker runs: checkpoints keep the session, sealed (its cost is measured).
        "state_key": "formwork-bench-state-key-0123456789",
    }
    if poll_delay_s is not None:
        values["poll_delay_s"] = poll_delay_s
    return Settings(**values)


def make_runtime(browser: BrowserHost, artifacts: Path, selectors: Path = SELECTORS) -> Runtime:
    return Runtime(
        scripts=ScriptStore(SCRIPTS, selectors),
        browser=browser,
        artifacts=LocalArtifacts(artifacts),
        secrets=SecretStore(SECRETS_FILE, environ={}),
    )


def credit_job(job_id: str, site_url: str) -> BrowserJob:
    return BrowserJob(job_id=job_id, script=SCRIPT, inputs=CREDIT_INPUTS, site_url=site_url)


class JobIds:
    """job-ids unique to this run: `<prefix>-<n>`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.count = 0

    def __call__(self, tag: str = "j") -> str:
        self.count += 1
        return f"{self.prefix}-{tag}{self.count}"


async def wait_until(
    condition: Callable[[], Any], *, timeout_s: float = 30, every_s: float = 0.01
) -> None:
    """Wait for `condition()` (sync or async) to be true; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(every_s)


async def wait_ready(worker: Any) -> None:
    """An in-process arq worker has run its startup (Redis pool, warm page) once
    `ctx["formwork"]` exists."""
    await wait_until(lambda: "formwork" in worker.ctx)


async def forget_keys(prefix: str, redis_url: str = BENCH_REDIS_URL) -> None:
    """Delete this run's keys: ours (`<prefix>:*`) and arq's for our job ids."""
    redis = Redis.from_url(redis_url)
    try:
        for pattern in (f"{prefix}:*", f"arq:*:{prefix}-*"):
            batch: list[bytes] = []
            async for key in redis.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await redis.delete(*batch)
                    batch.clear()
            if batch:
                await redis.delete(*batch)
    finally:
        await redis.aclose()


# ---------------------------------------------------------------- the hand-written flow


async def launch_plain(playwright: Playwright) -> Browser:
    """Chromium as a hand-written script would launch it (same binary and flags as the
    worker, so only the code driving it differs)."""
    return await playwright.chromium.launch(
        executable_path=find_chromium(), headless=True, args=CHROMIUM_ARGS
    )


@contextlib.asynccontextmanager
async def plain_browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await launch_plain(playwright)
        try:
            yield browser
        finally:
            await browser.close()


STEP_IDS = (
    "login.open",
    "login.username",
    "login.password",
    "login.submit",
    "open_account",
    "open_form",
    "amount",
    "reason",
    "reference",
    "review",
    "confirm_amount",
    "submit",
    "confirmation",
)


class _Steps:
    """Ends each step like Formwork does: a screenshot (JPEG q80 through DevTools, secret
    fields masked by the page's own rendering), and the step's duration in `timings`."""

    def __init__(
        self,
        page: Page,
        cdp: CDPSession,
        folder: Path | None,
        timings: dict[str, list[float]] | None,
    ) -> None:
        self.page = page
        self.cdp = cdp
        self.folder = folder
        self.timings = timings
        self.index = 0
        self.started = time.perf_counter()

    async def done(self) -> None:
        step = STEP_IDS[self.index]
        self.index += 1
        if self.folder is not None:
            await self.page.wait_for_load_state("load")
            shot = await self.cdp.send(
                "Page.captureScreenshot",
                {"format": "jpeg", "quality": JPEG_QUALITY, "optimizeForSpeed": True},
            )
            path = self.folder / f"{self.index:02d}-{step}.jpg"
            await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
        now = time.perf_counter()
        if self.timings is not None:
            self.timings.setdefault(step, []).append((now - self.started) * 1000)
        self.started = now


async def plain_flow(
    browser: Browser,
    site_url: str,
    credentials: dict[str, str],
    *,
    screenshots: Path | None,
    inputs: dict[str, str] = CREDIT_INPUTS,
    timings: dict[str, list[float]] | None = None,
) -> str:
    """billing/issue_credit by hand: the 13 steps of the script (login sub-flow included),
    with the same waits for the next page; returns the confirmation number."""
    if screenshots is not None:
        os.makedirs(screenshots, exist_ok=True)
    context = await browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    try:
        if screenshots is not None:
            await context.add_init_script(MASK_SCRIPT)
        page = await context.new_page()
        cdp = await context.new_cdp_session(page)
        step = _Steps(page, cdp, screenshots, timings)
        await page.goto(f"{site_url}/login")
        await page.locator("form#login").wait_for()
        await step.done()
        username = page.locator("#username")
        if screenshots is not None:
            await mark_secret(username, 10_000)
        await username.fill(credentials["billing_username"])
        await step.done()
        password = page.locator("#password")
        if screenshots is not None:
            await mark_secret(password, 10_000)
        await password.fill(credentials["billing_password"])
        await step.done()
        await page.locator("form#login button[type=submit]").click()
        await page.get_by_role("heading", name="Billing console").wait_for()
        await step.done()
        await page.goto(f"{site_url}/accounts/{inputs['account_id']}")
        await page.locator("h1#account-header").wait_for()
        await step.done()
        await page.locator("a#issue-credit").click()
        await page.locator("form#credit").wait_for()
        await step.done()
        await page.locator("#credit-amount").fill(inputs["amount"])
        await step.done()
        await page.locator("#credit-reason").fill(inputs["reason"])
        await step.done()
        await page.locator("#credit-reference").fill(inputs["reference"])
        await step.done()
        await page.locator("form#credit button[type=submit]").click()
        await page.locator("form#credit-confirm").wait_for()
        await step.done()
        await expect(page.locator("#review-amount")).to_contain_text(inputs["amount"])
        await step.done()
        await page.locator("form#credit-confirm button[type=submit]").click()
        await page.locator("#credit-confirmation").wait_for()
        await step.done()
        number = (await page.locator("#confirmation-number").inner_text()).strip()
        if not number.startswith("CN-"):
            raise AssertionError(f"confirmation number {number!r}")
        await step.done()
        return number
    finally:
        await context.close()


async def plain_flow_fresh_browser(
    playwright: Playwright,
    site_url: str,
    credentials: dict[str, str],
    *,
    screenshots: Path | None,
) -> str:
    """The naive design: a Chromium launched for this one job (the Playwright driver is
    shared, which is the charitable version of naive)."""
    browser = await launch_plain(playwright)
    try:
        return await plain_flow(browser, site_url, credentials, screenshots=screenshots)
    finally:
        await browser.close()


# ---------------------------------------------------------------- the process tree (/proc)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def kind_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except OSError:
        return "(exited)"
    if not raw:
        return "(exiting)"
    # Chromium rewrites its command line: arguments may be joined by spaces, not NULs.
    args = raw.replace(b"\0", b" ")
    kind = re.search(rb"--type=(\S+)", args)
    if kind is not None:
        name = kind.group(1).decode()
        sub = re.search(rb"--utility-sub-type=(\S+)", args)
        if sub is not None:
            name += ":" + sub.group(1).decode().split(".")[0]
        return f"chromium {name}"
    program = Path(args.split(b" ", 1)[0].decode(errors="replace")).name
    if program == "formwork" or program.startswith("python"):
        return "worker (python)"
    if program == "node":
        return "playwright driver (node)"
    if program in ("chromium", "chromium-headless-shell"):
        return "chromium browser"
    return program


def _own_cpu(pid: int) -> tuple[bytes, float] | None:
    """(start time, utime + stime in seconds) of `pid` itself, children not included."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[11], [12]: utime, stime; [19]: start time (tells a reused pid apart).
    return fields[19], (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_group(pid: int, root: int) -> str:
    if pid == root:
        return "python"
    kind = kind_of(pid)
    if kind.startswith("playwright"):
        return "driver"
    return "chromium" if kind.startswith("chromium") or kind.startswith("(") else "other"


def cpu_process(pid: int, root: int) -> str:
    """Like `cpu_group`, with Chromium split by process type (browser, gpu-process, renderer,
    utilities): where a job's browser time goes."""
    group = cpu_group(pid, root)
    if group != "chromium":
        return group
    kind = kind_of(pid)
    return kind if kind.startswith("chromium") else "chromium (exited unseen)"


class CpuMeter:
    """CPU seconds used by `root` and its descendants while it runs, by group (python, driver,
    chromium). A thread reads /proc every 100 ms and keeps each process's last reading, so
    processes that come and go (renderers, a Chromium per job) are counted even though no
    parent's cutime may ever include them; at most the last 100 ms of one is missed."""

    def __init__(
        self, root: int, every_s: float = 0.1, group: Callable[[int, int], str] = cpu_group
    ) -> None:
        self.root = root
        self.every_s = every_s
        self.group = group
        self._first: dict[tuple[int, bytes], float] = {}
        self._last: dict[tuple[int, bytes], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def _sample(self, *, first: bool) -> None:
        for pid in descendants(self.root):
            reading = _own_cpu(pid)
            if reading is None:
                continue
            key = (pid, reading[0])
            if key not in self._last:
                self._last[key] = (self.group(pid, self.root), reading[1])
                if first:
                    self._first[key] = reading[1]
            else:
                self._last[key] = (self._last[key][0], reading[1])

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample(first=False)

    def __enter__(self) -> CpuMeter:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(first=False)

    def used(self) -> dict[str, float]:
        groups: dict[str, float] = {}
        for key, (group, seconds) in self._last.items():
            groups[group] = groups.get(group, 0.0) + seconds - self._first.get(key, 0.0)
        return groups


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000
