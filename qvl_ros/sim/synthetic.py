"""Synthetic multi-camera publisher: N image topics with chosen sizes, rate, encodings and jitter.

    qvl-synthetic-cameras --cameras 3 --rate 10 --size 320x240 --encodings rgb8 bgr8 jpeg
    python -m qvl_ros.sim.synthetic --topics front/image_raw rear/image_raw/compressed --jitter-ms 5
    ros2 run qvl_ros synthetic_cameras --ros-args -p rate:=15.0 -p encodings:="[rgb8, mono8]"

Behaves like a hardware-triggered rig: one timer tick publishes a frame on every camera; each
frame's header stamp is the tick time (node clock, so sim time under ``use_sim_time``) plus its
own uniform jitter in ``[-jitter_ms, +jitter_ms]``. Frames are smooth colour gradients with a
square that moves every tick (different per camera), encoded as the camera's ``encoding``:
rgb8, bgr8, rgba8, bgra8, mono8, mono16, yuv422 (UYVY), yuv422_yuy2, bayer_rggb8/bggr8/gbrg8/grbg8
as ``sensor_msgs/Image``, or jpeg/png as ``sensor_msgs/CompressedImage`` (a topic ending in
``/compressed`` is always compressed; jpeg unless png is asked for).

Parameters (all read-only): ``topics`` (string[]), ``encodings`` (string[], cycled over the
cameras), ``sizes`` (string[] of ``WIDTHxHEIGHT``, cycled; empty = ``width`` x ``height``),
``width``, ``height``, ``rate`` (Hz; 0 = no timer, call :meth:`SyntheticCameras.publish_tick`),
``jitter_ms``, ``offsets_ms`` (constant stamp offset per camera, cycled: a skewed clock),
``seed``, ``jpeg_quality``, ``qos.reliability`` (best_effort | reliable).

For tests and demos the class also offers ``on_publish(index, msg)`` (called for every published
message), :meth:`~SyntheticCameras.set_enabled` (stop/resume a camera) and
:meth:`~SyntheticCameras.set_size` (change a camera's resolution mid-stream).
"""
from __future__ import annotations

import argparse
import functools
import sys
import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from rclpy.node import Node

__all__ = ["SyntheticCameras", "render_frame", "encode_image", "RAW_ENCODINGS", "COMPRESSED_FORMATS", "main"]

RAW_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "yuv422", "yuv422_yuy2",
                 "bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8")
COMPRESSED_FORMATS = ("jpeg", "png")

# Colour at (even row, even col), (even, odd), (odd, even), (odd, odd): 0=R, 1=G, 2=B.
_BAYER = {"bayer_rggb8": (0, 1, 1, 2), "bayer_bggr8": (2, 1, 1, 0),
          "bayer_gbrg8": (1, 2, 0, 1), "bayer_grbg8": (1, 0, 2, 1)}


