"""Chaos check: many jobs through the queue with random faults, every report against the truth.

    python bench/chaos.py [--site billing|orders|helpdesk] [--jobs 200] [--concurrency 4]
                          [--seed N]

Each concurrent lane has a fixture site of its own, so the fault injected before a job belongs
to that job alone. The site picks the script (billing/issue_credit, orders/refund_order,
helpdesk/reply_and_resolve), the faults drawn for its commit flow and the ground truth a report
is judged against (the credit, the refund or the public reply carrying the job's reference).
After each job the report is compared with that truth:

- a false success: the report says succeeded, the site holds no such effect;
- a duplicate side effect: the site holds the effect more than once;
- a lost job: no settled report;
- a disagreement: anything else where the report and the site differ (a failure the site in
  fact applied, a wrong confirmation or refund number, an unresolved ticket, an effect after a
  rejection).

Redis is ``FORMWORK_BENCH_REDIS_URL`` (default db 8 on the local server).

Prints one line per figure; exits non-zero unless all but `jobs` are 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures import FixtureServer, start_fixture  # noqa: E402
from worker.browser import BrowserHost  # noqa: E402
from worker.client import FormworkClient  # noqa: E402
from worker.contract import BrowserJob, JobReport, JobStatus  # noqa: E402
from worker.localredis import ensure  # noqa: E402
from worker.queue import running_worker  # noqa: E402
from worker.settings import Settings  # noqa: E402

REDIS_URL = os.environ.get("FORMWORK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")

Fault = tuple[str, dict[str, Any], int]
# The commit faults that drop a connection run against a site that answers the browser's own
# resend, as a real one does: the fixtures drop it by default (see fixtures/portal/faults.py).
_REAL: dict[str, Any] = {"answer_resends": True}

# name -> the fault body; weights favour the dangerous ones.
BILLING_FAULTS: list[Fault] = [
    ("none", {}, 2),
    ("latency", {"latency_ms": 150}, 1),
    ("review_502", {"fail": [{"path_contains": "/credits/review", "status": 502}]}, 2),
    (
        "account_503",
        {"fail": [{"path_contains": "/accounts/AC-", "method": "GET", "status": 503}]},
        1,
    ),
    ("drop_created", {"commit_drop": {"create": True, "mode": "error", "status": 502}}, 3),
    ("drop_not_created", {"commit_drop": {"create": False, "mode": "error", "status": 502}}, 3),
    ("hang_created", {"commit_drop": {"create": True, "mode": "hang", "hang_ms": 8000}}, 1),
    # A real site answers the browser's own resend of a dropped request (`answer_resends`).
    ("reset_created", {"commit_drop": {"create": True, "mode": "reset"}, **_REAL}, 2),
    ("reset_not_created", {"commit_drop": {"create": False, "mode": "reset"}, **_REAL}, 1),
    (
        "gateway_502_created",
        {"commit_drop": {"create": True, "mode": "error", "status": 502, "page": "gateway"}},
        1,
    ),
    ("review_reset", {"fail": [{"path_contains": "/credits/review", "mode": "reset"}]}, 1),
    ("review_429", {"fail": [{"path_contains": "/credits/review", "status": 429}]}, 1),
    ("review_408", {"fail": [{"path_contains": "/credits/review", "status": 408}]}, 1),
    ("session_expiry", {"session_expiry_times": 1}, 2),  # after_requests drawn per job
    ("skin_v2", {"skin": "v2"}, 2),
    ("reject_amount", {}, 1),  # reject_value drawn per job
]


def _commit_faults(commit: str) -> list[Fault]:
    """The commit_drop faults every portal's commit (the request to ``commit``) can meet."""
    drop: dict[str, Any] = {"path_contains": commit}
    return [
        ("drop_created", {"commit_drop": {**drop, "create": True, "status": 502}}, 3),
        ("drop_not_created", {"commit_drop": {**drop, "create": False, "status": 502}}, 3),
        ("hang_created", {"commit_drop": {**drop, "mode": "hang", "hang_ms": 8000}}, 1),
        ("reset_created", {"commit_drop": {**drop, "mode": "reset"}, **_REAL}, 2),
        (
            "reset_not_created",
            {"commit_drop": {**drop, "create": False, "mode": "reset"}, **_REAL},
            1,
        ),
        ("gateway_502_created", {"commit_drop": {**drop, "page": "gateway"}}, 1),
        ("commit_503_before", {"fail": [{"path_contains": commit, "status": 503}]}, 1),
        ("commit_reset_before", {"fail": [{"path_contains": commit, "mode": "reset"}], **_REAL}, 1),
    ]


