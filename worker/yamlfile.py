"""Load a YAML file into a pydantic model, with errors that name the file, line, step and field.

Scripts and selector registries are written by people; a typo must point at the exact place.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from worker.errors import ScriptInvalid

M = TypeVar("M", bound=BaseModel)


class At(ValueError):
    """A model validator's error about one place below the model (`("steps", 3)`): reported
    at that place's line and step, not at the top of the file."""

    def __init__(self, loc: tuple[int | str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`; ScriptInvalid naming the file when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScriptInvalid(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ScriptInvalid(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc


def read_yaml(path: Path, text: str | None = None) -> tuple[Any, yaml.Node | None]:
    """Parse `path` (or `text`, already read from it), returning the data and its node tree
    (for line numbers)."""
    if text is None:
        text = read_text(path)
    # One parse gives both: the data is constructed from the very node tree the lines come from.
    try:
        # The reader refuses characters YAML does not allow (a NUL) as it is made.
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ScriptInvalid(
            f"{path}:{line}: not valid YAML: character U+{char:04X} is not allowed in YAML"
        ) from exc
    loader.name = str(path)  # YAML's own messages then say the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise ScriptInvalid(_syntax_error(path, exc)) from exc
    except yaml.YAMLError as exc:
        raise ScriptInvalid(f"{path}: not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
    return data, node


def _syntax_error(path: Path, exc: yaml.MarkedYAMLError) -> str:
    """One line at the place YAML stopped: PyYAML's own text spans six, quoting the file's
    lines with a caret under each, which a report or a CI log shows as a ragged block."""
    mark = exc.problem_mark or exc.context_mark
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = exc.problem or exc.context or "cannot be parsed"
    if mark is not None:
        problem += f" (column {mark.column + 1})"
    context = exc.context_mark
    if exc.context and exc.problem and context is not None:
        problem += f", {exc.context} that starts on line {context.line + 1}"
    return f"{where}: not valid YAML: {problem}"


def _refuse_duplicate_keys(path: Path, root: yaml.Node) -> None:
    """YAML keeps the last of two equal keys without a word; `version: 1` then `version: 2`
    would quietly be version 2."""
    pending, seen_nodes = [root], set()
    while pending:
        node = pending.pop()
        if id(node) in seen_nodes:  # an alias: already looked at
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if key.value in first:
                        raise ScriptInvalid(
                            f"{path}:{line}: key {key.value!r} is given twice "
                            f"(first on line {first[key.value]})"
                        )
                    first[key.value] = line
                pending.append(value)
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)


def line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest node on `loc` that exists in the YAML tree. A mapping
    entry is at its key's line: a key whose value is a block (`input:` with its fields on
    the lines below) is where the author looks, not the first line of that block."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entry = next(
                ((key, value) for key, value in node.value if getattr(key, "value", None) == part),
                None,
            )
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def describe_loc(data: Any, loc: tuple[int | str, ...]) -> str:
    """`steps[3] (step 'submit') > fill > value` from a pydantic error location."""
    parts: list[str] = []
    current = data
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            if isinstance(current, list) and 0 <= part < len(current):
                current = current[part]
                if isinstance(current, dict) and "id" in current:
                    label += f" (step '{current['id']}')"
            else:
                current = None
            parts.append(label)
            continue
        parts.append(f" > {part}" if parts else part)
        current = current.get(part) if isinstance(current, dict) else None
    return "".join(parts) or "(top level)"


def _without_tags(data: Any, loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """`loc` without the tags of discriminated unions, which are not fields people wrote:
    pydantic says `steps.3.fill.fill.timeout` for the `timeout` of step 3's `fill`, and
    `steps.6.expect.klick` for a step with `expect` and a `klick` nobody knows. A part is a tag
    when the part after it is not found under it, but is found beside it."""
    kept: list[int | str] = []
    current = data
    for index, part in enumerate(loc):
        after = loc[index + 1] if index + 1 < len(loc) else None
        if isinstance(part, str) and isinstance(current, dict) and isinstance(after, str):
            under = current.get(part)
            if not (isinstance(under, dict) and after in under) and after in current:
                continue
        kept.append(part)
        if isinstance(part, int) and isinstance(current, list) and 0 <= part < len(current):
            current = current[part]
        elif isinstance(part, str) and isinstance(current, dict):
            current = current.get(part)
        else:
            current = None
    return tuple(kept)


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """`model` and every model its fields hold, at any depth."""
    found: list[type[BaseModel]] = []
    pending: list[Any] = [model]
    seen: set[int] = set()
    while pending:
        kind = pending.pop()
        if id(kind) in seen:
            continue
        seen.add(id(kind))
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found.append(kind)
            pending.extend(info.annotation for info in kind.model_fields.values())
        else:
            pending.extend(get_args(kind))
    return found


def _fields(kind: type[BaseModel]) -> list[str]:
    """The keys a mapping for `kind` is written with (`with`, not `with_`); `action`, the
    tag every step model carries, is not one."""
    return [info.alias or name for name, info in kind.model_fields.items() if name != "action"]


def _keys(model: type[BaseModel]) -> set[str]:
    """Every key a file validated as `model` may hold anywhere: what a misspelt key is near."""
    return {key for kind in _models(model) for key in _fields(kind)}


def _mapping_of(class_name: object, model: type[BaseModel] | None) -> str:
    """`a mapping (target, key)`: pydantic names the class, which no file mentions."""
    kind = next((k for k in _models(model) if k.__name__ == class_name), None) if model else None
    return f"a mapping ({', '.join(_fields(kind))})" if kind is not None else "a mapping"


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name a misspelt `name` looks like, if any: every "did you mean" in a load
    error (keys, actions, elements, inputs, ARIA roles) asks this."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'reply.status'?)` for a misspelt `name`, else nothing."""
    close = closest(name, known)
    return f" (did you mean {close!r}?)" if close else ""


def _unknown_key(key: object, model: type[BaseModel] | None) -> str:
    """pydantic's "Extra inputs are not permitted" says `inputs`, a word scripts use for
    something else: say it is an unknown key, and which known one it looks like."""
    return "unknown key" + (did_you_mean(str(key), _keys(model)) if model else "")


def _kind_of(value: Any) -> str:
    """`the text 'Enter'`, `a list`: what was written instead, in YAML's words."""
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the text {shown!r}"
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def format_validation_error(
    path: Path,
    data: Any,
    node: yaml.Node | None,
    error: ValidationError,
    model: type[BaseModel] | None = None,
) -> str:
    lines: list[str] = []
    for item in error.errors():
        loc = _without_tags(data, item["loc"])
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, At):
            loc = (*loc, *cause.loc)
        # Our own validators' words, without pydantic's `Value error, ` before them.
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and loc:
            message = _unknown_key(loc[-1], model)
        elif item["type"] in ("model_type", "model_attributes_type"):
            # pydantic names our classes ("instance of PressSpec"), which no script mentions.
            shape = _mapping_of(item.get("ctx", {}).get("class_name"), model)
            message = f"expected {shape}, not {_kind_of(item['input'])}"
        elif item["type"] in ("dict_type", "list_type"):
            shape = "a mapping" if item["type"] == "dict_type" else "a list"
            message = f"expected {shape}, not {_kind_of(item['input'])}"
        if item["type"] == "missing" and loc:
            # Said of what holds it: a step without an id is `steps[3]: 'id' is required`,
            # not `steps[3] > fill > id`, as if id were inside fill.
            loc, message = _holder(data, loc[:-1], item["input"]), f"{loc[-1]!r} is required"
        line = line_of(node, loc)
        where = f"{path}:{line}" if line else str(path)
        text = f"{where}: {describe_loc(data, loc)}: {message}" if loc else f"{where}: {message}"
        if text not in lines:  # union members can report the same problem each
            lines.append(text)
    return "\n".join(lines)


def _holder(data: Any, loc: tuple[int | str, ...], value: Any) -> tuple[int | str, ...]:
    """The longest start of `loc` at which `data` holds `value` (the mapping a field is
    missing from); `loc` itself when none does. It drops a union tag that `_without_tags`
    cannot tell from a field when the field after it is missing."""
    for end in range(len(loc), -1, -1):
        if _at(data, loc[:end]) == value:
            return loc[:end]
    return loc


def _at(data: Any, loc: tuple[int | str, ...]) -> Any:
    for part in loc:
        if isinstance(part, int) and isinstance(data, list) and 0 <= part < len(data):
            data = data[part]
        elif isinstance(part, str) and isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


def load_model(path: Path, model: type[M], text: str | None = None) -> M:
    """Read `path` (unless its `text` is given) and validate it as `model`; raise ScriptInvalid
    naming file, line and field."""
    data, node = read_yaml(path, text)
    if not isinstance(data, dict):
        raise ScriptInvalid(f"{path}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ScriptInvalid(format_validation_error(path, data, node, exc, model)) from exc
