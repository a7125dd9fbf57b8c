"""Formwork: a queue-driven browser-automation worker for AI customer-support systems."""

from worker.contract import (
    BrowserJob,
    Failure,
    FailureCode,
    JobReport,
    JobStatus,
    MatchedSelector,
    Routing,
    StepReport,
    StepStatus,
)
from worker.errors import FormworkError, RejectedError, StepError
from worker.script import LoadedScript, ScriptStore

__all__ = [
    "BrowserJob",
    "Failure",
    "FailureCode",
    "FormworkError",
    "JobReport",
    "JobStatus",
    "LoadedScript",
    "MatchedSelector",
    "RejectedError",
    "Routing",
    "ScriptStore",
    "StepError",
    "StepReport",
    "StepStatus",
]
