"""Logging: one JSON object per line, every line saying which job, step, site and script it is
about, and no secret value on any line.

The job's identity travels in context variables, set by the executor when a job starts and when
a step starts; asyncio gives every job's task its own copy, so concurrent jobs never mix. A
filter on the handler redacts every configured secret value from the message and from any
traceback — exception messages are where a value typed into a page most often resurfaces.

    formwork worker --log-format json     (the default for workers: FORMWORK_LOG_FORMAT)
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal, cast

from worker.secretstore import Redactor

LogFormat = Literal["json", "text"]

job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
step_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("step_id", default=None)
site: contextvars.ContextVar[str | None] = contextvars.ContextVar("site", default=None)
script: contextvars.ContextVar[str | None] = contextvars.ContextVar("script", default=None)
_FIELDS = {"job_id": job_id, "step_id": step_id, "site": site, "script": script}


def bind_job(job: str, site_name: str, script_name: str) -> None:
    """Every later line of the current task names this job (until the task ends)."""
    job_id.set(job)
    site.set(site_name)
    script.set(script_name)
    step_id.set(None)


# arq's line for a job it starts: `<waited>s → <id>:browser_job(<the payload, cut at 80>)`.
ARQ_JOB_START = "%6.2fs → %s(%s)%s"


class Redacting(logging.Filter):
    """Replaces secret values in a record's message and traceback before any handler sees it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name == "arq.worker"
            and record.msg == ARQ_JOB_START
            and len(record.args or ()) == 4
        ):
            # The payload's inputs include those a script declares `secret: true`: the worker
            # learns which they are only once it has loaded the script, after arq wrote this
            # line, and an orchestrator may put them first, whole, inside the 80 characters.
            # The job id says which job it is; the payload is in Redis and in the report.
            waited, ref, _payload, extra = cast("tuple[Any, ...]", record.args)
            record.args = (waited, ref, "…", extra)
        message = record.getMessage()
        record.msg, record.args = self.redactor(message) or "", None
        if record.exc_info:
            # Render the traceback now, redacted, and drop the live exception with it.
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = self.redactor(text), None
        for name, var in _FIELDS.items():
            # Redacted like the message: a job refused for carrying a secret in its id or
            # script name is logged about with that id and name bound.
            setattr(record, name, self.redactor(var.get()))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, var in _FIELDS.items():
            value = getattr(record, name, None) or var.get()
            if value is not None:
                line[name] = value
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(where)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job_id", None) or job_id.get()
        step = getattr(record, "step_id", None) or step_id.get()
        record.where = f" [{job}{'/' + step if step else ''}]" if job else ""
        return super().format(record)


def configure(fmt: LogFormat, level: int, redactor: Redactor) -> None:
    """Route every logger (ours, arq's, aiohttp's) through one redacting handler."""
    handler = logging.StreamHandler()
    handler.addFilter(Redacting(redactor))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
