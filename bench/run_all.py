"""Run every benchmark in turn (`make bench`); each prints its method and figures.

The failover benchmark and the chaos soak are run on their own (`python -m bench.failover_bench`,
`make soak`): they take minutes and boot guests; so does the rack at scale
(`python -m bench.rack_bench`: 50 hosts, 2,000 VMs, a 3-member etcd).
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    "bench.store_bench",
    "bench.runtime_bench",
    "bench.agent_bench",
    "bench.sim_bench",
]


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"== {module}", flush=True)
        if subprocess.run([sys.executable, "-m", module], check=False).returncode != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
