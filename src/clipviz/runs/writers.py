"""Writing outputs while the model computes the next batch: a pool of writer threads behind a
bounded queue, whose results come back in the order the work was handed in.

Threads, not processes: the work (colouring, blending, deflating PNGs, zipping maps) is numpy
and ISA-L, which release the GIL, and a thread reads the display image and the maps where
they are instead of receiving a copy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

R = TypeVar("R")


WRITER_NICENESS = 19


def _yield_to_the_model() -> None:
    """Lower this writer thread's priority (Linux schedules threads one by one): on a
    machine with as many cores as the model uses, a writer then runs in the model's pauses
    instead of stalling its threads, and the model waits only when the queue is full."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)


class OrderedWriters(Generic[R]):
    """Run jobs on `threads` threads (0: at once, in this thread), at most `max_pending` in
    flight; each result is handed to `on_result` in submission order, as soon as it and
    every earlier one are done. An exception in a job is raised here, in the caller's
    thread, when its turn comes; the jobs after it are cancelled."""

    def __init__(self, threads: int, on_result: Callable[[R], None], max_pending: int = 16) -> None:
        self.on_result = on_result
        self.max_pending = max(1, max_pending)
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(
                threads, thread_name_prefix="clipviz-writer", initializer=_yield_to_the_model
            )
            if threads > 0
            else None
        )
        self._pending: collections.deque[concurrent.futures.Future[R]] = collections.deque()

    def submit(self, job: Callable[..., R], *args: Any) -> None:
        """Queue `job(*args)`; waits first while `max_pending` jobs are in flight."""
        if self._pool is None:  # nothing is ever pending: hand the result on at once
            self.on_result(job(*args))
            return
        while len(self._pending) >= self.max_pending:
            self._hand_on(wait_for_oldest=True)
        self._pending.append(self._pool.submit(job, *args))
        self._hand_on()

    def put(self, result: R) -> None:
        """A result that needs no work, kept in its place in the order."""
        if self._pool is None:
            self.on_result(result)
            return
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        future.set_result(result)
        self._pending.append(future)
        self._hand_on()

    def _hand_on(self, wait_for_oldest: bool = False) -> None:
        while self._pending and (wait_for_oldest or self._pending[0].done()):
            wait_for_oldest = False
            self.on_result(self._pending.popleft().result())

    def drain(self) -> None:
        """Wait for every job and hand its result on."""
        while self._pending:
            self._hand_on(wait_for_oldest=True)

    def __enter__(self) -> OrderedWriters[R]:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            try:
                self.drain()
            finally:
                self._stop()
            return
        # failing or interrupted: let the running jobs finish, then keep, in order, every
        # result up to the first that failed (their files are complete)
        self._stop()
        with contextlib.suppress(Exception):
            while self._pending:
                future = self._pending.popleft()
                if future.cancelled() or future.exception() is not None:
                    break
                self.on_result(future.result())

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
