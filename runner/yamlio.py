"""YAML loading that keeps line numbers and refuses duplicate keys."""
from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, SequenceNode

from runner.errors import SpecError

MERGE_TAG = "tag:yaml.org,2002:merge"
MAP_TAG = "tag:yaml.org,2002:map"
SEQ_TAG = "tag:yaml.org,2002:seq"


class SweepLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` and ``1.0e3`` as numbers (PyYAML's YAML 1.1 reads them as text)."""


SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def path_str(path: tuple) -> str:
    """Render a key path like ``grid.prune.ratio[1]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def yaml_problem(exc: yaml.YAMLError, text: str | None = None) -> tuple[int | None, str]:
    """One line describing a YAML error, and the line it points at (None if unknown)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses, known by its offset
        line = text[:exc.position].count("\n") + 1 if text is not None else None
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return line, f"unacceptable character {char}: {exc.reason}"
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    pmark = getattr(exc, "problem_mark", None)
    cmark = getattr(exc, "context_mark", None)
    mark = pmark or cmark
    line = mark.line + 1 if mark else None
    if not problem:
        return line, " ".join(str(exc).split())
    if context and context.startswith("while"):
        if cmark is not None and pmark is not None and cmark.line != pmark.line:
            problem = f"{problem} ({context} on line {cmark.line + 1})"
    elif context:
        problem = f"{context}, {problem}"
    if "'\\t'" in problem:
        problem += "; indent with spaces, not tabs"
    return line, " ".join(problem.split())


def parse_value(text: str) -> Any:
    """Parse one YAML value (a ``--set`` override) the way sweep files are read."""
    return yaml.load(text, Loader=SweepLoader)  # noqa: S506 - SweepLoader is a SafeLoader


def load_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML into plain Python values plus ``{key path: line}``; raise SpecError on bad YAML.

    Key paths are tuples such as ``("grid", "prune.ratio", 1)``: unlike their rendering, they keep
    ``prune: {ratio: ...}`` and ``prune.ratio: ...`` apart.
    """
    try:
        root = yaml.compose(text, Loader=SweepLoader)
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc, text)
        raise SpecError(source, line, None, f"not valid YAML: {problem}") from None
    lines: dict[tuple, int] = {}
    constructor = SweepLoader("")
    active: set[int] = set()  # collection nodes being walked, to catch recursive aliases

    def scalar(node, path: tuple):
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            _, problem = yaml_problem(exc)
            raise SpecError(source, node.start_mark.line + 1, path_str(path) or None,
                            f"not valid YAML: {problem}") from None

    def pairs(node: MappingNode, path: tuple, merging: frozenset = frozenset()) -> tuple[list, list]:
        """A mapping's own (key, value) nodes, and those merged in with ``<<`` (earlier sources first)."""
        merging = merging | {id(node)}
        own, merged = [], []
        for key_node, value_node in node.value:
            if key_node.tag != MERGE_TAG:
                own.append((key_node, value_node))
                continue
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for src in sources:
                if not isinstance(src, MappingNode):
                    raise SpecError(source, key_node.start_mark.line + 1, path_str(path) or None,
                                    "a merge key (<<) takes a mapping or a list of mappings")
                if id(src) in active or id(src) in merging:
                    raise SpecError(source, key_node.start_mark.line + 1, path_str(path) or None,
                                    "recursive alias: a mapping cannot merge itself")
                src_own, src_merged = pairs(src, path, merging)
                merged += src_own + src_merged
        return own, merged

    def walk(node, path: tuple):
        if id(node) in active:
            raise SpecError(source, node.start_mark.line + 1, path_str(path) or None,
                            "recursive alias: a value cannot contain itself")
        lines[path] = node.start_mark.line + 1
        if isinstance(node, (MappingNode, SequenceNode)) and node.tag not in (MAP_TAG, SEQ_TAG):
            raise SpecError(source, node.start_mark.line + 1, path_str(path) or None,
                            f"not valid YAML: unsupported tag '{node.tag}'; write a plain mapping or list")
        if isinstance(node, MappingNode):
            active.add(id(node))
            out: dict = {}
            own, merged = pairs(node, path)
            for key_node, value_node in own:
                key = scalar(key_node, path)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise SpecError(source, line, path_str(path) or None, f"keys must be text, got {key!r}")
                if key in out:
                    first = lines[path + (key,)]
                    raise SpecError(source, line, path_str(path + (key,)),
                                    f"duplicate key (first given on line {first})")
                out[key] = walk(value_node, path + (key,))
                lines[path + (key,)] = line
            for key_node, value_node in merged:  # a mapping's own keys win over merged ones
                key = scalar(key_node, path)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise SpecError(source, line, path_str(path) or None, f"keys must be text, got {key!r}")
                if key not in out:
                    out[key] = walk(value_node, path + (key,))
                    lines[path + (key,)] = line
            active.discard(id(node))
            return out
        if isinstance(node, SequenceNode):
            active.add(id(node))
            out_list = [walk(item, path + (i,)) for i, item in enumerate(node.value)]
            active.discard(id(node))
            return out_list
        return scalar(node, path)

    return (None if root is None else walk(root, ())), lines
