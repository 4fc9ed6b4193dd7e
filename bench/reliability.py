"""Reliability under attack: qvl_node fed by 3 cameras at 10 Hz, its run-time surfaces misused.

    scripts/run.sh python bench/reliability.py [--quick] [--valid N] [--cycles K] [--tag NAME] [--out DIR]

Setup (same ROS_DOMAIN_ID, localhost DDS, as scripts/run.sh sets it):
  node     `python -m qvl_ros.node --managed` in a process of its own (so its resident memory and
           thread count are the node's alone, read from /proc/<pid>/status), configured and
           activated through its lifecycle services; the bundled tiny Qwen2.5-VL (random weights,
           float32, CPU) with an end token no row can produce (-1 in generation_config.json), so
           that an ~/ask answer runs to its token limit: a long answer is a real one;
  cameras  `python -m qvl_ros.synthetic` in another process: 3 cameras of 320x240 rgb8 at 10 Hz;
  bench    this process: rclpy clients of the node's parameter, lifecycle and ~/ask services and a
           subscription to its `features` (every arrival timed).

Attacks, in this order, on the one node process:
  1. invalid parameter changes: every read-write parameter of qvl_ros.core.params.PARAMS set to
     values derived from its row (below the range, above it, not finite, of the wrong type, a
     string or list beyond its size bound, a choice that is not one, a prompt holding
     `<|image_pad|>`, the detect.* rules between parameters), and every read-only parameter set
     at all. Counted: refused vs accepted (all must be refused), the values read back unchanged,
     features still arriving afterwards;
  2. valid changes under load: N random valid values of the run-time parameters, one every
     0.25 s while sets flow, an ~/ask question every 5 changes. Counted: changes refused or
     unanswered, questions answered / busy / failed, the node's death or a traceback in its log,
     features arriving at the end (the changed parameters set back first);
  3. lifecycle cycles under load: K deactivate / cleanup / configure / activate cycles while the
     cameras publish, every other one with a long ~/ask answer running when deactivate comes.
     Counted per cycle: transitions refused or unanswered, the long answer's outcome (it must be
     answered: stopped), features arriving after activate, the node's RSS and thread count;
  4. malformed checkpoints: the cases of test/test_model_checks.py (config fields, a billion
     layers, a config that is no object or too large, a missing tokenizer, a weights path that
     is a directory, NaN/Inf weights, pixel bounds beyond the decoder) and more (no config, a
     truncated config, an unknown model type, truncated, empty or garbage weights, a weight
     missing or of the wrong shape, a safetensors header claiming 1 TB), each loaded with
     BatchedQwenVL.from_pretrained here: refused or not, whether the error names the file, and
     the time to the refusal.

Writes bench/results/reliability-<tag>.json and .md (tag default "cpu"; --out another folder).
--quick: a smoke run (few changes, 2 cycles). The machine is shared with other work: the
results give its load average at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.node_bench import Arrivals, Child  # noqa: E402

CAMERAS, RATE, SIZE = 3, 10.0, "320x240"
TOPICS = [f"camera_{i}/image_raw" for i in range(CAMERAS)]
LONG_TOKENS = 20000  # a long ~/ask answer: many seconds at the tiny model's speed here
CALL_TIMEOUT = 60.0


# ----------------------------------------------------------------------------- machine and process
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        flags = next(ln for ln in info.splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    import torch

    simd = [f for f in ("avx2", "avx512f") if f" {f}" in flags]
    return (f"{cpu}, {os.cpu_count()} cores (shared with other work), no GPU; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()} (cpuinfo flags: {', '.join(simd) or 'no avx2'})")


def proc_status(pid: int) -> dict:
    """The process's resident memory (MiB) and thread count, from the kernel."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            out["rss_mb"] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out["threads"] = int(value)
    return out


def endless_checkpoint(directory: Path) -> Path:
    """The tiny checkpoint whose answers never end before their token limit."""
    from qvl_ros.model import save_tiny_checkpoint

    path = save_tiny_checkpoint(directory / "qwen2_5_vl", family="qwen2_5_vl", seed=0)
    gen = path / "generation_config.json"
    cfg = json.loads(gen.read_text())
    cfg["eos_token_id"] = -1
    gen.write_text(json.dumps(cfg))
    return path


