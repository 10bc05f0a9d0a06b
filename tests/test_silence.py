"""The silence rule (`environment.silent_nodes`): when one observer may take a node for dead.

Timings as shipped: `suspect_after` 1 s, so a node is silent 1 s after its last datagram, and the
witnesses must be heard now, 0.5 s or more after it, and without a break for the last second.
"""

from __future__ import annotations

from controller.ha.environment import Heard, silent_nodes

S = 1.0


def always(last: float) -> Heard:
    """Heard without a break since long ago."""
    return Heard(last=last, since=0.0)


def test_a_node_silent_while_a_majority_kept_being_heard_is_silent() -> None:
    heard = {"host1": always(10.0), "host2": always(11.4), "host3": always(11.4)}
    assert silent_nodes(heard, 11.5, S) == {"host1"}
    assert silent_nodes(heard, 10.9, S) == set()  # not yet for suspect_after


def test_one_witness_of_three_is_not_a_majority() -> None:
    heard = {"host1": always(10.0), "host2": always(10.0), "host3": always(11.4)}
    assert silent_nodes(heard, 11.5, S) == set()


def test_an_observer_whose_cut_is_staggered_takes_nobody_for_dead() -> None:
    """The observer (host3) is cut at 10.0: host1's last datagram came 0.15 s before host2's and
    its own. At 11.1, host1 is 1.1 s old and the others 0.95 s: still heard, but neither was
    heard after 10.35 (host1's last + 0.5), so neither witnesses host1's silence."""
    heard = {"host1": always(9.85), "host2": always(10.0), "host3": always(10.0)}
    assert silent_nodes(heard, 10.9, S) == set()
    assert silent_nodes(heard, 10.98, S) == set()


def test_an_observer_whose_cable_just_came_back_takes_nobody_for_dead() -> None:
    """Cut from 10.0 to 15.0: host2 and the observer's own datagrams are heard again at once,
    host1's a moment later. host2's new run began at 15.0: too short to witness anything yet
    (host1 is heard again within it). The observer heard itself throughout (loopback), one of
    three."""
    heard = {
        "host1": always(10.0),
        "host2": Heard(last=15.1, since=15.0),
        "host3": always(15.1),
    }
    assert silent_nodes(heard, 15.1, S) == set()
    # Had the observer heard host2 throughout (a real death of host1), host1 would be silent.
    heard["host2"] = always(15.1)
    assert silent_nodes(heard, 15.1, S) == {"host1"}


def test_a_node_never_heard_is_neither_silent_nor_a_witness() -> None:
    heard = {"host1": always(10.0), "host2": None, "host3": always(11.4)}
    assert silent_nodes(heard, 11.5, S) == set()
    heard["host2"] = always(11.4)
    assert silent_nodes(heard, 11.5, S) == {"host1"}


def test_after_a_stall_of_the_observer_silence_counts_again_a_suspect_after_later() -> None:
    """host1 died at 10.0; the observer's event loop stalled from 10.2 to 12.0, so every run
    (its own included) broke and began again at 12.0."""
    heard = {
        "host1": always(10.0),
        "host2": Heard(last=12.5, since=12.0),
        "host3": Heard(last=12.5, since=12.0),
    }
    assert silent_nodes(heard, 12.5, S) == set()
    heard = {name: Heard(last=13.0, since=12.0) for name in ("host2", "host3")}
    assert silent_nodes({"host1": always(10.0), **heard}, 13.0, S) == {"host1"}
