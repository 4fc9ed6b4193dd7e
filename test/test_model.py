"""qvl_ros.model against the transformers reference on the same tiny weights.

The oracle is transformers' own Qwen2_5_VLForConditionalGeneration / Qwen2VLForConditionalGeneration
and the checkpoint's AutoProcessor, run one sample at a time on the same uint8 frames (as HWC
numpy arrays) and the same conversation. Metric: mean(|ours - ref| / (|ref| + 1)).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint, smart_resize

transformers = pytest.importorskip("transformers")
from transformers import (AutoProcessor, Qwen2_5_VLForConditionalGeneration,  # noqa: E402
                          Qwen2VLForConditionalGeneration)

REF_CLASS = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}
FAMILIES = list(REF_CLASS)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs() / (ref.float().abs() + 1)).mean().item()


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, tmp_path_factory):
    family = request.param
    path = save_tiny_checkpoint(tmp_path_factory.mktemp(family) / "ckpt", family=family, seed=0)
    ref = REF_CLASS[family].from_pretrained(str(path), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(path))
    ours = BatchedQwenVL.from_pretrained(path)
    return family, path, ref, proc, ours


def frames(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in cams] for cams in sizes]


def reference(ref, proc, cams, prompt, **proc_kwargs):
    conv = [{"role": "user", "content": [{"type": "image"}] * len(cams) + [{"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    inp = proc(text=[text], images=[im.permute(1, 2, 0).numpy() for im in cams], return_tensors="pt",
               **proc_kwargs)
    with torch.no_grad():
        out = ref.model(**inp)
        vis = ref.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
    return inp, out.last_hidden_state[0], vis


CASES = {
    # no resize needed: multiples of 28 inside the default pixel bounds
    "exact-mixed": ([[(224, 252), (280, 280)], [(308, 420), (224, 224)], [(252, 224), (336, 168)]], 1e-5),
    "exact-n1": ([[(280, 280)], [(224, 252)], [(308, 420)]], 1e-5),
    "exact-n6": ([[(224, 224), (224, 252), (252, 224), (280, 280), (308, 196), (168, 336)]], 1e-5),
    # resized by smart_resize
    "resize": ([[(480, 640), (100, 90)], [(231, 333), (57, 401)], [(120, 121), (479, 271)]], 4e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encode_matches_reference(family_setup, case):
    family, path, ref, proc, ours = family_setup
    sizes, tol = CASES[case]
    imgs = frames(sizes, seed=len(case))
    prompts = ["Describe the scene.", "What is on the left of the road ahead?", "Hi"][:len(imgs)]
    feats = ours.encode(imgs, prompts)
    B, L, D = feats.hidden.shape
    assert B == len(imgs)
    for b, cams in enumerate(imgs):
        inp, hidden, vis = reference(ref, proc, cams, prompts[b])
        n = inp["input_ids"].shape[1]
        assert torch.equal(feats.input_ids[b, L - n:], inp["input_ids"][0])
        assert feats.attention_mask[b].sum().item() == n
        assert len(feats.vision[b]) == len(cams)
        for k, v in enumerate(vis):
            assert feats.vision[b][k].shape == v.shape
            assert rel_err(feats.vision[b][k], v) <= tol, (family, case, b, k)
        assert rel_err(feats.hidden[b, L - n:], hidden) <= tol, (family, case, b)
        assert torch.all(feats.hidden[b, :L - n] == 0)  # left padding zeroed


@pytest.mark.parametrize("sizes", [[(480, 640)], [(231, 333)], [(100, 90)], [(57, 401)], [(224, 252)]])
def test_pixel_values_within_one_level(family_setup, sizes):
    family, path, ref, proc, ours = family_setup
    imgs = frames([sizes], seed=3)
    _, inputs = ours.prepare(imgs, ["x"])
    ours_pv = ours.processor.hf_pixel_values(inputs.pixels)
    inp = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"],
               images=[imgs[0][0].permute(1, 2, 0).numpy()], return_tensors="pt")
    assert inputs.grids == [tuple(g) for g in inp["image_grid_thw"].tolist()]
    std = torch.tensor(proc.image_processor.image_std).repeat_interleave(2 * 14 * 14)  # per column
    levels = (ours_pv - inp["pixel_values"]).abs() * std * 255  # difference in uint8 levels
    assert levels.max().item() <= 1.0 + 1e-3


def test_min_max_pixels_and_exact_size(family_setup):
    family, path, ref, proc, ours = family_setup
    lo, hi = 128 * 28 * 28, 256 * 28 * 28
    model = BatchedQwenVL.from_pretrained(path, min_pixels=lo, max_pixels=hi)
    imgs = frames([[(480, 640), (60, 80)]], seed=5)
    feats = model.encode(imgs, ["x"])
    inp, hidden, vis = reference(ref, proc, imgs[0], "x", size={"shortest_edge": lo, "longest_edge": hi})
    for k, v in enumerate(vis):
        assert feats.vision[0][k].shape == v.shape
        assert rel_err(feats.vision[0][k], v) <= 4e-4
    n = inp["input_ids"].shape[1]
    assert rel_err(feats.hidden[0, -n:], hidden) <= 4e-4
    # an exact size: every camera resized to 196 x 252
    feats = ours.encode(imgs, ["x"], size=(196, 252))
    assert [v.shape[0] for v in feats.vision[0]] == [(196 // 28) * (252 // 28)] * 2
    with pytest.raises(ValueError, match="multiples of 28"):
        ours.encode(imgs, ["x"], size=(200, 252))


def test_smart_resize_matches_reference():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref_resize

    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(28, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 200)) * 784
        hi = lo + int(rng.integers(0, 4000)) * 784
        assert smart_resize(h, w, 28, lo, hi) == ref_resize(h, w, 28, lo, hi)


def test_tensor_input_equals_list_input(family_setup):
    family, path, ref, proc, ours = family_setup
    x = torch.randint(0, 256, (2, 3, 3, 224, 252), dtype=torch.uint8)
    a = ours.encode(x, ["a", "bb"])
    b = ours.encode([list(s) for s in x], ["a", "bb"])
    assert torch.equal(a.hidden, b.hidden)
    for s in range(2):
        for n in range(3):
            assert torch.equal(a.vision[s][n], b.vision[s][n])


def test_batch_rows_independent_of_batch(family_setup):
    """A sample's features do not depend on what else is in the batch (padding, other sizes)."""
    family, path, ref, proc, ours = family_setup
    imgs = frames([[(224, 252), (280, 280)], [(308, 420), (224, 224)]], seed=9)
    both = ours.encode(imgs, ["short", "a much longer prompt than the first one"])
    one = ours.encode(imgs[:1], ["short"])
    n = int(one.attention_mask[0].sum())
    assert rel_err(both.hidden[0, -n:], one.hidden[0]) <= 1e-5
    for k in range(2):
        assert rel_err(both.vision[0][k], one.vision[0][k]) <= 1e-6


