"""qvl_ros.core.conversion against OpenCV (cv2.cvtColor / cv2.imdecode) as the independent oracle.

Messages are real sensor_msgs/Image and CompressedImage objects; images are random and made
here. OpenCV is called with the conversion codes cv_bridge uses for a conversion to "rgb8", and
16-bit data is scaled like cv_bridge's convertTo(CV_8U, 255/65535) (cv2.convertScaleAbs gives
the same result for unsigned input and is what OpenCV's Python API exposes).
"""

import array
import io
import types
import zlib

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
sensor_msgs_msg = pytest.importorskip("sensor_msgs.msg")
Image = sensor_msgs_msg.Image
CompressedImage = sensor_msgs_msg.CompressedImage

from qvl_ros.core.conversion import (  # noqa: E402
    SUPPORTED_ENCODINGS,
    ConversionError,
    compressed_to_tensor,
    image_to_tensor,
    msg_to_tensor,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

SCALE16 = 255.0 / 65535.0

# encoding -> (channels, dtype, cv2 code to RGB or None for "already RGB")
RAW = {
    "rgb8": (3, np.uint8, None),
    "bgr8": (3, np.uint8, cv2.COLOR_BGR2RGB),
    "rgba8": (4, np.uint8, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, np.uint8, cv2.COLOR_BGRA2RGB),
    "mono8": (1, np.uint8, cv2.COLOR_GRAY2RGB),
    "8UC1": (1, np.uint8, cv2.COLOR_GRAY2RGB),
    "8UC3": (3, np.uint8, cv2.COLOR_BGR2RGB),
    "8UC4": (4, np.uint8, cv2.COLOR_BGRA2RGB),
    "rgb16": (3, np.uint16, None),
    "bgr16": (3, np.uint16, cv2.COLOR_BGR2RGB),
    "rgba16": (4, np.uint16, cv2.COLOR_RGBA2RGB),
    "bgra16": (4, np.uint16, cv2.COLOR_BGRA2RGB),
    "mono16": (1, np.uint16, cv2.COLOR_GRAY2RGB),
    "16UC1": (1, np.uint16, cv2.COLOR_GRAY2RGB),
    "yuv422": (2, np.uint8, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, np.uint8, cv2.COLOR_YUV2RGB_YUY2),
    # cv_bridge's table: OpenCV names the pattern by its second row, hence the shift.
    "bayer_rggb8": (1, np.uint8, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": (1, np.uint8, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": (1, np.uint8, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": (1, np.uint8, cv2.COLOR_BayerGB2RGB),
    "bayer_rggb16": (1, np.uint16, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr16": (1, np.uint16, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg16": (1, np.uint16, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg16": (1, np.uint16, cv2.COLOR_BayerGB2RGB),
}
EIGHT_BIT = [e for e, (_, dt, _) in RAW.items() if dt == np.uint8]
SIXTEEN_BIT = [e for e, (_, dt, _) in RAW.items() if dt == np.uint16]
SIZES = [(17, 31), (480, 640), (3, 3), (2, 2), (5, 2), (2, 7), (34, 18)]  # (height, width)


def seeded(*key):
    """A generator seeded from the test parameters (stable across processes)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def random_array(rng, h, w, encoding):
    ch, dtype, _ = RAW[encoding]
    shape = (h, w) if ch == 1 else (h, w, ch)
    return rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def make_image(arr, encoding, pad=0, big_endian=False, rng=None):
    """A sensor_msgs/Image holding ``arr`` with ``pad`` random bytes after every row."""
    rng = rng or np.random.default_rng(123)
    h, w = arr.shape[:2]
    if arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">" if big_endian else "<"))
    rows = arr.reshape(h, -1).view(np.uint8)
    if pad:
        rows = np.concatenate([rows, rng.integers(0, 256, (h, pad), dtype=np.uint8)], axis=1)
    msg = Image()
    msg.height, msg.width = h, w
    msg.encoding = encoding
    msg.is_bigendian = big_endian
    msg.step = rows.shape[1]
    msg.data = rows.tobytes()
    return msg


def oracle(arr, encoding):
    """RGB uint8 (H, W, 3) from OpenCV, the way cv_bridge converts ``encoding`` to rgb8."""
    _, dtype, code = RAW[encoding]
    rgb = arr if code is None else cv2.cvtColor(arr, code)
    if dtype == np.uint16:
        rgb = cv2.convertScaleAbs(rgb, alpha=SCALE16)
    return rgb


def as_hwc(t):
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.uint8
    assert t.dim() == 3 and t.shape[0] == 3
    assert t.is_contiguous()
    return t.permute(1, 2, 0).cpu().numpy()


def assert_same(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    diff = np.abs(out.astype(np.int32) - ref.astype(np.int32))
    assert diff.max() == 0, f"max diff {diff.max()} at {np.argwhere(diff > 0)[:5].tolist()}"


def _sizes_for(encoding):
    if encoding.startswith("yuv"):
        return [(h, w + (w % 2)) for h, w in SIZES]
    return SIZES


@pytest.mark.parametrize("encoding", EIGHT_BIT)
@pytest.mark.parametrize("pad", [0, 5])
def test_raw_8bit_matches_opencv(encoding, pad):
    rng = seeded(encoding, pad)
    for h, w in _sizes_for(encoding):
        arr = random_array(rng, h, w, encoding)
        msg = make_image(arr, encoding, pad=pad, rng=rng)
        assert msg.step == arr[0].nbytes + pad
        assert_same(as_hwc(image_to_tensor(msg)), oracle(arr, encoding))


@pytest.mark.parametrize("encoding", SIXTEEN_BIT)
@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("pad", [0, 3])
def test_raw_16bit_matches_opencv(encoding, big_endian, pad):
    rng = seeded(encoding, big_endian, pad)
    for h, w in SIZES:
        arr = random_array(rng, h, w, encoding)
        msg = make_image(arr, encoding, pad=pad, big_endian=big_endian, rng=rng)
        assert_same(as_hwc(image_to_tensor(msg)), oracle(arr, encoding))


def test_big_endian_flag_is_honoured():
    arr = np.array([[0x0102, 0xFF00], [0x00FF, 0x8000]], dtype=np.uint16)
    little = as_hwc(image_to_tensor(make_image(arr, "mono16", big_endian=False)))[..., 0]
    big = as_hwc(image_to_tensor(make_image(arr, "mono16", big_endian=True)))[..., 0]
    expected = (arr.astype(np.int64) + 128) // 257
    assert_same(little, expected.astype(np.uint8))
    assert_same(big, expected.astype(np.uint8))
    # The same bytes read with the wrong byte order give a different image.
    msg = make_image(arr, "mono16", big_endian=True)
    msg.is_bigendian = False
    assert not np.array_equal(as_hwc(image_to_tensor(msg))[..., 0], expected)


def test_mono16_scaling_all_values():
    """Every 16-bit value scales exactly like cv_bridge's convertTo(CV_8U, 255/65535)."""
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = as_hwc(image_to_tensor(make_image(v, "mono16")))
    ref = cv2.convertScaleAbs(cv2.cvtColor(v, cv2.COLOR_GRAY2RGB), alpha=SCALE16)
    assert_same(out, ref)
    ref2 = cv2.multiply(cv2.cvtColor(v, cv2.COLOR_GRAY2RGB), (SCALE16,) * 3, dtype=cv2.CV_8U)
    assert_same(out, ref2)
    # cv_bridge rounds; a plain high-byte truncation would differ.
    assert not np.array_equal(out[..., 0], (v >> 8).astype(np.uint8))


@pytest.mark.parametrize("encoding", ["yuv422", "yuv422_yuy2"])
def test_yuv422_all_yuv_triples(encoding):
    """All 2**24 (Y, U, V) combinations, bit-exact with OpenCV's fixed-point conversion."""
    uv = np.arange(65536, dtype=np.int64)
    u, v = (uv >> 8).astype(np.uint8), (uv & 255).astype(np.uint8)
    y = np.arange(256, dtype=np.uint8).reshape(128, 2)
    # 65536 (u, v) pairs x 128 macro-pixels of 2 luma samples each -> 4096 x 4096 image.
    mp = np.empty((65536, 128, 4), dtype=np.uint8)
    if encoding == "yuv422":  # U Y0 V Y1
        mp[..., 0], mp[..., 2] = u[:, None], v[:, None]
        mp[..., 1], mp[..., 3] = y[None, :, 0], y[None, :, 1]
    else:  # Y0 U Y1 V
        mp[..., 1], mp[..., 3] = u[:, None], v[:, None]
        mp[..., 0], mp[..., 2] = y[None, :, 0], y[None, :, 1]
    arr = mp.reshape(4096, 4096, 2)
    out = as_hwc(image_to_tensor(make_image(arr, encoding)))
    assert_same(out, oracle(arr, encoding))


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8"])
def test_bayer_structured_inputs(encoding):
    """Saturated, checkerboard and stripe mosaics (rounding, carries, borders)."""
    h, w = 23, 37
    yy, xx = np.mgrid[0:h, 0:w]
    cases = [
        np.full((h, w), 255, np.uint8),
        np.full((h, w), 1, np.uint8),
        ((yy + xx) % 2 * 255).astype(np.uint8),
        ((yy % 2) * 255).astype(np.uint8),
        ((xx % 2) * 255).astype(np.uint8),
        ((xx * 7 + yy * 13) % 256).astype(np.uint8),
    ]
    for arr in cases:
        assert_same(as_hwc(image_to_tensor(make_image(arr, encoding))), oracle(arr, encoding))


def test_bayer_opencv_pattern_names_are_shifted():
    """The oracle discriminates: OpenCV's same-named code is *not* the ROS pattern."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    out = as_hwc(image_to_tensor(make_image(arr, "bayer_rggb8")))
    assert not np.array_equal(out, cv2.cvtColor(arr, cv2.COLOR_BayerRG2RGB))
    assert_same(out, cv2.cvtColor(arr, cv2.COLOR_BayerBG2RGB))
    # A pure red scene photographed through an RGGB mosaic stays red inside the image.
    red = np.zeros((8, 8), np.uint8)
    red[0::2, 0::2] = 200
    rgb = as_hwc(image_to_tensor(make_image(red, "bayer_rggb8")))
    assert (rgb[2:-2, 2:-2, 0] > 0).all() and (rgb[..., 1] == 0).all() and (rgb[..., 2] == 0).all()


@pytest.mark.parametrize(
    "data_kind", ["bytes", "bytearray", "array", "numpy", "memoryview", "list"]
)
def test_duck_typed_messages_and_buffer_types(data_kind):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    raw = arr.tobytes()
    data = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "array": array.array("B", raw),
        "numpy": np.frombuffer(raw, np.uint8).copy(),
        "memoryview": memoryview(raw),
        "list": list(raw),
    }[data_kind]
    msg = types.SimpleNamespace(
        height=9, width=11, encoding="bgr8", is_bigendian=0, step=33, data=data
    )
    assert_same(as_hwc(image_to_tensor(msg)), cv2.cvtColor(arr, cv2.COLOR_BGR2RGB))


def test_rclpy_data_is_array_and_output_does_not_alias_it():
    rng = np.random.default_rng(5)
    shapes = {"rgb8": (4, 6, 3), "bgr8": (4, 6, 3), "mono8": (4, 6), "mono16": (4, 6),
              "yuv422": (4, 6, 2), "bayer_rggb8": (4, 6)}
    for encoding, shape in shapes.items():
        dtype = np.uint16 if encoding == "mono16" else np.uint8
        msg = make_image(rng.integers(0, 256, shape, dtype=dtype), encoding)
        assert isinstance(msg.data, array.array)  # rclpy's uint8[] storage
        out = image_to_tensor(msg)
        before = out.clone()
        for i in range(len(msg.data)):
            msg.data[i] = 255 - msg.data[i]
        assert torch.equal(out, before), encoding


def test_message_buffer_is_wrapped_without_copy():
    from qvl_ros.core.conversion import _bytes_tensor

    buf = array.array("B", range(200))
    t = _bytes_tensor(buf, 150)
    assert t.numel() == 150 and t.data_ptr() == buf.buffer_info()[0]
    ro = bytes(range(10))
    assert _bytes_tensor(ro, 10).tolist() == list(range(10))


def test_rgb8_one_by_one_allowed_with_min_size_one():
    msg = make_image(np.array([[[1, 2, 3]]], np.uint8), "rgb8")
    with pytest.raises(ConversionError, match="too small"):
        image_to_tensor(msg)
    out = image_to_tensor(msg, min_size=1)
    assert out.flatten().tolist() == [1, 2, 3]
    msg.data[0] = 9  # the 1x1 result must not share memory with the message either
    assert out.flatten().tolist() == [1, 2, 3]


def _bad(**fields):
    base = dict(height=4, width=4, encoding="rgb8", is_bigendian=0, step=12, data=bytes(48))
    base.update(fields)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize(
    "msg, pattern",
    [
        (_bad(encoding="rgb9"), "unsupported encoding"),
        (_bad(encoding="jpeg"), "unsupported encoding"),
        (_bad(encoding=""), "unsupported encoding"),
        (_bad(step=11), "step 11 is shorter than a row"),
        (_bad(encoding="mono16", step=7, data=bytes(28)), "step 7 is shorter"),
        (_bad(data=bytes(47)), "data has 47 bytes"),
        (_bad(step=16, data=bytes(60)), "data has 60 bytes"),
        (_bad(height=0, data=b""), "empty image"),
        (_bad(width=0, step=0), "empty image"),
        (_bad(height=1, width=1, step=3, data=bytes(3)), "too small"),
        (_bad(height=1, width=8, step=24, data=bytes(24)), "too small"),
        (_bad(encoding="yuv422", width=3, step=6, data=bytes(24)), "even width"),
    ],
)
def test_raw_errors(msg, pattern):
    with pytest.raises(ConversionError, match=pattern):
        image_to_tensor(msg)


def test_conversion_error_is_value_error():
    assert issubclass(ConversionError, ValueError)
    with pytest.raises(ValueError):
        image_to_tensor(_bad(encoding="nope"))


def test_supported_encodings_listed():
    for enc in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "yuv422", "yuv422_yuy2",
                "bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8", "8UC1", "8UC3"):
        assert enc in SUPPORTED_ENCODINGS
    assert set(RAW) <= set(SUPPORTED_ENCODINGS)


# ---------------------------------------------------------------- compressed images


def smooth_image(rng, h, w, ch=3):
    """Photo-like content (JPEG behaves differently on pure noise and on smooth regions)."""
    small = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, ch), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, ch)
    noise = rng.integers(-12, 13, img.shape)
    return np.clip(img.astype(np.int32) + noise, 0, 255).astype(np.uint8)


def make_compressed(buf, fmt):
    msg = CompressedImage()
    msg.format = fmt
    msg.data = bytes(buf)
    return msg


def imdecode_rgb(buf):
    bgr = cv2.imdecode(np.frombuffer(bytes(buf), np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


JPEG_SAMPLING = [
    None,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
]


@pytest.mark.parametrize("hw", [(17, 31), (480, 640), (2, 2), (9, 65)])
@pytest.mark.parametrize("quality", [40, 90, 100])
@pytest.mark.parametrize("gray", [False, True])
def test_jpeg_matches_imdecode(hw, quality, gray):
    rng = seeded(hw, quality, gray)
    h, w = hw
    img = smooth_image(rng, h, w, 1 if gray else 3)
    img = img[..., 0] if gray else img
    for sampling in JPEG_SAMPLING if not gray else [None]:
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
        if sampling is not None:
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
        ok, buf = cv2.imencode(".jpg", img, params)
        assert ok
        fmt = "mono8; jpeg compressed " if gray else "bgr8; jpeg compressed bgr8"
        assert_same(as_hwc(compressed_to_tensor(make_compressed(buf, fmt))), imdecode_rgb(buf))


def test_jpeg_from_other_encoders_and_exif_orientation():
    from PIL import Image as PILImage

    rng = np.random.default_rng(11)
    rgb = smooth_image(rng, 45, 67)
    variants = [dict(progressive=True, quality=80), dict(quality=75, subsampling=2),
                dict(quality=95, subsampling=1), dict(optimize=True, quality=60)]
    for kw in variants:
        b = io.BytesIO()
        PILImage.fromarray(rgb).save(b, "JPEG", **kw)
        buf = b.getvalue()
        assert_same(as_hwc(compressed_to_tensor(make_compressed(buf, "jpeg"))), imdecode_rgb(buf))
    # EXIF orientation 6 (rotate 90 CW): OpenCV applies it, and so do we.
    im = PILImage.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    b = io.BytesIO()
    im.save(b, "JPEG", exif=exif.tobytes())
    ref = imdecode_rgb(b.getvalue())
    assert ref.shape[:2] == (67, 45)
    assert_same(as_hwc(compressed_to_tensor(make_compressed(b.getvalue(), "jpeg"))), ref)


@pytest.mark.parametrize(
    "fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "bgr8; jpeg compressed bgr8", "JPEG", ""]
)
def test_jpeg_format_strings(fmt):
    rng = np.random.default_rng(5)
    bgr = smooth_image(rng, 24, 40)
    ok, buf = cv2.imencode(".jpg", bgr)
    out = as_hwc(msg_to_tensor(make_compressed(buf, fmt)))
    assert_same(out, imdecode_rgb(buf))


@pytest.mark.parametrize("hw", [(17, 31), (480, 640), (2, 2)])
@pytest.mark.parametrize("kind", ["bgr", "gray", "bgra", "palette", "gray_alpha"])
def test_png_matches_imdecode(hw, kind):
    from PIL import Image as PILImage

    rng = seeded(hw, kind)
    h, w = hw
    img = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if kind == "bgr":
        ok, buf = cv2.imencode(".png", img[..., :3])
        fmt = "bgr8; png compressed bgr8"
    elif kind == "gray":
        ok, buf = cv2.imencode(".png", img[..., 0])
        fmt = "mono8; png compressed mono8"
    elif kind == "bgra":
        ok, buf = cv2.imencode(".png", img)
        fmt = "bgra8; png compressed bgra8"
    else:
        b = io.BytesIO()
        if kind == "palette":
            PILImage.fromarray(img[..., :3]).convert("P").save(b, "PNG")
        else:
            PILImage.fromarray(img[..., :2], "LA").save(b, "PNG")
        buf, fmt = b.getvalue(), "png"
    assert_same(as_hwc(compressed_to_tensor(make_compressed(buf, fmt))), imdecode_rgb(buf))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_16bit_scaled_like_cv_bridge(channels):
    rng = np.random.default_rng(channels)
    a16 = rng.integers(0, 65536, (13, 21) if channels == 1 else (13, 21, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", a16)
    fmt = "mono16; png compressed mono16" if channels == 1 else "bgr16; png compressed bgr16"
    out = as_hwc(compressed_to_tensor(make_compressed(buf, fmt)))
    dec = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    assert dec.dtype == np.uint16
    rgb16 = cv2.cvtColor(dec, cv2.COLOR_GRAY2RGB if channels == 1 else cv2.COLOR_BGR2RGB)
    assert_same(out, cv2.convertScaleAbs(rgb16, alpha=SCALE16))
    # Identical to the raw-image path for the same pixels.
    raw_enc = "mono16" if channels == 1 else "bgr16"
    assert_same(out, as_hwc(image_to_tensor(make_image(a16, raw_enc))))


def _jpeg_bytes():
    ok, buf = cv2.imencode(".jpg", smooth_image(np.random.default_rng(9), 32, 48))
    return bytes(buf)


def _png_bytes():
    img = np.random.default_rng(9).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    return bytes(buf)


def _patched_jpeg(marker, offset, value):
    """The test JPEG with bytes at ``offset`` after the first ``marker`` replaced."""
    b = bytearray(_jpeg_bytes())
    at = b.find(marker) + offset
    b[at:at + len(value)] = value
    return bytes(b)


@pytest.mark.parametrize(
    "data, fmt, pattern",
    [
        (b"", "jpeg", "no data"),
        (b"\x00\x01\x02\x03", "jpeg", "neither JPEG nor PNG"),
        (b"GIF89a" + bytes(30), "gif", "neither JPEG nor PNG"),
        (lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "jpeg", "cannot decode jpeg"),
        (lambda: _jpeg_bytes()[:20], "jpeg", "cannot decode jpeg"),
        (lambda: _patched_jpeg(b"\xff\xc0", 4, b"\x07"), "jpeg", "cannot decode jpeg: .*precision"),
        (lambda: _patched_jpeg(b"\xff\xc0", 5, b"\x00\x00"), "jpeg", "cannot decode jpeg"),
        (lambda: _patched_jpeg(b"\xff\xc4", 4, b"\x55"), "jpeg", "cannot decode jpeg: .*DHT"),
        (lambda: _png_bytes()[:16] + bytes(4) + _png_bytes()[20:], "png", "cannot decode png"),
        (lambda: _png_bytes()[:60], "png", "cannot decode png"),
        (lambda: _png_bytes()[: len(_png_bytes()) - 30], "png", "cannot decode png"),
        (lambda: _png_bytes(), "16UC1; compressedDepth png", "compressedDepth"),
    ],
)
def test_compressed_errors(data, fmt, pattern):
    data = data() if callable(data) else data
    if data and "compressedDepth" not in fmt and data[:2] in (b"\xff\xd8", b"\x89P"):
        # OpenCV rejects it too.
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None
    with pytest.raises(ConversionError, match=pattern):
        compressed_to_tensor(make_compressed(data, fmt))


def test_damaged_scan_data_is_rejected_or_decoded_like_opencv():
    """Damage inside the entropy-coded data: libjpeg tolerates some of it with a warning.
    The result is either a ConversionError (torchvision stops where the data runs out, which
    is stricter than OpenCV) or exactly the image OpenCV produces; never a third image."""
    good = _jpeg_bytes()
    sos = good.find(b"\xff\xda")
    cut = good[:sos + 20] + b"\xff\xd9"  # scan ends early but the stream is terminated
    assert_same(as_hwc(compressed_to_tensor(make_compressed(cut, "jpeg"))), imdecode_rgb(cut))
    outcomes = set()
    for seed in range(24):
        rng = np.random.default_rng(seed)
        noisy = bytearray(good)
        start = int(rng.integers(sos + 14, len(good) - 40))
        noisy[start:start + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        data = bytes(noisy)
        try:
            out = compressed_to_tensor(make_compressed(data, "jpeg"))
        except ConversionError as exc:
            assert str(exc).startswith("cannot decode jpeg")
            outcomes.add("rejected")
            continue
        assert_same(as_hwc(out), imdecode_rgb(data))
        outcomes.add("decoded")
    assert "decoded" in outcomes


def test_compressed_too_small():
    ok, buf = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ConversionError, match="too small"):
        compressed_to_tensor(make_compressed(buf, "png"))
    assert compressed_to_tensor(make_compressed(buf, "png"), min_size=1).shape == (3, 1, 1)


def test_msg_to_tensor_dispatch():
    arr = np.random.default_rng(1).integers(0, 256, (6, 8), dtype=np.uint8)
    raw = make_image(arr, "mono8")
    assert_same(as_hwc(msg_to_tensor(raw, "cpu")), oracle(arr, "mono8"))
    ok, buf = cv2.imencode(".png", arr)
    out = msg_to_tensor(make_compressed(buf, "png"), torch.device("cpu"))
    assert_same(as_hwc(out), oracle(arr, "mono8"))
    with pytest.raises(TypeError):
        msg_to_tensor(object())


# ---------------------------------------------------------------- optional references


def _cv_bridge():
    try:
        from cv_bridge import CvBridge  # ROS 2 cv_bridge (not installable from PyPI)
    except Exception as exc:  # noqa: BLE001 - any import failure means "absent"
        pytest.skip(f"cv_bridge not importable here ({type(exc).__name__}: {exc})")
    bridge = CvBridge()
    try:
        probe = make_image(np.zeros((2, 2, 3), np.uint8), "bgr8")
        bridge.imgmsg_to_cv2(probe, "rgb8")
    except Exception as exc:  # noqa: BLE001 - e.g. the ROS 1 port on numpy 2
        pytest.skip(f"cv_bridge present but cannot convert ROS 2 messages ({exc})")
    return bridge


@pytest.mark.parametrize("encoding", sorted(set(RAW) - {"8UC1", "8UC3", "8UC4", "16UC1"}))
def test_matches_cv_bridge(encoding):
    bridge = _cv_bridge()
    rng = np.random.default_rng(21)
    h, w = 17, 32
    arr = random_array(rng, h, w, encoding)
    msg = make_image(arr, encoding, pad=4)
    ref = bridge.imgmsg_to_cv2(msg, "rgb8")
    assert_same(as_hwc(image_to_tensor(msg)), ref)


def test_compressed_matches_cv_bridge():
    bridge = _cv_bridge()
    msg = make_compressed(_jpeg_bytes(), "bgr8; jpeg compressed bgr8")
    ref = cv2.cvtColor(bridge.compressed_imgmsg_to_cv2(msg), cv2.COLOR_BGR2RGB)
    assert_same(as_hwc(compressed_to_tensor(msg)), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    for encoding in RAW:
        h, w = 31, 46
        arr = random_array(rng, h, w, encoding)
        msg = make_image(arr, encoding, pad=2)
        out = image_to_tensor(msg, device="cuda")
        assert out.device.type == "cuda"
        assert torch.equal(out.cpu(), image_to_tensor(msg)), encoding
    msg = make_compressed(_jpeg_bytes(), "jpeg")
    out = compressed_to_tensor(msg, device="cuda")
    assert out.device.type == "cuda" and torch.equal(out.cpu(), compressed_to_tensor(msg))
    gpu = compressed_to_tensor(msg, device="cuda", gpu_jpeg=True)
    assert gpu.shape == out.shape
    # nvJPEG is not libjpeg-turbo: close, not necessarily identical.
    assert (gpu.int() - out.int()).abs().max().item() <= 8
