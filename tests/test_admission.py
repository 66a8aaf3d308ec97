"""The server's bound on work in flight: at most `limit` at once, `queue` waiting, the rest refused."""
import asyncio

import pytest

from melanoma_siamese.admission import Admission, Busy, Quiet


def test_admission_bounds_work_and_refuses_beyond_the_queue():
    async def scenario():
        gate = Admission(limit=2, queue=3, retry_after=7)
        release = asyncio.Event()
        peak = {"working": 0}
        outcomes = []

        async def request():
            try:
                async with gate.slot():
                    peak["working"] = max(peak["working"], gate.working)
                    await release.wait()
                outcomes.append("done")
            except Busy as exc:
                outcomes.append(exc.retry_after)

        tasks = [asyncio.create_task(request()) for _ in range(8)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert gate.working == 2 and gate.waiting == 3
        release.set()
        await asyncio.gather(*tasks)
        return peak["working"], outcomes, gate.state()

    peak, outcomes, state = asyncio.run(scenario())
    assert peak == 2
    assert outcomes.count("done") == 5 and outcomes.count(7) == 3
    assert state["working"] == 0 and state["waiting"] == 0


def test_admission_releases_its_slot_when_the_work_fails():
    async def scenario():
        gate = Admission(limit=1, queue=0)
        with pytest.raises(RuntimeError):
            async with gate.slot():
                raise RuntimeError("decode failed")
        async with gate.slot():
            return gate.working

    assert asyncio.run(scenario()) == 1


def test_quiet_acts_once_the_server_has_had_no_request_for_a_while():
    """Back-to-back and overlapping requests never call it; a quiet spell calls it once."""
    async def scenario():
        calls = []
        quiet = Quiet(lambda: calls.append(quiet.active), after_s=0.2)
        release = asyncio.Event()

        async def slow():
            async with quiet.request():
                await release.wait()

        for _ in range(5):  # each request arrives as the one before leaves: the pending call is called off
            async with quiet.request():
                pass
        seen = [list(calls)]
        task = asyncio.create_task(slow())  # a long request (a Grad-CAM map, a big batch) keeps it off
        await asyncio.sleep(0.5)
        seen.append(list(calls))
        release.set()
        await task
        await asyncio.sleep(0.5)
        seen.append(list(calls))
        await asyncio.sleep(0.5)  # once per quiet spell, not again and again
        seen.append(list(calls))
        return seen

    assert asyncio.run(scenario()) == [[], [], [0], [0]]
