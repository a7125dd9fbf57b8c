"""The scripted-form-action DSL: YAML files under `scripts/<site>/<name>.yaml`.

A script declares typed inputs, the secrets it needs (by name), and steps. Each step has an id
and exactly one action key (`goto`, `fill`, `click`, …); any step may add an `expect:`
postcondition. `use: site/flow` inlines another script (a sub-flow such as a login) whose step
ids are prefixed with the using step's id.

Loading checks everything that can be checked without a browser, so a broken script fails at
load time naming the file, line, step and field — never half-way through a customer's refund.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Context, Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from worker.contract import SCRIPT_REF, FailureCode, TraceMode
from worker.errors import InputInvalid, ScriptInvalid, ScriptNotFound
from worker.policy import Rule
from worker.selectors import SiteRegistry, WaitState, load_registry
from worker.templating import (
    Reference,
    TemplateError,
    condition_comparisons,
    condition_references,
    references,
    render,
    sole_reference,
)
from worker.uploads import UploadRefused, relative_upload, upload_path
from worker.yamlfile import (
    At,
    closest,
    describe_loc,
    did_you_mean,
    line_of,
    load_model,
    read_yaml,
)

# How long a paused job waits for a decision, unless its script or job says otherwise.
PAUSE_TIMEOUT_S = 24 * 3600
STEP_ID = r"^[a-z][a-z0-9_]*$"


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


def _page_pattern(value: str) -> str:
    """A pattern over the page's text (`matches:`, an extract's `pattern:`, a dialog's
    `message:`) is a regular expression, never rendered: a `{{ inputs.x }}` in it was looked
    for as written, and the expectation failed, the extract found nothing, on every job."""
    if "{{" in value:
        raise ValueError(
            f"{value!r} is a regular expression, not a template: '{{{{' is looked for as "
            "written (compare with a value by 'contains:' or 'equals:', which are templates; "
            "a brace in a pattern is written \\{)"
        )
    return _regex(value)


# Checked when the script loads: a bad pattern must not first show itself after a commit.
Regex = Annotated[str, AfterValidator(_page_pattern)]


def _url_pattern(value: str) -> str:
    """A URL pattern is a regular expression, never rendered: a `{{ inputs.x }}` in it was
    looked for as written, in no address a site ever gives, and every job waited out the step
    and was handed to a person."""
    if "{{" in value:
        raise ValueError(
            f"{value!r} is a regular expression searched in the page's URL, not a template: "
            "'{{' is looked for as written and never matches; match the part that does not "
            "vary (like '/accounts/AC-[0-9]+$')"
        )
    return _regex(value)


UrlPattern = Annotated[str, AfterValidator(_url_pattern)]
TargetName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------- inputs


class InputType(StrEnum):
    string = "string"
    decimal = "decimal"
    int = "int"
    bool = "bool"
    enum = "enum"


def _places(value: Decimal) -> int:
    """Digits after the point, trailing zeros aside (as pydantic's `decimal_places` counts)."""
    exponent = value.normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _plain_decimal(value: Any) -> Any:
    """Refuse a decimal written in exponent notation (`1e2`): typed into a form it would be
    `100`, a value nobody wrote, from what is more likely a mangled reference or a
    spreadsheet's rendering than an amount. A JSON number (15, 0.1) is its sender's
    serializer's text, and is taken; non-finite values are refused by `allow_inf_nan`."""
    if isinstance(value, str) and _EXPONENT.match(value):
        raise ValueError(
            "a decimal is written in plain digits (like 100 or 0.05), not in exponent notation"
        )
    return value


def _no_separator(value: Any) -> Any:
    """Refuse a number written with `_` (`1_5`): Python's parsers read it as 15, a value nobody
    wrote — more likely a typo or a mangled reference than digit grouping, and a person's
    `retry_with_inputs` of "1_5" issued a credit of 15."""
    if isinstance(value, str) and "_" in value:
        raise ValueError("a number is written in plain digits, without '_'")
    return value


def _ascii_digits(value: Any) -> Any:
    """Refuse a number written with other digits (Arabic-Indic, fullwidth): Python's Decimal
    reads them as ASCII ones, and the form would be typed `15`, a text nobody sent, to a site
    that never expected the characters that were."""
    if isinstance(value, str):
        for index, char in enumerate(value):
            if not char.isascii() and not char.isspace():
                raise ValueError(
                    f"a number is written in ASCII digits (0-9): {char!r} "
                    f"(U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}) at position "
                    f"{index} is not one"
                )
    return value


_EXPONENT = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)e[+-]?\d+\s*$", re.IGNORECASE)


def _positional(value: Decimal) -> Decimal:
    """Positional digits for a value that came as a number with an exponent (a JSON number
    like 1e21 is a float, then `Decimal('1E+21')`): the value is typed into a form, and sites
    refuse exponent notation (blaming the customer). Values below 1E-6 still print as
    exponents; `render` formats them. Negative zero (`-0`, JSON's `-0.0`) is zero: typed as
    written it is a minus sign that a form refuses, or a site keeps as a negative amount."""
    if value.is_zero():
        value = abs(value)
    return Decimal(format(value, "f"))


def _to_places(places: int) -> Any:
    """Drop the trailing zeros past `places` from a value (`15.000` with `places: 2` is
    `15.00`): `places` counts digits that matter, as pydantic's `decimal_places` does, but the
    value is typed into the form as written, and a site that takes cents refuses `15.000`
    after the form is filled, asking the customer about a value that was right."""

    def quantize(value: Decimal) -> Decimal:
        _, digits, exponent = value.as_tuple()
        if isinstance(exponent, int) and exponent < -places:
            # Only zeros go (`decimal_places` held), so the result has fewer digits than the
            # value: a precision that holds the value holds it (the default 28 may not).
            exact = Context(prec=max(len(digits), 28))
            return value.quantize(Decimal(1).scaleb(-places), context=exact)
        return value

    return quantize


# C0 controls and DEL, but tab and line breaks: no form value means them. A NUL reached the
# site as U+FFFD (the job said it succeeded, the site kept another text); the others are
# corruption or terminal escapes, which the site would store and show to its own staff.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _no_control(value: str) -> str:
    found = _CONTROL.search(value)
    if found is not None:
        # The character and where, never the value: the input may be a secret.
        raise ValueError(
            f"holds a control character (U+{ord(found.group()):04X} at position "
            f"{found.start()}) that a form field cannot take"
        )
    return value


def _once(values: list[str], loc: tuple[int | str, ...]) -> None:
    """At naming the second of two equal entries of a list: a copy whose edit was forgotten
    (the entry meant is missing), as in a selector registry."""
    for index, value in enumerate(values):
        if value in values[:index]:
            raise At((*loc, index), f"{value!r} is already listed ([{values.index(value)}])")


