"""Rotary frequencies in bfloat16 models: kept in float32, as transformers keeps them.

Rounding the frequencies to bfloat16 (8 bits of mantissa) turns the angle at position p into p
times a frequency off by up to 2^-9 relative: at p = 8,000 that is radians of error, far beyond
bfloat16's own rounding of the rotated values. The oracle is transformers: its own frequencies
(the same formula in float32) and its own model in float32 (the reference) and in bfloat16 (the
error to match) on the same weights, clip and prompt; positions reach about 8,000 (a long prompt
after an 8-frame clip). Metric as in test_model.py: mean(|x - ref| / (|ref| + 1)).
"""
from __future__ import annotations

import pytest
import torch

from bench.precision import reference_class, rel_err
from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint

pytest.importorskip("transformers")
from transformers import AutoProcessor  # noqa: E402

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
LONG_PROMPT = ("The robot drives down the corridor, past the open door on the left and the stacked boxes. " * 88)[:7900]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", family=request.param, seed=0)


def test_rotary_frequencies_stay_float32_and_equal_transformers(checkpoint):
    ref = reference_class(checkpoint).from_pretrained(str(checkpoint), dtype=torch.bfloat16)
    ours = BatchedQwenVL.from_pretrained(checkpoint, dtype=torch.bfloat16)
    theirs = {"text": ref.model.language_model.rotary_emb.inv_freq, "vision": ref.model.visual.rotary_pos_emb.inv_freq}
    for model in (ours, ours.to(torch.float16)):  # a later cast keeps them too
        for part, freq in (("text", model.decoder.inv_freq), ("vision", model.visual.inv_freq)):
            assert freq.dtype == torch.float32 and theirs[part].dtype == torch.float32, part
            assert torch.equal(freq, theirs[part]), part


def clip_inputs(proc, clip: torch.Tensor, prompt: str, fps: float) -> dict:
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    return proc(text=[text], videos=[clip.permute(0, 2, 3, 1).numpy()], return_tensors="pt", do_sample_frames=False,
                video_metadata=[{"fps": fps, "total_num_frames": clip.shape[0]}], cap_pixels_per_frame=True)


@torch.inference_mode()
def reference_run(model, inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = model.model(**inp).last_hidden_state[0]
    vis = model.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output
    return torch.cat(list(vis)).float(), hidden.float()


def test_bf16_error_at_long_positions_no_larger_than_transformers(checkpoint):
    clip = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    inp = clip_inputs(AutoProcessor.from_pretrained(str(checkpoint)), clip, LONG_PROMPT, fps=2.0)
    assert inp["input_ids"].shape[1] >= 8000
    cls = reference_class(checkpoint)
    v32, h32 = reference_run(cls.from_pretrained(str(checkpoint), dtype=torch.float32).eval(), inp)
    v16, h16 = reference_run(cls.from_pretrained(str(checkpoint), dtype=torch.bfloat16).eval(), inp)
    ours = BatchedQwenVL.from_pretrained(checkpoint, dtype=torch.bfloat16)
    feats = ours.encode([[clip]], [LONG_PROMPT], fps=2.0)
    assert torch.equal(feats.input_ids[0], inp["input_ids"][0])
    err = {"ours": {"vision": rel_err(torch.cat(feats.vision[0]), v32), "hidden": rel_err(feats.hidden[0], h32)},
           "transformers": {"vision": rel_err(v16, v32), "hidden": rel_err(h16, h32)}}
    print(f"bf16 error against float32 at positions up to {inp['input_ids'].shape[1]}: {err}")
    for part in ("vision", "hidden"):
        assert 0 < err["ours"][part] <= err["transformers"][part], (part, err)
