"""Bounded queue of work items (synchronized camera sets) served in batches by one worker thread.

No ROS import: the node hands every synchronized set to :meth:`Batcher.put` and gives the
batcher a ``run`` function (model call + publish). The worker thread

* waits for the first item,
* then collects up to ``max_size`` items, waiting at most ``max_wait_ms`` counted from the
  moment the oldest queued item was enqueued (an item that already waited while the model was
  busy does not wait again),
* calls ``run(items)`` outside the lock, so producers never block on the model.

The queue holds at most ``queue_depth`` items. When it is full, :meth:`put` drops the *oldest*
item (camera data goes stale; the newest set is the useful one) and counts it as
``queue_full``. An exception raised by ``run`` is handed to ``on_error(items, exc)`` and
counted as ``error``; the worker keeps going. Items still queued when the batcher stops without
draining are counted as ``shutdown``.

Memory is bounded by ``queue_depth + max_size`` items (queued plus in flight), and the time an
item spends queued is bounded by roughly ``ceil(queue_depth / max_size) + 1`` run times.

Settings ``max_size`` and ``max_wait_ms`` may be changed while running (:meth:`configure`);
``queue_depth`` is fixed.

Side tasks
    :meth:`submit` queues a one-off callable (an on-demand question) that the same worker runs
    between two batches, before the next batch starts, so it never runs concurrently with the
    model. A long task keeps the stream going by calling :meth:`run_due_batches` now and then
    (an answer does it between two chunks of decode steps): the batches due by then run at
    once, on the worker, so the stream is delayed by at most one such interval. At most
    ``task_depth`` tasks wait; :meth:`submit` refuses more (returns False). A task still waiting
    when the batcher stops (or :meth:`cancel_tasks` is called) gets its ``cancel(reason)``
    called instead.

Clearing
    :meth:`clear` drops every queued item under a given reason (``time_reset`` after the clock
    went back, ``inactive`` when the node is deactivated); the batch in flight finishes.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Deque, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

__all__ = ["Batcher", "BATCH_DROP_REASONS"]

T = TypeVar("T")

BATCH_DROP_REASONS: Tuple[str, ...] = ("queue_full", "error", "shutdown", "time_reset", "inactive")

_log = logging.getLogger(__name__)


class Batcher(Generic[T]):
    """One worker thread running ``run(list_of_items)`` over a bounded drop-oldest queue.

    Args:
        run: called from the worker thread with 1..max_size items, oldest first.
        max_size: largest batch handed to ``run``.
        max_wait_ms: how long the oldest queued item may wait for the batch to fill.
        queue_depth: largest number of queued (not yet running) items.
        on_error: called as ``on_error(items, exc)`` when ``run`` raises; defaults to logging
            through the ``logging`` module.
        on_drop: called as ``on_drop(item)`` (under no lock) for each item dropped because the
            queue was full.
        name: name of the worker thread.
        clock: monotonic time source in seconds (tests may pass a fake one).
    """

    def __init__(self, run: Callable[[List[T]], Any], *, max_size: int = 4, max_wait_ms: float = 10.0,
                 queue_depth: int = 8, on_error: Optional[Callable[[List[T], BaseException], Any]] = None,
                 on_drop: Optional[Callable[[T], Any]] = None, name: str = "batcher",
                 clock: Callable[[], float] = time.monotonic, task_depth: int = 4) -> None:
        if int(queue_depth) < 1:
            raise ValueError("queue_depth must be at least 1")
        self._run = run
        self._on_error = on_error
        self._on_drop = on_drop
        self._name = name
        self._clock = clock
        self._depth_limit = int(queue_depth)
        self._max_size = 1
        self._max_wait = 0.0
        self.configure(max_size=max_size, max_wait_ms=max_wait_ms)
        self._queue: Deque[Tuple[T, float]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._drain_on_stop = False
        self._running = 0
        self._counts = {"put": 0, "processed": 0, "batches": 0}
        self._drops: Dict[str, int] = {r: 0 for r in BATCH_DROP_REASONS}
        self._max_depth_seen = 0
        self._busy_s = 0.0
        self._last_batch_size = 0
        self._last_run_s = 0.0
        self._state = "idle"  # idle | filling | running | stopped (worker's view)
        self._fill_checked_at: Optional[float] = None  # clock value of the last fill-wait check
        self._task_limit = int(task_depth)
        self._tasks: Deque[Tuple[Callable[[], Any], Callable[[str], Any]]] = collections.deque()
        self._task_counts = {"submitted": 0, "run": 0, "refused": 0, "cancelled": 0}
        self._task_running = False
        self._nested_batches = 0  # batches run from a side task (run_due_batches)

    # ------------------------------------------------------------------------- configuration
    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def max_wait_ms(self) -> float:
        return self._max_wait * 1000.0

    @property
    def queue_depth(self) -> int:
        return self._depth_limit

    def configure(self, *, max_size: Optional[int] = None, max_wait_ms: Optional[float] = None) -> None:
        """Change the batch size limit and/or the fill wait; takes effect for the next batch."""
        if max_size is not None:
            if int(max_size) < 1:
                raise ValueError("max_size must be at least 1")
            self._max_size = int(max_size)
        if max_wait_ms is not None:
            if float(max_wait_ms) < 0:
                raise ValueError("max_wait_ms must be >= 0")
            self._max_wait = float(max_wait_ms) / 1000.0
        cond = getattr(self, "_cond", None)
        if cond is not None:
            with cond:
                cond.notify_all()

    # ------------------------------------------------------------------------- life cycle
    def start(self) -> "Batcher[T]":
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("batcher already started")
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = False, timeout: Optional[float] = None) -> bool:
        """Stop the worker; with ``drain`` it first runs what is queued. Returns True if joined.

        Without ``drain`` the queued items are discarded (counted as ``shutdown``); the batch
        in flight, if any, finishes first.
        """
        with self._cond:
            self._stopping = True
            self._drain_on_stop = drain
            if not drain:
                self._drops["shutdown"] += len(self._queue)
                self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        self.cancel_tasks("batcher stopped")
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def cancel_tasks(self, reason: str) -> int:
        """Call ``cancel(reason)`` of every waiting side task (not the running one); returns how many."""
        with self._cond:
            cancelled = list(self._tasks)
            self._tasks.clear()
            self._task_counts["cancelled"] += len(cancelled)
            self._cond.notify_all()
        for _, cancel in cancelled:
            self._call_hook(cancel, reason)
        return len(cancelled)

    def clear(self, reason: str) -> int:
        """Drop every queued item, counted under ``reason`` (one of BATCH_DROP_REASONS); returns
        how many. The batch in flight is not affected."""
        if reason not in self._drops:
            raise ValueError(f"unknown drop reason {reason!r}; expected one of {BATCH_DROP_REASONS}")
        with self._cond:
            n = len(self._queue)
            self._drops[reason] += n
            self._queue.clear()
            self._cond.notify_all()
        return n

    def submit(self, task: Callable[[], Any], cancel: Callable[[str], Any]) -> bool:
        """Queue ``task()`` to run on the worker before the next batch; False (and nothing
        queued) when ``task_depth`` tasks already wait or the batcher is stopping."""
        with self._cond:
            if self._stopping or len(self._tasks) >= self._task_limit:
                self._task_counts["refused"] += 1
                return False
            self._tasks.append((task, cancel))
            self._task_counts["submitted"] += 1
            self._cond.notify_all()
            return True

    def wake(self) -> None:
        """Make the worker re-read the clock now (an injected clock moved, or settings changed)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the worker thread to end (after :meth:`stop`); True when it has."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def run_due_batches(self) -> int:
        """From a side task on the worker: run the batches that are due now (a full batch, or
        the oldest set has waited ``max_wait_ms``), at most as many as were queued on entry;
        returns how many ran. Does nothing while stopping, or on another thread."""
        if threading.current_thread() is not self._thread:
            return 0
        with self._cond:
            limit = -(-len(self._queue) // self._max_size)
        ran = 0
        for _ in range(limit):
            with self._cond:
                if self._stopping or not self._queue:
                    break
                full = len(self._queue) >= self._max_size
                if not full and self._clock() - self._queue[0][1] < self._max_wait:
                    break
                batch = [self._queue.popleft()[0] for _ in range(min(self._max_size, len(self._queue)))]
                self._running = len(batch)  # wait_idle never sees the batch neither queued nor running
                self._nested_batches += 1
            self._run_batch(batch)
            ran += 1
        return ran

    # ------------------------------------------------------------------------- producer side
    def put(self, item: T) -> Optional[T]:
        """Queue ``item``; returns the item dropped to make room (the oldest), if any."""
        dropped = None
        with self._cond:
            if self._stopping:
                self._drops["shutdown"] += 1
                return item
            self._counts["put"] += 1
            if len(self._queue) >= self._depth_limit:
                dropped = self._queue.popleft()[0]
                self._drops["queue_full"] += 1
            self._queue.append((item, self._clock()))
            if len(self._queue) > self._max_depth_seen:
                self._max_depth_seen = len(self._queue)
            self._cond.notify_all()
        if dropped is not None and self._on_drop is not None:
            try:
                self._on_drop(dropped)
            except Exception:  # a faulty hook must not break the producer
                _log.exception("%s: on_drop hook failed", self._name)
        return dropped

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until nothing is queued or running; returns False on timeout.

        ``timeout`` is real (monotonic) seconds, whatever clock the batcher was given."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is None else min(remaining, 0.05))
            return True

    def wait_for(self, predicate: Callable[[Dict[str, Any]], bool], timeout: Optional[float] = None) -> bool:
        """Block until ``predicate(stats())`` holds; False after ``timeout`` real seconds.

        The worker notifies on every change of state, so tests (and shutdown code) can wait for
        a condition of the pipeline instead of sleeping."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not predicate(self._stats_locked()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is None else min(remaining, 0.05))
            return True

    # ------------------------------------------------------------------------- counters
    def depth(self) -> int:
        """Items queued now (not counting the batch in flight)."""
        with self._cond:
            return len(self._queue)

    def stats(self) -> Dict[str, Any]:
        """Snapshot of the counters (a fresh dict)."""
        with self._cond:
            return self._stats_locked()

    def _stats_locked(self) -> Dict[str, Any]:
        return {
            "depth": len(self._queue),
            "depth_limit": self._depth_limit,
            "max_depth_seen": self._max_depth_seen,
            "running": self._running,
            "put": self._counts["put"],
            "processed": self._counts["processed"],
            "batches": self._counts["batches"],
            "drops": dict(self._drops),
            "busy_s": self._busy_s,
            "last_batch_size": self._last_batch_size,
            "last_run_s": self._last_run_s,
            "max_size": self._max_size,
            "max_wait_ms": self._max_wait * 1000.0,
            "state": self._state,
            "fill_checked_at": self._fill_checked_at,
            "tasks_waiting": len(self._tasks),
            "task_running": self._task_running,
            "tasks": dict(self._task_counts),
            "batches_beside_tasks": self._nested_batches,
        }

    # ------------------------------------------------------------------------- worker
    def _take(self) -> Optional[List[T]]:
        """Next batch, or None when the worker should exit. Called with the lock held."""
        cond = self._cond
        self._state = "idle"
        while not self._queue and not self._stopping and not self._tasks:
            cond.wait()
        if self._tasks and not self._stopping:
            return []  # the loop runs the side tasks first
        if not self._queue:  # stopping, nothing left
            return None
        if self._stopping and not self._drain_on_stop:
            return None
        while len(self._queue) < self._max_size and not self._stopping:
            now = self._clock()
            remaining = self._queue[0][1] + self._max_wait - now
            if remaining <= 0:
                break
            self._state, self._fill_checked_at = "filling", now
            cond.notify_all()  # observers (wait_for_state) see the decision to wait
            cond.wait(remaining)
            if not self._queue or self._tasks:  # cleared, or a side task to run first
                return []
        n = min(self._max_size, len(self._queue))
        return [self._queue.popleft()[0] for _ in range(n)]

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
                if batch is None:
                    self._state = "stopped"
                    self._cond.notify_all()
                    return
                task = None
                if not batch:
                    task = self._tasks.popleft() if self._tasks else None
                    self._state = "task" if task is not None else self._state
                else:
                    self._running = len(batch)
                    self._state = "running"
                    self._cond.notify_all()
            if not batch:
                if task is not None:
                    self._run_task(task[0])
                continue
            self._run_batch(batch)

    def _run_batch(self, batch: List[T]) -> None:
        with self._cond:
            self._running = len(batch)
            self._state = "running"
            self._cond.notify_all()
        try:
            self._run_counted(batch)
        finally:
            with self._cond:
                self._running = 0
                if self._task_running:
                    self._state = "task"
                self._cond.notify_all()

    def _run_counted(self, batch: List[T]) -> None:
        t0 = self._clock()
        failed: Optional[BaseException] = None
        try:
            self._run(batch)
        except Exception as exc:  # the worker survives any failure of one batch
            failed = exc
        elapsed = self._clock() - t0
        if failed is not None:
            self._report_error(batch, failed)
        with self._cond:
            self._running = 0
            self._busy_s += elapsed
            self._last_run_s = elapsed
            self._last_batch_size = len(batch)
            self._counts["batches"] += 1
            if failed is None:
                self._counts["processed"] += len(batch)
            else:
                self._drops["error"] += len(batch)
            self._cond.notify_all()

    def _run_task(self, task: Callable[[], Any]) -> None:
        with self._cond:
            self._task_running = True
            self._cond.notify_all()
        try:
            self._call_hook(task)
        finally:
            with self._cond:
                self._task_running = False
                self._task_counts["run"] += 1
                self._cond.notify_all()

    def _call_hook(self, hook: Callable[..., Any], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # a side task reports its own failures; this is the last resort
            _log.exception("%s: side task failed", self._name)

    def _report_error(self, batch: Sequence[T], exc: BaseException) -> None:
        if self._on_error is None:
            _log.error("%s: run failed for a batch of %d: %r", self._name, len(batch), exc)
            return
        try:
            self._on_error(list(batch), exc)
        except Exception:
            _log.exception("%s: on_error hook failed", self._name)
