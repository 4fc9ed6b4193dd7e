"""The generated messages and the FeatureTensor helpers (qvl_ros.ros.tensor_msg).

Covers: the msg classes import (generated Python plus the typesupport extension modules),
tensor <-> message round trips for every dtype and several shapes (empty and scalar
included), the exact wire layout (C order, little-endian; numpy's and torch's own byte views
are the oracle), CDR serialization, and one real DDS round trip on localhost.
"""
import os
import time
import uuid

import numpy as np
import pytest
import torch

from qvl_ros.ros import tensor_msg
from qvl_ros.ros.tensor_msg import features_to_numpy, from_tensor, to_numpy, to_torch

DTYPES = ["float32", "float16", "bfloat16"]
SHAPES = [(0,), (3, 0, 2), (), (1,), (7,), (5, 7), (2, 3, 4), (1, 1025), (2, 1, 3, 1, 2)]
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _rand(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 3).to(TORCH_DTYPE[dtype])


def _le_bytes_of(tensor: torch.Tensor) -> bytes:
    """Oracle for the wire bytes: numpy's/torch's own byte view, C order, little-endian."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes(order="C")
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes(order="C")


# --- generated messages ------------------------------------------------------------------

def test_messages_import_with_expected_fields():
    from qvl_ros.msg import Caption, FeatureTensor, VisionFeatures

    assert FeatureTensor.get_fields_and_field_types() == {
        "name": "string", "dtype": "string", "shape": "sequence<uint32>",
        "data": "sequence<uint8>"}
    assert VisionFeatures.get_fields_and_field_types() == {
        "header": "std_msgs/Header", "camera_names": "sequence<string>",
        "camera_stamps": "sequence<builtin_interfaces/Time>", "model": "string",
        "prompt": "string", "tensors": "sequence<qvl_ros/FeatureTensor>",
        "inputs": "sequence<qvl_ros/CameraInput>", "hidden_rows": "sequence<qvl_ros/RowRange>",
        "clip_frames": "uint32", "clip_stamps": "sequence<builtin_interfaces/Time>"}
    assert Caption.get_fields_and_field_types() == {
        "header": "std_msgs/Header", "camera_names": "sequence<string>",
        "camera_stamps": "sequence<builtin_interfaces/Time>", "model": "string",
        "prompt": "string", "text": "string", "inputs": "sequence<qvl_ros/CameraInput>"}
    from qvl_ros.msg import CameraInput, RowRange
    from qvl_ros.srv import Ask

    assert CameraInput.get_fields_and_field_types() == {
        "header": "std_msgs/Header", "height": "uint32", "width": "uint32", "grid_thw": "uint32[3]"}
    assert RowRange.get_fields_and_field_types() == {"source": "string", "start": "uint32", "count": "uint32"}
    assert Ask.Request.get_fields_and_field_types() == {
        "prompt": "string", "camera_names": "sequence<string>", "max_new_tokens": "uint32"}
    assert Ask.Response.get_fields_and_field_types() == {
        "success": "boolean", "message": "string", "text": "string", "camera_names": "sequence<string>",
        "camera_headers": "sequence<std_msgs/Header>", "stamp": "builtin_interfaces/Time"}


def test_action_definitions():
    """The actions ~/ask and ~/detect (Detect is built where vision_msgs is found)."""
    from qvl_ros.action import Ask

    assert Ask.Goal.get_fields_and_field_types() == {
        "prompt": "string", "camera_names": "sequence<string>", "max_new_tokens": "uint32"}
    assert Ask.Result.get_fields_and_field_types() == {
        "success": "boolean", "message": "string", "text": "string", "camera_names": "sequence<string>",
        "camera_headers": "sequence<std_msgs/Header>", "stamp": "builtin_interfaces/Time", "tokens": "uint32"}
    assert Ask.Feedback.get_fields_and_field_types() == {"text": "string", "tokens": "uint32"}
    Ask.Impl.SendGoalService.__class__.__import_type_support__()  # the typesupport library loads
    pytest.importorskip("vision_msgs.msg")
    from qvl_ros.action import Detect

    assert Detect.Goal.get_fields_and_field_types() == {
        "classes": "sequence<string>", "query": "string", "camera_names": "sequence<string>",
        "max_detections": "uint32"}
    assert Detect.Result.get_fields_and_field_types() == {
        "success": "boolean", "message": "string", "camera_names": "sequence<string>",
        "detections": "sequence<vision_msgs/Detection2DArray>", "stamp": "builtin_interfaces/Time", "tokens": "uint32"}
    assert Detect.Feedback.get_fields_and_field_types() == {
        "camera_names": "sequence<string>", "detections": "sequence<vision_msgs/Detection2DArray>", "tokens": "uint32"}


def test_typesupport_modules_load():
    from qvl_ros.msg import Caption, FeatureTensor, VisionFeatures

    for cls in (FeatureTensor, VisionFeatures, Caption):
        cls.__class__.__import_type_support__()
        assert cls._TYPE_SUPPORT is not None, cls


def test_source_tree_and_generated_messages_share_the_package():
    import qvl_ros
    import qvl_ros.msg

    # qvl_ros.ros.tensor_msg comes from the first qvl_ros directory (the source tree in a
    # checkout); the generated msg subpackage may live in another one (the install tree).
    assert os.path.dirname(os.path.dirname(tensor_msg.__file__)) == list(qvl_ros.__path__)[0]
    assert any(os.path.dirname(os.path.dirname(qvl_ros.msg.__file__)) == p
               for p in qvl_ros.__path__)


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_torch(dtype, shape):
    t = _rand(shape, dtype)
    msg = from_tensor("vision/cam", t)
    assert msg.name == "vision/cam"
    assert msg.dtype == dtype
    assert tuple(msg.shape) == shape
    assert len(msg.data) == t.numel() * t.element_size()

    arr = to_numpy(msg)
    assert arr.shape == shape
    assert arr.flags.c_contiguous
    assert arr.dtype == {"float32": np.float32, "float16": np.float16,
                         "bfloat16": np.float32}[dtype]
    np.testing.assert_array_equal(arr, t.float().numpy().astype(arr.dtype))

    back = to_torch(msg)
    assert back.dtype == t.dtype and tuple(back.shape) == shape
    assert torch.equal(back, t)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_numpy(dtype, shape):
    a = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    msg = from_tensor("hidden", a)
    assert msg.dtype == dtype and tuple(msg.shape) == shape
    out = to_numpy(msg)
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(to_numpy(msg, copy=True), a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_survive(dtype):
    vals = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), -float("inf"), float("nan"),
                         1e-3, 65504.0]).to(TORCH_DTYPE[dtype])
    msg = from_tensor("x", vals)
    assert bytes(msg.data) == _le_bytes_of(vals)
    back = to_torch(msg)
    assert torch.equal(back.view(torch.int16) if dtype != "float32" else back.view(torch.int32),
                       vals.view(torch.int16) if dtype != "float32" else vals.view(torch.int32))
    arr = to_numpy(msg)
    ref = vals.float().numpy()
    np.testing.assert_array_equal(np.isnan(arr), np.isnan(ref))
    np.testing.assert_array_equal(np.signbit(arr), np.signbit(ref))
    np.testing.assert_array_equal(arr[~np.isnan(arr)], ref[~np.isnan(ref)])


def test_features_to_numpy_by_name():
    from qvl_ros.msg import VisionFeatures

    msg = VisionFeatures()
    msg.tensors = [from_tensor("vision/a", torch.ones(3, 4)),
                   from_tensor("vision/b", torch.zeros(5, 4, dtype=torch.bfloat16)),
                   from_tensor("hidden", np.full((2, 4), 0.5, np.float16))]
    out = features_to_numpy(msg)
    assert list(out) == ["vision/a", "vision/b", "hidden"]
    assert out["vision/a"].shape == (3, 4) and out["vision/b"].dtype == np.float32
    assert out["hidden"].dtype == np.float16 and float(out["hidden"][1, 3]) == 0.5


# --- wire layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_are_little_endian_c_order_torch(dtype):
    base = _rand((4, 6, 5), dtype, seed=3)
    for t in (base, base.transpose(0, 2), base[:, ::2, 1:], base.permute(1, 0, 2)[1:]):
        msg = from_tensor("t", t)
        assert tuple(msg.shape) == tuple(t.shape)
        assert bytes(msg.data) == _le_bytes_of(t)


@pytest.mark.parametrize("np_dtype", ["<f4", ">f4", "<f2", ">f2"])
def test_bytes_are_little_endian_c_order_numpy(np_dtype):
    base = np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np_dtype)
    for a in (base, base.T, base[::-1, :, ::2], np.asfortranarray(base)):
        msg = from_tensor("a", a)
        assert msg.dtype == {"f4": "float32", "f2": "float16"}[np_dtype[1:]]
        le = np.ascontiguousarray(a).astype(np.dtype(np_dtype).newbyteorder("<"))
        assert bytes(msg.data) == le.tobytes(order="C")
        np.testing.assert_array_equal(to_numpy(msg), a)


def test_known_byte_patterns():
    assert bytes(from_tensor("a", np.array([1.0, -2.0], np.float32)).data) == \
        b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    assert bytes(from_tensor("a", np.array([1.0, -2.0], np.float16)).data) == \
        b"\x00\x3c\x00\xc0"
    assert bytes(from_tensor("a", torch.tensor([1.0, -2.0], dtype=torch.bfloat16)).data) == \
        b"\x80\x3f\x00\xc0"


def test_dtype_conversion_matches_torch():
    x = np.concatenate([
        np.random.default_rng(4).standard_normal(2000).astype(np.float32) * 100,
        np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38, -3.4e38, 1e-40, 1.00390625,
                  1.01171875], np.float32)])
    nan = np.isnan(x)
    for dtype in DTYPES:
        ref = torch.from_numpy(x).to(TORCH_DTYPE[dtype])
        for src in (x, torch.from_numpy(x)):
            msg = from_tensor("c", src, dtype=dtype)
            assert msg.dtype == dtype
            # NaN payloads may differ (torch writes 0x7fff for bfloat16): compare the rest
            # bit for bit, and NaN as NaN.
            got = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(x.size, -1)
            want = np.frombuffer(_le_bytes_of(ref), dtype=np.uint8).reshape(x.size, -1)
            np.testing.assert_array_equal(got[~nan], want[~nan], err_msg=dtype)
            assert np.isnan(to_numpy(msg)[nan]).all()


def test_scalar_and_bad_inputs():
    msg = from_tensor("s", torch.tensor(1.5))
    assert tuple(msg.shape) == () and to_numpy(msg).shape == ()
    assert float(to_numpy(msg)) == 1.5

    with pytest.raises(TypeError):
        from_tensor("f64", np.zeros(3))
    with pytest.raises(TypeError):
        from_tensor("i64", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        from_tensor("bad", np.zeros(3, np.float32), dtype="float64")
    assert from_tensor("f64", np.zeros(3), dtype="float32").dtype == "float32"

    broken = from_tensor("b", np.zeros((2, 3), np.float32))
    broken.shape = [2, 4]
    with pytest.raises(ValueError, match="do not match"):
        to_numpy(broken)
    with pytest.raises(ValueError, match="do not match"):
        to_torch(broken)
    broken.shape = [2, 3]
    broken.dtype = "int8"
    with pytest.raises(ValueError, match="unsupported dtype"):
        to_numpy(broken)


def test_to_numpy_is_a_view_unless_copied():
    msg = from_tensor("v", np.arange(6, dtype=np.float32).reshape(2, 3))
    view = to_numpy(msg)
    own = to_numpy(msg, copy=True)
    view_t = to_torch(msg)
    assert np.shares_memory(view, view_t.numpy())
    assert not np.shares_memory(view, own)
    assert not np.shares_memory(to_torch(msg, copy=True).numpy(), view)


def test_cdr_serialization_round_trip():
    from builtin_interfaces.msg import Time
    from rclpy.serialization import deserialize_message, serialize_message

    from qvl_ros.msg import Caption, VisionFeatures

    msg = _vision_features_sample()
    back = deserialize_message(serialize_message(msg), VisionFeatures)
    assert back == msg
    _assert_same_features(back, msg)

    cap = Caption(camera_names=["a"], camera_stamps=[Time(sec=1, nanosec=2)], model="m",
                  prompt="p", text="a robot arm")
    assert deserialize_message(serialize_message(cap), Caption) == cap


# --- DDS ---------------------------------------------------------------------------------

def _vision_features_sample():
    from builtin_interfaces.msg import Time

    from qvl_ros.msg import VisionFeatures

    msg = VisionFeatures()
    msg.header.stamp = Time(sec=1700000000, nanosec=123456789)
    msg.header.frame_id = "rig"
    msg.camera_names = ["front", "left", "right"]
    msg.camera_stamps = [Time(sec=1700000000, nanosec=n) for n in (100, 200, 123456789)]
    msg.model = "tiny-qwen2_5_vl"
    msg.prompt = "Describe the scene."
    msg.tensors = [
        from_tensor("vision/front", _rand((64, 256), "float32", seed=10)),
        from_tensor("vision/left", _rand((16, 256), "float16", seed=11)),
        from_tensor("vision/right", _rand((0, 256), "float32", seed=12)),
        # ~1 MB so the sample spans many DDS fragments
        from_tensor("hidden", _rand((2048, 256), "bfloat16", seed=13)),
    ]
    return msg


def _assert_same_features(got, sent):
    assert list(got.camera_names) == list(sent.camera_names)
    assert [(t.sec, t.nanosec) for t in got.camera_stamps] == \
        [(t.sec, t.nanosec) for t in sent.camera_stamps]
    assert (got.header.stamp.sec, got.header.stamp.nanosec, got.header.frame_id) == \
        (sent.header.stamp.sec, sent.header.stamp.nanosec, sent.header.frame_id)
    assert (got.model, got.prompt) == (sent.model, sent.prompt)
    got_arrays, sent_arrays = features_to_numpy(got), features_to_numpy(sent)
    assert list(got_arrays) == list(sent_arrays)
    for name in sent_arrays:
        assert got_arrays[name].dtype == sent_arrays[name].dtype
        np.testing.assert_array_equal(got_arrays[name], sent_arrays[name])
    for g, s in zip(got.tensors, sent.tensors):
        assert g.dtype == s.dtype and torch.equal(to_torch(g), to_torch(s))


def test_dds_round_trip_localhost():
    assert os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") == "LOCALHOST"
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from qvl_ros.msg import VisionFeatures

    context = rclpy.context.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node(f"qvl_msg_test_{uuid.uuid4().hex[:8]}", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        topic = f"/qvl_test/features_{uuid.uuid4().hex[:8]}"
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        received = []
        node.create_subscription(VisionFeatures, topic, received.append, qos)
        pub = node.create_publisher(VisionFeatures, topic, qos)
        sent = _vision_features_sample()

        deadline = time.monotonic() + 20.0
        next_pub = 0.0
        while not received and time.monotonic() < deadline:
            if time.monotonic() >= next_pub and pub.get_subscription_count() > 0:
                pub.publish(sent)
                next_pub = time.monotonic() + 0.5
            executor.spin_once(timeout_sec=0.05)
        assert received, "no VisionFeatures message arrived over DDS within 20 s"
        _assert_same_features(received[0], sent)
        executor.remove_node(node)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
