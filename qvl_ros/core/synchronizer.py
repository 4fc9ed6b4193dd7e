"""Approximate-time synchronization of N camera streams into sets of one frame per camera.

Pure Python, no ROS import. The node feeds every frame with :meth:`Synchronizer.add` and gets
back the sets that are complete; it decides which time to use (header stamp, or arrival time)
and passes it as integer nanoseconds. Nothing but bookkeeping happens inside: model work is the
caller's business, done on the returned sets.

What a set is
    A :class:`SyncSet` holds exactly one frame per input, and all its stamps lie within ``slop``:
    ``max(stamps) - min(stamps) <= slop`` (exactly ``slop`` is accepted). Every frame is used at
    most once. Sets are emitted in stamp order, per input: the frame an input contributes to a
    set is newer than the one it contributed to the previous set. So both the newest and the
    oldest stamp of successive sets increase strictly.

Policies (which sets)
    ``"approximate_time"`` (the default): the set choice of message_filters' C++
    ApproximateTime policy with ``max_interval = slop`` and no age penalty: each set is the
    tightest one (smallest spread) around its pivot, the newest of the inputs' oldest frames;
    it waits for frames that may still tighten it. Implemented in
    :mod:`qvl_ros.core.approximate_time`, which describes the rule. Two 30 Hz cameras 28 ms
    apart are paired 5.3 ms apart (the other camera's next frame), where ``"max_sets"`` pairs
    them 28 ms apart whenever the slop allows it.

    ``"max_sets"``: the earliest set within ``slop``, which maximises the number of sets but
    not their tightness; described below. It never waits: a set is emitted by the ``add`` that
    completes it.

    Default slop: :func:`default_slop_ns` gives a third of the slowest camera's frame period,
    wide enough for the jitter of real cameras and narrow enough that a window holds at most
    one frame of each camera.

Reordering (both policies)
    Frames of one input are assumed to arrive in stamp order (DDS keeps a writer's order).
    ``reorder_tolerance = d > 0`` accepts a frame down to ``last_k - d + 1``, where ``last_k`` is
    the newest stamp received on input ``k``, at the cost of up to ``d`` of extra latency.
    ``"approximate_time"`` holds each frame back until its input is ``d`` past it (then no older
    frame can come), in stamp order, at most ``queue_size`` frames per input (beyond that the
    oldest is passed on early); a frame older than one already passed on is ``too_old``.
    ``"max_sets"`` folds the tolerance into its rule (below).

max_sets: which sets
    Among all sets the queued frames allow, take the one whose newest stamp ``M`` is smallest;
    for it, every input contributes its *earliest* queued frame in ``[M - slop, M]``. That set
    is componentwise the earliest set there is (every other set has, on every input, a frame
    at least as new), so taking it never costs a later set: repeating the rule yields the
    maximum number of disjoint in-slop sets the streams contain (exchange argument, as for
    interval scheduling). Frames an input skips are provably in no possible set and are
    dropped as ``unmatched``.

    Trade-off: when ``slop`` exceeds an input's frame period, several of its frames fall into
    one window and the earliest one is taken (that is what keeps the count maximal). For the
    tightest sets choose ``slop`` below the period of the fastest camera (typically a third to
    a half of it); then each window holds at most one frame per camera.

max_sets: when a set is emitted (versus waiting for a better one)
    As soon as it exists. Frames of one input are assumed to arrive in stamp order (DDS keeps
    a writer's order; ``reorder_tolerance`` relaxes this), so a frame input ``k`` delivers
    later is newer than every frame it has queued, in particular newer than the frame ``f_k``
    it contributes to the earliest set ``S`` (newest stamp ``M``). No future frame can give a
    set that ends before ``M``: in such a set, a future frame of input ``k`` has a stamp in
    ``(f_k, M']`` with ``M' < M``, and ``f_k >= M - slop > M' - slop``, so replacing it by
    ``f_k`` keeps the set within slop, and doing so for every future frame yields a set of
    queued frames ending before ``M``, which contradicts the choice of ``S``. Nor can a future
    frame be an earlier pick for ``S`` itself. Waiting therefore never yields a better set:
    ``add`` returns every set the queues hold, and after it returns the queues hold none.
    (``approximate_time`` waits for later frames because it minimizes the span of each set;
    here any in-slop set is acceptable and the objective is the number of sets.)

    With ``reorder_tolerance = d > 0`` a frame may still arrive with a stamp down to
    ``last_k - d + 1``, where ``last_k`` is the newest stamp received on input ``k``. The
    general rule then applies: input ``k`` *could still cover* a window ending at ``M'`` if
    ``M' >= last_k - d + 1``. Let ``W`` be the smallest window end at which every input has a
    queued frame in ``[W - slop, W]`` or could still cover it. The candidate ``S`` is emitted
    when ``W == M`` (no earlier set can still form) and no input can still deliver a frame in
    ``[M - slop, f_k)`` (no earlier pick). With ``d = 0`` both always hold, as shown above.

max_sets: frames that can never match
    ``W`` bounds every set still possible from below, now and in the future, so a frame
    stamped below ``W - slop`` is dropped at once as ``unmatched``: e.g. when a camera skipped
    a tick, its next frame shows it, and the other cameras' frames of that tick go.

max_sets: optimality
    Under in-order arrival per input (or disorder within ``reorder_tolerance``) and queues
    that do not overflow, the emitted sets are exactly those of the rule applied offline to
    the whole streams, whatever the interleaving of the inputs, hence maximal in number.
    :meth:`flush` applies the rule as if no input will deliver another frame (it only has
    something to emit when ``reorder_tolerance > 0``).

max_sets: cost
    Each evaluation merges the N sorted queues and sweeps them once: O(N * Q * log N) time
    for N inputs with Q queued frames each, no product over queues. An arrival triggers one
    evaluation, plus one per set it releases.

Bounded queues, drops and time resets
    Each input keeps at most ``queue_size`` frames, sorted by stamp; on overflow the oldest one
    is dropped (``queue_full``; ``approximate_time`` counts the frames its search slid past
    too, as message_filters does). A frame not newer than the frame its input contributed to the
    last emitted set is dropped (``too_old``). When an input's stamp goes back by more than
    ``reset_threshold`` (bag loop, simulation restart) all queues are emptied (``time_reset``),
    the reset is counted and the synchronizer continues on the new timeline. Frames still in
    flight from the old timeline on other inputs (within ``reset_threshold`` of that input's
    last old stamp and more than ``reset_threshold`` ahead of the new timeline) are dropped as
    ``time_reset`` too, instead of triggering a second reset.

    Counters: :meth:`stats` returns a snapshot with the drops by reason (``queue_full``,
    ``too_old``, ``unmatched``, ``time_reset``), per-input ``received`` / ``used`` / drops /
    ``pending`` counts, the number of emitted ``sets`` and of ``resets``, and the cause of the
    latest reset (``last_reset``: the input whose stamp went back, from and to which stamp;
    input None for :meth:`reset`). Per input,
    ``received == used + sum(dropped) + pending`` holds at all times.

Threads
    All public methods take an internal lock, so callbacks on several executor threads may call
    :meth:`add` concurrently. The lock only covers the bookkeeping: sets are returned to the
    caller, no callback is invoked under it.
"""
from __future__ import annotations

