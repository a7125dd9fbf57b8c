"""Log lines never carry a secret, not even a piece of one that a library cut short."""

from __future__ import annotations

import contextvars
import io
import json
import logging

import pytest
from arq.utils import args_to_string

from worker import logs
from worker.secretstore import MASK, Redactor

SECRET = "Zq9-SECRET-7781"


@pytest.mark.parametrize("job_id", ["a" * 17, "b" * 19, "c" * 21])
def test_a_secret_cut_short_in_arqs_argument_preview_is_masked(job_id: str) -> None:
    # arq logs a job's arguments cut at 80 characters: for these ids the cut falls inside
    # the value, so only its head is on the line.
    payload = {"job_id": job_id, "script": "b/c", "inputs": {"a": SECRET}}
    preview = args_to_string((payload,), {})
    assert "…" in preview and SECRET not in preview and SECRET[:6] in preview  # the case
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.Redacting(Redactor([SECRET])))
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("arq.worker.test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("%6.2fs → %s(%s)%s", 0.02, f"{job_id}:browser_job", preview, "")
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())["msg"]
    assert MASK in line
    assert SECRET[:2] not in line.split("'a': ")[1], line


def test_only_a_head_that_runs_into_an_ellipsis_is_masked() -> None:
    redact = Redactor([SECRET])
    assert redact(f"x {SECRET} y") == f"x {MASK} y"
    assert redact("'Zq9-SECRET-…") == f"'{MASK}"
    assert redact("Zq9-SE...") == MASK
    # Ordinary text that shares a head with a secret, with nothing cut, stays as it is.
    assert redact("Zq9 and Zq-other; data… ok") == "Zq9 and Zq-other; data… ok"


def test_a_secret_in_the_job_fields_of_a_line_is_masked() -> None:
    # A job refused for carrying a secret in its script name (or id) is logged about with
    # them bound: every JSON line's `script` (and `job_id`) field carried it.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.Redacting(Redactor([SECRET])))
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("formwork.test-fields")
    logger.addHandler(handler)
    logger.propagate = False

    def line() -> None:
        logs.bind_job(f"job-{SECRET}", "billing", f"billing/{SECRET}")
        logger.warning("job rejected")

    try:
        contextvars.copy_context().run(line)
    finally:
        logger.removeHandler(handler)
    fields = json.loads(stream.getvalue())
    assert (fields["job_id"], fields["script"]) == (f"job-{MASK}", f"billing/{MASK}")
