"""Tests of qvl_ros.core.synchronizer's ``max_sets`` policy: adversarial timing cases plus an
exhaustive oracle. (The default ``approximate_time`` policy: test_sync_policy.py.)

The oracle (`brute_max_sets`) is an independent search over every choice of frames: the
largest number of disjoint sets, one frame per camera within slop, each camera's frames used in
stamp order. The synchronizer, fed the same frames in any interleaving of the cameras (each
camera in its own stamp order) and flushed at the end, must reach that number.
"""
import functools
import itertools
import random
import threading
import time

import pytest

from qvl_ros.core.synchronizer import DROP_REASONS, Synchronizer, SyncSet

# Every test here encodes the max_sets rule (earliest set within slop, emitted at once).
MaxSets = functools.partial(Synchronizer, policy="max_sets")

MS = 1_000_000
SEC = 1_000_000_000


# ----------------------------------------------------------------------------------- helpers
def feed(sync, arrivals):
    """Add (index, stamp, item) triples in order; return [(arrival position, SyncSet)]."""
    out = []
    for pos, (k, t, item) in enumerate(arrivals):
        for s in sync.add(k, t, item):
            out.append((pos, s))
    return out


def frame(k, t):
    return (k, t, ("frame", k, t))


def check_sets(sets, num_inputs, slop):
    """Each set in slop with one frame per input; per input strictly increasing; items unique."""
    seen = set()
    prev = None
    for s in sets:
        assert isinstance(s, SyncSet)
        assert len(s.stamps) == len(s.items) == num_inputs
        assert s.span <= slop
        assert max(s.stamps) - min(s.stamps) == s.span
        assert s.stamp == max(s.stamps)
        for k, (t, item) in enumerate(zip(s.stamps, s.items)):
            assert item == ("frame", k, t), "item does not belong to its stamp/input"
            assert item not in seen, "frame used twice"
            seen.add(item)
        if prev is not None:
            assert all(a < b for a, b in zip(prev.stamps, s.stamps)), "sets out of stamp order"
            assert prev.stamp < s.stamp
        prev = s


def check_accounting(sync):
    st = sync.stats()
    for k in range(st["num_inputs"]):
        assert st["received"][k] == (st["used"][k] + sum(st["dropped"][k].values())
                                     + st["pending"][k])
    assert st["drops"] == {r: sum(d[r] for d in st["dropped"]) for r in DROP_REASONS}
    assert all(u == st["sets"] for u in st["used"])


def brute_max_sets(streams, slop):
    """Maximum number of disjoint in-slop sets, per-camera stamp order (exhaustive search)."""
    n = len(streams)

    @functools.lru_cache(maxsize=None)
    def best(state):
        result = 0
        choices = [range(state[k], len(streams[k])) for k in range(n)]
        for combo in itertools.product(*choices):
            ts = [streams[k][i] for k, i in enumerate(combo)]
            if max(ts) - min(ts) <= slop:
                result = max(result, 1 + best(tuple(i + 1 for i in combo)))
        return result

    return best(tuple([0] * n))


def feasible_sets(pending, slop):
    """Every choice of one pending stamp per input within slop (small inputs only)."""
    return [c for c in itertools.product(*pending) if max(c) - min(c) <= slop]


def random_interleaving(rng, streams):
    """All frames, each camera in stamp order, cameras interleaved at random."""
    order = [k for k, s in enumerate(streams) for _ in s]
    rng.shuffle(order)
    pos = [0] * len(streams)
    out = []
    for k in order:
        out.append(frame(k, streams[k][pos[k]]))
        pos[k] += 1
    return out


def arrivals_by_latency(rng, streams, base_delay, jitter_delay):
    """Arrival order from per-frame transport latency; each camera keeps its own order."""
    events = []
    for k, stamps in enumerate(streams):
        arrival = None
        for t in stamps:
            a = t + base_delay[k] + rng.randint(0, jitter_delay)
            arrival = a if arrival is None else max(a, arrival)
            events.append((arrival, k, t))
    events.sort()
    return [frame(k, t) for _, k, t in events]


def ticks(n_ticks, period, jitter, rng, offset=0):
    return [offset + i * period + rng.randint(-jitter, jitter) for i in range(n_ticks)]


