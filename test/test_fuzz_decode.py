"""Hostile image messages through qvl_ros.core.conversion, in a child process.

torchvision 0.29.1's ``decode_image`` crashes the process (SIGSEGV, libpng "CRC error" / "Not
enough image data" / "bad adaptive filter value") on some damaged PNGs, so the conversion runs
in a child: a crash there is a test failure naming the case, not a dead pytest. The child
builds valid JPEGs (OpenCV: baseline, progressive, grayscale, restart markers, 4:4:4) and PNGs
(OpenCV, and a plain encoder here for palette, 1/2/4/16-bit, tRNS and Adam7-interlaced ones),
then feeds thousands of mutations through ``msg_to_tensor``: truncations, bit flips, byte
overwrites and insertions, CRC errors, payload damage with the CRC recomputed, short IDAT
chunks, dropped/duplicated chunks and marker segments, lengths out of range, declared sizes up
to 65535^2; plus random raw ``sensor_msgs/Image`` fields. Checked for every case: only
``ConversionError`` (with a key from ERROR_KEYS) is raised; an accepted image is uint8
``(3, H, W)`` with H, W those OpenCV decodes (compressed) or the message declares (raw); the
unmutated images decode exactly as OpenCV does. Over the run: resident memory does not grow
(after a warm-up), peak memory stays bounded, and the 16000^2 JPEG header bomb is rejected in
milliseconds. The case count and time are printed (``pytest -s``).
"""
import json
import os
import random
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

ROOT = Path(__file__).resolve().parents[1]
CASES = int(os.environ.get("QVL_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("QVL_FUZZ_SEED", "20240909"))
ENCODINGS = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "rgb16", "bgra16", "yuv422",
             "yuv422_yuy2", "bayer_rggb8", "bayer_grbg16", "8UC3", "16UC1"]


# ---------------------------------------------------------------------------------- PNG encoder
def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _pack_rows(px: np.ndarray, depth: int) -> list:
    """Rows of samples (h, w*channels) -> packed row bytes."""
    if depth == 16:
        return [r.astype(">u2").tobytes() for r in px]
    if depth == 8:
        return [r.astype(np.uint8).tobytes() for r in px]
    return [np.packbits(np.unpackbits(r.astype(np.uint8)[:, None], axis=1)[:, 8 - depth:].reshape(-1)).tobytes()
            for r in px]


def make_png(px, colour, depth, palette=None, trns=None, interlace=False):
    """A PNG written here (filter type 0), px: (h, w, channels) samples."""
    h, w = px.shape[:2]
    flat = px.reshape(h, w * px.shape[2]) if px.ndim == 3 else px
    if interlace:
        raw = b""
        for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                               (1, 0, 2, 2), (0, 1, 1, 2)):
            sub = px[y0::dy, x0::dx]
            if sub.size:
                raw += b"".join(b"\x00" + r for r in _pack_rows(sub.reshape(sub.shape[0], -1), depth))
    else:
        raw = b"".join(b"\x00" + r for r in _pack_rows(flat, depth))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, int(interlace)))
    if palette is not None:
        out += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if trns is not None:
        out += _chunk(b"tRNS", trns)
    data = zlib.compress(raw, 6)
    cut = len(data) // 2
    out += _chunk(b"IDAT", data[:cut]) + _chunk(b"IDAT", data[cut:])  # two IDATs, as encoders split them
    return out + _chunk(b"IEND", b"")


def png_chunks(b: bytes):
    pos, out = 8, []
    while pos + 12 <= len(b):
        n = struct.unpack(">I", b[pos:pos + 4])[0]
        out.append((pos, n, b[pos + 4:pos + 8]))
        pos += 12 + n
    return out


def short_idat_png(b: bytes) -> bytes:
    """The first IDAT cut in half, its length and CRC made consistent: libpng runs out of data."""
    pos, n, _ = next(c for c in png_chunks(b) if c[2] == b"IDAT")
    return b[:pos] + _chunk(b"IDAT", b[pos + 8:pos + 8 + n // 2]) + b[pos + 12 + n:]


def crc_error_png(b: bytes) -> bytes:
    pos, n, _ = next(c for c in png_chunks(b) if c[2] == b"IDAT")
    bb = bytearray(b)
    bb[pos + 8 + n] ^= 0xFF
    return bytes(bb)


def sof_resized_jpeg(b: bytes, h: int, w: int) -> bytes:
    for m in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = b.find(m)
        if at > 0:
            return b[:at + 5] + struct.pack(">HH", h, w) + b[at + 9:]
    raise ValueError("no SOF")


# ---------------------------------------------------------------------------------- the bases
def _smooth(rng, h, w, ch=3):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * (37 + 11 * c) + yy * (23 + 7 * c)) % 256 for c in range(ch)], -1)
    return (img + rng.integers(0, 24, img.shape)).clip(0, 255).astype(np.uint8)


