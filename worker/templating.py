"""The script template syntax: `{{ inputs.name }}`, `{{ secrets.name }}`, `{{ outputs.name }}`.

Jinja2's parser reads the template; anything beyond a plain reference into one of the three
namespaces (filters, calls, arithmetic, control blocks) is refused at load time, so a script can
never execute code and every reference can be checked against what the script declares.
Rendering uses Jinja2's sandbox with strict undefined values as a second line of defence.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from itertools import pairwise
from typing import Any, Literal

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import SandboxedEnvironment

Namespace = Literal["inputs", "secrets", "outputs"]
NAMESPACES: tuple[Namespace, ...] = ("inputs", "secrets", "outputs")


def _positional(value: Any) -> Any:
    # str(Decimal) writes `1E+1` or `1.5E-7`, which a form's amount field refuses.
    return format(value, "f") if isinstance(value, Decimal) else value


_env = SandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, finalize=_positional
)


class TemplateError(ValueError):
    """A template is malformed or references something it may not."""


@dataclass(frozen=True)
class Reference:
    namespace: Namespace
    name: str


def references(source: str) -> list[Reference]:
    """Every `{{ namespace.name }}` in `source`; TemplateError for anything else."""
    return list(_references(source))


# Scripts are few and their templates fixed, while steps render and check them on every run:
# parsing and compiling once per template saves ~1 ms of CPU per use (bench/throughput.py).
@lru_cache(maxsize=1024)
def _references(source: str) -> tuple[Reference, ...]:
    try:
        tree = _env.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"bad template {source!r}: {exc.message}") from exc
    found: list[Reference] = []
    for statement in tree.body:
        if not isinstance(statement, nodes.Output):
            raise TemplateError(
                f"bad template {source!r}: only '{{{{ inputs.name }}}}' style references are "
                "allowed, not control blocks"
            )
        for expr in statement.nodes:
            if isinstance(expr, nodes.TemplateData):
                continue
            if (
                isinstance(expr, nodes.Getattr)
                and isinstance(expr.node, nodes.Name)
                and expr.node.name in NAMESPACES
            ):
                namespace: Namespace = expr.node.name
                found.append(Reference(namespace, expr.attr))
                continue
            raise TemplateError(
                f"bad template {source!r}: only references like '{{{{ inputs.name }}}}', "
                "'{{ secrets.name }}' or '{{ outputs.name }}' are allowed"
            )
    return tuple(found)


@lru_cache(maxsize=1024)
def sole_reference(source: str) -> Reference | None:
    """The reference `source` consists of, when it is exactly one (`"{{ secrets.password }}"`),
    with no text around it; None otherwise."""
    refs = references(source)
    body = _env.parse(source).body
    if len(refs) != 1 or len(body) != 1 or not isinstance(body[0], nodes.Output):
        return None
    return refs[0] if len(body[0].nodes) == 1 else None


@lru_cache(maxsize=1024)
def _compiled(source: str) -> Any:
    return _env.from_string(source)


def render(source: str, context: dict[str, dict[str, Any]]) -> str:
    """Render a template that `references` accepted. Values are rendered with `str()`, decimals
    in positional notation."""
    if "{" not in source:
        return source
    try:
        return str(_compiled(source).render(**context))
    except UndefinedError as exc:
        raise TemplateError(f"template {source!r}: {exc.message}") from exc


# ---------------------------------------------------------------- conditions

# What a condition may contain: comparisons and boolean logic over input values and literals
# (`inputs.amount > 100 and inputs.currency == "USD"`) — no calls, filters or attribute walks.
_CONDITION_NODES = (
    nodes.Compare,
    nodes.Operand,
    nodes.And,
    nodes.Or,
    nodes.Not,
    nodes.Neg,
    nodes.Pos,
    nodes.Add,
    nodes.Sub,
    nodes.Mul,
    nodes.Div,
    nodes.Const,
    nodes.List,
    nodes.Tuple,
    nodes.Getattr,
    nodes.Name,
)


def condition_references(source: str) -> list[Reference]:
    """The `inputs.name` references of a condition such as `inputs.amount > 100`;
    TemplateError for a malformed condition or one that does more than compare inputs."""
    try:
        expression = _env.parse("{{ (" + source + ") }}").body[0]
    except (TemplateSyntaxError, IndexError) as exc:
        raise TemplateError(f"bad condition {source!r}: {exc}") from exc
    if not isinstance(expression, nodes.Output) or len(expression.nodes) != 1:
        raise TemplateError(f"bad condition {source!r}: one expression expected")
    found: list[Reference] = []
    for node in expression.nodes[0].find_all(nodes.Node):
        if not isinstance(node, _CONDITION_NODES):
            raise TemplateError(
                f"bad condition {source!r}: only comparisons of 'inputs.name' values with "
                f"literals are allowed (found {type(node).__name__})"
            )
        if isinstance(node, nodes.Getattr):
            if not (isinstance(node.node, nodes.Name) and node.node.name == "inputs"):
                raise TemplateError(f"bad condition {source!r}: only 'inputs.name' is allowed")
            found.append(Reference("inputs", node.attr))
        elif isinstance(node, nodes.Name) and node.name != "inputs":
            raise TemplateError(
                f"bad condition {source!r}: unknown name {node.name!r} (use 'inputs.name')"
            )
    if isinstance(expression.nodes[0], nodes.Name):
        raise TemplateError(f"bad condition {source!r}: 'inputs' alone is not a condition")
    if not found:
        raise TemplateError(f"bad condition {source!r}: it must depend on an input")
    return found


@dataclass(frozen=True)
class Comparison:
    """`inputs.name <op> literal` (either way round) in a condition; `literals` holds the one
    literal, or each item of a list or tuple (`inputs.reason in ['damaged', 'lost']`)."""

    name: str
    literals: tuple[Any, ...]


def condition_comparisons(source: str) -> list[Comparison]:
    """Each direct comparison of an input with literals in a condition that
    `condition_references` accepted: what load time can check against the input's type."""
    expression = _env.parse("{{ (" + source + ") }}").body[0]
    found: list[Comparison] = []
    for compare in expression.find_all(nodes.Compare):
        operands = [compare.expr, *(operand.expr for operand in compare.ops)]
        for left, right in pairwise(operands):
            for one, other in ((left, right), (right, left)):
                literals = _literals(other)
                if isinstance(one, nodes.Getattr) and literals is not None:
                    found.append(Comparison(one.attr, literals))
    return found


def _literals(node: nodes.Node) -> tuple[Any, ...] | None:
    if isinstance(node, nodes.Const):
        return (node.value,)
    if isinstance(node, nodes.List | nodes.Tuple) and all(
        isinstance(item, nodes.Const) for item in node.items
    ):
        return tuple(item.value for item in node.items if isinstance(item, nodes.Const))
    return None


@lru_cache(maxsize=256)
def _condition(source: str) -> Any:
    return _env.compile_expression(source, undefined_to_none=False)


def holds(source: str, inputs: dict[str, Any]) -> bool:
    """Evaluate a condition that `condition_references` accepted."""
    try:
        return bool(_condition(source)(inputs=inputs))
    except UndefinedError as exc:
        raise TemplateError(f"condition {source!r}: {exc.message}") from exc
    except TypeError as exc:  # comparing a number with a string, say
        raise TemplateError(f"condition {source!r}: {exc}") from exc
