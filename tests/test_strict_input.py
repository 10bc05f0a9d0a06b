"""Input that cannot lie: whole-string patterns, strict types, bounds and unique YAML keys.

Each refusal is one readable line naming the field (or file, document and line).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, StringConstraints, TypeAdapter, ValidationError

from controller.manifests import ManifestError, load_text
from crds import KINDS, parse_object

API = "kvmctl.io/v1alpha1"


def document(kind: str, spec: dict[str, Any], name: str = "x") -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}


def vm(**spec: Any) -> dict[str, Any]:
    return document("VirtualMachine", {"memoryMiB": 128, **spec})


def target(**spec: Any) -> dict[str, Any]:
    return document("IscsiTarget", {"node": "storage", "iqn": "iqn.2024-01.x:t", **spec})


def volume_group(size: str, vg_name: str = "vg") -> dict[str, Any]:
    spec = {
        "vgName": vg_name,
        "physicalVolumes": [{"device": "/dev/loop0"}],
        "logicalVolumes": [{"name": "lv", "size": size}],
    }
    return document("VolumeGroup", spec)


def node(**spec: Any) -> dict[str, Any]:
    return document("ClusterNode", {"addresses": {"cluster": "10.0.0.1"}, **spec})


def refused(bad: dict[str, Any], field: str) -> str:
    """The error for `bad`: one line that names `field`."""
    with pytest.raises(ValueError) as caught:
        parse_object(bad)
    message = str(caught.value)
    assert field in message and "\n" not in message, message
    return message


def with_metadata(**metadata: Any) -> dict[str, Any]:
    document = vm()
    document["metadata"].update(metadata)
    return document


# -- whole strings -----------------------------------------------------------------------------

TRAILING_NEWLINE = {
    "name": (with_metadata(name="vm1\n"), "metadata.name"),
    "label key": (with_metadata(labels={"tier\n": "a"}), "metadata.labels"),
    "label value": (with_metadata(labels={"tier": "front\n"}), "metadata.labels.tier"),
    "finalizer": (with_metadata(finalizers=["kvmctl.io/x\n"]), "metadata.finalizers[0]"),
    "uid": (with_metadata(uid="6f1c\n"), "metadata.uid"),
    "LVM name": (vm(disks=[{"volume": "vg/lv\n"}]), "spec.disks[0]"),
    "disk target": (vm(disks=[{"file": "/a", "target": "vda\n"}]), "spec.disks[0].target"),
    "MAC": (vm(nics=[{"bridge": "br0", "mac": "52:54:00:12:34:56\n"}]), "spec.nics[0].mac"),
    "interface": (vm(nics=[{"bridge": "br0\n"}]), "spec.nics[0].bridge"),
    "kernel args": (vm(boot={"kernel": "/k", "cmdline": "quiet\n"}), "spec.boot.cmdline"),
    "path": (vm(disks=[{"file": "/img\n"}]), "spec.disks[0].file"),
    "IQN": (target(iqn="iqn.2024-01.x:t\n"), "spec.iqn"),
    "initiator": (target(acl={"initiatorNames": ["iqn.2024-01.x:h\n"]}), "initiatorNames[0]"),
    "portal": (target(portal="10.0.0.1:3260\n"), "spec.portal"),
    "CHAP user": (
        target(chap={"username": "u\n", "secretRef": {"name": "s", "key": "k"}}),
        "spec.chap.username",
    ),
    "size": (volume_group("50G\n"), "spec.logicalVolumes[0].size"),
    "vg name": (volume_group("1G", vg_name="vg\n"), "spec.vgName"),
    "secret key": (document("Secret", {"data": {"k\n": "v"}}), "spec.data"),
    "fence agent": (
        node(fencing={"methods": [{"name": "m", "devices": [{"agent": "fence_x\n"}]}]}),
        "spec.fencing.methods[0].devices[0].agent",
    ),
    "event reason": (
        document(
            "Event",
            {
                "involvedObject": {"kind": "VirtualMachine", "name": "vm1"},
                "reason": "Started\n",
                "source": {"component": "t"},
            },
        ),
        "spec.reason",
    ),
}


@pytest.mark.parametrize("case", sorted(TRAILING_NEWLINE))
def test_a_trailing_newline_is_refused(case: str) -> None:
    bad, field = TRAILING_NEWLINE[case]
    refused(bad, field)
    parse_object(_without_newlines(bad))  # the same document without it is valid


def _without_newlines(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\n", "")
    if isinstance(value, dict):
        return {_without_newlines(k): _without_newlines(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_newlines(item) for item in value]
    return value


def _patterns(model: type[BaseModel], seen: set[type[BaseModel]]) -> Iterator[str]:
    """Every `pattern=` of the string constraints reachable from `model`."""
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        yield from _patterns_in(field.annotation, seen)
        for item in field.metadata:
            if isinstance(item, StringConstraints) and item.pattern:
                yield str(item.pattern)


def _patterns_in(annotation: Any, seen: set[type[BaseModel]]) -> Iterator[str]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from _patterns(annotation, seen)
        return
    if get_origin(annotation) is Annotated:
        for item in annotation.__metadata__:
            if isinstance(item, StringConstraints) and item.pattern:
                yield str(item.pattern)
    for arg in get_args(annotation):
        yield from _patterns_in(arg, seen)


PATTERNS = sorted({p for info in KINDS.values() for p in _patterns(info.model, set())})


def test_the_pattern_walk_finds_the_patterns() -> None:
    assert len(PATTERNS) >= 10 and r"^(vd|sd|hd)[a-z]{1,2}$" in PATTERNS


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_is_anchored_and_ascii(pattern: str) -> None:
    assert pattern.startswith("^") and pattern.endswith("$"), pattern
    assert r"\d" not in pattern, f"{pattern}: \\d matches Unicode digits, write [0-9]"


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_pattern_accepts_a_trailing_newline(pattern: str, data: st.DataObject) -> None:
    """pydantic runs patterns on its Rust engine, where `$` is the end of the text (Python's
    `re` lets "abc\\n" through `^[a-z]+$`): a value a pattern takes, plus a newline, is refused."""
    adapter = TypeAdapter(Annotated[str, StringConstraints(pattern=pattern)])
    body = pattern.removeprefix("^").removesuffix("$")
    printable_ascii = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    value = data.draw(st.from_regex(re.compile(body), fullmatch=True, alphabet=printable_ascii))
    assert adapter.validate_python(value) == value
    with pytest.raises(ValidationError):
        adapter.validate_python(value + "\n")


# -- strict types ------------------------------------------------------------------------------

LAX = {
    "string for an integer": (vm(memoryMiB="1024"), "spec.memoryMiB"),
    "float for an integer": (vm(memoryMiB=1024.0), "spec.memoryMiB"),
    "boolean for an integer": (vm(vcpus=True), "spec.vcpus"),
    "Unicode digits for an integer": (vm(vcpus="\u0661\u0662"), "spec.vcpus"),
    "string for a boolean": (vm(disks=[{"file": "/a", "readonly": "yes"}]), "readonly"),
    "integer for a boolean": (node(cordoned=1), "spec.cordoned"),
    "string LUN number": (target(luns=[{"lun": "1", "backingStore": "/a"}]), "luns[0].lun"),
    "integer for a string": (with_metadata(name=7), "metadata.name"),
    "Unicode digits in a size": (volume_group("\u0665\u0660G"), "spec.logicalVolumes[0].size"),
    "Unicode digits in an IQN": (target(iqn="iqn.\u0662\u0660\u0662\u0664-01.x:t"), "spec.iqn"),
    "Unicode digits in a portal": (
        target(portal="10.0.0.1:\u0663\u0662\u0666\u0660"),
        "spec.portal",
    ),
    "non-ASCII interface name": (vm(nics=[{"bridge": "brü"}]), "spec.nics[0].bridge"),
    "escape in an event source": (
        document(
            "Event",
            {
                "involvedObject": {"kind": "VirtualMachine", "name": "vm1"},
                "reason": "Started",
                "source": {"component": "t\x1b[2J"},
            },
        ),
        "spec.source.component",
    ),
}


@pytest.mark.parametrize("case", sorted(LAX))
def test_lax_input_is_refused(case: str) -> None:
    bad, field = LAX[case]
    refused(bad, field)


def test_times_and_addresses_still_come_as_strings() -> None:
    """JSON (the store) carries times and addresses as strings: those stay accepted."""
    stored = node(cordoned=True)
    stored["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    stored["status"] = {"lastHeartbeatTime": "2026-01-01T00:00:01Z"}
    parsed = parse_object(stored)
    assert str(parsed.spec.addresses.cluster) == "10.0.0.1"
    assert parsed.metadata.creation_timestamp is not None


# -- bounds ------------------------------------------------------------------------------------

OUT_OF_BOUNDS = {
    "restart window": (vm(restartPolicy={"windowSeconds": 10**29}), "windowSeconds"),
    "memory": (vm(memoryMiB=16 * 1024 * 1024 + 1), "spec.memoryMiB"),
    "vcpus": (vm(vcpus=513), "spec.vcpus"),
    "size above 1P": (volume_group("1025T"), "spec.logicalVolumes[0].size"),
    "absurd size": (volume_group("9" * 30 + "P"), "spec.logicalVolumes[0].size"),
    "portal port": (target(portal="10.0.0.1:99999"), "spec.portal"),
    "port zero": (target(portal="[::1]:0"), "spec.portal"),
    "node memory": (node(capacity={"cpus": 1, "memoryMiB": 2**40}), "capacity.memoryMiB"),
    "sync interval": (
        document("GitSync", {"repo": "https://x/r.git", "intervalSeconds": 10**12}),
        "spec.intervalSeconds",
    ),
    "event count": (
        document(
            "Event",
            {
                "involvedObject": {"kind": "VirtualMachine", "name": "vm1"},
                "reason": "Started",
                "source": {"component": "t"},
                "count": 2**63,
            },
        ),
        "spec.count",
    ),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_BOUNDS))
def test_values_beyond_their_bounds_are_refused(case: str) -> None:
    bad, field = OUT_OF_BOUNDS[case]
    refused(bad, field)


def test_the_largest_values_are_accepted() -> None:
    parse_object(vm(vcpus=512, memoryMiB=16 * 1024 * 1024, restartPolicy={"windowSeconds": 604800}))
    parse_object(volume_group("1P"))
    parse_object(target(portal="[fe80::1]:65535"))


# -- paths and backing stores ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/a//b", "/a/./b", "/a/", "//a", "/a/../b", "a/b", "/a\x1b"])
def test_paths_must_be_absolute_and_normalised(path: str) -> None:
    refused(target(luns=[{"lun": 1, "backingStore": path}]), "spec.luns[0].backingStore")


@pytest.mark.parametrize("root", ["/", "/etc", "/etc/kvmctl", "/proc/1", "/dev", "/root"])
def test_system_folders_cannot_be_export_roots(root: str) -> None:
    message = refused(node(storage={"exportRoots": [root]}), "spec.storage.exportRoots[0]")
    assert "export root" in message
    parse_object(node(storage={"exportRoots": ["/srv/luns"], "allowedDevices": ["/dev/sdb"]}))


# -- YAML --------------------------------------------------------------------------------------

FIRST = f"apiVersion: {API}\nkind: VirtualMachine\nmetadata: {{name: a}}\nspec: {{memoryMiB: 64}}\n"


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            "metadata:\n  name: vm1\n  name: vm2\n",
            r"^m\.yaml, document 1: line 9: duplicate key 'name' \(first on line 8\)$",
        ),
        (
            "spec: {memoryMiB: 64, memoryMiB: 65}\n",
            r"document 1: line 7: duplicate key 'memoryMiB'",
        ),
        ("spec: {a: 1}\nspec: {a: 2}\n", r"document 1: line 8: duplicate key 'spec'"),
        ("spec: {<<: {memoryMiB: 64}}\n", r"document 1: line 7: YAML merge keys \('<<'\)"),
        ("? [a]\n: 1\n", r"document 1: line 7: a mapping key must be a scalar"),
    ],
)
def test_a_key_given_twice_is_refused_with_file_document_and_line(
    second: str, message: str
) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        load_text(FIRST + "---\n---\n" + second, "m.yaml")
    assert "\n" not in str(caught.value)


def test_distinct_keys_in_sibling_mappings_are_fine() -> None:
    text = FIRST.replace("{name: a}", "{name: a, labels: {name: x}}")
    [manifest] = load_text(text, "m.yaml")
    assert manifest.object.metadata.labels == {"name": "x"}
