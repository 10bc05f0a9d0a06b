"""The JSONPath templates of `kvmctl get -o jsonpath=`, `-o custom-columns=` and `--sort-by`.

kubectl's subset: text with `{expression}` parts, where an expression is `.field`,
`['field']`, `[N]` (negative counts from the end), `[*]`, a filter `[?(@.path=="value")]`
(or `!=`), a literal `{"\\t"}`, or `{range EXPR}...{end}` repeating its body for each match.
Several matches print separated by spaces. A malformed template raises `JsonPathError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(
    r"""\.\.|\.(?P<field>[A-Za-z0-9_-]+)|\.|\[(?:(?P<index>-?[0-9]+)|(?P<star>\*)"""
    r"""|'(?P<sq>[^']*)'|"(?P<dq>[^"]*)"|\?\(@(?P<filter>[^)]*?)(?P<op>==|!=)"""
    r"""(?:"(?P<fdq>[^"]*)"|'(?P<fsq>[^']*)'|(?P<fnum>-?[0-9.]+))\))\]"""
)


class JsonPathError(ValueError):
    """A template that is not valid JSONPath."""


@dataclass(frozen=True)
class _Step:
    kind: str  # field, index, star, filter
    value: Any = None
    path: tuple[_Step, ...] = ()
    op: str = "=="


def _parse_path(text: str) -> tuple[_Step, ...]:
    """`.a.b[0]` (a leading `$` or no dot before the first field is accepted)."""
    source = text.strip()
    if source.startswith("$"):
        source = source[1:]
    if source and source[0] not in ".[":
        source = "." + source
    steps: list[_Step] = []
    position = 0
    while position < len(source):
        match = _TOKEN.match(source, position)
        if match is None or match.group(0) in ("..", "."):
            if source[position:] == "." and not steps:  # `{.}`: the whole document
                break
            raise JsonPathError(f"jsonpath {text!r}: cannot parse at {source[position:]!r}")
        position = match.end()
        groups = match.groupdict()
        if groups["field"] is not None:
            steps.append(_Step("field", groups["field"]))
        elif groups["sq"] is not None or groups["dq"] is not None:
            steps.append(_Step("field", groups["sq"] if groups["sq"] is not None else groups["dq"]))
        elif groups["index"] is not None:
            steps.append(_Step("index", int(groups["index"])))
        elif groups["star"] is not None:
            steps.append(_Step("star"))
        else:
            wanted: Any = groups["fdq"] if groups["fdq"] is not None else groups["fsq"]
            if groups["fnum"] is not None:
                wanted = float(groups["fnum"])
            inner = _parse_path(groups["filter"]) if groups["filter"] else ()
            steps.append(_Step("filter", wanted, inner, groups["op"]))
    return tuple(steps)


def _walk(value: Any, steps: tuple[_Step, ...]) -> Iterator[Any]:
    if not steps:
        yield value
        return
    step, rest = steps[0], steps[1:]
    if step.kind == "field":
        if isinstance(value, dict) and step.value in value:
            yield from _walk(value[step.value], rest)
    elif step.kind == "index":
        if isinstance(value, list) and -len(value) <= step.value < len(value):
            yield from _walk(value[step.value], rest)
    else:
        if not isinstance(value, list | dict):
            return
        for item in value if isinstance(value, list) else value.values():
            if step.kind == "star" or _matches(item, step):
                yield from _walk(item, rest)


def _matches(item: Any, step: _Step) -> bool:
    found = list(_walk(item, step.path))
    if not found:
        return step.op == "!="
    value = found[0]
    if isinstance(step.value, float) and isinstance(value, int | float):
        equal = float(value) == step.value
    else:
        equal = str(value) == str(step.value)
    return equal if step.op == "==" else not equal


def values(document: Any, path: str) -> list[Any]:
    """Every value `path` (with or without braces) matches in `document`."""
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    return list(_walk(document, _parse_path(text)))


def text_of(value: Any) -> str:
    """A value as kubectl prints it: strings bare, everything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


_PART = re.compile(r"\{([^{}]*)\}")


def _pieces(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("expr", s) pieces of a template."""
    pieces: list[tuple[str, str]] = []
    position = 0
    for match in _PART.finditer(template):
        if match.start() > position:
            pieces.append(("text", template[position : match.start()]))
        pieces.append(("expr", match.group(1).strip()))
        position = match.end()
    rest = template[position:]
    if "{" in rest or "}" in rest:
        raise JsonPathError(f"jsonpath {template!r}: unbalanced braces")
    if rest:
        pieces.append(("text", rest))
    return pieces


def _render(document: Any, pieces: list[tuple[str, str]], template: str) -> tuple[str, int]:
    out: list[str] = []
    index = 0
    while index < len(pieces):
        kind, text = pieces[index]
        index += 1
        if kind == "text":
            out.append(text.replace("\\n", "\n").replace("\\t", "\t"))
        elif len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # {"\t"}: a literal
            out.append(text[1:-1].replace("\\n", "\n").replace("\\t", "\t"))
        elif text == "end":
            return "".join(out), index
        elif text.startswith("range "):
            body = pieces[index:]
            rendered, used = "", 0
            items = list(_walk(document, _parse_path(text[len("range ") :])))
            for item in items:
                rendered_item, used = _render(item, body, template)
                rendered += rendered_item
            if not items:
                _, used = _render({}, body, template)
            if used == 0 or pieces[index + used - 1] != ("expr", "end"):
                raise JsonPathError(f"jsonpath {template!r}: {{range}} without {{end}}")
            out.append(rendered)
            index += used
        else:
            out.append(" ".join(text_of(v) for v in _walk(document, _parse_path(text))))
    return "".join(out), 0


def render(document: Any, template: str) -> str:
    """The template filled in from `document`."""
    text, stopped = _render(document, _pieces(template), template)
    if stopped:
        raise JsonPathError(f"jsonpath {template!r}: {{end}} without {{range}}")
    return text


def check(template: str) -> None:
    """Raise JsonPathError unless `template` parses (before anything is read)."""
    render({}, template)
