"""QA replay: run recorded jobs again against a fixture site and compare, step by step.

For each recording bundle (`worker.recording`), the job runs again in-process — with the
script's current version, or `script_version` — against `site_url`, and every recorded step is
compared with its new run:

  status        a step that succeeded and now fails (or is not reached)  → regression
  URL path      the page the step ended on                               → regression
  outputs       values read (dynamic ones by presence only)              → regression
  entered       what a fill or select put in (secrets stay '***')        → regression
  screenshot    changed-pixel ratio above `threshold` (dynamic regions masked) → regression
                — as is a screenshot missing or unreadable: a check not made is no pass
  selector      the element found through another candidate (drift)     → drift
                — unless that candidate acted on another element than recorded: the
                recorded candidate still finds one elsewhere on the page right after the
                step, or (without it) the acted box is away from the recorded one → regression
  path taken    steps the new run added (a relogin, an alternate)        → drift

A replay with any regression fails (exit code 1 from `formwork replay`); drift is reported
but passes — it is the early warning that a registry's primary candidate needs fixing.
Results are printed as a table and written as an HTML report (expected / actual / diff side
by side) and JUnit XML, which any CI shows.

Each recording was made on a fresh site, and a replay changes the site it runs on (a credit
issued, a ticket resolved). Against a Formwork fixture site (one that answers
`/_fixture/faults`) each recording therefore starts from the fixture's seed data, with the
faults that were set when the replay began; any other site is left as it is. Fixture sites
serve on this machine only, so a site elsewhere is not even asked.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit

import aiohttp
from jinja2 import Environment, PackageLoader, select_autoescape
from playwright.async_api import BrowserContext, Page, Route
from playwright.async_api import Error as PlaywrightError
from pydantic import ValidationError

from worker.artifacts import LocalArtifacts
from worker.contract import (
    Box,
    BrowserJob,
    FailureCode,
    JobReport,
    MatchedSelector,
    StepReport,
    StepStatus,
)
from worker.errors import FormworkError, JobInvalid, RecordingInvalid
from worker.executor import Runtime, run_job
from worker.har import Answer, HarReplay, Unanswered, placeholder_environ
from worker.imagediff import compare as compare_images
from worker.recording import (
    SECRET_REF,
    RecordedStep,
    Recording,
    bundle_of,
    export,
    from_report,
    load,
    outputs_by_step,
    url_path,
)
from worker.rollout import stable_version
from worker.secretstore import SecretStore
from worker.selectors import Candidate

log = logging.getLogger("formwork.replay")

DEFAULT_THRESHOLD = 0.01
# A redirect chain longer than this, answered from a HAR, is a loop.
MAX_REDIRECTS = 20
FIXTURE_TIMEOUT_S = 10.0
# Looking where a recorded candidate's element is: it is visible already, so no real wait.
LOOK_TIMEOUT_MS = 1_000


class Verdict(StrEnum):
    same = "same"
    drift = "drift"
    regression = "regression"

    @property
    def rank(self) -> int:
        return {"same": 0, "drift": 1, "regression": 2}[self.value]


@dataclass
class StepResult:
    step_id: str
    verdict: Verdict = Verdict.same
    problems: list[str] = field(default_factory=list)
    expected_status: str | None = None
    actual_status: str | None = None
    pixel_ratio: float | None = None
    expected_image: str | None = None  # relative to the replay's output directory
    actual_image: str | None = None
    diff_image: str | None = None

    def flag(self, verdict: Verdict, problem: str) -> None:
        self.problems.append(problem)
        if verdict.rank > self.verdict.rank:
            self.verdict = verdict


@dataclass
class ReplayResult:
    bundle: Path
    recording: Recording
    report: JobReport
    steps: list[StepResult]
    problems: list[str] = field(default_factory=list)  # about the job as a whole
    unmatched: list[str] = field(default_factory=list)  # HAR replay: requests it had no answer to
    from_har: bool = False

    @property
    def verdict(self) -> Verdict:
        verdicts = [s.verdict for s in self.steps]
        if self.problems:
            verdicts.append(Verdict.regression)
        return max(verdicts, key=lambda v: v.rank, default=Verdict.same)


def replayed_version(recording: Recording, runtime: Runtime, version: int | None) -> int:
    """The version a replay runs: the one given, else the script's stable one. Never left to
    the rollout: the job id is new each replay, so a canary's share of replays ran the canary,
    and the same command passed or failed by the draw."""
    return version if version is not None else stable_version(runtime.scripts, recording.script)


def job_for(
    recording: Recording, runtime: Runtime, site_url: str | None, version: int | None
) -> BrowserJob:
    """The recorded job, to run again (`replayed_version`): secret inputs come from this
    worker's secret store."""
    inputs: dict[str, Any] = {}
    for name, value in recording.inputs.items():
        if isinstance(value, dict) and SECRET_REF in value:
            ref = str(value[SECRET_REF])
            inputs[name] = runtime.secrets.resolve({ref}, script=recording.script)[ref]
        else:
            inputs[name] = value
    script = f"{recording.script}@{replayed_version(recording, runtime, version)}"
    return BrowserJob(
        job_id=f"replay-{recording.job_id}-{uuid.uuid4().hex[:6]}"[:128],
        script=script,
        inputs=inputs,
        site_url=site_url,
        # A recording that carries its traffic keeps doing so when --update replaces it.
        har=True if recording.har is not None else None,
    )