# ------------------------------------------------------------------------------ basic cases
def test_jitter_equal_rates_one_set_per_tick_without_delay():
    rng = random.Random(1)
    n, n_ticks = 3, 200
    streams = [ticks(n_ticks, 100 * MS, 5 * MS, rng, offset=10 * SEC) for _ in range(n)]
    arrivals = arrivals_by_latency(rng, streams, [2 * MS, 15 * MS, 40 * MS], 30 * MS)
    sync = MaxSets(n, slop=20 * MS, queue_size=10)
    out = feed(sync, arrivals)
    sets = [s for _, s in out]
    check_sets(sets, n, 20 * MS)
    assert [s.stamps for s in sets] == [tuple(st[i] for st in streams) for i in range(n_ticks)]
    # Each set comes out of the add() call of the last of its frames to arrive.
    last_arrival = {}
    for pos, (k, t, _) in enumerate(arrivals):
        last_arrival[t] = pos
    for pos, s in out:
        assert pos == max(last_arrival[t] for t in s.stamps)
    st = sync.stats()
    assert st["sets"] == n_ticks and st["drops"] == {r: 0 for r in DROP_REASONS}
    check_accounting(sync)


def test_mixed_rates_one_set_per_slow_frame():
    rng = random.Random(2)
    fast = [round(i * SEC / 30) + rng.randint(-2 * MS, 2 * MS) for i in range(300)]
    slow = [i * 100 * MS + rng.randint(-2 * MS, 2 * MS) for i in range(100)]
    mid = [i * 50 * MS + rng.randint(-2 * MS, 2 * MS) for i in range(200)]
    streams = [fast, slow, mid]
    arrivals = arrivals_by_latency(rng, streams, [5 * MS, 30 * MS, 10 * MS], 10 * MS)
    sync = MaxSets(3, slop=20 * MS, queue_size=10)
    out = feed(sync, arrivals)
    sets = [s for _, s in out] + sync.flush()
    check_sets(sets, 3, 20 * MS)
    assert [s.stamps[1] for s in sets] == slow
    for i, s in enumerate(sets):
        assert s.stamps[0] == fast[3 * i] and s.stamps[2] == mid[2 * i]
    st = sync.stats()
    assert st["drops"]["unmatched"] == (300 - 100) + (200 - 100) - sum(st["pending"])
    assert st["drops"]["queue_full"] == st["drops"]["too_old"] == 0
    check_accounting(sync)


def test_dropped_frames_skip_only_their_tick():
    rng = random.Random(3)
    n, n_ticks, missing = 3, 30, {3, 7, 8}
    streams = [ticks(n_ticks, 100 * MS, 5 * MS, rng) for _ in range(n)]
    streams[1] = [t for i, t in enumerate(streams[1]) if i not in missing]
    arrivals = arrivals_by_latency(rng, streams, [0, 0, 0], 20 * MS)
    sync = MaxSets(n, slop=20 * MS)
    out = feed(sync, arrivals)
    sets = [s for _, s in out]
    check_sets(sets, n, 20 * MS)
    expected = [i for i in range(n_ticks) if i not in missing]
    assert [s.stamps[0] for s in sets] == [streams[0][i] for i in expected]
    # No set waits for the next tick: each comes out when its last frame arrives.
    last_arrival = {(k, t): pos for pos, (k, t, _) in enumerate(arrivals)}
    for pos, s in out:
        assert pos == max(last_arrival[(k, t)] for k, t in enumerate(s.stamps))
    assert sync.stats()["drops"]["unmatched"] == 2 * len(missing)
    check_accounting(sync)


@pytest.mark.parametrize("lag_periods", [1, 4, 7])
def test_late_camera_within_queue_size(lag_periods):
    rng = random.Random(4)
    n, n_ticks = 3, 40
    streams = [ticks(n_ticks, 100 * MS, 5 * MS, rng) for _ in range(n)]
    delays = [0, 0, lag_periods * 100 * MS]
    arrivals = arrivals_by_latency(rng, streams, delays, 10 * MS)
    sync = MaxSets(n, slop=20 * MS, queue_size=lag_periods + 2)
    sets = [s for _, s in feed(sync, arrivals)]
    check_sets(sets, n, 20 * MS)
    assert len(sets) == n_ticks
    assert sync.stats()["drops"] == {r: 0 for r in DROP_REASONS}
    check_accounting(sync)


