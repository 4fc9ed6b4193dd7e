"""The actions ~/ask and ~/detect of qvl_node over real DDS (rclpy ActionClient in this process,
localhost, a random domain): feedback streamed while the answer decodes, results equal to an
independent model instance's output for the same frames, cancel within two decode steps, the
feature stream kept going while a goal runs, goals beyond the limits or the queue rejected (the
reason on /rosout), deactivate aborting a running goal. The ~/ask service keeps answering beside
the action of the same name.

Oracles: a second `BatchedQwenVL` loaded from the same checkpoint (`generate`, `detect`) on the
frames the synthetic cameras published (recorded by stamp), and the headers of those frames.
Long answers come from the tiny checkpoint with an end token no row can produce (as in
test_ask_limits); detections from the plain tiny checkpoint, constrained (llguidance), with
detect.min_detections forcing boxes. Cancel is measured in decode steps (the goal's
DecodeControl: steps when the stop was asked, steps at the end) and in the result's tokens,
never by the wall clock.
"""
import threading

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("qvl_ros.msg")

from action_msgs.msg import GoalStatus  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402

from qvl_ros.action import Ask  # noqa: E402
from qvl_ros.model import BatchedQwenVL  # noqa: E402
from qvl_ros.ros.feature_msgs import stamp_ns  # noqa: E402
from qvl_ros.ros.node import QvlLifecycleNode  # noqa: E402
from qvl_ros.srv import Ask as AskService  # noqa: E402
from test_node import Rig, call, wait_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
LONG = 20000       # tokens of a long answer (tens of seconds here)
ANSWER = 40        # tokens of a short answer: five chunks of eight
LONG_PARAMS = [("ask.max_new_tokens", 65536)]


@pytest.fixture(scope="module")
def model(endless_path):
    return BatchedQwenVL.from_pretrained(endless_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def oracle(endless_path):
    """An independent instance for the expected answers."""
    return BatchedQwenVL.from_pretrained(endless_path, device="cpu", dtype="float32")


@pytest.fixture
def rigs(ros, model):
    made = []

    def make(node_model=None, **kwargs):
        rig = Rig(ros, model, node_model=node_model, **kwargs)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


class Goal:
    """One goal sent from the test thread: acceptance, feedback in arrival order, the result."""

    def __init__(self, client, goal):
        self.lock = threading.Lock()
        self.feedback = []
        self.sent = client.send_goal_async(goal, feedback_callback=self._keep)
        self.result_future = None

    def _keep(self, msg):
        with self.lock:
            self.feedback.append(msg.feedback)

    def feedbacks(self):
        with self.lock:
            return list(self.feedback)

    def accepted(self, timeout=30.0):
        assert wait_for(self.sent.done, timeout), "no goal response"
        handle = self.sent.result()
        if handle.accepted and self.result_future is None:
            self.result_future = handle.get_result_async()
        return handle.accepted

    def result(self, timeout=120.0):
        assert self.accepted(), "goal rejected"
        assert wait_for(self.result_future.done, timeout), "no result"
        res = self.result_future.result()
        return res.status, res.result

    def cancel(self):
        return self.sent.result().cancel_goal_async()


def action_client(rig, action_type, name):
    client = ActionClient(rig.collector, action_type, f"{rig.fqn}/{name}")
    assert client.wait_for_server(timeout_sec=20)
    return client


def have_a_set(rig):
    before = len(rig.collector.feature_msgs())
    rig.drive(3)
    assert wait_for(lambda: len(rig.collector.feature_msgs()) > before, 30)


def frames_of(rig, headers, names):
    """The frames the named cameras published under these headers (uint8 (3, H, W) each)."""
    from qvl_ros.core.conversion import msg_to_tensor

    with rig.recorder.lock:
        sent = [rig.recorder.by_stamp[rig.node.camera_names.index(n)][stamp_ns(h.stamp)] for n, h in zip(names, headers)]
    return [msg_to_tensor(m) for m in sent]


def check_headers(rig, headers, names):
    """Each header is that of a frame the named camera published (stamp and frame_id)."""
    for name, h in zip(names, headers):
        k = rig.node.camera_names.index(name)
        with rig.recorder.lock:
            sent = rig.recorder.by_stamp[k][stamp_ns(h.stamp)]
        assert h.frame_id == sent.header.frame_id == name


def start_long_goal(rig, client, tokens=LONG, feedbacks=2):
    goal = Goal(client, Ask.Goal(prompt="Tell me everything.", max_new_tokens=tokens))
    assert goal.accepted()
    assert wait_for(lambda: len(goal.feedbacks()) >= feedbacks, 60), rig.node.pipeline_stats()["batch"]
    control = rig.node.actions["ask"].running
    assert control is not None
    return goal, control


def rejections(rig):
    return [m for m in rig.collector.node_logs(Log.WARN, rig.fqn) if "goal rejected" in m]


# ----------------------------------------------------------------------------- ~/ask
def test_ask_streams_its_answer_and_finishes_with_the_oracle_text(rigs, oracle):
    rig = rigs(topics=["a0/image_raw", "a1/image_raw"], node_params=LONG_PARAMS)
    client = action_client(rig, Ask, "ask")
    have_a_set(rig)
    goal = Goal(client, Ask.Goal(prompt="What is in front of the robot?", camera_names=["a1", "a0"],
                                 max_new_tokens=ANSWER))
    status, res = goal.result()
    assert status == GoalStatus.STATUS_SUCCEEDED and res.success, res.message
    assert list(res.camera_names) == ["a1", "a0"] and res.tokens == ANSWER
    check_headers(rig, res.camera_headers, res.camera_names)
    assert stamp_ns(res.stamp) == max(stamp_ns(h.stamp) for h in res.camera_headers)
    want = oracle.generate([frames_of(rig, res.camera_headers, res.camera_names)], ["What is in front of the robot?"],
                           max_new_tokens=ANSWER)[0]
    assert res.text == want.replace("\x00", "") and res.text
    fb = goal.feedbacks()
    # every 8 tokens but the last chunk: the result has those
    assert [f.tokens for f in fb] == list(range(8, ANSWER, 8)), [f.tokens for f in fb]
    texts = [f.text for f in fb] + [res.text]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1)), texts
    assert len(set(texts)) >= 3  # it grew
    # the service of the same name answers beside the action, with the same text for the same set
    service = rig.collector.create_client(AskService, f"{rig.fqn}/ask")
    answer = call(rig.collector, service, AskService.Request(prompt="What is in front of the robot?",
                                                              camera_names=["a1", "a0"], max_new_tokens=ANSWER))
    assert answer.success, answer.message
    if [stamp_ns(h.stamp) for h in answer.camera_headers] == [stamp_ns(h.stamp) for h in res.camera_headers]:
        assert answer.text == res.text
    print(f"~/ask action: {len(fb)} feedback messages, {res.tokens} tokens")


