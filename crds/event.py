"""Event: something that happened to an object, aggregated when it repeats."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .meta import Line, Name, Resource, Status, Strict, Text, Time, now

EventType = Literal["Normal", "Warning"]


class ObjectReference(Strict):
    kind: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z0-9]{0,62}$")]
    name: Name
    uid: Line | None = None


class EventSource(Strict):
    component: Line
    node: Line | None = None


class EventSpec(Strict):
    involved_object: ObjectReference = Field(alias="involvedObject")
    reason: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=64)]
    type: EventType = "Normal"
    message: Text = ""
    source: EventSource
    count: int = Field(default=1, ge=1, le=2**31 - 1)
    """How many times it happened (at most 2^31 - 1)."""
    first_timestamp: Time = Field(default_factory=now, alias="firstTimestamp")
    last_timestamp: Time = Field(default_factory=now, alias="lastTimestamp")


class Event(Resource[EventSpec, Status]):
    kind: Literal["Event"] = "Event"
    status: Status = Field(default_factory=Status)
