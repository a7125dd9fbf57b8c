"""Checkpoints: left after every completed step, the browser session sealed at rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from arq import Worker
from redis.asyncio import Redis

from worker.browser import BrowserHost
from worker.checkpoint import CHECKPOINT_FIELD, JOB_FIELD, RedisCheckpoints, StateCipher
from worker.client import FormworkClient
from worker.contract import BrowserJob, JobReport, JobStatus, ResumeDecision
from worker.keys import Keys
from worker.queue import running_worker
from worker.settings import Settings

from .conftest import CREDIT_INPUTS, Site, signing_in_as_the_agent
from .test_handoff import paused_job


async def test_a_paused_job_leaves_a_checkpoint_with_its_session_sealed(
    billing: Site, client: FormworkClient, worker: Worker, settings: Settings
) -> None:
    await paused_job(billing, client, "c-sealed")
    keys = Keys(settings.key_prefix)
    redis: Redis = client.redis
    raw = await redis.hget(keys.job("c-sealed"), CHECKPOINT_FIELD)  # type: ignore[misc]
    assert raw is not None
    stored: dict[str, Any] = json.loads(raw)

    # Everything up to the refused review is done; the review is where it goes on.
    assert stored["last_step"] == "reference" and stored["next_step"] == "review"
    assert stored["completed"][:4] == ["login.open", "login.username", "login.password",
                                       "login.submit"]  # fmt: skip
    assert stored["url"].endswith("/accounts/AC-10231/credits/new")
    assert stored["report"]["job_id"] == "c-sealed"
    assert "storage_state" not in stored and "sealed_state" in stored

    assert settings.state_key is not None
    checkpoint = await RedisCheckpoints(
        redis, keys, "c-sealed", StateCipher(settings.state_key)
    ).load()
    assert checkpoint is not None and checkpoint.storage_state is not None
    session = [c for c in checkpoint.storage_state["cookies"] if c["name"] == "BILLSESSID"]
    assert len(session) == 1 and len(session[0]["value"]) >= 16
    # The live session never sits in Redis in the clear.
    assert session[0]["value"].encode() not in raw

    # Another worker fleet's key opens nothing: the job would simply sign in again.
    other = RedisCheckpoints(redis, keys, "c-sealed", StateCipher("another-fleet-key-0000"))
    reloaded = await other.load()
    assert reloaded is not None and reloaded.storage_state is None

    # An ended job drops its checkpoint, session and all.
    handle = client.handle("c-sealed")
    last = await handle.last_event_id()
    assert await client.resume("c-sealed", ResumeDecision(decision="abort", by="ops"))
    await handle.wait(30, after=last)
    assert await redis.hget(keys.job("c-sealed"), CHECKPOINT_FIELD) is None  # type: ignore[misc]


def test_a_short_state_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        StateCipher("short")


async def test_secret_inputs_kept_for_a_resume_are_sealed_and_dropped_when_the_job_ends(
    billing: Site, client: FormworkClient, browser_host: BrowserHost, settings: Settings,
    tmp_path: Path, fixture_secrets: dict[str, str],
) -> None:  # fmt: skip
    # A job waiting for approval keeps what a resume needs, on any worker: the job itself
    # among it. Its secret inputs are sealed under the workers' key, and gone once it ends.
    # The agent's own sign-in is the one the fixture accepts; the worker's service account
    # (which a job may never carry) is another.
    settings = signing_in_as_the_agent(settings, tmp_path)
    user, password = fixture_secrets["billing_username"], fixture_secrets["billing_password"]
    inputs = {**CREDIT_INPUTS, "amount": "150.00", "agent_user": user, "agent_pw": password}
    keys = Keys(settings.key_prefix)
    redis: Redis = client.redis

    async def approve(job_id: str, settings: Settings) -> JobReport:
        handle = client.handle(job_id)
        last = await handle.last_event_id()
        async with running_worker(settings, browser_host):
            assert await client.resume(job_id, ResumeDecision(decision="approve", by="lead"))
            return await handle.wait(60, after=last)

    for job_id in ("k-sealed", "k-other-key"):
        job = BrowserJob(
            job_id=job_id, script="billing/credit_as", inputs=inputs, site_url=billing.url
        )
        async with running_worker(settings, browser_host):
            paused = await (await client.enqueue(job)).wait(60)
        assert paused.status == JobStatus.awaiting_approval, paused.error
        kept = await redis.hget(keys.job(job_id), JOB_FIELD)  # type: ignore[misc]
        assert kept is not None and b"k-" in kept
        assert user.encode() not in kept and password.encode() not in kept
        assert b'"account_id":"AC-10231"' in kept  # an ordinary input, kept as it is

    # Opened by a worker holding the key: the job goes on and the credit is issued once.
    done = await approve("k-sealed", settings)
    assert done.status == JobStatus.succeeded, done.error
    assert len(billing.credits()) == 1
    record = await redis.hgetall(keys.job("k-sealed"))  # type: ignore[misc]
    assert JOB_FIELD.encode() not in record and CHECKPOINT_FIELD.encode() not in record
    assert b"report" in record  # the job's record itself stays

    # A worker with another key cannot open them: the decision is refused, the job waits,
    # and nothing was typed into the site in their place.
    other = settings.model_copy(update={"state_key": "another-fleet-key-0000"})
    refused = await approve("k-other-key", other)
    assert refused.status == JobStatus.awaiting_approval
    assert refused.decisions[-1].note is not None
    assert "agent_pw" in refused.decisions[-1].note and "agent_user" in refused.decisions[-1].note
    assert len(billing.credits()) == 1
