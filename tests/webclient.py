"""A browser-like HTTP client and a minimal HTML model, for testing fixture sites without a
browser: these tests pin the HTML contract and fault behaviour the worker tests rely on."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from typing import Any

from fixtures.credentials import credentials_for

TIMEOUT_S = 10

# --- a minimal HTML model: enough to find elements by tag/attributes and read their text ----

_VOID_TAGS = frozenset({"input", "link", "meta", "br", "img", "hr"})


@dataclass
class Element:
    """One element of a parsed page, in document order."""

    tag: str
    attrs: dict[str, str]
    text: str = ""

    @property
    def clean_text(self) -> str:
        """Text content with whitespace collapsed, as a user would read it."""
        return " ".join(self.text.split())


class _ElementCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.elements.append(element)
        if tag not in _VOID_TAGS:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index].tag == tag:
                del self._open[index:]
                return

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data


@dataclass
class Page:
    """A response as the test client saw it (after redirects unless told otherwise)."""

    status: int
    url: str
    headers: Message
    body: str
    elements: list[Element] = field(init=False)

    def __post_init__(self) -> None:
        collector = _ElementCollector()
        collector.feed(self.body)
        collector.close()
        self.elements = collector.elements

    @property
    def path(self) -> str:
        """Path and query of the final URL."""
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.path}?{parts.query}" if parts.query else parts.path

    def find(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Elements matching ``tag`` and exact attribute values (``_`` in names means ``-``)."""
        wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attrs.items()}
        return [
            element
            for element in self.elements
            if (tag is None or element.tag == tag)
            and all(element.attrs.get(name) == value for name, value in wanted.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        """The single element matching; fails the test when there is not exactly one."""
        matches = self.find(tag, **attrs)
        assert len(matches) == 1, f"expected one <{tag} {attrs}>, found {len(matches)}"
        return matches[0]

    def text_of(self, element_id: str) -> str:
        """Clean text of the element with ``element_id``."""
        return self.one(id=element_id).clean_text

    def index_of(self, element: Element) -> int:
        """Document position of ``element`` (for "A is above B" assertions)."""
        return next(i for i, candidate in enumerate(self.elements) if candidate is element)


# --- a browser-like HTTP client ------------------------------------------------------------


class _DontFollow(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        # Returning None makes urllib surface the 3xx itself, so a test can inspect Location.
        return None


class Browser:
    """Keeps cookies (session and visitor) across requests like one browser context."""

    def __init__(self, base_url: str, site: str) -> None:
        self.base_url = base_url
        self.site = site
        self.jar = CookieJar()
        cookies = urllib.request.HTTPCookieProcessor(self.jar)
        self._following = urllib.request.build_opener(cookies)
        self._not_following = urllib.request.build_opener(cookies, _DontFollow())

    def get(self, path: str, *, follow: bool = True) -> Page:
        """GET ``path`` (relative to the site)."""
        return self._open(urllib.request.Request(self.base_url + path), follow)

    def get_json(self, path: str) -> Any:
        """GET ``path`` as a page's script would (fetch with the browser's cookies)."""
        with self._following.open(self.base_url + path, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())

    def post(
        self, path: str, fields: dict[str, str] | list[tuple[str, str]], *, follow: bool = True
    ) -> Page:
        """POST ``fields`` as an ordinary urlencoded HTML form (a list repeats names)."""
        data = urllib.parse.urlencode(fields).encode()
        return self._open(urllib.request.Request(self.base_url + path, data=data), follow)

    def post_multipart(
        self, path: str, fields: dict[str, str], files: dict[str, tuple[str, str, bytes]]
    ) -> Page:
        """POST a multipart form: ``files`` maps a field to (file name, type, content)."""
        boundary = f"----formwork{uuid.uuid4().hex}"
        parts: list[bytes] = []
        for name, value in fields.items():
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            parts.append(head.encode() + value.encode() + b"\r\n")
        for name, (filename, content_type, content) in files.items():
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
            )
            parts.append(head.encode() + content + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        request = urllib.request.Request(self.base_url + path, data=body, headers=headers)
        return self._open(request, follow=True)

    def login(self, next_path: str = "/") -> Page:
        """Sign in with the credentials the fixture accepts."""
        credentials = credentials_for(self.site)
        query = urllib.parse.urlencode({"next": next_path})
        fields = {"username": credentials.username, "password": credentials.password}
        page = self.post(f"/login?{query}", fields)
        assert page.status == 200
        return page

    def cookie(self, name: str) -> str | None:
        """The value of cookie ``name``, if the site has set it."""
        return next((cookie.value for cookie in self.jar if cookie.name == name), None)

    def _open(self, request: urllib.request.Request, follow: bool) -> Page:
        opener = self._following if follow else self._not_following
        try:
            with opener.open(request, timeout=TIMEOUT_S) as response:
                return Page(response.status, response.url, response.headers, _text(response))
        except urllib.error.HTTPError as error:  # 3xx (not followed), 4xx and 5xx
            try:
                return Page(error.code, error.url, error.headers, _text(error))
            finally:
                error.close()


def _text(response: Any) -> str:
    return bytes(response.read()).decode("utf-8")


def control(base_url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call a ``/_fixture`` JSON endpoint; returns (status, decoded JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        base_url + path,
        data=None if body is None else data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read())
        finally:
            error.close()


def set_faults(base_url: str, **faults: Any) -> None:
    status, body = control(base_url, "POST", "/_fixture/faults", faults)
    assert status == 200, body


def state(base_url: str) -> dict[str, Any]:
    status, body = control(base_url, "GET", "/_fixture/state")
    assert status == 200
    result: dict[str, Any] = body
    return result


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Re-check ``condition`` (itself an HTTP round trip) until true; no fixed sleeps."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
