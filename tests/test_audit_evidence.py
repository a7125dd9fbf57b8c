"""Evidence images: the box drawn is where the element is, failures are marked, secrets and
`redact:` regions never show, and a job's images fit its budget."""

from __future__ import annotations

import io
import shutil
from itertools import groupby
from pathlib import Path

from PIL import Image, ImageFilter, ImageStat

from worker.annotate import (
    BOX_COLOR,
    FAIL_COLOR,
    Encoded,
    Mark,
    content_name,
    fit_capture,
    prepare,
    render,
)
from worker.artifacts import LocalArtifacts
from worker.audit import AuditRecord, Evidence, screenshot_marks
from worker.browser import BrowserHost
from worker.contract import (
    Box,
    BrowserJob,
    FailureCode,
    JobReport,
    JobStatus,
    MatchedSelector,
    StepReport,
    StepStatus,
)
from worker.evidence import measure
from worker.executor import Runtime, run_job
from worker.script import ScriptStore
from worker.secretstore import SecretStore

from .conftest import CREDIT_INPUTS, SCRIPTS, SECRETS_FILE, SELECTORS, Site


def credit_job(site: Site, job_id: str, **inputs: str) -> BrowserJob:
    return BrowserJob(
        job_id=job_id,
        script="billing/issue_credit",
        inputs={**CREDIT_INPUTS, **inputs},
        site_url=site.url,
    )


def audit_of(runtime: Runtime, job_id: str) -> AuditRecord:
    return runtime.artifacts.find_audit(job_id)


def evidence_for(record: AuditRecord, step_id: str) -> Evidence:
    step = next(s for s in record.report.steps if s.id == step_id)
    assert step.screenshot is not None
    return record.evidence[step.screenshot]


def image(runtime: Runtime, key: str) -> Image.Image:
    return Image.open(io.BytesIO(runtime.artifacts.get(key))).convert("RGB")


def close(pixel: tuple[int, ...], color: tuple[int, int, int], tolerance: int = 60) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, color, strict=False))


async def test_the_annotated_box_lies_on_the_element_the_step_acted_on(
    billing: Site, runtime: Runtime, browser_host: BrowserHost
) -> None:
    report = await run_job(credit_job(billing, "ev-box"), runtime)
    assert report.status == JobStatus.succeeded
    record = audit_of(runtime, "ev-box")
    amount = evidence_for(record, "amount")
    assert amount.box is not None and amount.label == "credit.amount · label=Amount"

    # Ground truth: where Playwright itself finds the field on the same page, same viewport.
    step = next(s for s in report.steps if s.id == "amount")
    context = await browser_host.new_context()
    try:
        page = await context.new_page()
        await page.goto(billing.url + "/login")
        await page.get_by_label("Username").fill("formwork-bot")
        await page.get_by_label("Password").fill("correct-horse-battery-7")
        await page.get_by_role("button", name="Sign in").click()
        assert step.url is not None
        await page.goto(step.url)
        truth = await page.locator("#credit-amount").bounding_box()
    finally:
        await context.close()
    assert truth is not None
    box = amount.box
    for ours, theirs in zip(
        (box.x, box.y, box.width, box.height),
        (truth["x"], truth["y"], truth["width"], truth["height"]),
        strict=True,
    ):
        assert abs(ours - theirs) <= 1

    # And the outline really is drawn there, on all four sides, in the box colour.
    shot = image(runtime, amount.image)
    assert shot.size == (amount.width, amount.height) == (1280, 800)
    mid_x, mid_y = box.x + box.width / 2, box.y + box.height / 2
    for x, y in (
        (box.x - 2, mid_y),
        (box.x + box.width + 1, mid_y),
        (mid_x, box.y + box.height + 1),
        (mid_x, box.y - 2),
    ):
        assert close(shot.getpixel((round(x), round(y))), BOX_COLOR), (x, y)
    # The raw capture has no such outline: the annotation is ours, not the page's.
    raw = image(runtime, amount.source)
    assert not close(raw.getpixel((round(box.x - 2), round(mid_y))), BOX_COLOR)
    # Thumbnails are small and content-addressed like the images.
    thumb = image(runtime, amount.thumbnail)
    assert thumb.width == 320
    assert Path(amount.image).parent.name == "images"


