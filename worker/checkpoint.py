"""Checkpoints: after every completed step, what another run needs to go on from there.

A job's checkpoint lives in its Redis record (field `checkpoint`), so any worker can take the
job over: after its first worker died (arq runs the job again), or when a person's decision
resumes a paused job. It holds the completed steps, the outputs so far, the next step, the URL,
the report as it stood — and the browser context's storage state (cookies, local storage).

That storage state is a live session on the target system, as good as a password while it
lasts, so it is sealed at rest with Fernet (AES-128-CBC with an HMAC-SHA256 tag, from the
`cryptography` package — never hand-rolled) under a key from the worker's environment
(`FORMWORK_STATE_KEY`). Without a key the session is simply not kept: a resumed job signs in
again. A checkpoint sealed under another key reads as "no session", never as an error.

The job itself is kept beside it (field `job`) for a resume: its inputs declared
`secret: true` are sealed under the same key (`keep_job`). Both are dropped when the job ends.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol, cast

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from playwright.async_api import BrowserContext, Page
from playwright.async_api import Error as PlaywrightError
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from worker.contract import BrowserJob, JobReport
from worker.keys import Keys
from worker.outbox import Outbox

log = logging.getLogger("formwork.checkpoint")

CHECKPOINT_FIELD = "checkpoint"
MIN_KEY_LENGTH = 16
# Local storage of the current origin, as Playwright's storage-state format has it.
# An opaque origin (about:blank, an error page) has no local storage to read: none, not an error.
_LOCAL_STORAGE_JS = """() => {
  const items = [];
  try {
    for (let i = 0; i < localStorage.length; i++) {
      const name = localStorage.key(i);
      items.push({ name, value: localStorage.getItem(name) });
    }
  } catch (e) {}
  return { origin: location.origin, localStorage: items };
}"""


class Checkpoint(BaseModel):
    """Where a job stood after its last completed step."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    at: datetime
    completed: list[str] = Field(description="Top-level steps completed, in order.")
    last_step: str | None = None
    next_step: str | None = Field(default=None, description="None: every step is done.")
    outputs: dict[str, str] = Field(default_factory=dict)
    url: str | None = None
    report: JobReport
    # In memory only: stored sealed, as `sealed_state`.
    storage_state: dict[str, Any] | None = Field(default=None, exclude=True)


class StateCipher:
    """Seals storage state under a key derived from the worker's configured secret."""

    def __init__(self, secret: str) -> None:
        if len(secret) < MIN_KEY_LENGTH:
            raise ValueError(f"FORMWORK_STATE_KEY must be at least {MIN_KEY_LENGTH} characters")
        # HKDF turns any long random string into the 32 bytes Fernet wants; `info` keeps this
        # key apart from anything else ever derived from the same secret.
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"formwork storage state v1"
        ).derive(secret.encode())
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, state: dict[str, Any]) -> str:
        return self._fernet.encrypt(json.dumps(state, separators=(",", ":")).encode()).decode()

    def open(self, token: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken:
            return None
        return cast(dict[str, Any], value)


JOB_FIELD = "job"  # the job as enqueued, for a later resume on any worker
_SEALED = "$sealed"


def keep_job(job: BrowserJob, secret_inputs: Iterable[str], cipher: StateCipher | None) -> str:
    """The job as its record keeps it for a later resume: its secret inputs sealed when a key
    is configured. Without one they are kept as given (the orchestrator put them in Redis so,
    and a resume must type them again), and only while the job may resume (see `forget`)."""
    if cipher is None:
        return job.model_dump_json()
    inputs = {
        name: {_SEALED: cipher.seal({"value": value})} if name in secret_inputs else value
        for name, value in job.inputs.items()
    }
    return job.model_copy(update={"inputs": inputs}).model_dump_json()


def kept_job(raw: bytes | str, cipher: StateCipher | None) -> tuple[BrowserJob, list[str]]:
    """The job `keep_job` kept, with its secret inputs opened; and the names of those that
    could not be (sealed under another key, or no key here): they are left out, so the job's
    intake says they are missing, rather than a token being typed into the site."""
    job = BrowserJob.model_validate_json(raw)
    inputs: dict[str, Any] = {}
    lost: list[str] = []
    for name, value in job.inputs.items():
        if isinstance(value, dict) and set(value) == {_SEALED}:
            opened = cipher.open(value[_SEALED]) if cipher is not None else None
            if opened is None:
                lost.append(name)
                continue
            value = opened["value"]
        inputs[name] = value
    return job.model_copy(update={"inputs": inputs}), lost


class Checkpoints(Protocol):
    """Where the executor leaves a checkpoint after each completed step."""

    async def save(self, checkpoint: Checkpoint) -> None: ...


class RedisCheckpoints:
    """A job's checkpoint in its Redis record, the session sealed when a key is configured."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        job_id: str,
        cipher: StateCipher | None,
        outbox: Outbox | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.job_id = job_id
        self.cipher = cipher
        self.outbox = outbox
        # The state last sealed, and its seal: the executor hands the same state again until
        # the page hears from the site, and sealing draws fresh randomness (~1.5 ms here).
        self._sealed: tuple[dict[str, Any], str] | None = None

    async def save(self, checkpoint: Checkpoint) -> None:
        """Write `checkpoint` — through the job's outbox when it has one: in order with its
        events, without the job waiting for it. A checkpoint lost with the worker only means
        the next run goes on from the one before (a sent commit is journalled apart)."""
        data = checkpoint.model_dump(mode="json")
        state = checkpoint.storage_state
        if self.cipher is not None and state is not None:
            if self._sealed is None or self._sealed[0] is not state:
                self._sealed = (state, self.cipher.seal(state))
            data["sealed_state"] = self._sealed[1]
        key, value = self.keys.job(self.job_id), json.dumps(data)
        if self.outbox is not None:
            self.outbox.put(lambda pipe: pipe.hset(key, CHECKPOINT_FIELD, value))
        else:
            await cast("Any", self.redis.hset(key, CHECKPOINT_FIELD, value))

    async def load(self) -> Checkpoint | None:
        raw = await cast("Any", self.redis.hget(self.keys.job(self.job_id), CHECKPOINT_FIELD))
        if raw is None:
            return None
        data = json.loads(raw)
        sealed = data.pop("sealed_state", None)
        checkpoint = Checkpoint.model_validate(data)
        if sealed is not None and self.cipher is not None:
            checkpoint.storage_state = self.cipher.open(sealed)
            if checkpoint.storage_state is None:
                log.warning("job %s: checkpoint sealed under another key", self.job_id)
        return checkpoint


async def storage_state(context: BrowserContext, page: Page) -> dict[str, Any] | None:
    """The context's cookies and the current origin's local storage, in the shape
    `browser.new_context(storage_state=…)` takes. Two round trips at once, not Playwright's
    `context.storage_state()`, which may open a page per origin it has seen."""
    try:
        cookies, origin = await asyncio.gather(context.cookies(), page.evaluate(_LOCAL_STORAGE_JS))
    except PlaywrightError as exc:
        log.warning("could not read the storage state: %s", exc.message)
        return None
    origins = [origin] if origin.get("localStorage") else []
    return {"cookies": cookies, "origins": origins}
