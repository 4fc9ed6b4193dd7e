"""Pipeline statistics of the node and their `/diagnostics` form.

Everything here is plain Python (no ROS import), so it is unit-testable: the node calls the
``PipelineMonitor`` hooks from its callbacks and worker, and once a second turns
:meth:`PipelineMonitor.statuses` into a ``diagnostic_msgs/DiagnosticArray``
(:func:`qvl_ros.ros.diagnostic_array.to_diagnostic_array`)
(the same layout ``diagnostic_updater`` produces: one summary status plus one per camera, each a
level, a message and key/value pairs).

What is measured
    * input rate per camera: messages per second over a sliding window (monotonic clock),
      counting every arrival, valid or not;
    * sets/s: published synchronized sets per second over the same window;
    * latency stamp -> publish: node clock at publish minus the set's stamp (its newest camera
      stamp), so it follows sim time under ``use_sim_time``; p50/p95/max over the last sets;
    * model time per batch and mean batch size;
    * queue depth of the set batcher, drops by reason (synchronizer, batcher, invalid frames,
      model errors);
    * stale cameras: no valid frame for ``stale_after_s`` (or none yet, once the node has been
      up that long).

Levels (diagnostic_updater conventions: status names carry the node-name prefix, one status
for the pipeline and one per camera; the node fills ``hardware_id``)
    Computed by short pure functions (:func:`pipeline_level`, :func:`camera_level`,
    :func:`frequency_check`, :func:`no_set_problem`, :func:`drop_problems`) of one
    :meth:`PipelineMonitor.snapshot`: counts within the last ``rate_window_s``, the time since
    the last set, staleness. Reading twice gives the same answer; nothing depends on when the
    previous report was made.

    * pipeline ERROR: the model failed within the window, or every camera delivers but no set
      was made for ``no_set_after_s`` (the message names the window's frame drop reasons,
      e.g. ``unmatched`` when the cameras' clocks disagree by more than the slop);
    * pipeline WARN: a camera is stale, or more than ``drop_warn_fraction`` of the frames settled
      in the window (synchronizer drops and invalid frames against every frame whose fate was
      decided in it: :meth:`PipelineMonitor.frames_settled`) or of its sets (queue full, model or publish
      failure) was dropped;
    * camera: FrequencyStatus against its expected rate (ERROR without frames in the window,
      WARN outside ``expected * (1 -/+ tolerance)``), WARN when stale or when it sent invalid
      frames within the window.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from .drop_reasons import DROP_REASON_KEYS, reason_key  # noqa: F401  (re-exported)

__all__ = ["RateMeter", "LatencyWindow", "LogThrottle", "PipelineMonitor", "Status", "percentile",
           "frequency_check", "no_set_problem", "drop_problems", "pipeline_level", "pipeline_status",
           "camera_level", "camera_status", "expected_rates",
           "reason_key", "DROP_REASON_KEYS", "OK", "WARN", "ERROR", "STALE"]

# diagnostic_msgs/DiagnosticStatus levels
OK, WARN, ERROR, STALE = 0, 1, 2, 3

Status = Tuple[int, str, str, List[Tuple[str, str]]]  # (level, name, message, [(key, value)])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending sequence; nan if empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    pos = (n - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac


class RateMeter:
    """Events per second over the last ``window_s`` seconds (or since creation, if shorter)."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = float(window_s)
        self._clock = clock
        self._start = clock()
        self._times: Deque[float] = collections.deque()

    def tick(self, n: int = 1, now: Optional[float] = None) -> None:
        now = self._clock() if now is None else now
        for _ in range(n):
            self._times.append(now)
        self._trim(now)

    def count(self, now: Optional[float] = None) -> int:
        """Events within the window."""
        now = self._clock() if now is None else now
        self._trim(now)
        return len(self._times)

    def rate(self, now: Optional[float] = None) -> float:
        now = self._clock() if now is None else now
        self._trim(now)
        span = min(self._window, now - self._start)
        if span <= 0:
            return 0.0
        return len(self._times) / span

    def _trim(self, now: float) -> None:
        floor = now - self._window
        times = self._times
        while times and times[0] <= floor:
            times.popleft()


