"""The billing fixture site over real HTTP: pages, ground truth and every fault kind.

No browser here: a small cookie-keeping ``urllib`` client stands in for one, so these tests pin
the HTML contract and fault behaviour the browser-driven worker tests rely on.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import pytest

from fixtures import SITES, FixtureServer, start_fixture

from .webclient import TIMEOUT_S, Browser, Page, control, set_faults, state, wait_until

ACCOUNT = "AC-10231"
CLOSED_ACCOUNT = "AC-30001"
CREDIT = {"amount": "15.00", "reason": "damaged item", "reference": "T-88812"}


def submit_credit(browser: Browser, account: str = ACCOUNT, **overrides: str) -> Page:
    """Walk form -> review -> commit; returns the page the commit ends on."""
    fields = {**CREDIT, **overrides}
    review = browser.post(f"/accounts/{account}/credits/review", fields)
    assert review.status == 200
    assert review.find("h1")[0].clean_text == "Confirm credit", review.body
    hidden = {
        element.attrs["name"]: element.attrs["value"]
        for element in review.find("input", type="hidden")
    }
    return browser.post(f"/accounts/{account}/credits", hidden)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_server() -> Iterator[FixtureServer]:
    with start_fixture("billing") as server:
        yield server


@pytest.fixture
def base_url(fixture_server: FixtureServer) -> str:
    status, _ = control(fixture_server.url, "POST", "/_fixture/reset")
    assert status == 200
    return fixture_server.url


@pytest.fixture
def browser(base_url: str) -> Browser:
    """A signed-in browser."""
    signed_in = Browser(base_url, "billing")
    signed_in.login()
    return signed_in


# --- server lifecycle ------------------------------------------------------------------------


def test_server_reports_the_real_port(fixture_server: FixtureServer) -> None:
    assert fixture_server.port != 0
    assert fixture_server.url == f"http://127.0.0.1:{fixture_server.port}"
    assert "billing" in SITES


def test_unknown_site_is_rejected_naming_known_sites() -> None:
    with pytest.raises(ValueError, match="billing"):
        start_fixture("no-such-site")


def test_start_fails_loudly_when_the_port_is_taken(fixture_server: FixtureServer) -> None:
    with pytest.raises(RuntimeError, match="failed to start"):
        start_fixture("billing", port=fixture_server.port)


def test_password_can_be_overridden_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIXTURE_BILLING_PASSWORD", "from-the-env")
    with start_fixture("billing") as server:
        browser = Browser(server.url, "billing")
        fields = {"username": "formwork-bot", "password": "correct-horse-battery-7"}
        assert browser.post("/login", fields).find(class_="alert alert-danger")
        assert browser.login().path == "/"  # login() reads the same overridden credentials


def test_stop_ends_a_hanging_request_promptly() -> None:
    server = start_fixture("billing")
    try:
        set_faults(server.url, latency_ms=30_000, latency_path_contains="/login")
        with ThreadPoolExecutor(1) as pool:
            hanging = pool.submit(Browser(server.url, "billing").get, "/login")
            wait_until(lambda: state(server.url)["requests"] == 1)
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 5
            # Whatever the client saw (an answer or a dropped connection), it is not stuck.
            hanging.exception(timeout=TIMEOUT_S)
    finally:
        server.stop()


def test_a_request_from_before_a_reset_is_not_counted_after_it() -> None:
    # An earlier test's slow page, still being served after its browser went away, counted
    # as a third concurrent visitor in the next test's ground truth (a cap of 2 "exceeded").
    server = start_fixture("billing")
    try:
        set_faults(server.url, latency_ms=3_000, latency_path_contains="/login")
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(Browser(server.url, "billing").get, "/login")
            wait_until(lambda: state(server.url)["requests"] == 1)
            control(server.url, "POST", "/_fixture/reset")
            assert state(server.url)["max_concurrent_visitors"] == 0
            Browser(server.url, "billing").get("/login")
            slow.result(timeout=TIMEOUT_S)  # its exit, after the reset, changes nothing
        Browser(server.url, "billing").get("/login")
        assert state(server.url)["max_concurrent_visitors"] == 1
    finally:
        server.stop()


# --- sign-in ---------------------------------------------------------------------------------


def test_pages_redirect_to_login_and_back(base_url: str) -> None:
    browser = Browser(base_url, "billing")
    redirect = browser.get(f"/accounts/{ACCOUNT}", follow=False)
    assert redirect.status == 303
    assert redirect.headers["Location"] == f"/login?next=/accounts/{ACCOUNT}"

    searched = browser.get(f"/accounts/search?account_id={ACCOUNT}", follow=False)
    next_path = urllib.parse.parse_qs(urllib.parse.urlsplit(searched.headers["Location"]).query)
    assert next_path["next"] == [f"/accounts/search?account_id={ACCOUNT}"]

    login = browser.get(f"/accounts/{ACCOUNT}")
    assert login.path == f"/login?next=/accounts/{ACCOUNT}"
    login.one("form", id="login", method="post")
    login.one("label", for_="username")
    login.one("input", id="username", name="username")
    login.one("input", id="password", name="password", type="password")
    assert login.one("button", type="submit").clean_text == "Sign in"

    landed = browser.login(next_path=f"/accounts/{ACCOUNT}")
    assert landed.path == f"/accounts/{ACCOUNT}"
    assert browser.cookie("BILLSESSID")
    assert state(base_url)["logins"] == 1


def test_bad_login_is_refused_and_counted(base_url: str) -> None:
    browser = Browser(base_url, "billing")
    page = browser.post("/login", {"username": "formwork-bot", "password": "wrong"})
    assert page.status == 200
    assert page.one(class_="alert alert-danger").clean_text == "Invalid username or password."
    assert browser.cookie("BILLSESSID") is None
    snapshot = state(base_url)
    assert (snapshot["logins"], snapshot["failed_logins"]) == (0, 1)


def test_a_refused_sign_in_can_redirect_with_the_name_typed(base_url: str) -> None:
    # The signin_refused_redirect fault: a portal that answers every POST with a redirect,
    # the name typed carried in the query and shown again in the form.
    set_faults(base_url, signin_refused_redirect=True)
    browser = Browser(base_url, "billing")
    page = browser.post("/login", {"username": "agent smith", "password": "wrong"})
    assert page.path == "/login?failed=1&username=agent+smith"
    assert page.one(class_="alert alert-danger").clean_text == "Invalid username or password."
    assert page.one("input", id="username").attrs["value"] == "agent smith"
    assert state(base_url)["failed_logins"] == 1


def test_login_never_redirects_off_site(base_url: str) -> None:
    page = Browser(base_url, "billing").login(next_path="//evil.example/steal")
    assert page.path == "/"


def test_logout_ends_the_session(browser: Browser) -> None:
    assert browser.get("/logout").path == "/login"
    assert browser.get("/", follow=False).status == 303


def test_dashboard_lookup_and_stylesheet(browser: Browser) -> None:
    dashboard = browser.get("/")
    assert dashboard.find("h1")[0].clean_text == "Billing console"
    assert dashboard.text_of("signed-in-user") == "Support Automation"
    dashboard.one("form", id="lookup", method="get", action="/accounts/search")
    dashboard.one("input", id="lookup-account", name="account_id")
    assert dashboard.one("button", type="submit").clean_text == "Find account"
    assert dashboard.one("link", rel="stylesheet").attrs["href"] == "/static/legacy.css"

    assert browser.get(f"/accounts/search?account_id={ACCOUNT}").path == f"/accounts/{ACCOUNT}"
    missing = browser.get("/accounts/search?account_id=AC-99999")
    assert missing.one(class_="alert alert-danger").clean_text == "No account found for AC-99999"

    css = Browser(browser.base_url, "billing").get("/static/legacy.css")  # no session needed
    assert (css.status, css.headers.get_content_type()) == (200, "text/css")


def test_unknown_account_is_a_404_page(browser: Browser) -> None:
    page = browser.get("/accounts/AC-00000")
    assert page.status == 404
    assert page.one(class_="alert alert-danger").clean_text == "Account not found"


# --- the credit flow -------------------------------------------------------------------------


def test_full_credit_flow_creates_exactly_one_credit(browser: Browser, base_url: str) -> None:
    account = browser.get(f"/accounts/{ACCOUNT}")
    assert account.text_of("account-header") == f"Account {ACCOUNT}"
    assert account.text_of("account-name") == "Jane Doe"
    assert account.text_of("account-balance") == "$120.00"
    assert account.text_of("account-status") == "Active"
    assert account.one("tbody").clean_text == "No credits"
    link = account.one("a", id="issue-credit")
    assert link.clean_text == "Issue credit"

    form = browser.get(link.attrs["href"])
    form.one("form", id="credit", method="post", action=f"/accounts/{ACCOUNT}/credits/review")
    for input_id, name in (("amount", "amount"), ("reason", "reason"), ("reference", "reference")):
        form.one("label", for_=f"credit-{input_id}")
        form.one("input", id=f"credit-{input_id}", name=name)
    assert form.one("button", type="submit").clean_text == "Review credit"

    review = browser.post(f"/accounts/{ACCOUNT}/credits/review", CREDIT)
    assert review.text_of("review-amount") == "$15.00"
    assert review.text_of("review-reason") == "damaged item"
    assert review.text_of("review-reference") == "T-88812"
    review.one("form", id="credit-confirm", action=f"/accounts/{ACCOUNT}/credits")
    assert review.one("button", type="submit").clean_text == "Issue credit"
    review.one("a", href=f"/accounts/{ACCOUNT}/credits/new")
    assert state(base_url)["credits"] == []  # reviewing creates nothing

    done = submit_credit(browser)
    assert done.path == f"/accounts/{ACCOUNT}/credits/CN-100001"
    assert done.text_of("credit-confirmation") == "Credit issued"
    assert done.text_of("confirmation-number") == "CN-100001"

    (credit,) = state(base_url)["credits"]
    assert {key: credit[key] for key in ("confirmation", "account_id", "amount")} == {
        "confirmation": "CN-100001",
        "account_id": ACCOUNT,
        "amount": "15.00",
    }
    assert (credit["reason"], credit["reference"]) == ("damaged item", "T-88812")
    assert credit["created_at"]

    row = browser.get(f"/accounts/{ACCOUNT}").one("tr", data_reference="T-88812")
    assert row.clean_text.startswith("CN-100001")


@pytest.mark.parametrize(
    ("overrides", "field_name", "message"),
    [
        ({"amount": "500.01"}, "amount", "Amount exceeds the 500.00 credit limit"),
        ({"amount": "0"}, "amount", "Amount must be greater than 0.00"),
        ({"amount": "12.345"}, "amount", "Amount must have at most 2 decimal places"),
        ({"amount": ""}, "amount", "Amount is required"),
        ({"reason": "  "}, "reason", "Reason is required"),
        ({"reference": "R" * 41}, "reference", "Reference must be at most 40 characters"),
    ],
)
def test_review_validation_errors(
    browser: Browser, base_url: str, overrides: dict[str, str], field_name: str, message: str
) -> None:
    fields = {**CREDIT, **overrides}
    page = browser.post(f"/accounts/{ACCOUNT}/credits/review", fields)
    assert page.status == 200
    assert page.one(class_="alert alert-danger").clean_text == "Please correct the errors below."
    assert page.one("span", class_="field-error", data_field=field_name).clean_text == message
    assert page.one("input", id="credit-reason").attrs["value"] == fields["reason"].strip()
    assert state(base_url)["credits"] == []


def test_closed_account_refuses_credits(browser: Browser, base_url: str) -> None:
    page = browser.post(f"/accounts/{CLOSED_ACCOUNT}/credits/review", CREDIT)
    banner = page.one(class_="alert alert-danger")
    assert banner.clean_text == "Credits cannot be issued to a closed account"
    commit = browser.post(f"/accounts/{CLOSED_ACCOUNT}/credits", CREDIT)
    assert commit.find(class_="alert alert-danger")
    assert state(base_url)["credits"] == []


def test_submitting_twice_creates_two_credits(browser: Browser, base_url: str) -> None:
    first = browser.post(f"/accounts/{ACCOUNT}/credits", CREDIT)
    second = browser.post(f"/accounts/{ACCOUNT}/credits", CREDIT)
    assert first.text_of("confirmation-number") == "CN-100001"
    assert second.text_of("confirmation-number") == "CN-100002"
    assert [credit["reference"] for credit in state(base_url)["credits"]] == ["T-88812"] * 2
    assert len(browser.get(f"/accounts/{ACCOUNT}").find("tr", data_reference="T-88812")) == 2


# --- faults ----------------------------------------------------------------------------------


def test_fail_fault_fires_n_times_then_recovers(browser: Browser, base_url: str) -> None:
    rule = {"path_contains": f"/accounts/{ACCOUNT}", "method": "GET", "status": 502, "times": 2}
    set_faults(base_url, fail=[rule])
    for _ in range(2):
        page = browser.get(f"/accounts/{ACCOUNT}")
        assert page.status == 502
        assert page.one("h1", class_="server-error").clean_text == "502 Bad Gateway"
        alert = page.one(class_="alert alert-danger").clean_text
        assert alert == "The server encountered a temporary error."
    assert browser.get(f"/accounts/{ACCOUNT}").status == 200
    _, faults = control(base_url, "GET", "/_fixture/faults")
    assert faults["fail"][0]["times"] == 0


def test_fail_fault_answers_a_4xx_or_a_gateways_bare_page(browser: Browser, base_url: str) -> None:
    rules = [
        {"path_contains": f"/accounts/{ACCOUNT}", "method": "GET", "status": 404},
        {"path_contains": f"/accounts/{ACCOUNT}", "status": 502, "page": "gateway"},
    ]
    set_faults(base_url, fail=rules)
    site_page = browser.get(f"/accounts/{ACCOUNT}")
    assert site_page.status == 404
    assert site_page.one("h1", class_="server-error").clean_text == "404 Not Found"
    gateway = browser.get(f"/accounts/{ACCOUNT}")
    assert gateway.status == 502
    assert (
        "nginx" in gateway.body
        and "alert" not in gateway.body
        and "server-error" not in gateway.body
    )
    assert browser.get(f"/accounts/{ACCOUNT}").status == 200


def test_reset_fault_drops_the_connection_without_an_answer(
    browser: Browser, base_url: str
) -> None:
    rule = {"path_contains": f"/accounts/{ACCOUNT}", "method": "GET", "mode": "reset"}
    set_faults(base_url, fail=[rule])
    for _ in range(2):  # the request, and the same again at once: a browser's own resend
        with pytest.raises((ConnectionError, urllib.error.URLError)):
            browser.get(f"/accounts/{ACCOUNT}")
    # Chromium resends once: the next one is a retry, and the site answers it (every retry
    # of a worker's was dropped too, until another page came between).
    assert browser.get(f"/accounts/{ACCOUNT}").status == 200
    assert state(base_url)["faults"]["fail"][0]["times"] == 0


def test_commit_drop_reset_records_the_credit_and_answers_nothing(
    browser: Browser, base_url: str
) -> None:
    set_faults(base_url, commit_drop={"create": True, "mode": "reset"})
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        submit_credit(browser)
    hidden = {**CREDIT, "amount": "15.00"}
    with pytest.raises((ConnectionError, urllib.error.URLError)):  # resent at once: dropped
        browser.post(f"/accounts/{ACCOUNT}/credits", hidden)
    assert len(state(base_url)["credits"]) == 1


def test_commit_drop_with_create_records_the_credit(browser: Browser, base_url: str) -> None:
    set_faults(base_url, commit_drop={"create": True, "mode": "error", "status": 502})
    page = submit_credit(browser)
    assert page.status == 502
    assert page.one("h1", class_="server-error").clean_text == "502 Bad Gateway"
    assert [credit["confirmation"] for credit in state(base_url)["credits"]] == ["CN-100001"]


def test_commit_drop_without_create_records_nothing(browser: Browser, base_url: str) -> None:
    set_faults(base_url, commit_drop={"create": False, "mode": "error", "status": 503})
    page = submit_credit(browser)
    assert page.status == 503
    assert page.one("h1", class_="server-error").clean_text == "503 Service Unavailable"
    assert state(base_url)["credits"] == []
    # times=1 is used up: the retry goes through normally.
    assert submit_credit(browser).text_of("confirmation-number") == "CN-100001"


def test_commit_drop_hang_ends_in_a_gateway_timeout(browser: Browser, base_url: str) -> None:
    set_faults(base_url, commit_drop={"create": True, "mode": "hang", "hang_ms": 50})
    page = submit_credit(browser)
    assert page.status == 504
    assert page.one("h1", class_="server-error").clean_text == "504 Gateway Timeout"
    assert len(state(base_url)["credits"]) == 1


def test_session_expiry_redirects_to_login_with_notice(base_url: str) -> None:
    set_faults(base_url, session_expiry_after=2)
    browser = Browser(base_url, "billing")
    browser.login()  # the redirect to "/" is authenticated page request 1
    assert browser.get(f"/accounts/{ACCOUNT}").status == 200  # request 2
    expired = browser.get(f"/accounts/{ACCOUNT}", follow=False)
    assert expired.status == 303
    assert expired.headers["Location"] == f"/login?next=/accounts/{ACCOUNT}&expired=1"
    login = browser.get(expired.headers["Location"])
    notice = login.one(class_="alert alert-info").clean_text
    assert notice == "Your session has expired. Please sign in again."
    assert browser.login(next_path=f"/accounts/{ACCOUNT}").path == f"/accounts/{ACCOUNT}"


def test_skin_v2_changes_the_credit_markup(browser: Browser, base_url: str) -> None:
    set_faults(base_url, skin="v2")
    account = browser.get(f"/accounts/{ACCOUNT}")
    assert account.find(id="issue-credit") == []
    link = account.one("a", class_="btn-credit")
    assert link.clean_text == "New credit"

    form = browser.get(link.attrs["href"])
    assert form.find(id="credit") == []
    form.one("form", id="credit-v2")
    labels = {label.attrs["for"]: label.clean_text for label in form.find("label")}
    assert labels == {"amt": "Credit amount", "rsn": "Credit reason", "ref": "External reference"}
    button = form.one("button", type="submit")
    assert button.clean_text == "Continue"
    assert form.index_of(button) < form.index_of(form.one("input", id="amt", name="amount"))

    invalid = browser.post(f"/accounts/{ACCOUNT}/credits/review", {**CREDIT, "reason": ""})
    assert (
        invalid.one(class_="notice notice-error").clean_text == "Please correct the errors below."
    )
    assert invalid.one("p", class_="error-text", data_field="reason").clean_text
    assert invalid.find(class_="field-error") == []

    review = browser.post(f"/accounts/{ACCOUNT}/credits/review", CREDIT)
    assert review.one("form", id="confirm-v2").attrs["action"] == f"/accounts/{ACCOUNT}/credits"
    assert review.one("button", type="submit").clean_text == "Confirm and issue"

    done = submit_credit(browser)
    assert done.text_of("credit-confirmation") == "Credit issued"
    assert done.text_of("confirmation-number") == "CN-100001"


def test_reject_value_fails_review_with_the_message(browser: Browser, base_url: str) -> None:
    message = "Reference T-88812 was already used"
    set_faults(
        base_url, reject_value=[{"field": "reference", "value": "T-88812", "message": message}]
    )
    page = browser.post(f"/accounts/{ACCOUNT}/credits/review", CREDIT)
    assert page.one("span", class_="field-error", data_field="reference").clean_text == message
    accepted = browser.post(
        f"/accounts/{ACCOUNT}/credits/review", {**CREDIT, "reference": "T-88813"}
    )
    assert accepted.text_of("review-reference") == "T-88813"
    assert state(base_url)["credits"] == []


def test_concurrent_visitors_are_counted_distinctly(base_url: str) -> None:
    set_faults(base_url, latency_ms=300, latency_path_contains="/login")
    start_together = Barrier(2, timeout=TIMEOUT_S)

    def slow_get(browser: Browser) -> int:
        start_together.wait()
        return browser.get("/login").status

    one_visitor = Browser(base_url, "billing")
    one_visitor.get("/static/legacy.css")  # static responses carry no visitor cookie ...
    assert one_visitor.cookie("visitor") is None
    assert one_visitor.get("/", follow=False).status == 303  # ... any page response does
    assert one_visitor.cookie("visitor")
    with ThreadPoolExecutor(2) as pool:
        # Two overlapping requests from the same visitor are one visitor.
        assert list(pool.map(slow_get, [one_visitor, one_visitor])) == [200, 200]
    assert state(base_url)["max_concurrent_visitors"] == 1

    with ThreadPoolExecutor(2) as pool:
        assert list(
            pool.map(slow_get, [Browser(base_url, "billing"), Browser(base_url, "billing")])
        ) == [200, 200]
    snapshot = state(base_url)
    assert snapshot["max_concurrent_visitors"] >= 2
    assert snapshot["requests"] == 5  # pages only: static and /_fixture calls are not counted


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"latency": 100}',
        b'{"fail": [{"path_contains": "/", "status": 302}]}',
        b'{"skin": "v3"}',
        b'{"commit_drop": {"mode": "explode"}}',
    ],
)
def test_invalid_faults_are_rejected_with_400(base_url: str, body: bytes) -> None:
    set_faults(base_url, skin="v2")
    status, response = control(base_url, "POST", "/_fixture/faults", body)
    assert status == 400
    assert response["errors"]
    assert state(base_url)["faults"]["skin"] == "v2"  # the previous faults stay in force


def test_faults_never_touch_fixture_or_static_paths(base_url: str) -> None:
    set_faults(base_url, fail=[{"path_contains": "/", "status": 500, "times": 5}])
    assert Browser(base_url, "billing").get("/static/legacy.css").status == 200
    assert state(base_url)["faults"]["fail"][0]["times"] == 5


def test_the_browsers_own_favicon_request_is_not_a_page(browser: Browser, base_url: str) -> None:
    # Chromium asks for /favicon.ico by itself, when it likes: counted as a page, it would
    # move session_expiry_after and the request counters by a race.
    set_faults(base_url, session_expiry_after=1, fail=[{"path_contains": "/", "status": 500}])
    before = state(base_url)["requests"]
    with urllib.request.urlopen(base_url + "/favicon.ico", timeout=TIMEOUT_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        assert response.read().startswith(b"\x89PNG")
    after = state(base_url)
    assert after["requests"] == before
    assert after["faults"]["fail"][0]["times"] == 1


def test_reset_restores_a_clean_site(browser: Browser, base_url: str) -> None:
    submit_credit(browser)
    set_faults(base_url, skin="v2", session_expiry_after=1)
    status, snapshot = control(base_url, "POST", "/_fixture/reset")
    assert status == 200
    assert snapshot["credits"] == []
    assert (snapshot["logins"], snapshot["failed_logins"], snapshot["requests"]) == (0, 0, 0)
    assert snapshot["faults"]["skin"] == "v1"
    assert browser.get("/", follow=False).status == 303  # sessions are gone too