def _local_root(runtime: Runtime) -> Path:
    # Replay compares the screenshots of a run on this machine's disk: a local store only.
    if not isinstance(runtime.artifacts, LocalArtifacts):
        raise RecordingInvalid("replay needs a local artifacts directory, not an object store")
    return runtime.artifacts.root


async def replay(
    bundle: Path,
    recording: Recording,
    runtime: Runtime,
    *,
    site_url: str | None,
    out_dir: Path,
    script_version: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    from_har: bool = False,
    images: str | None = None,
) -> ReplayResult:
    """Run `bundle` again and compare; its images go to `out_dir/<images>` (default: the
    recorded job's id)."""
    unmatched: list[str] = []
    if from_har:
        runtime, site_url = offline(bundle, recording, runtime, unmatched)
    job = job_for(recording, runtime, site_url, script_version)
    witness = _Witness(recording)
    runtime = replace(runtime, context_setup=witness.watching(runtime.context_setup))
    report = await run_job(job, runtime, witness)
    result = await asyncio.to_thread(
        compare,
        bundle,
        recording,
        report,
        _local_root(runtime),
        out_dir,
        threshold,
        witness.seen,
        images,
    )
    result.unmatched, result.from_har = unmatched, from_har
    return result


class _Witness:
    """Listens to a replayed job. Right after a step that found its element through another
    candidate than the recording's, it looks on the page for the recorded candidate's element:
    in the same page state, at the moment the acted element was measured. Found elsewhere, the
    step acted on another element than the recorded one (a registry that now points at the
    wrong field); not found, it is the fallback that drift is."""

    def __init__(self, recording: Recording) -> None:
        self.recorded = {s.id: s.matched for s in recording.steps if s.matched is not None}
        self.page: Page | None = None
        # step id -> the box of the recorded candidate's element, None when it shows none.
        self.seen: dict[str, Box | None] = {}

    def watching(
        self, setup: Callable[[BrowserContext], Awaitable[None]] | None
    ) -> Callable[[BrowserContext], Awaitable[None]]:
        """A context setup that does `setup`, then keeps the job's page to look at."""

        async def watch(context: BrowserContext) -> None:
            if setup is not None:
                await setup(context)
            self.page = context.pages[0] if context.pages else None

        return watch

    async def step_changed(self, report: JobReport, step: StepReport) -> None:
        before, after = self.recorded.get(step.id), step.selector
        if (
            self.page is None
            or before is None
            or after is None
            or before.candidate == after.candidate
            or step.status not in (StepStatus.succeeded, StepStatus.failed)
        ):
            return
        self.seen[step.id] = await _look(self.page, before.candidate)

    async def job_changed(self, report: JobReport) -> None:
        return None


async def _look(page: Page, described: str) -> Box | None:
    """The box of the element a candidate (as `Candidate.describe` wrote it) finds on the
    page now; None when it finds none showing, or cannot be read back."""
    candidate = _candidate_of(described)
    if candidate is None:
        return None
    locator = candidate.locator(page).first
    try:
        if not await locator.is_visible():
            return None
        found = await locator.bounding_box(timeout=LOOK_TIMEOUT_MS)
    except PlaywrightError:
        return None  # the page moved on (a navigation): nothing to compare with
    return Box.model_validate(found) if found else None