class LatencyWindow:
    """The last ``size`` latencies (seconds) and their percentiles."""

    def __init__(self, size: int = 500) -> None:
        self._values: Deque[float] = collections.deque(maxlen=int(size))

    def add(self, seconds: float) -> None:
        self._values.append(float(seconds))

    def clear(self) -> None:
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)

    def summary(self) -> Dict[str, float]:
        values = sorted(self._values)
        return {
            "count": len(values),
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
            "max": values[-1] if values else math.nan,
        }


class LogThrottle:
    """Decides whether a repeated message may be logged now: at most once per ``period_s`` per key.

    ``check(key)`` returns None when the message must be suppressed, otherwise the number of
    messages suppressed for that key since it was last logged. At most ``max_keys`` keys are
    remembered (the least recently logged is forgotten first), so memory stays bounded whatever
    the keys are; callers should still use a bounded key set (see :func:`reason_key`).
    """

    def __init__(self, period_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 1024) -> None:
        self.period_s = float(period_s)
        self.max_keys = int(max_keys)
        self._clock = clock
        self._last: "collections.OrderedDict[Any, float]" = collections.OrderedDict()
        self._suppressed: Dict[Any, int] = collections.defaultdict(int)
        self._lock = threading.Lock()

    def check(self, key: Any) -> Optional[int]:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._suppressed[key] += 1
                return None
            self._last[key] = now
            self._last.move_to_end(key)
            while len(self._last) > self.max_keys:
                old, _ = self._last.popitem(last=False)
                self._suppressed.pop(old, None)
            return self._suppressed.pop(key, 0)


class _Camera:
    def __init__(self, name: str, topic: str, window_s: float, clock: Callable[[], float],
                 expected_hz: float) -> None:
        self.name = name
        self.topic = topic
        self.expected_hz = float(expected_hz)
        self.received = 0
        self.invalid = 0
        self.invalid_by_reason: Dict[str, int] = collections.defaultdict(int)
        self.last_error = ""
        self.last_valid: Optional[float] = None
        self.size: Optional[Tuple[int, int]] = None
        self.frame_id = ""
        self.rate = RateMeter(window_s, clock)
        self.recent_invalid = RateMeter(window_s, clock)


# Drops of whole sets that are a fault (they raise the level); the others are intended
# (rate cap, clock jump, deactivation, shutdown) and only counted.
FAULT_SET_DROPS = ("queue_full", "model_error", "publish_error")


def expected_rates(values: Sequence[float], cameras: int) -> List[float]:
    """The per-camera expected rates from one value for all cameras or one per camera."""
    rates = [float(x) for x in values] or [0.0]
    if len(rates) == 1:
        rates = rates * cameras
    if len(rates) != cameras:
        raise ValueError(f"expected rates: give one value or one per camera ({cameras}), got {len(rates)}")
    if any(not math.isfinite(r) or r < 0 for r in rates):
        raise ValueError(f"expected rates must be finite and >= 0, got {rates}")
    return rates


