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
    def __init__(self, limit: int, queue: int, retry_after: int = 2, on_idle: Optional[Callable[[], None]] = None,
                 idle_after_s: float = 0.0, idle_also: Callable[[], bool] = lambda: True):
        """`on_idle`: called once no request has been in work or waiting for `idle_after_s` seconds and
        `idle_also()` holds (asked again every `idle_after_s` while it does not); at once when `idle_after_s`
        is 0. A request that arrives in the meantime calls it off."""
        if limit < 1 or queue < 0 or idle_after_s < 0:
            raise ValueError("limit must be at least 1, queue and idle_after_s at least 0")
        self.limit, self.queue, self.retry_after, self.on_idle = limit, queue, retry_after, on_idle
        self.idle_after_s, self.idle_also = idle_after_s, idle_also
        self.waiting = 0
        self.working = 0
        self._semaphore: asyncio.Semaphore | None = None
        self._idle_timer: Optional[asyncio.TimerHandle] = None

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
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
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
            if self.on_idle is not None and self.working == 0 and self.waiting == 0:
                self._idle_soon()

    def _idle_soon(self) -> None:
        if self.idle_after_s == 0:
            self.on_idle()
            return
        self._idle_timer = asyncio.get_running_loop().call_later(self.idle_after_s, self._idle_now)

    def _idle_now(self) -> None:
        self._idle_timer = None
        if self.working or self.waiting:
            return
        if self.idle_also():
            self.on_idle()
        else:
            self._idle_soon()

    def state(self) -> dict:
        return {"working": self.working, "waiting": self.waiting, "limit": self.limit, "queue": self.queue}
