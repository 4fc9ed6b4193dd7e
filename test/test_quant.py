"""4-bit AWQ / GPTQ checkpoints (qvl_ros.model.quant) against independent readings and transformers.

Oracles: a plain reading of each format written here with Python integer ops (shifts and masks
per word, following the AutoAWQ / GPTQ layouts), and transformers' own model running the float
twin that `save_tiny_checkpoint(quantize=...)` writes next to the quantized checkpoint (the same
weights, dequantized). Our int4 linears compute in bfloat16 (CPU and CUDA; quant.py says why),
the rest of the model in its dtype. Metric: mean(|ours - ref| / (|ref| + 1)).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qvl_ros.model import PRESETS, BatchedQwenVL, save_tiny_checkpoint
from qvl_ros.model import quant
from qvl_ros.model.quant import Int4Linear, Int4Weight, QuantConfig, read_packed, split_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import (AutoProcessor, Qwen2_5_VLForConditionalGeneration,  # noqa: E402
                          Qwen2VLForConditionalGeneration)

REF_CLASS = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}
# (family, format): AWQ with group 64; GPTQ asymmetric with act order and group 32
SETUPS = {"qwen2_5_vl-awq": ("qwen2_5_vl", dict(quantize="awq", group_size=64)),
          "qwen2_5_vl-gptq": ("qwen2_5_vl", dict(quantize="gptq", group_size=32, sym=False, desc_act=True)),
          "qwen2_vl-awq": ("qwen2_vl", dict(quantize="awq", group_size=32)),
          "qwen2_vl-gptq": ("qwen2_vl", dict(quantize="gptq", group_size=64, sym=True, desc_act=True))}
AWQ_NIBBLE_CHANNEL = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ gemm: nibble n of a word holds channel 8c + this


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs() / (ref.float().abs() + 1)).mean().item()


def frames(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in cams] for cams in sizes]


def ref_inputs(proc, cams, prompt):
    conv = [{"role": "user", "content": [{"type": "image"}] * len(cams) + [{"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    return proc(text=[text], images=[im.permute(1, 2, 0).numpy() for im in cams], return_tensors="pt")


# ------------------------------------------------------------------ plain readings of the formats
def _word(v: int) -> int:
    return v & 0xFFFFFFFF  # the int32 as its 32 bits


def read_awq_plainly(qweight, qzeros, scales, group):
    """-> q [out][in], zeros [groups][out], scales, groups [in] (W[o][i] = (q - z) * s)."""
    qw, qz = qweight.tolist(), qzeros.tolist()
    n_in, out = len(qw), len(qw[0]) * 8
    q = [[0] * n_in for _ in range(out)]
    for i in range(n_in):
        for c, v in enumerate(qw[i]):
            for n in range(8):
                q[8 * c + AWQ_NIBBLE_CHANNEL[n]][i] = (_word(v) >> (4 * n)) & 15
    z = [[0] * out for _ in qz]
    for g, row in enumerate(qz):
        for c, v in enumerate(row):
            for n in range(8):
                z[g][8 * c + AWQ_NIBBLE_CHANNEL[n]] = (_word(v) >> (4 * n)) & 15
    return q, z, scales, [i // group for i in range(n_in)]


def read_gptq_plainly(qweight, qzeros, scales, g_idx, zero_plus: int = 1):
    """GPTQ: rows packed along the input (nibble n of word r = row 8r + n); zeros along the output,
    stored minus one in the v1 format (`zero_plus` = 1)."""
    qw, qz = qweight.tolist(), qzeros.tolist()
    out = len(qw[0])
    q = [[0] * (8 * len(qw)) for _ in range(out)]
    for r, row in enumerate(qw):
        for o, v in enumerate(row):
            for n in range(8):
                q[o][8 * r + n] = (_word(v) >> (4 * n)) & 15
    z = [[0] * out for _ in qz]
    for g, row in enumerate(qz):
        for c, v in enumerate(row):
            for n in range(8):
                if 8 * c + n < out:
                    z[g][8 * c + n] = ((_word(v) >> (4 * n)) & 15) + zero_plus
    return q, z, scales, g_idx.tolist()


def plain_dequantize(q, z, s, groups) -> torch.Tensor:
    s = s.float().tolist()
    return torch.tensor([[(q[o][i] - z[groups[i]][o]) * s[groups[i]][o] for i in range(len(groups))]
                         for o in range(len(q))])


def read_plainly(stored: dict, name: str, qc: dict):
    t = {k: stored[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}
    if qc["quant_method"] == "awq":
        return read_awq_plainly(t["qweight"], t["qzeros"], t["scales"], qc["group_size"])
    return read_gptq_plainly(t["qweight"], t["qzeros"], t["scales"], stored[f"{name}.g_idx"],
                             1 if qc.get("checkpoint_format", "gptq") == "gptq" else 0)


def assert_reads_equal(p: quant.PackedLinear, plain):
    q, z, s, groups = p.unpack()
    assert q.tolist() == plain[0]
    assert z.tolist() == plain[1]
    assert torch.equal(s, plain[2])
    assert g_tolist(groups) == plain[3]


def g_tolist(t):
    return [int(v) for v in t]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request, tmp_path_factory):
    family, kw = SETUPS[request.param]
    path = save_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", family=family, seed=0, **kw)
    twin = path.parent / "ckpt-float"
    ref = REF_CLASS[family].from_pretrained(str(twin), dtype=torch.float32).eval()
    ref16 = REF_CLASS[family].from_pretrained(str(twin), dtype=torch.bfloat16).eval()
    proc = AutoProcessor.from_pretrained(str(twin))
    ours = BatchedQwenVL.from_pretrained(path)
    return dict(name=request.param, family=family, path=path, twin=twin, ref=ref, ref16=ref16, proc=proc, ours=ours)


# ------------------------------------------------------------------ exact unpacking
def test_every_stored_integer_reads_as_the_format_says(setup):
    path = setup["path"]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    stored = load_file(str(path / "model.safetensors"))
    twin = load_file(str(setup["twin"] / "model.safetensors"))
    ours = setup["ours"]
    tensors = dict(stored)
    _, int4 = split_checkpoint(tensors, QuantConfig.from_checkpoint({"quantization_config": qc}, path), ours.cfg, path)
    assert len(int4) == 4 * ours.cfg.layers  # every fused decoder linear runs on int4
    for parts in int4.values():
        for p in parts:
            plain = read_plainly(stored, p.name, qc)
            assert_reads_equal(p, plain)
            # the float twin holds exactly these weights, dequantized
            assert torch.equal(plain_dequantize(*plain), twin[p.name + ".weight"])


def test_repacked_kernel_weights_equal_the_twin(setup):
    """What the int4 kernels compute with (W from x = identity) is the twin's fused weight, to
    bfloat16 rounding of the scales and the output (a wrong nibble, row or group is off by a
    whole quantization step: 1/15 of a group's range, 3x this tolerance or more)."""
    ours, twin = setup["ours"], BatchedQwenVL.from_pretrained(setup["twin"])
    for a, b in zip(ours.decoder.layers, twin.decoder.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            qlin, flin = getattr(a, name), getattr(b, name)
            assert isinstance(qlin, Int4Linear) and isinstance(flin, nn.Linear)
            w = qlin.weight(torch.eye(flin.in_features)).T  # (out, in)
            torch.testing.assert_close(w, flin.weight, rtol=2 ** -7, atol=0.02 * flin.weight.abs().max().item())
            if flin.bias is not None:
                assert torch.equal(qlin.bias, flin.bias)


ODD = {  # (method, out, in, group, act order, zero offset): out not a multiple of 16, partial groups
    "awq-40x96-g32": ("awq", 40, 96, 32, False, 0),
    "gptq-v1-36x72-g32-act": ("gptq", 36, 72, 32, True, 1),
    "gptq-v2-24x64-per-channel": ("gptq", 24, 64, -1, False, 0),
    "gptq-v1-48x200-g64-act": ("gptq", 48, 200, 64, True, 1),
}


def odd_case(case):
    """Random plain integers of an ODD case, stored in its format -> (PackedLinear, plain reading)."""
    method, out, inn, gs, act, offset = ODD[case]
    g = torch.Generator().manual_seed(len(case))
    G = 1 if gs == -1 else -(-inn // gs)
    q = torch.randint(0, 16, (out, inn), generator=g).to(torch.uint8)
    zeros = torch.randint(offset, 16 + offset, (G, out), generator=g).to(torch.int32)  # v1 stores zero - 1
    scales = (torch.rand(G, out, generator=g) * 0.1 + 0.01).half()
    groups = torch.arange(inn) // (inn if gs == -1 else gs)
    if act:
        groups = groups[torch.randperm(inn, generator=g)]
    stored = quant.pack_linear(method, q, zeros, scales, groups, zero_offset=offset)
    stored = {f"m.{k}": v for k, v in stored.items()}
    qc = {"quant_method": method, "group_size": gs, "checkpoint_format": "gptq" if offset else "gptq_v2"}
    plain = read_plainly(stored, "m", qc)
    assert plain[0] == q.tolist() and plain[1] == zeros.tolist() and plain[3] == groups.tolist()
    return read_packed(dict(stored), "m", QuantConfig(method, gs, offset, act), out, inn, "test"), plain


@pytest.mark.parametrize("case", list(ODD))
def test_odd_shapes_unpack_exactly_and_multiply_right(case):
    p, plain = odd_case(case)
    assert_reads_equal(p, plain)
    w = plain_dequantize(*plain)
    assert torch.equal(p.dequantize(), w)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, p.in_features, generator=g)
    bias = torch.randn(p.out_features, generator=g)
    exact = Int4Weight.pack(*p.unpack(), p.group_size, "cpu", torch.float32)  # the kernel in float32
    torch.testing.assert_close(exact(x, bias), x @ w.T + bias, rtol=1e-5, atol=1e-5)
    fast = Int4Weight.pack(*p.unpack(), p.group_size, "cpu")  # in bfloat16, as the model runs it
    torch.testing.assert_close(fast(x, bias), x @ w.T + bias, rtol=0.02, atol=0.02 * (x @ w.T).abs().max().item())


CUDA_INT4 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not CUDA_INT4, reason="needs a CUDA GPU of sm80 or later")
@pytest.mark.parametrize("case", list(ODD))
def test_cuda_kernel_multiplies_right(case):
    """The CUDA packing (two input rows per byte, even row in the high nibble) and kernel."""
    p, plain = odd_case(case)
    w = plain_dequantize(*plain)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, p.in_features, generator=g)
    kernel = Int4Weight.pack(*p.unpack(), p.group_size, "cuda")
    got = kernel(x.cuda().bfloat16()).float().cpu()
    torch.testing.assert_close(got, x @ w.T, rtol=0.02, atol=0.02 * (x @ w.T).abs().max().item())


