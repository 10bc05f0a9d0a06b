"""The runtime: store, cache, queues, reconcile contract, leader election, events, telemetry,
Manager.

The bottom layer of kvmctl: nothing here imports the HA brain, the agent, the CLI or the reconcilers
(import-linter checks it).
"""