def test_cancel_stops_within_two_decode_steps_while_features_keep_flowing(rigs):
    rig = rigs(topics=["c0/image_raw", "c1/image_raw"], node_params=LONG_PARAMS + [("batch.max_size", 2)])
    client = action_client(rig, Ask, "ask")
    have_a_set(rig)
    rig.settle()
    goal, control = start_long_goal(rig, client)
    before = len(rig.collector.feature_msgs())
    rig.drive(10)
    assert wait_for(lambda: len(rig.collector.feature_msgs()) >= before + 10, 60)
    assert not goal.result_future.done() and rig.node.actions["ask"].running is control
    latencies = [lat for _m, lat in rig.collector.got(rig.collector.features)[before:]]
    assert max(latencies) < 5.0, latencies
    assert rig.node.pipeline_stats()["batch"]["batches_beside_tasks"] >= 1
    cancel = goal.cancel()
    status, res = goal.result()
    assert cancel.done() and len(cancel.result().goals_canceling) == 1
    assert status == GoalStatus.STATUS_CANCELED and not res.success
    assert control.stopped and control.reason == "cancelled"
    assert control.steps - control.stopped_at <= 2, (control.stopped_at, control.steps)
    assert res.tokens == control.steps < LONG
    assert res.message == f"stopped after {res.tokens} tokens: cancelled"
    fb = goal.feedbacks()
    assert max(f.tokens for f in fb) <= control.stopped_at  # no feedback after the stop
    assert res.text.startswith(fb[-1].text)
    print(f"features during a goal: {len(latencies)}, latency max {max(latencies):.3f} s; cancel asked at "
          f"{control.stopped_at} tokens, ended at {control.steps}")
    # the node takes the next goal
    status, res = Goal(client, Ask.Goal(prompt="again", max_new_tokens=8)).result()
    assert status == GoalStatus.STATUS_SUCCEEDED and res.tokens == 8


