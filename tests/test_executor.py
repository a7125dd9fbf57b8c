"""Running scripts in real Chromium against the real billing fixture site."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat
from playwright.async_api import BrowserContext, Page
from playwright.async_api import Error as PlaywrightError
from pydantic import TypeAdapter, ValidationError

from worker.actions import PageActions, _cut_short
from worker.artifacts import LocalArtifacts
from worker.contract import (
    BrowserJob,
    FailureCode,
    JobReport,
    JobStatus,
    MatchedSelector,
    StepReport,
    StepStatus,
)
from worker.errors import BrowserLost
from worker.evidence import echo_mask_script
from worker.executor import NullListener, ResumePoint, Runtime, fail_internally, run_job
from worker.script import InputSpec, InputType, PlannedStep, ScriptStore
from worker.secretstore import SecretStore

from .conftest import CREDIT_INPUTS, SCRIPTS, SECRETS_FILE, SELECTORS, Site, credit_as_script


def credit_job(site: Site, job_id: str = "job-1", **inputs: str) -> BrowserJob:
    return BrowserJob(
        job_id=job_id,
        script="billing/issue_credit",
        inputs={**CREDIT_INPUTS, **inputs},
        site_url=site.url,
    )


async def test_a_page_that_dies_before_the_first_step_is_handed_over(
    billing: Site, runtime: Runtime
) -> None:
    # The renderer died while the job's context was being set up (its init scripts, its
    # trace): the PlaywrightError escaped as a bug of the worker's, and a queued job ended
    # failed where one whose page died in a step goes on in a fresh run.
    async def crash(context: BrowserContext) -> None:
        with contextlib.suppress(PlaywrightError):  # the navigation dies with the renderer
            await context.pages[0].goto("chrome://crash")

    crashing = dataclasses.replace(runtime, context_setup=crash)
    with pytest.raises(BrowserLost):
        await run_job(credit_job(billing), crashing, hand_over_crashes=True)
    assert billing.state()["requests"] == 0


async def test_issue_credit_succeeds_with_exactly_one_credit(
    billing: Site, runtime: Runtime
) -> None:
    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.succeeded, report.error
    assert [s.status for s in report.steps] == [StepStatus.succeeded] * len(report.steps)
    credits = billing.credits()
    assert len(credits) == 1
    assert credits[0]["reference"] == "T-88812"
    assert credits[0]["amount"] == "15.00"
    assert credits[0]["account_id"] == "AC-10231"
    assert report.outputs == {"confirmation_number": credits[0]["confirmation"]}
    # Every step has its own screenshot, a real image on disk.
    root = runtime.artifacts.root
    shots = [s.screenshot for s in report.steps]
    assert all(shots) and len(set(shots)) == len(shots)
    for shot in shots:
        assert shot is not None
        with Image.open(root / shot) as image:
            assert image.size == (1280, 800)
    # The selector that matched is recorded, and the primary candidate was used.
    amount = next(s for s in report.steps if s.id == "amount")
    assert amount.selector is not None
    assert (amount.selector.element, amount.selector.index) == ("credit.amount", 0)
    assert amount.url is not None and amount.url.endswith("/accounts/AC-10231/credits/new")
    # The report on disk is the report returned.
    assert report.artifacts is not None
    on_disk = JobReport.model_validate_json((root / report.artifacts.report).read_text())
    assert on_disk == report
    assert report.inputs["amount"] == "15.00"


def _masked_crop(image_path: Path, box: dict[str, float]) -> Image.Image:
    with Image.open(image_path) as image:
        return image.convert("RGB").crop(
            (
                int(box["x"]) + 2,
                int(box["y"]) + 2,
                int(box["x"] + box["width"]) - 2,
                int(box["y"] + box["height"]) - 2,
            )
        )


async def test_secrets_never_reach_report_logs_or_pixels(
    billing: Site,
    runtime: Runtime,
    fixture_secrets: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    report = await run_job(credit_job(billing), runtime)
    assert report.status == JobStatus.succeeded

    password = fixture_secrets["billing_password"]
    username = fixture_secrets["billing_username"]
    everything = report.model_dump_json() + caplog.text
    assert password not in everything and username not in everything
    for file in runtime.artifacts.root.rglob("*"):
        if file.is_file():
            assert password.encode() not in file.read_bytes()

    # Pixels: render the same filled login form unmasked, and compare the field regions.
    step = next(s for s in report.steps if s.id == "login.password")
    assert step.screenshot is not None
    worker_image = runtime.artifacts.root / step.screenshot
    assert runtime.browser.browser is not None
    context = await runtime.browser.browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = await context.new_page()
        await page.goto(billing.url + "/login")
        await page.fill("#username", username)
        await page.fill("#password", password)
        unmasked_path = runtime.artifacts.root / "unmasked.png"
        await page.screenshot(path=unmasked_path)
        boxes = {f: await page.locator(f).bounding_box() for f in ("#username", "#password")}
    finally:
        await context.close()
    for field, box in boxes.items():
        assert box is not None
        masked = _masked_crop(worker_image, box)
        clear = _masked_crop(unmasked_path, box)
        # The unmasked field shows its value (varied pixels); the worker's is a flat mask.
        assert max(ImageStat.Stat(clear.convert("L")).stddev) > 10, field
        assert max(ImageStat.Stat(masked.convert("L")).stddev) < 4, field
        difference = ImageStat.Stat(ImageChops.difference(masked, clear).convert("L")).mean[0]
        assert difference > 40, field


async def test_invalid_inputs_are_rejected_before_any_browser_work(
    billing: Site, runtime: Runtime
) -> None:
    assert runtime.browser.browser is not None
    contexts_before = len(runtime.browser.browser.contexts)
    report = await run_job(credit_job(billing, amount="900", account_id="nope"), runtime)

    assert report.status == JobStatus.rejected
    assert report.error is not None
    assert report.error.code == FailureCode.input_invalid
    assert report.error.field == "inputs.account_id"
    assert "input 'amount'" in report.error.message
    assert report.steps == []
    assert len(runtime.browser.browser.contexts) == contexts_before
    assert billing.state()["requests"] == 0

    missing = await run_job(
        BrowserJob(job_id="j2", script="billing/issue_credit", inputs={}, site_url=billing.url),
        runtime,
    )
    assert missing.status == JobStatus.rejected
    assert missing.error is not None and "Field required" in missing.error.message
    assert billing.state()["requests"] == 0


async def test_missing_secret_is_rejected(billing: Site, runtime: Runtime) -> None:
    runtime.secrets = SecretStore(None, environ={})
    report = await run_job(credit_job(billing), runtime)
    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.code == FailureCode.secret_missing
    assert "billing_password" in report.error.message
    assert billing.state()["requests"] == 0


def broken_tree(tmp_path: Path, element: str, candidates: str) -> ScriptStore:
    """The real scripts and registry, with one element's candidates replaced and a short
    step timeout (so a missing element fails fast)."""
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    shutil.copytree(SELECTORS, tmp_path / "selectors")
    registry = tmp_path / "selectors" / "billing.yaml"
    text = registry.read_text()
    start = text.index(f"  {element}:")
    end = text.index("\n", start)
    registry.write_text(text[:start] + f"  {element}: {candidates}" + text[end:])
    script = tmp_path / "scripts" / "billing" / "issue_credit.yaml"
    fast = script.read_text().replace("site: billing\n", "site: billing\ntimeout_ms: 1500\n", 1)
    script.write_text(fast)
    return ScriptStore(tmp_path / "scripts", tmp_path / "selectors")


async def test_selector_matching_nothing_fails_that_step_and_skips_the_rest(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The "Review credit" button is gone, and the step has no alternate path.
    runtime.scripts = broken_tree(tmp_path, "credit.review", '[{css: "button#gone"}]')

    report = await run_job(credit_job(billing), runtime)

    # The default rule for a missing element with no alternate: a person looks at it.
    assert report.status == JobStatus.paused_for_handoff
    statuses = {s.id: s.status for s in report.steps}
    assert statuses["reference"] == StepStatus.succeeded
    assert statuses["review"] == StepStatus.failed
    later = report.steps[[s.id for s in report.steps].index("review") + 1 :]
    assert later and all(s.status == StepStatus.skipped for s in later)
    failed = next(s for s in report.steps if s.id == "review")
    assert failed.failure is not None
    assert failed.failure.code == FailureCode.selector_not_found
    assert "credit.review" in failed.failure.message
    assert "css=button#gone" in failed.failure.message
    assert failed.screenshot is not None  # the failed state is evidence too
    assert report.error is not None and report.error.step_id == "review"
    assert [(r.step_id, r.action) for r in report.rules_fired] == [("review", "handoff")]
    assert billing.credits() == []


async def test_a_registry_typo_is_named_as_one_not_taken_for_a_changed_site(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # A candidate that is not valid CSS: a script error naming the registry and element,
    # not a site that changed (which would wait out the step and ask a person).
    runtime.scripts = broken_tree(tmp_path / "css", "account.header", '[{css: "h1#[[account"}]')
    report = await run_job(credit_job(billing, "job-css"), runtime)
    assert report.status == JobStatus.failed
    assert report.error is not None and report.error.code == FailureCode.script_error
    assert "selector registry billing.yaml, element 'account.header'" in report.error.message
    assert 'Unexpected token "#"' in report.error.message
    # A failure detector that is not valid CSS would never see the error it is there for:
    # the first click that reads the detectors stops, before anything is sent.
    store = broken_tree(tmp_path / "detector", "account.header", '[{css: "h1#account-header"}]')
    registry = store.selectors_dir / "billing.yaml"
    text = registry.read_text().replace('"p.error-text"]', '"p.error-text", "p[[[bad"]')
    registry.write_text(text)
    runtime.scripts = store
    report = await run_job(credit_job(billing, "job-detector"), runtime)
    assert report.error is not None and report.error.code == FailureCode.script_error
    assert "failure detector(s) ['p[[[bad'] are not valid CSS" in report.error.message
    assert report.error.step_id == "login.submit"
    assert billing.credits() == []


async def test_missing_link_takes_the_alternate_path(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    runtime.scripts = broken_tree(tmp_path, "account.issue_credit", '[{css: "a#gone"}]')

    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.succeeded, report.error
    open_form = next(s for s in report.steps if s.id == "open_form")
    assert open_form.status == StepStatus.failed
    assert open_form.recovered_by == "alternate:form_by_url"
    ids = [s.id for s in report.steps]
    assert ids[ids.index("open_form") + 1] == "open_form.form_by_url.open"
    assert [(r.step_id, r.action) for r in report.rules_fired] == [("open_form", "alternate")]
    assert len(billing.credits()) == 1


async def test_an_alternate_path_with_a_step_id_twice_is_refused_before_the_site_is_touched(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    """Its steps are reported as `open_form.form_by_url.<id>`: two of one id loaded, ran, and
    left two report entries of one name (a lookup by id found the first)."""
    runtime.scripts = broken_tree(tmp_path, "account.issue_credit", '[{css: "a#gone"}]')
    credit = runtime.scripts.scripts_dir / "billing" / "issue_credit.yaml"
    alternate = '    - {id: open, goto: "/accounts/{{ inputs.account_id }}/credits/new"'
    text = credit.read_text()
    assert alternate in text
    first = '    - {id: open, goto: "/accounts/{{ inputs.account_id }}"}\n'
    credit.write_text(text.replace(alternate, first + alternate))

    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.code == FailureCode.script_invalid
    assert report.error.message == (
        f"{credit}:40: alternates > form_by_url[1] (step 'open'): step id 'open' is used twice "
        "(first at [0])"
    )
    assert billing.state()["requests"] == 0


@pytest.mark.parametrize(
    ("step", "message"),
    [
        # Not rendered: it was looked for as written, and every job was handed to a person.
        (
            '{id: there, wait_for: {url: "/accounts/{{ inputs.account_id }}$"}}',
            "steps[2] (step 'there') > wait_for > url: '/accounts/{{ inputs.account_id }}$' is "
            "a regular expression searched in the page's URL, not a template",
        ),
        (
            '{id: there, expect: {url: "/accounts/{{ inputs.account_id }}$"}}',
            "steps[2] (step 'there') > expect > url: '/accounts/{{ inputs.account_id }}$' is a "
            "regular expression",
        ),
        # Checked first when the step ran, after the sign-in: an internal error, pydantic's.
        (
            '{id: there, wait_for: {url: "/accounts/(["}}',
            "steps[2] (step 'there') > wait_for > url: not a valid regular expression: "
            "unterminated character set at position 11",
        ),
    ],
)
async def test_a_url_pattern_that_can_never_match_is_refused_before_the_site_is_touched(
    billing: Site, runtime: Runtime, tmp_path: Path, step: str, message: str
) -> None:
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    shutil.copytree(SELECTORS, tmp_path / "selectors")
    credit = tmp_path / "scripts" / "billing" / "issue_credit.yaml"
    opened = "expect: {visible: account.header}}\n"
    credit.write_text(credit.read_text().replace(opened, f"{opened}  - {step}\n", 1))
    runtime.scripts = ScriptStore(tmp_path / "scripts", tmp_path / "selectors")

    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.code == FailureCode.script_invalid
    assert report.error.message.startswith(f"{credit}:17: {message}")
    assert billing.state()["requests"] == 0


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # Looked for as written: every job was handed to a person before its commit.
        (
            'contains: "{{ inputs.amount }}"',
            'matches: "^{{ inputs.amount }}$"',
            ":22: steps[7] (step 'confirm_amount') > expect > text > matches: "
            "'^{{ inputs.amount }}$' is a regular expression, not a template",
        ),
        # After the commit: the credit was issued, and the confirmation never read.
        (
            'pattern: "CN-[0-9]+"}\n\nalternates',
            'pattern: "{{ inputs.reference }}"}\n\nalternates',
            ":33: steps[9] (step 'confirmation') > extract > confirmation_number > pattern: "
            "'{{ inputs.reference }}' is a regular expression, not a template",
        ),
        (
            "    commit: true\n",
            "    commit: true\n"
            "    dialog: {action: accept, message: 'Issue {{ inputs.amount }}'}\n",
            ":28: steps[8] (step 'submit') > dialog > message: 'Issue {{ inputs.amount }}' is a "
            "regular expression, not a template",
        ),
    ],
)
async def test_a_template_in_a_text_pattern_is_refused_before_the_site_is_touched(
    billing: Site, runtime: Runtime, tmp_path: Path, old: str, new: str, message: str
) -> None:
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    shutil.copytree(SELECTORS, tmp_path / "selectors")
    credit = tmp_path / "scripts" / "billing" / "issue_credit.yaml"
    text = credit.read_text()
    assert old in text
    credit.write_text(text.replace(old, new, 1))
    runtime.scripts = ScriptStore(tmp_path / "scripts", tmp_path / "selectors")

    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.code == FailureCode.script_invalid
    assert report.error.message.startswith(f"{credit}{message}")
    assert billing.state()["requests"] == 0


async def test_an_alternate_on_a_step_that_finds_no_element_is_refused_before_the_site_is_touched(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    """`alternate:` is the rule for selector_not_found, which a goto never fails with: its
    postcondition missing the account header was expectation_failed, the path was not taken,
    and the job was handed to a person."""
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    shutil.copytree(SELECTORS, tmp_path / "selectors")
    credit = tmp_path / "scripts" / "billing" / "issue_credit.yaml"
    old = '{id: open_account, goto: "/accounts/{{ inputs.account_id }}", expect: {visible: '
    text = credit.read_text()
    assert old in text
    new = "{id: open_account, alternate: form_by_url, timeout_ms: 2000, goto: /, expect: {visible: "
    credit.write_text(text.replace(old, new, 1))
    runtime.scripts = ScriptStore(tmp_path / "scripts", tmp_path / "selectors")

    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.code == FailureCode.script_invalid
    assert report.error.message.startswith(
        f"{credit}:16: steps[1] (step 'open_account') > alternate: is taken when the element a "
        "step acts on is not found, and a goto step acts on none"
    )
    assert "`on_failure: {expectation_failed: {action: alternate, alternate: form_by_url}}`" in (
        report.error.message
    )
    assert billing.state()["requests"] == 0


async def test_a_sub_flow_takes_its_own_alternate_path(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    """A sub-flow's `alternates:` are its own: the rules it writes take them. They were
    dropped, and the job's script had to declare the same path for the sub-flow to load."""
    store = broken_tree(tmp_path, "account.issue_credit", '[{css: "a#gone"}]')
    folder = store.scripts_dir / "billing"
    (folder / "open_form.yaml").write_text(
        "name: billing/open_form\nversion: 1\nsite: billing\ntimeout_ms: 1500\n"
        "inputs:\n  account_id: {type: string}\nsteps:\n"
        "  - {id: go, click: account.issue_credit, expect: {visible: credit.form}, "
        "alternate: by_url}\n"
        "alternates:\n  by_url:\n"
        '    - {id: open, goto: "/accounts/{{ inputs.account_id }}/credits/new"}\n'
    )
    script = folder / "issue_credit.yaml"
    text = script.read_text()
    start = text.index("  - {id: open_form,")
    text = (
        text[:start]
        + "  - {id: open_form, use: billing/open_form, "
        + 'with: {account_id: "{{ inputs.account_id }}"}}'
        + text[text.index("\n", start) :]
    )
    start = text.index("alternates:")
    script.write_text(text[:start] + text[text.index("# Did the credit", start) :])
    runtime.scripts = store

    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.succeeded, report.error
    go = next(s for s in report.steps if s.id == "open_form.go")
    assert go.status == StepStatus.failed
    assert go.recovered_by == "alternate:by_url"
    ids = [s.id for s in report.steps]
    assert ids[ids.index("open_form.go") + 1] == "open_form.go.by_url.open"
    assert [(r.step_id, r.action) for r in report.rules_fired] == [("open_form.go", "alternate")]
    assert len(billing.credits()) == 1


