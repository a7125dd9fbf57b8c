"""The wire contract: what the schema says a field is, the worker holds it to."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from arq import Worker
from pydantic import ValidationError
from redis.asyncio import Redis

from worker.client import FormworkClient
from worker.contract import BrowserJob, JobEvent, JobStatus, ResumeDecision, contract_schemas
from worker.keys import ARQ_JOB_PREFIX, JOB_FUNCTION
from worker.settings import Settings

from .conftest import CREDIT_INPUTS, Site


@pytest.mark.parametrize("field", ["dry_run", "har"])
@pytest.mark.parametrize("value", ["yes", "true", "false", 1, 0])
def test_a_jobs_boolean_fields_take_booleans_only(field: str, value: Any) -> None:
    # `"dry_run": "yes"` ran as a dry run: pydantic guessed, the schema says boolean.
    with pytest.raises(ValidationError) as info:
        BrowserJob.model_validate({"job_id": "j", "script": "billing/issue_credit", field: value})
    [error] = info.value.errors()
    assert error["loc"] == (field,) and error["msg"] == "Input should be a valid boolean"


@pytest.mark.parametrize("field", ["pause_timeout_s", "step_timeout_ms"])
@pytest.mark.parametrize(("value", "kind"), [(True, "a boolean"), ("100", "a string")])
def test_a_jobs_integer_fields_take_numbers_only(field: str, value: Any, kind: str) -> None:
    # `"pause_timeout_s": true` was a pause of 1 s: the approval never had a chance.
    with pytest.raises(ValidationError) as info:
        BrowserJob.model_validate_json(
            json.dumps({"job_id": "j", "script": "billing/issue_credit", field: value})
        )
    [error] = info.value.errors()
    assert error["loc"] == (field,) and error["msg"].endswith(f"must be a whole number, not {kind}")
    # A whole number written as a float (some encoders write every number so) is that number.
    job = {"job_id": "j", "script": "billing/issue_credit", field: 120.0}
    assert getattr(BrowserJob.model_validate_json(json.dumps(job)), field) == 120


def test_the_schema_of_a_jobs_boolean_fields_says_boolean() -> None:
    fields = contract_schemas()["BrowserJob"]["properties"]
    assert fields["dry_run"]["type"] == "boolean"
    assert fields["har"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    job = BrowserJob.model_validate_json(
        '{"job_id": "j", "script": "billing/issue_credit", "dry_run": true, "har": false}'
    )
    assert job.dry_run is True and job.har is False


def test_the_schema_of_a_decision_says_what_the_worker_refuses() -> None:
    # An orchestrator validating against `formwork schema` sent an approve carrying inputs, or
    # a reject with no reason: the schema passed them and the worker refused them.
    rules = contract_schemas()["ResumeDecision"]["allOf"]
    inputs, outputs, reject = rules
    assert inputs["if"]["properties"]["decision"] == {"not": {"const": "retry_with_inputs"}}
    assert inputs["then"]["properties"]["inputs"] == {"maxProperties": 0}
    assert outputs["if"]["properties"]["decision"] == {"not": {"enum": ["skip_step", "mark_done"]}}
    assert outputs["then"]["properties"]["outputs"] == {"maxProperties": 0}
    assert reject["if"]["properties"]["decision"] == {"const": "reject"}
    assert reject["then"]["required"] == ["note"]
    assert reject["then"]["properties"]["note"] == {"type": "string", "pattern": "\\S"}
    # The model refuses exactly these.
    with pytest.raises(ValidationError, match="approve takes no inputs"):
        ResumeDecision.model_validate({"decision": "approve", "inputs": {"amount": "1.00"}})
    with pytest.raises(ValidationError, match="abort takes no outputs"):
        ResumeDecision.model_validate({"decision": "abort", "outputs": {"n": "CN-1"}})
    with pytest.raises(ValidationError, match="needs a reason"):
        ResumeDecision.model_validate({"decision": "reject", "note": " "})
    ResumeDecision.model_validate({"decision": "mark_done", "outputs": {"n": "CN-1"}, "inputs": {}})


async def enqueue_raw(settings: Settings, payload: dict[str, Any]) -> None:
    """What an orchestrator in another language does: its own JSON, two Redis commands."""
    body = {"t": 1, "f": JOB_FUNCTION, "a": [payload], "k": {}, "et": int(time.time() * 1000)}
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.set(ARQ_JOB_PREFIX + payload["job_id"], json.dumps(body))
        await redis.zadd(f"{settings.key_prefix}:queue", {payload["job_id"]: time.time() * 1000})
    finally:
        await redis.aclose()


async def settled(client: FormworkClient, job_id: str) -> JobEvent:
    events = [event async for _, event in client.handle(job_id).events()]
    return events[-1]


async def test_a_job_whose_fields_would_be_guessed_is_rejected_before_any_browser_work(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    job = {"script": "billing/issue_credit", "inputs": CREDIT_INPUTS, "site_url": billing.url}
    refused = {
        "c-dry-yes": ({**job, "dry_run": "yes"}, "job_invalid", "dry_run: Input should be a"),
        "c-har-1": ({**job, "har": 1}, "job_invalid", "har: Input should be a valid boolean"),
        # Which instant a deadline without its offset means is a guess; it also failed the job
        # as an internal error of the worker's (comparing it with an aware clock).
        "c-naive-deadline": (
            {**job, "deadline": "2099-01-01T00:00:00"},
            "job_invalid",
            "deadline: Input should have timezone info",
        ),
        # A pause of `true` seconds was a pause of 1 s: expired before anyone could approve.
        "c-pause-true": (
            {**job, "inputs": {**CREDIT_INPUTS, "amount": "150.00"}, "pause_timeout_s": True},
            "job_invalid",
            "pause_timeout_s: Value error, must be a whole number, not a boolean",
        ),
        "c-step-text": (
            {**job, "step_timeout_ms": "5000"},
            "job_invalid",
            "step_timeout_ms: Value error, must be a whole number, not a string",
        ),
        "c-exponent": (
            {**job, "inputs": {**CREDIT_INPUTS, "amount": "1e1"}},
            "input_invalid",
            "input 'amount': a decimal is written in plain digits (like 100 or 0.05), not in "
            "exponent notation (got '1e1')",
        ),
        # The script declares `places: 2`: refused here, not by the form after it was filled.
        "c-places": (
            {**job, "inputs": {**CREDIT_INPUTS, "amount": "15.005"}},
            "input_invalid",
            "input 'amount': Decimal input should have no more than 2 decimal places",
        ),
    }
    for job_id, (payload, _, _) in refused.items():
        await enqueue_raw(settings, {**payload, "job_id": job_id})
    # A JSON number is an amount as its sender wrote it.
    number = {**job, "job_id": "c-number", "inputs": {**CREDIT_INPUTS, "amount": 15}}
    await enqueue_raw(settings, number)

    for job_id, (_, code, text) in refused.items():
        last = await asyncio.wait_for(settled(client, job_id), 60)
        assert last.status == JobStatus.rejected, job_id
        assert last.report is not None and last.report.error is not None
        assert last.report.error.code == code, job_id
        assert text in last.report.error.message, last.report.error.message
        assert all(step.started_at is None for step in last.report.steps), job_id
    last = await asyncio.wait_for(settled(client, "c-number"), 60)
    assert last.status == JobStatus.succeeded
    # Ground truth: one credit, of 15, from the one job that ran; none from the refused ones.
    [credit] = billing.credits()
    assert credit["amount"] == "15.00"


async def test_a_site_url_with_an_uppercase_scheme_is_the_same_site(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    # A scheme is case-insensitive; "HTTP://…" was refused as "must be an absolute http(s)
    # URL", which it is.
    url = "HTTP" + billing.url.removeprefix("http") + "/"
    job = {"job_id": "c-upper", "script": "billing/issue_credit", "inputs": CREDIT_INPUTS}
    await enqueue_raw(settings, {**job, "site_url": url})

    last = await asyncio.wait_for(settled(client, "c-upper"), 60)
    assert last.status == JobStatus.succeeded, last.report and last.report.error
    [credit] = billing.credits()
    assert credit["reference"] == CREDIT_INPUTS["reference"]


async def test_a_job_id_shaped_like_a_decision_message_s_is_refused(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    # `c-order.resume3` is the queue's id of the third decision about job `c-order`: a job
    # under it shared that entry, and its refusal, events and claims were read as c-order's.
    job = {"script": "billing/issue_credit", "inputs": CREDIT_INPUTS, "site_url": billing.url}
    with pytest.raises(ValidationError, match=r"must not end in '\.resume<N>'"):
        BrowserJob.model_validate({**job, "job_id": "c-order.resume3"})
    await enqueue_raw(settings, {**job, "job_id": "c-order.expire1"})

    last = await asyncio.wait_for(settled(client, "c-order.expire1"), 60)
    assert last.status == JobStatus.rejected
    assert last.report is not None and last.report.error is not None
    assert last.report.error.code == "job_invalid"
    assert "job_id: Value error, must not end in" in last.report.error.message
    assert await client.handle("c-order").status() is None  # nothing said about another job
    assert billing.credits() == []
    # `.resumes`, `.expired`: ordinary ids.
    assert BrowserJob.model_validate({**job, "job_id": "c-order.resumes"}).job_id


def test_a_webhook_url_with_an_uppercase_scheme_is_taken() -> None:
    # A scheme is case-insensitive; "HTTPS://…" was refused as not matching '^https?://'.
    job = {"job_id": "j", "script": "billing/issue_credit"}
    hook = BrowserJob.model_validate({**job, "webhook": {"url": "HTTPS://hooks.example/in"}})
    assert hook.webhook is not None and hook.webhook.url == "HTTPS://hooks.example/in"
