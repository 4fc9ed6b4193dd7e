"""Launch qvl_node on several cameras, optionally with synthetic cameras to try it out.

    ros2 launch qvl_ros multi_cam.launch.py synthetic:=true
    ros2 launch qvl_ros multi_cam.launch.py namespace:=robot1 model:=/models/Qwen2.5-VL-3B-Instruct \
        camera_topics:="[front/image_raw, left/image_raw, rear/image_raw/compressed]"
    ros2 launch qvl_ros multi_cam.launch.py use_sim_time:=true   # with `ros2 bag play --clock ...`

Arguments:
    params_file    parameter file (default: the installed config/multi_cam.yaml)
    namespace      namespace of the node (and of the synthetic cameras); outputs are
                   <namespace>/features and <namespace>/caption
    model          checkpoint directory or cached Hugging Face id (empty: the file's model.path)
    camera_topics  "[a/image_raw, b/image_raw]" or "a/image_raw,b/image_raw" (empty: the file's)
    caption        "true"/"false" to override caption.enabled (empty: the file's)
    detect         class names, "[cup, chair]" or "cup,chair": detections on (detect.enabled,
                   detect.classes; per camera on <namespace>/<camera>/detections); empty: the file's
    synthetic      "true" also starts the synthetic camera publisher on the same topics
    use_sim_time   "true" for bag replay / simulation
    managed        "true" (default) starts qvl_node as a lifecycle node (``--managed``)
    autostart      "true" (default): configure it, then activate it once configured; "false"
                   leaves it unconfigured for a lifecycle manager (``ros2 lifecycle set``)

Everything started here can be started without `launch` too: `qvl_node`,
`qvl-synthetic-cameras` (``python -m qvl_ros.node`` / ``python -m qvl_ros.synthetic``).

Signals. Ctrl-C in the terminal reaches every process of the group; each ends by itself with
exit code 0 (qvl_ros/ros/spin.py) and launch reports it finished cleanly. SIGINT to `ros2
launch` alone: launch sends SIGINT (SIGTERM after 5 s in an interactive terminal) to each
process. SIGTERM to `ros2 launch` alone: this launch snapshot has no SIGTERM handler (nothing
calls ``signal.signal`` for it; ``LaunchService._on_sigterm`` in launch/launch_service.py is only
reached through the wakeup fd of a handled signal), so the process dies at once and never
signals its processes. Hence every process started here gets ``QVL_EXIT_WITH_PARENT=1``: the
kernel sends it SIGTERM when `ros2 launch` dies (PR_SET_PDEATHSIG), and it ends as on Ctrl-C.
In the `ros2 launch` process, SIGINT raises no KeyboardInterrupt (launch still sees it: its
signal manager reads the wakeup fd, which any Python-level handler feeds). Python's default
handler raised it wherever the main thread was; a second Ctrl-C landing while launch ran its
shutdown handlers skipped the rest of them, among them launch_ros's ROS adapter shutdown
(launch_ros/ros_adapters.py, ``get_ros_adapter``), whose non-daemon executor thread
(``ROSAdapter._run``) then spun forever and `ros2 launch` hung in ``threading._shutdown`` (or
aborted at exit). Once launch shuts down, it ignores further SIGINTs (it only logs "again,
ignoring" for them), so that one arriving while the interpreter exits cannot end it by signal.
"""
import signal
import threading
from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnShutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

# Each process ends when `ros2 launch` dies (SIGTERM to it: see the module doc).
EXIT_WITH_LAUNCH = {"QVL_EXIT_WITH_PARENT": "1"}


def _default_params_file() -> str:
    try:
        from ament_index_python.packages import get_package_share_directory

        return str(Path(get_package_share_directory("qvl_ros")) / "config" / "multi_cam.yaml")
    except Exception:  # not installed: the source tree next to this file
        return str(Path(__file__).resolve().parent.parent / "config" / "multi_cam.yaml")


def _parse_list(text: str) -> list:
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        import yaml

        return [str(x) for x in yaml.safe_load(text)]
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"launch argument {name} must be true or false, got {text!r}")
    return value in ("true", "1", "yes")


