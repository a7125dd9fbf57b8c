"""Real components for every test: one Chromium per session, real fixture sites, real Redis."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures import FixtureServer, start_fixture
from worker.artifacts import LocalArtifacts
from worker.browser import BrowserHost
from worker.executor import Runtime
from worker.script import ScriptStore
from worker.secretstore import SecretStore

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SELECTORS = ROOT / "selectors"
SECRETS_FILE = ROOT / "fixtures" / "secrets.yaml"

CREDIT_INPUTS = {
    "account_id": "AC-10231",
    "amount": "15.00",
    "reason": "damaged item",
    "reference": "T-88812",
}


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

    def faults(self, **faults: Any) -> None:
        self._call("POST", "/_fixture/faults", faults)


@pytest.fixture(scope="session")
def billing_server() -> Iterator[FixtureServer]:
    with start_fixture("billing") as server:
        yield server


@pytest.fixture
def billing(billing_server: FixtureServer) -> Site:
    site = Site(billing_server)
    site.reset()
    return site


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
    )


@pytest.fixture(scope="session")
def fixture_secrets() -> dict[str, str]:
    import yaml

    values: dict[str, str] = yaml.safe_load(SECRETS_FILE.read_text())
    return values
