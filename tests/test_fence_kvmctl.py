"""fence_kvmctl: its protocol checked against its own metadata, and off/status/on of a VM whose
host agent runs in-process on libvirt's test driver, with a real etcd and the leader's guest
fencing (controller/ha/guest_fence.py) carrying out the requests.

The agent is run as Pacemaker runs it: a separate process, options on stdin.
"""

from __future__ import annotations

import asyncio
import io
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.cli.fence_kvmctl import ACTIONS, cluster_of, main, options_from
from controller.ha.agent_side import HaReporter
from controller.ha.guest_power import SAVED_TIMEOUT_ANNOTATION
from controller.ha.guest_requests import (
    Published,
    parse_result,
    parse_status,
)
from controller.ha.requests import read_report
from controller.runtime import layout_keys
from controller.runtime.store import Store
from crds import ClusterNode, VirtualMachine
from e2e.harness.polling import eventually
from reconcilers.drivers.libvirt import DomainState
from tests.support.agents import Cluster, domain_state, running_vm, vm_object
from tests.support.fence import GUEST, fence, fencing_cluster, join

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_VALUES = {"string": "x", "second": "5", "boolean": "1"}
"""A valid value of each metadata content type (string parameters get specific ones below)."""
STRING_SAMPLES = {"action": "validate-all", "plug": "vm1", "port": "vm1", "prefix": "/kvmctl"}


def metadata() -> ET.Element:
    out = io.StringIO()
    assert main(["-o", "metadata"], out=out) == 0
    return ET.fromstring(out.getvalue())


def sample(parameter: ET.Element) -> str:
    name = parameter.get("name", "")
    content = parameter.find("content")
    assert content is not None, f"parameter {name} has no content element"
    return STRING_SAMPLES.get(name, SAMPLE_VALUES[content.get("type", "")])