def test_late_camera_beyond_queue_size_drops_oldest():
    rng = random.Random(5)
    n, n_ticks, lag = 2, 40, 6
    streams = [ticks(n_ticks, 100 * MS, 5 * MS, rng) for _ in range(n)]
    arrivals = arrivals_by_latency(rng, streams, [0, lag * 100 * MS], 0)
    sync = MaxSets(n, slop=20 * MS, queue_size=3)
    sets = [s for _, s in feed(sync, arrivals)] + sync.flush()
    check_sets(sets, n, 20 * MS)
    st = sync.stats()
    assert st["drops"]["queue_full"] > 0
    assert 0 < len(sets) < n_ticks
    check_accounting(sync)


def test_out_of_order_across_cameras_same_result():
    rng = random.Random(6)
    n, n_ticks = 4, 50
    streams = [ticks(n_ticks, 50 * MS, 8 * MS, rng) for _ in range(n)]
    reference = None
    for _ in range(20):
        sync = MaxSets(n, slop=20 * MS, queue_size=n_ticks)
        sets = [s for _, s in feed(sync, random_interleaving(rng, streams))] + sync.flush()
        check_sets(sets, n, 20 * MS)
        check_accounting(sync)
        stamps = [s.stamps for s in sets]
        if reference is None:
            reference = stamps
        assert stamps == reference


def test_out_of_order_within_camera_with_reorder_tolerance():
    rng = random.Random(7)
    n, n_ticks = 3, 60
    streams = [ticks(n_ticks, 100 * MS, 5 * MS, rng) for _ in range(n)]
    # Camera 2 delivers its frames up to 250 ms out of order.
    tol = 250 * MS
    cam2 = sorted(streams[2], key=lambda t: t + rng.randrange(tol))
    others = [frame(k, t) for i in range(n_ticks) for k, t in ((0, streams[0][i]),
                                                              (1, streams[1][i]))]
    arrivals = []
    j = 0
    for i, f in enumerate(others):
        arrivals.append(f)
        if i % 2 == 1:
            arrivals.append(frame(2, cam2[j]))
            j += 1
    assert cam2 != sorted(cam2)
    sync = MaxSets(n, slop=20 * MS, queue_size=10, reorder_tolerance=tol)
    sets = [s for _, s in feed(sync, arrivals)] + sync.flush()
    check_sets(sets, n, 20 * MS)
    assert len(sets) == n_ticks
    check_accounting(sync)
    # Without the tolerance the sets stay valid, only frames are lost.
    sync = MaxSets(n, slop=20 * MS, queue_size=10)
    sets = [s for _, s in feed(sync, arrivals)] + sync.flush()
    check_sets(sets, n, 20 * MS)
    assert len(sets) < n_ticks
    assert sync.stats()["drops"]["too_old"] + sync.stats()["drops"]["unmatched"] > 0
    check_accounting(sync)


# --------------------------------------------------------------------------- time going back
def bag(rng, n, n_ticks, start):
    return [ticks(n_ticks, 100 * MS, 3 * MS, rng, offset=start) for _ in range(n)]


def test_time_going_backwards_bag_loop():
    rng = random.Random(8)
    n, n_ticks = 3, 20
    first = bag(rng, n, n_ticks, 100 * SEC)
    second = bag(rng, n, n_ticks, 100 * SEC)  # loop: the same time range again
    sync = MaxSets(n, slop=20 * MS)
    arrivals = [frame(k, s[k][i]) for s in (first, second)
                for i in range(n_ticks) for k in range(n)]
    sets = [s for _, s in feed(sync, arrivals)]
    assert len(sets) == 2 * n_ticks
    check_sets(sets[:n_ticks], n, 20 * MS)
    check_sets(sets[n_ticks:], n, 20 * MS)
    st = sync.stats()
    assert st["resets"] == 1 and st["drops"]["time_reset"] == 0
    assert sync.last_stamp_ns(0) == second[0][-1]
    check_accounting(sync)


