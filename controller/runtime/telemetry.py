"""Traces and metrics for every kvmctl loop, with the OpenTelemetry SDK (logs: `logs.py`).

`setup_telemetry(service, exporter, otlp_endpoint=...)` chooses where they go:
- `none`: no-op providers (the default until setup is called): nothing is recorded;
- `console`: spans and metrics printed to stdout (metrics every `export_interval` seconds);
- `prometheus`: metrics into prometheus_client's default registry, which the manager serves on
  `/metrics`, named the Prometheus way (`kvmctl.fence.operations` → `kvmctl_fence_operations_total`)
  without `otel_scope_*` labels nor `target_info`; spans are created but not exported;
- `otlp`: spans and metrics only to an OTLP/HTTP collector.
With `otlp_endpoint` (`http://collector:4318`), spans and metrics also go there by OTLP/HTTP
(protobuf), whatever the exporter; without it, `otlp` uses `OTEL_EXPORTER_OTLP_ENDPOINT`.
The OTLP metric interval is `OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60 s).

kvmctl keeps its providers here rather than in OpenTelemetry's process-wide globals, so setup
can be called again (tests, reconfiguration) and the previous providers are shut down.

The series (docs/operations.md#metrics): `kvmctl_reconcile_duration_seconds{controller,kind,
result}`, `kvmctl_reconcile_retries_total`, `kvmctl_workqueue_depth{name}`, `kvmctl_leader
{election}` (1 while leading), `kvmctl_node_health{node,health}` and `kvmctl_vm_state{vm,node,
state}` (one series per possible value, 1 for the current one), `kvmctl_failover_duration_seconds
{fence}` (node lost → VM running elsewhere), `kvmctl_failovers_total{node}`,
`kvmctl_fence_operations_total{node,method,result}`, `kvmctl_migrations_total{result}`,
`kvmctl_heartbeat_renew_latency_seconds`, `kvmctl_etcd_member_up{member,endpoint}`,
`kvmctl_driver_call_duration_seconds`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Status, StatusCode

from controller.runtime.logs import LogContext, log_context
from controller.runtime.reconcile import Reconciler, Result, TerminalError

Exporter = Literal["none", "console", "prometheus", "otlp"]
EXPORTERS: tuple[Exporter, ...] = ("none", "console", "prometheus", "otlp")
DURATION_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
FAILOVER_BUCKETS = [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0]
SCOPE = "kvmctl"
MIGRATION_RESULTS = ("succeeded", "failed", "rejected")

StateGauge = Literal["node_health", "vm_state", "etcd_member_up"]
Samples = Callable[[], Iterable[tuple[float, dict[str, str]]]]
"""What a state gauge reports now: (value, labels) pairs, read at every scrape or export."""


class TelemetryError(ValueError):
    """Telemetry cannot be set up as asked (unknown exporter, missing package)."""


@dataclass
class Telemetry:
    """The providers and instruments in use; see `current()`."""

    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    queues: dict[str, Sized] = field(default_factory=dict)
    leadership: dict[str, int] = field(default_factory=dict)
    states: dict[StateGauge, Samples] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer(SCOPE)
        meter = self.meter_provider.get_meter(SCOPE)
        self.reconcile_duration = meter.create_histogram(
            "kvmctl.reconcile.duration",
            unit="s",
            description="Time one reconcile took, by controller, kind and result",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.retries = meter.create_counter(
            "kvmctl.reconcile.retries", description="Reconciles that failed and will be retried"
        )
        self.failovers = meter.create_counter(
            "kvmctl.failovers", description="VMs recovered on another node after a node failure"
        )
        self.driver_duration = meter.create_histogram(
            "kvmctl.driver.call.duration",
            unit="s",
            description="Time one driver call took, by driver, call and outcome",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.failover_duration = meter.create_histogram(
            "kvmctl.failover.duration",
            unit="s",
            description="From a node lost to its VM running elsewhere, by fence path",
            explicit_bucket_boundaries_advisory=FAILOVER_BUCKETS,
        )
        self.fence_operations = meter.create_counter(
            "kvmctl.fence.operations", description="Fence method runs, by node, method and result"
        )
        self.migrations = meter.create_counter(
            "kvmctl.migrations", description="Live migrations ended, by result"
        )
        for result in MIGRATION_RESULTS:  # at 0 from the start, so rate() sees the first
            self.migrations.add(0, {"result": result})
        self.heartbeat_renew_latency = meter.create_histogram(
            "kvmctl.heartbeat.renew.latency",
            unit="s",
            description="Time one successful heartbeat lease renewal took",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        meter.create_observable_gauge(
            "kvmctl.node.health",
            callbacks=[self._observer("node_health")],
            description="1 for each ClusterNode's current health, 0 for the others",
        )
        meter.create_observable_gauge(
            "kvmctl.vm.state",
            callbacks=[self._observer("vm_state")],
            description="1 for each VirtualMachine's current state on its node, 0 for the others",
        )
        meter.create_observable_gauge(
            "kvmctl.etcd.member.up",
            callbacks=[self._observer("etcd_member_up")],
            description="1 while an etcd member answers a linearizable read, else 0",
        )
        meter.create_observable_gauge(
            "kvmctl.workqueue.depth",
            callbacks=[self._observe_queues],
            description="Keys waiting in a controller's work queue",
        )
        meter.create_observable_gauge(
            "kvmctl.leader",
            callbacks=[self._observe_leadership],
            description="1 while this process leads the election, else 0",
        )

    def _observe_queues(self, _options: CallbackOptions) -> Iterable[Observation]:
        for controller, queue in list(self.queues.items()):
            yield Observation(len(queue), {"name": controller})

    def _observe_leadership(self, _options: CallbackOptions) -> Iterable[Observation]:
        for election, leading in list(self.leadership.items()):
            yield Observation(leading, {"election": election})

    def _observer(self, gauge: StateGauge) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            source = self.states.get(gauge)
            return [] if source is None else [Observation(v, a) for v, a in source()]

        return observe

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if isinstance(provider, TracerProvider | MeterProvider):
                provider.shutdown()


_current = Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())


def current() -> Telemetry:
    return _current


def setup_telemetry(
    service_name: str,
    exporter: Exporter = "none",
    export_interval: float = 60.0,
    otlp_endpoint: str | None = None,
) -> Telemetry:
    """Create tracer and meter providers exporting to `exporter` (and by OTLP/HTTP to
    `otlp_endpoint` if given); replaces the previous ones. `export_interval` is the console's."""
    global _current
    if exporter not in EXPORTERS:
        raise TelemetryError(
            f"unknown telemetry exporter {exporter!r} (choose one of {', '.join(EXPORTERS)})"
        )
    resource = Resource.create({"service.name": service_name})
    if exporter == "none" and otlp_endpoint is None:
        telemetry = Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())
    else:
        tracer_provider = TracerProvider(resource=resource)
        readers: list[MetricReader] = []
        if exporter == "console":
            tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            readers.append(
                PeriodicExportingMetricReader(
                    ConsoleMetricExporter(), export_interval_millis=export_interval * 1000
                )
            )
        elif exporter == "prometheus":
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            readers.append(
                PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False)
            )
        if exporter == "otlp" or otlp_endpoint is not None:
            span_exporter, metric_exporter = _otlp_exporters(otlp_endpoint)
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            readers.append(PeriodicExportingMetricReader(metric_exporter))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        telemetry = Telemetry(tracer_provider, meter_provider)
    previous, _current = _current, telemetry
    telemetry.queues.update(previous.queues)
    telemetry.leadership.update(previous.leadership)
    telemetry.states.update(previous.states)
    previous.shutdown()
    return telemetry


