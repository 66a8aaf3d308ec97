"""Concurrent requests scored in one forward pass: the server's micro-batcher.

Each request's decoded image joins a queue; one consumer takes what is queued (up to `max_batch`), waits up
to `wait_s` for more only while other requests are still being decoded (so a lone request is never held
back), scores the batch with one call in a worker thread, and hands each request its own answer. While a
batch is being scored, the next requests queue up and form the next batch. At most `pending` images wait
to be scored; beyond that a request is told to come back (admission.Busy), so the work in flight stays
bounded.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .admission import Busy


@dataclass
class _Item:
    pixels: np.ndarray  # S x S x 3 uint8
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """`score(pixels: N x S x S x 3 uint8) -> list of N answers`, called from a worker thread, one batch at a
    time. `expecting()`: how many requests are on their way (being decoded); while some are, the consumer
    waits up to `wait_s` for them to fill the batch."""

    def __init__(self, score: Callable[[np.ndarray], list], max_batch: int, wait_s: float, pending: int,
                 expecting: Callable[[], int] = lambda: 0, retry_after: int = 2):
        if max_batch < 1 or wait_s < 0 or pending < 1:
            raise ValueError("max_batch and pending must be at least 1, wait_s at least 0")
        self.score, self.max_batch, self.wait_s, self.pending = score, max_batch, wait_s, pending
        self.expecting, self.retry_after = expecting, retry_after
        self.batches = 0  # forward passes made (the bench and the tests read it)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._queue: Optional[asyncio.Queue] = None
        self._consumer: Optional[asyncio.Task] = None

    @property
    def waiting(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, pixels: np.ndarray) -> Any:
        """The answer for one S x S x 3 image, scored with whatever else is queued."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Made on first use, inside the server's event loop; made again if the app moves to another loop
            # (a test client's, then uvicorn's): a queue and its consumer belong to one loop.
            self._loop, self._queue = loop, asyncio.Queue()
            self._consumer = loop.create_task(self._run())
        if self._queue.qsize() >= self.pending:
            raise Busy(self.retry_after)
        item = _Item(pixels, loop.create_future())
        self._queue.put_nowait(item)
        return await item.future

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if self.expecting() <= 0 or left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                answers = await loop.run_in_executor(None, self.score, np.stack([i.pixels for i in batch]))
            except Exception as exc:  # every request of the batch gets the error, the consumer goes on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self.batches += 1
            for item, answer in zip(batch, answers):
                if not item.future.done():  # a client that went away cancelled its future
                    item.future.set_result(answer)

    def state(self) -> dict:
        return {"scoring_waiting": self.waiting, "max_batch": self.max_batch, "batches": self.batches}
