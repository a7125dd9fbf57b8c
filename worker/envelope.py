"""The arq envelope on the wire: what `arq:job:<id>` (and `arq:result:<id>`) hold, as JSON.

An orchestrator in any language writes the envelope itself (see the README's wire protocol),
so every field arq reads is checked here, before arq sees it. arq uses `t` and `et` outside
the try/except around a job: a string there would kill the worker, and again on every
restart while the job stays queued. A `t` over the worker's tries would make arq drop the job
with nothing but a log line. So a malformed envelope is not an error here: it becomes a call
of the job function with a `__malformed__` marker, and the job ends `rejected` with a report
that names the field, like any other bad payload.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from worker.keys import JOB_FUNCTION

# A job is a script name and a few inputs: anything near this size is a mistake or an attack.
MAX_PAYLOAD_BYTES = 64 * 1024
# How often arq may start a job (the first run, then after a worker died mid-job).
MAX_TRIES = 3
ENVELOPE_KEYS = ("t", "f", "a", "k", "et")
# arq makes a datetime of `et` outside its error handling: one past the year 9999 (a few days'
# margin for arq's own timezone setting) killed the worker, and every restart of it.
MAX_ENQUEUE_MS = int(datetime(9999, 1, 1, tzinfo=UTC).timestamp() * 1000)
MALFORMED = "__malformed__"
MALFORMED_FIELD = "__field__"


class Envelope(BaseModel):
    """A job as arq stores it. `t` is the try the enqueuer asks for: arq's own client writes
    null, Formwork's 1; arq counts the retries itself."""

    model_config = ConfigDict(extra="allow")  # arq may add keys; it reads only these

    t: StrictInt | None = Field(ge=1, le=MAX_TRIES)
    f: StrictStr
    a: list[Any]
    k: dict[str, Any]
    et: StrictInt = Field(ge=0, le=MAX_ENQUEUE_MS)


class StoredResult(Envelope):
    """A finished job's result, which arq reads back through the same deserializer."""

    s: StrictBool
    r: Any
    st: StrictInt
    ft: StrictInt


def dumps(value: Any) -> bytes:
    if isinstance(value, dict) and {"s", "r", "a"} <= value.keys():
        # arq stores a job's arguments again in its result, kept for an hour; the report in
        # the result says everything, and a payload is never kept twice (it may be one a
        # worker refused because it carried a credential).
        value = {**value, "a": []}
    return json.dumps(value, default=str, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    """Decode an arq envelope; a malformed one becomes a `__malformed__` job (see above)."""
    if len(data) > MAX_PAYLOAD_BYTES:
        return malformed(f"the message is {len(data)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    try:
        value = json.loads(data)
    except RecursionError:
        return malformed("the message nests too deeply to read")
    except (ValueError, UnicodeDecodeError) as exc:
        return malformed(f"the message is not JSON ({exc})")
    if not isinstance(value, dict):
        return malformed(f"the message is a JSON {type(value).__name__}, not an arq envelope")
    if {"s", "r"} <= value.keys():
        try:
            StoredResult.model_validate(value)
        except ValidationError:
            pass  # not a well-formed result: judged as a job below
        else:
            return value
    try:
        Envelope.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(p) for p in error["loc"])
        if error["type"] == "missing":
            missing = sorted(k for k in ENVELOPE_KEYS if k not in value)
            return malformed(f"the message is not an arq job envelope (missing {missing})")
        return malformed(f"the envelope's {name!r} is invalid: {error['msg']}", name)
    if value["f"] != JOB_FUNCTION:
        return malformed(f"unknown job function {value['f']!r} (expected {JOB_FUNCTION!r})", "f")
    if value["k"]:
        return malformed("the envelope's 'k' must be empty: the BrowserJob goes in 'a'", "k")
    if len(value["a"]) != 1:
        return malformed("the envelope's 'a' must hold exactly one BrowserJob object", "a")
    return value


def malformed(reason: str, field: str = "payload") -> dict[str, Any]:
    """The envelope of a job function call that rejects the message for `reason`."""
    payload = {MALFORMED: reason, MALFORMED_FIELD: field}
    now_ms = int(time.time() * 1000)
    return {"t": 1, "f": JOB_FUNCTION, "a": [payload], "k": {}, "et": now_ms}


def envelope(payload: dict[str, Any]) -> bytes:
    """The bytes stored at `arq:job:<id>` for a job (or internal message) `payload`."""
    now_ms = int(time.time() * 1000)
    return dumps({"t": 1, "f": JOB_FUNCTION, "a": [payload], "k": {}, "et": now_ms})
