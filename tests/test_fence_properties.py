"""Properties: no ClusterNode that validation accepts makes kvmctl run a program of its choosing.

- Fence devices: for any device the models accept, what the runner would execute
  (`FencePolicy.invocation`, against the real agents' `-o metadata`) is either refused or names
  an allow-listed agent binary with no arguments and stdin lines that set no exec-like parameter
  and carry only plain words (checked here by an independent, deliberately broader oracle).
- libvirt URIs: any URI the models accept has a supported transport and, read the way libvirt
  reads a query (split on `&` and `;`, `%XX` decoded), no `command`, `socket`, `netcat` or `name`.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from crds.clusternode import ClusterNodeSpec
from crds.libvirt_uri import LibvirtUriError, check_local_uri, check_peer_uri
from reconcilers.drivers.fence import AGENT_DIR, FenceRunner
from reconcilers.drivers.fence_policy import (
    DEFAULT_AGENTS,
    AgentMetadata,
    FenceConfigError,
    FenceDevice,
    FencePolicy,
)

AGENTS = ["fence_ipmilan", "fence_virsh", "fence_redfish", "fence_apc", "fence_dummy"]
"""Real agents with the parameters that matter (ssh, telnet, ipmitool, https); fence_dummy is
not on the default list, fence_openstack (a shell for `openrc`) and fence_manual neither."""
OUTSIDE = ["fence_openstack", "fence_manual"]
POLICY = FencePolicy()
EXEC_ORACLE = re.compile(
    r"path|cmd|command|script|file|option|prompt|exec|runon|openrc|kubeconfig|debug"
)
SHELL_OR_OPTION = re.compile(r"[\s;|&$`'\"<>()*?!#~\\{}]|^-")
TRICKY_VALUES = [
    "10.0.0.1",
    "1",
    "",
    "admin",
    "/usr/bin/ssh",
    "/bin/sh -c 'id > out'",
    "-oProxyCommand=sh",
    "vm1;id",
    "$(id)",
    "a\nb",
    "x\x0by",
    "x\u2028y",
    " 1",
]
SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def metadata() -> dict[str, AgentMetadata]:
    """The agents' own `-o metadata`, fetched by a runner allowed to ask them all."""
    runner = FenceRunner(policy=FencePolicy(agents=frozenset([*AGENTS, "fence_openstack"])))

    async def fetch() -> dict[str, AgentMetadata]:
        return {agent: await runner.metadata(agent) for agent in [*AGENTS, "fence_openstack"]}

    return asyncio.run(fetch())


def parameter_names(metadata: dict[str, AgentMetadata]) -> list[str]:
    names = {name for known in metadata.values() for name in known.parameters}
    return sorted(names | {"Ip", "action", "help", "ssh-path", "pass_word"})


def node_spec(device: dict[str, Any]) -> dict[str, Any]:
    return {
        "addresses": {"cluster": "10.0.0.1"},
        "fencing": {"methods": [{"name": "m", "devices": [device]}]},
    }


@st.composite
def devices(draw: st.DrawFn, names: list[str]) -> dict[str, Any]:
    value = st.one_of(st.sampled_from(TRICKY_VALUES), st.text(max_size=12))
    parameters = draw(st.dictionaries(st.sampled_from(names), value, max_size=6))
    secrets = draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    return {
        "agent": draw(st.sampled_from(AGENTS + OUTSIDE)),
        "parameters": parameters,
        "secretParameters": {name: {"name": "s", "key": "k"} for name in secrets},
    }


def check_invocation(
    metadata: dict[str, AgentMetadata], document: dict[str, Any], secret: str, counts: Counter[str]
) -> None:
    try:
        spec = ClusterNodeSpec.model_validate(node_spec(document)).fencing.methods[0].devices[0]
    except ValidationError:
        counts["refused by validation"] += 1
        return
    try:
        device = FenceDevice(
            spec.agent, dict(spec.parameters), {name: secret for name in spec.secret_parameters}
        )
        known = metadata.get(device.agent) or metadata["fence_dummy"]
        invocation = POLICY.invocation(known, device, "off", AGENT_DIR)
    except FenceConfigError:
        counts["refused by the policy"] += 1
        return
    counts["run"] += 1
    (binary,) = invocation.argv
    assert binary == f"{AGENT_DIR}/{spec.agent}" and spec.agent in DEFAULT_AGENTS
    lines = invocation.stdin.decode().split("\n")
    assert lines[-1] == "" and lines[0] == "action=off"
    assert len(lines) == 2 + len(spec.parameters) + len(spec.secret_parameters)
    for line in lines[1:-1]:
        name, _, value = line.partition("=")
        assert name in metadata[spec.agent].parameters
        assert not EXEC_ORACLE.search(name), line
        assert not re.search(r"[\x00-\x1f\x7f\x85\u2028\u2029]", value)
        if name in spec.parameters:
            assert not SHELL_OR_OPTION.search(value), line


def test_no_accepted_fence_device_runs_a_command_of_its_choosing(
    metadata: dict[str, AgentMetadata],
) -> None:
    counts: Counter[str] = Counter()
    ssh_attack = {"agent": "fence_virsh", "parameters": {"ssh_path": "/bin/sh -c 'id > out'"}}
    good = {
        "agent": "fence_ipmilan",
        "parameters": {"ip": "10.0.0.9", "username": "admin", "lanplus": "1"},
        "secretParameters": {"password": {"name": "s", "key": "k"}},
    }
    allowed_word = {"agent": "fence_virsh", "parameters": {"ssh_path": "/usr/bin/ssh"}}

    @SETTINGS
    @given(document=devices(parameter_names(metadata)), secret=st.text(max_size=12))
    @example(document=good, secret="pw")
    @example(document=ssh_attack, secret="pw")
    @example(document=allowed_word, secret="pw")
    def check(document: dict[str, Any], secret: str) -> None:
        check_invocation(metadata, document, secret, counts)

    check()
    assert counts["run"] >= 1, counts  # the property was not vacuous
    assert counts["refused by the policy"] >= 1 and counts["refused by validation"] >= 1, counts