def parse_size(text: str) -> Tuple[int, int]:
    """``"640x480"`` -> (width, height)."""
    try:
        w, h = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like WIDTHxHEIGHT, got {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return w, h


@functools.lru_cache(maxsize=32)
def _background(width: int, height: int, camera: int) -> np.ndarray:
    """The static part of a frame, computed once per size and camera (read-only)."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = (y + 0 * x).astype(np.uint8)
    img[..., 1] = (x + 0 * y).astype(np.uint8)
    img[..., 2] = ((x + y) * 0.5 + 60 * camera).astype(np.int64) % 256
    img.flags.writeable = False
    return img


def render_frame(width: int, height: int, tick: int, camera: int) -> np.ndarray:
    """RGB uint8 (H, W, 3): a gradient tinted per camera with a square moving with ``tick``.
    One copy of a cached background per frame, so the stand-in cameras cost about what a driver
    copying a capture buffer does, not a render."""
    img = _background(width, height, camera).copy()
    side = max(2, min(width, height) // 4)
    span_x, span_y = max(1, width - side), max(1, height - side)
    x0 = (tick * 7 + 31 * camera) % span_x
    y0 = (tick * 5 + 17 * camera) % span_y
    img[y0:y0 + side, x0:x0 + side] = ((255, 40, 40), (40, 255, 40), (40, 40, 255))[camera % 3]
    return img


def _yuv(rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return y, u, v


def encode_image(rgb: np.ndarray, encoding: str) -> Tuple[bytes, int]:
    """RGB (H, W, 3) uint8 -> (raw bytes in ``encoding``, step in bytes)."""
    h, w, _ = rgb.shape
    if encoding == "rgb8":
        out = rgb
    elif encoding == "bgr8":
        out = rgb[..., ::-1]
    elif encoding in ("rgba8", "bgra8"):
        px = rgb if encoding == "rgba8" else rgb[..., ::-1]
        out = np.concatenate([px, np.full((h, w, 1), 255, np.uint8)], axis=2)
    elif encoding in ("mono8", "mono16"):
        luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        luma = np.clip(np.rint(luma), 0, 255).astype(np.uint16)
        out = luma.astype(np.uint8) if encoding == "mono8" else (luma * 257).astype("<u2")
    elif encoding in ("yuv422", "yuv422_yuy2"):
        if w % 2:
            raise ValueError(f"{encoding} needs an even width, got {w}")
        y, u, v = _yuv(rgb)
        u = (u[:, 0::2] + u[:, 1::2]) / 2
        v = (v[:, 0::2] + v[:, 1::2]) / 2
        q = np.empty((h, w // 2, 4), np.float32)
        if encoding == "yuv422":  # U Y0 V Y1
            q[..., 0], q[..., 1], q[..., 2], q[..., 3] = u, y[:, 0::2], v, y[:, 1::2]
        else:  # Y0 U Y1 V
            q[..., 0], q[..., 1], q[..., 2], q[..., 3] = y[:, 0::2], u, y[:, 1::2], v
        out = np.clip(np.rint(q), 0, 255).astype(np.uint8)
    elif encoding in _BAYER:
        colours = _BAYER[encoding]
        out = np.empty((h, w), np.uint8)
        for a in (0, 1):
            for b in (0, 1):
                out[a::2, b::2] = rgb[a::2, b::2, colours[a * 2 + b]]
    else:
        raise ValueError(f"unsupported synthetic encoding {encoding!r}; one of {RAW_ENCODINGS + COMPRESSED_FORMATS}")
    out = np.ascontiguousarray(out)
    return out.tobytes(), out.nbytes // h


def compress_image(rgb: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """RGB (H, W, 3) -> JPEG or PNG bytes (torchvision's libjpeg-turbo / libpng)."""
    import torch
    from torchvision.io import encode_jpeg, encode_png

    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    data = encode_jpeg(t, quality=int(quality)) if fmt == "jpeg" else encode_png(t)
    return data.numpy().tobytes()


class SyntheticCameras(Node):
    """The ``synthetic_cameras`` node (see the module doc). ``on_publish(index, msg)`` is called
    after each publish; other keyword arguments go to ``rclpy.node.Node``."""

    def __init__(self, *, node_name: str = "synthetic_cameras",
                 on_publish: Optional[Callable[[int, Any], None]] = None, **node_kwargs: Any) -> None:
        from rcl_interfaces.msg import ParameterDescriptor, ParameterType
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image

        super().__init__(node_name, **node_kwargs)
        T = ParameterType

        def declare(name, default, ptype, description):
            return self.declare_parameter(name, default, ParameterDescriptor(
                name=name, type=ptype, description=description, read_only=True,
                dynamic_typing=(ptype == T.PARAMETER_DOUBLE))).value

        topics = list(declare("topics", ["camera_0/image_raw", "camera_1/image_raw", "camera_2/image_raw"],
                              T.PARAMETER_STRING_ARRAY, "Image topics, one per camera."))
        encodings = list(declare("encodings", ["rgb8"], T.PARAMETER_STRING_ARRAY,
                                 "Encoding per camera (cycled): raw encodings, jpeg or png."))
        sizes = list(declare("sizes", [""], T.PARAMETER_STRING_ARRAY,
                             "WIDTHxHEIGHT per camera (cycled); empty = width x height."))
        width = int(declare("width", 320, T.PARAMETER_INTEGER, "Default frame width (px)."))
        height = int(declare("height", 240, T.PARAMETER_INTEGER, "Default frame height (px)."))
        rate = float(declare("rate", 10.0, T.PARAMETER_DOUBLE, "Frames per second per camera; 0 = manual ticks."))
        self.jitter_ns = int(round(float(declare("jitter_ms", 5.0, T.PARAMETER_DOUBLE,
                                                 "Uniform stamp jitter per frame, +-ms.")) * 1e6))
        self.offsets_ns = [int(round(float(x) * 1e6)) for x in declare(
            "offsets_ms", [0.0], T.PARAMETER_DOUBLE_ARRAY,
            "Constant stamp offset per camera (cycled), ms: a camera whose clock is off.")]
        seed = int(declare("seed", 0, T.PARAMETER_INTEGER, "Seed of the stamp jitter."))
        self.jpeg_quality = int(declare("jpeg_quality", 90, T.PARAMETER_INTEGER, "JPEG quality (1-100)."))
        reliability = str(declare("qos.reliability", "best_effort", T.PARAMETER_STRING,
                                  "best_effort | reliable"))
        if not topics:
            raise ValueError("topics must name at least one topic")
        encodings = [e for e in encodings if e] or ["rgb8"]
        sizes = [s for s in sizes if s]
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self.on_publish = on_publish
        self.tick = 0
        self.topics = topics
        self.encodings: List[str] = []
        self.sizes: List[Tuple[int, int]] = []
        self.enabled: List[bool] = [True] * len(topics)
        qos = QoSProfile(history=qos_profile_sensor_data.history, depth=qos_profile_sensor_data.depth,
                         reliability=(ReliabilityPolicy.RELIABLE if reliability == "reliable"
                                      else ReliabilityPolicy.BEST_EFFORT),
                         durability=qos_profile_sensor_data.durability)
        self._pubs = []
        for i, topic in enumerate(topics):
            enc = encodings[i % len(encodings)]
            if topic.rstrip("/").split("/")[-1] == "compressed" and enc not in COMPRESSED_FORMATS:
                enc = "jpeg"
            if enc not in RAW_ENCODINGS + COMPRESSED_FORMATS:
                raise ValueError(f"unsupported encoding {enc!r} for {topic}")
            size = parse_size(sizes[i % len(sizes)]) if sizes else (width, height)
            self.encodings.append(enc)
            self.sizes.append(size)
            msg_type = CompressedImage if enc in COMPRESSED_FORMATS else Image
            self._pubs.append(self.create_publisher(msg_type, topic, qos))
        self._Image, self._CompressedImage = Image, CompressedImage
        self._timer = self.create_timer(1.0 / rate, self.publish_tick) if rate > 0 else None
        desc = ", ".join(f"{p.topic_name} {w}x{h} {e}" for p, (w, h), e in zip(self._pubs, self.sizes, self.encodings))
        self.get_logger().info(f"publishing {len(topics)} cameras at {rate:g} Hz, jitter "
                               f"+-{self.jitter_ns / 1e6:g} ms: {desc}")

    @property
    def resolved_topics(self) -> List[str]:
        return [p.topic_name for p in self._pubs]

    def stop(self) -> None:
        """Stop the timer (no more ticks); :meth:`publish_tick` still works."""
        if self._timer is not None:
            self._timer.cancel()

    def set_enabled(self, index: int, enabled: bool) -> None:
        """Stop (False) or resume (True) publishing on one camera."""
        with self._lock:
            self.enabled[index] = bool(enabled)

    def set_size(self, index: int, width: int, height: int) -> None:
        """Change one camera's resolution from the next tick on."""
        with self._lock:
            self.sizes[index] = (int(width), int(height))

    def make_message(self, index: int, tick: int, stamp_ns: int):
        """The message camera ``index`` publishes at ``tick`` with header stamp ``stamp_ns``."""
        from builtin_interfaces.msg import Time

        w, h = self.sizes[index]
        enc = self.encodings[index]
        rgb = render_frame(w, h, tick, index)
        if enc in COMPRESSED_FORMATS:
            msg = self._CompressedImage()
            msg.format = f"rgb8; {enc} compressed bgr8" if enc == "jpeg" else f"rgb8; {enc} compressed rgb8"
            msg.data = compress_image(rgb, enc, self.jpeg_quality)
        else:
            msg = self._Image()
            data, step = encode_image(rgb, enc)
            msg.height, msg.width, msg.encoding, msg.step, msg.is_bigendian = h, w, enc, step, 0
            msg.data = data
        msg.header.stamp = Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
        msg.header.frame_id = self.topics[index].strip("/").split("/")[0] or f"camera_{index}"
        return msg

    def publish_tick(self) -> None:
        """Publish one frame on every enabled camera (the timer calls this)."""
        now = self.get_clock().now().nanoseconds
        with self._lock:
            tick = self.tick
            self.tick += 1
            enabled = list(self.enabled)
            jitter = self._rng.integers(-self.jitter_ns, self.jitter_ns + 1, len(self._pubs)) \
                if self.jitter_ns else np.zeros(len(self._pubs), np.int64)
        for i, pub in enumerate(self._pubs):
            if not enabled[i]:
                continue
            offset = self.offsets_ns[i % len(self.offsets_ns)] if self.offsets_ns else 0
            msg = self.make_message(i, tick, max(0, now + int(jitter[i]) + offset))
            if not self.context.ok():  # SIGINT/SIGTERM shut the context down: stop quietly
                return
            pub.publish(msg)
            if self.on_publish is not None:
                self.on_publish(i, msg)


def _overrides(args: argparse.Namespace) -> list:
    from rclpy.parameter import Parameter

    out = []
    topics = args.topics
    if topics is None and args.cameras is not None:
        topics = [f"camera_{i}/image_raw" for i in range(args.cameras)]
    if topics is not None:
        out.append(Parameter("topics", value=list(topics)))
    if args.encodings is not None:
        out.append(Parameter("encodings", value=list(args.encodings)))
    if args.sizes is not None:
        out.append(Parameter("sizes", value=list(args.sizes)))
    if args.size is not None:
        w, h = parse_size(args.size)
        out += [Parameter("width", value=w), Parameter("height", value=h)]
    if args.rate is not None:
        out.append(Parameter("rate", value=float(args.rate)))
    if args.jitter_ms is not None:
        out.append(Parameter("jitter_ms", value=float(args.jitter_ms)))
    if args.seed is not None:
        out.append(Parameter("seed", value=int(args.seed)))
    if args.reliable:
        out.append(Parameter("qos.reliability", value="reliable"))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qvl-synthetic-cameras", description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, help="number of cameras (topics camera_<i>/image_raw)")
    ap.add_argument("--topics", nargs="+", help="explicit topic names")
    ap.add_argument("--encodings", nargs="+", help=f"per camera, cycled: {', '.join(RAW_ENCODINGS + COMPRESSED_FORMATS)}")
    ap.add_argument("--size", help="WIDTHxHEIGHT for every camera")
    ap.add_argument("--sizes", nargs="+", help="WIDTHxHEIGHT per camera, cycled")
    ap.add_argument("--rate", type=float, help="Hz per camera")
    ap.add_argument("--jitter-ms", type=float, help="uniform stamp jitter, +-ms")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--reliable", action="store_true", help="reliable QoS instead of best effort")
    ap.add_argument("--duration", type=float, default=0.0, help="exit after this many seconds (0 = run until Ctrl-C)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``synthetic_cameras``; the start, spin and end: :func:`qvl_ros.ros.spin.run`."""
    import rclpy
    from rclpy.utilities import remove_ros_args

    from ..ros.spin import run

    argv = list(sys.argv if argv is None else argv)
    args = build_parser().parse_args(remove_ros_args(argv)[1:])

    def publish(executor, node) -> int:
        if args.duration <= 0:
            executor.spin()
            return 0
        import time

        end = time.monotonic() + args.duration
        while rclpy.ok() and time.monotonic() < end:
            executor.spin_once(timeout_sec=min(0.1, max(0.0, end - time.monotonic())))
        return 0

    return run(lambda: SyntheticCameras(parameter_overrides=_overrides(args)), args=argv, spin=publish,
               name="synthetic_cameras")


if __name__ == "__main__":
    from ..ros.spin import catch_signals, exit_now

    catch_signals()
    exit_now(main())
