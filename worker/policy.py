"""Rules per failure kind: what the worker does when a step fails with a given code.

Rules are declared at three levels — the site's registry, the script, the step — and the most
specific wins (step over script over site over the defaults below). Retries use tenacity's
exponential backoff with jitter. Everything here is pure: `rule_for` and `retry_wait_s` are
tested without a browser.

Defaults, chosen for legacy back-offices:
- transient (`timeout`, `network_error`, `server_error`, `browser_crashed`): 3 tries in all
  with backoff, then fail;
- `validation_rejected`: ask the customer (the value they gave was refused);
- `auth_expired`: sign in again once (the site's login flow), then hand off;
- `credentials_rejected`: hand off (signing in again sends the same values);
- `selector_not_found`: the step's alternate path when it has one, else hand off;
- `expectation_failed`, `unexpected_page`, `outcome_unknown`: hand off to a person;
- `navigation_blocked`, `navigation_failed`, `script_error`: fail.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tenacity import RetryCallState, wait_exponential_jitter

from worker.contract import FailureCode, RuleAction


class Rule(BaseModel):
    """`retry`, `{action: retry, attempts: 5}`, `{action: alternate, alternate: via_search}`…"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: RuleAction
    attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="retry: tries in all; relogin: sign-ins before giving up.",
    )
    initial_delay_ms: int = Field(default=250, ge=0, le=60_000)
    max_delay_ms: int = Field(default=4_000, ge=0, le=300_000)
    alternate: str | None = Field(default=None, description="The script's alternate path.")
    then: RuleAction = Field(
        default=RuleAction.handoff,
        description="What to do once retries, sign-ins or the alternate did not help.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `server_error: retry` is short for `server_error: {action: retry}`.
        return {"action": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if (self.action == RuleAction.alternate) != (self.alternate is not None):
            raise ValueError("'alternate' names the path exactly when action is 'alternate'")
        if self.then in (RuleAction.retry, RuleAction.alternate, RuleAction.relogin):
            raise ValueError("'then' must be handoff, ask_customer or fail")
        return self


Rules = dict[FailureCode, Rule]

TRANSIENT = (
    FailureCode.timeout,
    FailureCode.network_error,
    FailureCode.server_error,
    FailureCode.browser_crashed,
)

DEFAULT_RULES: Rules = {
    **{code: Rule(action=RuleAction.retry, then=RuleAction.fail) for code in TRANSIENT},
    FailureCode.validation_rejected: Rule(action=RuleAction.ask_customer),
    FailureCode.auth_expired: Rule(action=RuleAction.relogin, attempts=1),
    FailureCode.credentials_rejected: Rule(action=RuleAction.handoff),
    FailureCode.selector_not_found: Rule(action=RuleAction.handoff),
    FailureCode.expectation_failed: Rule(action=RuleAction.handoff),
    FailureCode.unexpected_page: Rule(action=RuleAction.handoff),
    FailureCode.outcome_unknown: Rule(action=RuleAction.handoff),
}
FALLBACK_RULE = Rule(action=RuleAction.fail)


def rule_for(code: FailureCode, *levels: Rules | None, alternate: str | None = None) -> Rule:
    """The rule for `code`: the first level (most specific first) that has one, else the
    default. A step with a declared `alternate` path uses it for a missing element unless a
    level says otherwise."""
    for rules in levels:
        if rules and code in rules:
            return rules[code]
    if alternate is not None and code == FailureCode.selector_not_found:
        return Rule(action=RuleAction.alternate, alternate=alternate)
    return DEFAULT_RULES.get(code, FALLBACK_RULE)


def retry_wait_s(rule: Rule, state: RetryCallState) -> float:
    """Exponential backoff with jitter for the attempt `state` describes (tenacity)."""
    initial = rule.initial_delay_ms / 1000
    wait = wait_exponential_jitter(
        multiplier=initial or 0.001, max=rule.max_delay_ms / 1000, jitter=initial
    )
    return float(wait(state))
