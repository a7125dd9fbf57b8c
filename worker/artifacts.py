"""Where a job's artifacts go: `<root>/<job_id>/report.json` and one image per step.

Report paths are relative to the root, so an artifacts tree can be moved or served as a whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from worker.contract import Artifacts, JobReport

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class LocalArtifacts:
    """Artifacts on the local disk, readable by the worker's user only."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def job_dir(self, job_id: str) -> Path:
        path = self.root / _UNSAFE.sub("_", job_id)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def describe(self, job_id: str) -> Artifacts:
        rel = self.job_dir(job_id).relative_to(self.root)
        return Artifacts(root=str(self.root), path=str(rel), report=str(rel / "report.json"))

    def step_image(self, job_id: str, index: int, step_id: str, suffix: str) -> tuple[Path, str]:
        """(absolute path, path relative to the root) for a step's screenshot."""
        name = f"{index:02d}-{_UNSAFE.sub('_', step_id)}{suffix}"
        path = self.job_dir(job_id) / name
        return path, str(path.relative_to(self.root))

    def write_report(self, report: JobReport) -> Path:
        path = self.job_dir(report.job_id) / "report.json"
        tmp = path.with_suffix(".json.tmp")
        # Write then rename: a reader never sees half a report.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(report.model_dump_json(indent=2))
        tmp.replace(path)
        return path