import bisect
import math
import operator
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .approximate_time import ApproximateTimeMatcher

__all__ = ["SyncSet", "Synchronizer", "DROP_REASONS", "POLICIES", "default_slop_ns"]

DROP_REASONS: Tuple[str, ...] = ("queue_full", "too_old", "unmatched", "time_reset")
POLICIES: Tuple[str, ...] = ("approximate_time", "max_sets")


def default_slop_ns(rates_hz: Sequence[float]) -> int:
    """The default slop for cameras at ``rates_hz`` (frames/s): a third of the slowest one's
    frame period, in ns. E.g. 30 Hz -> 11.1 ms; 30 Hz with 10 Hz -> 33.3 ms."""
    rates = [float(r) for r in rates_hz]
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"expected frame rates must be finite and > 0, got {rates_hz!r}")
    return int(round(1e9 / min(rates) / 3))

_NEG_INF = float("-inf")


@dataclass(frozen=True, eq=False)
class SyncSet:
    """One synchronized set: per input (in input order) its stamp in ns and its item.

    Compared by identity (items are typically tensors); compare ``stamps`` for equality.
    """

    stamps: Tuple[int, ...]
    items: Tuple[Any, ...]

    @property
    def stamp(self) -> int:
        """Newest stamp of the set (ns): the stamp to publish the set's results with."""
        return max(self.stamps)

    @property
    def span(self) -> int:
        """``max(stamps) - min(stamps)`` in ns; never more than the synchronizer's slop."""
        return max(self.stamps) - min(self.stamps)

    def __len__(self) -> int:
        return len(self.stamps)