@pytest.mark.skipif(not CUDA_INT4, reason="needs a CUDA GPU of sm80 or later")
def test_cuda_model_matches_transformers_on_the_twin(setup):
    ref, ref16, proc = setup["ref"], setup["ref16"], setup["proc"]
    ours = BatchedQwenVL.from_pretrained(setup["path"], device="cuda", dtype=torch.bfloat16)
    cams = frames([[(224, 252), (280, 280)]], seed=2)[0]
    inp = ref_inputs(proc, cams, "Describe.")
    with torch.no_grad():
        want = ref.model(**inp).last_hidden_state[0]
        theirs = ref16.model(**dict(inp, pixel_values=inp["pixel_values"].to(torch.bfloat16))).last_hidden_state[0]
    got = ours.encode([cams], ["Describe."]).hidden[0].cpu()
    assert rel_err(got, want) <= 1.25 * rel_err(theirs, want)


def test_group_size_the_kernels_cannot_take_is_a_clear_error():
    q = torch.zeros(16, 72, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 32.*dequantize=True"):
        Int4Weight.pack(q, torch.zeros(1, 16, dtype=torch.int32), torch.ones(1, 16), torch.zeros(72, dtype=torch.long),
                        72, "cpu", torch.float32)


# ------------------------------------------------------------------ parity with transformers on the twin
def test_encode_matches_transformers_on_the_twin(setup):
    """A float32 model: vision features as exact as the float path (test_model.py's 1e-5); hidden
    states against transformers in float32 no less exact than transformers itself running the twin
    in bfloat16, the dtype our int4 linears compute in."""
    ours, ref, ref16, proc = setup["ours"], setup["ref"], setup["ref16"], setup["proc"]
    imgs = frames([[(224, 252), (280, 280)], [(308, 420), (224, 224)], [(252, 224)]], seed=1)
    prompts = ["Describe the scene.", "What is on the left of the road ahead?", "Hi"]
    feats = ours.encode(imgs, prompts)
    L = feats.hidden.shape[1]
    for b, cams in enumerate(imgs):
        inp = ref_inputs(proc, cams, prompts[b])
        with torch.no_grad():
            hidden = ref.model(**inp).last_hidden_state[0]
            vis = ref.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
            inp16 = dict(inp, pixel_values=inp["pixel_values"].to(torch.bfloat16))
            hidden16 = ref16.model(**inp16).last_hidden_state[0]
        n = inp["input_ids"].shape[1]
        assert torch.equal(feats.input_ids[b, L - n:], inp["input_ids"][0])
        for k, v in enumerate(vis):
            assert rel_err(feats.vision[b][k], v) <= 1e-5
        assert rel_err(feats.hidden[b, L - n:], hidden) <= rel_err(hidden16, hidden), setup["name"]


def test_bfloat16_no_less_exact_than_transformers_in_bfloat16(setup):
    """A bfloat16 model, against transformers in float32: within transformers' own bfloat16 error
    on the twin. Rounding noise of two bfloat16 computations differs by a few percent either way
    (our float path's too: 1.02-1.05x here), hence 1.25x."""
    ref, ref16, proc = setup["ref"], setup["ref16"], setup["proc"]
    ours = BatchedQwenVL.from_pretrained(setup["path"], dtype=torch.bfloat16)
    cams = frames([[(224, 252), (280, 280)]], seed=2)[0]
    inp = ref_inputs(proc, cams, "Describe.")
    with torch.no_grad():
        want = ref.model(**inp).last_hidden_state[0]
        inp16 = dict(inp, pixel_values=inp["pixel_values"].to(torch.bfloat16))
        theirs = ref16.model(**inp16).last_hidden_state[0]
    got = ours.encode([cams], ["Describe."]).hidden[0]
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 1.25 * rel_err(theirs, want)


def test_greedy_tokens_identical_to_transformers_on_the_twin(setup):
    """int4 linears computing in float32 (int4_dtype; exact to float32 rounding) give
    transformers' float32 tokens. In bfloat16 (the default) tokens can flip at near-tied logits of
    these random models, as transformers' own bfloat16 run flips (same sample, same step here)."""
    ref, proc = setup["ref"], setup["proc"]
    ours = BatchedQwenVL.from_pretrained(setup["path"], int4_dtype=torch.float32)
    assert ours.decoder.layers[0].qkv.weight.scale_zero.dtype == torch.float32
    imgs = frames([[(224, 252), (280, 280)], [(308, 420)], [(480, 640), (100, 90)]], seed=11)
    prompts = ["Describe.", "What is on the left side of the road?", "Count the cars, please."]
    ids = ours.generate_ids(imgs, prompts, max_new_tokens=16)
    for b, cams in enumerate(imgs):
        inp = ref_inputs(proc, cams, prompts[b])
        with torch.no_grad():
            r = ref.generate(**inp, max_new_tokens=16, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
        assert ids[b, :len(r)].tolist() == r, (setup["name"], b)


def test_dequantize_gives_the_twins_float_weights(setup):
    model = BatchedQwenVL.from_pretrained(setup["path"], dequantize=True)
    twin = BatchedQwenVL.from_pretrained(setup["twin"])
    assert all(isinstance(layer.qkv, nn.Linear) for layer in model.decoder.layers)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k


def test_transformers5_names_and_shards_load_the_same(setup, tmp_path):
    path = setup["path"]
    stored = load_file(str(path / "model.safetensors"))
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in stored.items()}
    out = tmp_path / "hf5-sharded"
    shutil.copytree(path, out)
    (out / "model.safetensors").unlink()
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: renamed[k] for k in keys}, str(out / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    model = BatchedQwenVL.from_pretrained(out)
    imgs = frames([[(224, 224)]], seed=3)
    assert torch.equal(model.encode(imgs, ["x"]).hidden, setup["ours"].encode(imgs, ["x"]).hidden)


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoder_weights_take_at_most_30_percent_of_bf16_at_group_128(tmp_path, dtype):
    """The small config (in_features 256 and 512) quantized with group size 128: the decoder layers'
    weights (linears and norms) against the same layers in bfloat16."""
    cfg = PRESETS["small"]
    path = save_tiny_checkpoint(tmp_path / "q", config=cfg, quantize="gptq", group_size=128)
    q = BatchedQwenVL.from_pretrained(path, dtype=dtype)
    f = BatchedQwenVL.from_pretrained(f"{path}-float", dtype=torch.bfloat16)
    assert all(isinstance(layer.gate_up, Int4Linear) for layer in q.decoder.layers)
    ratio = quant.weight_bytes(q.decoder.layers) / quant.weight_bytes(f.decoder.layers)
    assert ratio <= 0.30, ratio


def test_vectorized_awq_grid_equals_the_per_group_one():
    g = torch.Generator().manual_seed(4)
    for shape, group in (((24, 256), 128), ((16, 200), 128), ((8, 96), 32)):  # 200: a partial last group
        w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g)
        for ours, theirs in zip(quant.quantize_awq_rtn(w, group), quant.quantize_rtn(w, "awq", group)):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_in_memory_int4_decoder_equals_the_awq_checkpoint(tmp_path, family):
    """bench/gpu.py's int4 rows quantize a loaded decoder in memory (quantize_decoder_int4); loading
    the AWQ checkpoint of the same weights gives the same kernel weights and the same outputs."""
    path = save_tiny_checkpoint(tmp_path / "q", family=family, seed=0, quantize="awq", group_size=64)
    from_ckpt = BatchedQwenVL.from_pretrained(path)
    in_memory = BatchedQwenVL.from_pretrained(save_tiny_checkpoint(tmp_path / "f", family=family, seed=0))
    quant.quantize_decoder_int4(in_memory.decoder, group_size=64)
    for a, b in zip(from_ckpt.decoder.layers, in_memory.decoder.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            wa, wb = getattr(a, name).weight, getattr(b, name).weight
            assert torch.equal(wa.packed, wb.packed) and torch.equal(wa.scale_zero, wb.scale_zero), name
    imgs = frames([[(224, 224), (168, 252)]], seed=2)
    fa, fb = from_ckpt.encode(imgs, ["Describe."]), in_memory.encode(imgs, ["Describe."])
    assert torch.equal(fa.hidden, fb.hidden)


# ------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("awq") / "ckpt", quantize="awq", group_size=32)


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gptq") / "ckpt", quantize="gptq", group_size=32,
                                desc_act=True)