async def test_site_validation_error_is_reported_with_the_page_text(
    billing: Site, runtime: Runtime
) -> None:
    billing.faults(
        reject_value=[{"field": "amount", "value": "15.00", "message": "Amount needs approval"}]
    )
    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.needs_customer_input
    review = next(s for s in report.steps if s.id == "review")
    assert review.failure is not None
    assert review.failure.code == FailureCode.validation_rejected
    assert (
        review.failure.evidence is not None and "Amount needs approval" in review.failure.evidence
    )
    assert billing.credits() == []


def test_artifact_paths_stay_inside_the_root(tmp_path: Path) -> None:
    artifacts = LocalArtifacts(tmp_path)
    path, rel = artifacts.step_image("../../etc", 1, "a/b", ".jpg")
    assert path.resolve().is_relative_to(tmp_path.resolve())
    assert ".." not in Path(rel).parts
    day, job = json.loads(artifacts.describe("x").model_dump_json())["path"].split("/")
    assert (len(day), job) == (len("2025-01-31"), "x")
    # Whatever id a refused payload carried, its folder is one name of its own, never `..`.
    for odd in ("..", ".", "", "L" * 300, "../" * 60):
        _, rel = artifacts.step_image(odd, 1, "a", ".jpg")
        assert ".." not in Path(rel).parts and Path(rel).parts[1] not in ("", ".")
        assert len(Path(rel).parts[1]) <= 128
    assert artifacts.describe("L" * 300).path != artifacts.describe("L" * 299).path


