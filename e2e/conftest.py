"""Fixtures shared by the e2e tests (defined in e2e/harness/)."""

from __future__ import annotations

from e2e.harness.agent_lab import agent_lab, controller

__all__ = ["agent_lab", "controller"]  # the agent lab (module scope) and its elected controller
