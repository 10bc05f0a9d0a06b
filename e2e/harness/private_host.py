"""Private in-process hosts on libvirt's test driver: `test:///PATH/host.xml` gives each
connection its own copy of the host (4 CPUs, 8 GiB), living as long as the connection."""

from __future__ import annotations

from pathlib import Path

HOST_XML = """<node>
  <cpu>
    <mhz>2000</mhz>
    <model>x86_64</model>
    <active>4</active>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>4</cores>
    <threads>1</threads>
  </cpu>
  <memory>8388608</memory>
</node>
"""


def host_uri(directory: Path, name: str) -> str:
    """The URI of a private host `name`, its description written under `directory`."""
    path = directory / f"{name}.xml"
    path.write_text(HOST_XML)
    return f"test://{path}"
