"""The synchronizer's ``approximate_time`` policy (message_filters' ApproximateTime set choice).

Oracle: `brute_approximate_time`, an offline exhaustive search written from the policy's
definition: while every camera has frames left, if the oldest frames of the cameras (the heads)
span more than the slop the oldest head is dropped; otherwise the newest head is the pivot, and
the set is, among all choices of one frame per camera that contain the pivot, the one of
smallest spread (earliest on ties); frames older than the chosen ones are dropped. The
incremental synchronizer, fed the same frames in random interleavings (each camera in stamp
order) and flushed, must output exactly these sets. Randomized, seeded.
"""
import functools
import itertools
import random
import statistics

import pytest

from qvl_ros.core.synchronizer import DROP_REASONS, POLICIES, Synchronizer, SyncSet, default_slop_ns
from test_synchronizer import frame, random_interleaving  # the shared stream helpers

MS = 1_000_000
SEC = 1_000_000_000

Approx = functools.partial(Synchronizer, policy="approximate_time")


# ----------------------------------------------------------------------------------- oracle
def brute_approximate_time(streams, slop):
    """The ApproximateTime sets of complete streams (distinct stamps), by exhaustive search."""
    n = len(streams)
    pos = [0] * n
    out = []
    while all(pos[k] < len(streams[k]) for k in range(n)):
        heads = [streams[k][pos[k]] for k in range(n)]
        if max(heads) - min(heads) > slop:
            pos[heads.index(min(heads))] += 1
            continue
        pivot_k = heads.index(max(heads))
        pivot = heads[pivot_k]
        choices = [[pos[k]] if k == pivot_k else
                   [i for i in range(pos[k], len(streams[k])) if abs(streams[k][i] - pivot) <= slop]
                   for k in range(n)]
        best = None
        for combo in itertools.product(*choices):
            ts = tuple(streams[k][i] for k, i in enumerate(combo))
            key = (max(ts) - min(ts), min(ts), ts)
            if best is None or key < best[0]:
                best = (key, combo)
        out.append(best[0][2])
        pos = [i + 1 for i in best[1]]
    return out


def distinct_streams(rng, n, max_frames, horizon):
    """n sorted streams whose stamps are all distinct (ties would only test tie conventions)."""
    stamps = rng.sample(range(horizon), n * max_frames)
    return [sorted(stamps[k * max_frames: k * max_frames + rng.randint(0, max_frames)])
            for k in range(n)]


def check_sets(sets, num_inputs, slop):
    prev = None
    seen = set()
    for s in sets:
        assert isinstance(s, SyncSet) and len(s.stamps) == num_inputs and s.span <= slop
        for k, (t, item) in enumerate(zip(s.stamps, s.items)):
            assert item == ("frame", k, t)
            assert item not in seen
            seen.add(item)
        if prev is not None:
            assert all(a < b for a, b in zip(prev.stamps, s.stamps))
        prev = s


def check_accounting(sync):
    st = sync.stats()
    for k in range(st["num_inputs"]):
        assert st["received"][k] == st["used"][k] + sum(st["dropped"][k].values()) + st["pending"][k]
    assert all(u == st["sets"] for u in st["used"])


def run(sync, arrivals):
    sets = []
    for k, t, item in arrivals:
        sets += sync.add(k, t, item)
    return sets


