"""The orders fixture site over real HTTP: search API, pagination, the refund wizard with its
upload and payment widget, ground truth and faults."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
import urllib.request

import pytest

from .conftest import UPLOADS, Site
from .webclient import TIMEOUT_S, Browser, Page, control, set_faults, state

ORDER = "ORD-100231"
RECEIPT = UPLOADS / "receipt-ord-100231.png"


@pytest.fixture
def base_url(orders: Site) -> str:
    return orders.url


@pytest.fixture
def browser(base_url: str) -> Browser:
    signed_in = Browser(base_url, "orders")
    signed_in.login()
    return signed_in


def authorize(base_url: str, draft: str, method: str) -> str:
    """What the widget's script does: ask the provider for a token."""
    body = json.dumps({"draft": draft, "method": method}).encode()
    request = urllib.request.Request(
        base_url + "/provider/authorize", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        token: str = json.loads(response.read())["token"]
    return token


def to_review(browser: Browser, skus: tuple[str, ...] = ("MUG-RED",), **fields: str) -> Page:
    """Walk items -> reason (with the receipt) and return the review page."""
    reason = browser.post(f"/orders/{ORDER}/refund/drafts", [("sku", sku) for sku in skus])
    assert reason.path.endswith("/reason"), reason.body
    form = {"reason": "damaged", "reference": "T-5001", **fields}
    receipt = ("receipt.png", "image/png", RECEIPT.read_bytes())
    return browser.post_multipart(reason.path, form, {"receipt": receipt})


def submit(browser: Browser, review: Page, method: str = "card") -> Page:
    draft = review.path.split("/")[2]
    token = authorize(browser.base_url, draft, method)
    return browser.post(f"/refund-drafts/{draft}/submit", {"payment_token": token})


def test_search_api_and_dashboard(browser: Browser) -> None:
    dashboard = browser.get("/")
    dashboard.one("form", id="order-search")
    dashboard.one("input", id="search-query", name="q")
    dashboard.one("table", id="search-results")
    results = browser.get_json("/api/orders?q=jane")["results"]
    assert results and all(hit["customer"] == "Jane Doe" for hit in results)
    assert results[0]["order_id"] == ORDER and results[0]["total"] == "54.50"


def test_order_table_is_paginated(browser: Browser) -> None:
    first = browser.get("/orders")
    assert len(first.find("tr", data_order_id=ORDER)) == 1
    assert len(first.one("tbody").text.split("ORD-")) - 1 == 10
    assert first.text_of("page-indicator") == "Page 1 of 3"
    assert first.one("a", rel="next").attrs["href"] == "/orders?page=2"
    last = browser.get("/orders?page=3")
    assert len(last.one("tbody").text.split("ORD-")) - 1 == 6
    assert last.find("a", rel="next") == []


def test_wizard_creates_exactly_one_refund_with_the_receipt(browser: Browser) -> None:
    order = browser.get(f"/orders/{ORDER}")
    assert order.text_of("order-header") == f"Order {ORDER}"
    assert order.one("a", id="start-refund").attrs["href"] == f"/orders/{ORDER}/refund"
    items = browser.get(f"/orders/{ORDER}/refund")
    items.one("input", type="checkbox", value="MUG-RED", id="item-MUG-RED")
    review = to_review(browser, ("MUG-RED", "CAP-GRY"))
    assert review.text_of("review-amount") == "$30.50"
    assert review.text_of("review-receipt") == "receipt.png"
    widget = review.one("iframe", id="payment-widget").attrs["src"]
    # The provider's widget is cross-origin: the same server under the other loopback name.
    assert urllib.parse.urlsplit(widget).hostname == "localhost"
    assert (
        review.one("form", id="refund-submit")
        .attrs["data-provider-origin"]
        .startswith("http://localhost:")
    )
    assert state(browser.base_url)["refunds"] == []  # nothing until the submit

    done = submit(browser, review, "card")
    assert done.text_of("refund-confirmation") == "Refund submitted"
    assert done.text_of("refund-number") == "RF-500001"
    (refund,) = state(browser.base_url)["refunds"]
    assert (refund["skus"], refund["amount"], refund["method"]) == (
        ["MUG-RED", "CAP-GRY"],
        "30.50",
        "card",
    )
    assert refund["receipt"]["sha256"] == hashlib.sha256(RECEIPT.read_bytes()).hexdigest()
    row = browser.get(f"/orders/{ORDER}").one("tr", data_reference="T-5001")
    assert row.clean_text.startswith("RF-500001")


def test_wizard_validates_each_step(browser: Browser, base_url: str) -> None:
    none = browser.post(f"/orders/{ORDER}/refund/drafts", {})
    assert none.text_of("items-error") == "Select at least one item to refund"
    reason = browser.post(f"/orders/{ORDER}/refund/drafts", {"sku": "MUG-RED"})
    missing = browser.post_multipart(reason.path, {"reason": "damaged", "reference": ""}, {})
    errors = {e.attrs["data-field"]: e.clean_text for e in missing.find(class_="field-error")}
    assert errors == {
        "reference": "Reference is required",
        "receipt": "A photo or receipt is required for damaged items",
    }
    review = to_review(browser)
    draft = review.path.split("/")[2]
    no_method = browser.post(f"/refund-drafts/{draft}/submit", {"payment_token": "PT-forged"})
    assert no_method.text_of("review-error") == "Choose a refund method"
    submit(browser, review)
    again = submit(browser, review)
    assert again.text_of("review-error") == "This refund was already submitted"
    assert len(state(base_url)["refunds"]) == 1


def test_a_receipt_up_to_the_limit_is_taken_and_a_bigger_one_refused_by_the_form(
    browser: Browser,
) -> None:
    # aiohttp's own 1 MiB body limit answered a bare 413 to any receipt over 1 MiB, though the
    # form says it takes 5 MB.
    reason = browser.post(f"/orders/{ORDER}/refund/drafts", {"sku": "MUG-RED"})
    form = {"reason": "damaged", "reference": "T-5001"}
    over = ("big.png", "image/png", b"\0" * (5 * 1024 * 1024 + 1))
    refused = browser.post_multipart(reason.path, form, {"receipt": over})
    errors = {e.attrs["data-field"]: e.clean_text for e in refused.find(class_="field-error")}
    assert errors == {"receipt": "The receipt must be at most 5 MB"}
    limit = ("big.png", "image/png", b"\0" * (5 * 1024 * 1024))
    review = browser.post_multipart(reason.path, form, {"receipt": limit})
    assert review.text_of("review-receipt") == "big.png"


def test_widget_needs_no_console_session(base_url: str) -> None:
    widget = Browser(base_url, "orders").get("/provider/widget?draft=D-0001&amount=1.00&parent=x")
    assert widget.status == 200
    assert widget.one("button", id="use-method").clean_text == "Use this method"


def test_commit_drop_with_and_without_the_refund(browser: Browser, base_url: str) -> None:
    set_faults(base_url, commit_drop={"create": True, "status": 502})
    dropped = submit(browser, to_review(browser))
    assert dropped.status == 502
    assert len(state(base_url)["refunds"]) == 1
    set_faults(base_url, commit_drop={"create": False, "mode": "hang", "hang_ms": 50})
    hung = submit(browser, to_review(browser, reference="T-5002"))
    assert hung.status == 504
    assert len(state(base_url)["refunds"]) == 1


def test_reject_value_and_invalid_faults(browser: Browser, base_url: str) -> None:
    message = "Reference T-5001 was already used"
    set_faults(
        base_url, reject_value=[{"field": "reference", "value": "T-5001", "message": message}]
    )
    page = to_review(browser)
    assert page.one("span", data_field="reference").clean_text == message
    status, body = control(
        base_url,
        "POST",
        "/_fixture/faults",
        {"reject_value": [{"field": "amount", "value": "1", "message": "no such field here"}]},
    )
    assert status == 400 and body["errors"]


def test_session_expiry_and_failures_use_the_shared_portal(base_url: str) -> None:
    set_faults(base_url, session_expiry_after=1, fail=[{"path_contains": "/orders", "status": 503}])
    browser = Browser(base_url, "orders")
    browser.login()
    assert browser.get("/orders").status == 503
    expired = browser.get(f"/orders/{ORDER}", follow=False)
    assert expired.headers["Location"] == f"/login?next=/orders/{ORDER}&expired=1"


def test_skin_v2_changes_the_wizard_markup(browser: Browser, base_url: str) -> None:
    set_faults(base_url, skin="v2")
    order = browser.get(f"/orders/{ORDER}")
    assert order.find(id="start-refund") == []
    assert order.one("a", class_="btn-refund").clean_text == "Start a refund"
    reason = browser.post(f"/orders/{ORDER}/refund/drafts", {"sku": "MUG-RED"})
    labels = {label.attrs["for"]: label.clean_text for label in reason.find("label")}
    assert labels == {
        "rsn": "Refund reason",
        "case-ref": "Case reference",
        "receipt-file": "Attach receipt",
    }
    review = to_review(browser)
    assert review.one("button", type="submit").clean_text == "Confirm refund"
    assert submit(browser, review).text_of("refund-number") == "RF-500001"
