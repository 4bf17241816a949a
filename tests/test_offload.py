"""The Coalescer: batching, hand-over, announced callers. No database needed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tenantstore._offload import Coalescer

# Long enough that any test passing through a max_wait would time out instead.
NEVER = 30.0


def doubler(log: list[tuple[int, list[int]]]) -> Coalescer[int, int]:
    def batch(items: list[int]) -> list[int]:
        log.append((threading.get_ident(), list(items)))
        return [2 * item for item in items]

    return Coalescer(batch, max_wait=NEVER)


async def test_results_come_back_in_order_from_a_worker_thread() -> None:
    log: list[tuple[int, list[int]]] = []
    coalescer = doubler(log)
    assert await coalescer.run([1, 2, 3]) == [2, 4, 6]
    assert log and all(thread != threading.get_ident() for thread, _ in log)


async def test_a_lone_caller_never_waits_for_max_wait() -> None:
    coalescer = doubler([])
    for i in range(20):
        assert await asyncio.wait_for(coalescer.run([i]), timeout=5) == [2 * i]
    assert coalescer.stats.batches == 20


async def test_concurrent_requests_share_hops() -> None:
    log: list[tuple[int, list[int]]] = []
    coalescer = doubler(log)
    results = await asyncio.gather(*(coalescer.run([i]) for i in range(100)))
    assert results == [[2 * i] for i in range(100)]
    assert coalescer.stats.batches <= 2  # the first goes alone; the rest pile up behind it


async def test_a_request_waits_for_announced_callers_then_goes_with_them() -> None:
    log: list[tuple[int, list[int]]] = []
    coalescer = doubler(log)
    ticket = coalescer.announce()
    first = asyncio.ensure_future(coalescer.run([1]))
    await asyncio.sleep(0.05)
    assert not first.done()  # waiting for the announced request
    second = await asyncio.wait_for(coalescer.run([2], ticket=ticket), timeout=5)
    assert await first == [2] and second == [4]
    assert [items for _, items in log] == [[1, 2]]


async def test_a_withdrawn_announcement_releases_the_waiting_batch() -> None:
    coalescer = doubler([])
    ticket = coalescer.announce()
    waiting = asyncio.ensure_future(coalescer.run([5]))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    ticket.close()
    assert await asyncio.wait_for(waiting, timeout=5) == [10]
    ticket.close()  # idempotent


async def test_max_wait_bounds_the_wait_for_announced_callers() -> None:
    coalescer = Coalescer(lambda items: items, max_wait=0.05)
    ticket = coalescer.announce()
    assert await asyncio.wait_for(coalescer.run(["x"]), timeout=5) == ["x"]
    ticket.close()


async def test_an_exception_fails_only_its_own_batch() -> None:
    def fragile(items: list[int]) -> list[int]:
        if 0 in items:
            raise ZeroDivisionError("boom")
        return items

    coalescer = Coalescer(fragile)
    with pytest.raises(ZeroDivisionError):
        await coalescer.run([0])
    assert await coalescer.run([1]) == [1]


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    coalescer = Coalescer(slow)
    first = asyncio.ensure_future(coalescer.run([1]))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(coalescer.run([2]))
    third = asyncio.ensure_future(coalescer.run([3]))
    await asyncio.sleep(0.05)
    second.cancel()
    release.set()
    assert await first == [1]
    assert await third == [3]
    assert second.cancelled()


def test_one_coalescer_serves_successive_event_loops() -> None:
    """A repository may outlive a loop (one per test, say); each loop gets its results."""
    coalescer = doubler([])
    for i in range(3):
        assert asyncio.run(coalescer.run([i])) == [2 * i]


def test_a_loop_that_ends_before_its_worker_starts_strands_nothing_elsewhere() -> None:
    coalescer = doubler([])

    async def leave_early() -> None:
        abandoned = asyncio.ensure_future(coalescer.run([1]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the batch is sent; its worker task has not started
        assert not abandoned.done()

    asyncio.run(leave_early())

    async def later() -> list[int]:
        return await asyncio.wait_for(coalescer.run([21]), timeout=5)

    assert asyncio.run(later()) == [42]


async def test_a_base_exception_in_the_batch_reaches_its_callers_and_the_worker_goes_on() -> None:
    class Stop(BaseException):
        pass

    def batch(items: list[int]) -> list[int]:
        if -1 in items:
            raise Stop()
        return items

    coalescer = Coalescer(batch)
    with pytest.raises(Stop):
        await asyncio.wait_for(coalescer.run([-1]), timeout=5)
    assert await asyncio.wait_for(coalescer.run([7]), timeout=5) == [7]
