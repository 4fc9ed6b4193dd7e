"""Build VisionFeatures / Caption messages from model output (shared by the node and extraction).

One message per synchronized set `b` of a batch: `vision/<camera>` tensors of shape (tokens, D)
and, when requested, `hidden` of shape (L_b, D) for the sample's real (unpadded) tokens. The
header stamp is the newest camera stamp; every camera's own stamp is copied.

Provenance (``inputs``, ``hidden_rows``): per camera its full input header, the image size the
model saw and the vision grid (from the model's processor, the same resize rule the model runs);
for ``hidden`` the runs of rows that are text or one camera's image tokens, read off the
sample's input ids (image placeholder tokens, in camera order).
"""
from __future__ import annotations

from typing import Any, Collection, List, NamedTuple, Sequence, Tuple

from ..core.stamps import sec_nanosec, stamp_ns  # noqa: F401  (stamp_ns re-exported)

FEATURE_KINDS = ("vision", "hidden")


class Geometry(NamedTuple):
    """How the model sees one camera: resized (height, width) and vision grid (t, h, w)."""

    height: int
    width: int
    grid: Tuple[int, int, int]


def input_geometry(model, height: int, width: int, frames: int = 1) -> Geometry:
    """The model's input size and vision grid for a (height, width) frame, or a clip of ``frames``
    such frames; zeros when the model does not expose its processor (a stand-in model)."""
    processor = getattr(model, "processor", None)
    if processor is None:
        return Geometry(0, 0, (0, 0, 0))
    cfg = processor.cfg
    if frames > 1:
        th, tw = processor.clip_target_size(int(height), int(width), int(frames))
        t = -(-int(frames) // int(cfg.temporal_patch_size))  # odd T is padded with its last frame
    else:
        th, tw = processor.target_size(int(height), int(width))
        t = 1
    p = int(cfg.patch_size)
    return Geometry(int(th), int(tw), (t, int(th) // p, int(tw) // p))


def hidden_row_ranges(ids: Sequence[int], vision_token_ids: Collection[int],
                      camera_names: Sequence[str]) -> List[Tuple[str, int, int]]:
    """[(source, start, count)] over the real tokens ``ids`` of one sample: maximal runs of text
    tokens ("text") and of vision placeholder tokens (image or clip), the k-th run being camera k."""
    vision = set(vision_token_ids)
    out: List[Tuple[str, int, int]] = []
    k = 0
    start = 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and (ids[i] in vision) == (ids[start] in vision):
            continue
        if ids[start] in vision:
            name = camera_names[k] if k < len(camera_names) else f"image_{k}"
            out.append((f"vision/{name}", start, i - start))
            k += 1
        else:
            out.append(("text", start, i - start))
        start = i
    return out


def ros_string(text: str) -> str:
    """Text safe for a ROS string field: those end at a NUL byte, and a model may emit one."""
    return text.replace("\x00", "")


def time_msg(stamp_ns: int):
    from builtin_interfaces.msg import Time

    sec, nanosec = sec_nanosec(stamp_ns)
    return Time(sec=sec, nanosec=nanosec)


def check_kinds(kinds: Sequence[str]) -> list[str]:
    bad = [k for k in kinds if k not in FEATURE_KINDS]
    if bad or not kinds:
        raise ValueError(f"features must be a non-empty subset of {FEATURE_KINDS}, got {list(kinds)}")
    return list(kinds)


def sample_tensors(features, b: int, camera_names: Sequence[str], kinds: Sequence[str]) -> list:
    """[(name, tensor on the host)] for sample b: vision/<camera> (tokens, D), hidden (L_b, D).

    One device-to-host copy per tensor; `hidden` drops the left padding."""
    out = []
    if "vision" in kinds:
        for name, t in zip(camera_names, features.vision[b]):
            out.append((f"vision/{name}", t.detach().to("cpu")))
    if "hidden" in kinds:
        n_real = int(features.attention_mask[b].sum())
        out.append(("hidden", features.hidden[b, features.hidden.shape[1] - n_real:].detach().to("cpu")))
    return out


class MessageKit:
    """The constructors of one message library: rclpy's generated classes (this class) or
    rosbags' typestore (:class:`qvl_ros.offline.bag_io.RosbagsKit`). :func:`features_fields`
    and :func:`caption_fields` say once what a set's messages hold; a kit only builds them."""

    def __init__(self) -> None:
        from builtin_interfaces.msg import Time
        from qvl_ros.msg import CameraInput, Caption, RowRange, VisionFeatures
        from std_msgs.msg import Header

        self._time, self._header, self._input, self._row = Time, Header, CameraInput, RowRange
        self.VisionFeatures, self.Caption = VisionFeatures, Caption

    def time(self, ns: int):
        sec, nanosec = sec_nanosec(ns)
        return self._time(sec=sec, nanosec=nanosec)

    def header(self, ns: int, frame_id: str):
        return self._header(stamp=self.time(ns), frame_id=frame_id)

    def camera_input(self, header, g: Geometry):
        return self._input(header=header, height=g.height, width=g.width, grid_thw=list(g.grid))

    def row_range(self, source: str, start: int, count: int):
        return self._row(source=source, start=start, count=count)


class SetInfo(NamedTuple):
    """What the messages of one synchronized set say besides the tensors and the text."""

    camera_names: Sequence[str]
    stamps_ns: Sequence[int]        # each camera's matched stamp (the set's stamp is the newest)
    model: str
    prompt: str
    frame_id: str
    input_headers: Sequence[Tuple[int, str]]  # per camera: its input header's (stamp ns, frame_id)
    geometry: Sequence[Geometry]    # per camera: model input size and vision grid
    clip_stamps_ns: Sequence[Sequence[int]] = ()  # per camera, its clip's stamps; () for stills


def _shared_fields(kit, info: SetInfo) -> dict:
    return dict(header=kit.header(max(info.stamps_ns), info.frame_id), camera_names=list(info.camera_names),
                camera_stamps=[kit.time(s) for s in info.stamps_ns], model=info.model, prompt=info.prompt,
                inputs=[kit.camera_input(kit.header(ns, fid), g)
                        for (ns, fid), g in zip(info.input_headers, info.geometry)])


def features_fields(kit, info: SetInfo, tensors: Sequence[Any], hidden_rows: Sequence[Tuple[str, int, int]]) -> dict:
    """Every field of a VisionFeatures message, built with ``kit``; ``tensors`` already messages."""
    clips = info.clip_stamps_ns
    return dict(_shared_fields(kit, info), tensors=list(tensors),
                hidden_rows=[kit.row_range(*r) for r in hidden_rows],
                clip_frames=len(clips[0]) if clips else 0,
                clip_stamps=[kit.time(s) for clip in clips for s in clip])


def caption_fields(kit, info: SetInfo, text: str) -> dict:
    """Every field of a Caption message, built with ``kit``."""
    return dict(_shared_fields(kit, info), text=ros_string(text))


def hidden_rows_of(features, b: int, vision_token_ids: Collection[int], camera_names: Sequence[str],
                   kinds: Sequence[str]) -> list:
    """(source, start, count) runs of sample b's ``hidden`` rows; empty when it is not published."""
    if "hidden" not in kinds or not vision_token_ids:
        return []
    n_real = int(features.attention_mask[b].sum())
    ids = features.input_ids[b, features.input_ids.shape[1] - n_real:].tolist()  # once per set
    return hidden_row_ranges(ids, vision_token_ids, camera_names)


def placeholder_token_ids(model) -> tuple:
    """The placeholder token ids of images and clips in the model's input ids."""
    cfg = getattr(model, "cfg", None)
    return tuple(t for t in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
                 if t is not None)


def frame_geometry(model, image, cache: dict) -> Geometry:
    """:func:`input_geometry` of a frame (3, H, W) or a clip (a list of frames), cached by size."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    key = (int(first.shape[1]), int(first.shape[2]), len(image) if first is not image else 1)
    if key not in cache:
        cache[key] = input_geometry(model, *key)
    return cache[key]


def set_info(s: Any, camera_names: Sequence[str], model, model_name: str, prompt: str, frame_id: str,
             geometry_cache: dict) -> SetInfo:
    """The :class:`SetInfo` of a synchronized set whose items are :class:`~qvl_ros.core.intake.CameraFrame` s (image or clip,
    and the input header of either message library)."""
    return SetInfo(list(camera_names), list(s.stamps), model_name, prompt, frame_id,
                   [(stamp_ns(f.header.stamp), str(f.header.frame_id)) for f in s.items],
                   [frame_geometry(model, f.image, geometry_cache) for f in s.items],
                   getattr(s, "clip_stamps", ()))