def _candidate_of(described: str) -> Candidate | None:
    """The candidate `Candidate.describe` wrote as `described` (a recording keeps no more),
    or None when it cannot be read back."""
    fields: dict[str, str | None] = {}
    if described.startswith("frame="):
        frame, sep, described = described.partition(" >> ")
        if not sep:
            return None
        fields["frame"] = frame.removeprefix("frame=")
    kind, sep, value = described.partition("=")
    if not sep:
        return None
    if kind == "role":
        role, named, name = value.partition("[name=")
        fields["role"] = role
        if named:
            try:
                fields["name"] = ast.literal_eval(name.removesuffix("]"))
            except (ValueError, SyntaxError):
                return None
    else:
        fields[kind] = value
    try:
        return Candidate.model_validate(fields)
    except ValidationError:
        return None


def offline(
    bundle: Path, recording: Recording, runtime: Runtime, unmatched: list[str]
) -> tuple[Runtime, str]:
    """A runtime that serves the site from the bundle's HAR, not the network: every request
    the HAR cannot answer is aborted and listed in `unmatched`. Secrets are the placeholders
    the HAR was scrubbed to, so the recorded sign-in matches and no real credential is used."""
    if recording.har is None or recording.site_origin is None:
        raise RecordingInvalid(f"{bundle}: recorded without a HAR (run the job with har: true)")
    har = HarReplay.load(bundle / recording.har)
    loaded = runtime.scripts.load(recording.script, recording.script_version)
    names = loaded.secret_names() | {
        str(v[SECRET_REF]) for v in recording.inputs.values() if isinstance(v, dict)
    }

    async def serve_from_har(context: BrowserContext) -> None:
        # Not Playwright's route_from_har: it leaves a request whose entry has no response
        # pending for ever (and the page with it), loses a redirect whose Location carries a
        # #fragment, and answers a page fetched twice with its first version both times.
        await context.route("**/*", lambda route: _serve(route, har, unmatched))

    secrets = SecretStore(None, environ=placeholder_environ(names))
    runtime = replace(runtime, secrets=secrets, context_setup=serve_from_har, send_once=False)
    return runtime, recording.site_origin


async def _serve(route: Route, har: HarReplay, unmatched: list[str]) -> None:
    """Answer one request from the HAR, or abort it: never leave it pending, since a page
    waiting on a request blocks everything run in it (the step's evidence included)."""
    request = route.request
    found = await _lookup(route, har)
    if isinstance(found, Answer) and found.location is not None:
        if request.is_navigation_request():
            await _redirect(route, found.location)
            return
        # A fetch is answered with where its redirects end: Playwright sends a request that
        # follows a fulfilled redirect to the network, never back to this route.
        found = _follow(har, request.url, found)
    if isinstance(found, Unanswered):
        unmatched.append(f"{request.method} {request.url}: {found.reason}")
        await route.abort()
        return
    await route.fulfill(status=found.status, headers=found.headers, body=found.body)


async def _lookup(route: Route, har: HarReplay) -> Answer | Unanswered:
    request = route.request
    try:
        content_type = await request.header_value("content-type")
        return har.answer(request.method, request.url, request.post_data_buffer, content_type)
    except Exception as exc:  # a bug here must not leave the request pending: see _serve
        log.exception("HAR lookup of %s %s failed", request.method, request.url)
        return Unanswered(f"internal error ({type(exc).__name__}: {exc})")


async def _redirect(route: Route, location: str) -> None:
    # A navigation follows a recorded redirect as a new navigation, which comes back to this
    # route: fulfilling the 3xx would let the browser fetch its target from the network.
    # Playwright's own HAR routing does the same, through the same internal call.
    request = route.request
    target = urljoin(request.url, location)
    if _same_document(request.frame.url, target):
        # That navigation would only scroll the page the request came from (a form posting
        # back to its own page, answered with `Location: /page#new-message`), where the site
        # loads the page anew: load it from the request's own URL instead.
        await route.fulfill(status=200, content_type="text/html", body=_moved_to(target))
        return
    await route._impl_obj._redirect_navigation_request(target)


def _same_document(current: str, target: str) -> bool:
    here, there = urldefrag(current), urldefrag(target)
    return bool(there.fragment) and here.url == there.url