def _ns(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer number of nanoseconds (got {type(value).__name__}); "
            f"convert seconds with int(round(seconds * 1e9))") from None


class Synchronizer:
    """Match frames of ``num_inputs`` streams into :class:`SyncSet` s (see the module doc).

    Args:
        num_inputs: number of streams (cameras), at least 1.
        slop: largest allowed ``max - min`` of the stamps in a set, integer ns (inclusive).
        queue_size: frames kept per input; on overflow the oldest is dropped.
        reset_threshold: a stamp going back by more than this (ns) on any input resets the
            synchronizer; ``None`` disables the check.
        reorder_tolerance: how far (ns) an input's frames may arrive out of stamp order and
            still be matched optimally. 0 (the default) assumes in-order arrival per input;
            a positive value delays emission by up to that much.
        policy: ``"approximate_time"`` (default; message_filters' set choice: the tightest
            sets) or ``"max_sets"`` (the earliest set within slop: the most sets).
        inter_message_lower_bound: ``approximate_time`` only: least stamp difference between
            consecutive frames of an input (ns; one value for all inputs, or one per input).
            0 (the default) assumes nothing; a true positive bound lets sets out sooner.
    """

    def __init__(self, num_inputs: int, slop: int, queue_size: int = 10, *,
                 reset_threshold: Optional[int] = 1_000_000_000,
                 reorder_tolerance: int = 0, policy: str = "approximate_time",
                 inter_message_lower_bound: Union[int, Sequence[int]] = 0) -> None:
        num_inputs = operator.index(num_inputs)
        if num_inputs < 1:
            raise ValueError("num_inputs must be at least 1")
        slop = _ns(slop, "slop")
        if slop < 0:
            raise ValueError("slop must be >= 0")
        queue_size = operator.index(queue_size)
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if reset_threshold is not None:
            reset_threshold = _ns(reset_threshold, "reset_threshold")
            if reset_threshold < 0:
                raise ValueError("reset_threshold must be >= 0 (or None to disable)")
        reorder_tolerance = _ns(reorder_tolerance, "reorder_tolerance")
        if reorder_tolerance < 0:
            raise ValueError("reorder_tolerance must be >= 0")
        if reset_threshold is not None and reorder_tolerance > reset_threshold:
            raise ValueError("reorder_tolerance must not exceed reset_threshold")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if isinstance(inter_message_lower_bound, (list, tuple)):
            bounds = [_ns(b, "inter_message_lower_bound") for b in inter_message_lower_bound]
        else:
            bounds = [_ns(inter_message_lower_bound, "inter_message_lower_bound")] * num_inputs
        if len(bounds) != num_inputs or any(b < 0 for b in bounds):
            raise ValueError("inter_message_lower_bound must be >= 0, one value or one per input")
        self._policy = policy
        self._lower_bound = bounds
        self._n = num_inputs
        self._slop = slop
        self._queue_size = queue_size
        self._reset_threshold = reset_threshold
        self._tolerance = reorder_tolerance
        self._lock = threading.Lock()
        self._clear_counters()
        self._clear_timeline()

    # ----------------------------------------------------------------------------- properties
    @property
    def num_inputs(self) -> int:
        return self._n

    @property
    def slop(self) -> int:
        return self._slop

    @property
    def queue_size(self) -> int:
        return self._queue_size

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def reorder_tolerance(self) -> int:
        return self._tolerance

    @property
    def pending(self) -> Tuple[Tuple[int, ...], ...]:
        """Stamps queued per input (sorted), not yet part of a set."""
        with self._lock:
            return tuple(tuple(self._pending_stamps(k)) for k in range(self._n))

    @property
    def drops(self) -> Dict[str, int]:
        """Snapshot of the drop counters by reason (all inputs)."""
        with self._lock:
            return self._drop_totals()

    @property
    def resets(self) -> int:
        """Number of timeline resets so far (see ``last_reset`` in :meth:`stats` for the cause)."""
        with self._lock:
            return self._resets

    def last_stamp_ns(self, index: int) -> Optional[int]:
        """Newest stamp received on ``index`` since construction or the last reset, or None."""
        k = self._check_index(index)
        with self._lock:
            return self._last[k]

    # ----------------------------------------------------------------------------- public API
    def add(self, index: int, stamp_ns: int, item: Any) -> List[SyncSet]:
        """Queue a frame of input ``index``; return the sets it completes (oldest first)."""
        k = self._check_index(index)
        t = _ns(stamp_ns, "stamp_ns")
        with self._lock:
            self._received[k] += 1
            thr = self._reset_threshold
            last = self._last[k]
            if last is None:
                if self._is_straggler(k, t):
                    self._drop(k, "time_reset")
                    return []
            elif thr is not None and t < last - thr:
                self._time_reset()
                self._last_reset = {"input": k, "from_ns": last, "to_ns": t}
            used = self._last_used[k]
            if self._matcher is not None:
                passed = self._passed[k]
                if passed is not None and (used is None or passed > used):
                    used = passed
            if used is not None and t <= used:
                self._drop(k, "too_old")
                return []
            if self._last[k] is None or t > self._last[k]:
                self._last[k] = t
            if self._epoch_max is not None and t > self._epoch_max:
                self._epoch_max = t
            if self._matcher is not None:
                return self._hold_and_match(k, t, item)
            stamps, items = self._stamps[k], self._items[k]
            pos = bisect.bisect_right(stamps, t)
            stamps.insert(pos, t)
            items.insert(pos, item)
            if len(stamps) > self._queue_size:
                del stamps[0]
                del items[0]
                self._drop(k, "queue_full")
            return self._drain(final=False)

    def flush(self) -> List[SyncSet]:
        """Emit every set the queued frames allow, as if no input will deliver another frame.

        Frames that fit no set stay queued (a later frame may still complete them).
        """
        with self._lock:
            if self._matcher is not None:
                chosen = []
                for k in range(self._n):
                    chosen += self._pass_on(k, len(self._held[k]))
                return self._emit(chosen + self._matcher.finish())
            return self._drain(final=True)

    def reset(self, *, clear_stats: bool = False) -> None:
        """Forget the timeline (e.g. after the node saw the clock jump) and empty the queues.

        Queued frames are counted as ``time_reset`` drops and ``resets`` is incremented, unless
        ``clear_stats`` is set, which zeroes all counters instead.
        """
        with self._lock:
            if clear_stats:
                self._clear_counters()
                self._clear_timeline()
            else:
                self._time_reset()
                self._old_last = None
                self._epoch_max = None
                self._last_reset = {"input": None, "from_ns": None, "to_ns": None}

    def stats(self) -> Dict[str, Any]:
        """Snapshot of the counters (a fresh dict; safe to keep or mutate)."""
        with self._lock:
            return {
                "num_inputs": self._n,
                "sets": self._sets,
                "resets": self._resets,
                "drops": self._drop_totals(),
                "received": list(self._received),
                "used": list(self._used),
                "dropped": [dict(d) for d in self._dropped],
                "pending": [len(self._pending_stamps(k)) for k in range(self._n)],
                "last_stamp_ns": list(self._last),
                "last_reset": dict(self._last_reset) if self._last_reset else None,
            }

    # ----------------------------------------------------------------------------- internals
    def _check_index(self, index: int) -> int:
        k = operator.index(index)
        if not 0 <= k < self._n:
            raise IndexError(f"input index {k} out of range for {self._n} inputs")
        return k

    def _clear_counters(self) -> None:
        n = self._n
        self._received = [0] * n
        self._used = [0] * n
        self._dropped = [{r: 0 for r in DROP_REASONS} for _ in range(n)]
        self._sets = 0
        self._resets = 0
        # cause of the latest reset: the input whose stamp went back, from and to which stamp
        # (input None: reset() was called)
        self._last_reset: Optional[Dict[str, Any]] = None

    def _clear_timeline(self) -> None:
        n = self._n
        self._stamps: List[List[int]] = [[] for _ in range(n)]
        self._items: List[List[Any]] = [[] for _ in range(n)]
        self._last: List[Optional[int]] = [None] * n       # newest stamp received per input
        self._last_used: List[Optional[int]] = [None] * n  # stamp used in the last set
        self._old_last: Optional[List[Optional[int]]] = None  # per input, before the last reset
        self._epoch_max: Optional[float] = None             # newest stamp since that reset
        self._matcher: Optional[ApproximateTimeMatcher] = None
        if self._policy == "approximate_time":
            self._matcher = ApproximateTimeMatcher(n, self._slop, self._queue_size, self._drop,
                                                   self._lower_bound)
        self._held: List[List[Tuple[int, Any]]] = [[] for _ in range(n)]  # awaiting reorder
        self._passed: List[Optional[int]] = [None] * n  # newest stamp passed to the matcher

    def _drop(self, k: int, reason: str, count: int = 1) -> None:
        self._dropped[k][reason] += count

    def _drop_totals(self) -> Dict[str, int]:
        return {r: sum(d[r] for d in self._dropped) for r in DROP_REASONS}

    def _time_reset(self) -> None:
        """Empty the queues and start a new timeline (the caller adds the new frame)."""
        for k in range(self._n):
            queued = len(self._pending_stamps(k))
            if queued:
                self._drop(k, "time_reset", queued)
        old_last = list(self._last)
        self._clear_timeline()
        self._old_last = old_last
        self._epoch_max = _NEG_INF  # raised to the first stamp of the new timeline by add()
        self._resets += 1

    def _is_straggler(self, k: int, t: int) -> bool:
        """A frame of the timeline before the last reset, still in flight on input ``k``."""
        if self._old_last is None or self._reset_threshold is None:
            return False
        old = self._old_last[k]
        thr = self._reset_threshold
        return (old is not None and old - thr <= t <= old + thr
                and self._epoch_max is not None and t > self._epoch_max + thr)

    def _pending_stamps(self, k: int) -> List[int]:
        if self._matcher is None:
            return list(self._stamps[k])
        return sorted(self._matcher.stamps(k) + [t for t, _ in self._held[k]])

    # ---------------------------------------------------------------- approximate_time policy
    def _hold_and_match(self, k: int, t: int, item: Any) -> List[SyncSet]:
        """Hold the frame until input ``k`` is ``reorder_tolerance`` past it, then match it."""
        held = self._held[k]
        bisect.insort(held, (t, item), key=lambda f: f[0])
        final = 0
        while final < len(held) and held[final][0] <= self._last[k] - self._tolerance:
            final += 1
        final = max(final, len(held) - self._queue_size)  # bounded: pass the oldest on early
        return self._emit(self._pass_on(k, final))

    def _pass_on(self, k: int, count: int) -> List[Tuple[Tuple[int, Any], ...]]:
        """Give the ``count`` oldest held frames of input ``k`` to the matcher."""
        chosen = []
        frames, self._held[k] = self._held[k][:count], self._held[k][count:]
        for t, item in frames:
            self._passed[k] = t
            chosen += self._matcher.add(k, t, item)
        return chosen

    def _emit(self, chosen: List[Tuple[Tuple[int, Any], ...]]) -> List[SyncSet]:
        out = []
        for frames in chosen:
            for k, (t, _) in enumerate(frames):
                self._last_used[k] = t
                self._used[k] += 1
            self._sets += 1
            out.append(SyncSet(tuple(t for t, _ in frames), tuple(i for _, i in frames)))
        return out

    # ------------------------------------------------------------------------ max_sets policy
    def _scan(self, final: bool) -> Tuple[Optional[int], bool]:
        """Sweep window ends ``M'`` upwards over the merged queues.

        Input k is *covered* at ``M'`` if it has a queued frame in ``[M' - slop, M']`` or
        (unless ``final``) it may still deliver one there, i.e. ``M' >= wild_k`` with
        ``wild_k = last_k + 1 - reorder_tolerance``. Returns the first ``M'`` at which every
        input is covered (None if there is none) and whether queued frames alone cover it.
        Coverage only rises at a frame stamp or at a ``wild_k``, so those are the points to test.
        """
        n, slop = self._n, self._slop
        frames = sorted([(t, k) for k in range(n) for t in self._stamps[k]])
        if not frames:
            return None, False
        wild = [False] * n
        events = [(t, 1, k) for t, k in frames]
        covered = 0
        if not final:
            for k in range(n):
                last = self._last[k]
                if last is None:
                    wild[k] = True
                    covered += 1
                else:
                    events.append((last + 1 - self._tolerance, 0, k))
            events.sort()
        cnt = [0] * n
        known = 0
        lo, nf = 0, len(frames)
        i, e = 0, len(events)
        while i < e:
            x = events[i][0]
            while i < e and events[i][0] == x:
                _, kind, k = events[i]
                i += 1
                if kind == 0:
                    if not wild[k]:
                        wild[k] = True
                        if cnt[k] == 0:
                            covered += 1
                else:
                    if cnt[k] == 0:
                        known += 1
                        if not wild[k]:
                            covered += 1
                    cnt[k] += 1
            floor = x - slop
            while lo < nf and frames[lo][0] < floor:
                k = frames[lo][1]
                lo += 1
                cnt[k] -= 1
                if cnt[k] == 0:
                    known -= 1
                    if not wild[k]:
                        covered -= 1
            if covered == n:
                return x, known == n
        return None, False

    def _prune_below(self, floor: int) -> None:
        """Drop queued frames with a stamp below ``floor``: they fit no possible set."""
        for k in range(self._n):
            stamps = self._stamps[k]
            j = bisect.bisect_left(stamps, floor)
            if j:
                del stamps[:j]
                del self._items[k][:j]
                self._drop(k, "unmatched", j)

    def _drain(self, final: bool) -> List[SyncSet]:
        out: List[SyncSet] = []
        while True:
            first, complete = self._scan(final)
            if first is None:  # only when final: no set in the queues
                return out
            # No set, now or later, can have its newest stamp below `first`.
            floor = first - self._slop
            self._prune_below(floor)
            if not complete:
                return out
            # Every input's earliest frame in [first - slop, first] is now its queue head.
            if not final and self._tolerance:
                # A frame up to `tolerance` behind an input's newest one may still come; it
                # must not be able to land before the head inside the window.
                for k in range(self._n):
                    wild_k = self._last[k] + 1 - self._tolerance
                    if max(wild_k, floor) < self._stamps[k][0]:
                        return out
            stamps = []
            items = []
            for k in range(self._n):
                queue = self._stamps[k]
                t = queue.pop(0)
                stamps.append(t)
                items.append(self._items[k].pop(0))
                self._last_used[k] = t
                self._used[k] += 1
                dup = bisect.bisect_right(queue, t)  # same stamp again: not newer than used
                if dup:
                    del queue[:dup]
                    del self._items[k][:dup]
                    self._drop(k, "too_old", dup)
            self._sets += 1
            out.append(SyncSet(tuple(stamps), tuple(items)))
