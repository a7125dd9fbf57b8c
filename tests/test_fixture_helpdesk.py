"""The helpdesk fixture site over real HTTP: queue, ticket, replies, notes, statuses, faults."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import Site
from .webclient import Browser, set_faults, state

TICKET = "HD-2041"


@pytest.fixture
def base_url(helpdesk: Site) -> str:
    return helpdesk.url


@pytest.fixture
def browser(base_url: str) -> Browser:
    signed_in = Browser(base_url, "helpdesk")
    signed_in.login()
    return signed_in


def ticket(base_url: str, ticket_id: str = TICKET) -> dict[str, Any]:
    found: dict[str, Any] = state(base_url)["tickets"][ticket_id]
    return found


def test_queue_filters_by_status(browser: Browser) -> None:
    unsolved = browser.get("/")
    assert unsolved.find("h1")[0].clean_text == "Ticket queue"
    assert len(unsolved.find("tr", data_ticket_id=TICKET)) == 1
    pending = browser.get("/?status=pending")
    assert pending.find("tr", data_ticket_id=TICKET) == []
    assert pending.find("tr", data_ticket_id="HD-2043")
    assert browser.get("/?status=resolved").one("tr", class_="empty").clean_text == "No tickets"


def test_ticket_page_shows_fields_and_thread(browser: Browser) -> None:
    page = browser.get(f"/tickets/{TICKET}")
    assert page.text_of("ticket-subject") == "Refund not received for order ORD-100231"
    assert page.text_of("ticket-requester") == "Jane Doe <jane.doe@example.com>"
    assert (page.text_of("ticket-status"), page.text_of("ticket-priority")) == ("Open", "High")
    latest = page.one("article", class_="message customer latest")
    assert "Any news?" in latest.clean_text
    page.one("form", id="reply")
    page.one("textarea", id="reply-body", name="body")


def test_public_reply_resolves_exactly_once(browser: Browser, base_url: str) -> None:
    fields = {"body": "Refund issued. Ref: T-7001", "visibility": "public", "status": "resolved"}
    done = browser.post(f"/tickets/{TICKET}/messages", fields)
    assert done.text_of("ticket-status") == "Resolved"
    found = ticket(base_url)
    assert found["status"] == "resolved"
    kinds = [(m["kind"], m["body"]) for m in found["thread"][-2:]]
    assert kinds == [
        ("public", "Refund issued. Ref: T-7001"),
        ("event", "Status changed to Resolved"),
    ]
    assert "T-7001" in done.one("article", class_="message public latest").clean_text


def test_internal_note_cannot_resolve_and_stays_internal(browser: Browser, base_url: str) -> None:
    note = {"body": "Checked with finance", "visibility": "internal", "status": "resolved"}
    refused = browser.post(f"/tickets/{TICKET}/messages", note)
    error = refused.one("span", data_field="status").clean_text
    assert error == "Send a public reply to resolve the ticket"
    sent = browser.post(f"/tickets/{TICKET}/messages", {**note, "status": ""})
    assert sent.one("article", class_="message internal").clean_text.endswith(
        "Checked with finance"
    )
    assert ticket(base_url)["status"] == "open"
    assert browser.post(f"/tickets/{TICKET}/messages", {"body": " "}).find(class_="field-error")


def test_status_form_changes_only_the_status(browser: Browser, base_url: str) -> None:
    browser.post(f"/tickets/{TICKET}/status", {"status": "pending"})
    found = ticket(base_url)
    assert found["status"] == "pending"
    assert found["thread"][-1]["body"] == "Status changed to Pending"


def test_commit_drop_picks_the_reply_request(browser: Browser, base_url: str) -> None:
    set_faults(base_url, commit_drop={"create": True, "path_contains": "/messages"})
    browser.post(f"/tickets/{TICKET}/status", {"status": "pending"})  # not the one dropped
    dropped = browser.post(f"/tickets/{TICKET}/messages", {"body": "Hi. Ref: T-7002"})
    assert dropped.status == 502
    assert ticket(base_url)["thread"][-1]["body"] == "Hi. Ref: T-7002"


def test_reject_value_and_skin_v2(browser: Browser, base_url: str) -> None:
    set_faults(
        base_url,
        skin="v2",
        reject_value=[{"field": "status", "value": "resolved", "message": "Needs a manager"}],
    )
    page = browser.get(f"/tickets/{TICKET}")
    assert page.find(id="reply") == []
    labels = {label.attrs["for"]: label.clean_text for label in page.find("label")}
    assert labels["composer-body"] == "Your response"
    refused = browser.post(f"/tickets/{TICKET}/messages", {"body": "x", "status": "resolved"})
    assert refused.one("p", class_="error-text").clean_text == "Needs a manager"
    assert ticket(base_url)["status"] == "open"
