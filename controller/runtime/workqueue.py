"""An asyncio work queue of string keys, after client-go's `util/workqueue`.

Guarantees, for every key:
- it is never handed to two workers at once: `get()` marks it processing until `done(key)`;
- adds while it waits in the queue coalesce into one entry;
- adds while it is processing coalesce into exactly one more pass, queued at `done(key)`;
- `add_rate_limited` delays it by per-key exponential backoff (reset by `forget`), and by a
  token bucket shared by all keys so a storm of failures cannot hammer etcd or the host.

All methods except `get()` are synchronous and must be called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
from collections import deque

DEFAULT_BASE_DELAY = 0.005
DEFAULT_MAX_DELAY = 60.0
DEFAULT_RATE = 10.0
DEFAULT_BURST = 100

# 2**64 times any sane base delay is far beyond any cap; bounding the exponent keeps floats finite.
_MAX_BACKOFF_EXPONENT = 64


class QueueShutDown(Exception):
    """Raised by `WorkQueue.get()` once the queue is shut down."""


class TokenBucket:
    """Overall rate limit: `rate` tokens per second, at most `burst` saved up.

    `reserve()` takes a token now and returns how long the caller must wait for it; the bucket
    goes into debt, so concurrent callers are spaced `1 / rate` apart.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = asyncio.get_running_loop().time()

    def reserve(self) -> float:
        now = asyncio.get_running_loop().time()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


class WorkQueue:
    """Keys to reconcile; see the module docstring for the guarantees.

    Create it inside a running event loop.
    """

    def __init__(
        self,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
    ) -> None:
        if not 0 < base_delay <= max_delay:
            raise ValueError(
                f"backoff needs 0 < base_delay <= max_delay, got {base_delay}, {max_delay}"
            )
        self._loop = asyncio.get_running_loop()
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._bucket = TokenBucket(rate, burst)
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._failures: dict[str, int] = {}
        # One pending timer per key, the earliest one: a later add_after never delays a key.
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._not_empty = asyncio.Event()
        self._shutting_down = False

    def __len__(self) -> int:
        """Keys ready to be handed out (not counting keys processing or waiting on a delay)."""
        return len(self._queue)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def add(self, key: str) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by done(key)
        self._queue.append(key)
        self._not_empty.set()

    def add_after(self, key: str, delay: float) -> None:
        """Add `key` once `delay` seconds have passed (now if `delay <= 0`)."""
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        ready_at = self._loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= ready_at:
                return
            pending[1].cancel()
        handle = self._loop.call_at(ready_at, self._add_delayed, key)
        self._timers[key] = (ready_at, handle)

    def add_rate_limited(self, key: str) -> None:
        """Add `key` after its backoff (base * 2**failures, capped) and the overall rate limit."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        backoff = self._base_delay * 2.0 ** min(failures, _MAX_BACKOFF_EXPONENT)
        self.add_after(key, max(min(backoff, self._max_delay), self._bucket.reserve()))

    def forget(self, key: str) -> None:
        """Reset the backoff of `key` (after a success or a terminal error)."""
        self._failures.pop(key, None)

    def num_requeues(self, key: str) -> int:
        """How many times `key` was rate-limited since it was last forgotten."""
        return self._failures.get(key, 0)

    async def get(self) -> str:
        """Wait for a key and mark it processing; the caller must call `done(key)` after."""
        while not self._queue:
            if self._shutting_down:
                raise QueueShutDown
            self._not_empty.clear()
            await self._not_empty.wait()
        if self._shutting_down:
            raise QueueShutDown
        key = self._queue.popleft()
        self._processing.add(key)
        self._dirty.discard(key)
        return key

    def done(self, key: str) -> None:
        """End processing of `key`; queue it once more if it was added meanwhile."""
        self._processing.discard(key)
        if key in self._dirty and not self._shutting_down:
            self._queue.append(key)
            self._not_empty.set()

    def shutdown(self) -> None:
        """Stop handing out keys: waiting and later `get()` calls raise QueueShutDown.

        Keys still queued or delayed are dropped; reconciles are level-based, so the next start
        lists everything again.
        """
        self._shutting_down = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._not_empty.set()

    def _add_delayed(self, key: str) -> None:
        del self._timers[key]
        self.add(key)
