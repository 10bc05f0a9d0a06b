"""A step's actions, with each run of placements gathered to be written together.

The engine's actions are applied in order, and order matters between kinds (a node is written
Fenced before anything is placed away from it). Placements of different VMs do not depend on
each other, so production writes a run of consecutive `Place` actions in a few transactions
(`Store.patch_status_many`). The Events decided between them concern those placements: they
are recorded after the run's writes, in their order. A run ends at any other action, and at a
second placement of a VM already in it (so that the later one is written after the earlier).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .environment import Action, Emit, Place


@dataclass
class PlaceRun:
    places: list[Place] = field(default_factory=list)
    emits: list[Emit] = field(default_factory=list)
    """The Events decided among the placements, recorded after them."""


def place_runs(actions: Iterable[Action]) -> Iterator[Action | PlaceRun]:
    """`actions` in order, each run of placements (with its Events) as one `PlaceRun`."""
    run: PlaceRun | None = None
    for action in actions:
        if isinstance(action, Place):
            if run is not None and any(place.vm == action.vm for place in run.places):
                yield run
                run = None
            run = run or PlaceRun()
            run.places.append(action)
        elif isinstance(action, Emit) and run is not None:
            run.emits.append(action)
        else:
            if run is not None:
                yield run
                run = None
            yield action
    if run is not None:
        yield run
