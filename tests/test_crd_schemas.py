"""The checked-in CustomResourceDefinitions match the models."""

from __future__ import annotations

import json

from crds.generate import rendered


def test_checked_in_crds_are_current() -> None:
    stale = [
        path.name
        for path, text in rendered().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"regenerate with `make crds`: stale {stale}"


def test_schemas_are_structural() -> None:
    for text in rendered().values():
        assert "$ref" not in text
        assert "anyOf" not in text
        assert "title:" not in text


def test_schema_is_json_serialisable() -> None:
    from crds import KINDS
    from crds.generate import crd_for

    for info in KINDS.values():
        json.dumps(crd_for(info))
