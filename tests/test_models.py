"""Validation of the API models: strict, with readable messages."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from crds import parse_object, parse_size
from crds.meta import Status


def vm(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kvmctl.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm1"},
        "spec": {"memoryMiB": 128, **spec},
    }


def error_of(document: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as caught:
        parse_object(document)
    return str(caught.value)


def test_valid_vm_gets_defaults() -> None:
    obj = parse_object(vm(disks=[{"volume": "vg_cluster/lv_vm1"}]))
    assert obj.spec.run_state == "started"
    assert obj.spec.restart_policy.max_restarts == 3
    assert obj.spec.disks[0].volume_ref().lv == "lv_vm1"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["spec"].update(bogus=1), "spec.bogus: unknown field"),
        (lambda d: d["metadata"].update(name="a/b"), "metadata.name"),
        (lambda d: d["metadata"].update(name=".."), "metadata.name"),
        (lambda d: d["metadata"].update(name="x" * 300), "longer than 63"),
        (lambda d: d["metadata"].update(name="vm\x00"), "metadata.name"),
        (lambda d: d["spec"].update(memoryMiB="lots"), "spec.memoryMiB"),
        (lambda d: d["spec"].update(disks=[{"volume": "a/b", "file": "/x"}]), "exactly one"),
        (lambda d: d["spec"].update(disks=[{"file": "/var/../etc/shadow"}]), "'..'"),
        (lambda d: d["spec"].update(nics=[{"bridge": "br0/x"}]), "interface name"),
        (lambda d: d.update(kind="Nope"), "unknown kind"),
        (lambda d: d.update(apiVersion="v1"), "apiVersion"),
    ],
)
def test_invalid_vm_is_refused_with_the_field_path(change: Any, expected: str) -> None:
    document = vm()
    change(document)
    assert expected in error_of(document)


ISCSI = {"iscsi": {"target": "vmstore", "lun": 1}}
NIC = {"bridge": "br0", "mac": "52:54:00:12:34:56"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"disks": [{"volume": "vg/lv"}, {"volume": "vg/lv"}]}, "disk volume vg/lv appears twice"),
        ({"disks": [{"volume": "vg/lv"}, {"file": "/dev/vg/lv"}]}, "volume vg/lv appears twice"),
        ({"disks": [{"file": "/srv/a.img"}, {"file": "/srv/a.img"}]}, "file /srv/a.img"),
        ({"disks": [ISCSI, ISCSI]}, "disk iscsi vmstore lun 1 appears twice"),
        (
            {"disks": [{"file": "/srv/cd.iso", "readonly": True}] * 2},
            "disk file /srv/cd.iso appears twice",
        ),
        ({"nics": [{**NIC, "mac": "01:00:5e:00:00:fb"}]}, "multicast or broadcast"),
        ({"nics": [{**NIC, "mac": "ff:ff:ff:ff:ff:ff"}]}, "multicast or broadcast"),
        ({"nics": [{**NIC, "mac": "53:54:00:12:34:56"}]}, "multicast or broadcast"),
        ({"nics": [NIC, {**NIC, "bridge": "br1"}]}, "MAC address 52:54:00:12:34:56 appears twice"),
    ],
)
def test_a_vm_uses_each_disk_and_mac_once_and_macs_are_unicast(
    spec: dict[str, Any], expected: str
) -> None:
    assert expected in error_of(vm(**spec))


def test_distinct_disks_and_unicast_macs_are_accepted() -> None:
    disks = [
        {"volume": "vg/lv"},
        {"volume": "vg/lv2"},
        {"file": "/dev/vg2/lv"},
        {"file": "/srv/a.img"},
        ISCSI,
        {"iscsi": {"target": "vmstore", "lun": 2}},
    ]
    nics = [NIC, {**NIC, "mac": "52:54:00:12:34:57"}, {"bridge": "br1"}, {"bridge": "br2"}]
    parsed = parse_object(vm(disks=disks, nics=nics))
    assert [d.source() for d in parsed.spec.disks] == [
        "volume vg/lv",
        "volume vg/lv2",
        "volume vg2/lv",
        "file /srv/a.img",
        "iscsi vmstore lun 1",
        "iscsi vmstore lun 2",
    ]


def node(**fencing: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kvmctl.io/v1alpha1",
        "kind": "ClusterNode",
        "metadata": {"name": "host1"},
        "spec": {"addresses": {"cluster": "10.0.0.1"}, "fencing": fencing},
    }


def test_fence_password_must_come_from_a_secret() -> None:
    inline = node(
        methods=[
            {
                "name": "ipmi",
                "devices": [{"agent": "fence_ipmilan", "parameters": {"password": "x"}}],
            }
        ]
    )
    assert "never inline" in error_of(inline)
    by_ref = node(
        methods=[
            {
                "name": "ipmi",
                "devices": [
                    {
                        "agent": "fence_ipmilan",
                        "parameters": {"ip": "10.0.0.9"},
                        "secretParameters": {"password": {"name": "ipmi", "key": "password"}},
                    }
                ],
            }
        ]
    )
    assert parse_object(by_ref).spec.fencing.methods[0].devices[0].agent == "fence_ipmilan"


def test_fence_agent_name_cannot_be_a_path() -> None:
    bad = node(methods=[{"name": "m", "devices": [{"agent": "/bin/sh"}]}])
    assert "agent" in error_of(bad)


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"ssh_path": "/bin/sh -c 'id > out'"}, "may use only letters"),
        ({"ip": "10.0.0.9 -oProxyCommand=x"}, "may use only letters"),
        ({"username": "-oProxyCommand=x"}, "may not start with '-'"),
        ({"plug": "vm1\naction=on"}, "control character"),
        ({"plug": "vm1\x0baction=on"}, "control character"),
        ({"help": "1"}, "chosen by kvmctl"),
        ({"Ip": "10.0.0.9"}, "parameters.Ip"),
    ],
)
def test_fence_parameters_are_plain_words(parameters: dict[str, str], expected: str) -> None:
    device = {"agent": "fence_virsh", "parameters": parameters}
    assert expected in error_of(node(methods=[{"name": "m", "devices": [device]}]))


def with_uri(uri: str, where: str = "spec") -> dict[str, Any]:
    document = node(methods=[])
    document[where] = {**document.get(where, {}), "libvirtUri": uri}
    return document


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("qemu+ext://x/system?command=/sbin/poweroff", "transport 'ext' is not allowed"),
        ("qemu+ssh://root@h1/system?command=/bin/sh", "parameter 'command' is not allowed"),
        ("qemu+ssh://h1/system?netcat=/bin/sh", "parameter 'netcat' is not allowed"),
        ("qemu+tcp://h1/system?socket=/tmp/s", "parameter 'socket' is not allowed"),
        ("qemu+unix:///system?socket=/tmp/s", "parameter 'socket' is not allowed"),
        ("qemu+ssh://h1/system?no_tty=1;command=/bin/sh", "no %, ;, # or spaces"),
        ("qemu+ssh://h1/system?%63ommand=/bin/sh", "no %, ;, # or spaces"),
        ("qemu+ssh://-oProxyCommand=x/system", "needs a valid host"),
        ("qemu+ssh://-oProxyCommand=x@h1/system", "needs a valid host"),
        ("qemu+ssh://h1/system?keyfile=../../etc/shadow", "absolute path"),
        ("xen+ssh://h1/system", "expected qemu"),
        ("test:///default", "expected qemu"),
        ("qemu+tcp:///system", "needs a valid host"),
        ("qemu+tcp://h1/session", "path must be /system"),
        ("qemu+tcp://h1/system\n", "no %, ;, # or spaces"),
    ],
)
@pytest.mark.parametrize("where", ["spec", "status"])
def test_libvirt_uris_outside_the_allow_list_are_refused(
    uri: str, expected: str, where: str
) -> None:
    message = error_of(with_uri(uri, where))
    assert f"{where}.libvirtUri" in message and expected in message, message


@pytest.mark.parametrize(
    "uri",
    [
        "qemu:///system",
        "qemu+unix:///system",
        "qemu+tcp://10.10.0.11/system",
        "qemu+tcp://[fd00::11]:16509/system",
        "qemu+tls://host1.example.com/system?pkipath=/etc/pki/libvirt&no_verify=0",
        "qemu+ssh://root@host1/system?keyfile=/root/.ssh/id_ed25519&no_tty=1",
        "qemu+libssh://root@host1:2222/system?known_hosts=/root/.ssh/known_hosts&sshauth=privkey",
    ],
)
def test_supported_libvirt_uris_are_accepted(uri: str) -> None:
    assert parse_object(with_uri(uri)).spec.libvirt_uri == uri


def bond(**spec: Any) -> dict[str, Any]:
    base = {"node": "host1", "interface": "bond0", "slaves": ["eth0", "eth2"]}
    return {
        "apiVersion": "kvmctl.io/v1alpha1",
        "kind": "Bond",
        "metadata": {"name": "b"},
        "spec": {**base, **spec},
    }


def test_bond_cross_field_checks() -> None:
    assert "distinct" in error_of(bond(slaves=["eth0", "eth0"]))
    assert "primary" in error_of(bond(primary="eth9"))
    assert "own slave" in error_of(bond(slaves=["bond0"]))
    assert "mode" in error_of(bond(mode="round-robin"))
    assert parse_object(bond(mode="802.3ad")).spec.mode == "802.3ad"


def target(**spec: Any) -> dict[str, Any]:
    base = {"node": "storage", "iqn": "iqn.2026-11.lab.storage:vmstore"}
    return {
        "apiVersion": "kvmctl.io/v1alpha1",
        "kind": "IscsiTarget",
        "metadata": {"name": "t"},
        "spec": {**base, **spec},
    }


def test_iqn_syntax_and_luns() -> None:
    assert parse_object(target()).spec.portal == "0.0.0.0:3260"
    assert "RFC 3720" in error_of(target(iqn="iqn.bad"))
    assert "RFC 3720" in error_of(target(iqn="iqn.2026-13.lab.x"))
    luns = [{"lun": 1, "backingStore": "/dev/sda"}, {"lun": 1, "backingStore": "/dev/sdb"}]
    assert "distinct" in error_of(target(luns=luns))


def test_volume_group_sizes_and_names() -> None:
    document: dict[str, Any] = {
        "apiVersion": "kvmctl.io/v1alpha1",
        "kind": "VolumeGroup",
        "metadata": {"name": "vg-cluster"},
        "spec": {
            "vgName": "vg_cluster",
            "physicalVolumes": [{"device": "/dev/loop0"}],
            "logicalVolumes": [{"name": "lv_vm1", "size": "50G"}],
        },
    }
    assert parse_object(document).spec.vg_name == "vg_cluster"
    bad = copy.deepcopy(document)
    bad["spec"]["logicalVolumes"][0]["size"] = "50 gallons"
    assert "size" in error_of(bad)
    bad = copy.deepcopy(document)
    bad["spec"]["vgName"] = "vg;rm -rf /"
    assert "LVM name" in error_of(bad)


def test_parse_size_binary_units() -> None:
    assert parse_size("50G") == 50 * 2**30
    assert parse_size("512Mi") == 512 * 2**20
    assert parse_size("1TiB") == 2**40
    with pytest.raises(ValueError):
        parse_size("-1G")


def test_condition_transition_time_moves_only_on_status_change() -> None:
    status = Status()
    assert status.set_condition("Ready", "False", "Starting", "booting")
    first = status.conditions[0].last_transition_time
    assert status.set_condition("Ready", "False", "Waiting", "still booting")
    assert status.conditions[0].last_transition_time == first
    assert not status.set_condition("Ready", "False", "Waiting", "still booting")
    assert status.set_condition("Ready", "True", "Running", "")
    assert len(status.conditions) == 1