def bases(rng):
    out = []
    for h, w, flags in [(24, 40, []), (33, 47, [cv2.IMWRITE_JPEG_QUALITY, 60]),
                        (48, 64, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                        (40, 56, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]),
                        (32, 32, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])]:
        out.append(("jpeg", bytes(cv2.imencode(".jpg", _smooth(rng, h, w), flags)[1])))
    out.append(("jpeg", bytes(cv2.imencode(".jpg", _smooth(rng, 30, 20, 1)[:, :, 0])[1])))
    out.append(("png", bytes(cv2.imencode(".png", _smooth(rng, 36, 44))[1])))
    out.append(("png", bytes(cv2.imencode(".png", _smooth(rng, 20, 28, 4))[1])))
    out.append(("png", bytes(cv2.imencode(".png", (_smooth(rng, 18, 22).astype(np.uint16) * 257))[1])))
    pal = rng.integers(0, 256, (16, 3))
    idx = rng.integers(0, 16, (21, 19, 1))
    out.append(("png", make_png(idx, 3, 4, palette=pal, trns=bytes(range(0, 160, 10)))))
    out.append(("png", make_png(rng.integers(0, 4, (17, 23, 1)), 0, 2)))
    out.append(("png", make_png(rng.integers(0, 2, (9, 13, 1)), 0, 1, trns=b"\x00\x01")))
    out.append(("png", make_png(_smooth(rng, 27, 31), 2, 8, interlace=True)))
    out.append(("png", make_png(rng.integers(0, 65536, (11, 14, 2)), 4, 16, interlace=True)))
    out.append(("png", make_png(rng.integers(0, 256, (12, 10, 1)), 3, 8, palette=rng.integers(0, 256, (256, 3)))))
    return out


# ---------------------------------------------------------------------------------- mutations
def _flip(rng, b, lo=0):
    bb = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(lo, len(bb))
        bb[at] ^= 1 << rng.randrange(8)
    return bytes(bb)


def _overwrite(rng, b):
    bb = bytearray(b)
    at = rng.randrange(len(bb))
    n = rng.randint(1, 16)
    bb[at:at + n] = bytes(rng.randrange(256) for _ in range(n))
    return bytes(bb)


def _insert(rng, b):
    at = rng.randrange(len(b))
    return b[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32))) + b[at:]


def _png_mutation(rng, b):
    chunks = png_chunks(b)
    pos, n, ctype = rng.choice(chunks)
    payload = b[pos + 8:pos + 8 + n]
    what = rng.randrange(9)
    if what == 0:  # damage a payload, CRC recomputed (an attacker can)
        p = _flip(rng, payload) if payload else payload
        return b[:pos] + _chunk(ctype, p) + b[pos + 12 + n:]
    if what == 1:
        return short_idat_png(b)
    if what == 2:
        return crc_error_png(b) if rng.random() < 0.5 else _flip(rng, b[:pos + 12 + n], pos) + b[pos + 12 + n:]
    if what == 3:  # declared size
        ih = chunks[0][0]
        w, h = rng.choice([(16000, 16000), (65535, 65535), (0, 5), (rng.randint(1, 5000), rng.randint(1, 5000)),
                           (2 ** 31 - 1, 1), (rng.randint(1, 64), rng.randint(1, 64))])
        body = struct.pack(">II", w, h) + b[ih + 16:ih + 21]
        return b[:ih] + _chunk(b"IHDR", body) + b[ih + 25:]
    if what == 4:  # length field out of range
        bb = bytearray(b)
        bb[pos:pos + 4] = struct.pack(">I", rng.choice([n + 1, max(0, n - 1), 0x7FFFFFFF, 0xFFFFFFFF,
                                                       rng.randrange(1 << 32)]))
        return bytes(bb)
    if what == 5:  # drop a chunk
        return b[:pos] + b[pos + 12 + n:]
    if what == 6:  # duplicate a chunk
        return b[:pos] + b[pos:pos + 12 + n] + b[pos:]
    if what == 7:  # recompressed IDAT stream with damaged filter bytes or extra data
        raw = zlib.decompress(b"".join(b[p + 8:p + 8 + m] for p, m, t in chunks if t == b"IDAT"))
        raw = _flip(rng, raw) if rng.random() < 0.7 else raw + bytes(rng.randint(1, 40))
        first = next(p for p, m, t in chunks if t == b"IDAT")
        end = next(p for p, m, t in chunks if t == b"IEND")
        return b[:first] + _chunk(b"IDAT", zlib.compress(raw)) + b[end:]
    return b[:pos] + _chunk(b"IDAT", zlib.compress(bytes(rng.randint(1, 4000)))) + b[pos:]  # stray IDAT


