"""The set choice of message_filters' ApproximateTime policy, on integer-ns stamps of N inputs.

Pure Python, no ROS import; used by :class:`qvl_ros.core.synchronizer.Synchronizer` for
``policy="approximate_time"``, which adds time resets, reordering and the counters around it.

The rule (the ROS 2 C++ policy's, age penalty 0)
    Frames of each input arrive in stamp order and wait in a per-input queue. Once every queue
    holds a frame, look at the queue heads:

    * Their spread ``max - min`` exceeds ``max_interval``: the oldest head can be in no set with
      the frames that follow, drop it and look again.
    * Otherwise the newest head is the *pivot*. The pivot's input does not get to be pivot when
      it lost a frame to a full queue since the heads last changed for it (a lost frame could
      have been a better match); then the oldest head is dropped as above.
    * The output set is the set of smallest spread among those that contain the pivot, one
      frame per input (the earliest such set on ties). Candidates are found by sliding a
      window's start over the heads in stamp order: for each start, every input contributes its
      first frame at or after it, and the window ends at the newest of these.
    * The set is emitted as soon as no frame still to come can beat it: when the sliding start
      reaches the pivot, when the window end already runs ``pivot - candidate start`` past the
      candidate's end (every later window is wider), or when a *virtual* search proves it. The
      virtual search assumes the best case for the inputs whose queue ran empty: their next
      frame comes at ``max(pivot, last + inter_message_lower_bound)``; if even then the slide
      finds no tighter set, none will come.
    * The frames of the set are used; frames of each input older than its frame in the set are
      dropped (never part of a later set: sets do not cross).

    The result depends on the stamps only, not on how the inputs interleave in arrival, and
    every set is the tightest available around its pivot. Compared to taking the earliest set
    within the slop (``policy="max_sets"``) it can produce fewer sets when ``max_interval``
    exceeds a frame period, and it waits for frames that may still tighten a set.

Queue overflow
    An input holds at most ``queue_size`` frames (waiting and slid past). On overflow the
    ongoing candidate search is cancelled, the oldest frame of that input is dropped, the input
    is barred from pivoting until its heads change, and the search restarts.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

__all__ = ["ApproximateTimeMatcher"]

Frame = Tuple[int, Any]  # (stamp ns, item)


class ApproximateTimeMatcher:
    """Incremental ApproximateTime set choice (see the module doc).

    Args:
        num_inputs: number of inputs.
        max_interval: largest spread of a set (ns, inclusive), the synchronizer's slop.
        queue_size: frames kept per input (waiting plus slid past).
        on_drop: ``on_drop(index, reason, count)`` for every frame dropped (``"unmatched"`` or
            ``"queue_full"``).
        inter_message_lower_bound: per input, the least stamp difference between consecutive
            frames (ns); 0 (the default) assumes nothing. A positive bound lets sets out sooner.
    """

    def __init__(self, num_inputs: int, max_interval: int, queue_size: int,
                 on_drop: Callable[[int, str, int], None],
                 inter_message_lower_bound: Optional[Sequence[int]] = None) -> None:
        self._n = num_inputs
        self._max_interval = max_interval
        self._queue_size = queue_size
        self._on_drop = on_drop
        bounds = [0] * num_inputs if inter_message_lower_bound is None else list(inter_message_lower_bound)
        if len(bounds) != num_inputs or any(b < 0 for b in bounds):
            raise ValueError("inter_message_lower_bound needs one value >= 0 per input")
        self._lower_bound = bounds
        self._waiting: List[Deque[Frame]] = [deque() for _ in range(num_inputs)]
        self._past: List[List[Frame]] = [[] for _ in range(num_inputs)]
        self._lost_frame = [False] * num_inputs  # may not pivot (queue overflow)
        self._forget_candidate()

    # ------------------------------------------------------------------------------ public
    def add(self, k: int, stamp: int, item: Any) -> List[Tuple[Frame, ...]]:
        """Append a frame to input ``k`` (stamps per input must increase); return new sets."""
        waiting = self._waiting[k]
        waiting.append((stamp, item))
        out = self._process(final=False) if len(waiting) == 1 else []
        if len(waiting) + len(self._past[k]) > self._queue_size:
            self._restore_past()
            waiting.popleft()
            self._on_drop(k, "queue_full", 1)
            self._lost_frame[k] = True
            if self._pivot is not None:
                self._forget_candidate()
                out += self._process(final=False)
        return out

    def finish(self) -> List[Tuple[Frame, ...]]:
        """Emit what the queued frames allow if no input delivers another frame."""
        return self._process(final=True)

    def counts(self) -> List[int]:
        """Frames held per input."""
        return [len(w) + len(p) for w, p in zip(self._waiting, self._past)]

    def stamps(self, k: int) -> List[int]:
        """Stamps held by input ``k``, oldest first."""
        return [t for t, _ in self._past[k]] + [t for t, _ in self._waiting[k]]

    def clear(self) -> List[int]:
        """Forget every frame; returns how many each input held."""
        held = self.counts()
        for w, p in zip(self._waiting, self._past):
            w.clear()
            p.clear()
        self._lost_frame = [False] * self._n
        self._forget_candidate()
        return held

    # ----------------------------------------------------------------------------- search
    def _forget_candidate(self) -> None:
        self._pivot: Optional[int] = None
        self._pivot_time = 0
        self._candidate: Optional[Tuple[Frame, ...]] = None
        self._cand_start = 0
        self._cand_end = 0

    def _heads(self) -> Tuple[int, int, int, int]:
        """(oldest index, oldest stamp, newest index, newest stamp) of the queue heads.

        Ties: the oldest is the first input holding it, the newest the last one.
        """
        first = self._waiting[0][0][0]
        lo_k, lo_t, hi_k, hi_t = 0, first, 0, first
        for k in range(1, self._n):
            t = self._waiting[k][0][0]
            if t < lo_t:
                lo_k, lo_t = k, t
            if t >= hi_t:
                hi_k, hi_t = k, t
        return lo_k, lo_t, hi_k, hi_t

    def _process(self, final: bool) -> List[Tuple[Frame, ...]]:
        out: List[Tuple[Frame, ...]] = []
        while True:
            if not all(self._waiting):
                # A candidate waits for frames that may still tighten it; with none to come
                # (final) it is the best there is.
                if self._pivot is not None and final:
                    out.append(self._emit())
                    continue
                return out
            lo_k, lo_t, hi_k, hi_t = self._heads()
            for k in range(self._n):
                if k != hi_k:
                    self._lost_frame[k] = False  # a lost frame of k is older than any choice now
            if self._pivot is None:
                if hi_t - lo_t > self._max_interval or self._lost_frame[hi_k]:
                    self._waiting[lo_k].popleft()
                    self._on_drop(lo_k, "unmatched", 1)
                    continue
                self._take_candidate(lo_t, hi_t)
                self._pivot, self._pivot_time = hi_k, hi_t
            elif hi_t - lo_t < self._cand_end - self._cand_start:
                self._take_candidate(lo_t, hi_t)
            self._slide(lo_k)
            if lo_k == self._pivot or hi_t - self._cand_end >= self._pivot_time - self._cand_start:
                out.append(self._emit())
            elif not all(self._waiting) and not final and self._proven_by_bounds():
                out.append(self._emit())

    def _take_candidate(self, start: int, end: int) -> None:
        """The heads become the candidate; frames slid past before are in no better set."""
        self._candidate = tuple(w[0] for w in self._waiting)
        self._cand_start, self._cand_end = start, end
        for k, past in enumerate(self._past):
            if past:
                self._on_drop(k, "unmatched", len(past))
                past.clear()

    def _slide(self, k: int) -> None:
        self._past[k].append(self._waiting[k].popleft())

    def _virtual_time(self, k: int) -> int:
        if self._waiting[k]:
            return self._waiting[k][0][0]
        return max(self._past[k][-1][0] + self._lower_bound[k], self._pivot_time)

    def _proven_by_bounds(self) -> bool:
        """Slide on with the earliest possible next frames of the empty queues. True when the
        candidate is proven optimal; otherwise the virtual slides are undone."""
        moved = [0] * self._n
        while True:
            times = [self._virtual_time(k) for k in range(self._n)]
            end = max(times)
            start = min(times)
            if end - self._cand_end >= self._pivot_time - self._cand_start:
                return True
            if end - start < self._cand_end - self._cand_start:
                for k, m in enumerate(moved):  # a better set may still come: wait
                    for _ in range(m):
                        self._waiting[k].appendleft(self._past[k].pop())
                return False
            k = times.index(start)  # an input with a real frame: its stamp is below the pivot
            self._slide(k)
            moved[k] += 1

    def _emit(self) -> Tuple[Frame, ...]:
        """Hand out the candidate; its frames are used, the frames slid past it go back."""
        chosen = self._candidate
        assert chosen is not None
        self._restore_past()
        for k, frame in enumerate(chosen):
            head = self._waiting[k].popleft()
            assert head[0] == frame[0]
        self._forget_candidate()
        return chosen

    def _restore_past(self) -> None:
        for w, p in zip(self._waiting, self._past):
            w.extendleft(reversed(p))
            p.clear()