class PipelineMonitor:
    """Thread-safe counters and windows of one node; the diagnostics timer reads :meth:`statuses`.

    Levels are a function of the state at the time of reading (counts within the last
    ``rate_window_s``, time since the last set, staleness), never of earlier readings.

    Args:
        camera_names / topics: parallel lists, in the node's camera order.
        stale_after_s: a camera with no valid frame for this long is stale.
        rate_window_s: window of the rate meters and of the drop check.
        latency_window: number of recent sets the latency percentiles cover.
        expected_rates: per camera, Hz (0: no rate check), as diagnostic_updater's
            FrequencyStatus with min = max = the expected rate.
        rate_tolerance: FrequencyStatus' tolerance (relative).
        no_set_after_s: ERROR when every camera delivers but no set was made for this long.
        drop_warn_fraction: WARN when more than this fraction of the window's frames, or of its
            sets, was dropped (faults only: see FAULT_SET_DROPS).
        clock: monotonic seconds.
    """

    def __init__(self, camera_names: Sequence[str], topics: Sequence[str], *, stale_after_s: float = 2.0,
                 rate_window_s: float = 5.0, latency_window: int = 500, expected_rates: Sequence[float] = (),
                 rate_tolerance: float = 0.1, no_set_after_s: float = 3.0, drop_warn_fraction: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if len(camera_names) != len(topics):
            raise ValueError("camera_names and topics must have the same length")
        rates = list(expected_rates) or [0.0] * len(topics)
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._window = float(rate_window_s)
        self.stale_after_s = float(stale_after_s)
        self.rate_tolerance = float(rate_tolerance)
        self.no_set_after_s = float(no_set_after_s)
        self.drop_warn_fraction = float(drop_warn_fraction)
        self._cameras = [_Camera(n, t, rate_window_s, clock, r) for n, t, r in zip(camera_names, topics, rates)]
        self._sets_rate = RateMeter(rate_window_s, clock)
        self._made = RateMeter(rate_window_s, clock)
        self._last_set: Optional[float] = None
        self._sets_made = 0
        self._set_drops: Dict[str, int] = collections.defaultdict(int)
        self._recent_set_drops: Dict[str, RateMeter] = {}
        self._frame_drops: Dict[str, int] = {}
        self._recent_frame_drops: Dict[str, RateMeter] = {}
        self._frames_used = 0                                  # synchronizer: frames put into sets
        self._settled = RateMeter(rate_window_s, clock)  # frames used or dropped by the synchronizer
        self._latency = LatencyWindow(latency_window)
        self._batch_s = LatencyWindow(100)
        self._batch_sizes: Deque[int] = collections.deque(maxlen=100)
        self.published = 0
        self.model_errors = 0
        self.last_model_error = ""
        self._paused = False

    # ------------------------------------------------------------------ hooks
    def set_paused(self, paused: bool) -> None:
        """Cameras unsubscribed on purpose (inactive, or lazy without listeners): nothing is
        stale and no set is missing meanwhile; the clocks of both checks restart on resume."""
        with self._lock:
            if self._paused and not paused:
                self._start = self._clock()
                for cam in self._cameras:
                    cam.last_valid = None
                self._last_set = None
            self._paused = bool(paused)

    def frame_received(self, index: int) -> None:
        with self._lock:
            cam = self._cameras[index]
            cam.received += 1
            cam.rate.tick()

    def frame_valid(self, index: int, size: Optional[Tuple[int, int]] = None, frame_id: str = "") -> None:
        with self._lock:
            cam = self._cameras[index]
            cam.last_valid = self._clock()
            if size is not None:
                cam.size = tuple(size)
            if frame_id:
                cam.frame_id = frame_id

    def frame_invalid(self, index: int, reason: Any) -> None:
        """Count an invalid frame; ``reason``: the error (or its text), counted by :func:`reason_key`."""
        with self._lock:
            cam = self._cameras[index]
            cam.invalid += 1
            cam.invalid_by_reason[reason_key(reason)] += 1
            cam.last_error = (str(reason) or type(reason).__name__)[:200]
            cam.recent_invalid.tick()

    def frames_settled(self, drops: Dict[str, int], used: int) -> None:
        """The synchronizer's cumulative counts: frames dropped by reason and frames put into sets.

        A frame's fate is decided once (used, dropped, or invalid before it got there), so the
        window's frame drops are compared with the frames settled in the window, counted at the
        same stage and the same moment: a drop decided seconds after its frame arrived (a reset
        emptying full queues) cannot exceed them, as it could exceed the frames received."""
        now = self._clock()
        with self._lock:
            settled = 0
            for reason, total in drops.items():
                new = int(total) - self._frame_drops.get(reason, 0)
                self._frame_drops[reason] = int(total)
                if new > 0:
                    self._meter(self._recent_frame_drops, reason).tick(new, now)
                    settled += new
            new_used, self._frames_used = int(used) - self._frames_used, int(used)
            settled += max(0, new_used)
            if settled:
                self._settled.tick(settled, now)

    def set_made(self) -> None:
        """The synchronizer made a set (before any rate cap or queue)."""
        with self._lock:
            self._sets_made += 1
            self._last_set = self._clock()
            self._made.tick()

    def sets_dropped(self, reason: str, count: int = 1) -> None:
        if count <= 0:
            return
        with self._lock:
            self._set_drops[reason] += int(count)
            self._meter(self._recent_set_drops, reason).tick(int(count))

    def set_published(self, latency_s: float) -> None:
        with self._lock:
            self.published += 1
            self._sets_rate.tick()
            self._latency.add(latency_s)

    def batch_done(self, size: int, seconds: float) -> None:
        with self._lock:
            self._batch_sizes.append(int(size))
            self._batch_s.add(seconds)

    def model_error(self, sets: int, reason: str) -> None:
        with self._lock:
            self.model_errors += int(sets)
            self.last_model_error = str(reason)
            self._set_drops["model_error"] += int(sets)
            self._meter(self._recent_set_drops, "model_error").tick(int(sets))

    def clear_latency(self) -> None:
        """Forget latencies (after a clock jump they are not comparable)."""
        with self._lock:
            self._latency.clear()

    def _meter(self, table: Dict[str, RateMeter], key: str) -> RateMeter:
        if key not in table:
            table[key] = RateMeter(self._window, self._clock)
        return table[key]

    # ------------------------------------------------------------------ reading
    def stale_cameras(self) -> List[str]:
        now = self._clock()
        with self._lock:
            return [c.name for c in self._cameras if self._is_stale(c, now)]

    def _is_stale(self, cam: _Camera, now: float) -> bool:
        if self._paused:
            return False
        since = cam.last_valid if cam.last_valid is not None else self._start
        return now - since > self.stale_after_s

    def snapshot(self) -> Dict[str, Any]:
        """All counters and window counts as plain data (what the status functions read)."""
        now = self._clock()
        with self._lock:
            cams = [self._camera_snapshot(c, now) for c in self._cameras]
            sizes = list(self._batch_sizes)
            return {
                "cameras": cams,
                "published": self.published,
                "sets_per_s": self._sets_rate.rate(now),
                "sets_made": self._sets_made,
                "sets_made_in_window": self._made.count(now),
                "since_last_set_s": 0.0 if self._paused else now - (
                    self._last_set if self._last_set is not None else self._start),
                "set_drops": dict(self._set_drops),
                "set_drops_in_window": {k: m.count(now) for k, m in self._recent_set_drops.items()},
                "frame_drops_in_window": {k: m.count(now) for k, m in self._recent_frame_drops.items()},
                "frames_settled_in_window": self._settled.count(now),
                "latency_s": self._latency.summary(),
                "batch_s": self._batch_s.summary(),
                "batch_size_mean": (sum(sizes) / len(sizes)) if sizes else 0.0,
                "model_errors": self.model_errors,
                "last_model_error": self.last_model_error,
                "stale": [c["name"] for c in cams if c["stale"]],
                "uptime_s": now - self._start,
                "settings": {"window_s": self._window, "rate_tolerance": self.rate_tolerance,
                             "no_set_after_s": self.no_set_after_s, "drop_warn_fraction": self.drop_warn_fraction,
                             "stale_after_s": self.stale_after_s},
            }

    def _camera_snapshot(self, c: _Camera, now: float) -> Dict[str, Any]:
        return {
            "name": c.name, "topic": c.topic, "frame_id": c.frame_id, "received": c.received,
            "rate_hz": c.rate.rate(now), "in_window": c.rate.count(now), "expected_hz": c.expected_hz,
            "invalid": c.invalid, "invalid_in_window": c.recent_invalid.count(now),
            "invalid_by_reason": dict(c.invalid_by_reason), "last_error": c.last_error,
            "stale": self._is_stale(c, now), "age_s": (now - c.last_valid) if c.last_valid is not None else math.inf,
            "size": c.size,
        }

    def no_set_problem(self) -> Optional[str]:
        """The no-set ERROR text when it applies now, else None."""
        return no_set_problem(self.snapshot())

    def statuses(self, node_name: str, sync_stats: Optional[Dict[str, Any]] = None,
                 batch_stats: Optional[Dict[str, Any]] = None,
                 extra: Sequence[Tuple[str, Any]] = ()) -> List[Status]:
        """One pipeline status and one status per camera, named ``<node_name>: pipeline`` and
        ``<node_name>: camera <name>`` (diagnostic_updater's node-name prefix)."""
        snap = self.snapshot()
        out = [pipeline_status(snap, node_name, sync_stats or {}, batch_stats or {}, extra)]
        dropped_per_input = (sync_stats or {}).get("dropped", [])
        for i, cam in enumerate(snap["cameras"]):
            sync_drops = dropped_per_input[i] if i < len(dropped_per_input) else {}
            out.append(camera_status(cam, node_name, snap["settings"], sync_drops))
        return out


# ---------------------------------------------------------------------- status functions (pure)
def frequency_check(in_window: int, rate_hz: float, expected_hz: float, tolerance: float) -> Tuple[int, str]:
    """diagnostic_updater's FrequencyStatus with min = max = ``expected_hz``: ERROR without
    events in the window, WARN below ``expected * (1 - tolerance)`` or above
    ``expected * (1 + tolerance)``, else OK. ``expected_hz <= 0``: no check (OK)."""
    if expected_hz <= 0:
        return OK, ""
    if in_window == 0:
        return ERROR, "no events recorded"
    if rate_hz < expected_hz * (1.0 - tolerance):
        return WARN, f"frequency too low ({rate_hz:.1f} Hz, expected {expected_hz:g})"
    if rate_hz > expected_hz * (1.0 + tolerance):
        return WARN, f"frequency too high ({rate_hz:.1f} Hz, expected {expected_hz:g})"
    return OK, "desired frequency met"


def no_set_problem(snap: Dict[str, Any]) -> Optional[str]:
    """ERROR text when every camera delivers (none stale) yet no set was made for
    ``no_set_after_s``, naming the frame drop reasons of the window; None otherwise."""
    wait = snap["settings"]["no_set_after_s"]
    if snap["stale"] or snap["since_last_set_s"] <= wait:
        return None
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(snap["frame_drops_in_window"].items()) if v)
    window = snap["settings"]["window_s"]
    return (f"no synchronized set for {snap['since_last_set_s']:.1f} s while every camera delivers; "
            f"frames dropped in the last {window:g} s: {reasons or 'none'}")