def _jpeg_segments(b):
    pos, out = 2, []
    while pos + 4 <= len(b) and b[pos] == 0xFF and b[pos + 1] not in (0xD9, 0xDA):
        n = struct.unpack(">H", b[pos + 2:pos + 4])[0]
        out.append((pos, n + 2, b[pos + 1]))
        pos += n + 2
    return out, pos  # pos: the SOS marker


def _jpeg_mutation(rng, b):
    segs, sos = _jpeg_segments(b)
    what = rng.randrange(7)
    if what == 0:
        h, w = rng.choice([(16000, 16000), (65535, 65535), (0, 10), (rng.randint(1, 4000), rng.randint(1, 4000)),
                           (rng.randint(1, 80), rng.randint(1, 80))])
        return sof_resized_jpeg(b, h, w)
    if what == 1 and segs:  # drop a segment (DQT, DHT, SOF, APPn)
        pos, n, _ = rng.choice(segs)
        return b[:pos] + b[pos + n:]
    if what == 2 and segs:  # change a segment length
        pos, n, _ = rng.choice(segs)
        return b[:pos + 2] + struct.pack(">H", rng.randrange(65536)) + b[pos + 4:]
    if what == 3:  # damage in the entropy-coded data
        return _flip(rng, b, min(sos + 14, len(b) - 3))
    if what == 4:  # cut, then terminated again
        return b[:rng.randrange(2, len(b))] + b"\xff\xd9"
    if what == 5:  # no EOI
        return b[:-2]
    return b[:sos] + b[-2:]  # no scan


def mutate(rng, codec, b):
    r = rng.random()
    if r < 0.2:
        return "truncate", b[:rng.randrange(len(b))]
    if r < 0.4:
        return "bitflip", _flip(rng, b)
    if r < 0.5:
        return "overwrite", _overwrite(rng, b)
    if r < 0.55:
        return "insert", _insert(rng, b)
    if codec == "png":
        return "png", _png_mutation(rng, b)
    return "jpeg", _jpeg_mutation(rng, b)


