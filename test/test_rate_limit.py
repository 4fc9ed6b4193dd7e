"""RateLimiter on an injected clock (integer nanoseconds): sets per second never exceed the cap."""
import random

from qvl_ros.core.rate_limit import RateLimiter

MS = 1_000_000


def admitted(limiter, times_ms):
    return [t for t in times_ms if limiter.admit(t * MS)]


def test_no_cap_admits_everything():
    lim = RateLimiter(0.0)
    assert admitted(lim, range(0, 1000, 10)) == list(range(0, 1000, 10))
    assert lim.rejected == 0


def test_30hz_stream_capped_at_10_per_second_keeps_one_set_in_three():
    lim = RateLimiter(10.0)
    times = [round(k * 100 / 3) for k in range(90)]  # 3 s at 30 Hz
    got = admitted(lim, times)
    assert len(got) == 31 and lim.rejected == 59  # 10/s over 2.97 s, plus the one early slot
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert min(gaps) >= 66 and sorted(gaps)[1] == 100  # one early slot (half a period of slack)


def test_stream_at_the_cap_with_jitter_is_not_thinned():
    rng = random.Random(0)
    lim = RateLimiter(10.0)
    times = [k * 100 + rng.randint(-24, 24) for k in range(1, 200)]  # jitter below a quarter period
    assert admitted(lim, times) == times


def test_any_one_second_window_holds_at_most_cap_plus_one_sets():
    rng = random.Random(1)
    for cap in (1.0, 4.0, 15.0):
        lim = RateLimiter(cap)
        t, times = 0, []
        for _ in range(3000):
            t += rng.choice([1, 2, 5, 10, 33, 100, 250])
            times.append(t)
        got = admitted(lim, times)
        for start in got:
            in_window = [x for x in got if start <= x < start + 1000]
            assert len(in_window) <= cap + 1, (cap, start, in_window)
        # and the cap is used: with arrivals far denser than the cap, the rate is close to it
        dense = admitted(RateLimiter(cap), range(0, 20_000, 3))
        assert 0.95 * cap * 20 <= len(dense) <= cap * 20 + 1


def test_time_going_back_restarts_the_schedule_and_reconfigure_applies():
    lim = RateLimiter(2.0)
    assert admitted(lim, [10_000, 10_100, 10_600]) == [10_000, 10_600]
    assert admitted(lim, [500]) == [500]  # a bag loop: not held back by the old timeline
    lim.configure(0.0)
    assert admitted(lim, [501, 502]) == [501, 502]
    assert lim.max_rate == 0.0
