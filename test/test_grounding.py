"""model.detect and qvl_ros.model.grounding: coordinates, parsing, constrained decoding.

Mapping: a white box drawn at known pixels of a camera image is found in the image the model
sees as transformers' own AutoProcessor makes it (its pixel_values, un-normalized; OpenCV's resize
for a forced size=, which transformers does not offer), written in the family's coordinates, and
must come back through our parser and mapping to the drawn pixels within one pixel; our processor
must resize to the size transformers reports (image_grid_thw).
Constrained decoding: the tiny random model on 100 random images and prompts per family; every
answer must be one well-formed answer, checked with Python's json module (Qwen2.5-VL) or a regex
written here (Qwen2-VL), with boxes inside the image.
"""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint
from qvl_ros.model.grounding import (grammar_for, parse_json_answer, parse_ref_answer, prompt_for, to_camera,
                                     token_pieces, answer_text)
from qvl_ros.model.processor import TensorProcessor

transformers = pytest.importorskip("transformers")
from transformers import AutoProcessor  # noqa: E402

FAMILIES = ("qwen2_5_vl", "qwen2_vl")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    return {f: save_tiny_checkpoint(root / f, family=f, seed=0) for f in FAMILIES}


# ----------------------------------------------------------------------------- mapping
# (name, image (H, W), processor pixel bounds or None, forced size or None)
MAP_CASES = [
    ("upscaled non-square", (90, 150), (200 * 200, 28 * 28 * 1280), None),
    ("downscaled", (420, 700), (56 * 56, 256 * 28 * 28), None),
    ("rounded", (231, 333), None, None),
    ("forced size", (300, 400), None, (224, 308)),
    ("forced size, upscaled", (100, 180), None, (168, 364)),
]


def _model_view(path, image: np.ndarray, bounds, size) -> tuple[np.ndarray, tuple]:
    """The image the model sees (H', W', gray float in [0, 1]) as transformers' processor makes it."""
    if size is not None:
        import cv2

        h, w = size
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)[..., 0] / 255.0, (h, w)
    kw = {} if bounds is None else {"size": {"shortest_edge": bounds[0], "longest_edge": bounds[1]}}
    proc = AutoProcessor.from_pretrained(str(path))
    inp = proc.image_processor(images=[image], return_tensors="pt", **kw)
    _, gh, gw = inp["image_grid_thw"][0].tolist()
    px = inp["pixel_values"].view(gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)[..., 0, :, :]  # first of the 2 frames
    px = px.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * 14, gw * 14)  # (3, H', W')
    mean, std = proc.image_processor.image_mean[0], proc.image_processor.image_std[0]
    return (px[0] * std + mean).numpy(), (gh * 14, gw * 14)


def _edges(profile: np.ndarray) -> tuple[int, int]:
    """First inside pixel and one past the last along a profile across a white box on black."""
    inside = np.flatnonzero(profile > 0.5)
    return int(inside[0]), int(inside[-1]) + 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", MAP_CASES, ids=[c[0] for c in MAP_CASES])
