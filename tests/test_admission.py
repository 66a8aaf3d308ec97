"""The server's bound on work in flight: at most `limit` at once, `queue` waiting, the rest refused."""
import asyncio

import pytest

from melanoma_siamese.admission import Admission, Busy


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


def test_on_idle_is_called_only_when_the_last_request_leaves():
    async def scenario():
        idle = []
        gate = Admission(limit=2, queue=2, on_idle=lambda: idle.append((gate.working, gate.waiting)))
        release = asyncio.Event()

        async def request():
            async with gate.slot():
                await release.wait()

        tasks = [asyncio.create_task(request()) for _ in range(4)]
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        async with gate.slot():
            pass
        return idle

    assert asyncio.run(scenario()) == [(0, 0), (0, 0)]  # once after the burst of four, once after the single one


def test_on_idle_waits_for_a_quiet_moment_and_for_the_rest_of_the_server():
    """With idle_after_s, back-to-back requests never call it, and it waits while idle_also() says no."""
    async def scenario():
        calls, scoring = [], {"busy": True}
        gate = Admission(limit=1, queue=1, on_idle=lambda: calls.append("idle"), idle_after_s=0.2,
                         idle_also=lambda: not scoring["busy"])
        for _ in range(5):  # each request arrives as the one before leaves: the pending call is called off
            async with gate.slot():
                pass
        seen = [list(calls)]
        await asyncio.sleep(0.5)  # quiet, but the rest of the server is still busy: asked again later
        seen.append(list(calls))
        scoring["busy"] = False
        await asyncio.sleep(0.5)
        seen.append(list(calls))
        await asyncio.sleep(0.5)  # once per quiet moment, not again and again
        seen.append(list(calls))
        return seen

    assert asyncio.run(scenario()) == [[], [], ["idle"], ["idle"]]
