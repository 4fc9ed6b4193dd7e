"""qvl_ros.core.diagnostics: rate and latency windows, log throttling, staleness, status levels."""
import math

import pytest

from qvl_ros.core.diagnostics import (ERROR, OK, WARN, LatencyWindow, LogThrottle, PipelineMonitor, RateMeter,
                                 percentile, reason_key)


class FakeClock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def test_percentile_interpolates():
    assert math.isnan(percentile([], 50))
    assert percentile([1.0], 95) == 1.0
    assert percentile([0.0, 10.0], 50) == 5.0
    assert percentile(list(range(101)), 95) == pytest.approx(95.0)


def test_rate_meter_window_and_decay():
    clock = FakeClock()
    meter = RateMeter(window_s=2.0, clock=clock)
    for _ in range(20):  # 10 Hz for 2 s
        clock.t += 0.1
        meter.tick()
    assert meter.rate() == pytest.approx(10.0)
    clock.t += 1.0  # silence: half of the window is empty
    assert meter.rate() == pytest.approx(5.0, abs=0.6)
    clock.t += 2.0
    assert meter.rate() == 0.0


def test_rate_meter_young_meter_uses_its_age():
    clock = FakeClock()
    meter = RateMeter(window_s=5.0, clock=clock)
    for _ in range(5):
        clock.t += 0.1
        meter.tick()
    assert meter.rate() == pytest.approx(10.0)


def test_latency_window_keeps_last_values():
    w = LatencyWindow(size=4)
    for x in [10.0, 0.1, 0.2, 0.3, 0.4]:
        w.add(x)
    s = w.summary()
    assert s["count"] == 4 and s["max"] == 0.4 and s["p50"] == pytest.approx(0.25)
    w.clear()
    assert w.summary()["count"] == 0


def test_log_throttle_per_key_with_suppressed_count():
    clock = FakeClock()
    th = LogThrottle(period_s=5.0, clock=clock)
    assert th.check("a") == 0
    assert th.check("a") is None
    assert th.check("a") is None
    assert th.check("b") == 0
    clock.t += 5.0
    assert th.check("a") == 2


def test_reason_key_is_one_of_a_fixed_set():
    assert reason_key("data has 10 bytes, step x height needs 300") == "short_data"
    assert reason_key("unsupported encoding 'weird'") == reason_key("unsupported encoding 'AbCd:'") == \
        "unsupported_encoding"
    assert reason_key("image too small: 1x1 (height x width)") == reason_key("image too small: 20x20 (h x w)")
    assert reason_key("something new: 'x'") == "other"


def test_monitor_stale_invalid_and_levels():
    clock = FakeClock()
    mon = PipelineMonitor(["a", "b"], ["/a", "/b"], stale_after_s=1.0, clock=clock)
    assert mon.stale_cameras() == []  # just started
    clock.t += 1.5
    assert mon.stale_cameras() == ["a", "b"]  # no frame yet
    for _ in range(10):
        clock.t += 0.1
        for i in (0, 1):
            mon.frame_received(i)
            mon.frame_valid(i, (240, 320))
        mon.set_published(0.05)
    statuses = mon.statuses("/n", {"drops": {"queue_full": 0}, "sets": 10}, {"drops": {"queue_full": 0},
                                                                             "depth": 1, "depth_limit": 8})
    level, name, message, values = statuses[0]
    values = dict(values)
    assert level == OK and name == "/n: pipeline"
    assert values["stale_cameras"] == "" and values["queue_depth"] == "1" and values["queue_limit"] == "8"
    assert float(values["latency_p95_ms"]) == pytest.approx(50.0)
    cam = dict(statuses[1][3])
    assert cam["size"] == "320x240" and cam["stale"] == "false"

    # Camera b stops and sends a broken frame.
    mon.frame_received(1)
    mon.frame_invalid(1, "unsupported encoding 'x'")
    clock.t += 1.2
    mon.frame_valid(0)
    statuses = mon.statuses("/n", {}, {"drops": {"queue_full": 3}})
    level, _, message, values = statuses[0]
    assert level == WARN and "stale: b" in message
    assert dict(values)["stale_cameras"] == "b" and dict(values)["drops.invalid_frame"] == "1"
    assert dict(values)["drops.batch.queue_full"] == "3"
    b_level, b_name, b_message, b_values = statuses[2]
    assert b_level == WARN and b_name == "/n: camera b" and "stale" in b_message and "unsupported" in b_message
    # Levels come from the state: reading again gives the same answer.
    assert [s[0] for s in mon.statuses("/n", {}, {})] == [s[0] for s in statuses]
    # Once b is back and the invalid frame has left the window (5 s), all is OK again.
    clock.t += 5.0
    for i in (0, 1):
        mon.frame_received(i)
        mon.frame_valid(i)
    mon.set_made()
    statuses = mon.statuses("/n", {}, {})
    assert statuses[0][0] == OK and statuses[2][0] == OK, statuses

    mon.model_error(2, "RuntimeError: boom")
    statuses = mon.statuses("/n", {}, {})
    assert statuses[0][0] == ERROR and "boom" in statuses[0][2]
    assert mon.statuses("/n", {}, {})[0][0] == ERROR  # still within the window
    clock.t += 5.1
    for i in (0, 1):
        mon.frame_valid(i)
    mon.set_made()
    assert mon.statuses("/n", {}, {})[0][0] == OK