def _moved_to(target: str) -> str:
    # JSON is a JavaScript string literal; "<" escaped so no URL can close the script element.
    literal = json.dumps(target).replace("<", "\\u003c")
    return f"<!doctype html><script>location.replace({literal})</script>"


def _follow(har: HarReplay, url: str, answer: Answer) -> Answer | Unanswered:
    found: Answer | Unanswered = answer
    for _ in range(MAX_REDIRECTS):
        if isinstance(found, Unanswered) or found.location is None:
            return found
        url = urljoin(url, found.location)
        found = har.answer("GET", url, None, None)
    return Unanswered(f"more than {MAX_REDIRECTS} redirects")


def compare(
    bundle: Path,
    recording: Recording,
    report: JobReport,
    artifacts_root: Path,
    out_dir: Path,
    threshold: float,
    seen: Mapping[str, Box | None] | None = None,
    images_name: str | None = None,
) -> ReplayResult:
    """Compare a new run's report with the recording (pure but for the image files). `seen`:
    where the `_Witness` found each step's recorded candidate's element; `images_name`: the
    folder under `out_dir` for this bundle's images (default: the recorded job's id)."""
    images = out_dir / (images_name or _slug(recording.job_id))
    images.mkdir(parents=True, exist_ok=True)
    actual = {s.id: s for s in report.steps}
    outputs = outputs_by_step(report)
    # Dynamic values (a confirmation number) appear in URLs too: compare paths without them.
    dynamic = [recording.outputs.get(n) for n in recording.dynamic_outputs] + [
        report.outputs.get(n) for n in recording.dynamic_outputs
    ]
    results = []
    for recorded in recording.steps:
        result = StepResult(recorded.id, expected_status=recorded.status)
        now = actual.get(recorded.id)
        if now is None:
            if recorded.status != StepStatus.skipped:
                result.flag(Verdict.regression, "not run in the replay")
            results.append(result)
            continue
        result.actual_status = now.status
        if now.status != recorded.status:
            result.flag(Verdict.regression, f"status {recorded.status} -> {now.status}")
        _compare_selector(recorded, now, result, (seen or {}).get(recorded.id))
        before, after = _masked(recorded.url_path, dynamic), _masked(url_path(now.url), dynamic)
        if recorded.status == now.status and before != after:
            result.flag(Verdict.regression, f"page {before} -> {after}")
        for name, value in recorded.outputs.items():
            new = outputs.get(now.id, {}).get(name)
            if name in recording.dynamic_outputs:
                if not new:
                    result.flag(Verdict.regression, f"output {name} not read")
            elif new != value:
                result.flag(Verdict.regression, f"output {name} {value!r} -> {new!r}")
        # What a fill or select put in: a script change that types something else changes
        # what the site stores, though it moves only a few pixels of the screenshot.
        typed_before, typed_after = (
            _masked(recorded.entered, dynamic),
            _masked(now.entered, dynamic),
        )
        if typed_before is not None and typed_after is not None and typed_before != typed_after:
            result.flag(Verdict.regression, f"entered {typed_before!r} -> {typed_after!r}")
        _compare_pixels(bundle, recorded, now, artifacts_root, images, out_dir, threshold, result)
        results.append(result)
    recorded_ids = {s.id for s in recording.steps}
    for extra in report.steps:
        if extra.id not in recorded_ids and extra.status != StepStatus.skipped:
            result = StepResult(extra.id, actual_status=extra.status)
            result.flag(Verdict.drift, f"extra step ({extra.action}): the run took another path")
            results.append(result)
    problems = []
    if report.status != recording.status:
        why = f": {report.error.message}" if report.error else ""
        problems.append(f"job {recording.status} -> {report.status}{why}")
    return ReplayResult(bundle, recording, report, results, problems)


def _compare_selector(
    recorded: RecordedStep, now: StepReport, result: StepResult, seen: Box | None
) -> None:
    before, after = recorded.matched, now.selector
    if before is None or after is None or before.candidate == after.candidate:
        return
    how = "a fallback" if after.index > before.index else "another candidate"
    found = f"{after.element} found by {how}: {after.candidate} (recorded: {before.candidate})"
    elsewhere = _elsewhere(before, after, seen)
    if elsewhere is not None:
        result.flag(Verdict.regression, f"{found}, which is another element: {elsewhere}")
    else:
        result.flag(Verdict.drift, found)


