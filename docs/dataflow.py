"""Draw docs/dataflow.png: how camera frames (live topics or recorded bags) become features,
captions and answers, named by the modules that do each step. The node and extraction share the
intake (core/intake.py), the model call (core/model_call.py) and the parameter table
(core/params.py); only the inputs and outputs differ.

    scripts/run.sh python docs/dataflow.py          # rewrites docs/dataflow.png

test/test_docs.py checks that every module named here exists, so the picture cannot drift
from the tree.
"""
from __future__ import annotations

import sys
from pathlib import Path

# (column, row, module, what it does); columns: 0 inputs, 1 the shared intake, 2 the model call, 3 outputs
BOXES = [
    (0, 0, "qvl_ros.ros.pipeline", "node: camera topics\nImage / CompressedImage\n(arrival = ROS clock)"),
    (0, 1, "qvl_ros.offline.bag_io", "extract: rosbag2\nrecordings (sqlite3, mcap)"),
    (0, 2, "qvl_ros.offline.set_source", "recording order\n(arrival = recording time)"),
    (0, 3, "qvl_ros.core.params", "one parameter table:\nnode parameters and\nextract options"),
    (1, 0, "qvl_ros.core.intake", "Intake: conversion, checks,\nstamp source, drop reasons"),
    (1, 1, "qvl_ros.core.synchronizer", "one frame per camera within\nslop; clips; max_rate"),
    (1, 2, "qvl_ros.core.batcher", "node: bounded queue\nup to batch.max_size"),
    (1, 3, "qvl_ros.offline.engine", "extract: every set,\nbatches on the window grid"),
    (2, 0, "qvl_ros.core.model_call", "call_model: prompt,\nclips + fps, token limit"),
    (2, 1, "qvl_ros.model.processor", "smart_resize, patchify,\nchat template, M-RoPE ids"),
    (2, 2, "qvl_ros.model.model", "BatchedQwenVL: vision tower +\ntext model over B x N at once"),
    (2, 3, "qvl_ros.model.grounding", "detect: boxes in\ncamera pixels"),
    (3, 0, "qvl_ros.ros.feature_msgs", "features, caption\n(VisionFeatures, Caption)"),
    (3, 1, "qvl_ros.ros.ask", "~/ask answers\n(between batches)"),
    (3, 2, "qvl_ros.offline.extract", "output bag (mcap)\n+ export arrays"),
    (3, 3, "qvl_ros.core.diagnostics", "/diagnostics\nrates, latency, drops"),
]
ARROWS = [
    ("qvl_ros.ros.pipeline", "qvl_ros.core.intake"), ("qvl_ros.offline.bag_io", "qvl_ros.offline.set_source"),
    ("qvl_ros.offline.set_source", "qvl_ros.core.intake"), ("qvl_ros.core.intake", "qvl_ros.core.synchronizer"),
    ("qvl_ros.core.synchronizer", "qvl_ros.core.batcher"), ("qvl_ros.core.params", "qvl_ros.offline.engine"),
    ("qvl_ros.offline.set_source", "qvl_ros.offline.engine"),
    ("qvl_ros.core.batcher", "qvl_ros.core.model_call"), ("qvl_ros.offline.engine", "qvl_ros.core.model_call"),
    ("qvl_ros.core.model_call", "qvl_ros.model.processor"), ("qvl_ros.model.processor", "qvl_ros.model.model"),
    ("qvl_ros.model.model", "qvl_ros.model.grounding"), ("qvl_ros.core.model_call", "qvl_ros.ros.feature_msgs"),
    ("qvl_ros.core.model_call", "qvl_ros.ros.ask"), ("qvl_ros.core.model_call", "qvl_ros.offline.extract"),
]
COLUMNS = ["inputs (live / offline)", "one intake (core, no ROS)", "one model call -> model", "outputs"]


def draw(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    W, H, bw, bh = 4.2, 1.6, 3.4, 1.15
    fig, ax = plt.subplots(figsize=(16, 7.5), dpi=80)
    ax.set_xlim(-0.3, 4 * W)
    ax.set_ylim(-4 * H - 0.2, 0.9)
    ax.axis("off")
    centre = {}
    for col, title in enumerate(COLUMNS):
        ax.text(col * W + bw / 2, 0.55, title, ha="center", va="center", fontsize=13, weight="bold")
    colours = ["#dbe9f6", "#e3f1dc", "#fbe5cf", "#efe0f3"]
    for col, row, module, what in BOXES:
        x, y = col * W, -row * H - bh
        ax.add_patch(FancyBboxPatch((x, y), bw, bh, boxstyle="round,pad=0.05", fc=colours[col], ec="#555"))
        ax.text(x + bw / 2, y + bh - 0.22, module, ha="center", va="center", fontsize=9.5, family="monospace",
                weight="bold")
        ax.text(x + bw / 2, y + bh / 2 - 0.15, what, ha="center", va="center", fontsize=9)
        centre[module] = (x, y, bw, bh)
    for a, b in ARROWS:
        xa, ya, wa, ha_ = centre[a]
        xb, yb, wb, hb = centre[b]
        if abs(xa - xb) < 1e-6:  # same column: bottom to top
            start, end = (xa + wa / 2, ya), (xb + wb / 2, yb + hb)
        else:
            start, end = (xa + wa, ya + ha_ / 2), (xb, yb + hb / 2)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#333", lw=1.2))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("dataflow.png")
    draw(out)
    print(f"wrote {out}")
