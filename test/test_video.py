"""Clips (T, 3, H, W) through qvl_ros.model against transformers' video path on the same tiny weights.

The oracle is transformers 5.23's own processor (`videos=`, `video_metadata` with the clip's fps,
no frame sampling) and model (`pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`,
its get_rope_index), one sample at a time, on the same uint8 frames. Metric as in test_model.py:
mean(|ours - ref| / (|ref| + 1)).

Positions: the published get_rope_index continues the text after a vision block from the largest
position used so far plus one; transformers 5.23 continues from the block's start + max(h, w).
They agree unless a clip's time index outruns its height and width. Each case checks that the
positions inside every run of text or vision tokens match transformers', that every run starts
one past the largest position before it (the published rule, checked on our output), and that
where transformers follows the same rule the positions are identical; hidden states are compared
with transformers' model run on our positions where the rules differ, and on its own otherwise.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint

pytest.importorskip("transformers")
from transformers import (AutoProcessor, Qwen2_5_VLForConditionalGeneration,  # noqa: E402
                          Qwen2VLForConditionalGeneration)

REF_CLASS = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs() / (ref.float().abs() + 1)).mean().item()


@pytest.fixture(scope="module", params=list(REF_CLASS))
def setup(request, tmp_path_factory):
    family = request.param
    path = save_tiny_checkpoint(tmp_path_factory.mktemp(family) / "ckpt", family=family, seed=0)
    ref = REF_CLASS[family].from_pretrained(str(path), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(path))
    return family, ref, proc, BatchedQwenVL.from_pretrained(path)


def entries(spec, seed=0):
    """spec: per sample, per camera (T, H, W) for a clip or (H, W) for a still image."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (*s[:-2], 3, *s[-2:]), dtype=torch.uint8, generator=g) for s in cams]
            for cams in spec]


