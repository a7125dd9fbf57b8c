"""Worker settings, read from the environment (twelve-factor: the same image everywhere)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    """Every knob of a worker. `Settings.from_env()` reads `FORMWORK_*` and `REDIS_URL`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    max_jobs: int = Field(default=2, ge=1, le=64)
    artifacts_dir: Path = Path("artifacts")
    scripts_dir: Path = Path("scripts")
    selectors_dir: Path = Path("selectors")
    secrets_file: Path | None = None
    chromium: str | None = None
    poll_delay_s: float = Field(default=0.05, gt=0, le=10)
    job_timeout_s: int = Field(default=600, gt=0)
    queue_name: str = "formwork:queue"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        names = {
            "redis_url": "REDIS_URL",
            "max_jobs": "FORMWORK_MAX_JOBS",
            "artifacts_dir": "FORMWORK_ARTIFACTS_DIR",
            "scripts_dir": "FORMWORK_SCRIPTS_DIR",
            "selectors_dir": "FORMWORK_SELECTORS_DIR",
            "secrets_file": "FORMWORK_SECRETS_FILE",
            "chromium": "FORMWORK_CHROMIUM",
            "poll_delay_s": "FORMWORK_POLL_DELAY",
            "job_timeout_s": "FORMWORK_JOB_TIMEOUT",
            "queue_name": "FORMWORK_QUEUE",
        }
        values: dict[str, object] = {f: env[v] for f, v in names.items() if env.get(v)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