def start_node(ns: str, checkpoint: Path) -> Child:
    params = {"camera_topics": "[" + ",".join(TOPICS) + "]", "model.path": str(checkpoint), "model.device": "cpu",
              "model.dtype": "float32", "ask.max_new_tokens": 65536, "diagnostics.stale_after": 600.0,
              "log_throttle": 30.0}
    args = ["qvl_ros.node", "--managed", "--ros-args", "-r", f"__ns:={ns}"]
    for k, v in params.items():
        args += ["-p", f"{k}:={v}"]
    return Child(args)


def start_cameras(ns: str) -> Child:
    return Child(["qvl_ros.synthetic", "--cameras", str(CAMERAS), "--size", SIZE, "--encodings", "rgb8",
                  "--rate", f"{RATE:g}", "--ros-args", "-r", f"__ns:={ns}"])


# ----------------------------------------------------------------------------- the bench's ROS side
class Probe:
    """This process's node: service clients of the node under attack and its features."""

    def __init__(self, fqn: str):
        import rclpy
        from lifecycle_msgs.srv import ChangeState, GetState
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile
        from rcl_interfaces.srv import GetParameters, SetParameters

        from qvl_ros.msg import VisionFeatures
        from qvl_ros.srv import Ask

        self.node = rclpy.create_node(f"reliability_probe_{os.getpid()}")
        self.fqn = fqn
        self.set_client = self.node.create_client(SetParameters, f"{fqn}/set_parameters")
        self.get_client = self.node.create_client(GetParameters, f"{fqn}/get_parameters")
        self.change_client = self.node.create_client(ChangeState, f"{fqn}/change_state")
        self.state_client = self.node.create_client(GetState, f"{fqn}/get_state")
        self.ask_client = self.node.create_client(Ask, f"{fqn}/ask", qos_profile=QoSProfile(depth=100))
        self.features = Arrivals(self.node, VisionFeatures, f"{fqn.rsplit('/', 1)[0]}/features")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def call_async(self, client, request, wait: float = 30.0):
        if not client.wait_for_service(timeout_sec=wait):
            return None
        return client.call_async(request)

    @staticmethod
    def result(future, timeout: float = CALL_TIMEOUT):
        """The response, or None when none came within ``timeout``."""
        if future is None:
            return None
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            time.sleep(0.01)
        return future.result() if future.done() else None

    def set(self, params: list):
        """SetParameters with parameter messages: the results, or None without an answer."""
        from rcl_interfaces.srv import SetParameters

        res = self.result(self.call_async(self.set_client, SetParameters.Request(parameters=params)))
        return None if res is None else list(res.results)

    def get(self, names: list) -> list | None:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        res = self.result(self.call_async(self.get_client, GetParameters.Request(names=names)))
        return None if res is None else [parameter_value_to_python(v) for v in res.values]

    def transition(self, name: str) -> bool | None:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        request = ChangeState.Request(transition=Transition(id=getattr(Transition, f"TRANSITION_{name.upper()}")))
        res = self.result(self.call_async(self.change_client, request), timeout=120.0)
        return None if res is None else bool(res.success)

    def ask(self, prompt: str, tokens: int):
        from qvl_ros.srv import Ask

        return self.call_async(self.ask_client, Ask.Request(prompt=prompt, max_new_tokens=tokens), wait=5.0)

    def features_since(self, t0: float) -> int:
        return len(self.features.since(t0))

    def wait_features(self, t0: float, count: int = 1, timeout: float = 30.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.features_since(t0) >= count:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()


def param_msg(name: str, value):
    """A parameter message of ``value``'s own type (wrong types included)."""
    from rclpy.parameter import Parameter

    if isinstance(value, list) and not value:
        return Parameter(name, Parameter.Type.STRING_ARRAY, []).to_parameter_msg()
    return Parameter(name, value=value).to_parameter_msg()


# ----------------------------------------------------------------------------- 1. invalid changes
def invalid_cases() -> list:
    """(parameter, what, value): the values each read-write row of the table must refuse, and
    every read-only parameter set to its default."""
    from qvl_ros.core.params import PARAMS

    wrong = {"integer": "ten", "double": "ten", "string": 7, "strings": "vision", "bool": 1, "doubles": "x"}
    cases = []
    for p in PARAMS:
        if p.read_only:
            cases.append((p.name, "read-only", p.default if p.default != [] else ["x"]))
            continue
        cases.append((p.name, "wrong type", wrong[p.type]))
        if p.type == "integer":
            cases.append((p.name, "wrong type (double)", float(p.default) + 0.5))
        if p.type == "bool":
            cases.append((p.name, "wrong type (string)", "true"))
        if p.type in ("integer", "double") and p.low is not None:
            step = 1 if p.type == "integer" else 0.5
            below = p.low if p.low_open else p.low - step
            cases.append((p.name, "below the range", int(below) if p.type == "integer" else float(below)))
        if p.type in ("integer", "double") and p.high is not None:
            above = p.high + (1 if p.type == "integer" else p.high * 0.5 + 1)
            cases.append((p.name, "above the range", int(above) if p.type == "integer" else float(above)))
        if p.type == "double":
            cases += [(p.name, "not finite (nan)", math.nan), (p.name, "not finite (inf)", math.inf)]
        if p.type == "string":
            cases.append((p.name, f"longer than {p.max_length} characters", "x" * (p.max_length + 1)))
        if p.type == "strings":
            item = p.choices[0] if p.choices else "car"
            cases.append((p.name, f"more than {p.max_items} entries", [item] * (p.max_items + 1)))
            cases.append((p.name, f"an entry longer than {p.max_length}", ["x" * (p.max_length + 1)]))
        if p.type == "strings" and p.choices:
            cases += [(p.name, "not a choice", ["depth"]), (p.name, "empty (a non-empty subset)", [])]
    cases += [("prompt", "holds <|image_pad|>", "Describe <|image_pad|> the scene."),
              ("prompt", "holds <|vision_start|>", "<|vision_start|>"),
              ("detect.classes", "an empty class name", ["car", " "]),
              ("detect.min_detections", "above detect.max_detections", 11),
              ("detect.enabled", "without classes or query", True)]
    return cases


def attack_invalid(probe: Probe) -> dict:
    from qvl_ros.core.params import PARAMS

    writable = [p.name for p in PARAMS if not p.read_only]
    before = probe.get(writable)
    t0 = time.monotonic()
    rows = []
    for name, what, value in invalid_cases():
        res = probe.set([param_msg(name, value)])
        ok = None if res is None else bool(res[0].successful)
        rows.append({"parameter": name, "case": what, "accepted": ok,
                     "reason": "" if res is None else res[0].reason[:160]})
    after = probe.get(writable)
    changed = [n for n, a, b in zip(writable, before or [], after or []) if a != b]
    t1 = time.monotonic()
    probe.wait_features(t1, 3, timeout=30)
    time.sleep(3.0)
    read_only = [r for r in rows if r["case"] == "read-only"]
    table = [r for r in rows if r["case"] != "read-only"]
    return {"cases": len(rows), "writable_cases": len(table), "seconds": round(t1 - t0, 1), "read_only_cases": len(read_only),
            "refused": sum(r["accepted"] is False for r in rows), "accepted": [r for r in rows if r["accepted"]],
            "unanswered": [r for r in rows if r["accepted"] is None],
            "values_changed": changed if before is not None and after is not None else "not read",
            "features_during": probe.features_since(t0) - probe.features_since(t1),
            "features_after_5s": probe.features_since(t1), "rows": rows}


# ----------------------------------------------------------------------------- 2. valid changes
PROMPTS = ["Describe the scene.", "What is in front of the robot?", "List the objects.", "Is the road clear?"]
VALID = {
    "batch.max_size": lambda r: r.randint(1, 8),
    "batch.max_wait_ms": lambda r: round(r.uniform(0.0, 50.0), 2),
    "max_rate": lambda r: r.choice([0.0, 5.0, 20.0]),
    "prompt": lambda r: r.choice(PROMPTS),
    "features": lambda r: r.choice([["vision"], ["hidden"], ["vision", "hidden"]]),
    "frame_id": lambda r: r.choice(["", "base_link", "camera_rig"]),
    "caption.enabled": lambda r: r.random() < 0.5,
    "caption.max_new_tokens": lambda r: r.randint(1, 8),
    "diagnostics.stale_after": lambda r: round(r.uniform(1.0, 600.0), 1),
    "ask.max_new_tokens": lambda r: r.randint(32, 65536),
    "ask.max_prompt_chars": lambda r: r.randint(64, 65536),
    "detect.enabled": lambda r: r.random() < 0.3,
    "detect.classes": lambda r: r.sample(["car", "person", "bicycle", "dog", "traffic light"], r.randint(1, 3)),
    "detect.query": lambda r: r.choice(["", "anything red", "a moving square"]),
    "detect.max_detections": lambda r: r.randint(1, 10),
}


def attack_valid(probe: Probe, node: Child, count: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    names = sorted(VALID)
    start = dict(zip(names, probe.get(names) or []))
    # detect.enabled needs classes: give it some first (a valid change too)
    setup = probe.set([param_msg("detect.classes", ["car", "person"])])
    refused, unanswered, asks = [], 0, []
    t0 = time.monotonic()
    for i in range(count):
        name = rng.choice(names)
        value = VALID[name](rng)
        res = probe.set([param_msg(name, value)])
        if res is None:
            unanswered += 1
        elif not res[0].successful:
            refused.append({"parameter": name, "value": value, "reason": res[0].reason[:160]})
        if i % 5 == 4:
            asks.append(probe.ask(rng.choice(PROMPTS), 16))
        if node.proc.poll() is not None:
            break
        time.sleep(0.25)
    during = probe.features_since(t0)
    order = sorted(start, key=lambda n: n != "detect.enabled")  # off before its classes go
    restore = probe.set([param_msg(n, start[n]) for n in order])
    answers = [probe.result(f, timeout=60.0) for f in asks]
    t1 = time.monotonic()
    flowing = probe.wait_features(t1, 3, timeout=30)
    return {"changes": count, "setup_ok": bool(setup and setup[0].successful), "refused": refused,
            "unanswered": unanswered, "restored": bool(restore) and all(r.successful for r in restore),
            "asks": len(asks), "answered": sum(1 for a in answers if a is not None and a.success),
            "busy": sum(1 for a in answers if a is not None and not a.success and "busy" in a.message),
            "not_answered": sum(1 for a in answers if a is None),
            "failed": [a.message[:160] for a in answers if a is not None and not a.success and "busy" not in a.message],
            "features_during": during, "seconds": round(t1 - t0, 1), "features_at_end": flowing,
            "node_alive": node.proc.poll() is None}


# ----------------------------------------------------------------------------- 3. lifecycle cycles
def attack_lifecycle(probe: Probe, node: Child, cycles: int) -> dict:
    before = proc_status(node.proc.pid)
    rows = []
    for k in range(cycles):
        long_answer = k % 2 == 1
        row = {"cycle": k + 1, "long_answer": long_answer, "failures": []}
        future = None
        if long_answer:
            future = probe.ask("Tell me everything.", LONG_TOKENS)
            time.sleep(1.0)  # the answer is queued or decoding when deactivate comes
        t0 = time.monotonic()
        for name in ("deactivate", "cleanup", "configure", "activate"):
            ok = probe.transition(name)
            if not ok:
                row["failures"].append(f"{name}: {'refused' if ok is False else 'no answer'}")
                break
        row["transitions_s"] = round(time.monotonic() - t0, 2)
        if future is not None:
            answer = probe.result(future, timeout=30.0)
            row["answer"] = "no response" if answer is None else (
                "answered" if answer.success else f"refused: {answer.message[:120]}")
            if answer is None:
                row["failures"].append("the long answer got no response")
        t1 = time.monotonic()
        if not probe.wait_features(t1, 1, timeout=30.0):
            row["failures"].append("no features within 30 s of activate")
        if node.proc.poll() is not None:
            row["failures"].append(f"node exited with {node.proc.returncode}")
            rows.append(row)
            break
        row.update(proc_status(node.proc.pid))
        rows.append(row)
    rss = [r["rss_mb"] for r in rows if "rss_mb" in r]
    threads = [r["threads"] for r in rows if "threads" in r]
    half = rss[len(rss) // 2:]
    return {"cycles": cycles, "completed": len(rows), "failed_cycles": sum(1 for r in rows if r["failures"]),
            "long_answers": sum(1 for r in rows if r["long_answer"]),
            "long_answers_responded": sum(1 for r in rows if r.get("answer", "no response") != "no response"),
            "before": before, "rss_mb": {"before": before["rss_mb"], "start": rss[0] if rss else None, "peak": max(rss) if rss else None,
                       "end": rss[-1] if rss else None,
                       "growth_second_half": (half[-1] - half[0]) if len(half) > 1 else 0.0},
            "threads": {"before": before["threads"], "first": threads[0] if threads else None, "last": threads[-1] if threads else None,
                        "max": max(threads) if threads else None},
            "node_alive": node.proc.poll() is None, "rows": rows}


# ----------------------------------------------------------------------------- 4. checkpoints
def _config(path: Path, text: dict | None = None, vision: dict | None = None) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(text or {})
    cfg["vision_config"].update(vision or {})
    (path / "config.json").write_text(json.dumps(cfg))
    return {}


def _weights(path: Path, edit) -> dict:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    edit(weights)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return {}


def _nan(w):
    w["model.layers.1.mlp.up_proj.weight"][3, 5:8] = float("nan")
    w["visual.blocks.2.attn.qkv.bias"][0] = float("-inf")


def _file(path: Path, name: str, data: bytes | None) -> dict:
    target = path / name
    target.unlink()
    if data is None:
        target.mkdir()
    else:
        target.write_bytes(data)
    return {}


def _truncate(path: Path, name: str) -> dict:
    target = path / name
    data = target.read_bytes()
    target.write_bytes(data[:len(data) // 2])
    return {}


def checkpoint_cases() -> list:
    """(name, edit(path) -> from_pretrained keyword arguments); the first ones are those of
    test/test_model_checks.py."""
    import struct

    config_cases = [
        ({"num_attention_heads": 0}, None), ({"num_attention_heads": 5}, None), ({"num_key_value_heads": 3}, None),
        ({"hidden_size": -64}, None), ({"vocab_size": 2.5}, None), ({"torch_dtype": "float33"}, None),
        ({"image_token_id": 4000}, None), (None, {"depth": 10 ** 9}), (None, {"num_heads": 3}),
        (None, {"out_hidden_size": 32}), (None, {"hidden_act": "gelu"}), (None, {"fullatt_block_indexes": [1, 7]}),
        (None, {"window_size": 100}), ({"num_hidden_layers": 10 ** 9}, None)]
    cases = [(f"config {json.dumps(t or {'vision_config': v})}", lambda p, t=t, v=v: _config(p, t, v))
             for t, v in config_cases]
    cases += [
        ("config.json a JSON list", lambda p: _file(p, "config.json", b"[1, 2]")),
        ("config.json of 2 MiB", lambda p: _file(p, "config.json", b" " * (2 << 20) + b"{}")),
        ("no tokenizer.json", lambda p: (p / "tokenizer.json").unlink() or {}),
        ("model.safetensors a directory", lambda p: _file(p, "model.safetensors", None)),
        ("NaN and -Inf weights", lambda p: _weights(p, _nan)),
        ("min_pixels 2^30", lambda p: {"min_pixels": 1 << 30, "max_pixels": 1 << 30}),
        ("min_pixels above max_pixels", lambda p: {"min_pixels": 1 << 30}),
        ("video max_pixels 2^30", lambda p: {"video_max_pixels": 1 << 30}),
        # beyond test_model_checks.py
        ("no config.json", lambda p: (p / "config.json").unlink() or {}),
        ("config.json cut in half", lambda p: _truncate(p, "config.json")),
        ("model_type llama", lambda p: _config(p, {"model_type": "llama"})),
        ("model.safetensors cut in half", lambda p: _truncate(p, "model.safetensors")),
        ("model.safetensors empty", lambda p: _file(p, "model.safetensors", b"")),
        ("model.safetensors random bytes", lambda p: _file(p, "model.safetensors", os.urandom(4096))),
        ("safetensors header claiming 1 TB", lambda p: _file(p, "model.safetensors", struct.pack("<Q", 1 << 40) + b"{}")),
        ("a weight missing", lambda p: _weights(p, lambda w: w.pop("model.norm.weight"))),
        ("a weight of the wrong shape", lambda p: _weights(p, lambda w: w.update(
            {"model.norm.weight": w["model.norm.weight"][:-1].clone()}))),
        ("tokenizer.json garbage", lambda p: _file(p, "tokenizer.json", b"{not json")),
    ]
    return cases


def attack_checkpoints(workdir: Path) -> dict:
    from qvl_ros.model import BatchedQwenVL
    from qvl_ros.model.checkpoint import default_tiny_checkpoint

    source = default_tiny_checkpoint()
    rows = []
    for i, (name, edit) in enumerate(checkpoint_cases()):
        path = workdir / f"ckpt_{i}"
        shutil.copytree(source, path)
        kwargs = edit(path)
        t0 = time.perf_counter()
        try:
            BatchedQwenVL.from_pretrained(path, device="cpu", dtype="float32", **kwargs)
            error = None
        except Exception as exc:  # noqa: BLE001 - what it raised is the measurement
            error = exc
        took = time.perf_counter() - t0
        message = "" if error is None else str(error)
        rows.append({"case": name, "refused": error is not None, "seconds": round(took, 3),
                     "error": "" if error is None else type(error).__name__,
                     "names_file": error is not None and str(path) in message, "message": message[:200]})
        shutil.rmtree(path, ignore_errors=True)
    return {"cases": len(rows), "refused": sum(r["refused"] for r in rows),
            "named": sum(r["names_file"] for r in rows), "max_s": max(r["seconds"] for r in rows), "rows": rows}


# ----------------------------------------------------------------------------- run, report
def run(args) -> dict:
    import rclpy

    work = Path(tempfile.mkdtemp(prefix="qvl_reliability_"))
    result = {"machine": machine(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
              "cameras": f"{CAMERAS} x {SIZE} rgb8 at {RATE:g} Hz (synthetic, another process)",
              "node": "qvl_node --managed (a process of its own), tiny Qwen2.5-VL (random weights, float32, CPU), "
                      "end token disabled",
              "quick": args.quick}
    ns = f"/reliability_{os.getpid()}"
    checkpoint = endless_checkpoint(work)
    rclpy.init(args=[])
    node = start_node(ns, checkpoint)
    cams = start_cameras(ns)
    probe = Probe(f"{ns}/qvl_node")
    try:
        t0 = time.monotonic()
        for name in ("configure", "activate"):
            if not probe.transition(name):
                raise RuntimeError(f"{name} failed:\n{node.output()[-3000:]}")
        if not probe.wait_features(t0, 3, timeout=60):
            raise RuntimeError(f"no features:\n{node.output()[-3000:]}")
        result["start_s"] = round(time.monotonic() - t0, 1)
        result["start_status"] = proc_status(node.proc.pid)
        t1 = time.monotonic()
        time.sleep(5.0)
        result["sets_per_s_idle"] = round(probe.features_since(t1) / (time.monotonic() - t1), 2)
        print("1. invalid parameter changes", flush=True)
        result["invalid"] = attack_invalid(probe)
        print("2. valid changes under load", flush=True)
        result["valid"] = attack_valid(probe, node, args.valid)
        print("3. lifecycle cycles under load", flush=True)
        result["lifecycle"] = attack_lifecycle(probe, node, args.cycles)
        result["node_alive_at_end"] = node.proc.poll() is None
    finally:
        probe.close()
        cams.stop()
        log = node.output()
        node.stop()
        rclpy.try_shutdown()
    result["node_exit_code"] = node.proc.returncode
    result["tracebacks_in_node_log"] = log.count("Traceback")
    result["node_log_errors"] = [ln[:200] for ln in log.splitlines() if "[ERROR]" in ln or "[FATAL]" in ln][:20]
    print("4. malformed checkpoints", flush=True)
    result["checkpoints"] = attack_checkpoints(work)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    shutil.rmtree(work, ignore_errors=True)
    return result


def summary(r: dict) -> list:
    """(attack, earlier figure, now) rows."""
    inv, val, lc, ck = r["invalid"], r["valid"], r["lifecycle"], r["checkpoints"]
    rss = lc["rss_mb"]
    errors = len(val["refused"]) + val["unanswered"] + len(val["failed"]) + (0 if val["node_alive"] else 1)
    return [
        ("invalid parameter changes", "31 of 31 refused",
         f"{inv['refused']} of {inv['cases']} refused ({inv['writable_cases']} on read-write parameters, "
         f"{inv['read_only_cases']} read-only); {len(inv['accepted'])} accepted, values changed: "
         f"{len(inv['values_changed']) if isinstance(inv['values_changed'], list) else inv['values_changed']}; "
         f"{inv['features_after_5s']} features in the 5 s after"),
        ("valid changes under load", "147 without an error",
         f"{val['changes']} changes, {errors} errors; {val['asks']} questions: {val['answered']} answered, "
         f"{val['busy']} busy, {val['not_answered']} unanswered; features at the end: "
         f"{'yes' if val['features_at_end'] else 'NO'}"),
        ("lifecycle cycles under load", "50 cycles (RSS +35 MB, flat after 15, no leaked thread)",
         f"{lc['completed']} of {lc['cycles']} cycles, {lc['failed_cycles']} failed; {lc['long_answers_responded']} of "
         f"{lc['long_answers']} long answers responded; RSS {rss['before']:.0f} MiB before, "
         f"{rss['start']:.0f} after the first cycle, {rss['end']:.0f} after the last ({rss['end'] - rss['before']:+.0f}; "
         f"peak {rss['peak']:.0f}; last rise over 1 MiB at cycle {last_rise(lc['rows'])}; second half "
         f"{rss['growth_second_half']:+.1f}); threads {lc['threads']['before']} "
         f"before, {lc['threads']['first']} after the first cycle, {lc['threads']['last']} after the last"),
        ("malformed checkpoints", "26 refused within 5 s",
         f"{ck['refused']} of {ck['cases']} refused ({ck['named']} naming the file) within {ck['max_s']:.2f} s"),
    ]


def last_rise(rows: list) -> int:
    """The last cycle after which the node's RSS had grown by more than 1 MiB (0: none)."""
    rss = [(r["cycle"], r["rss_mb"]) for r in rows if "rss_mb" in r]
    return max([c for (c, m), (_, prev) in zip(rss[1:], rss) if m - prev > 1.0], default=0)


def long_answers(rows: list) -> str:
    """The long answers' outcomes, counted by their message with the token count left out."""
    import re

    outcomes, tokens = {}, []
    for row in rows:
        if row["long_answer"]:
            text = row.get("answer", "not asked")
            tokens += [int(t) for t in re.findall(r"after (\d+) tokens", text)]
            key = re.sub(r"after \d+ tokens", "after N tokens", text)
            outcomes[key] = outcomes.get(key, 0) + 1
    spread = f" (N from {min(tokens)} to {max(tokens)})" if tokens else ""
    return "; ".join(f"{n} x {k!r}" for k, n in outcomes.items()) + spread


def to_markdown(r: dict) -> str:
    lines = [f"# Reliability: qvl_node under attack, {r['cameras']}", "",
             "`scripts/run.sh python bench/reliability.py` (see its docstring for what is done and counted).", "",
             f"- machine: {r['machine']}; load average {r['load_average_start']} at the start, "
             f"{r['load_average_end']} at the end", f"- node: {r['node']}",
             f"- sets/s before the attacks: {r['sets_per_s_idle']}; node start (configure, activate, first "
             f"features): {r['start_s']} s", "",
             "| attack | earlier | now |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary(r)]
    lines += ["", f"- node: alive at the end {r['node_alive_at_end']}, exit code after SIGINT {r['node_exit_code']}, "
                  f"tracebacks in its log {r['tracebacks_in_node_log']}"]
    inv, val = r["invalid"], r["valid"]
    lines.append(f"- invalid changes: {inv['cases']} in {inv['seconds']} s, {inv['features_during']} features meanwhile")
    lines.append(f"- valid changes: {val['seconds']} s, {val['features_during']} features meanwhile; refused: "
                 f"{val['refused'][:3]}; failed questions: {val['failed'][:3]}")
    lc = r["lifecycle"]
    per = [f"{x['cycle']}: {x.get('rss_mb', 0):.0f}" for x in lc["rows"]]
    lines.append(f"- RSS (MiB) after each cycle: {', '.join(per)}")
    lines.append(f"- long answers at deactivate: {long_answers(lc['rows'])}")
    failures = [f"{x['cycle']}: {x['failures']}" for x in lc["rows"] if x["failures"]]
    lines.append(f"- failed cycles: {failures or 'none'}")
    lines += ["", "| checkpoint case | refused | error | names the file | s |", "|---|---|---|---|---|"]
    lines += [f"| {c['case'].replace('|', '/')} | {c['refused']} | {c['error']} | {c['names_file']} | {c['seconds']:.3f} |"
              for c in r["checkpoints"]["rows"]]
    accepted = r["invalid"]["accepted"]
    lines += ["", f"- invalid changes accepted: {accepted or 'none'}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 10 valid changes, 2 cycles")
    ap.add_argument("--valid", type=int, default=None, help="valid changes under load (default 150)")
    ap.add_argument("--cycles", type=int, default=None, help="lifecycle cycles (default 50)")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the results files")
    args = ap.parse_args(argv)
    args.valid = args.valid if args.valid is not None else (10 if args.quick else 150)
    args.cycles = args.cycles if args.cycles is not None else (2 if args.quick else 50)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"reliability-{args.tag}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"reliability-{args.tag}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
