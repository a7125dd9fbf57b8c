"""The handoff request: what a paused job tells the person (or customer) who must decide.

Pure: built from the job's report and the failure, so it can be tested without a browser.
"""

from __future__ import annotations

from worker.contract import (
    Decision,
    Failure,
    FailureCode,
    HandoffContext,
    HandoffEvidence,
    HandoffKind,
    HandoffRequest,
    JobReport,
    JobStatus,
    StepStatus,
)
from worker.script import Approval

_WHY = {
    FailureCode.validation_rejected: "the site rejected the values it was given",
    FailureCode.outcome_unknown: "a submission was sent but the site never confirmed it, and "
    "checking afterwards could not tell whether it took effect",
    FailureCode.selector_not_found: "the page no longer has an element the script needs",
    FailureCode.expectation_failed: "the page did not show what the script expected",
    FailureCode.unexpected_page: "the site showed a page the script does not know",
    FailureCode.auth_expired: "the site keeps asking to sign in again",
    FailureCode.credentials_rejected: "the site refused the worker's sign-in: its secrets may "
    "be wrong or out of date, or the account locked",
}


def handoff_request(
    report: JobReport,
    failure: Failure,
    status: JobStatus,
    input_names: list[str],
    why: str | None = None,
) -> HandoffRequest:
    """The request for a job paused with `status` because of `failure`; `why`, when the
    worker knows more than the failure's code says."""
    step_id = failure.step_id or ""
    step = next((s for s in report.steps if s.id == step_id), None)
    why = why or _WHY.get(failure.code, f"the step failed ({failure.code})")
    page_text = failure.evidence
    summary = f"{report.script} stopped at step '{step_id}': {why}"
    if page_text:
        summary += f'. The site says: "{page_text}"'
    kind = HandoffKind.handoff
    if status == JobStatus.needs_customer_input:
        kind = HandoffKind.customer_input
        fields = ", ".join(input_names) or "the details"
        proposed = "Ask the customer for corrected values, then resume with retry_with_inputs."
        response = (
            "We tried to complete your request, but our system did not accept it"
            + (f' ("{page_text}")' if page_text else "")
            + f". Could you check {fields} for us?"
        )
        allowed = [Decision.retry_with_inputs, Decision.abort]
    elif failure.code == FailureCode.outcome_unknown:
        proposed = (
            "Check the target system by hand: if the effect is there, resume with mark_done "
            "(and its outputs); if not, retry_step."
        )
        response = (
            "Your request has been submitted and is being confirmed by a colleague; "
            "we will let you know as soon as it is done."
        )
        allowed = [Decision.mark_done, Decision.retry_step, Decision.abort]
    else:
        proposed = (
            "Look at the evidence; retry_step if it was a passing problem, do the step by hand "
            "and skip_step, or finish the task by hand and mark_done."
        )
        response = "Your request is being handled by a colleague; we will update you shortly."
        allowed = [Decision.retry_step, Decision.skip_step, Decision.mark_done, Decision.abort]
    return HandoffRequest(
        kind=kind,
        status=status,
        reason=why,
        code=failure.code,
        step_id=step_id,
        summary=summary,
        detail=failure.message or None,
        evidence=HandoffEvidence(
            screenshot=step.screenshot if step else None,
            page_text=page_text,
            url=step.url if step else None,
        ),
        context=HandoffContext(
            script=report.script,
            script_version=report.script_version,
            inputs=report.inputs,
            outputs=report.outputs,
            completed_steps=[s.id for s in report.steps if s.status == StepStatus.succeeded],
        ),
        proposed_action=proposed,
        recommended_response=response,
        allowed_decisions=allowed,
    )


def approval_request(
    paused: HandoffRequest,
    approval: Approval,
    *,
    fields: dict[str, str],
    screenshot: str | None,
    url: str | None,
) -> HandoffRequest:
    """The request for a job stopped at an approval gate: the filled form, the exact values
    that will be sent, and why a person must say yes first."""
    values = ", ".join(f"{name} = {value}" for name, value in fields.items()) or "(no fields)"
    step = paused.step_id
    risk = approval.risk or (
        f"policy: {approval.when}" if approval.when else "this action always needs approval"
    )
    return paused.model_copy(
        update={
            "kind": HandoffKind.approval,
            "reason": f"{step} needs approval by {approval.role} before it is sent",
            "summary": f"{paused.context.script} is ready to send step '{step}' with {values}. "
            f"Nothing has been sent. Needs approval because: {risk}.",
            "evidence": HandoffEvidence(screenshot=screenshot, page_text=None, url=url),
            "proposed_action": f"Approve to send '{step}' exactly as filled ({values}); "
            "reject with a reason to end the job without touching the target system.",
            "recommended_response": "Your request is ready and waiting for a colleague's "
            "approval; we will confirm as soon as it is done.",
            "allowed_decisions": [Decision.approve, Decision.reject, Decision.abort],
            "role": approval.role,
            "risk": risk,
            "proposed_values": fields,
        }
    )
