"""Event: something that happened to an object, aggregated when it repeats."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .meta import Resource, Status, Strict, Text, now

EventType = Literal["Normal", "Warning"]


class ObjectReference(Strict):
    kind: str
    name: str
    uid: str | None = None


class EventSource(Strict):
    component: str
    node: str | None = None


class EventSpec(Strict):
    involved_object: ObjectReference = Field(alias="involvedObject")
    reason: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=64)]
    type: EventType = "Normal"
    message: Text = ""
    source: EventSource
    count: int = 1
    first_timestamp: datetime = Field(default_factory=now, alias="firstTimestamp")
    last_timestamp: datetime = Field(default_factory=now, alias="lastTimestamp")


class Event(Resource[EventSpec, Status]):
    kind: Literal["Event"] = "Event"
    status: Status = Field(default_factory=Status)