def test_bag_loop_with_old_frames_still_in_flight():
    rng = random.Random(9)
    n, n_ticks = 3, 20
    first = bag(rng, n, n_ticks, 5 * SEC)
    second = bag(rng, n, n_ticks, 0)
    arrivals = [frame(k, first[k][i]) for i in range(n_ticks - 1) for k in range(n)]
    # Camera 0's first frame of the new loop overtakes the last frames of cameras 1 and 2.
    arrivals += [frame(0, first[0][-1]), frame(0, second[0][0]),
                 frame(1, first[1][-1]), frame(2, first[2][-1]),
                 frame(1, second[1][0]), frame(2, second[2][0])]
    arrivals += [frame(k, second[k][i]) for i in range(1, n_ticks) for k in range(n)]
    sync = MaxSets(n, slop=20 * MS)
    sets = [s for _, s in feed(sync, arrivals)]
    st = sync.stats()
    assert st["resets"] == 1  # the stragglers do not trigger a second reset
    assert len(sets) == 2 * n_ticks - 1  # only the tick cut by the loop is lost
    assert [s.stamps for s in sets[n_ticks - 1:]] == [tuple(second[k][i] for k in range(n))
                                                       for i in range(n_ticks)]
    assert st["drops"]["time_reset"] == 3  # cam 0's queued old frame + two stragglers
    check_accounting(sync)


def test_single_glitched_stamp_recovers():
    n = 3
    sync = MaxSets(n, slop=20 * MS)
    sets = []
    t0 = 1000 * SEC
    for i in range(10):
        for k in range(n):
            sets += sync.add(k, t0 + i * 100 * MS, ("frame", k, t0 + i * 100 * MS))
    sets += sync.add(1, 3 * SEC, ("frame", 1, 3 * SEC))  # one bogus stamp far in the past
    for i in range(10, 20):
        for k in range(n):
            sets += sync.add(k, t0 + i * 100 * MS, ("frame", k, t0 + i * 100 * MS))
    st = sync.stats()
    assert st["resets"] == 1
    assert len(sets) >= 18  # at most the tick of the glitch and the next one are lost
    assert sets[-1].stamps == (t0 + 19 * 100 * MS,) * n
    check_accounting(sync)


def test_small_backward_step_is_not_a_reset():
    sync = MaxSets(2, slop=10 * MS, reset_threshold=SEC)
    assert len(sync.add(0, 5 * SEC, ("frame", 0, 5 * SEC))) == 0
    assert len(sync.add(1, 5 * SEC, ("frame", 1, 5 * SEC))) == 1
    assert sync.add(0, 5 * SEC - 500 * MS, ("frame", 0, 5 * SEC - 500 * MS)) == []
    st = sync.stats()
    assert st["resets"] == 0 and st["drops"]["too_old"] == 1
    # Disabled detection: even a large step back is only an old frame.
    sync = MaxSets(2, slop=10 * MS, reset_threshold=None)
    sync.add(0, 5 * SEC, None)
    sync.add(1, 5 * SEC, None)
    sync.add(0, 0, None)
    assert sync.stats()["resets"] == 0 and sync.stats()["drops"]["too_old"] == 1


# ----------------------------------------------------------------------- queues and slop edge
def test_queue_overflow_counts_and_keeps_newest():
    sync = MaxSets(2, slop=10 * MS, queue_size=10)
    for i in range(15):
        assert sync.add(0, i * 100 * MS, ("frame", 0, i * 100 * MS)) == []
    st = sync.stats()
    assert st["drops"]["queue_full"] == 5 and st["pending"] == [10, 0]
    assert sync.pending[0] == tuple(i * 100 * MS for i in range(5, 15))
    sets = sync.add(1, 1203 * MS, ("frame", 1, 1203 * MS))
    assert [s.stamps for s in sets] == [(1200 * MS, 1203 * MS)]
    st = sync.stats()
    assert st["drops"]["unmatched"] == 7  # 500 .. 1100 ms can no longer find a partner
    assert st["pending"] == [2, 0]
    check_accounting(sync)


def test_frames_that_can_no_longer_match_are_dropped_at_once():
    sync = MaxSets(3, slop=10 * MS)
    sync.add(0, 100 * MS, None)
    sync.add(2, 104 * MS, None)
    sync.add(0, 200 * MS, None)
    assert sync.pending == ((100 * MS, 200 * MS), (), (104 * MS,))  # camera 1 may still come
    # Camera 1 skipped those ticks: its newer frame proves nothing older can be matched.
    assert sync.add(1, 300 * MS, None) == []
    assert sync.pending == ((), (300 * MS,), ())
    assert sync.stats()["drops"]["unmatched"] == 3
    check_accounting(sync)


