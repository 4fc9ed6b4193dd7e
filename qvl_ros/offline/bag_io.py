"""rosbag2 input and output for offline tools, on the pure-Python `rosbags` library (no rclpy).

Input: :class:`CameraBags` opens one or more rosbag2 recordings (directories with
``metadata.yaml``, sqlite3 or mcap storage, or a bare ``.mcap`` / ``.db3`` file), checks that
every requested topic exists and carries ``sensor_msgs/msg/Image`` or
``sensor_msgs/msg/CompressedImage``, and yields the camera messages of all recordings merged in
recording-time order. Messages are deserialized with rosbags' ROS 2 Kilted typestore; the
``uint8[] data`` field of an image comes back as a numpy view of the stored record (no copy).

Output: :class:`FeatureBagWriter` writes ``qvl_ros/msg/VisionFeatures`` and
``qvl_ros/msg/Caption`` to an mcap rosbag2, and with detections one
``vision_msgs/msg/Detection2DArray`` topic per camera, ``/qvl/<camera>/detections``
(:func:`detections_topic`; vision_msgs' types from the installed package's ``.msg`` files,
:func:`vision_msgs_dir`). The message definitions are read from this
package's ``msg/*.msg`` files (the source tree or ``share/qvl_ros/msg`` of a ROS prefix),
registered in a rosbags typestore, serialized as CDR and stored in the bag together with their
RIHS01 hashes, so that rosbags, rosbag2 and mcap viewers can decode the bag without this package.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.stamps import sec_nanosec
from ..ros.detection_msgs import DETECTION_ARRAY_TYPE
from ..ros.feature_msgs import SetInfo, caption_fields, features_fields
from ..core.topics import camera_names as camera_names_for

__all__ = [
    "IMAGE_TYPES",
    "BagInputError",
    "CameraBags",
    "CameraTopic",
    "FeatureBagWriter",
    "camera_names_for",
    "find_msg_dir",
    "qvl_typestore",
    "FEATURES_TOPIC",
    "CAPTION_TOPIC",
    "detections_topic",
    "vision_msgs_dir",
]

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
VISION_FEATURES_TYPE = "qvl_ros/msg/VisionFeatures"
CAPTION_TYPE = "qvl_ros/msg/Caption"
FEATURE_TENSOR_TYPE = "qvl_ros/msg/FeatureTensor"
FEATURES_TOPIC = "/qvl/features"
CAPTION_TOPIC = "/qvl/caption"
DETECTIONS_TOPIC = "/qvl/{camera}/detections"
MSG_FILES = ("FeatureTensor", "CameraInput", "RowRange", "VisionFeatures", "Caption")


class BagInputError(Exception):
    """An input recording that cannot be used; ``str(err)`` says which one and why."""


# ----------------------------------------------------------------------------------------- types
def find_msg_dir() -> Path:
    """Directory holding this package's .msg files.

    Looked up next to the package (a source checkout or an editable install), then in
    ``share/qvl_ros/msg`` of every prefix on ``AMENT_PREFIX_PATH`` (a colcon install).
    """
    candidates = [Path(__file__).resolve().parents[2] / "msg"]
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / "qvl_ros" / "msg")
    for path in candidates:
        if all((path / f"{name}.msg").is_file() for name in MSG_FILES):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"qvl_ros message definitions (msg/*.msg) not found; looked in: {tried}")


_TYPESTORE = None


def qvl_typestore():
    """rosbags typestore with ROS 2 Kilted's standard messages plus qvl_ros' own (cached)."""
    global _TYPESTORE
    if _TYPESTORE is None:
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore

        store = get_typestore(Stores.ROS2_KILTED)
        msg_dir = find_msg_dir()
        types: dict = {}
        for name in MSG_FILES:
            text = (msg_dir / f"{name}.msg").read_text()
            types.update(get_types_from_msg(text, f"qvl_ros/msg/{name}"))
        store.register(types)
        _TYPESTORE = store
    return _TYPESTORE


def detections_topic(camera: str) -> str:
    """The bag topic of a camera's detections (the node publishes `<camera>/detections`)."""
    return DETECTIONS_TOPIC.format(camera=camera)