def _otlp_exporters(endpoint: str | None) -> tuple[Any, Any]:
    """OTLP/HTTP span and metric exporters to `endpoint` (None: the OTEL_* environment)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise TelemetryError(
            "OTLP export needs the package opentelemetry-exporter-otlp-proto-http "
            "(pip install opentelemetry-exporter-otlp-proto-http)"
        ) from None
    if endpoint is None:
        return OTLPSpanExporter(), OTLPMetricExporter()
    base = endpoint.rstrip("/")
    return (
        OTLPSpanExporter(endpoint=f"{base}/v1/traces"),
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
    )


# Spans and metrics --------------------------------------------------------------------------


@dataclass
class ReconcileOutcome:
    """What a reconcile ended with; `reconcile_span` fills `result` unless the body sets it."""

    result: str = "success"


@contextmanager
def reconcile_span(kind: str, name: str, controller: str = "") -> Iterator[ReconcileOutcome]:
    """A span, a duration measurement and log context (kind, name, reconcile id) for one pass.

    An exception leaving the block marks the result `terminal` (TerminalError) or `error` and is
    re-raised; otherwise the result is what the body put in the yielded outcome.
    """
    telemetry = _current
    outcome = ReconcileOutcome()
    token = log_context.set(LogContext(kind, name, uuid.uuid4().hex[:12]))
    started = time.perf_counter()
    with telemetry.tracer.start_as_current_span(
        f"reconcile {kind}",
        attributes={"kind": kind, "name": name, "controller": controller},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield outcome
        except BaseException as error:
            outcome.result = "terminal" if isinstance(error, TerminalError) else "error"
            span.set_attribute("error", f"{type(error).__name__}: {error}")
            span.set_status(Status(StatusCode.ERROR, str(error)))
            raise
        finally:
            span.set_attribute("result", outcome.result)
            telemetry.reconcile_duration.record(
                time.perf_counter() - started,
                {"controller": controller, "kind": kind, "result": outcome.result},
            )
            log_context.reset(token)


@contextmanager
def driver_span(driver: str, call: str) -> Iterator[None]:
    """A span and a duration measurement around one driver call (libvirt, netlink, tgtadm...)."""
    telemetry = _current
    started = time.perf_counter()
    outcome = "success"
    with telemetry.tracer.start_as_current_span(
        f"{driver}.{call}", attributes={"driver": driver, "call": call}
    ) as span:
        try:
            yield
        except BaseException as error:
            outcome = "error"
            span.set_attribute("error", f"{type(error).__name__}: {error}")
            raise
        finally:
            telemetry.driver_duration.record(
                time.perf_counter() - started,
                {"driver": driver, "call": call, "result": outcome},
            )


class TracedReconciler:
    """Wraps a reconciler so every pass runs in `reconcile_span` and failures count as retries."""

    def __init__(self, reconciler: Reconciler, kind: str, controller: str) -> None:
        self.reconciler = reconciler
        self.kind = kind
        self.controller = controller

    async def reconcile(self, key: str) -> Result:
        try:
            with reconcile_span(self.kind, key, self.controller) as outcome:
                result = await self.reconciler.reconcile(key)
                if result.requeue_after is not None:
                    outcome.result = "requeue"
                return result
        except TerminalError:
            raise
        except Exception:
            _current.retries.add(1, {"controller": self.controller, "kind": self.kind})
            raise


def watch_queue(controller: str, queue: Sized) -> None:
    """Report `len(queue)` as the work queue depth of `controller`."""
    _current.queues[controller] = queue


def forget_queue(controller: str) -> None:
    _current.queues.pop(controller, None)


def set_leader(election: str, leading: bool) -> None:
    _current.leadership[election] = int(leading)


def count_failover(node: str) -> None:
    """Count one VM recovered away from the failed `node`."""
    _current.failovers.add(1, {"node": node})


def watch_states(gauge: StateGauge, samples: Samples) -> None:
    """Report `samples()` as the state gauge `gauge` at every scrape or export."""
    _current.states[gauge] = samples


def forget_states(gauge: StateGauge, samples: Samples) -> None:
    """Stop reporting `gauge`, if `samples` is still what reports it."""
    if _current.states.get(gauge) is samples:
        del _current.states[gauge]


def record_failover(seconds: float, fence: str) -> None:
    """One VM running again, `seconds` after its node was lost; `fence`: how it was fenced."""
    _current.failover_duration.record(seconds, {"fence": fence})


def count_fence(node: str, method: str, succeeded: bool) -> None:
    """One run of a fence method: `succeeded` means confirmed off."""
    result = "success" if succeeded else "failure"
    _current.fence_operations.add(1, {"node": node, "method": method, "result": result})


def count_migration(result: str) -> None:
    """One live migration ended: `succeeded`, `failed`, or `rejected` by the controller."""
    _current.migrations.add(1, {"result": result})


def record_heartbeat_renewal(seconds: float) -> None:
    _current.heartbeat_renew_latency.record(seconds)