def test_greedy_generate_matches_reference(family_setup):
    family, path, ref, proc, ours = family_setup
    sizes = [[(224, 252), (280, 280)], [(308, 420), (224, 224)], [(480, 640), (100, 90)], [(280, 280)]]
    imgs = frames(sizes, seed=11)
    prompts = ["Describe.", "What is on the left side of the road?", "Hi", "Count the cars, please."]
    ids = ours.generate_ids(imgs, prompts, max_new_tokens=20)
    texts = ours.generate(imgs, prompts, max_new_tokens=20)
    eos = set(ours.eos_ids)
    for b, cams in enumerate(imgs):
        conv = [{"role": "user", "content": [{"type": "image"}] * len(cams) + [{"type": "text", "text": prompts[b]}]}]
        text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        inp = proc(text=[text], images=[im.permute(1, 2, 0).numpy() for im in cams], return_tensors="pt")
        with torch.no_grad():
            r = ref.generate(**inp, max_new_tokens=20, do_sample=False)[0, inp["input_ids"].shape[1]:]
        r = r.tolist()
        assert ids[b, :len(r)].tolist() == r, (family, b)
        if len(r) < 20:  # reference stopped at an end token: ours pads after it
            assert r[-1] in eos and set(ids[b, len(r):].tolist()) <= {ours.pad_id}
        assert texts[b] == proc.batch_decode([r], skip_special_tokens=True)[0]


def test_encode_generate_shares_features(family_setup):
    family, path, ref, proc, ours = family_setup
    imgs = frames([[(224, 252)], [(280, 280)]], seed=4)
    feats, texts = ours.encode_generate(imgs, ["a", "bc"], max_new_tokens=6)
    alone = ours.encode(imgs, ["a", "bc"])
    assert rel_err(feats.hidden, alone.hidden) <= 1e-6
    assert texts == ours.generate(imgs, ["a", "bc"], max_new_tokens=6)


def test_sampling_is_seeded_and_valid(family_setup):
    family, path, ref, proc, ours = family_setup
    imgs = frames([[(224, 252)], [(280, 280)], [(224, 224)]], seed=2)
    run = lambda seed: ours.generate_ids(imgs, ["a", "b", "c"], max_new_tokens=8, do_sample=True,
                                         temperature=0.8, top_p=0.9,
                                         generator=torch.Generator().manual_seed(seed))
    a, b = run(1), run(1)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < ours.cfg.vocab_size
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(imgs, ["a", "b", "c"], do_sample=True, temperature=0)


