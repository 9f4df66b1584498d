"""Micro-batching: concurrent single requests in, one batched call out, each caller its own result.

    scorer = Scorer("mp4sr-out/artifacts")
    with MicroBatcher(lambda hs: scorer.score(hs, k=10), max_batch=256, max_delay_ms=2) as batcher:
        result = batcher.submit(["item00001", "item00002"]).result()   # from any thread

A batch runs when it holds `max_batch` requests or when its oldest request has waited
`max_delay_ms`. The queue is bounded: past `max_queue` waiting requests `submit` raises
`Overloaded` at once rather than letting memory and latency grow without limit. `close()` stops
intake and either finishes every pending request (drain) or fails each with `BatcherClosed`:
no request is ever dropped silently.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class Overloaded(RuntimeError):
    """The batcher's queue is full: retry later or shed the request."""


class BatcherClosed(RuntimeError):
    """The batcher was closed before (or instead of) running this request."""


class MicroBatcher(Generic[Request, Result]):
    """Collects requests from many threads into batches for `run(requests) -> results`.

    `run` gets a list of requests and must return one result per request, in order; it is only
    ever called from the batcher's single worker thread. An exception from `run` fails every
    request of that batch with that exception."""

    def __init__(
        self,
        run: Callable[[list[Request]], Sequence[Result]],
        max_batch: int = 256,
        max_delay_ms: float = 2.0,
        max_queue: int = 8192,
    ):
        if max_batch < 1 or max_queue < 1 or max_delay_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay_ms >= 0")
        self._run = run
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self._pending: deque[tuple[float, Request, Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="mp4sr-batcher", daemon=True)
        self._worker.start()

    def submit(self, request: Request) -> Future[Result]:
        """Queue one request; its future resolves to its own result (or exception)."""
        future: Future[Result] = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"overloaded: {self.max_queue} requests already waiting")
            self._pending.append((time.monotonic(), request, future))
            self._cond.notify()
        return future

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the pending ones (drain) or fail them with BatcherClosed."""
        with self._cond:
            self._closed = True
            dropped = [] if drain else list(self._pending)
            if not drain:
                self._pending.clear()
            self._cond.notify_all()
        for _, _, future in dropped:
            if future.set_running_or_notify_cancel():
                future.set_exception(BatcherClosed("batcher closed before this request ran"))
        self._worker.join(timeout)

    def __enter__(self) -> MicroBatcher[Request, Result]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[tuple[float, Request, Future]] | None:
        """Wait for the first request, then until the batch is full, its oldest request has
        waited max_delay, or the batcher closes (the pending requests then run at once)."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None  # closed and drained
            deadline = self._pending[0][0] + self.max_delay
            while len(self._pending) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(self.max_batch, len(self._pending))
            return [self._pending.popleft() for _ in range(count)]

    def _execute(self, batch: list[tuple[float, Request, Future]]) -> None:
        # A caller may have cancelled its future while it waited: leave it out of the batch.
        live = [(request, future) for _, request, future in batch
                if future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._run([request for request, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"batch of {len(live)} requests returned {len(results)} results")
        except Exception as e:  # every caller of the batch learns why; the worker keeps going
            for _, future in live:
                future.set_exception(e)
            return
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)
