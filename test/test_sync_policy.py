"""The synchronizer's ``approximate_time`` policy (message_filters' ApproximateTime set choice).

Oracle: `brute_approximate_time`, an offline exhaustive search written from the policy's
definition: while every camera has frames left, if the oldest frames of the cameras (the heads)
span more than the slop the oldest head is dropped; otherwise the newest head is the pivot, and
the set is, among all choices of one frame per camera that contain the pivot, the one of
smallest spread (earliest on ties); frames older than the chosen ones are dropped. The
incremental synchronizer, fed the same frames in random interleavings (each camera in stamp
order) and flushed, must output exactly these sets. Randomized, seeded.

Against the real message_filters.ApproximateTimeSynchronizer (its Python module) on the same
random streams: equal sets where the cameras' ticks are isolated, and where they are not, the
exact relation stated in `test_message_filters_takes_the_newest_frames_ours_the_tightest_set`.
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


# -------------------------------------------------------- against message_filters (Python)
def _their_sets(n, arrivals, slop_ns, queue_size):
    """Sets of message_filters.ApproximateTimeSynchronizer (the Python module) for the arrivals."""
    message_filters = pytest.importorskip(
        "message_filters", reason="message_filters (ROS 2) is not installed: scripts/setup.sh installs it "
        "from ../shared/ros2-extra or a sourced ROS 2 install provides it")
    from sensor_msgs.msg import Image

    inputs = [message_filters.SimpleFilter() for _ in range(n)]
    out = []
    sync = message_filters.ApproximateTimeSynchronizer(inputs, queue_size, slop_ns / SEC)
    sync.registerCallback(lambda *msgs: out.append(tuple(
        m.header.stamp.sec * SEC + m.header.stamp.nanosec for m in msgs)))
    for k, t, _ in arrivals:
        msg = Image()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t, SEC)
        inputs[k].signalMessage(msg)
    return out


def _newest_unused_rule(n, arrivals, slop_ns):
    """At each arriving frame f: when every other camera has an unused frame, the set of f and
    each other camera's newest unused frame, if they all lie less than the slop before f."""
    unused = [[] for _ in range(n)]
    out = []
    for k, t, _ in arrivals:
        unused[k].append(t)
        if all(unused):
            pick = tuple(unused[j][-1] for j in range(n))
            if t - min(pick) < slop_ns:
                out.append(pick)
                for j in range(n):
                    unused[j].remove(pick[j])
    return out


def _camera_streams(rng, n, n_ticks, period, jitter_us, miss):
    """Per camera, a tick every period with +-jitter, some ticks missing; stamps on a 1 us grid,
    sorted, distinct over all cameras."""
    seen = set()
    streams = []
    for _ in range(n):
        stamps = {SEC + i * period + rng.randint(-jitter_us, jitter_us) * 1000
                  for i in range(n_ticks) if rng.random() > miss}
        streams.append(sorted(stamps - seen))
        seen |= stamps
    return streams


def _spread(stamps):
    return max(stamps) - min(stamps)


# The slop sits half a microsecond off the 1 us grid of the stamps: no spread equals it, so
# message_filters' strict "< slop" and our inclusive "<= slop" select the same sets, and the
# float seconds message_filters takes cannot round across a stamp difference.
SLOP_MF = 20 * MS + 500


@pytest.mark.parametrize("seed", range(4))
def test_equals_message_filters_on_isolated_ticks(seed):
    """Relation 1, equality. Cameras that tick together (+-8 ms jitter, 15 % of frames missing)
    every 100 ms with a 20 ms slop: frames of one tick lie within the slop and frames of
    different ticks more than the slop apart. Then message_filters.ApproximateTimeSynchronizer
    and our approximate_time emit exactly the same sets, the ticks at which every camera
    delivered, for arrivals in any interleaving of the cameras (each in its stamp order):
    there is a single candidate set per tick, so both rules must pick it."""
    rng = random.Random(900 + seed)
    for _ in range(8):
        n = rng.randint(2, 4)
        streams = _camera_streams(rng, n, 40, 100 * MS, 8000, 0.15)
        arrivals = random_interleaving(rng, streams)
        theirs = _their_sets(n, arrivals, SLOP_MF, queue_size=100)
        sync = Approx(n, slop=SLOP_MF, queue_size=100)
        ours = [s.stamps for s in run(sync, arrivals) + sync.flush()]
        assert sorted(theirs) == ours  # theirs come in completion order, ours in stamp order
        ticks_everyone_has = set.intersection(*[{round((x - SEC) / (100 * MS)) for x in s} for s in streams])
        assert len(ours) == len(ticks_everyone_has)


@pytest.mark.parametrize("seed", range(4))
def test_message_filters_takes_the_newest_frames_ours_the_tightest_set(seed):
    """Relation 2, dense streams: 2-4 cameras ticking every 15-30 ms with +-15 ms jitter, 15 %
    of frames missing, slop 20 ms, arrivals in stamp order; 8 streams per seed. Asserted:

    * message_filters' sets are exactly those of the *newest-unused rule*
      (`_newest_unused_rule`): at each arriving frame f, when every other camera has an unused
      frame, the set of f and each other camera's newest unused frame, emitted at once if they
      all lie less than the slop before f. (Its product search over the frames within the slop,
      each camera's sorted by distance to f, meets that set first: in stamp order a camera's
      closest frame is its newest, and any other choice is older, hence wider.)
    * ours are exactly the sets of the ApproximateTime definition (`brute_approximate_time`):
      around each pivot, the newest of the cameras' oldest frames, the set of smallest spread,
      also with frames that arrive after the pivot (ours waits for them).
    * ours are in stamp order per camera; message_filters' are not in at least one stream of
      each seed (it leaves older frames unused and may match them later: its sets go back).
    * per stream, ours are no more sets than message_filters'; over the 8 streams the mean
      spread of ours is smaller.

    Why ours are tighter: the newest-unused rule takes the first set that completes and never
    a frame still to come that would be closer; ours never emits a set that such a frame could
    tighten. The last two points are measured facts of these seeded streams (they held on all
    of 400 such streams tried), not consequences of the definitions; the first two are."""
    rng = random.Random(950 + seed)
    ours_mean = theirs_mean = 0.0
    streams_with_crossing_sets = 0
    for _ in range(8):
        n = rng.randint(2, 4)
        streams = _camera_streams(rng, n, 40, rng.choice([15, 20, 25, 30]) * MS, 15000, 0.15)
        arrivals = sorted((frame(k, t) for k, s in enumerate(streams) for t in s), key=lambda f: f[1])
        theirs = _their_sets(n, arrivals, SLOP_MF, queue_size=100)
        assert theirs == _newest_unused_rule(n, arrivals, SLOP_MF)
        sync = Approx(n, slop=SLOP_MF, queue_size=100)
        ours = [s.stamps for s in run(sync, arrivals) + sync.flush()]
        assert ours == brute_approximate_time(streams, SLOP_MF)
        assert all(all(a < b for a, b in zip(x, y)) for x, y in zip(ours, ours[1:]))
        streams_with_crossing_sets += any(not all(a < b for a, b in zip(x, y)) for x, y in zip(theirs, theirs[1:]))
        assert len(ours) <= len(theirs)
        ours_mean += sum(map(_spread, ours)) / len(ours) / 8
        theirs_mean += sum(map(_spread, theirs)) / len(theirs) / 8
    assert streams_with_crossing_sets >= 1
    assert ours_mean < theirs_mean
