"""HAR files: a job's network traffic, scrubbed, so QA can replay it with no site at all.

A job with `har: true` (the script's default, or the job's own flag) records its context's
traffic with Playwright (`record_har_path`, bodies embedded). When the context closes the file
is scrubbed before anything else reads it:

- credentials in headers (`Authorization`, `Cookie`, `Set-Cookie`, API-key headers) are
  replaced by `[scrubbed]`, and cookie lists emptied;
- every secret value the job used — in URLs, form bodies, headers, page bodies, also
  URL-, JSON- or HTML-escaped — is replaced by a stable placeholder, `formwork-secret-<name>`;
  so is one in base64 (a sign-in page that posts `btoa(user + ":" + password)`, a token
  naming the user): the run of base64 that holds it is decoded, the value replaced there, and
  encoded again as it was, so a replay that encodes the placeholder sends the same bytes.
  A value under four characters (a CVV, a PIN) would match inside ordinary text; it is
  replaced where a typed value stands whole in a request: a query or form parameter's value,
  a JSON body's string.

Replay from a HAR (`formwork replay --from-har`) fills secret fields with the same
placeholders, so the recorded sign-in request matches the replayed one byte for byte, and no
real credential is needed — or present — anywhere in a bundle. `HarReplay` answers the
replayed requests from the file (see its docstring for how a request finds its entry).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urldefrag

from worker.errors import RecordingInvalid
from worker.secretstore import ENV_PREFIX, base64_cores, text_forms

HAR_FILE = "network.har"
SCRUBBED = "[scrubbed]"
_CREDENTIAL_HEADERS = {
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    "x-csrf-token",
}
_TEXT_TYPES = ("text/", "json", "javascript", "xml", "x-www-form-urlencoded")


def placeholder(name: str) -> str:
    """What a secret's value becomes in a HAR (letters, digits and dashes: no encoding
    changes it, so it matches in URLs and form bodies alike)."""
    return f"formwork-secret-{name.replace('_', '-')}"


def placeholder_environ(names: set[str]) -> dict[str, str]:
    """An environment for `SecretStore` that resolves each secret to its placeholder."""
    return {ENV_PREFIX + name.upper(): placeholder(name) for name in names}


def scrub(path: Path, secrets: Mapping[str, str]) -> int:
    """Scrub the HAR at `path` in place; returns how many entries it holds."""
    har = json.loads(path.read_text(encoding="utf-8"))
    replacements: list[tuple[re.Pattern[str], str]] = []
    # Too short to replace in text without mangling ordinary words and numbers: these are
    # replaced only where they stand whole (`_scrub_fields`).
    short = {value: placeholder(name) for name, value in secrets.items() if 0 < len(value) < 4}
    for name, value in secrets.items():
        if len(value) < 4:
            continue
        # HTML-escaped too: a page that echoes a typed value (`o&#39;neil`) holds it so.
        for form in text_forms(value):
            # Any case: a host name holds a value a page put in it in lower case.
            replacements.append((re.compile(re.escape(form), re.IGNORECASE), placeholder(name)))
    replacements.sort(key=lambda pair: len(pair[0].pattern), reverse=True)
    encoded = _Base64Secrets(secrets)
    entries = har.get("log", {}).get("entries", [])
    for entry in entries:
        if short:
            _scrub_fields(entry.get("request", {}), short)
        for side in ("request", "response"):
            message = entry.get(side, {})
            message["cookies"] = []
            for header in message.get("headers", []):
                if str(header.get("name", "")).lower() in _CREDENTIAL_HEADERS:
                    header["value"] = SCRUBBED
        content = entry.get("response", {}).get("content", {})
        if content.get("encoding") == "base64" and _is_text(content.get("mimeType", "")):
            text = base64.b64decode(content.get("text", "")).decode("utf-8", "replace")
            text = encoded(_replace(text, replacements))
            content["text"] = base64.b64encode(text.encode()).decode()
    scrubbed = _walk(har, replacements, encoded)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(scrubbed), encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)
    return len(entries)


def _scrub_fields(request: dict[str, Any], short: Mapping[str, str]) -> None:
    """Replace a short secret where a typed value stands whole in `request`: a parameter of its
    URL or urlencoded body (as it is, or in the HAR's parsed lists) or a string of its JSON
    body. Every other byte stays as recorded, so a replayed request still matches it."""
    url = str(request.get("url", ""))
    if "?" in url:
        head, _, query = url.partition("?")
        request["url"] = f"{head}?{_form_with(query, short)}"
    post = request.get("postData")
    params = [*request.get("queryString", [])]
    if isinstance(post, dict):
        params += post.get("params") or []
        text, mime = post.get("text"), str(post.get("mimeType", ""))
        if isinstance(text, str) and "x-www-form-urlencoded" in mime:
            post["text"] = _form_with(text, short)
        elif isinstance(text, str) and "json" in mime:
            post["text"] = _JSON_STRING.sub(lambda m: _json_string_with(m[0], short), text)
    for param in params:
        if isinstance(param, dict) and param.get("value") in short:
            param["value"] = short[param["value"]]


# A JSON string literal, escapes included.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_string_with(literal: str, short: Mapping[str, str]) -> str:
    try:
        value = json.loads(literal)
    except ValueError:
        return literal
    return json.dumps(short[value]) if value in short else literal


def _form_with(form: str, short: Mapping[str, str]) -> str:
    """`form` (`a=1&b=2`) with each value that decodes to a short secret replaced."""
    pairs = form.split("&")
    for index, pair in enumerate(pairs):
        name, equals, value = pair.partition("=")
        if equals and unquote_plus(value) in short:
            pairs[index] = f"{name}={short[unquote_plus(value)]}"
    return "&".join(pairs)


def _is_text(mime: str) -> bool:
    return any(kind in mime for kind in _TEXT_TYPES)


def _replace(text: str, replacements: list[tuple[re.Pattern[str], str]]) -> str:
    for value, substitute in replacements:
        text = value.sub(substitute, text)
    return text


def _walk(
    node: Any, replacements: list[tuple[re.Pattern[str], str]], encoded: _Base64Secrets
) -> Any:
    if isinstance(node, str):
        return encoded(_replace(node, replacements))
    if isinstance(node, list):
        return [_walk(item, replacements, encoded) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, replacements, encoded) for key, value in node.items()}
    return node


# A run of base64 (either alphabet), with its padding.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")


class _Base64Secrets:
    """Replaces secrets carried in base64 in a HAR's text: a body or URL may hold one encoded
    (a JSON sign-in `{"auth": btoa(user + ":" + password)}`, a token whose payload names the
    user), which no text form of the value matches.

    A run of base64 holding a value's base64 (`secretstore.base64_cores`: at any alignment,
    either alphabet) is decoded, the value replaced by its placeholder, and encoded again in
    the run's alphabet and padding: a replay that fills the placeholder and encodes it sends
    the very bytes recorded. A run that does not decode whole (a cut one) has the encoded
    value itself replaced by the placeholder."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        # Shorter values have no base64 core of their own (see `base64_cores`).
        self._found = [
            (value.encode(), placeholder(name).encode(), tuple(base64_cores(value.encode())))
            for name, value in secrets.items()
            if len(value) >= 4
        ]
        self._found = [found for found in self._found if found[2]]

    def __call__(self, text: str) -> str:
        held = [found for found in self._found if any(core in text for core in found[2])]
        if not held:
            return text
        return _BASE64_RUN.sub(lambda run: self._run(run[0], held), text)

    def _run(self, run: str, held: list[tuple[bytes, bytes, tuple[str, ...]]]) -> str:
        held = [found for found in held if any(core in run for core in found[2])]
        if not held:
            return run
        body = run.rstrip("=")
        urlsafe = "-" in body or "_" in body
        try:
            if urlsafe and ("+" in body or "/" in body):
                raise ValueError("two alphabets")
            padded = body + "=" * (-len(body) % 4)
            raw = base64.b64decode(padded, altchars=b"-_" if urlsafe else None, validate=True)
        except ValueError:
            raw = None
        if raw is not None and all(value in raw for value, _, _ in held):
            for value, substitute, _ in held:
                raw = raw.replace(value, substitute)
            again = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
            # Unpadded only where the run evidently was (`btoa` pads; a JWT does not).
            return again if run.endswith("=") or len(body) % 4 == 0 else again.rstrip("=")
        for _, substitute, cores in held:
            for core in sorted(cores, key=len, reverse=True):
                run = run.replace(core, substitute.decode())
        return run


