"""Hostile input: the limits, the hardened YAML loader, and the line map.

A config file is input, and input can be hostile, so file size, nesting depth and
alias expansion are capped before anything walks the document; the same depth and
size limits bound config given as Python data (``_check_data``). Every refusal, and
every parser error, is a ``ConfigError`` with the file and, where known, the 1-based
line; whichever parser (libyaml's or PyYAML's own) refuses deep nesting, the user
reads lbpool's one message. ``_line_map`` gives each field path its line, for
validation errors.

``_Loader`` is the loader class used (libyaml's parser when PyYAML has it, else the
pure-Python one); tests patch it here to run with either.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from lbpool.config.types import Loc, _dotted, _show
from lbpool.errors import ConfigError, ConfigProblem

#: A config file larger than this is refused before parsing.
MAX_FILE_BYTES = 1 << 20
#: Nesting deeper than this (mappings, lists and scalars, aliases followed) is refused.
MAX_DEPTH = 64
#: A YAML document expanding to more nodes than this (aliases counted at every use) is
#: refused: it stops "billion laughs" documents before anything walks them.
MAX_YAML_NODES = 10_000
#: The same guard for configs given as Python data (which cannot be hostile YAML, but
#: may still be absurd); generous so large generated configs pass.
MAX_DATA_NODES = 200_000


class _LimitExceeded(Exception):
    def __init__(self, message: str, line: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path


class _LimitedComposer(Composer):
    """Composer that refuses documents nested too deeply or with too many nodes.

    Also gives a line to errors raised while constructing a value (a timestamp or an
    int that does not parse), which PyYAML would raise unmarked.
    """

    _lbpool_depth = 0
    _lbpool_nodes = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._lbpool_depth += 1
        self._lbpool_nodes += 1
        try:
            if self._lbpool_depth > MAX_DEPTH or self._lbpool_nodes > MAX_YAML_NODES:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                line = mark.line + 1 if mark is not None else None
                if self._lbpool_depth > MAX_DEPTH:
                    raise _LimitExceeded(f"nested more than {MAX_DEPTH} levels deep", line)
                raise _LimitExceeded(f"document has more than {MAX_YAML_NODES} nodes", line)
            return super().compose_node(parent, index)
        finally:
            self._lbpool_depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except (yaml.YAMLError, _LimitExceeded):
            raise
        except Exception as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ConstructorError(
                None, None, f"cannot read this value: {detail}", node.start_mark
            ) from None


class _YAMLLoader(Protocol):
    def get_single_node(self) -> Node | None: ...
    def construct_document(self, node: Node) -> Any: ...
    def dispose(self) -> None: ...


class _PyLoader(_LimitedComposer, yaml.SafeLoader):
    """Pure-Python safe loader with limits (PyYAML's reader, scanner and parser)."""


_Loader: Callable[[str], _YAMLLoader] = _PyLoader
try:
    from yaml._yaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    pass
else:

    class _CLoader(_LimitedComposer, CParser, SafeConstructor, Resolver):
        """libyaml's parser (fast), Python composition with limits, safe construction."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _Loader = _CLoader


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _check_nodes(root: Node, source: str) -> list[ConfigProblem]:
    """Check the node graph before construction: size with aliases expanded, depth,
    recursion, string keys, duplicate keys. Memoized, so cheap even for alias bombs."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (height, expanded size)
    active: set[int] = set()
    problems: list[ConfigProblem] = []

    def visit(node: Node, depth: int, path: Loc) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise _LimitExceeded(
                f"nested more than {MAX_DEPTH} levels deep (aliases included)", _line(node)
            )
        key = id(node)
        if key in active:
            raise _LimitExceeded("an alias refers to the node containing it", _line(node))
        known = sizes.get(key)
        if known is None:
            active.add(key)
            height, size = 1, 1
            children: list[tuple[Node, Loc]] = []
            if isinstance(node, MappingNode):
                for key_node, value_node in node.value:
                    if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE_TAG:
                        children.append((value_node, path))
                        continue
                    if not (isinstance(key_node, ScalarNode) and key_node.tag == _STR_TAG):
                        hint = ""
                        if isinstance(key_node, SequenceNode):
                            hint = ' (quote IPv6 addresses: "[::1]:6379")'
                        what = "a collection"
                        if isinstance(key_node, ScalarNode):
                            kind = str(key_node.tag).rsplit(":", 1)[-1]
                            what = f"{str(key_node.value)[:40]!r} (read as {kind}; quote it)"
                        problems.append(
                            ConfigProblem(
                                source,
                                _line(key_node),
                                _dotted(path),
                                f"mapping keys must be strings, got {what}{hint}",
                            )
                        )
                        children.append((key_node, path))
                        children.append((value_node, path))
                        continue
                    children.append((value_node, (*path, str(key_node.value))))
                for name, line, first_line in _duplicate_keys(node):
                    problems.append(
                        ConfigProblem(
                            source,
                            line,
                            _dotted((*path, name)),
                            f"duplicate key (first given at line {first_line})",
                        )
                    )
            elif isinstance(node, SequenceNode):
                children = [(item, (*path, i)) for i, item in enumerate(node.value)]
            for child, child_path in children:
                child_height, child_size = visit(child, depth + 1, child_path)
                height = max(height, child_height + 1)
                size += child_size
                if size > MAX_YAML_NODES:
                    raise _LimitExceeded(
                        f"document expands to more than {MAX_YAML_NODES} nodes "
                        "(aliases counted at every use)",
                        _line(node),
                    )
            active.discard(key)
            known = sizes[key] = (height, size)
        if depth + known[0] - 1 > MAX_DEPTH:
            raise _LimitExceeded(
                f"nested more than {MAX_DEPTH} levels deep (aliases included)", _line(node)
            )
        return known

    visit(root, 1, ())
    return problems


def _duplicate_keys(node: MappingNode) -> list[tuple[str, int, int]]:
    first: dict[str, int] = {}
    found: list[tuple[str, int, int]] = []
    for key_node, _ in node.value:
        if isinstance(key_node, ScalarNode) and key_node.tag == _STR_TAG:
            name = str(key_node.value)
            if name in first:
                found.append((name, _line(key_node), first[name]))
            else:
                first[name] = _line(key_node)
    return found


def _line_map(root: Node) -> dict[Loc, int]:
    """Field path -> 1-based line, from the (constructed, merge-flattened) node tree."""
    lines: dict[Loc, int] = {(): _line(root)}

    def walk(node: Node, path: Loc, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.tag == _STR_TAG:
                    child: Loc = (*path, str(key_node.value))
                    lines[child] = _line(key_node)
                    walk(value_node, child, depth + 1)
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                lines[child] = _line(item)
                walk(item, child, depth + 1)

    walk(root, (), 1)
    return lines


_BARE_IPV6_RE = re.compile(r"(?<![\"'])\[[0-9A-Fa-f.%:]*:[0-9A-Fa-f.%:]*\]:\d")


def _yaml_problem(
    exc: Exception, source: str, text: str, *, byte_offsets: bool = True
) -> ConfigProblem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        parts = [p for p in (exc.context, exc.problem) if p]
        detail = ", ".join(parts) if parts else "malformed document"
        if line is not None:
            text_lines = text.splitlines()
            if line <= len(text_lines) and _BARE_IPV6_RE.search(text_lines[line - 1][:1000]):
                detail += ' (quote IPv6 addresses: "[::1]:6379")'
        return ConfigProblem(source, line, "", f"invalid YAML: {detail}")
    if isinstance(exc, yaml.reader.ReaderError):
        position = exc.position if isinstance(exc.position, int) else None
        line = None
        if position is not None and byte_offsets:  # libyaml counts bytes
            line = text.encode("utf-8", "surrogatepass")[:position].count(b"\n") + 1
        elif position is not None:  # PyYAML's reader counts characters
            line = text[:position].count("\n") + 1
        return ConfigProblem(source, line, "", f"invalid YAML: {exc.reason}")
    if isinstance(exc, RecursionError):
        return ConfigProblem(source, None, "", "invalid YAML: nested too deeply")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigProblem(source, None, "", f"invalid YAML: {detail[:200]}")


_FLOW_START = (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken)
_FLOW_END = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken)


def _flow_depth_line(text: str) -> int | None:
    """The 1-based line where flow collections (``[`` / ``{``) nest past ``MAX_DEPTH``,
    or None.

    Parsers refuse very deep flow nesting themselves, each with its own wording and limit
    (libyaml since 0.2.5 does, before lbpool's composer sees the node); when a parser
    fails, this tells whether the document was simply nested too deeply, so the user
    reads lbpool's one message whatever parser or version refused it. It reads PyYAML's
    pure-Python scanner's tokens, so brackets inside plain, quoted and block scalars
    and comments are text, as they are to the parser; it stops at the first token past
    the limit (the scanner keeps state per open level, so it never scans deep), and a
    scanner error before that means the document's problem is something else.
    """
    depth = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, _FLOW_START):
                depth += 1
                if depth > MAX_DEPTH:
                    return int(token.start_mark.line) + 1
            elif isinstance(token, _FLOW_END):
                depth -= 1
    except Exception:  # a scanner error (or worse) before the limit: not a depth problem
        return None
    return None


