"""Recordings: a finished job as QA replays it — portable, secret-free, one directory.

Every finished job is a recording: its report already holds each step's status, matched
selector, URL, outputs and screenshot. `export` copies what replay needs into a bundle —

    <bundle>/recording.json     the `Recording` below
    <bundle>/steps/NN-<id>.jpg  each step's screenshot

— with secret inputs replaced by references (`{"$secret": "<name>"}`, looked up in the
replaying worker's secret store by the same name), so bundles can be committed (golden
recordings live in `fixtures/recordings/`) and attached to tickets.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.artifacts import ArtifactStore
from worker.contract import Box, JobReport, JobStatus, MatchedSelector, StepStatus
from worker.errors import ArtifactError, RecordingInvalid
from worker.har import HAR_FILE
from worker.script import ExtractStep, LoadedScript

RECORDING_FORMAT = 1
RECORDING_FILE = "recording.json"
SECRET_REF = "$secret"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordedStep(_Model):
    id: str
    action: str
    status: StepStatus
    matched: MatchedSelector | None = None
    url_path: str | None = Field(default=None, description="The page's path after the step.")
    outputs: dict[str, str] = Field(default_factory=dict, description="Read by this step.")
    entered: str | None = Field(
        default=None, description="What a fill or select step put in; '***' for a secret."
    )
    screenshot: str | None = Field(default=None, description="Relative to the bundle.")
    dynamic: list[Box] = Field(default_factory=list)


class Recording(_Model):
    format: int = RECORDING_FORMAT
    job_id: str
    recorded_at: datetime
    script: str
    script_version: int | None = None
    script_digest: str | None = None
    inputs: dict[str, Any] = Field(description="Secret inputs as {'$secret': name}.")
    status: JobStatus
    outputs: dict[str, str] = Field(default_factory=dict)
    dynamic_outputs: list[str] = Field(
        default_factory=list,
        description="Outputs read from dynamic elements: compared by pattern, not value.",
    )
    steps: list[RecordedStep]
    site_origin: str | None = Field(
        default=None, description="Where the job ran (scheme://host:port): HAR replay serves it."
    )
    har: str | None = Field(
        default=None, description="The job's scrubbed network traffic, relative to the bundle."
    )

    @property
    def script_ref(self) -> str:
        return (
            self.script if self.script_version is None else f"{self.script}@{self.script_version}"
        )

    @field_validator("format")
    @classmethod
    def _readable(cls, value: int) -> int:
        # A bundle another Formwork wrote in a later layout was read as this one, field by
        # field, and judged by what this worker made of it.
        if value != RECORDING_FORMAT:
            newer = "a later Formwork's" if value > RECORDING_FORMAT else "an unknown"
            raise ValueError(
                f"format {value} is {newer} bundle layout; this worker reads format "
                f"{RECORDING_FORMAT}"
            )
        return value


def dynamic_outputs(loaded: LoadedScript) -> list[str]:
    """Outputs whose value differs on every run: read from an element the script declares
    dynamic (a confirmation number the site generates)."""
    names = []
    for planned in loaded.plan:
        if isinstance(planned.step, ExtractStep):
            for name, spec in planned.step.extract.items():
                if spec.target in loaded.script.dynamic:
                    names.append(name)
    return names


def url_path(url: str | None) -> str | None:
    """The part of a URL that is the same wherever the site runs."""
    if not url:
        return None
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def outputs_by_step(report: JobReport) -> dict[str, dict[str, str]]:
    """The outputs each step read (step id -> name -> value), from the report's claims."""
    found: dict[str, dict[str, str]] = {}
    for claim in report.claims:
        if claim.kind == "output" and claim.step_id is not None:
            found.setdefault(claim.step_id, {})[claim.name] = claim.value
    return found


def from_report(report: JobReport, loaded: LoadedScript) -> Recording:
    """The recording of a finished job (screenshot paths still relative to its artifacts)."""
    if not report.status.settled:
        raise RecordingInvalid(
            f"job {report.job_id} is {report.status}: only a finished (or paused) job records"
        )
    secret_inputs = {n for n, spec in loaded.script.inputs.items() if spec.secret}
    inputs = {
        name: {SECRET_REF: name} if name in secret_inputs else value
        for name, value in report.inputs.items()
    }
    by_step = outputs_by_step(report)
    steps = [
        RecordedStep(
            id=step.id,
            action=step.action,
            status=step.status,
            matched=step.selector,
            url_path=url_path(step.url),
            outputs=by_step.get(step.id, {}),
            entered=step.entered,
            screenshot=step.screenshot,
            dynamic=step.dynamic,
        )
        for step in report.steps
    ]
    first_url = next((s.url for s in report.steps if s.url), None)
    origin = None
    if first_url:
        parts = urlsplit(first_url)
        origin = f"{parts.scheme}://{parts.netloc}"
    return Recording(
        job_id=report.job_id,
        site_origin=origin,
        har=report.artifacts.har if report.artifacts else None,
        recorded_at=report.ended_at or datetime.now(UTC),
        script=report.script,
        script_version=report.script_version,
        script_digest=report.script_digest,
        inputs=inputs,
        status=report.status,
        outputs=report.outputs,
        dynamic_outputs=dynamic_outputs(loaded),
        steps=steps,
    )