def vision_msgs_dir() -> Path:
    """The installed vision_msgs definitions (``share/vision_msgs/msg`` on AMENT_PREFIX_PATH), or
    FileNotFoundError saying how to get them."""
    from ..ros.detection_msgs import find_vision_msgs_dir

    found = find_vision_msgs_dir()
    if found is None:
        raise FileNotFoundError(
            "detections need the vision_msgs message definitions, and no share/vision_msgs/msg with "
            "Detection2DArray.msg and its dependencies is on AMENT_PREFIX_PATH: install vision_msgs "
            "(apt: ros-<distro>-vision-msgs; here: scripts/setup.sh builds it from ../shared/ros2-extra) "
            "and source its setup")
    return found


def _detection_typestore(msg_dir: Path):
    """A typestore of qvl_ros' messages plus vision_msgs' (a new one: the cached one stays as it is)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    from ..ros.detection_msgs import register_vision_msgs

    store = get_typestore(Stores.ROS2_KILTED)
    own = find_msg_dir()
    types: dict = {}
    for name in MSG_FILES:
        types.update(get_types_from_msg((own / f"{name}.msg").read_text(), f"qvl_ros/msg/{name}"))
    store.register(types)
    return store, register_vision_msgs(store, msg_dir)


def _image_typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


# ----------------------------------------------------------------------------------------- input
@dataclass
class CameraTopic:
    """One requested camera topic: its type and where it is recorded."""

    topic: str
    msgtype: str  # IMAGE_TYPE or COMPRESSED_TYPE
    count: int = 0  # messages recorded on it, over all inputs
    connections: list = field(default_factory=list)

    @property
    def compressed(self) -> bool:
        return self.msgtype == COMPRESSED_TYPE

    @property
    def short_type(self) -> str:
        return self.msgtype.rsplit("/", 1)[-1]


def _open_reader(path: Path):
    from rosbags.rosbag2 import Reader, ReaderError

    if not path.exists():
        raise BagInputError(f"input not found: {path}")
    try:
        reader = Reader(path)
        reader.open()
    except FileNotFoundError as exc:  # a directory without metadata.yaml
        raise BagInputError(f"cannot read {path}: not a rosbag2 recording ({exc})") from None
    except (ReaderError, OSError, ValueError, KeyError, TypeError) as exc:
        raise BagInputError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # storage plugins raise their own errors on corrupt files
        raise BagInputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    return reader


class CameraBags:
    """The requested camera topics of one or more rosbag2 recordings, read in time order.

    Use as a context manager (or call :meth:`close`). Raises :class:`BagInputError` for a
    missing or unreadable input, a topic recorded in none of the inputs, or a topic whose type
    is not an image type (or differs between inputs).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], topics: Sequence[str]) -> None:
        if not paths:
            raise BagInputError("no input recording given")
        if not topics:
            raise BagInputError("no camera topic given")
        if len(set(topics)) != len(topics):
            raise BagInputError(f"a topic is given twice: {list(topics)}")
        self.paths = [Path(p) for p in paths]
        for path in self.paths:
            if not path.exists():
                raise BagInputError(f"input not found: {path}")
        self.readers: list = []
        try:
            for path in self.paths:
                self.readers.append(_open_reader(path))
            self.cameras = self._find_topics(list(topics))
        except BaseException:
            self.close()
            raise
        self._store = _image_typestore()
        self._deserializers = [self._store.get_msgdef(c.msgtype) for c in self.cameras]
        self.damaged: list[str] = []  # "file: chunk at byte N (M messages): reason", skipped

    def _find_topics(self, topics: list[str]) -> list[CameraTopic]:
        found: dict[str, CameraTopic] = {}
        available: dict[str, str] = {}
        for path, reader in zip(self.paths, self.readers):
            for conn in reader.connections:
                available.setdefault(conn.topic, conn.msgtype)
                if conn.topic not in topics:
                    continue
                cam = found.get(conn.topic)
                if conn.msgtype not in IMAGE_TYPES:
                    raise BagInputError(
                        f"topic {conn.topic} in {path} has type {conn.msgtype}; expected "
                        f"{IMAGE_TYPE} or {COMPRESSED_TYPE}")
                if cam is None:
                    cam = found[conn.topic] = CameraTopic(conn.topic, conn.msgtype)
                elif cam.msgtype != conn.msgtype:
                    raise BagInputError(
                        f"topic {conn.topic} has type {cam.msgtype} in one input and "
                        f"{conn.msgtype} in {path}")
                cam.connections.append(conn)
                cam.count += int(conn.msgcount)
        missing = [t for t in topics if t not in found]
        if missing:
            listing = ", ".join(f"{t} ({ty.rsplit('/', 1)[-1]})" for t, ty in sorted(available.items()))
            where = ", ".join(str(p) for p in self.paths)
            raise BagInputError(
                f"topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found in {where}; "
                f"recorded topics: {listing or 'none'}")
        return [found[t] for t in topics]

    # ------------------------------------------------------------------------------ queries
    @property
    def start_ns(self) -> int:
        """Earliest recording time over all inputs (ns)."""
        return min(r.start_time for r in self.readers)

    @property
    def end_ns(self) -> int:
        """Latest recording time over all inputs (ns, exclusive)."""
        return max(r.end_time for r in self.readers)

    def estimated_frames(self, start_ns: int | None = None, stop_ns: int | None = None) -> int:
        """Number of camera messages to read, scaled by the share of the time range requested."""
        total = sum(c.count for c in self.cameras)
        t0, t1 = self.start_ns, self.end_ns
        if t1 <= t0 or (start_ns is None and stop_ns is None):
            return total
        lo = max(t0, start_ns if start_ns is not None else t0)
        hi = min(t1, stop_ns if stop_ns is not None else t1)
        return int(round(total * max(0, hi - lo) / (t1 - t0)))

    # ------------------------------------------------------------------------------ reading
    def records(self, start_ns: int | None = None, stop_ns: int | None = None
                ) -> Iterator[tuple[int, int, bytes]]:
        """(camera index, recording time ns, serialized message) in recording-time order.

        ``start_ns`` is inclusive, ``stop_ns`` exclusive (recording time).
        """
        topic_index = {cam.topic: k for k, cam in enumerate(self.cameras)}
        streams = []
        for reader in self.readers:
            conns = [c for c in reader.connections if c.topic in topic_index]
            if conns:
                streams.append(self._stream(reader, conns, topic_index, start_ns, stop_ns))
        if len(streams) == 1:
            yield from streams[0]
        else:
            yield from heapq.merge(*streams, key=lambda rec: rec[1])

    def _stream(self, reader, conns, topic_index, start_ns, stop_ns):
        messages = _chunk_tolerant_messages(reader, conns, start_ns, stop_ns, self.damaged.append)
        if messages is None:  # not mcap, or a layout read as a whole
            messages = reader.messages(connections=conns, start=start_ns, stop=stop_ns)
        for conn, t, raw in messages:
            yield topic_index[conn.topic], t, raw

    def deserialize(self, k: int, raw: bytes | memoryview) -> Any:
        """Message object of camera ``k`` (fields as in sensor_msgs; ``data`` is a numpy view)."""
        msgdef = self._deserializers[k]
        from rosbags.serde import SerdeError

        try:
            # A memoryview: rosbags slices off the CDR header with raw[4:], which copies bytes
            # but not a memoryview, so `data` stays a view of the record.
            return self._store.deserialize_cdr(memoryview(raw), msgdef.name)
        except (SerdeError, ValueError, IndexError, TypeError) as exc:
            raise ValueError(f"cannot deserialize {msgdef.name}: {exc}") from None

    def close(self) -> None:
        readers, self.readers = self.readers, []
        for reader in readers:
            try:
                reader.close()
            except Exception:
                pass

    def __enter__(self) -> "CameraBags":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mcap_storages(reader, conns):
    """[(McapReader, {storage connection id: reader connection})] of a rosbags Reader, or None
    when any storage is not an indexed, chunk-compressed-or-plain mcap file."""
    from rosbags.rosbag2.storage_mcap import McapReader

    top = reader.storage
    if isinstance(top, McapReader):
        pairs = [(top, {c.id: c for c in conns})]
    else:
        storages = getattr(top, "storages", None)
        meta = getattr(top, "metadata", None)
        if not storages or getattr(meta, "compression_mode", "") == "message":
            return None
        pairs = []
        for storage in storages:
            connmap = {}
            for sc in getattr(storage, "connections", []):
                match = next((c for c in conns if c.topic == sc.topic and c.msgtype == sc.msgtype), None)
                if match is not None:
                    connmap[sc.id] = match
            pairs.append((storage, connmap))
    if not all(isinstance(st, McapReader) and st.chunks for st, _ in pairs):
        return None
    return pairs


