"""The daemons' metrics, scraped from real `kvmctl controller` and `kvmctl agent` processes on the
test's etcd (agents on libvirt's test driver): series named the Prometheus way, without
`otel_scope_*` labels, that follow a node loss, its fencing and the failover of its VM; every
query of the shipped Grafana dashboard and every alert rule names a series a daemon exposes;
`--otlp-endpoint` sends both daemons' traces and metrics to an OTLP/HTTP receiver; `--metrics-host`
chooses the address."""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from controller.cli import build_parser
from controller.runtime.store import Store
from crds import ObjectMeta, VirtualMachineMigration
from crds.meta import now
from crds.migration import VirtualMachineMigrationSpec
from crds.virtualmachine import Placement
from e2e.harness.etcd import free_ports
from e2e.harness.polling import eventually
from e2e.harness.private_host import host_uri
from tests.support.agents import vm_object
from tests.support.ha import TIMINGS, node_object, power_fenced_node
from tests.support.metrics import ROOT, Daemon, Sample, metric_names, scrape, try_scrape, value

DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
RULES = sorted((ROOT / "deploy" / "prometheus").glob("*-alerts.yaml"))
REQUIRED_ALERTS = {
    "KvmctlNodeLost",
    "KvmctlFencingFailing",
    "KvmctlVMNotRunning",
    "KvmctlNoLeader",
    "KvmctlEtcdMemberDown",
}
RECONCILES = "kvmctl_reconcile_duration_seconds_count"
HEARTBEAT = [
    f"--lease-ttl={int(TIMINGS.lease_ttl)}",
    f"--renew-interval={TIMINGS.renew_interval}",
    f"--self-fence-margin={TIMINGS.self_fence_margin}",
]
CONTROLLER_TIMINGS = [
    f"--recovery-grace={TIMINGS.recovery_grace}",
    f"--watchdog-timeout={TIMINGS.watchdog_timeout}",
    f"--fence-retry-initial={TIMINGS.fence_retry_initial}",
    f"--fence-retry-max={TIMINGS.fence_retry_max}",
    "--election-ttl=10",
    "--fence-agents=default,fence_dummy",
    "--fence-allow-parameter=fence_dummy:status_file",
]


def controller(etcd: list[str], prefix: str, tmp_path: Path, port: int, *extra: str) -> Daemon:
    argv = ["controller", "--identity", "ctl-metrics", "--metrics-port", str(port)]
    return Daemon(
        etcd, prefix, tmp_path / "controller.log", *argv, *HEARTBEAT, *CONTROLLER_TIMINGS, *extra
    )


def agent(etcd: list[str], prefix: str, tmp_path: Path, node: str, port: int) -> Daemon:
    argv = [
        "agent", "--node", node, "--libvirt-uri", host_uri(tmp_path, node),
        "--domain-type", "qemu", "--no-storage", "--no-lv-activation", "--peer-port", "0",
        "--metrics-port", str(port), *HEARTBEAT,
    ]  # fmt: skip
    return Daemon(etcd, prefix, tmp_path / f"agent-{node}.log", *argv)


async def scraped_when(daemon: Daemon, port: int, what: str, condition: Any) -> list[Sample]:
    """Scrape `port` until `condition(samples)` holds; the samples that satisfied it (on
    failure, the message ends with the daemon's log)."""

    async def satisfied() -> list[Sample] | None:
        samples = await try_scrape(port)
        return samples if samples is not None and condition(samples) else None

    try:
        found: list[Sample] = await eventually(satisfied, what)
    except AssertionError as error:
        last = [
            x
            for x in await try_scrape(port) or []
            if x.name.startswith("kvmctl_")
            and ("vm" in x.labels or "health" in x.labels)
            and x.value == 1
        ]
        raise AssertionError(f"{error}\n{last}\n{daemon.output()}") from None
    return found


def is_one(samples: list[Sample], name: str, /, **labels: str) -> bool:
    return value(samples, name, **labels) == 1.0


def has(samples: list[Sample], name: str, /, **labels: str) -> bool:
    """Whether some sample `name` has (at least) these labels."""
    return any(s.name == name and labels.items() <= s.labels.items() for s in samples)