class InputSpec(_Strict):
    """One typed input of a script."""

    type: InputType = InputType.string
    description: str | None = None
    required: bool = True
    default: str | int | bool | Decimal | None = None
    pattern: str | None = None
    min_length: int | None = Field(default=None, ge=0)
    max_length: int | None = Field(default=None, ge=0)
    min: Annotated[
        Decimal | None, BeforeValidator(_plain_decimal), BeforeValidator(_ascii_digits)
    ] = None
    max: Annotated[
        Decimal | None, BeforeValidator(_plain_decimal), BeforeValidator(_ascii_digits)
    ] = None
    # Strict: YAML's `places: true` would otherwise be 1. Beyond 28 places a Decimal is not
    # exact anyway (its default precision).
    places: int | None = Field(
        default=None,
        ge=0,
        le=28,
        strict=True,
        description="The most digits a decimal may have after its point.",
    )
    values: list[str] | None = Field(default=None, description="The choices of an enum input.")
    secret: bool = Field(default=False, description="Masked in screenshots, reports and logs.")

    def comparable_with(self, literal: Any) -> str | None:
        """Why a condition comparing this input with `literal` is wrong whatever the job's
        value, or None. A type that cannot be compared makes the condition unjudgeable (every
        job waits for approval); an enum value that is not one of its values never matches."""
        if literal is None:  # an optional input left out
            return None
        numeric = isinstance(literal, int | float) and not isinstance(literal, bool)
        fits = {
            InputType.string: isinstance(literal, str),
            InputType.enum: isinstance(literal, str),
            InputType.decimal: numeric,
            InputType.int: numeric,
            InputType.bool: isinstance(literal, bool),
        }[self.type]
        if not fits:
            return (
                f"a {self.type} input never holds a value of type {type(literal).__name__}, so "
                "this comparison is wrong for every job (one that orders them cannot be judged, "
                "and every job waits for approval)"
            )
        if self.type == InputType.enum and self.values and literal not in self.values:
            return f"it is not one of the enum's values ({', '.join(map(repr, self.values))})"
        return None

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if self.type == InputType.enum and not self.values:
            raise ValueError("an enum input needs 'values'")
        if self.values and self.type != InputType.enum:
            raise ValueError("'values' only goes with type 'enum'")
        _once(self.values or [], ("values",))
        if (self.min is not None or self.max is not None) and self.type not in (
            InputType.decimal,
            InputType.int,
        ):
            raise ValueError("'min'/'max' only go with type 'decimal' or 'int'")
        if self.places is not None and self.type != InputType.decimal:
            raise ValueError("'places' only goes with type 'decimal'")
        for bound in ("min", "max"):
            value = getattr(self, bound)
            if self.places is not None and value is not None and _places(value) > self.places:
                # No value of this input could be that bound: a `min` of 0.001 with `places: 2`
                # is really 0.01, and the script says otherwise.
                raise At(
                    (bound,),
                    f"{bound!r} ({value}) has more decimal places than 'places' allows"
                    f" ({self.places})",
                )
        if (self.min_length is not None or self.max_length is not None) and (
            self.type != InputType.string
        ):
            raise ValueError("'min_length'/'max_length' only go with type 'string'")
        # Checked here: the input model is only built when a job runs, too late to say where.
        for low, high in (("min", "max"), ("min_length", "max_length")):
            bottom, top = getattr(self, low), getattr(self, high)
            if bottom is not None and top is not None and bottom > top:
                raise At((high,), f"{low!r} ({bottom}) is more than {high!r} ({top})")
        if self.pattern is not None:
            if self.type != InputType.string:
                raise ValueError("'pattern' only goes with type 'string'")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"'pattern' is not a valid regular expression: {exc}") from exc
        if self.default is not None:
            # Defaults are not validated when the input model is built: an unchecked one
            # would be typed into the site as written (`maybe`, `abc`) on every job.
            self.typed_default()
        return self

    def typed_default(self) -> Any:
        """The default as a value of the input's type, or At naming `default`."""
        value = self.default
        if isinstance(value, bool) and self.type != InputType.bool:
            # Pydantic would take `true` for 1; no author means that.
            raise At(("default",), f"{value!r} is not a valid {self.type} default")
        try:
            return TypeAdapter(self.annotation()).validate_python(value)
        except ValidationError as exc:
            why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise At(("default",), f"{value!r} is not a valid {self.type} default: {why}") from exc

    def annotation(self) -> Any:
        if self.type == InputType.string:
            return Annotated[
                str,
                StringConstraints(
                    pattern=self.pattern, min_length=self.min_length, max_length=self.max_length
                ),
                AfterValidator(_no_control),
            ]
        if self.type == InputType.decimal:
            return Annotated[
                Decimal,
                # `places` is checked here, at intake: a site that takes cents refuses 15.005
                # only after the form is filled, and then the job asks the customer.
                Field(ge=self.min, le=self.max, allow_inf_nan=False, decimal_places=self.places),
                BeforeValidator(_plain_decimal),
                BeforeValidator(_no_separator),
                BeforeValidator(_ascii_digits),
                AfterValidator(_positional),
                *([] if self.places is None else [AfterValidator(_to_places(self.places))]),
            ]
        if self.type == InputType.int:
            return Annotated[
                int,
                Field(ge=self.min, le=self.max),
                BeforeValidator(_no_separator),
                BeforeValidator(_ascii_digits),
            ]
        if self.type == InputType.bool:
            return bool
        assert self.values is not None
        return Literal[tuple(self.values)]


# ---------------------------------------------------------------- postconditions


class TextExpectation(_Strict):
    target: TargetName
    equals: str | None = None
    contains: str | None = None
    matches: Regex | None = None

    @model_validator(mode="after")
    def _one(self) -> TextExpectation:
        if sum(v is not None for v in (self.equals, self.contains, self.matches)) != 1:
            raise ValueError("give exactly one of 'equals', 'contains', 'matches'")
        return self