def ref_inputs(proc, cams, prompt, fps):
    kinds = [{"type": "video" if x.dim() == 4 else "image"} for x in cams]
    conv = [{"role": "user", "content": kinds + [{"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    images = [x.permute(1, 2, 0).numpy() for x in cams if x.dim() == 3]
    clips = [x.permute(0, 2, 3, 1).numpy() for x in cams if x.dim() == 4]
    meta = [{"fps": f, "total_num_frames": x.shape[0]} for x, f in zip(cams, fps) if x.dim() == 4]
    kw = dict(videos=clips, video_metadata=meta, do_sample_frames=False, cap_pixels_per_frame=True) if clips else {}
    return proc(text=[text], images=images or None, return_tensors="pt", **kw)


def ref_vision(ref, inp, cams):
    """transformers' merged tokens per camera, in camera order."""
    with torch.no_grad():
        im = iter(ref.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
                  if "pixel_values" in inp else [])
        vid = iter(ref.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output
                   if "pixel_values_videos" in inp else [])
    return [next(vid) if x.dim() == 4 else next(im) for x in cams]


def ref_positions(ref, inp):
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
            "attention_mask")
    return ref.model.get_rope_index(**{k: inp[k] for k in keys if k in inp})[0][:, 0]  # (3, n)


def check_positions(ours: torch.Tensor, theirs: torch.Tensor, token_type: torch.Tensor) -> bool:
    """Asserts the layout rules of the module docstring; True where both follow the published rule."""
    runs = [list(g) for _, g in itertools.groupby(range(len(token_type)), key=lambda i: int(token_type[i]))]
    same_rule = True
    for k, run in enumerate(runs):
        a, b = ours[:, run], theirs[:, run]
        assert torch.equal(a - a[:, :1].min(), b - b[:, :1].min()), f"run {k}: relative positions differ"
        prior = ours[:, :run[0]].max().item() + 1 if run[0] else 0
        assert a.min().item() == prior, f"run {k} starts at {a.min().item()}, published rule says {prior}"
        prior_ref = theirs[:, :run[0]].max().item() + 1 if run[0] else 0
        same_rule &= b.min().item() == prior_ref
    if same_rule:
        assert torch.equal(ours, theirs)
    return same_rule


CASES = {
    # (T, H, W) clips and (H, W) images per sample; fps per sample (or per camera); tolerance
    "exact-2-3-4": ([[(2, 224, 252), (280, 280)], [(3, 252, 224), (4, 224, 224)]], [2, 1], 1e-5),
    "exact-8-fps5": ([[(8, 224, 252)], [(224, 224), (2, 280, 280)]], [5, 2], 1e-5),
    "resize-mixed": ([[(8, 100, 90), (480, 640)], [(3, 231, 333), (57, 401), (4, 120, 121)]], [2, [1, 1, 2]], 4e-4),
    "long-clip": ([[(8, 224, 224)], [(8, 56, 56), (224, 252)]], [1, 2], 1e-5),  # time index outruns h, w
}


@pytest.mark.parametrize("case", list(CASES))
def test_clips_match_reference(setup, case):
    family, ref, proc, ours = setup
    spec, fps, tol = CASES[case]
    cams_all = entries(spec, seed=len(case))
    prompts = ["What moves?", "Is the door opening on the left?"][:len(spec)]
    feats = ours.encode(cams_all, prompts, fps=fps)
    _, batch = ours.prepare(cams_all, prompts, fps=fps)
    L = feats.hidden.shape[1]
    differs = False
    for b, cams in enumerate(cams_all):
        rates = fps[b] if isinstance(fps[b], list) else [fps[b]] * len(cams)
        inp = ref_inputs(proc, cams, prompts[b], rates)
        n = inp["input_ids"].shape[1]
        assert torch.equal(feats.input_ids[b, L - n:], inp["input_ids"][0])
        for k, v in enumerate(ref_vision(ref, inp, cams)):
            assert feats.vision[b][k].shape == v.shape, (family, case, b, k)
            assert rel_err(feats.vision[b][k], v) <= tol, (family, case, b, k)
        ours_pos = batch.position_ids[:, b, L - n:]
        same = check_positions(ours_pos, ref_positions(ref, inp), inp["mm_token_type_ids"][0])
        differs |= not same
        with torch.no_grad():
            hidden = ref.model(**inp, position_ids=None if same else ours_pos[:, None]).last_hidden_state[0]
        assert rel_err(feats.hidden[b, L - n:], hidden) <= tol, (family, case, b)
        assert torch.all(feats.hidden[b, :L - n] == 0)
    if case == "long-clip":  # the case exists to exercise the difference
        assert differs


def test_clip_tokens_shape_and_time_spacing(setup):
    """Features.vision is (t*h*w/4, D); Qwen2.5-VL spaces patches by tokens_per_second * 2 / fps,
    Qwen2-VL by one, as transformers does."""
    family, ref, proc, ours = setup
    cams = entries([[(4, 224, 224)]], seed=1)[0]
    for fps in (1, 2):
        feats = ours.encode([cams], ["x"], fps=fps)
        assert feats.vision[0][0].shape == (2 * 16 * 16 // 4, ours.cfg.vision_out)
        _, batch = ours.prepare([cams], ["x"], fps=fps)
        pos = batch.position_ids[0, 0][feats.input_ids[0] == ours.cfg.video_token_id]
        step = (pos[-1] - pos[0]).item()
        inp = ref_inputs(proc, cams, "x", [fps])
        ref_pos = ref_positions(ref, inp)[0][inp["input_ids"][0] == ours.cfg.video_token_id]
        assert step == (ref_pos[-1] - ref_pos[0]).item()
        assert step == (ref.config.vision_config.tokens_per_second * 2 // fps if family == "qwen2_5_vl" else 1)


@pytest.mark.parametrize("shape", [(3, 231, 333), (8, 100, 90), (2, 224, 252)])
def test_clip_pixel_values_within_one_level(setup, shape):
    family, ref, proc, ours = setup
    cams = entries([[shape]], seed=3)[0]
    _, batch = ours.prepare([cams], ["x"], fps=2)
    inp = ref_inputs(proc, cams, "x", [2])
    assert batch.grids == [tuple(g) for g in inp["video_grid_thw"].tolist()]
    std = torch.tensor(proc.video_processor.image_std).repeat_interleave(2 * 14 * 14)  # per column
    levels = (batch.clip_pixels - inp["pixel_values_videos"]).abs() * std * 255
    assert levels.max().item() <= 1.0 + 1e-3


def test_greedy_generate_with_clips_matches_reference(setup):
    family, ref, proc, ours = setup
    spec = [[(2, 224, 252), (280, 280)], [(3, 308, 224)], [(224, 224), (4, 231, 333), (8, 252, 224)]]
    fps = [2, 1, [2, 2, 2]]
    cams_all = entries(spec, seed=7)
    prompts = ["Describe.", "What is moving to the left of the road?", "Hi"]
    feats, texts = ours.encode_generate(cams_all, prompts, max_new_tokens=12, fps=fps)
    ids = ours.generate_ids(cams_all, prompts, max_new_tokens=12, fps=fps)
    assert texts == ours.detokenize(ids)
    for b, cams in enumerate(cams_all):
        rates = fps[b] if isinstance(fps[b], list) else [fps[b]] * len(cams)
        inp = ref_inputs(proc, cams, prompts[b], rates)
        assert check_positions(ours.prepare([cams], [prompts[b]], fps=[rates])[1].position_ids[:, 0],
                               ref_positions(ref, inp), inp["mm_token_type_ids"][0])
        with torch.no_grad():
            r = ref.generate(**inp, max_new_tokens=12, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
        assert ids[b, :len(r)].tolist() == r, (family, b)


def test_clip_equals_its_frames_not_resampled(setup):
    """A clip's frames are used as given: the same frames as a list give the same tokens, and
    a different frame changes only its own temporal patch's tokens."""
    family, ref, proc, ours = setup
    clip = entries([[(4, 224, 224)]], seed=5)[0][0]
    a = ours.encode([[clip]], ["x"], fps=2)
    b = ours.encode([[list(clip.unbind(0))]], ["x"], fps=2)
    assert torch.equal(a.vision[0][0], b.vision[0][0])
    changed = clip.clone()
    changed[3] = 255 - changed[3]
    c = ours.encode([[changed]], ["x"], fps=2).vision[0][0]
    half = c.shape[0] // 2
    assert torch.equal(c[:half], a.vision[0][0][:half])
    assert not torch.allclose(c[half:], a.vision[0][0][half:])


def test_clip_tensor_batch_equals_lists(setup):
    family, ref, proc, ours = setup
    x = torch.randint(0, 256, (2, 3, 4, 3, 56, 84), dtype=torch.uint8)  # (B, N, T, 3, H, W)
    a = ours.encode(x, ["a", "bb"], fps=[1, 2])
    b = ours.encode([list(s) for s in x], ["a", "bb"], fps=[[1] * 3, [2] * 3])
    assert torch.equal(a.hidden, b.hidden)


@pytest.mark.parametrize("images, fps, match", [
    ([[torch.zeros(0, 3, 56, 56, dtype=torch.uint8)]], 2, r"no frames \(T = 0\)"),
    ([[[]]], 2, r"no frames \(T = 0\)"),
    ([[[torch.zeros(3, 56, 56, dtype=torch.uint8), torch.zeros(3, 56, 84, dtype=torch.uint8)]]], 2,
     "mixes frame sizes"),
    ([[torch.zeros(2, 4, 56, 56, dtype=torch.uint8)]], 2, r"\(T, 3, H, W\)"),
    ([[torch.zeros(2, 3, 56, 56, dtype=torch.float32)]], 2, "uint8"),
    ([[torch.zeros(2, 3, 56, 56, dtype=torch.uint8)]], 0, "positive"),
    ([[torch.zeros(2, 3, 56, 56, dtype=torch.uint8)]], float("nan"), "positive"),
    ([[torch.zeros(2, 3, 56, 56, dtype=torch.uint8)]], [1, 2], "2 values for 1 samples"),
    ([[torch.zeros(2, 3, 56, 56, dtype=torch.uint8)]], [[1, 2]], "2 values for 1 cameras"),
])
def test_bad_clip_is_a_clear_value_error(setup, images, fps, match):
    ours = setup[3]
    with pytest.raises(ValueError, match=match):
        ours.encode(images, ["x"], fps=fps)


def test_video_pixel_bounds_follow_the_processor_config(setup, tmp_path):
    """Bounds come from the nested video_processor section first, as transformers loads them."""
    import json
    import shutil

    family, ref, proc, ours = setup
    path = tmp_path / "ckpt"
    shutil.copytree(ours.name, path)
    lo, hi = 64 * 28 * 28, 96 * 28 * 28
    (path / "processor_config.json").write_text(json.dumps(
        {"video_processor": {"min_pixels": lo, "max_pixels": hi}}))
    model = BatchedQwenVL.from_pretrained(path)
    assert (model.processor.video_min_pixels, model.processor.video_max_pixels) == (lo, hi)
    assert (model.processor.min_pixels, model.processor.max_pixels) == (ours.processor.min_pixels,
                                                                        ours.processor.max_pixels)
    theirs = AutoProcessor.from_pretrained(str(path))
    cams = entries([[(2, 480, 640)]], seed=2)[0]
    inp = ref_inputs(theirs, cams, "x", [2])
    _, batch = model.prepare([cams], ["x"], fps=2)
    assert batch.grids == [tuple(g) for g in inp["video_grid_thw"].tolist()]
    assert np.prod(batch.grids[0][1:]) * 14 * 14 <= hi
