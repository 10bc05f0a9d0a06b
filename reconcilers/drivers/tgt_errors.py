"""The errors of the tgtadm driver; import them from `reconcilers.drivers.tgt`."""

from __future__ import annotations


class TgtError(Exception):
    """tgtadm refused a request; the message names the request and tgtadm's reason."""


class TgtUnavailable(TgtError):
    """No tgtd answers on the control port (not running, or tgtadm is not installed)."""
