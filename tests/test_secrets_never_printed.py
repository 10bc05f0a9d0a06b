"""Secret values never appear in anything kvmctl prints, logs, records or traces.

Secrets with distinctive values are applied through the CLI, then everything that could show
them runs for real (against etcd, tgtd and Debian's fence agents): `get` of every kind in every
format, `describe`, `events`, `diff`, refused manifests, store errors, the fence runner with a
failing device whose agent echoes its input, and the iSCSI reconciler with CHAP (traced, with
events). Every output, log record (DEBUG and up), Event, status and span is searched for the
values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.manifests import load_text
from controller.runtime import telemetry
from controller.runtime.events import EventRecorder
from controller.runtime.store import Store
from crds import KINDS, Secret
from e2e.harness.tgtd import TgtDaemon
from reconcilers.drivers.fence import FenceRunner
from reconcilers.drivers.fence_policy import FenceConfigError, FenceDevice, FencePolicy
from reconcilers.drivers.tgt import TgtAdm, TgtError
from reconcilers.iscsitarget import IscsiTargetReconciler
from tests.support.cli import Run

FENCE_PASSWORD = "Fence-Pw-9f3c1a7e"
CHAP_PASSWORD = "Chap-Secret-5b2d8e41"
ROTATED_CHAP = "Chap-Rotated-77d0c3aa"
SECRETS = (FENCE_PASSWORD, CHAP_PASSWORD, ROTATED_CHAP)
NODE = "storage1"


def manifests(lun_file: str = "/var/lib/kvmctl/lun1.img") -> str:
    """Secrets, a ClusterNode fenced with one, an IscsiTarget with CHAP from the other."""
    return f"""
apiVersion: kvmctl.io/v1alpha1
kind: Secret
metadata: {{name: bmc-host1}}
spec: {{data: {{password: {FENCE_PASSWORD}}}}}
---
apiVersion: kvmctl.io/v1alpha1
kind: Secret
metadata: {{name: chap}}
spec: {{data: {{password: {CHAP_PASSWORD}}}}}
---
apiVersion: kvmctl.io/v1alpha1
kind: ClusterNode
metadata: {{name: host1}}
spec:
  addresses: {{cluster: 10.0.0.1}}
  fencing:
    methods:
    - name: ipmi
      devices:
      - agent: fence_ipmilan
        parameters: {{ip: 10.0.1.1, username: admin}}
        secretParameters: {{password: {{name: bmc-host1, key: password}}}}
---
apiVersion: kvmctl.io/v1alpha1
kind: ClusterNode
metadata: {{name: {NODE}}}
spec:
  addresses: {{cluster: 10.0.0.9}}
  storage: {{exportRoots: [{os.path.dirname(lun_file)}]}}
---
apiVersion: kvmctl.io/v1alpha1
kind: IscsiTarget
metadata: {{name: vg-cluster}}
spec:
  node: {NODE}
  iqn: iqn.2024-01.org.example:storage.vg-cluster
  acl: {{allowAll: true}}
  luns: [{{lun: 1, backingStore: {lun_file}}}]
  chap: {{username: host1, secretRef: {{name: chap, key: password}}}}
