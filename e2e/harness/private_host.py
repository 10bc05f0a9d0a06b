"""Private in-process hosts on libvirt's test driver: `test:///PATH/host.xml` gives each
connection its own copy of the host (4 CPUs, 8 GiB unless asked otherwise), living as long as
the connection."""

from __future__ import annotations

from pathlib import Path


def host_xml(cpus: int = 4, memory_mib: int = 8192) -> str:
    """A test-driver host description with `cpus` cores and `memory_mib` of memory."""
    return f"""<node>
  <cpu>
    <mhz>2000</mhz>
    <model>x86_64</model>
    <active>{cpus}</active>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>{cpus}</cores>
    <threads>1</threads>
  </cpu>
  <memory>{memory_mib * 1024}</memory>
</node>
"""


HOST_XML = host_xml()


def host_uri(directory: Path, name: str, cpus: int = 4, memory_mib: int = 8192) -> str:
    """The URI of a private host `name`, its description written under `directory`."""
    path = directory / f"{name}.xml"
    path.write_text(host_xml(cpus, memory_mib))
    return f"test://{path}"
