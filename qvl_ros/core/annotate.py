"""Detections drawn on a camera frame, for RViz or Foxglove: boxes, points and labels on a copy of
a uint8 (3, H, W) image, in the camera's own pixels (as `model.detect` returns them).

Boxes are `thickness` nested one-pixel rectangles inward from the box's rounded corners (the
pixels OpenCV's `cv2.rectangle(..., thickness=1)` draws for each); points are filled squares.
Labels are written with OpenCV's Hershey font when OpenCV is importable, else left out (the boxes
do not need it); `labels_available()` says which. Pure torch otherwise: no ROS here.
"""
from __future__ import annotations

import hashlib

import torch

# distinct, saturated colours (RGB); a label always gets the same one
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def colour_for(label: str) -> tuple[int, int, int]:
    """The palette colour of a label, stable across runs and processes."""
    return PALETTE[hashlib.blake2s(label.encode()).digest()[0] % len(PALETTE)]


def labels_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _rect(img: torch.Tensor, x1: int, y1: int, x2: int, y2: int, colour: torch.Tensor) -> None:
    """One-pixel rectangle outline with corners (x1, y1), (x2, y2), clipped to the image."""
    H, W = img.shape[1:]
    if x1 > x2 or y1 > y2:
        return
    xa, xb, ya, yb = max(x1, 0), min(x2, W - 1), max(y1, 0), min(y2, H - 1)
    if xa > xb or ya > yb:
        return
    c = colour.view(3, 1)  # (3,) -> (3, 1) to fill a row or column of pixels
    for y in (y1, y2):
        if 0 <= y < H:
            img[:, y, xa:xb + 1] = c
    for x in (x1, x2):
        if 0 <= x < W:
            img[:, ya:yb + 1, x] = c


def draw_detections(frame: torch.Tensor, detections, thickness: int = 2, point_radius: int = 3,
                    labels: bool = True) -> torch.Tensor:
    """A copy of `frame` (uint8 (3, H, W), RGB) with every detection drawn: a box outline of
    `thickness` pixels inward, a point as a filled square of side 2 * point_radius + 1, and the
    label with its score above the box (or point) when `labels` and OpenCV is importable."""
    if frame.dtype != torch.uint8 or frame.dim() != 3 or frame.shape[0] != 3:
        raise ValueError(f"frame must be uint8 (3, H, W), got {tuple(frame.shape)} {frame.dtype}")
    if thickness < 1 or point_radius < 0:
        raise ValueError("thickness must be >= 1 and point_radius >= 0")
    img = frame.clone()
    H, W = img.shape[1:]
    texts = []
    for d in detections:
        colour = torch.tensor(colour_for(d.label), dtype=torch.uint8, device=img.device)
        if d.box is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in d.box)
            for i in range(thickness):
                _rect(img, x1 + i, y1 + i, x2 - i, y2 - i, colour)
            anchor = (x1, y1)
        elif d.point is not None:
            x, y = (int(round(v)) for v in d.point)
            ya, yb = max(y - point_radius, 0), min(y + point_radius, H - 1)
            xa, xb = max(x - point_radius, 0), min(x + point_radius, W - 1)
            if xa <= xb and ya <= yb:
                img[:, ya:yb + 1, xa:xb + 1] = colour.view(3, 1, 1)  # (3,) -> (3, 1, 1) over the square
            anchor = (x - point_radius, y - point_radius)
        else:
            continue
        texts.append((f"{d.label} {d.score:.2f}", anchor, colour_for(d.label)))
    if labels and texts and labels_available():
        import cv2
        import numpy as np

        hwc = np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy())  # (3, H, W) -> (H, W, 3) for OpenCV
        for text, (x, y), colour in texts:
            cv2.putText(hwc, text, (max(x, 0), max(y - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
        img = torch.from_numpy(hwc).permute(2, 0, 1).contiguous().to(img.device)  # (H, W, 3) -> (3, H, W)
    return img
