"""QA replay: golden recordings run again against the fixture site, compared step by step."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from worker.cli import main
from worker.contract import BrowserJob, FailureCode, JobStatus, StepStatus, TraceMode
from worker.errors import FormworkError, RecordingInvalid
from worker.executor import Runtime, run_job
from worker.har import SCRUBBED, Answer, HarReplay, Unanswered, placeholder, scrub
from worker.recording import export, from_report, load
from worker.replay import (
    ReplayResult,
    Verdict,
    _candidate_of,
    fixture_site,
    on_this_machine,
    replay_all,
    table,
    write_html,
)
from worker.script import ScriptStore
from worker.secretstore import SecretStore, base64_cores
from worker.selectors import load_registry

from .conftest import CREDIT_INPUTS, ROOT, SCRIPTS, SECRETS_FILE, SELECTORS, Site

GOLDEN = ROOT / "fixtures" / "recordings" / "billing-issue_credit"
GOLDENS = sorted(p.name for p in GOLDEN.parent.iterdir() if p.is_dir())
# A replay takes seconds; one stuck on a request nobody answers never ends. Fail it long
# before pytest's own timeout, with the replay named.
OFFLINE_LIMIT_S = 60


async def run(
    bundle: Path, runtime: Runtime, billing: Site, out: Path, threshold: float = 0.01
) -> ReplayResult:
    [result] = await replay_all(
        [bundle], runtime, site_url=billing.url, out_dir=out, threshold=threshold
    )
    return result


def problems(result: ReplayResult) -> dict[str, list[str]]:
    return {s.step_id: s.problems for s in result.steps if s.verdict != Verdict.same}


async def test_the_golden_recording_replays_clean(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    result = await run(GOLDEN, runtime, billing, tmp_path / "out")
    assert result.verdict == Verdict.same, problems(result)
    assert result.report.status == JobStatus.succeeded
    assert len(billing.credits()) == 1  # it really ran against the site
    # Compared visually, with the dynamic confirmation number and date masked.
    confirmation = next(s for s in result.steps if s.step_id == "confirmation")
    assert confirmation.pixel_ratio is not None and confirmation.pixel_ratio < 0.01
    junit = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert junit.find("testsuite").get("failures") == "0"  # type: ignore[union-attr]
    assert "billing-issue_credit" in (tmp_path / "out" / "index.html").read_text()


@pytest.mark.parametrize(
    ("bundle", "site"),
    [
        ("orders-refund_order", "orders"),
        ("helpdesk-reply_and_resolve", "helpdesk"),
        ("helpdesk-ticket_context", "helpdesk"),
    ],
)
async def test_the_golden_recordings_of_the_other_sites_replay_clean(
    bundle: str, site: str, runtime: Runtime, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fixture: Site = request.getfixturevalue(site)
    result = await run(GOLDEN.parent / bundle, runtime, fixture, tmp_path / "out")
    assert result.verdict == Verdict.same, (problems(result), result.problems)
    assert result.report.status == JobStatus.succeeded


async def test_a_markup_change_is_drift_and_above_the_threshold_a_visual_regression(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    billing.faults(skin="v2")
    result = await run(GOLDEN, runtime, billing, tmp_path / "strict")
    assert result.verdict == Verdict.regression
    found = problems(result)
    assert any("found by a fallback: label=Credit amount" in p for p in found["amount"])
    assert any(p.startswith("visual change") for p in found["review"])
    review = next(s for s in result.steps if s.step_id == "review")
    assert review.diff_image and (tmp_path / "strict" / review.diff_image).is_file()
    html = (tmp_path / "strict" / "index.html").read_text()
    assert review.diff_image in html and "regression" in html
    junit = ET.parse(tmp_path / "strict" / "junit.xml").getroot()
    assert int(junit.find("testsuite").get("failures") or 0) > 0  # type: ignore[union-attr]

    # With the visual threshold above the redesign's change, only the drift remains.
    billing.reset()
    billing.faults(skin="v2")
    lenient = await run(GOLDEN, runtime, billing, tmp_path / "lenient", threshold=0.5)
    assert lenient.verdict == Verdict.drift, problems(lenient)


async def test_a_step_that_now_fails_is_a_regression(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The registry loses the fallback that carried the review button through the redesign.
    selectors = tmp_path / "selectors"
    shutil.copytree(SELECTORS, selectors)
    registry = selectors / "billing.yaml"
    registry.write_text(registry.read_text().replace(", {role: button, name: Continue}", ""))
    broken = replace(runtime, scripts=ScriptStore(SCRIPTS, selectors))
    billing.faults(skin="v2")
    result = await run(GOLDEN, broken, billing, tmp_path / "out", threshold=0.5)
    assert result.verdict == Verdict.regression
    assert "status succeeded -> failed" in problems(result)["review"]
    assert result.problems[0].startswith(f"job succeeded -> {result.report.status}")
    assert billing.credits() == []


def impatient(runtime: Runtime, tmp_path: Path) -> Runtime:
    """`runtime` with billing's steps timing out after 3 s, not 10: for tests whose replay
    must fail a step (a page the HAR lacks, a sign-in it has no answer to), which otherwise
    wait out the full timeout. Replayed pages come from the HAR, in milliseconds."""
    scripts = tmp_path / "impatient-scripts"
    shutil.copytree(SCRIPTS, scripts)
    for name in ("issue_credit", "login"):  # a sub-flow's steps keep its own timeout
        script = scripts / "billing" / f"{name}.yaml"
        text = script.read_text()
        script.write_text(
            text.replace("\nsite: billing\n", "\nsite: billing\ntimeout_ms: 3000\n", 1)
        )
    return replace(runtime, scripts=ScriptStore(scripts, SELECTORS))


def registry_with(tmp_path: Path, **elements: str) -> ScriptStore:
    """The scripts with a copy of the registries whose billing `elements` are replaced."""
    selectors = tmp_path / "selectors"
    shutil.copytree(SELECTORS, selectors, dirs_exist_ok=True)
    registry = selectors / "billing.yaml"
    lines = registry.read_text().splitlines(keepends=True)
    for name, candidates in elements.items():
        [index] = [i for i, line in enumerate(lines) if line.startswith(f"  {name}:")]
        lines[index] = f"  {name}: {candidates}\n"
    registry.write_text("".join(lines))
    return ScriptStore(SCRIPTS, selectors)


async def test_a_registry_that_points_a_step_at_another_field_is_a_regression(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # Each field's selector is the other's: every step succeeds, typing into the wrong field.
    swapped = registry_with(
        tmp_path,
        **{
            "credit.reason": '[{css: "#credit-reference"}]',
            "credit.reference": '[{css: "#credit-reason"}]',
        },
    )
    result = await run(GOLDEN, replace(runtime, scripts=swapped), billing, tmp_path / "out")
    assert result.verdict == Verdict.regression
    found = problems(result)
    assert sorted(found) == ["reason", "reference"], found
    [reason] = found["reason"]
    assert reason.startswith(
        "credit.reason found by another candidate: css=#credit-reference (recorded: "
        "label=Reason), which is another element: acted at ("
    )
    assert ", while label=Reason still finds one at (" in reason
    assert "which is another element" in found["reference"][0]
    # Ground truth: the site got each value in the other field.
    [credit] = billing.credits()
    assert (credit["reason"], credit["reference"]) == ("T-88812", "damaged item")
    junit = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert junit.find("testsuite").get("failures") == "2"  # type: ignore[union-attr]


async def test_another_candidate_that_finds_the_same_element_stays_drift(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    reordered = registry_with(tmp_path, **{"credit.amount": '[{css: "#credit-amount"}]'})
    result = await run(GOLDEN, replace(runtime, scripts=reordered), billing, tmp_path / "out")
    assert result.verdict == Verdict.drift, problems(result)
    assert problems(result) == {
        "amount": [
            "credit.amount found by another candidate: css=#credit-amount (recorded: label=Amount)"
        ]
    }
    assert billing.credits()[0]["amount"] == "15.00"


async def test_a_recorded_box_shows_a_step_acting_elsewhere_when_its_candidate_is_gone(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # A recording made now carries the acted element's box per step. Its reason step is
    # doctored to have matched a label the page no longer has, so only the box can tell.
    job = BrowserJob(
        job_id="rec-box", script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    report = await run_job(job, runtime)
    loaded = runtime.scripts.load(report.script, report.script_version)
    bundle = export(from_report(report, loaded), runtime.artifacts, tmp_path / "rec-box")
    data = json.loads((bundle / "recording.json").read_text())
    [reason] = [step for step in data["steps"] if step["id"] == "reason"]
    assert reason["matched"]["box"] is not None
    reason["matched"]["candidate"] = "label=Motive"
    (bundle / "recording.json").write_text(json.dumps(data))

    # The same field, found through another candidate: drift.
    billing.reset()
    same = await run(bundle, runtime, billing, tmp_path / "same")
    assert same.verdict == Verdict.drift, problems(same)
    assert problems(same) == {
        "reason": [
            "credit.reason found by another candidate: label=Reason (recorded: label=Motive)"
        ]
    }
    # Another field: a regression, said with both places.
    billing.reset()
    swapped = registry_with(tmp_path, **{"credit.reason": '[{css: "#credit-reference"}]'})
    moved = await run(bundle, replace(runtime, scripts=swapped), billing, tmp_path / "moved")
    assert moved.verdict == Verdict.regression
    [problem] = problems(moved)["reason"]
    assert problem.startswith(
        "credit.reason found by another candidate: css=#credit-reference (recorded: "
        "label=Motive), which is another element: acted at ("
    )
    assert ", recorded at (" in problem


def test_every_registry_candidate_reads_back_from_how_a_recording_names_it() -> None:
    # A recording keeps a candidate as `Candidate.describe` wrote it; replay reads it back to
    # look for the recorded element. One that no longer reads back would make every swapped
    # field look like harmless drift again.
    for registry in SELECTORS.glob("*.yaml"):
        for candidate in (
            c for cs in load_registry(SELECTORS, registry.stem).elements.values() for c in cs
        ):
            back = _candidate_of(candidate.describe())
            assert back is not None, candidate.describe()
            assert back.describe() == candidate.describe()
            assert back == candidate.model_copy(update={"exact": True}), candidate


async def test_a_visual_change_fails_above_the_threshold_and_passes_below(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    def doctored(name: str, box: tuple[int, int, int, int]) -> Path:
        bundle = tmp_path / name
        shutil.copytree(GOLDEN, bundle)
        image = bundle / load(bundle).steps[4].screenshot  # type: ignore[operator]
        with Image.open(image) as original:
            changed = original.convert("RGB")
        ImageDraw.Draw(changed).rectangle(box, fill=(255, 0, 255))
        changed.save(image, quality=90)
        return bundle

    small = doctored("small", (900, 600, 960, 640))  # 0.2% of the page
    large = doctored("large", (600, 300, 1200, 700))  # 23% of the page
    passed = await run(small, runtime, billing, tmp_path / "out-small")
    assert passed.verdict == Verdict.same, problems(passed)
    billing.reset()
    failed = await run(large, runtime, billing, tmp_path / "out-large")
    assert failed.verdict == Verdict.regression
    step = failed.recording.steps[4].id
    assert [p for p in problems(failed)[step] if p.startswith("visual change")]


async def test_update_makes_the_new_run_the_golden(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # A recording of a job run just now, exported, then replaced by a replay with --update.
    job = BrowserJob(
        job_id="rec-1", script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    report = await run_job(job, runtime)
    loaded = runtime.scripts.load(report.script, report.script_version)
    bundle = export(from_report(report, loaded), runtime.artifacts, tmp_path / "rec-1")
    recorded = load(bundle)
    assert recorded.inputs == CREDIT_INPUTS and recorded.dynamic_outputs == ["confirmation_number"]
    assert all((bundle / s.screenshot).is_file() for s in recorded.steps if s.screenshot)

    billing.reset()
    await replay_all(
        [bundle], runtime, site_url=billing.url, out_dir=tmp_path / "out", update_golden=True
    )
    updated = load(bundle)
    assert updated.job_id == "rec-1" and updated.recorded_at > recorded.recorded_at
    assert [s.id for s in updated.steps] == [s.id for s in recorded.steps]


async def test_formwork_replay_exits_non_zero_on_a_regression(
    billing: Site, tmp_path: Path
) -> None:
    command = [
        sys.executable, "-m", "worker.cli", "replay", str(GOLDEN), "--site-url", billing.url,
        "--out", str(tmp_path / "out"), "--secrets-file", str(ROOT / "fixtures/secrets.yaml"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORMWORK_")}
    clean = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "billing-issue_credit" in clean.stdout and "same" in clean.stdout
    billing.reset()
    billing.faults(skin="v2")
    broken = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "regression" in broken.stdout and "found by a fallback" in broken.stdout


async def test_a_recorded_har_replays_billing_offline_with_no_secret_in_it(
    billing: Site, runtime: Runtime, tmp_path: Path, fixture_secrets: dict[str, str]
) -> None:
    job = BrowserJob(
        job_id="har-1", script="billing/issue_credit", inputs=CREDIT_INPUTS,
        site_url=billing.url, har=True,
    )  # fmt: skip
    report = await run_job(job, runtime)
    assert report.status == JobStatus.succeeded and report.artifacts is not None
    assert report.artifacts.har is not None
    loaded = runtime.scripts.load(report.script, report.script_version)
    bundle = export(from_report(report, loaded), runtime.artifacts, tmp_path / "har-1")
    har = (bundle / "network.har").read_text()
    for value in fixture_secrets.values():
        assert value not in har
    assert "formwork-secret-billing-password" in har  # the sign-in body, with a placeholder
    assert "BILLSESSID=" not in har  # the session cookie is scrubbed from every header

    before = billing.state()
    [result] = await replay_all(
        [bundle], runtime, site_url=None, out_dir=tmp_path / "out", from_har=True
    )
    assert result.verdict == Verdict.same, (problems(result), result.unmatched)
    assert result.report.status == JobStatus.succeeded
    # Offline: the site saw nothing, and nothing was created.
    after = billing.state()
    assert after["requests"] == before["requests"] and after["credits"] == before["credits"]

    # A page the HAR does not hold is reported, and the step that needed it fails.
    runtime = impatient(runtime, tmp_path)
    data = json.loads(har)
    data["log"]["entries"] = [
        e for e in data["log"]["entries"] if "/credits/new" not in e["request"]["url"]
    ]
    (bundle / "network.har").write_text(json.dumps(data))
    [broken] = await replay_all(
        [bundle], runtime, site_url=None, out_dir=tmp_path / "out2", from_har=True
    )
    assert broken.verdict == Verdict.regression
    assert any(r.startswith("GET ") and "/credits/new" in r for r in broken.unmatched)


async def offline(bundle: Path, runtime: Runtime, out: Path, **kwargs: bool) -> ReplayResult:
    async with asyncio.timeout(OFFLINE_LIMIT_S):
        [result] = await replay_all(
            [bundle], runtime, site_url=None, out_dir=out, from_har=True, **kwargs
        )
    return result


async def test_a_secret_the_site_echoes_html_escaped_is_scrubbed_from_the_har(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The sign-in form, shown again after a refused password, holds the name typed as the
    # page's HTML writes it (`o&#39;neil&amp;co-bot`): the HAR's page bodies kept it, as only
    # the raw and URL-encoded forms were scrubbed.
    user = "o'neil&co-bot"
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f'billing_username: "{user}"\nbilling_password: not-the-pw-93\n')
    runtime = replace(runtime, secrets=SecretStore(secrets, environ={}))
    job = BrowserJob(
        job_id="har-echo", script="billing/issue_credit", inputs=CREDIT_INPUTS,
        site_url=billing.url, har=True,
    )  # fmt: skip
    report = await run_job(job, runtime)
    assert report.error is not None and report.error.code == FailureCode.credentials_rejected
    assert report.artifacts is not None and report.artifacts.har is not None
    assert billing.state()["failed_logins"] == 1

    har = (runtime.artifacts.root / report.artifacts.har).read_text()
    assert "o&#39;neil&amp;co-bot" not in har and "neil" not in har
    assert "formwork-secret-billing-username" in har


async def _sign_in_body_sent_in_base64(
    billing: Site, runtime: Runtime, har: Path, user: str, password: str
) -> str:
    """The body a sign-in page that encodes credentials itself (a legacy single-page app)
    posts, as Chromium recorded it in the HAR at `har`: `btoa(user:password)`, and the
    password alone, unpadded as a token is."""
    assert runtime.browser.browser is not None
    context = await runtime.browser.browser.new_context(
        record_har_path=str(har), record_har_content="embed"
    )
    try:
        page = await context.new_page()
        await page.goto(f"{billing.url}/login")
        await page.evaluate(
            """([user, password]) => fetch("/login", {
              method: "POST", headers: {"Content-Type": "application/json"},
              body: JSON.stringify({credentials: btoa(user + ":" + password),
                                    token: btoa(password).replace(/=+$/, "")}),
            }).then((answer) => answer.status)""",
            [user, password],
        )
    finally:
        await context.close()
    return _posted(har)


def _posted(har: Path) -> str:
    """The body of the one POST the HAR at `har` holds."""
    [sent] = [
        e["request"]["postData"]["text"]
        for e in json.loads(har.read_text())["log"]["entries"]
        if e["request"]["method"] == "POST"
    ]
    return str(sent)


async def test_a_secret_a_page_sends_in_base64_is_scrubbed_from_the_har(
    billing: Site, runtime: Runtime, tmp_path: Path, fixture_secrets: dict[str, str]
) -> None:
    # No text form of a value matches its base64: the HAR kept the password (and the sign-in
    # name before it) as the page encoded them, for anyone with the bundle to decode.
    user, password = fixture_secrets["billing_username"], fixture_secrets["billing_password"]
    har = tmp_path / "network.har"
    sent = await _sign_in_body_sent_in_base64(billing, runtime, har, user, password)
    assert base64.b64encode(password.encode()).decode().rstrip("=") in sent  # as the site got it

    scrub(har, {"billing_username": user, "billing_password": password})
    kept = _posted(har)
    assert not any(core in kept for v in (user, password) for core in base64_cores(v.encode()))
    # Encoded again with the placeholders: a replay, which fills those, sends the same bytes.
    again = tmp_path / "replayed.har"
    replayed = await _sign_in_body_sent_in_base64(
        billing, runtime, again, placeholder("billing_username"), placeholder("billing_password")
    )
    assert kept == replayed


async def test_a_secret_too_short_to_scrub_from_text_is_scrubbed_where_it_was_typed(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # A three-character secret (a CVV, a PIN) is too short to replace in text without
    # mangling it, so nothing replaced it: the sign-in body in the HAR and the fill in the
    # trace held it as typed.
    pin = "x9!"
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f'billing_username: pin-bot\nbilling_password: "{pin}"\n')
    runtime = replace(runtime, secrets=SecretStore(secrets, environ={}))
    job = BrowserJob(
        job_id="har-short", script="billing/issue_credit", inputs=CREDIT_INPUTS,
        site_url=billing.url, har=True, trace=TraceMode.always,
    )  # fmt: skip
    report = await run_job(job, runtime)
    assert report.error is not None and report.error.code == FailureCode.credentials_rejected
    assert report.artifacts is not None and report.artifacts.har is not None

    har = json.loads((runtime.artifacts.root / report.artifacts.har).read_text())
    [sign_in] = [e["request"] for e in har["log"]["entries"] if e["request"]["method"] == "POST"]
    body = sign_in["postData"]["text"]
    assert body.endswith("&password=formwork-secret-billing-password"), body
    assert all(p["value"] != pin for p in sign_in["postData"].get("params", []))
    [record] = [runtime.artifacts.find_audit("har-short")]
    [trace] = record.traces
    with zipfile.ZipFile(runtime.artifacts.root / trace) as archive:
        logs = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".trace"))
    assert pin.encode() not in logs
    assert b'"value":"***"' in logs  # the fill that typed it is still there, masked


@pytest.mark.parametrize("bundle", GOLDENS)
async def test_every_golden_recording_replays_offline_from_its_har(
    bundle: str, runtime: Runtime, tmp_path: Path
) -> None:
    # helpdesk-reply_and_resolve: its reply answers 303 to /tickets/HD-2041#message-19, then
    # the ticket page is fetched a second time, now with the reply in it.
    result = await offline(GOLDEN.parent / bundle, runtime, tmp_path / "out")
    assert result.verdict == Verdict.same, (problems(result), result.problems, result.unmatched)
    assert result.unmatched == []


async def test_a_request_recorded_without_a_response_is_aborted_and_listed(
    runtime: Runtime, tmp_path: Path
) -> None:
    # What Playwright writes for a request aborted while recording: status -1, no headers.
    bundle = tmp_path / "aborted"
    shutil.copytree(GOLDEN, bundle)
    har = json.loads((bundle / "network.har").read_text())
    sign_in = next(e for e in har["log"]["entries"] if e["request"]["method"] == "POST")
    sign_in["response"] |= {"status": -1, "headers": [], "_failureText": "net::ERR_ABORTED"}
    (bundle / "network.har").write_text(json.dumps(har))

    result = await offline(bundle, impatient(runtime, tmp_path), tmp_path / "out")
    assert result.unmatched == [
        f"POST {sign_in['request']['url']}: recorded without a response (net::ERR_ABORTED)"
    ]
    assert result.verdict == Verdict.regression
    submit = next(s for s in result.report.steps if s.id == "login.submit")
    assert submit.status == StepStatus.failed


async def test_update_from_the_har_keeps_the_golden_traffic(
    runtime: Runtime, tmp_path: Path
) -> None:
    bundle = tmp_path / "golden"
    shutil.copytree(GOLDEN, bundle)
    traffic = (bundle / "network.har").read_bytes()
    before = load(bundle)
    await offline(bundle, runtime, tmp_path / "out", update_golden=True)
    # The run's own HAR would show each followed redirect as an aborted request (status -1)
    # and the next offline replay would stop at the sign-in.
    assert (bundle / "network.har").read_bytes() == traffic
    assert load(bundle).recorded_at > before.recorded_at
    again = await offline(bundle, runtime, tmp_path / "again")
    assert again.verdict == Verdict.same, (problems(again), again.unmatched)


async def test_recordings_on_one_fixture_each_start_from_its_seed_data(
    helpdesk: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The reply resolves HD-2041, which the queue (on the next sign-in) shows; replayed again
    # on the same ticket, it would find the ticket already resolved.
    reply, context = (
        GOLDEN.parent / "helpdesk-reply_and_resolve",
        GOLDEN.parent / "helpdesk-ticket_context",
    )
    results = await replay_all(
        [reply, context, reply], runtime, site_url=helpdesk.url, out_dir=tmp_path / "out"
    )
    for result in results:
        assert result.verdict == Verdict.same, (result.bundle.name, problems(result))


async def test_faults_set_before_the_replay_hold_for_every_recording(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    billing.faults(skin="v2")
    results = await replay_all(
        [GOLDEN, GOLDEN], runtime, site_url=billing.url, out_dir=tmp_path / "out", threshold=0.5
    )
    assert [r.verdict for r in results] == [Verdict.drift, Verdict.drift]
    assert billing.state()["faults"]["skin"] == "v2"
    assert len(billing.credits()) == 1  # reset before the second recording


async def test_only_a_fixture_site_is_ever_reset(billing: Site) -> None:
    fixture = await fixture_site(billing.url + "/")
    assert fixture is not None and fixture.url == billing.url
    assert await fixture_site(billing.url + "/login") is None  # a page, not a fixture's API
    local = billing.url.replace("127.0.0.1", "localhost")
    assert (await fixture_site(local)) is not None


def test_a_site_elsewhere_is_never_probed_as_a_fixture() -> None:
    assert on_this_machine("http://127.0.0.1:8811/")
    assert on_this_machine("http://localhost:8811")
    assert on_this_machine("http://[::1]:8811/")
    assert not on_this_machine("https://billing.example.com/")
    assert not on_this_machine("http://10.0.0.5:8811/")
    assert not on_this_machine("http://127.0.0.1.example.com/")


# ---------------------------------------------------------------- HarReplay, without a browser

SITE = "http://127.0.0.1:8897"


def entry(
    method: str,
    path: str,
    status: int = 200,
    body: str = "",
    *,
    sent: str | None = None,
    sent_type: str = "application/x-www-form-urlencoded",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    request: dict[str, Any] = {"method": method, "url": SITE + path, "headers": []}
    if sent is not None:
        request["postData"] = {"mimeType": sent_type, "text": sent}
    response = {
        "status": status,
        "headers": [{"name": k, "value": v} for k, v in (headers or {}).items()],
        "content": {"mimeType": "text/html", "text": body},
    }
    return {"request": request, "response": response}


def served(found: Answer | Unanswered) -> bytes | str:
    return found.reason if isinstance(found, Unanswered) else found.body


def test_identical_requests_take_their_entries_in_recorded_order() -> None:
    har = HarReplay(
        [
            entry("GET", "/tickets/1", body="before"),
            entry("POST", "/tickets/1/messages", 303, sent="body=hi"),
            entry("GET", "/tickets/1", body="after"),
        ]
    )

    def ticket() -> bytes | str:
        return served(har.answer("GET", SITE + "/tickets/1", None, None))

    assert ticket() == b"before"
    assert isinstance(har.answer("POST", SITE + "/tickets/1/messages", b"body=hi", None), Answer)
    assert ticket() == b"after"
    assert ticket() == b"after"  # a reload: the latest answer again
    # A second send: the recording never showed what the site does then.
    again = har.answer("POST", SITE + "/tickets/1/messages", b"body=hi", None)
    assert served(again) == "sent more often than recorded (1x)"


def test_a_request_matches_on_its_body_but_not_on_a_fragment_or_a_multipart_boundary() -> None:
    multipart = "multipart/form-data; boundary=----WebKitFormBoundaryAAAA"
    har = HarReplay(
        [
            entry("GET", "/tickets/1", body="page"),
            entry("POST", "/login", 303, sent="user=a", headers={"Location": "/#top"}),
            entry(
                "POST", "/upload", body="ok", sent_type=multipart,
                sent="------WebKitFormBoundaryAAAA\r\nContent-Disposition: form-data; "
                'name="f"\r\n\r\n\ufffdPNG\r\n------WebKitFormBoundaryAAAA--\r\n',
            ),
        ]
    )  # fmt: skip
    page = har.answer("GET", SITE + "/tickets/1#message-19", None, None)
    assert served(page) == b"page"
    assert served(har.answer("POST", SITE + "/login", b"user=b", None)) == "not in the HAR"
    redirect = har.answer("POST", SITE + "/login", b"user=a", None)
    assert isinstance(redirect, Answer) and redirect.location == "/#top"
    # Another boundary, and the upload's bytes as sent (not valid UTF-8), not as the HAR kept them.
    body = (
        b'------WebKitFormBoundaryBBBB\r\nContent-Disposition: form-data; name="f"\r\n\r\n'
        b"\x89PNG\r\n------WebKitFormBoundaryBBBB--\r\n"
    )
    upload = har.answer("POST", SITE + "/upload", body, multipart.replace("AAAA", "BBBB"))
    assert served(upload) == b"ok"


def test_an_answer_drops_what_describes_the_recorded_wire_not_the_body() -> None:
    headers = {"Content-Length": "999", "Set-Cookie": SCRUBBED, "Content-Type": "text/html"}
    har = HarReplay([entry("GET", "/", body="scrubbed, so shorter", headers=headers)])
    found = har.answer("GET", SITE + "/", None, None)
    assert isinstance(found, Answer)
    assert found.headers == {"Content-Type": "text/html"}
    assert found.status == 200 and found.location is None


def test_an_entry_without_a_response_answers_nothing() -> None:
    aborted = entry("POST", "/login", -1, sent="user=a")
    aborted["response"] = {"status": -1, "headers": [], "_failureText": "net::ERR_ABORTED"}
    found = HarReplay([aborted]).answer("POST", SITE + "/login", b"user=a", None)
    assert served(found) == "recorded without a response (net::ERR_ABORTED)"


# ---------------------------------------------------------------- what a replay cannot use


def damaged(tmp_path: Path, name: str, source: Path = GOLDEN) -> Path:
    """A copy of a golden bundle, to break."""
    bundle = tmp_path / name
    shutil.copytree(source, bundle)
    return bundle


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback URL where nothing listens: a bound socket that never listens refuses every
    connection, and holds the port so nothing else can take it meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def breakage(tmp_path: Path, how: str, dead_url: str) -> tuple[list[str], str]:
    """Command-line arguments that break the replay in a way `how` names, and the one line
    of error expected (the bundle's path stands for `{b}`)."""
    bundle = damaged(tmp_path, "bundle")
    har, rec = bundle / "network.har", bundle / "recording.json"
    from_har = [str(bundle), "--from-har"]
    match how:
        case "garbage har":
            har.write_text("garbage\n")
            return from_har, "{b}/network.har: not a valid HAR (invalid JSON at line 1 column 1)"
        case "no har":
            har.unlink()
            return from_har, "{b} has no network.har (record it with har: true)"
        case "empty object har":
            har.write_text("{}")
            return from_har, "{b}/network.har: not a valid HAR (no log.entries list)"
        case "broken json":
            rec.write_text("{x\n")
            return from_har, "{b}/recording.json: not a recording (invalid JSON: key must be a string at line 1 column 2)"  # fmt: skip # noqa: E501
        case "empty json":
            rec.write_text("")
            return from_har, "{b}/recording.json: not a recording (empty file)"
        case "list json":
            rec.write_text("[]")
            return from_har, "{b}/recording.json: not a recording (Input should be an object)"
        case "readme":
            return ["README.md", "--from-har"], "README.md: not a recording (invalid JSON: expected value at line 1 column 1)"  # fmt: skip # noqa: E501
        case "unknown script":
            rec.write_text(rec.read_text().replace('"billing/issue_credit"', '"billing/nope"'))
            return from_har, "{b}: no script 'billing/nope' under " + str(SCRIPTS)
        case "har and site":
            return [*from_har, "--site-url", dead_url], "--from-har and --site-url conflict"
        case "dead site":
            return [str(bundle), "--site-url", dead_url], f"nothing answers at {dead_url} ("
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "garbage har", "no har", "empty object har", "broken json", "empty json", "list json",
        "readme", "unknown script", "har and site", "dead site",
    ],
)  # fmt: skip
def test_what_a_replay_cannot_use_is_refused_in_one_line_before_any_run(
    how: str, tmp_path: Path, dead_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args, expected = breakage(tmp_path, how, dead_url)
    out = tmp_path / "out"
    code = main(
        ["replay", *args, "--out", str(out), "--scripts-dir", str(SCRIPTS),
         "--selectors-dir", str(SELECTORS), "--secrets-file", str(SECRETS_FILE)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    [line] = captured.err.splitlines()
    assert line.startswith("formwork: " + expected.format(b=tmp_path / "bundle")), line
    assert "pydantic" not in line and "Traceback" not in captured.err
    assert not (out / "runs").exists()  # refused before any recording ran


def test_a_recording_that_cannot_be_read_is_named_with_its_first_problem(
    tmp_path: Path,
) -> None:
    bundle = damaged(tmp_path, "bundle")
    text = (bundle / "recording.json").read_text()
    (bundle / "recording.json").write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(RecordingInvalid) as truncated:
        load(bundle)
    assert truncated.value.message.startswith(f"{bundle}/recording.json: not a recording (")
    assert "invalid JSON: EOF while parsing" in truncated.value.message
    (bundle / "recording.json").write_text(text.replace('"succeeded"', '"done"', 1))
    with pytest.raises(RecordingInvalid) as invalid:
        load(bundle)
    assert "\n" not in invalid.value.message and "errors.pydantic.dev" not in invalid.value.message
    assert "(status: Input should be " in invalid.value.message


async def test_an_unknown_script_names_the_bundle_when_replayed_against_a_site(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    bundle = damaged(tmp_path, "bundle")
    recording = bundle / "recording.json"
    recording.write_text(recording.read_text().replace("billing/issue_credit", "billing/nope"))
    with pytest.raises(RecordingInvalid) as refused:
        await replay_all([GOLDEN, bundle], runtime, site_url=billing.url, out_dir=tmp_path / "o")
    assert refused.value.message == f"{bundle}: no script 'billing/nope' under {SCRIPTS}"
    assert refused.value.code == FailureCode.script_not_found
    assert billing.credits() == []  # the good recording before it did not run either


async def test_a_site_where_nothing_answers_fails_before_any_recording(
    runtime: Runtime, tmp_path: Path, dead_url: str
) -> None:
    with pytest.raises(FormworkError) as refused:
        await replay_all([GOLDEN], runtime, site_url=dead_url, out_dir=tmp_path / "out")
    assert refused.value.message == f"nothing answers at {dead_url} (connection refused)"
    assert refused.value.code == FailureCode.network_error
    assert not (tmp_path / "out").exists()


async def test_an_unreadable_golden_screenshot_is_a_regression_and_the_replay_goes_on(
    runtime: Runtime, tmp_path: Path
) -> None:
    bundle = damaged(tmp_path, "bundle")
    (bundle / "steps" / "05-open_account.jpg").write_text("garbage\n")
    other = GOLDEN.parent / "helpdesk-ticket_context"
    async with asyncio.timeout(2 * OFFLINE_LIMIT_S):
        broken, fine = await replay_all(
            [bundle, other], runtime, site_url=None, out_dir=tmp_path / "out", from_har=True
        )
    assert problems(broken) == {
        "open_account": [
            "golden screenshot steps/05-open_account.jpg is unreadable (not an image): "
            "no visual check"
        ]
    }
    assert broken.verdict == Verdict.regression
    assert fine.verdict == Verdict.same, (problems(fine), fine.unmatched)


class _BidiCheck(HTMLParser):
    """Every text holding a bidi control, and where in the page it stands."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.found: list[tuple[str, bool]] = []  # (text, inside a <bdi>)

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag not in ("img", "br", "meta", "link", "input"):
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        if any(c in data for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"):
            self.found.append((data, "bdi" in self.open))


async def test_site_text_with_bidi_controls_is_isolated_in_the_replay_report(
    runtime: Runtime, tmp_path: Path
) -> None:
    # A failure message quotes the site, a drift names a selector, an unmatched request its
    # URL: a U+202E among them reordered the report around it, as it did the review UI's.
    bundle = damaged(tmp_path, "bundle")
    result = await offline(bundle, runtime, tmp_path / "out")
    flip = "\u202eCN-100001 refused\u202c"
    result.problems.append(f"the site said {flip}")
    result.unmatched.append(f"GET /credits?ref={flip}")
    result.steps[0].problems.append(f"page showed {flip}")
    (tmp_path / "html").mkdir()
    check = _BidiCheck()
    check.feed(write_html([result], tmp_path / "html", 0.01).read_text())
    assert len(check.found) == 3
    assert all(inside for _, inside in check.found), check.found


async def test_a_missing_golden_screenshot_is_a_regression_in_every_report(
    runtime: Runtime, tmp_path: Path
) -> None:
    bundle = damaged(tmp_path, "bundle")
    (bundle / "steps" / "05-open_account.jpg").unlink()
    result = await offline(bundle, runtime, tmp_path / "out")
    problem = "golden screenshot steps/05-open_account.jpg is missing: no visual check"
    assert problems(result) == {"open_account": [problem]}
    assert result.verdict == Verdict.regression
    assert problem in table([result])
    assert problem in (tmp_path / "out" / "index.html").read_text()
    junit = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    suite = junit.find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    failure = suite.find("testcase[@name='open_account']/failure")
    assert failure is not None and failure.get("message") == problem


async def test_two_bundles_of_one_recorded_job_keep_their_own_images_in_the_report(
    runtime: Runtime, tmp_path: Path
) -> None:
    # A bundle copied to try a variant has the recorded job's id: both bundles' images went
    # to one folder, the later wrote over the earlier, and the report showed the regression
    # with the clean bundle's golden image and an empty diff.
    variant = damaged(tmp_path, "variant")
    shot = variant / "steps" / "08-reason.jpg"
    with Image.open(shot) as image:
        ImageDraw.Draw(image).rectangle((100, 100, 500, 400), fill=(255, 0, 0))
        image.save(shot)
    async with asyncio.timeout(2 * OFFLINE_LIMIT_S):
        changed, clean = await replay_all(
            [variant, GOLDEN], runtime, site_url=None, out_dir=tmp_path / "out", from_har=True
        )
    assert problems(clean) == {}
    [reason] = [s for s in changed.steps if s.step_id == "reason"]
    assert reason.verdict == Verdict.regression and reason.expected_image is not None
    with Image.open(tmp_path / "out" / reason.expected_image) as shown:
        red, green, _ = shown.convert("RGB").getpixel((300, 250))
        assert red > 200 and green < 50  # the variant's red box, not the clean golden
    [kept] = [s for s in clean.steps if s.step_id == "reason"]
    assert kept.expected_image != reason.expected_image


async def test_a_script_that_types_something_else_is_a_regression(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # A new version fills the reason with more words: a few pixels of the field change, far
    # under the threshold, but the site now stores another reason.
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    script = scripts / "billing" / "issue_credit.yaml"
    text = script.read_text()
    typed = 'value: "{{ inputs.reason }}"'
    assert typed in text
    script.write_text(text.replace(typed, 'value: "refund {{ inputs.reason }} per policy"'))
    changed = replace(runtime, scripts=ScriptStore(scripts, SELECTORS))
    result = await run(GOLDEN, changed, billing, tmp_path / "out")
    assert result.verdict == Verdict.regression
    assert problems(result) == {
        "reason": ["entered 'damaged item' -> 'refund damaged item per policy'"]
    }
    [credit] = billing.credits()
    assert credit["reason"] == "refund damaged item per policy"  # what the replay caught


async def test_export_never_replaces_a_folder_that_is_not_a_bundle(
    billing: Site,
    runtime: Runtime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `--out DIR` named an existing folder of other work: the export removed it whole to put
    # the bundle there; `--out .` ended in a traceback.
    job = BrowserJob(
        job_id="rec-out", script="billing/issue_credit", inputs=CREDIT_INPUTS, site_url=billing.url
    )
    report = await run_job(job, runtime)
    assert report.artifacts is not None
    saved = tmp_path / "report.json"
    saved.write_text(report.model_dump_json())
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("three days of notes")
    a_file = tmp_path / "a-file"
    a_file.write_text("kept")
    monkeypatch.chdir(work)
    export = ["recording", "export", "rec-out", "--report", str(saved), "--scripts-dir",
              str(SCRIPTS), "--selectors-dir", str(SELECTORS), "--out"]  # fmt: skip
    folder = "a folder without a recording.json"
    for out, what in ((work, folder), (Path("."), folder), (a_file, "a file")):
        code = await asyncio.to_thread(main, [*export, str(out)])
        [said] = capsys.readouterr().err.splitlines()
        assert code == 2
        assert said == (
            f"formwork: {out.resolve()} is {what}, not a recording bundle: not replaced "
            "(name a new or empty folder, or an earlier bundle)"
        )
        assert (work / "notes.txt").read_text() == "three days of notes"
        assert a_file.read_text() == "kept"
    # An earlier bundle, or an empty folder, is what it may replace.
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "empty", tmp_path / "new"):
        assert await asyncio.to_thread(main, [*export, str(out)]) == 0
        assert load(out).job_id == "rec-out"


async def test_a_bundle_named_by_its_recording_json_replays_as_its_folder(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # `formwork replay recordings/*/recording.json`: every screenshot was looked for under
    # the file (`recording.json/steps/…`), each step a regression for a golden image "missing";
    # from its HAR, the replay was refused for a HAR "not a directory".
    result = await run(GOLDEN / "recording.json", runtime, billing, tmp_path / "site")
    assert result.verdict == Verdict.same, problems(result)
    assert result.bundle == GOLDEN and all(s.pixel_ratio is not None for s in result.steps)
    assert "billing-issue_credit" in table([result])

    copy = damaged(tmp_path, "copy")
    before = load(copy)
    result = await offline(copy / "recording.json", runtime, tmp_path / "har", update_golden=True)
    assert result.verdict == Verdict.same, (problems(result), result.problems, result.unmatched)
    updated = load(copy)  # --update rewrote the bundle folder, screenshots and all
    assert updated.recorded_at > before.recorded_at
    assert all((copy / s.screenshot).is_file() for s in updated.steps if s.screenshot)
    assert not (copy / "recording.json.tmp").exists()


async def test_a_replay_runs_the_stable_version_whatever_the_canary_split(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # A replay's job id is new each time, and the rollout routed it like any job: with a
    # canary named, the same command ran v1 or v2 by the draw, passing or failing with it.
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    folder = scripts / "billing"
    text = (folder / "issue_credit.yaml").read_text()
    v2 = text.replace("version: 1", "version: 2", 1).replace(
        'value: "{{ inputs.reason }}"', 'value: "refund {{ inputs.reason }}"'
    )
    (folder / "issue_credit@2.yaml").write_text(v2)
    # Every unpinned job draws the canary: yet v1 is the version the script stands at.
    (folder / "issue_credit.rollout.yaml").write_text("stable: 1\ncanary: 2\npercent: 100\n")
    split = replace(runtime, scripts=ScriptStore(scripts, SELECTORS))

    stable = await run(GOLDEN, split, billing, tmp_path / "stable")
    assert stable.report.script_version == 1 and stable.verdict == Verdict.same
    assert f"{'same':<10} succeeded (v1)" in table([stable])
    assert [c["reason"] for c in billing.credits()] == ["damaged item"]
    # The canary is replayed by naming it, and its change is caught.
    [canary] = await replay_all(
        [GOLDEN], split, site_url=billing.url, out_dir=tmp_path / "canary", script_version=2
    )
    assert canary.report.script_version == 2 and canary.verdict == Verdict.regression
    assert problems(canary) == {"reason": ["entered 'damaged item' -> 'refund damaged item'"]}


def test_a_bundle_in_another_format_is_refused_naming_it(tmp_path: Path) -> None:
    # `format` was read and never checked: a later layout was judged as this one's.
    bundle = tmp_path / "later"
    shutil.copytree(GOLDEN, bundle)
    data = json.loads((bundle / "recording.json").read_text())
    (bundle / "recording.json").write_text(json.dumps({**data, "format": 2}))
    with pytest.raises(RecordingInvalid) as info:
        load(bundle)
    assert "recording.json: not a recording" in info.value.message
    assert "format 2 is a later Formwork's bundle layout; this worker reads format 1" in (
        info.value.message
    )
    assert load(GOLDEN).format == 1
