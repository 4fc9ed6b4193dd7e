"""Build VisionFeatures / Caption messages from model output (shared by the node and extraction).

One message per synchronized set `b` of a batch: `vision/<camera>` tensors of shape (tokens, D)
and, when requested, `hidden` of shape (L_b, D) for the sample's real (unpadded) tokens. The
header stamp is the newest camera stamp; every camera's own stamp is copied.
"""
from __future__ import annotations

from typing import Sequence

from ..core.stamps import sec_nanosec, stamp_ns  # noqa: F401  (stamp_ns re-exported)
from .tensor_msg import from_tensor

FEATURE_KINDS = ("vision", "hidden")


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


def _set_fields(msg, camera_names, camera_stamps_ns, model: str, prompt: str, frame_id: str):
    """The fields VisionFeatures and Caption share: header (newest stamp), cameras, model, prompt."""
    msg.header.stamp = time_msg(max(camera_stamps_ns))
    msg.header.frame_id = frame_id
    msg.camera_names = list(camera_names)
    msg.camera_stamps = [time_msg(s) for s in camera_stamps_ns]
    msg.model = model
    msg.prompt = prompt
    return msg


def vision_features_msg(features, b: int, camera_names: Sequence[str], camera_stamps_ns: Sequence[int],
                        kinds: Sequence[str], model: str, prompt: str, frame_id: str = "",
                        clip_stamps_ns: Sequence[Sequence[int]] = ()):
    """`clip_stamps_ns`: per camera, its clip's frame stamps (oldest first); empty for stills."""
    from qvl_ros.msg import VisionFeatures

    msg = _set_fields(VisionFeatures(), camera_names, camera_stamps_ns, model, prompt, frame_id)
    if clip_stamps_ns:
        msg.clip_frames = len(clip_stamps_ns[0])
        msg.clip_stamps = [time_msg(s) for clip in clip_stamps_ns for s in clip]
    msg.tensors = [from_tensor(name, t) for name, t in sample_tensors(features, b, camera_names, kinds)]
    return msg


def caption_msg(text: str, camera_names: Sequence[str], camera_stamps_ns: Sequence[int], model: str,
                prompt: str, frame_id: str = ""):
    from qvl_ros.msg import Caption

    msg = _set_fields(Caption(), camera_names, camera_stamps_ns, model, prompt, frame_id)
    msg.text = ros_string(text)
    return msg
