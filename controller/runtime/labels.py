"""Label selectors as kubectl writes them: `app=web,tier!=db,env in (a,b),!legacy,zone`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Selector = Callable[[Mapping[str, str]], bool]

_TERM = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<absent>[\w./-]+)"
    r"|(?P<setkey>[\w./-]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<eq>==|=|!=)\s*(?P<value>[\w.-]*))?)\s*(?:,|$)"
)


def parse_selector(text: str) -> Selector:
    """A predicate over labels. Raises ValueError naming the bad part."""
    terms: list[Selector] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"label selector {text!r}: cannot parse at {text[position:]!r}")
        terms.append(_term(match))
        position = match.end()
    return lambda labels: all(term(labels) for term in terms)


def _term(match: re.Match[str]) -> Selector:
    if match["absent"]:
        key = match["absent"]
        return lambda labels: key not in labels
    if match["setkey"]:
        key = match["setkey"]
        values = {v.strip() for v in match["values"].split(",") if v.strip()}
        if match["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    key, op, value = match["key"], match["eq"], match["value"]
    if op is None:
        return lambda labels: key in labels
    if op == "!=":
        return lambda labels: labels.get(key) != value
    return lambda labels: labels.get(key) == value
