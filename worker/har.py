"""HAR files: a job's network traffic, scrubbed, so QA can replay it with no site at all.

A job with `har: true` (the script's default, or the job's own flag) records its context's
traffic with Playwright (`record_har_path`, bodies embedded). When the context closes the file
is scrubbed before anything else reads it:

- credentials in headers (`Authorization`, `Cookie`, `Set-Cookie`, API-key headers) are
  replaced by `[scrubbed]`, and cookie lists emptied;
- every secret value the job used — in URLs, form bodies, headers, page bodies, also
  URL-encoded — is replaced by a stable placeholder, `formwork-secret-<name>`.

Replay from a HAR (`formwork replay --from-har`) fills secret fields with the same
placeholders, so the recorded sign-in request matches the replayed one byte for byte, and no
real credential is needed — or present — anywhere in a bundle.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from worker.secretstore import ENV_PREFIX

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
    replacements: list[tuple[str, str]] = []
    for name, value in secrets.items():
        if len(value) < 4:
            continue  # too short to replace without mangling ordinary text
        for form in {value, quote_plus(value), quote(value, safe="")}:
            replacements.append((form, placeholder(name)))
    replacements.sort(key=lambda pair: len(pair[0]), reverse=True)
    entries = har.get("log", {}).get("entries", [])
    for entry in entries:
        for side in ("request", "response"):
            message = entry.get(side, {})
            message["cookies"] = []
            for header in message.get("headers", []):
                if str(header.get("name", "")).lower() in _CREDENTIAL_HEADERS:
                    header["value"] = SCRUBBED
        content = entry.get("response", {}).get("content", {})
        if content.get("encoding") == "base64" and _is_text(content.get("mimeType", "")):
            text = base64.b64decode(content.get("text", "")).decode("utf-8", "replace")
            content["text"] = base64.b64encode(_replace(text, replacements).encode()).decode()
    scrubbed = _walk(har, replacements)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(scrubbed), encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)
    return len(entries)


def _is_text(mime: str) -> bool:
    return any(kind in mime for kind in _TEXT_TYPES)


def _replace(text: str, replacements: list[tuple[str, str]]) -> str:
    for value, substitute in replacements:
        text = text.replace(value, substitute)
    return text


def _walk(node: Any, replacements: list[tuple[str, str]]) -> Any:
    if isinstance(node, str):
        return _replace(node, replacements)
    if isinstance(node, list):
        return [_walk(item, replacements) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, replacements) for key, value in node.items()}
    return node
