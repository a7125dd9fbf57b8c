"""Checkpoints: left after every completed step, the browser session sealed at rest."""

from __future__ import annotations

import json
from typing import Any

import pytest
from arq import Worker
from redis.asyncio import Redis

from worker.checkpoint import CHECKPOINT_FIELD, RedisCheckpoints, StateCipher
from worker.client import FormworkClient
from worker.contract import ResumeDecision
from worker.keys import Keys
from worker.settings import Settings

from .conftest import Site
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