class Expectation(_Strict):
    """What must hold after a step (or, as an `expect` step, right now)."""

    visible: TargetName | None = None
    hidden: TargetName | None = None
    text: TextExpectation | None = None
    url: UrlPattern | None = Field(
        default=None, description="A regular expression searched in the URL."
    )

    @model_validator(mode="after")
    def _one(self) -> Expectation:
        given = [k for k in ("visible", "hidden", "text", "url") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of visible, hidden, text, url (got {given})")
        return self

    def targets(self) -> list[str]:
        names = [self.visible, self.hidden, self.text.target if self.text else None]
        return [n for n in names if n]

    def templates(self) -> list[str]:
        if self.text is None:
            return []
        return [t for t in (self.text.equals, self.text.contains) if t is not None]


# ---------------------------------------------------------------- steps


class Approval(_Strict):
    """A person approves a commit step before it is sent: always, or when `when` holds."""

    when: str | None = Field(
        default=None,
        description="A condition over the inputs, e.g. 'inputs.amount > 100'; "
        "absent: every job needs approval.",
    )
    role: str = Field(
        default="operator",
        pattern=r"^[a-z0-9_-]+$",
        description="Who may approve (the orchestrator routes the request to that role).",
    )
    risk: str | None = Field(
        default=None,
        max_length=500,
        description="Why this needs a person, as shown in the approval request.",
    )

    @field_validator("when")
    @classmethod
    def _condition(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                condition_references(value)
            except TemplateError as exc:
                raise ValueError(str(exc)) from exc
        return value


class DialogSpec(_Strict):
    """How a step answers the JavaScript dialog (alert, confirm, prompt) its action opens."""

    action: Literal["accept", "dismiss"]
    message: str | None = Field(
        default=None,
        description="A regular expression the dialog's message must match to be answered as "
        "declared; any other dialog is unexpected (dismissed, and the step fails).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"action": data} if isinstance(data, str) else data

    @field_validator("message")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        return None if value is None else _page_pattern(value)


class _Step(_Strict):
    action: str  # each concrete step narrows this to a Literal with its default
    id: str = Field(pattern=STEP_ID)
    description: str | None = None
    expect: Expectation | None = None
    timeout_ms: int | None = Field(default=None, gt=0, le=600_000)
    commit: bool = Field(
        default=False,
        description="Side-effecting (submit, pay, confirm): never retried blindly; after an "
        "unconfirmed send the script's verify_effect probe decides.",
    )
    retry_from: str | None = Field(
        default=None,
        description="For a commit step the probe found not applied: the earlier step to redo "
        "the form from.",
    )
    alternate: str | None = Field(
        default=None, description="An alternate path to take when an element is not found."
    )
    approval: Approval | None = Field(
        default=None,
        description="For a commit step: a person approves the filled form before it is sent.",
    )
    on_failure: dict[FailureCode, Rule] = Field(default_factory=dict)
    dialog: DialogSpec | None = Field(
        default=None,
        description="For a click or key press that opens a JavaScript dialog: accept or dismiss "
        "it. Without it, a dialog is unexpected: dismissed, recorded, and the step fails.",
    )

    def targets(self) -> list[str]:
        """Logical elements this step acts on (for load-time checks)."""
        return []

    def templates(self) -> list[str]:
        """Templated strings of this step, in the order they are rendered."""
        return []

    def acted_target(self) -> str | None:
        targets = self.targets()
        return targets[0] if targets else None


class GotoStep(_Step):
    goto: str = Field(description="A path on the site (joined to its base URL) or a full URL.")
    action: Literal["goto"] = "goto"

    def templates(self) -> list[str]:
        return [self.goto]


class FillSpec(_Strict):
    target: TargetName
    value: str


class FillStep(_Step):
    fill: FillSpec
    action: Literal["fill"] = "fill"

    def targets(self) -> list[str]:
        return [self.fill.target]

    def templates(self) -> list[str]:
        return [self.fill.value]


class SelectSpec(_Strict):
    target: TargetName
    value: str | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _one(self) -> SelectSpec:
        if (self.value is None) == (self.label is None):
            raise ValueError("give exactly one of 'value', 'label'")
        return self


class SelectStep(_Step):
    select: SelectSpec
    action: Literal["select"] = "select"

    def targets(self) -> list[str]:
        return [self.select.target]

    def templates(self) -> list[str]:
        return [t for t in (self.select.value, self.select.label) if t is not None]


class CheckSpec(_Strict):
    target: TargetName
    checked: bool = True


class CheckStep(_Step):
    check: CheckSpec
    action: Literal["check"] = "check"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `check: terms.accept` is short for `check: {target: terms.accept}`.
        if isinstance(data, dict) and isinstance(data.get("check"), str):
            return {**data, "check": {"target": data["check"]}}
        return data

    def targets(self) -> list[str]:
        return [self.check.target]


class ClickStep(_Step):
    click: TargetName
    action: Literal["click"] = "click"

    def targets(self) -> list[str]:
        return [self.click]


class UploadSpec(_Strict):
    target: TargetName = Field(description="The file input (`input type=file`).")
    file: str = Field(
        description="A path relative to the worker's uploads directory (FORMWORK_UPLOADS_DIR), "
        "usually from an input: '{{ inputs.receipt }}'. Nothing outside it can be sent."
    )

    @field_validator("file")
    @classmethod
    def _relative(cls, value: str) -> str:
        # A literal path is checked now; a templated one when it is rendered (worker/uploads.py).
        if "{{" not in value:
            try:
                relative_upload(value)
            except UploadRefused as exc:
                raise ValueError(str(exc)) from exc
        return value


class UploadStep(_Step):
    """Choose a file for a file input, from the uploads directory only."""

    upload: UploadSpec
    action: Literal["upload"] = "upload"

    def targets(self) -> list[str]:
        return [self.upload.target]

    def templates(self) -> list[str]:
        return [self.upload.file]


class PressSpec(_Strict):
    key: str
    target: TargetName | None = None


class PressStep(_Step):
    press: PressSpec
    action: Literal["press"] = "press"

    def targets(self) -> list[str]:
        return [self.press.target] if self.press.target else []


class WaitSpec(_Strict):
    target: TargetName | None = None
    state: WaitState = "visible"
    # Checked here: it becomes an expectation only when the step runs, after the sign-in.
    url: UrlPattern | None = None

    @model_validator(mode="after")
    def _one(self) -> WaitSpec:
        if (self.target is None) == (self.url is None):
            raise ValueError("give exactly one of 'target', 'url'")
        return self


class WaitForStep(_Step):
    wait_for: WaitSpec
    action: Literal["wait_for"] = "wait_for"

    def targets(self) -> list[str]:
        return [self.wait_for.target] if self.wait_for.target else []


class ExpectStep(_Step):
    """A step that only asserts: `{id: on_account, expect: {visible: account.header}}`."""

    expect: Expectation
    action: Literal["expect"] = "expect"

    def targets(self) -> list[str]:
        return self.expect.targets()


def _one_group(value: str) -> str:
    """An extract keeps one value: a pattern's only group, or its whole match. With more groups
    it would keep the first and drop the rest without a word."""
    groups = re.compile(value).groups
    if groups > 1:
        raise ValueError(
            f"has {groups} groups, and an output keeps one: make the others non-capturing (?:...)"
        )
    return value


class ExtractSpec(_Strict):
    target: TargetName
    attribute: str | None = None
    pattern: Annotated[Regex, AfterValidator(_one_group)] | None = Field(
        default=None,
        description="A regular expression; its group (at most one), else its match, is kept.",
    )


def _extract_shorthand(data: Any) -> Any:
    """`extract: {confirmation_number: credit.confirmation_number}` names the target only."""
    if isinstance(data, dict) and isinstance(data.get("extract"), dict):
        specs = {
            name: {"target": spec} if isinstance(spec, str) else spec
            for name, spec in data["extract"].items()
        }
        return {**data, "extract": specs}
    return data


class ExtractStep(_Step):
    extract: dict[Annotated[str, StringConstraints(pattern=STEP_ID)], ExtractSpec]
    action: Literal["extract"] = "extract"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _extract_shorthand(data)

    @field_validator("extract")
    @classmethod
    def _some_output(cls, value: dict[str, ExtractSpec]) -> dict[str, ExtractSpec]:
        if not value:
            raise ValueError("names no output: give at least one `name: element`")
        return value

    def targets(self) -> list[str]:
        return [spec.target for spec in self.extract.values()]


class ScreenshotSpec(_Strict):
    full_page: bool = True


class ScreenshotStep(_Step):
    screenshot: ScreenshotSpec = Field(default_factory=ScreenshotSpec)
    action: Literal["screenshot"] = "screenshot"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("screenshot") is None:
            return {**data, "screenshot": {}}
        return data


class UseStep(_Step):
    use: str = Field(pattern=SCRIPT_REF.pattern)
    with_: dict[str, str] = Field(default_factory=dict, alias="with")
    action: Literal["use"] = "use"

    def templates(self) -> list[str]:
        return list(self.with_.values())


def _looks_for_an_element(step: _Step) -> bool:
    """Whether the step's own action waits for an element, so that it can fail with
    selector_not_found (an expect step's miss is expectation_failed, as a postcondition's)."""
    return not isinstance(step, ExpectStep) and bool(step.targets())


ACTIONS = (
    "goto",
    "fill",
    "select",
    "check",
    "click",
    "press",
    "upload",
    "wait_for",
    "extract",
    "screenshot",
    "use",
)


def _action_of(data: Any) -> str | None:
    if isinstance(data, BaseModel):
        return str(getattr(data, "action", None))
    if not isinstance(data, dict):
        return None
    present = [key for key in ACTIONS if key in data]
    if len(present) == 1:
        return present[0]
    if not present and "expect" in data:
        return "expect"
    return None


def _one_action(data: Any) -> Any:
    """Say what is wrong with a step that has no action, or several, by name: the union
    alone can only list the actions there are."""
    if not isinstance(data, dict) or _action_of(data) is not None:
        return data
    present = [key for key in ACTIONS if key in data]
    if present:
        raise ValueError(f"a step has exactly one action; this one has {' and '.join(present)}")
    known = {*_Step.model_fields, *ACTIONS, "expect", "action"}
    actions = (*ACTIONS, "expect")
    unknown = [str(key) for key in data if key not in known]
    hints = [f"{key!r} is not an action" + did_you_mean(key, actions) for key in unknown]
    raise ValueError(
        "a step needs exactly one action: "
        + ", ".join(actions)
        + (f"; {'; '.join(hints)}" if hints else "")
    )


Step = Annotated[
    Annotated[GotoStep, Tag("goto")]
    | Annotated[FillStep, Tag("fill")]
    | Annotated[SelectStep, Tag("select")]
    | Annotated[CheckStep, Tag("check")]
    | Annotated[ClickStep, Tag("click")]
    | Annotated[PressStep, Tag("press")]
    | Annotated[UploadStep, Tag("upload")]
    | Annotated[WaitForStep, Tag("wait_for")]
    | Annotated[ExpectStep, Tag("expect")]
    | Annotated[ExtractStep, Tag("extract")]
    | Annotated[ScreenshotStep, Tag("screenshot")]
    | Annotated[UseStep, Tag("use")],
    Discriminator(
        _action_of,
        custom_error_type="unknown_action",
        custom_error_message=(
            "a step needs exactly one action: " + ", ".join((*ACTIONS, "expect"))
        ),
    ),
    BeforeValidator(_one_action),
]


class VerifyEffect(_Strict):
    """The probe run when a commit step's outcome is unknown: did the effect happen?

    `steps` bring the page where the effect would show; then `present` is checked once:
    it holds → the effect happened; it does not → it did not; the steps themselves failing →
    inconclusive (a person decides). Extract steps among them recover the outputs.
    """

    steps: list[Step] = Field(default_factory=list)
    present: Expectation | None = None
    extract: dict[Annotated[str, StringConstraints(pattern=STEP_ID)], ExtractSpec] = Field(
        default_factory=dict,
        description="Outputs read off the probe's page once the effect is found (e.g. the "
        "confirmation number the lost response would have shown).",
    )
    # A reason, not a formality: an empty one would pass review unread.
    opt_out: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | None = Field(
        default=None, description="Why this script's commit steps need no probe."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _extract_shorthand(data)

    @field_validator("opt_out", mode="before")
    @classmethod
    def _a_reason(cls, value: Any) -> Any:
        # pydantic's own words for "  " were "should have at least 1 character": it has two.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is blank: say why the commit steps need no probe")
        return value

    @model_validator(mode="after")
    def _probe_or_opt_out(self) -> VerifyEffect:
        if self.opt_out is None and (not self.steps or self.present is None):
            raise ValueError("give 'steps' and 'present', or 'opt_out: <reason>'")
        if self.opt_out is not None and (self.steps or self.present is not None):
            raise ValueError("'opt_out' goes alone")
        for index, step in enumerate(self.steps):
            if step.id == "recover" and self.extract:
                # Its report would be `<commit>.verify.recover`, the name the extract's is.
                raise At(
                    ("steps", index, "id"),
                    "'recover' is the name of verify_effect's extract in step reports "
                    "(<step>.verify.recover): call this step something else",
                )
        return self


class Script(_Strict):
    """One YAML script file."""

    name: str = Field(pattern=r"^[a-z0-9_]+/[a-z0-9_]+$")
    version: StrictInt = Field(ge=1)
    site: str = Field(pattern=r"^[a-z0-9_]+$")
    description: str | None = None
    inputs: dict[Annotated[str, StringConstraints(pattern=STEP_ID)], InputSpec] = Field(
        default_factory=dict
    )
    secrets: list[Annotated[str, StringConstraints(pattern=STEP_ID)]] = Field(default_factory=list)
    timeout_ms: int = Field(default=10_000, gt=0, le=600_000)
    pause_timeout_s: int = Field(
        default=PAUSE_TIMEOUT_S,
        gt=0,
        le=30 * 24 * 3600,
        description="How long a paused job waits for a decision before it ends `expired`.",
    )
    steps: list[Step] = Field(min_length=1)
    on_failure: dict[FailureCode, Rule] = Field(default_factory=dict)
    alternates: dict[Annotated[str, StringConstraints(pattern=STEP_ID)], list[Step]] = Field(
        default_factory=dict
    )
    verify_effect: VerifyEffect | None = None
    har: bool = Field(
        default=False,
        description="Record every job's network traffic as a scrubbed HAR (jobs may override).",
    )
    dynamic: list[str] = Field(
        default_factory=list,
        description="Elements whose content differs on every run (dates, generated numbers): "
        "replay masks their screen regions and compares their outputs by pattern only. Each "
        "needs a css candidate in the registry.",
    )
    effect: str | None = Field(
        default=None,
        description="What the script does, as told to a customer once verified: "
        "'credit of {{ inputs.amount }} issued, confirmation {{ outputs.confirmation_number }}'.",
    )
    redact: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        default_factory=list,
        description="CSS selectors of regions blurred in every screenshot and trace frame "
        "(customer data the evidence does not need), on top of the masked secret fields.",
    )
    trace: TraceMode = Field(
        default=TraceMode.off, description="Keep a Playwright trace: off, on_failure, always."
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> Script:
        if not self.name.startswith(f"{self.site}/"):
            raise At(("name",), f"name {self.name!r} must start with its site '{self.site}/'")
        for listed in ("secrets", "dynamic", "redact"):
            _once(getattr(self, listed), (listed,))
        seen: set[str] = set()
        for index, step in enumerate(self.steps):
            at = ("steps", index)
            if step.id in seen:
                raise At(at, f"step id {step.id!r} is used twice")
            seen.add(step.id)
            # Said at the field itself: the location already names the step.
            if step.retry_from is not None and step.retry_from not in seen:
                raise At((*at, "retry_from"), f"{step.retry_from!r} is not an earlier step")
            if step.retry_from is not None and not step.commit:
                raise At((*at, "retry_from"), "only goes with commit: true")
            if step.approval is not None and not step.commit:
                raise At((*at, "approval"), "only goes with commit: true")
            if step.dialog is not None and step.action not in ("click", "press"):
                raise At((*at, "dialog"), "only goes with click or press")
            if step.approval is not None and step.approval.when is not None:
                when = (*at, "approval", "when")
                for ref in condition_references(step.approval.when):
                    if ref.name not in self.inputs:
                        raise At(when, f"uses 'inputs.{ref.name}', which is not a declared input")
                for comparison in condition_comparisons(step.approval.when):
                    spec = self.inputs[comparison.name]
                    for literal in comparison.literals:
                        problem = spec.comparable_with(literal)
                        if problem is not None:
                            raise At(
                                when,
                                f"compares 'inputs.{comparison.name}' with {literal!r}: {problem}",
                            )
            if step.alternate is not None and step.alternate not in self.alternates:
                raise At((*at, "alternate"), f"no alternate path {step.alternate!r}")
            if step.alternate is not None and not _looks_for_an_element(step):
                # The shorthand is the rule for selector_not_found, which such a step never
                # fails with: its path was loaded, counted as named, and never taken.
                raise At(
                    (*at, "alternate"),
                    f"is taken when the element a step acts on is not found, and a "
                    f"{step.action} step acts on none (a postcondition that fails is "
                    "expectation_failed): name the path in a rule for the code it fails with, "
                    f"`on_failure: {{expectation_failed: {{action: alternate, alternate: "
                    f"{step.alternate}}}}}`",
                )
            for code, rule in step.on_failure.items():
                if rule.alternate is not None and rule.alternate not in self.alternates:
                    raise At(
                        (*at, "on_failure", code.value), f"no alternate path {rule.alternate!r}"
                    )
        for code, rule in self.on_failure.items():
            if rule.alternate is not None and rule.alternate not in self.alternates:
                raise At(("on_failure", code.value), f"no alternate path {rule.alternate!r}")
        # A detour's steps are reported as `<step>.<path>.<id>`: two of one id would be two
        # entries of one name in the report, and a lookup by id finds the first.
        detours = {("alternates", name): path for name, path in self.alternates.items()}
        if self.verify_effect is not None:
            detours[("verify_effect", "steps")] = self.verify_effect.steps
        for section, steps in detours.items():
            first: dict[str, int] = {}
            for index, step in enumerate(steps):
                if step.id in first:
                    raise At(
                        (*section, index),
                        f"step id {step.id!r} is used twice (first at [{first[step.id]}])",
                    )
                first[step.id] = index
        return self


# ---------------------------------------------------------------- the loaded plan


# Where verify_effect's `extract` is written: the probe step made of it has this `loc`.
RECOVER_LOC: tuple[int | str, ...] = ("verify_effect", "extract")


@dataclass(frozen=True, eq=False)
class Frame:
    """The namespace a step runs in: the top script, or a sub-flow called by a `use` step."""

    script: Script
    path: Path
    bindings: dict[str, str] = field(default_factory=dict)  # sub-flow input -> parent template
    parent: Frame | None = None
    prefix: str = ""  # its steps' plan ids start with it: `login.` for the flow step `login` uses


@dataclass(frozen=True)
class PlannedStep:
    id: str  # qualified: `login.password` for step `password` of the flow used by step `login`
    step: _Step
    frame: Frame
    loc: tuple[int | str, ...] = ()  # where in frame.path it is written: ("steps", 3)

    @property
    def action(self) -> str:
        return str(self.step.action)


@dataclass(frozen=True)
class LoadedScript:
    """A validated script, its sub-flows and site registry, flattened into executable steps."""

    script: Script
    path: Path
    registry: SiteRegistry
    plan: list[PlannedStep]
    digest: str
    # By qualified name: the script's own as written (`form_by_url`), a sub-flow's under its
    # steps' prefix (`login.by_url` for path `by_url` of the flow step `login` uses).
    alternates: dict[str, list[PlannedStep]] = field(default_factory=dict)
    probe: list[PlannedStep] = field(default_factory=list)  # verify_effect's steps
    relogin: list[PlannedStep] = field(default_factory=list)  # the site's login flow

    @property
    def name(self) -> str:
        return self.script.name

    @property
    def probe_reach(self) -> list[PlannedStep]:
        """The probe's own steps, which bring the page where the effect would show."""
        return [p for p in self.probe if p.loc != RECOVER_LOC]

    @property
    def probe_recover(self) -> list[PlannedStep]:
        """verify_effect's `extract`, run once `present` holds. Told apart by where it is
        written, not by its id: a probe step may be called `recover` too."""
        return [p for p in self.probe if p.loc == RECOVER_LOC]

    def index_of(self, step_id: str) -> int:
        return next(i for i, planned in enumerate(self.plan) if planned.id == step_id)

    def retry_start(self, commit: PlannedStep) -> int:
        """The plan index a commit step whose effect is absent is redone from: its `retry_from`
        (else itself), a step of the flow it is written in. Plan ids are qualified
        (`submit.open` for step `open` of the flow used by step `submit`), and a `use` step is
        redone from its sub-flow's first step: it has no plan entry of its own."""
        prefix = commit.id.removesuffix(commit.step.id)
        target = prefix + (commit.step.retry_from or commit.step.id)
        return next(
            i
            for i, planned in enumerate(self.plan)
            if planned.id == target or planned.id.startswith(f"{target}.")
        )

    def alternate_key(self, planned: PlannedStep, code: FailureCode, name: str) -> str:
        """The key in `alternates` of path `name`, named by the rule for `code` of `planned`:
        a rule written in the step's own flow (the step's `alternate:` or `on_failure:`, its
        flow's `on_failure:`) takes that flow's path; the job script's and the registry's
        rules take the job script's."""
        step, flow = planned.step, planned.frame.script
        upper = (self.script.on_failure, self.registry.on_failure)
        if code in step.on_failure or code in flow.on_failure or not any(code in r for r in upper):
            return planned.frame.prefix + name
        return name

    def secret_names(self) -> set[str]:
        """The secrets the job's own steps may use: its plan, its probe, its alternates."""
        own = [*self.plan, *self.probe, *(p for path in self.alternates.values() for p in path)]
        return {name for planned in own for name in planned.frame.script.secrets}

    def relogin_secret_names(self) -> set[str]:
        """The secrets of the site's login flow, run to sign in again."""
        return {name for planned in self.relogin for name in planned.frame.script.secrets}

    def validate_inputs(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Typed inputs, or InputInvalid naming every bad field."""
        return validate_inputs(self.script, raw)

    def output_names(self) -> list[str]:
        """Every output the job may extract, in order: its plan, its alternates, its probe."""
        own = [*self.plan, *(p for path in self.alternates.values() for p in path), *self.probe]
        names = [
            name
            for planned in own
            if isinstance(planned.step, ExtractStep)
            for name in planned.step.extract
        ]
        if self.script.verify_effect is not None:
            names += self.script.verify_effect.extract
        return list(dict.fromkeys(names))

    def output_specs(self) -> dict[str, list[ExtractSpec]]:
        """How each output is extracted, by name: every extraction of it (its plan, its
        alternates, its probe)."""
        own = [*self.plan, *(p for path in self.alternates.values() for p in path), *self.probe]
        specs: dict[str, list[ExtractSpec]] = {}
        for planned in own:
            if isinstance(planned.step, ExtractStep):
                for name, spec in planned.step.extract.items():
                    specs.setdefault(name, []).append(spec)
        return specs

    def refused_outputs(self, given: dict[str, str]) -> str | None:
        """Why outputs a person supplies (skip_step, mark_done) are refused, or None: each
        must be one the script extracts, or the job would claim a value nothing reads; and a
        value its extraction could give, or the orchestrator would be told one the site
        never shows (a confirmation number without its `CN-`)."""
        ref = f"{self.name}@{self.script.version}"
        unknown = sorted(set(given) - set(self.output_names()))
        if unknown:
            known = ", ".join(self.output_names()) or "nothing"
            hint = did_you_mean(unknown[0], self.output_names())
            return f"output {unknown[0]!r} is not one {ref} extracts{hint}; it extracts: {known}"
        specs = self.output_specs()
        for name, value in sorted(given.items()):
            why = [why for spec in specs.get(name, []) if (why := _refused_value(value, spec))]
            if len(why) == len(specs.get(name, [])) and why:
                return f"output {name!r}: {_echo(value)} {why[0]}: {ref} would never extract it"
        return None

    def secret_inputs(self, inputs: dict[str, Any]) -> dict[str, str]:
        """The values of inputs declared `secret: true`, by name."""
        specs = self.script.inputs
        return {k: str(v) for k, v in inputs.items() if k in specs and specs[k].secret}

    def check_uploads(self, inputs: dict[str, Any], uploads_dir: Path | None) -> None:
        """Every file the script's upload steps name from its inputs is in the uploads
        directory — checked before any browser work, so a bad name is a rejection."""
        for planned in self.plan:
            step = planned.step
            if not isinstance(step, UploadStep) or planned.frame.parent is not None:
                continue
            refs = references(step.upload.file)
            if any(ref.namespace != "inputs" for ref in refs):
                continue  # depends on what the run reads: checked when the step runs
            name = render(step.upload.file, {"inputs": inputs})
            try:
                upload_path(uploads_dir, name)
            except UploadRefused as exc:
                field = f"inputs.{refs[0].name}" if refs else "script"
                raise InputInvalid(f"step {planned.id!r}: {exc}", field=field) from exc

    def redacted_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        specs = self.script.inputs
        return {
            k: ("***" if k in specs and specs[k].secret else _jsonable(v))
            for k, v in inputs.items()
        }


def _refused_value(value: str, spec: ExtractSpec) -> str | None:
    """Why `value` is not one extracting with `spec` can give, or None. An extraction keeps
    the page's text with its white space collapsed, then what its pattern keeps of it: read
    as the page's text, a value it can give is given back whole."""
    text = " ".join(value.split())
    if text != value:
        return "has white space an extracted text never has (line breaks, runs, at its ends)"
    if spec.pattern is None:
        return None
    match = re.search(spec.pattern, text)
    grouped = re.compile(spec.pattern).groups > 0
    if match is None and grouped:
        # Its group keeps part of a match (`Confirmation: (CN-[0-9]+)`): the value alone
        # need not match the whole, and no text around it can be made up to tell.
        return None
    kept = None if match is None else match.group(1) if grouped else match.group(0)
    if kept != value:
        return f"is not what pattern {spec.pattern!r} keeps"
    return None


def _jsonable(value: Any) -> Any:
    return format(value, "f") if isinstance(value, Decimal) else value


def input_model(script: Script) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for name, spec in script.inputs.items():
        if spec.default is not None:
            fields[name] = (spec.annotation(), spec.typed_default())
        elif spec.required:
            fields[name] = (spec.annotation(), ...)
        else:
            fields[name] = (spec.annotation() | None, None)
    return create_model(
        f"Inputs_{script.name.replace('/', '_')}",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )


def validate_inputs(script: Script, raw: dict[str, Any]) -> dict[str, Any]:
    try:
        model = input_model(script).model_validate(raw)
    except ValidationError as exc:
        problems = []
        first_field: str | None = None
        for item in exc.errors():
            name = ".".join(str(p) for p in item["loc"]) or "(inputs)"
            first_field = first_field or name
            msg = item["msg"].removeprefix("Value error, ")
            meant = name
            if item["type"] == "extra_forbidden":
                meant = closest(name, script.inputs) or name
                msg = "not declared by the script" + did_you_mean(name, script.inputs)
            # Never echo a secret input's value back in an error, nor one sent under a
            # misspelling of a secret input's name.
            secret = meant in script.inputs and script.inputs[meant].secret
            shown = "" if secret or item["type"] == "missing" else f" (got {_echo(item['input'])})"
            problems.append(f"input {_echo(name)}: {msg}{shown}")
        raise InputInvalid(
            f"inputs rejected by {script.name}@{script.version}: " + "; ".join(problems),
            field=f"inputs.{first_field}" if first_field else "inputs",
        ) from exc
    return {k: v for k, v in model.model_dump().items() if v is not None}


# How much of a rejected value an error repeats: enough to recognise it. The message is copied
# into events, reports and webhooks; a 5000-character value would be copied whole each time.
ECHO_CHARS = 60


def _echo(value: Any) -> str:
    """`value` as an error message shows it: its repr, or the start of it and its length."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= ECHO_CHARS:
        return repr(value)
    return f"{text[:ECHO_CHARS]!r}… ({len(text)} characters)"


# A script's rollout file, beside its versions (worker/rollout.py); never a version itself.
ROLLOUT_SUFFIX = ".rollout.yaml"


def misplaced(scripts_dir: Path) -> list[tuple[Path, str]]:
    """YAML files under `scripts_dir` that no lookup ever reads, each with why: a mistyped
    extension or folder would otherwise pass validation unread."""
    found: list[tuple[Path, str]] = []
    for path in sorted(scripts_dir.rglob("*.y*ml")):
        parts = path.relative_to(scripts_dir).parts
        if path.suffix not in (".yaml", ".yml") or any(p.startswith(".") for p in parts):
            continue
        if path.suffix == ".yml":
            why = f"the extension must be .yaml ({path.stem}.yaml)"
        elif len(parts) != 2:
            why = "it must be in its site's folder, one level down"
        elif path.name.endswith(ROLLOUT_SUFFIX) and "@" in path.name:
            short = path.name.partition("@")[0]
            why = (
                f"a rollout file is one per script, {short}{ROLLOUT_SUFFIX}, whose stable: and "
                "canary: name the versions"
            )
        else:
            continue
        found.append(
            (path, f"{path}: not read: scripts are {scripts_dir}/<site>/<name>.yaml; {why}")
        )
    return found


class ScriptStore:
    """Finds and loads scripts by name (`billing/issue_credit`) from a scripts directory.

    Versions live side by side: `issue_credit.yaml` and `issue_credit@2.yaml` (each file says its
    `version:`; a `@N` in the name must agree). Which one an unpinned job runs is the rollout's
    business (worker/rollout.py): without a rollout file, the highest.
    """

    def __init__(self, scripts_dir: Path, selectors_dir: Path) -> None:
        self.scripts_dir = scripts_dir
        self.selectors_dir = selectors_dir
        # Loaded scripts by path, valid while none of the files they were built from changed:
        # a worker parses YAML once per script change, not once per job.
        self._cache: dict[Path, tuple[tuple[tuple[Path, int], ...], LoadedScript]] = {}
        self._versions: dict[Path, tuple[int, int | None]] = {}

    def versions(self, name: str) -> dict[int, Path]:
        """Every version of `name` by number. A file named `<name>@N.yaml` must hold version N;
        no two files may hold the same version."""
        site, _, short = name.partition("/")
        folder = self.scripts_dir / site
        found: dict[int, Path] = {}
        for path in sorted([*folder.glob(f"{short}.yaml"), *folder.glob(f"{short}@*.yaml")]):
            if path.name.endswith(ROLLOUT_SUFFIX):
                # `<name>@2.rollout.yaml` is no version: read as one, it failed every job of
                # the script (`formwork validate` says where rollout files go).
                continue
            version = self._version_of(path)
            if version is None:
                load_model(path, Script)  # raises, naming the file, line and field
                continue
            _, _, pinned = path.name.removesuffix(".yaml").partition("@")
            if pinned and pinned != str(version):
                where = _field_where(path, ("version",))
                raise ScriptInvalid(f"{where}: is {version}, but the file is named @{pinned}")
            if version in found:
                where = _field_where(path, ("version",))
                raise ScriptInvalid(f"{where}: version {version} is also {found[version].name}")
            found[version] = path
        return found

    def _version_of(self, path: Path) -> int | None:
        stamp = _mtime(path)
        cached = self._versions.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        data, _ = read_yaml(path)
        version = data.get("version") if isinstance(data, dict) else None
        result = version if type(version) is int and version >= 1 else None
        self._versions[path] = (stamp, result)
        return result

    def login_flow_path(self, registry: SiteRegistry) -> Path | None:
        """The file of the script `registry` signs in with (its highest version), if any."""
        if registry.login_flow is None:
            return None
        # The registry is at fault, not a script that uses it: say where.
        where = _field_where(self.selectors_dir / f"{registry.site}.yaml", ("login_flow",))
        site = registry.login_flow.partition("/")[0]
        if site != registry.site:
            # Its steps were checked against this registry, and the first element it names
            # that this site lacks was blamed on that script's line.
            raise ScriptInvalid(
                f"{where}: {registry.login_flow!r} is a script of site {site!r}: a site signs in "
                f"with one of its own ({registry.site}/...)"
            )
        try:
            return self.path_of(registry.login_flow)
        except ScriptNotFound as exc:
            raise ScriptInvalid(f"{where}: {exc.message}") from exc

    def path_of(self, name: str, version: int | None = None) -> Path:
        versions = self.versions(name)
        if not versions:
            raise ScriptNotFound(f"no script {name!r} under {self.scripts_dir}", field="script")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            known = ", ".join(str(v) for v in sorted(versions))
            raise ScriptNotFound(
                f"script {name!r} has no version {version} (available: {known})", field="script"
            )
        return versions[version]

    def load(self, name: str, version: int | None = None) -> LoadedScript:
        return self.load_path(self.path_of(name, version))

    def load_path(self, path: Path) -> LoadedScript:
        cached = self._cache.get(path)
        if cached is not None and all(_mtime(p) == m for p, m in cached[0]):
            return cached[1]
        loaded = self._load_path(path)
        sources = {path, self.selectors_dir / f"{loaded.script.site}.yaml"}
        sources.update(planned.frame.path for planned in loaded.plan)
        self._cache[path] = (tuple((p, _mtime(p)) for p in sorted(sources)), loaded)
        return loaded

    def _load_path(self, path: Path) -> LoadedScript:
        script = load_model(path, Script)
        expected = f"{path.parent.name}/{path.name.removesuffix('.yaml').split('@')[0]}"
        if script.name != expected:
            raise ScriptInvalid(
                f"{path}: name {script.name!r} does not match its file ({expected})"
            )
        registry = load_registry(self.selectors_dir, script.site)
        digest = hashlib.sha256()
        digest.update((self.selectors_dir / f"{script.site}.yaml").read_bytes())
        digest.update(path.read_bytes())
        root = Frame(script, path)
        stack = [script.name]
        alternates: dict[str, list[PlannedStep]] = {}
        plan = list(self._flatten(script.steps, root, "", stack, digest, found=alternates))
        for name, steps in script.alternates.items():
            alternates[name] = list(
                self._flatten(steps, root, "", stack, digest, ("alternates", name))
            )
        effect = script.verify_effect
        probe = list(
            self._flatten(
                effect.steps if effect else [],
                root,
                "verify.",
                stack,
                digest,
                ("verify_effect", "steps"),
            )
        )
        if effect is not None and effect.extract:
            # Kept apart from the probe's steps: it runs only once `present` holds.
            recover = ExtractStep(id="recover", extract=effect.extract)
            probe.append(PlannedStep("verify.recover", recover, root, RECOVER_LOC))
        relogin: list[PlannedStep] = []
        login_path = self.login_flow_path(registry)
        if login_path is not None:
            digest.update(login_path.read_bytes())
            login = load_model(login_path, Script)
            relogin = list(
                self._flatten(login.steps, Frame(login, login_path), "relogin.", stack, digest)
            )
        # The probe's `present` check, as a step for the load-time checks only.
        present = (
            [PlannedStep("verify.present", ExpectStep(id="present", expect=effect.present),
                         root, ("verify_effect", "present"))]
            if effect is not None and effect.present is not None
            else []
        )  # fmt: skip
        extra = [*probe, *present, *relogin, *(p for path in alternates.values() for p in path)]
        _check_plan(registry, plan, extra=extra)
        own = [*plan, *probe, *present, *(p for path in alternates.values() for p in path)]
        _check_commits(root, own)
        _check_detours({f"alternate path {n!r}": path for n, path in alternates.items()})
        _check_alternates_exist(root, registry, self.selectors_dir)
        _check_alternates_taken([root, *(p.frame for p in [*plan, *extra])], registry)
        _check_detours({"verify_effect": [p for p in probe if p.loc != RECOVER_LOC]})
        _check_secrets(registry, [*own, *relogin], root)
        _check_inputs_used(root, registry, own)
        for index, element in enumerate(script.dynamic):
            candidates = registry.elements.get(element)
            if candidates is None:
                where = _field_where(path, ("dynamic", index))
                raise ScriptInvalid(
                    f"{where}: {element!r} is not in selectors/{registry.site}.yaml"
                    + did_you_mean(element, registry.elements)
                )
            if not any(c.css for c in candidates):
                where = _field_where(path, ("dynamic", index))
                raise ScriptInvalid(f"{where}: {element!r} needs a css candidate")
        return LoadedScript(
            script,
            path,
            registry,
            plan,
            digest.hexdigest(),
            alternates=alternates,
            probe=probe,
            relogin=relogin,
        )

    def _flatten(
        self,
        steps: list[Any],
        frame: Frame,
        prefix: str,
        stack: list[str],
        digest: Any,
        section: tuple[int | str, ...] = ("steps",),
        found: dict[str, list[PlannedStep]] | None = None,
    ) -> Iterator[PlannedStep]:
        """The steps as planned. A sub-flow's alternate paths go into `found` under their
        qualified names; a detour (`found` None) takes no alternate path, so it needs none."""
        script, path = frame.script, frame.path
        for index, step in enumerate(steps):
            loc = (*section, index)
            if not isinstance(step, UseStep):
                yield PlannedStep(prefix + step.id, step, frame, loc)
                continue
            where = _step_where(path, step.id, loc)
            flow_name, _, pinned = step.use.partition("@")
            if flow_name in stack:
                raise ScriptInvalid(f"{where}: 'use: {step.use}' is a cycle ({' > '.join(stack)})")
            try:
                flow_path = self.path_of(flow_name, int(pinned) if pinned else None)
            except ScriptNotFound as exc:
                raise ScriptInvalid(f"{where}: use: {exc.message}") from exc
            flow = load_model(flow_path, Script)
            if flow.site != script.site:
                raise ScriptInvalid(f"{where}: sub-flow {flow.name} is for site {flow.site!r}")
            unknown = sorted(set(step.with_) - set(flow.inputs))
            missing = sorted(
                n
                for n, s in flow.inputs.items()
                if s.required and s.default is None and n not in step.with_
            )
            if unknown:
                raise ScriptInvalid(f"{where}: with: {flow.name} has no input(s) {unknown}")
            if missing:
                raise ScriptInvalid(f"{where}: with: {flow.name} needs input(s) {missing}")
            inner = f"{prefix}{step.id}."
            child = Frame(flow, flow_path, dict(step.with_), frame, inner)
            digest.update(flow_path.read_bytes())
            yield from self._flatten(
                flow.steps, child, inner, [*stack, flow_name], digest, found=found
            )
            if found is not None:
                for name, detour in flow.alternates.items():
                    found[inner + name] = list(
                        self._flatten(
                            detour, child, inner, [*stack, flow_name], digest, ("alternates", name)
                        )
                    )
            # The `use` step's own expectation applies once the whole sub-flow has run.
            if step.expect is not None:
                yield PlannedStep(
                    f"{prefix}{step.id}", ExpectStep(id=step.id, expect=step.expect), frame, loc
                )


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def _step_where(path: Path, step_id: str, loc: tuple[int | str, ...] = ()) -> str:
    """`file:line: steps[3] (step 'submit')` — at `loc` when known, else the top-level step."""
    data, node = read_yaml(path)
    if not loc:
        steps = data.get("steps", []) if isinstance(data, dict) else []
        index = next(
            (
                i
                for i, raw in enumerate(steps)
                if isinstance(raw, dict) and raw.get("id") == step_id
            ),
            None,
        )
        if index is None:
            return f"{path}: step {step_id!r}"
        loc = ("steps", index)
    return f"{path}:{line_of(node, loc)}: {describe_loc(data, loc)}"


def _where(planned: PlannedStep) -> str:
    return _step_where(planned.frame.path, planned.step.id, planned.loc)


# What each action's templated fields are, as named in messages about them.
_FIELD = {
    "goto": "a goto URL",
    "fill": "a fill value",
    "select": "a select value or label",
    "upload": "an upload file name",
}


def _selector_of(element: str) -> str:
    return f"the selector of {element!r}"


def _sources(step: _Step, registry: SiteRegistry) -> list[tuple[str, str]]:
    """Every template a step renders, with what it is: (field, template). Targets missing
    from the registry are skipped here (_check_plan names them)."""
    found = [(_FIELD.get(str(step.action), str(step.action)), t) for t in step.templates()]
    expect = step.expect
    found += [("an expected text", t) for t in (expect.templates() if expect else [])]
    for target in step.targets() + (expect.targets() if expect else []):
        # Parameterised elements (`tr[data-reference="{{ inputs.reference }}"]`) take their
        # values from the script that uses them.
        for candidate in registry.elements.get(target, []):
            found += [(_selector_of(target), t) for t in candidate.templates()]
    return found


def _literal_host(url: str) -> str | None:
    """The host of a full URL written out in a script; None for a path on the site, or a
    host that a template fills in (known only when a job runs)."""
    if "://" not in url or "{" in url.split("://", 1)[1].split("/", 1)[0]:
        return None
    return urlsplit(url).hostname or ""


def _check_plan(
    registry: SiteRegistry, plan: list[PlannedStep], extra: list[PlannedStep] | None = None
) -> None:
    """Targets exist in the registry; templates only reference declared names."""
    produced: set[str] = set()
    selectors = {_selector_of(name) for name in registry.elements}
    for planned in [*plan, *(extra or [])]:
        step, frame = planned.step, planned.frame

        def fail(message: str, planned: PlannedStep = planned) -> None:
            raise ScriptInvalid(f"{_where(planned)}: {message}")

        for target in step.targets() + (step.expect.targets() if step.expect else []):
            if target not in registry.elements:
                fail(
                    f"target {target!r} is not in selectors/{registry.site}.yaml"
                    + did_you_mean(target, registry.elements)
                )
        for label, source in _sources(step, registry):
            # A selector is written in the registry: say so, or the step looks at fault.
            within = f"{label} in selectors/{registry.site}.yaml: " if label in selectors else ""
            try:
                refs = references(source)
            except TemplateError as exc:
                fail(f"{within}{exc}")
            for ref in refs:
                problem = _undeclared(ref, frame.script, produced)
                if problem:
                    fail(f"{within}{problem}")
        if isinstance(step, GotoStep):
            scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", step.goto)
            if scheme is not None and scheme[1].lower() not in ("http", "https"):
                # `javascript:`, `data:`, `file:`: never a page of the site.
                fail(f"goto {step.goto!r}: only a path on the site or an http(s) URL")
            host = _literal_host(step.goto)
            if host is not None and host not in registry.allowed_hosts:
                # It would be refused at run time (navigation_blocked) on every job.
                fail(
                    f"goto {step.goto!r}: {host!r} is not one of site {registry.site}'s "
                    f"allowed_hosts {registry.allowed_hosts}"
                )
        if isinstance(step, ExtractStep):
            produced.update(step.extract)
    # Sub-flow bindings are templates in the parent's namespace.
    for planned in plan:
        parent = planned.frame.parent
        if parent is None:
            continue
        for source in planned.frame.bindings.values():
            for ref in references(source):
                problem = _undeclared(ref, parent.script, produced)
                if problem:
                    raise ScriptInvalid(f"{_use_where(planned)}: with: {problem}")
    root = plan[0].frame if plan else None
    while root is not None and root.parent is not None:
        root = root.parent
    if root is not None and root.script.effect is not None:
        try:
            refs = references(root.script.effect)
        except TemplateError as exc:
            raise ScriptInvalid(f"{_field_where(root.path, ('effect',))}: {exc}") from exc
        for ref in refs:
            problem = _undeclared(ref, root.script, produced)
            if problem:
                raise ScriptInvalid(f"{_field_where(root.path, ('effect',))}: {problem}")


def _undeclared(ref: Reference, script: Script, produced: set[str]) -> str | None:
    if ref.namespace == "inputs" and ref.name not in script.inputs:
        return f"'{{{{ inputs.{ref.name} }}}}' is not a declared input of {script.name}"
    if ref.namespace == "secrets" and ref.name not in script.secrets:
        return f"'{{{{ secrets.{ref.name} }}}}' is not in the 'secrets' list of {script.name}"
    if ref.namespace == "outputs" and ref.name not in produced:
        return f"'{{{{ outputs.{ref.name} }}}}' is not extracted by an earlier step"
    return None


def _field_where(path: Path, loc: tuple[int | str, ...]) -> str:
    data, node = read_yaml(path)
    return f"{path}:{line_of(node, loc)}: {describe_loc(data, loc)}"


def _use_where(planned: PlannedStep) -> str:
    """Where the `use` step that called `planned`'s sub-flow is written."""
    parent = planned.frame.parent
    assert parent is not None
    return _step_where(parent.path, planned.id.split(".")[-2])


def _check_inputs_used(root: Frame, registry: SiteRegistry, planned: list[PlannedStep]) -> None:
    """Every declared input is used somewhere: a step, a selector, a sub-flow binding, an
    approval condition or the effect; every declared secret by a step or a sub-flow binding.
    An unused one is usually a typo on either side."""
    used: set[str] = set()
    sources = [root.script.effect] if root.script.effect else []
    for each in planned:
        if each.frame is root:
            sources += [source for _, source in _sources(each.step, registry)]
            approval = each.step.approval
            if approval is not None and approval.when is not None:
                used.update(ref.name for ref in condition_references(approval.when))
        elif each.frame.parent is root:
            sources += list(each.frame.bindings.values())
    secrets: set[str] = set()
    for source in sources:
        used.update(ref.name for ref in references(source) if ref.namespace == "inputs")
        secrets.update(ref.name for ref in references(source) if ref.namespace == "secrets")
    for name in root.script.inputs:
        if name not in used:
            where = _field_where(root.path, ("inputs", name))
            raise ScriptInvalid(f"{where}: input {name!r} is declared but no step uses it")
    # A worker refuses a job whose declared secrets it lacks, used or not.
    for index, name in enumerate(root.script.secrets):
        if name not in secrets:
            where = _field_where(root.path, ("secrets", index))
            raise ScriptInvalid(
                f"{where}: secret {name!r} is declared but no step uses it (every job would "
                "be refused on a worker that does not have it)"
            )


def is_secret_reference(ref: Reference, script: Script) -> bool:
    """`{{ secrets.x }}`, or an input `script` declares `secret: true`."""
    if ref.namespace == "secrets":
        return True
    spec = script.inputs.get(ref.name) if ref.namespace == "inputs" else None
    return spec is not None and spec.secret


_SECRET_RULE = (
    "a secret may only be the whole value of a fill into one of the site's secret_elements "
    "(or of a `with:` binding to a sub-flow input declared secret: true)"
)


def _check_secrets(registry: SiteRegistry, planned: list[PlannedStep], root: Frame) -> None:
    """No secret flows into a field that is not secret. A `{{ secrets.x }}` (or a secret input)
    may only be the whole value of a fill whose target the registry lists in secret_elements
    — fields masked in every screenshot — never in a URL, an expected text, a select value,
    a selector, the effect, or mixed into other text, where it would reach logs, reports or
    the site's other pages in the clear."""

    def secret_in(source: str, script: Script) -> str | None:
        refs = [r for r in references(source) if is_secret_reference(r, script)]
        return f"'{{{{ {refs[0].namespace}.{refs[0].name} }}}}'" if refs else None

    seen: set[int] = set()
    for each in planned:
        step, script = each.step, each.frame.script
        for label, source in _sources(step, registry):
            shown = secret_in(source, script)
            if shown is None:
                continue
            if isinstance(step, FillStep) and source == step.fill.value:
                if sole_reference(source) is None:
                    problem = f"{shown} is mixed into other text in the fill value"
                elif step.fill.target not in registry.secret_elements:
                    problem = (
                        f"{shown} is typed into {step.fill.target!r}, which is not in "
                        f"secret_elements of selectors/{registry.site}.yaml"
                    )
                else:
                    continue
            else:
                problem = f"{shown} flows into {label}"
            raise ScriptInvalid(f"{_where(each)}: {problem}: {_SECRET_RULE}")
        approval = step.approval
        if approval is not None and approval.when is not None:
            refs = condition_references(approval.when)
            if any(is_secret_reference(ref, script) for ref in refs):
                raise ScriptInvalid(f"{_where(each)}: approval.when uses a secret input")
        frame = each.frame
        if frame.parent is None or id(frame) in seen:
            continue
        seen.add(id(frame))
        for name, source in frame.bindings.items():
            shown = secret_in(source, frame.parent.script)
            if shown is not None and (
                sole_reference(source) is None or not frame.script.inputs[name].secret
            ):
                raise ScriptInvalid(
                    f"{_use_where(each)}: with: {name}: {shown} flows into {frame.script.name}'s "
                    f"input {name!r}: {_SECRET_RULE}"
                )
    effect = root.script.effect
    shown = secret_in(effect, root.script) if effect else None
    if shown is not None:
        where = _field_where(root.path, ("effect",))
        raise ScriptInvalid(f"{where}: {shown} flows into the effect told to customers")


def _check_detours(detours: dict[str, list[PlannedStep]]) -> None:
    """Alternate paths and the probe's steps are detours: a failure there ends the detour, and
    only a step of the script's own `steps:` is journalled before it is sent, probed when its
    answer is lost and held at an approval gate. A commit on a detour would be sent again by a
    `retry_step` decision on the step that took it; an alternate on one is never taken."""
    for detour, steps in detours.items():
        for each in steps:
            if each.step.commit:
                raise ScriptInvalid(
                    f"{_where(each)}: commit: true is not allowed in {detour}: a commit step "
                    "must be in the script's own steps, where its answer is verified and it is "
                    "never sent twice"
                )
            rules = [each.step.alternate, *(r.alternate for r in each.step.on_failure.values())]
            taken = next((name for name in rules if name is not None), None)
            if taken is not None:
                raise ScriptInvalid(
                    f"{_where(each)}: alternate {taken!r} is not allowed in {detour}: a step "
                    "there that fails ends the detour, it takes no alternate path of its own"
                )


def _check_alternates_exist(root: Frame, registry: SiteRegistry, selectors_dir: Path) -> None:
    """Every alternate path a registry rule may take is one of the job's script: the executor
    looks it up there. The rules a script or sub-flow writes itself take its own paths, and
    are checked with it; the registry's rules are checked here."""
    have = root.script.alternates
    for code, rule in registry.on_failure.items():
        if rule.alternate is not None and rule.alternate not in have:
            where = _field_where(selectors_dir / f"{registry.site}.yaml", ("on_failure", code))
            raise ScriptInvalid(
                f"{where}: alternate path {rule.alternate!r} is not in {root.script.name} "
                f"({root.path}): a registry rule applies to every script of the site"
            )


def _check_alternates_taken(frames: list[Frame], registry: SiteRegistry) -> None:
    """Every alternate path a script or sub-flow declares is named by a rule that may take
    it: its own steps' and rules, or the registry's. One nothing names is a path its author
    believes is there for a failure, and no failure ever takes it (a typo on either side)."""
    seen: set[int] = set()
    for frame in frames:
        if id(frame) in seen:
            continue
        seen.add(id(frame))
        script = frame.script
        rules = [*script.on_failure.values(), *registry.on_failure.values()]
        named = {r.alternate for r in rules}
        for step in script.steps:
            named.add(step.alternate)
            named.update(r.alternate for r in step.on_failure.values())
        for name in script.alternates:
            if name not in named:
                where = _field_where(frame.path, ("alternates", name))
                raise ScriptInvalid(
                    f"{where}: alternate path {name!r} is taken by no rule: name it where a "
                    f"step may fail (`alternate: {name}` on the step, or an on_failure rule "
                    f"`{{action: alternate, alternate: {name}}}`), or remove it"
                )


def _check_commits(root: Frame, planned: list[PlannedStep]) -> None:
    """A commit step needs a probe that tells whether its effect happened, or an opt-out."""
    if root.script.verify_effect is not None:
        return
    for each in planned:
        if each.step.commit:
            raise ScriptInvalid(
                f"{_where(each)}: commit step without a probe: the script needs "
                "'verify_effect' (steps and 'present', telling whether the effect happened), "
                "or 'verify_effect: {opt_out: <why>}'"
            )
