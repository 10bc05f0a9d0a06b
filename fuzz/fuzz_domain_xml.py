"""Fuzz the domain XML builder: any values give a document of fixed structure, or DomainSpecError.

.venv/bin/python -m fuzz.fuzz_domain_xml -max_total_time=60 -artifact_prefix=/tmp/
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from typing import Any

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from reconcilers.drivers.domain_xml import (
        BlockSource,
        DiskSpec,
        DomainSpec,
        DomainSpecError,
        IscsiSource,
        NicSpec,
        build_domain_xml,
    )


def spec(text: list[str]) -> DomainSpec:
    name, kernel, cmdline, serial, block, host, bridge, key, value = text
    return DomainSpec(
        name=name,
        uuid="6f1c2f1e-3b7a-4c1e-9d55-0c9f0b3e8a11",
        domain_type="qemu",
        vcpus=1,
        memory_mib=64,
        disks=(
            DiskSpec(BlockSource(block), "vda"),
            DiskSpec(IscsiSource(host, 3260, "iqn.2024-01.org.example:t", 1), "vdb"),
        ),
        nics=(NicSpec(bridge),),
        serial_log=serial,
        kernel=kernel,
        cmdline=cmdline,
        metadata={key: value},
    )


def shape(element: ET.Element) -> tuple[Any, ...]:
    return (element.tag, sorted(element.attrib), [shape(child) for child in element])


REFERENCE = shape(ET.fromstring(build_domain_xml(spec(["plain"] * 9))))


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    values = [provider.ConsumeUnicodeNoSurrogates(40) or "x" for _ in range(9)]
    try:
        xml = build_domain_xml(spec(values))
    except DomainSpecError:
        return
    domain = ET.fromstring(xml)
    if shape(domain) != REFERENCE:
        raise AssertionError(f"values {values!r} changed the document's structure")
    if domain.findtext("name") != values[0] or domain.findtext("os/cmdline") != values[2]:
        raise AssertionError(f"values {values!r} did not round-trip")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