def drop_problems(snap: Dict[str, Any]) -> List[str]:
    """WARN texts for sustained drops: more than ``drop_warn_fraction`` of the frames settled in the
    window (put into a set or dropped by the synchronizer, or invalid) dropped or invalid, or of
    its sets dropped by a fault. Drops and the frames they are a part of are counted at the same
    stage (:meth:`PipelineMonitor.frames_settled`), so the first can never exceed the second."""
    limit = snap["settings"]["drop_warn_fraction"]
    out = []
    invalid = sum(c["invalid_in_window"] for c in snap["cameras"])
    frames_in = snap["frames_settled_in_window"] + invalid
    frame_drops = sum(snap["frame_drops_in_window"].values()) + sum(c["invalid_in_window"] for c in snap["cameras"])
    if frames_in and frame_drops / frames_in > limit:
        out.append(f"{frame_drops} of {frames_in} frames dropped in the last {snap['settings']['window_s']:g} s")
    faults = {k: v for k, v in snap["set_drops_in_window"].items() if k in FAULT_SET_DROPS and v}
    made = snap["sets_made_in_window"]
    if faults and sum(faults.values()) / max(made, 1) > limit:
        what = ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))
        out.append(f"sets dropped ({what}) of {made} made")
    return out


def pipeline_level(snap: Dict[str, Any]) -> Tuple[int, List[str]]:
    """Level and problem texts of the pipeline status, from the snapshot alone."""
    level, problems = OK, []
    recent_errors = snap["set_drops_in_window"].get("model_error", 0)
    if recent_errors:
        level = ERROR
        problems.append(f"model failed on {recent_errors} sets: {snap['last_model_error']}")
    no_set = no_set_problem(snap)
    if no_set is not None:
        level = ERROR
        problems.append(no_set)
    if snap["stale"]:
        level = max(level, WARN)
        problems.append("stale: " + ", ".join(snap["stale"]))
    drops = drop_problems(snap)
    if drops:
        level = max(level, WARN)
        problems.extend(drops)
    return level, problems