# -- libvirt URIs ------------------------------------------------------------------------------

ALLOWED_TRANSPORTS = {"", "unix", "tcp", "tls", "ssh", "libssh", "libssh2"}
FORBIDDEN_PARAMETERS = {"command", "socket", "netcat", "name"}
PARAMETERS = [
    "keyfile=/root/.ssh/id",
    "no_tty=1",
    "no_verify=0",
    "pkipath=/etc/pki/libvirt",
    "proxy=netcat",
    "mode=direct",
    "sshauth=privkey",
    "known_hosts=/root/.ssh/known_hosts",
    "command=/bin/sh",
    "socket=/run/x.sock",
    "netcat=/bin/sh",
    "name=qemu+ext:///system",
    "%63ommand=/bin/sh",
    "no_tty=1;command=/bin/sh",
    "keyfile=/a%26command=/bin/sh",
]


@st.composite
def uris(draw: st.DrawFn) -> str:
    scheme = draw(
        st.sampled_from(
            ["qemu", "QEMU", "xen", "test", "test+unix", "test+tcp", "qemu+ext", "qemu+fd"]
            + ["qemu+SSH", "qemu+ssh+ext"]
            + [f"qemu+{transport}" for transport in sorted(ALLOWED_TRANSPORTS) if transport]
        )
    )
    authority = draw(
        st.sampled_from(
            ["", "h1", "root@h1", "-oProxyCommand=x", "h1:22", "[::1]", "10.0.0.1", "a b", "h1:0"]
        )
    )
    path = draw(st.sampled_from(["/system", "/session", "", "/system/", "/default", "/h.xml"]))
    query = draw(st.lists(st.sampled_from(PARAMETERS), max_size=3))
    separator = draw(st.sampled_from(["&", ";", "&amp;"]))
    uri = f"{scheme}://{authority}{path}"
    empty_query: bool = draw(st.booleans())
    if query or empty_query:
        uri += "?" + separator.join(query)
    return uri + draw(st.sampled_from(["", "", "#x", "\n", draw(st.text(max_size=4))]))


def libvirt_reading(uri: str) -> tuple[str, str, list[str]]:
    """Driver, transport and decoded query parameter names, the way libvirt splits a URI."""
    scheme, _, rest = uri.partition("://")
    driver, _, transport = scheme.partition("+")
    query = rest.partition("?")[2].partition("#")[0]
    names = [unquote(part.partition("=")[0]) for part in re.split("[&;]", query) if part]
    return driver, transport, names


@SETTINGS
@given(uri=st.one_of(uris(), st.text(max_size=40)))
@example(uri="qemu+ext://x/system?command=/sbin/poweroff")
@example(uri="qemu+tcp://10.0.0.1/system")
def test_no_accepted_libvirt_uri_names_a_program_or_socket(uri: str) -> None:
    document = {"addresses": {"cluster": "10.0.0.1"}, "libvirtUri": uri}
    try:
        ClusterNodeSpec.model_validate(document)
    except ValidationError:
        return
    driver, transport, names = libvirt_reading(uri)
    assert driver == "qemu" and transport in ALLOWED_TRANSPORTS, uri
    assert not FORBIDDEN_PARAMETERS & set(names), uri
    assert not rest_of_authority_is_an_option(uri), uri


def rest_of_authority_is_an_option(uri: str) -> bool:
    authority = uri.partition("://")[2].partition("/")[0]
    return any(part.startswith("-") for part in re.split("[@:]", authority))


@SETTINGS
@given(uri=st.one_of(uris(), st.text(max_size=40)))
def test_no_local_uri_names_a_program(uri: str) -> None:
    """An agent's own URI (its host's setting) may name a socket, never a program."""
    try:
        check_local_uri(uri)
    except LibvirtUriError:
        return
    driver, transport, names = libvirt_reading(uri)
    assert driver in ("qemu", "test") and transport in ALLOWED_TRANSPORTS, uri
    assert not {"command", "netcat", "name"} & set(names), uri
    assert "socket" not in names or transport == "unix", uri


@pytest.mark.parametrize(
    ("uri", "accepted"),
    [
        ("test+unix:///tmp/h01.xml?socket=/tmp/lab/libvirt-sock", True),
        ("test+unix:///tmp/h01.xml", True),
        ("test+unix:///tmp/h01.xml?command=/bin/sh", False),
        ("test+unix:///tmp/h01.xml?socket=relative", False),
        ("test+tcp:///tmp/h01.xml", False),
        ("test:///tmp/h01.xml?socket=/tmp/s", False),
    ],
)
def test_a_test_host_served_by_a_libvirtd_is_a_local_uri_only(uri: str, accepted: bool) -> None:
    """Benches reach a test-driver host in a libvirtd of its own; peers never may."""
    if accepted:
        assert check_local_uri(uri) == uri
    else:
        with pytest.raises(LibvirtUriError):
            check_local_uri(uri)
    with pytest.raises(LibvirtUriError):
        check_peer_uri(uri)