async def test_secret_fields_stay_masked_in_the_evidence(
    billing: Site, runtime: Runtime, fixture_secrets: dict[str, str]
) -> None:
    await run_job(credit_job(billing, "ev-mask"), runtime)
    record = audit_of(runtime, "ev-mask")
    password = evidence_for(record, "login.password")
    assert password.box is not None
    shot = image(runtime, password.image)
    b = password.box
    inside = shot.crop(
        (round(b.x) + 3, round(b.y) + 3, round(b.x + b.width) - 3, round(b.y + b.height) - 3)
    )
    stat = ImageStat.Stat(inside)
    # A solid mask: the field's pixels are one dark colour, no glyphs.
    assert all(m < 60 for m in stat.mean) and all(d < 12 for d in stat.stddev)
    assert (
        fixture_secrets["billing_password"]
        not in runtime.artifacts.get(f"{record.path}/audit.json").decode()
    )


async def test_redact_regions_are_blurred_in_every_capture(
    billing: Site, browser_host: BrowserHost, tmp_path: Path
) -> None:
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    path = scripts / "billing" / "issue_credit.yaml"
    path.write_text(path.read_text() + '\nredact: ["#credit-reason", "not a { selector"]\n')

    def runtime_for(scripts_dir: Path, name: str) -> Runtime:
        return Runtime(
            scripts=ScriptStore(scripts_dir, SELECTORS),
            browser=browser_host,
            artifacts=LocalArtifacts(tmp_path / name),
            secrets=SecretStore(SECRETS_FILE, environ={}),
        )

    def sharpness(runtime: Runtime, job_id: str) -> float:
        record = runtime.artifacts.find_audit(job_id)
        reason = evidence_for(record, "reason")
        assert reason.box is not None
        b = reason.box
        raw = image(runtime, reason.source)  # as captured: the blur is the browser's own
        region = raw.crop((round(b.x), round(b.y), round(b.x + b.width), round(b.y + b.height)))
        return ImageStat.Stat(region.convert("L").filter(ImageFilter.FIND_EDGES)).mean[0]

    reason = "customer says parcel 4411 arrived crushed"
    plain, redacted = runtime_for(SCRIPTS, "plain"), runtime_for(scripts, "redacted")
    assert (await run_job(credit_job(billing, "ev-plain", reason=reason), plain)).status == (
        JobStatus.succeeded
    )
    billing.reset()
    done = await run_job(credit_job(billing, "ev-redacted", reason=reason), redacted)
    assert done.status == JobStatus.succeeded  # blurring changes pixels, not the page
    assert sharpness(redacted, "ev-redacted") < sharpness(plain, "ev-plain") / 3


def test_failure_is_framed_in_red_with_its_code() -> None:
    blank = io.BytesIO()
    Image.new("RGB", (400, 300), (255, 255, 255)).save(blank, "JPEG")
    rendered = render(
        [(blank.getvalue(), Mark(failure=FailureCode.validation_rejected))], budget_bytes=10**6
    )
    shot = Image.open(io.BytesIO(rendered.images[0].image)).convert("RGB")
    for x, y in ((2, 150), (397, 150), (200, 2), (200, 297)):
        assert close(shot.getpixel((x, y)), FAIL_COLOR), (x, y)
    # The code's label sits in the bottom left corner, leaving the page's header (where an
    # error banner usually is) as it was captured.
    assert close(shot.getpixel((12, 300 - 8 - 3)), FAIL_COLOR)
    assert all(close(shot.getpixel((x, y)), (255, 255, 255)) for x in (14, 40) for y in (16, 30))