def pipeline_values(snap: Dict[str, Any], sync_stats: Dict[str, Any], batch_stats: Dict[str, Any],
                    extra: Sequence[Tuple[str, Any]]) -> List[Tuple[str, str]]:
    lat, bt = snap["latency_s"], snap["batch_s"]
    values: List[Tuple[str, Any]] = [
        ("sets_per_s", _fmt(snap["sets_per_s"])),
        ("sets_published", snap["published"]),
        ("sets_made", snap["sets_made"]),
        ("since_last_set_s", _fmt(snap["since_last_set_s"])),
        ("latency_p50_ms", _fmt(lat["p50"] * 1e3)),
        ("latency_p95_ms", _fmt(lat["p95"] * 1e3)),
        ("latency_max_ms", _fmt(lat["max"] * 1e3)),
        ("latency_window_sets", lat["count"]),
        ("batch_p50_ms", _fmt(bt["p50"] * 1e3)),
        ("batch_size_mean", _fmt(snap["batch_size_mean"])),
        ("queue_depth", batch_stats.get("depth", 0)),
        ("queue_limit", batch_stats.get("depth_limit", 0)),
        ("in_flight", batch_stats.get("running", 0)),
        ("sync_sets", sync_stats.get("sets", 0)),
        ("sync_resets", sync_stats.get("resets", 0)),
        ("sync_pending", ",".join(str(p) for p in sync_stats.get("pending", []))),
        ("stale_cameras", ",".join(snap["stale"])),
    ]
    values += [(f"drops.{k}", v) for k, v in drop_totals(snap, sync_stats, batch_stats).items()]
    return _kv(values + list(extra))


