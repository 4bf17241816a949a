"""Moving crypto off the event loop without paying a thread hop per call.

One `anyio.to_thread.run_sync` hop costs ~120 µs, fifteen times the crypto
of one API key, so a hop per request halves throughput. `Coalescer` instead
keeps at most one batch in flight per event loop, group-commit style:

- a request joins the loop's pending list; when no batch is in flight, the
  list goes to the worker as one batch at the next loop iteration, once every
  caller that announced a request (its query is still running) has made it,
  or enough have, or after `max_wait` at the most;
- while a batch is in flight, every request made meanwhile waits in the
  pending list (no queue operation, no thread wake-up per request);
- the worker runs the batch function once and hands every result back with a
  single `call_soon_threadsafe`; on the loop, that callback resolves the
  batch and sends whatever piled up meanwhile as the next batch.

The worker is one long-lived anyio worker thread (its own `CapacityLimiter`,
so it never takes a token from the application's default limiter). It
returns after `linger` idle seconds, so an idle application holds no thread.

Measured on this kind of machine (100 clients, pool of 10, where one hop
costs ~200 µs of CPU): handing every request to the worker as it came gave
2.7 decrypts per hop; one batch in flight per loop ~5; waiting for announced
callers ~19.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread

try:
    # anyio imports its asyncio backend on the first worker-thread call; that
    # import takes 0.1-0.25 s and would stall the event loop on the first
    # request. Pay it here, at import time, instead.
    import anyio._backends._asyncio
except ImportError:  # pragma: no cover - a later anyio may move it; only the stall returns
    pass

__all__ = ["Coalescer", "CoalescerStats", "Sealed", "Ticket"]

T = TypeVar("T")
R = TypeVar("R")

_Request = tuple[Sequence[T], "asyncio.Future[Sealed[list[R]]]"]


class Sealed(Generic[T]):
    """A value handed between threads and callbacks with a repr that shows nothing.

    asyncio's debug mode logs slow callbacks with their arguments, and a
    future's repr shows its result: both would print decrypted secrets (or
    plaintexts on their way to encryption) if they travelled bare.
    """

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<sealed>"


@dataclass(slots=True)
class CoalescerStats:
    """Counters for tests and benchmarks: requests made, batches run, workers started."""

    requests: int = 0
    batches: int = 0
    workers_started: int = 0


@dataclass(slots=True, repr=False)
class _LoopState(Generic[T, R]):
    """Per event loop: requests waiting for the next batch, and what is on its way."""

    pending: list[_Request[T, R]] = field(default_factory=list)
    in_flight: bool = False
    announced: int = 0  # callers that said a request is coming and have not made it yet
    soon: asyncio.Handle | None = None  # the flush at the next loop iteration
    timer: asyncio.TimerHandle | None = None  # the flush at the latest, `max_wait` after
    # The loop's own worker: batches go in `inbox`. `lock` guards the hand-over
    # between "the worker decides to exit" and "the loop sends a batch
    # expecting a live worker", so no batch is ever stranded. A worker per
    # loop means a loop that ends (with its worker task not yet started)
    # strands nothing but its own requests, which died with it.
    oldest: float = 0.0  # when the oldest pending request came (perf_counter)
    inbox: queue.SimpleQueue[list[_Request[T, R]]] = field(default_factory=queue.SimpleQueue)
    lock: threading.Lock = field(default_factory=threading.Lock)
    worker_alive: bool = False

    def __repr__(self) -> str:  # its requests hold secrets: never shown
        return f"<coalescer state pending={len(self.pending)} in_flight={self.in_flight}>"


class Ticket:
    """An announced request: see `Coalescer.announce`."""

    __slots__ = ("coalescer", "loop", "open", "state")

    def __init__(
        self,
        coalescer: Coalescer[Any, Any],
        loop: asyncio.AbstractEventLoop,
        state: _LoopState[Any, Any],
    ) -> None:
        self.coalescer = coalescer
        self.loop = loop
        self.state = state
        self.open = True

    def close(self) -> None:
        """Withdraw the announcement if `run` did not consume it; idempotent."""
        if self.open:
            self.open = False
            self.state.announced -= 1
            self.coalescer._consider(self.loop, self.state)


class Coalescer(Generic[T, R]):
    """Run `batch_fn` in a worker thread over everything requested meanwhile.

    At most one batch per event loop is in flight. When none is, pending
    requests go at the next loop iteration if every caller that announced a
    request (`announce`) has made it, or `target` of them are waiting;
    otherwise they wait for the rest, `max_wait` seconds at the most. A lone
    caller never waits; under load a batch carries many requests, and the hop
    (which costs far more than the crypto it carries) is shared.

    Args:
        batch_fn: a synchronous function mapping a list of inputs to a list of
            outputs of the same length, in order. It should not raise for one
            bad item (return a marker instead): an exception fails its whole batch.
        linger: seconds the idle worker waits for more work before returning.
        target: pending requests that are worth a hop without waiting for more.
        max_wait: the longest a request waits for announced ones to join it.
        on_batch: called on the loop as each batch goes, with its number of
            requests and the seconds its oldest one waited (for metrics).
    """

    def __init__(
        self,
        batch_fn: Callable[[list[T]], list[R]],
        *,
        linger: float = 0.25,
        target: int = 32,
        max_wait: float = 0.004,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._batch_fn = batch_fn
        self._on_batch = on_batch
        self._linger = linger
        self._target = target
        self._max_wait = max_wait
        self._worker_tasks: set[asyncio.Task[None]] = set()
        # Per loop, dropped with the loop: a repository may outlive a loop (tests).
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState[T, R]]
        self._loops = weakref.WeakKeyDictionary()
        self.stats = CoalescerStats()

    def _state(self) -> tuple[asyncio.AbstractEventLoop, _LoopState[T, R]]:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState()
        return loop, state

    def announce(self) -> Ticket:
        """Say that this task will probably call `run` soon (once its query returns).

        Pass the ticket to `run`, and `close()` it in a `finally`: a ticket
        closed without a `run` (cache hit, error, cancellation) withdraws the
        announcement, so nobody waits for a request that will not come.
        """
        loop, state = self._state()
        state.announced += 1
        return Ticket(self, loop, state)

    async def run(self, items: Sequence[T], *, ticket: Ticket | None = None) -> list[R]:
        """Process `items` in the worker thread, batched with concurrent requests."""
        loop, state = self._state()
        if ticket is not None and ticket.open and ticket.state is state:
            ticket.open = False
            state.announced -= 1
        future: asyncio.Future[Sealed[list[R]]] = loop.create_future()
        if not state.pending:
            state.oldest = time.perf_counter()
        state.pending.append((items, future))
        self.stats.requests += 1
        self._consider(loop, state)
        return (await future).value

    def _consider(self, loop: asyncio.AbstractEventLoop, state: _LoopState[T, R]) -> None:
        """Decide when the pending requests go: next iteration, or after waiting for more."""
        if state.in_flight or not state.pending or state.soon is not None:
            return
        if len(state.pending) >= min(state.announced + 1, self._target):
            # Everyone announced is here (or enough are). Still send at the next
            # iteration, not now: requests made during this one (one per query
            # result that came in) join at no cost, since the worker cannot take
            # the GIL before the loop yields it anyway.
            state.soon = loop.call_soon(self._flush, loop, state)
        elif state.timer is None:
            state.timer = loop.call_later(self._max_wait, self._flush, loop, state)

    def _flush(self, loop: asyncio.AbstractEventLoop, state: _LoopState[T, R]) -> None:
        if state.soon is not None:
            state.soon.cancel()
            state.soon = None
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if not state.in_flight and state.pending:
            self._send(loop, state)

    def _send(self, loop: asyncio.AbstractEventLoop, state: _LoopState[T, R]) -> None:
        """On the loop: hand every pending request to the worker as one batch."""
        batch, state.pending = state.pending, []
        state.in_flight = True
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - state.oldest)
        with state.lock:
            state.inbox.put(batch)
            start = not state.worker_alive
            state.worker_alive = True
        if start:
            self.stats.workers_started += 1
            limiter = anyio.CapacityLimiter(1)
            task = loop.create_task(
                anyio.to_thread.run_sync(self._work, loop, state, limiter=limiter)
            )
            self._worker_tasks.add(task)
            task.add_done_callback(self._worker_tasks.discard)

    def _work(self, loop: asyncio.AbstractEventLoop, state: _LoopState[T, R]) -> None:
        """The worker thread: take a batch, compute, hand results back; until idle."""
        idle_exit = False
        try:
            while True:
                try:
                    batch = state.inbox.get(timeout=self._linger)
                except queue.Empty:
                    with state.lock:
                        if state.inbox.empty():
                            state.worker_alive = False
                            idle_exit = True
                            return
                    continue
                flat: list[T] = [item for items, _ in batch for item in items]
                try:
                    outcome: list[R] | BaseException = self._batch_fn(flat)
                except BaseException as exc:  # handed to the callers, whatever it is
                    outcome = exc
                self.stats.batches += 1
                try:
                    loop.call_soon_threadsafe(self._done, loop, Sealed((batch, outcome)))
                except RuntimeError:
                    return  # the loop is closed: nobody there is waiting any more
        finally:
            if not idle_exit:  # an idle exit already said so; a successor may be alive
                with state.lock:
                    state.worker_alive = False

    def _done(
        self,
        loop: asyncio.AbstractEventLoop,
        sealed: Sealed[tuple[list[_Request[T, R]], list[R] | BaseException]],
    ) -> None:
        """On the loop: resolve the batch, then send what piled up meanwhile."""
        batch, outcome = sealed.value
        offset = 0
        for items, future in batch:
            end = offset + len(items)
            if not future.done():  # a cancelled caller just gets nothing
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(Sealed(outcome[offset:end]))
            offset = end
        state = self._loops.get(loop)
        if state is None:
            return
        state.in_flight = False
        self._consider(loop, state)