async def test_a_failover_shows_in_the_daemons_metrics_and_the_dashboard_names_only_real_series(
    etcd_endpoints: list[str], key_prefix: str, store: Store, tmp_path: Path
) -> None:
    power = await power_fenced_node(store, tmp_path, "a", secret_of="a")
    await store.create(node_object("b"))
    ctl_port, a_port, b_port = free_ports(3)
    async with contextlib.AsyncExitStack() as daemons:
        ctl = await daemons.enter_async_context(
            controller(etcd_endpoints, key_prefix, tmp_path, ctl_port)
        )
        agent_a = await daemons.enter_async_context(
            agent(etcd_endpoints, key_prefix, tmp_path, "a", a_port)
        )
        agent_b = await daemons.enter_async_context(
            agent(etcd_endpoints, key_prefix, tmp_path, "b", b_port)
        )
        await scraped_when(
            ctl,
            ctl_port,
            "a and b Online in the controller's metrics",
            lambda s: all(is_one(s, "kvmctl_node_health", node=n, health="Online") for n in "ab"),
        )
        domain = {"ordered": True, "nodes": [{"name": "a"}, {"name": "b", "priority": 2}]}
        await store.create(vm_object("vm1", failoverDomain=domain))

        # Before: both nodes Online, vm1 running on a, one leader, etcd up.
        before = await scraped_when(
            ctl,
            ctl_port,
            "vm1 running on a, a and b Online in the controller's metrics",
            lambda s: (
                is_one(s, "kvmctl_vm_state", vm="vm1", node="a", state="Running")
                and all(is_one(s, "kvmctl_node_health", node=n, health="Online") for n in "ab")
            ),
        )
        for node in ("a", "b"):
            assert value(before, "kvmctl_node_health", node=node, health="Fenced") == 0.0
        assert value(before, "kvmctl_vm_state", vm="vm1", state="Crashed") == 0.0
        assert is_one(before, "kvmctl_vm_state", vm="vm1", desired="started", state="Running")
        assert is_one(before, "kvmctl_leader")
        assert any(s.name == "kvmctl_etcd_member_up" and s.value == 1.0 for s in before)
        assert value(before, "kvmctl_failover_duration_seconds_count") is None
        assert value(before, "kvmctl_migrations_total", result="rejected") == 0.0

        # a's agent dies: a is lost, power-fenced, vm1 recovered and running on b.
        await agent_a.stop(signal.SIGKILL)
        after = await scraped_when(
            ctl,
            ctl_port,
            "vm1's failover measured",
            lambda s: value(s, "kvmctl_failover_duration_seconds_count", fence="PowerOff") == 1,
        )
        assert power.read_text() == "off"
        assert is_one(after, "kvmctl_node_health", node="a", health="Fenced")
        assert value(after, "kvmctl_node_health", node="a", health="Online") == 0.0
        assert is_one(after, "kvmctl_node_health", node="b", health="Online")
        assert is_one(after, "kvmctl_vm_state", vm="vm1", node="b", state="Running")
        assert value(after, "kvmctl_vm_state", vm="vm1", node="a", state="Running") is None
        fenced = value(
            after, "kvmctl_fence_operations_total", node="a", method="dummy", result="success"
        )
        assert fenced is not None and fenced >= 1
        assert is_one(after, "kvmctl_failovers_total", node="a")
        duration = value(after, "kvmctl_failover_duration_seconds_sum", fence="PowerOff")
        assert duration is not None and duration > 0

        # A migration to a node that does not exist is rejected by the controller.
        await store.create(
            VirtualMachineMigration(
                metadata=ObjectMeta(name="vm1-to-z"),
                spec=VirtualMachineMigrationSpec(vm="vm1", target_node="z"),
            )
        )
        loops = ("ha", "migrations", "fence-check")
        controller_samples = await scraped_when(
            ctl,
            ctl_port,
            "the rejected migration counted and every leader loop timed",
            lambda s: (
                is_one(s, "kvmctl_migrations_total", result="rejected")
                and all(
                    has(s, "kvmctl_reconcile_duration_seconds_count", controller=n) for n in loops
                )
            ),
        )
        assert value(controller_samples, "kvmctl_workqueue_depth", name="migrations") is not None

        # b's agent serves the agent-side series: its heartbeat, its loops, its migrations.
        agent_samples = await scraped_when(
            agent_b,
            b_port,
            "b's agent measured its VM reconciles",
            lambda s: has(
                s, "kvmctl_reconcile_duration_seconds_count", controller="virtualmachine"
            ),
        )
        renewals = value(agent_samples, "kvmctl_heartbeat_renew_latency_seconds_count")
        assert renewals is not None and renewals > 0
        assert value(agent_samples, "kvmctl_workqueue_depth", name="virtualmachine") is not None
        assert value(agent_samples, "kvmctl_migrations_total", result="succeeded") == 0.0
        agent_names = {s.name for s in agent_samples}
        assert "kvmctl_node_health" not in agent_names and "kvmctl_leader" not in agent_names

    for sample in controller_samples + agent_samples:
        assert not any(label.startswith("otel_scope") for label in sample.labels), sample
        assert sample.name != "target_info"

    exposed = {s.name for s in controller_samples + agent_samples}
    for path, expr in dashboard_queries() + rule_queries():
        missing = metric_names(expr) - exposed
        assert not missing, f"{path.name}: {expr!r} names series no daemon exposes: {missing}"