def drop_totals(snap: Dict[str, Any], sync_stats: Dict[str, Any], batch_stats: Dict[str, Any]) -> Dict[str, int]:
    """Every drop counter since start, by stage and reason."""
    drops: Dict[str, int] = {f"sync.{k}": int(v) for k, v in dict(sync_stats.get("drops", {})).items()}
    drops.update({f"batch.{k}": int(v) for k, v in dict(batch_stats.get("drops", {})).items()})
    drops.update({f"set.{k}": int(v) for k, v in sorted(snap["set_drops"].items()) if k != "model_error"})
    drops["invalid_frame"] = sum(c["invalid"] for c in snap["cameras"])
    drops["model_error"] = snap["model_errors"]
    return drops


def pipeline_status(snap: Dict[str, Any], node_name: str, sync_stats: Dict[str, Any],
                    batch_stats: Dict[str, Any], extra: Sequence[Tuple[str, Any]] = ()) -> Status:
    level, problems = pipeline_level(snap)
    summary = f"{snap['sets_per_s']:.1f} sets/s"
    lat = snap["latency_s"]
    if lat["count"]:
        summary += f", latency p50 {lat['p50'] * 1e3:.0f} ms p95 {lat['p95'] * 1e3:.0f} ms"
    message = "; ".join(problems + [summary])
    return (level, f"{node_name}: pipeline", message, pipeline_values(snap, sync_stats, batch_stats, extra))


def camera_level(cam: Dict[str, Any], settings: Dict[str, Any]) -> Tuple[int, List[str]]:
    level, problems = frequency_check(cam["in_window"], cam["rate_hz"], cam["expected_hz"],
                                      settings["rate_tolerance"])
    problems = [problems] if level != OK else []
    if cam["stale"]:
        age = "no frame yet" if math.isinf(cam["age_s"]) else f"no frame for {cam['age_s']:.1f} s"
        level = max(level, WARN)
        problems.append(f"stale ({age})")
    if cam["invalid_in_window"]:
        level = max(level, WARN)
        problems.append(f"{cam['invalid_in_window']} invalid frames in the last {settings['window_s']:g} s "
                        f"({cam['last_error']})")
    return level, problems


def camera_status(cam: Dict[str, Any], node_name: str, settings: Dict[str, Any],
                  sync_drops: Dict[str, int]) -> Status:
    level, problems = camera_level(cam, settings)
    message = "; ".join(problems + [f"{cam['rate_hz']:.1f} Hz"])
    expected = cam["expected_hz"]
    values: List[Tuple[str, Any]] = [
        ("topic", cam["topic"]),
        ("frame_id", cam["frame_id"]),
        ("rate_hz", _fmt(cam["rate_hz"])),
        ("events_in_window", cam["in_window"]),
        ("expected_hz", _fmt(expected) if expected > 0 else ""),
        ("min_acceptable_hz", _fmt(expected * (1 - settings["rate_tolerance"])) if expected > 0 else ""),
        ("max_acceptable_hz", _fmt(expected * (1 + settings["rate_tolerance"])) if expected > 0 else ""),
        ("received", cam["received"]),
        ("invalid", cam["invalid"]),
        ("last_error", cam["last_error"]),
        ("stale", str(cam["stale"]).lower()),
        ("age_s", _fmt(cam["age_s"])),
        ("size", "" if cam["size"] is None else f"{cam['size'][1]}x{cam['size'][0]}"),
    ]
    values += [(f"invalid.{k}", v) for k, v in sorted(cam["invalid_by_reason"].items())]
    values += [(f"drops.sync.{k}", v) for k, v in sync_drops.items()]
    return (level, f"{node_name}: camera {cam['name']}", message, _kv(values))


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return ""
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _kv(values: Sequence[Tuple[str, Any]]) -> List[Tuple[str, str]]:
    return [(str(k), str(v)) for k, v in values]
