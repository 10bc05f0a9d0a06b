"""controller/jsonpath.py: kubectl's JSONPath templates."""

from __future__ import annotations

import pytest

from controller.jsonpath import JsonPathError, check, render, values

DOCUMENT = {
    "kind": "List",
    "items": [
        {
            "metadata": {"name": "a", "labels": {"kvmctl.io/tier": "front"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "cpus": 4},
        },
        {"metadata": {"name": "b"}, "status": {"conditions": [], "cpus": 2}},
    ],
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{.items[*].metadata.name}", "a b"),
        ("{.items[-1].metadata.name}", "b"),
        ("{.items[0].metadata.labels['kvmctl.io/tier']}", "front"),
        ('{.items[*].status.conditions[?(@.type=="Ready")].status}', "True"),
        ("{.items[?(@.status.cpus==2)].metadata.name}", "b"),
        ("{.items[?(@.metadata.name!='a')].metadata.name}", "b"),
        ('{range .items[*]}{.metadata.name}{"\\t"}{.status.cpus}{"\\n"}{end}', "a\t4\nb\t2\n"),
        ("names: {.items[*].metadata.name}!", "names: a b!"),
        ("{.items[0].metadata}", '{"name":"a","labels":{"kvmctl.io/tier":"front"}}'),
        ("{.items[5].metadata.name}", ""),
        ("{.kind}", "List"),
    ],
)
def test_templates(template: str, expected: str) -> None:
    assert render(DOCUMENT, template) == expected


@pytest.mark.parametrize(
    "template", ["{.items[", "{range .items[*]}x", "{end}", "x}", "{.a b}", "{.items[?(@.a)]}"]
)
def test_malformed_templates_are_refused(template: str) -> None:
    with pytest.raises(JsonPathError):
        check(template)


def test_values_without_braces() -> None:
    assert values(DOCUMENT, ".items[*].status.cpus") == [4, 2]
    assert values(DOCUMENT, "$.kind") == ["List"]