def _edited(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        raw = json.loads((dst / "config.json").read_text())
        raw["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(raw))
    if tensors:
        t = load_file(str(dst / "model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit, match", [
    (dict(bits=8), r"8-bit weights is not supported; supported: AWQ"),
    (dict(bits=3), r"3-bit weights is not supported; supported: AWQ"),
    (dict(version="gemv"), r"AWQ version 'gemv' is not supported; supported:"),
    (dict(version="exllama"), r"AWQ version 'exllama' is not supported"),
    (dict(zero_point=False), r"AWQ without zero point is not supported"),
    (dict(quant_method="bitsandbytes"), r"quantization method 'bitsandbytes' is not supported; supported:"),
    (dict(group_size=64), r"qzeros has shape \((\d+), 8\); AWQ with group size 64 expects \(\d+, 8\)"),
])
def test_unsupported_awq_configs_are_refused(awq_dir, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        BatchedQwenVL.from_pretrained(_edited(awq_dir, tmp_path / "x", config=edit))


def test_missing_scales_tensor_is_refused(awq_dir, tmp_path):
    d = _edited(awq_dir, tmp_path / "x", tensors=lambda t: t.pop("model.layers.1.mlp.down_proj.scales"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.down_proj.scales'\]"):
        BatchedQwenVL.from_pretrained(d)


def test_qweight_shape_disagreeing_with_the_config_is_refused(gptq_dir, tmp_path):
    def cut(t):
        t["model.layers.0.self_attn.o_proj.qweight"] = t["model.layers.0.self_attn.o_proj.qweight"][:4].contiguous()
    d = _edited(gptq_dir, tmp_path / "x", tensors=cut)
    with pytest.raises(ValueError, match=r"o_proj.qweight has shape \(4, 64\); GPTQ with group size 32 "
                                         r"expects \(8, 64\) for this 64x64 linear"):
        BatchedQwenVL.from_pretrained(d)


def test_gptq_format_and_act_order_refusals(gptq_dir, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_format 'marlin' is not supported"):
        BatchedQwenVL.from_pretrained(_edited(gptq_dir, tmp_path / "a", config=dict(checkpoint_format="marlin")))
    d = _edited(gptq_dir, tmp_path / "b", tensors=lambda t: t.pop("model.layers.0.mlp.up_proj.g_idx"))
    with pytest.raises(ValueError, match="missing model.layers.0.mlp.up_proj.g_idx, which desc_act"):
        BatchedQwenVL.from_pretrained(d)

    def reorder_k(t):  # k_proj grouped differently from q_proj and v_proj: one fused linear cannot hold both
        t["model.layers.1.self_attn.k_proj.g_idx"] = (torch.arange(64) // 32).to(torch.int32)
    d = _edited(gptq_dir, tmp_path / "c", tensors=reorder_k)
    with pytest.raises(ValueError, match="group their input rows differently.*dequantize=True"):
        BatchedQwenVL.from_pretrained(d)
    BatchedQwenVL.from_pretrained(d, dequantize=True)  # float weights: fine


def test_missing_kernel_is_a_clear_error():
    with pytest.raises(RuntimeError, match="int4 kernels are wired for cuda and cpu, not meta.*dequantize=True"):
        quant.check_int4_kernel(torch.device("meta"))


def test_the_float_parts_load_in_float(awq_dir):
    """Vision tower, embeddings and lm_head are stored (and load) in float in the released AWQ files."""
    raw = json.loads((awq_dir / "config.json").read_text())
    assert raw["quantization_config"]["modules_to_not_convert"] == ["visual"]
    stored = load_file(str(awq_dir / "model.safetensors"))
    assert not any(k.startswith(("visual.", "model.embed_tokens", "lm_head")) and k.endswith("qweight") for k in stored)
    model = BatchedQwenVL.from_pretrained(awq_dir)
    assert torch.equal(model.decoder.lm_head.weight, stored["lm_head.weight"])
    assert torch.equal(model.decoder.embed.weight, stored["model.embed_tokens.weight"])


# ------------------------------------------------------------------ extraction takes the path as is
def test_extraction_runs_a_quantized_model_path(awq_dir, tmp_path):
    pytest.importorskip("rosbags")
    from qvl_ros.offline import extract as ex
    from qvl_ros.offline.export import load_features
    from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag

    rec = write_camera_bag(tmp_path / "rec", [CameraSpec("/cam0/image_raw", 64, 96, "rgb8")], ticks=3, seed=0)
    cfg = ex.ExtractConfig(inputs=[tmp_path / "rec"], output=tmp_path / "out", topics=["/cam0/image_raw"],
                           model=str(awq_dir), device="cpu", batch=3, prompt="What is ahead?",
                           export=tmp_path / "arrays")
    ex.extract(cfg, progress="none")
    feats = load_features(tmp_path / "arrays")
    model = BatchedQwenVL.from_pretrained(awq_dir)
    imgs = [[torch.from_numpy(f.rgb.copy()).permute(2, 0, 1).contiguous()] for f in rec[0]]
    want = model.encode(imgs, ["What is ahead?"] * 3)
    assert torch.equal(feats["hidden"], want.hidden)
    assert torch.equal(feats["vision/cam0"], torch.stack([v[0] for v in want.vision]))


def test_tiny_quantized_checkpoint_picks_a_group_size_the_loader_takes(tmp_path):
    """save_tiny_checkpoint(quantize=...) without a group size stores one that loading accepts (the
    tiny decoder's widths are 64 and 128: 128 would not load for AWQ); a group size the loader would
    refuse is refused when saving, before anything is written."""
    for method in ("awq", "gptq"):
        path = save_tiny_checkpoint(tmp_path / method, quantize=method)
        assert json.loads((path / "config.json").read_text())["quantization_config"]["group_size"] == 64
        model = BatchedQwenVL.from_pretrained(path, int4_dtype=torch.float32)
        assert any(isinstance(m, Int4Linear) for m in model.decoder.modules())
        assert model.generate(torch.zeros(1, 1, 3, 56, 56, dtype=torch.uint8), ["hi"], max_new_tokens=2)
    with pytest.raises(ValueError, match="multiple of it"):
        save_tiny_checkpoint(tmp_path / "bad", quantize="awq", group_size=128)
    with pytest.raises(ValueError, match="multiple of 32"):
        save_tiny_checkpoint(tmp_path / "bad2", quantize="gptq", group_size=48)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
