"""Synthetic multi-camera rosbag2 recordings, for trying the offline tools, tests and benchmarks.

    python -m qvl_ros.sim.synthetic_bags rec --cameras 3 --size 240x320 --seconds 10

    from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag
    truth = write_camera_bag("cams", [CameraSpec("/cam0/image_raw", 240, 320, "rgb8"),
                                      CameraSpec("/cam1/image/compressed", 240, 320, "jpeg")],
                             ticks=50)

Every camera publishes one frame per tick (``period`` apart) with a header stamp jittered by up
to ``jitter`` and a recording time a little later (a per-camera latency), as a driver and
``ros2 bag record`` would. Frames can be left out (``drop``) or replaced by corrupt JPEG data
(``corrupt``). Raw frames use the given encoding (rgb8, bgr8, mono8, rgba8, bgra8); "jpeg" and
"png" write sensor_msgs/CompressedImage. The returned :class:`RecordedFrame` list per camera
holds the stamps and the RGB pixels as written (the decoded pixels for compressed frames are not
known here: decode ``data`` to get them).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["CameraSpec", "RecordedFrame", "write_camera_bag", "frame_pixels"]


@dataclass(frozen=True)
class CameraSpec:
    topic: str
    height: int
    width: int
    encoding: str = "rgb8"  # rgb8 | bgr8 | mono8 | rgba8 | bgra8 | jpeg | png
    latency: float = 0.005  # recording time - stamp, seconds

    @property
    def compressed(self) -> bool:
        return self.encoding in ("jpeg", "png")


@dataclass
class RecordedFrame:
    tick: int
    stamp_ns: int  # header stamp
    record_ns: int  # recording time in the bag
    rgb: np.ndarray  # (H, W, 3) uint8 pixels before encoding
    data: bytes  # the message's data field as written
    corrupt: bool = False


def frame_pixels(cam_index: int, tick: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic (H, W, 3) uint8 test picture: gradients, a moving block and noise."""
    rng = np.random.default_rng((seed, cam_index, tick))
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.float32)
    img[..., 0] = (x + 40 * cam_index + 7 * tick) % 256
    img[..., 1] = (y + 3 * tick) % 256
    img[..., 2] = (x + y) / 2
    bh, bw = max(2, height // 4), max(2, width // 4)
    top = (tick * 5 + 11 * cam_index) % max(1, height - bh)
    left = (tick * 9 + 17 * cam_index) % max(1, width - bw)
    img[top:top + bh, left:left + bw] = (255, 255 - 20 * cam_index % 256, 40)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(spec: CameraSpec, rgb: np.ndarray) -> tuple[bytes, int]:
    """(data, step) of the message for this camera's encoding."""
    enc = spec.encoding
    if enc in ("jpeg", "png"):
        import torch
        from torchvision.io import encode_jpeg, encode_png

        chw = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        out = encode_jpeg(chw, quality=90) if enc == "jpeg" else encode_png(chw)
        return out.numpy().tobytes(), 0
    if enc == "rgb8":
        px = rgb
    elif enc == "bgr8":
        px = rgb[..., ::-1]
    elif enc == "rgba8":
        px = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif enc == "bgra8":
        px = np.concatenate([rgb[..., ::-1], np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif enc == "mono8":
        px = rgb[..., 1:2]
    else:
        raise ValueError(f"unsupported encoding {enc!r}")
    px = np.ascontiguousarray(px)
    return px.tobytes(), px.shape[1] * px.shape[2]


def _corrupt_jpeg(data: bytes) -> bytes:
    """A JPEG whose header is intact but whose entropy-coded data is cut off and garbled."""
    keep = max(8, len(data) // 3)
    return data[:keep] + bytes((b * 7 + 3) % 256 for b in data[keep:keep + 64])


def write_camera_bag(path: str | os.PathLike, cameras: Sequence[CameraSpec], ticks: int,
                     period: float = 0.1, t0: float = 1_700_000_000.0, jitter: float = 0.003,
                     drop: Iterable[tuple[int, int]] = (), corrupt: Iterable[tuple[int, int]] = (),
                     storage: str = "mcap", seed: int = 0, extra_topics: Sequence[tuple[str, str]] = ()
                     ) -> list[list[RecordedFrame]]:
    """Write a rosbag2 directory; return, per camera, the frames written (in tick order).

    ``drop`` / ``corrupt``: (camera index, tick) pairs. ``extra_topics``: (topic, "string")
    pairs recorded as std_msgs/msg/String, e.g. to test type checks.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    T = store.types
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    drop, corrupt = set(drop), set(corrupt)
    rng = np.random.default_rng(seed + 12345)
    period_ns, t0_ns, jitter_ns = int(round(period * 1e9)), int(round(t0 * 1e9)), int(round(jitter * 1e9))
    truth: list[list[RecordedFrame]] = [[] for _ in cameras]
    records = []  # (record time, camera index, message, type)
    for tick in range(ticks):
        for k, spec in enumerate(cameras):
            offset = int(rng.integers(-jitter_ns, jitter_ns + 1)) if jitter_ns else 0
            if (k, tick) in drop:
                continue
            stamp = t0_ns + tick * period_ns + offset
            rec = stamp + int(round(spec.latency * 1e9))
            rgb = frame_pixels(k, tick, spec.height, spec.width, seed)
            data, step = _encode(spec, rgb)
            bad = (k, tick) in corrupt
            if bad:
                if not spec.compressed:
                    raise ValueError("only compressed cameras can carry corrupt frames")
                data = _corrupt_jpeg(data)
            header = T["std_msgs/msg/Header"](
                stamp=T["builtin_interfaces/msg/Time"](sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000),
                frame_id=spec.topic.strip("/").split("/")[0])
            buf = np.frombuffer(data, dtype=np.uint8)
            if spec.compressed:
                msg, typ = T["sensor_msgs/msg/CompressedImage"](header=header, format=spec.encoding,
                                                                data=buf), "sensor_msgs/msg/CompressedImage"
            else:
                msg, typ = T["sensor_msgs/msg/Image"](header=header, height=spec.height, width=spec.width,
                                                      encoding=spec.encoding, is_bigendian=0, step=step,
                                                      data=buf), "sensor_msgs/msg/Image"
            truth[k].append(RecordedFrame(tick, stamp, rec, rgb, data, bad))
            records.append((rec, k, msg, typ))
    records.sort(key=lambda r: (r[0], r[1]))
    writer = Writer(Path(path), version=Writer.VERSION_LATEST, storage_plugin=plugin)
    writer.open()
    try:
        conns = [writer.add_connection(spec.topic, "sensor_msgs/msg/CompressedImage" if spec.compressed
                                       else "sensor_msgs/msg/Image", typestore=store) for spec in cameras]
        for rec, k, msg, typ in records:
            writer.write(conns[k], rec, store.serialize_cdr(msg, typ))
        for topic, kind in extra_topics:
            if kind != "string":
                raise ValueError(f"unsupported extra topic kind {kind!r}")
            conn = writer.add_connection(topic, "std_msgs/msg/String", typestore=store)
            writer.write(conn, t0_ns, store.serialize_cdr(T["std_msgs/msg/String"](data="hello"),
                                                          "std_msgs/msg/String"))
    finally:
        writer.close()
    return truth


def main(argv: Sequence[str] | None = None) -> int:
    """Write a recording of N synthetic cameras (`/cam<i>/image_raw`, or `/cam<i>/image_raw/compressed`
    for jpeg) that `qvl-ros extract` can read."""
    ap = argparse.ArgumentParser(prog="python -m qvl_ros.sim.synthetic_bags", description=main.__doc__)
    ap.add_argument("out", help="the recording directory to create (must not exist)")
    ap.add_argument("--cameras", type=int, default=3, choices=range(1, 17), metavar="N", help="1..16 (default 3)")
    ap.add_argument("--size", default="240x320", help="HxW of every camera (default 240x320)")
    ap.add_argument("--encoding", default="rgb8", choices=["rgb8", "bgr8", "mono8", "rgba8", "bgra8", "jpeg", "png"])
    ap.add_argument("--rate", type=float, default=10.0, help="frames per second per camera (default 10)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the recording (default 10)")
    ap.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
    a = ap.parse_args(argv)
    try:
        h, w = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {a.size!r}: expected HxW, e.g. 240x320")
    if not (28 <= h <= 4096 and 28 <= w <= 4096):
        ap.error("--size: each side must be 28..4096")
    if not (0.1 <= a.rate <= 120 and 0 < a.seconds <= 3600):
        ap.error("--rate must be 0.1..120 and --seconds 0..3600")
    if Path(a.out).exists():
        ap.error(f"{a.out} exists")
    suffix = "/compressed" if a.encoding in ("jpeg", "png") else ""
    cams = [CameraSpec(f"/cam{i}/image_raw{suffix}", h, w, a.encoding) for i in range(a.cameras)]
    ticks = max(1, int(a.seconds * a.rate))
    write_camera_bag(a.out, cams, ticks=ticks, period=1.0 / a.rate, storage=a.storage)
    print(f"wrote {a.out}: {a.cameras} cameras x {ticks} frames of {h}x{w} {a.encoding}; topics "
          + " ".join(c.topic for c in cams))
    return 0


if __name__ == "__main__":
    sys.exit(main())
