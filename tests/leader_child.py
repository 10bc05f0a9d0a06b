"""A leader election candidate in a process of its own, for tests that SIGKILL or SIGSTOP it.

Usage: leader_child.py ENDPOINT PREFIX NAME IDENTITY fast|default

`fast` is the tests' 2 s TTL; `default` is `ElectionTiming()`, the production defaults.

While leading it writes `<prefix>/fenced-writes` again and again, each write guarded by its
fencing token, as a controller's safety-critical writes are. It prints one line per fact:
`leading TOKEN`, `write ok TOKEN`, `write rejected TOKEN`, `stopped TOKEN`.
"""

from __future__ import annotations

import asyncio
import sys

import aetcd

from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import ElectionTiming, guard_compare

TIMINGS = {
    "fast": ElectionTiming(ttl=2, renew_period=0.5, renew_deadline=1.5, retry_period=0.5),
    "default": ElectionTiming(),
}
WRITE_PERIOD = 0.05


def say(line: str) -> None:
    print(line, flush=True)


async def main(endpoint: str, prefix: str, name: str, identity: str, timing: str) -> None:
    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as client:
        elector = LeaderElector(client, prefix, name, identity, TIMINGS[timing])
        marker = f"{prefix}/fenced-writes".encode()

        async def leading(token: int) -> None:
            say(f"leading {token}")
            try:
                while True:
                    written, _ = await client.transaction(
                        compare=[guard_compare(client, elector.key, token)],
                        success=[client.transactions.put(marker, identity.encode())],
                        failure=[],
                    )
                    say(f"write {'ok' if written else 'rejected'} {token}")
                    await asyncio.sleep(WRITE_PERIOD)
            finally:
                say(f"stopped {token}")

        await elector.run(leading)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
