"""Make sure a Redis answers at REDIS_URL, starting a local one if needed (dev and CI only).

`python -m worker.localredis [URL]` — used by `make setup`; production workers are pointed at
a managed Redis and never start one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import redis
from pydantic import ValidationError

from worker.settings import Settings, shown_url

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
START_TIMEOUT_S = 10.0


def answers(url: str) -> bool:
    """Whether a Redis answers at `url`; SystemExit when one answers but refuses the URL's
    credentials (starting another on its port would only fail to bind, and say nothing)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        raise SystemExit(
            f"redis: a Redis answers at {shown_url(url)} but refuses this connection: {exc}"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _listens(host: str, port: int) -> bool:
    """Whether anything accepts a TCP connection at host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def ensure(url: str) -> str:
    """Return a line saying what was found or started; raise SystemExit when impossible."""
    try:
        Settings(redis_url=url)  # the worker's own checks, said the same way, in one line
    except ValidationError as exc:
        why = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise SystemExit(f"redis: REDIS_URL={shown_url(url)!r}: {why}") from None
    if answers(url):
        return f"redis: answering at {shown_url(url)}"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        raise SystemExit(
            f"redis: nothing answers at {shown_url(url)}; only redis:// URLs get a local "
            "redis-server: start the one on that socket yourself"
        )
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if host not in LOCAL_HOSTS:
        raise SystemExit(
            f"redis: nothing answers at {shown_url(url)}, and it is not local to start it"
        )
    if parts.scheme == "rediss":
        # A redis-server started here speaks no TLS: it would never answer this URL.
        hint = " (a plain Redis there? then redis://)" if _listens(host, port) else ""
        raise SystemExit(
            f"redis: nothing answers at {shown_url(url)}{hint}; only redis:// URLs get a local "
            "redis-server: it would not speak TLS"
        )
    if parts.password is not None or parts.username or "password=" in parts.query:
        # A redis-server started here would have no such user or password: it would refuse
        # the URL (and be left running), or take a password that belongs elsewhere.
        raise SystemExit(
            f"redis: nothing answers at {shown_url(url)}; only a URL without a user or "
            "password gets a local redis-server"
        )
    if _listens(host, port):
        # A second redis-server could not bind the port; starting one would only wait 10 s
        # and blame itself.
        raise SystemExit(
            f"redis: something listens on {host}:{port} but does not answer as Redis at "
            f"{shown_url(url)}: is REDIS_URL's port another server's?"
        )
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis: redis-server is not installed (apt-get install redis-server)")
    subprocess.run(
        [
            server,
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1" if host == "localhost" else host,  # where the URL will look for it
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(url):  # poll the condition itself: the daemon forks before it listens
        if time.monotonic() > deadline:
            raise SystemExit(f"redis: started redis-server but nothing answers at {shown_url(url)}")
        time.sleep(0.05)
    return f"redis: started a local redis-server on port {port}"


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"
    print(ensure(url))


if __name__ == "__main__":
    main()