def _parse_failure(
    exc: Exception, source: str, text: str, *, byte_offsets: bool = True
) -> ConfigError:
    """The ConfigError for a parser's refusal: lbpool's own depth message when the
    document nests too deeply (whatever the parser said), else the parser's problem."""
    deep_at = _flow_depth_line(text)
    if deep_at is not None:
        message = f"nested more than {MAX_DEPTH} levels deep"
        return ConfigError([ConfigProblem(source, deep_at, "", message)])
    return ConfigError([_yaml_problem(exc, source, text, byte_offsets=byte_offsets)])


def _load_yaml(text: str, source: str) -> tuple[object, dict[Loc, int]]:
    """Parse ``text`` safely; return the data and a path -> line map."""
    try:
        loader = _Loader(text)
    except Exception as exc:
        raise _parse_failure(exc, source, text) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(
                [
                    ConfigProblem(
                        source,
                        1,
                        "",
                        "the file holds no configuration "
                        "(expected a mapping with 'defaults' and/or 'backends')",
                    )
                ]
            )
        problems = _check_nodes(node, source)
        if problems:
            raise ConfigError(problems)
        data = loader.construct_document(node)
        return data, _line_map(node)
    except ConfigError:
        raise
    except _LimitExceeded as exc:
        raise ConfigError([ConfigProblem(source, exc.line, exc.path, exc.message)]) from None
    except Exception as exc:  # YAMLError, RecursionError, ValueError from bad scalars...
        byte_offsets = not isinstance(loader, yaml.reader.Reader)
        raise _parse_failure(exc, source, text, byte_offsets=byte_offsets) from None
    finally:
        loader.dispose()


def _check_data(data: Mapping[Any, Any], source: str) -> None:
    """Bound depth and size of Python data and require string keys, before pydantic."""
    problems: list[ConfigProblem] = []
    count = 0

    def visit(value: object, path: Loc, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_DATA_NODES:
            raise _LimitExceeded(
                f"config has more than {MAX_DATA_NODES} values", path=_dotted(path)
            )
        if depth > MAX_DEPTH:
            raise _LimitExceeded(f"nested more than {MAX_DEPTH} levels deep", path=_dotted(path))
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    problems.append(
                        ConfigProblem(
                            source,
                            None,
                            _dotted((*path, _show(key))),
                            f"mapping keys must be strings, got {_show(key)}",
                        )
                    )
                    continue
                visit(item, (*path, key), depth + 1)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, (*path, index), depth + 1)

    try:
        visit(data, (), 1)
    except _LimitExceeded as exc:
        raise ConfigError([ConfigProblem(source, None, exc.path, exc.message)]) from None
    if problems:
        raise ConfigError(problems)
