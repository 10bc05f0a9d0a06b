"""kvmctl against a real etcd: apply/get/describe/delete/diff/events, and bad input."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.cli import build_parser, main
from controller.cli.completion import walk
from controller.runtime.store import Store
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually
from tests.support.cli import Run, write

EXAMPLES = Path(__file__).parent.parent / "deploy" / "examples" / "article"


VM = """
apiVersion: kvmctl.io/v1alpha1
kind: VirtualMachine
metadata: {name: web, labels: {tier: front}}
spec: {memoryMiB: 256, vcpus: 2}
"""


def test_apply_is_idempotent_and_reports_each_object(kvmctl: Run, tmp_path: Path) -> None:
    code, out, _ = kvmctl("apply", "-f", str(EXAMPLES))
    assert code == 0
    assert "virtualmachine/vm1 created" in out and "clusternode/host1 created" in out
    lines = out.splitlines()
    assert lines.index("volumegroup/vg-cluster created") < lines.index("virtualmachine/vm1 created")
    code, out, _ = kvmctl("apply", "-f", str(EXAMPLES))
    assert code == 0 and set(line.split()[-1] for line in out.splitlines()) == {"unchanged"}
    code, out, _ = kvmctl("diff", "-f", str(EXAMPLES))
    assert code == 0 and out == ""


def test_removed_fields_are_removed_and_status_survives(kvmctl: Run, tmp_path: Path) -> None:
    manifest = write(tmp_path, VM)
    assert kvmctl("apply", "-f", manifest)[0] == 0
    changed = write(tmp_path, VM.replace(", vcpus: 2", "").replace("{tier: front}", "{}"))
    code, out, _ = kvmctl("diff", "-f", changed)
    assert code == 1 and "vcpus: 2" in out
    code, out, _ = kvmctl("apply", "-f", changed)
    assert "virtualmachine/web configured" in out
    code, out, _ = kvmctl("get", "vm", "web", "-o", "json")
    document = json.loads(out)
    assert document["spec"]["vcpus"] == 1 and document["metadata"]["labels"] == {}
    assert document["metadata"]["generation"] == 2


def test_get_output_formats_and_selector(kvmctl: Run, tmp_path: Path) -> None:
    kvmctl("apply", "-f", write(tmp_path, VM))
    code, out, _ = kvmctl("get", "vm")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "STATE", "NODE"]
    assert kvmctl("get", "virtualmachines", "-o", "name")[1].strip() == "virtualmachine/web"
    assert "web" in kvmctl("get", "vm", "-l", "tier=front")[1]
    code, out, err = kvmctl("get", "vm", "-l", "tier!=front")
    assert code == 0 and "web" not in out and "No virtualmachines found" in err
    assert "PRIORITY" in kvmctl("get", "vm", "-o", "wide")[1]


def test_yaml_output_reapplies_cleanly(kvmctl: Run, tmp_path: Path) -> None:
    kvmctl("apply", "-f", write(tmp_path, VM))
    _, out, _ = kvmctl("get", "vm", "web", "-o", "yaml")
    code, out, _ = kvmctl("apply", "-f", write(tmp_path, out, "roundtrip.yaml"))
    assert code == 0 and out.strip() == "virtualmachine/web unchanged"


def test_secrets_are_never_printed(kvmctl: Run) -> None:
    kvmctl("apply", "-f", str(EXAMPLES))
    for argv in (
        ("get", "secret", "-o", "yaml"),
        ("get", "secret", "-o", "json"),
        ("describe", "secret", "bladecenter"),
    ):
        code, out, err = kvmctl(*argv)
        assert code == 0
        assert "change-me" not in out + err and "chap-secret-123" not in out + err


def test_describe_shows_conditions_and_events(kvmctl: Run, tmp_path: Path) -> None:
    kvmctl("apply", "-f", write(tmp_path, VM))
    code, out, _ = kvmctl("describe", "vm", "web")
    assert code == 0 and "Name:          web" in out and "Conditions:" in out and "Events:" in out


def test_delete_by_name_and_file(kvmctl: Run, tmp_path: Path) -> None:
    manifest = write(tmp_path, VM)
    kvmctl("apply", "-f", manifest)
    code, out, _ = kvmctl("delete", "-f", manifest, "--wait")
    assert code == 0 and "virtualmachine/web deleted" in out
    code, _, err = kvmctl("delete", "vm", "web")
    assert code == 1 and "not found" in err


BAD_INPUTS = {
    "invalid yaml": ("kind: [unclosed", "invalid YAML"),
    "unknown kind": (
        "apiVersion: kvmctl.io/v1alpha1\nkind: Pod\nmetadata: {name: a}\nspec: {}\n",
        "unknown kind",
    ),
    "unknown field": (VM.replace("vcpus: 2", "vcpus: 2, turbo: true"), "spec.turbo: unknown field"),
    "wrong type": (VM.replace("vcpus: 2", "vcpus: many"), "spec.vcpus"),
    "slash in name": (VM.replace("name: web", "name: a/b"), "metadata.name"),
    "dot dot name": (VM.replace("name: web", "name: '..'"), "metadata.name"),
    "nul in name": (VM.replace("name: web", 'name: "a\\0b"'), "metadata.name"),
    "long name": (VM.replace("name: web", "name: " + "a" * 300), "metadata.name"),
    "alias bomb": ("a: &a [x, x]\nb: [*a, *a]\n", "aliases are not allowed"),
    "newline in name": (VM.replace("name: web", 'name: "web\\n"'), "metadata.name"),
    "string for memory": (VM.replace("memoryMiB: 256", "memoryMiB: '256'"), "spec.memoryMiB"),
    "duplicate key": (
        VM.replace("name: web", "name: web, name: other"),
        "document 1: line 10: duplicate key 'name' (first on line 10)",
    ),
    "window overflow": (
        VM.replace("vcpus: 2", "vcpus: 2, restartPolicy: {windowSeconds: 100000000000000000000}"),
        "spec.restartPolicy.windowSeconds",
    ),
    "secret backing store": (
        "apiVersion: kvmctl.io/v1alpha1\nkind: IscsiTarget\nmetadata: {name: t}\n"
        "spec: {node: s, iqn: 'iqn.2024-01.x:t', luns: [{lun: 1, backingStore: /etc//shadow}]}\n",
        "spec.luns[0].backingStore",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(
    kvmctl: Run, tmp_path: Path, case: str
) -> None:
    text, expected = BAD_INPUTS[case]
    good_first = VM.replace("name: web", "name: good") + "---\n"
    manifest = write(tmp_path, good_first + text)
    code, _out, err = kvmctl("apply", "-f", manifest)
    assert code == 1
    assert expected in err and manifest in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert kvmctl("get", "vm", "good")[0] == 1  # the valid document before it was not written


def test_non_utf8_and_oversized_files_are_refused(kvmctl: Run, tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"kind: \xff\xfe\n")
    code, _, err = kvmctl("apply", "-f", str(binary))
    assert code == 1 and "not UTF-8" in err
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)
    code, _, err = kvmctl("apply", "-f", str(huge))
    assert code == 1 and "larger than" in err


def test_unreachable_etcd_gives_one_line_quickly(tmp_path: Path) -> None:
    manifest = write(tmp_path, VM)
    env = {**os.environ, "KVMCTL_ETCD": "127.0.0.1:9", "KVMCTL_CONFIG": ""}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "apply", "-f", manifest],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 60


PARTIAL = re.compile(
    r"error: applied (\d+) of 4000 objects, then virtualmachine/(vm\d+) failed: etcd at \S+ is "
    r"unreachable: [^;]+; applied: virtualmachine/vm\d+, virtualmachine/vm\d+, virtualmachine/"
    r"vm\d+ and (\d+) more; not applied: virtualmachine/(vm\d+), virtualmachine/vm\d+, "
    r"virtualmachine/vm\d+ and (\d+) more\n"
)


async def test_an_apply_cut_off_by_etcd_lists_what_it_wrote(tmp_path: Path) -> None:
    total = 4000
    manifest = tmp_path / "many.yaml"
    manifest.write_text(
        "".join(f"---\n{VM.replace('name: web', f'name: vm{index:04d}')}" for index in range(total))
    )
    cluster = EtcdCluster().start()
    try:
        env = {**os.environ, "KVMCTL_ETCD": cluster.endpoints[0], "KVMCTL_CONFIG": ""}
        env["KVMCTL_PREFIX"] = "/partial"
        apply = await asyncio.create_subprocess_exec(
            *[
                sys.executable,
                "-m",
                "controller.cli",
                "--timeout",
                "3",
                "apply",
                "-f",
                str(manifest),
            ],
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with Store(cluster.endpoints, prefix="/partial") as store:

                async def some_written() -> bool:
                    return bool((await store.list_objects("VirtualMachine"))[0])

                await eventually(some_written, "the first VMs written", interval=0.01)
            cluster.members[0].kill()  # by the PID of the etcd this test started
            async with asyncio.timeout(120):
                stdout, stderr = await apply.communicate()
        finally:
            if apply.returncode is None:
                apply.kill()
                await apply.wait()
        out, err = stdout.decode(), stderr.decode()
        assert apply.returncode == 1, err
        match = PARTIAL.fullmatch(err)
        assert match is not None, err
        applied, failed, applied_more, first_not_applied, not_applied_more = match.groups()
        assert 0 < int(applied) < total and int(applied_more) == int(applied) - 3
        assert failed == first_not_applied and int(not_applied_more) == total - int(applied) - 3
        lines = out.splitlines()
        created = {line.split()[0] for line in lines if line.endswith(" created")}
        missed = {line.split()[0] for line in lines if line.endswith(" not applied")}
        assert len(lines) == total and len(created) == int(applied)
        assert f"virtualmachine/{failed}" in missed and not created & missed
        cluster.restart()
        async with Store(cluster.endpoints, prefix="/partial") as store:
            stored, _ = await store.list_objects("VirtualMachine")
        assert created <= {f"virtualmachine/{vm.metadata.name}" for vm in stored}
    finally:
        cluster.stop()


def test_usage_errors_exit_2(kvmctl: Run) -> None:
    assert kvmctl("get")[0] == 2
    assert kvmctl("frobnicate")[0] == 2


def test_dry_run_server_writes_nothing(kvmctl: Run, tmp_path: Path) -> None:
    code, out, _ = kvmctl("apply", "-f", write(tmp_path, VM), "--dry-run=server")
    assert code == 0 and "created (server dry run)" in out
    assert kvmctl("get", "vm", "web")[0] == 1


def test_events_listing_filters(kvmctl: Run, tmp_path: Path) -> None:
    event = {
        "apiVersion": "kvmctl.io/v1alpha1",
        "kind": "Event",
        "metadata": {"name": "web-abc"},
        "spec": {
            "involvedObject": {"kind": "VirtualMachine", "name": "web"},
            "reason": "VMRecovered",
            "type": "Warning",
            "message": "started on host2",
            "source": {"component": "test"},
        },
    }
    kvmctl("apply", "-f", write(tmp_path, yaml.safe_dump(event)))
    code, out, _ = kvmctl("events", "--for", "vm/web", "--types", "Warning")
    assert code == 0 and "VMRecovered" in out and "virtualmachine/web" in out
    code, out, _err = kvmctl("events", "--for", "vm/other")
    assert code == 0 and "VMRecovered" not in out
    assert (
        json.loads(kvmctl("events", "-o", "json")[1])["items"][0]["spec"]["reason"] == "VMRecovered"
    )


def test_apply_keeps_a_fence_agents_power_off() -> None:
    from controller.apply import merged
    from crds import parse_object

    manifest = parse_object(yaml.safe_load(VM))
    stored = manifest.model_copy(deep=True)
    stored.spec.run_state = "stopped"
    stored.spec.shutdown_timeout_seconds = 0
    stored.metadata.annotations["fence.kvmctl.io/shutdown-timeout-seconds"] = "60"
    result = merged(stored, manifest)
    assert result.spec.run_state == "stopped" and result.spec.shutdown_timeout_seconds == 0
    assert "fence.kvmctl.io/shutdown-timeout-seconds" in result.metadata.annotations
    stored.metadata.annotations.clear()
    assert merged(stored, manifest).spec.run_state == "started"


def test_events_watch_streams_new_events(
    etcd_endpoints: list[str], key_prefix: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "KVMCTL_ETCD": etcd_endpoints[0],
        "KVMCTL_PREFIX": key_prefix,
        "KVMCTL_CONFIG": "",
    }
    watcher = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "events", "--watch"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        event: dict[str, Any] = {
            "apiVersion": "kvmctl.io/v1alpha1",
            "kind": "Event",
            "metadata": {"name": "web-stream"},
            "spec": {
                "involvedObject": {"kind": "VirtualMachine", "name": "web"},
                "reason": "NodeFenced",
                "message": "host1 powered off",
                "source": {"component": "test"},
            },
        }
        manifest = write(tmp_path, yaml.safe_dump(event))
        deadline = time.monotonic() + 60
        seen = ""
        while "NodeFenced" not in seen:  # the watcher may start after the first apply: re-apply
            assert time.monotonic() < deadline, "no streamed event"
            subprocess.run(
                [sys.executable, "-m", "controller.cli", "apply", "-f", manifest],
                env=env,
                check=True,
                capture_output=True,
            )
            event["spec"]["message"] += "!"
            Path(manifest).write_text(yaml.safe_dump(event))
            assert watcher.stdout is not None
            seen = watcher.stdout.readline()
        assert "host1 powered off" in seen
    finally:
        watcher.kill()
        watcher.wait()


NODE = """
apiVersion: kvmctl.io/v1alpha1
kind: ClusterNode
metadata: {name: host1}
spec: {addresses: {cluster: 10.0.0.1}}
"""


def test_get_kind_slash_name_several_kinds_and_global_flags_after(
    kvmctl: Run, tmp_path: Path, etcd_endpoints: list[str], key_prefix: str
) -> None:
    kvmctl("apply", "-f", write(tmp_path, VM + "---" + NODE))
    code, out, err = kvmctl("get", "vm/web", "--etcd", etcd_endpoints[0], "--prefix", key_prefix)
    assert code == 0, err
    assert out.splitlines()[1].split()[0] == "web"
    code, out, _ = kvmctl("get", "vm/web", "node/host1", "-o", "name")
    assert out.split() == ["virtualmachine/web", "clusternode/host1"]
    code, out, _ = kvmctl("get", "node,vm")
    blocks = out.split("\n\n")
    assert code == 0 and [b.split()[0:1] + b.splitlines()[1].split()[:1] for b in blocks] == [
        ["NAME", "host1"],
        ["NAME", "web"],
    ]
    code, out, err = kvmctl("get", "vm/web", "vm/nope")
    assert code == 1 and "web" in out and err.strip() == "error: VirtualMachine 'nope' not found"
    code, _, err = kvmctl("get", "vm", "--etcd", "127.0.0.1:9", "--etcd-timeout", "1")
    assert code == 1 and "127.0.0.1:9 is unreachable" in err  # the flag after the command won
    for argv in (("get", "vm/web", "web"), ("get", "node,vm", "web"), ("get", "vm/")):
        code, out, err = kvmctl(*argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, argv


def test_get_jsonpath_custom_columns_sort_by_and_labels(kvmctl: Run, tmp_path: Path) -> None:
    small = VM.replace("name: web", "name: small").replace("vcpus: 2", "vcpus: 1")
    kvmctl("apply", "-f", write(tmp_path, VM + "---" + small))
    code, out, _ = kvmctl("get", "vm", "-o", "jsonpath={.items[*].metadata.name}")
    assert (code, out.strip()) == (0, "small web")
    code, out, _ = kvmctl("get", "vm", "web", "-o", "jsonpath={.spec.vcpus}")
    assert (code, out.strip()) == (0, "2")  # one object asked for by name: no List around it
    template = "jsonpath={range .items[*]}{.metadata.name}={.spec.vcpus}{'\\n'}{end}"
    code, out, _ = kvmctl("get", "vm", "--sort-by", ".spec.vcpus", "-o", template)
    assert out.splitlines() == ["small=1", "web=2"]
    code, out, _ = kvmctl(
        "get",
        "vm",
        "-o",
        "custom-columns=VM:.metadata.name,CPUS:.spec.vcpus,TIER:.metadata.labels.tier",
        "--sort-by={.spec.vcpus}",
    )
    assert [line.split() for line in out.splitlines()] == [
        ["VM", "CPUS", "TIER"],
        ["small", "1", "front"],
        ["web", "2", "front"],
    ]
    code, out, _ = kvmctl("get", "vm", "web", "--show-labels")
    assert out.splitlines()[0].split()[-1] == "LABELS" and out.split()[-1] == "tier=front"
    for bad in ("jsonpath={.items[", "custom-columns=NAME", "table2", "jsonpath={.a b}"):
        code, out, err = kvmctl("get", "vm", "-o", bad)
        assert code == 2 and out == "" and "Traceback" not in err, bad
    code, _, err = kvmctl("get", "vm", "--sort-by", ".spec[")
    assert code == 2 and "--sort-by" in err


def test_exit_codes_of_diff_and_delete(kvmctl: Run, tmp_path: Path) -> None:
    manifest = write(tmp_path, VM)
    assert kvmctl("diff", "-f", manifest)[0] == 1  # differences: the VM is not there
    code, _, err = kvmctl("diff", "-f", write(tmp_path, "kind: [unclosed", "bad.yaml"))
    assert code == 2 and "invalid YAML" in err  # an error is not a difference
    code, _, err = kvmctl("diff", "-f", manifest, "--etcd", "127.0.0.1:9", "--etcd-timeout", "1")
    assert code == 2 and "unreachable" in err
    kvmctl("apply", "-f", manifest)
    assert kvmctl("diff", "-f", manifest)[0] == 0
    for argv in (("delete",), ("delete", "vm"), ("delete", "vm", "web", "-f", manifest)):
        code, out, err = kvmctl(*argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, argv
    assert kvmctl("get", "vm", "web")[0] == 0  # nothing was deleted
    code, out, _ = kvmctl("delete", "vm/web", "--wait", "--timeout", "60")
    assert (code, out.strip()) == (0, "virtualmachine/web deleted")


def test_explain_a_kind_and_a_field_path(kvmctl: Run) -> None:
    code, out, _ = kvmctl("explain", "vm")
    assert code == 0 and out.startswith("KIND:     VirtualMachine\n")
    assert "  spec\t<VirtualMachineSpec> -required-" in out
    code, out, _ = kvmctl("explain", "vm.spec.vcpus")
    assert code == 0 and "FIELD:    vcpus <integer>" in out
    assert "Virtual CPUs" in out and "Default: 1." in out and "Constraints: ≥ 1; ≤ 512." in out
    code, out, _ = kvmctl("explain", "virtualmachines.spec.failoverDomain")
    assert code == 0 and "  nodes\t<list of DomainNode>" in out
    for path, message in (
        ("vm.spec.turbo", "VirtualMachineSpec has no field 'turbo'"),
        ("vm.spec.vcpus.x", "vcpus is of type integer: no fields"),
        ("pod", "unknown kind 'pod'"),
    ):
        code, out, err = kvmctl("explain", path)
        assert code == 1 and out == "" and message in err and len(err.splitlines()) == 1


def test_bash_completion_completes_commands_kinds_and_live_names(
    kvmctl: Run, tmp_path: Path, etcd_endpoints: list[str], key_prefix: str
) -> None:
    kvmctl("apply", "-f", write(tmp_path, VM + "---" + NODE))
    code, script, _ = kvmctl("completion", "bash")
    assert code == 0
    (tmp_path / "kvmctl.bash").write_text(script)
    wrapper = tmp_path / "bin" / "kvmctl"  # `kvmctl` on PATH: this worktree's code
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m controller.cli "$@"\n')
    wrapper.chmod(0o755)
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PATH": f"{wrapper.parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(root),
        "KVMCTL_ETCD": etcd_endpoints[0],
        "KVMCTL_PREFIX": key_prefix,
        "KVMCTL_CONFIG": "",
    }

    def complete(*words: str) -> list[str]:
        quoted = " ".join(f"'{word}'" for word in ("kvmctl", *words))
        probe = (
            f"source {tmp_path / 'kvmctl.bash'}; COMP_WORDS=({quoted}); "
            f'COMP_CWORD={len(words)}; _kvmctl; echo "${{COMPREPLY[*]}}"'
        )
        result = subprocess.run(
            ["bash", "-c", probe], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return result.stdout.split()

    assert complete("dr") == ["drain"]
    assert complete("node", "") == ["drain", "cordon", "uncordon"]
    assert "virtualmachines" in complete("get", "")
    assert complete("--prefix", key_prefix, "get", "vm", "") == ["web"]
    assert complete("cordon", "") == ["host1"]
    assert complete("get", "vm", "-o", "") == ["table", "wide", "yaml", "json", "name"]
    assert complete("get", "vm", "--sort") == ["--sort-by"]
    assert "--etcd" in complete("status", "--et")


def _shell(argv: list[str]) -> str:
    assert shutil.which(argv[0]), f"{argv[0]} missing: make install"
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result.stdout


def test_zsh_and_fish_completion_complete_commands_and_flags(kvmctl: Run, tmp_path: Path) -> None:
    for shell in ("zsh", "fish"):
        code, script, _ = kvmctl("completion", shell)
        assert code == 0
        (tmp_path / f"kvmctl.{shell}").write_text(script)
    # fish: its own completion engine, as at a prompt.
    fish = f"source {tmp_path / 'kvmctl.fish'}; complete -C $argv[1]"

    def complete_fish(line: str) -> list[str]:
        return _shell(["fish", "-c", fish, line]).split()

    assert complete_fish("kvmctl dr") == ["drain"]
    assert complete_fish("kvmctl node ") == ["cordon", "drain", "uncordon"]
    assert "virtualmachines" in complete_fish("kvmctl get ")
    assert complete_fish("kvmctl get vm --sort") == ["--sort-by"]
    # zsh: the script loads under compinit and registers for kvmctl; bashcompinit's emulation
    # (ksharrays, as its _bash_complete sets) gives the candidates zsh then matches.
    zsh = (
        "autoload -U +X compinit && compinit -u -D; "
        f"source {tmp_path / 'kvmctl.zsh'}; print -r -- $_comps[kvmctl]; setopt ksharrays; "
        'COMP_WORDS=(kvmctl node ""); COMP_CWORD=2; _kvmctl; print -r -- "${COMPREPLY[*]}"'
    )
    registered, candidates = _shell(["zsh", "-f", "-c", zsh]).splitlines()
    assert registered == "_bash_complete -F _kvmctl"
    assert candidates.split() == ["drain", "cordon", "uncordon"]


def editor(tmp_path: Path, name: str, body: str) -> str:
    """An $EDITOR: a shell script run with the file to edit as $1."""
    script = tmp_path / name
    script.write_text(f"#!/bin/sh\nset -e\n{body}\n")
    script.chmod(0o755)
    return str(script)


PATCH_STATUS = """
import asyncio, os
from controller.cli import build_parser, main
from controller.cli.completion import walk
from controller.runtime.store import Store
async def main():
    async with Store([os.environ["KVMCTL_ETCD"]], os.environ["KVMCTL_PREFIX"]) as store:
        def note(vm):
            vm.status.set_condition("Ready", "False", "Starting", "meanwhile")
            return True
        await store.patch_status("VirtualMachine", "web", note)
