"""Object builders shared by the chaos tests, the bench and the soak: `ipmi_secret`, `ipmi_node`,
`guest_vm`; import them from `e2e.harness.chaos`."""

from __future__ import annotations

from collections.abc import Sequence

from controller.fencing import FENCING_USAGE, USAGE_LABEL
from crds import ClusterNode, ObjectMeta, Secret, VirtualMachine
from crds.clusternode import ClusterNodeSpec
from crds.secret import SecretSpec
from crds.virtualmachine import VirtualMachineSpec
from e2e.guest.build import KERNEL_CMDLINE, GuestImage
from e2e.harness.cluster import Cluster

IPMI_SECRET = "ipmi"


def ipmi_secret(password: str, name: str = IPMI_SECRET) -> Secret:
    return Secret(
        metadata=ObjectMeta(name=name, labels={USAGE_LABEL: FENCING_USAGE}),
        spec=SecretSpec.model_validate({"data": {"password": password}}),
    )


def ipmi_node(
    cluster: Cluster,
    name: str,
    *,
    secret: str = IPMI_SECRET,
    self_fence: bool = False,
    power_wait: int | None = None,
) -> ClusterNode:
    """A ClusterNode fenced by fence_ipmilan through its simulated BMC (password in `secret`),
    or relying on self-fencing with `self_fence` (the method stays declared, unused)."""
    bmc = cluster.bmc(name)
    parameters = {
        "ip": bmc.address,
        "ipport": str(bmc.port),
        "username": bmc.user,
        "lanplus": "1",
    }
    if power_wait is not None:
        parameters["power_wait"] = str(power_wait)
    device = {
        "agent": "fence_ipmilan",
        "parameters": parameters,
        "secretParameters": {"password": {"name": secret, "key": "password"}},
        "timeoutSeconds": 20,
    }
    spec = {
        "addresses": {"cluster": cluster.host(name).address},
        "libvirtUri": cluster.host(name).libvirt_tcp_uri,
        "fencing": {"methods": [{"name": "ipmi", "devices": [device]}], "selfFence": self_fence},
    }
    return ClusterNode(metadata=ObjectMeta(name=name), spec=ClusterNodeSpec.model_validate(spec))


def guest_vm(
    name: str, image: GuestImage, preferred: Sequence[str], *, restricted: bool = False
) -> VirtualMachine:
    """A tiny TCG guest (96 MiB, ticks on its console) preferring `preferred` in that order."""
    nodes = [{"name": node, "priority": rank} for rank, node in enumerate(preferred, start=1)]
    spec = {
        "memoryMiB": 96,
        "boot": {
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "cmdline": KERNEL_CMDLINE,
        },
        "failoverDomain": {"ordered": True, "restricted": restricted, "nodes": nodes},
        "shutdownTimeoutSeconds": 5,
    }
    return VirtualMachine(
        metadata=ObjectMeta(name=name), spec=VirtualMachineSpec.model_validate(spec)
    )
