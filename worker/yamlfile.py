"""Load a YAML file into a pydantic model, with errors that name the file, line, step and field.

Scripts and selector registries are written by people; a typo must point at the exact place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from worker.errors import ScriptInvalid

M = TypeVar("M", bound=BaseModel)


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
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ScriptInvalid(f"{path}: not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
    return data, node


def line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest node on `loc` that exists in the YAML tree."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next(
                (value for key, value in node.value if getattr(key, "value", None) == part),
                None,
            )
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if 0 <= part < len(node.value) else None
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
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


def format_validation_error(
    path: Path, data: Any, node: yaml.Node | None, error: ValidationError
) -> str:
    lines = []
    for item in error.errors():
        # Discriminated-union tags (e.g. 'fill') appear in loc; they are not fields people wrote.
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("tag:")))
        line = line_of(node, loc)
        where = f"{path}:{line}" if line else str(path)
        lines.append(f"{where}: {describe_loc(data, loc)}: {item['msg']}")
    return "\n".join(lines)


def load_model(path: Path, model: type[M], text: str | None = None) -> M:
    """Read `path` (unless its `text` is given) and validate it as `model`; raise ScriptInvalid
    naming file, line and field."""
    data, node = read_yaml(path, text)
    if not isinstance(data, dict):
        raise ScriptInvalid(f"{path}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ScriptInvalid(format_validation_error(path, data, node, exc)) from exc