def test_images_are_fitted_into_the_job_budget() -> None:
    noisy = io.BytesIO()
    Image.effect_noise((1280, 800), 80).convert("RGB").save(noisy, "JPEG", quality=95)
    shots = [(noisy.getvalue(), Mark())] * 3
    roomy = render(shots, budget_bytes=10**8)
    assert (roomy.quality, roomy.scale, roomy.over_budget) == (80, 1.0, False)
    # Identical screenshots are stored once: three shots, one image.
    assert len({i.image_name for i in roomy.images}) == 1
    tight = render(shots, budget_bytes=roomy.total_bytes // 2)
    assert not tight.over_budget and tight.total_bytes <= roomy.total_bytes // 2
    assert (tight.quality, tight.scale) != (80, 1.0)
    impossible = render(shots, budget_bytes=1000)
    assert impossible.over_budget and len(impossible.images) == 3  # kept anyway


def test_labels_keep_their_size_when_the_evidence_is_scaled_down() -> None:
    # Labels and the failure tag were drawn at full size and scaled with the page: at the
    # ladder's last rung (0.5) a label was ~7 px high, barely legible.
    blank = io.BytesIO()
    Image.new("RGB", (1280, 800), (255, 255, 255)).save(blank, "JPEG")
    box = Box(x=200, y=400, width=300, height=40)
    mark = Mark(box=box, label="credit.amount", failure=FailureCode.validation_rejected)
    rendered = render([(blank.getvalue(), mark)], budget_bytes=1)
    assert rendered.over_budget and rendered.scale == 0.5
    shot = Image.open(io.BytesIO(rendered.images[0].image)).convert("RGB")
    assert shot.size == (640, 400)
    drawn = rendered.images[0].box
    assert drawn is not None and (drawn.x, drawn.y) == (100, 200)

    def run_of(color: tuple[int, int, int], x: int, rows: range) -> int:
        return max(
            (len(list(group)) for hit, group in groupby(rows, lambda y: close(
                shot.getpixel((x, y)), color)) if hit),
            default=0,
        )  # fmt: skip

    # The label sits above the box, the failure tag in the bottom left corner: each is as tall
    # as at full size (text of 14 px, padded), not half of it.
    assert run_of(BOX_COLOR, 97 + 2, range(150, 197)) >= 18
    assert run_of(FAIL_COLOR, 8 + 2, range(330, 392)) >= 18


def test_a_capture_is_fitted_by_quality_never_by_size() -> None:
    noisy = io.BytesIO()
    Image.effect_noise((1280, 800), 80).convert("RGB").save(noisy, "JPEG", quality=80)
    raw = noisy.getvalue()
    assert fit_capture(raw, len(raw)) is raw
    smaller = fit_capture(raw, len(raw) - 1)
    assert smaller is not None and len(smaller) < len(raw)
    with Image.open(io.BytesIO(smaller)) as image:
        assert image.size == (1280, 800)  # the step's box is measured at full size
    assert fit_capture(raw, 1000) is None
    assert fit_capture(raw, 0) is None


async def test_screenshots_as_captured_obey_the_job_budget_too(
    billing: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The annotated set had a budget; the captures beside it (`NN-<step>.jpg`) had none.
    roomy = await run_job(credit_job(billing, "raw-roomy"), runtime)
    folder = runtime.artifacts.root / (roomy.artifacts.path if roomy.artifacts else "")
    sizes = sorted(p.stat().st_size for p in folder.glob("*.jpg"))
    assert len(sizes) == len(roomy.steps)
    # Room for the first few captures as taken, and some at a lower quality; not for all.
    budget = sum(sizes[:3]) + sizes[0] // 2
    tight = LocalArtifacts(tmp_path / "tight", image_budget=budget)
    runtime.artifacts = tight
    billing.reset()
    report = await run_job(credit_job(billing, "raw-tight"), runtime)

    assert report.status == JobStatus.succeeded, report.error
    assert len(billing.credits()) == 1  # the evidence budget changes nothing on the site
    assert report.artifacts is not None
    captures = list((tight.root / report.artifacts.path).glob("*.jpg"))
    assert captures and sum(p.stat().st_size for p in captures) <= budget
    shots = [s.screenshot for s in report.steps]
    assert shots[0] is not None and None in shots  # kept while they fit, then no more
    assert len(captures) == len([s for s in shots if s is not None])
    # Every capture kept is a whole screenshot, and has its evidence image.
    record = audit_of(runtime, "raw-tight")
    for shot in filter(None, shots):
        with Image.open(tight.root / shot) as image:
            assert image.size == (1280, 800)
        assert shot in record.evidence


async def test_an_element_in_an_iframe_is_boxed_where_the_page_shows_it(
    browser_host: BrowserHost,
) -> None:
    # The acted element's own document is the iframe's; the script's regions are the page's.
    context = await browser_host.new_context()
    try:
        page = await context.new_page()
        await page.set_content(
            '<div id="dyn" style="position:absolute;left:40px;top:30px;width:120px;height:20px">'
            'CN-1</div><iframe style="position:absolute;top:200px" '
            'srcdoc="<button id=go>Go</button>"></iframe>'
        )
        button = page.frame_locator("iframe").locator("#go")
        await button.wait_for()
        box, dynamic = await measure(page, button, ["#dyn"])
        # The button where the capture shows it: in the page's viewport, below the iframe's top.
        seen = await button.bounding_box()
        assert box is not None and seen is not None and box.y >= 200
        assert (box.x, box.y, box.width, box.height) == (
            seen["x"],
            seen["y"],
            seen["width"],
            seen["height"],
        )
        assert [(b.x, b.y, b.width, b.height) for b in dynamic] == [(40, 30, 120, 20)]
        _, in_page = await measure(page, page.locator("#dyn"), ["#dyn"])
        assert in_page == dynamic
    finally:
        await context.close()


def _noisy_jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((640, 400), 40 + seed).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def test_a_capture_with_nothing_to_draw_is_kept_as_the_browser_encoded_it() -> None:
    raw = _noisy_jpeg(3)
    kept = prepare(raw, Mark(), "jpeg")
    assert kept.image == raw and kept.image_name == content_name(raw, "jpeg")
    assert (kept.width, kept.height, kept.box) == (640, 400, None)
    assert Image.open(io.BytesIO(kept.thumbnail)).size == (320, 200)
    # Something to draw is drawn: a box, or a failure's frame, means new pixels.
    boxed = prepare(raw, Mark(box=Box(x=20, y=30, width=200, height=40), label="x"), "jpeg")
    assert boxed.image != raw and boxed.box is not None
    assert prepare(raw, Mark(failure="timeout"), "jpeg").image != raw


def test_evidence_encoded_during_the_job_is_what_render_would_make() -> None:
    mark = Mark(box=Box(x=20, y=30, width=200, height=40), label="credit.amount · label=Amount")
    shots = [(_noisy_jpeg(1), mark), (_noisy_jpeg(2), Mark(failure="timeout"))]
    fresh = render(shots, fmt="jpeg", budget_bytes=10**8)
    ahead = render(
        shots,
        fmt="jpeg",
        budget_bytes=10**8,
        prepared=[prepare(raw, m, "jpeg") for raw, m in shots],
    )
    assert ahead == fresh
    # Within the budget at the first rung, what was prepared is kept as it is: not encoded again.
    done = Encoded(b"prepared", "p.jpg", b"thumb", "t.jpg", 640, 400, None)
    assert render(shots[:1], fmt="jpeg", budget_bytes=10**8, prepared=[done]).images == [done]
    # Over the budget, the ladder starts from the screenshots, not from what was prepared.
    big = Encoded(b"p" * fresh.total_bytes, "big.jpg", b"thumb", "t.jpg", 640, 400, None)
    tight = render(shots, fmt="jpeg", budget_bytes=fresh.total_bytes, prepared=[big, None])
    assert tight.quality < fresh.quality and all(i.image != big.image for i in tight.images)


async def test_the_record_keeps_prepared_evidence_only_while_its_mark_holds(
    tmp_path: Path,
) -> None:
    store = LocalArtifacts(tmp_path)
    sources = []
    for index, step in enumerate(("amount", "review"), start=1):
        path, rel = store.step_image("prep-job", index, step, ".jpg")
        path.write_bytes(_noisy_jpeg(index))
        sources.append(rel)
    box = Box(x=10, y=10, width=100, height=20)
    selector = MatchedSelector(element="credit.amount", candidate="label=Amount", index=0, box=box)
    steps = [
        StepReport(id="amount", action="fill", status=StepStatus.succeeded, selector=selector),
        StepReport(id="review", action="click", status=StepStatus.succeeded),
    ]
    steps[0].screenshot, steps[1].screenshot = sources
    report = JobReport(
        job_id="prep-job", status=JobStatus.succeeded, script="billing/x", steps=steps
    )
    store.prepare(sources[0], Mark(box=box, label="credit.amount · label=Amount"))
    store.prepare(sources[1], Mark(failure="timeout"))  # no longer what the step shows
    record = await store.record(report)
    assert record is not None
    for source in sources:
        raw = (tmp_path / source).read_bytes()
        expected = prepare(raw, screenshot_marks(report)[source], "jpeg")
        assert store.get(record.evidence[source].image) == expected.image, source