def test_each_frame_used_at_most_once():
    sync = MaxSets(2, slop=10 * MS)
    out = sync.add(0, 100 * MS, ("frame", 0, 100 * MS))
    out += sync.add(1, 95 * MS, ("frame", 1, 95 * MS))
    out += sync.add(1, 105 * MS, ("frame", 1, 105 * MS))
    out += sync.add(1, 108 * MS, ("frame", 1, 108 * MS))
    out += sync.flush()
    assert [s.stamps for s in out] == [(100 * MS, 95 * MS)]
    assert sync.pending == ((), (105 * MS, 108 * MS))
    # A later camera-0 frame uses the next camera-1 frame, not the one already used.
    out = sync.add(0, 109 * MS, ("frame", 0, 109 * MS)) + sync.flush()
    assert [s.stamps for s in out] == [(109 * MS, 105 * MS)]
    check_accounting(sync)


def test_frame_older_than_last_set_is_too_old():
    sync = MaxSets(2, slop=10 * MS)
    sync.add(0, 100 * MS, None)
    assert len(sync.add(1, 100 * MS, None)) == 1
    assert sync.add(0, 100 * MS, None) == []  # same stamp again
    assert sync.add(1, 90 * MS, None) == []
    assert sync.stats()["drops"]["too_old"] == 2