"""


def assert_no_secret(text: str, where: str) -> None:
    for value in SECRETS:
        assert value not in text, f"secret value {value!r} printed in {where}:\n{text}"


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every log record at DEBUG; at the end, none may hold a secret."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        assert_no_secret(text, f"log record {record.name}")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Route telemetry's spans to memory for the test; restore a no-op setup after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    installed = telemetry.setup_telemetry("kvmctl-test", "none")
    installed.tracer_provider = provider
    installed.tracer = provider.get_tracer(telemetry.SCOPE)
    yield exporter
    telemetry.setup_telemetry("kvmctl-test", "none")
    provider.shutdown()


def span_text(exporter: InMemorySpanExporter) -> str:
    return "\n".join(span.to_json() for span in exporter.get_finished_spans())


Checked = Callable[..., tuple[int, str]]


@pytest.fixture
def verbose_kvmctl(kvmctl: Run) -> Checked:
    """Run `kvmctl -v ...` in-process; returns (exit code, stdout + stderr), checked for secrets."""

    def run(*argv: str) -> tuple[int, str]:
        code, out, err = kvmctl("-v", *argv)
        assert_no_secret(out + err, f"kvmctl {' '.join(argv)}")
        return code, out + err

    return run


def test_cli_never_prints_secret_values(
    verbose_kvmctl: Checked,
    tmp_path: Path,
    everything_logged: pytest.LogCaptureFixture,
    etcd_endpoints: list[str],
    key_prefix: str,
) -> None:
    manifest = tmp_path / "all.yaml"
    manifest.write_text(manifests())
    assert verbose_kvmctl("apply", "-f", str(manifest))[0] == 0
    for kind in KINDS:
        for output in ("table", "wide", "yaml", "json", "name"):
            assert verbose_kvmctl("get", kind, "-o", output)[0] == 0
    for output in ("yaml", "json"):
        code, text = verbose_kvmctl("get", "secret", "chap", "-o", output)
        assert code == 0 and "chap" in text
    for kind, name in (("secret", "chap"), ("secret", "bmc-host1"), ("clusternode", "host1")):
        assert verbose_kvmctl("describe", kind, name)[0] == 0
    for output in ("table", "json", "yaml"):
        assert verbose_kvmctl("events", "-o", output)[0] == 0

    # A changed value: diff says so without showing either value; apply says "configured".
    manifest.write_text(manifests().replace(CHAP_PASSWORD, ROTATED_CHAP))
    code, text = verbose_kvmctl("diff", "-f", str(manifest))
    assert code == 1 and "secret values differ" in text
    code, text = verbose_kvmctl("apply", "-f", str(manifest), "--dry-run", "server")
    assert code == 0
    assert verbose_kvmctl("apply", "-f", str(manifest))[0] == 0

    # Refused manifests name the field, not the value.
    bad = tmp_path / "bad.yaml"
    for value in (f'"{FENCE_PASSWORD}\\r"', f'"{FENCE_PASSWORD}' + "x" * 4100 + '"'):
        bad.write_text(
            "apiVersion: kvmctl.io/v1alpha1\nkind: Secret\nmetadata: {name: bad}\n"
            f"spec: {{data: {{password: {value}}}}}\n"
        )
        code, text = verbose_kvmctl("apply", "-f", str(bad))
        assert code == 1 and "spec.data.password" in text
    inline = tmp_path / "inline.yaml"
    inline.write_text(
        manifests()
        .split("---")[2]
        .replace(
            "secretParameters: {password: {name: bmc-host1, key: password}}",
            f"password: {FENCE_PASSWORD}",
        )
    )
    code, text = verbose_kvmctl("apply", "-f", str(inline))
    assert code == 1, text

    # A stored Secret that no longer validates: listing skips it with a logged reason.
    async def store_broken_secret() -> None:
        async with Store(etcd_endpoints, prefix=key_prefix) as store:
            document = {
                "apiVersion": "kvmctl.io/v1alpha1",
                "kind": "Secret",
                "metadata": {"name": "broken"},
                "spec": {"data": {"password": f"{FENCE_PASSWORD}\n"}},
            }
            await store.client.put(store.key("Secret", "broken"), json.dumps(document).encode())

    asyncio.run(store_broken_secret())
    assert verbose_kvmctl("get", "secrets", "-o", "yaml")[0] == 0
    code, text = verbose_kvmctl("get", "secret", "broken")
    assert code == 1 and "broken" in text
    assert any("broken" in record.getMessage() for record in everything_logged.records)


async def test_fence_runner_never_logs_the_password(
    everything_logged: pytest.LogCaptureFixture,
) -> None:
    # fence_dummy's traceback for a status file it cannot write quotes the path: here the path
    # is the secret, exactly what an agent with a verbose error would do with a password.
    device = FenceDevice(
        "fence_dummy",
        {"type": "file", "power_timeout": "2"},
        {"status_file": f"/nonexistent/{FENCE_PASSWORD}"},
    )
    runner = FenceRunner(
        policy=FencePolicy(
            agents=frozenset({"fence_dummy"}),
            allowed_parameters=frozenset({("fence_dummy", "status_file")}),
        )
    )
    outcomes = [
        await runner.power_off_and_confirm(device, timeout=60),
        await runner.on(device, timeout=60),
    ]
    assert not outcomes[1].succeeded
    # The agent's traceback did carry the secret; the runner shows it redacted.
    assert any("[redacted]" in outcome.message for outcome in outcomes), outcomes
    for outcome in outcomes:
        assert_no_secret(repr(outcome), "a fence outcome")
    assert_no_secret(repr(device) + str(device), "the fence device's repr")
    with pytest.raises(FenceConfigError) as refused:
        await runner.validate(FenceDevice("fence_dummy", {}, {"password": FENCE_PASSWORD}))
    assert "password" in str(refused.value)
    assert_no_secret(str(refused.value), "a fence validation error")
    with pytest.raises(FenceConfigError) as refused:
        FenceDevice("fence_dummy", {}, {"password": f" {FENCE_PASSWORD}"})
    assert_no_secret(str(refused.value), "a fence parameter error")


async def test_iscsi_reconciler_with_chap_never_shows_the_secret(
    etcd_endpoints: list[str],
    key_prefix: str,
    tmp_path: Path,
    everything_logged: pytest.LogCaptureFixture,
    spans: InMemorySpanExporter,
) -> None:
    disk = tmp_path / "lun1.img"
    with disk.open("wb") as handle:
        handle.truncate(8 << 20)
    with TgtDaemon() as tgtd:
        async with Store(etcd_endpoints, prefix=key_prefix) as store:
            for manifest in load_text(manifests(str(disk)), "all.yaml"):
                await store.create(manifest.object)
            adm = TgtAdm(tgtd.control_port)
            reconciler = telemetry.TracedReconciler(
                IscsiTargetReconciler(store, NODE, EventRecorder(store, "agent", NODE), adm),
                "IscsiTarget",
                "agent",
            )
            await reconciler.reconcile("vg-cluster")
            # Rotate the password, then take the Secret away: both go through the reconciler.
            secret = await store.get("Secret", "chap")
            assert isinstance(secret, Secret)
            secret.spec.data["password"] = ROTATED_CHAP
            await store.update(secret)
            await reconciler.reconcile("vg-cluster")
            await store.delete("Secret", "chap")
            await reconciler.reconcile("vg-cluster")
            # tgtadm refusing a request that carries the password (the account exists).
            with pytest.raises(TgtError) as refused:
                await adm.new_account("host1", CHAP_PASSWORD)
            assert_no_secret(str(refused.value), "a tgtadm error")

            target = await store.get("IscsiTarget", "vg-cluster")
            assert_no_secret(target.model_dump_json(), "the IscsiTarget's status")
            assert target.status.condition("Ready") is not None
            events, _ = await store.list_objects("Event")
            assert events, "the reconciler recorded no events"
            assert_no_secret("\n".join(e.model_dump_json() for e in events), "events")
            await store.delete("IscsiTarget", "vg-cluster")
            await adm.delete_target(1, force=True)
    text = span_text(spans)
    assert "reconcile IscsiTarget" in text
    assert_no_secret(text, "telemetry spans")
