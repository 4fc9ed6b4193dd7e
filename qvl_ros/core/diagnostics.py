"""Pipeline statistics of the node and their `/diagnostics` form.

Everything here except :func:`to_diagnostic_array` is plain Python (no ROS import), so it is
unit-testable: the node calls the ``PipelineMonitor`` hooks from its callbacks and worker, and
once a second turns :meth:`PipelineMonitor.statuses` into a ``diagnostic_msgs/DiagnosticArray``
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
"""
from __future__ import annotations

import collections
import math
import re
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

__all__ = ["RateMeter", "LatencyWindow", "LogThrottle", "PipelineMonitor", "Status", "percentile",
           "reason_key", "DROP_REASON_KEYS", "to_diagnostic_array", "OK", "WARN", "ERROR", "STALE"]

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


# Keys under which invalid frames are counted and their log lines throttled: a fixed set, so
# /diagnostics and the throttle stay bounded whatever the input (an attacker choosing encodings
# cannot create keys). All but the last two are qvl_ros.core.conversion.ERROR_KEYS.
DROP_REASON_KEYS = ("unsupported_encoding", "empty", "too_small", "odd_width", "too_large", "bad_step",
                    "short_data", "no_data", "unknown_format", "corrupt", "decode_failed", "aspect_ratio",
                    "other")
_REASON_TEXT = (  # for reasons given as text: the conversion's messages
    (re.compile(r"^unsupported encoding"), "unsupported_encoding"),
    (re.compile(r"^empty image"), "empty"),
    (re.compile(r"^image too small"), "too_small"),
    (re.compile(r"^\S+ needs an even width"), "odd_width"),
    (re.compile(r"max_input_pixels|^image too large"), "too_large"),
    (re.compile(r"^step \d+ is shorter"), "bad_step"),
    (re.compile(r"^data has \d+ bytes"), "short_data"),
    (re.compile(r"^compressed image has no data"), "no_data"),
    (re.compile(r"^(data is neither JPEG nor PNG|unsupported compressed format)"), "unknown_format"),
    (re.compile(r"^cannot decode (png|jpeg): .*(CRC|truncated|ends early|bad |invalid|expected a marker)"),
     "corrupt"),
    (re.compile(r"^cannot decode"), "decode_failed"),
    (re.compile(r"aspect ratio"), "aspect_ratio"),
)


def reason_key(reason: Any) -> str:
    """One of :data:`DROP_REASON_KEYS` for an error or its text.

    An exception with a ``key`` attribute in that set (``ConversionError``) gives its key;
    otherwise the text is matched against the conversion's messages; anything else is "other".
    """
    key = getattr(reason, "key", None)
    if key in DROP_REASON_KEYS:
        return key
    text = str(reason)
    for pattern, key in _REASON_TEXT:
        if pattern.search(text):
            return key
    return "other"


class _Camera:
    def __init__(self, name: str, topic: str, window_s: float, clock: Callable[[], float]) -> None:
        self.name = name
        self.topic = topic
        self.received = 0
        self.invalid = 0
        self.invalid_by_reason: Dict[str, int] = collections.defaultdict(int)
        self.last_error = ""
        self.last_valid: Optional[float] = None
        self.size: Optional[Tuple[int, int]] = None
        self.rate = RateMeter(window_s, clock)


