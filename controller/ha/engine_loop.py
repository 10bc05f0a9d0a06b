"""The HA loop: observe, decide when there is something to decide, act, wait.

`run(engine, env)` looks at the world whenever the environment says something changed, an
engine timer fires (`Engine.next_wakeup`: a fence retry, a self-fence grace, a restart
window) or a power-fenced node's direct heartbeats may turn silent or be heard again
(`silence_look`), and runs `Engine.step` only when the step could decide something (`news`):
the world differs from the one the last step saw (the clock and the arrival times of direct
heartbeats aside: only which nodes are silent counts), a fence attempt finished, a timer is
due, or the last step acted (its writes may have failed: the next step tries again, at the
latest `period` later). A step over the same world before any timer decides nothing (the
simulator shows it: scenarios run with steps only on news give the logs of an engine stepping
on every tick, `tests/test_ha_scenarios.py`), so a big idle cluster costs an observation per
change and no step; `idle_period` is a safety net that steps anyway that often.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

from .engine import Engine
from .environment import Emit, Environment, World, power_fenced, silent_nodes

DEFAULT_PERIOD = 0.5
"""After a step that acted, the loop steps again at the latest this much later."""
IDLE_PERIOD = 10.0
"""With no news, the loop still steps this often."""


def silent_now(world: World, suspect_after: float) -> frozenset[str]:
    """The nodes the engine takes for silent in `world` (`silent_nodes`)."""
    heard = {node.name: node.heard for node in world.nodes.values()}
    return silent_nodes(heard, world.now, suspect_after)


def news(world: World, silent: frozenset[str]) -> tuple[object, ...]:
    """What a step decides from, but for the fence results and the engine's own timers:
    the world without its clock and without when each node was last heard (`silent`: which
    nodes are silent). Views the environment did not rebuild are the same objects, so
    comparing two of these costs little more than a pass over the names."""
    nodes = {name: replace(view, heard=None) for name, view in world.nodes.items()}
    return nodes, silent, world.vms, world.admission


def silence_look(world: World, silent: frozenset[str], suspect_after: float) -> float | None:
    """When the silence of a power-fenced node may next change what the engine decides.

    That is a node heard in its agent's current lease, the lease alive, not being fenced: one
    heard lately may first be found silent once its last datagram is `suspect_after` old;
    past that (its silence waits for witnesses, `silent_nodes`), or silent already (it may be
    heard again), look every quarter of `suspect_after`."""
    looks = []
    soon = world.now + suspect_after / 4
    for node in world.nodes.values():
        if node.heard is None or not node.lease_alive or not power_fenced(node.spec):
            continue
        if node.health not in ("Online", "Unknown", "Offline"):
            continue
        turns_silent = node.heard.last + suspect_after
        looks.append(soon if node.name in silent or turns_silent <= world.now else turns_silent)
    return min(looks, default=None)


async def run(
    engine: Engine,
    env: Environment,
    period: float = DEFAULT_PERIOD,
    around_step: Callable[[], AbstractContextManager[object]] = nullcontext,
    idle_period: float = IDLE_PERIOD,
) -> None:
    """Observe, decide, act, wait; until the environment says stop (see the module docstring).

    Each step and its actions run inside `around_step()` (production: a reconcile span).
    """
    suspect_after = engine.timings.suspect_after
    seen: tuple[object, ...] | None = None
    stepped_at = float("-inf")
    acted = False
    while True:
        world = await env.observe()
        silent = silent_now(world, suspect_after)
        key = news(world, silent)
        due = engine.next_wakeup is not None and world.now >= engine.next_wakeup
        idle = world.now >= stepped_at + idle_period
        if acted or due or idle or world.fence_results or key != seen:
            with around_step():
                actions = engine.step(world)
                await env.apply_step(actions)
            seen, stepped_at = key, world.now
            acted = any(not isinstance(action, Emit) for action in actions)
        until = stepped_at + (period if acted else idle_period)
        for timer in (engine.next_wakeup, silence_look(world, silent, suspect_after)):
            if timer is not None:
                until = min(until, timer)
        if not await env.wait(until):
            return
