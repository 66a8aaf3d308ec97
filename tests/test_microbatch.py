"""The server's micro-batcher: requests queued while the model is busy share one call; a lone request is
not held back; the queue is bounded; a failure reaches every request of its batch."""
import asyncio
import threading
import time

import numpy as np
import pytest

from melanoma_siamese.admission import Busy
from melanoma_siamese.microbatch import MicroBatcher


def _image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, dtype=np.uint8)


class Model:
    """Answers each image with its first pixel value; records the batch sizes; the first call can be held."""

    def __init__(self, hold_first: bool = False):
        self.calls, self.release = [], threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, pixels: np.ndarray) -> list[int]:
        self.calls.append(len(pixels))
        if len(self.calls) == 1:
            self.release.wait(30)
        return [int(p[0, 0, 0]) for p in pixels]


def test_requests_queued_while_the_model_is_busy_share_one_call():
    model = Model(hold_first=True)

    async def scenario():
        batcher = MicroBatcher(model, max_batch=8, wait_s=0, pending=16)
        first = asyncio.create_task(batcher.submit(_image(0)))
        while not model.calls:
            await asyncio.sleep(0.005)
        rest = [asyncio.create_task(batcher.submit(_image(i))) for i in range(1, 11)]
        while batcher.waiting < 10:
            await asyncio.sleep(0.005)
        model.release.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(scenario()) == list(range(11))
    assert model.calls == [1, 8, 2]  # at most max_batch a call, in arrival order


def test_a_lone_request_does_not_wait_for_a_batch():
    model = Model()

    async def scenario():
        batcher = MicroBatcher(model, max_batch=32, wait_s=5.0, pending=4, expecting=lambda: 0)
        start = time.perf_counter()
        answer = await batcher.submit(_image(7))
        return answer, time.perf_counter() - start

    answer, seconds = asyncio.run(scenario())
    assert answer == 7 and seconds < 2.0


def test_it_waits_for_requests_still_being_decoded():
    model = Model()

    async def scenario():
        decoding = {"n": 1}
        batcher = MicroBatcher(model, max_batch=4, wait_s=5.0, pending=8, expecting=lambda: decoding["n"])
        first = asyncio.create_task(batcher.submit(_image(1)))
        await asyncio.sleep(0.05)
        decoding["n"] = 0  # the second request finishes decoding and joins
        second = asyncio.create_task(batcher.submit(_image(2)))
        return await asyncio.gather(first, second)

    assert asyncio.run(scenario()) == [1, 2]
    assert model.calls == [2]


def test_beyond_the_pending_bound_a_request_is_told_to_come_back():
    model = Model(hold_first=True)

    async def scenario():
        batcher = MicroBatcher(model, max_batch=2, wait_s=0, pending=2, retry_after=3)
        first = asyncio.create_task(batcher.submit(_image(0)))
        while not model.calls:
            await asyncio.sleep(0.005)
        queued = [asyncio.create_task(batcher.submit(_image(i))) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Busy) as refused:
            await batcher.submit(_image(3))
        model.release.set()
        return refused.value.retry_after, await asyncio.gather(first, *queued)

    assert asyncio.run(scenario()) == (3, [0, 1, 2])


def test_a_failure_reaches_every_request_of_its_batch_and_the_next_batch_is_served():
    calls = []

    def model(pixels):
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return [int(p[0, 0, 0]) for p in pixels]

    async def scenario():
        batcher = MicroBatcher(model, max_batch=4, wait_s=0, pending=8)
        failed = await asyncio.gather(batcher.submit(_image(1)), return_exceptions=True)
        return failed, await batcher.submit(_image(5))

    failed, later = asyncio.run(scenario())
    assert isinstance(failed[0], RuntimeError) and later == 5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        MicroBatcher(lambda p: [], max_batch=0, wait_s=0, pending=1)


def test_it_serves_one_event_loop_after_another():
    """An app first driven by a test client's loop, then by uvicorn's: the batcher follows it."""
    batcher = MicroBatcher(Model(), max_batch=4, wait_s=0, pending=4)
    assert asyncio.run(batcher.submit(_image(1))) == 1
    assert asyncio.run(batcher.submit(_image(2))) == 2
