"""The wire contract: what an orchestrator sends (`BrowserJob`) and gets back (`JobReport`).

Field names here are a public contract shared with orchestrators written in other languages
(`formwork schema` exports them as JSON Schema): rename nothing without a new contract version.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

CONTRACT_VERSION = 1

# A script reference is `site/name` with an optional pinned version: `billing/issue_credit@3`.
SCRIPT_REF = re.compile(r"^(?P<name>[a-z0-9_]+/[a-z0-9_]+)(?:@(?P<version>[0-9]+))?$")
JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# The arq ids of a job's own messages: `<job_id>.resume<N>` (a decision), `<job_id>.expire<N>`
# (a pause's deadline); see worker.keys.message_id. No job may have one.
MESSAGE_ID = r"^(?P<job>.+)\.(?:resume|expire)\d+$"


class _Model(BaseModel):
    # Unknown fields are an error on the wire: a typo in an orchestrator must not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=False)


class JobStatus(StrEnum):
    """Where a job is. Terminal statuses never change again."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    rejected = "rejected"  # refused before any browser work: bad payload, script or inputs
    cancelled = "cancelled"
    # A person must decide (an operator), or the customer must supply a value. The job holds
    # no browser while it waits.
    paused_for_handoff = "paused_for_handoff"
    needs_customer_input = "needs_customer_input"
    # A commit step that needs a person's approval first; the form is filled, nothing sent.
    awaiting_approval = "awaiting_approval"
    expired = "expired"  # paused, and no decision came before the pause deadline
    rejected_by_approver = "rejected_by_approver"  # an approval gate said no: nothing was sent

    @property
    def terminal(self) -> bool:
        """Ended for good: nothing more will happen to this job."""
        return self not in (
            JobStatus.queued,
            JobStatus.running,
            JobStatus.paused_for_handoff,
            JobStatus.needs_customer_input,
            JobStatus.awaiting_approval,
        )

    @property
    def paused(self) -> bool:
        return self in (
            JobStatus.paused_for_handoff,
            JobStatus.needs_customer_input,
            JobStatus.awaiting_approval,
        )

    @property
    def settled(self) -> bool:
        """No worker is working on it: ended, or waiting for a person."""
        return self.terminal or self.paused


class Routing(StrEnum):
    """How the script version a job ran was chosen."""

    pinned = "pinned"  # the job named it: `billing/issue_credit@3`
    stable = "stable"  # the rollout's stable version (or the highest, without a rollout file)
    canary = "canary"  # the rollout's canary version, for this job's share of traffic


