"""Draws docs/dataflow.png: how a camera message becomes features, live (the node) and offline
(extraction), with the modules that do each step. Every box names a real module; the script
refuses to draw a name that does not import as a module of this tree (so the picture cannot
drift from the code silently).

    scripts/run.sh python docs/dataflow.py          # rewrites docs/dataflow.png
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "dataflow.png"

# name: (x, y, width, lines, colour); the first line of a box is its module (qvl_ros.<name>)
LIVE, OFFLINE, CORE, MODEL, PARAMS = "#dbe9f6", "#fbe3d0", "#e2f0d9", "#ece0f4", "#f2f2f2"
BOXES = {
    "ros.pipeline": (0.5, 9.0, 3.6, ["ros/pipeline.py  _on_frame", "one subscription per camera",
                                     "Image | CompressedImage"], LIVE),
    "offline.bag_io": (6.4, 9.0, 3.6, ["offline/bag_io.py  CameraBags", "recordings, recording-time order",
                                       "(recording time = arrival time)"], OFFLINE),
    "offline.set_source": (6.4, 7.4, 3.6, ["offline/set_source.py  SetSource", "owned window, warm-up signatures"],
                           OFFLINE),
    "core.intake": (2.6, 5.4, 5.2, ["core/intake.py  Intake.convert / push",
                                    "conversion (core/conversion.py, containers.py)",
                                    "size limits, drop reasons (core/drop_reasons.py)",
                                    "stamp source, Synchronizer (core/synchronizer.py)",
                                    "clips (core/clips.py), max_rate (core/rate_limit.py)"], CORE),
    "core.batcher": (0.5, 3.6, 3.6, ["core/batcher.py  Batcher", "bounded queue, worker thread"], LIVE),
    "offline.engine": (6.4, 3.6, 3.6, ["offline/engine.py  Extraction", "batches on the window grid"], OFFLINE),
    "ros.ask": (0.2, 1.9, 3.0, ["ros/ask.py  ~/ask", "newest set, between batches"], LIVE),
    "core.model_call": (3.6, 1.9, 4.0, ["core/model_call.py  call_model", "prompt, clips + fps, token limit"], CORE),
    "model.model": (3.6, 0.1, 4.0, ["model/model.py  BatchedQwenVL", "processor, vision, text, token_steps"],
                    MODEL),
    "ros.feature_msgs": (8.9, 1.5, 3.4, ["ros/feature_msgs.py", "features_fields, caption_fields",
                                         "node: publish / extraction:", "offline/bag_io.py FeatureBagWriter"], LIVE),
    "core.params": (10.4, 6.4, 3.2, ["core/params.py  PARAMS", "one table: name, type,", "default, range, read-only"],
                    PARAMS),
    "ros.params": (9.4, 4.7, 2.2, ["ros/params.py", "node declarations", "and checks"], LIVE),
    "offline.options": (11.7, 4.7, 2.2, ["offline/options.py", "extract options,", "--params-file"], OFFLINE),
}
ARROWS = [
    ("ros.pipeline", "core.intake", "frame, camera, arrival (ROS clock)"),
    ("offline.bag_io", "offline.set_source", ""),
    ("offline.set_source", "core.intake", "frame, camera, recording time"),
    ("core.intake", "core.batcher", "sets / clip sets"),
    ("core.intake", "offline.engine", "sets / clip sets"),
    ("core.batcher", "core.model_call", ""),
    ("offline.engine", "core.model_call", ""),
    ("ros.ask", "core.model_call", ""),
    ("core.model_call", "model.model", "encode / encode_generate / generate"),
    ("core.model_call", "ros.feature_msgs", "features, texts"),
    ("core.params", "ros.params", ""),
    ("core.params", "offline.options", ""),
]


def check_modules() -> None:
    sys.path.insert(0, str(ROOT))
    missing = [name for name in BOXES if importlib.util.find_spec(f"qvl_ros.{name}") is None]
    if missing:
        raise SystemExit(f"not modules of qvl_ros: {missing}")


def centre(name: str, side: str) -> tuple:
    x, y, w, lines, _ = BOXES[name]
    h = 0.32 * len(lines) + 0.2
    return {"top": (x + w / 2, y + h), "bottom": (x + w / 2, y), "left": (x, y + h / 2),
            "right": (x + w, y + h / 2)}[side]


def sides(a: str, b: str) -> tuple:
    ax, ay, aw, al, _ = BOXES[a]
    bx, by, bw, bl, _ = BOXES[b]
    if by + 0.32 * len(bl) + 0.2 <= ay:
        return "bottom", "top"
    return ("right", "left") if bx > ax else ("left", "right")


def draw() -> None:
    fig, ax = plt.subplots(figsize=(14, 10.5))
    for name, (x, y, w, lines, colour) in BOXES.items():
        h = 0.32 * len(lines) + 0.2
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#555555"))
        for i, text in enumerate(lines):
            ax.text(x + 0.12, y + h - 0.3 - 0.32 * i, text, fontsize=9.5, family="monospace",
                    weight="bold" if i == 0 else "normal")
    for a, b, label in ARROWS:
        sa, sb = sides(a, b)
        p, q = centre(a, sa), centre(b, sb)
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=14, color="#333333", lw=1.2))
        if label:
            ax.text(p[0] + 0.55 * (q[0] - p[0]) + 0.08, p[1] + 0.55 * (q[1] - p[1]), label, fontsize=8.5, style="italic", color="#333333")
    legend = [(LIVE, "live: qvl_node (ROS)"), (OFFLINE, "offline: qvl-ros extract"), (CORE, "core: shared, ROS-free"),
              (MODEL, "model: pure PyTorch"), (PARAMS, "the parameter table")]
    for i, (colour, text) in enumerate(legend):
        y = 9.9 - 0.42 * i
        ax.add_patch(FancyBboxPatch((10.6, y), 0.3, 0.25, boxstyle="square,pad=0", fc=colour, ec="#555555"))
        ax.text(11.05, y + 0.05, text, fontsize=9.5)
    ax.set_xlim(0, 14)
    ax.set_ylim(-0.2, 10.6)
    ax.axis("off")
    ax.set_title("qvl_ros: one intake, one model call, one parameter table for live and offline", fontsize=12)
    fig.tight_layout()
    fig.savefig(OUT, dpi=90)


if __name__ == "__main__":
    check_modules()
    draw()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
