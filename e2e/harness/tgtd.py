"""Start and stop a real tgtd (user-space iSCSI target) for tests and the demo.

Each daemon gets its own control port (`tgtd -C N`, a socket under /run/tgtd) picked at random
in a high range, so colleagues' tgtds running in parallel never collide, and its own iSCSI portal
on loopback (or inside a network namespace). Stopping deletes the targets with `--force`, then
asks tgtd to exit (`--op delete --mode system`; SIGTERM alone may hang); SIGKILL of the PID we
started is the last resort. Nothing is ever stopped by name.

    with TgtDaemon() as tgtd:
        adm = TgtAdm(tgtd.control_port)
        ...  # initiators connect to tgtd.url(iqn, lun)

Tests of the agent's own `TgtdSupervisor` get one from `start_supervised_tgtd()`, which gives
it a free control port and portal the same way.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from crds import ClusterNode, ObjectMeta
from crds.clusternode import ClusterNodeSpec
from e2e.harness.etcd import free_port
from reconcilers.drivers.tgt import TgtAdm, TgtError, parse_targets
from reconcilers.tgtd_supervisor import TgtdStartError as SupervisorStartError
from reconcilers.tgtd_supervisor import TgtdSupervisor, remove_stale_control_socket

CONTROL_PORTS = range(20000, 32768)
"""Where random control ports are drawn from: tgtd takes up to 32767; its default (0) is left
to a system tgtd."""
START_ATTEMPTS = 10
TGTADM_TIMEOUT = 15.0
"""tgtadm can block forever on a tgtd that is shutting down."""


def storage_node(name: str, *export_roots: Path) -> ClusterNode:
    """A storage host's ClusterNode whose IscsiTargets may export files under `export_roots`."""
    spec = {
        "addresses": {"cluster": "127.0.0.1"},
        "cordoned": True,
        "storage": {"exportRoots": [str(root) for root in export_roots]},
    }
    return ClusterNode(metadata=ObjectMeta(name=name), spec=ClusterNodeSpec.model_validate(spec))


class TgtdStartError(RuntimeError):
    """tgtd did not come up; the message carries its last complaints."""


class TgtDaemon:
    """One tgtd process. Leave `control_port` and `portal` out to have free ones picked.

    `netns` runs tgtd inside that network namespace (the portal must be an address there);
    the control socket stays reachable from the root namespace.
    """

    def __init__(
        self,
        control_port: int | None = None,
        portal: str | None = None,
        netns: str | None = None,
    ) -> None:
        self._fixed_control_port = control_port
        self._fixed_portal = portal
        self.netns = netns
        self.control_port = control_port or random.choice(CONTROL_PORTS)
        self.portal = portal or f"127.0.0.1:{free_port()}"
        self.log_dir = Path(tempfile.mkdtemp(prefix="kvmctl-tgtd-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"tgtd-{self.control_port}.log"

    def url(self, iqn: str | None = None, lun: int | None = None) -> str:
        """A libiscsi/QEMU URL: the portal, or a target, or one LUN of it."""
        url = f"iscsi://{self.portal}"
        if iqn is not None:
            url += f"/{iqn}"
            if lun is not None:
                url += f"/{lun}"
        return url

    def start(self, timeout: float = 30.0) -> TgtDaemon:
        for _ in range(START_ATTEMPTS):
            self._spawn()
            problem = self._wait_ready(timeout)
            if problem is None:
                return self
            self.stop()
            retry_control = "another tgtd is using" in problem and not self._fixed_control_port
            retry_portal = "unable to bind" in problem and not self._fixed_portal
            if not (retry_control or retry_portal):
                raise TgtdStartError(f"tgtd did not start: {problem}")
            self.control_port = self._fixed_control_port or random.choice(CONTROL_PORTS)
            self.portal = self._fixed_portal or f"127.0.0.1:{free_port()}"
        raise TgtdStartError(f"tgtd did not start after {START_ATTEMPTS} attempts")

    def _spawn(self) -> None:
        args = ["tgtd", "-f", "-C", str(self.control_port), "--iscsi", f"portal={self.portal}"]
        if self.netns is not None:
            args = ["ip", "netns", "exec", self.netns, *args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, timeout: float) -> str | None:
        """None once tgtd serves our portal, else why it never will."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with status {self.process.returncode}: {self._log_tail()}"
            portals = self._tgtadm("--op", "show", "--mode", "portal")
            if portals is not None and self.process.poll() is None:
                if f"Portal: {self.portal}," in portals:
                    return None
                if "unable to bind" in self._log_text():
                    return f"portal {self.portal} not served: {self._log_tail()}"
            time.sleep(0.05)
        return f"not ready after {timeout} s: {self._log_tail()}"

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self) -> str:
        """tgtd's complaints on one line (its start-up noise about RDMA and limits left out)."""
        noise = ("iser_ib_init", "can't adjust", "work_timer_start", "bs_init")
        lines = [
            line.removeprefix("tgtd: ")
            for line in self._log_text().splitlines()
            if not any(part in line for part in noise)
        ]
        return " | ".join(lines[-5:])

    def _tgtadm(self, *args: str) -> str | None:
        """tgtadm's output, or None if it failed or got no answer (tgtd may be wedged)."""
        try:
            reply = subprocess.run(
                ["tgtadm", "--lld", "iscsi", "--control-port", str(self.control_port), *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=TGTADM_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        return reply.stdout if reply.returncode == 0 else None

    def stop(self, timeout: float = 10.0) -> None:
        """Delete every target (even with initiators connected) and end tgtd."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            shown = self._tgtadm("--op", "show", "--mode", "target")
            if shown is not None:
                for target in parse_targets(shown):
                    self._tgtadm(
                        "--op", "delete", "--mode", "target", "--tid", str(target.tid), "--force"
                    )
            self._tgtadm("--op", "delete", "--mode", "system")
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None
        remove_stale_control_socket(self.control_port)

    def close(self) -> None:
        """Stop tgtd and remove its log directory."""
        self.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> TgtDaemon:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


async def start_supervised_tgtd() -> TgtdSupervisor:
    """A `TgtdSupervisor` that has just started its own tgtd, serving a free loopback portal.

    The control port is drawn at random and the portal picked free, so either can be taken by
    the time tgtd starts: another tgtd may answer on that control port (the supervisor would
    use it instead of starting one), or ours may exit, or serve without our portal. Each such
    attempt is undone and made again on fresh ones, up to `START_ATTEMPTS` times.
    """
    problems: list[str] = []
    for _ in range(START_ATTEMPTS):
        supervisor = TgtdSupervisor(f"127.0.0.1:{free_port()}", random.choice(CONTROL_PORTS))
        try:
            started = await supervisor.ensure_running()
        except SupervisorStartError as error:
            problems.append(str(error))
            await supervisor.stop()
            continue
        if not started:
            problems.append(f"control port {supervisor.control_port} is another tgtd's")
            continue
        if await _serves_portal(supervisor):
            return supervisor
        problems.append(f"portal {supervisor.portal} was taken")
        await supervisor.stop()
    raise TgtdStartError(f"tgtd did not start in {START_ATTEMPTS} attempts: {'; '.join(problems)}")


async def _serves_portal(supervisor: TgtdSupervisor) -> bool:
    """Whether the running tgtd serves the supervisor's portal (and not only another one)."""
    try:
        return supervisor.portal in await TgtAdm(supervisor.control_port, TGTADM_TIMEOUT).portals()
    except TgtError:
        return False
