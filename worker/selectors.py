"""Per-site selector registries: logical element names, their ordered candidates, detectors.

Scripts name logical elements (`credit.amount`), never raw CSS, so a markup change is fixed once
in `selectors/<site>.yaml` and every script of that site follows. Candidates are tried in order;
the step report records which one matched, so a fallback in use is visible.

A candidate may reach into an iframe (`{frame: "iframe#pay", role: radio, name: Store credit}`):
the element is looked up inside that frame's document, same-origin or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import FrameLocator, Locator, Page
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.contract import FailureCode, MatchedSelector
from worker.errors import ScriptInvalid, StepError
from worker.policy import Rule
from worker.templating import TemplateError, references, render
from worker.yamlfile import At, closest, load_model

ELEMENT_NAME = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"
_KINDS = ("role", "label", "placeholder", "test_id", "text", "css")
# The roles Playwright's `get_by_role` knows, read off its own signature.
ARIA_ROLES: tuple[str, ...] = typing.get_args(typing.get_type_hints(Page.get_by_role)["role"])


class Candidate(BaseModel):
    """One way to find an element. Exactly one of the locator kinds is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str | None = None
    name: str | None = Field(default=None, description="Accessible name, with `role`.")
    label: str | None = None
    placeholder: str | None = None
    test_id: str | None = None
    text: str | None = None
    css: str | None = None
    exact: bool = True
    frame: str | None = Field(
        default=None,
        description="CSS of the iframe the element is in (a payment widget, an editor); "
        "absent: the page itself.",
    )

    @field_validator("role")
    @classmethod
    def _aria_role(cls, role: str | None) -> str | None:
        # A typo would match nothing, wait out the step and look like a changed site.
        if role is not None and "{{" not in role and role not in ARIA_ROLES:
            near = closest(role, ARIA_ROLES)
            hint = f"; did you mean {near!r}?" if near else ""
            raise ValueError(f"{role!r} is not an ARIA role{hint}")
        return role

    # A blank label or text is as empty as a blank css: it matches nothing on the page, so the
    # step would wait out its timeout and hand off as if the site had changed.
    @field_validator(*_KINDS, "frame")
    @classmethod
    def _selector(cls, value: str | None) -> str | None:
        return None if value is None else _not_blank(value)

    @model_validator(mode="after")
    def _one_kind(self) -> Candidate:
        if self.name is not None and self.role is None:
            raise ValueError("'name' only goes with 'role'")
        given = [kind for kind in _KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_KINDS)} (got {given or 'none'})")
        for kind in (*_KINDS, "name", "frame"):
            value = getattr(self, kind)
            if isinstance(value, str) and "{{" in value:
                _check_template(kind, value)
        return self

    def templates(self) -> list[str]:
        values = [getattr(self, kind) for kind in (*_KINDS, "name", "frame")]
        return [v for v in values if isinstance(v, str) and "{{" in v]

    def render(self, context: dict[str, dict[str, Any]]) -> Candidate:
        """This candidate with `{{ inputs.x }}` placeholders filled in."""
        if not self.templates():
            return self
        update = {
            kind: render(value, context)
            for kind in (*_KINDS, "name", "frame")
            if isinstance(value := getattr(self, kind), str) and "{{" in value
        }
        return self.model_copy(update=update)

    def describe(self) -> str:
        within = f"frame={self.frame} >> " if self.frame is not None else ""
        if self.role is not None:
            return f"{within}role={self.role}" + (f"[name={self.name!r}]" if self.name else "")
        kind = next(k for k in _KINDS if getattr(self, k) is not None)
        return f"{within}{kind}={getattr(self, kind)}"

    def locator(self, page: Page) -> Locator:
        root: Page | FrameLocator = page if self.frame is None else page.frame_locator(self.frame)
        if self.role is not None:
            # Playwright types the role as a Literal of ARIA roles; the registry holds plain text.
            return root.get_by_role(self.role, name=self.name, exact=self.exact)  # type: ignore[arg-type]
        if self.label is not None:
            return root.get_by_label(self.label, exact=self.exact)
        if self.placeholder is not None:
            return root.get_by_placeholder(self.placeholder, exact=self.exact)
        if self.test_id is not None:
            return root.get_by_test_id(self.test_id)
        if self.text is not None:
            return root.get_by_text(self.text, exact=self.exact)
        assert self.css is not None
        return root.locator(self.css)


def _check_template(kind: str, source: str) -> None:
    """A selector's template is checked with the registry, not blamed on each step using it."""
    try:
        refs = references(source)
    except TemplateError as exc:
        raise At((kind,), str(exc)) from exc
    for ref in refs:
        # A selector reaches the page's DOM queries, the step report and the logs in the clear.
        if ref.namespace == "secrets":
            raise At(
                (kind,),
                f"'{{{{ secrets.{ref.name} }}}}': a secret may not appear in a selector "
                "(selectors are shown in step reports and logs)",
            )


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("an empty selector matches nothing")
    return value