def test_box_maps_back_to_drawn_pixels(checkpoints, family, case):
    _, (H, W), bounds, size = case
    path = checkpoints[family]
    v25 = family == "qwen2_5_vl"
    from qvl_ros.model.config import QwenVLConfig
    from transformers import AutoConfig

    cfg = QwenVLConfig.from_hf(AutoConfig.from_pretrained(str(path)))
    lo, hi = bounds or (None, None)
    ours = TensorProcessor.from_pretrained(path, cfg, min_pixels=lo, max_pixels=hi)
    rng = random.Random(f"{family}{case[0]}")
    worst = 0.0
    for _ in range(3):
        x1, x2 = sorted(rng.sample(range(2, W - 2), 2))
        y1, y2 = sorted(rng.sample(range(2, H - 2), 2))
        x2, y2 = max(x2, x1 + 12), max(y2, y1 + 12)
        image = np.zeros((H, W, 3), np.uint8)
        image[y1:y2, x1:x2] = 255
        view, (h, w) = _model_view(path, image, bounds, size)
        assert ours.target_size(H, W, size) == (h, w)  # the resize transformers applied (or the forced one)
        mx1, mx2 = _edges(view[int((y1 + y2) / 2 * h / H)])
        my1, my2 = _edges(view[:, int((x1 + x2) / 2 * w / W)])
        if v25:  # absolute pixels of the resized image
            text = f'```json\n[\n\t{{"bbox_2d": [{mx1}, {my1}, {mx2}, {my2}], "label": "box"}}\n]\n```'
            parsed = parse_json_answer(text)
        else:  # 0-1000 of the image's width and height
            q = [round(v * 1000 / d) for v, d in ((mx1, w), (my1, h), (mx2, w), (my2, h))]
            text = f"<|object_ref_start|>box<|object_ref_end|><|box_start|>({q[0]},{q[1]}),({q[2]},{q[3]})<|box_end|>"
            parsed = parse_ref_answer(text)
        assert parsed.complete and parsed.malformed == 0 and len(parsed.items) == 1
        assert parsed.items[0].label == "box"
        box, _ = to_camera(parsed.items[0], v25, (H, W), ours.target_size(H, W, size))
        err = max(abs(a - b) for a, b in zip(box, (x1, y1, x2, y2)))
        worst = max(worst, err)
        assert err <= 1.0, (case[0], (x1, y1, x2, y2), box)
    print(f"mapping {family} {case[0]} {H}x{W} -> model: max error {worst:.2f} px")


def test_clamped_and_ordered():
    from qvl_ros.model.grounding import Item

    box, point = to_camera(Item("x", (150, -20, 40, 90), (300, -5), (0, 0)), True, (100, 200), (56, 112))
    assert box == (40 * 200 / 112, 0.0, 200.0, 100.0)  # corners ordered, x and y clamped to the image
    assert point == (200.0, 0.0)


# ----------------------------------------------------------------------------- parsing
def test_json_parse_keeps_valid_items_and_counts_the_rest():
    good = '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "cup"}, {"point_2d": [5, 6.5], "label": "pen"}]\n```'
    p = parse_json_answer(good)
    assert p.complete and p.malformed == 0
    assert [(i.label, i.box, i.point) for i in p.items] == [("cup", (1, 2, 30, 40), None), ("pen", None, (5, 6.5))]
    cut = good[:good.index("pen") - 20]  # truncated inside the second object
    p = parse_json_answer(cut)
    assert not p.complete and p.malformed == 1 and [i.label for i in p.items] == ["cup"]
    bad = '[{"bbox_2d": [1, 2, 3], "label": "a"}, {"bbox_2d": [1, 2, 3, true], "label": "b"}, ' \
          '{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [1, 2, 3, 4], "label": "ok"}]'
    p = parse_json_answer(bad)
    assert not p.complete and p.malformed == 3 and [i.label for i in p.items] == ["ok"]
    assert parse_json_answer("[]").complete and not parse_json_answer("").complete


def test_ref_parse_keeps_valid_items_and_counts_the_rest():
    text = ("<|object_ref_start|>cup<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
            "<|box_start|>(1,2),(3,4)<|box_end|>, <|object_ref_start|>red chair<|object_ref_end|>"
            "<|box_start|>(5,6),(7,8)<|box_end|>")
    p = parse_ref_answer(text)
    assert p.complete and p.malformed == 0
    assert [(i.label, i.box) for i in p.items] == [("cup", (10, 20, 300, 400)), ("cup", (1, 2, 3, 4)),
                                                   ("red chair", (5, 6, 7, 8))]
    p = parse_ref_answer(text[:-20])
    assert not p.complete and p.malformed == 1 and len(p.items) == 2
    p = parse_ref_answer("There is a <|box_start|>(1,2)<|box_end|> here")
    assert not p.complete and p.malformed == 1 and p.items == []


def test_parsers_never_raise_on_noise():
    rng = random.Random(0)
    alphabet = list('{}[]",:0123456789- abx\n') + ["<|box_start|>", "<|box_end|>", "<|object_ref_start|>",
                                                   "<|object_ref_end|>", "(", ")", '"bbox_2d"', '"label"']
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        for p in (parse_json_answer(text), parse_ref_answer(text)):
            assert p.malformed >= 0 and (not p.complete or p.malformed == 0)


