"""The activation claim on one shared LV: which node may have it active (docs/storage.md).

The claim is the etcd key `{prefix}/lvm/activation/{vg}/{lv}` holding the node's name, taken by
compare-and-swap, so two nodes can never both hold it; the holder also tags the LV
`kvmctl_active_<node>` and activates it exclusively. The protocol built on it (when a VM's
node takes, keeps, hands over and releases its claims) is `reconcilers/volume_claims.py`.
"""

from __future__ import annotations

import contextlib

from controller.runtime import layout_keys
from controller.runtime.etcd_lock import LockTimeout
from controller.runtime.store import Delete, KeyCompare, Put, Store
from reconcilers.drivers.lvm import LvmError
from reconcilers.lvm_lock import LvmSettings, metadata_lock

ACTIVE_TAG_PREFIX = "kvmctl_active_"


class ActivationConflict(Exception):
    """The LV is active on (claimed by) another node."""


def active_tag(node: str) -> str:
    return f"{ACTIVE_TAG_PREFIX}{node.replace('-', '_')}"


async def active_on(store: Store, vg: str, lv: str) -> str | None:
    """The node holding the LV's activation claim, if any."""
    reply = await store.keys.get(store.raw_key(layout_keys.lv_activation_claim(vg, lv)))
    return None if reply is None else reply.value.decode()


async def activate_for_vm(
    store: Store,
    settings: LvmSettings,
    vg: str,
    lv: str,
    node: str,
    take_over_from: str | None = None,
) -> None:
    """Claim `vg/lv` for `node` and activate it exclusively there, with LVM as `settings` says.

    The claim is a compare-and-swap in etcd: it succeeds when nobody holds it, when `node`
    already does, or when `take_over_from` does (only pass a node that has been fenced).
    Otherwise `ActivationConflict`. A failed activation drops the claim again.
    """
    key = store.raw_key(layout_keys.lv_activation_claim(vg, lv))
    allowed = [KeyCompare.version(key, 0), KeyCompare.value(key, node.encode())]
    if take_over_from is not None:
        allowed.append(KeyCompare.value(key, take_over_from.encode()))
    claimed = False
    for compare in allowed:
        ok, _ = await store.keys.transaction([compare], [Put(key, node.encode())])
        if ok:
            claimed = True
            break
    if not claimed:
        holder = await active_on(store, vg, lv)
        raise ActivationConflict(f"{vg}/{lv} is active on {holder}; deactivate it there first")
    lvm = settings.driver()
    try:
        async with metadata_lock(store, vg, settings):
            tags = {t for lv_ in await lvm.lvs(vg) if lv_.name == lv for t in lv_.tags}
            for tag in tags:
                if tag.startswith(ACTIVE_TAG_PREFIX) and tag != active_tag(node):
                    await lvm.del_tag(vg, lv, tag)
            if active_tag(node) not in tags:
                await lvm.add_tag(vg, lv, active_tag(node))
        await lvm.lvchange_activate(vg, lv, exclusive=True)
        if not any(found.name == lv and found.active is True for found in await lvm.lvs(vg)):
            # lvchange succeeds without activating when lvm.conf filters the LV out
            # (activation/volume_list) or activation is off (no device-mapper; `active` is None).
            raise LvmError(
                f"lvchange --activate ey {vg}/{lv}",
                f"it is not active on {node}: check activation/volume_list and that "
                "device-mapper is available",
            )
    except BaseException:
        await deactivate(store, settings, vg, lv, node)
        raise


async def deactivate(store: Store, settings: LvmSettings, vg: str, lv: str, node: str) -> None:
    """Deactivate `vg/lv` on `node` and drop its claim and tag (no-op when not held)."""
    lvm = settings.driver()
    with contextlib.suppress(LvmError):
        await lvm.lvchange_deactivate(vg, lv)
    async with metadata_lock(store, vg, settings):
        for found in await lvm.lvs(vg):
            if found.name == lv and active_tag(node) in found.tags:
                await lvm.del_tag(vg, lv, active_tag(node))
    key = store.raw_key(layout_keys.lv_activation_claim(vg, lv))
    await store.keys.transaction([KeyCompare.value(key, node.encode())], [Delete(key)])


ACTIVATION_ERRORS = (ActivationConflict, LvmError, LockTimeout)
"""What `activate_for_vm` and `deactivate` raise when the LV cannot be taken or released."""
