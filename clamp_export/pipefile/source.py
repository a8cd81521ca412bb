"""A pipeline file read with the line of every key, so that each error can point at its line.

PyYAML builds plain data, and forgets where it came from; composing the node tree as well gives
the line of each key and value. Duplicate keys, which PyYAML silently overwrites, are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from clamp_export.errors import UserError

Key = tuple  # a path into the data: ("calibration", "seed"), ("report", "batches", 0)


@dataclass
class Source:
    """Plain data from a YAML file, and the 1-based line of each path in it."""

    name: str  # the file as the user named it, for messages
    data: object
    lines: dict[Key, int | str]  # a line number, or the --set that put the value there

    def line(self, path: Key) -> int | str | None:
        """The line of ``path``, else of its nearest parent that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def error(self, path: Key, message: str) -> UserError:
        line = self.line(path)
        if isinstance(line, str):
            return UserError(f"{self.name} ({line}): {message}")
        return UserError(f"{self.name}:{line}: {message}" if line else f"{self.name}: {message}")


def read(path: str) -> Source:
    """The file's data and lines; missing, unreadable or malformed files are one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"pipeline file {path} not found" + (" (a directory)" if p.is_dir() else "")
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (expected YAML)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    return parse(text, path)


def parse(text: str, name: str) -> Source:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark else name
        raise UserError(f"{where}: malformed YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{name}: malformed YAML: {e}") from None
    lines: dict[Key, int] = {}
    if node is not None:
        _walk(node, (), lines, name)
    return Source(name, data, lines)


def _walk(node: yaml.Node, path: Key, lines: dict[Key, int], name: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[object, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(f"{name}:{line}: duplicate key {key!r} (first on line {seen[key]})")
            seen[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, name)