def _chunk_tolerant_messages(reader, conns, start_ns, stop_ns, report):
    """Messages of an mcap recording in time order, like ``reader.messages``, except that a
    chunk that cannot be read (bad CRC, sizes or records) is reported through ``report`` with
    its file and byte offset and skipped, instead of ending the whole read. None when the
    recording is not indexed mcap (then the caller reads it the ordinary way).

    Built on rosbags' mcap reader (its chunk index and per-chunk reader, ``msgsrc``)."""
    try:
        from rosbags.rosbag2.storage_mcap import msgsrc
        pairs = _mcap_storages(reader, conns)
    except (ImportError, AttributeError):
        return None
    if pairs is None:
        return None
    return _tolerant_iter(pairs, msgsrc, start_ns, stop_ns, report)


def _tolerant_iter(pairs, msgsrc, start_ns, stop_ns, report):
    def guarded(source, path, chunk, wanted):
        try:
            yield next(source)  # a marker with the chunk's start time (nothing read yet)
            yield from source  # the chunk is read, checked and parsed here
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            report(f"{path}: chunk at byte {chunk.chunk_start_offset} ({wanted} camera messages, "
                   f"{chunk.message_start_time / 1e9:.3f}-{chunk.message_end_time / 1e9:.3f} s): "
                   f"{type(exc).__name__}: {reason}")

    for storage, connmap in pairs:
        channel_map = {sc.id: sc for sc in storage.connections if sc.id in connmap}
        if not channel_map:
            continue
        sources = []
        for x in storage.chunks:
            wanted = sum(x.channel_count.get(cid, 0) for cid in channel_map)
            if wanted and (start_ns is None or start_ns <= x.message_end_time) and \
                    (stop_ns is None or x.message_start_time < stop_ns):
                lo = x.message_start_time if start_ns is None else start_ns
                hi = x.message_end_time + 1 if stop_ns is None else stop_ns
                sources.append(guarded(msgsrc(x, channel_map, lo, hi, storage.bio),
                                       getattr(storage, "path", "?"), x, wanted))
        for timestamp, offset, sconn, data in heapq.merge(*sources):
            if offset:
                yield connmap[sconn.id], timestamp, data


