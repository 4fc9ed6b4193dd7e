"""Checkpoints that would allocate without bound, fail with unrelated errors, or compute
non-finite features: refused at load, naming the file and the field.

Each case edits one thing of a copy of the tiny checkpoint. Oracles: the refusal must name what
was edited (the file, the field, the tensor); the NaN/Inf counts are those safetensors' own reader
finds in the file; a config that transformers parses for minutes is loaded in a subprocess that
must answer well before that; the memory estimate is compared with the peak resident memory a
real encode of an image that size takes (read from the kernel, in a subprocess of its own).
"""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qvl_ros.model import BatchedQwenVL
from qvl_ros.model.checkpoint import default_tiny_checkpoint
from qvl_ros.model.config import PRESETS, ConfigError, image_bytes, pixel_bounds_problem
from qvl_ros.model.weights_check import WeightsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(default_tiny_checkpoint(), path)
    return path


def _edit_config(path: Path, text: dict | None = None, vision: dict | None = None) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(text or {})
    config["vision_config"].update(vision or {})
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("text, vision, field", [
    ({"num_attention_heads": 0}, None, "num_attention_heads is 0"),  # was ZeroDivisionError
    ({"num_attention_heads": 5}, None, "hidden_size 64 is not a multiple of num_attention_heads 5"),
    ({"num_key_value_heads": 3}, None, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"hidden_size": -64}, None, "hidden_size is -64"),
    ({"vocab_size": 2.5}, None, "vocab_size is 2.5: not an integer"),
    ({"torch_dtype": "float33"}, None, "torch_dtype is 'float33', not a torch dtype"),  # was AttributeError
    ({"image_token_id": 4000}, None, "image_token_id 4000 is not inside the vocabulary"),
    (None, {"depth": 10 ** 9}, "vision_config.depth is 1000000000"),  # was 4.2 GB, then MemoryError
    (None, {"num_heads": 3}, "hidden size 64 / num_heads 3"),
    (None, {"out_hidden_size": 32}, "output size 32 differs from the decoder's hidden_size 64"),
    (None, {"hidden_act": "gelu"}, "vision_config.hidden_act is 'gelu'"),
    (None, {"fullatt_block_indexes": [1, 7]}, "fullatt_block_indexes [1, 7] are not all below depth 4"),
    (None, {"window_size": 100}, "window_size 100 is not a positive multiple"),
])
def test_config_sizes_are_checked_naming_the_file_and_the_field(ckpt, text, vision, field):
    _edit_config(ckpt, text, vision)
    with pytest.raises(ConfigError) as refused:
        BatchedQwenVL.from_pretrained(ckpt)
    assert str(ckpt / "config.json") in str(refused.value)
    assert field in str(refused.value)