async def test_an_internal_error_fails_the_step_and_keeps_the_record(
    billing: Site, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug of the worker's, after the commit: the step fails like any other, and the report
    still holds every step before it and the credit's claim."""
    original = PageActions.extract

    async def broken(
        self: PageActions, planned: PlannedStep, *args: Any, **kwargs: Any
    ) -> MatchedSelector | None:
        if planned.id == "confirmation" and not kwargs.get("probe"):
            raise RuntimeError("a bug in extract")
        return await original(self, planned, *args, **kwargs)

    monkeypatch.setattr(PageActions, "extract", broken)
    report = await run_job(credit_job(billing, "job-bug"), runtime)

    assert report.status != JobStatus.succeeded
    status = {s.id: s.status for s in report.steps}
    assert status["submit"] == StepStatus.succeeded
    assert status["confirmation"] == StepStatus.failed
    failed = next(s for s in report.steps if s.id == "confirmation")
    assert failed.failure is not None and failed.failure.code == FailureCode.script_error
    assert "internal error (RuntimeError: a bug in extract)" in failed.failure.message
    assert len(billing.credits()) == 1  # sent once, and known to have been sent
    (claim,) = [c for c in report.claims if c.kind == "effect"]
    assert (claim.step_id, claim.verified) == ("submit", False)
    assert claim.value == "credit of 15.00 issued to AC-10231, confirmation (not read)"


def _flat(image: Image.Image) -> bool:
    return max(ImageStat.Stat(image.convert("L")).stddev) < 4


@contextlib.asynccontextmanager
async def echo_masked_page(runtime: Runtime, values: list[str]) -> AsyncIterator[Page]:
    """A page of its own with the echo mask for `values` installed before any script runs."""
    script = echo_mask_script(values)
    assert script is not None and not any(value in script for value in values)
    assert runtime.browser.browser is not None
    context = await runtime.browser.browser.new_context(viewport={"width": 800, "height": 400})
    try:
        await context.add_init_script(script)
        yield await context.new_page()
    finally:
        await context.close()


# What the page below shows: the plain paragraph and the one around a masked name stay as
# they are; every other element holds a secret, and is painted masked.
ELEMENTS = (
    "echo",
    "name",
    "later",
    "plain",
    "scripted",
    "notes",
    "split",
    "whole",
    "whole-name",
    "upper",
)


async def test_a_secret_the_page_itself_shows_is_masked_before_it_is_painted(
    runtime: Runtime, fixture_secrets: dict[str, str], tmp_path: Path
) -> None:
    password = fixture_secrets["billing_password"]
    username = fixture_secrets["billing_username"]
    async with echo_masked_page(runtime, [password, username]) as page:
        # Served, then added by the page's own script later, as an error banner would be.
        await page.set_content(
            f'<p id="echo" style="font: 20px sans-serif">Denied: password {password} refused</p>'
            f'<input id="name" value="{username}" style="font: 20px sans-serif" size="30">'
            '<p id="plain" style="font: 20px sans-serif">Nothing secret here at all</p>'
            '<input id="scripted" style="font: 20px sans-serif" size="30">'
            # Split across elements, one with a colour of its own that inheritance cannot hide.
            f'<p id="split" style="font: 20px sans-serif">Denied: {password[:3]}'
            f'<b style="color: #c00">{password[3:]}</b></p>'
            # Whole in one element: that element is masked, not the paragraph around it.
            f'<p id="whole" style="font: 20px sans-serif">Signed in as <span id="whole-name">'
            f"{username}</span>, welcome back to the console</p>"
            '<textarea id="notes" style="font: 20px sans-serif" cols="30" rows="1"></textarea>'
            # Shown in capitals by the site: it was painted as it is.
            f'<p id="upper" style="font: 20px sans-serif">Signed in as {username.upper()}</p>'
        )
        await page.evaluate(
            """([text, username, password]) => {
              const p = document.createElement("p");
              p.id = "later"; p.style.font = "20px sans-serif"; p.textContent = text;
              document.body.appendChild(p);
              // Set by the page's script, with no input event (a "remember me" filling in):
              // neither an attribute nor a node changes, so no observer hears of it.
              document.getElementById("scripted").value = username;
              document.getElementById("notes").value = `pw: ${password}`;
            }""",
            [f"Hello {username}, try again", username, password],
        )
        shot = tmp_path / "page.png"
        await page.screenshot(path=shot)
        boxes = {i: await page.locator(f"#{i}").bounding_box() for i in ELEMENTS}
    for element, box in boxes.items():
        assert box is not None
        crop = _masked_crop(shot, box)
        assert _flat(crop) == (element not in ("plain", "whole")), element


async def test_a_secret_the_page_shows_inside_a_shadow_root_is_masked_too(
    runtime: Runtime, fixture_secrets: dict[str, str], tmp_path: Path
) -> None:
    # Web components (a portal built on Lightning, Shoelace, ...) render in shadow roots,
    # which an observer of the document does not see into: an error banner there repeating
    # the password was painted, and captured, as it was.
    password = fixture_secrets["billing_password"]
    username = fixture_secrets["billing_username"]
    async with echo_masked_page(runtime, [password, username]) as page:
        await page.set_content(
            "<style>x-banner, x-field { display: block }</style>"
            '<x-banner id="open"></x-banner><x-banner id="closed"></x-banner>'
            '<x-field id="field"></x-field><div id="declared"><template shadowrootmode="open">'
            f'<p style="font: 20px sans-serif">Refused: {password}</p></template></div>'
            '<x-banner id="plain"></x-banner>'
        )
        await page.evaluate(
            """([password, username]) => {
              const banner = (id, mode, text) => {
                const root = document.getElementById(id).attachShadow({ mode });
                const p = document.createElement("p");
                p.style.font = "20px sans-serif";
                root.appendChild(p);
                p.textContent = text;  // filled in after it is shown, as a late error is
              };
              banner("open", "open", `Password ${password} refused`);
              banner("closed", "closed", `Unknown user ${username}`);
              banner("plain", "open", "Nothing secret here at all");
              const root = document.getElementById("field").attachShadow({ mode: "open" });
              root.innerHTML = '<input style="font: 20px sans-serif" size="30">';
              root.querySelector("input").setAttribute("value", username);
            }""",
            [password, username],
        )
        shot = tmp_path / "page.png"
        await page.screenshot(path=shot)
        boxes = {
            i: await page.locator(f"#{i}").bounding_box()
            for i in ("open", "closed", "declared", "plain")
        }
        boxes["field"] = await page.locator("#field input").bounding_box()  # CSS pierces
        # The parser made the declarative one a shadow root (not an inert template).
        assert await page.evaluate("document.getElementById('declared').shadowRoot !== null")
    for element, box in boxes.items():
        assert box is not None and box["height"] > 0, element
        crop = _masked_crop(shot, box)
        assert _flat(crop) == (element != "plain"), element


async def test_a_secret_the_page_shows_in_another_form_is_masked_too(
    runtime: Runtime, tmp_path: Path
) -> None:
    # Typed composed, a value may be stored and shown decomposed (`e` + U+0301), or shown
    # percent-encoded in an address the page prints: the same characters to a reader.
    secret = "Zürich-café-7741"
    decomposed = unicodedata.normalize("NFD", secret)
    assert decomposed != secret
    async with echo_masked_page(runtime, [secret]) as page:
        await page.set_content(
            f'<p id="decomposed" style="font: 20px sans-serif">Hello {decomposed}</p>'
            f'<p id="encoded" style="font: 20px sans-serif">/u/{urllib.parse.quote(secret)}</p>'
            '<p id="plain" style="font: 20px sans-serif">Nothing secret here at all</p>'
        )
        shot = tmp_path / "page.png"
        await page.screenshot(path=shot)
        ids = ("decomposed", "encoded", "plain")
        boxes = {i: await page.locator(f"#{i}").bounding_box() for i in ids}
    for element, box in boxes.items():
        assert box is not None
        assert _flat(_masked_crop(shot, box)) == (element != "plain"), element


async def test_a_secret_split_across_elements_in_a_long_text_is_masked_too(
    runtime: Runtime, fixture_secrets: dict[str, str], tmp_path: Path
) -> None:
    # A long ticket thread, one element of many thousand characters, where the site's search
    # highlights part of the password it repeats: the element is too long to read whole for
    # every node in it, and the value was painted, and captured, as it was.
    password = fixture_secrets["billing_password"]
    filler = "Thanks for your patience while we look into this. " * 100  # 5,100 characters
    box = "font: 20px sans-serif; height: 30px; overflow: hidden"
    async with echo_masked_page(runtime, [password]) as page:
        await page.set_content(
            f'<div id="thread"><p id="served" style="{box}">Denied: {password[:3]}'
            f'<mark style="color: #c00">{password[3:]}</mark> {filler}</p>'
            f'<p id="plain" style="{box}">Nothing secret here. {filler}</p></div>'
        )
        # Added by the page's script later, its value across two nodes of a long element
        # that already holds a masked one.
        await page.evaluate(
            """([head, tail, filler]) => {
              const p = document.createElement("p");
              p.id = "later";
              p.style.cssText = "font: 20px sans-serif; height: 30px; overflow: hidden";
              p.append(`Again: ${head}`);
              const b = document.createElement("b");
              b.style.color = "#00c";
              b.textContent = tail;
              p.append(b, ` ${filler}`);
              document.getElementById("thread").appendChild(p);
            }""",
            [password[:5], password[5:], filler],
        )
        shot = tmp_path / "page.png"
        await page.screenshot(path=shot)
        long_enough = await page.evaluate(
            "['served', 'later'].every((id) => document.getElementById(id).textContent.length"
            " > 4096)"
        )
        ids = ("served", "plain", "later")
        boxes = {i: await page.locator(f"#{i}").bounding_box() for i in ids}
    assert long_enough
    for element, found in boxes.items():
        assert found is not None
        assert _flat(_masked_crop(shot, found)) == (element != "plain"), element


async def test_refused_credentials_hand_off_at_once_with_the_sign_in_masked(
    billing: Site, runtime: Runtime, fixture_secrets: dict[str, str]
) -> None:
    wrong = SecretStore(SECRETS_FILE, environ={"FORMWORK_SECRET_BILLING_PASSWORD": "not-the-pw-93"})
    runtime = dataclasses.replace(runtime, secrets=wrong)
    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.paused_for_handoff
    assert report.error is not None
    assert report.error.code == FailureCode.credentials_rejected
    assert report.error.step_id == "login.submit"
    assert report.error.evidence == "Invalid username or password."
    assert not [r for r in report.rules_fired if r.action == "relogin"]
    assert billing.state()["failed_logins"] == 1  # sent once: no second try to lock it out
    assert report.handoff is not None and "refused the worker's sign-in" in report.handoff.summary

    # The site filled the sign-in name back into its form: the evidence shows it masked.
    step = next(s for s in report.steps if s.id == "login.submit")
    assert step.screenshot is not None
    assert runtime.browser.browser is not None
    context = await runtime.browser.browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = await context.new_page()
        await page.goto(billing.url + "/login")
        await page.fill("#username", fixture_secrets["billing_username"])
        await page.fill("#password", "not-the-pw-93")
        await page.click("button[type=submit]")
        await page.wait_for_selector(".alert-danger")
        assert await page.input_value("#username") == fixture_secrets["billing_username"]
        box = await page.locator("#username").bounding_box()
    finally:
        await context.close()
    assert box is not None
    assert _flat(_masked_crop(runtime.artifacts.root / step.screenshot, box))


async def test_a_job_taken_up_where_a_secret_is_missing_waits_with_its_report_intact(
    billing: Site, runtime: Runtime
) -> None:
    # A job under way (here: paused by the site's refusal) is handed to a worker that lacks
    # the site's password. Refused like a new job, its report would be replaced by an empty
    # one; it waits for a person instead, with every step it did still on record.
    rule = {"field": "amount", "value": "15.00", "message": "Credits over 10.00 need approval"}
    billing.faults(reject_value=[rule])
    paused = await run_job(credit_job(billing, "job-held"), runtime)
    assert paused.status == JobStatus.needs_customer_input
    done = [s.id for s in paused.steps if s.status == StepStatus.succeeded]
    assert "reference" in done
    billing.faults(reject_value=[])

    bare = dataclasses.replace(runtime, secrets=SecretStore(None, environ={}))
    point = ResumePoint(report=paused, step_id="review")
    held = await run_job(credit_job(billing, "job-held"), bare, resume=point)
    assert held.status == JobStatus.paused_for_handoff
    assert held.error is not None and held.error.code == FailureCode.secret_missing
    assert held.error.step_id == "review"
    assert [s.id for s in held.steps if s.status == StepStatus.succeeded] == done
    assert held.handoff is not None and "retry_step" in held.handoff.allowed_decisions
    assert "could not take the job up again" in held.handoff.summary
    assert "billing_password" in held.handoff.summary
    assert billing.credits() == []

    # The worker put right, the job goes on at that step: one credit.
    point = ResumePoint(report=held, step_id="review")
    final = await run_job(credit_job(billing, "job-held"), runtime, resume=point)
    assert final.status == JobStatus.succeeded, final.error
    assert len(billing.credits()) == 1


async def test_a_script_signing_in_with_its_own_steps_needs_no_service_account(
    billing: Site, runtime: Runtime, tmp_path: Path, fixture_secrets: dict[str, str]
) -> None:
    # billing/credit_as signs in with the agent's own name and password (secret inputs). The
    # site's login flow, which needs the worker's service account, is only for signing in
    # again; a worker without that account runs the script, and never types missing secrets.
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    credit_as_script(scripts)
    empty = tmp_path / "secrets.yaml"
    empty.write_text("{}\n")
    runtime = dataclasses.replace(
        runtime,
        scripts=ScriptStore(scripts, SELECTORS),
        secrets=SecretStore(empty, environ={}),
    )
    user, password = fixture_secrets["billing_username"], fixture_secrets["billing_password"]

    def job(job_id: str, pw: str) -> BrowserJob:
        inputs = {**CREDIT_INPUTS, "agent_user": user, "agent_pw": pw}
        return BrowserJob(
            job_id=job_id, script="billing/credit_as", inputs=inputs, site_url=billing.url
        )

    # A wrong password of the agent's own: refused credentials, handed off at once, sent once
    # (it used to be taken for an expired session, and the login flow was run without secrets).
    refused = await run_job(job("own-wrong", "not-the-pw-93"), runtime)
    assert refused.status == JobStatus.paused_for_handoff
    assert refused.error is not None and refused.error.code == FailureCode.credentials_rejected
    assert refused.error.step_id == "sign_in"
    assert not [r for r in refused.rules_fired if r.action == "relogin"]
    assert billing.state()["failed_logins"] == 1

    done = await run_job(job("own-right", password), runtime)
    assert done.status == JobStatus.succeeded, done.error
    assert len(billing.credits()) == 1


async def test_a_takeover_right_after_a_confirmed_commit_reads_the_effect_back(
    billing: Site, runtime: Runtime
) -> None:
    # The run that sent the credit died the moment the site confirmed it, before the next
    # step read the confirmation number off the response page. That page has no address to
    # open again; the next run reads the credit back through the probe, sends nothing again.
    done = await run_job(credit_job(billing, "job-taken"), runtime)
    assert done.status == JobStatus.succeeded and len(billing.credits()) == 1
    died = done.model_copy(deep=True)  # as the last checkpoint had it: submit done, no more
    died.status, died.outputs = JobStatus.running, {}
    died.claims = [c for c in died.claims if c.kind != "output"]
    confirmation = next(s for s in died.steps if s.id == "confirmation")
    confirmation.status, confirmation.url_before = StepStatus.pending, None
    confirmation.attempts, confirmation.attempt_log, confirmation.screenshot = 0, [], None

    first = {int(Path(a.screenshot).name.split("-", 1)[0]) for s in died.steps
             for a in s.attempt_log if a.screenshot}  # fmt: skip
    point = ResumePoint(report=died, step_id="confirmation")
    report = await run_job(credit_job(billing, "job-taken"), runtime, resume=point)
    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1  # nothing sent again
    assert report.outputs["confirmation_number"] == billing.credits()[0]["confirmation"]
    steps = {s.id: s for s in report.steps}
    assert steps["confirmation"].status == StepStatus.skipped
    assert steps["confirmation"].recovered_by == "verify_effect"
    assert [r.action for r in report.rules_fired if r.step_id == "submit"] == ["verify_effect"]
    claim = next(c for c in report.claims if c.name == "confirmation_number")
    assert claim.verified and claim.how == "probe"

    # The second run's captures are numbered after the first run's: none written over.
    def numbers(of: JobReport) -> set[int]:
        shots = [a.screenshot for s in of.steps for a in s.attempt_log if a.screenshot]
        return {int(Path(shot).name.split("-", 1)[0]) for shot in shots}

    later = numbers(report) - first
    assert later and min(later) > max(first)


async def test_a_failure_after_a_confirmed_commit_says_the_effect_exists(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The credit is made and confirmed, then reading its number fails and the job ends failed.
    # Read alone, "failed" says nothing about the credit: an orchestrator would run it again.
    runtime.scripts = broken_tree(tmp_path, "credit.confirmation_number", '[{css: "#gone"}]')
    script = tmp_path / "scripts" / "billing" / "issue_credit.yaml"
    text = script.read_text()
    assert "  - id: confirmation\n    extract:" in text
    script.write_text(
        text.replace(
            "  - id: confirmation\n    extract:",
            "  - id: confirmation\n    on_failure: {selector_not_found: fail}\n    extract:",
        )
    )

    report = await run_job(credit_job(billing), runtime)

    assert report.status == JobStatus.failed
    assert report.error is not None and report.error.code == FailureCode.selector_not_found
    assert report.error.message.endswith(
        "(after submit was confirmed by the site: its effect exists, and running the job "
        "again would repeat it)"
    )
    [confirmation] = [s for s in report.steps if s.id == "confirmation"]
    assert confirmation.failure is not None and "effect exists" not in confirmation.failure.message
    assert len(billing.credits()) == 1


async def test_the_job_timeout_after_a_confirmed_commit_says_the_effect_exists(
    billing: Site, runtime: Runtime
) -> None:
    # The worker ends the job itself (its timeout) while it reads the confirmation.
    job = credit_job(billing)
    last = JobReport(
        job_id=job.job_id,
        status=JobStatus.running,
        script=job.script,
        steps=[
            StepReport(id="submit", action="click", status=StepStatus.succeeded, commit=True),
            StepReport(id="confirmation", action="extract", status=StepStatus.running),
        ],
    )
    report = await fail_internally(
        job,
        TimeoutError("over the job timeout of 20s"),
        runtime,
        NullListener(),
        code=FailureCode.timeout,
        last=last,
        sent={"submit"},
    )
    assert report.status == JobStatus.failed
    assert report.error is not None and report.error.message == (
        "over the job timeout of 20s (after submit was confirmed by the site: its effect "
        "exists, and running the job again would repeat it)"
    )


async def test_trailing_zeros_past_places_are_typed_as_the_site_takes_them(
    billing: Site, runtime: Runtime
) -> None:
    # `places: 2` counts the digits that matter, so intake took "15.000"; it was typed as
    # written, the site refused three decimals, and the job asked the customer about a value
    # that was right.
    report = await run_job(credit_job(billing, amount="15.000"), runtime)

    assert report.status == JobStatus.succeeded, report.error
    assert [c["amount"] for c in billing.credits()] == ["15.00"]
    amount = next(s for s in report.steps if s.id == "amount")
    assert amount.entered == "15.00"


async def test_a_control_character_in_an_input_is_refused_before_the_browser(
    billing: Site, runtime: Runtime
) -> None:
    # A NUL in the reason reached the site as U+FFFD and the job said it succeeded; an escape
    # sequence was stored as sent, for the site to show its own staff.
    for reason, shown in (("abc\x00def", "U+0000 at position 3"), ("ok \x1b[2J", "U+001B")):
        report = await run_job(credit_job(billing, reason=reason), runtime)

        assert report.status == JobStatus.rejected
        assert report.error is not None and report.error.code == FailureCode.input_invalid
        assert report.error.field == "inputs.reason"
        assert f"input 'reason': holds a control character ({shown}" in report.error.message
    assert billing.state()["requests"] == 0 and billing.credits() == []
    # Tabs and line breaks are text.
    report = await run_job(credit_job(billing, reason="first\tsecond"), runtime)
    assert report.status == JobStatus.succeeded, report.error
    assert [c["reason"] for c in billing.credits()] == ["first\tsecond"]


@pytest.mark.parametrize(
    ("written", "named"),
    [
        ("\u0661\u0665", "'\u0661' (U+0661 ARABIC-INDIC DIGIT ONE) at position 0"),
        ("\uff11\uff15.00", "'\uff11' (U+FF11 FULLWIDTH DIGIT ONE) at position 0"),
        ("1\u0665", "'\u0665' (U+0665 ARABIC-INDIC DIGIT FIVE) at position 1"),
    ],
)
async def test_a_number_in_other_digits_is_refused_not_read_as_ascii(
    billing: Site, runtime: Runtime, written: str, named: str
) -> None:
    # Python's Decimal reads Arabic-Indic (U+0661 U+0665) and fullwidth digits as 15: the
    # job ran and typed "15" into the form, a text its sender never wrote.
    report = await run_job(credit_job(billing, amount=written), runtime)

    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.field == "inputs.amount"
    assert report.error.message == (
        "inputs rejected by billing/issue_credit@1: input 'amount': a number is written in "
        f"ASCII digits (0-9): {named} is not one (got {written!r})"
    )
    assert billing.state()["requests"] == 0 and billing.credits() == []
    count = TypeAdapter(InputSpec(type=InputType.int).annotation())
    with pytest.raises(ValidationError, match=r"ASCII digits \(0-9\): '\uff11'"):
        count.validate_python("\uff11\uff15")
    assert count.validate_python(" 15 ") == 15


async def test_a_number_written_with_an_underscore_is_refused_not_read_as_digits(
    billing: Site, runtime: Runtime
) -> None:
    # Python's Decimal reads "1_5" as 15: a typo in a person's corrected inputs issued a
    # credit of 15.
    report = await run_job(credit_job(billing, amount="1_5"), runtime)

    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.field == "inputs.amount"
    assert report.error.message == (
        "inputs rejected by billing/issue_credit@1: input 'amount': a number is written in "
        "plain digits, without '_' (got '1_5')"
    )
    assert billing.state()["requests"] == 0 and billing.credits() == []
    count = TypeAdapter(InputSpec(type=InputType.int).annotation())
    with pytest.raises(ValidationError, match="without '_'"):
        count.validate_python("1_000")
    assert count.validate_python("1000") == 1000


def test_a_field_that_reformats_its_value_is_not_a_cut() -> None:
    # Only a field that kept the start of the value was cut short; one whose own script
    # formats what it is given (an amount shown as money, a name upper-cased) is left to the
    # step's postconditions, or every such field would fail its fill.
    assert _cut_short("T-" + "9" * 48, "T-" + "9" * 38)
    assert _cut_short("hello", "")
    assert not _cut_short("15", "$15.00")
    assert not _cut_short("smith", "SMITH")
    assert not _cut_short(" two\r\nlines ", "two lines")
    assert not _cut_short("two\nlines", "two\nlines")


async def test_a_fill_the_field_cuts_short_is_refused_before_the_commit(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The script takes references of 60 characters, the site's field only 40 (`maxlength`):
    # Playwright typed what fit, the site kept a cut reference, and the job said it
    # succeeded, its report claiming the whole value was entered.
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    source = (scripts / "billing" / "issue_credit.yaml").read_text()
    (scripts / "billing" / "issue_credit.yaml").write_text(source.replace("{1,40}", "{1,60}"))
    store = ScriptStore(scripts, SELECTORS)
    reference = "T-" + "9" * 48

    report = await run_job(
        credit_job(billing, reference=reference), dataclasses.replace(runtime, scripts=store)
    )

    assert report.status == JobStatus.needs_customer_input
    assert report.error is not None and report.error.step_id == "reference"
    assert report.error.code == FailureCode.validation_rejected
    assert report.error.message == (
        "fill of credit.reference: the field kept 40 of the value's 50 characters (its "
        "maxlength is 40): the site would get another value than the one given"
    )
    assert report.error.evidence == "credit.reference takes at most 40 characters"
    assert billing.credits() == []
    # Line breaks and trimmed ends are how browsers keep text, not a cut.
    report = await run_job(credit_job(billing, reason=" two\r\nlines "), runtime)
    assert report.status == JobStatus.succeeded, report.error
    assert [c["reason"] for c in billing.credits()] == ["two lines"]


# Signs in with an agent's own name and password (secret inputs), then reads the sign-in
# name back from the form the site shows again after refusing the password.
READ_BACK_SCRIPT = """\
name: billing/read_back
version: 1
site: billing
inputs:
  agent_user: {type: string, secret: true}
  agent_pw: {type: string, secret: true}
steps:
  - {id: open, goto: /login, expect: {visible: login.form}}
  - {id: user, fill: {target: login.username, value: "{{ inputs.agent_user }}"}}
  - {id: pw, fill: {target: login.password, value: "{{ inputs.agent_pw }}"}}
  - {id: sign_in, click: login.submit, expect: {visible: login.form}}
  - id: read_back
    extract:
      shown: {target: login.username, attribute: value}
      named: {target: login.username, attribute: value, pattern: "[a-z]+-bot"}
"""


def _read_back_runtime(runtime: Runtime, tmp_path: Path) -> Runtime:
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    (scripts / "billing" / "read_back.yaml").write_text(READ_BACK_SCRIPT)
    empty = tmp_path / "secrets.yaml"
    empty.write_text("{}\n")
    return dataclasses.replace(
        runtime, scripts=ScriptStore(scripts, SELECTORS), secrets=SecretStore(empty, environ={})
    )


async def test_an_output_the_page_reads_back_as_a_secret_is_redacted(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The output and its claim carried the agent's sign-in name in the clear (report.json,
    # audit.json, events): text read from the page was redacted in failures, never in outputs.
    runtime = _read_back_runtime(runtime, tmp_path)
    user = "agent-smith-bot"
    inputs = {"agent_user": user, "agent_pw": "not-the-pw-93"}
    job = BrowserJob(
        job_id="read-back", script="billing/read_back", inputs=inputs, site_url=billing.url
    )
    report = await run_job(job, runtime)

    assert billing.state()["failed_logins"] == 1  # the site did show the name again
    assert report.outputs.get("shown") == "***"
    assert [c.value for c in report.claims if c.name == "shown"] == ["***"]
    # A pattern sees the redacted text too: it cannot carve the secret out as an output.
    assert "named" not in report.outputs
    assert report.error is not None and user not in report.error.model_dump_json()
    assert user not in report.model_dump_json()
    for file in runtime.artifacts.root.rglob("*"):
        if file.is_file():
            assert user.encode() not in file.read_bytes(), file


async def test_a_url_the_site_redirects_to_with_a_typed_secret_is_redacted(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # A refused sign-in redirected to `/login?failed=1&username=<name typed>`: the step's URL
    # (and the next attempt's url_before) kept the sign-in name, form-encoded, in the report,
    # its events and audit.json.
    user, password = "agent smith@billing", "not-the-pw-93"
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f"billing_username: {user}\nbilling_password: {password}\n")
    runtime = dataclasses.replace(runtime, secrets=SecretStore(secrets, environ={}))
    billing.faults(signin_refused_redirect=True)
    report = await run_job(credit_job(billing), runtime)

    assert billing.state()["failed_logins"] == 1
    assert report.error is not None and report.error.code == FailureCode.credentials_rejected
    submit = next(s for s in report.steps if s.id == "login.submit")
    assert submit.url is not None and submit.url.endswith("/login?failed=1&username=***")
    forms = [user, urllib.parse.quote(user), urllib.parse.quote_plus(user)]
    assert not [f for f in forms if f in report.model_dump_json()]
    for file in runtime.artifacts.root.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert not [f for f in forms if f.encode() in data], file


async def test_a_secret_input_sent_again_in_a_field_shown_in_the_clear_is_refused(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # Only the input declared secret was masked: the same password sent as the reference
    # (or in the correlation) was typed into the credit form and kept in the report's inputs,
    # `entered`, events and audit.json, as the orchestrator's own ids are.
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    credit_as_script(scripts)
    runtime = dataclasses.replace(runtime, scripts=ScriptStore(scripts, SELECTORS))
    password = "Pw-9931-zz"
    own = {**CREDIT_INPUTS, "agent_user": "agent-smith", "agent_pw": password}

    def job(job_id: str, **fields: Any) -> BrowserJob:
        return BrowserJob(
            job_id=job_id, script="billing/credit_as", site_url=billing.url,
            **{"inputs": own, **fields},
        )  # fmt: skip

    as_reference = await run_job(job("again-1", inputs={**own, "reference": password}), runtime)
    in_correlation = await run_job(job("again-2", correlation={"note": f"pw {password}"}), runtime)

    for report, field in ((as_reference, "inputs.reference"), (in_correlation, "correlation.note")):
        assert report.status == JobStatus.rejected
        assert report.error is not None and report.error.code == FailureCode.job_invalid
        assert report.error.field == field
        assert password not in report.model_dump_json()
    assert billing.state()["requests"] == 0  # refused before any browser work


async def test_a_script_name_carrying_a_secret_is_refused_without_repeating_it(
    runtime: Runtime,
) -> None:
    # A token is often letters, digits and `_`, as a script name is: `billing/<token>` was
    # refused as an unknown script, the name (the token) kept in the report's `script`, its
    # error message, its events, audit.json and the metrics' `script` label.
    token = "tok_4417_abcd"
    runtime = dataclasses.replace(
        runtime, secrets=SecretStore(None, environ={"FORMWORK_SECRET_API_TOKEN": token})
    )
    job = BrowserJob(job_id="named-1", script=f"billing/{token}", inputs={})
    report = await run_job(job, runtime)

    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.code == FailureCode.job_invalid
    assert report.error.field == "script"
    assert token not in report.model_dump_json()
    for file in runtime.artifacts.root.rglob("*"):
        if file.is_file():
            assert token.encode() not in file.read_bytes(), file
