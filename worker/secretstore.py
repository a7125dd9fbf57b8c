"""Where secrets come from, and how their values are kept out of everything Formwork writes.

Scripts name secrets (`billing_password`); values come only from the worker's side — the
environment (`FORMWORK_SECRET_BILLING_PASSWORD`) or a YAML secrets file
(`FORMWORK_SECRETS_FILE`) — never from a job payload, so an orchestrator (or whoever can write
to the queue) never handles credentials.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import yaml

from worker.errors import JobInvalid, SecretMissing

ENV_PREFIX = "FORMWORK_SECRET_"
MASK = "***"


class SecretStore:
    """Resolves secret names: environment first, then the secrets file."""

    def __init__(self, file: Path | None = None, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._file_values: dict[str, str] = {}
        self.file = file
        if file is not None:
            self._file_values = _read_secrets_file(file)

    def get(self, name: str) -> str | None:
        value = self._environ.get(ENV_PREFIX + name.upper())
        return value if value is not None else self._file_values.get(name)

    def resolve(self, names: Iterable[str], *, script: str) -> dict[str, str]:
        """Values of `names`; SecretMissing naming every one that is not configured."""
        values = {name: self.get(name) for name in sorted(set(names))}
        missing = [name for name, value in values.items() if not value]
        if missing:
            where = f"set {ENV_PREFIX}<NAME>, or " + (
                f"add them to {self.file}" if self.file else "point FORMWORK_SECRETS_FILE at a file"
            )
            raise SecretMissing(
                f"{script} needs secret(s) {missing}, not configured on this worker ({where})",
                field="secrets",
            )
        return {name: value for name, value in values.items() if value}

    def values(self) -> list[str]:
        """Every configured secret value (environment and file)."""
        found = [v for k, v in self._environ.items() if k.startswith(ENV_PREFIX) and v]
        return [*found, *(v for v in self._file_values.values() if v)]

    def carried_in(self, inputs: Mapping[str, object]) -> str | None:
        """The name of the first input (searched through lists and mappings) whose text
        contains a configured secret value — as it is, percent-encoded (a URL's query, a
        form body) or in base64 (a Basic auth header, a token); None when there is none."""
        values = [v for v in self.values() if len(v) >= 4]
        if not values:
            return None
        encoded = {core for v in values for core in base64_cores(v.encode())}

        def holds(node: object) -> bool:
            if isinstance(node, str):
                texts = {node, unquote(node), unquote_plus(node)}
                return any(v in t for v in values for t in texts) or any(
                    core in node for core in encoded
                )
            if isinstance(node, Mapping):
                return any(holds(k) or holds(v) for k, v in node.items())
            if isinstance(node, list | tuple):
                return any(holds(item) for item in node)
            return False

        return next((name for name, value in inputs.items() if holds(name) or holds(value)), None)

    def refuse_carried(self, inputs: Mapping[str, object], kind: str = "inputs") -> None:
        """JobInvalid when an input (or, with `kind`, another named value a job is sent)
        carries a secret's value. Such a credential is already leaked (Redis, the
        orchestrator's logs): never use it, and name the field so the sender can fix the
        integration — never the value."""
        carried = self.carried_in(inputs)
        if carried is None:
            return
        if self.carried_in({carried: ""}) is not None:
            # The name itself is the secret: say where, never the name.
            where, field = f"a name in {kind or 'the job'}", kind or "job"
        else:
            field = f"{kind}.{carried}" if kind else carried  # kind "": top-level fields
            where = field
        raise JobInvalid(
            f"{where} carries the value of a configured secret: secrets are named "
            "in scripts and resolved on the worker, never sent in a job",
            field=field,
        )


def text_forms(value: str) -> set[str]:
    """`value` as text may carry it: as it is (Unicode composed or not), percent-encoded (a
    URL, a form body; `/` kept or not, `+` for spaces), JSON-escaped, and HTML-escaped (a page
    echoing it back, the way Jinja's `&#39;` and Python's `&#x27;` write it)."""
    escaped = html.escape(value)
    return {
        value,
        # Composed or decomposed (`é` or `e` + U+0301): a site may store and show either.
        unicodedata.normalize("NFC", value),
        unicodedata.normalize("NFD", value),
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        escaped,
        escaped.replace("&#x27;", "&#39;").replace("&quot;", "&#34;"),
        html.escape(value, quote=False),
    }


# Shorter base64 runs than this are too likely to occur by chance in ordinary text.
BASE64_MIN = 8


def base64_cores(value: bytes) -> set[str]:
    """What base64 of any text holding `value` is sure to contain, wherever `value` starts.

    Base64 encodes 3 bytes as 4 characters, so the characters that depend on `value` alone
    are those of the 3-byte groups wholly inside it; which groups those are depends on where
    `value` starts modulo 3. Both alphabets (standard and URL-safe) are covered."""
    cores: set[str] = set()
    for offset in range(3):
        text = base64.b64encode(b"\0" * offset + value).decode()
        first = (offset + 2) // 3  # the first group wholly inside `value`
        end = (offset + len(value)) // 3  # one past the last
        core = text[4 * first : 4 * end]
        if len(core) >= BASE64_MIN:
            cores |= {core, core.replace("+", "-").replace("/", "_")}
    return cores


def _read_secrets_file(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        # The message names the file and the place only: a YAML error would quote the line,
        # i.e. a value; and not chained (`from None`), or a traceback would print it anyway.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SecretMissing(f"secrets file {path} cannot be read as YAML{where}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SecretMissing(f"secrets file {path} must be a mapping of name: value")
    return {k: str(v) for k, v in data.items() if v is not None}


def _head(value: str) -> str:
    """A pattern for any first two or more characters of `value`: `ab(?:c(?:d)?)?`."""
    pattern = ""
    for char in reversed(value[2:]):
        pattern = f"(?:{re.escape(char)}{pattern})?"
    return re.escape(value[:2]) + pattern


class Redactor:
    """Replaces known secret values in text. Defence in depth: values are never written on
    purpose, but a page or an error message may echo one back."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        # Very short values would redact ordinary text everywhere; they are masked in
        # screenshots like any other, but not scrubbed from prose.
        self._values.update(v for v in values if len(v) >= 4)
        if self._values:
            ordered = sorted(self._values, key=len, reverse=True)
            # Also as a URL, a JSON document or a page carries it (see `text_forms`).
            forms = {f for v in ordered for f in text_forms(v)}
            whole = [re.escape(f) for f in sorted(forms, key=len, reverse=True)]
            # A library that shortens what it logs (arq cuts a job's arguments at 80
            # characters) may cut a value short: its head, up to the ellipsis, is masked too.
            heads = [_head(v) for v in ordered]
            # Any case: a host name holds what a page put in it in lower case (a page that
            # sends a typed value out as `<value>.example` is refused, and reported by URL).
            self._pattern = re.compile(
                "|".join([*whole, f"(?:{'|'.join(heads)})(?:…|\\.\\.\\.)"]), re.IGNORECASE
            )

    @property
    def values(self) -> frozenset[str]:
        """The values scrubbed (for scrubbing other forms: a trace, an archive)."""
        return frozenset(self._values)

    def __call__(self, text: str | None) -> str | None:
        if text is None or self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)