@pytest.mark.parametrize("images, prompts, match", [
    (torch.zeros(1, 1, 3, 56, 56, dtype=torch.float32), ["x"], "uint8"),
    (torch.zeros(1, 3, 56, 56, dtype=torch.uint8), ["x"], "rank"),
    (torch.zeros(2, 1, 3, 56, 56, dtype=torch.uint8), ["x"], "2 samples but 1 prompts"),
    (torch.zeros(1, 1, 3, 20, 56, dtype=torch.uint8), ["x"], "smaller than 28"),
    (torch.zeros(1, 1, 3, 28, 6000, dtype=torch.uint8), ["x"], "aspect ratio"),
    ([], [], "empty batch"),
    ([[]], ["x"], "no camera"),
    (torch.zeros(1, 1, 4, 56, 56, dtype=torch.uint8), ["x"], r"\(3, H, W\)"),
    (torch.zeros(1, 1, 3, 56, 56, dtype=torch.uint8), "x", "list of strings"),
])
def test_bad_input_is_a_clear_value_error(family_setup, images, prompts, match):
    ours = family_setup[4]
    with pytest.raises(ValueError, match=match):
        ours.encode(images, prompts)


def test_loads_transformers5_layout_and_nested_processor_config(family_setup, tmp_path):
    """Weights named as transformers 5.x modules name them (model.visual.*, model.language_model.*)
    and the nested processor_config.json that its processor writes load and give the same features."""
    family, path, ref, proc, ours = family_setup
    out = tmp_path / "hf5"
    ref.save_pretrained(str(out))  # 5.23 writes the released names on disk ...
    proc.save_pretrained(str(out))
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}  # ... its modules use the new ones
    assert any(n.startswith("model.language_model.") for n in state)
    assert any(n.startswith("model.visual.") for n in state)
    if ref.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    (out / "model.safetensors").unlink()
    save_file(state, str(out / "model.safetensors"))
    assert (out / "processor_config.json").exists()
    (out / "preprocessor_config.json").unlink(missing_ok=True)
    nested = json.loads((out / "processor_config.json").read_text())
    assert "image_processor" in nested
    model = BatchedQwenVL.from_pretrained(out)
    imgs = frames([[(224, 252), (280, 280)]], seed=6)
    a, b = model.encode(imgs, ["x"]), ours.encode(imgs, ["x"])
    assert torch.equal(a.input_ids, b.input_ids)
    assert rel_err(a.hidden, b.hidden) <= 1e-6


def test_sharded_checkpoint_and_weight_errors(family_setup, tmp_path):
    family, path, ref, proc, ours = family_setup
    sharded = tmp_path / "sharded"
    shutil.copytree(path, sharded)
    weights = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(sharded / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    model = BatchedQwenVL.from_pretrained(sharded)
    imgs = frames([[(224, 224)]], seed=1)
    assert torch.equal(model.encode(imgs, ["x"]).hidden, ours.encode(imgs, ["x"]).hidden)

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    w = dict(weights)
    w.pop("model.norm.weight")
    w["visual.extra.weight"] = torch.zeros(1)
    save_file(w, str(broken / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        BatchedQwenVL.from_pretrained(broken)
    assert "model.norm.weight" in str(e.value) and "visual.extra.weight" in str(e.value)


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = save_tiny_checkpoint(tmp_path / "a", family="qwen2_5_vl", seed=0)
    b = save_tiny_checkpoint(tmp_path / "b", family="qwen2_5_vl", seed=0)
    c = save_tiny_checkpoint(tmp_path / "c", family="qwen2_5_vl", seed=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_no_pickle_weights(tmp_path, family_setup):
    path = family_setup[1]
    d = tmp_path / "bin"
    shutil.copytree(path, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        BatchedQwenVL.from_pretrained(d)


def test_from_pretrained_takes_a_cached_hub_id_and_never_downloads(tmp_path):
    """An id in the local Hugging Face cache loads like its directory; an id that is not there is a
    FileNotFoundError that says nothing was downloaded. The cache layout is huggingface_hub's own
    (refs/main -> snapshots/<commit>), and transformers' resolver must find the same snapshot."""
    import os
    import subprocess
    import sys

    cache, commit = tmp_path / "hub", "0" * 40
    snap = cache / "models--acme--tiny-vl" / "snapshots" / commit
    save_tiny_checkpoint(snap)
    (cache / "models--acme--tiny-vl" / "refs").mkdir()
    (cache / "models--acme--tiny-vl" / "refs" / "main").write_text(commit)
    code = """
import sys, torch
from pathlib import Path
from transformers.utils import cached_file
from qvl_ros.model import BatchedQwenVL
ref = Path(cached_file("acme/tiny-vl", "config.json", local_files_only=True)).parent
frames = torch.randint(0, 256, (1, 2, 3, 56, 84), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
a = BatchedQwenVL.from_pretrained("acme/tiny-vl").encode(frames, ["hi"]).hidden
b = BatchedQwenVL.from_pretrained(ref).encode(frames, ["hi"]).hidden
assert torch.equal(a, b), "the id and its snapshot directory gave different models"
try:
    BatchedQwenVL.from_pretrained("acme/not-cached")
except FileNotFoundError as e:
    assert "nothing is downloaded" in str(e), e
else:
    raise AssertionError("an id that is not cached loaded")
print("ok", ref)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok " + str(snap)), r.stdout + r.stderr