ORDERS_FAULTS: list[Fault] = [
    ("none", {}, 2),
    ("latency", {"latency_ms": 150}, 1),
    *_commit_faults("/submit"),
    ("search_503", {"fail": [{"path_contains": "/api/orders", "status": 503}]}, 1),
    ("order_502", {"fail": [{"path_contains": "/orders/ORD-", "method": "GET", "status": 502}]}, 1),
    (
        "reason_post_502",
        {"fail": [{"path_contains": "/reason", "method": "POST", "status": 502}]},
        1,
    ),
    (
        "reason_post_reset",
        {"fail": [{"path_contains": "/reason", "method": "POST", "mode": "reset"}]},
        1,
    ),
    ("review_502", {"fail": [{"path_contains": "/review", "status": 502}]}, 1),
    ("review_429", {"fail": [{"path_contains": "/review", "status": 429}]}, 1),
    ("authorize_503", {"fail": [{"path_contains": "/provider/authorize", "status": 503}]}, 1),
    ("widget_reset", {"fail": [{"path_contains": "/provider/widget", "mode": "reset"}]}, 1),
    ("session_expiry", {"session_expiry_times": 1}, 2),
    ("skin_v2", {"skin": "v2"}, 2),
    ("reject_reference", {}, 1),
]

HELPDESK_FAULTS: list[Fault] = [
    ("none", {}, 2),
    ("latency", {"latency_ms": 150}, 1),
    *_commit_faults("/messages"),
    (
        "ticket_502",
        {"fail": [{"path_contains": "/tickets/HD-", "method": "GET", "status": 502}]},
        1,
    ),
    (
        "ticket_reset",
        {"fail": [{"path_contains": "/tickets/HD-", "method": "GET", "mode": "reset"}]},
        1,
    ),
    (
        "ticket_408",
        {"fail": [{"path_contains": "/tickets/HD-", "method": "GET", "status": 408}]},
        1,
    ),
    ("session_expiry", {"session_expiry_times": 1}, 2),
    ("skin_v2", {"skin": "v2"}, 1),
    ("reject_status", {}, 1),
    ("reject_body", {}, 1),
]