def _elsewhere(before: MatchedSelector, after: MatchedSelector, seen: Box | None) -> str | None:
    """Why the element the replay acted on is not the recorded one, or None when nothing says
    so. A fallback is drift only while it finds the same element: a registry that swapped two
    fields' selectors has each step type into the other field, every step succeeding."""
    acted = after.box
    if acted is None:
        return None  # the step left the page (a click that navigated): nothing to compare
    if seen is not None:
        # Both measured on the same page at the same moment: this settles it either way.
        if _same_place(seen, acted):
            return None
        return f"acted at {_at(acted)}, while {before.candidate} still finds one at {_at(seen)}"
    if before.box is not None and not _same_place(before.box, acted):
        return f"acted at {_at(acted)}, recorded at {_at(before.box)}"
    return None


def _same_place(a: Box, b: Box) -> bool:
    """Each box's centre lies in the other: the same element, give or take a few pixels of
    layout (or a wrapper around it), and not the field above or beside it."""

    def inside(box: Box, x: float, y: float) -> bool:
        return box.x <= x <= box.x + box.width and box.y <= y <= box.y + box.height

    return inside(b, a.x + a.width / 2, a.y + a.height / 2) and inside(
        a, b.x + b.width / 2, b.y + b.height / 2
    )


def _at(box: Box) -> str:
    return f"({box.x:.0f}, {box.y:.0f}) {box.width:.0f}x{box.height:.0f}"


def _compare_pixels(
    bundle: Path,
    recorded: RecordedStep,
    now: StepReport,
    artifacts_root: Path,
    images: Path,
    out_dir: Path,
    threshold: float,
    result: StepResult,
) -> None:
    if recorded.screenshot is None or now.screenshot is None:
        return
    expected, actual = bundle / recorded.screenshot, artifacts_root / now.screenshot
    golden, replayed = f"golden screenshot {recorded.screenshot}", "the replay's screenshot"
    # A visual check that cannot be made is a regression, not a pass: a golden image lost
    # from a bundle would otherwise let any visual change of that step through, for good.
    for path, name in ((expected, golden), (actual, replayed)):
        if not path.is_file():
            result.flag(Verdict.regression, f"{name} is missing: no visual check")
            return
    stem = _slug(recorded.id)
    diff = compare_images(
        expected, actual, [*recorded.dynamic, *now.dynamic], images / f"{stem}.diff.png"
    )
    if diff.unreadable is not None:
        name = golden if diff.unreadable == expected else replayed
        result.flag(Verdict.regression, f"{name} is unreadable ({diff.reason}): no visual check")
        return
    kept_expected = images / f"{stem}.expected{expected.suffix}"
    kept_actual = images / f"{stem}.actual{actual.suffix}"
    shutil.copyfile(expected, kept_expected)
    shutil.copyfile(actual, kept_actual)
    result.pixel_ratio = diff.ratio
    result.expected_image = str(kept_expected.relative_to(out_dir))
    result.actual_image = str(kept_actual.relative_to(out_dir))
    if diff.diff is not None:
        result.diff_image = str(diff.diff.relative_to(out_dir))
    if diff.size_changed:
        result.flag(Verdict.regression, "screenshot size changed")
    elif diff.ratio > threshold:
        result.flag(
            Verdict.regression, f"visual change {diff.ratio:.2%} > threshold {threshold:.2%}"
        )


def _masked(path: str | None, values: Iterable[str | None]) -> str | None:
    if path is None:
        return None
    for value in values:
        if value:
            path = path.replace(value, "<dynamic>")
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


# ---------------------------------------------------------------- fixture sites


@dataclass(frozen=True)
class FixtureSite:
    """A Formwork fixture site (`fixtures/`), known by its `/_fixture/faults` endpoint, and
    the faults set on it when the replay began."""

    url: str
    faults: dict[str, Any]


def _http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FIXTURE_TIMEOUT_S))


