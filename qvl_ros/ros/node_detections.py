"""Detections of ``qvl_node`` (``detect.*`` parameters): per set and camera a
``vision_msgs/Detection2DArray`` on ``<camera name>/detections`` (relative to the node's
namespace, as ``features``), with that camera's input header (stamp and frame_id) on the array and
on every detection, and optionally the camera's frame with the detections drawn
(``sensor_msgs/Image`` rgb8, the same header) on ``<camera name>/detections/image``.

The model call is :func:`qvl_ros.core.model_call.call_detect` (one ``model.detect`` for all sets
of a batch); this module only holds the publishers and turns its result into messages. Without
vision_msgs (:func:`qvl_ros.ros.detection_msgs.rclpy_types` raises ImportError) there are no
detections: :attr:`DetectionOutputs.unavailable` says why, and the node logs it once.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ..core.annotate import draw_detections
from ..core.stamps import stamp_ns
from .detection_msgs import detection_array, rclpy_types

__all__ = ["DetectionOutputs", "annotated_image"]


def annotated_image(image_cls: Any, frame: Any, detections: Sequence[Any], header: Any) -> Any:
    """``sensor_msgs/Image`` rgb8 of ``frame`` (uint8 (3, H, W), or a clip: its newest frame) with
    ``detections`` drawn (:func:`qvl_ros.core.annotate.draw_detections`), under ``header``."""
    if isinstance(frame, (list, tuple)):
        frame = frame[-1]
    elif frame.dim() == 4:
        frame = frame[-1]
    drawn = draw_detections(frame.cpu(), detections)
    h, w = int(drawn.shape[1]), int(drawn.shape[2])
    msg = image_cls()
    msg.header = header
    msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step = h, w, "rgb8", 0, 3 * w
    msg.data = drawn.permute(1, 2, 0).contiguous().numpy().tobytes()  # (3, H, W) -> (H, W, 3) rows
    return msg


class DetectionOutputs:
    """The detection publishers of one configured node; created on first use, destroyed at cleanup."""

    def __init__(self, node: Any, camera_names: Sequence[str], annotated: bool) -> None:
        self._node = node
        self._names = list(camera_names)
        self._annotated = bool(annotated)
        self.unavailable: Optional[str] = None
        self.types: Any = None
        try:
            self.types = rclpy_types()
        except ImportError as exc:
            self.unavailable = str(exc)
        self._arrays: Dict[int, Any] = {}
        self._images: Dict[int, Any] = {}
        self.published = 0

    @property
    def created(self) -> bool:
        return bool(self._arrays)

    def create(self) -> List[str]:
        """The publishers of every camera (once); returns the problems (a camera name that is no
        valid topic name: that camera gets no detections)."""
        from sensor_msgs.msg import Image

        if self.types is None or self._arrays:
            return []
        arrays, images, problems = {}, {}, []
        for n, name in enumerate(self._names):
            try:
                arrays[n] = self._node.create_publisher(self.types.Detection2DArray, f"{name}/detections", 10)
                if self._annotated:
                    images[n] = self._node.create_publisher(Image, f"{name}/detections/image", 10)
            except Exception as exc:  # an invalid topic name
                problems.append(f"camera {name}: {type(exc).__name__}: {exc}")
        self._images, self._arrays = images, arrays  # the worker reads _arrays: assigned last
        return problems

    def topics(self) -> List[str]:
        return [p.topic_name for p in list(self._arrays.values()) + list(self._images.values())]

    def publish(self, sets: Sequence[Any], detections: Sequence[Sequence[Any]]) -> None:
        """One array (and image) per set and camera, with the camera's input header."""
        from sensor_msgs.msg import Image

        arrays, images = self._arrays, self._images
        for s, per_camera in zip(sets, detections):
            for n, cam in enumerate(per_camera):
                item = s.items[n]
                header = item.header
                if n in arrays:
                    arrays[n].publish(detection_array(self.types, cam, stamp_ns(header.stamp), str(header.frame_id)))
                    self.published += 1
                if n in images:
                    images[n].publish(annotated_image(Image, item.image, cam.detections, header))

    def destroy(self) -> None:
        pubs = list(self._arrays.values()) + list(self._images.values())
        self._arrays, self._images = {}, {}
        for p in pubs:
            self._node.destroy_publisher(p)
