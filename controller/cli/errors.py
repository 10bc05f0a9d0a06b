"""Errors the command modules raise for `main` to turn into an exit code."""

from __future__ import annotations


class UsageError(Exception):
    """Wrong words on the command line: exit 2."""
