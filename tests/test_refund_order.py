"""orders/refund_order in real Chromium against the orders fixture: the wizard, the confirm()
dialog, the payment widget in a cross-origin iframe and the receipt upload — exactly one refund,
checked against the site's ground truth."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from arq import Worker

from worker.client import FormworkClient
from worker.contract import BrowserJob, FailureCode, JobReport, JobStatus, StepStatus, Verification
from worker.executor import Runtime, run_job
from worker.script import ScriptStore

from .conftest import SCRIPTS, SELECTORS, UPLOADS, Site

RECEIPT = "receipt-ord-100231.png"
REFUND_INPUTS = {
    "order_id": "ORD-100231",
    "sku": "MUG-RED",
    "reason": "damaged",
    "reference": "T-5001",
    "method": "store_credit",
    "receipt": RECEIPT,
}


def refund_job(site: Site, job_id: str = "refund-1", **inputs: str) -> BrowserJob:
    return BrowserJob(
        job_id=job_id,
        script="orders/refund_order",
        inputs={**REFUND_INPUTS, **inputs},
        site_url=site.url,
    )


def upload_copies() -> list[Path]:
    """The private copies of uploads (`worker.uploads.stage_upload`) left on this machine."""
    return list(Path(tempfile.gettempdir()).glob("formwork-upload-*"))


def step(report: JobReport, step_id: str) -> Any:
    return next(s for s in report.steps if s.id == step_id)


async def test_refund_wizard_dialog_iframe_and_upload_refund_exactly_once(
    orders: Site, runtime: Runtime
) -> None:
    report = await run_job(refund_job(orders), runtime)

    assert report.status == JobStatus.succeeded, report.error
    (refund,) = orders.refunds()
    assert (refund["order_id"], refund["skus"], refund["amount"]) == (
        "ORD-100231",
        ["MUG-RED"],
        "12.50",
    )
    assert (refund["reason"], refund["reference"], refund["method"]) == (
        "damaged",
        "T-5001",
        "store_credit",
    )
    # The bytes the site received are the file in the uploads directory.
    content = (UPLOADS / RECEIPT).read_bytes()
    assert refund["receipt"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert refund["receipt"]["filename"] == RECEIPT
    assert report.outputs == {"refund_number": refund["refund_id"]}
    # The confirm() was answered as declared, and its text is evidence in the report.
    submit = step(report, "submit")
    (dialog,) = submit.dialogs
    assert (dialog.type, dialog.action, dialog.expected) == ("confirm", "accepted", True)
    assert dialog.message == (
        "Refund $12.50 to Store credit for order ORD-100231? This cannot be undone."
    )
    assert submit.verified == Verification.postcondition and submit.attempts == 1
    # The method was chosen inside the provider's iframe.
    method = step(report, "method")
    assert method.selector.candidate.startswith("frame=iframe#payment-widget >> ")
    assert step(report, "receipt").selector.element == "refund.receipt"
    effect = next(c for c in report.claims if c.kind == "effect")
    assert effect.verified and effect.value.endswith(refund["refund_id"])
    assert all(not s.dialogs for s in report.steps if s.id != "submit")


async def test_refund_commit_dropped_after_creating_is_verified_not_resent(
    orders: Site, runtime: Runtime
) -> None:
    orders.faults(commit_drop={"create": True, "mode": "error", "status": 502})
    report = await run_job(refund_job(orders), runtime)

    assert report.status == JobStatus.succeeded, report.error
    submit = step(report, "submit")
    assert (submit.verified, submit.attempts) == (Verification.probe, 1)
    assert [(r.step_id, r.action) for r in report.rules_fired] == [("submit", "verify_effect")]
    (refund,) = orders.refunds()
    assert report.outputs["refund_number"] == refund["refund_id"]
    assert step(report, "confirmation").status == StepStatus.skipped


async def test_refund_commit_dropped_before_creating_is_redone_once(
    orders: Site, runtime: Runtime
) -> None:
    orders.faults(commit_drop={"create": False, "mode": "error", "status": 503})
    report = await run_job(refund_job(orders), runtime)

    assert report.status == JobStatus.succeeded, report.error
    assert [r.action for r in report.rules_fired] == ["verify_effect", "retry_from"]
    assert step(report, "search").attempts == 2  # the wizard was walked again, from the search
    (refund,) = orders.refunds()
    assert report.outputs["refund_number"] == refund["refund_id"]


async def test_markup_skin_v2_is_handled_by_fallbacks_and_recorded_as_drift(
    orders: Site, runtime: Runtime
) -> None:
    orders.faults(skin="v2")
    report = await run_job(refund_job(orders), runtime)

    assert report.status == JobStatus.succeeded, report.error
    drifted = {s.id: s.drift for s in report.steps if s.drift is not None}
    assert set(drifted) == {"start", "reason", "reference", "receipt", "reason_next", "submit"}
    assert drifted["submit"].expected == "role=button[name='Submit refund']"
    assert drifted["submit"].used == "role=button[name='Confirm refund']"
    assert len(orders.refunds()) == 1


def without_dialog_answer(tmp_path: Path) -> ScriptStore:
    """The real tree, with the submit step no longer declaring its dialog."""
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    script = tmp_path / "scripts" / "orders" / "refund_order.yaml"
    lines = script.read_text().splitlines(keepends=True)
    script.write_text("".join(line for line in lines if "dialog: {action" not in line))
    return ScriptStore(tmp_path / "scripts", SELECTORS)


async def test_an_unexpected_confirm_is_dismissed_and_never_submits(
    orders: Site, runtime: Runtime, tmp_path: Path
) -> None:
    runtime.scripts = without_dialog_answer(tmp_path)
    report = await run_job(refund_job(orders), runtime)

    # Dismissed every time, so nothing was refunded; the probe saw that, and a person decides.
    assert orders.refunds() == []
    assert report.status == JobStatus.paused_for_handoff
    submit = step(report, "submit")
    assert submit.dialogs and all(
        (d.action, d.expected) == ("dismissed", False) for d in submit.dialogs
    )
    first = submit.attempt_log[0].failure
    assert first is not None and first.code == FailureCode.outcome_unknown
    assert "unexpected confirm dialog" in first.message
    assert first.evidence is not None and first.evidence.startswith("Refund $12.50")


async def test_a_receipt_outside_the_uploads_directory_is_rejected_before_the_browser(
    orders: Site, runtime: Runtime
) -> None:
    for name in ("../secrets.yaml", "missing.png"):
        report = await run_job(refund_job(orders, receipt=name), runtime)
        assert report.status == JobStatus.rejected
        assert report.error is not None and report.error.code == FailureCode.input_invalid
        assert report.error.field == "inputs.receipt"
    assert orders.state()["requests"] == 0


async def test_an_empty_receipt_is_rejected_before_the_browser(
    orders: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # A 0-byte file (staged while still being written, a failed copy) went up, the site took
    # it, and the job reported a refund whose receipt was nothing.
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "empty.png").write_bytes(b"")

    report = await run_job(
        refund_job(orders, receipt="empty.png"), dataclasses.replace(runtime, uploads=uploads)
    )

    assert report.status == JobStatus.rejected
    assert report.error is not None and report.error.code == FailureCode.input_invalid
    assert report.error.field == "inputs.receipt"
    assert "upload file 'empty.png' is empty (0 bytes)" in report.error.message
    assert orders.state()["requests"] == 0 and orders.refunds() == []


async def test_refund_through_the_queue_uses_the_workers_uploads_directory(
    orders: Site, client: FormworkClient, worker: Worker
) -> None:
    handle = await client.enqueue(refund_job(orders, "q-refund"))
    report = await handle.wait(timeout_s=60)

    assert report.status == JobStatus.succeeded, report.error
    (refund,) = orders.refunds()
    assert refund["receipt"]["filename"] == RECEIPT


async def test_a_refused_refund_asks_the_customer_without_naming_another_system(
    orders: Site, runtime: Runtime
) -> None:
    # The request's customer response named "our billing system" whatever the site: an
    # agent passing it on told an orders customer about billing.
    rule = {"field": "reference", "value": "T-5001", "message": "Reference already used"}
    orders.faults(reject_value=[rule])
    report = await run_job(refund_job(orders, "refund-asks"), runtime)

    assert report.status == JobStatus.needs_customer_input, report.error
    assert report.handoff is not None
    response = report.handoff.recommended_response
    assert "billing" not in response
    assert response.startswith("We tried to complete your request, but our system did not")
    assert '("Reference already used")' in response
    assert orders.refunds() == []


async def test_a_receipt_of_the_largest_size_the_site_takes_goes_up_in_a_moment(
    orders: Site, runtime: Runtime, tmp_path: Path
) -> None:
    # The bytes went to the page through Playwright's protocol, at about a second per MB: a
    # 5 MB receipt took most of a step's timeout, and one near the worker's 25 MB limit
    # failed every attempt, for minutes each (the timeout does not cut the transfer short).
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    content = (UPLOADS / RECEIPT).read_bytes()
    content += bytes(range(256)) * ((5 * 1024 * 1024 - len(content)) // 256)
    (uploads / "big-receipt.png").write_bytes(content)

    report = await run_job(
        refund_job(orders, receipt="big-receipt.png"),
        dataclasses.replace(runtime, uploads=uploads),
    )

    assert report.status == JobStatus.succeeded, report.error
    assert step(report, "receipt").duration_ms < 2500
    (refund,) = orders.refunds()
    assert refund["receipt"]["filename"] == "big-receipt.png"
    assert refund["receipt"]["size"] == len(content)
    assert refund["receipt"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert refund["receipt"]["content_type"] == "image/png"
    # The job's private copy is gone with the job.
    assert upload_copies() == []


async def test_a_form_posted_to_its_own_address_is_filled_again_after_a_502(
    orders: Site, runtime: Runtime
) -> None:
    # The reason step posts to the address it was read from: the 502 page had the form's URL,
    # so the retry took it for the form and clicked for a button the error page does not have.
    orders.faults(fail=[{"path_contains": "/reason", "method": "POST", "status": 502}])
    report = await run_job(refund_job(orders), runtime)

    assert report.status == JobStatus.succeeded, report.error
    assert step(report, "reason_next").attempts == 2
    assert [r.action for r in report.rules_fired] == ["retry"]
    (refund,) = orders.refunds()
    assert (refund["reason"], refund["reference"]) == ("damaged", "T-5001")
    assert refund["receipt"]["filename"] == RECEIPT


async def test_a_search_or_payment_call_answered_503_is_retried_not_handed_to_a_person(
    orders: Site, runtime: Runtime
) -> None:
    # The page's own fetch() failed, once: the page showed "Search failed" (or nothing at all,
    # in the provider's widget), and the job waited for a person over a passing hiccup.
    for path in ("/api/orders", "/provider/authorize"):
        orders.reset()
        orders.faults(fail=[{"path_contains": path, "status": 503}])
        job = refund_job(orders, job_id=f"refund-{path[1:4]}")
        report = await run_job(job.model_copy(update={"step_timeout_ms": 3000}), runtime)

        assert report.status == JobStatus.succeeded, (path, report.error)
        (fired,) = report.rules_fired
        assert (fired.code, fired.action) == (FailureCode.server_error, "retry")
        assert step(report, fired.step_id).attempts == 2
        assert len(orders.refunds()) == 1


async def test_a_payment_widget_that_got_no_answer_is_loaded_again_not_handed_to_a_person(
    orders: Site, runtime: Runtime
) -> None:
    # The review page came, its provider's iframe did not (the connection was reset): the
    # method was looked for in Chromium's error page inside the frame, and the job waited for a
    # person as if the widget had been redesigned.
    orders.faults(fail=[{"path_contains": "/provider/widget", "mode": "reset"}])
    job = refund_job(orders).model_copy(update={"step_timeout_ms": 3000})
    report = await run_job(job, runtime)

    assert report.status == JobStatus.succeeded, report.error
    (fired,) = report.rules_fired
    assert (fired.step_id, fired.code, fired.action) == (
        "method",
        FailureCode.network_error,
        "retry",
    )
    assert step(report, "method").attempts == 2
    (refund,) = orders.refunds()
    assert refund["method"] == "store_credit"