def test_slop_boundary_is_inclusive():
    slop = 20 * MS
    sync = MaxSets(3, slop=slop)
    sync.add(0, SEC, None)
    sync.add(1, SEC + slop, None)
    sets = sync.add(2, SEC + slop // 2, None)
    assert len(sets) == 1 and sets[0].span == slop
    sync = MaxSets(2, slop=slop)
    sync.add(0, SEC, None)
    assert sync.add(1, SEC + slop + 1, None) == [] and sync.flush() == []
    sync = MaxSets(2, slop=0)
    sync.add(0, SEC, None)
    assert len(sync.add(1, SEC, None)) == 1


def test_single_input_emits_every_frame_at_once():
    sync = MaxSets(1, slop=0, queue_size=1)
    for i in range(20):
        sets = sync.add(0, i * MS, ("frame", 0, i * MS))
        assert [s.stamps for s in sets] == [(i * MS,)]
    assert sync.add(0, 3 * MS, None) == []  # older than the last set
    st = sync.stats()
    assert st["sets"] == 20 and st["drops"]["too_old"] == 1
    check_accounting(sync)


def test_six_cameras():
    rng = random.Random(10)
    n, n_ticks = 6, 100
    streams = [ticks(n_ticks, 100 * MS, 6 * MS, rng) for _ in range(n)]
    streams[4] = [t for i, t in enumerate(streams[4]) if i % 17 != 5]  # a few missing
    arrivals = arrivals_by_latency(rng, streams, [0, 5 * MS, 10 * MS, 20 * MS, 0, 60 * MS],
                                   40 * MS)
    sync = MaxSets(n, slop=25 * MS, queue_size=8)
    sets = [s for _, s in feed(sync, arrivals)]
    check_sets(sets, n, 25 * MS)
    assert len(sets) == len(streams[4])
    check_accounting(sync)


# ------------------------------------------------------------------ exhaustive random oracle
def random_streams(rng, n, max_frames, horizon):
    return [sorted(rng.sample(range(horizon), rng.randint(0, max_frames))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_matches_exhaustive_optimum_for_any_interleaving(seed):
    rng = random.Random(100 + seed)
    for _ in range(60):
        n = rng.randint(1, 3)
        slop = rng.choice([0, 2, 5, 9, 16])
        streams = random_streams(rng, n, 5, 40)
        optimum = brute_max_sets(streams, slop)
        reference = None
        for _ in range(3):
            sync = MaxSets(n, slop=slop, queue_size=16)
            arrivals = random_interleaving(rng, streams)
            sets = []
            for k, t, item in arrivals:
                sets += sync.add(k, t, item)
                # With in-order arrival per camera no later frame can beat the earliest set
                # the queues hold, so no set is ever left waiting in them.
                assert feasible_sets(sync.pending, slop) == [], (streams, slop, arrivals)
            assert sync.flush() == []
            check_sets(sets, n, slop)
            check_accounting(sync)
            assert len(sets) == optimum, (streams, slop, arrivals)
            stamps = [s.stamps for s in sets]
            if reference is None:
                reference = stamps
            assert stamps == reference, "result depends on the interleaving of the cameras"


@pytest.mark.parametrize("seed", range(4))
def test_matches_exhaustive_optimum_with_reordered_arrivals(seed):
    rng = random.Random(200 + seed)
    for _ in range(60):
        n = rng.randint(2, 3)
        slop = rng.choice([0, 3, 8])
        tol = rng.choice([1, 4, 10])
        streams = random_streams(rng, n, 5, 40)
        # Each camera delivers frames at most `tol` out of stamp order.
        per_cam = [sorted(s, key=lambda t: (t + rng.randrange(tol))) for s in streams]
        order = [k for k, s in enumerate(per_cam) for _ in s]
        rng.shuffle(order)
        pos = [0] * n
        arrivals = []
        for k in order:
            arrivals.append(frame(k, per_cam[k][pos[k]]))
            pos[k] += 1
        sync = MaxSets(n, slop=slop, queue_size=16, reorder_tolerance=tol)
        sets = [s for _, s in feed(sync, arrivals)] + sync.flush()
        check_sets(sets, n, slop)
        check_accounting(sync)
        assert len(sets) == brute_max_sets(streams, slop), (streams, slop, tol, arrivals)


@pytest.mark.parametrize("seed", range(3))
def test_random_stress_invariants(seed):
    """Bigger streams, small queues, duplicates, backward steps: invariants always hold."""
    rng = random.Random(300 + seed)
    for _ in range(20):
        n = rng.randint(1, 5)
        slop = rng.randint(0, 30)
        sync = MaxSets(n, slop=slop, queue_size=rng.randint(1, 6), reset_threshold=500)
        t = [0] * n
        sets = []
        for serial in range(300):
            k = rng.randrange(n)
            t[k] += rng.randint(-40, 60) if rng.random() > 0.01 else -2000
            sets += sync.add(k, t[k], (k, t[k], serial))
            check_accounting(sync)
        for s in sets:
            assert s.span <= slop and len(s.stamps) == n
            assert all(item[:2] == (k, st) for k, (st, item) in enumerate(zip(s.stamps, s.items)))
        items = [i for s in sets for i in s.items]
        assert len(items) == len(set(items))


# ----------------------------------------------------------------------- API and behaviour
def test_stats_reset_and_validation():
    sync = MaxSets(2, slop=10 * MS, queue_size=4)
    assert sync.num_inputs == 2 and sync.slop == 10 * MS and sync.queue_size == 4
    assert sync.last_stamp_ns(0) is None
    sync.add(0, SEC, None)
    sync.add(1, SEC, None)
    sync.add(0, 2 * SEC, None)
    st = sync.stats()
    assert set(st) == {"num_inputs", "sets", "resets", "drops", "received", "used", "dropped",
                       "pending", "last_stamp_ns", "last_reset"}
    assert set(st["drops"]) == set(DROP_REASONS) == {"queue_full", "too_old", "unmatched",
                                                     "time_reset"}
    assert st["received"] == [2, 1] and st["used"] == [1, 1] and st["pending"] == [1, 0]
    assert st["last_stamp_ns"] == [2 * SEC, SEC]
    st["drops"]["too_old"] = 99  # a snapshot: mutating it changes nothing
    assert sync.drops["too_old"] == 0
    sync.reset()
    st = sync.stats()
    assert st["resets"] == 1 and st["drops"]["time_reset"] == 1 and st["pending"] == [0, 0]
    assert sync.last_stamp_ns(0) is None
    assert len(sync.add(0, 0, None) + sync.add(1, 0, None)) == 1  # new timeline accepted
    sync.reset(clear_stats=True)
    assert sync.stats()["received"] == [0, 0] and sync.stats()["sets"] == 0
    with pytest.raises(TypeError, match="nanoseconds"):
        sync.add(0, 1.5, None)
    with pytest.raises(TypeError, match="nanoseconds"):
        MaxSets(2, slop=0.02)
    with pytest.raises(IndexError):
        sync.add(2, 0, None)
    with pytest.raises(ValueError):
        MaxSets(0, slop=0)
    with pytest.raises(ValueError):
        MaxSets(2, slop=-1)
    with pytest.raises(ValueError):
        MaxSets(2, slop=0, queue_size=0)


def test_reorder_tolerance_holds_sets_and_flush_releases_them():
    sync = MaxSets(3, slop=10 * MS, reorder_tolerance=5 * MS)
    sync.add(0, 100 * MS, None)
    sync.add(1, 100 * MS, None)
    # Cameras 0 and 1 may still deliver frames down to 95 ms + 1 ns, and camera 2 one down to
    # 90 ms + 1 ns: an earlier set could still form, so the set waits.
    assert sync.add(2, 95 * MS, None) == []
    assert [s.stamps for s in sync.flush()] == [(100 * MS, 100 * MS, 95 * MS)]
    sync.add(0, 200 * MS, None)
    assert sync.flush() == []
    assert sync.pending == ((200 * MS,), (), ())  # kept: a partner may still come
    sync.add(1, 203 * MS, None)
    assert sync.add(2, 205 * MS, None) == []
    # Once every camera is past the window by more than the tolerance, it is released.
    sync.add(0, 300 * MS, None)
    sync.add(1, 300 * MS, None)
    sets = sync.add(2, 300 * MS, None)
    assert [s.stamps for s in sets] == [(200 * MS, 203 * MS, 205 * MS)]
    assert [s.stamps for s in sync.flush()] == [(300 * MS,) * 3]
    # Without a tolerance the same frames are matched at once and flush has nothing to do.
    sync = MaxSets(3, slop=10 * MS)
    sync.add(0, 100 * MS, None)
    sync.add(1, 100 * MS, None)
    assert len(sync.add(2, 95 * MS, None)) == 1 and sync.flush() == []


def test_reorder_tolerance_waits_for_an_earlier_pick():
    """The set is complete and no earlier set can form, yet a late frame may still be a better
    (earlier) pick for it, which leaves the later frame for the next set."""
    sync = MaxSets(2, slop=10, reorder_tolerance=5)
    assert sync.add(1, 100, None) == [] and sync.add(1, 104, None) == []
    assert sync.add(0, 95, None) == []  # camera 0 may still deliver 91..94
    assert sync.add(0, 92, None) == []  # ... and still 91
    assert [s.stamps for s in sync.add(0, 110, None)] == [(92, 100)]
    assert [s.stamps for s in sync.add(1, 120, None)] == [(95, 104)]
    # In-order assumption violated without a tolerance: the late frame is lost, and a set too.
    sync = MaxSets(2, slop=10)
    sync.add(1, 100, None)
    sync.add(1, 104, None)
    assert [s.stamps for s in sync.add(0, 95, None)] == [(95, 100)]
    assert sync.add(0, 92, None) == [] and sync.stats()["drops"]["too_old"] == 1


def test_concurrent_adds_from_threads():
    n, n_ticks = 4, 300
    sync = MaxSets(n, slop=10 * MS, queue_size=n_ticks)
    results = []
    lock = threading.Lock()

    def camera(k):
        for i in range(n_ticks):
            t = i * 100 * MS + k * MS
            out = sync.add(k, t, ("frame", k, t))
            with lock:
                results.extend(out)

    threads = [threading.Thread(target=camera, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results.sort(key=lambda s: s.stamp)
    check_sets(results, n, 10 * MS)
    assert len(results) == n_ticks
    check_accounting(sync)


def test_cost_is_not_a_product_over_queues():
    """8 inputs x 40 queued frames with one silent input: a product search would never end."""
    n, q = 8, 40
    sync = MaxSets(n, slop=30 * MS, queue_size=q)
    start = time.perf_counter()
    for i in range(q * 2):
        for k in range(n - 1):
            sync.add(k, i * 10 * MS + k, None)
    elapsed = time.perf_counter() - start
    assert sync.stats()["pending"] == [q] * (n - 1) + [0]
    assert elapsed < 20.0
    # The silent input wakes up: the newest window is matched, everything older is unusable.
    sets = sync.add(n - 1, (2 * q - 1) * 10 * MS, None)
    assert len(sets) == 1
