"""Drive a running qvl_node from a shell without the `ros2` command: its lifecycle and `~/ask`.

    python -m qvl_ros.ros.control state /robot1/qvl_node
    python -m qvl_ros.ros.control set /robot1/qvl_node configure      # then activate, deactivate, ...
    python -m qvl_ros.ros.control ask /robot1/qvl_node "What is in front of the robot?" --cameras camera_0

The same calls as `ros2 lifecycle get|set` and `ros2 service call <node>/ask qvl_ros/srv/Ask`
(lifecycle_msgs' GetState / ChangeState services, the node's Ask service), for set-ups where the
ros2 command line is not installed. Each command waits up to `--timeout` seconds for the node's
service to appear and for the answer; exit 0 on success, 1 on a refused transition or an
unsuccessful answer (its message printed), 2 when the service never appeared or timed out.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

TRANSITIONS = ("configure", "activate", "deactivate", "cleanup", "shutdown")


def _call(node, srv_type, name: str, request, timeout: float):
    import rclpy

    client = node.create_client(srv_type, name)
    if not client.wait_for_service(timeout_sec=timeout):
        raise TimeoutError(f"service {name} did not appear within {timeout:g} s")
    future = client.call_async(request)
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    if not future.done():
        raise TimeoutError(f"{name} did not answer within {timeout:g} s")
    return future.result()


def _state(node, target: str, timeout: float) -> int:
    from lifecycle_msgs.srv import GetState

    print(_call(node, GetState, f"{target}/get_state", GetState.Request(), timeout).current_state.label)
    return 0


def _set(node, target: str, transition: str, timeout: float) -> int:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    request = ChangeState.Request(transition=Transition(id=getattr(Transition, f"TRANSITION_{transition.upper()}")))
    ok = _call(node, ChangeState, f"{target}/change_state", request, timeout).success
    print(f"{transition}: {'done' if ok else 'refused'}")
    return 0 if ok else 1


def _ask(node, target: str, prompt: str, cameras: Sequence[str], max_new_tokens: int, timeout: float) -> int:
    from qvl_ros.srv import Ask

    request = Ask.Request(prompt=prompt, camera_names=list(cameras), max_new_tokens=max_new_tokens)
    r = _call(node, Ask, f"{target}/ask", request, timeout)
    if not r.success:
        print(f"not answered: {r.message}")
        return 1
    print(f"cameras {list(r.camera_names)}, set stamp {r.stamp.sec}.{r.stamp.nanosec:09d}")
    print(r.text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qvl_ros.ros.control", description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the service and its answer")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("state", help="the node's lifecycle state")
    p.add_argument("node")
    p = sub.add_parser("set", help="a lifecycle transition")
    p.add_argument("node")
    p.add_argument("transition", choices=TRANSITIONS)
    p = sub.add_parser("ask", help="a question about the newest set (~/ask)")
    p.add_argument("node")
    p.add_argument("prompt")
    p.add_argument("--cameras", nargs="*", default=[], help="a subset of the cameras, by name (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the node's caption.max_new_tokens")
    a = ap.parse_args(argv)
    if not (a.timeout > 0):
        ap.error("--timeout must be positive")

    import rclpy

    rclpy.init()
    node = rclpy.create_node("qvl_control")
    try:
        if a.command == "state":
            return _state(node, a.node, a.timeout)
        if a.command == "set":
            return _set(node, a.node, a.transition, a.timeout)
        return _ask(node, a.node, a.prompt, a.cameras, a.max_new_tokens, a.timeout)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