class StepStatus(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"


class FailureCode(StrEnum):
    """Stable, machine-readable failure codes: the value an orchestrator branches on."""

    # Refused before the browser: the job, script, inputs or secrets are wrong.
    job_invalid = "job_invalid"
    script_invalid = "script_invalid"
    script_not_found = "script_not_found"
    input_invalid = "input_invalid"
    secret_missing = "secret_missing"
    # Transient: worth retrying.
    timeout = "timeout"
    network_error = "network_error"
    server_error = "server_error"
    browser_crashed = "browser_crashed"
    # The page did not do what the script expected.
    selector_not_found = "selector_not_found"
    expectation_failed = "expectation_failed"
    navigation_failed = "navigation_failed"
    navigation_blocked = "navigation_blocked"
    validation_rejected = "validation_rejected"
    auth_expired = "auth_expired"
    # Signing in failed: the site showed its sign-in form again, after the credentials were
    # sent. Another try sends the same values (and may lock the account): a person decides.
    credentials_rejected = "credentials_rejected"
    unexpected_page = "unexpected_page"
    outcome_unknown = "outcome_unknown"
    script_error = "script_error"
    cancelled = "cancelled"
    # Not failures of the site: a gate in the script that a person answers.
    approval_required = "approval_required"
    rejected_by_approver = "rejected_by_approver"
    # The artifact store (disk, S3) could not be read or written; the job's outcome stands.
    storage_error = "storage_error"


class Failure(_Model):
    """Why a step or a job failed: a code to branch on, a message for people, page evidence."""

    code: FailureCode
    message: str
    evidence: str | None = Field(
        default=None, description="Text read from the page that shows the failure, if any."
    )
    step_id: str | None = None
    field: str | None = Field(
        default=None, description="For rejected jobs: the payload or input field at fault."
    )


class BrowserJob(_Model):
    """One request from an orchestrator: run a scripted form action with these inputs."""

    job_id: str = Field(pattern=JOB_ID)
    script: str = Field(description="`site/name`, optionally pinned: `billing/issue_credit@1`.")
    inputs: dict[str, Any] = Field(default_factory=dict)
    site_url: str | None = Field(
        default=None, description="Base URL override for the script's site (tests, staging)."
    )
    idempotency_key: str | None = Field(
        default=None,
        max_length=200,
        description="The orchestrator's reference for the effect (e.g. its ticket id); "
        "the same key is never executed twice. Not blank: leave it out for no key.",
        json_schema_extra={"pattern": "\\S"},
    )
    # Aware only: a naive one, compared with the worker's clock, failed the job as an internal
    # error of the worker's (TypeError), and which instant it meant would be a guess.
    deadline: AwareDatetime | None = Field(
        default=None,
        description="Past this instant the job is not started (or is stopped); with its UTC "
        "offset (`Z` or `+01:00`).",
    )
    correlation: dict[str, str] = Field(
        default_factory=dict,
        description="The orchestrator's own ids (conversation, ticket, agent run), echoed back.",
    )
    webhook: WebhookTarget | None = None
    pause_timeout_s: int | None = Field(
        default=None,
        gt=0,
        le=30 * 24 * 3600,
        description="How long a pause may wait for a decision before the job ends `expired` "
        "(the script's `pause_timeout_s` otherwise).",
    )
    # Booleans are strict: lax pydantic would run `"dry_run": "yes"` (or "no", or 1) as
    # whatever it guessed, and the schema says boolean.
    dry_run: bool = Field(
        default=False,
        strict=True,
        description="Run up to the first commit step and stop there: nothing is submitted; the "
        "report says what would have been (`would_submit`), with the evidence screenshot.",
    )
    step_timeout_ms: int | None = Field(
        default=None,
        gt=0,
        le=600_000,
        description="How long each browser action may wait; the script's value otherwise.",
    )
    har: bool | None = Field(
        default=None,
        strict=True,
        description="Record the job's network traffic as a HAR (credentials and secret values "
        "scrubbed) for offline replay; the script's `har:` otherwise.",
    )
    trace: TraceMode | None = Field(
        default=None,
        description="Keep a Playwright trace of this job: off, on_failure, always "
        "(the script's `trace` otherwise).",
    )

    @field_validator("script")
    @classmethod
    def _script_ref(cls, value: str) -> str:
        if not SCRIPT_REF.match(value):
            raise ValueError("must look like 'site/name' or 'site/name@version'")
        return value

    @field_validator("pause_timeout_s", "step_timeout_ms", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        # Lax pydantic took `true` for 1 (a pause that expired a second after it began, a 1 ms
        # step timeout) and `"100"` for 100. A whole float (`100.0`, as some JSON encoders write
        # every number) is still the number it says.
        if isinstance(value, bool | str):
            kind = "a boolean" if isinstance(value, bool) else "a string"
            raise ValueError(f"must be a whole number, not {kind}")
        return value

    @field_validator("job_id")
    @classmethod
    def _not_a_message_id(cls, value: str) -> str:
        # Such an id is the queue's name for another job's decision (`order.resume3` is the
        # third decision about job `order`): the two would share one arq entry, and the job's
        # events and claims were read as job `order`'s.
        if re.match(MESSAGE_ID, value):
            raise ValueError(
                "must not end in '.resume<N>' or '.expire<N>': those are the ids of a job's "
                "decision and expiry messages"
            )
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _idempotency_key(cls, value: str | None) -> str | None:
        # A blank key is a missing one in many orchestrators' languages (Go's zero string):
        # taken as a key, it made every job sent with it a duplicate of the first, refused for
        # the key's 7 days; the Python client meanwhile took it for no key and said `created`.
        if value is not None and not value.strip():
            raise ValueError("must not be blank: leave it out (or null) for a job with no key")
        return value

    @field_validator("site_url")
    @classmethod
    def _site_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value, re.IGNORECASE):
            raise ValueError("must be an absolute http(s) URL")
        if value is not None and "@" in urlsplit(value).netloc:
            # `http://name@host`: a user name (or name:password) before the host, which a
            # reader takes for the host; sign-in credentials come from the worker's secrets.
            raise ValueError("must not carry a user name or password before its host ('…@')")
        if value is None:
            return value
        # A scheme is case-insensitive (`HTTP://`, as some URL builders write it): refused as
        # "not an absolute http(s) URL", which it is. Lowercased for whatever joins paths to it.
        scheme, rest = value.split("://", 1)
        return f"{scheme.lower()}://{rest}".rstrip("/")

    @property
    def script_name(self) -> str:
        match = SCRIPT_REF.match(self.script)
        assert match  # validated above
        return match["name"]

    @property
    def site(self) -> str:
        return self.script_name.split("/", 1)[0]

    @property
    def script_version(self) -> int | None:
        match = SCRIPT_REF.match(self.script)
        assert match
        return int(match["version"]) if match["version"] else None


class WebhookTarget(_Model):
    """Where to POST this job's events, signed with the worker's webhook secret."""

    # Any case: a scheme is case-insensitive (RFC 3986), and `HTTPS://` is how some write it.
    url: str = Field(pattern=r"^(?i:https?)://[^/\s]+")


class Box(_Model):
    """A rectangle in the page's viewport, in CSS pixels from its top-left corner (the
    screenshot's pixels at device scale 1)."""

    x: float
    y: float
    width: float = Field(ge=0)
    height: float = Field(ge=0)


class MatchedSelector(_Model):
    """Which candidate of a logical element matched on the page."""

    element: str
    candidate: str
    index: int = Field(description="0 = the primary candidate; higher = a fallback was used.")
    box: Box | None = Field(
        default=None,
        description="Where the element was after the step, as the step's screenshot shows it; "
        "None when the step left the page (a click that navigated).",
    )


class TraceMode(StrEnum):
    """When a job's Playwright trace is kept."""

    off = "off"
    on_failure = "on_failure"  # kept when the job did not succeed
    always = "always"


class RuleAction(StrEnum):
    """What to do when a step fails with a given code."""

    retry = "retry"
    alternate = "alternate"
    relogin = "relogin"
    handoff = "handoff"
    ask_customer = "ask_customer"
    fail = "fail"


class Verification(StrEnum):
    """How a step's success (or a claim) was established."""

    postcondition = "postcondition"  # the step's `expect` held on the page
    probe = "probe"  # the script's verify_effect probe found the effect after the fact
    none = "none"  # the action ran; nothing on the page confirmed it
    manual = "manual"  # a person did it by hand and said so (a mark_done decision)


class Attempt(_Model):
    """One try of a step."""

    number: int
    started_at: datetime
    duration_ms: float
    failure: Failure | None = None
    wait_ms: float | None = Field(default=None, description="Waited before the next attempt.")
    screenshot: str | None = None


class SelectorDrift(_Model):
    """The primary candidate of an element no longer matched; a fallback did."""

    element: str
    expected: str
    used: str


class DialogSeen(_Model):
    """A JavaScript dialog (alert, confirm, prompt, beforeunload) the page opened in a step."""

    type: str = Field(description="alert, confirm, prompt or beforeunload.")
    message: str = Field(description="The dialog's text, as the site showed it (redacted).")
    action: Literal["accepted", "dismissed"]
    expected: bool = Field(
        description="Whether the step declared it (`dialog:`); an unexpected dialog is "
        "dismissed, never accepted, and fails the step."
    )


class RuleFired(_Model):
    """A failure rule that changed the course of the job, and why."""

    step_id: str
    code: FailureCode
    action: str = Field(
        description="retry, alternate, relogin, handoff, ask_customer, fail, "
        "verify_effect (a commit step's probe), or continue (an abort or the deadline came "
        "after a commit was sent: the job finished instead)."
    )
    reason: str
    at: datetime


class Claim(_Model):
    """Something the orchestrator may tell the customer, and whether the site confirmed it."""

    kind: Literal["output", "effect"]
    name: str
    value: str
    verified: bool
    how: Verification
    source: str | None = Field(
        default=None, description="Where it was read: element, candidate and page URL."
    )
    step_id: str | None = None
    screenshot: str | None = None


class Decision(StrEnum):
    """What a person may decide about a paused job."""

    retry_step = "retry_step"
    retry_with_inputs = "retry_with_inputs"
    skip_step = "skip_step"
    mark_done = "mark_done"
    abort = "abort"
    approve = "approve"
    reject = "reject"


# What ResumeDecision's validators refuse, said in its JSON Schema as well: an orchestrator in
# another language validates against `formwork schema` and would otherwise send an `approve`
# carrying inputs, or a `reject` with no reason, only to have the worker refuse it.
_DECISION_RULES: dict[str, Any] = {
    "allOf": [
        {
            "if": {"properties": {"decision": {"not": {"const": "retry_with_inputs"}}}},
            "then": {"properties": {"inputs": {"maxProperties": 0}}},
        },
        {
            "if": {"properties": {"decision": {"not": {"enum": ["skip_step", "mark_done"]}}}},
            "then": {"properties": {"outputs": {"maxProperties": 0}}},
        },
        {
            "if": {"properties": {"decision": {"const": "reject"}}},
            "then": {
                "required": ["note"],
                "properties": {"note": {"type": "string", "pattern": "\\S"}},
            },
        },
    ]
}


class ResumeDecision(_Model):
    """A person's (or the customer's) answer to a paused job."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_DECISION_RULES)

    decision: Decision
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="retry_with_inputs only: the corrected inputs."
    )
    outputs: dict[str, str] = Field(
        default_factory=dict, description="skip_step / mark_done only: outputs the person supplies."
    )
    note: str | None = Field(
        default=None, max_length=2000, description="Why; required for `reject`."
    )
    by: str = Field(default="unknown", max_length=200, description="Who decided.")

    @model_validator(mode="after")
    def _reject_says_why(self) -> ResumeDecision:
        if self.decision == Decision.reject and not (self.note and self.note.strip()):
            raise ValueError("a reject decision needs a reason (note)")
        return self

    @model_validator(mode="after")
    def _values_only_where_used(self) -> ResumeDecision:
        # Inputs carried by any other decision used to be merged into the job all the same:
        # an `approve` with inputs sent values the approver never saw.
        if self.inputs and self.decision != Decision.retry_with_inputs:
            raise ValueError(f"{self.decision} takes no inputs: only retry_with_inputs does")
        if self.outputs and self.decision not in (Decision.skip_step, Decision.mark_done):
            raise ValueError(f"{self.decision} takes no outputs: only skip_step and mark_done do")
        return self


class DecisionRecord(_Model):
    """A decision as recorded in the report."""

    decision: Decision
    step_id: str | None = None
    by: str
    at: datetime
    note: str | None = None
    inputs_changed: list[str] = Field(default_factory=list)
    outputs_given: list[str] = Field(default_factory=list)
    request: HandoffRequest | None = Field(
        default=None,
        description="The request the decision answered, as the person saw it: the report's "
        "own `handoff` is cleared once the job goes on, and the audit trail keeps it here.",
    )


class HandoffEvidence(_Model):
    screenshot: str | None = Field(default=None, description="Relative to the artifacts root.")
    page_text: str | None = Field(default=None, description="What the page said, redacted.")
    url: str | None = None


class HandoffContext(_Model):
    script: str
    script_version: int | None = None
    inputs: dict[str, Any] = Field(default_factory=dict, description="Secret ones as '***'.")
    outputs: dict[str, str] = Field(default_factory=dict)
    completed_steps: list[str] = Field(default_factory=list)


class HandoffKind(StrEnum):
    handoff = "handoff"  # something went wrong that a person must look at
    customer_input = "customer_input"  # the customer must supply a corrected value
    approval = "approval"  # an approval gate before a commit step


class HandoffRequest(_Model):
    """Everything a person needs to decide about a paused job, without opening anything else."""

    kind: HandoffKind = HandoffKind.handoff
    status: JobStatus
    reason: str
    code: FailureCode
    step_id: str
    summary: str
    detail: str | None = Field(
        default=None,
        description="The failure as the worker saw it (which element, which value; redacted).",
    )
    evidence: HandoffEvidence
    context: HandoffContext
    proposed_action: str
    recommended_response: str = Field(description="What the agent may tell the customer now.")
    allowed_decisions: list[Decision]
    expires_at: datetime | None = Field(
        default=None, description="Without a decision by then, the job ends `expired`."
    )
    role: str | None = Field(default=None, description="Approval: who may approve (a role).")
    risk: str | None = Field(default=None, description="Approval: why a person must approve.")
    proposed_values: dict[str, str] = Field(
        default_factory=dict,
        description="Approval: the exact values on the form that will be submitted; secrets '***'.",
    )


class WouldSubmit(_Model):
    """A dry run's result: the commit it stopped before, and the values on the form."""

    step_id: str
    fields: dict[str, str] = Field(description="Element -> value entered; secrets as '***'.")
    url: str | None = None
    screenshot: str | None = None


class StepReport(_Model):
    """The precise state of one step."""

    id: str
    action: str
    status: StepStatus = StepStatus.pending
    attempts: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: float | None = None
    selector: MatchedSelector | None = None
    entered: str | None = Field(
        default=None,
        description="What a fill or select step put in its element: the value typed or the "
        "option chosen; '***' for a secret.",
    )
    url_before: str | None = None
    url: str | None = Field(default=None, description="The page URL after the step.")
    screenshot: str | None = Field(
        default=None, description="Path of the step's screenshot, relative to the artifacts root."
    )
    failure: Failure | None = None
    commit: bool = Field(default=False, description="A side-effecting step: never sent twice.")
    verified: Verification | None = None
    drift: SelectorDrift | None = None
    recovered_by: str | None = Field(
        default=None, description="For a failed step the job got past: the rule that did it."
    )
    attempt_log: list[Attempt] = Field(default_factory=list)
    dynamic: list[Box] = Field(
        default_factory=list,
        description="Where the script's dynamic elements (dates, generated numbers) are on the "
        "step's screenshot: replay masks them before comparing.",
    )
    dialogs: list[DialogSeen] = Field(
        default_factory=list, description="JavaScript dialogs the page opened, and the answer."
    )


class Interruption(_Model):
    """A run of the job that ended without finishing it (its worker died or was stopped, or
    its browser crashed)."""

    detected_at: datetime = Field(description="When a later run picked the job up again.")
    run: int = Field(description="The number of the run that took over (2 for the first).")
    last_checkpoint: str | None = Field(
        default=None, description="The last step the interrupted run completed."
    )
    resumed_at: str | None = Field(default=None, description="The step the new run went on at.")
    checkpoint_at: datetime | None = None
    redone: list[str] = Field(
        default_factory=list,
        description="Completed steps run again only to rebuild the page (refilling a form the "
        "dead browser held); never a commit.",
    )


class Artifacts(_Model):
    root: str = Field(description="Absolute path of the artifacts root on the worker.")
    path: str = Field(description="This job's directory, relative to the root.")
    report: str = Field(description="The report file, relative to the root.")
    har: str | None = Field(default=None, description="The scrubbed HAR, relative to the root.")
    audit: str | None = Field(
        default=None, description="The job's audit record (audit.json), relative to the root."
    )


class JobReport(_Model):
    """Everything an orchestrator needs to know about one job, step by step."""

    contract_version: int = CONTRACT_VERSION
    job_id: str
    status: JobStatus
    script: str
    script_version: int | None = None
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="The inputs used, secret ones replaced by '***'."
    )
    outputs: dict[str, str] = Field(default_factory=dict)
    steps: list[StepReport] = Field(default_factory=list)
    artifacts: Artifacts | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: float | None = None
    error: Failure | None = None
    correlation: dict[str, str] = Field(default_factory=dict)
    script_digest: str | None = Field(
        default=None, description="SHA-256 of the script, its sub-flows and its site registry."
    )
    routing: Routing | None = Field(
        default=None, description="How script_version was chosen: pinned, stable or canary."
    )
    rules_fired: list[RuleFired] = Field(default_factory=list)
    claims: list[Claim] = Field(default_factory=list)
    dry_run: bool = False
    would_submit: WouldSubmit | None = None
    handoff: HandoffRequest | None = Field(
        default=None, description="Set while the job waits for a person or the customer."
    )
    decisions: list[DecisionRecord] = Field(default_factory=list)
    interruptions: list[Interruption] = Field(default_factory=list)


