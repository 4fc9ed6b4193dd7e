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

from typing import Any, Collection, List, NamedTuple, Optional, Sequence, Tuple

from ..core.stamps import sec_nanosec, stamp_ns  # noqa: F401  (stamp_ns re-exported)
from .tensor_msg import from_tensor

FEATURE_KINDS = ("vision", "hidden")


class Frame(NamedTuple):
    """One camera frame in a synchronized set: the uint8 (3, H, W) tensor and the input header."""

    image: Any
    header: Any


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


def camera_input_msgs(headers: Sequence[Any], geometry: Sequence[Geometry]) -> list:
    from qvl_ros.msg import CameraInput

    return [CameraInput(header=h, height=g.height, width=g.width, grid_thw=list(g.grid))
            for h, g in zip(headers, geometry)]


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


def _set_fields(msg, camera_names, camera_stamps_ns, model: str, prompt: str, frame_id: str, inputs=None):
    """The fields VisionFeatures and Caption share: header (newest stamp), cameras, model,
    prompt and, when given, the per-camera ``inputs`` (CameraInput messages)."""
    msg.header.stamp = time_msg(max(camera_stamps_ns))
    msg.header.frame_id = frame_id
    msg.camera_names = list(camera_names)
    msg.camera_stamps = [time_msg(s) for s in camera_stamps_ns]
    msg.model = model
    msg.prompt = prompt
    if inputs is not None:
        msg.inputs = list(inputs)
    return msg


def hidden_rows_msgs(features, b: int, vision_token_ids: Collection[int], camera_names: Sequence[str]) -> list:
    """RowRange messages for the ``hidden`` tensor of sample b (its real, unpadded tokens)."""
    from qvl_ros.msg import RowRange

    n_real = int(features.attention_mask[b].sum())
    ids = features.input_ids[b, features.input_ids.shape[1] - n_real:].tolist()  # once per set
    return [RowRange(source=src, start=start, count=count)
            for src, start, count in hidden_row_ranges(ids, vision_token_ids, camera_names)]


def vision_features_msg(features, b: int, camera_names: Sequence[str], camera_stamps_ns: Sequence[int],
                        kinds: Sequence[str], model: str, prompt: str, frame_id: str = "",
                        clip_stamps_ns: Sequence[Sequence[int]] = (), *, inputs: Optional[Sequence[Any]] = None,
                        vision_token_ids: Collection[int] = ()):
    """``clip_stamps_ns``: per camera, its clip's frame stamps (oldest first), empty for stills;
    ``inputs``: CameraInput messages of the set; ``vision_token_ids``: fill ``hidden_rows``."""
    from qvl_ros.msg import VisionFeatures

    msg = _set_fields(VisionFeatures(), camera_names, camera_stamps_ns, model, prompt, frame_id, inputs)
    if clip_stamps_ns:
        msg.clip_frames = len(clip_stamps_ns[0])
        msg.clip_stamps = [time_msg(s) for clip in clip_stamps_ns for s in clip]
    msg.tensors = [from_tensor(name, t) for name, t in sample_tensors(features, b, camera_names, kinds)]
    if "hidden" in kinds and vision_token_ids:
        msg.hidden_rows = hidden_rows_msgs(features, b, vision_token_ids, camera_names)
    return msg


def caption_msg(text: str, camera_names: Sequence[str], camera_stamps_ns: Sequence[int], model: str,
                prompt: str, frame_id: str = "", *, inputs: Optional[Sequence[Any]] = None):
    from qvl_ros.msg import Caption

    msg = _set_fields(Caption(), camera_names, camera_stamps_ns, model, prompt, frame_id, inputs)
    msg.text = ros_string(text)
    return msg