def test_a_billion_layers_is_refused_before_transformers_parses_the_config(ckpt):
    """transformers' config parsing took over 90 s for num_hidden_layers 10^9: the load, in a
    subprocess, must be refused well within 60 s."""
    _edit_config(ckpt, {"num_hidden_layers": 10 ** 9})
    code = textwrap.dedent(f"""
        from qvl_ros.model import BatchedQwenVL
        from qvl_ros.model.config import ConfigError
        try:
            BatchedQwenVL.from_pretrained({str(ckpt)!r})
        except ConfigError as exc:
            print("refused:", exc)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert f"refused: {ckpt / 'config.json'}: num_hidden_layers is 1000000000: outside [1, 1024]" in run.stdout, \
        run.stderr[-2000:]


def test_a_config_that_is_no_object_or_too_large_is_named(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json: holds a JSON list, not an object"):
        BatchedQwenVL.from_pretrained(ckpt)
    (ckpt / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(ConfigError, match=r"config.json: \d+ bytes, more than a config"):
        BatchedQwenVL.from_pretrained(ckpt)


def test_a_weight_file_that_is_a_directory_and_a_missing_tokenizer_are_named(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match=f"{ckpt} has no tokenizer"):  # was "chat template did not render"
        BatchedQwenVL.from_pretrained(ckpt)
    shutil.copy(default_tiny_checkpoint() / "tokenizer.json", ckpt / "tokenizer.json")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    with pytest.raises(WeightsError, match=f"{ckpt / 'model.safetensors'} is not a regular file"):  # was ENODEV
        BatchedQwenVL.from_pretrained(ckpt)


def test_damaged_weights_a_wrong_shape_and_a_garbled_tokenizer_name_their_file(ckpt):
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    for damaged in (good[: len(good) // 2], b"", bytes(range(256)) * 64):  # cut, empty, random bytes
        weights.write_bytes(damaged)
        with pytest.raises(WeightsError, match=f"{weights}: not a readable safetensors file"):
            BatchedQwenVL.from_pretrained(ckpt)
    from safetensors.torch import load_file, save_file

    weights.write_bytes(good)
    tensors = load_file(str(weights))
    name = next(k for k, v in tensors.items() if k.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name][:, :-1].contiguous()  # one column short
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=f"{weights}: weight .*embed_tokens.weight has shape"):
        BatchedQwenVL.from_pretrained(ckpt)
    weights.write_bytes(good)
    (ckpt / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(ValueError, match=f"{ckpt / 'tokenizer.json'}: the tokenizer does not load"):
        BatchedQwenVL.from_pretrained(ckpt)


def test_nan_and_inf_weights_are_reported_at_load_unless_the_check_is_off(ckpt):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][3, 5:8] = float("nan")
    weights["visual.blocks.2.attn.qkv.bias"][0] = float("-inf")
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    stored = load_file(str(ckpt / "model.safetensors"))  # the oracle: what safetensors reads back
    counts = {k: int((~torch.isfinite(t)).sum()) for k, t in stored.items() if not torch.isfinite(t).all()}
    assert counts == {"model.layers.1.mlp.up_proj.weight": 3, "visual.blocks.2.attn.qkv.bias": 1}
    with pytest.raises(WeightsError) as refused:
        BatchedQwenVL.from_pretrained(ckpt)
    for name, count in counts.items():
        assert f"{name} ({count})" in str(refused.value)
    model = BatchedQwenVL.from_pretrained(ckpt, check_finite=False)  # the opt-out: loads, features not finite
    frames = torch.randint(0, 256, (1, 1, 3, 56, 84), dtype=torch.uint8)
    assert not torch.isfinite(model.encode(frames, ["Describe."]).hidden).all()


def test_pixel_bounds_beyond_the_decoder_positions_or_reversed_are_refused(ckpt):
    """min_pixels 2^30 (inside the node's parameter range) made warm-up try 38.7 GB."""
    with pytest.raises(ConfigError, match=r"image min_pixels 1073741824 gives more tokens than the decoder's 32768 "
                                          r"positions \(at most 25690112 pixels\)"):
        BatchedQwenVL.from_pretrained(ckpt, min_pixels=1 << 30, max_pixels=1 << 30)
    with pytest.raises(ConfigError, match=r"image range \[1073741824, 1003520\] is not 1 <= min <= max"):
        BatchedQwenVL.from_pretrained(ckpt, min_pixels=1 << 30)
    with pytest.raises(ConfigError, match=r"clip frame max_pixels 1073741824 gives more tokens"):
        BatchedQwenVL.from_pretrained(ckpt, video_max_pixels=1 << 30)
    assert BatchedQwenVL.from_pretrained(ckpt, min_pixels=56 * 56, max_pixels=25690112).processor.max_pixels == 25690112


def test_a_pixel_bound_whose_image_does_not_fit_in_free_memory_is_refused():
    cfg = PRESETS["qwen2.5-vl-3b"]
    need = image_bytes(cfg, 12845056, 2)
    assert pixel_bounds_problem(cfg, "image", 3136, 12845056, 2, free=need + 1) is None
    problem = pixel_bounds_problem(cfg, "image", 3136, 12845056, 2, free=need // 2)
    assert problem.startswith("image max_pixels 12845056: one image that size needs about")


_PEAK = textwrap.dedent("""
    import sys, torch
    from qvl_ros.model import BatchedQwenVL
    from qvl_ros.model.checkpoint import default_tiny_checkpoint

    def status_kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    side = int(sys.argv[1])
    model = BatchedQwenVL.from_pretrained(default_tiny_checkpoint(), min_pixels=3136, max_pixels=side * side)
    frames = torch.randint(0, 256, (1, 1, 3, side, side), dtype=torch.uint8)
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = status_kb("VmRSS")
    model.encode(frames, ["Describe."])
    print((status_kb("VmHWM") - before) * 1024)
""")


def test_the_memory_estimate_is_of_the_order_of_a_real_encode():
    """The estimate for one 1400 x 1400 image (10,000 patches) against the growth of the peak
    resident memory of a real encode in a fresh process: within a factor of 4 either way."""
    side = 1400
    run = subprocess.run([sys.executable, "-c", _PEAK, str(side)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = int(run.stdout.split()[-1])
    estimate = image_bytes(PRESETS["tiny"], side * side, 4)
    assert estimate / 4 <= measured <= estimate * 4, (estimate, measured)
