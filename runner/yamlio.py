"""YAML loading that keeps line numbers, refuses duplicate keys and stays bounded on any input."""
from __future__ import annotations

import collections
import copy
import re
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from runner.errors import SpecError, allowed
from runner.limits import MAX_DEPTH, MAX_VALUES, printable

MERGE_TAG = "tag:yaml.org,2002:merge"
MAP_TAG = "tag:yaml.org,2002:map"
SEQ_TAG = "tag:yaml.org,2002:seq"
STR_TAG = "tag:yaml.org,2002:str"


class LimitError(yaml.MarkedYAMLError):
    """A document beyond what a sweep file needs: nested too deep, or aliases expanding too far."""


class SweepLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a number (PyYAML's YAML 1.1 reads it as text) and limits nesting.

    PyYAML's composer recurses once per level, so 20,000 nested ``[`` overflowed Python's stack;
    the limit stops it after a few dozen events instead.
    """

    copy_aliases = False

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        """Compose one node, counting depth; an alias becomes a copy marked with its own place."""
        if self.check_event(AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            if not self.copy_aliases:
                return node
            # A copy shares the anchored node's children but knows where the alias was written,
            # so errors and the expansion budget can point at the alias, not at the anchor.
            alias = copy.copy(node)
            alias.start_mark, alias.end_mark, alias.alias = event.start_mark, event.end_mark, event.anchor
            return alias
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise LimitError(None, None, f"nested more than {MAX_DEPTH} levels deep; a sweep file needs a few",
                                 self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _FileLoader(SweepLoader):
    """The loader of whole sweep files, whose nodes are walked by ``load_yaml`` (not PyYAML's constructor)."""

    copy_aliases = True


def path_str(path: tuple) -> str:
    """Render a key path like ``grid.prune.ratio[1]``."""
    out = ""
    for part in path:
        part = part if isinstance(part, int) else printable(part)  # keys may hold control characters
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
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


def _children(node: Node) -> list[tuple[Any, Node]]:
    """A collection's child nodes with their path part (a key, an index, or None for merges and keys)."""
    if isinstance(node, SequenceNode):
        return list(enumerate(node.value))
    if isinstance(node, MappingNode):
        out = []
        for key_node, value_node in node.value:
            plain = isinstance(key_node, ScalarNode) and key_node.tag == STR_TAG
            out += [(None, key_node), (key_node.value if plain else None, value_node)]
        return out
    return []


def _measure(root: Node) -> dict[int, tuple[int, int]]:
    """Values and depth of every collection once aliases are expanded, in time linear in the text.

    Keyed by the id of the shared child list, so an alias and its anchor are measured once. Nodes
    are visited in document order, where an alias always follows its completed anchor, so the
    recursion is as deep as the written nesting (limited by the loader), not the expanded one.
    """
    memo: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def visit(node: Node) -> tuple[int, int]:
        if isinstance(node, ScalarNode):
            return 1, 1
        key = id(node.value)
        if key in memo:
            return memo[key]
        if key in active:  # a recursive alias: load_yaml's walk reports it with its key
            return 1, 1
        active.add(key)
        size, depth = 1, 0
        for _, child in _children(node):
            child_size, child_depth = visit(child)
            size, depth = size + child_size, max(depth, child_depth)
        active.discard(key)
        memo[key] = (size, depth + 1)
        return memo[key]

    visit(root)
    return memo


def _blame(root: Node, memo: dict, measure) -> tuple[Node, tuple]:
    """Follow the biggest (or deepest) child from the root down to the first alias that makes it so."""
    node, path = root, ()
    while getattr(node, "alias", None) is None:
        kids = [(part, kid) for part, kid in _children(node) if not isinstance(kid, ScalarNode)]
        if not kids:
            break
        part, node = max(kids, key=lambda pk: measure(memo[id(pk[1].value)]) if id(pk[1].value) in memo else 0)
        path += () if part is None else (part,)
    return node, path


def check_expansion(root: Node | None, what: str = "the file") -> tuple[Node, tuple, str] | None:
    """Where and why a document expands beyond MAX_VALUES values or MAX_DEPTH levels ('billion laughs')."""
    if root is None or isinstance(root, ScalarNode):
        return None
    memo = _measure(root)
    size, depth = memo[id(root.value)]
    if size > MAX_VALUES:
        node, path = _blame(root, memo, lambda m: m[0])
        alias = getattr(node, "alias", None)
        if alias is None:
            return root, (), f"{what} holds {size:,} values once aliases are expanded; at most {MAX_VALUES:,}"
        return node, path, (f"aliases expand {what} to {size:,} values (alias *{printable(alias)} here); "
                            f"at most {MAX_VALUES:,}: write the values out or use fewer aliases")
    if depth > MAX_DEPTH:
        node, path = _blame(root, memo, lambda m: m[1])
        alias = getattr(node, "alias", None)
        here = f" (alias *{printable(alias)} here)" if alias is not None else ""
        return node, path, f"aliases nest values {depth} levels deep{here}; at most {MAX_DEPTH}"
    return None


def parse_value(text: str) -> Any:
    """Parse one YAML value (a ``--set`` override) the way sweep files are read, within the same limits."""
    loader = SweepLoader(text)
    try:
        node = loader.get_single_node()
        problem = check_expansion(node, "the value")
        if problem:
            raise LimitError(None, None, problem[2], problem[0].start_mark)
        try:
            return None if node is None else loader.construct_document(node)
        except (ValueError, OverflowError) as exc:  # 5,000-digit integers, a 13th month
            raise yaml.constructor.ConstructorError(None, None, str(exc), node.start_mark) from None
    finally:
        loader.dispose()


def _mapping_keys(node: MappingNode) -> list[tuple[str, Node, Node]]:
    """A mapping's text keys with their key and value nodes, merged ones after its own, walking no value."""
    out, seen, todo = [], set(), collections.deque([node])
    while todo:  # a loop, not recursion: merge chains are not limited yet at this point
        current = todo.popleft()
        if id(current.value) in seen:
            continue
        seen.add(id(current.value))
        for key_node, value_node in current.value:
            if key_node.tag == MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                todo.extend(src for src in sources if isinstance(src, MappingNode))
            elif isinstance(key_node, ScalarNode) and key_node.tag == STR_TAG:
                out.append((key_node.value, key_node, value_node))
    return out


def _value_of(node: Node | None, key: str) -> Node | None:
    """The value node of ``key`` in a mapping node (None if not a mapping or no such key)."""
    if not isinstance(node, MappingNode):
        return None
    return next((value for k, _, value in _mapping_keys(node) if k == key), None)


def check_keys(root: Node | None, source: str, known: dict[tuple, tuple[str, Any]]) -> None:
    """Refuse unknown keys of the mappings in ``known`` ({path: (what, allowed keys)}) before expanding aliases."""
    for path, (what, keys) in sorted(known.items(), key=lambda item: len(item[0])):
        node = root
        for part in path:
            node = _value_of(node, part)
        if not isinstance(node, MappingNode):
            continue
        for key, key_node, _ in _mapping_keys(node):
            if key not in keys:
                raise SpecError(source, key_node.start_mark.line + 1, path_str(path + (key,)),
                                f"unknown {what} '{printable(key)}'; {allowed(keys, key)}")


def _compose(text: str, source: str) -> Node | None:
    """The document's node graph, or SpecError for bad YAML and nesting beyond the limit."""
    try:
        loader = _FileLoader(text)  # the reader refuses unprintable characters right here
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except LimitError as exc:
        raise SpecError(source, exc.problem_mark.line + 1, None, exc.problem) from None
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc, text)
        raise SpecError(source, line, None, f"not valid YAML: {problem}") from None


def load_yaml(text: str, source: str, known: dict[tuple, tuple[str, Any]] | None = None
              ) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML into plain Python values plus ``{key path: line}``; raise SpecError on bad YAML.

    Key paths are tuples such as ``("grid", "prune.ratio", 1)``: unlike their rendering, they keep
    ``prune: {ratio: ...}`` and ``prune.ratio: ...`` apart. ``known`` names mappings whose keys
    are checked first, so that a typo is reported even where aliases would expand too far.
    """
    root = _compose(text, source)
    check_keys(root, source, known or {})
    problem = check_expansion(root)
    if problem:
        node, path, message = problem
        raise SpecError(source, node.start_mark.line + 1, path_str(path) or None, message)
    lines: dict[tuple, int] = {}
    constructor = SweepLoader("")
    active: set[int] = set()  # child lists of the collections being walked, to catch recursive aliases

    def scalar(node, path: tuple):
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            _, problem = yaml_problem(exc)
            raise SpecError(source, node.start_mark.line + 1, path_str(path) or None,
                            f"not valid YAML: {problem}") from None
        except (ValueError, OverflowError) as exc:  # 5,000-digit integers, a 13th month
            raise SpecError(source, node.start_mark.line + 1, path_str(path) or None,
                            f"not a valid value: {printable(exc, 200)}") from None

    def key_of(key_node, path: tuple) -> str:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, ScalarNode):
            raise SpecError(source, line, path_str(path) or None, "keys must be text, got a list or mapping")
        key = scalar(key_node, path)
        if not isinstance(key, str):
            raise SpecError(source, line, path_str(path) or None, f"keys must be text, got {key!r}")
        return key

    def pairs(node: MappingNode, path: tuple, merging: frozenset = frozenset()) -> tuple[list, list]:
        """A mapping's own (key, value) nodes, and those merged in with ``<<`` (earlier sources first)."""
        merging = merging | {id(node.value)}
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
                if id(src.value) in active or id(src.value) in merging:
                    raise SpecError(source, key_node.start_mark.line + 1, path_str(path) or None,
                                    "recursive alias: a mapping cannot merge itself")
                src_own, src_merged = pairs(src, path, merging)
                merged += src_own + src_merged
        return own, merged

    def walk(node, path: tuple):
        if not isinstance(node, ScalarNode) and id(node.value) in active:
            raise SpecError(source, node.start_mark.line + 1, path_str(path) or None,
                            "recursive alias: a value cannot contain itself")
        lines[path] = node.start_mark.line + 1
        if isinstance(node, (MappingNode, SequenceNode)) and node.tag not in (MAP_TAG, SEQ_TAG):
            raise SpecError(source, node.start_mark.line + 1, path_str(path) or None,
                            f"not valid YAML: unsupported tag '{printable(node.tag)}'; write a plain mapping or list")
        if isinstance(node, MappingNode):
            active.add(id(node.value))
            out: dict = {}
            own, merged = pairs(node, path)
            for key_node, value_node in own:
                key = key_of(key_node, path)
                line = key_node.start_mark.line + 1
                if key in out:
                    first = lines[path + (key,)]
                    raise SpecError(source, line, path_str(path + (key,)),
                                    f"duplicate key (first given on line {first})")
                out[key] = walk(value_node, path + (key,))
                lines[path + (key,)] = line
            for key_node, value_node in merged:  # a mapping's own keys win over merged ones
                key = key_of(key_node, path)
                if key not in out:
                    out[key] = walk(value_node, path + (key,))
                    lines[path + (key,)] = key_node.start_mark.line + 1
            active.discard(id(node.value))
            return out
        if isinstance(node, SequenceNode):
            active.add(id(node.value))
            out_list = [walk(item, path + (i,)) for i, item in enumerate(node.value)]
            active.discard(id(node.value))
            return out_list
        return scalar(node, path)

    return (None if root is None else walk(root, ())), lines