def test_prompts_and_grammars_follow_each_format():
    assert prompt_for(True, ["cup", "chair"]) == ("Locate every cup and chair in the image, output their bbox "
                                                  "coordinates in JSON format.")
    assert "<|object_ref_start|>cup<|object_ref_end|>" in prompt_for(False, ["cup"])
    with pytest.raises(ValueError, match="Qwen2-VL grounds boxes only"):
        grammar_for(False, ["cup"], (56, 56), kind="point")
    with pytest.raises(ValueError):
        prompt_for(True, [])
    with pytest.raises(ValueError, match="max_detections <= 100"):  # bounds the answer and the KV cache
        grammar_for(True, ["cup"], (56, 56), max_detections=101)
    with pytest.raises(ValueError, match="at most 64 class names"):
        prompt_for(True, [f"c{i}" for i in range(65)])


# ----------------------------------------------------------------------------- the model, constrained
WORDS = ["cup", "chair", "red box", "person", "door handle", "forklift", "pallet", "dog", "traffic cone", "sign"]


def _random_requests(n, seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n // 2):  # samples of two cameras of different sizes
        cams = []
        for _ in range(2):
            h, w = rng.randint(28, 120), rng.randint(28, 160)
            cams.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        images.append(cams)
        targets.append(rng.sample(WORDS, rng.randint(1, 3)) if rng.random() < 0.7
                       else f"the {rng.choice(WORDS)} {rng.choice(['on the left', 'nearest', 'behind it'])}")
    return images, targets


QWEN2_ANSWER = re.compile(r"(?:<\|object_ref_start\|>([^<>\x00-\x1f\x7f]+)<\|object_ref_end\|><\|box_start\|>"
                          r"\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>\n?)+")


@pytest.mark.parametrize("family", FAMILIES)
def test_constrained_tiny_model_always_valid(checkpoints, family):
    pytest.importorskip("llguidance")
    model = BatchedQwenVL.from_pretrained(checkpoints[family])
    images, targets = _random_requests(100, seed=7)
    out = model.detect(images, targets, constrained=True, max_detections=2, min_detections=1)
    v25, n = family == "qwen2_5_vl", 0
    for cams, target in zip(out, targets):
        for cam in cams:
            H, W = cam.image_size
            h, w = cam.model_size
            assert cam.complete and cam.malformed == 0 and cam.grammar_error is None, cam.text
            assert 1 <= len(cam.detections) <= 2
            if v25:  # the oracle: Python's json module on the fenced body
                assert cam.text.startswith("```json\n") and cam.text.endswith("\n```")
                items = json.loads(cam.text[8:-4])
                assert all(0 <= x <= w and 0 <= y <= h for i in items for x, y in (i["bbox_2d"][:2], i["bbox_2d"][2:]))
                labels = [i["label"] for i in items]
            else:
                assert QWEN2_ANSWER.fullmatch(cam.text), cam.text
                refs = re.findall(r"<\|object_ref_start\|>([^<]+)<\|object_ref_end\|>", cam.text)
                labels = [r.strip() for r in refs]  # a ref's text, without surrounding spaces
            assert [d.label for d in cam.detections] == labels
            if isinstance(target, list):
                assert set(labels) <= set(target)
            for d in cam.detections:
                x1, y1, x2, y2 = d.box
                assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H
                assert 0 < d.score <= 1 and d.logprob <= 0 and abs(np.exp(d.logprob) - d.score) < 1e-9
            n += 1
    assert n == 100


def _json_answer(text: str) -> bool:
    body = text.strip().removeprefix("```json").removesuffix("```")
    try:
        items = json.loads(body)
    except ValueError:
        return False
    return isinstance(items, list) and all(isinstance(i, dict) and isinstance(i.get("label"), str) for i in items)


@pytest.mark.parametrize("family", FAMILIES)
def test_unconstrained_parse_counts_failures(checkpoints, family):
    model = BatchedQwenVL.from_pretrained(checkpoints[family])
    images, targets = _random_requests(20, seed=3)
    out = model.detect(images, targets, constrained=False, max_new_tokens=48)
    cams = [c for s in out for c in s]
    assert len(cams) == 20
    for c in cams:  # `complete` agrees with an independent reading of the answer
        assert c.complete == (_json_answer(c.text) if family == "qwen2_5_vl" else bool(QWEN2_ANSWER.fullmatch(c.text)))
    failed = sum(not c.complete for c in cams)
    assert failed >= 1  # a random model does not answer in the format by chance
    for c in cams:
        for d in c.detections:
            assert 0 <= d.box[0] <= d.box[2] <= c.image_size[1]


def test_answer_text_matches_the_tokenizer(checkpoints):
    """Per-token pieces spell what the tokenizer decodes (special tokens kept)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoints["qwen2_vl"]))
    text = "<|object_ref_start|>tasse à café ☕<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    ids = tok(text)["input_ids"]
    got, owner = answer_text(ids, token_pieces(tok), drop=set())
    assert got == tok.decode(ids, skip_special_tokens=False) == text
    assert len(owner) == len(got) and owner == sorted(owner)


def test_missing_llguidance_is_a_clear_error(checkpoints, monkeypatch):
    import sys

    from qvl_ros.model import constrained

    model = BatchedQwenVL.from_pretrained(checkpoints["qwen2_5_vl"])
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    monkeypatch.setattr(constrained, "_TOKENIZERS", {})
    img = [[torch.zeros(3, 56, 56, dtype=torch.uint8)]]
    with pytest.raises(ImportError, match="pip install 'llguidance"):
        model.detect(img, ["cup"], constrained=True)
    out = model.detect(img, ["cup"], max_new_tokens=4)  # constrained=None: falls back to plain decoding
    assert len(out) == 1 and len(out[0]) == 1


def test_detect_reports_the_size_the_model_saw(checkpoints):
    model = BatchedQwenVL.from_pretrained(checkpoints["qwen2_vl"])
    imgs = [[torch.zeros(3, 90, 150, dtype=torch.uint8), torch.zeros(3, 300, 200, dtype=torch.uint8)]]
    out = model.detect(imgs, "a door", constrained=False, max_new_tokens=2, size=(56, 84))
    assert [(c.image_size, c.model_size) for c in out[0]] == [((90, 150), (56, 84)), ((300, 200), (56, 84))]
    out = model.detect(imgs, "a door", constrained=False, max_new_tokens=2)
    assert [c.model_size for c in out[0]] == [(84, 140), (308, 196)]  # smart_resize: nearest multiples of 28


@pytest.mark.parametrize("family", FAMILIES)
def test_parse_tokens_follows_an_answer_while_it_decodes(checkpoints, family):
    """The tokens so far of a constrained answer (a DecodeControl's on_tokens, every 4 steps),
    parsed by parse_tokens: each camera's text is a prefix of the final answer (but for a
    replacement character where the tokens end inside a character), its detections
    (label, box) a prefix of the final ones, as many as the text holds finished items (closing
    braces / box ends, counted here), scores 0."""
    pytest.importorskip("llguidance")
    from qvl_ros.model import DecodeControl
    from qvl_ros.model.grounding import parse_tokens

    model = BatchedQwenVL.from_pretrained(checkpoints[family])
    images, _ = _random_requests(4, seed=11)
    targets = [["cup", "chair"], ["person"]]  # class names: no brace or box end inside a label
    seen = []
    control = DecodeControl(on_tokens=seen.append, chunk=4)
    final = model.detect(images, targets, constrained=True, max_detections=3, min_detections=3, control=control)
    assert len(seen) >= 3
    grew = 0
    for ids in seen:
        partial = parse_tokens(model, images, targets, ids)
        for cams, ends in zip(partial, final):
            for cam, end in zip(cams, ends):
                assert end.text.startswith(cam.text.rstrip("\ufffd"))  # less a character cut short
                closed = cam.text.count("}") if family == "qwen2_5_vl" else cam.text.count("<|box_end|>")
                got = [(d.label, d.box) for d in cam.detections]
                assert len(got) == closed and got == [(d.label, d.box) for d in end.detections][:closed]
                assert all(d.score == 0.0 for d in cam.detections)
                grew += bool(got)
    assert grew > 0