# ---------------------------------------------------------------------------------------- output
class RosbagsKit:
    """The message constructors of a rosbags typestore, for
    :func:`qvl_ros.ros.feature_msgs.features_fields` (the node builds the same fields with rclpy's)."""

    def __init__(self, store) -> None:
        t = store.types
        self._time, self._header = t["builtin_interfaces/msg/Time"], t["std_msgs/msg/Header"]
        self._input, self._row = t["qvl_ros/msg/CameraInput"], t["qvl_ros/msg/RowRange"]
        self.VisionFeatures, self.Caption = t[VISION_FEATURES_TYPE], t[CAPTION_TYPE]

    def time(self, ns: int):
        sec, nanosec = sec_nanosec(ns)
        return self._time(sec=sec, nanosec=nanosec)

    def header(self, ns: int, frame_id: str):
        return self._header(stamp=self.time(ns), frame_id=frame_id)

    def camera_input(self, header, g):
        return self._input(header=header, height=g.height, width=g.width,
                           grid_thw=np.asarray(g.grid, dtype=np.uint32))

    def row_range(self, source: str, start: int, count: int):
        return self._row(source=source, start=start, count=count)


class FeatureBagWriter:
    """mcap rosbag2 with /qvl/features (VisionFeatures) and optionally /qvl/caption (Caption).

    Each message is written with recording time = its header stamp (the set's stamp). The
    bag is valid once :meth:`close` has run; call it in a ``finally``.
    """

    def __init__(self, path: str | os.PathLike, captions: bool = False,
                 custom_data: dict[str, str] | None = None, detection_cameras: Sequence[str] = (),
                 vision_msgs: str | os.PathLike | None = None) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        self.vision = None  # vision_msgs' classes of this store, with detections
        if detection_cameras:
            self.store, self.vision = _detection_typestore(Path(vision_msgs) if vision_msgs else vision_msgs_dir())
        else:
            self.store = qvl_typestore()
        self._writer = Writer(self.path, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP)
        for key, value in (custom_data or {}).items():
            self._writer.set_custom_data(key, value)
        self._writer.open()
        self._features = self._writer.add_connection(FEATURES_TOPIC, VISION_FEATURES_TYPE, typestore=self.store)
        self._caption = (self._writer.add_connection(CAPTION_TOPIC, CAPTION_TYPE, typestore=self.store)
                         if captions else None)
        self._detections = {detections_topic(c): self._writer.add_connection(detections_topic(c), DETECTION_ARRAY_TYPE,
                                                                            typestore=self.store)
                            for c in detection_cameras}
        self._types = self.store.types
        self._kit = RosbagsKit(self.store)
        self.counts = {FEATURES_TOPIC: 0, CAPTION_TOPIC: 0, **{t: 0 for t in self._detections}}

    def feature_tensor(self, name: str, dtype: str, shape: Sequence[int], data: np.ndarray):
        """rosbags FeatureTensor from the storage bytes (``data`` a uint8 array)."""
        return self._types[FEATURE_TENSOR_TYPE](
            name=name, dtype=dtype, shape=np.asarray(shape, dtype=np.uint32), data=data)

    def write_features(self, info: SetInfo, tensors: Sequence, hidden_rows: Sequence = ()) -> None:
        """One VisionFeatures message of a set (``tensors``: FeatureTensor messages of this store)."""
        msg = self._kit.VisionFeatures(**features_fields(self._kit, info, tensors, hidden_rows))
        self._writer.write(self._features, max(info.stamps_ns), self.store.serialize_cdr(msg, VISION_FEATURES_TYPE))
        self.counts[FEATURES_TOPIC] += 1

    def write_caption(self, info: SetInfo, text: str) -> None:
        if self._caption is None:
            raise RuntimeError("this writer was opened without a caption topic")
        msg = self._kit.Caption(**caption_fields(self._kit, info, text))
        self._writer.write(self._caption, max(info.stamps_ns), self.store.serialize_cdr(msg, CAPTION_TYPE))
        self.counts[CAPTION_TOPIC] += 1

    def write_detections(self, camera: str, cam, stamp_ns: int, frame_id: str, time_ns: int) -> None:
        """One camera's detections of a set (``cam``: model.detect's CameraDetections) with that
        camera's input header, recorded at ``time_ns`` (the set's stamp, as its features)."""
        from ..ros.detection_msgs import detection_array

        topic = detections_topic(camera)
        if topic not in self._detections:
            raise RuntimeError(f"this writer was opened without the topic {topic}")
        msg = detection_array(self.vision, cam, stamp_ns, frame_id)
        self._writer.write(self._detections[topic], time_ns, self.store.serialize_cdr(msg, DETECTION_ARRAY_TYPE))
        self.counts[topic] += 1

    def write_raw(self, topic: str, time_ns: int, raw: bytes) -> None:
        """A message already serialized (a shard bag's, when merging) on one of this writer's topics."""
        conn = {FEATURES_TOPIC: self._features, CAPTION_TOPIC: self._caption, **self._detections}.get(topic)
        if conn is None:
            raise ValueError(f"this writer has no topic {topic}")
        self._writer.write(conn, time_ns, raw)
        self.counts[topic] += 1

    def close(self) -> None:
        """Write the mcap summary and metadata.yaml; idempotent."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