def raw_case(rng):
    enc = rng.choice(ENCODINGS + ["", "AbCdEf:", "jpeg", "rgb8\x00", "x" * 300])
    h = rng.choice([0, 1, 2, 3, rng.randint(1, 64), rng.randint(1, 64), 65535, 2 ** 31])
    w = rng.choice([0, 1, 2, 3, rng.randint(1, 64), rng.randint(1, 64), 65535, 2 ** 31])
    bpp = {"rgb8": 3, "bgr8": 3, "8UC3": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2, "16UC1": 2,
           "rgb16": 6, "bgra16": 8, "yuv422": 2, "yuv422_yuy2": 2, "bayer_rggb8": 1, "bayer_grbg16": 2}.get(enc, 3)
    step = rng.choice([w * bpp, w * bpp + rng.randint(1, 9), max(0, w * bpp - 1), 0, 2 ** 32 - 1])
    need = step * h if step * h < 1 << 20 else 4096
    size = rng.choice([need, need, max(0, need - rng.randint(1, 10)), need + 7, 0])
    data = bytes(rng.randrange(256) for _ in range(min(size, 64))) * (size // 64 + 1)
    return types.SimpleNamespace(height=h, width=w, encoding=enc, is_bigendian=rng.randint(0, 1), step=step,
                                 data=data[:size])


# ---------------------------------------------------------------------------------- the child
def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(cases: int, seed: int) -> None:
    import resource
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    from qvl_ros.core.conversion import ERROR_KEYS, ConversionError, msg_to_tensor

    rng = random.Random(seed)
    base_list = bases(np.random.default_rng(seed))
    stats = {"cases": 0, "accepted": 0, "rejected": {}, "failures": [], "named": {}}
    out = sys.stdout

    def run(label, msg, expect_hw):
        out.write(f"case {stats['cases']} {label}\n")
        out.flush()
        stats["cases"] += 1
        try:
            t = msg_to_tensor(msg, "cpu", min_size=1)
        except ConversionError as exc:
            if exc.key not in ERROR_KEYS:
                stats["failures"].append(f"{label}: key {exc.key!r}")
            stats["rejected"][exc.key] = stats["rejected"].get(exc.key, 0) + 1
            return exc
        except Exception as exc:  # anything but ConversionError is a bug
            stats["failures"].append(f"{label}: {type(exc).__name__}: {exc}"[:300])
            return exc
        stats["accepted"] += 1
        hw = expect_hw() if callable(expect_hw) else expect_hw
        if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[0] != 3 or (hw is not None and tuple(t.shape[1:]) != hw):
            stats["failures"].append(f"{label}: tensor {tuple(t.shape)} {t.dtype}, expected (3, {hw})")
        return t

    def cv_hw(data):
        def hw():
            dec = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if dec is None:
                stats["failures"].append(f"accepted data OpenCV rejects ({len(data)} bytes)")
                return None
            return dec.shape[:2]
        return hw

    def compressed(data, fmt):
        return types.SimpleNamespace(format=fmt, data=data)

    # Unmutated: decoded exactly as OpenCV does.
    for i, (codec, data) in enumerate(base_list):
        t = run(f"base {i} {codec}", compressed(data, codec), cv_hw(data))
        ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        sixteen_bit = codec == "png" and data[24] == 16  # OpenCV drops the low byte there; we round
        if not sixteen_bit and not (hasattr(t, "shape") and
                                          np.array_equal(t.permute(1, 2, 0).numpy(), ref[:, :, ::-1])):
            stats["failures"].append(f"base {i} {codec} differs from OpenCV")

    # Named cases.
    png = next(d for c, d in base_list if c == "png")
    jpeg = base_list[0][1]
    padded = jpeg[:-2] + bytes(47_000) + b"\xff\xd9"  # 47 KB, as found in the field
    named = {
        "png_short_idat": compressed(short_idat_png(png), "png"),
        "png_crc_error": compressed(crc_error_png(png), "png"),
        "jpeg_16000x16000": compressed(sof_resized_jpeg(padded, 16000, 16000), "jpeg"),
        "jpeg_65535x65535": compressed(sof_resized_jpeg(jpeg, 65535, 65535), "jpeg"),
        "jpeg_cut_in_half": compressed(jpeg[:len(jpeg) // 2], "jpeg"),
        "raw_huge": types.SimpleNamespace(height=65535, width=65535, encoding="rgb8", is_bigendian=0,
                                          step=3 * 65535, data=bytes(16)),
    }
    for name, msg in named.items():
        t0 = time.perf_counter()
        res = run(name, msg, None)
        stats["named"][name] = {"key": getattr(res, "key", None), "ms": (time.perf_counter() - t0) * 1e3,
                                "reason": str(res)[:200]}

    rss_start = None
    for i in range(cases):
        if i == cases // 10:
            rss_start = _rss_mb()
        if rng.random() < 0.2:
            msg = raw_case(rng)
            h, w = int(msg.height), int(msg.width)
            run(f"raw {msg.encoding[:12]!r} {h}x{w} step {msg.step} len {len(msg.data)}", msg, (h, w))
            continue
        codec, data = rng.choice(base_list)
        kind, bad = mutate(rng, codec, data)
        if not bad:
            bad = data[:1]
        run(f"{kind} {codec} ({len(bad)} bytes, crc32 {zlib.crc32(bad):08x})", compressed(bad, codec), cv_hw(bad))
    stats["rss_start_mb"] = rss_start
    stats["rss_end_mb"] = _rss_mb()
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write("RESULT " + json.dumps(stats) + "\n")
    out.flush()


# ---------------------------------------------------------------------------------- the tests
def test_fuzzed_messages_never_crash_leak_or_return_a_wrong_size():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(CASES), str(SEED)], capture_output=True,
                          text=True, env=env, timeout=600)
    elapsed = time.perf_counter() - t0
    lines = proc.stdout.splitlines()
    last_case = next((ln for ln in reversed(lines) if ln.startswith("case ")), "none")
    assert proc.returncode == 0, (f"the conversion killed the process (rc {proc.returncode}) at {last_case}; "
                                  f"stderr: {proc.stderr[-2000:]}")
    stats = json.loads(next(ln for ln in lines if ln.startswith("RESULT "))[7:])
    assert not stats["failures"], stats["failures"][:20]
    named = stats["named"]
    for name in ("png_short_idat", "png_crc_error", "jpeg_cut_in_half"):
        assert named[name]["key"] == "corrupt", (name, named[name])
    for name in ("jpeg_16000x16000", "jpeg_65535x65535", "raw_huge"):
        assert named[name]["key"] == "too_large" and named[name]["ms"] < 50, (name, named[name])
    assert "CRC error" in named["png_crc_error"]["reason"]
    assert stats["cases"] >= CASES
    assert stats["accepted"] > CASES // 20 and sum(stats["rejected"].values()) > CASES // 2, stats
    growth = stats["rss_end_mb"] - stats["rss_start_mb"]
    assert growth < 48, f"resident memory grew by {growth:.0f} MiB over the run"
    # The largest frame the default max_input_pixels lets through is 48 MiB decoded; a bomb the
    # limit missed would add GBs (16000^2 alone: 732 MiB, decoded twice here with OpenCV).
    assert stats["peak_rss_mb"] - stats["rss_start_mb"] < 1024, stats
    print(f"\nfuzz: {stats['cases']} cases in {elapsed:.1f} s (child process, seed {SEED}): "
          f"{stats['accepted']} accepted, rejected by key {stats['rejected']}; RSS {stats['rss_start_mb']:.0f} -> "
          f"{stats['rss_end_mb']:.0f} MiB, peak {stats['peak_rss_mb']:.0f} MiB")


def test_gpu_jpeg_path_runs_the_same_check_before_the_device_decoder():
    """gpu_jpeg=True with a CUDA device: the truncated stream is rejected by the container check
    (ConversionError naming the truncation) before nvJPEG or any CUDA call; here, without a GPU,
    reaching the device decoder would raise a CUDA RuntimeError instead."""
    import torch

    from qvl_ros.core.conversion import ConversionError, compressed_to_tensor

    jpeg = bytes(cv2.imencode(".jpg", _smooth(np.random.default_rng(0), 64, 80))[1])
    cut = types.SimpleNamespace(format="jpeg", data=jpeg[:len(jpeg) // 2])
    for device in ("cuda", "cpu"):
        with pytest.raises(ConversionError, match="truncated") as err:
            compressed_to_tensor(cut, device=device, gpu_jpeg=True)
        assert err.value.key == "corrupt"
    bomb = types.SimpleNamespace(format="jpeg", data=sof_resized_jpeg(jpeg, 16000, 16000))
    with pytest.raises(ConversionError, match="max_input_pixels") as err:
        compressed_to_tensor(bomb, device="cuda", gpu_jpeg=True)
    assert err.value.key == "too_large"
    if torch.cuda.is_available():  # the device decoder on the intact stream
        out = compressed_to_tensor(types.SimpleNamespace(format="jpeg", data=jpeg), device="cuda", gpu_jpeg=True)
        assert out.shape == (3, 64, 80) and out.is_cuda


def test_max_input_pixels_is_checked_from_the_header():
    from qvl_ros.core.conversion import ConversionError, msg_to_tensor

    rng = np.random.default_rng(1)
    jpeg = bytes(cv2.imencode(".jpg", _smooth(rng, 40, 50))[1])
    png = bytes(cv2.imencode(".png", _smooth(rng, 40, 50))[1])
    raw = types.SimpleNamespace(height=40, width=50, encoding="rgb8", is_bigendian=0, step=150, data=bytes(6000))
    for msg in (types.SimpleNamespace(format="jpeg", data=jpeg), types.SimpleNamespace(format="png", data=png), raw):
        assert msg_to_tensor(msg, max_input_pixels=2000).shape == (3, 40, 50)
        with pytest.raises(ConversionError, match="1999") as err:
            msg_to_tensor(msg, max_input_pixels=1999)
        assert err.value.key == "too_large"
        assert msg_to_tensor(msg, max_input_pixels=None).shape == (3, 40, 50)


if __name__ == "__main__":
    child(int(sys.argv[1]), int(sys.argv[2]))