def dashboard_queries() -> list[tuple[Path, str]]:
    """Every PromQL `expr` of every panel target of the shipped dashboards."""
    assert DASHBOARDS, "no dashboard under deploy/grafana"
    queries: list[tuple[Path, str]] = []

    def walk(node: Any, path: Path) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key == "expr" and isinstance(item, str):
                    queries.append((path, item))
                else:
                    walk(item, path)
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    for path in DASHBOARDS:
        walk(json.loads(path.read_text()), path)
    assert len(queries) >= 10
    return queries


def rule_queries() -> list[tuple[Path, str]]:
    return [(path, rule["expr"]) for path, rule in alert_rules()]


def alert_rules() -> list[tuple[Path, dict[str, Any]]]:
    assert RULES, "no alert rules under deploy/prometheus"
    rules: list[tuple[Path, dict[str, Any]]] = []
    for path in RULES:
        document = yaml.safe_load(path.read_text())
        for group in document["groups"]:
            rules += [(path, rule) for rule in group["rules"]]
    return rules


def test_promql_metric_names_leave_out_functions_labels_ranges_and_keywords() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le, fence) (rate(kvmctl_failover_duration_seconds_bucket"
        '{fence=~"Power.*", node!="x"}[$__rate_interval]))) > 2.5e3 and on (node) '
        "(max(kvmctl_leader) or vector(0)) < 1 unless kvmctl_made_up_total offset 5m"
    )
    assert metric_names(expr) == {
        "kvmctl_failover_duration_seconds_bucket",
        "kvmctl_leader",
        "kvmctl_made_up_total",
    }


def test_alert_rules_are_well_formed_and_cover_the_failures_an_operator_must_know() -> None:
    rules = alert_rules()
    names = {rule["alert"] for _, rule in rules}
    assert names >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - names}"
    for path, rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["expr"].strip() and metric_names(rule["expr"]), (path.name, rule["alert"])
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    promtool = shutil.which("promtool")
    if promtool is not None:  # the full check where Prometheus' tool is installed
        for path in RULES:
            result = subprocess.run(
                [promtool, "check", "rules", str(path)], capture_output=True, text=True
            )
            assert result.returncode == 0, result.stdout + result.stderr


# OTLP ------------------------------------------------------------------------------------


