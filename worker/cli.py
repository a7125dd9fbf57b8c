"""The `formwork` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import getpass
import ipaddress
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from playwright.async_api import Error as PlaywrightError
from pydantic import ValidationError
from redis.exceptions import RedisError

from worker.artifacts import (
    ArtifactStore,
    LocalArtifacts,
    open_store,
    prune_cutoff,
    safe_id,
    store_for,
)
from worker.browser import BrowserHost, find_chromium
from worker.contract import (
    SCRIPT_REF,
    BrowserJob,
    Decision,
    EventKind,
    JobEvent,
    JobReport,
    JobStatus,
    ResumeDecision,
    StepReport,
    StepStatus,
    contract_schemas,
)
from worker.errors import ArtifactError, ArtifactUnreadable, FormworkError, JobInvalid
from worker.executor import Runtime, refuse_carried, run_job
from worker.rollout import (
    Rollouts,
    describe,
    load_rollout,
    refuse_subflow,
    rollout_files,
    script_of,
)
from worker.script import ROLLOUT_SUFFIX, Script, ScriptStore, input_model, misplaced
from worker.secretstore import SecretStore
from worker.selectors import SiteRegistry, load_registry
from worker.settings import Settings, SettingsInvalid, shown_url

_MARK = {
    StepStatus.succeeded: "ok  ",
    StepStatus.failed: "FAIL",
    StepStatus.skipped: "skip",
    StepStatus.running: "... ",
    StepStatus.pending: "    ",
}

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.client import JobHandle
    from worker.queue import PauseClaim


# How `run`, `enqueue --watch`, `watch` and `resume --watch` exit: 0 succeeded, 2 refused
# before any browser work, 1 anything else (a step failed, the job waits for a person, ...).
_EXIT = {JobStatus.succeeded: 0, JobStatus.rejected: 2}


class UsageError(Exception):
    """A command line that cannot be carried out as given: said in one line, exit code 2."""


class CommandFailed(Exception):
    """A right command line that cannot be carried out here (a path it cannot write, a port
    another process holds): said in one line, exit code 1."""


# What a terminal would act on instead of showing: C0 and C1 controls but tab and newline
# (ESC starts sequences that recolour, move the cursor, retitle the window or write the
# clipboard; CR overwrites a line) and the bidi controls that reorder what follows them.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with each control character shown as its JSON escape (`\\u001b`). Page text and
    values come from the target site and the job: they reach the operator's terminal. Inside
    a JSON string the escape means the same character, so `--json` stays valid JSON."""
    return _UNPRINTABLE.sub(lambda found: f"\\u{ord(found[0]):04x}", text)