def run_main(argv: list[str], stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    code = main(argv, stdin=io.StringIO(stdin), out=out)
    return code, out.getvalue()


# -- the protocol against the metadata ------------------------------------------------------


def test_metadata_is_a_fence_agent_description() -> None:
    root = metadata()
    assert root.tag == "resource-agent" and root.get("name") == "fence_kvmctl"
    assert root.get("shortdesc") and (root.findtext("longdesc") or "").strip()
    parameters = root.findall("parameters/parameter")
    names = [p.get("name") for p in parameters]
    assert len(names) == len(set(names))
    assert {"action", "plug", "port", "etcd", "prefix", "cacert", "cert", "key"} <= set(names)
    for parameter in parameters:
        assert parameter.get("unique") == "0" and parameter.get("required") in ("0", "1")
        getopt = parameter.find("getopt")
        assert getopt is not None and getopt.get("mixed", "").startswith(("-", "--"))
        content = parameter.find("content")
        assert content is not None and content.get("type") in SAMPLE_VALUES
        assert parameter.findtext("shortdesc")
    actions = {a.get("name") for a in root.findall("actions/action")}
    assert {"on", "off", "reboot", "status", "list", "monitor", "metadata"} <= actions
    assert actions == set(ACTIONS)


def test_every_parameter_in_the_metadata_is_accepted_on_stdin() -> None:
    for parameter in metadata().findall("parameters/parameter"):
        name = parameter.get("name")
        action = "" if name == "action" else "action=validate-all\n"
        lines = f"{action}{name}={sample(parameter)}\n"
        code, _ = run_main([], lines)
        assert code == 0, f"stdin parameter {name} refused"


def test_every_option_in_the_metadata_is_accepted_on_the_command_line() -> None:
    for parameter in metadata().findall("parameters/parameter"):
        getopt = parameter.find("getopt")
        content = parameter.find("content")
        assert getopt is not None and content is not None
        value = sample(parameter)
        for flag in getopt.get("mixed", "").split(", "):
            option = flag.split("=")[0]
            argv = [option] if content.get("type") == "boolean" else [option, value]
            if parameter.get("name") != "action":
                argv += ["--action", "validate-all"]
            code, _ = run_main(argv)
            assert code == 0, f"command line {argv} refused"


def test_every_action_in_the_metadata_is_accepted() -> None:
    for action in metadata().findall("actions/action"):
        name = action.get("name", "")
        assert options_from({"action": name, "plug": "vm1"}).action == name


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        ([], "action=off\nplug=vm1\nbogus=1\n", "unknown parameter 'bogus'"),
        (["--bogus", "1"], "", "unrecognized arguments"),
        ([], "action=explode\nplug=vm1\n", "'explode' is not one of"),
        ([], "action=off\n", "needs the VirtualMachine's name"),
        ([], "action=off\nplug=Not_A_Name\n", "not a VirtualMachine name"),
        ([], "action=off\nplug=vm1\npower_timeout=soon\n", "power_timeout: 'soon'"),
        ([], "action=off\nplug=vm1\nverbose=maybe\n", "verbose: 'maybe'"),
        ([], "action=off\njust words\n", "line 2: expected key=value"),
        ([], "action=off\nplug=vm1\nguest_cluster=A_B\n", "guest_cluster: 'A_B' is not a"),
    ],
)
def test_bad_input_is_one_readable_failure(
    argv: list[str], stdin: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_main(argv, stdin)
    assert code == 1 and out == ""
    error = capsys.readouterr().err
    assert message in error and error.startswith("Failed: ") and "Traceback" not in error


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        # Each separator str.splitlines honours would turn this off into a monitor.
        ("action=off\nplug=vm1\x0baction=monitor\n", "line 2: the value of plug holds U+000B"),
        ("action=off\nplug=vm1\x0caction=monitor\n", "line 2: the value of plug holds U+000C"),
        ("action=off\nplug=vm1\x1caction=monitor\n", "line 2: the value of plug holds U+001C"),
        ("action=off\nplug=vm1\x1eaction=monitor\n", "line 2: the value of plug holds U+001E"),
        ("action=off\nplug=vm1\x85action=monitor\n", "line 2: the value of plug holds U+0085"),
        ("action=off\nplug=vm1\u2028action=monitor\n", "line 2: the value of plug holds U+2028"),
        ("action=off\nplug=vm1\u2029action=monitor\n", "line 2: the value of plug holds U+2029"),
        ("action=off\nplug=vm1\raction=monitor\n", "line 2: the value of plug holds U+000D"),
        ("action=off\nplug=vm1\x00\n", "line 2: the value of plug holds U+0000"),
        ("action=off\nplug=vm1\u200b\n", "line 2: the value of plug holds U+200B"),
        ("action=off\nplug=vm1\udcff\n", "line 2: the value of plug holds U+DCFF"),
        ("action=off\nplug=vm1\naction=monitor\n", "line 3: parameter action repeats line 1"),
        ("action=off\nplug=vm1\nport=vm2\n", "line 3: parameter port repeats line 2"),
        ("action=off\nplug=vm1\nplug=vm1\n", "line 3: parameter plug repeats line 2"),
        ("action=off\nplug=vm1\npower-timeout=5\npower_timeout=9\n", "repeats line 3"),
        ("action=off\nplug=vm1\n\x0baction=monitor\n", "line 3: '\\x0baction' is not a"),
        ("action=off\nplug=vm1\nactión=monitor\n", "line 3: 'actión' is not a parameter"),
        ("act\u2028ion=off\nplug=vm1\n", "line 1: 'act\\u2028ion' is not a parameter"),
        ("action=off\nplug=vm1\n=vm2\n", "line 3: '' is not a parameter name"),
    ],
)
def test_stdin_cannot_smuggle_a_parameter(
    stdin: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_main([], stdin)
    assert code == 1 and out == ""
    error = capsys.readouterr().err
    assert message in error, error
    assert error.startswith("Failed: stdin line ") and error.count("\n") == 1


def test_stdin_lines_end_at_newline_and_may_end_in_crlf() -> None:
    assert run_main([], "action=validate-all\r\nplug=vm1\r\n")[0] == 0
    assert run_main([], "action=validate-all\n\tplug = vm1 \t\n")[0] == 0
    assert run_main([], "action=validate-all\nplug=vm1\nprefix=/kvmctl-ü\n")[0] == 0


def test_stdin_comments_quotes_and_pacemakers_nodename_are_understood() -> None:
    stdin = '# from stonithd\nnodename=guest1\naction="validate-all"\nport=vm1\n\n'
    assert run_main([], stdin)[0] == 0


def test_help_and_version() -> None:
    code, out = run_main(["-h"])
    assert code == 0 and "--plug" in out and "--etcd" in out
    code, out = run_main(["--version"])
    assert code == 0 and out.strip()


def test_unreachable_etcd_is_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    stdin = "action=status\nplug=vm1\netcd=127.0.0.1:1\n"
    assert run_main([], stdin)[0] == 1
    assert "unreachable" in capsys.readouterr().err


# -- against a real etcd and a real host agent ------------------------------------------------


def test_the_guest_cluster_is_the_option_or_the_certificates_and_they_must_agree() -> None:
    assert cluster_of("web", None) == "web"
    assert cluster_of(None, "fence-web") == "web"
    assert cluster_of("web", "fence-web") == "web"
    assert cluster_of("web", "admin") == "web"
    with pytest.raises(Exception, match="guest_cluster 'db' does not match the client cert"):
        cluster_of("db", "fence-web")
    with pytest.raises(Exception, match="no guest cluster: give guest_cluster=NAME"):
        cluster_of(None, "admin")


@pytest.fixture
async def cluster(store: Store, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with fencing_cluster(store, tmp_path) as lab:
        yield lab


async def _get(store: Store, key: str) -> bytes | None:
    kv = await store.call(store.client.get(key.encode()))
    return None if kv is None else bytes(kv.value)


async def published(store: Store, vm: str, state: Published | None) -> None:
    """Wait until the controller publishes `state` for `vm` (None: publishes nothing)."""
    key = layout_keys.absolute(store.prefix, layout_keys.guest_power_state(GUEST, vm))

    async def done() -> bool:
        value = await _get(store, key)
        current = None if value is None else parse_status(key, value).state
        return current == state

    await eventually(done, f"power state {state} of {vm} published")


async def test_off_status_on_of_a_vm_on_its_host_agent(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    await running_vm(cluster, "vm1", "host1", shutdownTimeoutSeconds=600)
    await join(cluster.store, "vm1")
    await published(cluster.store, "vm1", "on")

    assert await fence(cluster.store, "status", "vm1") == (0, "Status: ON\n")

    assert await fence(cluster.store, "off", "vm1") == (0, "Success: Powered OFF\n")
    vm = await cluster.vm("vm1")
    assert vm.status.state == "Stopped" and vm.spec.run_state == "stopped"
    assert vm.spec.shutdown_timeout_seconds == 0
    assert vm.metadata.annotations[SAVED_TIMEOUT_ANNOTATION] == "600"
    assert await domain_state(agent, "vm1") is DomainState.SHUTOFF
    assert await cluster.events("vm1", "DomainStopped")  # at once (test domains obey ACPI)

    assert await fence(cluster.store, "status", "vm1") == (2, "Status: OFF\n")
    assert await fence(cluster.store, "off", "vm1") == (0, "Success: Powered OFF\n")

    assert await fence(cluster.store, "on", "vm1") == (0, "Success: Powered ON\n")
    vm = await cluster.vm("vm1")
    assert vm.status.state == "Running" and vm.spec.run_state == "started"
    assert vm.spec.shutdown_timeout_seconds == 600
    assert SAVED_TIMEOUT_ANNOTATION not in vm.metadata.annotations
    assert await fence(cluster.store, "status", "vm1") == (0, "Status: ON\n")


async def test_reboot_list_and_monitor(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    await cluster.start_agent("host1")
    await running_vm(cluster, "vm1", "host1")
    await cluster.store.create(vm_object("vm2", runState="stopped"))
    await cluster.store.create(vm_object("vm3", runState="stopped"))
    await cluster.store.create(vm_object("vm4", runState="stopped"))
    for member in ("vm1", "vm2", "vm3"):
        await join(cluster.store, member)
    await join(cluster.store, "vm4", "others")
    await published(cluster.store, "vm3", "off")
    await join(cluster.store, "vm3", None)  # no longer a member: no longer listed
    await published(cluster.store, "vm3", None)

    first = (await cluster.vm("vm1")).status.domain_uuid
    assert await fence(cluster.store, "reboot", "vm1") == (0, "Success: Rebooted\n")
    vm = await cluster.vm("vm1")
    assert vm.status.state == "Running" and vm.status.domain_uuid == first
    assert len(await cluster.events("vm1", "DomainStopped")) == 1

    assert await fence(cluster.store, "list") == (0, "vm1,\nvm2,\n")
    assert await fence(cluster.store, "list-status") == (0, "vm1,,ON\nvm2,,OFF\n")
    assert await fence(cluster.store, "monitor") == (0, "")


async def test_unknown_vm_and_unconfirmed_off_fail(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await fence(cluster.store, "status", "ghost"))[0] == 1
    assert (await fence(cluster.store, "off", "ghost"))[0] == 1
    assert "off refused: VirtualMachine ghost is not in guest cluster" in capsys.readouterr().err

    # Placed on a node whose agent does not run: nothing can confirm the stop.
    await cluster.add_node("host1")
    await cluster.store.create(vm_object("vm1"))
    await join(cluster.store, "vm1")
    await cluster.place("vm1", "host1")
    await published(cluster.store, "vm1", "unknown")
    assert (await fence(cluster.store, "status", "vm1"))[0] == 1
    assert "power state of vm1 unknown: state Unknown, placed host1" in capsys.readouterr().err
    assert await fence(cluster.store, "off", "vm1", power_timeout="1") == (1, "")
    assert "vm1: off failed: vm1 not confirmed off within 1 s" in capsys.readouterr().err
    assert (await cluster.vm("vm1")).spec.run_state == "stopped"


async def test_vms_of_other_guest_clusters_are_refused_and_left_alone(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    await cluster.store.create(vm_object("theirs"))
    await join(cluster.store, "theirs", "others")
    await cluster.store.create(vm_object("nobodys"))
    before = {name: await cluster.vm(name) for name in ("theirs", "nobodys")}
    for name in before:
        for action in ("off", "on", "reboot"):
            assert await fence(cluster.store, action, name) == (1, "")
            error = capsys.readouterr().err
            assert f"refused: VirtualMachine {name} is not in guest cluster {GUEST}" in error
        assert (await fence(cluster.store, "status", name))[0] == 1
        assert await cluster.vm(name) == before[name]
        request = layout_keys.guest_fence_request(GUEST, name)
        assert (
            await _get(cluster.store, layout_keys.absolute(cluster.store.prefix, request)) is None
        )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"off", "not JSON"),
        (
            b'{"action": "destroy", "id": "1", "at": "2024-01-01T00:00:00+00:00", "timeout": 5}',
            "action must be off or on, got 'destroy'",
        ),
        (
            b'{"action": "off", "id": "1", "at": "2024-01-01T00:00:00+00:00", "timeout": 1e9}',
            "timeout must be in",
        ),
        (
            b'{"action": "off", "id": "1\\n", "at": "2024-01-01T00:00:00+00:00", "timeout": 5}',
            "id must be a printable ASCII string",
        ),
    ],
)
async def test_a_malformed_request_is_refused_and_changes_nothing(
    cluster: Cluster, value: bytes, message: str
) -> None:
    await cluster.store.create(vm_object("vm1"))
    await join(cluster.store, "vm1")
    before = await cluster.vm("vm1")
    store = cluster.store
    key = layout_keys.absolute(store.prefix, layout_keys.guest_fence_request(GUEST, "vm1"))
    answer = layout_keys.absolute(store.prefix, layout_keys.guest_fence_result(GUEST, "vm1"))
    await store.call(store.client.put(key.encode(), value))
    raw = await eventually(lambda: _get(store, answer), "an answer")
    result = parse_result(answer, raw)
    assert result.state == "refused" and message in result.message
    assert await _get(store, key) is None
    # A key the protocol has no place for is deleted unanswered.
    odd = f"{key}/extra"
    await store.call(store.client.put(odd.encode(), b"{}"))

    async def deleted() -> bool:
        return await _get(store, odd) is None

    await eventually(deleted, "the odd key deleted")
    assert await cluster.vm("vm1") == before


async def test_off_is_confirmed_by_the_fencing_of_the_vms_host(cluster: Cluster) -> None:
    """A VM last seen on a host kvmctl has fenced, and placed nowhere, is off."""
    await cluster.add_node("host1")
    await cluster.store.create(vm_object("vm1"))
    await join(cluster.store, "vm1")
    await cluster.place("vm1", "host1")

    def seen_running(obj: VirtualMachine) -> bool:
        obj.status.state, obj.status.node = "Running", "host1"
        return True

    await cluster.store.patch_status("VirtualMachine", "vm1", seen_running)
    await published(cluster.store, "vm1", "on")
    assert await fence(cluster.store, "status", "vm1") == (0, "Status: ON\n")

    def fenced(obj: ClusterNode) -> bool:
        obj.status.health = "Fenced"
        return True

    await cluster.store.patch_status("ClusterNode", "host1", fenced)
    await cluster.place("vm1", None)
    assert await fence(cluster.store, "off", "vm1") == (0, "Success: Powered OFF\n")
    assert await fence(cluster.store, "status", "vm1") == (2, "Status: OFF\n")


async def test_off_is_confirmed_by_the_host_agents_report_once_unplaced(cluster: Cluster) -> None:
    """The HA controller unplaces a stopped VM; the agent then destroys the domain without
    writing the VM's status (it is not placed there): its report of running domains tells."""
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    reporter = HaReporter(cluster.store, "host1")
    reporting = asyncio.create_task(reporter.run(agent.own_node, lambda: agent.host, lambda: False))
    try:
        await running_vm(cluster, "vm1", "host1")
        await join(cluster.store, "vm1")

        async def reported(running: bool) -> bool:
            report = await read_report(cluster.store, "host1")
            return report is not None and ("vm1" in report.domains) == running

        await eventually(lambda: reported(True), "vm1 in host1's report")
        await cluster.place("vm1", None)
        await eventually(lambda: reported(False), "vm1 gone from host1's report")
        assert (await cluster.vm("vm1")).status.state == "Running"  # as last written
        await published(cluster.store, "vm1", "off")
        assert await fence(cluster.store, "status", "vm1") == (2, "Status: OFF\n")
        assert await fence(cluster.store, "off", "vm1") == (0, "Success: Powered OFF\n")
        assert await domain_state(agent, "vm1") is not DomainState.RUNNING
    finally:
        reporting.cancel()
        await asyncio.wait({reporting})
