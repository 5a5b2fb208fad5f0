"""YAML loading that keeps line numbers and refuses duplicate keys."""
from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, SequenceNode

from runner.errors import SpecError


def path_str(path: tuple) -> str:
    """Render a key path like ``grid.prune.ratio[1]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML into plain Python values plus ``{key path: line}``; raise SpecError on bad YAML."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, mark.line + 1 if mark else None, None, f"not valid YAML: {problem}") from None
    lines: dict[str, int] = {}
    constructor = yaml.SafeLoader("")

    def scalar(node):
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise SpecError(source, node.start_mark.line + 1, None, f"not valid YAML: {exc}") from None

    def walk(node, path: tuple):
        lines[path_str(path)] = node.start_mark.line + 1
        if isinstance(node, MappingNode):
            out: dict = {}
            for key_node, value_node in node.value:
                key = scalar(key_node)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise SpecError(source, line, path_str(path) or None, f"keys must be text, got {key!r}")
                if key in out:
                    first = lines[path_str(path + (key,))]
                    raise SpecError(source, line, path_str(path + (key,)),
                                    f"duplicate key (first given on line {first})")
                out[key] = walk(value_node, path + (key,))
                lines[path_str(path + (key,))] = line
            return out
        if isinstance(node, SequenceNode):
            return [walk(item, path + (i,)) for i, item in enumerate(node.value)]
        return scalar(node)

    return (None if root is None else walk(root, ())), lines
