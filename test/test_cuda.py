"""qvl_ros.model on a CUDA device, against transformers on the CPU in float32 (the oracle) on the
same tiny weights and frames. Skipped where no CUDA device is present.

Imports only torch, transformers, numpy, torchvision and qvl_ros (no ROS), so it runs on a GPU
machine from the checkout alone: `python3 -m pytest -q test/test_cuda.py`.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from bench.precision import low_precision_errors, reference_class, reference_inputs, rel_err  # noqa: E402
from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint  # noqa: E402
from qvl_ros.model.token_steps import StepRunner  # noqa: E402

from transformers import AutoProcessor  # noqa: E402

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
CASES = {  # sizes per sample, bound (the CPU bounds of test_model.py)
    "exact-mixed": ([[(224, 252), (280, 280)], [(308, 420), (224, 224)], [(252, 224), (336, 168)]], 1e-5),
    "exact-n6": ([[(224, 224), (224, 252), (252, 224), (280, 280), (308, 196), (168, 336)]], 1e-5),
    "resize": ([[(480, 640), (100, 90)], [(231, 333), (57, 401)], [(120, 121), (479, 271)]], 4e-4),
}
PROMPTS = ["Describe the scene.", "What is on the left of the road ahead?", "Hi"]


@pytest.fixture(autouse=True)
def true_float32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", family=request.param, seed=0)
    ref = reference_class(path).from_pretrained(str(path), dtype=torch.float32).eval()
    ours = BatchedQwenVL.from_pretrained(path, device="cuda", dtype=torch.float32)
    return path, ref, AutoProcessor.from_pretrained(str(path)), ours


def frames(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in cams] for cams in sizes]


def reference(ref, proc, cams, prompt):
    inp = reference_inputs(proc, cams, prompt)
    with torch.no_grad():
        hidden = ref.model(**inp).last_hidden_state[0]
        vis = ref.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    vis = getattr(vis, "pooler_output", vis)
    return inp, hidden, list(vis) if isinstance(vis, (list, tuple)) else [vis]


def check_parity(ours, ref, proc, imgs, tol):
    feats = ours.encode([[im.cuda() for im in cams] for cams in imgs], PROMPTS[:len(imgs)])
    L = feats.hidden.shape[1]
    for b, cams in enumerate(imgs):
        inp, hidden, vis = reference(ref, proc, cams, PROMPTS[b])
        n = inp["input_ids"].shape[1]
        assert torch.equal(feats.input_ids[b, L - n:].cpu(), inp["input_ids"][0])
        assert rel_err(feats.hidden[b, L - n:].cpu(), hidden) <= tol  # padded rows: real tokens only
        assert rel_err(torch.cat(feats.vision[b]).cpu(), torch.cat(vis)) <= tol


@pytest.mark.parametrize("case", list(CASES))
def test_float32_parity_on_cuda(setup, case):
    path, ref, proc, ours = setup
    sizes, tol = CASES[case]
    check_parity(ours, ref, proc, frames(sizes, seed=len(case)), tol)


def test_compiled_vision_parity(setup):
    """warmup() compiles the vision blocks for the given layout; float32 stays within the bounds."""
    path, ref, proc, _ = setup
    ours = BatchedQwenVL.from_pretrained(path, device="cuda", dtype=torch.float32)
    sizes = [[(224, 252), (280, 280)], [(224, 252), (280, 280)]]
    seconds = ours.warmup([(224, 252), (280, 280)], batch_sizes=(2,), compile_vision=True)
    assert seconds > 0
    check_parity(ours, ref, proc, frames(sizes, seed=3), 2e-5)


def generate(ours, imgs, prompts, runner, **kw):
    ours.steps = runner
    try:
        return ours.generate_ids([[im.cuda() for im in cams] for cams in imgs], prompts, **kw).cpu()
    finally:
        ours.steps = StepRunner(ours.decoder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_graph_decoding_equals_eager(setup, dtype):
    """Captured steps give exactly the tokens of the same bucketed step run eagerly (padded batch);
    in float32 both equal transformers' greedy tokens."""
    path, ref, proc, ours32 = setup
    ours = ours32 if dtype == torch.float32 else BatchedQwenVL.from_pretrained(path, device="cuda", dtype=dtype)
    imgs = frames(CASES["exact-mixed"][0], seed=7)
    graphed = generate(ours, imgs, PROMPTS, StepRunner(ours.decoder, buckets=True, graphs=True), max_new_tokens=24)
    eager = generate(ours, imgs, PROMPTS, StepRunner(ours.decoder, buckets=True, graphs=False), max_new_tokens=24)
    assert torch.equal(graphed, eager)
    if dtype == torch.float32:
        for b, cams in enumerate(imgs):
            inp = reference_inputs(proc, cams, PROMPTS[b])
            with torch.no_grad():
                r = ref.generate(**inp, max_new_tokens=24, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
            assert graphed[b, :len(r)].tolist() == r, b


def test_graph_is_reused_and_sampling_is_seeded(setup):
    path, ref, proc, ours = setup
    imgs = frames(CASES["exact-mixed"][0][:2], seed=8)
    runner = StepRunner(ours.decoder)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9)
    a = generate(ours, imgs, PROMPTS[:2], runner, generator=torch.Generator("cuda").manual_seed(1), **kw)
    b = generate(ours, imgs, PROMPTS[:2], runner, generator=torch.Generator("cuda").manual_seed(1), **kw)
    assert torch.equal(a, b) and len(runner._entries) == 1
    assert a.min() >= 0 and a.max() < ours.cfg.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_at_least_as_exact_as_transformers(family, tmp_path):
    path = save_tiny_checkpoint(tmp_path / "ckpt", family=family, seed=0)
    cams = frames([[(480, 640)] * 3], seed=9)[0]
    err = low_precision_errors(path, cams, device="cuda", dtype=torch.bfloat16)
    for part in ("vision", "hidden"):
        assert 0 < err["ours"][part] <= err["transformers"][part], (part, err)