class _Printable:
    """A text stream that writes everything through `printable`."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        written: int = self._stream.write(printable(text))
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _secrets_here() -> SecretStore | None:
    """The secrets a worker on this machine has (`FORMWORK_SECRET_*`, the secrets file), or
    None where there are none or they cannot be read. A command checks what it sends against
    them: a value carrying one, written to Redis, sits there in the clear until a worker takes
    it (a day for a queued message, 7 for an abort flag) — and the worker only refuses it."""
    try:
        store = SecretStore(Settings.from_env().secrets_file)
    except FormworkError:  # a secrets file that cannot be read: the worker checks, as before
        return None
    return store if store.values() else None


def _sendable(decision: ResumeDecision, secrets: SecretStore | None) -> ResumeDecision:
    """`decision` as the worker would carry it out, checked here against `secrets` so that no
    configured secret is written to Redis: values carrying one are refused (UsageError); a
    note or name carrying one withholds that field of an `abort` (stopping must always be
    possible) and refuses any other decision, as the worker does."""
    if secrets is None:
        return decision
    for values, kind in ((decision.inputs, "inputs"), (decision.outputs, "outputs")):
        try:
            secrets.refuse_carried(values, kind)
        except JobInvalid as exc:
            raise UsageError(f"{exc.message}; nothing was sent") from None
    if decision.decision != Decision.abort:
        for field, value in (("note", decision.note), ("name (--by)", decision.by)):
            if value and secrets.carried_in({field: value}) is not None:
                raise UsageError(
                    f"its {field} carries the value of a configured secret; nothing was sent"
                )
    note, by = _withheld(decision.note, decision.by, secrets)
    return decision.model_copy(update={"note": note, "by": by})


def _withheld(
    note: str | None, by: str, secrets: SecretStore | None, *, what: str = "note"
) -> tuple[str | None, str]:
    """(note, by) of an abort with either that carries a configured secret withheld, as the
    worker records it (the abort itself goes ahead), and that said on stderr."""
    from worker.queue import WITHHELD

    if secrets is None:
        return note, by
    in_note = note is not None and secrets.carried_in({"note": note}) is not None
    in_by = secrets.carried_in({"by": by}) is not None
    for field, held in ((what, in_note), ("name", in_by)):
        if held:
            print(f"formwork: its {field} carries the value of a configured secret: withheld",
                  file=sys.stderr)  # fmt: skip
    return (WITHHELD if in_note else note), ("(withheld)" if in_by else by)


def _operator() -> str:
    """Who a decision or an abort sent from this command is by, when `--by` is not given: the
    login it runs under, so the audit trail names a person rather than the tool."""
    try:
        return f"{getpass.getuser()} (cli)"
    except (OSError, KeyError):  # no login name (a container's nameless uid)
        return "cli"


def _why(exc: OSError) -> str:
    """What the system said, without the errno and path Python adds around it."""
    return exc.strerror or str(exc)


def _port(text: str) -> int:
    """An argparse type: a TCP port (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {value}")
    return value


def _check_secrets_file(path: Path | None) -> None:
    """A secrets file that is missing or unreadable is said as such, not as bad YAML."""
    if path is None:
        return
    if not path.exists():
        raise UsageError(f"secrets file {path} does not exist")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise UsageError(f"secrets file {path} cannot be read: {_why(exc)}") from exc


def _parse_inputs(pairs: Sequence[str], kind: str = "input") -> dict[str, str]:
    """`--input key=value` pairs (or `--output`, as `kind` says) as a mapping."""
    inputs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--{kind} takes key=value, got {pair!r}")
        # Keeping the last of two would run the job on a value nobody noticed was dropped.
        if key in inputs:
            raise UsageError(f"{kind} {key!r} given twice")
        inputs[key] = value
    return inputs


def _script_ref(arg: str, settings: Settings) -> tuple[str, Settings]:
    """`billing/issue_credit[@1]`, or a path to a script file (its folders locate the rest)."""
    path = Path(arg)
    if arg.endswith(".yaml"):
        if not path.is_file():
            raise UsageError(f"no script file {arg}")
        scripts_dir = path.resolve().parent.parent
        name = f"{path.parent.name}/{path.name.removesuffix('.yaml')}"
        _check_layout(arg, scripts_dir, name, settings)
        selectors_dir = settings.selectors_dir
        if not selectors_dir.is_dir() and (scripts_dir.parent / "selectors").is_dir():
            selectors_dir = scripts_dir.parent / "selectors"
        updated = settings.model_copy(
            update={"scripts_dir": scripts_dir, "selectors_dir": selectors_dir}
        )
        return name, updated
    return arg, settings


def _check_layout(arg: str, scripts_dir: Path, name: str, settings: Settings) -> None:
    """A script file is found by its place: `<scripts dir>/<site>/<name>.yaml`, the scripts dir
    being the configured one or any with a `selectors/` beside it. A file anywhere else would
    be read under a name made from whatever folder holds it, and refused for that name."""
    known = scripts_dir == settings.scripts_dir.resolve() or (
        (scripts_dir.parent / "selectors").is_dir()
    )
    if known and SCRIPT_REF.fullmatch(name):
        return
    raise UsageError(
        f"script file {arg} must sit at <scripts dir>/<site>/<name>.yaml (the scripts dir is "
        f"{settings.scripts_dir.resolve()}; site and name in a-z, 0-9 and _), or be named like "
        "billing/issue_credit"
    )


class _Printer:
    """Prints each step as it ends: status, duration, the selector that matched."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def step_changed(self, report: JobReport, step: StepReport) -> None:
        if step.status == StepStatus.running:
            return
        print(format_step(step), file=self.stream, flush=True)

    async def job_changed(self, report: JobReport) -> None:
        return None


def format_step(step: StepReport) -> str:
    duration = f"{step.duration_ms:7.0f} ms" if step.duration_ms is not None else " " * 10
    selector = ""
    if step.selector is not None:
        drift = " (fallback: drift)" if step.selector.index else ""
        selector = f"  {step.selector.element} -> {step.selector.candidate}{drift}"
    tries = f" x{step.attempts}" if step.attempts > 1 else ""
    line = f"  {_MARK[step.status]} {step.id:<28} {step.action:<9}{duration}{tries}{selector}"
    if step.failure is not None:
        line += f"\n         {step.failure.code}: {step.failure.message}"
        if step.failure.evidence:
            line += f"\n         page says: {step.failure.evidence}"
    if step.recovered_by:
        line += f"\n         recovered by {step.recovered_by}"
    return line


def print_summary(report: JobReport, stream: Any) -> None:
    print(f"job {report.job_id}: {report.status}", file=stream)
    if report.error is not None:
        where = f" at step {report.error.step_id}" if report.error.step_id else ""
        print(f"  {report.error.code}{where}: {report.error.message}", file=stream)
        if report.error.evidence:
            print(f"  page says: {report.error.evidence}", file=stream)
    if report.handoff is not None:
        print(f"  handoff: {report.handoff.summary}", file=stream)
        print(f"  proposed: {report.handoff.proposed_action}", file=stream)
        decisions = ", ".join(report.handoff.allowed_decisions)
        print(f"  decisions: {decisions}", file=stream)
    for rule in report.rules_fired:
        print(f"  rule: {rule.step_id}: {rule.code} -> {rule.action} ({rule.reason})", file=stream)
    for key, value in report.outputs.items():
        print(f"  output {key} = {value}", file=stream)
    for claim in report.claims:
        mark = f"verified by {claim.how}" if claim.verified else "NOT verified"
        print(f"  claim ({claim.kind}) {claim.name}: {claim.value} [{mark}]", file=stream)
    if report.artifacts is not None:
        root = report.artifacts.root.rstrip("/")  # a directory, or s3://bucket/prefix
        print(f"  report:      {root}/{report.artifacts.report}", file=stream)
        print(f"  screenshots: {root}/{report.artifacts.path}/", file=stream)
        if report.artifacts.audit:
            print(f"  audit:       {root}/{report.artifacts.audit}", file=stream)


def _runtime(settings: Settings, artifacts: ArtifactStore, secrets: SecretStore) -> Runtime:
    """An in-process runtime (its own Chromium) for commands that run jobs themselves."""
    return Runtime(
        scripts=ScriptStore(settings.scripts_dir, settings.selectors_dir),
        browser=BrowserHost(settings.chromium),
        artifacts=artifacts,
        secrets=secrets,
        uploads=settings.uploads_dir,
    )


async def _run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        artifacts_dir=args.artifacts,
        secrets_file=args.secrets_file,
        scripts_dir=args.scripts_dir,
        selectors_dir=args.selectors_dir,
    )
    name, settings = _script_ref(args.script, settings)
    _check_secrets_file(settings.secrets_file)
    try:
        job = BrowserJob(
            job_id=args.job_id or f"run-{uuid.uuid4().hex[:12]}",
            script=name,
            inputs=_parse_inputs(args.input),
            site_url=args.site_url,
            har=args.har or None,
        )
        secrets = SecretStore(settings.secrets_file)
    except ValidationError as exc:
        print(f"formwork: invalid job: {_problems(exc)}", file=sys.stderr)
        return 2
    except FormworkError as exc:
        print(f"formwork: {exc.message}", file=sys.stderr)
        return 2
    runtime = _runtime(settings, store_for(settings), secrets)
    out = sys.stderr if args.json else sys.stdout
    if not args.json:
        print(f"running {job.script} as job {job.job_id}", file=out, flush=True)
        if job.site_url is None:
            with contextlib.suppress(FormworkError):  # a bad script is the run's to report
                site = runtime.scripts.load(job.script_name).registry.base_url
                print(f"  on {site} (the registry's base_url; --site-url for another)", file=out)
    try:
        report = await run_job(job, runtime, _Printer(out))
    finally:
        await runtime.browser.stop()
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_summary(report, out)
    return _EXIT.get(report.status, 1)


def _worker(args: argparse.Namespace) -> int:
    from worker.handback import TakenJobs
    from worker.metrics import MetricsPortUnavailable, WorkerMetrics
    from worker.queue import build_worker, shutdown

    settings = Settings.from_env(
        max_jobs=args.max_jobs,
        artifacts_dir=args.artifacts,
        secrets_file=args.secrets_file,
        metrics_port=args.metrics_port,
    )
    _check_secrets_file(settings.secrets_file)
    try:
        SecretStore(settings.secrets_file)  # read again at startup; refused here in one line
    except FormworkError as exc:
        raise UsageError(exc.message) from None
    metrics = ""
    if settings.metrics_port:
        metrics = f", metrics on http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    elif settings.metrics_port == 0:  # it said port 0; the port is only known once bound
        metrics = f", metrics on a free port of {settings.metrics_host} (logged once bound)"
    wait_s = 1.0
    taken = TakenJobs()  # one process: what each worker it builds took, handed back on
    counts: WorkerMetrics | None = None  # and its metrics, whose counts go on (`WorkerMetrics`)
    while True:
        worker = build_worker(settings, burst=args.burst, taken=taken, metrics=counts)
        print(
            f"formwork worker: queue {worker.queue_name} on {shown_url(settings.redis_url)}, "
            f"max {settings.max_jobs} jobs{metrics}",
            flush=True,
        )
        try:
            worker.run()
            return 0
        except MetricsPortUnavailable as exc:
            # This worker's own setting: waiting cannot free the port, so say it and stop.
            raise CommandFailed(str(exc)) from exc
        except (RedisError, ConnectionError, TimeoutError) as exc:
            # Redis restarted or failed over: a worker that exits leaves the queue unserved
            # until something restarts it. It waits and connects again, and hands back the
            # jobs it was running (they go on from their checkpoints; `worker.handback`).
            # arq's close gives up at its first Redis call, before the shutdown hook: what
            # startup made (Chromium, the metrics port) is let go here, or the next attempt
            # would find its own port taken and a Chromium would be left per attempt.
            worker.loop.run_until_complete(shutdown(worker.ctx))
            worker.lost_redis()
            counts = worker.ctx.get("metrics") or counts  # none if it never started
            # A log line like every other (JSON for workers), so alerting on level sees it.
            logging.getLogger("formwork.worker").error(
                "lost Redis (%s: %s); connecting again in %.0f s", type(exc).__name__, exc, wait_s
            )
            time.sleep(wait_s)
            wait_s = min(wait_s * 2, 30.0)


# How long a command waits for Redis to connect or answer one call. Unbounded, a host that
# drops packets held a command ~2 minutes, and one that takes the connection but never answers
# (rediss:// to a plain Redis, a stopped server) held it for ever.
REDIS_TIMEOUT_S = 10.0


def _client() -> Any:
    """The orchestrator client, configured from the environment like a worker."""
    from worker.client import FormworkClient

    settings = Settings.from_env()
    return FormworkClient(
        settings.redis_url, key_prefix=settings.key_prefix, timeout_s=REDIS_TIMEOUT_S
    )


def _redis(settings: Settings) -> Redis:
    """A connection to the queue's Redis for a command, waiting on it no longer than
    `REDIS_TIMEOUT_S` at a time."""
    from redis.asyncio import Redis

    redis: Redis = Redis.from_url(
        settings.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
    )
    return redis


def _window(text: str) -> timedelta:
    from worker.stats import parse_window

    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    except OverflowError:  # more days than a timedelta holds
        raise argparse.ArgumentTypeError(f"{text!r} is longer than any span") from None


def _stats_window(text: str) -> timedelta:
    """`stats --last`: a window no longer than the hourly rollups are kept, since a longer one
    would be headed with a span whose older part was never counted."""
    from worker.keys import STATS_TTL_S

    window = _window(text)
    kept = timedelta(seconds=STATS_TTL_S)
    if window > kept:
        raise argparse.ArgumentTypeError(
            f"hourly rollups are kept {kept.days} days: at most {kept.days}d, not {text!r}"
        )
    return window


def _insights_window(text: str) -> timedelta:
    """`insights --last`: a window no longer than the job records it reads are kept."""
    from worker.keys import RECORD_TTL_S

    window = _window(text)
    kept = timedelta(seconds=RECORD_TTL_S)
    if window > kept:
        raise argparse.ArgumentTypeError(
            f"job records are kept {kept.days} days: at most {kept.days}d, not {text!r}"
        )
    return window


async def _stats(args: argparse.Namespace) -> int:
    from worker.keys import Keys
    from worker.stats import JobStats, render

    settings = Settings.from_env()
    redis = _redis(settings)
    try:
        stats = await JobStats(redis, Keys(settings.key_prefix)).read(args.last)
    finally:
        await redis.aclose()
    print(stats.model_dump_json(indent=2) if args.json else render(stats))
    return 0


async def _insights(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from worker.insights import load_reports, render, summarize
    from worker.keys import Keys

    settings = Settings.from_env()
    until = datetime.now(UTC)
    since = until - args.last
    redis = _redis(settings)
    try:
        reports = await load_reports(
            redis, Keys(settings.key_prefix), since, site=args.site, script=args.script
        )
    finally:
        await redis.aclose()
    insights = summarize(reports, since, until)
    print(insights.model_dump_json(indent=2) if args.json else render(insights, args.top))
    if not reports and (args.site or args.script) and not args.json:
        # A typo in the filter reads like a quiet day: say what was asked for.
        asked = " and ".join(
            f"{kind} {value!r}"
            for kind, value in (("site", args.site), ("script", args.script))
            if value
        )
        print(f"  (only jobs of {asked} were looked at)")
    return 0


def format_event(event_id: str, event: JobEvent) -> str:
    if event.kind == EventKind.step and event.step is not None:
        if event.step.status == StepStatus.running:
            return f"{event.seq:>4} step {event.step.id} running"
        return f"{event.seq:>4}" + format_step(event.step)[1:]
    line = f"{event.seq:>4} job {event.status}"
    return line + (f": {event.message}" if event.message else "")


async def _enqueue(args: argparse.Namespace) -> int:
    try:
        job = BrowserJob(
            job_id=args.job_id or f"job-{uuid.uuid4().hex[:12]}",
            script=args.script,
            inputs=_parse_inputs(args.input),
            site_url=args.site_url,
            idempotency_key=args.idempotency_key,
        )
    except ValidationError as exc:
        print(f"formwork: invalid job: {_problems(exc)}", file=sys.stderr)
        return 2
    secrets = _secrets_here()
    try:
        if secrets is not None:
            refuse_carried(secrets, job)
    except JobInvalid as exc:
        print(f"formwork: invalid job: {exc.message}; nothing was sent", file=sys.stderr)
        return 2
    async with _client() as client:
        try:
            handle = await client.enqueue(job)
        except JobInvalid as exc:  # over the size a worker takes, say
            print(f"formwork: invalid job: {exc.message}", file=sys.stderr)
            return 2
        print(handle.job_id)
        if not handle.created:
            print(f"(already enqueued as {handle.job_id}; not queued again)", file=sys.stderr)
        if args.watch:
            return await _follow(client, handle.job_id, "0-0")
    return 0


async def _follow(client: Any, job_id: str, after: str, after_seq: int = 0) -> int:
    handle = client.handle(job_id)
    if await handle.status() is None:
        print(f"formwork: no job {job_id}", file=sys.stderr)
        return 2
    wait_s = 1.0
    while True:
        try:
            async for event_id, event in handle.events(after=after):
                after, wait_s = event_id, 1.0
                if event.seq > after_seq:
                    print(format_event(event_id, event), flush=True)
            report = await handle.report()
            break
        except (RedisError, ConnectionError, TimeoutError) as exc:
            # Redis restarted, failed over or dropped the connection: the job goes on, and
            # its stream is read again from the last event printed. Ending here would exit 1,
            # which says the job failed.
            print(
                f"formwork: lost Redis ({type(exc).__name__}: {exc}); following again in "
                f"{wait_s:.0f} s after event {after}",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, 30.0)
    if report is None:
        # The stream ended without a report: the job's keys are gone (its record expired, or
        # Redis came back without its data). Said, so exit 1 does not read as "the job failed".
        print(
            f"formwork: job {job_id} has no record any more (it expired, or Redis lost its "
            "data): how it ended is not known here",
            file=sys.stderr,
        )
        return 1
    print_summary(report, sys.stdout)
    refused = report.decisions[-1].note if report.decisions and report.status.paused else None
    if refused and refused.startswith("refused"):
        print(f"formwork: the decision was {refused}; the job still waits", file=sys.stderr)
    return _EXIT.get(report.status, 1)


async def _watch(args: argparse.Namespace) -> int:
    # The number each printed event starts with (its seq) is what a person has in front of
    # them; an event id (a Redis stream id) is what a program that used the client has.
    if re.fullmatch(r"\d+", args.after):
        after, after_seq = "0-0", int(args.after)
    elif re.fullmatch(r"\d+-\d+", args.after):
        after, after_seq = args.after, 0
    else:
        raise UsageError(
            "--after takes the number an event line starts with (26) or an event id "
            f"(1732530000000-0), got {args.after!r}"
        )
    async with _client() as client:
        return await _follow(client, args.job_id, after, after_seq)


async def _status(args: argparse.Namespace) -> int:
    async with _client() as client:
        handle = client.handle(args.job_id)
        status = await handle.status()
        if status is None:
            print(f"formwork: no job {args.job_id}", file=sys.stderr)
            return 2
        report = await handle.report()
        if args.json:
            print(report.model_dump_json(indent=2) if report else json.dumps({"status": status}))
        elif report is not None:
            print_summary(report, sys.stdout)
        else:
            print(f"job {args.job_id}: {status}")
    return 0


async def _abort(args: argparse.Namespace) -> int:
    from worker.queue import read_pause

    # Checked whole before it is written (a worker cuts a long one): a reason holding a
    # secret would sit in the abort flag, or in the abort decision of a paused job.
    reason, by = _withheld(args.reason, _operator(), _secrets_here(), what="reason")
    async with _client() as client:
        handle = client.handle(args.job_id)
        status = await handle.status()
        if status is None:  # a mistyped id is a wrong command line, like `status` says
            print(f"formwork: no job {args.job_id}", file=sys.stderr)
            return 2
        pending = (await read_pause(client.redis, client.keys, args.job_id)).decided
        if await client.abort(args.job_id, reason or "", by=by):
            if status.paused and pending:
                print(
                    f"{args.job_id} is {status} with a decision already taken: the abort "
                    "overrides it when a worker carries it out"
                )
            elif status.paused:
                # A decision queued, as `resume` sends one: it ends when a worker carries it
                # out, and none may be up.
                print(
                    f"{args.job_id} was {status}: abort sent; it ends cancelled when a worker "
                    f"carries it out (formwork watch {args.job_id} follows it)"
                )
            else:
                print(f"abort requested for {args.job_id}: it stops before its next step")
            return 0
    print(f"formwork: job {args.job_id} already ended, nothing to abort", file=sys.stderr)
    return 1


async def _handoffs(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    async with _client() as client:
        paused = await client.paused()
    if not paused:
        print("no paused jobs")
        return 0
    now = datetime.now(UTC)
    # As wide as the longest id (up to 128 characters), so the columns stay columns.
    width = max(24, *(len(job_id) for job_id, _, _ in paused))
    print(f"{'job':<{width}} {'age':>7}  {'site':<10} {'status':<22} summary")
    for job_id, at, report in paused:
        age = _span(max(0, int((now - at).total_seconds())))  # 2h05m, not 7500s
        handoff = report.handoff if report else None
        site = report.script.split("/")[0] if report else "?"
        status = report.status if report else "?"
        reason = handoff.summary if handoff else ""
        print(f"{job_id:<{width}} {age:>7}  {site:<10} {status:<22} {reason}")
    return 0


async def _handoff(args: argparse.Namespace) -> int:
    from worker.queue import read_pause

    async with _client() as client:
        handle = client.handle(args.job_id)
        status = await handle.status()
        report = await handle.report()
        decided = (await read_pause(client.redis, client.keys, args.job_id)).decided
    if report is None and status is None:
        print(f"formwork: no job {args.job_id}", file=sys.stderr)
        return 2
    # An expired job keeps the request it waited with: it is history, not a question.
    if report is None or report.handoff is None or not (status and status.paused):
        now = status or (report.status if report else None)
        print(f"formwork: job {args.job_id} is {now}, not waiting for a decision", file=sys.stderr)
        return 1
    handoff = report.handoff
    # A directory, or s3://bucket/prefix (which a Path would make s3:/bucket/prefix).
    root = report.artifacts.root.rstrip("/") if report.artifacts else "."
    if args.json:
        print(handoff.model_dump_json(indent=2))
        return 0
    print(f"job {report.job_id}: {handoff.status} at step {handoff.step_id} ({handoff.code})")
    if decided:
        print(
            "  DECIDED:   a decision is taken and waits for a worker to carry it out; no other "
            f"is taken (formwork watch {report.job_id} follows it)"
        )
    print(f"  summary:   {handoff.summary}")
    if handoff.detail:
        print(f"  detail:    {handoff.detail}")
    print(f"  proposed:  {handoff.proposed_action}")
    print(f"  tell the customer: {handoff.recommended_response}")
    print(f"  decisions: {', '.join(handoff.allowed_decisions)}")
    # What a retry_with_inputs corrects, and what mark_done or skip_step may supply.
    context = handoff.context
    print(f"  inputs:    {', '.join(f'{k} = {v}' for k, v in context.inputs.items()) or '-'}")
    if context.outputs:
        print(f"  outputs:   {', '.join(f'{k} = {v}' for k, v in context.outputs.items())}")
    if handoff.role:
        print(f"  approver:  {handoff.role}")
    if handoff.risk:
        print(f"  risk:      {handoff.risk}")
    for name, value in handoff.proposed_values.items():
        print(f"  will send: {name} = {value}")
    if handoff.evidence.screenshot:
        print(f"  evidence:  {root}/{handoff.evidence.screenshot}")
    if handoff.evidence.url:
        print(f"  page:      {handoff.evidence.url}")
    if handoff.expires_at is not None:
        print(f"  expires:   {_when(handoff.expires_at)} (then the job ends expired)")
    # A step run again (a retry, a resume) is listed once per run in the context.
    done = dict.fromkeys(handoff.context.completed_steps)
    print(f"  done:      {', '.join(done)}")
    return 0


def _when(at: datetime) -> str:
    """A deadline as a person reads it: UTC to the second, and how far off it is."""
    left = int((at - datetime.now(UTC)).total_seconds())
    off = f"in {_span(left)}" if left >= 0 else f"{_span(-left)} ago"
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC, {off}"


def _span(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


async def _resume(args: argparse.Namespace) -> int:
    from worker.queue import PauseClaim

    try:
        decision = ResumeDecision(
            decision=args.decision, inputs=_parse_inputs(args.input),
            outputs=_parse_inputs(args.output, "output"), note=args.note, by=args.by or _operator(),
        )  # fmt: skip
    except ValidationError as exc:
        print(f"formwork: invalid decision: {_problems(exc)}", file=sys.stderr)
        return 2
    decision = _sendable(decision, _secrets_here())
    async with _client() as client:
        handle = client.handle(args.job_id)
        if decision.inputs or decision.outputs:
            _check_new_values(await handle.report(), decision)
        after = await handle.last_event_id()
        outcome = await client.decide(args.job_id, decision)
        if outcome != PauseClaim.claimed:
            why = await _why_not_resumed(handle, args.decision, outcome)
            print(f"formwork: {why}", file=sys.stderr)
            return 2 if outcome == PauseClaim.unknown else 1
        print(f"{args.decision} sent for {args.job_id}")
        if args.watch:
            return await _follow(client, args.job_id, after)
    return 0


def _check_new_values(report: JobReport | None, decision: ResumeDecision) -> None:
    """Corrected inputs the job's script refuses, and outputs it does not extract, are
    refused here (UsageError): sent, they would be refused by the worker later, seen only in
    the job's decisions. A script this machine cannot load is left to the worker to check,
    and that is said."""
    if report is None or report.handoff is None:
        return  # no job, or not paused: `decide` says which
    ref = SCRIPT_REF.fullmatch(report.script)
    name = ref["name"] if ref else report.script
    settings = Settings.from_env()
    try:
        loaded = ScriptStore(settings.scripts_dir, settings.selectors_dir).load(
            name, report.script_version
        )
    except FormworkError as exc:
        print(
            f"note: values not checked here ({exc.message.splitlines()[0]}); the worker "
            "checks them, and a refusal shows in `formwork status --json` (decisions)",
            file=sys.stderr,
        )
        return
    why = _refused_inputs(loaded.script, report.inputs, decision.inputs)
    why = why or loaded.refused_outputs(decision.outputs)
    if why is not None:
        raise UsageError(f"{why}; nothing was sent")


def _refused_inputs(script: Script, kept: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why `script` refuses the corrected inputs `new` on top of the job's own `kept` (as its
    report shows them), or None. Only the new inputs are judged: secret ones are not in the
    report (`***`), and the others were accepted when the job started."""
    ref = f"{script.name}@{script.version}"
    unknown = sorted(set(new) - set(script.inputs))
    if unknown:
        return (
            f"input {unknown[0]!r} is not declared by {ref}; it takes: {', '.join(script.inputs)}"
        )
    shown = {k: v for k, v in kept.items() if k in script.inputs and not script.inputs[k].secret}
    try:
        input_model(script).model_validate({**shown, **new})
    except ValidationError as exc:
        problems = [
            f"input {e['loc'][0]!r}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
            if e["loc"] and e["loc"][0] in new
        ]
        if problems:
            return f"inputs refused by {ref}: " + "; ".join(problems)
    return None


async def _why_not_resumed(handle: JobHandle, decision: str, outcome: PauseClaim) -> str:
    from worker.queue import PauseClaim

    if outcome == PauseClaim.decided:
        # Another decision about this pause came first; the job still shows as paused until
        # a worker carries that one out.
        return f"job {handle.job_id} already has a decision waiting to be carried out"
    status, report = await handle.status(), await handle.report()
    if status is None:
        return f"no job {handle.job_id} (or its record has expired)"
    if not status.paused or report is None or report.handoff is None:
        return f"job {handle.job_id} is {status}, not paused: there is nothing to decide"
    allowed = ", ".join(str(d) for d in report.handoff.allowed_decisions)
    return f"job {handle.job_id} does not allow {decision}; it allows: {allowed}"


def _share(text: str) -> float:
    """An argparse type: a share from 0 to 1 (`0.01` is 1%)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a share from 0 to 1, not {text!r}") from None
    # NaN compares false with everything: as a threshold it would pass every screenshot.
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share from 0 to 1 (0.01 is 1%), not {text}")
    return value


def _positive(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {value}")
    return value


def _problems(error: ValidationError) -> str:
    """A validation error in one line a person reads: `field: why; field: why`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(all)'}: {e['msg'].removeprefix('Value error, ')}"
        for e in error.errors()
    )