def deliver(mon, clock, seconds, rate=10.0, sets=True, cameras=(0, 1)):
    """Cameras deliver valid frames at `rate` for `seconds`; a set per tick when `sets` (its frames
    settled as used by the synchronizer)."""
    for _ in range(int(round(seconds * rate))):
        clock.t += 1.0 / rate
        for i in cameras:
            mon.frame_received(i)
            mon.frame_valid(i, (240, 320))
        if sets:
            mon.used = getattr(mon, "used", 0) + len(cameras)
            mon.frames_settled(getattr(mon, "drops", {}), mon.used)
            mon.set_made()
            mon.set_published(0.01)


def test_no_set_while_cameras_deliver_is_an_error_naming_the_drop_reasons():
    clock = FakeClock()
    mon = PipelineMonitor(["a", "b"], ["/a", "/b"], stale_after_s=1.0, no_set_after_s=2.0, clock=clock)
    deliver(mon, clock, 1.0)
    assert mon.statuses("/n")[0][0] == OK and mon.no_set_problem() is None
    # Skewed clocks: every frame now goes unmatched, no set for 1.9 s: not yet.
    unmatched = 0
    for _ in range(19):
        deliver(mon, clock, 0.1, sets=False)
        unmatched += 2
        mon.frames_settled({"unmatched": unmatched, "queue_full": 0}, mon.used)
    assert mon.statuses("/n")[0][0] != ERROR
    deliver(mon, clock, 0.2, sets=False)
    mon.drops = {"unmatched": unmatched + 4, "queue_full": 0}
    mon.frames_settled(mon.drops, mon.used)
    level, _, message, _ = mon.statuses("/n")[0]
    assert level == ERROR and "no synchronized set for 2.1 s" in message and "unmatched 42" in message
    assert "queue_full" not in message  # reasons that did not occur are not named
    # A camera that stops makes it a stale camera (WARN), not a synchronization failure.
    clock.t += 1.5
    deliver(mon, clock, 0.1, sets=False, cameras=(0,))
    level, _, message, _ = mon.statuses("/n")[0]
    assert mon.no_set_problem() is None and "stale: b" in message
    deliver(mon, clock, 0.5)
    level, _, message, _ = mon.statuses("/n")[0]
    assert level == WARN and "frames dropped" in message  # the unmatched frames are still in the window
    deliver(mon, clock, 5.0)
    assert mon.statuses("/n")[0][0] == OK


def test_sustained_set_drops_warn_and_intended_drops_do_not():
    clock = FakeClock()
    mon = PipelineMonitor(["a"], ["/a"], rate_window_s=5.0, drop_warn_fraction=0.2, clock=clock)
    deliver(mon, clock, 5.0, cameras=(0,))  # 50 sets in the window
    mon.sets_dropped("rate_limit", 40)
    mon.sets_dropped("time_reset", 10)
    assert mon.statuses("/n")[0][0] == OK  # a cap and a clock jump are not faults
    mon.sets_dropped("queue_full", 10)
    assert mon.statuses("/n")[0][0] == OK  # 10 of 50: below a fifth
    mon.sets_dropped("queue_full", 2)
    level, _, message, values = mon.statuses("/n")[0]
    assert level == WARN and "queue_full 12" in message and dict(values)["drops.set.queue_full"] == "12"
    deliver(mon, clock, 5.1, cameras=(0,))  # the drops left the window
    assert mon.statuses("/n")[0][0] == OK
    mon.frames_settled({"unmatched": 20}, mon.used)  # 20 more frames settled, as drops
    n = mon.snapshot()["frames_settled_in_window"]
    assert n in (70, 71) and f"20 of {n} frames dropped" in mon.statuses("/n")[0][2]  # 50 (51: float edges) + 20


@pytest.mark.parametrize("rate, level, words", [
    (30.0, OK, "desired frequency met"),
    (27.5, OK, "desired frequency met"),   # within 10 %: >= 27
    (26.0, WARN, "too low"),
    (34.0, WARN, "too high"),              # above 33
])
def test_frequency_check_is_frequency_status_with_min_equal_max(rate, level, words):
    from qvl_ros.core.diagnostics import frequency_check

    got_level, message = frequency_check(int(rate * 5), rate, 30.0, 0.1)
    assert got_level == level and words in message


def test_camera_rate_against_its_expected_rate_over_the_window():
    from qvl_ros.core.diagnostics import frequency_check

    assert frequency_check(0, 0.0, 30.0, 0.1)[0] == ERROR  # no events recorded
    assert frequency_check(0, 0.0, 0.0, 0.1) == (OK, "")   # no expectation, no check
    clock = FakeClock()
    mon = PipelineMonitor(["fast", "slow"], ["/f", "/s"], expected_rates=[10.0, 10.0], clock=clock)
    for k in range(50):  # 5 s: camera fast at 10 Hz, slow at 1 Hz
        clock.t += 0.1
        mon.frame_received(0)
        mon.frame_valid(0)
        if k % 10 == 0:
            mon.frame_received(1)
            mon.frame_valid(1)
    statuses = mon.statuses("/n")
    assert statuses[1][0] == OK and statuses[2][0] == WARN and "too low" in statuses[2][2]
    values = dict(statuses[2][3])
    assert values["expected_hz"] == "10.000" and values["min_acceptable_hz"] == "9.000"


def test_to_diagnostic_array():
    pytest.importorskip("diagnostic_msgs.msg")
    from qvl_ros.ros.diagnostic_array import to_diagnostic_array

    arr = to_diagnostic_array([(WARN, "n: pipeline", "m", [("k", "v")])])
    st = arr.status[0]
    assert st.level == bytes([WARN]) and st.name == "n: pipeline" and st.values[0].key == "k"
