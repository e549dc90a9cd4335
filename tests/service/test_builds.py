"""Build slots: at most `limit` run at once, the rest wait in order and know their place; leaving,
however a job ends, hands its slot to the next in line."""

from __future__ import annotations

import asyncio

from clipserve.service.builds import BuildSlots


def test_jobs_past_the_limit_wait_in_order_and_know_their_place() -> None:
    async def scenario() -> list[str]:
        slots, ran = BuildSlots(limit=2), []

        async def job(key: str, turn: asyncio.Future | None, release: asyncio.Event) -> None:
            try:
                if turn is not None:
                    await turn
                ran.append(key)
                await release.wait()
            finally:
                slots.leave(key)

        releases = {key: asyncio.Event() for key in "abcde"}
        tasks = {key: asyncio.ensure_future(job(key, slots.join(key), releases[key])) for key in "abcde"}
        await asyncio.sleep(0)
        assert (slots.running, slots.waiting) == (2, 3)
        assert [slots.place(key) for key in "abcde"] == [None, None, 1, 2, 3]
        tasks["d"].cancel()  # gives up its place while waiting
        await asyncio.sleep(0)
        assert [slots.place(key) for key in "ce"] == [1, 2] and slots.waiting == 2
        releases["a"].set()
        await asyncio.sleep(0.01)
        assert ran == ["a", "b", "c"] and slots.place("e") == 1
        tasks["b"].cancel()  # a running job that fails or is stopped frees its slot too
        await asyncio.sleep(0.01)
        assert ran == ["a", "b", "c", "e"] and (slots.running, slots.waiting) == (2, 0)
        for release in releases.values():
            release.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert (slots.running, slots.waiting) == (0, 0)
        return ran

    assert asyncio.run(scenario()) == ["a", "b", "c", "e"]
