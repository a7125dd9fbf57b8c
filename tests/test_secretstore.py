"""A secret's value sent in a job is found however it was encoded, and nothing else is."""

from __future__ import annotations

import base64
import re
import unicodedata
from urllib.parse import quote, quote_plus

import pytest

from worker.errors import JobInvalid
from worker.secretstore import MASK, Redactor, SecretStore, text_forms

PASSWORD = "s3cr3t/Pa ss+w0rd!"
STORE = SecretStore(environ={"FORMWORK_SECRET_BILLING_PASSWORD": PASSWORD})


def b64(text: str, *, urlsafe: bool = False) -> str:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return encode(text.encode()).decode()


@pytest.mark.parametrize(
    "carried",
    [
        PASSWORD,
        f"see {PASSWORD} above",
        quote(PASSWORD, safe=""),
        quote_plus(PASSWORD),
        re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quote(PASSWORD, safe="")),  # %2f
        f"https://portal.example/login?user=ops&pw={quote_plus(PASSWORD)}&next=/",
        b64(PASSWORD),
        b64(PASSWORD, urlsafe=True),
        b64(PASSWORD).rstrip("="),
        # Wherever it starts in the encoded text: each of the three alignments.
        "Authorization: Basic " + b64("ops:" + PASSWORD),
        "token " + b64("x" + PASSWORD + "tail"),
        b64("xy" + PASSWORD, urlsafe=True),
    ],
)
def test_a_secret_carried_in_any_common_encoding_is_refused(carried: str) -> None:
    inputs = {"reason": "goodwill", "notes": [{"text": carried}]}
    assert STORE.carried_in(inputs) == "notes"
    with pytest.raises(JobInvalid) as info:
        STORE.refuse_carried(inputs)
    assert info.value.field == "inputs.notes"
    assert PASSWORD not in info.value.message and carried not in info.value.message


@pytest.mark.parametrize(
    "ordinary",
    [
        "Customer was double charged in March; credit agreed by phone.",
        b64("an unrelated attachment body, long enough to hold many groups"),
        quote_plus("s3cr3t/Pa ss"),  # a part of the secret is not the secret
        b64(PASSWORD[:6]),
    ],
)
def test_ordinary_text_and_fragments_are_not_taken_for_the_secret(ordinary: str) -> None:
    assert STORE.carried_in({"reason": ordinary}) is None


def test_a_name_that_is_the_secret_is_refused_without_being_named() -> None:
    with pytest.raises(JobInvalid) as info:
        STORE.refuse_carried({"ticket": "T-1", PASSWORD: "x"}, "correlation")
    assert info.value.field == "correlation"
    assert info.value.message.startswith("a name in correlation carries the value of a")
    assert PASSWORD not in info.value.message


def test_a_secret_shown_in_another_unicode_form_or_case_is_redacted() -> None:
    # `José` typed composed, shown by a site that stores it decomposed (`e` + U+0301), or in
    # capitals: text forms the redactor (and the HAR and trace scrubbers) look for.
    secret = unicodedata.normalize("NFC", "José-bot-77")
    decomposed = unicodedata.normalize("NFD", secret)
    assert decomposed != secret
    redact = Redactor([secret])
    assert redact(f"Welcome back, {decomposed}!") == f"Welcome back, {MASK}!"
    assert redact(f"SIGNED IN AS {secret.upper()}") == f"SIGNED IN AS {MASK}"
    assert decomposed in text_forms(secret)
