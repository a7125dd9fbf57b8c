"""The script template syntax: `{{ inputs.name }}`, `{{ secrets.name }}`, `{{ outputs.name }}`.

Jinja2's parser reads the template; anything beyond a plain reference into one of the three
namespaces (filters, calls, arithmetic, control blocks) is refused at load time, so a script can
never execute code and every reference can be checked against what the script declares.
Rendering uses Jinja2's sandbox with strict undefined values as a second line of defence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import SandboxedEnvironment

Namespace = Literal["inputs", "secrets", "outputs"]
NAMESPACES: tuple[Namespace, ...] = ("inputs", "secrets", "outputs")

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


class TemplateError(ValueError):
    """A template is malformed or references something it may not."""


@dataclass(frozen=True)
class Reference:
    namespace: Namespace
    name: str


def references(source: str) -> list[Reference]:
    """Every `{{ namespace.name }}` in `source`; TemplateError for anything else."""
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
    return found


@lru_cache(maxsize=1024)
def _compiled(source: str) -> Any:
    return _env.from_string(source)


def render(source: str, context: dict[str, dict[str, Any]]) -> str:
    """Render a template that `references` accepted. Values are rendered with `str()`."""
    if "{" not in source:
        return source
    try:
        return str(_compiled(source).render(**context))
    except UndefinedError as exc:
        raise TemplateError(f"template {source!r}: {exc.message}") from exc
