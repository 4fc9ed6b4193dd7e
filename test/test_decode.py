"""Static-shape decoding and low-precision exactness on the CPU, against transformers on the same
tiny weights (the oracle: Qwen2_5_VL / Qwen2VL ForConditionalGeneration and their processor, one
sample at a time). The CUDA-graph side of the same code is checked in test_cuda.py."""
from __future__ import annotations

import pytest
import torch

from bench.precision import low_precision_errors, reference_class, reference_inputs
from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint
from qvl_ros.model.token_steps import CACHE_QUANTUM, DecodeState, StepRunner

pytest.importorskip("transformers")
from transformers import AutoProcessor  # noqa: E402

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
SIZES = [[(224, 252), (280, 280)], [(308, 420), (224, 224)], [(480, 640), (100, 90)]]
PROMPTS = ["Describe.", "What is on the left side of the road ahead of us?", "Hi"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", family=request.param, seed=0)
    ref = reference_class(path).from_pretrained(str(path), dtype=torch.float32).eval()
    return path, ref, AutoProcessor.from_pretrained(str(path)), BatchedQwenVL.from_pretrained(path)


def frames(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in cams] for cams in sizes]


def reference_tokens(ref, proc, cams, prompt, n):
    inp = reference_inputs(proc, cams, prompt)
    with torch.no_grad():
        out = ref.generate(**inp, max_new_tokens=n, do_sample=False)
    return out[0, inp["input_ids"].shape[1]:].tolist()


def assert_rows_match(ids, refs, pad_id):
    for b, r in enumerate(refs):
        assert ids[b, :len(r)].tolist() == r, b
        assert set(ids[b, len(r):].tolist()) <= {pad_id}  # reference stopped at an end token


@pytest.mark.parametrize("buckets", [False, True], ids=["exact", "bucketed"])
def test_greedy_static_steps_match_transformers(setup, buckets):
    """Padded batch (prompt lengths and camera sizes differ per row), 24 greedy tokens."""
    path, ref, proc, ours = setup
    ours.steps = StepRunner(ours.decoder, buckets=buckets)
    try:
        imgs = frames(SIZES, seed=5)
        ids = ours.generate_ids(imgs, PROMPTS, max_new_tokens=24)
        refs = [reference_tokens(ref, proc, cams, p, 24) for cams, p in zip(imgs, PROMPTS)]
        assert_rows_match(ids, refs, ours.pad_id)
        if buckets:  # 3 rows ran in a state of 4 rows and a whole number of cache quanta
            (state, _), = ours.steps._entries.values()
            assert state.capacity[0] == 4 and state.capacity[1] % CACHE_QUANTUM == 0
            # the kept state serves a smaller batch next: 1 real row and 3 dummy rows
            one = ours.generate_ids(imgs[1:2], PROMPTS[1:2], max_new_tokens=24)
            assert_rows_match(one, refs[1:2], ours.pad_id)
            assert len(ours.steps._entries) == 2  # batch bucket 1 is a new state
    finally:
        ours.steps = StepRunner(ours.decoder)


def test_step_writes_at_device_position(setup):
    """One step writes keys/values at column cache_pos only, marks it in the key mask and advances
    position and cache_pos; the logits equal transformers' for the same token sequence."""
    path, ref, proc, ours = setup
    cfg = ours.cfg
    ids = torch.tensor([[5, 17, 99, 3, 42]])  # text only: M-RoPE positions are 0..L-1 on all streams
    with torch.inference_mode():
        expect = ref(input_ids=ids).logits[0, -1]
        state = DecodeState.allocate(cfg, 1, 16, "cpu", torch.float32)
        L = 4
        pos = torch.arange(L).view(1, 1, L).expand(3, 1, L)
        ours.decoder(ours.decoder.embed(ids[:, :L]), pos, torch.ones(1, L, dtype=torch.long), [0],
                     state.prefill_caches(1))
        state.begin(torch.ones(1, L, dtype=torch.long), torch.tensor([L]))
        before = [k.clone() for k, _ in state.caches]
        state.tok[0] = ids[0, L]
        logits = ours.decoder.step(state)
    assert int(state.cache_pos) == L + 1 and int(state.position[0]) == L + 1
    assert state.key_mask[0, 0, 0].tolist() == [True] * (L + 1) + [False] * (16 - L - 1)
    for (k, _), k0 in zip(state.caches, before):
        changed = (k != k0).any(-1)[0, 0]  # (K,) columns written
        assert changed.nonzero().flatten().tolist() == [L]
    assert ((logits[0] - expect).abs() / (expect.abs() + 1)).mean() < 1e-5