class Receiver:
    """A tiny OTLP/HTTP receiver: decodes what comes to /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        self.spans: set[str] = set()
        self.metrics: set[str] = set()
        self.services: set[str] = set()
        self.lock = threading.Lock()

    def take(self, path: str, body: bytes) -> None:
        with self.lock:
            if path == "/v1/traces":
                traces = ExportTraceServiceRequest.FromString(body)
                for resource_spans in traces.resource_spans:
                    self._service(resource_spans.resource.attributes)
                    for scope in resource_spans.scope_spans:
                        self.spans |= {span.name for span in scope.spans}
            elif path == "/v1/metrics":
                metrics = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in metrics.resource_metrics:
                    self._service(resource_metrics.resource.attributes)
                    for scope in resource_metrics.scope_metrics:
                        self.metrics |= {metric.name for metric in scope.metrics}

    def _service(self, attributes: Any) -> None:
        for attribute in attributes:
            if attribute.key == "service.name":
                self.services.add(attribute.value.string_value)


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[Receiver, int]]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            receiver.take(self.path, body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_otlp_endpoint_receives_the_controllers_traces_and_metrics(
    etcd_endpoints: list[str], key_prefix: str, tmp_path: Path
) -> None:
    (ctl_port,) = free_ports(1)
    with otlp_receiver() as (receiver, otlp_port):
        daemon = controller(
            etcd_endpoints, key_prefix, tmp_path, ctl_port,
            "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}",
        )  # fmt: skip
        daemon.env.update({"OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "200"})
        async with daemon:
            await eventually(
                lambda: "reconcile Cluster" in receiver.spans, "the HA loop's spans by OTLP"
            )
            await eventually(
                lambda: {"kvmctl.leader", "kvmctl.workqueue.depth"} <= receiver.metrics,
                "the controller's metrics by OTLP",
            )
            # Prometheus still scrapes the same instruments.
            samples = await scrape(ctl_port)
            assert is_one(samples, "kvmctl_leader")
        assert receiver.services == {"kvmctl-controller"}


async def test_metrics_host_and_port_choose_where_the_daemons_serve(
    etcd_endpoints: list[str], key_prefix: str, tmp_path: Path
) -> None:
    """The controller on 127.0.0.2 only; the agent's flags reach its settings the same way."""
    (port,) = free_ports(1)
    daemon = controller(etcd_endpoints, key_prefix, tmp_path, port, "--metrics-host", "127.0.0.2")
    async with daemon:

        async def served() -> bool:
            """Served there, with the leader gauge (set once the daemon's election ran)."""
            assert daemon.alive(), daemon.output()
            samples = await try_scrape(port, "127.0.0.2")
            return samples is not None and has(samples, "kvmctl_leader")

        await eventually(served, "/metrics on 127.0.0.2 with kvmctl_leader")
        assert await try_scrape(port) is None, "served on 127.0.0.1 too"
    args = build_parser().parse_args(["agent", "--metrics-host", "::1", "--metrics-port", "9"])
    assert (args.metrics_host, args.metrics_port) == ("::1", 9)


async def test_otlp_endpoint_receives_the_agents_traces_and_metrics(
    etcd_endpoints: list[str], key_prefix: str, tmp_path: Path
) -> None:
    with otlp_receiver() as (receiver, otlp_port):
        argv = [
            "agent", "--node", "n1", "--libvirt-uri", "test:///default", "--no-storage",
            "--no-lv-activation", "--peer-port", "0", "--metrics-port", "0", *HEARTBEAT,
            "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}",
        ]  # fmt: skip
        daemon = Daemon(etcd_endpoints, key_prefix, tmp_path / "agent.log", *argv)
        daemon.env.update({"OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "200"})
        async with Store(etcd_endpoints, key_prefix) as store, daemon:
            await store.create(node_object("n1"))
            vm = await store.create(vm_object("vm1"))
            vm.status.placement = Placement(node="n1", token=1, since=now())  # as the leader
            await store.update_status(vm)

            def spans() -> bool:
                assert daemon.alive(), daemon.output()
                return "reconcile VirtualMachine" in receiver.spans

            await eventually(spans, "the agent's reconcile spans by OTLP")
            wanted = {"kvmctl.heartbeat.renew.latency", "kvmctl.reconcile.duration"}
            await eventually(lambda: wanted <= receiver.metrics, "the agent's metrics by OTLP")
        assert receiver.services == {"kvmctl-agent"}