def on_this_machine(site_url: str) -> bool:
    """Whether `site_url` names a loopback host: the only place a fixture site serves."""
    host = urlsplit(site_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def fixture_site(site_url: str) -> FixtureSite | None:
    """`site_url` as a fixture site, or None for any other site (never reset)."""
    # A real portal gets no request it did not ask for, not even a probe that 404s.
    if not on_this_machine(site_url):
        return None
    url = site_url.rstrip("/")
    try:
        async with _http() as http, http.get(f"{url}/_fixture/faults") as response:
            if response.status != 200:
                return None
            faults = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        # Not a fixture (no such page, not JSON), or no site at all: the replay says so.
        return None
    return FixtureSite(url, faults) if isinstance(faults, dict) else None


async def restore(site: FixtureSite) -> None:
    """Put the fixture back to its seed data, then set the faults the replay began with
    again (a reset clears them too): every recording meets the site it was recorded on,
    with the faults under test, whatever the recordings before it did."""
    try:
        async with _http() as http:
            for path, body in (("/_fixture/reset", None), ("/_fixture/faults", site.faults)):
                async with http.post(site.url + path, json=body) as response:
                    response.raise_for_status()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FormworkError(
            f"could not reset the fixture site {site.url}: {exc}", code=FailureCode.network_error
        ) from exc


# ---------------------------------------------------------------- outputs


def table(results: list[ReplayResult]) -> str:
    """The terminal summary: one line per step that is not `same`, one per recording."""
    lines = [f"{'recording':<36} {'step':<30} {'verdict':<10} detail"]
    for result in results:
        name = result.bundle.name
        version = result.report.script_version
        ran = f"{result.report.status}" + (f" (v{version})" if version is not None else "")
        lines.append(f"{name:<36} {'(job)':<30} {result.verdict:<10} {ran}")
        for problem in result.problems:
            lines.append(f"{'':<36} {'(job)':<30} {'regression':<10} {problem}")
        for request in result.unmatched:
            lines.append(f"{'':<36} {'(har)':<30} {'no match':<10} {request}")
        for step in result.steps:
            if step.verdict != Verdict.same:
                detail = "; ".join(step.problems)
                lines.append(f"{'':<36} {step.step_id:<30} {step.verdict:<10} {detail}")
    return "\n".join(lines)


_env = Environment(
    loader=PackageLoader("worker", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def write_html(results: list[ReplayResult], out_dir: Path, threshold: float) -> Path:
    path = out_dir / "index.html"
    html = _env.get_template("replay.html").render(results=results, threshold=threshold)
    path.write_text(html)
    return path


def write_junit(results: list[ReplayResult], path: Path) -> Path:
    """One test suite per recording, one test case per step; drift goes to system-out."""
    suites = ET.Element("testsuites", name="formwork replay")
    for result in results:
        failures = sum(1 for s in result.steps if s.verdict == Verdict.regression)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=result.bundle.name,
            tests=str(len(result.steps) + 1),
            failures=str(failures + (1 if result.problems else 0)),
        )
        job = ET.SubElement(suite, "testcase", classname=result.bundle.name, name="(job)")
        if result.problems:
            ET.SubElement(job, "failure", message="; ".join(result.problems))
        for step in result.steps:
            case = ET.SubElement(suite, "testcase", classname=result.bundle.name, name=step.step_id)
            detail = "; ".join(step.problems)
            if step.verdict == Verdict.regression:
                ET.SubElement(case, "failure", message=detail).text = detail
            elif step.verdict == Verdict.drift:
                ET.SubElement(case, "system-out").text = f"drift: {detail}"
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
    return path


def update(result: ReplayResult, runtime: Runtime) -> Path:
    """`--update`: the new run becomes the golden recording, under the golden's job id and
    with its secret references."""
    loaded = runtime.scripts.load(result.report.script, result.report.script_version)
    fresh = from_report(result.report, loaded)
    if fresh.inputs.keys() != result.recording.inputs.keys():
        raise RecordingInvalid(f"{result.bundle}: the new run's inputs differ from the recording")
    golden = fresh.model_copy(
        update={"job_id": result.recording.job_id, "inputs": result.recording.inputs}
    )
    root = _local_root(runtime)
    if result.from_har and result.recording.har is not None and fresh.har is not None:
        # The run was served from the golden's HAR: what it recorded is a copy of those
        # answers, made worse (a redirect it followed shows as an aborted request, one it
        # had no answer for as a failure). The site's own traffic stays the golden's.
        shutil.copyfile(result.bundle / result.recording.har, root / fresh.har)
    return export(golden, runtime.artifacts, result.bundle)


async def replay_all(
    bundles: list[Path],
    runtime: Runtime,
    *,
    site_url: str | None,
    out_dir: Path,
    script_version: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    update_golden: bool = False,
    from_har: bool = False,
) -> list[ReplayResult]:
    """Replay each bundle in turn (one browser, a fresh context each) and write the reports.

    Everything that would stop the replay part-way — a bundle that cannot be read, a script
    it names that is not here, a site that is not there — is found before the first runs."""
    if from_har and site_url is not None:
        # A HAR replay serves each site at the origin it was recorded on: nothing would be
        # sent to `site_url`, and a user who gave it would believe the site was checked.
        raise RecordingInvalid(
            "--from-har and --site-url conflict: a HAR replay serves each recording's site "
            "from its network.har, at the address it was recorded on; give one of them"
        )
    # Its screenshots and HAR are found beside its recording.json, and `--update` rewrites
    # the folder: a bundle named by that file (`recordings/*/recording.json`) is its folder.
    bundles = [bundle_of(bundle) for bundle in bundles]
    recordings = [_checked(bundle, runtime, script_version, from_har) for bundle in bundles]
    if not from_har and site_url is not None:
        await reachable(site_url)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    fixture = None if from_har or site_url is None else await fixture_site(site_url)
    results = []
    # One images folder per bundle: two bundles of the same recorded job (a copy made to try
    # a variant) wrote over each other's images, and the report showed the wrong ones.
    folders: list[str] = []
    for recording in recordings:
        name, base, n = _slug(recording.job_id), _slug(recording.job_id), 1
        while name in folders:
            n += 1
            name = f"{base}-{n}"
        folders.append(name)
    for bundle, recording, folder in zip(bundles, recordings, folders, strict=True):
        if fixture is not None:
            await restore(fixture)
        result = await replay(
            bundle,
            recording,
            runtime,
            site_url=site_url,
            out_dir=out_dir,
            script_version=script_version,
            threshold=threshold,
            from_har=from_har,
            images=folder,
        )
        results.append(result)
    write_html(results, out_dir, threshold)
    write_junit(results, out_dir / "junit.xml")
    if update_golden:
        for result in results:
            update(result, runtime)
    return results


def _checked(bundle: Path, runtime: Runtime, version: int | None, from_har: bool) -> Recording:
    """The bundle's recording, once what its replay needs is here: its script, and its
    secrets — or, from a HAR, the HAR and the script version it was recorded with. Errors
    name the bundle: in a replay of many, nothing else says which one is broken."""
    recording = load(bundle)
    if from_har:
        if recording.har is None or recording.site_origin is None:
            raise RecordingInvalid(f"{bundle}: recorded without a HAR (run the job with har: true)")
        HarReplay.load(bundle / recording.har)  # its errors name the file
    try:
        runtime.scripts.load(recording.script, replayed_version(recording, runtime, version))
        if from_har:
            runtime.scripts.load(recording.script, recording.script_version)  # as `offline`
        else:
            job_for(recording, runtime, None, version)  # resolves its secret inputs
    except FormworkError as exc:
        raise RecordingInvalid(f"{bundle}: {exc.message}", code=exc.code) from exc
    return recording


async def reachable(site_url: str) -> None:
    """Fail unless something accepts a connection where `site_url` points: otherwise every
    step of every recording fails on its first page, each reported as a regression.

    A TCP connection only, no request: a real portal gets none it did not ask for."""
    parts = urlsplit(site_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobInvalid(f"site URL {site_url!r} is not an http(s) URL", field="site_url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port out of range, or not a number
        raise JobInvalid(f"site URL {site_url!r}: {exc}", field="site_url") from exc
    try:
        async with asyncio.timeout(FIXTURE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(parts.hostname, port)
    except (OSError, TimeoutError) as exc:
        raise FormworkError(
            f"nothing answers at {site_url} ({_why(exc)})", code=FailureCode.network_error
        ) from exc
    writer.close()
    with contextlib.suppress(OSError):  # it answered; how it hangs up does not matter
        await writer.wait_closed()


def _why(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return f"no connection within {FIXTURE_TIMEOUT_S:.0f}s"
    # asyncio words a refused connection "Connect call failed ('127.0.0.1', 9)"; a lookup
    # that failed has a negative errno and its own words.
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return exc.strerror or str(exc)