def export(recording: Recording, store: ArtifactStore, bundle: Path) -> Path:
    """Write `recording` as a bundle, copying its screenshots and HAR in from `store` (the
    job's, on disk or in a bucket); replaces an old bundle, and nothing else.
    `RecordingInvalid` when `bundle` is a file or a folder holding other things, or when a
    file the recording names is not in the store: a golden without a step's screenshot would
    skip that step's visual check for good."""
    bundle = bundle.resolve()  # `.` has no name to stage the new bundle beside
    if bundle.exists() and not is_bundle(bundle):
        # The old bundle is removed whole: a folder of anything else (`--out .`, `--out ~`)
        # went with it.
        what = "a file" if not bundle.is_dir() else f"a folder without a {RECORDING_FILE}"
        raise RecordingInvalid(
            f"{bundle} is {what}, not a recording bundle: not replaced "
            "(name a new or empty folder, or an earlier bundle)"
        )
    files: dict[str, bytes] = {}
    steps = []
    for index, step in enumerate(recording.steps, 1):
        shot = None
        if step.screenshot is not None:
            shot = f"steps/{index:02d}-{step.id}{PurePosixPath(step.screenshot).suffix}"
            files[shot] = _copied(store, step.screenshot, f"step {step.id}'s screenshot")
        steps.append(step.model_copy(update={"screenshot": shot}))
    har = None
    if recording.har is not None:
        har = HAR_FILE
        files[HAR_FILE] = _copied(store, recording.har, "the job's HAR")
    final = recording.model_copy(update={"steps": steps, "har": har})
    files[RECORDING_FILE] = (final.model_dump_json(indent=2) + "\n").encode()
    staged = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    (staged / "steps").mkdir(parents=True)
    for name, data in files.items():
        (staged / name).write_bytes(data)
    # Swap whole: a reader never sees half a bundle, and `--update` is all or nothing.
    shutil.rmtree(bundle, ignore_errors=True)
    staged.rename(bundle)
    return bundle


def _copied(store: ArtifactStore, key: str, what: str) -> bytes:
    try:
        return store.get(key)
    except ArtifactError as exc:
        raise RecordingInvalid(
            f"cannot copy {what} from {store.location} ({exc.message}): no bundle written, "
            "since a golden without it would check less than the job did"
        ) from exc


def bundle_of(path: Path) -> Path:
    """The bundle `path` names: the folder itself, or the folder of the recording.json named."""
    return path.parent if path.name == RECORDING_FILE and path.is_file() else path


def is_bundle(folder: Path) -> bool:
    """Whether `folder` may be replaced by a bundle: an earlier bundle, or empty."""
    return folder.is_dir() and (
        (folder / RECORDING_FILE).is_file() or next(folder.iterdir(), None) is None
    )


def load(bundle: Path) -> Recording:
    """The recording of a bundle (its directory, or its recording.json), or `RecordingInvalid`
    naming the file and its first problem, in one line."""
    path = bundle / RECORDING_FILE if bundle.is_dir() else bundle
    if not path.is_file():
        raise RecordingInvalid(f"{bundle}: not a recording bundle (no {RECORDING_FILE})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordingInvalid(f"{path}: not a recording (not UTF-8 text)") from exc
    except OSError as exc:
        raise RecordingInvalid(f"{path}: not a recording ({exc.strerror or exc})") from exc
    if not text.strip():
        raise RecordingInvalid(f"{path}: not a recording (empty file)")
    try:
        return Recording.model_validate_json(text)
    except ValidationError as exc:
        raise RecordingInvalid(f"{path}: not a recording ({first_problem(exc)})") from exc


def first_problem(exc: ValidationError) -> str:
    """Pydantic's first error as a phrase: where, and what (its full dump runs to lines,
    with the input echoed and a URL for every error)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        what = f"invalid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    else:
        where = ".".join(str(part) for part in first["loc"])
        what = f"{where}: {first['msg']}" if where else first["msg"]
    more = len(errors) - 1
    return what + (f"; {more} more problem{'s' if more > 1 else ''}" if more else "")