asyncio.run(main())
"""


def test_edit_validates_merges_status_and_refuses_conflicts(
    kvmctl: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kvmctl("apply", "-f", write(tmp_path, VM))

    def edit_with(body: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setenv("EDITOR", editor(tmp_path, f"editor-{len(body)}", body))
        return kvmctl("edit", *(argv or ("vm", "web")))

    def vcpus() -> int:
        return int(json.loads(kvmctl("get", "vm", "web", "-o", "json")[1])["spec"]["vcpus"])

    code, out, err = edit_with("true")
    assert (code, out.strip()) == (0, "virtualmachine/web unchanged: nothing written"), err
    code, out, err = edit_with("""sed -i 's/vcpus: 2/vcpus: 3/' "$1" """)
    assert (code, out.strip(), vcpus()) == (0, "virtualmachine/web edited", 3), err

    for body, message in (
        ("""sed -i 's/vcpus: 3/vcpus: many/' "$1" """, "spec.vcpus"),
        ("""sed -i 's/name: web/name: other/' "$1" """, "kind and name must stay"),
        ("exit 3", "exited with 3; nothing written"),
    ):
        code, out, err = edit_with(body)
        assert code == 1 and out == "" and message in err and len(err.splitlines()) == 1, err
        kept = err.strip().rsplit(" ", 1)[-1]
        assert kept.endswith(".yaml") and Path(kept).exists()
        Path(kept).unlink()
        assert vcpus() == 3

    # The agents write status all the time: an edit merges it.
    patch = f"{sys.executable} -c '{PATCH_STATUS}'"
    code, out, err = edit_with(f"""{patch}\nsed -i 's/vcpus: 3/vcpus: 4/' "$1" """, "vm/web")
    assert (code, vcpus()) == (0, 4), err
    document = json.loads(kvmctl("get", "vm", "web", "-o", "json")[1])
    assert document["status"]["conditions"][0]["message"] == "meanwhile"

    # Someone else changed the spec meanwhile: refused, theirs stays.
    theirs = write(tmp_path, VM.replace("vcpus: 2", "vcpus: 6"), "theirs.yaml")
    apply = f"{sys.executable} -m controller.cli apply -f {theirs} >/dev/null"
    code, out, err = edit_with(f"""{apply}\nsed -i 's/vcpus: 4/vcpus: 5/' "$1" """)
    assert code == 1 and "was changed by someone else while you edited it" in err
    assert vcpus() == 6

    code, _, err = kvmctl("edit", "secret", "x")
    assert code == 2 and "Secrets are not edited" in err
    code, _, err = kvmctl("edit", "vm")
    assert code == 2


BAD_COMMAND_LINES = {
    "jsonpath": (["get", "vm", "-o", "jsonpath={.a["], 2),
    "custom columns": (["get", "vm", "-o", "custom-columns=A:.a[", ""], 2),
    "sort by": (["get", "vm", "--sort-by", ".spec["], 2),
    "status interval": (["status", "--interval", "0"], 2),
    "wait for": (["wait", "--for=ready", "vm/web"], 2),
    "wait jsonpath": (["wait", "--for=jsonpath={.a[=1", "vm/web"], 2),
    "wait no names": (["wait", "--for=delete", "vm"], 2),
    "drain name": (["drain", "Bad_Name"], 2),
    "cordon no name": (["cordon"], 2),
    "completion shell": (["completion", "tcsh"], 2),
    "migrate timeout": (["migrate", "web", "--to", "b", "--timeout", "soon"], 2),
    "describe two": (["describe", "vm/web", "x"], 2),
    "describe none": (["describe", "vm"], 2),
    "explain field": (["explain", "vm.spec.nope"], 1),
    "get missing": (["get", "vm", "nope"], 1),
    "edit missing": (["edit", "vm", "nope"], 1),
    "cordon missing": (["cordon", "nope"], 1),
    "unknown kind": (["get", "pods"], 1),
    "etcd timeout": (["get", "vm", "--etcd-timeout", "x"], 2),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMAND_LINES))
def test_bad_command_lines_give_one_line_and_write_nothing(
    kvmctl: Run, tmp_path: Path, case: str
) -> None:
    kvmctl("apply", "-f", write(tmp_path, VM))
    _, before, _ = kvmctl("get", "vm", "web", "-o", "json")
    argv, expected = BAD_COMMAND_LINES[case]
    code, out, err = kvmctl(*argv)
    assert code == expected, err
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert kvmctl("get", "vm", "web", "-o", "json")[1] == before


def test_status_watch_streams_one_json_report_per_refresh(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    env = {
        **os.environ,
        "KVMCTL_ETCD": etcd_endpoints[0],
        "KVMCTL_PREFIX": key_prefix,
        "KVMCTL_CONFIG": "",
    }
    command = [sys.executable, "-m", "controller.cli", "status", "-w", "-o", "json"]
    watcher = subprocess.Popen(
        [*command, "--interval", "0.2"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert watcher.stdout is not None
        reports = [json.loads(watcher.stdout.readline()) for _ in range(2)]
        assert all(r["etcd"]["quorum"] and r["leader"] is None for r in reports)
        assert reports[0]["problems"] == ["no controller leads"]
    finally:
        watcher.kill()
        watcher.wait()


def test_every_command_refuses_a_bad_command_line_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Usage errors exit 2 everywhere, with one line: an unknown flag after each command."""
    paths = [path for path in walk(build_parser()) if path]
    assert len(paths) > 20 and "node drain" in paths and "dashboard" in paths
    for path in paths:
        with pytest.raises(SystemExit) as stopped:
            main([*path.split(), "--no-such-flag"])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1, (path, err)
        assert err.startswith("kvmctl") and "error: " in err, (path, err)
