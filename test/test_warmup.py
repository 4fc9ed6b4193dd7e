"""Warm-up: every decode bucket the node will use is made before it takes frames, compile failures
fall back per layout (and only they are caught), and the node's size parameter parses as documented.

On the CPU the decode states are kept per bucket when `StepRunner(buckets=True)`, exactly as on
CUDA where each is a captured graph: no new state after the warm-up means no capture after it.
The compile failure is a real one: torch.compile with a backend that refuses the graph (dynamo
raises BackendCompilerFailed, as for a missing Triton or C++ compiler); the oracle for the
fallback's output is the same tower run eagerly.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from qvl_ros.core.warmup import batch_sizes, frame_sizes, parse_sizes
from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint
from qvl_ros.model.token_steps import StepRunner, batch_bucket


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return BatchedQwenVL.from_pretrained(save_tiny_checkpoint(tmp_path_factory.mktemp("warm") / "ckpt", seed=0))


def frames(B, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes] for _ in range(B)]


@pytest.mark.parametrize("max_size,expected", [(1, [1]), (4, [1, 2, 4]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8])])
def test_batch_sizes_cover_every_bucket_up_to_max(max_size, expected):
    assert batch_sizes(max_size) == expected
    assert {batch_bucket(b) for b in expected} == {batch_bucket(b) for b in range(1, max_size + 1)}


def test_warmup_makes_every_bucket_and_nothing_is_made_later(model):
    sizes, prompt, max_size = [(224, 252), (168, 224)], "Describe the scene.", 5
    model.steps = StepRunner(model.decoder, buckets=True)
    try:
        model.warmup(sizes, batch_sizes=batch_sizes(max_size), prompt=prompt, max_new_tokens=8)
        made = set(model.steps._entries)
        assert {k[0] for k in made} == {1, 2, 4, 8}
        for B in range(1, max_size + 1):  # what a node does with sets of 1..max_size
            model.generate_ids(frames(B, sizes, seed=B), [prompt] * B, max_new_tokens=8)
        assert set(model.steps._entries) == made
        assert model.late_captures == 0  # no graphs on the CPU; none outside warm-up anywhere
    finally:
        model.steps = StepRunner(model.decoder)


def test_warmup_propagates_errors_that_are_not_compile_failures(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compile failed" warning, no silent retry
        with pytest.raises(ValueError, match="image"):
            model.warmup([(10, 10)], compile_vision=True)
    model.visual.compile_blocks(False)


def refuse(gm, example_inputs):
    raise RuntimeError("this backend compiles nothing")


def test_compile_failure_runs_that_layout_eagerly_and_is_counted(model):
    imgs, prompts = frames(2, [(224, 224)], seed=3), ["What moves?"] * 2
    eager = model.encode(imgs, prompts)
    model.visual.compile_blocks(backend=refuse)
    try:
        with pytest.warns(UserWarning, match=r"failed for grids \(\(1, 16, 16\), \(1, 16, 16\)\)"):
            first = model.encode(imgs, prompts)
        again = model.encode(imgs, prompts)  # the failed layout is not compiled again
        assert len(model.visual.compile_failures) == 1
        assert "BackendCompilerFailed" in model.visual.compile_failures[0][1]
    finally:
        model.visual.compile_blocks(False)
    for f in (first, again):
        assert torch.equal(f.hidden, eager.hidden)
        assert all(torch.equal(a, b) for a, b in zip(f.vision[0], eager.vision[0]))


def test_size_parameter():
    assert parse_sizes("", 3) is None and parse_sizes("  ", 1) is None
    assert parse_sizes("480x640", 2) == [(480, 640), (480, 640)]
    assert parse_sizes("480x640, 224X224", 2) == [(480, 640), (224, 224)]
    for bad, match in (("480x640,224x224", "2 sizes for 3 cameras"), ("480", "HxW"), ("axb", "HxW"),
                       ("1x2x3", "HxW"), ("10x10", "10x10")):
        with pytest.raises(ValueError, match=match):
            parse_sizes(bad, 3)
    clip, image = torch.zeros(4, 3, 120, 160, dtype=torch.uint8), torch.zeros(3, 90, 100, dtype=torch.uint8)
    assert frame_sizes([clip, image]) == [(120, 160), (90, 100)]