class PipelineMonitor:
    """Thread-safe counters of one node; the diagnostics timer reads :meth:`statuses`.

    Args:
        camera_names / topics: parallel lists, in the node's camera order.
        stale_after_s: a camera with no valid frame for this long is stale.
        rate_window_s: window of the rate meters.
        latency_window: number of recent sets the latency percentiles cover.
        clock: monotonic seconds (arrival times, rates, staleness).
    """

    def __init__(self, camera_names: Sequence[str], topics: Sequence[str], *, stale_after_s: float = 2.0,
                 rate_window_s: float = 5.0, latency_window: int = 500,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if len(camera_names) != len(topics):
            raise ValueError("camera_names and topics must have the same length")
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self.stale_after_s = float(stale_after_s)
        self._cameras = [_Camera(n, t, rate_window_s, clock) for n, t in zip(camera_names, topics)]
        self._sets_rate = RateMeter(rate_window_s, clock)
        self._latency = LatencyWindow(latency_window)
        self._batch_s = LatencyWindow(100)
        self._batch_sizes: Deque[int] = collections.deque(maxlen=100)
        self.published = 0
        self.model_errors = 0
        self.last_model_error = ""
        self._reported: Dict[str, int] = {}

    # ------------------------------------------------------------------ hooks
    def frame_received(self, index: int) -> None:
        with self._lock:
            cam = self._cameras[index]
            cam.received += 1
            cam.rate.tick()

    def frame_valid(self, index: int, size: Optional[Tuple[int, int]] = None) -> None:
        with self._lock:
            cam = self._cameras[index]
            cam.last_valid = self._clock()
            if size is not None:
                cam.size = tuple(size)

    def frame_invalid(self, index: int, reason: Any) -> None:
        """Count an invalid frame; ``reason``: the error (or its text), counted by :func:`reason_key`."""
        with self._lock:
            cam = self._cameras[index]
            cam.invalid += 1
            cam.invalid_by_reason[reason_key(reason)] += 1
            cam.last_error = (str(reason) or type(reason).__name__)[:200]

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

    def clear_latency(self) -> None:
        """Forget latencies (after a clock jump they are not comparable)."""
        with self._lock:
            self._latency.clear()

    # ------------------------------------------------------------------ reading
    def stale_cameras(self) -> List[str]:
        now = self._clock()
        with self._lock:
            return [c.name for c in self._cameras if self._is_stale(c, now)]

    def _is_stale(self, cam: _Camera, now: float) -> bool:
        since = cam.last_valid if cam.last_valid is not None else self._start
        return now - since > self.stale_after_s

    def snapshot(self) -> Dict[str, Any]:
        """All counters as plain data."""
        now = self._clock()
        with self._lock:
            cams = []
            for c in self._cameras:
                cams.append({
                    "name": c.name, "topic": c.topic, "received": c.received, "rate_hz": c.rate.rate(now),
                    "invalid": c.invalid, "invalid_by_reason": dict(c.invalid_by_reason),
                    "last_error": c.last_error, "stale": self._is_stale(c, now),
                    "age_s": (now - c.last_valid) if c.last_valid is not None else math.inf,
                    "size": c.size,
                })
            sizes = list(self._batch_sizes)
            return {
                "cameras": cams,
                "published": self.published,
                "sets_per_s": self._sets_rate.rate(now),
                "latency_s": self._latency.summary(),
                "batch_s": self._batch_s.summary(),
                "batch_size_mean": (sum(sizes) / len(sizes)) if sizes else 0.0,
                "model_errors": self.model_errors,
                "last_model_error": self.last_model_error,
                "stale": [c["name"] for c in cams if c["stale"]],
                "uptime_s": now - self._start,
            }

    def statuses(self, node_name: str, sync_stats: Optional[Dict[str, Any]] = None,
                 batch_stats: Optional[Dict[str, Any]] = None,
                 extra: Sequence[Tuple[str, Any]] = ()) -> List[Status]:
        """One summary status and one status per camera, with levels:

        summary ERROR if the model failed since the previous report, WARN if a camera is stale
        or sets were dropped or frames were invalid since then, else OK; camera WARN if stale or
        invalid frames arrived since the previous report.
        """
        snap = self.snapshot()
        sync_stats = sync_stats or {}
        batch_stats = batch_stats or {}
        sync_drops = dict(sync_stats.get("drops", {}))
        batch_drops = dict(batch_stats.get("drops", {}))
        invalid_total = sum(c["invalid"] for c in snap["cameras"])
        drops: Dict[str, int] = {f"sync.{k}": int(v) for k, v in sync_drops.items()}
        drops.update({f"batch.{k}": int(v) for k, v in batch_drops.items()})
        drops["invalid_frame"] = invalid_total
        drops["model_error"] = snap["model_errors"]

        new = {k: v - self._reported.get(k, 0) for k, v in drops.items()}
        self._reported.update(drops)
        lat, bt = snap["latency_s"], snap["batch_s"]

        level, problems = OK, []
        if snap["stale"]:
            level = WARN
            problems.append("stale: " + ", ".join(snap["stale"]))
        if new.get("batch.queue_full", 0) > 0:
            level = max(level, WARN)
            problems.append(f"{new['batch.queue_full']} sets dropped (queue full)")
        if new.get("invalid_frame", 0) > 0:
            level = max(level, WARN)
            problems.append(f"{new['invalid_frame']} invalid frames")
        if new.get("model_error", 0) > 0:
            level = ERROR
            problems.append(f"model failed on {new['model_error']} sets: {snap['last_model_error']}")
        summary = f"{snap['sets_per_s']:.1f} sets/s"
        if lat["count"]:
            summary += f", latency p50 {lat['p50'] * 1e3:.0f} ms p95 {lat['p95'] * 1e3:.0f} ms"
        message = "; ".join(problems + [summary])

        values: List[Tuple[str, Any]] = [
            ("sets_per_s", _fmt(snap["sets_per_s"])),
            ("sets_published", snap["published"]),
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
        values += [(f"drops.{k}", v) for k, v in drops.items()]
        values += list(extra)
        out: List[Status] = [(level, f"{node_name}: pipeline", message, _kv(values))]

        dropped_per_input = sync_stats.get("dropped", [])
        for i, c in enumerate(snap["cameras"]):
            key = f"cam{i}.invalid"
            new_invalid = c["invalid"] - self._reported.get(key, 0)
            self._reported[key] = c["invalid"]
            c_level, c_msg = OK, f"{c['rate_hz']:.1f} Hz"
            if c["stale"]:
                age = "no frame yet" if math.isinf(c["age_s"]) else f"no frame for {c['age_s']:.1f} s"
                c_level, c_msg = WARN, f"stale ({age})"
            if new_invalid > 0:
                c_level = max(c_level, WARN)
                c_msg += f"; {new_invalid} invalid frames ({c['last_error']})"
            c_values: List[Tuple[str, Any]] = [
                ("topic", c["topic"]),
                ("rate_hz", _fmt(c["rate_hz"])),
                ("received", c["received"]),
                ("invalid", c["invalid"]),
                ("last_error", c["last_error"]),
                ("stale", str(c["stale"]).lower()),
                ("age_s", _fmt(c["age_s"])),
                ("size", "" if c["size"] is None else f"{c['size'][1]}x{c['size'][0]}"),
            ]
            c_values += [(f"invalid.{k}", v) for k, v in sorted(c["invalid_by_reason"].items())]
            if i < len(dropped_per_input):
                c_values += [(f"drops.sync.{k}", v) for k, v in dropped_per_input[i].items()]
            out.append((c_level, f"{node_name}: camera {c['name']}", c_msg, _kv(c_values)))
        return out


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return ""
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _kv(values: Sequence[Tuple[str, Any]]) -> List[Tuple[str, str]]:
    return [(str(k), str(v)) for k, v in values]


def to_diagnostic_array(statuses: Sequence[Status], stamp=None, hardware_id: str = ""):
    """Build a ``diagnostic_msgs/DiagnosticArray`` from :meth:`PipelineMonitor.statuses`."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    arr = DiagnosticArray()
    if stamp is not None:
        arr.header.stamp = stamp
    for level, name, message, values in statuses:
        st = DiagnosticStatus()
        st.level = bytes([level])
        st.name = name
        st.message = message
        st.hardware_id = hardware_id
        st.values = [KeyValue(key=k, value=v) for k, v in values]
        arr.status.append(st)
    return arr