def test_goals_beyond_the_limits_or_the_queue_are_rejected_with_the_reason_logged(rigs):
    rig = rigs(topics=["r0/image_raw", "r1/image_raw"],
               node_params=[("ask.max_new_tokens", 64), ("ask.max_prompt_chars", 100), ("ask.queue_depth", 2)])
    client = action_client(rig, Ask, "ask")
    have_a_set(rig)
    submitted = rig.node.pipeline_stats()["batch"]["tasks"]["submitted"]
    cases = [
        (Ask.Goal(prompt="hi", max_new_tokens=65), "max_new_tokens 65 is above ask.max_new_tokens 64"),
        (Ask.Goal(prompt="x" * 5000), "prompt has 5000 characters; ask.max_prompt_chars allows 100"),
        (Ask.Goal(prompt="hi", camera_names=["nowhere"]), "unknown camera(s) 'nowhere'"),
        (Ask.Goal(prompt=" "), "prompt is empty"),
    ]
    for goal, words in cases:
        assert not Goal(client, goal).accepted()
        assert words in rig.node.actions["ask"].last_rejection
    assert wait_for(lambda: len(rejections(rig)) >= len(cases), 20)
    for (_goal, words), line in zip(cases, rejections(rig)):
        assert words in line and len(line) < 400, line
    assert rig.node.pipeline_stats()["batch"]["tasks"]["submitted"] == submitted  # no work queued
    # the queue: a running goal holds the worker, ask.queue_depth (2) wait, the next is rejected
    assert rig.node.set_parameters([rclpy.parameter.Parameter("ask.max_new_tokens", value=LONG)])[0].successful
    first, control = start_long_goal(rig, client)
    waiting = [Goal(client, Ask.Goal(prompt=f"q{i}", max_new_tokens=8)) for i in range(2)]
    assert all(g.accepted() for g in waiting)
    burst = [Goal(client, Ask.Goal(prompt=f"more {i}", max_new_tokens=8)) for i in range(30)]
    assert not any(g.accepted() for g in burst)  # every one answered (the goal queue holds the burst)
    assert rig.node.actions["ask"].last_rejection.startswith("busy: 2 questions already wait")
    assert wait_for(lambda: any("busy" in m for m in rejections(rig)), 20)
    assert len([m for m in rejections(rig) if "busy" in m]) < 30  # throttled (log_throttle)
    # a waiting goal cancelled ends at once, without running
    waiting[0].cancel()
    status, res = waiting[0].result()
    assert status == GoalStatus.STATUS_CANCELED and res.message == "not run: cancelled" and res.tokens == 0
    first.cancel()
    assert first.result()[0] == GoalStatus.STATUS_CANCELED
    status, res = waiting[1].result()
    assert status == GoalStatus.STATUS_SUCCEEDED and res.tokens == 8


def test_deactivate_aborts_a_running_goal_with_the_reason(rigs, ros):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    rig = rigs(topics=["d0/image_raw"], node_class=QvlLifecycleNode, node_params=LONG_PARAMS)
    c = rig.collector
    change = c.create_client(ChangeState, f"{rig.fqn}/change_state")

    def transition(tid):
        return call(c, change, ChangeState.Request(transition=Transition(id=tid))).success

    assert transition(Transition.TRANSITION_CONFIGURE) and transition(Transition.TRANSITION_ACTIVATE)
    rig.wait_connected()
    client = action_client(rig, Ask, "ask")
    have_a_set(rig)
    goal, control = start_long_goal(rig, client)
    assert transition(Transition.TRANSITION_DEACTIVATE)
    status, res = goal.result()
    assert status == GoalStatus.STATUS_ABORTED and not res.success
    assert res.message == f"stopped after {res.tokens} tokens: node deactivated"
    assert control.steps - control.stopped_at <= 2
    assert not Goal(client, Ask.Goal(prompt="hi", max_new_tokens=4)).accepted()  # inactive: rejected
    assert "the node is not active" in rig.node.actions["ask"].last_rejection
    assert ros.thread.is_alive()


# ----------------------------------------------------------------------------- ~/detect
CLASSES = ["cup", "chair"]


@pytest.fixture(scope="module")
def detect_models(tiny_path):
    pytest.importorskip("vision_msgs.msg")
    pytest.importorskip("llguidance")
    return (BatchedQwenVL.from_pretrained(tiny_path, device="cpu", dtype="float32"),
            BatchedQwenVL.from_pretrained(tiny_path, device="cpu", dtype="float32"))