def test_gpu_jpeg_decode():
    """nvJPEG decode on the device against libjpeg-turbo on the host: same size, close in bulk, not
    bit-exact. The two differ in the IDCT (a level or two anywhere) and in 4:2:0 chroma
    upsampling: torchvision's GPU decode repeats each chroma sample over its 2 x 2 pixels, libjpeg-
    turbo interpolates ("fancy upsampling"), so along sharp colour edges (the rectangle here) pixels
    differ by tens of levels. Simulated on this image (chroma averaged 2 x 2, then repeated against
    bilinear): max 43-64, 99th percentile 3, 99.9th 21-29, mean 0.3. Hence a mean and percentiles,
    no maximum."""
    from torchvision.io import encode_jpeg

    from qvl_ros.core.conversion import compressed_to_tensor

    y, x = torch.meshgrid(torch.arange(240), torch.arange(320), indexing="ij")
    img = torch.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558]).to(torch.uint8)  # smooth RGB
    img[:, 60:120, 80:200] = torch.tensor([200, 40, 90], dtype=torch.uint8)[:, None, None]
    msg = SimpleNamespace(format="jpeg", data=bytes(encode_jpeg(img, quality=90).numpy().tobytes()))
    gpu = compressed_to_tensor(msg, device="cuda", gpu_jpeg=True)
    cpu = compressed_to_tensor(msg, device="cpu")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8 and gpu.shape == cpu.shape == (3, 240, 320)
    diff = (gpu.cpu().int() - cpu.int()).abs().flatten().float()
    assert diff.mean() <= 1.0
    assert torch.quantile(diff, 0.99) <= 8 and torch.quantile(diff, 0.999) <= 40


def test_padded_prefill_takes_the_efficient_kernel(setup):
    """With only the memory-efficient SDPA kernel allowed, a padded batch (bfloat16, GQA) still runs:
    the masked prefill does not need the math kernel; its hidden states equal the default run's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    path = setup[0]
    ours = BatchedQwenVL.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    imgs = [[im.cuda() for im in cams] for cams in frames(CASES["exact-mixed"][0], seed=12)]
    base = ours.encode(imgs, PROMPTS)
    assert base.attention_mask.sum(1).unique().numel() > 1  # padded
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # the math kernel would be refused here
        only = ours.encode(imgs, PROMPTS)
    real = base.attention_mask.bool()
    torch.testing.assert_close(only.hidden[real], base.hidden[real], rtol=2e-2, atol=2e-2)


def test_warmup_captures_every_bucket_and_none_later(setup):
    """thread_local capture at warm-up for batch sizes 1..4 of these camera sizes: later calls
    capture nothing (late_captures stays 0) and give the eager step's tokens."""
    from qvl_ros.model.token_steps import warmup_batch_sizes

    path, _, _, ours = setup
    sizes = [(224, 252), (280, 280)]
    runner = ours.steps = StepRunner(ours.decoder)
    try:
        ours.warmup(sizes, batch_sizes=warmup_batch_sizes(3), prompt=PROMPTS[0], max_new_tokens=16,
                    compile_vision=False)
    finally:
        ours.steps = StepRunner(ours.decoder)
    assert runner.captures == 3 and runner.late_captures == 0  # buckets 1, 2, 4
    for B in (1, 2, 3):
        imgs = frames([sizes] * B, seed=20 + B)
        got = generate(ours, imgs, [PROMPTS[0]] * B, runner, max_new_tokens=16)
        eager = generate(ours, imgs, [PROMPTS[0]] * B, StepRunner(ours.decoder, buckets=True, graphs=False),
                         max_new_tokens=16)
        assert torch.equal(got, eager)
    assert runner.captures == 3 and runner.late_captures == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_on_the_second_device(setup):
    """A model on cuda:1 while cuda:0 is current: the captured steps give the eager tokens (a graph
    captured on the wrong device's stream would replay the capture-time logits)."""
    path = setup[0]
    ours = BatchedQwenVL.from_pretrained(path, device="cuda:1", dtype=torch.float32)
    imgs = [[im.to("cuda:1") for im in cams] for cams in frames(CASES["exact-mixed"][0], seed=13)]
    torch.cuda.set_device(0)
    runs = {}
    for graphs in (True, False):
        ours.steps = StepRunner(ours.decoder, buckets=True, graphs=graphs)
        runs[graphs] = ours.generate_ids(imgs, PROMPTS, max_new_tokens=16).cpu()
    assert torch.equal(runs[True], runs[False])
