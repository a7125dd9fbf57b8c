"""Real components for every test: one Chromium per session, real fixture sites, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from arq import Worker
from redis.asyncio import Redis
from redis.exceptions import RedisError

from fixtures import FixtureServer, start_fixture
from worker.artifacts import LocalArtifacts
from worker.browser import BrowserHost
from worker.client import FormworkClient
from worker.executor import Runtime
from worker.queue import running_worker
from worker.script import ScriptStore
from worker.secretstore import SecretStore
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SELECTORS = ROOT / "selectors"
SECRETS_FILE = ROOT / "fixtures" / "secrets.yaml"
UPLOADS = ROOT / "fixtures" / "uploads"

CREDIT_INPUTS = {
    "account_id": "AC-10231",
    "amount": "15.00",
    "reason": "damaged item",
    "reference": "T-88812",
}


def credit_as_script(scripts: Path) -> None:
    """billing/credit_as: issue_credit signing in with the agent's own name and password,
    given as inputs declared `secret: true`."""
    source = (scripts / "billing" / "issue_credit.yaml").read_text()
    source = source.replace("name: billing/issue_credit", "name: billing/credit_as")
    source = source.replace(
        "inputs:\n",
        "inputs:\n"
        "  agent_user: {type: string, secret: true}\n"
        "  agent_pw: {type: string, secret: true}\n",
        1,
    )
    source = source.replace(
        "  - {id: login, use: billing/login}\n",
        "  - {id: open_login, goto: /login, expect: {visible: login.form}}\n"
        '  - {id: agent_user, fill: {target: login.username, value: "{{ inputs.agent_user }}"}}\n'
        '  - {id: agent_pw, fill: {target: login.password, value: "{{ inputs.agent_pw }}"}}\n'
        "  - {id: sign_in, click: login.submit, expect: {visible: dashboard.header}}\n",
    )
    (scripts / "billing" / "credit_as.yaml").write_text(source)


def signing_in_as_the_agent(settings: Settings, tmp_path: Path) -> Settings:
    """`settings` with billing/credit_as among the scripts, on a worker whose own service
    account is another (`service-bot`): the agent's name and password, the ones the fixture
    accepts, are known to the job only as its inputs declared secret."""
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    credit_as_script(scripts)
    own = tmp_path / "secrets.yaml"
    own.write_text("billing_username: service-bot\nbilling_password: not-the-agents-0000\n")
    return settings.model_copy(update={"scripts_dir": scripts, "secrets_file": own})


class Site:
    """A running fixture site plus its ground truth, as a test sees it."""

    def __init__(self, server: FixtureServer) -> None:
        self.server = server
        self.url = server.url

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        self._call("POST", "/_fixture/reset")

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_fixture/state")
        return result

    def credits(self) -> list[dict[str, Any]]:
        credits: list[dict[str, Any]] = self.state()["credits"]
        return credits

    def refunds(self) -> list[dict[str, Any]]:
        refunds: list[dict[str, Any]] = self.state()["refunds"]
        return refunds

    def ticket(self, ticket_id: str) -> dict[str, Any]:
        ticket: dict[str, Any] = self.state()["tickets"][ticket_id]
        return ticket

    def faults(self, **faults: Any) -> None:
        self._call("POST", "/_fixture/faults", faults)


def _site_fixtures(name: str) -> tuple[Any, Any]:
    """`<name>_server` (one per session) and `<name>` (a Site, reset for each test)."""

    @pytest.fixture(scope="session", name=f"{name}_server")
    def server() -> Iterator[FixtureServer]:
        with start_fixture(name) as running:
            yield running

    @pytest.fixture(name=name)
    def site(request: pytest.FixtureRequest) -> Site:
        fresh = Site(request.getfixturevalue(f"{name}_server"))
        fresh.reset()
        return fresh

    return server, site


billing_server, billing = _site_fixtures("billing")
orders_server, orders = _site_fixtures("orders")
helpdesk_server, helpdesk = _site_fixtures("helpdesk")


@pytest.fixture(scope="session")
async def browser_host() -> AsyncIterator[BrowserHost]:
    host = BrowserHost(os.environ.get("FORMWORK_CHROMIUM"))
    await host.start()
    yield host
    await host.stop()


@pytest.fixture
def script_store() -> ScriptStore:
    return ScriptStore(SCRIPTS, SELECTORS)


@pytest.fixture
def runtime(browser_host: BrowserHost, tmp_path: Path, script_store: ScriptStore) -> Runtime:
    return Runtime(
        scripts=script_store,
        browser=browser_host,
        artifacts=LocalArtifacts(tmp_path / "artifacts"),
        secrets=SecretStore(SECRETS_FILE, environ={}),
        uploads=UPLOADS,
    )


@pytest.fixture(scope="session")
def fixture_secrets() -> dict[str, str]:
    import yaml

    values: dict[str, str] = yaml.safe_load(SECRETS_FILE.read_text())
    return values


# ---------------------------------------------------------------- the queue: real Redis


def _test_redis_url() -> str:
    """The session's database: FORMWORK_TEST_REDIS_URL (default db 9), and under pytest-xdist
    the next ones up, one per test process (gw0 on 9, gw1 on 10, ...): each empties its own."""
    url = os.environ.get("FORMWORK_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    parts = urllib.parse.urlsplit(url)
    db = int(parts.path.strip("/") or 0) + int(worker[2:])
    return urllib.parse.urlunsplit(parts._replace(path=f"/{db}"))


TEST_REDIS_URL = _test_redis_url()


# The name of a connection each test session holds open on its database for as long as it runs.
SESSION_CLIENT_NAME = "formwork-test-session"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis (started if none answers), on a database of its own, emptied per session.

    One session at a time per database: arq's keys (`arq:job:<id>`) carry no prefix, and the
    empty start would wipe a running session's jobs. A second session finds the first one's
    named connection and stops with a clear message instead of failing tests at random; a
    session that died took its connection with it, so nothing stale is left to clear."""
    import redis as redis_sync

    from worker.localredis import ensure

    ensure(TEST_REDIS_URL)
    holder = redis_sync.Redis.from_url(TEST_REDIS_URL)
    db = str(holder.connection_pool.connection_kwargs.get("db", 0))
    running = [
        c for c in holder.client_list() if c.get("name") == SESSION_CLIENT_NAME and c["db"] == db
    ]
    if running:
        holder.close()
        pytest.exit(
            f"another test session is using {TEST_REDIS_URL} (client {running[0]['addr']}): "
            "wait for it, or point FORMWORK_TEST_REDIS_URL at another database",
            returncode=3,
        )
    holder.client_setname(SESSION_CLIENT_NAME)
    holder.flushdb()
    try:
        yield TEST_REDIS_URL
    finally:
        holder.close()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    """Worker settings isolated per test by a key prefix of their own."""
    return Settings(
        redis_url=redis_url,
        key_prefix=f"t{uuid.uuid4().hex[:10]}",
        artifacts_dir=tmp_path / "artifacts",
        scripts_dir=SCRIPTS,
        selectors_dir=SELECTORS,
        secrets_file=SECRETS_FILE,
        uploads_dir=UPLOADS,
        max_jobs=4,
        shutdown_grace_s=0,
        state_key="formwork-tests-state-key-0123456789",
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[FormworkClient]:
    async with FormworkClient(settings.redis_url, key_prefix=settings.key_prefix) as c:
        yield c


@pytest.fixture
async def worker(settings: Settings, browser_host: BrowserHost) -> AsyncIterator[Worker]:
    """An in-process worker sharing the session's Chromium."""
    async with running_worker(settings, browser_host) as w:
        yield w


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `formwork worker` process with these settings."""
    return {**os.environ, **settings.to_env(), **extra}


# ---------------------------------------------------------------- nothing left behind

SECRET_SCAN_SKIP = {".jpg", ".png", ".webp"}  # pixels: checked by the masking tests instead


def _leaks_in_files(root: Path, values: list[str]) -> list[str]:
    import zipfile

    found = []
    for path in root.rglob("*"):
        if not path.is_file() or path.suffix in SECRET_SCAN_SKIP:
            continue
        blobs = [path.read_bytes()]
        if zipfile.is_zipfile(path):  # traces: the text is inside the archive
            with zipfile.ZipFile(path) as archive:
                blobs += [archive.read(name) for name in archive.namelist()]
        if any(v.encode() in blob for v in values for blob in blobs):
            found.append(str(path.relative_to(root)))
    return found


def _leaks_in_redis(url: str, values: list[str]) -> list[str]:
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url)
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            blobs = [client.get(key) or b""]
        elif kind == "hash":
            blobs = list(client.hgetall(key).values())
        elif kind == "stream":
            blobs = [v for _, fields in client.xrange(key) for v in fields.values()]
        elif kind == "zset":
            blobs = list(client.zrange(key, 0, -1))
        else:
            blobs = []
        if any(v.encode() in blob for v in values for blob in blobs):
            found.append(key.decode())
    client.close()
    return found


@pytest.fixture(scope="session", autouse=True)
def no_secret_left_behind(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, fixture_secrets: dict[str, str]
) -> Iterator[None]:
    """After the whole suite: no secret value in any log, report, audit record, event, job
    record, HAR, trace or export that the tests made (files and Redis alike)."""
    yield
    values = [v for v in fixture_secrets.values() if len(v) >= 4]
    leaks = _leaks_in_files(tmp_path_factory.getbasetemp(), values)
    leaks += [f"redis {key}" for key in _leaks_in_redis(redis_url, values)]
    assert leaks == [], f"secret values found in: {leaks}"


class OwnRedis:
    """A `redis-server` of a test's own, on a free port: for tests that stop Redis (an outage)
    and start it again, which the shared one must never be. `persistent`: every write is on
    disk before it is answered, so a restart comes back with what it had, as a production
    Redis with an append-only file does."""

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        server = shutil.which("redis-server")
        assert server is not None, "redis-server is installed by make setup"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else [
            "--appendonly", "no"]  # fmt: skip
        self.argv = [server, "--port", str(self.port), "--save", "", *aof, "--dir", str(folder)]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it, and return once it answers."""
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL
        )
        probe = Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            async with asyncio.timeout(15):
                while True:  # another process starting: it can only be polled
                    try:
                        await probe.ping()
                        return
                    except RedisError:
                        await asyncio.sleep(0.05)
        finally:
            await probe.aclose()

    async def stop(self) -> None:
        """Kill it, as an outage would."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@contextlib.asynccontextmanager
async def own_redis(folder: Path, *, persistent: bool = False) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(folder, persistent=persistent)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
