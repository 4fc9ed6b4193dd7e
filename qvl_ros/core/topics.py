"""Names derived from ROS topic names (shared by the node and offline extraction; no ROS import)."""
from __future__ import annotations

from typing import List, Sequence


def camera_names(topics: Sequence[str]) -> List[str]:
    """Camera names from topic names: the last path element that is not ``image*`` or
    ``compressed`` (``/robot/front/image_raw/compressed`` -> ``front``), made unique by
    prefixing parent elements (or an index) where two topics would give the same name."""
    parts = []
    for t in topics:
        p = [x for x in str(t).strip("/").split("/") if x]
        while len(p) > 1 and (p[-1] == "compressed" or p[-1].startswith("image")):
            p.pop()
        parts.append(p or ["camera"])
    names = []
    for i, p in enumerate(parts):
        depth = 1
        while True:
            name = "_".join(p[-depth:])
            clash = any("_".join(q[-depth:]) == name for j, q in enumerate(parts) if j != i)
            if not clash or depth >= len(p):
                break
            depth += 1
        names.append(name)
    seen: dict = {}
    original = list(names)
    for i, n in enumerate(original):  # still equal (identical topics): number them
        if original.count(n) > 1:
            seen[n] = seen.get(n, -1) + 1
            names[i] = f"{n}_{seen[n]}"
    return names