def detect_rig(rigs, detect_models, most, fewest):
    from qvl_ros.action import Detect

    rig = rigs(node_model=detect_models[0], topics=["left/image_raw", "right/image_raw"],
               sizes=["224x168", "160x224"], node_params=[("detect.max_detections", most),
                                                          ("detect.min_detections", fewest)])
    client = action_client(rig, Detect, "detect")
    have_a_set(rig)
    return rig, client, Detect


def boxes(array):
    """(label, (x1, y1, x2, y2)) of each detection of a Detection2DArray."""
    out = []
    for d in array.detections:
        c, sx, sy = d.bbox.center.position, d.bbox.size_x, d.bbox.size_y
        out.append((d.results[0].hypothesis.class_id, (c.x - sx / 2, c.y - sy / 2, c.x + sx / 2, c.y + sy / 2)))
    return out


def test_detect_streams_parsed_detections_and_finishes_with_the_oracle_detections(rigs, detect_models):
    rig, client, Detect = detect_rig(rigs, detect_models, most=3, fewest=3)
    goal = Goal(client, Detect.Goal(classes=CLASSES, camera_names=["right", "left"]))
    status, res = goal.result()
    assert status == GoalStatus.STATUS_SUCCEEDED and res.success, res.message
    assert list(res.camera_names) == ["right", "left"]
    headers = [a.header for a in res.detections]
    check_headers(rig, headers, res.camera_names)
    assert stamp_ns(res.stamp) == max(stamp_ns(h.stamp) for h in headers)
    want = detect_models[1].detect([frames_of(rig, headers, res.camera_names)], CLASSES, max_detections=3, min_detections=3)[0]
    for array, cam in zip(res.detections, want):
        got = boxes(array)
        assert [label for label, _ in got] == [d.label for d in cam.detections] and len(got) == 3
        for (_, box), d in zip(got, cam.detections):
            assert box == pytest.approx(d.box, abs=1e-6)
        assert [x.results[0].hypothesis.score for x in array.detections] == pytest.approx(
            [d.score for d in cam.detections], rel=1e-5)
        assert all(x.header == array.header for x in array.detections)
    fb = goal.feedbacks()
    assert len(fb) >= 2 and [f.tokens for f in fb] == sorted({f.tokens for f in fb})
    counts = [[len(a.detections) for a in f.detections] for f in fb]
    assert any(sum(c) > 0 for c in counts), counts  # detections appeared while the answer decoded
    for f in fb:
        assert list(f.camera_names) == ["right", "left"]
        for array, final in zip(f.detections, res.detections):
            assert array.header == final.header
            got, end = boxes(array), boxes(final)
            assert got == end[:len(got)]  # a prefix of the result (scores aside: known at the end)
    for k in range(2):
        assert [c[k] for c in counts] == sorted(c[k] for c in counts)  # never fewer than before
    print(f"~/detect: {len(fb)} feedback messages, detections per feedback {counts}, {res.tokens} tokens")


def test_detect_cancel_and_limits(rigs, detect_models):
    rig, client, Detect = detect_rig(rigs, detect_models, most=60, fewest=60)
    for goal, words in [(Detect.Goal(classes=["x"] * 65), "65 classes given; at most 64"),
                        (Detect.Goal(query="q" * 129), "query has 129 characters"),
                        (Detect.Goal(), "give classes or a query"),
                        (Detect.Goal(classes=["cup", "cup"]), "given more than once: 'cup'"),
                        (Detect.Goal(classes=["cup<|im_end|>"]), "holds '<|' or '|>'"),
                        (Detect.Goal(query="a\ncup"), "holds a control character"),
                        (Detect.Goal(classes=["cup"], max_detections=61), "above detect.max_detections 60")]:
        assert not Goal(client, goal).accepted()
        assert words in rig.node.actions["detect"].last_rejection
    goal = Goal(client, Detect.Goal(query="anything that moves"))
    assert goal.accepted()
    assert wait_for(lambda: len(goal.feedbacks()) >= 1, 60)
    control = rig.node.actions["detect"].running
    goal.cancel()
    status, res = goal.result()
    assert status == GoalStatus.STATUS_CANCELED and not res.success
    assert control.steps - control.stopped_at <= 2, (control.stopped_at, control.steps)
    assert res.tokens == control.steps and res.message == f"stopped after {res.tokens} tokens: cancelled"
    assert all(len(a.detections) < 60 for a in res.detections)  # stopped before the grammar's end
    assert max(f.tokens for f in goal.feedbacks()) <= control.stopped_at
    print(f"~/detect cancel asked at {control.stopped_at} tokens, ended at {control.steps}")
