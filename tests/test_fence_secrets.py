"""A fence device may use only the Secrets meant for its node (real etcd, real fence agents)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller.fencing import fencing_problems, runner_device
from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, Secret
from crds.clusternode import ClusterNodeSpec
from crds.clusternode import FenceDevice as FenceDeviceSpec
from crds.secret import SecretSpec
from reconcilers.drivers.fence import FenceRunner
from reconcilers.drivers.fence_policy import FenceConfigError

SECRETS = {
    "host1-bmc": {"kvmctl.io/node": "host1"},
    "host2-bmc": {"kvmctl.io/node": "host2"},
    "shared-bmc": {"kvmctl.io/usage": "fencing"},
    "iscsi-chap": {},
    "chap-for-storage": {"kvmctl.io/usage": "iscsi"},
}


@pytest.fixture
async def store(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Store]:
    async with Store(etcd_endpoints, key_prefix) as connected:
        for name, labels in SECRETS.items():
            secret = Secret(
                metadata=ObjectMeta(name=name, labels=labels),
                spec=SecretSpec(data={"password": f"pw-of-{name}"}),
            )
            await connected.create(secret)
        yield connected


def ipmi(secret: str, key: str = "password", **parameters: str) -> FenceDeviceSpec:
    return FenceDeviceSpec.model_validate(
        {
            "agent": "fence_ipmilan",
            "parameters": {"ip": "10.0.0.9", "username": "admin", **parameters},
            "secretParameters": {"password": {"name": secret, "key": key}},
        }
    )


@pytest.mark.parametrize("secret", ["host1-bmc", "shared-bmc"])
async def test_a_node_uses_its_own_and_fencing_secrets(store: Store, secret: str) -> None:
    device = await runner_device(store, "host1", ipmi(secret))
    assert device.secret_parameters == {"password": f"pw-of-{secret}"}


@pytest.mark.parametrize("secret", ["host2-bmc", "iscsi-chap", "chap-for-storage"])
async def test_any_other_secret_is_refused_without_its_value(store: Store, secret: str) -> None:
    with pytest.raises(FenceConfigError) as caught:
        await runner_device(store, "host1", ipmi(secret))
    message = str(caught.value)
    assert f"Secret {secret!r} is not for fencing host1" in message
    assert "kvmctl.io/node=host1 or kvmctl.io/usage=fencing" in message
    assert "pw-of" not in message


async def test_missing_secrets_and_keys_are_named(store: Store) -> None:
    with pytest.raises(FenceConfigError, match="Secret 'nope' not found"):
        await runner_device(store, "host1", ipmi("nope"))
    with pytest.raises(FenceConfigError, match="Secret 'shared-bmc' has no key 'pin'"):
        await runner_device(store, "host1", ipmi("shared-bmc", key="pin"))


async def test_fencing_problems_lists_each_bad_device_and_skips_fence_manual(store: Store) -> None:
    methods: list[dict[str, Any]] = [
        {
            "name": "ipmi",
            "devices": [
                ipmi("shared-bmc").model_dump(by_alias=True),
                ipmi("host2-bmc").model_dump(by_alias=True),
                {"agent": "fence_virsh", "parameters": {"ip": "h", "ssh_path": "/tmp/x"}},
            ],
        },
        {"name": "manual", "devices": [{"agent": "fence_manual"}]},
    ]
    spec = {"addresses": {"cluster": "10.0.0.1"}, "fencing": {"methods": methods}}
    node = ClusterNode(metadata=ObjectMeta(name="host1"), spec=ClusterNodeSpec.model_validate(spec))
    problems = await fencing_problems(store, FenceRunner(), node)
    assert len(problems) == 2, problems
    assert problems[0].startswith("method ipmi device 1: ") and "'host2-bmc'" in problems[0]
    assert problems[1].startswith("method ipmi device 2: ") and "'ssh_path'" in problems[1]
