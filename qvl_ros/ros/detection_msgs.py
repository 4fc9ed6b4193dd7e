"""vision_msgs/Detection2DArray messages from `model.detect`'s CameraDetections, built the same way
for rclpy (the node) and for a rosbags typestore (extraction into a bag).

One array per camera and set, with that camera's input header (stamp and frame_id) on the array
and on every detection. A box becomes `bbox` (centre and size in the camera's pixels, theta 0);
a point becomes a `bbox` of size 0 at the point. Each detection has one hypothesis: `class_id` is
the label, `score` the detection's score; the pose is left at zero (2D detections). `id` is the
detection's index in the camera's answer.

vision_msgs is not on PyPI: where it is missing, `rclpy_types()` raises ImportError with the reason
and callers run without detections; bags get the types from the installed `.msg` definitions
(`find_vision_msgs_dir`), registered in the writer's typestore.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..core.stamps import sec_nanosec

# the vision_msgs definitions a Detection2DArray needs, dependencies first
VISION_MSG_FILES = ("Point2D", "Pose2D", "BoundingBox2D", "ObjectHypothesis", "ObjectHypothesisWithPose",
                    "Detection2D", "Detection2DArray")
DETECTION_ARRAY_TYPE = "vision_msgs/msg/Detection2DArray"


def rclpy_types() -> SimpleNamespace:
    """The rclpy message classes (ImportError naming vision_msgs when it is not installed)."""
    try:
        from vision_msgs import msg as vm
    except ImportError as e:
        raise ImportError(f"vision_msgs is not installed ({e}); detections are not published") from None
    from builtin_interfaces.msg import Time
    from geometry_msgs import msg as gm
    from std_msgs.msg import Header

    return SimpleNamespace(Time=Time, Header=Header, Point=gm.Point, Quaternion=gm.Quaternion, Pose=gm.Pose,
                           PoseWithCovariance=gm.PoseWithCovariance, Point2D=vm.Point2D, Pose2D=vm.Pose2D,
                           BoundingBox2D=vm.BoundingBox2D, ObjectHypothesis=vm.ObjectHypothesis,
                           ObjectHypothesisWithPose=vm.ObjectHypothesisWithPose, Detection2D=vm.Detection2D,
                           Detection2DArray=vm.Detection2DArray)


def find_vision_msgs_dir(extra: os.PathLike | None = None) -> Path | None:
    """The installed `share/vision_msgs/msg` holding every definition needed (AMENT_PREFIX_PATH,
    then `extra`), or None."""
    roots = [Path(p) / "share" / "vision_msgs" / "msg" for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    if extra is not None:
        roots.append(Path(extra))
    for d in roots:
        if all((d / f"{n}.msg").is_file() for n in VISION_MSG_FILES):
            return d
    return None


def register_vision_msgs(store, msg_dir: os.PathLike) -> SimpleNamespace:
    """Register the vision_msgs types from `msg_dir` in a rosbags typestore; its classes back."""
    from rosbags.typesys import get_types_from_msg

    types: dict = {}
    for name in VISION_MSG_FILES:
        types.update(get_types_from_msg((Path(msg_dir) / f"{name}.msg").read_text(), f"vision_msgs/msg/{name}"))
    store.register(types)
    t = store.types
    return SimpleNamespace(Time=t["builtin_interfaces/msg/Time"], Header=t["std_msgs/msg/Header"],
                           Point=t["geometry_msgs/msg/Point"], Quaternion=t["geometry_msgs/msg/Quaternion"],
                           Pose=t["geometry_msgs/msg/Pose"], PoseWithCovariance=t["geometry_msgs/msg/PoseWithCovariance"],
                           **{n: t[f"vision_msgs/msg/{n}"] for n in VISION_MSG_FILES})


def _header(t: SimpleNamespace, stamp_ns: int, frame_id: str):
    sec, nanosec = sec_nanosec(stamp_ns)
    return t.Header(stamp=t.Time(sec=sec, nanosec=nanosec), frame_id=frame_id)


def _detection(t: SimpleNamespace, d, index: int, stamp_ns: int, frame_id: str):
    if d.box is not None:
        x1, y1, x2, y2 = (float(v) for v in d.box)
        cx, cy, sx, sy = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    else:
        (cx, cy), sx, sy = (float(v) for v in d.point), 0.0, 0.0
    pose = t.PoseWithCovariance(pose=t.Pose(position=t.Point(x=0.0, y=0.0, z=0.0),
                                            orientation=t.Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)),
                                covariance=np.zeros(36, dtype=np.float64))
    hyp = t.ObjectHypothesisWithPose(hypothesis=t.ObjectHypothesis(class_id=d.label, score=float(d.score)), pose=pose)
    bbox = t.BoundingBox2D(center=t.Pose2D(position=t.Point2D(x=cx, y=cy), theta=0.0), size_x=sx, size_y=sy)
    return t.Detection2D(header=_header(t, stamp_ns, frame_id), results=[hyp], bbox=bbox, id=str(index))


def detection_array(t: SimpleNamespace, cam, stamp_ns: int, frame_id: str):
    """A Detection2DArray of one camera's detections, with its input stamp and frame_id."""
    dets = [d for d in cam.detections if d.box is not None or d.point is not None]
    return t.Detection2DArray(header=_header(t, stamp_ns, frame_id),
                              detections=[_detection(t, d, i, stamp_ns, frame_id) for i, d in enumerate(dets)])
