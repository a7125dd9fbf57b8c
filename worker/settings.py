"""Worker settings, read from the environment (twelve-factor: the same image everywhere)."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from redis.asyncio import ConnectionPool


def shown_url(url: str) -> str:
    """`url` as it may be printed or logged: a password in it (`redis://:pw@host`, or a
    `?password=` query) becomes `***`."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not a URL (`redis://:pw@[::1/0`): mask whatever stands before an @
        return re.sub(r"(//[^/:@]*):[^/@]*@", r"\1:***@", url)
    head, sep, query = url.partition("?")
    if parts.password is not None:
        user, _, host = parts.netloc.rpartition("@")
        head = head.replace(parts.netloc, f"{user.partition(':')[0]}:***@{host}", 1)
    if sep:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        hidden = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
        query = urllib.parse.urlencode(hidden, safe="*/")
    return head + sep + query


def _redis_url_problem(url: str) -> str | None:
    """What makes a Redis URL unusable, or None. Read by arq (workers) and redis-py (commands,
    the client) alike, such a URL ended every command in a traceback; and a database that is
    not a number (`/abc`) was database 0 to redis-py but stopped arq's worker."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        return f"not a URL: {str(exc)[:1].lower()}{str(exc)[1:]}"
    try:
        parts.port  # noqa: B018 - parsed on access: `:abc` or `:99999` raises here
    except ValueError:
        return "the port is a number from 0 to 65535"
    query = urllib.parse.parse_qs(parts.query)
    db = query["db"][0] if query.get("db") else parts.path.removeprefix("/")
    if parts.scheme != "unix" and db and not (db.isascii() and db.isdigit()):
        return f"the database is a number (redis://host:6379/0), not {db!r}"
    try:
        # Made, not connected (no I/O): the query's settings are checked as a command reads them.
        pool = ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        name = re.search(r"argument '(\w+)'", str(exc))
        return f"{name[1] if name else 'a parameter'} in its query is no Redis setting"
    except ValueError as exc:
        return str(exc).rstrip(".").replace("Invalid", "invalid", 1)
    return None


class SettingsInvalid(ValueError):
    """A setting (an environment variable, or the option that overrides it) with a value the
    worker cannot use; the message names it and says why, in one line."""


# Settings whose values are never repeated in an error message.
_SECRET_SETTINGS = {"webhook_secret", "state_key"}
REDIS_SCHEMES = ("redis", "rediss", "unix")
# The command-line options that set a field under another name than `--<field>`.
_OPTIONS = {
    "artifacts_dir": "--artifacts",
    "artifacts_url": "--store",
    "s3_endpoint_url": "--s3-endpoint",
}


class Settings(BaseModel):
    """Every knob of a worker. `Settings.from_env()` reads `FORMWORK_*` and `REDIS_URL`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    max_jobs: int = Field(default=2, ge=1, le=64)
    artifacts_dir: Path = Path("artifacts")
    # s3://bucket/prefix: artifacts go to an S3-compatible store; artifacts_dir is then the
    # local spool a job writes into while it runs.
    artifacts_url: str | None = None
    s3_endpoint_url: str | None = None  # a non-AWS server (MinIO, Ceph, ...)
    scripts_dir: Path = Path("scripts")
    selectors_dir: Path = Path("selectors")
    # The only directory upload steps may take files from (the orchestrator stages them there).
    uploads_dir: Path = Path("uploads")
    secrets_file: Path | None = None
    chromium: str | None = None
    # arq polls its queue; 20 ms keeps enqueue-to-start latency low at ~50 cheap reads a second.
    poll_delay_s: float = Field(default=0.02, gt=0, le=10)
    shutdown_grace_s: int = Field(default=30, ge=0)
    job_timeout_s: int = Field(default=600, gt=0)
    key_prefix: str = Field(default="formwork", pattern=r"^[A-Za-z0-9:_-]+$")
    webhook_secret: str | None = Field(default=None, repr=False)
    webhook_hosts: list[str] | None = None  # None: any host; else only these
    # Seals the browser session kept in checkpoints; unset, a resumed job signs in again.
    state_key: str | None = Field(default=None, repr=False, min_length=16)
    # Serve Prometheus /metrics on this port (0: any free port); None: no HTTP server. The
    # hourly rollups behind `formwork stats` are kept either way.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Loopback by default: a deployment scraped from another host sets 0.0.0.0 on purpose.
    metrics_host: str = "127.0.0.1"
    # A new Playwright driver and Chromium after this many jobs (0: never); the old pair is shut
    # down once its last job ends. A bound on what they keep of past jobs for workers that run
    # for weeks (worker.browser); past the 500 jobs bench/memory.py checks, so that check
    # measures the pair itself, not a recycle that happened to fall just before its end.
    browser_recycle_jobs: int = Field(default=1000, ge=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        scheme = url.partition("://")[0] if "://" in url else ""
        if scheme not in REDIS_SCHEMES:
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        problem = _redis_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url

    @field_validator("webhook_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str] | None) -> list[str] | None:
        # A URL's host is compared in lower case (`urlsplit(...).hostname`): `Hooks.Example.com`
        # in the list never matched, and every job with a webhook there was refused.
        return None if hosts is None else [host.strip().lower() for host in hosts]

    @field_validator("artifacts_url")
    @classmethod
    def _s3_url(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"s3://[^/\s]+(/.*)?", url):
            raise ValueError("an object store is named s3://bucket or s3://bucket/prefix")
        return url

    def to_env(self) -> dict[str, str]:
        """The environment that gives a `formwork worker` process these settings."""
        env = {
            "REDIS_URL": self.redis_url,
            "FORMWORK_KEY_PREFIX": self.key_prefix,
            "FORMWORK_ARTIFACTS_DIR": str(self.artifacts_dir),
            "FORMWORK_SCRIPTS_DIR": str(self.scripts_dir),
            "FORMWORK_SELECTORS_DIR": str(self.selectors_dir),
            "FORMWORK_UPLOADS_DIR": str(self.uploads_dir),
            "FORMWORK_MAX_JOBS": str(self.max_jobs),
            "FORMWORK_POLL_DELAY": str(self.poll_delay_s),
            "FORMWORK_JOB_TIMEOUT": str(self.job_timeout_s),
            "FORMWORK_SHUTDOWN_GRACE": str(self.shutdown_grace_s),
            "FORMWORK_BROWSER_RECYCLE_JOBS": str(self.browser_recycle_jobs),
        }
        if self.secrets_file is not None:
            env["FORMWORK_SECRETS_FILE"] = str(self.secrets_file)
        if self.artifacts_url is not None:
            env["FORMWORK_ARTIFACTS_URL"] = self.artifacts_url
        if self.s3_endpoint_url is not None:
            env["FORMWORK_S3_ENDPOINT"] = self.s3_endpoint_url
        if self.chromium is not None:
            env["FORMWORK_CHROMIUM"] = self.chromium
        if self.state_key is not None:
            env["FORMWORK_STATE_KEY"] = self.state_key
        if self.metrics_port is not None:
            env["FORMWORK_METRICS_PORT"] = str(self.metrics_port)
            env["FORMWORK_METRICS_HOST"] = self.metrics_host
        if self.webhook_secret is not None:
            env["FORMWORK_WEBHOOK_SECRET"] = self.webhook_secret
        if self.webhook_hosts is not None:
            env["FORMWORK_WEBHOOK_HOSTS"] = ",".join(self.webhook_hosts)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        names = {
            "redis_url": "REDIS_URL",
            "max_jobs": "FORMWORK_MAX_JOBS",
            "artifacts_dir": "FORMWORK_ARTIFACTS_DIR",
            "artifacts_url": "FORMWORK_ARTIFACTS_URL",
            "s3_endpoint_url": "FORMWORK_S3_ENDPOINT",
            "scripts_dir": "FORMWORK_SCRIPTS_DIR",
            "selectors_dir": "FORMWORK_SELECTORS_DIR",
            "uploads_dir": "FORMWORK_UPLOADS_DIR",
            "secrets_file": "FORMWORK_SECRETS_FILE",
            "chromium": "FORMWORK_CHROMIUM",
            "poll_delay_s": "FORMWORK_POLL_DELAY",
            "job_timeout_s": "FORMWORK_JOB_TIMEOUT",
            "shutdown_grace_s": "FORMWORK_SHUTDOWN_GRACE",
            "key_prefix": "FORMWORK_KEY_PREFIX",
            "webhook_secret": "FORMWORK_WEBHOOK_SECRET",
            "state_key": "FORMWORK_STATE_KEY",
            "metrics_port": "FORMWORK_METRICS_PORT",
            "metrics_host": "FORMWORK_METRICS_HOST",
            "browser_recycle_jobs": "FORMWORK_BROWSER_RECYCLE_JOBS",
        }
        if env.get("FORMWORK_REDIS_URL"):
            # Every other setting is FORMWORK_*, so this is the name people guess; read by
            # nothing, it left the worker on the default Redis without a word.
            raise SettingsInvalid(
                "FORMWORK_REDIS_URL is not read: the queue's Redis is REDIS_URL "
                "(the name arq reads too)"
            )
        values: dict[str, object] = {f: env[v] for f, v in names.items() if env.get(v)}
        if env.get("FORMWORK_WEBHOOK_HOSTS"):
            values["webhook_hosts"] = [h.strip() for h in env["FORMWORK_WEBHOOK_HOSTS"].split(",")]
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                field = str(error["loc"][0]) if error["loc"] else ""
                # An option given on the command line, else the variable it came from.
                option = _OPTIONS.get(field, f"--{field.replace('_', '-')}")
                source = option if field in given else names.get(field)
                source = source or {"webhook_hosts": "FORMWORK_WEBHOOK_HOSTS"}.get(field, field)
                why = error["msg"].removeprefix("Value error, ")
                value = values.get(field)
                if field in _SECRET_SETTINGS or value is None:
                    problems.append(f"{source}: {why}")
                else:
                    shown = shown_url(str(value)) if field == "redis_url" else value
                    problems.append(f"{source}={shown!r}: {why}")
            raise SettingsInvalid("; ".join(problems)) from None