# Checked for syntax by the browser, on first use (`worker.failures.detectors_seen`).
CssSelector = Annotated[str, AfterValidator(_not_blank)]


class Detectors(BaseModel):
    """CSS selectors that reveal how the site shows trouble."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    validation_error: list[CssSelector] = Field(default_factory=list)
    login_page: list[CssSelector] = Field(default_factory=list)
    error_banner: list[CssSelector] = Field(default_factory=list)

    @field_validator("validation_error", "login_page", "error_banner")
    @classmethod
    def _not_empty(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            # Written out, it reads as if the site's trouble were looked for.
            raise ValueError(
                "an empty list detects nothing: list the CSS selectors of how the site shows "
                f"it, or leave '{info.field_name}' out if the site never does"
            )
        return value

    @model_validator(mode="after")
    def _each_once(self) -> Detectors:
        # One selector listed twice is a copy whose edit was forgotten; under two kinds it
        # says two things at once, and the page's trouble is classified by whichever wins.
        first: dict[str, tuple[str, int]] = {}
        for kind in ("validation_error", "login_page", "error_banner"):
            for index, selector in enumerate(getattr(self, kind)):
                if selector not in first:
                    first[selector] = (kind, index)
                    continue
                other, at = first[selector]
                if other == kind:
                    raise At((kind, index), f"{selector!r} is already listed ([{at}])")
                raise At(
                    (kind, index),
                    f"{selector!r} is already a {other} detector ({other}[{at}]): one selector "
                    "cannot tell two kinds of trouble apart",
                )
        return self

    @property
    def selectors(self) -> list[str]:
        """Every detector, of every kind."""
        return [*self.validation_error, *self.login_page, *self.error_banner]


class SiteLimits(BaseModel):
    """How hard all workers together may drive the site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent_jobs: int | None = Field(default=None, ge=1)
    min_interval_ms: int | None = Field(default=None, ge=1, description="Between job starts.")


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def _host(value: str) -> str:
    """A host name or IP address as `urlsplit(url).hostname` gives it: lower case, no
    brackets. It becomes a proxy bypass rule (worker.guard), so nothing else may pass."""
    host = value.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_NAME.match(host):
        raise ValueError(
            f"{value!r} is not a host name or IP address (no scheme, port, path or wildcard)"
        )
    return host


Host = Annotated[str, AfterValidator(_host)]


