"""A job's Playwright trace: recorded around the job, kept per its `TraceMode`, secret-free.

The trace is a zip `playwright show-trace` opens: every API call with its parameters, the
screencast, the console. Two things in it could hold a secret, and both are dealt with here:

- DOM snapshots record the value of every input, so they are off. The screencast is on: it
  shows what the browser painted, and the browser never paints a secret (`worker.evidence`).
- The call log records the parameters of each call, and a `fill` of a secret field has the
  secret as its `value`. After recording, every entry of the zip is rewritten with each secret
  value (and its URL-, JSON- and HTML-escaped forms) replaced by `***`. That also covers a secret a
  page echoed into a console message or a network log. A value under four characters (a CVV,
  a PIN) would match inside ordinary text and numbers, and in the screencast's bytes; it is
  replaced where it stands whole in the trace's call and event logs: a string that is the
  value (the `value` of the `fill` that typed it), or quotes it (the call log's `fill("…")`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import zipfile
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import BrowserContext
from playwright.async_api import Error as PlaywrightError

from worker.contract import TraceMode
from worker.secretstore import MASK, text_forms

log = logging.getLogger("formwork.trace")


@asynccontextmanager
async def job_trace(
    context: BrowserContext,
    mode: TraceMode,
    path: Path,
    secrets: Iterable[str],
    failed: Callable[[], bool],
) -> AsyncIterator[None]:
    """Record the block into `path` (mode `always`, or `on_failure` when `failed()` says so)."""
    if mode == TraceMode.off:
        yield
        return
    await context.tracing.start(screenshots=True, snapshots=False, sources=False)
    try:
        yield
    finally:
        keep = mode == TraceMode.always or failed()
        try:
            if keep:
                await context.tracing.stop(path=path)
                await asyncio.to_thread(scrub, path, secrets)
            else:
                await context.tracing.stop()
        except PlaywrightError as exc:
            # A crashed browser takes the trace with it; the job's report says what happened.
            log.warning("trace not saved: %s", exc.message)


def secret_forms(secrets: Iterable[str]) -> list[re.Pattern[bytes]]:
    """Each secret as it may appear in a trace: raw, JSON-, URL- and HTML-escaped."""
    forms: set[str] = set()
    for value in secrets:
        forms.update(text_forms(value))
    # Longest first: a secret that contains another is replaced whole. Any case: a host name
    # holds a value a page put in it in lower case.
    ordered = sorted((f.encode() for f in forms if f), key=len, reverse=True)
    return [re.compile(re.escape(f), re.IGNORECASE) for f in ordered]


# A JSON string literal, escapes included; the logs of a trace are JSON, one event a line.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_LOGS = (".trace", ".network", ".stacks")


def scrub(path: Path, secrets: Iterable[str]) -> None:
    """Rewrite the trace zip at `path` with every form of every secret replaced by `***`."""
    values = set(secrets)
    short = {value for value in values if 0 < len(value) < 4}
    forms = secret_forms(values - short)
    if not forms and not short:
        return
    tmp = path.with_suffix(".scrubbing")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            data = source.read(info)
            for form in forms:
                data = form.sub(MASK.encode(), data)
            if short and info.filename.endswith(_LOGS):
                data = _JSON_STRING.sub(lambda m: _masked_if_short(m[0], short), data)
            out.writestr(info, data)
    tmp.chmod(0o600)
    tmp.replace(path)


def _masked_if_short(literal: bytes, short: set[str]) -> bytes:
    """`literal` masked if it is a short secret, or quotes one whole: the call log's line for
    a fill says `fill("<value>")`."""
    try:
        value = json.loads(literal)
    except ValueError:
        return literal
    if not isinstance(value, str):
        return literal
    if value in short:
        return json.dumps(MASK).encode()
    masked = value
    for secret in short:
        masked = masked.replace(json.dumps(secret), json.dumps(MASK))
    return literal if masked == value else json.dumps(masked).encode()
