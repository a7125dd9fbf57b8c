"""Chaos check: many jobs through the queue with random faults, every report against the truth.

    python bench/chaos.py [--jobs 200] [--concurrency 4] [--seed N]

Each concurrent lane has a billing fixture site of its own, so the fault injected before a job
belongs to that job alone. After each job the report is compared with the site's ground truth:

- a false success: the report says succeeded, the site holds no such credit;
- a duplicate side effect: the site holds the credit more than once;
- a lost job: no settled report;
- a disagreement: anything else where the report and the site differ (a failure the site in
  fact applied, a wrong confirmation number, a credit after a rejection).

Prints one line per figure; exits non-zero unless all but `jobs` are 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import urllib.request
import uuid
from collections import Counter
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

REDIS_URL = "redis://127.0.0.1:6379/8"

# name -> the fault body; weights favour the dangerous ones.
FAULTS: list[tuple[str, dict[str, Any], int]] = [
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
    ("reset_created", {"commit_drop": {"create": True, "mode": "reset"}}, 2),
    ("reset_not_created", {"commit_drop": {"create": False, "mode": "reset"}}, 1),
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


def _call(url: str, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def draw_fault(rng: random.Random, amount: str) -> tuple[str, dict[str, Any]]:
    names = [f[0] for f in FAULTS]
    name = rng.choices(names, weights=[f[2] for f in FAULTS])[0]
    body = dict(next(f[1] for f in FAULTS if f[0] == name))
    if name == "session_expiry":
        body["session_expiry_after"] = rng.randint(1, 6)
    if name == "reject_amount":
        body["reject_value"] = [{"field": "amount", "value": amount, "message": "Needs approval"}]
    return name, body


def judge(report: JobReport | None, credits: list[dict[str, Any]]) -> str:
    """'ok' or the kind of problem: false_success, duplicate, lost, disagreement."""
    if report is None or not report.status.settled:
        return "lost"
    if len(credits) > 1:
        return "duplicate"
    if report.status == JobStatus.succeeded:
        if not credits:
            return "false_success"
        if report.outputs.get("confirmation_number") != credits[0]["confirmation"]:
            return "disagreement"
        return "ok"
    if report.status == JobStatus.paused_for_handoff and report.error is not None:
        # A person decides exactly because the worker could not tell: either truth is fine.
        return "ok" if report.error.code == "outcome_unknown" else _none_applied(credits)
    return _none_applied(credits)


def _none_applied(credits: list[dict[str, Any]]) -> str:
    return "ok" if not credits else "disagreement"


async def lane(
    index: int,
    site: FixtureServer,
    jobs: list[int],
    client: FormworkClient,
    rng: random.Random,
    results: list[tuple[str, str, JobStatus | None]],
) -> None:
    for number in jobs:
        # Up to 100.00: larger credits stop at the script's approval gate.
        amount = f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}"
        fault, body = draw_fault(rng, amount)
        await asyncio.to_thread(_call, site.url + "/_fixture/reset", "POST")
        await asyncio.to_thread(_call, site.url + "/_fixture/faults", "POST", body)
        reference = f"CH-{number:04d}"
        job = BrowserJob(
            job_id=f"chaos-{uuid.uuid4().hex[:10]}",
            script="billing/issue_credit",
            inputs={"account_id": "AC-10231", "amount": amount, "reason": "chaos",
                    "reference": reference},
            site_url=site.url,
            step_timeout_ms=3000,
        )  # fmt: skip
        handle = await client.enqueue(job)
        try:
            report: JobReport | None = await handle.wait(120)
        except (TimeoutError, LookupError):
            report = None
        state = await asyncio.to_thread(_call, site.url + "/_fixture/state")
        credits = [c for c in state["credits"] if c["reference"] == reference]
        verdict = judge(report, credits)
        results.append((fault, verdict, report.status if report else None))
        if verdict != "ok":
            print(f"  lane {index} job {job.job_id} fault {fault}: {verdict} "
                  f"(status {report.status if report else None}, credits {len(credits)})",
                  flush=True)  # fmt: skip


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"chaos: {args.jobs} jobs, concurrency {args.concurrency}, seed {seed}", flush=True)
    ensure(REDIS_URL)
    settings = Settings(
        redis_url=REDIS_URL,
        key_prefix=f"chaos-{uuid.uuid4().hex[:8]}",
        artifacts_dir=Path("/tmp/formwork-chaos-artifacts"),
        scripts_dir=ROOT / "scripts",
        selectors_dir=ROOT / "selectors",
        secrets_file=ROOT / "fixtures" / "secrets.yaml",
        max_jobs=args.concurrency,
    )
    sites = [start_fixture("billing") for _ in range(args.concurrency)]
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
                lane(i, site, jobs, client, random.Random(seed + i), results)
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
