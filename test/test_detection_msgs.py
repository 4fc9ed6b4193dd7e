"""Detections as vision_msgs/Detection2DArray: written as CDR by a rosbags typestore that knows
vision_msgs only from its .msg definitions, read back by rosbags, and equal field by field to the
library's detections (boxes as centre and size, points as zero-size boxes, the camera's header on
the array and every detection)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from qvl_ros.model.grounding import CameraDetections, Detection
from qvl_ros.ros.detection_msgs import (DETECTION_ARRAY_TYPE, detection_array, find_vision_msgs_dir,
                                        register_vision_msgs)

SHARED_SRC = Path(__file__).resolve().parents[2] / "shared" / "ros2-extra" / "src" / "vision_msgs" / "msg"


def _msg_dir():
    d = find_vision_msgs_dir(os.environ.get("QVL_VISION_MSGS_DIR") or (SHARED_SRC if SHARED_SRC.is_dir() else None))
    if d is None:
        pytest.skip("vision_msgs definitions not installed (no share/vision_msgs/msg on AMENT_PREFIX_PATH)")
    return d


def test_detection_array_roundtrips_through_rosbags_cdr():
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    t = register_vision_msgs(store, _msg_dir())
    cam = CameraDetections(
        detections=[Detection("cup", (10.0, 20.0, 50.5, 80.0), None, 0.75, -0.29),
                    Detection("door", None, (300.0, 12.0), 0.5, -0.69),
                    Detection("nothing", None, None, 0.1, -2.3)],
        text="", image_size=(480, 640), model_size=(476, 644), complete=True)
    stamp = 1_700_000_000_123_456_789
    msg = detection_array(t, cam, stamp, "front_optical")
    raw = store.serialize_cdr(msg, DETECTION_ARRAY_TYPE)
    back = store.deserialize_cdr(raw, DETECTION_ARRAY_TYPE)
    assert (back.header.stamp.sec, back.header.stamp.nanosec, back.header.frame_id) == (1_700_000_000, 123_456_789,
                                                                                        "front_optical")
    assert len(back.detections) == 2  # a detection with neither box nor point is not published
    box, point = back.detections
    assert (box.bbox.center.position.x, box.bbox.center.position.y, box.bbox.size_x, box.bbox.size_y) == \
        (30.25, 50.0, 40.5, 60.0)
    assert (point.bbox.center.position.x, point.bbox.center.position.y, point.bbox.size_x) == (300.0, 12.0, 0.0)
    for d, src, i in ((box, cam.detections[0], "0"), (point, cam.detections[1], "1")):
        assert d.header.frame_id == "front_optical" and d.header.stamp.nanosec == 123_456_789 and d.id == i
        assert [(r.hypothesis.class_id, r.hypothesis.score) for r in d.results] == [(src.label, src.score)]
        assert d.results[0].pose.pose.orientation.w == 1.0


def test_missing_definitions_are_reported_as_none(tmp_path, monkeypatch):
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    (tmp_path / "share" / "vision_msgs" / "msg").mkdir(parents=True)
    (tmp_path / "share" / "vision_msgs" / "msg" / "Point2D.msg").write_text("float64 x\nfloat64 y\n")
    assert find_vision_msgs_dir() is None  # an incomplete install is not used