class EventKind(StrEnum):
    job = "job"
    step = "step"
    rollout = "rollout"  # a script's rollout changed (global stream only; `rollout` says how)


class RolloutAction(StrEnum):
    rolled_back = "rolled_back"  # unpinned jobs go to stable only; the canary gets none
    promoted = "promoted"  # the canary is the stable version now
    reset = "reset"  # back to what the rollout file says


class RolloutChange(_Model):
    """A change of a script's rollout: automatic rollback, or an operator's promote/rollback."""

    script: str
    action: RolloutAction
    stable: int = Field(description="The version unpinned jobs go to from now on.")
    canary: int | None = Field(default=None, description="The canary version concerned.")
    reason: str
    by: str = Field(description="'worker' for an automatic rollback, else who did it.")


class JobEvent(_Model):
    """One transition of a job or one of its steps, as published on the job's event stream."""

    seq: int = Field(description="1, 2, 3… per job: monotonically increasing, no gaps.")
    job_id: str
    kind: EventKind
    status: str = Field(description="The JobStatus or StepStatus after the transition.")
    at: datetime
    step: StepReport | None = None
    report: JobReport | None = Field(
        default=None, description="The full report, on the job's terminal event only."
    )
    message: str | None = None
    rollout: RolloutChange | None = Field(
        default=None,
        description="On `rollout` events (seq 0; job_id: the job whose outcome triggered an "
        "automatic rollback, or '-').",
    )

    @property
    def terminal(self) -> bool:
        return self.kind == EventKind.job and JobStatus(self.status).terminal

    @property
    def settled(self) -> bool:
        """The job ended or is waiting for a person: a watcher can stop here."""
        return self.kind == EventKind.job and JobStatus(self.status).settled


def contract_schemas() -> dict[str, Any]:
    """JSON Schemas of every model on the wire, keyed by model name."""
    models: list[type[BaseModel]] = [BrowserJob, JobReport, StepReport, JobEvent, ResumeDecision]
    return {model.__name__: model.model_json_schema() for model in models}
