"""Live-migration hand-over, as the VM reconciler sees it.

While a migration of the VM to or from this node is in flight (`in_flight_migration`) the
migration owns the domain: the reconciler neither starts nor destroys it; as the target of a
Running migration it takes the VM's LVs over (`VolumeClaims.take_over_incoming`), and on the
placement node it reports the VM `Migrating`. After the switch, a domain this agent finds
running while the VM is placed elsewhere is destroyed only once etcd, read now, agrees.
"""

from __future__ import annotations

from controller.runtime.informer import Informer
from controller.runtime.reconcile import RetryableError
from controller.runtime.store import NotFound, Store, StoreError
from crds import VirtualMachine, VirtualMachineMigration
from reconcilers.migration import in_flight_migration
from reconcilers.volume_claims import VolumeClaims

from .status import StatusWriter, placed_on, set_migrating


class MigrationHandover:
    """Node `node`'s part in the migrations of its VMs."""

    def __init__(
        self,
        node: str,
        store: Store,
        migrations: Informer,
        claims: VolumeClaims,
        status: StatusWriter,
    ) -> None:
        self.node = node
        self.store = store
        self.migrations = migrations
        self.claims = claims
        self.status = status

    def in_flight(self, vm: VirtualMachine) -> VirtualMachineMigration | None:
        """The migration that owns the VM's domain on this node now, if any (cache)."""
        return in_flight_migration(self.migrations.list(), vm.metadata.name, self.node)

    async def leave_to(self, vm: VirtualMachine, migration: VirtualMachineMigration) -> None:
        """A migration owns the domain: neither start nor destroy it."""
        await self.claims.take_over_incoming(vm, migration)
        if placed_on(vm, self.node) and migration.status.phase == "Running":
            await self.status.patch(vm, set_migrating)

    async def confirmed_elsewhere(self, vm: VirtualMachine) -> bool:
        """Whether etcd, read now, agrees the VM is not placed here and no migration owns it.

        The VM and migration caches are separate watches: right after a migration, this agent
        may see the placement switched on the migration before the VM's new placement arrives,
        and must not take the domain that just arrived for a straggler.
        """
        try:
            fresh = await self.store.get("VirtualMachine", vm.metadata.name)
            migrations, _ = await self.store.list_objects("VirtualMachineMigration")
        except NotFound:
            return True
        except StoreError as error:
            raise RetryableError(f"re-reading {vm.metadata.name}: {error}") from None
        if not isinstance(fresh, VirtualMachine) or fresh.metadata.uid != vm.metadata.uid:
            return True
        migrating = in_flight_migration(migrations, vm.metadata.name, self.node)
        return not placed_on(fresh, self.node) and migrating is None

    async def after_leaving(self, vm: VirtualMachine) -> None:
        """The VM is placed elsewhere now: drop what a failed incoming migration took here."""
        await self.claims.release_failed_incoming(vm)