# ---------------------------------------------------------------- replay from a HAR

REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Methods a browser may send again on its own (a reload, a second stylesheet link): past the
# recorded answers they get the latest one again. Any other method changes the site.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Headers that describe the bytes on the wire, not the decoded (and scrubbed, so resized) body a
# HAR holds: Playwright sets the length of what it is handed itself.
_WIRE_HEADERS = frozenset({"content-length", "content-encoding", "transfer-encoding"})
_BOUNDARY = re.compile(r"boundary=\"?([^\";]+)\"?", re.IGNORECASE)


@dataclass(frozen=True)
class Answer:
    """A recorded response, ready for `route.fulfill`."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def location(self) -> str | None:
        """Where a redirect points (as recorded: maybe relative, maybe with a fragment)."""
        if self.status not in REDIRECTS:
            return None
        return next((v for k, v in self.headers.items() if k.lower() == "location"), None)


@dataclass(frozen=True)
class Unanswered:
    """Why a HAR has no answer for a request."""

    reason: str


@dataclass
class HarReplay:
    """Answers requests from a HAR's entries, as the site answered them, in the order it did.

    - A request matches an entry with the same method, URL (fragment aside: it never reaches
      the server, yet a redirect's `Location` may carry one) and body — multipart boundaries
      aside, as the browser draws a new one for every form it sends.
    - Identical requests take their entries in turn: a page fetched before and after the job
      changed it gets each version where the job saw it (matching on the request alone would
      answer the second fetch with the first page). Past the last entry a GET gets the last one
      again; a POST gets nothing, as the recording never showed what sending it again does.
    - An entry with no response (status -1: the request was aborted or never answered while
      recording) answers nothing, so the request is aborted rather than left pending for ever.
    """

    entries: list[dict[str, Any]]
    _used: set[int] = field(default_factory=set)
    # Each entry's request as `answer` compares it, worked out once at load, and the entries
    # by (method, URL), in recorded order: a request looks only at its own candidates.
    _keys: list[tuple[str, str, str | None, bool]] = field(init=False)
    _by_target: dict[tuple[str, str], list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self._keys = [_key(entry.get("request", {})) for entry in self.entries]
        self._by_target = {}
        for i, (method, url, _, _) in enumerate(self._keys):
            self._by_target.setdefault((method, url), []).append(i)

    @classmethod
    def load(cls, path: Path) -> HarReplay:
        """The HAR at `path`, or `RecordingInvalid` naming the file and its first problem."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise RecordingInvalid(
                f"{path.parent} has no {path.name} (record it with har: true)"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise RecordingInvalid(f"{path}: not a valid HAR ({exc})") from exc
        try:
            return cls(_entries(json.loads(text)))
        except json.JSONDecodeError as exc:
            where = f"at line {exc.lineno} column {exc.colno}"
            raise RecordingInvalid(f"{path}: not a valid HAR (invalid JSON {where})") from exc
        except ValueError as exc:  # _entries, or a body that is not the base64 it claims
            raise RecordingInvalid(f"{path}: not a valid HAR ({exc})") from exc

    def answer(
        self, method: str, url: str, body: bytes | None, content_type: str | None
    ) -> Answer | Unanswered:
        request = _normalised(method, url, _decoded(body), content_type)
        candidates = self._by_target.get(request[:2], [])
        matching = [i for i in candidates if _matches(self._keys[i], *request)]
        if not matching:
            return Unanswered("not in the HAR")
        answered = [i for i in matching if _status(self.entries[i]) > 0]
        if not answered:
            failure = self.entries[matching[-1]].get("response", {}).get("_failureText")
            return Unanswered(f"recorded without a response ({failure or 'none'})")
        fresh = [i for i in answered if i not in self._used]
        if fresh:
            self._used.add(fresh[0])
            return _answer(self.entries[fresh[0]])
        if method.upper() in _SAFE_METHODS:
            return _answer(self.entries[answered[-1]])
        return Unanswered(f"sent more often than recorded ({len(answered)}x)")


def _entries(har: Any) -> list[dict[str, Any]]:
    """A HAR's entries, each with a request to match on. Anything less is refused: a HAR
    with no entries would answer nothing, and every request of the replay would be reported
    as missing from it instead of the file as broken."""
    log = har.get("log") if isinstance(har, dict) else None
    entries = log.get("entries") if isinstance(log, dict) else None
    if not isinstance(entries, list):
        raise ValueError("no log.entries list")
    for i, entry in enumerate(entries):
        request = entry.get("request") if isinstance(entry, dict) else None
        if not (
            isinstance(request, dict)
            and isinstance(request.get("method"), str)
            and isinstance(request.get("url"), str)
        ):
            raise ValueError(f"log.entries[{i}] has no request method and url")
        if not isinstance(entry.get("response", {}), dict):
            raise ValueError(f"log.entries[{i}].response is not an object")
    return entries


def _normalised(
    method: str, url: str, body: str | None, content_type: str | None
) -> tuple[str, str, str | None]:
    return method.upper(), urldefrag(url).url, _without_boundary(body, content_type)


def _key(request: dict[str, Any]) -> tuple[str, str, str | None, bool]:
    """(method, URL without fragment, body without boundary, whether a body was recorded)."""
    recorded = request.get("postData")
    body = None
    if isinstance(recorded, dict):
        body = _without_boundary(_decoded(_content_bytes(recorded)), recorded.get("mimeType"))
    url = urldefrag(str(request.get("url", ""))).url
    return str(request.get("method", "")).upper(), url, body, isinstance(recorded, dict)


def _matches(
    key: tuple[str, str, str | None, bool], method: str, url: str, body: str | None
) -> bool:
    recorded_method, recorded_url, recorded_body, has_body = key
    if recorded_method != method or recorded_url != url:
        return False
    # A body missing on either side (a HAR may leave it out; Chromium does not always pass a
    # large one on) is not a difference, as in Playwright's own HAR matching.
    if body is None or not has_body:
        return True
    return body == recorded_body


def _decoded(body: bytes | None) -> str | None:
    # A HAR stores request bodies as text, binary parts (an uploaded image) already lossily
    # decoded: compare as text decoded the same way, or such a body never matches itself.
    return None if body is None else body.decode("utf-8", "replace")


def _without_boundary(body: str | None, content_type: str | None) -> str | None:
    match = _BOUNDARY.search(content_type or "")
    if body is None or match is None:
        return body
    return body.replace(match[1], "")


def _status(entry: dict[str, Any]) -> int:
    status = entry.get("response", {}).get("status", -1)
    return status if isinstance(status, int) else -1


def _content_bytes(content: dict[str, Any]) -> bytes:
    text = str(content.get("text", ""))
    if content.get("encoding") == "base64":
        return base64.b64decode(text)
    return text.encode("utf-8")


def _answer(entry: dict[str, Any]) -> Answer:
    response = entry.get("response", {})
    headers: dict[str, str] = {}
    for header in response.get("headers", []):
        name, value = str(header.get("name", "")), str(header.get("value", ""))
        # A scrubbed credential (a session cookie) is nothing to hand the page back.
        if name.lower() in _WIRE_HEADERS or value == SCRUBBED:
            continue
        # One name, several headers (Set-Cookie, Link): fulfil takes one value per name.
        joiner = "\n" if name.lower() == "set-cookie" else ", "
        headers[name] = f"{headers[name]}{joiner}{value}" if name in headers else value
    return Answer(_status(entry), headers, _content_bytes(response.get("content", {})))