def test_sampling_in_bucketed_states(setup):
    path, ref, proc, ours = setup
    imgs = frames(SIZES[:2], seed=2)
    ours.steps = StepRunner(ours.decoder, buckets=True)
    try:
        run = lambda seed: ours.generate_ids(imgs, PROMPTS[:2], max_new_tokens=10, do_sample=True, temperature=0.8,
                                             top_p=0.9, generator=torch.Generator().manual_seed(seed))
        a, b, c = run(1), run(1), run(2)
    finally:
        ours.steps = StepRunner(ours.decoder)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < ours.cfg.vocab_size


def test_masked_prefill_with_expanded_kv_equals_per_row(setup):
    """The padded prefill of other devices (one masked call, k/v expanded to the query heads so
    that CUDA's memory-efficient kernel takes it) gives the CPU's per-row result: hidden states of
    real tokens and the KV cache the decode steps read, on a padded batch of mixed sizes."""
    path, ref, proc, ours = setup
    imgs = frames(SIZES, seed=11)
    out = {}
    for per_row in (True, False):
        ours.decoder.per_row_prefill = per_row
        ours.steps = StepRunner(ours.decoder, buckets=False)
        try:
            feats = ours.encode(imgs, PROMPTS)
            ids = ours.generate_ids(imgs, PROMPTS, max_new_tokens=12)
        finally:
            ours.decoder.per_row_prefill = None
            ours.steps = StepRunner(ours.decoder)
        out[per_row] = feats, ids
    (a, ids_a), (b, ids_b) = out[True], out[False]
    assert a.attention_mask.sum(1).unique().numel() == len(SIZES)  # every row padded differently
    real = a.attention_mask.bool()
    torch.testing.assert_close(b.hidden[real], a.hidden[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(ids_a, ids_b)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_at_least_as_exact_as_transformers(family, tmp_path):
    """bf16 vision features and hidden states against transformers float32, 3 cameras of 640x480:
    ours no further off than transformers' own bf16 run."""
    path = save_tiny_checkpoint(tmp_path / "ckpt", family=family, seed=0)
    cams = frames([[(480, 640)] * 3], seed=9)[0]
    err = low_precision_errors(path, cams, device="cpu", dtype=torch.bfloat16)
    for part in ("vision", "hidden"):
        assert 0 < err["ours"][part] <= err["transformers"][part], (part, err)


def test_decode_control_follows_stops_and_interleaves(setup):
    """DecodeControl: every chunk hands over the tokens so far (prefixes of transformers' greedy
    tokens); a stop asked from a callback ends the loop before the next step and the stopped
    result holds exactly the tokens generated so far; a generation run from `on_chunk` in kept
    (bucketed) states beside one with a private state leaves both equal to transformers'."""
    from qvl_ros.model import DecodeControl

    path, ref, proc, ours = setup
    imgs = frames(SIZES[:2], seed=7)
    refs = [reference_tokens(ref, proc, cams, p, 40) for cams, p in zip(imgs, PROMPTS[:2])]
    seen = []

    def follow(ids):
        seen.append(ids)
        if ids.shape[1] >= 12:
            control.stop("enough")

    control = DecodeControl(on_tokens=follow, chunk=4)
    ids = ours.generate_ids(imgs, PROMPTS[:2], max_new_tokens=40, control=control)
    longest = max(len(r) for r in refs)
    if longest > 12:  # the reference did not end within the first chunks: the stop cut it
        assert control.stopped and control.reason == "enough" and control.steps == 12
        assert [s.shape[1] for s in seen] == [4, 8, 12]
    for chunk in seen:
        for b, r in enumerate(refs):
            n = min(chunk.shape[1], len(r))
            assert chunk[b, :n].tolist() == r[:n]
    assert_rows_match(ids[:, :control.steps], [r[:control.steps] for r in refs], ours.pad_id)
    assert set(ids[:, control.steps:].flatten().tolist()) <= {ours.pad_id}

    # stopped before the first step: no token
    early = DecodeControl()
    early.stop("before")
    assert set(ours.generate_ids(imgs, PROMPTS[:2], max_new_tokens=8, control=early).flatten().tolist()) <= \
        {ours.pad_id} and early.steps == 0

    # interleaving: a batch decoded in the runner's kept states at every chunk of an answer
    ours.steps = StepRunner(ours.decoder, buckets=True)
    try:
        inner = []
        answer = DecodeControl(chunk=4, private_state=True,
                               on_chunk=lambda: inner.append(ours.generate_ids(imgs[1:], PROMPTS[1:2], max_new_tokens=40)))
        one = ours.generate_ids(imgs[:1], PROMPTS[:1], max_new_tokens=40, control=answer)
        assert_rows_match(one, refs[:1], ours.pad_id)
        assert inner or len(refs[0]) <= 4
        for got in inner:
            assert_rows_match(got, refs[1:], ours.pad_id)
        assert len(ours.steps._entries) == 1  # only the inner batch's state was kept
    finally:
        ours.steps = StepRunner(ours.decoder)
