"""Low-precision error of qvl_ros and of transformers against transformers in float32.

Both run the same checkpoint on the same uint8 frames and conversation (one sample of N cameras);
the reference is transformers' own model in float32 with its own processor. Metric, as in
test/test_model.py: mean(|x - ref| / (|ref| + 1)) over vision features and decoder hidden states.
Imports only torch, transformers and qvl_ros.model, so it runs where ROS is absent.
"""
from __future__ import annotations

import torch

from qvl_ros.model import BatchedQwenVL


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return ((x - ref).abs() / (ref.abs() + 1)).mean().item()


def reference_class(path):
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    kind = AutoConfig.from_pretrained(str(path)).model_type
    return Qwen2_5_VLForConditionalGeneration if kind == "qwen2_5_vl" else Qwen2VLForConditionalGeneration


def reference_inputs(proc, cams: list, prompt: str) -> dict:
    """transformers' processor inputs for one sample: cams are uint8 (3, H, W) tensors on the CPU."""
    conv = [{"role": "user", "content": [{"type": "image"}] * len(cams) + [{"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    return proc(text=[text], images=[im.permute(1, 2, 0).numpy() for im in cams], return_tensors="pt")


@torch.inference_mode()
def reference_features(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(vision tokens of all images (T, D), last hidden state (L, D)) of a transformers model."""
    dev = model.device
    inp = {k: v.to(dev) for k, v in inputs.items()}
    hidden = model.model(**inp).last_hidden_state[0]
    vis = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    vis = getattr(vis, "pooler_output", vis)
    vis = torch.cat(list(vis)) if isinstance(vis, (list, tuple)) else vis
    return vis.float(), hidden.float()


def ours_features(model: BatchedQwenVL, cams: list, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = model.encode([cams], [prompt])
    return torch.cat(f.vision[0]).float(), f.hidden[0].float()


def low_precision_errors(path, cams: list, prompt: str = "Describe the scene.", device="cpu",
                         dtype=torch.bfloat16, models: dict | None = None) -> dict:
    """{"ours": {"vision": e, "hidden": e}, "transformers": {...}} against transformers float32.

    `models` may hold already loaded {"ref32", "ref", "ours"} to skip loading them here."""
    from transformers import AutoProcessor

    models = dict(models or {})
    cls = reference_class(path)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
    try:
        inputs = reference_inputs(AutoProcessor.from_pretrained(str(path)), cams, prompt)
        ref32 = models.get("ref32") or cls.from_pretrained(str(path), dtype=torch.float32,
                                                      attn_implementation="sdpa").to(device).eval()
        v32, h32 = reference_features(ref32, inputs)
        models.pop("ref32", None)
        del ref32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    ref = models.get("ref") or cls.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").to(device).eval()
    v, h = reference_features(ref, inputs)
    del ref
    ours = models.get("ours") or BatchedQwenVL.from_pretrained(path, device=device, dtype=dtype)
    ov, oh = ours_features(ours, [c.to(device) for c in cams], prompt)
    v32, h32 = v32.to(ov.device), h32.to(ov.device)
    return {"ours": {"vision": rel_err(ov, v32), "hidden": rel_err(oh, h32)},
            "transformers": {"vision": rel_err(v.to(ov.device), v32), "hidden": rel_err(h.to(ov.device), h32)}}
