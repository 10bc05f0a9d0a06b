"""Secret: credentials (fence passwords, CHAP secrets) referenced by name, never printed."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .meta import Resource, Status, Strict

SecretKey = Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]{1,253}$")]
SecretValue = Annotated[str, StringConstraints(pattern=r"^[^\n\r\x00]*$", max_length=4096)]


class SecretSpec(Strict):
    data: dict[SecretKey, SecretValue] = Field(default_factory=dict)


class Secret(Resource[SecretSpec, Status]):
    kind: Literal["Secret"] = "Secret"
    status: Status = Field(default_factory=Status)