def _call(url: str, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@dataclass(frozen=True)
class Chaos:
    """One site's chaos: its script, its faults, how a job's inputs and verdict are made."""

    script: str
    faults: list[Fault]
    inputs: Callable[[random.Random, str], dict[str, str]]
    # (a fault's name and body, the job's inputs) -> the body with its per-job draws.
    draw: Callable[[random.Random, str, dict[str, Any], dict[str, str]], None]
    # (report, the site's state, the job's inputs) -> the verdict (see `judge`).
    judge: Callable[[JobReport | None, dict[str, Any], dict[str, str]], str]


def draw_fault(
    rng: random.Random, chaos: Chaos, inputs: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    names = [f[0] for f in chaos.faults]
    name = rng.choices(names, weights=[f[2] for f in chaos.faults])[0]
    body = json.loads(json.dumps(next(f[1] for f in chaos.faults if f[0] == name)))
    if name == "session_expiry":
        body["session_expiry_after"] = rng.randint(1, 6)
    chaos.draw(rng, name, body, inputs)
    return name, body


def _billing_inputs(rng: random.Random, reference: str) -> dict[str, str]:
    # Up to 100.00: larger credits stop at the script's approval gate.
    amount = f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}"
    return {"account_id": "AC-10231", "amount": amount, "reason": "chaos", "reference": reference}


def _billing_draw(
    rng: random.Random, name: str, body: dict[str, Any], inputs: dict[str, str]
) -> None:
    if name == "reject_amount":
        body["reject_value"] = [
            {"field": "amount", "value": inputs["amount"], "message": "Needs approval"}
        ]


def _billing_judge(report: JobReport | None, state: dict[str, Any], inputs: dict[str, str]) -> str:
    credits = [c for c in state["credits"] if c["reference"] == inputs["reference"]]
    return judge(report, credits, lambda c: c["confirmation"], "confirmation_number")


ORDER_SKUS = {"ORD-100231": "MUG-RED", "ORD-100230": "TEE-BLK-M", "ORD-100229": "CAP-GRY"}


def _orders_inputs(rng: random.Random, reference: str) -> dict[str, str]:
    order_id = rng.choice(sorted(ORDER_SKUS))
    return {
        "order_id": order_id,
        "sku": ORDER_SKUS[order_id],
        "reason": rng.choice(["damaged", "not_received", "wrong_item", "other"]),
        "reference": reference,
        "method": rng.choice(["card", "store_credit"]),
        "receipt": "receipt-ord-100231.png",
    }


def _orders_draw(
    rng: random.Random, name: str, body: dict[str, Any], inputs: dict[str, str]
) -> None:
    if name == "reject_reference":
        body["reject_value"] = [
            {"field": "reference", "value": inputs["reference"], "message": "Reference in use"}
        ]


def _orders_judge(report: JobReport | None, state: dict[str, Any], inputs: dict[str, str]) -> str:
    refunds = [r for r in state["refunds"] if r["reference"] == inputs["reference"]]
    verdict = judge(report, refunds, lambda r: r["refund_id"], "refund_number")
    if verdict == "ok" and refunds:
        (refund,) = refunds
        asked = ([inputs["sku"]], inputs["reason"], inputs["method"], inputs["order_id"])
        if (refund["skus"], refund["reason"], refund["method"], refund["order_id"]) != asked:
            return "disagreement"
        if refund["receipt"] is None:
            return "disagreement"
    return verdict


HELPDESK_TICKETS = ["HD-2041", "HD-2042", "HD-2043", "HD-2044"]


def _helpdesk_inputs(rng: random.Random, reference: str) -> dict[str, str]:
    return {
        "ticket_id": rng.choice(HELPDESK_TICKETS),
        "message": f"Chaos reply {rng.randint(1, 10**6)}.",
        "reference": reference,
    }


def _helpdesk_draw(
    rng: random.Random, name: str, body: dict[str, Any], inputs: dict[str, str]
) -> None:
    if name == "reject_status":
        body["reject_value"] = [{"field": "status", "value": "resolved", "message": "Not yet"}]
    if name == "reject_body":
        sent = f"{inputs['message']}\n\nRef: {inputs['reference']}"
        body["reject_value"] = [{"field": "body", "value": sent, "message": "Tone it down"}]


def _helpdesk_judge(report: JobReport | None, state: dict[str, Any], inputs: dict[str, str]) -> str:
    ticket = state["tickets"][inputs["ticket_id"]]
    replies = [
        m for m in ticket["thread"] if m["kind"] == "public" and inputs["reference"] in m["body"]
    ]
    verdict = judge(report, replies, None, None)
    if verdict == "ok" and replies and report is not None:
        resolved = ticket["status"] == "resolved"
        if report.status == JobStatus.succeeded and not resolved:
            return "disagreement"
    return verdict


SITES: dict[str, Chaos] = {
    "billing": Chaos(
        "billing/issue_credit", BILLING_FAULTS, _billing_inputs, _billing_draw, _billing_judge
    ),
    "orders": Chaos(
        "orders/refund_order", ORDERS_FAULTS, _orders_inputs, _orders_draw, _orders_judge
    ),
    "helpdesk": Chaos(
        "helpdesk/reply_and_resolve",
        HELPDESK_FAULTS,
        _helpdesk_inputs,
        _helpdesk_draw,
        _helpdesk_judge,
    ),
}


def judge(
    report: JobReport | None,
    effects: list[dict[str, Any]],
    number: Callable[[dict[str, Any]], str] | None,
    output: str | None,
) -> str:
    """'ok' or the kind of problem: false_success, duplicate, lost, disagreement.

    ``effects`` are the site's records of the job's effect; ``output`` names the report's output
    that must equal ``number`` of the one effect (None: the script extracts none)."""
    if report is None or not report.status.settled:
        return "lost"
    if len(effects) > 1:
        return "duplicate"
    if report.status == JobStatus.succeeded:
        if not effects:
            return "false_success"
        wanted = None if number is None or output is None else number(effects[0])
        if wanted is not None and report.outputs.get(str(output)) != wanted:
            return "disagreement"
        return "ok"
    if report.status == JobStatus.paused_for_handoff and report.error is not None:
        # A person decides exactly because the worker could not tell: either truth is fine.
        return "ok" if report.error.code == "outcome_unknown" else _none_applied(effects)
    return _none_applied(effects)


def _none_applied(effects: list[dict[str, Any]]) -> str:
    return "ok" if not effects else "disagreement"


async def lane(
    index: int,
    site: FixtureServer,
    chaos: Chaos,
    jobs: list[int],
    client: FormworkClient,
    rng: random.Random,
    results: list[tuple[str, str, JobStatus | None]],
) -> None:
    for number in jobs:
        reference = f"CH-{number:04d}"
        inputs = chaos.inputs(rng, reference)
        fault, body = draw_fault(rng, chaos, inputs)
        await asyncio.to_thread(_call, site.url + "/_fixture/reset", "POST")
        await asyncio.to_thread(_call, site.url + "/_fixture/faults", "POST", body)
        job = BrowserJob(
            job_id=f"chaos-{uuid.uuid4().hex[:10]}",
            script=chaos.script,
            inputs=inputs,
            site_url=site.url,
            step_timeout_ms=3000,
        )
        handle = await client.enqueue(job)
        try:
            report: JobReport | None = await handle.wait(120)
        except (TimeoutError, LookupError):
            report = None
        state = await asyncio.to_thread(_call, site.url + "/_fixture/state")
        verdict = chaos.judge(report, state, inputs)
        results.append((fault, verdict, report.status if report else None))
        if verdict != "ok":
            print(f"  lane {index} job {job.job_id} fault {fault}: {verdict} "
                  f"(status {report.status if report else None}, "
                  f"error {report.error.code if report and report.error else None})",
                  flush=True)  # fmt: skip


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", choices=sorted(SITES), default="billing")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    chaos = SITES[args.site]
    print(
        f"chaos: {args.site}, {args.jobs} jobs, concurrency {args.concurrency}, seed {seed}",
        flush=True,
    )
    ensure(REDIS_URL)
    settings = Settings(
        redis_url=REDIS_URL,
        key_prefix=f"chaos-{uuid.uuid4().hex[:8]}",
        artifacts_dir=Path("/tmp/formwork-chaos-artifacts"),
        scripts_dir=ROOT / "scripts",
        selectors_dir=ROOT / "selectors",
        secrets_file=ROOT / "fixtures" / "secrets.yaml",
        uploads_dir=ROOT / "fixtures" / "uploads",
        max_jobs=args.concurrency,
    )
    sites = [start_fixture(args.site) for _ in range(args.concurrency)]
    results: list[tuple[str, str, JobStatus | None]] = []
    browser = BrowserHost(settings.chromium, keep_warm=True)
    await browser.start()
    try:
        async with (
            running_worker(settings, browser),
            FormworkClient(REDIS_URL, key_prefix=settings.key_prefix) as client,
        ):
            lanes = [list(range(i, args.jobs, args.concurrency)) for i in range(args.concurrency)]
            await asyncio.gather(*(
                lane(i, site, chaos, jobs, client, random.Random(seed + i), results)
                for i, (site, jobs) in enumerate(zip(sites, lanes, strict=True))
            ))  # fmt: skip
    finally:
        await browser.stop()
        for site in sites:
            site.stop()

    verdicts = Counter(verdict for _, verdict, _ in results)
    statuses = Counter(str(status) for _, _, status in results)
    print(f"jobs: {len(results)}")
    print(f"false successes: {verdicts['false_success']}")
    print(f"duplicate side effects: {verdicts['duplicate']}")
    print(f"lost jobs: {verdicts['lost'] + args.jobs - len(results)}")
    print(f"disagreements with ground truth: {verdicts['disagreement']}")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print(
        "faults: "
        + ", ".join(f"{k} {v}" for k, v in sorted(Counter(f for f, _, _ in results).items()))
    )
    bad = sum(v for k, v in verdicts.items() if k != "ok") + args.jobs - len(results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
