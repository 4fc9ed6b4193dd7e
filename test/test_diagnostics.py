"""qvl_ros.core.diagnostics: rate and latency windows, log throttling, staleness, status levels."""
import math

import pytest

from qvl_ros.core.diagnostics import (ERROR, OK, WARN, LatencyWindow, LogThrottle, PipelineMonitor, RateMeter,
                                 percentile, reason_key, to_diagnostic_array)


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

    # Camera b stops and sends a broken frame; the batcher dropped a set.
    mon.frame_received(1)
    mon.frame_invalid(1, "unsupported encoding 'x'")
    clock.t += 1.2
    mon.frame_valid(0)
    statuses = mon.statuses("/n", {}, {"drops": {"queue_full": 3}})
    level, _, message, values = statuses[0]
    assert level == WARN and "stale: b" in message and "3 sets dropped" in message and "1 invalid" in message
    assert dict(values)["stale_cameras"] == "b" and dict(values)["drops.invalid_frame"] == "1"
    b_level, b_name, b_message, b_values = statuses[2]
    assert b_level == WARN and b_name == "/n: camera b" and "stale" in b_message and "unsupported" in b_message
    # Counters that did not move since the last report no longer raise the level.
    mon.frame_valid(1)
    statuses = mon.statuses("/n", {}, {"drops": {"queue_full": 3}})
    assert statuses[0][0] == OK and statuses[2][0] == OK

    mon.model_error(2, "RuntimeError: boom")
    statuses = mon.statuses("/n", {}, {"drops": {"queue_full": 3}})
    assert statuses[0][0] == ERROR and "boom" in statuses[0][2]


def test_to_diagnostic_array():
    pytest.importorskip("diagnostic_msgs.msg")
    arr = to_diagnostic_array([(WARN, "n: pipeline", "m", [("k", "v")])])
    st = arr.status[0]
    assert st.level == bytes([WARN]) and st.name == "n: pipeline" and st.values[0].key == "k"
