"""Where a job's artifacts go: an `ArtifactStore`, on the local disk or in an S3-compatible
bucket, with one layout for both. Paths are relative to the store's root, so a tree can be
moved, synced or served as a whole:

    <day>/<job_id>/report.json          the JobReport, as the orchestrator was told it
    <day>/<job_id>/audit.json           the audit record (`worker.audit.AuditRecord`)
    <day>/<job_id>/NN-<step>.jpg        each screenshot as captured (secrets already masked)
    <day>/<job_id>/images/<sha256>.webp annotated evidence and thumbnails, content-addressed
    <day>/<job_id>/trace-<time>.zip     Playwright traces (`playwright show-trace` opens them)
    <day>/<job_id>/network.har          the job's traffic, scrubbed (`har: true` only)

`<day>` is the UTC date the job started (`2025-01-31`): retention removes whole days.
`<job_id>` is the id itself when it is a safe file name; any other id is named by `safe_id`
(`coll:T` -> `coll_T-<16 hex of its SHA-256>`), so no two jobs ever share a folder.

While a job runs, captures and traces are written to a local spool directory (for
`LocalArtifacts`, the root itself). `record` — called whenever the report is written — builds the
audit record off the event loop and publishes everything under the job's path.

    ArtifactStore        layout, spooling, audit building, pruning (shared)
    ├── LocalArtifacts   a directory, files readable by the worker's user only (the default)
    └── S3Artifacts      a bucket and prefix on any S3-compatible server (boto3)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from worker.annotate import Encoded, ImageFormat, Mark, fit_capture, prepare, render
from worker.audit import (
    AuditRecord,
    Evidence,
    ImageBudget,
    record_of,
    screenshot_marks,
    stand_in_record,
)
from worker.contract import Artifacts, JobReport, JobStatus
from worker.errors import ArtifactError, ArtifactUnreadable
from worker.har import HAR_FILE
from worker.settings import Settings

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client
    from types_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger("formwork.artifacts")

# Evidence is encoded and published on two threads of its own, whatever the concurrency: the
# work per job is small (~8 ms an image), more threads would only contend with the event loop
# and Chromium for 2 cores, and every thread that runs Pillow grows a malloc arena of its own
# (bench/memory.py, after 100 jobs: the worker's RSS 154 MB with the default pool, 116 MB so).
_IMAGES = ThreadPoolExecutor(max_workers=2, thread_name_prefix="formwork-evidence")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Per job, annotated images and thumbnails together: about 60 steps of a form-heavy site at
# JPEG q80, or three times that in WebP. The screenshots as captured obey it on their own.
DEFAULT_IMAGE_BUDGET = 3_000_000
_CAPTURES = {".jpg", ".png", ".webp"}  # a job's screenshots as captured, beside its records
_TYPES = {".json": "application/json", ".jpg": "image/jpeg", ".webp": "image/webp",
          ".zip": "application/zip", ".png": "image/png"}  # fmt: skip


def content_type(key: str) -> str:
    return _TYPES.get(Path(key).suffix, "application/octet-stream")


_MAX_NAME = 128  # as long as a valid job id may be (worker.contract.JOB_ID)


def safe_id(job_id: str) -> str:
    """`job_id` as one file name, a different one for every id: the one function that names a
    job's folder (and its S3 pointer), for writing and finding alike.

    An id that is already a safe name is kept as it is. Any other loses the characters a path
    must not hold (`:` in a valid id; anything in the id of a payload refused for being
    malformed) and gains a digest of the whole id, or `coll:T` would share `coll_T`'s folder
    and overwrite its records. Never `..` or hidden, never too long for the file system."""
    name = _UNSAFE.sub("_", job_id)
    if name.startswith("."):
        name = "_" + name
    if name == job_id and 0 < len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:16]
    return f"{name[: _MAX_NAME - len(digest) - 1]}-{digest}"


def _shared_name(job_id: str) -> str:
    """The folder name `safe_id` gave before it told ids apart (the same for a safe id): jobs
    whose ids differ only in unsafe characters shared it."""
    name = _UNSAFE.sub("_", job_id)
    if not name or name.startswith("."):
        name = "_" + name
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(job_id.encode()).hexdigest()[:16]
        name = f"{name[: _MAX_NAME - len(digest) - 1]}-{digest}"
    return name


class ArtifactStore(ABC):
    """A job's artifacts: written while it runs, published and audited when it settles."""

    def __init__(
        self,
        spool: Path,
        *,
        image_format: ImageFormat = "jpeg",
        image_budget: int = DEFAULT_IMAGE_BUDGET,
    ) -> None:
        self.spool = spool.resolve()
        # JPEG by default: WebP is 2-3x smaller but 5-10x slower to encode (~25 ms against ~4 ms
        # for a 1280x800 step), and every step's image is encoded while the job runs.
        self.image_format: ImageFormat = image_format
        self.image_budget = image_budget
        self._paths: dict[str, str] = {}
        # Evidence encoded while the job still runs (`prepare`), by screenshot path.
        self._prepared: dict[str, tuple[Mark, asyncio.Future[Encoded]]] = {}
        # Bytes of the screenshots kept as captured, by job (`keep_capture`).
        self._captured: dict[str, int] = {}

    # ------------------------------------------------------------ what back ends differ in
    # Blocking calls: the async methods below run them in a thread.

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the root is, for people: a directory, or s3://bucket/prefix."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ArtifactError when there is none."""

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (a `<day>/` or `<day>/<job>/`)."""

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> None: ...

    @abstractmethod
    def days(self) -> list[str]:
        """The `<day>` folders at the root."""

    @abstractmethod
    def _locate(self, name: str) -> str | None:
        """The path (`<day>/<name>`) of the job folder called `name`, if the store holds one."""

    def find_job(self, job_id: str) -> str | None:
        """The path of a job this store already holds (a resumed job's), if any.

        A job filed before folder names told ids apart (an id with a `:`) is found in the
        folder it shared, but only while the report there is its own."""
        found = self._locate(safe_id(job_id))
        shared = _shared_name(job_id)
        if found is not None or shared == safe_id(job_id):
            return found
        path = self._locate(shared)
        if path is None:
            return None
        try:
            owner = json.loads(self.get(f"{path}/report.json")).get("job_id")
        except (ArtifactError, ValueError, AttributeError):
            return None
        return path if owner == job_id else None

    def publish(self, path: str) -> None:
        """Move what the job spooled locally under `path` into the store."""
        return None

    # ------------------------------------------------------------ layout

    def job_path(self, job_id: str) -> str:
        """`<day>/<job_id>`: the day a job was first seen, for every later write too (a job
        paused before midnight and resumed after it stays in one folder)."""
        if job_id not in self._paths:
            name = safe_id(job_id)
            spooled = sorted(self.spool.glob(f"*/{name}"))
            found = spooled[-1].relative_to(self.spool).as_posix() if spooled else None
            found = found or self.find_job(job_id)
            self._paths[job_id] = found or f"{datetime.now(UTC).date().isoformat()}/{name}"
        return self._paths[job_id]

    def _spooled(self, job_id: str) -> Path:
        path = self.spool / self.job_path(job_id)
        try:
            _private_dir(path)
        except OSError as exc:  # not a folder, not writable, the disk full
            raise ArtifactError(f"could not make the job's folder {path}: {exc}") from exc
        return path

    def describe(self, job_id: str) -> Artifacts:
        path = self.job_path(job_id)
        return Artifacts(
            root=self.location,
            path=path,
            report=f"{path}/report.json",
            audit=f"{path}/audit.json",
        )

    def step_image(self, job_id: str, index: int, step_id: str, suffix: str) -> tuple[Path, str]:
        """(local path to capture into, path relative to the root) for a step's screenshot."""
        name = f"{index:02d}-{safe_id(step_id)}{suffix}"
        return self._spooled(job_id) / name, f"{self.job_path(job_id)}/{name}"

    async def keep_capture(self, job_id: str, path: Path, data: bytes) -> bool:
        """Write a step's screenshot as captured (`path`, from `step_image`) within the job's
        image budget: as it is while it fits, at a lower JPEG quality when only that fits,
        not at all (False) once nothing does — a job cannot write evidence without end."""
        used = self._captured.get(job_id)
        if used is None:  # a run that took the job over: the captures of the runs before
            used = sum(
                p.stat().st_size
                for p in path.parent.iterdir()
                if p.suffix in _CAPTURES and p.is_file()
            )
        allowance = self.image_budget - used
        kept: bytes | None = data
        if len(data) > allowance:
            loop = asyncio.get_running_loop()
            kept = await loop.run_in_executor(_IMAGES, fit_capture, data, allowance)
        self._captured[job_id] = used
        if kept is None:
            return False
        await asyncio.to_thread(_write_private, path, kept)
        self._captured[job_id] = used + len(kept)
        return True

    def trace_file(self, job_id: str) -> Path:
        """Where to record a trace of this run of the job (a resumed job has one per run)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        return self._spooled(job_id) / f"trace-{stamp}.zip"

    def downloads_dir(self, job_id: str) -> Path:
        """The only place a job's downloads are kept (published with the rest of the job)."""
        path = self._spooled(job_id) / "downloads"
        try:
            path.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ArtifactError(f"could not make {path}: {exc}") from exc
        return path

    def har_file(self, job_id: str) -> tuple[Path, str]:
        """(local path to record into, path relative to the root) for the job's HAR."""
        return self._spooled(job_id) / HAR_FILE, f"{self.job_path(job_id)}/{HAR_FILE}"

    def write_report(self, report: JobReport) -> Path:
        path = self._spooled(report.job_id) / "report.json"
        try:
            _write_private(path, report.model_dump_json(indent=2).encode())
        except OSError as exc:
            raise ArtifactError(f"could not write {path}: {exc}") from exc
        return path

    # ------------------------------------------------------------ the audit record

    def prepare(self, source: str, mark: Mark) -> None:
        """Start encoding the evidence image of the screenshot at `source` (just captured), in
        a worker thread, while the job goes on: `record` then finds it done instead of
        encoding a whole job's images between the last step and the report. A mark that has
        changed by then (a step retried) is simply encoded again."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(_IMAGES, self._prepare, source, mark)
        future.add_done_callback(_retrieve)  # a failure is met again, and logged, by record
        self._prepared[source] = (mark, future)

    def _prepare(self, source: str, mark: Mark) -> Encoded:
        return prepare(self._read_spooled_or_stored(source), mark, self.image_format)

    async def record(self, report: JobReport) -> AuditRecord | None:
        """Build and store the job's audit record; publish what it spooled.

        Never raises: the job's outcome was already reported, and a store that is down must
        not turn it into a failure. The loss is logged.
        """
        marks = screenshot_marks(report)
        self._captured.pop(report.job_id, None)
        job = f"{self.job_path(report.job_id)}/"
        ready: dict[str, Encoded] = {}
        for source in [s for s in self._prepared if s.startswith(job)]:
            mark, future = self._prepared.pop(source)
            with contextlib.suppress(Exception):  # encoded again below, where errors are logged
                if marks.get(source) == mark:
                    ready[source] = await future
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(_IMAGES, self._record, report, marks, ready)
        except ArtifactError as exc:
            log.error("job %s: audit record not stored: %s", report.job_id, exc.message)
        except OSError as exc:  # the spool's disk, or an image Pillow cannot read
            log.error("job %s: audit record not stored: %s", report.job_id, exc)
        return None

    def _record(
        self, report: JobReport, marks: dict[str, Mark], ready: dict[str, Encoded]
    ) -> AuditRecord:
        path = self.job_path(report.job_id)
        shots = []
        for source, mark in marks.items():
            try:
                shots.append((source, self._read_spooled_or_stored(source), mark))
            except ArtifactError:
                log.warning("job %s: screenshot %s is missing", report.job_id, source)
        rendered = render(
            [(raw, mark) for _, raw, mark in shots],
            fmt=self.image_format,
            budget_bytes=self.image_budget,
            prepared=[ready.get(source) for source, _, _ in shots],
        )
        evidence: dict[str, Evidence] = {}
        existing = set(self.keys(f"{path}/images/"))
        for (source, _, mark), enc in zip(shots, rendered.images, strict=True):
            image, thumb = f"{path}/images/{enc.image_name}", f"{path}/images/{enc.thumbnail_name}"
            for key, data in ((image, enc.image), (thumb, enc.thumbnail)):
                if key not in existing:  # content-addressed: the same bytes are stored once
                    self._put_spooled(key, data)
                    existing.add(key)
            evidence[source] = Evidence(
                source=source,
                image=image,
                thumbnail=thumb,
                width=enc.width,
                height=enc.height,
                box=enc.box,
                label=mark.label,
                failure=mark.failure,
            )
        traces = sorted(
            {k for k in self.keys(f"{path}/") if k.endswith(".zip")}
            | {p.relative_to(self.spool).as_posix() for p in self._spool_dir(path).glob("*.zip")}
        )
        record = record_of(
            report,
            path,
            written_at=datetime.now(UTC),
            evidence=evidence,
            traces=traces,
            images=ImageBudget(
                format=self.image_format,
                budget_bytes=self.image_budget,
                used_bytes=rendered.total_bytes,
                quality=rendered.quality,
                scale=rendered.scale,
                over_budget=rendered.over_budget,
            ),
        )
        self._put_spooled(f"{path}/audit.json", record.model_dump_json(indent=2).encode())
        self.publish(path)
        return record

    def _spool_dir(self, path: str) -> Path:
        return self.spool / path

    def _read_spooled_or_stored(self, key: str) -> bytes:
        local = self.spool / key
        if local.is_file():
            return local.read_bytes()
        return self.get(key)

    def _put_spooled(self, key: str, data: bytes) -> None:
        # Into the spool, published with the rest: one upload path for every file of a job.
        local = self.spool / key
        _private_dir(local.parent)
        _write_private(local, data)

    # ------------------------------------------------------------ reading and retention

    def audit(self, path: str) -> AuditRecord:
        """The audit record of the job at `path` (`<day>/<job_id>`); ArtifactUnreadable,
        saying what is wrong, when the file is there but is not a record."""
        key = f"{path}/audit.json"
        raw = self.get(key)
        try:
            return AuditRecord.model_validate_json(raw)
        except ValidationError as exc:
            problems = exc.errors()
            where = ".".join(str(p) for p in problems[0]["loc"])
            first = f"{where}: {problems[0]['msg']}" if where else problems[0]["msg"]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ArtifactUnreadable(
                f"{key} is not a readable audit record: {first}{more}"
            ) from exc

    def audit_paths(self) -> list[str]:
        """The path (`<day>/<job_id>`) of every job with an audit record, newest day first."""
        return [path for path, audited in self.job_paths() if audited]

    def job_paths(self) -> list[tuple[str, bool]]:
        """(path, whether it has an audit record) of every job with an audit record or a
        report, newest day first. A job can have a report and no record: the record is
        written after the report, and the store failed between the two (a full disk) or
        rendering its evidence did."""
        found = []
        for day in sorted(self.days(), reverse=True):
            files: dict[str, set[str]] = {}
            for key in self.keys(f"{day}/"):
                if key.count("/") == 2:
                    path, _, name = key.rpartition("/")
                    files.setdefault(path, set()).add(name)
            found += [
                (path, "audit.json" in names)
                for path, names in files.items()
                if names & {"audit.json", "report.json"}
            ]
        return found

    def report(self, path: str) -> JobReport:
        """The report of the job at `path`; ArtifactUnreadable, saying what is wrong, when the
        file is there but is not a report."""
        key = f"{path}/report.json"
        raw = self.get(key)
        try:
            return JobReport.model_validate_json(raw)
        except ValidationError as exc:
            raise ArtifactUnreadable(
                f"{key} is not a readable report: {exc.errors()[0]['msg']}"
            ) from exc

    def review_record(self, path: str) -> tuple[AuditRecord, bool]:
        """What a reviewer is shown of the job at `path`, and whether it is its audit record:
        a job whose `audit.json` was never written is shown from its `report.json` (see
        `stand_in_record`). ArtifactError when neither is there; ArtifactUnreadable when the
        audit record is there but cannot be read (its report is not put in its place: what is
        wrong with the record must be said)."""
        try:
            return self.audit(path), True
        except ArtifactUnreadable:
            raise
        except ArtifactError:
            if f"{path}/report.json" not in self.keys(f"{path}/"):
                raise
        report = self.report(path)
        return stand_in_record(report, path), False

    def audits(self) -> list[AuditRecord]:
        """Every job's audit record, newest day first. Unreadable ones are skipped (logged)."""
        records = []
        for path in self.audit_paths():
            try:
                records.append(self.audit(path))
            except (ArtifactError, ValueError) as exc:
                log.warning("skipping %s/audit.json: %s", path, exc)
        return records

    def find_audit(self, job_id: str) -> AuditRecord:
        path = self.find_job(job_id)
        if path is None:
            raise ArtifactError(f"no audit record for job {job_id!r} in {self.location}")
        return self.audit(path)

    def find_review(self, job_id: str) -> tuple[AuditRecord, bool]:
        """`review_record` of the job `job_id`."""
        path = self.find_job(job_id)
        if path is None:
            raise ArtifactError(f"no audit record for job {job_id!r} in {self.location}")
        return self.review_record(path)

    def prune(
        self, older_than: timedelta, *, now: datetime | None = None, dry_run: bool = False
    ) -> list[str]:
        """Remove every job whose whole day ended more than `older_than` before `now`; the job
        paths removed (with `dry_run`, that would be). Jobs are never split: a day goes whole,
        but for any job still waiting for a decision, which is kept (and logged)."""
        # The first day kept is the one `now - older_than` falls in: a day before it ended by
        # then. (`date - timedelta` drops the hours: 36h at 01:00 removed yesterday's
        # jobs, some of them 25 hours old.)
        cutoff = prune_cutoff(older_than, now)
        removed: list[str] = []
        for day in self.days():
            try:
                seen = date.fromisoformat(day)
            except ValueError:
                # Named like a day but none (2020-02-30): not a folder this store wrote, so
                # not one retention may remove; it must not stop the rest being pruned either.
                log.warning("prune: skipping %s, which is not a date", day)
                continue
            if seen >= cutoff:
                continue
            keys = self.keys(f"{day}/")
            jobs = self._jobs_in(day, keys)
            waiting = [job for job in jobs if self._still_paused(job)]
            if waiting:
                # Its evidence is what the person deciding looks at, and the job writes here
                # again when it goes on: it goes with a later prune, once it has ended.
                keys = [k for k in keys if not any(k.startswith(f"{job}/") for job in waiting)]
                jobs = [job for job in jobs if job not in waiting]
            removed += jobs
            if not dry_run:
                self._remove_day(day, keys)
        if not dry_run:
            self._forget(removed)
        return removed

    def _still_paused(self, path: str) -> bool:
        """Whether the job at `path` waits for a person (its record says so), said when so."""
        try:
            status = self.audit(path).status
        except ArtifactError:
            # Its record cut short, or never written (the store failed as the job paused):
            # the report, written before it, says the same.
            reported = self._reported_status(path)
            if reported is None:
                return False  # nothing readable says it is waiting
            status = reported
        if status.paused:
            log.warning("prune: keeping %s, which is %s (waiting for a decision)", path, status)
        return status.paused

    def _reported_status(self, path: str) -> JobStatus | None:
        """The status in the report of the job at `path`, if it has one that reads."""
        try:
            return self.report(path).status
        except ArtifactError:
            return None

    def _jobs_in(self, day: str, keys: Sequence[str]) -> list[str]:
        """The paths of the jobs in `day`, whose keys are `keys`."""
        return sorted({"/".join(k.split("/")[:2]) for k in keys if k.count("/") >= 2})

    def _remove_day(self, day: str, keys: Sequence[str]) -> None:
        """Remove a day being pruned, whose keys are `keys` (a bucket has no folders)."""
        self.delete(keys)

    def _forget(self, paths: list[str]) -> None:
        """Drop whatever else points at removed jobs (back ends with an index)."""
        gone = set(paths)
        self._paths = {k: v for k, v in self._paths.items() if v not in gone}


def prune_cutoff(older_than: timedelta, now: datetime | None = None) -> date:
    """The first day `prune(older_than)` keeps at `now`: every job of an earlier day is older."""
    return ((now or datetime.now(UTC)) - older_than).astimezone(UTC).date()


def _retrieve(future: asyncio.Future[Encoded]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: asyncio would otherwise log it as never seen


def _private_dir(path: Path) -> None:
    """`path` and every folder missing above it, created `0700`. (`mkdir(parents=True,
    mode=…)` gives the mode to the last folder only: the root and day folders came out `0755`,
    and anyone on the machine could list the job ids, often ticket ids.) Folders that exist
    already are left as their owner set them."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    """Write then rename, readable by the worker's user only: a reader never sees half a file,
    and evidence may show customer data."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


class LocalArtifacts(ArtifactStore):
    """Artifacts in a local directory (the default): the spool is the root itself."""

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.root = self.spool

    @property
    def location(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactError(f"{key!r} is outside the artifacts root")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        _private_dir(path.parent)
        _write_private(path, data)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ArtifactError(f"no artifact {key!r}") from exc

    def keys(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")
        )

    def delete(self, keys: Sequence[str]) -> None:
        dirs: set[Path] = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            dirs.update(p for p in path.parents if p.is_relative_to(self.root) and p != self.root)
        for folder in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def days(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and DAY.match(p.name))

    def _jobs_in(self, day: str, keys: Sequence[str]) -> list[str]:
        # A job's folder may hold no file at all, only folders (an unused downloads/).
        folders = {f"{day}/{p.name}" for p in self._path(day).iterdir() if p.is_dir()}
        return sorted(folders.union(super()._jobs_in(day, keys)))

    def _remove_day(self, day: str, keys: Sequence[str]) -> None:
        self.delete(keys)
        # What no key names goes too, so that the day goes whole: the folders a job makes
        # before it needs them (downloads/), the `.tmp` of a write a crash cut short. A file
        # written since the listing stays, and with it its folders.
        for parent, _, files in os.walk(self._path(day), topdown=False):
            folder = Path(parent)
            for name in files:
                if name.endswith(".tmp"):
                    (folder / name).unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()

    def _locate(self, name: str) -> str | None:
        found = sorted(self.root.glob(f"*/{name}"))
        return found[-1].relative_to(self.root).as_posix() if found else None


class S3Artifacts(ArtifactStore):
    """Artifacts in a bucket of any S3-compatible server, for deployments of many machines.

    A job's files are spooled on the worker's disk while it runs and uploaded when it settles;
    a small pointer object `jobs/<job_id>` lets a worker that resumes the job on another
    machine find its day folder.
    """

    def __init__(
        self,
        bucket: str,
        spool: Path,
        *,
        prefix: str = "",
        client: S3Client | None = None,
        endpoint_url: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(spool, **options)
        if client is None:
            import boto3  # the `s3` extra: only deployments that use S3 install it

            client = boto3.client("s3", endpoint_url=endpoint_url)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _errors(self) -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type(key)
            )
        except self._errors() as exc:
            raise ArtifactError(f"could not store {key!r} in {self.location}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return answer["Body"].read()
        except self._errors() as exc:
            raise ArtifactError(f"no artifact {key!r} in {self.location}: {exc}") from exc

    def _list(self, prefix: str, delimiter: str | None = None) -> list[dict[str, Any]]:
        pages: list[dict[str, Any]] = []
        options: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if delimiter:
            options["Delimiter"] = delimiter
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**options):
                pages.append(dict(page))
        except self._errors() as exc:
            raise ArtifactError(f"could not list {self.location}{prefix}: {exc}") from exc
        return pages

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(
            item["Key"].removeprefix(self.prefix)
            for page in self._list(prefix)
            for item in page.get("Contents", [])
        )

    def delete(self, keys: Sequence[str]) -> None:
        try:
            for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 at a time
                chunk: list[ObjectIdentifierTypeDef] = [
                    {"Key": self.prefix + k} for k in keys[start : start + 1000]
                ]
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True}
                )
        except self._errors() as exc:
            raise ArtifactError(f"could not delete from {self.location}: {exc}") from exc

    def days(self) -> list[str]:
        names = [
            common["Prefix"].removeprefix(self.prefix).rstrip("/")
            for page in self._list("", delimiter="/")
            for common in page.get("CommonPrefixes", [])
        ]
        return sorted(n for n in names if DAY.match(n))

    def _locate(self, name: str) -> str | None:
        try:
            return self.get(f"jobs/{name}").decode()
        except ArtifactError:
            return None

    def publish(self, path: str) -> None:
        local = self.spool / path
        files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
        for file in files:
            self.put(file.relative_to(self.spool).as_posix(), file.read_bytes())
        self.put(f"jobs/{path.split('/', 1)[1]}", path.encode())
        # Keep the spool only as long as the job may still add to it here.
        for file in files:
            file.unlink()

    def _forget(self, paths: list[str]) -> None:
        super()._forget(paths)
        self.delete([f"jobs/{p.split('/', 1)[1]}" for p in paths])


def open_store(
    artifacts_dir: Path, url: str | None = None, *, endpoint_url: str | None = None
) -> ArtifactStore:
    """The store a worker is configured for: `s3://bucket/prefix` (spooling in
    `artifacts_dir`), or the local directory `artifacts_dir`."""
    if url and url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3Artifacts(bucket, artifacts_dir, prefix=prefix, endpoint_url=endpoint_url)
    if url:
        raise ArtifactError(f"artifacts URL {url!r}: only s3://bucket/prefix is supported")
    return LocalArtifacts(artifacts_dir)


def store_for(settings: Settings) -> ArtifactStore:
    """The artifact store `settings` describe (FORMWORK_ARTIFACTS_URL / _DIR)."""
    return open_store(
        settings.artifacts_dir, settings.artifacts_url, endpoint_url=settings.s3_endpoint_url
    )
