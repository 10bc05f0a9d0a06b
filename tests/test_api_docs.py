"""docs/api.md is generated from the models and must be current."""

from __future__ import annotations

from crds import KINDS
from crds.docs import OUTPUT, field_docstrings, render
from crds.virtualmachine import VirtualMachineSpec


def test_checked_in_api_reference_is_current() -> None:
    assert OUTPUT.read_text(encoding="utf-8") == render(), (
        "docs/api.md is stale: regenerate it with `python -m crds.docs`"
    )


def test_every_kind_and_every_spec_field_is_documented() -> None:
    text = render()
    for kind, info in KINDS.items():
        assert f"\n## {kind}\n" in text
        spec = info.model.model_fields["spec"].annotation
        assert spec is not None
        for name, field in spec.model_fields.items():
            assert f"| `{field.alias or name}` |" in text, f"{kind}.spec.{name} missing"


def test_field_docstrings_are_the_descriptions() -> None:
    docs = field_docstrings(VirtualMachineSpec)
    assert docs["anti_affinity"] == "Names of VMs this one must not share a host with."
    assert "| `antiAffinity` | list of Name | empty |" in render()