def _schema(args: argparse.Namespace) -> int:
    schemas = contract_schemas()
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; it takes a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, schema in schemas.items():
                (out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        except OSError as exc:
            raise CommandFailed(f"cannot write schemas to {out}: {_why(exc)}") from exc
        print(f"wrote {len(schemas)} schemas to {out}")
    else:
        print(json.dumps(schemas, indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Every script version loads (with all its load-time checks), the versions of each script
    are laid out consistently, and every rollout file names versions that exist."""
    settings = Settings.from_env(scripts_dir=args.scripts_dir, selectors_dir=args.selectors_dir)
    scripts_dir = settings.scripts_dir
    # A mistyped path must not turn the CI gate green with nothing checked.
    if not scripts_dir.is_dir():
        raise UsageError(f"no scripts directory {scripts_dir}")
    store = ScriptStore(scripts_dir, settings.selectors_dir)
    rollouts = rollout_files(scripts_dir)
    scripts = sorted(p for p in scripts_dir.glob("*/*.yaml") if not p.name.endswith(ROLLOUT_SUFFIX))
    outcomes: list[tuple[Path, str, bool]] = [(p, why, False) for p, why in misplaced(scripts_dir)]
    if not scripts and not outcomes:
        raise UsageError(f"no scripts under {scripts_dir} (a script is <site>/<name>.yaml)")
    subflows: dict[str, str] = {}
    registries: dict[Path, SiteRegistry] = {}
    for path in sorted(settings.selectors_dir.glob("*.yaml")):
        # A registry gets its own entry: every script of its site would otherwise repeat its
        # error, and one no script uses yet would not be checked at all.
        try:
            registries[path] = load_registry(settings.selectors_dir, path.stem)
            store.login_flow_path(registries[path])  # a sign-in script that is not there
            elements = len(registries[path].elements)
            outcomes.append((path, f"ok    {path}  ({elements} elements)", True))
        except FormworkError as exc:
            outcomes.append((path, exc.message, False))
    for path in [*scripts, *rollouts]:
        try:
            if path in rollouts:
                outcomes.append((path, _check_rollout(store, path, subflows), True))
            else:
                outcomes.append((path, _check_script(store, path, subflows), True))
        except FormworkError as exc:
            outcomes.append((path, exc.message, False))
    if not args.no_browser:
        chromium = settings.chromium or find_chromium()
        outcomes = _checked_in_browser(outcomes, registries, scripts, chromium)
    failed = [(path, message) for path, message, ok in outcomes if not ok]
    for path, message, ok in outcomes:
        if ok:
            print(message)
        else:
            print(f"FAIL  {path}\n      " + "\n      ".join(_own_lines(path, message, failed)))
    print(f"{len(outcomes) - len(failed)} valid, {len(failed)} invalid")
    return 1 if failed else 0


def _checked_in_browser(
    outcomes: list[tuple[Path, str, bool]],
    registries: dict[Path, SiteRegistry],
    scripts: list[Path],
    chromium: str | None,
) -> list[tuple[Path, str, bool]]:
    """`outcomes` with what only a browser can tell added: selectors that do not parse, keys
    that are not keys (see `worker.browsercheck`). Only files that loaded are tried."""
    from worker.browsercheck import check, registry_probes, script_probes

    loaded = {path for path, _, ok in outcomes if ok}
    probes = [p for path, reg in registries.items() for p in registry_probes(path, reg)]
    probes += [p for path in scripts if path in loaded for p in script_probes(path)]
    try:
        problems = asyncio.run(check(probes, chromium))
    except PlaywrightError as exc:
        # A CI gate must not pass with half its checks skipped (a mistyped FORMWORK_CHROMIUM).
        why = (
            f"Chromium did not start ({exc.message.splitlines()[0]}): selectors and press keys "
            "were not checked in a browser; --no-browser skips this check"
        )
        return [*outcomes, (Path(chromium or "chromium"), why, False)]
    checked: list[tuple[Path, str, bool]] = []
    for path, message, ok in outcomes:
        lines = problems.get(path)
        if lines and path in loaded:
            checked.append((path, "\n".join(lines), False))
        else:
            checked.append((path, message, ok))
    return checked


def _check_script(store: ScriptStore, path: Path, subflows: dict[str, str]) -> str:
    """The `ok` line of a script that loads; notes the sub-flows it runs in `subflows`."""
    loaded = store.load_path(path)
    try:
        store.versions(loaded.name)
    except FormworkError as exc:
        # Another file of the same script is at fault: it gets its own FAIL line.
        if str(path) in exc.message:
            raise
    planned = [*loaded.plan, *loaded.probe, *(p for a in loaded.alternates.values() for p in a)]
    for each in planned:
        if each.frame.parent is not None:
            subflows.setdefault(each.frame.script.name, f"used by {loaded.name}")
    login = loaded.registry.login_flow
    if login is not None:
        subflows.setdefault(login, f"the login_flow of selectors/{loaded.registry.site}.yaml")
    return f"ok    {loaded.name}@{loaded.script.version}  ({len(loaded.plan)} steps)"


def _check_rollout(store: ScriptStore, path: Path, subflows: dict[str, str]) -> str:
    """The `ok` line of a rollout file whose versions exist and load."""
    name = script_of(path)
    config = load_rollout(store, name)
    assert config is not None
    refuse_subflow(path, name, subflows)
    for role, version in (("stable", config.stable), ("canary", config.canary)):
        if version is not None:
            _loads(store, name, version, role)
    canary = f", canary v{config.canary} at {config.percent:g}%" if config.canary else ""
    return f"ok    {name} rollout: stable v{config.stable}{canary}"


def _own_lines(path: Path, message: str, failed: list[tuple[Path, str]]) -> list[str]:
    """The lines of `path`'s error, each once; an error in another file that has its own FAIL
    entry (a sub-flow, a version beside it) points there instead of being printed again."""
    for elsewhere, text in failed:
        # A registry's error, every line of it, repeated in each script of its site.
        if elsewhere != path and text.startswith(f"{elsewhere}:") and text in message:
            message = message.replace(text, f"{elsewhere} is invalid (see its own FAIL entry)")
    lines: list[str] = []
    for line in message.split("\n"):
        other = next(
            (
                p
                for p, m in failed
                if p != path and line.startswith(f"{p}:") and line in m.split("\n")
            ),
            None,
        )
        shown = f"{other} is invalid (see its own FAIL entry)" if other else line
        if shown not in lines:
            lines.append(shown)
    return lines


def _loads(store: ScriptStore, name: str, version: int, role: str) -> None:
    """A version the rollout sends jobs to must load: a canary that does not would fail every
    job routed to it."""
    try:
        store.load(name, version)
    except FormworkError as exc:
        exc.message = f"{role} v{version} does not load: {exc.message}"
        raise


async def _rollout(args: argparse.Namespace) -> int:
    from worker.keys import Keys

    settings = Settings.from_env(scripts_dir=args.scripts_dir, selectors_dir=args.selectors_dir)
    store = ScriptStore(settings.scripts_dir, settings.selectors_dir)
    redis = _redis(settings)
    rollouts = Rollouts(redis, Keys(settings.key_prefix), store)
    try:
        if args.rollout_command == "status":
            names = [args.script] if args.script else []
            names = names or [script_of(p) for p in rollout_files(settings.scripts_dir)]
            statuses = [await rollouts.status(name) for name in names]
            if args.json:
                print(json.dumps([s.model_dump(mode="json") for s in statuses], indent=2))
            for status in [] if args.json else statuses:
                print("\n".join(describe(status)))
            return 0
        if args.rollout_command == "reset":
            change = await rollouts.reset(args.script, args.by)
        elif args.rollout_command == "promote":
            change = await rollouts.promote(args.script, args.by, args.reason or "promoted")
        else:
            change = await rollouts.rollback(args.script, args.by, args.reason or "rolled back")
        # Where unpinned jobs go now, canary split included (after a reset, the file's).
        status = await rollouts.status(args.script)
    except FormworkError as exc:
        print(f"formwork: {exc.message}", file=sys.stderr)
        return 2
    finally:
        await redis.aclose()
    canary = f" (canary v{change.canary})" if change.canary else ""
    routing = f"stable v{status.stable}"
    if status.canary is not None:
        routing += f", canary v{status.canary} at {status.percent:g}%"
    print(f"{change.script}: {change.action}{canary}; unpinned jobs: {routing}")
    return 0


def _fixtures(args: argparse.Namespace) -> int:
    from fixtures.server import SITES, serve_forever

    if args.site not in SITES:
        known = ", ".join(sorted(SITES))
        raise UsageError(f"unknown fixture site {args.site!r}; known sites: {known}")
    try:
        serve_forever(args.site, args.host, args.port)
    except OSError as exc:
        raise CommandFailed(_cannot_listen(args.host, args.port, exc)) from exc
    return 0


async def _recording_export(args: argparse.Namespace) -> int:
    from worker.recording import export, from_report

    settings = Settings.from_env(scripts_dir=args.scripts_dir, selectors_dir=args.selectors_dir)
    report: JobReport | None
    if args.report is not None:
        report = await _read_report(args.report)
    else:
        async with _client() as client:
            report = await client.handle(args.job_id).report()
        if report is None:
            # `formwork run` jobs never touch Redis, and a queue's records expire: the
            # job's own report.json in the artifacts is the same report.
            report = await asyncio.to_thread(_stored_report, settings, args.job_id)
    if report is None or report.artifacts is None:
        # An id no job has, like every command taking a job id: a wrong command line.
        print(f"formwork: no report for job {args.job_id} (try --report PATH)", file=sys.stderr)
        return 2
    try:
        store = ScriptStore(settings.scripts_dir, settings.selectors_dir)
        recording = from_report(report, store.load(report.script, report.script_version))
        out = args.out or Path("recordings") / report.job_id
        export(recording, _report_store(settings, report.artifacts.root), out)
    except FormworkError as exc:
        print(f"formwork: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a place that cannot be written (under a file, read-only)
        raise CommandFailed(f"cannot write recording to {out}: {_why(exc)}") from exc
    print(f"recording of {report.job_id} ({recording.script_ref}, {report.status}): {out}/")
    return 0


def _report_store(settings: Settings, root: str) -> ArtifactStore:
    """The store a report's artifacts are in: its bucket (this worker's S3 endpoint), or its
    directory."""
    if root.startswith("s3://"):
        return open_store(settings.artifacts_dir, root, endpoint_url=settings.s3_endpoint_url)
    return LocalArtifacts(Path(root))


def _stored_report(settings: Settings, job_id: str) -> JobReport | None:
    """The report a job left in the artifacts (FORMWORK_ARTIFACTS_DIR / _URL), if any."""
    store = store_for(settings)
    path = store.find_job(job_id)
    if path is None:
        return None
    try:
        return JobReport.model_validate_json(store.get(f"{path}/report.json"))
    except (FormworkError, OSError, ValidationError):
        return None  # not readable as a report: said as "no report" by the caller


async def _read_report(path: Path) -> JobReport:
    """A job's report.json, or a one-line reason it cannot be used."""
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = _why(exc) if isinstance(exc, OSError) else "not UTF-8 text"
        raise CommandFailed(f"cannot read report {path}: {why}") from exc
    try:
        return JobReport.model_validate_json(text)
    except ValidationError as exc:
        raise CommandFailed(f"report {path} is not a job report: {_problems(exc)}") from exc


async def _replay(args: argparse.Namespace) -> int:
    from worker.replay import Verdict, replay_all, table

    if not args.site_url and not args.from_har:
        print("formwork: replay needs --site-url URL, or --from-har", file=sys.stderr)
        return 2
    settings = Settings.from_env(
        secrets_file=args.secrets_file, scripts_dir=args.scripts_dir,
        selectors_dir=args.selectors_dir,
    )  # fmt: skip
    out = Path(args.out)
    runtime = _runtime(settings, LocalArtifacts(out / "runs"), SecretStore(settings.secrets_file))
    try:
        results = await replay_all(
            [Path(b) for b in args.bundles], runtime, site_url=args.site_url, out_dir=out,
            script_version=args.script_version, threshold=args.threshold,
            update_golden=args.update, from_har=args.from_har,
        )  # fmt: skip
    except FormworkError as exc:
        print(f"formwork: {exc.message}", file=sys.stderr)
        return 2
    finally:
        await runtime.browser.stop()
    print(table(results))
    print(f"report: {out / 'index.html'}   junit: {out / 'junit.xml'}")
    if args.update:
        print(f"updated {len(results)} golden recording(s)")
        return 0
    return 1 if any(r.verdict == Verdict.regression for r in results) else 0


def _demo(args: argparse.Namespace) -> int:
    from worker.demo import demo

    return asyncio.run(demo())


# ---------------------------------------------------------------- formwork audit (issue 7)


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `2w` -> a timedelta (the same spelling as `stats --last`), but never in
    minutes, and not reaching back past the calendar's first day."""
    # Read as two months, `2m` (two minutes) removed every day before today's.
    if text.strip().endswith("m"):
        raise argparse.ArgumentTypeError(
            f"an age is in hours, days or weeks (36h, 30d, 2w), not {text!r}: "
            "m would be minutes, not months"
        )
    age = _window(text)
    try:
        prune_cutoff(age)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than any span") from None
    return age


def _age_as_typed(text: str) -> str:
    parse_age(text)
    return text


def _audit_store(args: argparse.Namespace) -> ArtifactStore:
    try:
        settings = Settings.from_env(
            artifacts_dir=args.artifacts, artifacts_url=args.store, s3_endpoint_url=args.s3_endpoint
        )
        store = store_for(settings)
    except ValidationError as exc:  # --store ftp://…: a wrong command line
        raise UsageError(_problems(exc)) from exc
    except ArtifactError as exc:
        raise UsageError(exc.message) from exc
    root = settings.artifacts_dir
    if isinstance(store, LocalArtifacts) and root.exists() and not root.is_dir():
        # A mistyped path read as a store with no jobs: an empty list, nothing pruned.
        option = "--artifacts" if args.artifacts is not None else "FORMWORK_ARTIFACTS_DIR"
        raise UsageError(f"{option}={str(root)!r}: a file, not the artifacts directory")
    return store


def _audit_prune(args: argparse.Namespace) -> int:
    store = _audit_store(args)
    age = parse_age(args.older_than)
    try:
        removed = store.prune(age, dry_run=args.dry_run)
    except ArtifactError as exc:  # the bucket unreachable, the credentials refused
        raise CommandFailed(exc.message) from exc
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    plural = "" if len(removed) == 1 else "s"
    # A day's folder goes whole: say which days the age came to.
    before = prune_cutoff(age)
    print(f"{verb} {len(removed)} job{plural} older than {args.older_than} (days before {before})")
    return 0


def _audit_export(args: argparse.Namespace) -> int:
    from worker.audit_ui import export_html

    store = _audit_store(args)
    try:
        # A job whose audit record was never written is exported from its report.
        record, audited = store.find_review(args.job_id)
    except ArtifactUnreadable as exc:  # the job is there, its record is not readable
        raise CommandFailed(exc.message) from exc
    except FormworkError as exc:  # no such job's record: a wrong command line
        print(f"formwork: {exc.message}", file=sys.stderr)
        return 2
    out = Path(args.out or f"audit-{safe_id(record.job_id)}.html")
    page = export_html(store, record, audited=audited)
    try:
        out.write_text(page, encoding="utf-8")
        out.chmod(0o600)  # evidence may show customer data
    except OSError as exc:
        raise CommandFailed(f"cannot write audit export {out}: {_why(exc)}") from exc
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


def _audit_serve(args: argparse.Namespace) -> int:
    from worker.audit_ui import serve
    from worker.audit_ui.live import LiveState

    store = _audit_store(args)
    live = None
    if not args.no_redis:
        # A paused job's record says nothing of a decision sent since, or of its run after
        # it: the queue's Redis does (a page says so when it cannot be asked).
        live = LiveState(_client(), Settings.from_env().redis_url)

    def listening(port: int) -> None:
        # Said once it listens: a port in use gets the error alone, and port 0 the real one.
        print(f"formwork audit: http://{args.host}:{port}/ ({store.location})", flush=True)

    if not _loopback(args.host):
        print(
            f"formwork audit: warning: the review UI has no sign-in; anyone who can reach "
            f"{args.host}:{args.port} can read every job's evidence",
            file=sys.stderr,
            flush=True,
        )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it is meant to stop
        try:
            asyncio.run(serve(store, args.host, args.port, live, listening))
        except OSError as exc:
            raise CommandFailed(_cannot_listen(args.host, args.port, exc)) from exc
    return 0


def _loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    """Why a server command could not start, in a line: the port in use, most often."""
    # asyncio's message repeats the address; the port is what a person changes.
    why = "the port is in use" if exc.errno == errno.EADDRINUSE else _why(exc)
    return f"cannot listen on {host}:{port}: {why}"


def _add_audit(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the audit trail: review UI, export, retention")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--artifacts", type=Path, help="artifacts root (FORMWORK_ARTIFACTS_DIR)")
    where.add_argument("--store", help="s3://bucket/prefix instead of the local directory")
    where.add_argument("--s3-endpoint", help="endpoint of an S3-compatible server")

    serve = audit_sub.add_parser("serve", parents=[where], help="read-only review UI (local)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=_port, default=8840, help="default 8840; 0: any free one")
    serve.add_argument(
        "--no-redis",
        action="store_true",
        help="read the store alone, not the queue's Redis (REDIS_URL): a paused job is shown "
        "as its record last stood, not as decided or running again",
    )
    serve.set_defaults(handler=_audit_serve)

    export = audit_sub.add_parser(
        "export", parents=[where], help="one job as a self-contained HTML file"
    )
    export.add_argument("job_id")
    export.add_argument("--out", help="file to write (default audit-JOB.html)")
    export.set_defaults(handler=_audit_export)

    prune = audit_sub.add_parser("prune", parents=[where], help="remove old jobs' artifacts")
    # Checked by type (a bad age is a usage error), kept as typed for the summary line.
    prune.add_argument("--older-than", type=_age_as_typed, required=True, metavar="AGE")
    prune.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    prune.set_defaults(handler=_audit_prune)


# ---------------------------------------------------------------- the parser


def _add_rollout(sub: Any) -> None:
    rollout = sub.add_parser("rollout", help="canary rollout of script versions")
    rollout_sub = rollout.add_subparsers(dest="rollout_command", required=True)
    status = rollout_sub.add_parser("status", help="split, rollout state and outcomes per version")
    status.add_argument("script", nargs="?", help="site/name (default: every rollout file)")
    status.add_argument("--json", action="store_true")
    helps = {
        "promote": "the canary becomes stable for every unpinned job",
        "rollback": "every unpinned job runs stable; the canary gets none",
        "reset": "back to the rollout file, with fresh outcome counters",
    }
    for name, text in helps.items():
        command = rollout_sub.add_parser(name, help=text)
        command.add_argument("script", help="site/name")
        command.add_argument("--by", default="cli", help="who (recorded with the change)")
        if name != "reset":
            command.add_argument("--reason", help="why (recorded with the change)")
    for command in rollout_sub.choices.values():
        command.add_argument("--scripts-dir", type=Path)
        command.add_argument("--selectors-dir", type=Path)
        command.set_defaults(handler=lambda a: asyncio.run(_rollout(a)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="formwork", description="Browser-automation worker for AI customer support."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one script in-process and print each step")
    run.add_argument("script", help="a script file, or a name like billing/issue_credit[@1]")
    run.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--site-url", help="base URL of the site (overrides the registry)")
    run.add_argument("--job-id")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--har", action="store_true", help="record a scrubbed HAR of the traffic")
    run.add_argument(
        "--artifacts", type=Path, help="artifacts root (FORMWORK_ARTIFACTS_DIR, else ./artifacts)"
    )
    run.add_argument(
        "--secrets-file", type=Path, help="YAML file of secret name: value (FORMWORK_SECRETS_FILE)"
    )
    run.add_argument("--scripts-dir", type=Path)
    run.add_argument("--selectors-dir", type=Path)
    run.set_defaults(handler=lambda a: asyncio.run(_run(a)))

    schema = sub.add_parser("schema", help="print the wire contract as JSON Schema")
    schema.add_argument("--out", help="write one file per model into this directory")
    schema.set_defaults(handler=_schema)

    validate = sub.add_parser(
        "validate", help="load and check every selector registry, script and rollout file"
    )
    validate.add_argument("--scripts-dir", type=Path)
    validate.add_argument("--selectors-dir", type=Path)
    validate.add_argument(
        "--no-browser",
        action="store_true",
        help="skip the checks made in Chromium (CSS selectors parse, press keys are keys)",
    )
    validate.set_defaults(handler=_validate)

    _add_rollout(sub)

    recording = sub.add_parser("recording", help="recordings of finished jobs, for replay")
    recording_sub = recording.add_subparsers(dest="recording_command", required=True)
    export = recording_sub.add_parser("export", help="write a job's recording bundle")
    export.add_argument("job_id")
    export.add_argument("--out", type=Path, help="bundle directory (default recordings/JOB)")
    export.add_argument(
        "--report",
        type=Path,
        help="read the report from this file (default: Redis, then the artifacts)",
    )
    export.add_argument("--scripts-dir", type=Path)
    export.add_argument("--selectors-dir", type=Path)
    export.set_defaults(handler=lambda a: asyncio.run(_recording_export(a)))

    replay = sub.add_parser(
        "replay", help="run recordings again against a fixture site and compare step by step"
    )
    replay.add_argument(
        "bundles", nargs="+", help="recording bundles (their folders, or their recording.json)"
    )
    replay.add_argument("--site-url", help="base URL of the fixture site")
    replay.add_argument(
        "--from-har", action="store_true",
        help="serve each site from its bundle's HAR instead (no site needed)",
    )  # fmt: skip
    replay.add_argument("--script-version", type=int, help="replay with this script version")
    replay.add_argument(
        "--threshold", type=_share, default=0.01,
        help="share of changed pixels above which a screenshot is a regression (default 0.01)",
    )  # fmt: skip
    replay.add_argument("--update", action="store_true", help="accept the runs as the goldens")
    replay.add_argument("--out", default="replay-report", help="HTML report + junit.xml here")
    replay.add_argument("--secrets-file", type=Path)
    replay.add_argument("--scripts-dir", type=Path)
    replay.add_argument("--selectors-dir", type=Path)
    replay.set_defaults(handler=lambda a: asyncio.run(_replay(a)))

    fixtures = sub.add_parser("fixtures", help="local fixture sites")
    fixtures_sub = fixtures.add_subparsers(dest="fixtures_command", required=True)
    serve = fixtures_sub.add_parser("serve", help="serve a fixture site in the foreground")
    serve.add_argument("site")
    serve.add_argument("--port", type=_port, default=8811, help="default 8811; 0: any free one")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.set_defaults(handler=_fixtures)

    worker = sub.add_parser("worker", help="run a queue worker (arq on Redis)")
    worker.add_argument("--max-jobs", type=int, help="jobs at once (FORMWORK_MAX_JOBS)")
    worker.add_argument(
        "--burst",
        action="store_true",
        help="exit when the queue is empty (a paused job's deadline waits on it until decided)",
    )
    worker.add_argument(
        "--artifacts", type=Path, help="artifacts root (FORMWORK_ARTIFACTS_DIR, else ./artifacts)"
    )
    worker.add_argument(
        "--secrets-file", type=Path, help="YAML file of secret name: value (FORMWORK_SECRETS_FILE)"
    )
    worker.add_argument(
        "--log-format", choices=["json", "text"],
        help="json lines (the default for workers) or text (FORMWORK_LOG_FORMAT)",
    )  # fmt: skip
    worker.add_argument(
        "--metrics-port", type=_port, help="serve Prometheus /metrics here (FORMWORK_METRICS_PORT)"
    )
    worker.set_defaults(handler=_worker)

    stats = sub.add_parser("stats", help="activity and quality of settled jobs, from Redis")
    stats.add_argument(
        "--last", type=_stats_window, default="1h", help="window: 1h (default), 1d, 7d; at most 8d"
    )
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=lambda a: asyncio.run(_stats(a)))

    insights = sub.add_parser(
        "insights", help="where scripts fail, drift, hand off and spend time, with examples"
    )
    insights.add_argument(
        "--last", type=_insights_window, default="1d", help="window: 1d (default); at most 7d"
    )
    insights.add_argument("--site")
    insights.add_argument("--script", help="billing/issue_credit (or issue_credit)")
    insights.add_argument("--top", type=_positive, default=10, help="rows per section (default 10)")
    insights.add_argument("--json", action="store_true")
    insights.set_defaults(handler=lambda a: asyncio.run(_insights(a)))

    enqueue = sub.add_parser("enqueue", help="queue a job; prints its id")
    enqueue.add_argument("script", help="billing/issue_credit[@1]")
    enqueue.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    enqueue.add_argument("--site-url")
    enqueue.add_argument("--job-id")
    enqueue.add_argument("--idempotency-key")
    enqueue.add_argument("--watch", action="store_true", help="then print events until it ends")
    enqueue.set_defaults(handler=lambda a: asyncio.run(_enqueue(a)))

    watch = sub.add_parser("watch", help="print a job's events until it ends")
    watch.add_argument("job_id")
    watch.add_argument(
        "--after",
        default="0-0",
        help="resume after this event: the number its line starts with, or its event id",
    )
    watch.set_defaults(handler=lambda a: asyncio.run(_watch(a)))

    status = sub.add_parser("status", help="a job's status and report")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=lambda a: asyncio.run(_status(a)))

    abort = sub.add_parser("abort", help="stop a job between steps")
    abort.add_argument("job_id")
    abort.add_argument("--reason", default="aborted from the command line")
    abort.set_defaults(handler=lambda a: asyncio.run(_abort(a)))

    handoffs = sub.add_parser("handoffs", help="list jobs waiting for a person or the customer")
    handoffs.set_defaults(handler=lambda a: asyncio.run(_handoffs(a)))

    handoff = sub.add_parser("handoff", help="one paused job: why, evidence, decisions")
    handoff.add_argument("job_id")
    handoff.add_argument("--json", action="store_true")
    handoff.set_defaults(handler=lambda a: asyncio.run(_handoff(a)))

    resume = sub.add_parser("resume", help="answer a paused job with a decision")
    resume.add_argument("job_id")
    resume.add_argument(
        "decision",
        choices=[d.value for d in Decision],
    )
    resume.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    resume.add_argument("--output", action="append", default=[], metavar="KEY=VALUE")
    resume.add_argument("--note", "--reason", dest="note", help="why (required for reject)")
    resume.add_argument("--by", help="who decides (default: your login name)")
    resume.add_argument("--watch", action="store_true", help="then print events until it settles")
    resume.set_defaults(handler=lambda a: asyncio.run(_resume(a)))

    demo = sub.add_parser("demo", help="run the billing demo end to end")
    demo.set_defaults(handler=_demo)
    _add_audit(sub)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    from worker.logs import configure
    from worker.secretstore import Redactor

    # Workers log JSON lines for log pipelines; commands people run read better as text.
    fmt = getattr(args, "log_format", None) or os.environ.get("FORMWORK_LOG_FORMAT")
    if fmt not in (None, "", "json", "text"):
        raise SettingsInvalid(f"FORMWORK_LOG_FORMAT={fmt!r}: should be json or text")
    fmt = fmt or ("json" if args.command == "worker" else "text")
    try:
        secrets_file = getattr(args, "secrets_file", None) or Settings.from_env().secrets_file
        values = SecretStore(secrets_file).values()
    except FormworkError:
        values = []  # a broken secrets file is reported by the command that needs it
    level = logging.INFO if args.verbose else logging.WARNING
    configure("json" if fmt == "json" else "text", level, Redactor(values))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Printable(sys.stdout), _Printable(sys.stderr)
    try:
        _configure_logging(args)
        code: int = args.handler(args)
    except (UsageError, SettingsInvalid) as exc:
        print(f"formwork: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"formwork: {exc}", file=sys.stderr)
        return 1
    except FormworkError as exc:
        # A refusal the command did not word itself (a broken secrets file under `replay`).
        print(f"formwork: {exc.message}", file=sys.stderr)
        return 2
    except PlaywrightError as exc:
        # Jobs turn Playwright's errors into failure codes; one that gets here is the browser
        # not starting at all (a mistyped FORMWORK_CHROMIUM, a missing library).
        print(f"formwork: Chromium: {exc.message.splitlines()[0]}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        # A record read back from Redis that this version cannot read (every value the command
        # line gives is checked where it is read): a worker of another version wrote it, with
        # a status or a field this one does not know, or a person edited it.
        job_id = getattr(args, "job_id", None)
        whose = f"job {job_id}'s record" if job_id else "a record"
        print(
            f"formwork: {whose} in Redis cannot be read ({exc.title}: "
            f"{_problems(exc).removeprefix('(all): ')}); "
            "was it written by another version of Formwork?",
            file=sys.stderr,
        )
        return 1
    except RedisError as exc:
        # Down, unreachable, or refusing this password: said once, not as redis-py's traceback.
        where = shown_url(Settings.from_env().redis_url)
        print(f"formwork: Redis at {where}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `formwork … | head`: the reader has gone. Nothing more to say, and no traceback
        # when Python flushes stdout at exit (the recipe in Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        sys.stdout, sys.stderr = streams
    return code


if __name__ == "__main__":
    sys.exit(main())
