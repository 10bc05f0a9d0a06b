"""Traces and metrics for every kvmctl loop, with the OpenTelemetry SDK (logs: `logs.py`).

`setup_telemetry(service, exporter)` chooses where they go:
- `none`: no-op providers (the default until setup is called): nothing is recorded;
- `console`: spans and metrics printed to stdout (metrics every `export_interval` seconds);
- `prometheus`: metrics into prometheus_client's default registry, which the manager serves on
  `/metrics`; spans are created (so processors can be added) but not exported;
- `otlp`: spans and metrics to an OTLP/gRPC collector (`OTEL_EXPORTER_OTLP_ENDPOINT`), when the
  package `opentelemetry-exporter-otlp-proto-grpc` is installed.

kvmctl keeps its providers here rather than in OpenTelemetry's process-wide globals, so setup
can be called again (tests, reconfiguration) and the previous providers are shut down.

Metrics (Prometheus names): `kvmctl_reconcile_duration_seconds` (histogram by controller, kind,
result), `kvmctl_reconcile_retries_total`, `kvmctl_workqueue_depth`, `kvmctl_leader` (1 while
leading, per election), `kvmctl_failovers_total`, `kvmctl_driver_call_duration_seconds`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sized
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
SCOPE = "kvmctl"


class TelemetryError(ValueError):
    """Telemetry cannot be set up as asked (unknown exporter, missing package)."""


@dataclass
class Telemetry:
    """The providers and instruments in use; see `current()`."""

    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    queues: dict[str, Sized] = field(default_factory=dict)
    leadership: dict[str, int] = field(default_factory=dict)

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
            yield Observation(len(queue), {"controller": controller})

    def _observe_leadership(self, _options: CallbackOptions) -> Iterable[Observation]:
        for election, leading in list(self.leadership.items()):
            yield Observation(leading, {"election": election})

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if isinstance(provider, TracerProvider | MeterProvider):
                provider.shutdown()


_current = Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())


def current() -> Telemetry:
    return _current


def setup_telemetry(
    service_name: str, exporter: Exporter = "none", export_interval: float = 60.0
) -> Telemetry:
    """Create tracer and meter providers exporting to `exporter`; replaces the previous ones."""
    global _current
    if exporter not in EXPORTERS:
        raise TelemetryError(
            f"unknown telemetry exporter {exporter!r} (choose one of {', '.join(EXPORTERS)})"
        )
    resource = Resource.create({"service.name": service_name})
    if exporter == "none":
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

            readers.append(PrometheusMetricReader())
        else:
            span_exporter, metric_exporter = _otlp_exporters()
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            readers.append(
                PeriodicExportingMetricReader(
                    metric_exporter, export_interval_millis=export_interval * 1000
                )
            )
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        telemetry = Telemetry(tracer_provider, meter_provider)
    previous, _current = _current, telemetry
    telemetry.queues.update(previous.queues)
    telemetry.leadership.update(previous.leadership)
    previous.shutdown()
    return telemetry


def _otlp_exporters() -> tuple[Any, Any]:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise TelemetryError(
            "telemetry exporter 'otlp' needs the package opentelemetry-exporter-otlp-proto-grpc "
            "(pip install opentelemetry-exporter-otlp-proto-grpc), or choose console/prometheus"
        ) from None
    return OTLPSpanExporter(), OTLPMetricExporter()


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
