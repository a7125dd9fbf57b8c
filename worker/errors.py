"""Formwork's one exception hierarchy. Every class carries a stable `FailureCode`.

    FormworkError                  base; `.code`, `.message`, `.to_failure()`
    ├── RejectedError              refused before any browser work (job status `rejected`)
    │   ├── JobInvalid             the payload is not a valid BrowserJob
    │   ├── ScriptInvalid          a script or selector registry fails to load (file, step, field)
    │   ├── ScriptNotFound         no such script or version
    │   ├── InputInvalid           inputs fail the script's input schema
    │   ├── SecretMissing          a secret the script needs is not configured on this worker
    │   └── RecordingInvalid       a recording bundle cannot be read or replayed (job_invalid)
    ├── StepError                  a step failed on the page (`.code` says how)
    ├── BrowserLost                the job's page or browser died mid-run (browser_crashed)
    ├── TakenOver                  another worker took the job over (this worker's lease lapsed)
    └── ArtifactError              the artifact store failed, or has no such object (storage_error)
        └── ArtifactUnreadable     the object is there but cannot be read (a corrupt audit.json)

Playwright's own exceptions are translated into `StepError` in exactly one place:
`worker.failures.translate_playwright_error`.
"""

from __future__ import annotations

from worker.contract import Failure, FailureCode


class FormworkError(Exception):
    code: FailureCode = FailureCode.script_error

    def __init__(self, message: str, *, code: FailureCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_failure(self, step_id: str | None = None) -> Failure:
        return Failure(code=self.code, message=self.message, step_id=step_id)


class RejectedError(FormworkError):
    """The job cannot run as given; retrying it unchanged cannot help."""

    def __init__(
        self, message: str, *, code: FailureCode | None = None, field: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.field = field

    def to_failure(self, step_id: str | None = None) -> Failure:
        return Failure(code=self.code, message=self.message, step_id=step_id, field=self.field)


class JobInvalid(RejectedError):
    code = FailureCode.job_invalid


class ScriptInvalid(RejectedError):
    code = FailureCode.script_invalid


class ScriptNotFound(RejectedError):
    code = FailureCode.script_not_found


class InputInvalid(RejectedError):
    code = FailureCode.input_invalid


class SecretMissing(RejectedError):
    code = FailureCode.secret_missing


class RecordingInvalid(RejectedError):
    """A recording bundle is missing, malformed, or names what this worker cannot run."""

    code = FailureCode.job_invalid


class BrowserLost(FormworkError):
    """The job's renderer or browser died mid-run: no retry can use its page again. Raised out
    of a run that asked for it (`run_job(hand_over_crashes=True)`), so the queue gives the job
    a fresh run that goes on from its last checkpoint in a new context."""

    code = FailureCode.browser_crashed


class TakenOver(FormworkError):
    """Another worker took this job over while this one ran it: this worker's lease lapsed (a
    paused VM, a stalled process) and it was taken for dead (`worker.handback`). Raised before
    a commit would be sent; the run stops there and writes nothing more, since the job's
    record is the other run's now. Never in a report."""

    code = FailureCode.cancelled


class StepError(FormworkError):
    """A step failed on the page. `evidence` is text read from the page, if any."""

    def __init__(self, code: FailureCode, message: str, *, evidence: str | None = None) -> None:
        super().__init__(message, code=code)
        self.evidence = evidence

    def to_failure(self, step_id: str | None = None) -> Failure:
        return Failure(
            code=self.code, message=self.message, evidence=self.evidence, step_id=step_id
        )


class ArtifactError(FormworkError):
    """The artifact store could not be read or written, or holds no such object."""

    code = FailureCode.storage_error


class ArtifactUnreadable(ArtifactError):
    """The store holds the object, but it is not what it should be: a truncated or edited
    `audit.json`, a record of a format this version does not read."""
