"""qvl_ros.core.batcher: batch forming, fill wait, drop-oldest bound, errors, shutdown, load."""
import threading
import time

import pytest

from qvl_ros.core.batcher import Batcher


class Recorder:
    """A run function that records its batches and can be held back by an event."""

    def __init__(self, hold=None, delay=0.0):
        self.batches = []
        self.hold = hold
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, items):
        if self.hold is not None:
            self.hold.wait(5)
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.batches.append(list(items))

    @property
    def items(self):
        with self.lock:
            return [x for b in self.batches for x in b]


def test_batches_in_order_and_at_most_max_size():
    rec = Recorder()
    b = Batcher(rec, max_size=3, max_wait_ms=50, queue_depth=100)
    for i in range(10):  # queued before the worker starts: batches of exactly 3, 3, 3, 1
        b.put(i)
    b.start()
    assert b.wait_idle(5)
    b.stop()
    assert rec.items == list(range(10))
    assert [len(x) for x in rec.batches] == [3, 3, 3, 1]
    s = b.stats()
    assert s["processed"] == 10 and s["batches"] == 4 and s["put"] == 10
    assert s["drops"] == {"queue_full": 0, "error": 0, "shutdown": 0, "time_reset": 0, "inactive": 0}


class FakeClock:
    """Injected time source: seconds that move only when the test says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _timed_recorder(clock):
    """A run function recording (clock time at the call, items)."""
    seen = []
    return seen, (lambda items: seen.append((clock(), list(items))))


def _move(b, clock, t):
    """Set the injected clock to ``t`` and wait until the worker has looked at it."""
    clock.t = t
    b.wake()
    assert b.wait_for(lambda s: s["state"] != "filling" or s["fill_checked_at"] == t, 5)


def test_waits_at_most_max_wait_for_a_batch_to_fill():
    clock = FakeClock()
    seen, run = _timed_recorder(clock)
    b = Batcher(run, max_size=4, max_wait_ms=150, queue_depth=8, clock=clock).start()
    b.put("a")
    assert b.wait_for(lambda s: s["state"] == "filling" and s["fill_checked_at"] == 0.0, 5)
    clock.t = 0.05
    b.put("b")
    assert b.wait_for(lambda s: s["fill_checked_at"] == 0.05, 5)
    _move(b, clock, 0.149)
    assert seen == [] and b.stats()["state"] == "filling"  # not before the oldest waited 150 ms
    _move(b, clock, 0.15)
    assert b.wait_idle(5)
    b.stop()
    assert seen == [(0.15, ["a", "b"])]  # one batch of both, exactly when max_wait ran out


def test_full_batch_runs_without_waiting():
    clock = FakeClock()  # never moves: only a full batch can run
    seen, run = _timed_recorder(clock)
    b = Batcher(run, max_size=2, max_wait_ms=5000, queue_depth=8, clock=clock).start()
    b.put(1)
    b.put(2)
    assert b.wait_idle(5)
    b.stop()
    assert seen == [(0.0, [1, 2])]


def test_zero_wait_takes_what_is_there():
    rec = Recorder()
    b = Batcher(rec, max_size=8, max_wait_ms=0, queue_depth=8).start()
    b.put(1)
    assert b.wait_idle(2)
    b.stop()
    assert rec.batches == [[1]]


def test_item_that_waited_while_busy_is_not_held_again():
    clock = FakeClock()
    hold = threading.Event()
    seen = []

    def run(items):
        seen.append((clock(), list(items)))
        if items == ["first"]:
            hold.wait(5)

    b = Batcher(run, max_size=4, max_wait_ms=300, queue_depth=8, clock=clock).start()
    b.put("first")
    _move(b, clock, 0.3)  # "first" runs after its 300 ms wait and blocks on `hold`
    assert b.wait_for(lambda s: s["state"] == "running", 5)
    b.put("second")
    clock.t = 0.7         # "second" is now older than max_wait; the clock stays here
    hold.set()
    assert b.wait_idle(5)  # would never finish if "second" waited for the clock again
    b.stop()
    assert seen == [(0.3, ["first"]), (0.7, ["second"])]


def test_drops_oldest_when_full_and_counts_it():
    hold = threading.Event()
    rec = Recorder(hold=hold)
    dropped_hook = []
    b = Batcher(rec, max_size=2, max_wait_ms=0, queue_depth=3, on_drop=dropped_hook.append).start()
    b.put(0)
    assert b.wait_for(lambda s: s["running"] == 1, 5)  # item 0 is in flight, blocked on `hold`
    returned = [b.put(i) for i in range(1, 8)]
    assert returned == [None, None, None, 1, 2, 3, 4]
    assert dropped_hook == [1, 2, 3, 4]
    assert b.depth() == 3
    s = b.stats()
    assert s["drops"]["queue_full"] == 4 and s["max_depth_seen"] == 3
    hold.set()
    assert b.wait_idle(5)
    b.stop()
    assert rec.items == [0, 5, 6, 7]  # the newest sets survive


def test_error_in_run_is_reported_and_worker_continues():
    errors = []

    def run(items):
        if "bad" in items:
            raise RuntimeError("model exploded")
        ok.extend(items)

    ok = []
    b = Batcher(run, max_size=1, max_wait_ms=0, queue_depth=8,
                on_error=lambda items, exc: errors.append((items, str(exc)))).start()
    for x in ["a", "bad", "b"]:
        b.put(x)
    assert b.wait_idle(5)
    b.stop()
    assert ok == ["a", "b"]
    assert errors == [(["bad"], "model exploded")]
    s = b.stats()
    assert s["drops"]["error"] == 1 and s["processed"] == 2 and s["batches"] == 3


def test_failing_error_hook_does_not_kill_the_worker():
    def run(items):
        raise ValueError("always")

    def hook(items, exc):
        raise RuntimeError("hook fails too")

    b = Batcher(run, max_size=1, max_wait_ms=0, queue_depth=4, on_error=hook).start()
    b.put(1)
    b.put(2)
    assert b.wait_idle(5)
    assert b.alive
    b.stop()
    assert b.stats()["drops"]["error"] == 2


def test_stop_without_drain_discards_and_counts():
    hold = threading.Event()
    rec = Recorder(hold=hold)
    b = Batcher(rec, max_size=1, max_wait_ms=0, queue_depth=10).start()
    for i in range(5):
        b.put(i)
    assert b.wait_for(lambda s: s["running"] == 1, 5)  # item 0 in flight, 1..4 queued
    stopped = []
    stopper = threading.Thread(target=lambda: stopped.append(b.stop(drain=False, timeout=5)))
    stopper.start()
    assert b.wait_for(lambda s: s["drops"]["shutdown"] == 4, 5)  # queue discarded at once
    hold.set()
    stopper.join(5)
    assert stopped == [True] and not b.alive
    s = b.stats()
    assert rec.items == [0]  # the batch in flight finishes
    assert s["drops"]["shutdown"] == 4
    assert b.put(99) == 99  # refused after stop
    assert b.stats()["drops"]["shutdown"] == 5


def test_stop_with_drain_runs_everything():
    rec = Recorder(delay=0.01)
    b = Batcher(rec, max_size=2, max_wait_ms=100, queue_depth=10).start()
    for i in range(7):
        b.put(i)
    assert b.stop(drain=True, timeout=5)
    assert rec.items == list(range(7))


def test_configure_while_running():
    rec = Recorder()
    b = Batcher(rec, max_size=1, max_wait_ms=0, queue_depth=10)
    b.configure(max_size=5, max_wait_ms=1000)
    assert b.max_size == 5 and b.max_wait_ms == pytest.approx(1000)
    for i in range(5):
        b.put(i)
    b.start()
    assert b.wait_idle(5)
    b.stop()
    assert rec.batches == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("kwargs", [dict(max_size=0), dict(queue_depth=0), dict(max_wait_ms=-1)])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        Batcher(lambda items: None, **kwargs)


def test_start_twice_is_an_error():
    b = Batcher(lambda items: None).start()
    with pytest.raises(RuntimeError):
        b.start()
    b.stop()


def test_producer_faster_than_consumer_stays_bounded():
    """Items arrive every 2 ms, a batch takes 20 ms (both on an injected clock, in lockstep with
    the worker): the queue stays at its limit, items are dropped oldest-first, and no processed
    item waited longer than ceil(depth / max_size) + 1 batch times."""
    depth, max_size, period, run_s = 4, 2, 0.002, 0.02
    clock = FakeClock()
    tick = threading.Condition()
    waits, busy_until, finished = [], [], []

    def run(items):
        start = clock()
        waits.extend(start - t for t in items)
        with tick:  # the batch takes run_s of the injected clock
            busy_until.append(start + run_s)
            tick.notify_all()
            tick.wait_for(lambda: finished or clock() >= start + run_s - 1e-12, 5)

    def settled(s):
        if s["state"] == "running":
            return bool(busy_until) and busy_until[-1] > clock() + 1e-12
        return s["state"] == "idle" or s["fill_checked_at"] == clock()

    b = Batcher(run, max_size=max_size, max_wait_ms=5, queue_depth=depth, clock=clock).start()
    max_depth = 0
    for n in range(1, 501):
        with tick:
            clock.t = round(n * period, 9)
            tick.notify_all()
        b.put(clock.t)
        b.wake()
        assert b.wait_for(settled, 5), b.stats()
        max_depth = max(max_depth, b.depth())
    with tick:  # the producer is done: what is left runs without waiting for the clock
        finished.append(True)
        tick.notify_all()
    assert b.stop(drain=True, timeout=5)
    s = b.stats()
    assert max_depth <= depth and s["max_depth_seen"] == depth
    assert s["drops"]["queue_full"] > 0
    assert s["put"] == 500 == s["processed"] + s["drops"]["queue_full"]
    bound = (-(-depth // max_size) + 1) * run_s
    assert max(waits) <= bound + 1e-9, (max(waits), bound)


# ----------------------------------------------------------------------------- side tasks, clear
def test_side_task_runs_between_batches_on_the_worker_and_the_task_queue_is_bounded():
    """A submitted task runs on the worker thread, after the batch in flight and before the
    next one; submit refuses more than task_depth waiting tasks; stop cancels the rest."""
    gate = threading.Event()
    order = []

    def run(items):
        order.append(("batch", list(items), threading.current_thread().name))
        gate.wait(10)

    b = Batcher(run, max_size=1, max_wait_ms=0, queue_depth=8, task_depth=2, name="w").start()
    try:
        b.put(1)
        assert b.wait_for(lambda s: s["running"] == 1, 10)
        b.put(2)
        cancelled = []
        assert b.submit(lambda: order.append(("task", threading.current_thread().name)), cancelled.append)
        assert b.submit(lambda: order.append(("task2", threading.current_thread().name)), cancelled.append)
        assert not b.submit(lambda: order.append("never"), cancelled.append)  # two already wait
        assert b.stats()["tasks"]["refused"] == 1 and b.stats()["tasks_waiting"] == 2
        gate.set()
        assert b.wait_for(lambda s: s["processed"] == 2 and s["tasks"]["run"] == 2, 10)
        assert order == [("batch", [1], "w"), ("task", "w"), ("task2", "w"), ("batch", [2], "w")]
        assert cancelled == []
    finally:
        gate.set()
        b.stop()
    waiting = Batcher(lambda items: None, name="w2")  # never started: the task waits until stop
    got = []
    assert waiting.submit(lambda: got.append("ran"), got.append)
    waiting.stop()
    assert got == ["batcher stopped"] and waiting.stats()["tasks"]["cancelled"] == 1


def test_clear_drops_queued_items_under_the_reason_and_keeps_the_batch_in_flight():
    gate = threading.Event()
    done = []

    def run(items):
        gate.wait(10)
        done.extend(items)

    b = Batcher(run, max_size=1, max_wait_ms=0, queue_depth=8).start()
    try:
        b.put("a")
        assert b.wait_for(lambda s: s["running"] == 1, 10)
        for x in "bcd":
            b.put(x)
        assert b.clear("time_reset") == 3
        with pytest.raises(ValueError, match="unknown drop reason"):
            b.clear("whatever")
        gate.set()
        assert b.wait_idle(10)
        s = b.stats()
        assert done == ["a"] and s["drops"]["time_reset"] == 3 and s["processed"] == 1
        assert s["put"] == s["processed"] + sum(s["drops"].values())
    finally:
        gate.set()
        b.stop()


def test_a_long_task_runs_the_due_batches_between_its_chunks():
    """run_due_batches, called by a side task on the worker (an answer between decode chunks):
    full batches and batches whose oldest item has waited max_wait run there and then, a batch
    still filling does not (fake clock); on another thread it does nothing; stopping ends it."""
    now = [0.0]
    rec = Recorder()
    b = Batcher(rec, max_size=2, max_wait_ms=100, queue_depth=10, clock=lambda: now[0]).start()
    step, result, proceed = threading.Event(), [], threading.Event()

    def task():  # three "chunks"
        for _ in range(3):
            step.set()
            assert proceed.wait(5)
            proceed.clear()
            result.append(b.run_due_batches())

    try:
        assert b.run_due_batches() == 0  # not the worker
        assert b.submit(task, lambda _r: None)
        assert step.wait(5)
        step.clear()
        for i in range(3):
            b.put(i)  # one full batch and one filling
        proceed.set()
        assert step.wait(5)
        step.clear()
        assert result == [1] and rec.batches == [[0, 1]]
        assert b.stats()["task_running"] and b.stats()["state"] == "task"
        now[0] = 0.1  # the filling one has waited max_wait
        proceed.set()
        assert step.wait(5)
        step.clear()
        assert result == [1, 1] and rec.batches == [[0, 1], [2]]
        proceed.set()
        assert b.wait_for(lambda s: s["tasks"]["run"] == 1 and not s["task_running"], 5)
        assert result == [1, 1, 0] and b.stats()["batches_beside_tasks"] == 2 and b.stats()["processed"] == 3
    finally:
        proceed.set()
        assert b.stop(timeout=5)