def _actions(context):
    arg = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    params_file = arg("params_file") or _default_params_file()
    namespace = arg("namespace")
    sim_time = _parse_bool("use_sim_time", arg("use_sim_time"))
    topics = _parse_list(arg("camera_topics"))

    node_overrides = {"use_sim_time": sim_time}
    if arg("model"):
        node_overrides["model.path"] = arg("model")
    if topics:
        node_overrides["camera_topics"] = topics
    if arg("caption"):
        node_overrides["caption.enabled"] = _parse_bool("caption", arg("caption"))
    classes = _parse_list(arg("detect"))
    if classes:
        node_overrides.update({"detect.enabled": True, "detect.classes": classes})

    if _parse_bool("managed", arg("managed")):
        actions = _managed_node(namespace, [params_file, node_overrides], _parse_bool("autostart", arg("autostart")))
    else:
        actions = [Node(
            package="qvl_ros", executable="qvl_node", name="qvl_node", namespace=namespace,
            parameters=[params_file, node_overrides], output="screen", emulate_tty=True,
            additional_env=EXIT_WITH_LAUNCH)]
    if _parse_bool("synthetic", arg("synthetic")):
        camera_overrides = {"use_sim_time": sim_time}
        if topics:
            camera_overrides["topics"] = topics
        actions.append(Node(
            package="qvl_ros", executable="synthetic_cameras", name="synthetic_cameras", namespace=namespace,
            parameters=[params_file, camera_overrides], output="screen", emulate_tty=True,
            additional_env=EXIT_WITH_LAUNCH))
    return actions


def _managed_node(namespace, parameters, autostart: bool) -> list:
    """qvl_node as a lifecycle node; with autostart, a configure request at start and an
    activate request once it reaches `inactive` (what a lifecycle manager would send)."""
    import lifecycle_msgs.msg
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.events import matches_action
    from launch_ros.actions import LifecycleNode
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState

    node = LifecycleNode(
        package="qvl_ros", executable="qvl_node", name="qvl_node", namespace=namespace,
        parameters=parameters, arguments=["--managed"], output="screen", emulate_tty=True,
        additional_env=EXIT_WITH_LAUNCH)
    if not autostart:
        return [node]
    transition = lifecycle_msgs.msg.Transition
    configure = EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                            transition_id=transition.TRANSITION_CONFIGURE))
    activate = RegisterEventHandler(OnStateTransition(
        target_lifecycle_node=node, goal_state="inactive",
        entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                              transition_id=transition.TRANSITION_ACTIVATE))]))
    return [activate, node, configure]


def _ignore_further_sigint(event, context):
    """From the shutdown on, a SIGINT changes nothing for launch; ignore it (see the module doc)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _no_keyboard_interrupt(signum, frame):
    """SIGINT handler of the launch process: nothing; launch acts on it through the wakeup fd."""


def generate_launch_description():
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _no_keyboard_interrupt)
    return LaunchDescription([
        RegisterEventHandler(OnShutdown(on_shutdown=_ignore_further_sigint)),
        DeclareLaunchArgument("params_file", default_value="",
                              description="Parameter file (default: the installed config/multi_cam.yaml)"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the nodes"),
        DeclareLaunchArgument("model", default_value="",
                              description="Checkpoint directory or cached Hugging Face id (default: the file's)"),
        DeclareLaunchArgument("camera_topics", default_value="",
                              description='Camera topics, "[a/image_raw, b/image_raw]" (default: the file\'s)'),
        DeclareLaunchArgument("caption", default_value="", description="Override caption.enabled (true/false)"),
        DeclareLaunchArgument("detect", default_value="",
                              description='Class names to detect, "[cup, chair]": turns detections on (default: the file\'s)'),
        DeclareLaunchArgument("synthetic", default_value="false",
                              description="Also start synthetic cameras on the camera topics"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bag replay)"),
        DeclareLaunchArgument("managed", default_value="true",
                              description="Start qvl_node as a lifecycle node (true/false)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Configure and activate the managed node at start (true/false)"),
        OpaqueFunction(function=_actions),
    ])
