"""The VirtualMachine reconciler of one host agent: libvirt domains follow `status.placement`.

Level-triggered: `reconcile(name)` reads the VM (informer cache), the local domain of the same
name (libvirt) and converges one step:

- placed here, `runState: started`: add the finalizer `kvmctl.io/domain`, define the domain from
  the spec and start it (after re-reading the VM from etcd: a stale cache never starts a VM
  that was moved away); a running domain is adopted (its owner uid matches). A spec changed
  while running sets `RestartRequired` and is applied at the next start. A domain that stops
  while it should run is restarted in place, up to `restartPolicy.maxRestarts` within
  `windowSeconds`; past that: `RestartLimitReached`, state Crashed, left down. A running guest
  failing its `spec.health` checks (guest-agent pings, watchdog resets: `health.py`) is reset
  in place, counted the same way (`GuestUnresponsive`), or destroyed and left down at the limit.
- placed here, `stopped`/`disabled`: graceful shutdown within `shutdownTimeoutSeconds`, then
  destroy.
- not placed here: a running domain is destroyed at once with a Warning event
  `DomainStoppedNotPlacedHere` (never two copies), except while a migration of the VM to or
  from this node is in flight (`handover.py`).
- being deleted: destroy and undefine the local domain; the placement node (or any node when
  there is no placement) then removes the finalizer.

LV activation (when `DomainSettings.lvm` is set) is `reconcilers/volume_claims.py`: a VM whose
LVs cannot be claimed here is not started and the reconcile is `Blocked`
(`Ready=False VolumeActivationFailed`, one Warning event, a new attempt every
`ACTIVATION_RETRY`).

What to do with a domain is decided by the agent rules shared with the HA simulator
(`controller/ha/agent_rules.py`: `decide_domain`); this package carries the decisions out.

Modules: `domain.py` (the definition, the libvirt calls that end a domain), `reconciler.py`
(the lifecycle), `handover.py` (live migration), `health.py` (guest checks), `status.py` (what
is written to the VM).
"""

from .domain import ACTIVE_STATES, DomainSettings, destroy_every_domain, spec_hash
from .reconciler import FINALIZER, VirtualMachineReconciler

__all__ = [
    "ACTIVE_STATES",
    "FINALIZER",
    "DomainSettings",
    "VirtualMachineReconciler",
    "destroy_every_domain",
    "spec_hash",
]
