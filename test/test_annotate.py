"""Detections drawn on frames, against OpenCV: each box pixel is what cv2.rectangle (thickness 1,
once per nested outline) draws with the same colour, every other pixel is untouched; points are
filled squares as cv2.rectangle(..., thickness=-1) fills them; labels only add pixels near their box."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qvl_ros.core.annotate import colour_for, draw_detections
from qvl_ros.model.grounding import Detection

cv2 = pytest.importorskip("cv2")


def _reference(frame: torch.Tensor, boxes, thickness: int) -> np.ndarray:
    ref = np.ascontiguousarray(frame.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    for label, (x1, y1, x2, y2) in boxes:
        x1, y1, x2, y2 = (int(round(v)) for v in (x1, y1, x2, y2))
        for i in range(thickness):
            if x1 + i <= x2 - i and y1 + i <= y2 - i:
                cv2.rectangle(ref, (x1 + i, y1 + i), (x2 - i, y2 - i), colour_for(label), 1)
    return ref


@pytest.mark.parametrize("thickness", [1, 3])
def test_boxes_match_opencv(thickness):
    g = torch.Generator().manual_seed(thickness)
    frame = torch.randint(0, 256, (3, 120, 160), generator=g, dtype=torch.uint8)
    boxes = [("cup", (10.4, 20.6, 70.2, 90.0)), ("chair", (0.0, 0.0, 159.0, 119.0)),
             ("door", (150.0, 100.0, 200.0, 200.0)), ("dot", (40.0, 40.0, 40.0, 40.0))]
    dets = [Detection(label=l, box=b, point=None, score=0.5, logprob=-0.7) for l, b in boxes]
    out = draw_detections(frame, dets, thickness=thickness, labels=False)
    ref = _reference(frame, boxes, thickness)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), ref)
    assert torch.equal(frame, torch.randint(0, 256, (3, 120, 160), generator=torch.Generator().manual_seed(thickness),
                                            dtype=torch.uint8)), "the input frame was changed"


def test_points_are_filled_squares_as_opencv_fills_them():
    frame = torch.zeros(3, 50, 60, dtype=torch.uint8)
    dets = [Detection(label="p", box=None, point=(10.2, 20.7), score=0.9, logprob=-0.1),
            Detection(label="edge", box=None, point=(59.0, 0.0), score=0.9, logprob=-0.1)]
    out = draw_detections(frame, dets, point_radius=2, labels=False)
    ref = np.zeros((50, 60, 3), np.uint8)
    for d in dets:
        x, y = (int(round(v)) for v in d.point)
        cv2.rectangle(ref, (x - 2, y - 2), (x + 2, y + 2), colour_for(d.label), -1)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), ref)


def test_labels_touch_only_pixels_near_their_box():
    frame = torch.zeros(3, 200, 300, dtype=torch.uint8)
    det = Detection(label="cup", box=(100.0, 100.0, 180.0, 160.0), point=None, score=0.75, logprob=-0.3)
    boxes_only = draw_detections(frame, [det], labels=False)
    with_labels = draw_detections(frame, [det], labels=True)
    changed = (with_labels != boxes_only).any(0).nonzero()
    assert len(changed) > 0, "no label was drawn"
    ys, xs = changed[:, 0], changed[:, 1]
    assert ys.max() < 100 and ys.min() >= 80 and xs.min() >= 100, "label pixels away from the box's top-left"


def test_bad_frames_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(torch.zeros(3, 4, 4), [])
    with pytest.raises(ValueError, match="thickness"):
        draw_detections(torch.zeros(3, 4, 4, dtype=torch.uint8), [], thickness=0)
