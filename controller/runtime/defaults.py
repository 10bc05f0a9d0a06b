"""Defaults shared by the daemons and the command line.

Kept free of heavy imports (libvirt, OpenTelemetry, the reconcilers), so that `kvmctl` can show
them in its help without loading what only the daemons need: short commands start fast.
"""

import socket

DEFAULT_HTTP_PORT = 8080
"""Port of a manager's /healthz and /metrics (the controller's)."""
DEFAULT_AGENT_HTTP_PORT = 8081
"""Port of the agent's /healthz and /metrics (beside a controller on the same host)."""
DEFAULT_MIGRATION_CONCURRENCY = 2
"""Outgoing live migrations an agent runs at once."""


def short_hostname() -> str:
    """This host's name up to the first dot, lowercased: the default ClusterNode name.

    Works whether the kernel hostname is `host1` or `host1.example.org` (systemd's `%H` is the
    full one; its `%l`, the short one, exists only from systemd 254, newer than Debian 12's 252).
    """
    return socket.gethostname().split(".", 1)[0].lower()