# ---------------------------------------------------------------- against the brute force
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_for_any_interleaving(seed):
    rng = random.Random(500 + seed)
    for _ in range(80):
        n = rng.randint(1, 4)
        slop = rng.choice([0, 3, 7, 15, 30, 1000])
        streams = distinct_streams(rng, n, rng.randint(1, 7), 60)
        expected = brute_approximate_time(streams, slop)
        for _ in range(3):
            sync = Approx(n, slop=slop, queue_size=16)
            arrivals = random_interleaving(rng, streams)
            streamed = run(sync, arrivals)
            # Sets come out only once proven: what is out before the end is a prefix.
            assert [s.stamps for s in streamed] == expected[:len(streamed)], (streams, slop, arrivals)
            sets = streamed + sync.flush()
            assert [s.stamps for s in sets] == expected, (streams, slop, arrivals)
            check_sets(sets, n, slop)
            check_accounting(sync)
            assert sync.stats()["drops"]["queue_full"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force_on_long_camera_like_streams(seed):
    """Cameras at different rates with jitter and missing frames; small inputs for the search."""
    rng = random.Random(600 + seed)
    for _ in range(10):
        n = rng.randint(2, 3)
        periods = [rng.choice([33, 50, 100]) for _ in range(n)]
        used = set()
        streams = []
        for k in range(n):
            s = []
            for i in range(int(1500 / periods[k])):
                t = i * periods[k] + rng.randint(-4, 4) + 10
                if rng.random() < 0.9 and t not in used:
                    used.add(t)
                    s.append(t)
            streams.append(sorted(s))
        slop = default_slop_ns([1e9 / p for p in periods])  # periods in ns here
        expected = brute_approximate_time(streams, slop)
        sync = Approx(n, slop=slop, queue_size=64)
        sets = run(sync, random_interleaving(rng, streams)) + sync.flush()
        assert [s.stamps for s in sets] == expected
        check_accounting(sync)


@pytest.mark.parametrize("seed", range(3))
def test_reorder_tolerance_gives_the_in_order_result(seed):
    rng = random.Random(700 + seed)
    for _ in range(60):
        n = rng.randint(2, 3)
        slop = rng.choice([3, 8, 20])
        tol = rng.choice([1, 4, 10])
        streams = distinct_streams(rng, n, 6, 60)
        # Each camera delivers its frames up to `tol` out of stamp order.
        per_cam = [sorted(s, key=lambda t: t + rng.randrange(tol)) for s in streams]
        arrivals = random_interleaving(rng, per_cam)
        sync = Approx(n, slop=slop, queue_size=16, reorder_tolerance=tol)
        sets = run(sync, arrivals) + sync.flush()
        assert [s.stamps for s in sets] == brute_approximate_time(streams, slop), (streams, arrivals)
        assert sync.stats()["drops"]["too_old"] == 0
        check_accounting(sync)


def test_out_of_order_frame_beyond_tolerance_is_too_old():
    sync = Approx(2, slop=10, reorder_tolerance=5)
    sync.add(0, 100, None)
    sync.add(0, 120, None)  # 100 is now final for camera 0 and passed on
    assert sync.add(0, 99, None) == []
    assert sync.add(0, 116, None) == []  # within the tolerance of 120: still accepted
    st = sync.stats()
    assert st["drops"]["too_old"] == 1 and sync.pending == ((100, 116, 120), ())
    check_accounting(sync)


def test_true_inter_message_lower_bound_lets_sets_out_sooner_with_the_same_result():
    rng = random.Random(800)
    sooner = 0
    for _ in range(60):
        n = rng.randint(2, 3)
        slop = rng.choice([5, 15, 40])
        streams = distinct_streams(rng, n, 7, 200)
        gaps = [min((b - a for a, b in zip(s, s[1:])), default=0) for s in streams]
        expected = brute_approximate_time(streams, slop)
        arrivals = random_interleaving(rng, streams)
        plain = Approx(n, slop=slop, queue_size=16)
        bounded = Approx(n, slop=slop, queue_size=16, inter_message_lower_bound=gaps)
        early_plain = early_bounded = 0
        for k, t, item in arrivals:
            early_plain += len(plain.add(k, t, item))
            early_bounded += len(bounded.add(k, t, item))
            assert early_bounded >= early_plain
        sooner += early_bounded > early_plain
        rest = bounded.flush()
        assert early_bounded + len(rest) == len(expected)
        assert [s.stamps for s in rest] == expected[early_bounded:]
    assert sooner > 0


# ----------------------------------------------------------------------------- the two cases
def spans_ms(sets):
    return [s.span / MS for s in sets]


def feed_in_stamp_order(sync, streams):
    events = sorted((t, k) for k, s in enumerate(streams) for t in s)
    return run(sync, [frame(k, t) for t, k in events]) + sync.flush()


def test_two_30hz_cameras_28ms_apart():
    """message_filters' C++ policy pairs them 5.3 ms apart; max_sets at slop 30 ms takes 28 ms."""
    period = round(SEC / 30)
    a = [SEC + i * period for i in range(300)]
    b = [t + 28 * MS for t in a]
    for slop in (30 * MS, default_slop_ns([30, 30])):
        sets = feed_in_stamp_order(Approx(2, slop=slop), [a, b])
        assert len(sets) == 299
        assert all(s.span == period - 28 * MS for s in sets)  # 5.33 ms: b[i] with a[i + 1]
        assert [s.stamps for s in sets] == brute_approximate_time([a, b], slop)
    sets = feed_in_stamp_order(Synchronizer(2, slop=30 * MS, policy="max_sets"), [a, b])
    assert len(sets) == 300 and all(s.span == 28 * MS for s in sets)


def test_30hz_with_10hz_mean_span_at_default_slop():
    """The 10 Hz camera's phase sweeps once over the 30 Hz frame period: the nearest 30 Hz frame
    is on average a quarter period (8.33 ms) away, which approximate_time reaches."""
    fast_period = round(SEC / 30)
    n_slow = 600
    slow_period = 100 * MS + fast_period // n_slow  # phase drifts by one fast period overall
    fast = [SEC + i * fast_period for i in range(3 * n_slow + 3)]
    slow = [SEC + 1 + j * slow_period for j in range(n_slow)]
    slop = default_slop_ns([30, 10])
    assert slop == round(SEC / 30)  # a third of the 10 Hz period
    sets = feed_in_stamp_order(Approx(2, slop=slop), [fast, slow])
    nearest = [min(abs(t - f) for f in fast) / MS for t in slow]
    assert len(sets) == n_slow
    assert spans_ms(sets) == pytest.approx(nearest)  # every set is the tightest possible
    assert statistics.mean(spans_ms(sets)) == pytest.approx(fast_period / 4 / MS, abs=0.05)
    # max_sets takes the earliest 30 Hz frame in the window: the one before, half a period away.
    max_sets = feed_in_stamp_order(Synchronizer(2, slop=slop, policy="max_sets"), [fast, slow])
    assert statistics.mean(spans_ms(max_sets)) == pytest.approx(fast_period / 2 / MS, abs=0.05)


# ------------------------------------------------------------------ shared synchronizer duties
@pytest.mark.parametrize("policy", POLICIES)
def test_bag_loop_resets_and_continues(policy):
    n, n_ticks = 3, 20
    sync = Synchronizer(n, slop=20 * MS, policy=policy)
    stamps = [100 * SEC + i * 100 * MS for i in range(n_ticks)]
    arrivals = [frame(k, t) for _ in range(2) for t in stamps for k in range(n)]
    sets = run(sync, arrivals) + sync.flush()
    assert [s.stamps for s in sets] == [(t,) * n for t in stamps] * 2
    st = sync.stats()
    assert st["resets"] == 1
    check_accounting(sync)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(3))
