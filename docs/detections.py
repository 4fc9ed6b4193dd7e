"""Draw docs/detections.png: an annotated frame, as the node's optional annotated image
(`detect.annotated_image`) shows it, drawn by qvl_ros.core.annotate.draw_detections.

    scripts/run.sh python docs/detections.py          # rewrites docs/detections.png

The frame is synthetic (a wall, a table, a cup, a chair and a door, drawn here) and the detections
are written by hand where those objects are: the bundled tiny model has random weights, so its
boxes (always well-formed, thanks to the grammar) would land anywhere. A real checkpoint's
`model.detect(frames, ["cup", "chair"])` gives the same kind of list.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qvl_ros.core.annotate import draw_detections  # noqa: E402
from qvl_ros.model.grounding import Detection  # noqa: E402

H, W = 240, 320


def _fill(img: torch.Tensor, x1: int, y1: int, x2: int, y2: int, rgb) -> None:
    img[:, y1:y2, x1:x2] = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)  # (3,) -> (3, 1, 1) over the area


def scene() -> torch.Tensor:
    """A uint8 (3, H, W) RGB room: wall and floor shading, a door, a table with a cup, a chair."""
    y = torch.linspace(0, 1, H).view(H, 1).expand(H, W)
    wall = torch.stack([200 - 40 * y, 190 - 40 * y, 170 - 30 * y])
    floor = torch.stack([150 - 30 * y, 110 - 20 * y, 80 - 20 * y])
    img = torch.where(y < 0.62, wall, floor).round().to(torch.uint8)
    _fill(img, 230, 40, 290, 150, (120, 80, 50))     # door
    _fill(img, 278, 92, 283, 98, (230, 200, 60))     # its handle
    _fill(img, 40, 118, 190, 128, (90, 60, 40))      # table top
    _fill(img, 48, 128, 56, 190, (80, 50, 30))       # table legs
    _fill(img, 174, 128, 182, 190, (80, 50, 30))
    _fill(img, 110, 96, 128, 118, (240, 240, 245))   # cup
    _fill(img, 128, 101, 133, 112, (240, 240, 245))  # its handle
    _fill(img, 200, 120, 206, 200, (60, 90, 160))    # chair: back, seat, legs
    _fill(img, 200, 155, 232, 162, (60, 90, 160))
    _fill(img, 226, 162, 232, 200, (60, 90, 160))
    return img


DETECTIONS = [
    Detection("cup", (108.0, 94.0, 135.0, 120.0), None, 0.91, -0.094),
    Detection("chair", (197.0, 117.0, 235.0, 202.0), None, 0.84, -0.174),
    Detection("door", (228.0, 38.0, 292.0, 152.0), None, 0.77, -0.261),
]


def main(out: Path = ROOT / "docs" / "detections.png") -> Path:
    from torchvision.io import write_png

    write_png(draw_detections(scene(), DETECTIONS), str(out), compression_level=9)
    return out


if __name__ == "__main__":
    print(main())