class SiteRegistry(BaseModel):
    """`selectors/<site>.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(pattern=r"^[a-z0-9_]+$")
    base_url: HttpUrl
    allowed_hosts: list[Host] = Field(min_length=1)
    elements: dict[str, list[Candidate]]
    secret_elements: list[str] = Field(
        default_factory=list,
        description="Fields that may hold a secret (sign-in name, password): the only targets "
        "a fill may type a `{{ secrets.x }}` or secret input into.",
    )
    detectors: Detectors = Field(default_factory=Detectors)
    limits: SiteLimits = Field(default_factory=SiteLimits)
    login_flow: str | None = Field(
        default=None,
        # A name (its newest version runs, as a sub-flow's), never a path to wander off with.
        pattern=r"^[a-z0-9_]+/[a-z0-9_]+$",
        description="The script that signs in; run again when a session expires.",
    )
    on_failure: dict[FailureCode, Rule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _elements(self) -> SiteRegistry:
        for name, candidates in self.elements.items():
            if not re.match(ELEMENT_NAME, name):
                raise At(
                    ("elements", name), f"element name {name!r} must be dotted lower_case words"
                )
            if not candidates:
                raise At(("elements", name), f"element {name!r} has no candidates")
            for index, candidate in enumerate(candidates):
                # A fallback that repeats one before it can never be the one that matches: a
                # copy whose edit was forgotten, and the fallback meant is missing.
                if candidate in candidates[:index]:
                    earlier = candidates.index(candidate)
                    raise At(
                        ("elements", name, index),
                        f"the same candidate as [{earlier}] ({candidate.describe()})",
                    )
        _once(self.secret_elements, "secret_elements")
        _once(self.allowed_hosts, "allowed_hosts")
        for index, name in enumerate(self.secret_elements):
            if name not in self.elements:
                raise At(("secret_elements", index), f"{name!r} is not an element")
        if self.base_url.host not in self.allowed_hosts:
            # Every job would be refused at its first page (navigation_blocked).
            raise At(
                ("base_url",),
                f"host {self.base_url.host!r} is not one of allowed_hosts {self.allowed_hosts}",
            )
        return self

    def candidates(self, element: str) -> list[Candidate]:
        try:
            return self.elements[element]
        except KeyError:
            raise StepError(
                FailureCode.script_error, f"element {element!r} is not in the {self.site} registry"
            ) from None


def _once(values: list[str], field: str) -> None:
    """At naming the second of two equal entries of a list (`allowed_hosts` as normalised:
    `LOCALHOST` is `localhost`)."""
    for index, value in enumerate(values):
        if value in values[:index]:
            raise At((field, index), f"{value!r} is already listed ([{values.index(value)}])")


def load_registry(selectors_dir: Path, site: str) -> SiteRegistry:
    path = selectors_dir / f"{site}.yaml"
    if not path.is_file():
        raise ScriptInvalid(f"{path}: no selector registry for site {site!r}")
    registry = load_model(path, SiteRegistry)
    if registry.site != site:
        raise ScriptInvalid(f"{path}: declares site {registry.site!r}, expected {site!r}")
    return registry


@dataclass(frozen=True)
class Resolved:
    locator: Locator
    matched: MatchedSelector


WaitState = Literal["attached", "detached", "visible", "hidden"]


async def resolve(
    page: Page,
    registry: SiteRegistry,
    element: str,
    *,
    timeout_ms: float,
    state: WaitState = "visible",
    context: dict[str, dict[str, Any]] | None = None,
) -> Resolved:
    """Wait until some candidate of `element` is in `state`; return the first that is.

    The primary is looked at once first (nearly always it is showing). Otherwise one combined
    wait (`or_`) instead of polling each candidate: a fallback that is present right away is
    found without first waiting out the primary's timeout.
    """
    candidates = [c.render(context or {}) for c in registry.candidates(element)]
    locators = [candidate.locator(page) for candidate in candidates]
    # One look settles it: no wait set up in the page, no second look for which candidate.
    with contextlib.suppress(PlaywrightError):
        if state in ("visible", "attached") and await _in_state(locators[0].first, state):
            return _resolved(element, candidates, locators, 0)
    tried = ", ".join(c.describe() for c in candidates)
    try:
        await wait_any(combined(candidates, locators), state, timeout_ms)
    except PlaywrightTimeoutError as exc:
        raise StepError(
            FailureCode.selector_not_found,
            f"element {element!r} not {state} within {timeout_ms / 1000:g}s; tried {tried}",
        ) from exc
    except PlaywrightError as exc:
        if "while parsing" in exc.message:
            # A registry typo, not a changed site: say where it is written.
            why = exc.message.splitlines()[0].split(": ", 1)[-1]
            raise StepError(
                FailureCode.script_error,
                f"selector registry {registry.site}.yaml, element {element!r}: a candidate is "
                f"not a valid selector ({why}); candidates: {tried}",
            ) from exc
        raise
    if len(candidates) == 1:
        return _resolved(element, candidates, locators, 0)  # the wait says which it was
    # The page may change between the combined wait and the per-candidate checks (a script
    # re-rendering the form), so look a few times before giving up.
    for _ in range(3):
        for index, locator in enumerate(locators):
            try:
                if await _in_state(locator.first, state):
                    return _resolved(element, candidates, locators, index)
            except PlaywrightError:
                continue
        await asyncio.sleep(0)
    raise StepError(FailureCode.selector_not_found, f"element {element!r} vanished; tried {tried}")


def _resolved(
    element: str, candidates: list[Candidate], locators: list[Locator], index: int
) -> Resolved:
    matched = MatchedSelector(element=element, candidate=candidates[index].describe(), index=index)
    return Resolved(locator=locators[index].first, matched=matched)


def combined(candidates: list[Candidate], locators: list[Locator]) -> list[Locator]:
    """One `or_` locator per document the candidates live in (the page first, then each
    frame): Playwright only combines locators of the same frame."""
    groups: dict[str | None, Locator] = {}
    for candidate, locator in zip(candidates, locators, strict=True):
        key = candidate.frame
        groups[key] = groups[key].or_(locator) if key in groups else locator
    return [groups[key] for key in sorted(groups, key=lambda k: (k is not None, k or ""))]


async def wait_any(locators: list[Locator], state: WaitState, timeout_ms: float) -> None:
    """Return once the first element of any of `locators` is in `state`; raise Playwright's
    TimeoutError when none is within `timeout_ms`."""
    if len(locators) == 1:
        await locators[0].first.wait_for(state=state, timeout=timeout_ms)
        return
    waits = [
        asyncio.ensure_future(locator.first.wait_for(state=state, timeout=timeout_ms))
        for locator in locators
    ]
    try:
        pending: set[asyncio.Future[None]] = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            errors = [task.exception() for task in done]  # retrieve every one: none is lost
            if any(error is None for error in errors):
                return
        # None matched (each timed out, most likely): raise the page's own error.
        error = waits[0].exception()
        assert error is not None
        raise error
    finally:
        for task in waits:
            task.cancel()


async def _in_state(locator: Locator, state: WaitState) -> bool:
    if state == "visible":
        return await locator.is_visible()
    if state == "hidden":
        return await locator.is_hidden()
    count = await locator.count()
    return count > 0 if state == "attached" else count == 0
