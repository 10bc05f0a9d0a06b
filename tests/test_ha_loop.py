"""The HA loop steps only on news (`controller/ha/engine_loop.py`), on real parts.

A real etcd and a real leader term; the shipped engine and etcd environment, each subclassed
only to count its steps and looks. An idle cluster costs a look per change and no step; a
change the engine decides on steps at once.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from controller.ha.engine import Engine
from controller.ha.engine_loop import news, run, silence_look, silent_now
from controller.ha.environment import Action, Emit, Heard, NodeView, World
from controller.ha.production import EtcdEnvironment
from controller.ha.production_core import KINDS, WallToLoop, precise_now
from controller.migrations import Term
from controller.runtime.events import EventRecorder
from controller.runtime.informer import SharedInformers
from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import guard_compare
from controller.runtime.store import Store
from crds import ClusterNode
from crds.meta import now
from e2e.harness.polling import eventually
from tests.support.ha import (
    ELECTION,
    TIMINGS,
    Leases,
    get_node,
    node_object,
    placed_on,
    report_running,
    vm_object,
)
from tests.support.views import node


class CountingEngine(Engine):
    def __init__(self) -> None:
        super().__init__(TIMINGS)
        self.steps = 0
        self.last: World | None = None
        self.acted = False

    def step(self, world: World) -> list[Action]:
        actions = super().step(world)
        self.steps += 1
        self.last = world
        self.acted = any(not isinstance(action, Emit) for action in actions)
        return actions


class CountingEnvironment(EtcdEnvironment):
    node_versions: list[str | None]
    """The resource version of ClusterNode `a` each look was built from."""

    async def observe(self) -> World:
        world = await super().observe()
        node = self._informers["ClusterNode"].get("a")
        self.node_versions.append(None if node is None else node.metadata.resource_version)
        return world


async def test_an_idle_cluster_costs_looks_and_no_steps(store: Store, leases: Leases) -> None:
    await store.create(node_object("a"))
    await leases.hold("a")
    await store.create(vm_object("vm1"))
    informers = SharedInformers(store, None)
    changed = asyncio.Event()
    for kind in KINDS:
        informers.informer(kind).add_handler(lambda _type, _obj: changed.set())
    informers.start()
    await informers.wait_for_sync()
    engine = CountingEngine()
    envs: list[CountingEnvironment] = []

    async def lead(token: int) -> None:
        key = f"{store.prefix}/leader/controller"
        term = Term(token, [guard_compare(store.client, key, token)])
        env = CountingEnvironment(store, informers, EventRecorder(store, "test"), term, changed)
        env.node_versions = []
        envs.append(env)
        async with env:
            await run(engine, env, idle_period=math.inf)

    elector = LeaderElector(store.client, store.prefix, "controller", "loop", ELECTION)
    leading = asyncio.create_task(elector.run(lead))
    try:
        await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
        await report_running(store, "vm1", "a")

        def settled() -> bool:
            last = engine.last
            return (
                last is not None
                and last.vms["vm1"].state == "Running"
                and not engine.acted
                and engine.next_wakeup is None
            )

        await eventually(settled, "a step saw vm1 running and decided nothing more")
        steps = engine.steps

        def heartbeat(node: ClusterNode) -> bool:
            node.status.last_heartbeat_time = now()  # what the agent writes every 30 s
            return True

        written = await store.patch_status("ClusterNode", "a", heartbeat)
        version = written.metadata.resource_version
        await eventually(
            lambda: version in envs[0].node_versions, "a look at the node's new status"
        )
        assert engine.steps == steps, "a change the engine does not read made it step"

        await leases.drop("a")

        async def lost() -> bool:
            return (await get_node(store, "a")).status.health != "Online"

        await eventually(lost, "node a no longer Online once its lease is gone")
        assert engine.steps > steps
    finally:
        leading.cancel()
        await asyncio.wait({leading})
        await informers.stop()


def test_news_ignores_the_clock_and_heartbeat_arrivals_but_not_silence() -> None:
    """Two looks a moment apart, every node heard in between: the same news; once a node has
    been silent long enough with witnesses, different news."""
    names = ("a", "b", "c")
    nodes = {name: node_view(name, Heard(last=10.0, since=0.0)) for name in names}
    first = World(now=10.0, nodes=nodes, vms={})
    later = {name: node_view(name, Heard(last=10.4, since=0.0)) for name in names}
    assert key(first) == key(World(now=10.5, nodes=later, vms={}))
    silent = {**later, "a": node_view("a", Heard(last=10.0, since=0.0))}
    silent["b"] = node_view("b", Heard(last=11.4, since=0.0))
    silent["c"] = node_view("c", Heard(last=11.4, since=0.0))
    assert key(World(now=11.5, nodes=silent, vms={})) != key(first)


def test_the_loop_looks_when_silence_may_change_a_decision() -> None:
    power = {"methods": [{"name": "ipmi", "devices": [{"agent": "fence_dummy"}]}]}
    heard = Heard(last=10.0, since=0.0)
    world = World(now=10.2, nodes={"a": node_view("a", heard, power)}, vms={})
    assert silence_look(world, frozenset(), 1.0) == 11.0, "when it may turn silent"
    assert silence_look(world, frozenset({"a"}), 1.0) == 10.45, "silent: when it may be heard"
    late = World(now=11.2, nodes=world.nodes, vms={})
    assert silence_look(late, frozenset(), 1.0) == 11.45, "past it: waiting for witnesses"
    fencing = replace(world.nodes["a"], health="Fencing")
    assert silence_look(replace(world, nodes={"a": fencing}), frozenset(), 1.0) is None
    no_lease = replace(world.nodes["a"], lease_alive=False)
    assert silence_look(replace(world, nodes={"a": no_lease}), frozenset(), 1.0) is None
    self_fencing = node_view("a", heard)
    assert silence_look(replace(world, nodes={"a": self_fencing}), frozenset(), 1.0) is None


def key(world: World) -> tuple[object, ...]:
    return news(world, silent_now(world, 1.0))


def test_a_stored_time_converts_the_same_until_the_wall_clock_steps() -> None:
    clock = WallToLoop()
    wall = precise_now()
    moment = wall - timedelta(seconds=30)
    assert clock.update(100.0, wall)
    converted = clock(moment)
    assert converted == pytest.approx(70.0)
    assert not clock.update(101.0, wall + timedelta(seconds=1.01))  # 10 ms of drift: kept
    assert clock(moment) == converted
    assert clock.update(102.0, wall + timedelta(seconds=12))  # the wall clock stepped 10 s
    assert clock(moment) == pytest.approx(60.0)


def node_view(name: str, heard: Heard, fencing: dict[str, Any] | None = None) -> NodeView:
    return replace(node(name, fencing=fencing), heard=heard)
