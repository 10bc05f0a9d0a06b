"""Defaults shared by the daemons and the command line.

Kept free of heavy imports (libvirt, OpenTelemetry, the reconcilers), so that `kvmctl` can show
them in its help without loading what only the daemons need: short commands start fast.
"""

DEFAULT_HTTP_PORT = 8080
"""Port of a manager's /healthz and /metrics."""
DEFAULT_MIGRATION_CONCURRENCY = 2
"""Outgoing live migrations an agent runs at once."""
