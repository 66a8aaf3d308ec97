"""Bounded work in flight for the server: at most `limit` requests decode and score at once, up to `queue`
more wait their turn, and any beyond that are told to come back (503 with Retry-After).

Without it, twenty concurrent 62-megapixel PNGs (which cannot be decoded at reduced scale, unlike JPEG)
were decoded side by side, 186 MB each, and the process grew by gigabytes.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable, Optional


class Busy(Exception):
    """More requests than the server works on and queues; `retry_after` is in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Admission:
    def __init__(self, limit: int, queue: int, retry_after: int = 2):
        if limit < 1 or queue < 0:
            raise ValueError("limit must be at least 1 and queue at least 0")
        self.limit, self.queue, self.retry_after = limit, queue, retry_after
        self.waiting = 0
        self.working = 0
        self._semaphore: asyncio.Semaphore | None = None

    @property
    def semaphore(self) -> asyncio.Semaphore:
        # Made on first use, inside the server's event loop.
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit)
        return self._semaphore

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.working >= self.limit and self.waiting >= self.queue:
            raise Busy(self.retry_after)
        self.waiting += 1
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
        self.working += 1
        try:
            yield
        finally:
            self.working -= 1
            self.semaphore.release()

    def state(self) -> dict:
        return {"working": self.working, "waiting": self.waiting, "limit": self.limit, "queue": self.queue}


class Quiet:
    """Calls `action` (in a worker thread) once no request has been in the server (from its upload read to its
    answer) for `after_s` seconds; a request that arrives in the meantime calls it off. Once per quiet spell."""

    def __init__(self, action: Callable[[], None], after_s: float):
        if after_s < 0:
            raise ValueError("after_s must be at least 0")
        self.action, self.after_s = action, after_s
        self.active = 0
        self._timer: Optional[asyncio.TimerHandle] = None

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._timer = asyncio.get_running_loop().call_later(self.after_s, self._quiet)

    def _quiet(self) -> None:
        self._timer = None
        if self.active == 0:
            # In a worker thread: handing a heap of freed memory back takes a while, and the event loop (the
            # health check) must not wait for it.
            asyncio.get_running_loop().run_in_executor(None, self.action)