def test_random_stress_invariants(policy, seed):
    """Small queues, duplicates, backward steps, reordering: invariants always hold."""
    rng = random.Random(900 + seed)
    for _ in range(15):
        n = rng.randint(1, 5)
        slop = rng.randint(0, 30)
        tol = rng.choice([0, 0, 5, 20])
        sync = Synchronizer(n, slop=slop, queue_size=rng.randint(1, 6), reset_threshold=500,
                            reorder_tolerance=tol, policy=policy)
        t = [0] * n
        sets = []
        for serial in range(300):
            k = rng.randrange(n)
            t[k] += rng.randint(-40, 60) if rng.random() > 0.01 else -2000
            sets += sync.add(k, t[k], (k, t[k], serial))
            check_accounting(sync)
            assert all(c <= sync.queue_size + (1 if tol else 0) * sync.queue_size
                       for c in sync.stats()["pending"])
        sets += sync.flush()
        check_accounting(sync)
        for s in sets:
            assert s.span <= slop and len(s.stamps) == n
            assert all(item[:2] == (k, st) for k, (st, item) in enumerate(zip(s.stamps, s.items)))
        items = [i for s in sets for i in s.items]
        assert len(items) == len(set(items))
        assert set(sync.stats()["drops"]) == set(DROP_REASONS)


def test_queue_overflow_drops_oldest():
    sync = Approx(2, slop=10 * MS, queue_size=3)
    for i in range(5):
        assert sync.add(0, i * 100 * MS, None) == []
    assert sync.pending == ((200 * MS, 300 * MS, 400 * MS), ())
    assert sync.stats()["drops"]["queue_full"] == 2
    # Camera 1 arrives: the old frames of camera 0 can match nothing and go. Camera 0 may
    # still send a frame in (400, 402] ms, so the set waits for it or for the end.
    assert sync.add(1, 402 * MS, None) == []
    assert [s.stamps for s in sync.flush()] == [(400 * MS, 402 * MS)]
    assert sync.stats()["drops"]["unmatched"] == 2
    check_accounting(sync)


def test_waits_for_a_tighter_set_and_emits_when_proven():
    sync = Approx(2, slop=30)
    assert sync.add(0, 100, None) == []
    assert sync.add(1, 120, None) == []  # pivot 120; camera 0 may still send 100 < t <= 120
    assert sync.add(0, 118, None) == []  # tighter; camera 0 may still come closer
    assert [s.stamps for s in sync.add(0, 125, None)] == [(118, 120)]  # past the pivot: proven
    assert sync.stats()["drops"]["unmatched"] == 1  # 100: slid past, in no set any more
    check_accounting(sync)


def test_validation_and_default_slop():
    with pytest.raises(ValueError, match="policy"):
        Synchronizer(2, slop=0, policy="fastest")
    with pytest.raises(ValueError):
        Synchronizer(2, slop=0, inter_message_lower_bound=[1])
    with pytest.raises(ValueError):
        Synchronizer(2, slop=0, inter_message_lower_bound=-1)
    sync = Synchronizer(2, slop=5, reorder_tolerance=3)
    assert sync.policy == "approximate_time" and sync.reorder_tolerance == 3
    assert default_slop_ns([30]) == 11_111_111
    assert default_slop_ns([30, 10, 15]) == 33_333_333
    for bad in ([], [0], [-1], [float("nan")]):
        with pytest.raises(ValueError):
            default_slop_ns(bad)
