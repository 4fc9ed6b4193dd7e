"""Library demo: features and captions for a few generated camera frames with the tiny model.

    python -m qvl_ros.sim.model_demo [--model DIR] [--batch 2] [--cameras 3] [--device auto]

Prints shapes, timings and captions. Without --model it uses the bundled tiny checkpoint
(random weights, so captions are noise; the point is shapes, speed and the API).
"""
from __future__ import annotations

import argparse
import time

import torch


def synthetic_frames(batch: int, cameras: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Smooth colour gradients with a moving square, cameras of different sizes."""
    sizes = [(480, 640), (360, 480), (224, 252), (308, 420), (280, 280), (240, 320)]
    out = []
    for b in range(batch):
        cams = []
        for n in range(cameras):
            h, w = sizes[n % len(sizes)]
            y = torch.linspace(0, 255, h).view(h, 1).expand(h, w)
            x = torch.linspace(0, 255, w).view(1, w).expand(h, w)
            img = torch.stack([y, x, (y + x + 40 * n) % 256]).to(torch.uint8).clone()
            s = 20 + 10 * ((b + seed + n) % 5)
            img[:, s:s + h // 4, s:s + w // 4] = torch.tensor([255, 40, 40], dtype=torch.uint8).view(3, 1, 1)
            cams.append(img)
        out.append(cams)
    return out


def run(model_path=None, batch: int = 2, cameras: int = 3, device: str = "auto", max_new_tokens: int = 12) -> None:
    from qvl_ros.model import BatchedQwenVL, default_tiny_checkpoint

    path = model_path or default_tiny_checkpoint()
    t0 = time.perf_counter()
    model = BatchedQwenVL.from_pretrained(path, device=device, dtype="auto")
    print(f"model   {path}  ({model.cfg.family}, device={model.device}, dtype={model.dtype}, "
          f"loaded in {time.perf_counter() - t0:.2f} s)")
    frames = synthetic_frames(batch, cameras)
    prompts = ["Describe the scene." if b % 2 == 0 else "What is in front of the robot?" for b in range(batch)]
    print(f"input   B={batch} samples x N={cameras} cameras: "
          + ", ".join(f"{tuple(im.shape[1:])}" for im in frames[0]))
    model.encode(frames, prompts)  # warm-up: index math cached per camera size
    t0 = time.perf_counter()
    feats = model.encode(frames, prompts)
    t_enc = time.perf_counter() - t0
    for n, v in enumerate(feats.vision[0]):
        print(f"vision  camera {n}: {tuple(v.shape)}")
    print(f"hidden  {tuple(feats.hidden.shape)}  (B, L, D), left padded; real lengths "
          f"{feats.attention_mask.sum(1).tolist()}")
    print(f"encode  {t_enc * 1000:.1f} ms for {batch * cameras} frames "
          f"({batch * cameras / t_enc:.1f} frames/s on {model.device})")
    t0 = time.perf_counter()
    _, texts = model.encode_generate(frames, prompts, max_new_tokens=max_new_tokens)
    t_gen = time.perf_counter() - t0
    print(f"caption {max_new_tokens} new tokens per sample in {t_gen * 1000:.1f} ms")
    for b, t in enumerate(texts):
        print(f"  [{b}] {prompts[b]!r} -> {t!r}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: bundled tiny model)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--cameras", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:k]")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    a = ap.parse_args(argv)
    run(a.model, a.batch, a.cameras, a.device, a.max_new_tokens)


if __name__ == "__main__":
    main()
